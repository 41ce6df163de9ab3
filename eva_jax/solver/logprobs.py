"""Sequence log-probs of response tokens, without materialising a batch of full logits.

Gemma's vocabulary has 256k rows: float32 logits for 8 sequences of 1024 tokens would take
8 GiB, and their gradient as much again. So the model runs up to its final-normed hidden
states [B, T, D], and the unembedding + log-softmax runs over chunks of `chunk_size`
positions inside a `lax.scan` whose body has its own VJP (`_chunk_token_logps`): only one
chunk's logits [B, chunk, V] exist at a time, in the forward pass and again (recomputed) in
the backward pass.

With `scored_length`, only the positions that carry a loss weight are unembedded: each row's
scored positions (at most `scored_length`, in order) are gathered from [B, T, D] into
[B, scored_length, D] first. The prompt's positions have no loss, and the 256k-row
unembedding is about a fifth of a Gemma 2 2B's matmul FLOPs, so a batch of half prompt, half
response does about 11% less matmul work per step (Tunix's DPO computes every position's logits
and then keeps the responses', `logits_to_keep`).

Chosen and rejected rows go through one forward: they are interleaved ([B, 2, T] ->
[2B, T], pair i on rows 2i and 2i + 1), so that each device's pairs stay on that device when
the batch is sharded, instead of the cross-device shuffle that concatenating two sharded
halves would need.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eva_jax.models.transformer import default_positions
from eva_jax.solver import batch as batch_lib
from eva_jax.solver.losses import PreferenceLogps

Array = jax.Array

_LOGITS_AXES = ("batch", "length", "vocab")
_HIDDEN_AXES = ("batch", "length", "embed")
_CHUNKED_HIDDEN_AXES = (None,) + _HIDDEN_AXES


def _unembed_params(params: Any) -> Any:
  """The params a Transformer's `unembed` reads: the tied embedding. The chunk's custom VJP
  takes these alone, so that its cotangent is not a tree of zeros for every other param."""
  return {"embedder": params["embedder"]}


# One pass when every exp(x), |x| <= bound, is a normal float32 with room to spare (e^-60 is
# about 1e-26; the smallest normal is about 1e-38) and their sum over the vocabulary stays
# below e^80 (float32's largest is about e^88.7).
_ONE_PASS_MAX_BOUND = 60.0
_ONE_PASS_MAX_LOG_SUM = 80.0


def log_normaliser(logits: Array, bound: Optional[float] = None) -> Array:
  """log sum exp over the last axis of float32 logits, in one pass over them when `bound` says
  every logit lies in [-bound, bound] (a final soft-cap: Gemma 2's 30).

  The usual form subtracts the row's max first, so that exp cannot overflow: a second pass over
  the logits (gemma2_2b's loss, 2048 positions a chunk: 2.1 GB of float32 logits read once
  more). Bounded logits need no shift: each exp(x) lies in [e^-bound, e^bound], normal in
  float32, and their sum stays finite while bound + log(V) < 88. The sum's relative rounding
  is the same either way (a shift scales the terms; it does not change their ratios).
  """
  vocab = logits.shape[-1]
  if (bound is not None and bound <= _ONE_PASS_MAX_BOUND
      and bound + math.log(vocab) < _ONE_PASS_MAX_LOG_SUM):
    return jnp.log(jnp.sum(jnp.exp(logits), axis=-1))
  return jax.nn.logsumexp(logits, axis=-1)


def _chunk_token_logps(model: nn.Module, params: Any, compute_params: Any, hidden: Array,
                       targets: Array) -> Array:
  """log p(targets) [B, C] from final-normed hidden [B, C, D] (one chunk), with its own VJP.

  `params` are the unembedding's params (`_unembed_params`), `compute_params` the same in the
  compute dtype, cast once before the chunk loop: the chunk reads those. The float32 default
  cast its float32 table inside every chunk, forward and backward (gemma2_2b: 3.5 GB read
  and written an iteration). Their gradient goes to `params` in its dtype, accumulated across
  chunks as before.

  Forward: the target's logit is gathered. The compare-and-select it replaces, `where(iota ==
  target, logits, 0)`, made JAX's partial evaluation of the chunk scan (under
  `value_and_grad`) hoist the loop-invariant iota and zeros, two [B, C, V] arrays, out of the
  loop: computed once, held in memory, and read by every chunk (gemma2_2b, chunks of 2048
  positions: 2.1 GB each). A gather has no such operand, and XLA partitions it over a
  vocabulary sharded on `tensor` (a masked local gather and the all-reduce the log-sum-exp
  has anyway).

  Backward: the inputs are kept (as `jax.checkpoint` did) and the forward's log-normaliser
  [B, C]; the logits are recomputed and d logits = ct * (onehot(target) - exp(logits - lse))
  formed in one pass, the one-hot by compare-and-select, which stays inside the backward loop.
  Recomputing the log-normaliser there read the float32 chunk logits twice more (a max and a
  sum: gemma2_2b, chunks of 2048 positions, 4.2 GB an iteration). Autodiff of the forward
  would transpose the gather into a scatter-add into a zeroed [B, C, V] array.
  """

  def logits_of(p, h):
    logits = model.apply({"params": p}, h, method="unembed")  # f32 [B, C, V]
    return nn.with_logical_constraint(logits, _LOGITS_AXES)

  param_dtypes = jax.tree_util.tree_map(lambda x: x.dtype, params)

  logit_bound = model.config.final_logit_softcap

  def logps_and_normaliser(pc, h, y):
    logits = logits_of(pc, h)
    picked = jnp.take_along_axis(logits, y[..., None], axis=-1, mode="clip")[..., 0]
    lse = log_normaliser(logits, logit_bound)
    return picked - lse, lse

  @jax.custom_vjp
  def token_logps(p, pc, h, y):
    del p  # differentiated through `pc`'s gradient (below)
    return logps_and_normaliser(pc, h, y)[0]

  def forward(p, pc, h, y):
    logps, lse = logps_and_normaliser(pc, h, y)
    return logps, (pc, h, y, lse)

  def backward(saved, ct):
    pc, h, y, lse = saved
    logits, unembed_vjp = jax.vjp(logits_of, pc, h)
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    onehot = jnp.where(vocab == y[..., None], 1.0, 0.0)
    softmax = jnp.exp(logits - lse[..., None])
    dlogits = nn.with_logical_constraint(ct[..., None] * (onehot - softmax), _LOGITS_AXES)
    dpc, dh = unembed_vjp(dlogits)
    dp = jax.tree_util.tree_map(lambda g, dtype: g.astype(dtype), dpc, param_dtypes)
    # `pc` is a copy of `p`: its gradient is `p`'s alone, not counted twice.
    return dp, None, dh, np.zeros(y.shape, jax.dtypes.float0)

  token_logps.defvjp(forward, backward)
  return token_logps(params, compute_params, hidden, targets)


def scored_positions(weights: Array, scored_length: int) -> Array:
  """int32 [B, scored_length]: each row's positions with weight > 0, in order, then (when a
  row has fewer) positions of weight 0. A row with more than `scored_length` loses the rest:
  the callers check on the host that no row does (`validate_pair_batch(scored_length=...)`)."""
  # A stable sort of "unscored?" puts the scored positions first, keeping their order.
  return jnp.argsort(weights <= 0, axis=-1, stable=True)[:, :scored_length].astype(jnp.int32)


def _next_token_targets(tokens: Array, loss_mask: Array, pad_id: int) -> tuple[Array, Array]:
  """(targets, weights) [B, T]: position t predicts token t + 1 with the weight of t + 1's
  loss-mask entry (the last position predicts nothing)."""
  b = tokens.shape[0]
  targets = jnp.concatenate([tokens[:, 1:], jnp.full((b, 1), pad_id, jnp.int32)], axis=1)
  weights = jnp.concatenate([jnp.asarray(loss_mask)[:, 1:].astype(jnp.float32),
                             jnp.zeros((b, 1), jnp.float32)], axis=1)
  return targets, weights


def _scored_logps(model: nn.Module, params: Any, hidden: Array, targets: Array, weights: Array,
                  chunk_size: int) -> Array:
  """sum over t of weights * log p(targets) [B] from hidden [B, T, D], unembedding `chunk_size`
  positions at a time."""
  b, t, d = hidden.shape
  chunk = max(1, min(chunk_size, t))
  n = math.ceil(t / chunk)
  if n * chunk != t:
    extra = n * chunk - t
    hidden = jnp.pad(hidden, ((0, 0), (0, extra), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, extra)), constant_values=model.config.pad_id)
    weights = jnp.pad(weights, ((0, 0), (0, extra)))
  # [n, B, chunk, ...]: scan over chunks; the batch keeps its sharding.
  hidden = nn.with_logical_constraint(
      hidden.reshape(b, n, chunk, d).swapaxes(0, 1), _CHUNKED_HIDDEN_AXES)
  targets = targets.reshape(b, n, chunk).swapaxes(0, 1)
  weights = weights.reshape(b, n, chunk).swapaxes(0, 1)

  unembed = _unembed_params(params)
  compute_dtype = jnp.dtype(model.config.dtype)
  unembed_compute = jax.tree_util.tree_map(lambda x: x.astype(compute_dtype), unembed)

  # Each chunk's logits are recomputed in the backward pass, not kept (`_chunk_token_logps`).
  def body(total, xs):
    h, y, w = xs
    logps = _chunk_token_logps(model, unembed, unembed_compute, h, y)
    return total + jnp.sum(logps * w, axis=-1), None

  total, _ = jax.lax.scan(body, jnp.zeros((b,), jnp.float32), (hidden, targets, weights))
  return total


def sequence_logps(model: nn.Module, params: Any, tokens: Array, loss_mask: Array, *,
                   chunk_size: int = 256,
                   scored_length: Optional[int] = None) -> tuple[Array, Array]:
  """Summed log-probs of the masked tokens of each row, and how many tokens were scored.

  Args:
    model: a `Transformer` (its `hidden_states` and `unembed`).
    params: its params.
    tokens: int32 [B, T], right-padded with `model.config.pad_id`.
    loss_mask: [B, T], 1 where token t is scored by the logits at t - 1 (position 0 ignored).
    chunk_size: positions per unembedding chunk; memory of one chunk's logits is
      B * chunk_size * V * 4 bytes. T need not be a multiple (the tail is padded).
    scored_length: unembed only each row's scored positions, of which there must be at most
      this many (e.g. the sampler's max_new_tokens); None (or >= T) unembeds all T.

  Returns:
    (sum float32 [B], count float32 [B]).
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  t = tokens.shape[1]
  hidden = model.apply({"params": params}, tokens, return_hidden=True)  # [B, T, D]
  targets, weights = _next_token_targets(tokens, loss_mask, model.config.pad_id)
  if scored_length is not None and scored_length < t:
    if scored_length < 1:
      raise ValueError(f"sequence_logps: scored_length must be >= 1, got {scored_length}.")
    index = scored_positions(weights, scored_length)
    hidden = nn.with_logical_constraint(
        jnp.take_along_axis(hidden, index[..., None], axis=1), _HIDDEN_AXES)
    targets = jnp.take_along_axis(targets, index, axis=1)
    weights = jnp.take_along_axis(weights, index, axis=1)
  total = _scored_logps(model, params, hidden, targets, weights, chunk_size)
  return total, jnp.sum(weights, axis=-1)


class SharedPromptRows(NamedTuple):
  """A pair batch packed one row per pair, the prompt once (see `pack_shared_prompt`)."""
  tokens: Array  # int32 [B, L]: chosen row, then the rejected row past the shared prefix, pad
  positions: Array  # int32 [B, L]: each token's position in its own (unpacked) row
  # int32 [B, L]: 1 the shared prefix, 2 the chosen response, 3 the rejected one, 0 padding
  # (the model's `segment_ids`: a response's tokens see the prefix and their own response).
  segment_ids: Array
  rejected_slots: Array  # int32 [B, T]: packed slot of each rejected-row slot (clipped)


def _last_real_plus_one(tokens: Array, pad_id: int) -> Array:
  real = tokens != pad_id
  return jnp.max(jnp.where(real, jnp.arange(tokens.shape[1]) + 1, 0), axis=1)


def pack_shared_prompt(batch: Mapping[str, Array], pad_id: int, length: int) -> SharedPromptRows:
  """Packs each pair as [prompt, chosen response, rejected response] in one row of `length`.

  The shared prefix is the longest run of leading tokens equal in both rows, scored in
  neither and not padding (the prompt, for `make_pair_batch`'s pairs). The chosen row keeps
  its slots; the rejected row's tokens after the prefix follow it. Each token keeps its own
  row's position (`default_positions`), and sees, causally, the prefix and its own response
  only, so its hidden state is the one its unpacked row gives it. A pair longer than `length`
  would lose tokens: `validate_pair_batch(share_prompt=True)` checks on the host that none is.
  """
  chosen = jnp.asarray(batch["chosen_tokens"], jnp.int32)
  rejected = jnp.asarray(batch["rejected_tokens"], jnp.int32)
  b, t = chosen.shape
  same = ((chosen == rejected) & (chosen != pad_id)
          & (jnp.asarray(batch["chosen_loss_mask"]) == 0)
          & (jnp.asarray(batch["rejected_loss_mask"]) == 0))
  shared = jnp.sum(jnp.cumprod(same.astype(jnp.int32), axis=1), axis=1)[:, None]  # [B, 1]
  chosen_end = _last_real_plus_one(chosen, pad_id)[:, None]
  rejected_end = _last_real_plus_one(rejected, pad_id)[:, None]
  slots = jnp.arange(length, dtype=jnp.int32)[None]  # [1, L]
  in_chosen = slots < chosen_end
  from_rejected = slots - chosen_end + shared  # the rejected row's slot at each packed slot
  in_rejected = ~in_chosen & (from_rejected < rejected_end)
  chosen_src = jnp.minimum(slots, t - 1)
  rejected_src = jnp.clip(from_rejected, 0, t - 1)
  take = lambda x, src: jnp.take_along_axis(x, jnp.broadcast_to(src, (b, length)), axis=1)
  tokens = jnp.where(in_chosen, take(chosen, chosen_src),
                     jnp.where(in_rejected, take(rejected, rejected_src), pad_id))
  positions = jnp.where(
      in_chosen, take(default_positions(chosen, pad_id), chosen_src),
      jnp.where(in_rejected, take(default_positions(rejected, pad_id), rejected_src), 0))
  segment_ids = jnp.where(tokens == pad_id, 0, jnp.where(
      slots < shared, 1, jnp.where(in_chosen, 2, jnp.where(in_rejected, 3, 0))))
  row_slots = jnp.arange(t, dtype=jnp.int32)[None]
  rejected_slots = jnp.where(row_slots < shared, row_slots, row_slots - shared + chosen_end)
  return SharedPromptRows(tokens, positions, segment_ids.astype(jnp.int32),
                          jnp.minimum(rejected_slots, length - 1))


def _shared_prompt_pair_logps(model: nn.Module, params: Any, batch: Mapping[str, Array], *,
                              chunk_size: int, scored_length: Optional[int]):
  """(sum, count) [B, 2] of chosen and rejected, from one packed row per pair."""
  pad_id = model.config.pad_id
  b, t = batch["chosen_tokens"].shape
  length = batch_lib.shared_prompt_length(t, scored_length)
  packed = pack_shared_prompt(batch, pad_id, length)
  hidden = model.apply({"params": params}, packed.tokens, positions=packed.positions,
                       segment_ids=packed.segment_ids, return_hidden=True)  # [B, L, D]
  scored = t if scored_length is None else min(scored_length, t)
  identity = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
  sides = []
  for side, slots in (("chosen", identity), ("rejected", packed.rejected_slots)):
    targets, weights = _next_token_targets(jnp.asarray(batch[f"{side}_tokens"], jnp.int32),
                                           batch[f"{side}_loss_mask"], pad_id)
    index = scored_positions(weights, scored) if scored < t else identity
    predictor = jnp.take_along_axis(slots, index, axis=1)  # the packed slot predicting each
    sides.append((jnp.take_along_axis(hidden, predictor[..., None], axis=1),
                  jnp.take_along_axis(targets, index, axis=1),
                  jnp.take_along_axis(weights, index, axis=1)))
  # [B, 2, S, ...] -> [2B, S, ...], pair i on rows 2i and 2i + 1 as in the unpacked path.
  hidden, targets, weights = (jnp.stack(x, axis=1).reshape((2 * b,) + x[0].shape[1:])
                              for x in zip(*sides))
  hidden = nn.with_logical_constraint(hidden, _HIDDEN_AXES)
  total = _scored_logps(model, params, hidden, targets, weights, chunk_size)
  return total.reshape(b, 2), jnp.sum(weights, axis=-1).reshape(b, 2)


def pair_logps(model: nn.Module, params: Any, batch: Mapping[str, Array], *,
               chunk_size: int = 256, with_reference: bool = True,
               scored_length: Optional[int] = None,
               share_prompt: bool = False) -> PreferenceLogps:
  """Policy log-probs of a pair batch (format: `eva_jax.solver.batch`) in one forward.

  Args:
    batch: `chosen_tokens`, `chosen_loss_mask`, `rejected_tokens`, `rejected_loss_mask`
      [B, T] and, when `with_reference`, `ref_chosen_logps`, `ref_rejected_logps` [B].
    share_prompt: run each pair as one packed row (`pack_shared_prompt`) of
      `shared_prompt_length(T, scored_length)` tokens, the prompt once, instead of two rows
      of T: the same log-probs, with the prompt's share of the forward and backward work
      saved. Either attention implementation (the model's `segment_ids`).

  Returns:
    PreferenceLogps with [B] fields (reference fields None unless `with_reference`).
  """
  b, t = batch["chosen_tokens"].shape
  if share_prompt:
    total, count = _shared_prompt_pair_logps(model, params, batch, chunk_size=chunk_size,
                                             scored_length=scored_length)
  else:
    tokens = jnp.stack([batch["chosen_tokens"], batch["rejected_tokens"]], axis=1)
    mask = jnp.stack([batch["chosen_loss_mask"], batch["rejected_loss_mask"]], axis=1)
    total, count = sequence_logps(model, params, tokens.reshape(2 * b, t),
                                  mask.reshape(2 * b, t), chunk_size=chunk_size,
                                  scored_length=scored_length)
    total, count = total.reshape(b, 2), count.reshape(b, 2)
  ref_c = ref_r = None
  if with_reference:
    ref_c = jnp.asarray(batch["ref_chosen_logps"], jnp.float32)
    ref_r = jnp.asarray(batch["ref_rejected_logps"], jnp.float32)
  return PreferenceLogps(total[:, 0], total[:, 1], count[:, 0], count[:, 1], ref_c, ref_r)


def naive_sequence_logps(model: nn.Module, params: Any, tokens: Array,
                         loss_mask: Array) -> tuple[Array, Array]:
  """The same as `sequence_logps` through full [B, T, V] logits: a reference for tests."""
  logits = model.apply({"params": params}, tokens)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  tok = jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], axis=-1)[..., 0]
  w = jnp.asarray(loss_mask)[:, 1:].astype(jnp.float32)
  return jnp.sum(tok * w, axis=-1), jnp.sum(w, axis=-1)


"""The jitted, sharded preference-optimisation step, and reference log-probs for a round.

Batch format (built by `eva_jax.solver.batch.make_pair_batch`; B pairs, T padded length):

    chosen_tokens       int32 [B, T]  prompt + chosen response, right-padded with config.pad_id
    chosen_loss_mask    int32 [B, T]  1 on chosen-response tokens (token t scored by logits t-1)
    rejected_tokens     int32 [B, T]
    rejected_loss_mask  int32 [B, T]
    ref_chosen_logps    float32 [B]   reference model's summed response log-probs
    ref_rejected_logps  float32 [B]   (both absent / ignored for reference-free losses)

`train_step(state, batch) -> (state, metrics)`:

* is one `jax.jit` with `in_shardings` / `out_shardings` from the logical axis rules (params
  by their axes, the batch over the data axes), the state donated;
* splits the batch into `num_microbatches` micro-batches and accumulates gradients over them
  in a `lax.scan` (float32 accumulators), so memory is that of one micro-batch; micro-batch m
  takes rows m, m + M, m + 2M, ... so that every device keeps working on its own rows;
* runs the policy once per micro-batch on chosen and rejected together (`pair_logps`), the
  reference log-probs coming from the batch (`reference_logps` computes them once per round
  with the round's starting params): the step never holds a second model; by default
  (`share_prompt`) each pair is one packed row, its prompt computed once;
* returns metrics averaged over the batch: `loss`, the loss's own (`rewards/*`, `logps/*`),
  `grad_norm` (before clipping), `learning_rate`, `tokens` (scored response tokens).

Works on any mesh shape and with any number of processes (each process passes its slice of
the global batch to `shard_batch`).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eva_jax import parallel
from eva_jax.solver import batch as batch_lib
from eva_jax.solver.logprobs import pair_logps, sequence_logps
from eva_jax.solver.losses import PreferenceLoss, get_loss_fn
from eva_jax.solver.optimizer import Optimizer, apply_to_params, make_optimizer
from eva_jax.solver.train_state import TrainState, train_state_shardings

Array = jax.Array


def _loss_and_metrics(params, batch, *, model, loss_fn: PreferenceLoss, chunk_size: int,
                      scored_length: Optional[int] = None, share_prompt: bool = False):
  logps = pair_logps(model, params, batch, chunk_size=chunk_size,
                     with_reference=loss_fn.needs_reference, scored_length=scored_length,
                     share_prompt=share_prompt)
  losses, metrics = loss_fn(logps)
  metrics = {k: jnp.mean(v) for k, v in metrics.items()}
  metrics["tokens"] = jnp.sum(logps.chosen_length + logps.rejected_length)
  loss = jnp.mean(losses)
  metrics["loss"] = loss
  return loss, metrics


def _split_microbatches(batch: Mapping[str, Array], num: int, mesh: Mesh, rules) -> dict:
  """[B, ...] -> [M, B / M, ...], micro-batch m = rows m, m + M, ... (device-local)."""
  def split(x):
    b = x.shape[0]
    x = x.reshape((b // num, num) + x.shape[1:]).swapaxes(0, 1)
    spec = parallel.logical_to_spec((None, "batch") + (None,) * (x.ndim - 2), mesh, rules,
                                    x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return {k: split(v) for k, v in batch.items()}


def _step(state: TrainState, batch: Mapping[str, Array], *, model: nn.Module,
          optimizer: Optimizer, loss_fn: PreferenceLoss, num_microbatches: int, chunk_size: int,
          scored_length: Optional[int], share_prompt: bool, mesh: Mesh, rules,
          param_shardings) -> tuple[TrainState, dict]:
  loss_fn_ = functools.partial(_loss_and_metrics, model=model, loss_fn=loss_fn,
                               chunk_size=chunk_size, scored_length=scored_length,
                               share_prompt=share_prompt)
  grad_fn = jax.value_and_grad(loss_fn_, has_aux=True)
  params = state.params
  if num_microbatches == 1:
    (_, metrics), grads = grad_fn(params, batch)
  else:
    micro = _split_microbatches(batch, num_microbatches, mesh, rules)
    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
    _, metric_shapes = jax.eval_shape(loss_fn_, params,
                                      jax.tree_util.tree_map(lambda x: x[0], micro))
    metric_zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32),
                                          metric_shapes)

    def body(carry, mb):
      g_acc, m_acc = carry
      (_, m), g = grad_fn(params, mb)
      g_acc = jax.tree_util.tree_map(lambda a, x: a + x.astype(jnp.float32), g_acc, g)
      m_acc = jax.tree_util.tree_map(lambda a, x: a + x.astype(jnp.float32), m_acc, m)
      return (jax.lax.with_sharding_constraint(g_acc, param_shardings), m_acc), None

    (grads, metrics), _ = jax.lax.scan(body, (zeros, metric_zeros), micro)
    scale = 1.0 / num_microbatches
    grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
    if optimizer.master_dtype is None:  # a master copy takes the float32 sums as they are
      grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
    # `tokens` is a count: summed over micro-batches, not averaged.
    metrics = {k: v if k == "tokens" else v * scale for k, v in metrics.items()}
  grads = jax.lax.with_sharding_constraint(grads, param_shardings)
  metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                                      for g in jax.tree_util.tree_leaves(grads)))
  metrics["learning_rate"] = jnp.asarray(optimizer.learning_rate(state.step), jnp.float32)
  updates, opt_state = optimizer.tx.update(grads, state.opt_state, params)
  # Keep every leaf's dtype fixed across steps (Adam would promote bf16 moments with fp32
  # grads), so the donated buffers are reused and the step never retraces.
  opt_state = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), opt_state,
                                     state.opt_state)
  new_params = apply_to_params(optimizer, params, updates, opt_state)
  return TrainState(step=state.step + 1, params=new_params, opt_state=opt_state), metrics


def _resolve_share_prompt(share_prompt: Optional[bool], model: nn.Module, mesh: Mesh,
                          scored_length: Optional[int], where: str) -> bool:
  """None -> on where it applies and pays: with a scored length, but not for the fused
  attention on TPUs, where splash takes no packed row's mask and packed rows run XLA's
  attention (compiled for a v5p chip, gemma2_2b's mixed-precision step moved 277.9 GB that
  way against 80.0 as two rows through splash); True where it does not apply -> ValueError
  naming `where`."""
  if share_prompt is None:
    fused_on_tpu = (model.config.attention_impl == "flash"
                    and parallel.mesh_platform(mesh) == "tpu")
    return scored_length is not None and not fused_on_tpu
  if share_prompt and scored_length is None:
    raise ValueError(f"{where}: share_prompt=True needs scored_length (a pair's packed row "
                     "is T + scored_length tokens; the sampler's max_new_tokens), or set "
                     f"{where}.share_prompt = None or False.")
  return bool(share_prompt)


class TrainStep:
  """`step(state, batch) -> (state, metrics)`: the jitted, sharded, donating train step.

  Args:
    model: the policy (`make_policy_model(...)`).
    optimizer: `make_optimizer(...)`.
    loss_fn: `get_loss_fn(...)`.
    mesh / rules: where it runs and the logical axis rules.
    num_microbatches: gradient accumulation steps inside one call.
    chunk_size: positions per unembedding chunk (see `logprobs.sequence_logps`).
    scored_length: unembed only each row's scored (response) positions, at most this many per
      row (the eva loop passes its sampler's max_new_tokens); rows that score more raise
      ValueError in `shard_batch`. None unembeds every position, prompt included.
    max_length: longest row allowed (T); longer batches raise ValueError.
    donate: donate the state (its buffers are reused for the new one).
    share_prompt: run each pair as one row, its prompt once (`pair_logps`): the same
      log-probs and gradients with the prompt's share of the forward and backward work
      saved (a quarter of the rows' tokens at 512-token prompts and responses). None (the
      default) turns it on where it applies: with `scored_length` (the packed row is
      T + scored_length tokens) and the model's `attention_impl = "xla"`. True where it does
      not apply raises ValueError. Pairs whose rows do not share their prompt raise
      ValueError in `shard_batch`.
  """

  def __init__(self, model: nn.Module, optimizer: Optimizer, loss_fn: PreferenceLoss,
               mesh: Mesh, rules=None, *, num_microbatches: int = 1, chunk_size: int = 256,
               scored_length: Optional[int] = None, max_length: Optional[int] = None,
               donate: bool = True, share_prompt: Optional[bool] = None):
    if num_microbatches < 1:
      raise ValueError(f"TrainStep: num_microbatches must be >= 1, got {num_microbatches}.")
    if scored_length is not None and scored_length < 1:
      raise ValueError(f"TrainStep: scored_length must be >= 1 (or None), got {scored_length}.")
    self.scored_length = scored_length
    self.share_prompt = _resolve_share_prompt(share_prompt, model, mesh, scored_length,
                                              "make_train_step")
    self.model, self.optimizer, self.loss_fn, self.mesh = model, optimizer, loss_fn, mesh
    self.rules = parallel.logical_axis_rules() if rules is None else rules
    self.num_microbatches, self.chunk_size, self.max_length = (num_microbatches, chunk_size,
                                                               max_length)
    self.state_shardings, self.abstract_state = train_state_shardings(model, optimizer, mesh,
                                                                      self.rules)
    self.keys = batch_lib.TOKEN_KEYS + (batch_lib.REF_KEYS if loss_fn.needs_reference else ())
    self.batch_shardings = {k: parallel.batch_sharding(mesh, 2 if k in batch_lib.TOKEN_KEYS
                                                       else 1, self.rules) for k in self.keys}
    self.data_parallel = parallel.data_parallel_size(mesh, self.rules)
    fn = functools.partial(_step, model=model, optimizer=optimizer, loss_fn=loss_fn,
                           num_microbatches=num_microbatches, chunk_size=chunk_size,
                           scored_length=scored_length, share_prompt=self.share_prompt,
                           mesh=mesh, rules=self.rules,
                           param_shardings=self.state_shardings.params)
    self._jitted = jax.jit(fn, in_shardings=(self.state_shardings, self.batch_shardings),
                           out_shardings=(self.state_shardings, NamedSharding(mesh, P())),
                           donate_argnums=(0,) if donate else ())

  def check_batch_shape(self, batch: Mapping[str, Any]) -> None:
    """Shape checks that need no data (ValueError naming the problem)."""
    missing = [k for k in self.keys if k not in batch]
    if missing:
      hint = (" Compute reference log-probs once per round with "
              "eva_jax.solver.reference_logps." if set(missing) & set(batch_lib.REF_KEYS)
              else "")
      raise ValueError(f"The {self.loss_fn.name!r} train step needs batch entries {missing}."
                       f"{hint}")
    b, t = np.shape(batch["chosen_tokens"])
    for k in self.keys:
      want = (b, t) if k in batch_lib.TOKEN_KEYS else (b,)
      if tuple(np.shape(batch[k])) != want:
        raise ValueError(f"Train step: batch[{k!r}] has shape {tuple(np.shape(batch[k]))}, "
                         f"expected {want}.")
    if self.max_length is not None and t > self.max_length:
      raise ValueError(f"Train step: rows have {t} tokens, more than max_length="
                       f"{self.max_length}; truncate with make_pair_batch(max_length="
                       f"{self.max_length}) or raise max_length.")
    self._check_divisible(b)

  def _check_divisible(self, num_pairs: int) -> None:
    unit = self.num_microbatches * self.data_parallel
    if num_pairs % unit:
      raise ValueError(f"Train step: a batch of {num_pairs} pairs does not split into "
                       f"{self.num_microbatches} micro-batches over {self.data_parallel} "
                       f"data-parallel shards; use a multiple of {unit} pairs.")

  def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, Array]:
    """This process's rows (numpy, validated) -> the global batch, sharded for the step."""
    batch_lib.validate_pair_batch(local_batch, pad_id=self.model.config.pad_id,
                                  max_length=self.max_length,
                                  needs_reference=self.loss_fn.needs_reference,
                                  scored_length=self.scored_length,
                                  share_prompt=self.share_prompt)
    local = {k: np.asarray(local_batch[k]) for k in self.keys}
    # Checked before the arrays are placed, where a bad size would fail inside JAX.
    self._check_divisible(local["chosen_tokens"].shape[0] * jax.process_count())
    for k in batch_lib.REF_KEYS:
      if k in local:
        local[k] = local[k].astype(np.float32)
    for k in batch_lib.TOKEN_KEYS:
      local[k] = local[k].astype(np.int32)
    return parallel.host_to_global(local, self.mesh, self.rules, shardings=self.batch_shardings)

  def _select(self, batch):
    self.check_batch_shape(batch)
    return {k: batch[k] for k in self.keys}

  def __call__(self, state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict]:
    batch = self._select(batch)
    with parallel.with_mesh_rules(self.mesh, self.rules):
      return self._jitted(state, batch)

  def lower(self, state: Any, batch: Mapping[str, Any]):
    """`jax.jit(...).lower` for AOT compilation / cost and memory analysis (state and batch
    may be ShapeDtypeStructs)."""
    batch = self._select(batch)
    with parallel.with_mesh_rules(self.mesh, self.rules):
      return self._jitted.lower(state, batch)


@gin.configurable
def make_train_step(model: nn.Module, mesh: Mesh, rules=None, *,
                    optimizer: Optional[Optimizer] = None,
                    loss_fn: Optional[PreferenceLoss] = None, num_microbatches: int = 1,
                    chunk_size: int = 256, scored_length: Optional[int] = None,
                    max_length: Optional[int] = None, donate: bool = True,
                    share_prompt: Optional[bool] = None) -> TrainStep:
  """`TrainStep` with the optimizer and loss from gin when not given."""
  return TrainStep(model, make_optimizer() if optimizer is None else optimizer,
                   get_loss_fn() if loss_fn is None else loss_fn, mesh, rules,
                   num_microbatches=num_microbatches, chunk_size=chunk_size,
                   scored_length=scored_length, max_length=max_length, donate=donate,
                   share_prompt=share_prompt)


# --------------------------------------------------------------------------------------------
# Reference log-probs, once per round.


def make_reference_fn(model: nn.Module, mesh: Mesh, rules=None, *, chunk_size: int = 256,
                      scored_length: Optional[int] = None, param_shardings: Any = None,
                      share_prompt: Optional[bool] = None):
  """Jitted `(params, tokens [2B, T], mask [2B, T]) -> summed log-probs [2B]`, batch sharded
  over the data axes; `param_shardings` defaults to the model's logical shardings;
  `scored_length` and `share_prompt` as `TrainStep`'s (with `share_prompt` the rows must be
  pairs, chosen then rejected: rows 2i and 2i + 1, as `reference_logps` passes them)."""
  rules = parallel.logical_axis_rules() if rules is None else rules
  share_prompt = _resolve_share_prompt(share_prompt, model, mesh, scored_length,
                                       "make_reference_fn")
  if param_shardings is None:
    axes, abstract = parallel.params_logical_axes(model, jax.ShapeDtypeStruct((1, 8), jnp.int32))
    param_shardings = parallel.logical_shardings(axes, mesh, rules, abstract)
  rows = parallel.batch_sharding(mesh, 2, rules)

  def fn(params, tokens, mask):
    if share_prompt:
      b2, t = tokens.shape
      tokens, mask = tokens.reshape(b2 // 2, 2, t), mask.reshape(b2 // 2, 2, t)
      pairs = {"chosen_tokens": tokens[:, 0], "rejected_tokens": tokens[:, 1],
               "chosen_loss_mask": mask[:, 0], "rejected_loss_mask": mask[:, 1]}
      logps = pair_logps(model, params, pairs, chunk_size=chunk_size, with_reference=False,
                         scored_length=scored_length, share_prompt=True)
      return jnp.stack([logps.chosen, logps.rejected], axis=1).reshape(b2)
    return sequence_logps(model, params, tokens, mask, chunk_size=chunk_size,
                          scored_length=scored_length)[0]

  jitted = jax.jit(fn, in_shardings=(param_shardings, rows, rows),
                   out_shardings=NamedSharding(mesh, P()))

  def call(params, tokens, mask):
    with parallel.with_mesh_rules(mesh, rules):
      return jitted(params, tokens, mask)
  call.lower = jitted.lower  # AOT: lower from ShapeDtypeStructs (eva_jax.aot), inside the mesh
  call.share_prompt = share_prompt
  return call


@gin.configurable(denylist=["model", "params", "pairs", "mesh", "rules"])
def reference_logps(model: nn.Module, params: Any, pairs: Mapping[str, np.ndarray], mesh: Mesh,
                    rules=None, *, batch_size: int = 64, chunk_size: int = 256,
                    scored_length: Optional[int] = None,
                    share_prompt: Optional[bool] = None) -> dict[str, np.ndarray]:
  """The reference model's summed response log-probs for all of a round's pairs.

  Runs the jitted forward over fixed-size batches of `batch_size` pairs (the last one padded
  by repeating its first row), so it compiles once. Every process passes the same full
  `pairs` (numpy, format of `eva_jax.solver.batch`) and gets the same full result.

  Args:
    params: the round's starting policy params (the paper's reference), any sharding.
    batch_size: pairs per forward (rounded up to a multiple of the data-parallel size times
      the process count); 2 * batch_size rows go through the model at once.
    scored_length: unembed only each row's scored positions, at most this many (as
      `TrainStep`'s; the eva loop passes its sampler's max_new_tokens).
    share_prompt: each pair as one row, its prompt once (as `TrainStep`'s; None: where it
      applies).

  Returns:
    {"ref_chosen_logps": float32 [N], "ref_rejected_logps": float32 [N]}; add them to the pairs.
  """
  rules = parallel.logical_axis_rules() if rules is None else rules
  share_prompt = _resolve_share_prompt(share_prompt, model, mesh, scored_length,
                                       "reference_logps")
  batch_lib.validate_pair_batch(pairs, pad_id=model.config.pad_id, scored_length=scored_length,
                                share_prompt=share_prompt)
  n, t = np.shape(pairs["chosen_tokens"])
  unit = int(np.lcm(parallel.data_parallel_size(mesh, rules), jax.process_count()))
  batch_size = -(-max(1, batch_size) // unit) * unit
  leaves = jax.tree_util.tree_leaves(params)
  # Keep the params where they are when they are already global arrays (no copy).
  param_shardings = (jax.tree_util.tree_map(lambda x: x.sharding, params)
                     if all(isinstance(x, jax.Array) for x in leaves) else None)
  fn = make_reference_fn(model, mesh, rules, chunk_size=chunk_size,
                         scored_length=scored_length, param_shardings=param_shardings,
                         share_prompt=share_prompt)
  rows = parallel.process_slice(2 * batch_size)
  out = np.zeros((n, 2), np.float32)
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    idx = np.where(idx < n, idx, start)  # pad the last batch with a repeated row
    # Interleave chosen and rejected ([B, 2, T] -> [2B, T]) as the train step does.
    tokens = np.stack([pairs["chosen_tokens"][idx], pairs["rejected_tokens"][idx]], 1)
    mask = np.stack([pairs["chosen_loss_mask"][idx], pairs["rejected_loss_mask"][idx]], 1)
    tokens = tokens.reshape(2 * batch_size, t).astype(np.int32)[rows]
    mask = mask.reshape(2 * batch_size, t).astype(np.int32)[rows]
    tokens, mask = parallel.host_to_global((tokens, mask), mesh, rules)
    logps = parallel.global_to_host(fn(params, tokens, mask)).reshape(batch_size, 2)
    keep = min(batch_size, n - start)
    out[start:start + keep] = logps[:keep]
  return {"ref_chosen_logps": out[:, 0].copy(), "ref_rejected_logps": out[:, 1].copy()}

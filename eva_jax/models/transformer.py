"""Gemma (1) and Gemma 2 decoders in flax.linen, with logical axis names and a KV cache.

The parameter tree is the official Gemma Flax one ("NESTED" in
../shared/reference/gemma_checkpoint_formats.md), with two normalisations so that one code path
serves every size: attention always has `q_einsum` [N, D, H] and `kv_einsum` [2, K, D, H] (the
fused `qkv_einsum` of multi-head checkpoints is split on import) and the MLP gate is always
[2, D, F] (the transposed [2, F, D] layout of 9B/27B is transposed on import). The sampler's
decode copy alone holds these three with the embed axis first (`GemmaConfig.weight_layout =
"matmul"`, `to_matmul_layout`), so that a decode step reads them in place.

Calling conventions (all shapes static):

* Full sequence: `apply(params, input_ids[B, T], positions=None, attention_mask=None)`.
  Positions default to the count of non-pad tokens before each token (so left padding is
  transparent, as in the official Gemma library) and keys that are padding are masked.
  `attention_mask` may be [B, T] (which keys are real) or [B, T, T] (the full mask; local
  layers then also require `positions[q] - positions[k] < sliding_window`, so a row that
  packs several sequences, whose slots are not its positions, is windowed by position).
* KV cache: pass `cache` (from `init_cache`) and `cache_index`, the slot where the first of
  the T new tokens is written. Query t sits at slot `cache_index + t` and sees slots
  `<= cache_index + t` that `attention_mask` [B, S] marks valid; local layers also require
  `query_slot - key_slot < sliding_window`. Returns `(output, new_cache)`.

Sliding windows are measured in slots (sequence indices), like HF; with padding only on the
left, slot distances equal position distances, so this agrees with the official library too.
A full [B, T, T] mask is windowed in positions (above), which for such rows is the same.

Scanned layers (`config.scan_layers`). The attention pattern's repeating unit (`scan_unit`:
one global block for Gemma 1, a (local, global) pair for Gemma 2) becomes one `nn.scan` step,
so XLA compiles one unit instead of every layer (compile time no longer grows with depth).
Params: `layers/block_j/...` with a leading `layers` axis of R = num_layers // len(unit)
entries (entry r is layer r * len(unit) + j); layers past the last whole unit (an odd Gemma 2
depth) keep their unrolled `layer_i` subtrees. `stack_layers` / `unstack_layers` convert
between the two trees; checkpoints always hold the unrolled one. The KV cache is stacked the
same way and travels through the scan as part of its carry: each block writes its new keys
and values into its own entry of the stacked cache in place (`dynamic_update_slice` at
(layer, cache_index)) and attends over that entry, so decode updates one slot per layer as
the unrolled model does, without copying the cache. Remat policies apply per block inside the
scan, as in MaxText. The price: inside the loop each layer's weights are a dynamic slice of
the stacked params, which XLA may copy per iteration: noise next to a train step's matmuls,
but a decode step reads every weight anyway, so it can cost decode throughput (on CPU, an
8-layer Gemma 2 2B-width model decoded ~1.5x slower scanned), so the sampler decodes from an
unrolled copy of a scanned model's params (`Sampler.decode_params`); XLA's `cost_analysis`
also counts the loop body once, not once per layer.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from eva_jax.models import flash_attention as flash
from eva_jax.models.config import GemmaConfig, LOCAL

Array = jax.Array
Cache = dict[str, dict[str, Array]]

# Activations' logical axes.
ACT_EMBED = ("batch", "length", "embed")
ACT_HEADS = ("batch", "length", "heads", "head_dim")
ACT_KV = ("batch", "length", "kv_heads", "head_dim")
ACT_MLP = ("batch", "length", "mlp")
ACT_VOCAB = ("batch", "length", "vocab")
ACT_KEYS = ("batch", "length")
CACHE_AXES = ("batch", "cache_length", "kv_heads", "head_dim")
CACHE_KEYS = ("batch", "cache_length")
# The stacked leading dimension of scanned params and caches (no mesh axis: see parallel.py).
LAYERS_AXIS = "layers"
# Param-tree key of the scanned layers, and the prefix of each unit position under it.
SCANNED = "layers"
_BLOCK = "block_"

# Name of the XLA attention's float32 scores (before soft-cap and mask), for remat policies:
# they come from a custom VJP (`einsum_f32`), which "dots_all" would not see as a matmul.
SCORES_NAME = "attention_scores"

_REMAT_POLICIES = {
    "none": None,
    # No block remat; only the attention scores and softmax (float32, [B, K, G, T, S]: the
    # largest activations) are recomputed in the backward pass, from the saved q, k, v.
    "attention": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # Matmul outputs, and the fused attention kernel's output and log-sum-exp (which are not
    # dots: without their names the backward pass would rerun the kernel's forward).
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names(*flash.SAVED_NAMES)),
    # Every matmul's output, the attention scores included.
    "dots_all": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots,
        jax.checkpoint_policies.save_only_these_names(SCORES_NAME, *flash.SAVED_NAMES)),
}
# The names `Transformer(remat=...)` and `make_policy_model(remat=...)` take.
REMAT_POLICIES = tuple(_REMAT_POLICIES)


def _dtype(name: Any) -> jnp.dtype:
  return jnp.dtype(name)


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, _dtype(dtype))


class RMSNorm(nn.Module):
  """y = x / rms(x) * (1 + scale): `scale` is stored zero-centred, as in Gemma and HF."""

  config: GemmaConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param(self, "scale", nn.initializers.zeros_init(), (x.shape[-1],), ("embed",),
                   self.config.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.config.norm_eps)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, x: Array, y: Array) -> Array:
  """float32 einsum `spec` ("x_axes,y_axes->out_axes") of x and y in their dtype: float32
  accumulation and output, for what a float32 softmax reads (the unembedding's logits, the
  attention scores).

  Its VJP runs both transposed einsums in x's dtype as well, the cotangent rounded to it
  first. Autodiff would meet the float32 cotangent with a bfloat16 operand and XLA would run
  the backward matmuls in float32 (TF32 at best) and read the cotangent in float32: for
  Gemma 2 2B's train step the unembedding's (about a tenth of its matmul FLOPs) and the
  attention scores' (2%). Every axis of x must appear in y or the output, and likewise for y,
  so that each gradient is an einsum of the cotangent and the other operand. In float32
  compute this is autodiff's.
  """
  return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(spec: str, x: Array, y: Array):
  return einsum_f32(spec, x, y), (x, y)


def _einsum_f32_bwd(spec: str, saved, ct: Array):
  x, y = saved
  operands, out = spec.split("->")
  x_axes, y_axes = operands.split(",")
  ct = ct.astype(x.dtype)
  dx = jnp.einsum(f"{out},{y_axes}->{x_axes}", ct, y, preferred_element_type=jnp.float32)
  dy = jnp.einsum(f"{out},{x_axes}->{y_axes}", ct, x, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dy.astype(y.dtype)


einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


class Embedder(nn.Module):
  """The tied embedding: lookup scaled by sqrt(D) on the way in, transpose on the way out."""

  config: GemmaConfig

  def setup(self):
    cfg = self.config
    self.input_embedding = _param(self, "input_embedding", nn.initializers.normal(1.0),
                                  (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"),
                                  cfg.param_dtype)

  def encode(self, ids: Array) -> Array:
    dtype = _dtype(self.config.dtype)
    x = jnp.take(self.input_embedding, ids, axis=0).astype(dtype)
    # sqrt(D) is rounded to the compute dtype first, as both Gemma and HF do.
    return x * jnp.asarray(math.sqrt(self.config.embed_dim), dtype)

  def decode(self, x: Array, over_cap: bool = False) -> Array:
    """Hidden [..., D] -> float32 logits [..., V], soft-capped when the config says so.

    over_cap: return the logits divided by the soft-cap instead, tanh(z / cap) (the logits
    as they are when no cap is set): the sampler reads these in place, where multiplying them
    by the cap would write a second [rows, vocab] array every decode step.
    """
    table = self.input_embedding.astype(x.dtype)
    logits = einsum_f32("...d,vd->...v", x, table)
    cap = self.config.final_logit_softcap
    if cap:
      logits = jnp.tanh(logits / cap)
      if not over_cap:
        logits = logits * cap
    return logits


def apply_rope(x: Array, positions: Array, base: float) -> Array:
  """Half-split rotary embedding: pair (k, k + H/2) rotated by pos * base^(-2k/H).

  x: [B, T, heads, H]; positions: [B, T].
  """
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (base ** (2 * jnp.arange(half, dtype=jnp.float32) / x.shape[-1]))
  angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B, T, 1, H/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return out.astype(x.dtype)


def _scores_as_given(qg: Array, key: Array) -> Array:
  return jnp.einsum("btkgh,bskh->bkgts", qg, key, preferred_element_type=jnp.float32)


def _scores_heads_first(qg: Array, key: Array) -> Array:
  return einsum_f32("bkgth,bksh->bkgts", qg.transpose(0, 2, 3, 1, 4), key.transpose(0, 2, 1, 3))


def _vjp_of(scores, qg: Array, key: Array, ct: Array):
  return jax.vjp(scores, qg, key)[1](ct)


@jax.custom_vjp
def attention_scores(qg: Array, key: Array) -> Array:
  """float32 scores [B, K, G, T, S] of grouped queries qg [B, T, K, G, H] against keys
  [B, S, K, H] (same dtype), and their gradients, in the form each compiler moves the
  fewest bytes with (`eva_jax.hlo_traffic`, gemma2_2b's train step compiled for an H200 and
  a v5p chip):

  * GPUs (and the CPU): heads ahead of positions ([B, K, G, T, H] and [B, K, S, H]) before
    the matmul, and `einsum_f32`'s backward, which rounds the [B, K, G, T, S] cotangent to
    the compute dtype. Autodiff's float32 cotangent read by float32 matmuls (TF32 at best),
    and XLA:GPU wrote transposed copies of it for the two gradient matmuls.
  * TPUs: autodiff of the einsum as written. XLA:TPU fuses the softmax's backward into the
    gradient matmuls and never writes the cotangent; the explicit transposes and the
    rounding each made it write more (the step's layer loops 278.6 -> 310.8 GB).

  Chosen when the program is lowered for its devices (`jax.lax.platform_dependent`, inside
  this VJP so that autodiff never meets the branches).
  """
  return jax.lax.platform_dependent(qg, key, tpu=_scores_as_given, default=_scores_heads_first)


def _attention_scores_fwd(qg: Array, key: Array):
  return attention_scores(qg, key), (qg, key)


def _attention_scores_bwd(saved, ct: Array):
  qg, key = saved
  return jax.lax.platform_dependent(
      qg, key, ct, tpu=functools.partial(_vjp_of, _scores_as_given),
      default=functools.partial(_vjp_of, _scores_heads_first))


attention_scores.defvjp(_attention_scores_fwd, _attention_scores_bwd)


# One decode step's attention over the [B, S, K, H] cache, two ways with the same math
# (float32 products and sums of the cache's values). XLA:CPU turns the dot form into a
# transpose of the whole cache to [B, K, S, H] every step, and the multiply-reduce reads it
# once, in place; XLA:GPU reads it once either way. XLA:TPU lays the cache out as
# [B, K, S, H] already and runs the dot form on the MXU reading it once, but does not fuse
# the multiply-reduce's float32 convert: it writes a float32 copy of the whole cache and reads
# that (about 5x the cache's bytes per step at gemma2_2b's shape, by `eva_jax.hlo_traffic`).
# So the attention picks the dot form on TPUs (`jax.lax.platform_dependent`, decided when the
# program is lowered for its devices, ahead-of-time compiles included).


def decode_scores_multiply_reduce(qg: Array, key: Array) -> Array:
  """qg [B, 1, K, G, H], key [B, S, K, H] -> float32 scores [B, K, G, 1, S]."""
  logits = jnp.sum(qg[:, 0, None].astype(jnp.float32) *
                   key[:, :, :, None, :].astype(jnp.float32), axis=-1)  # [B, S, K, G]
  return jnp.transpose(logits, (0, 2, 3, 1))[:, :, :, None, :]


def decode_scores_dot(qg: Array, key: Array) -> Array:
  """`decode_scores_multiply_reduce` as one batched matmul over (B, K)."""
  return _scores_as_given(qg, key.astype(qg.dtype))


def decode_values_multiply_reduce(probs: Array, value: Array) -> Array:
  """probs [B, K, G, 1, S], value [B, S, K, H] -> [B, 1, K * G, H] in probs' dtype."""
  b, k, g, _, _ = probs.shape
  weights = jnp.transpose(probs[:, :, :, 0, :], (0, 3, 1, 2)).astype(jnp.float32)
  out = jnp.sum(weights[..., None] * value[:, :, :, None, :].astype(jnp.float32), axis=1)
  return out.astype(probs.dtype).reshape(b, 1, k * g, value.shape[-1])  # summed over S


def decode_values_dot(probs: Array, value: Array) -> Array:
  """`decode_values_multiply_reduce` as one batched matmul over (B, K)."""
  b, k, g, _, _ = probs.shape
  out = jnp.einsum("bkgts,bskh->btkgh", probs, value.astype(probs.dtype),
                   preferred_element_type=jnp.float32)
  return out.astype(probs.dtype).reshape(b, 1, k * g, value.shape[-1])


class Attention(nn.Module):
  """`recompute_scores`: keep only q, k, v for the backward pass and recompute the scores,
  soft-cap and softmax from them (remat "attention")."""

  config: GemmaConfig
  attn_type: str
  recompute_scores: bool = False

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array,
               cache: Optional[dict[str, Array]], cache_index: Optional[Array],
               layer_index: Optional[Array] = None):
    """`mask`: [B, T, S], which keys each query sees; or, with `attention_impl = "flash"` and
    no cache, [B, S], which keys are real (the kernel applies the causal and window rules).
    `cache`: this layer's {k, v: [B, S, K, H]}, or, with `layer_index` (scanned layers), the
    stacked {k, v: [R, B, S, K, H]} of which entry `layer_index` is this layer's."""
    cfg = self.config
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
    dtype = _dtype(cfg.dtype)
    init = nn.initializers.normal(d ** -0.5)
    o_w = _param(self, "attn_vec_einsum", nn.initializers.normal((n * h) ** -0.5), (n, h, d),
                 ("heads", "head_dim", "embed"), cfg.param_dtype)
    if cfg.weight_layout == "matmul":
      q_w = _param(self, "q_einsum", init, (d, n, h), ("embed", "heads", "head_dim"),
                   cfg.param_dtype)
      kv_w = _param(self, "kv_einsum", init, (d, 2, k, h),
                    ("embed", None, "kv_heads", "head_dim"), cfg.param_dtype)
      q = jnp.einsum("btd,dnh->btnh", x, q_w.astype(dtype))
      kv = jnp.einsum("btd,dckh->btckh", x, kv_w.astype(dtype))
      key, value = kv[:, :, 0], kv[:, :, 1]
    else:
      q_w = _param(self, "q_einsum", init, (n, d, h), ("heads", "embed", "head_dim"),
                   cfg.param_dtype)
      kv_w = _param(self, "kv_einsum", init, (2, k, d, h),
                    (None, "kv_heads", "embed", "head_dim"), cfg.param_dtype)
      q = jnp.einsum("btd,ndh->btnh", x, q_w.astype(dtype))
      key = jnp.einsum("btd,kdh->btkh", x, kv_w[0].astype(dtype))
      value = jnp.einsum("btd,kdh->btkh", x, kv_w[1].astype(dtype))
    q = nn.with_logical_constraint(apply_rope(q, positions, cfg.rope_base), ACT_HEADS)
    key = nn.with_logical_constraint(apply_rope(key, positions, cfg.rope_base), ACT_KV)
    value = nn.with_logical_constraint(value, ACT_KV)
    q = q * jnp.asarray(cfg.query_pre_attn_scalar ** -0.5, dtype)

    new_cache = None
    if cache is not None and layer_index is None:
      key = jax.lax.dynamic_update_slice_in_dim(cache["k"], key.astype(cache["k"].dtype),
                                                cache_index, axis=1)
      value = jax.lax.dynamic_update_slice_in_dim(cache["v"], value.astype(cache["v"].dtype),
                                                  cache_index, axis=1)
      key = nn.with_logical_constraint(key, CACHE_AXES)
      value = nn.with_logical_constraint(value, CACHE_AXES)
      new_cache = {"k": key, "v": value}
    elif cache is not None:
      # Write the new keys / values into this layer's entry of the stacked cache (in place:
      # the stack is carried through the scan) and attend over that entry.
      start = (jnp.asarray(layer_index, jnp.int32), jnp.int32(0),
               jnp.asarray(cache_index, jnp.int32), jnp.int32(0), jnp.int32(0))
      stacked_axes = (LAYERS_AXIS,) + CACHE_AXES
      new_cache = {}
      for name, new in (("k", key), ("v", value)):
        stack = jax.lax.dynamic_update_slice(cache[name], new.astype(cache[name].dtype)[None],
                                             start)
        new_cache[name] = nn.with_logical_constraint(stack, stacked_axes)
      key = nn.with_logical_constraint(
          jax.lax.dynamic_index_in_dim(new_cache["k"], start[0], 0, keepdims=False), CACHE_AXES)
      value = nn.with_logical_constraint(
          jax.lax.dynamic_index_in_dim(new_cache["v"], start[0], 0, keepdims=False), CACHE_AXES)

    flash_decoding = cfg.attention_impl == "flash" and cache is not None and q.shape[1] == 1
    if mask.ndim == 2 or flash_decoding:
      window = cfg.sliding_window if self.attn_type == LOCAL else None
      if mask.ndim == 2:
        # Full sequences: `mask` is which keys are real (bool), or a packed row's int32
        # segments (`segment_ids`), windowed in positions; the kernel applies the causal,
        # segment and window rules itself.
        packed = mask.dtype != jnp.bool_
        enc = flash.flash_attention(q, key, value, mask, softcap=cfg.attn_logit_softcap,
                                    window=window, logical_axes=(ACT_HEADS, ACT_KV, ACT_KEYS),
                                    positions=positions if packed else None)
      else:
        # One decode step: the kernel reads the cache only up to `cache_index`.
        enc = flash.flash_decode(q, key, value, mask[:, 0, :], cache_index,
                                 softcap=cfg.attn_logit_softcap, window=window,
                                 logical_axes=(ACT_HEADS, CACHE_AXES, CACHE_KEYS))
      enc = nn.with_logical_constraint(enc, ACT_HEADS)
      return jnp.einsum("btnh,nhd->btd", enc, o_w.astype(dtype)), new_cache

    b, t = q.shape[:2]
    groups = n // k
    # Query head j uses kv head j // groups (contiguous groups, as HF's repeat_kv).
    qg = q.reshape(b, t, k, groups, h)
    decoding = cache is not None and t == 1

    def attend(qg, key, value, mask):
      if decoding:
        logits = jax.lax.platform_dependent(qg, key, tpu=decode_scores_dot,
                                            default=decode_scores_multiply_reduce)
      else:
        logits = checkpoint_name(attention_scores(qg, key.astype(dtype)), SCORES_NAME)
      if cfg.attn_logit_softcap:
        cap = cfg.attn_logit_softcap
        logits = jnp.tanh(logits / cap) * cap
      logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
      if decoding:
        return jax.lax.platform_dependent(probs, value, tpu=decode_values_dot,
                                          default=decode_values_multiply_reduce)
      return jnp.einsum("bkgts,bskh->btkgh", probs, value.astype(dtype)).reshape(b, t, n, h)

    if self.recompute_scores and not decoding:
      attend = jax.checkpoint(attend)
    enc = nn.with_logical_constraint(attend(qg, key, value, mask), ACT_HEADS)
    out = jnp.einsum("btnh,nhd->btd", enc, o_w.astype(dtype))
    return out, new_cache


class FeedForward(nn.Module):
  """GeGLU: down(gelu_tanh(x @ G[0]) * (x @ G[1]))."""

  config: GemmaConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dtype = _dtype(cfg.dtype)
    init = nn.initializers.normal(cfg.embed_dim ** -0.5)
    if cfg.weight_layout == "matmul":
      gating = _param(self, "gating_einsum", init, (cfg.embed_dim, 2, cfg.hidden_dim),
                      ("embed", None, "mlp"), cfg.param_dtype)
      both = jnp.einsum("btd,dcf->btcf", x, gating.astype(dtype))
      gate, up = both[:, :, 0], both[:, :, 1]
    else:
      gating = _param(self, "gating_einsum", init, (2, cfg.embed_dim, cfg.hidden_dim),
                      (None, "embed", "mlp"), cfg.param_dtype).astype(dtype)
      gate = jnp.einsum("btd,df->btf", x, gating[0])
      up = jnp.einsum("btd,df->btf", x, gating[1])
    linear = _param(self, "linear", nn.initializers.normal(cfg.hidden_dim ** -0.5),
                    (cfg.hidden_dim, cfg.embed_dim), ("mlp", "embed"), cfg.param_dtype)
    hidden = nn.with_logical_constraint(jax.nn.gelu(gate, approximate=True) * up, ACT_MLP)
    return jnp.einsum("btf,fd->btd", hidden, linear.astype(dtype))


class Block(nn.Module):
  config: GemmaConfig
  attn_type: str
  recompute_scores: bool = False

  @nn.compact
  def __call__(self, x, positions, mask, cache, cache_index, layer_index=None):
    cfg = self.config
    h = RMSNorm(cfg, name="pre_attention_norm")(x)
    h, new_cache = Attention(cfg, self.attn_type, self.recompute_scores, name="attn")(
        h, positions, mask, cache, cache_index, layer_index)
    if cfg.use_post_attn_norm:
      h = RMSNorm(cfg, name="post_attention_norm")(h)
    x = nn.with_logical_constraint(x + h, ACT_EMBED)
    h = RMSNorm(cfg, name="pre_ffw_norm")(x)
    h = FeedForward(cfg, name="mlp")(h)
    if cfg.use_post_ffw_norm:
      h = RMSNorm(cfg, name="post_ffw_norm")(h)
    x = nn.with_logical_constraint(x + h, ACT_EMBED)
    return x, new_cache


def _block_class(remat: str, scanned: bool):
  if remat not in _REMAT_POLICIES:
    raise ValueError(f"Unknown remat policy {remat!r}; use one of {sorted(_REMAT_POLICIES)}.")
  if remat == "none":
    return Block
  if remat == "attention":
    return functools.partial(Block, recompute_scores=True)
  # Inside a scan the loop boundary already keeps XLA from merging the recomputation with the
  # forward pass, so CSE prevention (its optimisation barriers) is not needed (MaxText does
  # the same).
  return nn.remat(Block, policy=_REMAT_POLICIES[remat], prevent_cse=not scanned)


def scan_unit(config: GemmaConfig) -> tuple[tuple[str, ...], int]:
  """(unit, repeats): the shortest attention-type pattern the layers repeat, and how many
  whole repeats the scan covers. Gemma 1: (("global",), L); Gemma 2: (("local", "global"),
  L // 2); layers from repeats * len(unit) on (an odd Gemma 2 depth) stay unrolled."""
  types = config.attention_types
  n = len(types)
  for period in range(1, n + 1):
    if all(types[i] == types[i % period] for i in range(n)):
      return tuple(types[:period]), n // period
  raise AssertionError("unreachable")


def _first_unrolled(config: GemmaConfig) -> int:
  if not config.scan_layers:
    return 0
  unit, repeats = scan_unit(config)
  return len(unit) * repeats


class _ScanUnit(nn.Module):
  """One step of the layer scan: the blocks of one repeat of the attention pattern."""

  config: GemmaConfig
  attn_types: tuple[str, ...]
  remat: str = "none"

  @nn.compact
  def __call__(self, carry, layer_index, positions, global_mask, local_mask, cache_index):
    x, cache = carry
    block_cls = _block_class(self.remat, scanned=True)
    new_cache = None if cache is None else {}
    for j, attn_type in enumerate(self.attn_types):
      name = f"{_BLOCK}{j}"
      mask = local_mask if attn_type == LOCAL else global_mask
      x, block_cache = block_cls(self.config, attn_type, name=name)(
          x, positions, mask, None if cache is None else cache[name], cache_index, layer_index)
      if cache is not None:
        new_cache[name] = block_cache
    return (x, new_cache), None


def default_positions(input_ids: Array, pad_id: int, key_mask: Optional[Array] = None) -> Array:
  """Position of each token = number of real tokens before it (left padding is transparent)."""
  real = (input_ids != pad_id) if key_mask is None else key_mask.astype(bool)
  return jnp.maximum(jnp.cumsum(real.astype(jnp.int32), axis=-1) - 1, 0)


def attention_masks(query_slots: Array, key_valid: Array, sliding_window: Optional[int]):
  """(global mask, local mask) [B, T, S] from query slots [T] and valid keys [B, S]."""
  key_slots = jnp.arange(key_valid.shape[-1])
  causal = key_slots[None, :] <= query_slots[:, None]  # [T, S]
  global_mask = causal[None] & key_valid[:, None, :].astype(bool)
  local_mask = global_mask
  if sliding_window:
    in_window = (query_slots[:, None] - key_slots[None, :]) < sliding_window
    local_mask = global_mask & in_window[None]
  return global_mask, local_mask


class Transformer(nn.Module):
  """Gemma causal LM. See the module docstring for the calling conventions.

  Attributes:
    config: the model's hyper-parameters (`config.scan_layers` scans the layers; see the
      module docstring).
    remat: rematerialisation policy per block: "none", "attention" (recompute only the
      attention scores and softmax), "full", "dots" or "dots_all".
  """

  config: GemmaConfig
  remat: str = "none"

  def setup(self):
    cfg = self.config
    block_cls = _block_class(self.remat, scanned=False)
    self.embedder = Embedder(cfg)
    if cfg.scan_layers:
      unit, repeats = scan_unit(cfg)
      scanned = nn.scan(_ScanUnit, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                        length=repeats, metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
      self.layers = scanned(cfg, unit, self.remat)
    first = _first_unrolled(cfg)
    self.blocks = [block_cls(cfg, cfg.attention_types[i], name=f"layer_{i}")
                   for i in range(first, cfg.num_layers)]
    self.final_norm = RMSNorm(cfg)

  def hidden_states(self, input_ids: Array, positions: Optional[Array] = None,
                    attention_mask: Optional[Array] = None, cache: Optional[Cache] = None,
                    cache_index: Optional[Array] = None, segment_ids: Optional[Array] = None):
    """Final-normed hidden states [B, T, D] (and the new cache when `cache` is given).

    `segment_ids` [B, T] (in place of `attention_mask`, with `positions`, no cache): rows
    that pack sequences sharing a prefix, as the solver packs a pair: 0 padding, 1 the shared
    prefix, which every later token sees, s >= 2 a sequence of its own, whose tokens see the
    prefix and each other (causally), windowed in positions (`flash_attention.packed_mask`).
    Both attention implementations take it; only XLA's takes a [B, T, T] mask.
    """
    cfg = self.config
    input_ids = jnp.asarray(input_ids, jnp.int32)
    b, t = input_ids.shape
    if segment_ids is not None:
      if attention_mask is not None or cache is not None or positions is None:
        raise ValueError("Transformer: segment_ids (packed rows) take the place of "
                         "attention_mask, need positions (each token's position in its own "
                         "sequence) and no cache.")
      segment_ids = jnp.asarray(segment_ids).astype(jnp.int32)
      if cfg.attention_impl != "flash":
        attention_mask = flash.packed_mask(segment_ids)
    if cache is None:
      if attention_mask is not None and attention_mask.ndim == 3:
        key_valid = None
      else:
        key_valid = (input_ids != cfg.pad_id) if attention_mask is None else attention_mask
      if positions is None:
        positions = default_positions(input_ids, cfg.pad_id, key_valid)
      if segment_ids is not None and cfg.attention_impl == "flash":
        # int32 segments in place of the [B, T] key mask (see `Attention`).
        global_mask = local_mask = segment_ids
      elif cfg.attention_impl == "flash":
        if key_valid is None:
          raise ValueError("Transformer: attention_impl='flash' applies the causal and window "
                           "rules itself and takes attention_mask as [B, T] (which keys are "
                           "real), not a [B, T, T] mask; pass the [B, T] mask (or "
                           "segment_ids for packed rows) or use attention_impl='xla'.")
        # Attention sees [B, T] key validity in place of a mask (see `Attention`).
        global_mask = local_mask = jnp.asarray(key_valid).astype(bool)
      elif key_valid is None:
        global_mask = local_mask = attention_mask.astype(bool)
        if cfg.sliding_window:
          # In positions: a packed row (the solver's shared prompt) has slots that are not
          # its positions; for an ordinary row the two differ by padding alone.
          pos = jnp.asarray(positions)
          local_mask = global_mask & ((pos[:, :, None] - pos[:, None, :]) < cfg.sliding_window)
      else:
        global_mask, local_mask = attention_masks(jnp.arange(t), key_valid, cfg.sliding_window)
    else:
      if cache_index is None:
        raise ValueError("Transformer: a KV cache needs `cache_index`, the slot of the first "
                         "new token.")
      cache_len = jax.tree_util.tree_leaves(cache)[0].shape[-3]  # [..., S, K, H]
      if attention_mask is not None and attention_mask.shape[-1] != cache_len:
        raise ValueError(f"Transformer: attention_mask covers {attention_mask.shape[-1]} "
                         f"slots but the cache has {cache_len}; they must be equal.")
      query_slots = cache_index + jnp.arange(t)
      if positions is None:
        positions = jnp.broadcast_to(query_slots[None], (b, t))
      if attention_mask is None:
        attention_mask = jnp.ones((b, cache_len), bool)
      global_mask, local_mask = attention_masks(query_slots, attention_mask, cfg.sliding_window)

    x = nn.with_logical_constraint(self.embedder.encode(input_ids), ACT_EMBED)
    new_cache = {} if cache is not None else None
    if cfg.scan_layers:
      _, repeats = scan_unit(cfg)
      carry = (x, cache[SCANNED] if cache is not None else None)
      (x, scanned_cache), _ = self.layers(carry, jnp.arange(repeats, dtype=jnp.int32),
                                          positions, global_mask, local_mask, cache_index)
      if cache is not None:
        new_cache[SCANNED] = scanned_cache
    first = _first_unrolled(cfg)
    for i, layer in enumerate(self.blocks, start=first):
      mask = local_mask if cfg.attention_types[i] == LOCAL else global_mask
      layer_cache = cache[f"layer_{i}"] if cache is not None else None
      x, layer_new_cache = layer(x, positions, mask, layer_cache, cache_index)
      if cache is not None:
        new_cache[f"layer_{i}"] = layer_new_cache
    x = self.final_norm(x)
    return x, new_cache

  def unembed(self, hidden: Array, over_cap: bool = False) -> Array:
    """Final-normed hidden [..., D] -> float32 logits [..., V] (`Embedder.decode`'s
    `over_cap`: divided by the config's final_logit_softcap, when it has one)."""
    return self.embedder.decode(hidden, over_cap)

  def __call__(self, input_ids: Array, positions: Optional[Array] = None,
               attention_mask: Optional[Array] = None, cache: Optional[Cache] = None,
               cache_index: Optional[Array] = None, return_hidden: bool = False,
               logits_over_cap: bool = False, segment_ids: Optional[Array] = None):
    """Logits [B, T, V] (float32; divided by the final soft-cap with `logits_over_cap`), or
    hidden states with `return_hidden`; with a cache, also returns the new cache.
    `segment_ids`: packed rows (see `hidden_states`)."""
    x, new_cache = self.hidden_states(input_ids, positions, attention_mask, cache, cache_index,
                                      segment_ids)
    out = x if return_hidden else nn.with_logical_constraint(self.unembed(x, logits_over_cap),
                                                             ACT_VOCAB)
    return (out, new_cache) if cache is not None else out


class GemmaForSequenceClassification(Transformer):
  """The backbone plus a bias-free score head read at the last non-pad token.

  Matches HF `Gemma2ForSequenceClassification` (e.g. Skywork-Reward-Gemma-2-27B): returns
  float32 scores [B] when `num_labels == 1`, else [B, num_labels].
  """

  def setup(self):
    super().setup()
    cfg = self.config
    self.score_w = self.param(
        "score", nn.with_logical_partitioning(nn.initializers.normal(cfg.embed_dim ** -0.5),
                                              ("embed", None)),
        (cfg.embed_dim, cfg.num_labels), _dtype(cfg.param_dtype))

  def __call__(self, input_ids: Array, positions: Optional[Array] = None,
               attention_mask: Optional[Array] = None, cache=None, cache_index=None,
               return_hidden: bool = False):
    if cache is not None:
      raise ValueError("GemmaForSequenceClassification scores whole sequences; it has no "
                       "KV-cache path.")
    x, _ = self.hidden_states(input_ids, positions, attention_mask)
    if return_hidden:
      return x
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is not None and attention_mask.ndim == 2:
      real = attention_mask.astype(bool)
    else:
      real = input_ids != self.config.pad_id
    # Last real token: the largest index whose token is not padding (HF's rule).
    last = jnp.argmax(jnp.arange(input_ids.shape[1])[None, :] * real, axis=-1)
    pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    scores = jnp.einsum("bd,dl->bl", pooled, self.score_w.astype(pooled.dtype),
                        preferred_element_type=jnp.float32)
    return scores[:, 0] if self.config.num_labels == 1 else scores


def _cache_tree(config: GemmaConfig, leaf) -> dict:
  """The cache's structure with `leaf(stacked: Optional[int])` at every k and v."""
  out: dict = {}
  if config.scan_layers:
    unit, repeats = scan_unit(config)
    out[SCANNED] = {f"{_BLOCK}{j}": {"k": leaf(repeats), "v": leaf(repeats)}
                    for j in range(len(unit))}
  for i in range(_first_unrolled(config), config.num_layers):
    out[f"layer_{i}"] = {"k": leaf(None), "v": leaf(None)}
  return out


def init_cache(config: GemmaConfig, batch_size: int, cache_length: int,
               dtype: Any = None) -> Cache:
  """Zeroed KV cache in the compute dtype by default: {layer_i: {k, v: [B, S, K, H]}};
  with `config.scan_layers`, {"layers": {block_j: {k, v: [R, B, S, K, H]}}} (plus `layer_i`
  entries for unrolled trailing layers)."""
  dtype = _dtype(dtype or config.dtype)
  shape = (batch_size, cache_length, config.num_kv_heads, config.head_dim)
  return _cache_tree(config, lambda r: jnp.zeros(shape if r is None else (r,) + shape, dtype))


def cache_logical_axes(config: GemmaConfig) -> dict:
  """Logical axis names of every cache array, for sharding the cache like the model."""
  return _cache_tree(config, lambda r: CACHE_AXES if r is None else (LAYERS_AXIS,) + CACHE_AXES)


# --------------------------------------------------------------------------------------------
# Unrolled <-> scanned param trees.


def _unit_layers(config: GemmaConfig) -> tuple[int, int]:
  unit, repeats = scan_unit(config)
  return len(unit), repeats


def is_stacked(params: Any) -> bool:
  """Whether a param tree is the scanned (stacked) one."""
  return isinstance(params, Mapping) and SCANNED in params


def scanned_location(config: GemmaConfig, layer: int) -> tuple[tuple[str, ...], Optional[int]]:
  """Where unrolled layer `layer`'s subtree lives in the scanned tree: (path, index along
  the stacked axis), index None for an unrolled trailing layer."""
  period, repeats = _unit_layers(config)
  if layer < period * repeats:
    return (SCANNED, f"{_BLOCK}{layer % period}"), layer // period
  return (f"layer_{layer}",), None


def _stack(parts):
  if all(isinstance(p, np.ndarray) for p in parts):
    return np.stack(parts)
  return jnp.stack([jnp.asarray(p) for p in parts])


def stack_layers(params: Mapping, config: GemmaConfig) -> dict:
  """The unrolled param tree (`layer_i/...`, as checkpoints hold it) -> the scanned one
  (`layers/block_j/...` stacked [R, ...]); other entries (embedder, final norm, score) are
  kept as they are. numpy leaves stay numpy; anything else becomes jax arrays; logical
  partitioning boxes (`model.init`'s) are dropped."""
  params = nn.unbox(params)
  if is_stacked(params):
    raise ValueError("stack_layers: the params are already stacked (they have 'layers').")
  period, repeats = _unit_layers(config)
  missing = [f"layer_{i}" for i in range(config.num_layers) if f"layer_{i}" not in params]
  if missing:
    raise ValueError(f"stack_layers: params have no {missing[0]} ({len(missing)} of "
                     f"{config.num_layers} layers missing); is the config the params' one?")
  out = {k: v for k, v in params.items() if not k.startswith("layer_")}
  out[SCANNED] = {
      f"{_BLOCK}{j}": jax.tree_util.tree_map(
          lambda *xs: _stack(xs), *[params[f"layer_{r * period + j}"] for r in range(repeats)])
      for j in range(period)}
  for i in range(period * repeats, config.num_layers):
    out[f"layer_{i}"] = params[f"layer_{i}"]
  return out


def unstack_layers(params: Mapping, config: GemmaConfig) -> dict:
  """The inverse of `stack_layers`: the scanned tree -> the unrolled `layer_i/...` one."""
  params = nn.unbox(params)
  if not is_stacked(params):
    raise ValueError("unstack_layers: the params are not stacked (they have no 'layers').")
  period, repeats = _unit_layers(config)
  out = {k: v for k, v in params.items() if k != SCANNED}
  for r in range(repeats):
    for j in range(period):
      out[f"layer_{r * period + j}"] = jax.tree_util.tree_map(
          lambda x, r=r: x[r], params[SCANNED][f"{_BLOCK}{j}"])
  return {k: out[k] for k in sorted(out, key=_layer_order)}


def _layer_order(key: str):
  if key.startswith("layer_"):
    return (1, int(key[len("layer_"):]))
  return (0 if key == "embedder" else 2, key)


def get_layer_param(params: Mapping, config: GemmaConfig, path: Sequence[str]):
  """The param at unrolled `path` (e.g. ("layer_3", "attn", "q_einsum")) of an unrolled or
  a scanned tree (then a slice of the stacked leaf)."""
  path = tuple(path)
  if is_stacked(params) and path[0].startswith("layer_"):
    prefix, index = scanned_location(config, int(path[0][len("layer_"):]))
    leaf = params
    for k in prefix + path[1:]:
      leaf = leaf[k]
    return leaf if index is None else leaf[index]
  leaf = params
  for k in path:
    leaf = leaf[k]
  return leaf


# Checkpoint -> matmul weight layout (`GemmaConfig.weight_layout`): the permutation of each
# projection weight's trailing axes, by param name.
_MATMUL_LAYOUT = {"q_einsum": (1, 0, 2),  # [N, D, H] -> [D, N, H]
                  "kv_einsum": (2, 0, 1, 3),  # [2, K, D, H] -> [D, 2, K, H]
                  "gating_einsum": (1, 0, 2)}  # [2, D, F] -> [D, 2, F]


def to_matmul_layout(params: Mapping) -> Any:
  """A param tree in the checkpoint weight layout -> the same weights in the matmul one
  (traceable; unrolled or stacked trees: only the trailing axes move)."""
  def move(path, x):
    perm = _MATMUL_LAYOUT.get(getattr(path[-1], "key", None))
    if perm is None:
      return x
    lead = x.ndim - len(perm)
    return jnp.transpose(x, tuple(range(lead)) + tuple(lead + p for p in perm))
  return jax.tree_util.tree_map_with_path(move, nn.unbox(params))

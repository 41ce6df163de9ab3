"""Fused causal attention for the full-sequence (training) path: a Pallas kernel with Gemma 2's
soft-cap, sliding window, grouped-query heads and padded keys.

XLA's attention materialises the scores and softmax, float32 [B, K, G, T, S], several times
per layer (the soft-cap's tanh, the mask, the softmax, its bfloat16 copy), and keeps them for
the backward pass unless remat recomputes them. This kernel is FlashAttention-2: it walks the
keys block by block with an online softmax, keeps only the output and the log-sum-exp per
query row, and recomputes each block's scores in the backward kernels (one for dK / dV, one
for dQ). Neither cuDNN's fused attention nor JAX's Pallas one soft-caps, which Gemma 2 needs.

Masking is structural, as in `transformer.attention_masks`: query t sits at slot t and sees
key slot s when s <= t, `key_valid[b, s]`, and, with a window W, t - s < W. Key blocks that
the causal bound or the window rule out are never visited. Packed rows (a pair's shared
prompt, then its chosen and its rejected response) add segments and positions: a response's
key is seen by its own response's queries only, and the window is measured in positions
(`packed_mask`), so that each token sees what it sees in its own unpacked row. A query row
with no visible key (a left-padding position) gets a zero output instead of XLA's uniform
average; such rows never reach a real token's output or the loss, so logits and gradients at
real positions agree with the XLA path.

On a GPU the kernels lower through Triton; on the CPU they run in Pallas' interpreter (slow,
for tests). Triton does not run on TPUs: there the same attention is JAX's splash attention
(Mosaic kernels, which MaxText runs Gemma 2 with; its backward reruns its forward, as its
residuals are its own; padding there is a segment of its own, so a padding row averages
padding values: finite, and as unread as the zeros). The choice is made when the program is
lowered (`lax.platform_dependent`), so a CPU host still compiles the Triton version for a GPU
target, or splash for a TPU, ahead of time. Under a mesh the kernel runs per shard
(`shard_map` over the batch and head axes the logical rules give).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from eva_jax.parallel import logical_axis_rules, logical_to_spec

# Finite, so that a fully masked block gives exp(0) * 0 instead of exp(-inf + inf) = NaN.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# Names of the kernel's residuals (its output and row log-sum-exp), for remat policies.
OUT_NAME = "flash_attention_out"
LSE_NAME = "flash_attention_lse"
SAVED_NAMES = (OUT_NAME, LSE_NAME)
# Triton's smallest tile side (tl.dot needs 16), and its power-of-two shapes.
_MIN_BLOCK = 16


@gin.configurable
@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sides: forward (`block_q` queries x `block_k` keys) and backward (`block_q_bwd` x
  `block_k_bwd`, which also hold float32 dK, dV or dQ accumulators). Powers of two of at
  least 16; clipped to the sequence. The defaults keep head_dim 256 tiles within an H100 /
  H200's shared memory (128 x 128 forward tiles do not fit); speed-tuning them needs a GPU.
  Gin-bindable (`BlockSizes.block_q = 128`): the model builds one per call."""

  block_q: int = 64
  block_k: int = 64
  block_q_bwd: int = 32
  block_k_bwd: int = 32
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
      v = getattr(self, name)
      if v < _MIN_BLOCK or v & (v - 1):
        raise ValueError(f"BlockSizes.{name} = {v}: use a power of two of at least "
                         f"{_MIN_BLOCK}.")


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


# --------------------------------------------------------------------------------------------
# Kernel pieces shared by the forward and both backward kernels.


def _dot(a, b, contract_a: int, contract_b: int):
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _capped_scores(q, k, softcap: Optional[float]):
  """(scores, tanh of the raw scores / cap or None): q [bq, H] . k [bk, H] -> [bq, bk]."""
  raw = _dot(q, k, 1, 1)
  if not softcap:
    return raw, None
  t = jnp.tanh(raw * (1.0 / softcap))
  return t * softcap, t


def _visible(q_start, bq: int, k_start, bk: int, key_segments, window: Optional[int],
             packed=None):
  """[bq, bk] mask. `packed`: (query segments [bq], query positions [bq], key positions [bk])
  of a packed row; then a key of segment s >= 2 is seen by queries of segment s only, and the
  window is measured in positions."""
  q_slots = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  k_slots = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  mask = (k_slots <= q_slots) & (key_segments[None, :] != 0)
  if packed is not None:
    q_segments, q_positions, k_positions = packed
    mask = mask & ((key_segments[None, :] == 1)
                   | (key_segments[None, :] == q_segments[:, None]))
    if window:
      mask = mask & (q_positions[:, None] - k_positions[None, :] < window)
  elif window:
    mask = mask & (q_slots - k_slots < window)
  return mask


def _key_block_range(q_block, bq: int, bk: int, num_k_blocks: int, window: Optional[int]):
  """[lo, hi) of the key blocks that query block `q_block` can see (`window` None for a
  packed row, whose window in positions rules out no block by slots)."""
  hi = jnp.minimum(lax.div((q_block + 1) * bq + bk - 1, bk), num_k_blocks)
  lo = jnp.int32(0)
  if window:
    lo = jnp.maximum(lax.div(q_block * bq - window + 1, bk), 0)
  return lo, hi


def _query_block_range(k_block, bk: int, bq: int, num_q_blocks: int, window: Optional[int]):
  """[lo, hi) of the query blocks that see key block `k_block`."""
  lo = lax.div(k_block * bk, bq)
  hi = jnp.int32(num_q_blocks)
  if window:
    hi = jnp.minimum(lax.div((k_block + 1) * bk - 1 + window + bq - 1, bq), num_q_blocks)
  return lo, hi


def _online_softmax_step(s, mask, m, l):
  """One key block of the online softmax: (p, correction, m_new, l_new) from the block's
  scores `s` [rows, bk] where `mask`, and the running row max `m` and sum `l`; the caller
  updates its output as acc * correction + p . v."""
  s = jnp.where(mask, s, _MASK_VALUE)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
  correction = jnp.exp(m - m_new)
  return p, correction, m_new, l * correction + jnp.sum(p, axis=1)


def _softmax_init(rows: int, head_dim: int):
  """(acc, m, l) before the first key block."""
  return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), _MASK_VALUE, jnp.float32),
          jnp.zeros((rows,), jnp.float32))


def _query_rows(seg_ref, pos_ref, start, rows: int, packed: bool):
  """(segments, positions) of the query rows from `start`, for a packed row; else None."""
  if not packed:
    return None
  block = pl.ds(start, rows)
  return seg_ref[block], pos_ref[block]


def _key_mask(q_start, bq, k_start, bk, seg_ref, pos_ref, window, query_rows):
  """`_visible` for the keys of the block at `k_start`, read from the row's refs."""
  keys = pl.ds(k_start, bk)
  packed = None if query_rows is None else (*query_rows, pos_ref[keys])
  return _visible(q_start, bq, k_start, bk, seg_ref[keys], window, packed)


def _forward_kernel(q_ref, k_ref, v_ref, seg_ref, pos_ref, o_ref, lse_ref, *, softcap, window,
                    packed, bq, bk):
  q_block = pl.program_id(2)
  q = q_ref[...]
  num_k_blocks = k_ref.shape[0] // bk
  query_rows = _query_rows(seg_ref, pos_ref, q_block * bq, bq, packed)

  def body(j, carry):
    acc, m, l = carry
    keys = pl.ds(j * bk, bk)
    s, _ = _capped_scores(q, k_ref[keys, :], softcap)
    mask = _key_mask(q_block * bq, bq, j * bk, bk, seg_ref, pos_ref, window, query_rows)
    p, correction, m, l = _online_softmax_step(s, mask, m, l)
    v = v_ref[keys, :]
    return acc * correction[:, None] + _dot(p.astype(v.dtype), v, 1, 0), m, l

  lo, hi = _key_block_range(q_block, bq, bk, num_k_blocks, None if packed else window)
  acc, m, l = lax.fori_loop(lo, hi, body, _softmax_init(bq, q_ref.shape[-1]))
  l_safe = jnp.where(l > 0, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l_safe)


def _dkdv_kernel(q_ref, k_ref, v_ref, seg_ref, pos_ref, do_ref, lse_ref, delta_ref, dk_ref,
                 dv_ref, *, softcap, window, packed, bq, bk):
  k_block = pl.program_id(2)
  keys = pl.ds(k_block * bk, bk)
  k, v = k_ref[keys, :], v_ref[keys, :]
  key_segments = seg_ref[keys]
  key_positions = pos_ref[keys] if packed else None
  num_q_blocks = q_ref.shape[0] // bq

  def body(i, carry):
    dk, dv = carry
    rows = pl.ds(i * bq, bq)
    q, do = q_ref[rows, :], do_ref[rows, :]
    s, t = _capped_scores(q, k, softcap)
    query_rows = _query_rows(seg_ref, pos_ref, i * bq, bq, packed)
    mask = _visible(i * bq, bq, k_block * bk, bk, key_segments, window,
                    None if query_rows is None else (*query_rows, key_positions))
    p = jnp.where(mask, jnp.exp(s - lse_ref[rows][:, None]), 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, 0, 0)
    ds = p * (_dot(do, v, 1, 1) - delta_ref[rows][:, None])
    if t is not None:
      ds = ds * (1.0 - t * t)
    dk = dk + _dot(ds.astype(q.dtype), q, 0, 0)
    return dk, dv

  head_dim = k_ref.shape[-1]
  zeros = jnp.zeros((bk, head_dim), jnp.float32)
  lo, hi = _query_block_range(k_block, bk, bq, num_q_blocks, None if packed else window)
  dk, dv = lax.fori_loop(lo, hi, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, seg_ref, pos_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               softcap, window, packed, bq, bk):
  q_block = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  num_k_blocks = k_ref.shape[0] // bk
  query_rows = _query_rows(seg_ref, pos_ref, q_block * bq, bq, packed)

  def body(j, dq):
    keys = pl.ds(j * bk, bk)
    k = k_ref[keys, :]
    s, t = _capped_scores(q, k, softcap)
    mask = _key_mask(q_block * bq, bq, j * bk, bk, seg_ref, pos_ref, window, query_rows)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    ds = p * (_dot(do, v_ref[keys, :], 1, 1) - delta[:, None])
    if t is not None:
      ds = ds * (1.0 - t * t)
    return dq + _dot(ds.astype(k.dtype), k, 1, 0)

  lo, hi = _key_block_range(q_block, bq, bk, num_k_blocks, None if packed else window)
  dq = lax.fori_loop(lo, hi, body, jnp.zeros(q_ref.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


# --------------------------------------------------------------------------------------------
# pallas_call wrappers. Shapes here are padded (T == S, a multiple of every block, H a power
# of two) and `blocks` fitted to them. q [B, T, N, H]; k, v [B, S, K, H]; segments and
# positions int32 [B, S] (key_valid as segments 0 / 1, and unread positions, when unpacked);
# lse, delta [B, N, T].


def _compiler_params(interpret: bool, num_warps: int, num_stages: int):
  """Triton's launch settings; none for Pallas' interpreter."""
  if interpret:
    return None
  from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415 (GPU-only names)
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _on_platform(call, tpu, *args):
  """`call(*args, interpret=...)`: Pallas' interpreter when lowered for the CPU, the Triton
  kernel on GPUs; `tpu(*args)` on TPUs, where Triton does not run."""
  return lax.platform_dependent(*args, cpu=functools.partial(call, interpret=True), tpu=tpu,
                                default=functools.partial(call, interpret=False))


# TPUs: JAX's splash attention (a Mosaic kernel, as MaxText runs Gemma 2 with): it soft-caps,
# masks causal and local windows by blocks, groups kv heads, and masks padding with segment
# ids (real tokens 1, padding 0, so a padding query sees padding keys: finite, and never read).
_TPU_TILE = 128


def _splash_kernel(heads: int, length: int, softcap, window, interpret: bool,
                   save_residuals: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
      splash_attention_kernel as splash, splash_attention_mask as splash_mask)
  shape = (length, length)
  one = (splash_mask.LocalMask(shape, window_size=(window - 1, 0), offset=0) if window
         else splash_mask.CausalMask(shape))
  tile = min(512, length)
  tiles = splash.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile,
                            block_q_dkv=tile, block_kv_dkv=tile, block_kv_dkv_compute=tile,
                            block_q_dq=tile, block_kv_dq=tile)
  # Built per call, not cached: the kernel holds its block-mask tables as arrays, which newer
  # JAX stages into the current trace. The numpy work is a fraction of a second (8 heads,
  # 8192 slots: 0.5 s).
  kernel = splash.make_splash_mha_single_device(
      splash_mask.MultiHeadMask([one] * heads), block_sizes=tiles,
      attn_logits_soft_cap=softcap, save_residuals=save_residuals, interpret=interpret)
  return kernel, splash.SegmentIds


def _splash(q, k, v, key_valid, *, softcap, window, with_lse: bool, interpret: bool = False):
  """Splash attention's output [B, T, N, H] and, `with_lse`, its row log-sum-exp [B, N, T]
  (then not differentiable: splash keeps its residuals to itself)."""
  b, t, n, h = q.shape
  length = -(-t // _TPU_TILE) * _TPU_TILE
  head_dim = -(-h // _TPU_TILE) * _TPU_TILE
  kernel, segment_ids = _splash_kernel(n, length, softcap, window, interpret, with_lse)
  heads_major = lambda x: jnp.swapaxes(_pad_axis(_pad_axis(x, 3, head_dim), 1, length), 1, 2)
  valid = _pad_axis(key_valid.astype(jnp.int32), 1, length)
  result = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=seg))(
      heads_major(q), heads_major(k), heads_major(v), segment_ids(q=valid, kv=valid))
  out, (lse,) = result if with_lse else (result, (None,))
  out = jnp.swapaxes(out, 1, 2)[:, :t, :, :h].astype(q.dtype)
  return (out, lse[:, :, :t]) if with_lse else out


def _specs(groups: int, t: int, s: int, h: int, rows: Optional[int]):
  """BlockSpecs of q-shaped (`rows` of T per grid step, or all), k/v-shaped (all of S), the
  key mask, and the [B, N, T] row statistics, for the grid (B, N, blocks)."""
  q_rows = t if rows is None else rows
  q_map = (lambda b, n, i: (b, 0, n, 0)) if rows is None else (lambda b, n, i: (b, i, n, 0))
  stat_map = (lambda b, n, i: (b, n, 0)) if rows is None else (lambda b, n, i: (b, n, i))
  q_spec = pl.BlockSpec((None, q_rows, None, h), q_map)
  kv_spec = pl.BlockSpec((None, s, None, h), lambda b, n, i: (b, 0, n // groups, 0))
  valid_spec = pl.BlockSpec((None, s), lambda b, n, i: (b, 0))
  stat_spec = pl.BlockSpec((None, None, q_rows), stat_map)
  return q_spec, kv_spec, valid_spec, stat_spec


def _tpu_forward(q, k, v, segments, positions, *, softcap, window, packed: bool):
  """TPUs: splash attention; a packed row, whose mask splash does not take, as XLA ops."""
  if packed:
    return attention_reference(q, k, v, segments, softcap=softcap, window=window,
                               positions=positions, with_lse=True)
  return _splash(q, k, v, segments, softcap=softcap, window=window, with_lse=True)


def _forward(q, k, v, segments, positions, *, softcap, window, packed, blocks: BlockSizes):
  b, t, n, h = q.shape
  s, groups = k.shape[1], n // k.shape[2]
  bq, bk = blocks.block_q, blocks.block_k
  q_spec, kv_spec, valid_spec, stat_spec = _specs(groups, t, s, h, rows=bq)
  kernel = functools.partial(_forward_kernel, softcap=softcap, window=window, packed=packed,
                             bq=bq, bk=bk)

  def call(q, k, v, segments, positions, interpret):
    return pl.pallas_call(
        kernel, grid=(b, n, t // bq),
        in_specs=[q_spec, kv_spec, kv_spec, valid_spec, valid_spec],
        out_specs=[q_spec, stat_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        compiler_params=_compiler_params(interpret, blocks.num_warps, blocks.num_stages),
        interpret=interpret, name="flash_attention_forward")(q, k, v, segments, positions)

  tpu = functools.partial(_tpu_forward, softcap=softcap, window=window, packed=packed)
  return _on_platform(call, tpu, q, k, v, segments, positions)


def _backward(q, k, v, segments, positions, out, lse, do, *, softcap, window, packed,
              blocks: BlockSizes):
  b, t, n, h = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  groups = n // kv_heads
  bq, bk = blocks.block_q_bwd, blocks.block_k_bwd
  delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), do.astype(jnp.float32))
  do = do.astype(q.dtype)
  statics = dict(softcap=softcap, window=window, packed=packed, bq=bq, bk=bk)

  # dK, dV per query head (float32), summed over each kv head's group below.
  q_all, kv_all, valid_spec, stat_all = _specs(groups, t, s, h, rows=None)
  per_head_kv = pl.BlockSpec((None, bk, None, h), lambda b_, n_, j: (b_, j, n_, 0))

  def dkdv_call(q, k, v, segments, positions, do, lse, delta, interpret):
    return pl.pallas_call(
        functools.partial(_dkdv_kernel, **statics), grid=(b, n, s // bk),
        in_specs=[q_all, kv_all, kv_all, valid_spec, valid_spec, q_all, stat_all, stat_all],
        out_specs=[per_head_kv, per_head_kv],
        out_shape=[jax.ShapeDtypeStruct((b, s, n, h), jnp.float32)] * 2,
        compiler_params=_compiler_params(interpret, blocks.num_warps, blocks.num_stages),
        interpret=interpret, name="flash_attention_dkdv")(q, k, v, segments, positions, do,
                                                           lse, delta)

  q_rows, _, _, stat_rows = _specs(groups, t, s, h, rows=bq)

  def dq_call(q, k, v, segments, positions, do, lse, delta, interpret):
    return pl.pallas_call(
        functools.partial(_dq_kernel, **statics), grid=(b, n, t // bq),
        in_specs=[q_rows, kv_all, kv_all, valid_spec, valid_spec, q_rows, stat_rows,
                  stat_rows],
        out_specs=q_rows,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(interpret, blocks.num_warps, blocks.num_stages),
        interpret=interpret, name="flash_attention_dq")(q, k, v, segments, positions, do, lse,
                                                         delta)

  def per_kv_head(x, like):
    return x.reshape(b, s, kv_heads, groups, h).sum(axis=3).astype(like.dtype)

  def kernels(q, k, v, segments, positions, do, lse, delta, interpret):
    args = (q, k, v, segments, positions, do, lse, delta)
    dk, dv = dkdv_call(*args, interpret)
    return dq_call(*args, interpret), per_kv_head(dk, k), per_kv_head(dv, v)

  def tpu(q, k, v, segments, positions, do, lse, delta):
    # Splash attention's own backward kernels, behind its forward run again (its residuals
    # are not ours to hand over); a packed row's XLA ops, differentiated.
    del lse, delta
    if packed:
      forward = lambda q, k, v: attention_reference(q, k, v, segments, softcap=softcap,
                                                    window=window, positions=positions)
    else:
      forward = lambda q, k, v: _splash(q, k, v, segments, softcap=softcap, window=window,
                                        with_lse=False)
    _, vjp = jax.vjp(forward, q, k, v)
    return vjp(do)

  return _on_platform(kernels, tpu, q, k, v, segments, positions, do, lse, delta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, segments, positions, softcap, window, packed, blocks):
  out, _ = _forward(q, k, v, segments, positions, softcap=softcap, window=window,
                    packed=packed, blocks=blocks)
  return out


def _flash_fwd(q, k, v, segments, positions, softcap, window, packed, blocks):
  out, lse = _forward(q, k, v, segments, positions, softcap=softcap, window=window,
                      packed=packed, blocks=blocks)
  # Named so that a remat policy can keep them (`SAVED_NAMES`) instead of rerunning the
  # forward kernel in the backward pass.
  out, lse = checkpoint_name(out, OUT_NAME), checkpoint_name(lse, LSE_NAME)
  return out, (q, k, v, segments, positions, out, lse)


def _flash_bwd(softcap, window, packed, blocks, residuals, do):
  q, k, v, segments, positions, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, segments, positions, out, lse, do, softcap=softcap,
                         window=window, packed=packed, blocks=blocks)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def packed_mask(segments, positions=None, window: Optional[int] = None):
  """[B, T, T] bool: which keys each query of a row sees, from key segments [B, T] (0
  padding, 1 seen by every later query, s >= 2 seen by the queries of segment s only) and,
  with `window`, positions [B, T] (query sees key when their positions differ by less)."""
  t = segments.shape[1]
  slots = jnp.arange(t)
  segments = jnp.asarray(segments).astype(jnp.int32)
  keys, queries = segments[:, None, :], segments[:, :, None]
  mask = (slots[None, None, :] <= slots[None, :, None]) & (keys != 0) & (
      (keys == 1) | (keys == queries))
  if window:
    positions = jnp.asarray(positions)
    mask = mask & ((positions[:, :, None] - positions[:, None, :]) < window)
  return mask


def attention_reference(q, k, v, key_valid, *, softcap: Optional[float] = None,
                        window: Optional[int] = None, positions=None, with_lse: bool = False):
  """What `flash_attention` computes, as the XLA path (`transformer.Attention`) does it:
  float32 scores [B, K, G, T, S], soft-capped, masked, softmax. The oracle of the tests and
  the baseline of `benchmarks/attention.py`, and the TPU path of packed rows (`positions`
  given: `key_valid` holds segments, `packed_mask`), where `with_lse` also returns the rows'
  log-sum-exp [B, N, T]. Rows with no visible key average every value uniformly here (the
  kernel gives zeros)."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  s = jnp.einsum("btkgh,bskh->bkgts", q.reshape(b, t, kv_heads, n // kv_heads, h), k,
                 preferred_element_type=jnp.float32)
  if softcap:
    s = jnp.tanh(s / softcap) * softcap
  if positions is None:  # an unpacked row: keys of segment 0 / 1, its slots its positions
    positions = jnp.broadcast_to(jnp.arange(t), key_valid.shape)
  mask = packed_mask(key_valid, positions, window)
  s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", p, v).reshape(b, t, n, h)
  if with_lse:
    return out, jax.nn.logsumexp(s, axis=-1).reshape(b, n, t)
  return out


# --------------------------------------------------------------------------------------------
# Public entry point: padding to the kernel's shapes, and sharding.


def _pad_axis(x, axis: int, size: int):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _fit_blocks(blocks: BlockSizes, length: int) -> tuple[BlockSizes, int]:
  """`blocks` clipped to a sequence of `length` (no tile longer than the next power of two),
  and the padded length: a multiple of every tile."""
  cap = _next_pow2(length)
  fitted = dataclasses.replace(
      blocks, **{name: max(_MIN_BLOCK, min(getattr(blocks, name), cap))
                 for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd")})
  tile = max(fitted.block_q, fitted.block_k, fitted.block_q_bwd, fitted.block_k_bwd)
  return fitted, -(-length // tile) * tile


def _local_attention(q, k, v, rows, softcap, window, blocks):
  """`rows`: key_valid [B, T], or (segments, positions) [B, T] of packed rows."""
  packed = isinstance(rows, tuple)
  segments, positions = rows if packed else (rows, None)
  t, h = q.shape[1], q.shape[-1]
  blocks, length = _fit_blocks(blocks, t)
  head_dim = max(_MIN_BLOCK, _next_pow2(h))
  # Zero-padded head columns add nothing to q . k and give zero output columns; padded key
  # slots are invalid, and padded query rows are sliced away.
  q, k, v = (_pad_axis(_pad_axis(x, 3, head_dim), 1, length) for x in (q, k, v))
  segments = _pad_axis(segments.astype(jnp.int32), 1, length)
  # Unpacked rows window by slots; their positions are not read.
  positions = (segments if positions is None
               else _pad_axis(positions.astype(jnp.int32), 1, length))
  out = _flash(q, k, v, segments, positions, softcap, window, packed, blocks)
  return out[:, :t, :, :h]


def flash_attention(q, k, v, key_valid, *, softcap: Optional[float] = None,
                    window: Optional[int] = None, blocks: Optional[BlockSizes] = None,
                    logical_axes=None, positions=None):
  """Causal attention output [B, T, N, H] (q's dtype).

  q [B, T, N, H] (already scaled), k, v [B, T, K, H] with N a multiple of K (query head j
  uses kv head j // (N // K)); key_valid [B, T]: which key slots are real. `softcap`: scores
  s -> cap * tanh(s / cap); `window`: query t sees only keys t - window < s.

  Packed rows (the solver's pairs, a shared prompt then each response): with `positions`
  [B, T], `key_valid` holds int segments: 0 padding, 1 a key every later query sees (the
  prompt), s >= 2 a key only the queries of segment s see (`packed_mask`); the window is then
  measured in positions, and no key block is skipped for it. On TPUs, whose splash kernel
  takes no such mask, packed rows run as XLA ops (`attention_reference`).

  `logical_axes`: (q's, k's, key_valid's) logical axis names. When given and a mesh is
  active (`parallel.with_mesh_rules`), the kernel runs per shard over the mesh axes they map
  to (the length axis is never split).
  """
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"flash_attention: {q.shape[1]} queries against {k.shape[1]} keys; the "
                     "kernel is for full sequences (no KV cache), where they are equal.")
  _check_heads("flash_attention", q, k)
  blocks = BlockSizes() if blocks is None else blocks
  local = functools.partial(_local_attention, softcap=softcap, window=window, blocks=blocks)
  rows = key_valid if positions is None else (key_valid, positions)
  return _per_shard(local, logical_axes, q, k, v, rows)


def _check_heads(name, q, k):
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{name}: {q.shape[2]} query heads are not a multiple of "
                     f"{k.shape[2]} kv heads.")


def _per_shard(local, logical_axes, q, k, v, mask, *replicated):
  """`local(q, k, v, mask, *replicated)`, per shard when a mesh is active: over the batch and
  head axes of `logical_axes` ((q's, k's, mask's) names); axis 1 (length) is never split.
  `mask` may be a tuple of [B, S] arrays, each split as the mask."""
  mesh = _active_mesh()
  if logical_axes is None or mesh is None or mesh.size == 1:
    return local(q, k, v, mask, *replicated)
  mask_shape = jax.tree_util.tree_leaves(mask)[0].shape
  q_spec, kv_spec, mask_spec = _shard_specs(mesh, logical_axes, (q.shape, k.shape, mask_shape))
  if kv_spec[2] is None and q_spec[2] is not None and k.shape[2] > 1:
    # Query heads are split but kv heads cannot be (too few): give each query head its own
    # copy of its kv head so that every shard holds the kv heads its queries use.
    groups = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
    kv_spec = q_spec
  return jax.shard_map(local, mesh=mesh,
                       in_specs=(q_spec, kv_spec, kv_spec, mask_spec) + (P(),) * len(replicated),
                       out_specs=q_spec, check_vma=False)(q, k, v, mask, *replicated)


def _active_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def _shard_specs(mesh, logical_axes, shapes):
  rules = nn.get_logical_axis_rules() or logical_axis_rules()
  specs = []
  for axes, shape in zip(logical_axes, shapes):
    spec = list(logical_to_spec(axes, mesh, rules, shape))
    spec += [None] * (len(shape) - len(spec))
    spec[1] = None  # Attention needs every key of a row: the length axis stays whole.
    specs.append(P(*spec))
  return tuple(specs)


# --------------------------------------------------------------------------------------------
# Decoding: one new token per row against the KV cache.
#
# XLA's decode attention reads the whole static cache every step, the slots not yet written
# included. This kernel loops over key blocks only up to the block holding `cache_index` (and
# from the window's first, on local layers), so a step reads the written part of the cache.
# One program per (row, kv head) holds that head's G query heads; G is 1 to 8 rows, too few
# for a tensor-core dot (Triton needs 16), and decoding is bound by reading the cache anyway,
# so the scores and the weighted sum are multiply-reduces.

_DECODE_BLOCK = 64


def decode_reference(q, k, v, visible, *, softcap: Optional[float] = None):
  """What `flash_decode` computes, as XLA ops: q [B, N, H] against k, v [B, S, K, H], keys
  where `visible` [B, S] (float32 scores and softmax, as the XLA decode path). Also the TPU
  implementation."""
  b, n, h = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(b, kv_heads, n // kv_heads, h).astype(jnp.float32)
  s = jnp.einsum("bkgh,bskh->bkgs", qg, k.astype(jnp.float32))
  if softcap:
    s = jnp.tanh(s / softcap) * softcap
  s = jnp.where(visible.astype(bool)[:, None, None, :], s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1)
  out = jnp.einsum("bkgs,bskh->bkgh", p, v.astype(jnp.float32))
  return out.reshape(b, n, h).astype(q.dtype)


def _decode_kernel(index_ref, q_ref, k_ref, v_ref, visible_ref, o_ref, *, softcap, window, bk):
  index = index_ref[0]
  q = q_ref[...].astype(jnp.float32)  # [G, H]
  num_blocks = k_ref.shape[0] // bk

  def body(j, carry):
    acc, m, l = carry
    keys = pl.ds(j * bk, bk)
    s = jnp.sum(q[:, None, :] * k_ref[keys, :].astype(jnp.float32)[None, :, :], axis=2)
    if softcap:
      s = jnp.tanh(s * (1.0 / softcap)) * softcap
    mask = jnp.broadcast_to((visible_ref[keys] != 0)[None, :], s.shape)
    p, correction, m, l = _online_softmax_step(s, mask, m, l)
    v = v_ref[keys, :].astype(jnp.float32)
    return acc * correction[:, None] + jnp.sum(p[:, :, None] * v[None, :, :], axis=1), m, l

  hi = jnp.minimum(lax.div(index, bk) + 1, num_blocks)
  lo = jnp.maximum(lax.div(index - window + 1, bk), 0) if window else jnp.int32(0)
  acc, _, l = lax.fori_loop(lo, hi, body, _softmax_init(*q_ref.shape))
  o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


def decode_block(length: int) -> int:
  """The decode kernel's key block for a cache of `length` slots: the largest power of two
  from 16 to 64 dividing it (the sampler's lengths are multiples of 16), so that the cache is
  read in place; 16 (and a padded copy) otherwise."""
  block = _DECODE_BLOCK
  while block > _MIN_BLOCK and length % block:
    block //= 2
  return block


def _local_decode(q, k, v, visible, cache_index, *, softcap, window):
  b, _, n, h = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  groups = n // kv_heads
  rows = _next_pow2(groups)  # Triton's block shapes are powers of two
  head_dim = _next_pow2(h)
  bk = decode_block(s)
  length = -(-s // bk) * bk
  # q [B, 1, N, H] -> [B, K * rows, H], each kv head's queries padded to `rows`.
  qg = _pad_axis(_pad_axis(q.reshape(b, kv_heads, groups, h), 2, rows), 3, head_dim)
  qg = qg.reshape(b, kv_heads * rows, head_dim)
  if (length, head_dim) != (s, h):  # only for shapes the sampler does not make
    k, v = (_pad_axis(_pad_axis(x, 3, head_dim), 1, length) for x in (k, v))
    visible = _pad_axis(visible, 1, length)
  visible = visible.astype(jnp.int32)
  index = jnp.reshape(jnp.asarray(cache_index, jnp.int32), (1,))
  kernel = functools.partial(_decode_kernel, softcap=softcap, window=window, bk=bk)

  def call(index, qg, k, v, visible, interpret):
    out = pl.pallas_call(
        kernel, grid=(b, kv_heads),
        in_specs=[pl.BlockSpec((1,), lambda i, j: (0,)),
                  pl.BlockSpec((None, rows, head_dim), lambda i, j: (i, j, 0)),
                  pl.BlockSpec((None, length, None, head_dim), lambda i, j: (i, 0, j, 0)),
                  pl.BlockSpec((None, length, None, head_dim), lambda i, j: (i, 0, j, 0)),
                  pl.BlockSpec((None, length), lambda i, j: (i, 0))],
        out_specs=pl.BlockSpec((None, rows, head_dim), lambda i, j: (i, j, 0)),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=_compiler_params(interpret, num_warps=4, num_stages=2),
        interpret=interpret, name="flash_decode")(index, qg, k, v, visible)
    return out.reshape(b, kv_heads, rows, head_dim)[:, :, :groups, :h].reshape(b, 1, n, h)

  def tpu(index, qg, k, v, visible):
    del index, qg  # the XLA ops take q as it came, and read the whole cache
    return decode_reference(q[:, 0], k[..., :h], v[..., :h], visible,
                            softcap=softcap)[:, None]

  return _on_platform(call, tpu, index, qg, k, v, visible)


def flash_decode(q, k, v, visible, cache_index, *, softcap: Optional[float] = None,
                 window: Optional[int] = None, logical_axes=None):
  """One decode step's attention output [B, 1, N, H] (q's dtype).

  q [B, 1, N, H] (already scaled); k, v [B, S, K, H]: the KV cache with this step's keys
  written at `cache_index`; visible [B, S]: which slots the new token sees (the decode mask:
  real, at or before `cache_index`, within the window). Only key blocks up to the one holding
  `cache_index` (and, with `window`, from the window's first) are read. Differentiation is not
  supported (decoding only). `logical_axes`: (q's, the cache's, visible's) names, as in
  `flash_attention`. On TPUs the same math runs as XLA ops (`decode_reference`).
  """
  if q.shape[1] != 1:
    raise ValueError(f"flash_decode: {q.shape[1]} new tokens per row; the kernel decodes one "
                     "(prefill goes through the XLA path).")
  _check_heads("flash_decode", q, k)
  local = functools.partial(_local_decode, softcap=softcap, window=window)
  return _per_shard(local, logical_axes, q, k, v, visible, cache_index)

"""Full-sequence attention alone: the fused kernel (`attention_impl = "flash"`) against XLA's,
forward and backward, with their agreement on this device.

    python benchmarks/attention.py                       # gemma2_2b's attention, 8 x 1024
    python benchmarks/attention.py --batch 1 --length 4096 --window 4096

Shapes default to gemma2_2b's (8 query heads, 4 kv heads, head_dim 256, soft-cap 50) at the
train-step benchmark's 8 sequences of 1024 tokens. Inputs are random, in `--dtype`, with the
first `--pad` slots of row 0 padding. Each implementation's step is jit(value_and_grad) of
sum(output * w) with respect to q, k and v; reported per implementation: compile_s, step_s
(median of `--iters`), TFLOP/s of a nominal matmul count (the visible (query, key) pairs:
causal, within the window; forward 2 matmuls, backward 5 as FlashAttention-2 counts it; the
same count for both implementations, so their ratio is the speed-up) and the compiled
memory; and the flash kernel's largest error against XLA's, relative to each
quantity's largest magnitude, on real query rows (the kernel gives padding rows zeros).
One JSON line (and $OUT/attention.json when OUT is set). On a CPU the kernel runs in Pallas'
interpreter: use small shapes there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.json_report import emit  # noqa: E402
from eva_jax import aot  # noqa: E402
from eva_jax.models.flash_attention import (BlockSizes, attention_reference,  # noqa: E402
                                            flash_attention)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=1024)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=256)
  p.add_argument("--softcap", type=float, default=50.0, help="0: none")
  p.add_argument("--window", type=int, default=0, help="sliding window; 0: none")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--pad", type=int, default=100, help="padding slots at the start of row 0")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--block_q", type=int, default=None, help="default: BlockSizes()'s")
  p.add_argument("--block_k", type=int, default=None)
  p.add_argument("--block_q_bwd", type=int, default=None)
  p.add_argument("--block_k_bwd", type=int, default=None)
  p.add_argument("--num_warps", type=int, default=None)
  p.add_argument("--num_stages", type=int, default=None)
  p.add_argument("--out", default=None)
  return p.parse_args(argv)


def attention_flops(batch, length, heads, head_dim, window):
  """Nominal matmul FLOPs of one forward + backward: visible (query, key) pairs x heads x
  head_dim x 2 FLOPs x 7 matmuls (forward q.k and p.v; backward as FlashAttention-2 counts
  it: q.k recomputed, do.v, p.do, ds.k, ds.q)."""
  t = np.arange(length)
  visible = (t[None, :] <= t[:, None])
  if window:
    visible &= (t[:, None] - t[None, :]) < window
  return 2.0 * 7 * batch * heads * head_dim * float(visible.sum())


def _timed(fn, args, iters):
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t)
  try:
    memory = aot.memory_total_gib(compiled)
  except Exception:  # not every backend reports it
    memory = None
  return compiled, dict(compile_s=compile_s, step_s=statistics.median(times),
                        compiled_memory_gib=memory)


def main(argv=None):
  args = parse_args(argv)
  blocks = BlockSizes(**{k: getattr(args, k) for k in
                         ("block_q", "block_k", "block_q_bwd", "block_k_bwd", "num_warps",
                          "num_stages") if getattr(args, k) is not None})
  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  b, t, n, kv, h = args.batch, args.length, args.heads, args.kv_heads, args.head_dim
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), dtype) for heads in (n, kv, kv))
  valid = np.ones((b, t), bool)
  valid[0, :args.pad] = False
  rows = jnp.asarray(valid)[:, :, None, None]
  weights = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) * rows
  valid = jnp.asarray(valid)
  softcap, window = args.softcap or None, args.window or None

  def step(impl):
    def loss(q, k, v):
      out = impl(q, k, v)
      return jnp.sum(out.astype(jnp.float32) * weights), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)

  flash = lambda q, k, v: flash_attention(q, k, v, valid, softcap=softcap,  # noqa: E731
                                          window=window, blocks=blocks)
  xla = lambda q, k, v: attention_reference(q, k, v, valid, softcap=softcap,  # noqa: E731
                                            window=window)
  flops = attention_flops(b, t, n, h, window)
  result = dict(bench="eva_jax_attention", batch=b, length=t, heads=n, kv_heads=kv,
                head_dim=h, softcap=softcap, window=window, dtype=dtype.name,
                blocks=blocks.__dict__, backend=jax.default_backend(),
                device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                matmul_tflop_per_step=flops / 1e12)
  outputs = {}
  for name, impl in (("flash", flash), ("xla", xla)):
    compiled, timing = _timed(step(impl), (q, k, v), args.iters)
    timing["tflops_per_s"] = flops / timing["step_s"] / 1e12
    result[name] = timing
    (_, out), grads = compiled(q, k, v)
    outputs[name] = (out,) + tuple(grads)
  errors = {}
  for what, got, want in zip(("out", "dq", "dk", "dv"), outputs["flash"], outputs["xla"]):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if what == "out":
      got, want = got * np.asarray(rows), want * np.asarray(rows)
    errors[what] = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
  result["flash_max_rel_error"] = errors
  result["speedup"] = result["xla"]["step_s"] / result["flash"]["step_s"]
  return emit(result, args.out, "attention.json")


if __name__ == "__main__":
  main()

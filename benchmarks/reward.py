"""Reward-model scoring throughput: tokens/s, model FLOP/s, MFU, memory, compile apart from run.

    python benchmarks/reward.py --config tiny                                   # CPU
    python benchmarks/reward.py --config gemma2_2b --batch 16 --seq_len 1024 \
        --num_sequences 256                                                     # one GPU

A random-init one-label Gemma sequence classifier of a named config (timing does not depend on
the weights), scored through `ModelReward.score_ids` exactly as a round scores responses:
`num_sequences` random sequences of exactly `seq_len` ids (BOS first), one length bucket
(`seq_len`), `batch` rows per program. Tokenization (host, before `score_ids`) is not timed.

Reported:
  tokens_per_s        num_sequences * seq_len / call time (median of `iters` calls after the
                      first, which compiles)
  model_tflops_per_s  forward FLOPs / call time: 2 * params without the embedding * tokens
                      (a classifier gathers embeddings and never unembeds) + attention
                      (4 * layers * heads * head_dim * causal query-key pairs within each
                      layer's window) + the score head
  mfu                 model FLOP/s / peak; peak from --peak_tflops, else a matmul in the
                      compute dtype measured in this run (`peak_source` says which)
  peak_memory_gib     the device allocator's peak (GPU/TPU); None on CPU, where
                      `compiled_memory_gib` (XLA's buffer assignment) and `host_max_rss_gib`
                      stand in

Prints one JSON object; also writes it to $OUT/reward_<config>.json when OUT is set (or to
--out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.train_step import (GIB, attention_flops_per_sequence,  # noqa: E402
                                   compiled_memory_gib, measure_peak_tflops)
from benchmarks.json_report import emit  # noqa: E402
from eva_jax import parallel  # noqa: E402
from eva_jax.models import GemmaForSequenceClassification, get_config  # noqa: E402
from eva_jax.rewards import ModelReward  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="tiny", help="named model config (eva_jax.models)")
  p.add_argument("--batch", type=int, default=8, help="rows per program (ModelReward.batch_size)")
  p.add_argument("--seq_len", type=int, default=64, help="tokens per sequence")
  p.add_argument("--num_sequences", type=int, default=0,
                 help="sequences per call (0: 4 * batch)")
  p.add_argument("--dtype", default="bfloat16", help="compute dtype")
  p.add_argument("--param_dtype", default=None, help="params' dtype (default: --dtype)")
  p.add_argument("--iters", type=int, default=3, help="timed calls after the first")
  p.add_argument("--mesh", default='{"data": -1}', help='JSON, e.g. \'{"tensor": -1}\'')
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="peak FLOP/s of one device in TFLOP/s for MFU (default: measured)")
  p.add_argument("--out", default=None, help="also write the JSON here (default: "
                 "$OUT/reward_<config>.json when $OUT is set)")
  return p.parse_args(argv)


def forward_flops(cfg, num_sequences: int, seq_len: int) -> float:
  """Model FLOPs of scoring `num_sequences` causal sequences of `seq_len` tokens."""
  tokens = num_sequences * seq_len
  dense = 2.0 * cfg.num_params(include_embedding=False) * tokens
  # attention_flops_per_sequence counts training (forward + backward = 3 forwards).
  attention = attention_flops_per_sequence(cfg, seq_len) / 3 * num_sequences
  head = 2.0 * cfg.embed_dim * cfg.num_labels * num_sequences
  return dense + attention + head


def main(argv=None):
  args = parse_args(argv)
  param_dtype = args.param_dtype or args.dtype
  cfg = get_config(args.config, dtype=args.dtype, param_dtype=param_dtype, num_labels=1)
  model = GemmaForSequenceClassification(cfg)
  mesh = parallel.create_mesh(json.loads(args.mesh))
  t0 = time.perf_counter()
  params = parallel.init_params(model, jax.random.key(0), mesh, None,
                                jnp.ones((1, 8), jnp.int32))
  jax.block_until_ready(params)
  init_s = time.perf_counter() - t0
  weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))

  reward = ModelReward.from_model(model, params, "byte", mesh, max_length=args.seq_len,
                                  length_buckets=[args.seq_len], batch_size=args.batch)
  n = args.num_sequences or 4 * reward.batch_size
  rng = np.random.default_rng(0)
  ids = rng.integers(3, cfg.vocab_size, (n, args.seq_len), dtype=np.int32)
  ids[:, 0] = cfg.bos_id
  ids = [list(row) for row in ids]

  start = time.perf_counter()
  scores = reward.score_ids(ids)
  first_call_s = time.perf_counter() - start
  compile_s = sum(reward.compile_seconds)
  runs = []
  for _ in range(args.iters):
    start = time.perf_counter()
    scores = reward.score_ids(ids)
    runs.append(time.perf_counter() - start)
  run_s = statistics.median(runs) if runs else first_call_s - compile_s

  if args.peak_tflops:
    peak, source = args.peak_tflops, "given"
  else:
    peak, source = measure_peak_tflops(jnp.dtype(args.dtype)), f"measured {args.dtype} matmul"
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # not every backend reports it
    stats = {}
  peak_mem = stats.get("peak_bytes_in_use")
  program = next(iter(reward._programs.values()))  # pylint: disable=protected-access
  compiled_gib, temp_gib = compiled_memory_gib(program)
  tokens = n * args.seq_len
  model_tflops = forward_flops(cfg, n, args.seq_len) / run_s / 1e12
  result = dict(
      benchmark="reward", config=args.config, device=str(jax.devices()[0].device_kind),
      backend=jax.default_backend(), num_devices=jax.device_count(), jax=jax.__version__,
      mesh=dict(mesh.shape), dtype=args.dtype, param_dtype=param_dtype, batch=reward.batch_size,
      seq_len=args.seq_len, num_sequences=n, tokens_per_call=tokens,
      params=cfg.num_params() + cfg.embed_dim * cfg.num_labels, weight_bytes=weight_bytes,
      init_s=init_s, compile_s=compile_s, first_call_s=first_call_s,
      first_call_run_s=first_call_s - compile_s, run_s=run_s, run_s_all=runs,
      tokens_per_s=tokens / run_s, sequences_per_s=n / run_s,
      model_tflops_per_s=model_tflops, peak_tflops=peak, peak_source=source,
      mfu=model_tflops / (peak * jax.device_count()),
      peak_memory_gib=None if peak_mem is None else peak_mem / GIB,
      compiled_memory_gib=compiled_gib, compiled_temp_gib=temp_gib,
      host_max_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
      num_compilations=reward.num_compilations, scores_finite=bool(np.isfinite(scores).all()))
  return emit(result, args.out, f"reward_{args.config}.json")


if __name__ == "__main__":
  main()

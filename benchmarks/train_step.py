"""Throughput, FLOP/s, MFU and memory of the solver's DPO train step; prints one JSON object.

    python benchmarks/train_step.py --config tiny                       # CPU
    python benchmarks/train_step.py --config gemma2_2b --pairs 4 --prompt_len 512 \
        --response_len 512                                              # one GPU

Random weights and tokens (timing does not depend on them), every row full length like the
peer scripts in ../shared/bench (prompt_len prompt tokens + response_len response tokens,
reference log-probs precomputed, so a step is the policy's forward + backward on chosen and
rejected plus the AdamW update). Only the response positions are unembedded (`--scored_length`,
default --response_len), as the eva loop does; the Tunix peer computes every position's logits
and keeps the responses' (`logits_to_keep`).

Reported:
  tokens_per_s      2 * pairs * (prompt_len + response_len) / step time (all tokens, as peers)
  model_tflops_per_s  (6 * params * tokens + attention) / step time; params include the
                    (tied) embedding once; attention = 12 * layers * heads * head_dim *
                    (causal query-key pairs within each layer's window) per sequence; remat
                    recomputation is not counted (model FLOPs, not hardware FLOPs), nor are the
                    prompt's unembeddings skipped (the same convention as the peers), nor
                    the prompt's second pass that `share_prompt` saves
  computed_tokens_per_step  tokens the step runs through the model: 2 * pairs * length, or
                    with `share_prompt` (on by default; --no-share_prompt turns it off)
                    pairs * (length + response positions), the prompt once per pair
  computed_model_tflops_per_s, computed_mfu  the same less the prompt's second pass, which a
                    packed step does not run (equal to the above without `share_prompt`)
  mfu               model FLOP/s / peak; peak from --peak_tflops, else a matmul in the
                    compute dtype measured in this run (`peak_source` says which)
  peak_memory_gib   the device allocator's peak (GPU/TPU); None on CPU, where
                    `compiled_memory_gib` (XLA's buffer assignment: arguments + outputs +
                    temporaries - aliased) and `host_max_rss_gib` stand in
`--aot_only` compiles from shapes alone (nothing allocated) and reports the compiled memory;
with `--aot_topology v5p-8` it compiles for one chip of a TPU slice (libtpu; no TPU needed).
With `--aot_only`, `compile_s` is tracing + lowering + XLA compilation and `lower_s` the
first two (without it both also include building the state and the batch);
`compile_cpu_s` is the process's CPU time over the same span (steadier on a shared machine).
`xla_tflops_per_step` is XLA's own count for the compiled program (recomputation included; a
loop body, such as the layer scan or the logits-chunk scan, counted once: compare programs
unrolled with --no-scan_layers and one logits chunk, --chunk_size >= the scored length).
The layers are one `nn.scan` (one block, or one Gemma 2 (local, global) pair, compiled once)
as `make_policy_model` builds them by default; `--no-scan_layers` compiles one program per layer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.json_report import emit  # noqa: E402
from eva_jax import aot, parallel  # noqa: E402
from eva_jax.models import get_config  # noqa: E402
from eva_jax.models.config import ATTENTION_IMPLS  # noqa: E402
from eva_jax.models.flash_attention import BlockSizes  # noqa: E402
from eva_jax.models.transformer import REMAT_POLICIES  # noqa: E402
from eva_jax.solver import (TrainStep, create_train_state, get_loss_fn, make_optimizer,  # noqa: E402
                            make_policy_model)
from eva_jax.solver.batch import shared_prompt_length  # noqa: E402

GIB = 2 ** 30


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="tiny", help="named model config (eva_jax.models)")
  p.add_argument("--config_overrides", default="{}",
                 help='JSON of GemmaConfig fields to replace, e.g. \'{"attention_types": '
                      '["local", "global"], "vocab_size": 32000}\' (a smaller model with a '
                      "named config's widths, for a CPU)")
  p.add_argument("--pairs", type=int, default=4, help="preference pairs per step")
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--response_len", type=int, default=64)
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--loss", default="dpo")
  p.add_argument("--gin_file", action="append", default=[],
                 help="take make_policy_model's and make_optimizer's settings from this gin "
                      "file (as `python -m eva_jax.main` resolves it, e.g. "
                      "mixed_precision.gin); the flags below override it")
  p.add_argument("--gin_binding", action="append", default=[],
                 help="a gin binding, after the files, e.g. 'BlockSizes.block_q = 128' "
                      "(the fused attention kernel's tiles); repeatable")
  # Default None: make_policy_model's / make_optimizer's value (or the gin file's).
  p.add_argument("--remat", default=None, choices=REMAT_POLICIES, help="default: full")
  p.add_argument("--scan_layers", default=None, action=argparse.BooleanOptionalAction,
                 help="scan over layers (one block / Gemma 2 pair compiled once), as "
                      "make_policy_model does by default; --no-scan_layers: unrolled")
  p.add_argument("--attention_impl", default=None, choices=ATTENTION_IMPLS,
                 help="full-sequence attention: xla (default) or flash (the Pallas kernel)")
  p.add_argument("--compute_dtype", default=None, help="default: bfloat16")
  p.add_argument("--param_dtype", default=None, help="default: float32")
  p.add_argument("--state_dtype", default=None, help="Adam moments' dtype; default: float32")
  p.add_argument("--mu_dtype", default=None,
                 help="Adam's first moment's dtype, when not --state_dtype (e.g. bfloat16)")
  p.add_argument("--master_dtype", default=None,
                 help="dtype of the optimizer's master copy of the params (e.g. float32 with "
                      "--param_dtype bfloat16); default: none")
  p.add_argument("--share_prompt", default=None, action=argparse.BooleanOptionalAction,
                 help="one packed row per pair, its prompt once (default: on where it "
                      "applies, as make_train_step)")
  p.add_argument("--microbatches", type=int, default=1)
  p.add_argument("--chunk_size", type=int, default=256, help="positions per logits chunk")
  p.add_argument("--scored_length", type=int, default=None,
                 help="positions unembedded per row (default: --response_len, as the eva loop "
                 "does; 0: all, prompt included)")
  p.add_argument("--mesh", default='{"data": -1}', help='JSON, e.g. \'{"fsdp": -1}\'')
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="peak FLOP/s of one device in TFLOP/s for MFU (default: measured)")
  p.add_argument("--aot_only", action="store_true", help="compile from shapes, do not run")
  p.add_argument("--aot_topology", default=None,
                 help="with --aot_only: compile for the first --aot_chips chips of this Cloud "
                      "TPU slice (e.g. v5p-8; libtpu describes it, no TPU needed) instead of "
                      "this machine's devices")
  p.add_argument("--aot_chips", type=int, default=1)
  p.add_argument("--out", default=None, help="also write the JSON here (default: "
                 "$OUT/train_step_<config>.json when $OUT is set)")
  return p.parse_args(argv)


def attention_flops_per_sequence(cfg, length: int) -> float:
  """Training FLOPs of QK^T and PV for one causal sequence (forward + backward = 3x)."""
  total = 0
  for kind in cfg.attention_types:
    window = cfg.sliding_window if (kind == "local" and cfg.sliding_window) else length
    q = np.arange(length)
    total += int(np.minimum(q + 1, window).sum())  # keys each query attends to
  return 12.0 * cfg.num_heads * cfg.head_dim * total


def measure_peak_tflops(dtype) -> float:
  """A square matmul in `dtype` on device 0 (8192 on accelerators, 1024 on CPU)."""
  n = 1024 if jax.default_backend() == "cpu" else 8192
  dev = jax.devices()[0]
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(k1, (n, n), dtype), dev)
  b = jax.device_put(jax.random.normal(k2, (n, n), dtype), dev)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  reps = 5 if jax.default_backend() == "cpu" else 50
  t = time.perf_counter()
  for _ in range(reps):
    r = f(a, b)
  r.block_until_ready()
  return 2 * n ** 3 / ((time.perf_counter() - t) / reps) / 1e12


def random_batch(cfg, pairs: int, prompt_len: int, response_len: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  t = prompt_len + response_len
  mask = np.zeros((pairs, t), np.int32)
  mask[:, prompt_len:] = 1
  tokens = lambda: rng.integers(3, cfg.vocab_size, (pairs, t), dtype=np.int32)
  chosen, rejected = tokens(), tokens()
  rejected[:, :prompt_len] = chosen[:, :prompt_len]  # one prompt per pair, as in a round
  return {"chosen_tokens": chosen, "chosen_loss_mask": mask, "rejected_tokens": rejected,
          "rejected_loss_mask": mask.copy(),
          "ref_chosen_logps": rng.normal(-response_len * 2.0, 1.0, pairs).astype(np.float32),
          "ref_rejected_logps": rng.normal(-response_len * 2.0, 1.0, pairs).astype(np.float32)}


def xla_tflops(compiled):
  """XLA's count of the compiled step's FLOPs per device (remat recomputation included; a
  loop body counted once, so only comparable between programs of the same loop structure);
  None where the backend reports none (XLA:GPU)."""
  flops, _ = aot.xla_cost(compiled)
  return flops / 1e12 if flops else None


def compiled_memory_gib(compiled):
  """(total, temporaries) GiB: arguments + outputs + temporaries - aliased."""
  try:
    return aot.memory_total_gib(compiled), aot.memory_gib(compiled)[2]
  except Exception:  # not every backend reports it
    return None, None


def main(argv=None):
  args = parse_args(argv)
  overrides = json.loads(args.config_overrides)
  cfg = get_config(args.config, overrides)
  devices = None
  if args.aot_topology:
    if not args.aot_only:
      raise SystemExit("--aot_topology compiles for chips that are not here: add --aot_only.")
    devices = aot.topology_devices(aot.parse_topology(args.aot_topology))[:args.aot_chips]
  mesh = parallel.create_mesh(json.loads(args.mesh), devices=devices)
  if args.gin_file:
    from eva_jax import main as eva_main  # pylint: disable=import-outside-toplevel
    try:  # the loop registers every configurable, which a main gin file binds
      from eva_jax import loop  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:  # a solver-only file (mixed_precision.gin) needs only the solver's
      pass
    eva_main.load_gin(args.gin_file, args.gin_binding)
  elif args.gin_binding:
    gin.parse_config_files_and_bindings([], args.gin_binding)
  given = lambda **kw: {k: v for k, v in kw.items() if v is not None}
  model = make_policy_model(cfg, **given(remat=args.remat, compute_dtype=args.compute_dtype,
                                         param_dtype=args.param_dtype,
                                         scan_layers=args.scan_layers,
                                         attention_impl=args.attention_impl))
  opt = make_optimizer(5e-7, **given(state_dtype=args.state_dtype, mu_dtype=args.mu_dtype,
                                     master_dtype=args.master_dtype))
  dtype_name = lambda d: None if d is None else jnp.dtype(d).name
  loss_fn = get_loss_fn(args.loss)
  scored = args.response_len if args.scored_length is None else args.scored_length
  step = TrainStep(model, opt, loss_fn, mesh, num_microbatches=args.microbatches,
                   chunk_size=args.chunk_size, scored_length=scored or None,
                   share_prompt=args.share_prompt)
  host_batch = random_batch(cfg, args.pairs, args.prompt_len, args.response_len)
  length = args.prompt_len + args.response_len
  tokens = 2 * args.pairs * length
  n_params = cfg.num_params()
  flops = 6.0 * n_params * tokens + 2 * args.pairs * attention_flops_per_sequence(cfg, length)
  # Packed, each prompt runs once: the model FLOPs less the prompt's second pass.
  computed_flops = flops - (6.0 * n_params * args.pairs * args.prompt_len + args.pairs
                            * attention_flops_per_sequence(cfg, args.prompt_len)
                            if step.share_prompt else 0.0)
  result = dict(bench="eva_jax_train_step", config=args.config, config_overrides=overrides,
                loss=args.loss, gin_files=args.gin_file, gin_bindings=args.gin_binding,
                pairs=args.pairs, length=length, tokens_per_step=tokens, params=n_params,
                remat=model.remat, scan_layers=model.config.scan_layers,
                attention_impl=model.config.attention_impl,
                flash_blocks=(dataclasses.asdict(BlockSizes())
                              if model.config.attention_impl == "flash" else None),
                compute_dtype=dtype_name(model.config.dtype),
                param_dtype=dtype_name(model.config.param_dtype),
                state_dtype=dtype_name(opt.state_dtype),
                mu_dtype=dtype_name(opt.mu_dtype or opt.state_dtype),
                master_dtype=dtype_name(opt.master_dtype),
                microbatches=args.microbatches, chunk_size=args.chunk_size,
                scored_length=scored or length, share_prompt=step.share_prompt,
                computed_tokens_per_step=(
                    args.pairs * shared_prompt_length(length, scored or None)
                    if step.share_prompt else tokens),
                mesh=dict(mesh.shape), backend=jax.default_backend(),
                device=str(mesh.devices.flat[0].device_kind), device_count=mesh.devices.size,
                jax=jax.__version__)

  t0, cpu0 = time.perf_counter(), time.process_time()
  if args.aot_only:
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=step.batch_shardings[k])
             for k, v in host_batch.items() if k in step.keys}
    state = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), step.abstract_state,
        step.state_shardings)
  else:
    state = create_train_state(model, opt, jax.random.key(0), mesh)
    batch = step.shard_batch(host_batch)
  lowered = step.lower(state, batch)
  result["lower_s"] = time.perf_counter() - t0
  compiled = lowered.compile()
  result["compile_s"] = time.perf_counter() - t0
  # CPU seconds of this process (all threads) over the same span: steadier than wall time on
  # a shared machine.
  result["compile_cpu_s"] = time.process_time() - cpu0
  result["compiled_memory_gib"], result["compiled_temp_gib"] = compiled_memory_gib(compiled)
  result["xla_tflops_per_step"] = xla_tflops(compiled)
  if args.aot_only:
    return report(result, args)

  batch = {k: batch[k] for k in step.keys}
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - t) / args.steps

  if args.peak_tflops:
    peak, source = args.peak_tflops, "given"
  else:
    compute = result["compute_dtype"]  # the model's, whether from a flag, gin or the default
    peak, source = measure_peak_tflops(jnp.dtype(compute)), f"measured {compute} matmul"
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:
    stats = {}
  peak_mem = stats.get("peak_bytes_in_use")
  model_tflops = flops / step_s / 1e12
  result.update(step_s=step_s, tokens_per_s=tokens / step_s, model_tflops_per_s=model_tflops,
                computed_model_tflops_per_s=computed_flops / step_s / 1e12,
                peak_tflops=peak, peak_source=source,
                mfu=model_tflops / (peak * jax.device_count()),
                computed_mfu=computed_flops / step_s / 1e12 / (peak * jax.device_count()),
                peak_memory_gib=None if peak_mem is None else peak_mem / GIB,
                host_max_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
                final_loss=float(metrics["loss"]), steps=args.steps, warmup=args.warmup)
  return report(result, args)


def report(result: dict, args) -> dict:
  """Prints the JSON line and writes it to --out (or $OUT/train_step_<config>.json)."""
  return emit(result, args.out, f"train_step_{args.config}.json")


if __name__ == "__main__":
  main()

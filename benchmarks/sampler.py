"""Sampler throughput: new tokens/s, the HBM roofline, and compile time apart from run time.

    python benchmarks/sampler.py --config gemma2_2b --batch 256 --prompt_len 256 \
        --max_new_tokens 256

Random bf16 weights (timing does not depend on them), random prompts of exactly `prompt_len`
ids, no stop tokens (every row generates `max_new_tokens`, as the Tunix peer counts them),
temperature 0.7 and top-p 0.9 by default (the peer's settings).

Roofline. A decode step must read every weight once (the tied embedding once, for the
unembedding) and the keys and values of every valid cache slot:

    step_bytes = weight_bytes + kv_bytes_per_slot * mean valid slots per row * rows

and cannot beat step_bytes / bandwidth, where the bandwidth is measured here (an
elementwise float32 op, read + write, like the peers' device_env.py). `roofline_new_tokens_per_s`
= rows / that time; `roofline_fraction` = measured / roofline. The measured figure includes
the prefill (which the roofline leaves out), so the fraction is a lower bound for the decode
loop. `kv_bytes_per_step_attended` is what this implementation reads, on average per step:
each of the `--decode_segments` decode loops runs on a cache of the slots written by its end (1:
the whole static cache, prompt bucket + max_new_tokens slots, every step); with
`--config_overrides '{"attention_impl": "flash"}'` the decode kernel reads key blocks only up
to each step's slot. `weight_bytes` are
those of the sampler's decode copy (`--decode_params`; bfloat16 weights by default whatever
`--param_dtype` the caller holds).

Both modes also read the compiled program's HLO (`eva_jax.hlo_traffic`) for the HBM bytes one
decode step moves (`hlo_decode_step_gb`, and its largest parts by op name), and report the
roofline fraction that allows at most (`hlo_roofline_fraction_bound`: the roofline's weight and
valid-cache bytes over the step's): a static figure, no device needed, so the compile-only
mode shows a copy or a relayout in the decode loop before a GPU or TPU session does. Kernels
are charged their whole operands (`hlo_decode_step_custom_call_gb` says how much of the step
that is), so the decode kernel's partial reads of the cache count as whole ones.

Token selection alone (`--top_p_bench`, or `--top_p_bench_only` to skip the model): compiles
and times one decode step's `sample_tokens_and_logprobs` (temperature, top-p, Gumbel-max,
the token's log-prob) on float32
[batch * num_samples, vocab] logits of a random-weight-like spread (near-flat: the nucleus is
most of the vocabulary, the worst case) for each of `--top_p_bench_methods` and, for the
threshold search, each of `--top_p_bench_bits`; reports compile_s, run_s (median) and whether
the compiled program holds a sort op, under the key `top_p_bench`.

    python benchmarks/sampler.py --config gemma2_2b --batch 256 --top_p_bench_only \
        --top_p_bench_methods threshold,sort --top_p_bench_bits 2,3,4

Compile only (`--aot_compile_only`): compiles the sampler's whole program (prefill + decode
loop, top-p on, no top-k) from abstract shapes, with no weights or KV cache allocated, for each
of `--top_p_bench_methods`; reports compile_s, the sort and while ops in the compiled
program and its decode step's bytes (e.g. the gemma2_2b program on a CPU-only machine, or
with `--aot_topology h200-1` / `v5p-8` for a GPU or a TPU chip):

    python benchmarks/sampler.py --config gemma2_2b --batch 256 --prompt_len 256 \
        --max_new_tokens 256 --aot_compile_only --top_p_bench_methods threshold,sort

Prints one JSON object; also writes it to $OUT/sampler_<config>.json when OUT is set
(sampler_top_p_<config>.json for --top_p_bench_only, sampler_aot_<config>.json for
--aot_compile_only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.json_report import emit  # noqa: E402
from eva_jax import aot, hlo_traffic, parallel  # noqa: E402
from eva_jax.models import Transformer, get_config  # noqa: E402
from eva_jax.models.config import LOCAL  # noqa: E402
from eva_jax.models.flash_attention import decode_block  # noqa: E402
from eva_jax.sampler import Sampler, sampling  # noqa: E402
from eva_jax.sampler.sampler import DECODE_PARAMS  # noqa: E402

# Seen on one H200 (2026-11-26), batch 256, prompt 256, 256 new tokens (shared/bench/README).
TUNIX_ANCHOR = {"new_tokens_per_s": 13_900, "first_call_s": 36.0, "device": "H200"}


def measure_bandwidth(num_bytes: int) -> float:
  """Bytes/s of a jitted elementwise op (read + write), best of 10.

  float32, not bf16: on a CPU bf16 arithmetic is emulated and the probe would time that.
  """
  x = jnp.ones((num_bytes // 4,), jnp.float32)
  f = jax.jit(lambda v: v * 2)
  f(x).block_until_ready()
  best = math.inf
  for _ in range(10):
    start = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * x.nbytes / best


_HLO_OP = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]\S*\s+([\w\-]+)\(")
_WHILE_BODY = re.compile(r"\bwhile\(.*\bbody=%?([\w.\-]+)")


def count_loop_relayouts(hlo_text: str, shape: tuple) -> int:
  """Ops in while-loop bodies shaped like `shape` (its dims in any order) that are copies or
  transposes, or fusions XLA named after them: each one reads and writes a whole cache array
  every step."""
  bodies = set(_WHILE_BODY.findall(hlo_text))
  want = sorted(shape)
  count, inside = 0, False
  for line in hlo_text.splitlines():
    if not line.startswith(" ") and line.rstrip().endswith("{"):
      inside = line.lstrip("%").split(" ", 1)[0] in bodies
      continue
    m = _HLO_OP.match(line) if inside else None
    if not m or not m.group(2) or sorted(int(d) for d in m.group(2).split(",")) != want:
      continue
    name, opcode = m.group(1), m.group(3)
    if opcode in ("copy", "transpose") or (opcode == "fusion" and
                                            ("copy" in name or "transpose" in name)):
      count += 1
  return count


def cache_relayouts(sampler, rows: int, length: int, cfg) -> int:
  """Cache relayouts inside the decode loop of the compiled programs (0 is the goal)."""
  shape = (rows, length, cfg.num_kv_heads, cfg.head_dim)
  return sum(count_loop_relayouts(p.as_text(), shape) for p in sampler._programs.values())


def decode_step_traffic(hlo_texts, ideal_bytes: float) -> dict:
  """HBM bytes one decode step of the compiled program moves, read from its HLO
  (`eva_jax.hlo_traffic`: the loop moving the most bytes an iteration, the decode loop), its
  largest parts, and the roofline fraction those bytes allow at most: the roofline's bytes
  (weights + the valid cache) over them. Kernels (custom calls) count their whole operands."""
  loops = [loop for text in hlo_texts for loop in hlo_traffic.loop_traffic(text, top=8)]
  if not loops:
    return {}
  loop = max(loops, key=lambda l: l.bytes_per_iteration)
  return dict(hlo_decode_step_gb=loop.bytes_per_iteration / 1e9,
              hlo_decode_step_custom_call_gb=loop.custom_call_bytes / 1e9,
              hlo_decode_step_top_gb=[[name, float(f"{b / 1e9:.4g}")]
                                      for name, b in loop.by_op_name],
              hlo_roofline_fraction_bound=ideal_bytes / loop.bytes_per_iteration)


_SORT_OP = re.compile(r"\ssort\(")


def top_p_bench(rows: int, vocab: int, methods, bits_list, top_p: float, temperature: float,
                top_k, iters: int) -> list:
  """compile_s / run_s of one step's token selection per top-p method (and bits)."""
  logits = jax.random.normal(jax.random.key(0), (rows, vocab), jnp.float32) * 0.5
  keys = jax.random.split(jax.random.key(1), rows)
  results = []
  for method in methods:
    for bits in (bits_list if method == "threshold" else [None]):
      def select(keys, logits, temperature, top_p, method=method, bits=bits):
        return sampling.sample_tokens_and_logprobs(
            keys, logits, greedy=False, temperature=temperature, top_k=top_k, top_p=top_p,
            use_top_p=True, top_p_method=method, bits=bits or sampling.THRESHOLD_BITS)
      start = time.perf_counter()
      compiled = jax.jit(select).lower(keys, logits, jnp.float32(temperature),
                                       jnp.float32(top_p)).compile()
      compile_s = time.perf_counter() - start
      args = (keys, logits, jnp.float32(temperature), jnp.float32(top_p))
      jax.block_until_ready(compiled(*args))
      times = []
      for _ in range(max(1, iters)):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
      results.append(dict(method=method, bits=bits, compile_s=compile_s,
                          run_s=statistics.median(times), run_s_all=times,
                          has_sort=bool(_SORT_OP.search(compiled.as_text()))))
      print(json.dumps(results[-1]), file=sys.stderr, flush=True)
  return results


def aot_compile(model, mesh, args, methods) -> list:
  """Compiles the sampler's program per top-p method from ShapeDtypeStructs (nothing
  allocated): the arguments `Sampler._run_chunk` passes, abstract."""
  cfg = model.config
  rows, p_len = args.batch * args.num_samples, args.prompt_len
  abstract = lambda tree, shardings: jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
  example = jnp.ones((1, 8), jnp.int32)
  _, shapes = parallel.params_logical_axes(model, example)
  params = abstract(shapes, parallel.params_shardings(model, mesh, None, example))
  out = []
  for method in methods:
    sampler = Sampler(model, mesh, max_prompt_length=p_len, prompt_length_buckets=[p_len],
                      max_batch_rows=rows, top_p_method=method,
                      decode_params=args.decode_params, decode_segments=args.decode_segments)
    decode_params = sampler.decode_layout(params)
    start = time.perf_counter()
    compiled = sampler.compile_abstract(
        decode_params, args.batch, p_len, num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens, top_k=args.top_k or None,
        use_top_p=args.top_p < 1)
    compile_s = time.perf_counter() - start
    hlo = compiled.as_text()
    weight_bytes = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                       for x in jax.tree_util.tree_leaves(decode_params))
    roof = roofline(cfg, weight_bytes, rows, p_len, args.max_new_tokens,
                    jnp.dtype(sampler.cache_dtype).itemsize, 1.0,
                    sampler.segment_ends(args.max_new_tokens))
    ideal = roof["weight_bytes"] + roof["kv_bytes_per_step_mean"]
    out.append(dict(method=method, compile_s=compile_s,
                    compiled_memory_gib=aot.memory_total_gib(compiled),
                    sort_ops=len(_SORT_OP.findall(hlo)),
                    while_ops=len(re.findall(r"\swhile\(", hlo)),
                    roofline_bytes_per_step_gb=ideal / 1e9,
                    **decode_step_traffic([hlo], ideal)))
    print(json.dumps(out[-1]), file=sys.stderr, flush=True)
  return out


def roofline(cfg, weight_bytes: int, rows: int, prompt_len: int, max_new: int,
             cache_bytes: int, bandwidth: float, segment_ends=None) -> dict:
  per_slot_layer = 2 * cfg.num_kv_heads * cfg.head_dim * cache_bytes  # k and v
  steps = max(1, max_new - 1)  # the first token comes from the prefill
  valid = []
  for t in range(1, max_new):  # decode step t attends to prompt_len + t slots
    slots = prompt_len + t
    valid.append(sum(min(slots, cfg.sliding_window) if kind == LOCAL else slots
                     for kind in cfg.attention_types))
  mean_slot_layers = sum(valid) / len(valid) if valid else 0.0
  kv_ideal = per_slot_layer * mean_slot_layers * rows
  # Step t of a decode segment ending at `end` runs on a cache of prompt_len + end slots, as
  # Sampler._generate grows it (the last segment: the whole cache).
  ends = tuple(segment_ends or (max_new,))
  widths = [prompt_len + next(e for e in ends if t < e) for t in range(1, max_new)]
  if cfg.attention_impl == "flash":
    # The decode kernel reads key blocks up to the one holding the step's slot (from the
    # window's first on local layers).
    read = []
    for t, width in zip(range(1, max_new), widths):
      block, slot = decode_block(width), prompt_len + t - 1
      hi = min((slot // block + 1) * block, width)
      read.append(sum(hi - (max(slot - cfg.sliding_window + 1, 0) // block * block
                            if kind == LOCAL else 0) for kind in cfg.attention_types))
    mean_slot_layers_read = sum(read) / len(read) if read else 0.0
  else:
    mean_width = sum(widths) / len(widths) if widths else prompt_len + max_new
    mean_slot_layers_read = cfg.num_layers * mean_width
  kv_attended = per_slot_layer * mean_slot_layers_read * rows
  step_s = (weight_bytes + kv_ideal) / bandwidth
  return dict(weight_bytes=weight_bytes, kv_bytes_per_step_mean=kv_ideal,
              kv_bytes_per_step_attended=kv_attended, decode_steps=steps,
              roofline_step_s=step_s, roofline_new_tokens_per_s=rows / step_s)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="tiny")
  ap.add_argument("--batch", type=int, default=8, help="prompts per call")
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--max_new_tokens", type=int, default=32)
  ap.add_argument("--num_samples", type=int, default=1)
  ap.add_argument("--temperature", type=float, default=0.7)
  ap.add_argument("--top_p", type=float, default=0.9)
  ap.add_argument("--top_k", type=int, default=0, help="0: no top-k filter")
  ap.add_argument("--top_p_method", default=sampling.DEFAULT_TOP_P_METHOD,
                  choices=sampling.TOP_P_METHODS)
  ap.add_argument("--dtype", default="bfloat16", help="activations and KV cache")
  ap.add_argument("--param_dtype", default=None,
                  help="params as the caller holds them (default: --dtype; the round loop's "
                       "train state holds float32)")
  ap.add_argument("--decode_params", default="gathered", choices=DECODE_PARAMS,
                  help="Sampler.decode_params: the copy of the params the decode loop reads")
  ap.add_argument("--decode_segments", type=int, default=1,
                  help="Sampler.decode_segments: 1 (default) attends over the whole cache "
                       "every step")
  ap.add_argument("--scan_layers", default=False, action=argparse.BooleanOptionalAction,
                  help="the caller's model scans its layers (as a scanned train state's); the "
                       "decode copy unrolls them unless --decode_params as_given")
  ap.add_argument("--config_overrides", default="{}",
                  help='JSON of GemmaConfig fields to replace, e.g. \'{"attention_types": '
                       '["local", "global"], "vocab_size": 32000}\' (a smaller model with a '
                       "named config's widths, for a CPU)")
  ap.add_argument("--iters", type=int, default=3, help="timed calls after the first")
  ap.add_argument("--tensor", type=int, default=1, help="tensor-parallel size of the mesh")
  ap.add_argument("--measure_prefill", action="store_true",
                  help="also time a max_new_tokens=1 call (compiles a second program) to "
                       "split prefill from decode")
  ap.add_argument("--bandwidth_gbps", type=float, default=0.0,
                  help="HBM bandwidth in GB/s (0: measure it)")
  ap.add_argument("--bandwidth_probe_mib", type=int, default=0,
                  help="bytes of the bandwidth probe (0: 2048 on accelerators, 256 on CPU)")
  ap.add_argument("--top_p_bench", action="store_true",
                  help="also time token selection alone per top-p method (key top_p_bench)")
  ap.add_argument("--top_p_bench_only", action="store_true",
                  help="only that: no model, no sampler")
  ap.add_argument("--top_p_bench_methods", default="threshold,sort",
                  help="comma-separated top-p methods to time (radix: slow to compile on GPU)")
  ap.add_argument("--aot_compile_only", action="store_true",
                  help="only compile the sampler's program per --top_p_bench_methods, from "
                       "abstract shapes (no weights or cache allocated)")
  ap.add_argument("--aot_topology", default=None,
                  help="with --aot_compile_only: compile for the first --tensor chips of this "
                       "TPU slice (v5p-8) or host's GPUs (h200-1; JAX's CUDA plugin, no GPU)")
  ap.add_argument("--top_p_bench_bits", default=str(sampling.THRESHOLD_BITS),
                  help="comma-separated bits per pass to time for the threshold method")
  args = ap.parse_args(argv)

  overrides = json.loads(args.config_overrides)
  cfg = get_config(args.config, dtype=args.dtype, param_dtype=args.param_dtype or args.dtype,
                   scan_layers=args.scan_layers, **overrides)
  rows = args.batch * args.num_samples
  methods = [m for m in args.top_p_bench_methods.split(",") if m]
  for m in methods:
    if m not in sampling.TOP_P_METHODS:
      ap.error(f"--top_p_bench_methods: {m!r} is not one of {sampling.TOP_P_METHODS}")
  if args.aot_topology and not args.aot_compile_only:
    ap.error("--aot_topology compiles for devices that are not here: add --aot_compile_only.")
  if args.aot_compile_only:
    model = Transformer(cfg)
    devices = jax.devices()
    if args.aot_topology:
      devices = aot.topology_devices(aot.parse_topology(args.aot_topology))[:args.tensor]
    mesh = parallel.create_mesh({"data": -1, "tensor": args.tensor}, devices=devices)
    result = dict(benchmark="sampler_aot", config=args.config,
                  device=devices[0].device_kind, num_devices=len(devices),
                  jax=jax.__version__, dtype=args.dtype, batch=args.batch,
                  num_samples=args.num_samples, prompt_len=args.prompt_len,
                  max_new_tokens=args.max_new_tokens, top_p=args.top_p,
                  top_k=args.top_k or None, decode_params=args.decode_params,
                  decode_segments=args.decode_segments,
                  compiled=aot_compile(model, mesh, args, methods))
    return emit(result, None, f"sampler_aot_{args.config}.json")
  bench = {}
  if args.top_p_bench or args.top_p_bench_only:
    bench = dict(top_p_bench=top_p_bench(
        rows, cfg.vocab_size, methods, [int(b) for b in args.top_p_bench_bits.split(",") if b],
        args.top_p, args.temperature or 1.0, args.top_k or None, max(1, args.iters)))
  if args.top_p_bench_only:
    result = dict(benchmark="sampler_top_p", config=args.config,
                  device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows,
                  vocab=cfg.vocab_size, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k or None, **bench)
    return emit(result, None, f"sampler_top_p_{args.config}.json")

  model = Transformer(cfg)
  mesh = parallel.create_mesh({"data": -1, "tensor": args.tensor})
  t0 = time.perf_counter()
  params = parallel.init_params(model, jax.random.key(0), mesh, None,
                                jnp.ones((1, 8), jnp.int32))
  jax.block_until_ready(params)
  init_s = time.perf_counter() - t0

  sampler = Sampler(model, mesh, max_prompt_length=args.prompt_len,
                    prompt_length_buckets=[args.prompt_len], max_batch_rows=rows,
                    top_p_method=args.top_p_method, decode_params=args.decode_params,
                    decode_segments=args.decode_segments)
  # What a decode step reads: the sampler's copy of the params (made once, as the loop does).
  params = sampler.prepare_params(params)
  jax.block_until_ready(params)
  weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
  rng = np.random.default_rng(0)
  prompts = [list(map(int, rng.integers(3, cfg.vocab_size - 1, args.prompt_len)))
             for _ in range(args.batch)]
  kw = dict(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None,
            stop_tokens=[])

  start = time.perf_counter()
  out = sampler.sample(params, prompts, seed=0, **kw)
  first_call_s = time.perf_counter() - start
  compile_s = sum(sampler.compile_seconds)
  runs = []
  for i in range(args.iters):
    start = time.perf_counter()
    out = sampler.sample(params, prompts, seed=i + 1, **kw)
    runs.append(time.perf_counter() - start)
  run_s = statistics.median(runs) if runs else first_call_s - compile_s
  generated = sum(s.length for per in out for s in per)
  decode_steps_run = sampler.last_stats[-1]["decode_steps"]

  prefill = {}
  if args.measure_prefill:
    one = dict(kw, max_new_tokens=1)
    sampler.sample(params, prompts, seed=0, **one)  # compile
    times = []
    for i in range(max(1, args.iters)):
      start = time.perf_counter()
      sampler.sample(params, prompts, seed=i + 1, **one)
      times.append(time.perf_counter() - start)
    prefill_s = statistics.median(times)
    prefill = dict(prefill_s=prefill_s,
                   decode_new_tokens_per_s=rows * decode_steps_run / max(run_s - prefill_s,
                                                                         1e-9))

  on_cpu = jax.devices()[0].platform == "cpu"
  if args.bandwidth_gbps:
    bandwidth = args.bandwidth_gbps * 1e9
  else:
    probe = args.bandwidth_probe_mib or (256 if on_cpu else 2048)
    bandwidth = measure_bandwidth(probe << 20)
  roof = roofline(cfg, weight_bytes, rows, args.prompt_len, args.max_new_tokens,
                  jnp.dtype(sampler.cache_dtype).itemsize, bandwidth,
                  sampler.segment_ends(args.max_new_tokens))
  tokens_per_s = generated / run_s
  stats = jax.devices()[0].memory_stats() or {}
  result = dict(
      benchmark="sampler", config=args.config, device=jax.devices()[0].device_kind,
      num_devices=len(jax.devices()), jax=jax.__version__, dtype=args.dtype,
      batch=args.batch, num_samples=args.num_samples, prompt_len=args.prompt_len,
      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
      top_k=args.top_k or None, top_p_method=args.top_p_method,
      param_dtype=args.param_dtype or args.dtype, decode_params=args.decode_params,
      scan_layers=args.scan_layers,
      decode_segments=args.decode_segments, config_overrides=overrides,
      segment_ends=sampler.segment_ends(args.max_new_tokens),
      params=cfg.num_params(), init_s=init_s,
      compile_s=compile_s, first_call_s=first_call_s, first_call_run_s=first_call_s - compile_s,
      run_s=run_s, run_s_all=runs, generated_tokens=generated,
      decode_steps_run=decode_steps_run, **prefill,
      new_tokens_per_s=tokens_per_s, measured_bandwidth_gbps=bandwidth / 1e9,
      **roof, roofline_fraction=tokens_per_s / roof["roofline_new_tokens_per_s"],
      peak_bytes_in_use=stats.get("peak_bytes_in_use"),
      num_compilations=sampler.num_compilations,
      cache_relayouts=cache_relayouts(sampler, rows, args.prompt_len + args.max_new_tokens, cfg),
      **decode_step_traffic([p.as_text() for p in sampler._programs.values()],
                            roof["weight_bytes"] + roof["kv_bytes_per_step_mean"]),
      tunix_anchor=TUNIX_ANCHOR, **bench,
      vs_tunix_anchor=(tokens_per_s / TUNIX_ANCHOR["new_tokens_per_s"]
                       if (args.config, args.batch, args.prompt_len, args.max_new_tokens,
                           args.num_samples) == ("gemma2_2b", 256, 256, 256, 1) else None))
  return emit(result, None, f"sampler_{args.config}.json")


if __name__ == "__main__":
  main()

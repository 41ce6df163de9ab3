#!/bin/bash
# eva_jax's GPU speed checks (issue 10's targets) beside the Tunix peers. A session has about
# 900 s of device time, machine start included, and one call may run 600 s: PART=1 (first
# call) holds the comparisons the targets are about, each against its peer in the same call
# (the default train step, mixed_precision.gin, Tunix's DPO step; the default sampler,
# Tunix's sampler); PART=2 (second call, with whatever time is
# left) the rest, most telling first. Prepare once, on the CPU machine, from the project root
# (.gpu is git-ignored; carry it with the run):
#   mkdir -p .gpu && cp -r ../shared/bench .gpu/bench && bash .gpu/bench/tunix_wheels.sh .gpu/whl
#   pip download --no-deps -d .gpu/whl gin-config==0.5.0
# Then, on the GPU machine: `PART=1 bash benchmarks/gpu_session.sh` (timeout_s 590) and
# `PART=2 DEADLINE_S=<seconds left> bash benchmarks/gpu_session.sh`. Every step has its own
# time limit, so that a slow compile costs that step only, and no step runs past DEADLINE_S
# (570 by default) from the script's start: it is cut to the time left, or skipped when under
# 20 s are left, so the call returns its results before the device limit. Results:
# $OUT/*.json and $OUT/log.txt; `benchmarks/gpu_report.py` reads them against the targets.
# MODEL=tiny with SMALL=1 runs the same steps on small shapes (a CPU smoke test; PYTHON=
# names the interpreter, python3 by default).
set -o pipefail
t0=$SECONDS  # the wheels' install counts against the deadline too
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
export OUT=${OUT:-/tmp/gpu_session}; mkdir -p "$OUT"
unset JAX_COMPILATION_CACHE_DIR  # compile times are compiles, not loads from a cache
PART=${PART:-1}
DEADLINE_S=${DEADLINE_S:-570}
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-gemma2_2b}
if [ -d .gpu/whl ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
log=$OUT/log.txt
step() { echo "=== $* (t=$((SECONDS-t0)) s)" | tee -a "$log"; }
keep() { grep -E '^\{|Error|error|Traceback' | tail -4 | tee -a "$log"; }
limit() {  # a step's own limit, cut to the time left before DEADLINE_S; 0: skip the step
  local left=$((DEADLINE_S - (SECONDS - t0)))
  if [ "$left" -lt 20 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
bounded() {  # seconds, command...: runs the command under its limit, or says it was skipped
  local s; s=$(limit "$1"); shift
  if [ "$s" -eq 0 ]; then echo "skipped: under 20 s left before DEADLINE_S=$DEADLINE_S" | tee -a "$log"; return 0; fi
  timeout "$s" "$@"
}
if [ -n "${SMALL:-}" ]; then
  TRAIN_SHAPES="--pairs 2 --prompt_len 16 --response_len 16 --steps 2 --warmup 1"
  SAMPLER_SHAPES="--batch 8 --prompt_len 32 --max_new_tokens 32 --iters 1"
  PEER_SHAPES=""
else
  TRAIN_SHAPES="--pairs 4 --prompt_len 512 --response_len 512"
  SAMPLER_SHAPES="--batch 256 --prompt_len 256 --max_new_tokens 256"
  PEER_SHAPES=1
fi
read -r -a train_shapes <<< "$TRAIN_SHAPES"
read -r -a sampler_shapes <<< "$SAMPLER_SHAPES"
train() {  # name, flags
  step "eva_jax train step: $1"
  local flags; read -r -a flags <<< "$2"
  bounded "${TRAIN_S:-100}" "$PYTHON" benchmarks/train_step.py --config "$MODEL" \
    "${train_shapes[@]}" "${flags[@]}" --out "$OUT/train_$1.json" 2>&1 | keep
}
sampler() {  # name, flags
  step "eva_jax sampler: $1"
  local flags; read -r -a flags <<< "$2"
  bounded "${SAMPLER_S:-110}" "$PYTHON" benchmarks/sampler.py --config "$MODEL" \
    "${sampler_shapes[@]}" "${flags[@]}" 2>&1 | keep
  [ -f "$OUT/sampler_$MODEL.json" ] && mv "$OUT/sampler_$MODEL.json" "$OUT/sampler_$1.json"
}
step device
[ -f .gpu/bench/device_env.py ] && python3 .gpu/bench/device_env.py 2>&1 | grep -v -i warning | tee -a "$log"
peer() {  # script of .gpu/bench, its arguments after the model: a Tunix peer, at full shapes
  if [ -n "$PEER_SHAPES" ] && [ -f ".gpu/bench/$1.py" ]; then
    step "$1"
    bounded "${PEER_S:-110}" python3 ".gpu/bench/$1.py" "$MODEL" "${@:2}" 2>&1 | keep
  fi
}
case "$PART" in
  1)
    # Train step: the default (scanned layers, full remat, float32 params and Adam, XLA
    # attention, only the responses unembedded, each pair one row, its prompt once) and
    # mixed_precision.gin (bfloat16 params with a float32 master copy, bfloat16 first moment,
    # remat "dots"; one row a pair: XLA counts 97.6 TFLOP a step against 121.7 as two rows),
    # then Tunix. Compiled for one H200 by XLA:GPU without a GPU (--aot_topology h200-1) the
    # two take 43.8 and 44.0 GiB with jax 0.10.2 (the GPU image's 0.11.2 gave the default
    # 41.9 before the unembedding's chunk VJP), Tunix's step 46.3; the first session's
    # unrolled default, 37.2 compiled, peaked at 40.5 GiB on an H200 and Tunix at 53.7. Sampler: the default (threshold top-p,
    # gathered bfloat16 params, one decode loop, XLA decode attention over the whole cache;
    # float32 params as the loop holds them), then Tunix's.
    train default ""
    train mixed_precision "--gin_file mixed_precision.gin"
    peer peer_tunix_dpo 4 512 512 12
    sampler default "--param_dtype float32"
    peer peer_tunix_generate 256 256 256 ;;
  2)
    # mixed_precision.gin with flash_attention.gin: the fused attention kernels, each pair one
    # packed row (43.7 GiB compiled; its four loops move 231.9 GB a step against 372.3 with
    # XLA's attention, by eva_jax/hlo_traffic.py): the shipped candidate that moves the
    # fewest bytes, first, as its Triton kernels have not run on a GPU yet; the decode kernel
    # that reads the cache only up to each step's slot; the default train step with each
    # pair as two rows, its prompt twice (as before share_prompt; 1.26x slower on a CPU at
    # gemma2_2b's widths); the fused attention kernels alone against XLA's at the train
    # step's shape (speed, and their agreement on the GPU); the default train step and
    # sampler without autotuning; the default with the kernel; the sort top-p the default
    # replaced and 4 decode segments (no faster on a CPU).
    train mixed_precision_flash "--gin_file mixed_precision.gin --gin_file flash_attention.gin"
    sampler flash_decode "--param_dtype float32 --config_overrides {\"attention_impl\":\"flash\"}"
    train default_two_rows "--no-share_prompt"
    step "attention: flash kernel against XLA"
    bounded "${ATTENTION_S:-60}" "$PYTHON" benchmarks/attention.py ${SMALL:+--batch 2 --length 64 \
      --head_dim 32 --iters 2} --out "$OUT/attention.json" 2>&1 | keep
    # XLA:GPU's autotuning off: compiled without a GPU by jax 0.11.2, its config assignment
    # took 12.8 of the train step's 13.8 s of HLO passes (compile 18.6 s -> 11.0 s; the
    # sampler 22.4 s -> 15.7 s). On the GPU it also times candidates: compile time against
    # step time.
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" train default_autotune0 ""
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" sampler default_autotune0 "--param_dtype float32"
    train default_flash "--attention_impl flash"
    sampler sort "--param_dtype float32 --top_p_method sort"
    sampler segments4 "--param_dtype float32 --decode_segments 4" ;;
  *) echo "PART must be 1 or 2, got $PART" >&2; exit 2 ;;
esac
# Against the targets (this part's figures only; here, `python benchmarks/gpu_report.py DIR1
# DIR2` reads both parts' folders as one).
step report
"$PYTHON" benchmarks/gpu_report.py "$OUT" 2>&1 | tee -a "$log"
step finished

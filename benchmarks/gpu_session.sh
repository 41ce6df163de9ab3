#!/bin/bash
# eva_jax's GPU speed checks (issue 10's targets) beside the Tunix peers, in two device calls
# that each fit the 600 s per-command limit (together about 900 s: a session's whole device
# time, so the most telling steps run first and each part's last step may be cut). Prepare once, on the CPU machine, from the
# project root (.gpu is git-ignored; carry it with the run):
#   mkdir -p .gpu && cp -r ../shared/bench .gpu/bench && bash .gpu/bench/tunix_wheels.sh .gpu/whl
#   pip download --no-deps -d .gpu/whl gin-config==0.5.0
# Then, on the GPU machine: `PART=train bash benchmarks/gpu_session.sh` and
# `PART=sampler bash benchmarks/gpu_session.sh`. Every step has its own time limit, so that a
# slow compile costs that step only. Results: $OUT/*.json and $OUT/log.txt.
# MODEL=tiny with SMALL=1 runs the same steps on small shapes (a CPU smoke test; PYTHON=
# names the interpreter, python3 by default).
set -o pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
export OUT=${OUT:-/tmp/gpu_session}; mkdir -p "$OUT"
PART=${PART:-train}
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-gemma2_2b}
if [ -d .gpu/whl ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
log=$OUT/log.txt
t0=$SECONDS
step() { echo "=== $* (t=$((SECONDS-t0)) s)" | tee -a "$log"; }
keep() { grep -E '^\{|Error|error|Traceback' | tail -4 | tee -a "$log"; }
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
  timeout "${TRAIN_S:-100}" "$PYTHON" benchmarks/train_step.py --config "$MODEL" \
    "${train_shapes[@]}" "${flags[@]}" --out "$OUT/train_$1.json" 2>&1 | keep
}
sampler() {  # name, flags
  step "eva_jax sampler: $1"
  local flags; read -r -a flags <<< "$2"
  timeout "${SAMPLER_S:-110}" "$PYTHON" benchmarks/sampler.py --config "$MODEL" \
    "${sampler_shapes[@]}" "${flags[@]}" 2>&1 | keep
  [ -f "$OUT/sampler_$MODEL.json" ] && mv "$OUT/sampler_$MODEL.json" "$OUT/sampler_$1.json"
}
step device
[ -f .gpu/bench/device_env.py ] && python3 .gpu/bench/device_env.py 2>&1 | grep -v -i warning | tee -a "$log"
case "$PART" in
  train)
    # The default (scanned layers, full remat, float32 params and Adam, XLA attention, only
    # the responses unembedded); mixed_precision.gin (bfloat16 params with a float32 master
    # copy, bfloat16 first moment, remat "dots") with the fused attention kernel and without
    # it; Tunix; last, the default with the kernel. Compiled for one H200 by XLA:GPU without a
    # GPU (--aot_topology h200-1) these take 47.0, 47.6, 47.4 and 46.9 GiB, Tunix's step 46.3;
    # the first session's unrolled default, 37.2 compiled, peaked at 40.5 GiB on an H200 and
    # Tunix at 53.7. Five steps of ~100 s: the whole part stays under the 600 s call limit.
    train default ""
    train mixed_precision_flash "--gin_file mixed_precision.gin --attention_impl flash"
    train mixed_precision "--gin_file mixed_precision.gin"
    if [ -n "$PEER_SHAPES" ] && [ -f .gpu/bench/peer_tunix_dpo.py ]; then
      step tunix dpo
      timeout "${PEER_S:-110}" python3 .gpu/bench/peer_tunix_dpo.py "$MODEL" 4 512 512 12 2>&1 | keep
    fi
    train default_flash "--attention_impl flash" ;;
  sampler)
    # The default (threshold top-p, gathered bfloat16 params, one decode loop, XLA decode
    # attention over the whole cache), the decode kernel that reads the cache only up to each
    # step's slot (attention_impl flash), Tunix, the attention kernels alone; then the sort
    # top-p the default replaced and 4 decode segments (no faster on a CPU), which the call's
    # 600 s may cut. float32 params as the loop holds them.
    sampler default "--param_dtype float32"
    sampler flash_decode "--param_dtype float32 --config_overrides {\"attention_impl\":\"flash\"}"
    if [ -n "$PEER_SHAPES" ] && [ -f .gpu/bench/peer_tunix_generate.py ]; then
      step tunix sampler
      timeout "${PEER_S:-110}" python3 .gpu/bench/peer_tunix_generate.py "$MODEL" 256 256 256 2>&1 | keep
    fi
    # The fused attention kernel alone against XLA's (speed, and its agreement on the GPU),
    # at the train step's shape.
    step "attention: flash kernel against XLA"
    timeout "${ATTENTION_S:-60}" "$PYTHON" benchmarks/attention.py ${SMALL:+--batch 2 --length 64 \
      --head_dim 32 --iters 2} --out "$OUT/attention.json" 2>&1 | keep
    sampler sort "--param_dtype float32 --top_p_method sort"
    sampler segments4 "--param_dtype float32 --decode_segments 4" ;;
  *) echo "PART must be train or sampler, got $PART" >&2; exit 2 ;;
esac
step finished

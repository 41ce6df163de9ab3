#!/usr/bin/env bash
# launch.sh: run eva_jax on every worker of a TPU slice at once, in the background.
#
# On every worker (--worker=all) starts, under nohup (so it outlives the ssh session),
#   ~/REMOTE_DIR/venv/bin/python -m eva_jax.main --gin_file=... --gin_bindings=... --workdir=...
# logging to ~/REMOTE_DIR/logs/eva_jax.log on each worker (follow it with logs.sh). On a TPU
# pod every worker runs the same command and the processes find each other by themselves.
# Launching again with the same --workdir RESUMES the run from its last saved phase (a
# finished run says so and exits); stop a running job first with stop.sh. The workdir must be
# gs:// when the slice has several workers (hosts): their local disks are separate. Example:
#
#   tpu_scripts/launch.sh --project=my-project --zone=us-east5-a \
#     --workdir=gs://my-bucket/runs/eva-9b --gin_file=eva_gemma.gin \
#     --gin_binding="SOLVER = 'gs://my-bucket/gemma-2-9b-it'"
set -euo pipefail
TPU_SCRIPTS_DIR=${BASH_SOURCE[0]%/*}
[ "$TPU_SCRIPTS_DIR" != "${BASH_SOURCE[0]}" ] || TPU_SCRIPTS_DIR=.
# shellcheck source=SCRIPTDIR/common.sh
source "$TPU_SCRIPTS_DIR/common.sh"
define_common_flags
define_worker_flags
define_launch_flags
parse_flags "$@"
do_launch

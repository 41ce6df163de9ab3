#!/usr/bin/env bash
# logs.sh: show and follow the log of the eva_jax job on a worker (worker 0 by default).
#
#   gcloud compute tpus tpu-vm ssh NAME --worker=0 --command='tail -n 100 -F REMOTE_DIR/logs/eva_jax.log'
#
# Ctrl-C stops following; the job goes on. Example:
#
#   tpu_scripts/logs.sh --project=my-project --zone=us-east5-a --worker=0
set -euo pipefail
TPU_SCRIPTS_DIR=${BASH_SOURCE[0]%/*}
[ "$TPU_SCRIPTS_DIR" != "${BASH_SOURCE[0]}" ] || TPU_SCRIPTS_DIR=.
# shellcheck source=SCRIPTDIR/common.sh
source "$TPU_SCRIPTS_DIR/common.sh"
define_common_flags
define_worker_flags
define_logs_flags
parse_flags "$@"
do_logs

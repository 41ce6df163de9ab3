#!/usr/bin/env bash
# stop.sh: stop the eva_jax job on every worker of a TPU slice, cleanly.
#
# Sends SIGTERM to the job on every worker: eva_jax saves its state in the workdir and exits 0;
# waits up to --stop_wait_s for that. launch.sh with the same workdir resumes it later, and
# resume.sh --watch does not relaunch a job stopped this way. Example:
#
#   tpu_scripts/stop.sh --project=my-project --zone=us-east5-a
set -euo pipefail
TPU_SCRIPTS_DIR=${BASH_SOURCE[0]%/*}
[ "$TPU_SCRIPTS_DIR" != "${BASH_SOURCE[0]}" ] || TPU_SCRIPTS_DIR=.
# shellcheck source=SCRIPTDIR/common.sh
source "$TPU_SCRIPTS_DIR/common.sh"
define_common_flags
define_worker_flags
define_stop_flags
parse_flags "$@"
do_stop

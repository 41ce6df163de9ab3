#!/usr/bin/env bash
# resume.sh: bring a preempted run back: recreate the slice, set it up, launch with the same workdir.
#
# A spot or queued slice that is preempted ends SUSPENDED (or FAILED, or gone); its workers and
# their disks are lost, but the run's state is in the gs:// workdir (eva_jax saves on SIGTERM
# and after every phase). resume.sh reads the queued resource's state; when it is FAILED,
# SUSPENDING, SUSPENDED or missing it deletes it, creates it again (create.sh's flags), sets
# the workers up (setup.sh's flags) and launches (launch.sh's flags, same --workdir): the run
# resumes from its last saved phase. An ACTIVE slice is left alone unless --force.
#
# With --watch it then keeps looking every --watch_s seconds and does the same after every
# preemption (and relaunches a job that died while the slice stayed up), until the job exits
# (status 0: done; otherwise it stops and says so), or --max_restarts. Run it under tmux or
# nohup on a machine that stays up. Give it the same flags as create, setup and launch (a
# --flagfile holding them all is easiest). Example:
#
#   tpu_scripts/resume.sh --flagfile=eva-9b.flags --watch
set -euo pipefail
TPU_SCRIPTS_DIR=${BASH_SOURCE[0]%/*}
[ "$TPU_SCRIPTS_DIR" != "${BASH_SOURCE[0]}" ] || TPU_SCRIPTS_DIR=.
# shellcheck source=SCRIPTDIR/common.sh
source "$TPU_SCRIPTS_DIR/common.sh"
define_common_flags
define_create_flags
define_worker_flags
define_setup_flags
define_launch_flags
define_resume_flags
parse_flags "$@"
do_resume

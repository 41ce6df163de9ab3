#!/usr/bin/env bash
# delete.sh: delete the queued resource and its TPU node(s), without asking.
#
#   gcloud compute tpus queued-resources delete NAME --project=P --zone=Z --force --quiet
#
# The workdir (gs://) is untouched: a new slice resumes from it. Example:
#
#   tpu_scripts/delete.sh --project=my-project --zone=us-east5-a
set -euo pipefail
TPU_SCRIPTS_DIR=${BASH_SOURCE[0]%/*}
[ "$TPU_SCRIPTS_DIR" != "${BASH_SOURCE[0]}" ] || TPU_SCRIPTS_DIR=.
# shellcheck source=SCRIPTDIR/common.sh
source "$TPU_SCRIPTS_DIR/common.sh"
define_common_flags
parse_flags "$@"
do_delete

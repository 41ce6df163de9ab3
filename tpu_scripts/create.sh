#!/usr/bin/env bash
# create.sh: create a Cloud TPU VM or pod slice as a queued resource, and wait until it is ACTIVE.
#
#   gcloud compute tpus queued-resources create NAME --node-id=NAME --project=P --zone=Z \
#     --accelerator-type=TYPE --runtime-version=VERSION [--spot]
#
# then polls `gcloud compute tpus queued-resources describe NAME ... --format='value(state.state)'`
# until the state is ACTIVE; fails on FAILED, SUSPENDING, SUSPENDED or DELETING, or after
# --timeout_s. Example:
#
#   tpu_scripts/create.sh --project=my-project --zone=us-east5-a --accelerator_type=v5p-64 --spot
set -euo pipefail
TPU_SCRIPTS_DIR=${BASH_SOURCE[0]%/*}
[ "$TPU_SCRIPTS_DIR" != "${BASH_SOURCE[0]}" ] || TPU_SCRIPTS_DIR=.
# shellcheck source=SCRIPTDIR/common.sh
source "$TPU_SCRIPTS_DIR/common.sh"
define_common_flags
define_create_flags
parse_flags "$@"
do_create

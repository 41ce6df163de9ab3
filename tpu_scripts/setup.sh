#!/usr/bin/env bash
# setup.sh: set up every worker of a TPU slice: a venv with jax[tpu] and eva_jax.
#
# On every worker at once (gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...):
# installs --python with apt-get when missing, makes ~/REMOTE_DIR/venv, and
# pip installs "jax[tpu]==JAX_VERSION" with eva_jax from git at --commit (git+REPO_URL@COMMIT)
# or from --wheel (gs://..., copied with gcloud storage cp). Running it again reinstalls
# eva_jax (another commit, say) in the same venv. Example:
#
#   tpu_scripts/setup.sh --project=my-project --zone=us-east5-a \
#     --repo_url=https://github.com/OWNER/eva_jax --commit=0123abcd
set -euo pipefail
TPU_SCRIPTS_DIR=${BASH_SOURCE[0]%/*}
[ "$TPU_SCRIPTS_DIR" != "${BASH_SOURCE[0]}" ] || TPU_SCRIPTS_DIR=.
# shellcheck source=SCRIPTDIR/common.sh
source "$TPU_SCRIPTS_DIR/common.sh"
define_common_flags
define_worker_flags
define_setup_flags
parse_flags "$@"
do_setup

#!/usr/bin/env bash
# CI for the `seqio` extra: the seqio Task / Mixture and TFDS prompt sources
# (eva_jax/data/seqio_tfds.py) against real seqio, TensorFlow and TFDS, in their own virtual
# environment, so that the main suite (`python -m pytest -q`, tests/) stays TensorFlow-free.
# About 1.5 minutes to install and 1.5 minutes of tests on 2 cores. Called by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

# constraints/seqio.txt pins for Python 3.11 (as .ci/run's python3).
PY=python3.11
if ! "$PY" --version >/dev/null 2>&1; then
  PY=python3
fi
"$PY" -m venv .venv-ci-seqio
. .venv-ci-seqio/bin/activate
pip install -q --upgrade pip
pip install -q -c constraints/seqio.txt -e ".[seqio]" pytest

set +e
python -m pytest -q tests_seqio
rc=$?
set -e
deactivate
if [ "$rc" -eq 5 ]; then
  echo "CI: pytest collected no tests in tests_seqio" >&2
  exit 1
fi
exit "$rc"

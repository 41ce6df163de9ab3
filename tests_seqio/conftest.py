"""Setup for the seqio / TFDS prompt-source tests (run in an environment with the `seqio` extra:
`python -m pytest -q tests_seqio`; see .ci/seqio_env.sh). Before anything imports jax or
TensorFlow: JAX on the CPU, TensorFlow quiet and off any accelerator, no progress bars."""

import os
import sys

import pytest

# The tests import helpers as tests_seqio.* (and name them in seqio_prompts.modules): the repo
# root must be importable, also under a bare `pytest` (which, unlike `python -m pytest`, does
# not put the working directory on sys.path).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("EVA_JAX_NO_PROGRESS", "1")


@pytest.fixture(autouse=True)
def _clear_gin():
  """Every test starts and ends with no gin bindings."""
  import gin  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  yield
  gin.clear_config()

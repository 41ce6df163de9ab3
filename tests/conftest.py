"""Test-wide setup, before anything imports jax: 8 CPU devices (for sharded tests), and JAX's
persistent compilation cache, which tests and the processes they start share (many tests
build the same small programs again, e.g. every resumed run of the round loop)."""

import getpass
import importlib.util
import os
import pathlib
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
# gcsfs reads this when it is first imported (which any test touching etils.epath may do), so
# the gs:// tests' fixture would set it too late: the emulator does not speak the
# hierarchical-namespace API that gcsfs otherwise probes.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"eva_jax_test_cache_{getpass.getuser()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("EVA_JAX_NO_PROGRESS", "1")


@pytest.fixture
def benchmark_script():
  """Loads a script of benchmarks/ (not a package) as a module: benchmark_script("attention")."""
  folder = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"

  def load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  return load


@pytest.fixture
def gcs_bucket():
  """A fresh, empty bucket on a local GCS emulator (fake-gcs-server on 127.0.0.1); yields its
  "gs://..." URL. gcsfs / etils.epath, google-cloud-storage and tensorstore (Orbax) all talk to
  it, in this process and in subprocesses started meanwhile (see eva_jax.testing.gcs)."""
  from eva_jax.testing.gcs import gcs_emulator  # pylint: disable=g-import-not-at-top
  with gcs_emulator() as bucket:
    yield bucket


@pytest.fixture(autouse=True)
def _clear_gin():
  """Every test starts and ends with no gin bindings: a run's bindings (e.g. a model override)
  must not leak into the configurables the next test calls."""
  import gin  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  yield
  gin.clear_config()


# Slow end-to-end tests: CI runs them in the main pass (Python 3.11) and leaves them out of the
# Python 3.12 pass (-m "not end_to_end"), which checks the library against jax 0.12 with
# everything else; what they exercise beyond it (subprocess launches, notebooks, bash,
# libtpu's compiler) does not change with the interpreter.
_END_TO_END = ("tests/loop/test_resume.py", "tests/loop/test_multiprocess.py", "tests/colabs/",
               "tests/tpu_scripts/", "tests/test_aot.py")


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    path = str(item.path).replace(os.sep, "/")
    if any(part in path for part in _END_TO_END):
      item.add_marker(pytest.mark.end_to_end)

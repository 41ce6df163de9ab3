"""A real preemption: `python -m eva_jax.main` killed (SIGKILL) or stopped (SIGTERM) inside a
phase, then started again, ends exactly like an uninterrupted run; also with the workdir on a
GCS emulator."""

import importlib.util
import os
import signal

import pytest

_spec = importlib.util.spec_from_file_location(
    "loop_helpers", os.path.join(os.path.dirname(__file__), "helpers.py"))
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)


@pytest.mark.parametrize("phase", ["evolve", "train_step"])
def test_sigkill_inside_a_phase_then_resume(reference_run, tmp_path, phase):
  killed = H.run_subprocess(tmp_path, fault=f"1:{phase}:kill")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  resumed = H.run_subprocess(tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming" in resumed.stdout
  H.assert_same_run(tmp_path, reference_run)


def test_sigterm_saves_exits_0_and_resumes(reference_run, tmp_path):
  stopped = H.run_subprocess(tmp_path, fault="1:train_step:term")
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  assert "stopped on request (SIGTERM) in round 1" in stopped.stdout
  assert "Run the same command again to resume" in stopped.stdout
  resumed = H.run_subprocess(tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming" in resumed.stdout and "(train step 1)" in resumed.stdout
  H.assert_same_run(tmp_path, reference_run)


def test_gs_workdir_killed_and_resumed(reference_run, gcs_bucket):
  """Also the compilation cache's default place, WORKDIR/jax_cache, on gs://: the killed
  process writes it, the resumed one loads programs from it (and still ends as the
  uninterrupted run)."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  workdir = f"{gcs_bucket}/run"
  cache_in_workdir = {"JAX_COMPILATION_CACHE_DIR": ""}  # not the tests' shared local cache
  killed = H.run_subprocess(workdir, fault="1:reference:kill", extra_env=cache_in_workdir)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert list(epath.Path(f"{workdir}/jax_cache").iterdir())
  resumed = H.run_subprocess(workdir, extra_env={**cache_in_workdir, "JAX_LOG_COMPILES": "1"})
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Persistent compilation cache hit" in resumed.stderr
  H.assert_same_run(workdir, reference_run)

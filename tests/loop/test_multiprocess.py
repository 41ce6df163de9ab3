"""Two JAX processes (2 CPU devices each) run the same rounds as one process with 4 devices:
the same params, bit for bit, and the same metric lines; killed together with the workdir on
GCS, they resume to the same end."""

import importlib.util
import os
import signal

import pytest

from eva_jax.testing.multiprocess import run_in_processes

_spec = importlib.util.spec_from_file_location(
    "loop_helpers", os.path.join(os.path.dirname(__file__), "helpers.py"))
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)



@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """The 2-round smoke run by two processes of 2 CPU devices each, launched with the CLI's
  coordinator flags (as on a GPU cluster), uninterrupted."""
  workdir = tmp_path_factory.mktemp("two_processes")
  procs = H.run_cli_processes(workdir)
  assert [p.returncode for p in procs] == [0, 0], procs[0].stdout[-3000:]
  return workdir


@pytest.mark.multiprocess
def test_two_processes_run_the_rounds_of_one_process(two_process_run, tmp_path):
  one = run_in_processes("tests.loop.mp_targets:run_rounds", num_processes=1,
                         devices_per_process=4, kwargs={"workdir": str(tmp_path / "one"),
                                                        "bindings": []})
  assert one[0]["status"] == 0 and one[0]["devices"] == 4
  H.assert_same_run(two_process_run, tmp_path / "one")
  # Only process 0 wrote the metrics and the rounds' prompt files.
  assert len(H.comparable_metrics(two_process_run)) > 10
  assert (two_process_run / "prompts" / "round_2.jsonl").exists()


@pytest.mark.multiprocess
def test_two_processes_killed_on_gcs_resume_to_the_uninterrupted_params(two_process_run,
                                                                        gcs_bucket):
  """A pod's preemption: both processes of a 2-round run with its workdir on the GCS emulator
  are killed (SIGKILL) in round 1's training; the same launch again resumes and ends with the
  params and metrics of the uninterrupted 2-process run."""
  workdir = f"{gcs_bucket}/pod-run"
  killed = H.run_cli_processes(workdir, fault="1:train_step:kill")
  assert [p.returncode for p in killed] == [-signal.SIGKILL] * 2, killed[0].stdout[-3000:]
  resumed = H.run_cli_processes(workdir)
  assert [p.returncode for p in resumed] == [0, 0], resumed[1].stdout[-3000:]
  assert "resuming" in resumed[0].stdout
  H.assert_same_run(workdir, two_process_run)

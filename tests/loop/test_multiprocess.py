"""Two JAX processes (2 CPU devices each) run the same rounds as one process with 4 devices:
the same params, bit for bit, and the same metric lines."""

import importlib.util
import os

import pytest

from eva_jax.testing.multiprocess import run_in_processes

_spec = importlib.util.spec_from_file_location(
    "loop_helpers", os.path.join(os.path.dirname(__file__), "helpers.py"))
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

ONE_ROUND = ["EvaConfig.num_rounds = 1"]


@pytest.mark.multiprocess
def test_two_processes_run_the_round_of_one_process(tmp_path):
  two = run_in_processes("tests.loop.mp_targets:run_rounds", num_processes=2,
                         devices_per_process=2,
                         kwargs={"workdir": str(tmp_path / "two"), "bindings": ONE_ROUND})
  assert [r["status"] for r in two] == [0, 0]
  assert [r["process_count"] for r in two] == [2, 2] and two[0]["devices"] == 4
  one = run_in_processes("tests.loop.mp_targets:run_rounds", num_processes=1,
                         devices_per_process=4,
                         kwargs={"workdir": str(tmp_path / "one"), "bindings": ONE_ROUND})
  assert one[0]["status"] == 0 and one[0]["devices"] == 4
  H.assert_same_run(tmp_path / "two", tmp_path / "one")
  # Only process 0 wrote the metrics and the round's prompt file.
  assert len(H.comparable_metrics(tmp_path / "two")) > 10
  assert (tmp_path / "two" / "prompts" / "round_1.jsonl").exists()

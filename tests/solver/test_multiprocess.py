"""Two JAX processes (2 CPU devices each) train exactly like one process with 4 devices."""

import jax
import numpy as np
import pytest

from eva_jax.testing.multiprocess import run_in_processes

TARGET = "tests.solver.mp_targets:train_steps"


@pytest.mark.multiprocess
def test_two_processes_match_one_process():
  kwargs = {"mesh_shape": {"fsdp": 2, "data": 2}, "steps": 2, "num_microbatches": 2}
  (one,) = run_in_processes(TARGET, num_processes=1, devices_per_process=4, kwargs=kwargs)
  two = run_in_processes(TARGET, num_processes=2, devices_per_process=2, kwargs=kwargs)
  assert one["process_count"] == 1 and [r["process_count"] for r in two] == [2, 2]
  assert one["devices"] == 4 and two[0]["devices"] == 4
  # Both processes of the 2-process run hold the same global results.
  for a, b in zip(jax.tree_util.tree_leaves(two[0]), jax.tree_util.tree_leaves(two[1])):
    np.testing.assert_array_equal(a, b)
  # Same mesh shape, same programs: the 2-process run equals the 1-process run.
  for side in ("ref_chosen_logps", "ref_rejected_logps"):
    np.testing.assert_allclose(two[0]["ref"][side], one["ref"][side], rtol=1e-6, atol=1e-5)
  for m2, m1 in zip(two[0]["metrics"], one["metrics"]):
    for k in m1:
      if k != "rewards/accuracies":  # step 0 rewards are 0 +- rounding
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=1e-5, err_msg=k)
  for a, b in zip(jax.tree_util.tree_leaves(two[0]["params"]),
                  jax.tree_util.tree_leaves(one["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert two[0]["metrics"][1]["loss"] < two[0]["metrics"][0]["loss"]

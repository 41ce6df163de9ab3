"""Two JAX processes (2 CPU devices each) sample exactly what one process does."""

import importlib.util
import os

import numpy as np
import pytest

from eva_jax.testing.multiprocess import run_in_processes

_spec = importlib.util.spec_from_file_location(
    "sampler_tests_mp_targets", os.path.join(os.path.dirname(__file__), "mp_targets.py"))
mp_targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mp_targets)

LENGTHS = [5, 9, 2, 14, 7]  # 5 prompts: dummy rows pad the batch to the 4 data shards
CALLS = [dict(temperature=0.0, num_samples=2, max_new_tokens=12, stop_tokens=[7, 9]),
         dict(temperature=0.9, top_p=0.9, top_k=50, seed=3, num_samples=2,
              max_new_tokens=12, stop_tokens=[7, 9])]


@pytest.mark.multiprocess
def test_two_processes_equal_one_process():
  kwargs = dict(config_name="tiny", lengths=LENGTHS, calls=CALLS,
                mesh_shape={"data": 2, "tensor": 2})
  results = run_in_processes("tests.sampler.mp_targets:sample_in_process", num_processes=2,
                             devices_per_process=2, kwargs=kwargs)
  single = mp_targets.sample_in_process("tiny", LENGTHS, CALLS, mesh_shape=None,
                                        sampler_kwargs=None, num_devices=1)
  assert [r["process_count"] for r in results] == [2, 2]
  assert results[0]["devices"] == 4 and single["devices"] == 1
  for r in results:
    for got_call, want_call in zip(r["results"], single["results"], strict=True):
      for got, want in zip(got_call, want_call, strict=True):
        for (gt, glp, gf), (wt, wlp, wf) in zip(got, want, strict=True):
          assert gt == wt and gf == wf
          np.testing.assert_allclose(glp, wlp, atol=1e-5)
  # Both processes return every sample (not just their own rows).
  assert len(results[1]["results"][0]) == len(LENGTHS)

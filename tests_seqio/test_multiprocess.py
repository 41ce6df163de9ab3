"""Two JAX processes get the same prompts: process 0 reads, the others receive them (and never
import TensorFlow); an error on process 0 is raised on both."""

import pytest

from eva_jax.testing.multiprocess import run_in_processes
from tests_seqio.tiny_builder import EvaTinyPrompts


@pytest.mark.multiprocess
def test_two_processes_read_the_same_prompts(tmp_path):
  data_dir = str(tmp_path / "tfds")
  EvaTinyPrompts(data_dir=data_dir).download_and_prepare()
  results = run_in_processes("tests_seqio.mp_targets:read_sources", num_processes=2,
                             kwargs={"tfds_data_dir": data_dir}, timeout=300)
  first, second = results
  assert [r["index"] for r in results] == [0, 1]
  assert first["seqio"] == second["seqio"] and first["tfds"] == second["tfds"]
  assert [t for t, _ in first["seqio"][1]] == ["Explain recursion briefly.",
                                                 "What is the capital of Peru?"]
  assert len(first["seqio"][0]) == 5 and len(first["tfds"][0]) == 3
  # (gin appends the configurable's address, which differs between processes.)
  assert first["error"].splitlines()[0] == second["error"].splitlines()[0]
  assert "no seqio Task or Mixture named 'eva_no_such_task'" in second["error"]
  assert first["tensorflow"] and not second["tensorflow"]

"""Mesh construction, shape-aware shardings, and the multi-process harness."""

import tempfile

import jax
import numpy as np
import pytest

from eva_jax import parallel
from eva_jax.testing.multiprocess import run_in_processes


def test_create_mesh_fills_minus_one_and_rejects_bad_shapes():
  mesh = parallel.create_mesh({"data": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  with pytest.raises(ValueError, match="needs 6 devices"):
    parallel.create_mesh({"data": 3, "tensor": 2})
  with pytest.raises(ValueError, match="unknown mesh axes"):
    parallel.create_mesh({"model": 2})
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    parallel.create_mesh({"data": -1, "fsdp": -1})


def test_logical_to_spec_uses_each_mesh_axis_once_and_respects_divisibility():
  mesh = parallel.create_mesh({"fsdp": 2, "tensor": 4})
  rules = parallel.logical_axis_rules()
  # Activations: batch takes fsdp, so embed falls through to replicated.
  assert parallel.logical_to_spec(("batch", "length", "embed"), mesh, rules) == \
      jax.sharding.PartitionSpec("fsdp", None, None)
  # Weights: embed -> fsdp, vocab -> tensor.
  assert parallel.logical_to_spec(("vocab", "embed"), mesh, rules, (384, 64)) == \
      jax.sharding.PartitionSpec("tensor", "fsdp")
  # One kv head cannot be split four ways: replicated instead of a compile error.
  assert parallel.logical_to_spec(("kv_heads", "embed"), mesh, rules, (1, 64)) == \
      jax.sharding.PartitionSpec(None, "fsdp")


def test_replicated_over_batch_keeps_only_non_batch_splits():
  mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = parallel.replicated_over_batch(
      (("length", ("data", "tensor")),) + parallel.logical_axis_rules())
  spec = lambda axes: parallel.logical_to_spec(axes, mesh, rules, (8,) * len(axes))
  assert spec(("vocab", "embed")) == jax.sharding.PartitionSpec("tensor", None)
  assert spec(("heads", "embed", "head_dim")) == jax.sharding.PartitionSpec("tensor", None,
                                                                            None)
  assert spec(("batch", "length")) == jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")
  assert dict(rules)["mlp"] == "tensor" and dict(rules)["embed"] is None


def _process_info(n):
  x = np.arange(n * jax.process_count(), dtype=np.float32).reshape(-1, 1)
  mesh = parallel.create_mesh()
  local = x[parallel.process_slice(x.shape[0])]
  g = parallel.host_to_global(local, mesh)
  return {"index": jax.process_index(), "count": jax.process_count(),
          "sum": float(jax.jit(lambda a: a.sum())(g)), "gathered": parallel.global_to_host(g)}


@pytest.mark.multiprocess
def test_two_processes_build_one_global_batch(tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  results = run_in_processes("tests.test_parallel:_process_info", num_processes=2,
                             devices_per_process=2, kwargs={"n": 4})
  assert not list(tmp_path.iterdir())  # the harness's logs and results went with the call
  assert [r["index"] for r in results] == [0, 1]
  assert all(r["count"] == 2 for r in results)
  for r in results:
    assert r["sum"] == float(np.arange(8).sum())
    np.testing.assert_array_equal(r["gathered"][:, 0], np.arange(8))


@pytest.mark.multiprocess
def test_a_failing_process_is_reported_with_its_output_and_leaves_nothing(tmp_path,
                                                                          monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  with pytest.raises(RuntimeError, match=r"(?s)process 0 \(exit 1\).*no_such_function"):
    run_in_processes("tests.test_parallel:no_such_function", num_processes=2)
  assert not list(tmp_path.iterdir())


def test_mesh_platform_is_its_devices_platform():
  assert parallel.mesh_platform(parallel.create_mesh()) == "cpu"

"""`from_pretrained` places params straight into mesh shardings: same values and logits as on
one device, on several mesh shapes and across two processes. No PyTorch needed: checkpoints
are written by `save_hf` / `save_official` from random params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_jax import parallel
from eva_jax.models import from_pretrained, save_hf
from eva_jax.models.hf_checkpoint import SafetensorsCheckpoint, Stacked
from eva_jax.models.official_checkpoint import save_official
from eva_jax.testing.multiprocess import run_in_processes
from tests.models import checkpoint_helpers as H

MESH_SHAPES = [{"fsdp": 2, "tensor": 4}, {"data": 2, "fsdp": 2, "tensor": 2}]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """An HF Gemma 2 checkpoint and an official FLAT multi-head one (fused qkv, transposed gate,
  padded embedding), with the params they were written from."""
  root = tmp_path_factory.mktemp("ckpts")
  cfg = H.eva_config("gemma2")
  params = H.random_params(cfg, seed=3)
  save_hf(root / "hf", cfg, params, max_shard_bytes=100_000)
  mha = H.eva_config("gemma_mha")
  mha_params = H.random_params(mha, seed=4)
  save_official(root / "official", mha_params, mha, transposed_gating=True,
                vocab_rows=H.VOCAB + 8)
  return {"hf": (root / "hf", None, params), "official": (root / "official", mha, mha_params),
          "root": root}


def _logits(model, params, ids, mesh):
  with parallel.with_mesh_rules(mesh):
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))


@pytest.mark.parametrize("fmt", ["hf", "official"])
@pytest.mark.parametrize("mesh_shape", MESH_SHAPES, ids=["fsdp2_tensor4", "data2_fsdp2_tensor2"])
def test_sharded_params_give_the_same_logits_as_one_device(checkpoints, fmt, mesh_shape):
  path, config, original = checkpoints[fmt]
  ids = H.token_ids(4, 13, seed=7)
  one = parallel.create_mesh(devices=jax.devices()[:1])
  model1, params1 = from_pretrained(path, config=config, mesh=one)
  ref = _logits(model1, params1, ids, one)

  mesh = parallel.create_mesh(mesh_shape)
  model, params = from_pretrained(path, config=config, mesh=mesh)
  expected = parallel.params_shardings(model, mesh, None, jnp.ones((1, 1), jnp.int32))
  for x, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
    assert x.sharding.is_equivalent_to(s, x.ndim)
  # Really split: each device holds a quarter of the queries' heads (tensor=4) or half of
  # them and half of the model width (tensor=2 x fsdp=2).
  q = params["layer_0"]["attn"]["q_einsum"]
  shard = q.addressable_shards[0].data.shape
  assert np.prod(shard) * (8 // mesh_shape.get("data", 1)) == np.prod(q.shape)
  H.assert_trees_equal(original, parallel.global_to_host(params))
  np.testing.assert_allclose(_logits(model, params, ids, mesh), ref, rtol=2e-5, atol=2e-5)


def test_lazy_views_read_the_requested_slices(checkpoints):
  """Each device's shard comes from indexing a view of the memory map; indexing agrees with
  the full array for the stacked and transposed params."""
  path, _, original = checkpoints["hf"]
  from eva_jax.models.hf_checkpoint import hf_leaves  # pylint: disable=g-import-not-at-top
  leaves, dtype = hf_leaves(SafetensorsCheckpoint(path), H.eva_config("gemma2"), False)
  assert dtype == np.float32
  for p in [("layer_1", "attn", "kv_einsum"), ("layer_1", "mlp", "gating_einsum"),
            ("layer_2", "attn", "attn_vec_einsum"), ("embedder", "input_embedding")]:
    full = original
    for k in p:
      full = full[k]
    leaf = leaves[p]
    index = (slice(1, 2),) + tuple(slice(0, n // 2) for n in leaf.shape[1:])
    np.testing.assert_array_equal(leaf[index], full[index])
    np.testing.assert_array_equal(np.asarray(leaf), full)
  stacked = Stacked([np.arange(6).reshape(2, 3), np.arange(6, 12).reshape(2, 3)])
  np.testing.assert_array_equal(stacked[(1, slice(None), slice(1, 3))], [[7, 8], [10, 11]])


def _load_and_forward(hf_path, official_path, official_config, ids, export_path):
  """Runs in each of 2 processes x 2 devices: load both formats on a fsdp=2 x tensor=2 mesh,
  forward a batch split across the processes, export the HF checkpoint again."""
  mesh = parallel.create_mesh({"fsdp": 2, "tensor": 2})
  rows = parallel.process_slice(ids.shape[0])
  out = {"devices": jax.device_count(), "local": jax.local_device_count()}
  for name, path, config in (("hf", hf_path, None), ("official", official_path, official_config)):
    model, params = from_pretrained(path, config=config, mesh=mesh)
    batch = parallel.host_to_global(ids[rows], mesh)
    with parallel.with_mesh_rules(mesh):
      logits = jax.jit(model.apply)({"params": params}, batch)
    out[name] = parallel.global_to_host(logits)
    if name == "hf":
      save_hf(export_path, model, params, max_shard_bytes=100_000)
  return out


@pytest.mark.multiprocess
def test_two_processes_load_and_forward_like_one(checkpoints, tmp_path):
  hf_path, _, original = checkpoints["hf"]
  official_path, mha, _ = checkpoints["official"]
  ids = H.token_ids(4, 11, seed=8)
  results = run_in_processes(
      "tests.models.test_sharded_loading:_load_and_forward", num_processes=2,
      devices_per_process=2,
      kwargs=dict(hf_path=str(hf_path), official_path=str(official_path), official_config=mha,
                  ids=ids, export_path=str(tmp_path / "export")))
  assert [(r["devices"], r["local"]) for r in results] == [(4, 2), (4, 2)]
  for name, path, config in (("hf", hf_path, None), ("official", official_path, mha)):
    model, params = from_pretrained(path, config=config)
    ref = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))
    for r in results:
      np.testing.assert_allclose(r[name], ref, rtol=2e-5, atol=2e-5)
  # The export written by process 0 from params gathered across both processes is identical.
  a, b = SafetensorsCheckpoint(hf_path), SafetensorsCheckpoint(tmp_path / "export")
  assert sorted(a.names) == sorted(b.names)
  for n in a.names:
    np.testing.assert_array_equal(a.get(n), b.get(n))

"""RunCheckpointer: a train state saved on 8 devices with fsdp restores on 4 with data
parallelism; round states round-trip (empty arrays too); `latest` skips a round state whose
train checkpoint never finished."""

import shutil

import jax
import numpy as np
import pytest

from eva_jax import checkpointing, models, parallel, solver


def _state(mesh):
  cfg = models.get_config("tiny", attention_types=("local", "global"))
  policy = solver.make_policy_model(cfg, remat="none", compute_dtype="float32")
  opt = solver.make_optimizer(learning_rate=solver.learning_rate_schedule(total_steps=4))
  return policy, opt, solver.create_train_state(policy, opt, jax.random.key(3), mesh)


def test_train_state_restores_onto_another_mesh(tmp_path):
  fsdp8 = parallel.create_mesh({"fsdp": -1})
  policy, opt, state = _state(fsdp8)
  # The policy scans its layers (the default): its params are stacked over the layer pairs.
  q = state.params["layers"]["block_0"]["attn"]["q_einsum"]
  assert "fsdp" in str(q.sharding.spec)
  ckpt = checkpointing.RunCheckpointer(tmp_path, async_train=True)
  ckpt.save_train(7, state)
  ckpt.wait()

  data4 = parallel.create_mesh({"data": -1}, devices=jax.devices()[:4])
  shardings, abstract = solver.train_state_shardings(policy, opt, data4)
  restored = ckpt.restore_train(7, checkpointing.abstract_with_shardings(abstract, shardings))
  ckpt.close()
  r = restored.params["layers"]["block_0"]["attn"]["q_einsum"]
  assert r.sharding.mesh.devices.size == 4 and r.sharding.spec == shardings.params[
      "layers"]["block_0"]["attn"]["q_einsum"].spec
  for a, b in zip(jax.tree_util.tree_leaves(parallel.global_to_host(state)),
                  jax.tree_util.tree_leaves(parallel.global_to_host(restored))):
    assert np.array_equal(a, b)


def test_round_states_and_the_walk_back_to_a_usable_one(tmp_path):
  _, _, state = _state(parallel.create_mesh())
  ckpt = checkpointing.RunCheckpointer(tmp_path)
  arrays = {"a": np.arange(4, dtype=np.int32), "empty": np.zeros((0, 3), np.float32)}
  ckpt.save_train(0, state)
  ckpt.save_round(1, {"train_step": 0, "note": "first"}, arrays)
  ckpt.save_train(5, state)
  ckpt.save_round(2, {"train_step": 5, "note": "second"}, {})
  ckpt.wait()
  index, meta, got = ckpt.latest()
  assert (index, meta["note"]) == (2, "second") and got == {}
  ckpt.close()

  # The newest train checkpoint is gone (as if its asynchronous write had been cut short):
  # the newest round state that can be used is the one before.
  shutil.rmtree(tmp_path / "checkpoints" / "train" / "5")
  ckpt = checkpointing.RunCheckpointer(tmp_path)
  index, meta, got = ckpt.latest()
  ckpt.close()
  assert (index, meta["note"]) == (1, "first")
  assert got["a"].tolist() == [0, 1, 2, 3] and got["empty"].shape == (0, 3)
  assert got["empty"].dtype == np.float32
  assert checkpointing.read_train_params(tmp_path)[0] == 0

  with pytest.raises(ValueError, match="max_to_keep=1 must be >= 2"):
    checkpointing.RunCheckpointer(tmp_path / "x", max_to_keep=1)
  with pytest.raises(FileNotFoundError, match="holds no usable eva_jax checkpoint"):
    checkpointing.read_train_params(tmp_path / "nothing")

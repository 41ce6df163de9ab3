"""bfloat16 params with a float32 master copy in the optimizer (`make_optimizer(master_dtype=
"float32")`): the eva recipe's small updates, which bfloat16 params round away, add up in the
copy; the params are the copy cast back; training follows float32 params; dtypes, shardings,
donation, checkpoints and bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_jax import checkpointing, parallel
from eva_jax.solver import (MasterWeightsState, TrainStep, create_train_state, get_loss_fn,
                            make_optimizer, make_policy_model)

LR = 5e-7  # the paper's DPO learning rate
T = 32
STEPS = 3


def _leaves(tree):
  return [np.asarray(x, np.float32) for x in jax.tree_util.tree_leaves(tree)]


def _paths(tree):
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _train(config, pairs, param_dtype, master_dtype, mesh, steps=STEPS):
  """(initial params as float32, final state) from the same bfloat16-exact initial params
  (so that every run starts from the same values); a reference-free loss."""
  model = make_policy_model(config, remat="full", compute_dtype="bfloat16",
                            param_dtype=param_dtype)
  opt = make_optimizer(LR, master_dtype=master_dtype)
  f32 = make_policy_model(config, compute_dtype="bfloat16", param_dtype="float32")
  init = create_train_state(f32, make_optimizer(LR), jax.random.key(0), mesh).params
  init = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), init)
  state = create_train_state(model, opt, jax.random.key(0), mesh, params=init)
  step = TrainStep(model, opt, get_loss_fn("simpo"), mesh, chunk_size=8)
  batch = step.shard_batch(pairs)
  for _ in range(steps):
    state, _ = step(state, batch)
  return parallel.global_to_host(init), state


@pytest.fixture(scope="module")
def runs(small_config, pairs_factory):
  mesh = parallel.create_mesh({"data": 1}, devices=jax.devices()[:1])
  pairs = pairs_factory(8, T, seed=3)
  return {name: _train(small_config, pairs, p, m, mesh)
          for name, p, m in [("bf16", "bfloat16", None), ("master", "bfloat16", "float32"),
                             ("f32", "float32", None)]}


def test_bfloat16_params_round_small_updates_away_the_master_copy_keeps_them(runs):
  init, bf16 = runs["bf16"]
  _, master = runs["master"]
  # Pure bfloat16: a 5e-7 step is far below the spacing of bfloat16 numbers near the weights
  # (~1e-4 at 0.02), so the weight matrices (>= 2 dims) do not move at all.
  for path, a, a0 in zip(_paths(init), _leaves(bf16.params), _leaves(init)):
    if not path.endswith("['scale']"):  # norm scales start at 0, where bfloat16 is fine
      assert np.mean(a != a0) < 0.01, path
  # The master copy moves by about STEPS * LR per entry (Adam's early steps are ~ lr * sign).
  copy = master.opt_state.master
  for m, a0 in zip(_leaves(copy), _leaves(init)):
    moved = np.mean(np.abs(m - a0)) / LR
    assert 0.5 * STEPS < moved <= 1.01 * STEPS
  # The params are the copy cast to bfloat16, exactly.
  for p, m in zip(jax.tree_util.tree_leaves(master.params), jax.tree_util.tree_leaves(copy)):
    assert p.dtype == jnp.bfloat16 and m.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(p, np.float32),
                                  np.asarray(m.astype(jnp.bfloat16), np.float32))


def test_the_master_copy_trains_as_float32_params_do(runs):
  # float32 params are cast to bfloat16 for every matmul, so from the same (bfloat16-exact)
  # start both runs compute the same forward; the gradients differ only where float32 params
  # sum in float32 what bfloat16 params sum in bfloat16 (the tied embedding's two uses).
  init, master = runs["master"]
  _, f32 = runs["f32"]
  for path, m, f, a0 in zip(_paths(init), _leaves(master.opt_state.master),
                            _leaves(f32.params), _leaves(init)):
    dm, df = m - a0, f - a0
    if "embedding" in path:
      assert np.mean(np.abs(dm - df)) < 0.01 * np.mean(np.abs(df)), path
      assert np.mean(np.sign(dm) == np.sign(df)) > 0.99, path
    else:
      # 1e-3 relative, plus a float32 rounding step of the weight itself per update.
      tolerance = 1e-3 * np.abs(df) + STEPS * np.spacing(np.abs(a0))
      assert np.all(np.abs(dm - df) <= tolerance), (path, np.max(np.abs(dm - df) - tolerance))


def test_dtypes_shardings_and_donation_hold_on_an_fsdp_mesh(small_config, pairs_factory):
  mesh = parallel.create_mesh({"fsdp": 4}, devices=jax.devices()[:4])
  model = make_policy_model(small_config, compute_dtype="bfloat16", param_dtype="bfloat16")
  opt = make_optimizer(1e-3, master_dtype="float32")
  state = create_train_state(model, opt, jax.random.key(0), mesh)
  step = TrainStep(model, opt, get_loss_fn("simpo"), mesh, chunk_size=8)
  assert isinstance(state.opt_state, MasterWeightsState)
  old = jax.tree_util.tree_leaves(state.opt_state.master)[0]
  batch = step.shard_batch(pairs_factory(4, T))
  for _ in range(2):
    state, metrics = step(state, batch)
  assert old.is_deleted() and int(state.step) == 2 and np.isfinite(float(metrics["loss"]))
  adam = state.opt_state.inner[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
  assert {x.dtype for x in jax.tree_util.tree_leaves(state.params)} == {jnp.dtype("bfloat16")}
  for tree in (state.opt_state.master, adam.mu, adam.nu):
    assert {x.dtype for x in jax.tree_util.tree_leaves(tree)} == {jnp.dtype("float32")}
  # The copy is sharded as the params (over fsdp), not replicated.
  for m, p in zip(jax.tree_util.tree_leaves(state.opt_state.master),
                  jax.tree_util.tree_leaves(state.params)):
    assert m.sharding.is_equivalent_to(p.sharding, p.ndim)
  assert any("fsdp" in str(m.sharding.spec)
             for m in jax.tree_util.tree_leaves(state.opt_state.master))


def test_the_copy_starts_from_given_params_at_full_precision(small_config):
  mesh = parallel.create_mesh({"data": 1}, devices=jax.devices()[:1])
  f32 = make_policy_model(small_config, param_dtype="float32")
  given = create_train_state(f32, make_optimizer(LR), jax.random.key(1), mesh).params
  model = make_policy_model(small_config, param_dtype="bfloat16")
  state = create_train_state(model, make_optimizer(LR, master_dtype="float32"),
                             jax.random.key(0), mesh, params=given)
  for m, g in zip(_leaves(state.opt_state.master), _leaves(given)):
    np.testing.assert_array_equal(m, g)  # not rounded through bfloat16
  assert any(not np.array_equal(p, g)
             for p, g in zip(_leaves(state.params), _leaves(given)))


def test_a_checkpoint_holds_the_master_copy(small_config, tmp_path):
  mesh = parallel.create_mesh({"fsdp": 2}, devices=jax.devices()[:2])
  model = make_policy_model(small_config, param_dtype="bfloat16")
  opt = make_optimizer(LR, master_dtype="float32")
  state = create_train_state(model, opt, jax.random.key(0), mesh)
  ckpt = checkpointing.RunCheckpointer(tmp_path)
  ckpt.save_train(1, state)
  ckpt.wait()
  step = TrainStep(model, opt, get_loss_fn("simpo"), mesh)
  restored = ckpt.restore_train(1, checkpointing.abstract_with_shardings(
      step.abstract_state, step.state_shardings))
  ckpt.close()
  assert isinstance(restored.opt_state, MasterWeightsState)
  for a, b in zip(jax.tree_util.tree_leaves(parallel.global_to_host(state)),
                  jax.tree_util.tree_leaves(parallel.global_to_host(restored))):
    assert a.dtype == b.dtype and np.array_equal(a, b)


def test_a_master_copy_no_wider_than_the_params_is_refused(small_config):
  mesh = parallel.create_mesh({"data": 1}, devices=jax.devices()[:1])
  model = make_policy_model(small_config, param_dtype="float32")
  with pytest.raises(ValueError, match="master_dtype = 'float32' is no wider than the params' "
                                       "own dtype.*param_dtype = 'bfloat16'"):
    create_train_state(model, make_optimizer(LR, master_dtype="float32"), jax.random.key(0),
                       mesh)
  with pytest.raises(ValueError, match="master_dtype must be a floating dtype"):
    make_optimizer(LR, master_dtype="int32")

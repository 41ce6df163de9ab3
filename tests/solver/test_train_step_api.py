"""The train step's contract: bad inputs raise clear errors, the state is donated, the dtype
policy holds across steps, gin configures it, and reference log-probs cover a whole round."""

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_jax import parallel
from eva_jax.solver import (TrainStep, create_train_state, get_loss_fn, logprobs,
                            make_optimizer, make_policy_model, make_train_step, reference_logps)

T = 16


@pytest.fixture(scope="module")
def setup(small_config):
  """A data=2 x tensor=2 mesh (4 devices), the policy, and a state."""
  mesh = parallel.create_mesh({"data": 2, "tensor": 2}, devices=jax.devices()[:4])
  model = make_policy_model(small_config, remat="none", compute_dtype="float32")
  return mesh, model


def _step(setup, loss="dpo", **kw):
  mesh, model = setup
  return TrainStep(model, make_optimizer(1e-3), get_loss_fn(loss), mesh, chunk_size=8,
                   max_length=T, **kw)


def _with_ref(pairs):
  n = pairs["chosen_tokens"].shape[0]
  return dict(pairs, ref_chosen_logps=np.full(n, -30.0, np.float32),
              ref_rejected_logps=np.full(n, -30.0, np.float32))


def test_rows_longer_than_max_length_raise(setup, pairs_factory):
  step = _step(setup)
  long = _with_ref(pairs_factory(4, 2 * T))
  with pytest.raises(ValueError, match=f"rows have {2 * T} tokens, more than max_length={T}"):
    step.check_batch_shape(long)
  with pytest.raises(ValueError, match=f"more than the configured max_length={T}"):
    step.shard_batch(long)


def test_batch_not_divisible_by_data_axes_or_microbatches_raises(setup, pairs_factory):
  with pytest.raises(ValueError, match="3 pairs does not split into 1 micro-batches over 2 "
                                       "data-parallel shards; use a multiple of 2"):
    _step(setup).check_batch_shape(_with_ref(pairs_factory(3, T)))
  # shard_batch says so too, before JAX would fail to place the arrays.
  with pytest.raises(ValueError, match="3 pairs does not split into 1 micro-batches"):
    _step(setup).shard_batch(_with_ref(pairs_factory(3, T)))
  with pytest.raises(ValueError, match="4 pairs does not split into 4 micro-batches over 2 "
                                       "data-parallel shards; use a multiple of 8"):
    _step(setup, num_microbatches=4).check_batch_shape(_with_ref(pairs_factory(4, T)))
  with pytest.raises(ValueError, match="num_microbatches must be >= 1"):
    _step(setup, num_microbatches=0)


def test_empty_response_and_missing_reference_raise(setup, pairs_factory):
  step = _step(setup)
  pairs = _with_ref(pairs_factory(4, T))
  pairs["rejected_loss_mask"][2] = 0
  with pytest.raises(ValueError, match="rejected response of row 2 is empty"):
    step.shard_batch(pairs)
  no_ref = pairs_factory(4, T)
  with pytest.raises(ValueError, match="needs batch entries.*ref_chosen_logps.*reference_logps"):
    step.check_batch_shape(no_ref)
  bad = _with_ref(pairs_factory(4, T))
  bad["ref_chosen_logps"] = bad["ref_chosen_logps"][:3]
  with pytest.raises(ValueError, match="ref_chosen_logps'\\] has shape \\(3,\\), expected \\(4,\\)"):
    step.check_batch_shape(bad)


def test_reference_free_loss_needs_no_reference_and_state_is_donated(setup, pairs_factory):
  mesh, model = setup
  step = _step(setup, loss="simpo")
  state = create_train_state(model, step.optimizer, jax.random.key(0), mesh)
  old_leaf = jax.tree_util.tree_leaves(state.params)[0]
  new_state, metrics = step(state, step.shard_batch(pairs_factory(4, T)))
  assert old_leaf.is_deleted()  # donated: its buffer now holds the new state
  assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))
  # The param shardings are those the logical rules give (vocab over tensor).
  table = new_state.params["embedder"]["input_embedding"]
  assert table.sharding.spec == jax.sharding.PartitionSpec("tensor", None)


@pytest.mark.parametrize("param_dtype,state_dtype,mu_dtype", [("bfloat16", "float32", None),
                                                              ("float32", "bfloat16", None),
                                                              ("float32", "float32", "bfloat16")])
def test_dtype_policy_holds_across_steps(small_config, pairs_factory, param_dtype, state_dtype,
                                         mu_dtype):
  mesh = parallel.create_mesh({"data": 2}, devices=jax.devices()[:2])
  model = make_policy_model(small_config, remat="full", compute_dtype="bfloat16",
                            param_dtype=param_dtype)
  opt = make_optimizer(1e-3, state_dtype=state_dtype, mu_dtype=mu_dtype)
  state = create_train_state(model, opt, jax.random.key(0), mesh)
  step = TrainStep(model, opt, get_loss_fn("orpo"), mesh, chunk_size=8)
  batch = step.shard_batch(pairs_factory(2, T))
  for _ in range(2):
    state, metrics = step(state, batch)
  assert {x.dtype for x in jax.tree_util.tree_leaves(state.params)} == {jnp.dtype(param_dtype)}
  adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
  assert {x.dtype for x in jax.tree_util.tree_leaves(adam.mu)} == {
      jnp.dtype(mu_dtype or state_dtype)}
  assert {x.dtype for x in jax.tree_util.tree_leaves(adam.nu)} == {jnp.dtype(state_dtype)}
  assert np.isfinite(float(metrics["loss"]))


def test_gin_configures_loss_optimizer_and_microbatches(setup, pairs_factory):
  mesh, model = setup
  gin.clear_config()
  try:
    gin.parse_config("""
        get_loss_fn.name = "ipo"
        ipo_loss.beta = 0.5
        learning_rate_schedule.learning_rate = 1e-2
        learning_rate_schedule.total_steps = 10
        learning_rate_schedule.warmup_ratio = 0.5
        make_train_step.num_microbatches = 2
        make_train_step.chunk_size = 4
    """)
    step = make_train_step(model, mesh)
    assert step.loss_fn.name == "ipo" and step.num_microbatches == 2
    state = create_train_state(model, step.optimizer, jax.random.key(0), mesh)
    pairs = _with_ref(pairs_factory(4, T))
    _, metrics = step(state, step.shard_batch(pairs))
  finally:
    gin.clear_config()
  # Step 0 of a 5-step linear warm-up: learning rate 0.
  assert float(metrics["learning_rate"]) == 0.0
  assert float(step.optimizer.learning_rate(5)) == pytest.approx(1e-2)


def test_rows_scoring_more_than_scored_length_raise(setup, pairs_factory):
  pairs = _with_ref(pairs_factory(4, T, seed=5))
  longest = int(pairs["chosen_loss_mask"].sum(1).max())
  _step(setup, scored_length=longest + 1).shard_batch(pairs)
  with pytest.raises(ValueError, match=f"more than scored_length={longest - 1}"):
    _step(setup, scored_length=longest - 1).shard_batch(pairs)
  with pytest.raises(ValueError, match="scored_length must be >= 1"):
    _step(setup, scored_length=0)


@pytest.mark.parametrize("scored", [False, True])
def test_reference_logps_cover_every_pair_with_a_ragged_last_batch(setup, pairs_factory,
                                                                   scored):
  mesh, model = setup
  pairs = pairs_factory(5, T, seed=4)
  state = create_train_state(model, make_optimizer(), jax.random.key(0), mesh)
  longest = max(int(pairs[f"{side}_loss_mask"].sum(1).max()) for side in ("chosen", "rejected"))
  ref = reference_logps(model, state.params, pairs, mesh, batch_size=2, chunk_size=8,
                        scored_length=longest if scored else None)
  for side in ("chosen", "rejected"):
    want, _ = jax.jit(lambda p: logprobs.naive_sequence_logps(
        model, p, pairs[f"{side}_tokens"], pairs[f"{side}_loss_mask"]))(state.params)
    assert ref[f"ref_{side}_logps"].shape == (5,)
    np.testing.assert_allclose(ref[f"ref_{side}_logps"], want, rtol=1e-5, atol=1e-4)


def test_a_bfloat16_second_moment_cannot_decay_so_mu_dtype_is_separate():
  """Why `mu_dtype` exists: with b2 = 0.999, Adam's second moment decays by 0.1% a step, below
  bfloat16's resolution, so a bfloat16 one stays at its peak; the first moment (10% a step)
  tracks in bfloat16 as it does in float32."""
  def moments(state_dtype, mu_dtype=None):
    opt = make_optimizer(1e-3, state_dtype=state_dtype, mu_dtype=mu_dtype, max_grad_norm=None)
    params = {"w": jnp.zeros((4,), jnp.float32)}
    state = opt.tx.init(jax.tree_util.tree_map(lambda x: x.astype(state_dtype), params))
    for g in [1.0] + [0.0] * 200:  # one large gradient, then none
      _, state = opt.tx.update({"w": jnp.full((4,), g)}, state, params)
    adam = state[0][0]  # chain(adamw) -> adamw -> its ScaleByAdamState
    return float(adam.mu["w"][0]), float(adam.nu["w"][0])
  mu32, nu32 = moments("float32")
  mu16, nu16 = moments("float32", mu_dtype="bfloat16")
  _, nu_bf16 = moments("bfloat16")
  assert nu32 == pytest.approx(1e-3 * 0.999 ** 200, rel=1e-4)  # 8.2e-4: decayed
  assert nu_bf16 == pytest.approx(1e-3, rel=1e-2)  # stuck where it was after step 1
  assert nu16 == nu32  # the second moment stays float32 with a bfloat16 first moment
  # Both first moments decay as 0.1 * 0.9 ** 200 = 7e-11; bfloat16's rounding of each of the
  # 200 steps (up to 0.4%) adds up to tens of percent, not a stuck value.
  assert mu32 == pytest.approx(0.1 * 0.9 ** 200, rel=1e-3)
  assert mu16 == pytest.approx(mu32, rel=0.5)

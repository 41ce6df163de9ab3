"""The sharded train step: mesh shapes agree with one device, gradient accumulation agrees
with the full batch, and the same seed gives the same state.

Tolerances: everything runs in float32; sharded reductions add in a different order, so
losses and metrics agree to ~1e-6 relative and the parameter updates to ~1e-4 of their size
(Adam divides by sqrt(v) + eps; eps = 1e-4 here keeps near-zero gradients from amplifying
rounding noise into sign flips).
"""

import jax
import numpy as np
import pytest

from eva_jax import parallel
from eva_jax.solver import (TrainStep, create_train_state, get_loss_fn, make_optimizer,
                            make_policy_model, reference_logps)

LR = 1e-3
B, T = 8, 32


def _optimizer():
  return make_optimizer(LR, eps=1e-4, max_grad_norm=1.0)


_STEPS = {}


def _train(config, pairs, mesh_shape, devices, *, steps=2, num_microbatches=1, seed=0,
           scored_length=None, share_prompt=None):
  """(initial params, final params, per-step metrics) as numpy.

  The TrainStep (and so its compiled program) is cached per mesh, micro-batch count and
  scored length (share_prompt None: on with a scored length)."""
  key = (tuple(sorted(mesh_shape.items())), len(devices), num_microbatches, scored_length,
         share_prompt)
  if key not in _STEPS:
    mesh = parallel.create_mesh(mesh_shape, devices=devices)
    model = make_policy_model(config, remat="full", compute_dtype="float32")
    _STEPS[key] = TrainStep(model, _optimizer(), get_loss_fn("dpo", beta=0.1), mesh,
                            num_microbatches=num_microbatches, chunk_size=8, max_length=T,
                            scored_length=scored_length, share_prompt=share_prompt)
  step = _STEPS[key]
  state = create_train_state(step.model, step.optimizer, jax.random.key(seed), step.mesh)
  init = parallel.global_to_host(state.params)
  batch = step.shard_batch(pairs)
  metrics = []
  for _ in range(steps):
    state, m = step(state, batch)
    metrics.append({k: float(v) for k, v in m.items()})
  assert int(state.step) == steps
  return init, parallel.global_to_host(state.params), metrics


@pytest.fixture(scope="module")
def pairs(small_config, pairs_factory):
  """B pairs with reference log-probs of the seed-0 initial policy (1 device)."""
  p = pairs_factory(B, T, seed=3)
  mesh = parallel.create_mesh({"data": 1}, devices=jax.devices()[:1])
  model = make_policy_model(small_config, compute_dtype="float32")
  state = create_train_state(model, _optimizer(), jax.random.key(0), mesh)
  p.update(reference_logps(model, state.params, p, mesh, batch_size=B, chunk_size=8))
  return p


@pytest.fixture(scope="module")
def single_device(small_config, pairs):
  return _train(small_config, pairs, {"data": 1}, jax.devices()[:1])


def _assert_same_run(got, want, same_training):
  """Same init exactly; updates and metrics to the tolerances of the module docstring."""
  init, final, metrics = got
  init_w, final_w, metrics_w = want
  for a, b in zip(jax.tree_util.tree_leaves(init), jax.tree_util.tree_leaves(init_w)):
    np.testing.assert_array_equal(a, b)  # same seed -> same init on any mesh
  same_training(init, final, final_w, metrics, metrics_w, LR)


def test_first_step_against_its_own_reference_has_loss_log2(single_device):
  first = single_device[2][0]
  np.testing.assert_allclose(first["loss"], np.log(2.0), rtol=1e-5)
  np.testing.assert_allclose(first["rewards/margins"], 0.0, atol=1e-5)
  np.testing.assert_allclose(first["learning_rate"], LR, rtol=1e-6)
  # Training moved the policy: the second step sees a lower loss and non-zero margins.
  second = single_device[2][1]
  assert second["loss"] < first["loss"] and second["rewards/margins"] > 0


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"fsdp": 4, "tensor": 2},
                                        {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_step_matches_one_device(small_config, pairs, single_device, same_training,
                                         mesh_shape):
  _assert_same_run(_train(small_config, pairs, mesh_shape, jax.devices()), single_device,
                   same_training)


def test_four_microbatches_match_the_full_batch(small_config, pairs, same_training):
  devices = jax.devices()[:2]
  full = _train(small_config, pairs, {"data": 2}, devices, steps=1)
  accumulated = _train(small_config, pairs, {"data": 2}, devices, steps=1, num_microbatches=4)
  _assert_same_run(accumulated, full, same_training)


def test_same_seed_same_state_other_seed_other_state(small_config, pairs, single_device):
  again = _train(small_config, pairs, {"data": 1}, jax.devices()[:1])
  for a, b in zip(jax.tree_util.tree_leaves(again[1]), jax.tree_util.tree_leaves(single_device[1])):
    np.testing.assert_array_equal(a, b)
  assert again[2] == single_device[2]
  step = _STEPS[((("data", 1),), 1, 1, None, None)]
  other = create_train_state(step.model, step.optimizer, jax.random.key(1), step.mesh)
  assert not np.array_equal(np.asarray(other.params["embedder"]["input_embedding"]),
                            single_device[0]["embedder"]["input_embedding"])


@pytest.mark.parametrize("share_prompt", [False, True])
def test_unembedding_only_the_responses_matches_all_positions(small_config, pairs,
                                                              single_device, same_training,
                                                              share_prompt):
  """scored_length = the longest response: the prompts' logits are never computed, on a
  sharded mesh with micro-batches, and training is the same; also with each pair packed in
  one row, its prompt once (the default with a scored length)."""
  longest = max(int(pairs[f"{side}_loss_mask"].sum(1).max()) for side in ("chosen", "rejected"))
  assert longest < T // 2 + 5
  got = _train(small_config, pairs, {"fsdp": 2, "tensor": 2}, jax.devices()[:4],
               num_microbatches=2, scored_length=longest, share_prompt=share_prompt)
  assert _STEPS[((("fsdp", 2), ("tensor", 2)), 4, 2, longest, share_prompt)].share_prompt == (
      share_prompt)
  _assert_same_run(got, single_device, same_training)

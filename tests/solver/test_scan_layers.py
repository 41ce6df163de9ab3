"""The DPO loss, its gradients and the sharded train step with scanned layers
(`scan_layers=True`) against the unrolled model, in float32.

Tolerances: the scanned model runs the same ops, fused and ordered differently by XLA, so the
loss and metrics agree to 1e-6 relative, gradients (unstacked) to 1e-5 of each leaf's largest
entry, and train-step updates as in test_train_step.py (1e-3 relative, Adam divides by
sqrt(v) + eps: see `assert_same_training`).
"""

import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_jax import parallel
from eva_jax.models import get_config, stack_layers, unstack_layers
from eva_jax.models.config import GLOBAL, LOCAL
from eva_jax.solver import (TrainStep, create_train_state, get_loss_fn, make_optimizer,
                            make_policy_model, reference_logps)
from eva_jax.solver.train_step import _loss_and_metrics

B, T = 8, 32
LR = 1e-3

CONFIGS = {
    "gemma2": get_config("tiny"),
    "gemma2_odd": get_config("tiny", attention_types=(LOCAL, GLOBAL, LOCAL)),
    "gemma1": get_config("tiny_gemma1"),
}


def _assert_grads_close(stacked_grads, grads, config):
  got = jax.tree_util.tree_flatten_with_path(unstack_layers(stacked_grads, config))
  want = jax.tree_util.tree_flatten(grads)
  assert got[1] == want[1]
  for (path, g), r in zip(got[0], want[0]):
    scale = float(np.max(np.abs(np.asarray(r))))
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name,remat", [("gemma2", "full"), ("gemma2", "dots"),
                                         ("gemma2", "none"), ("gemma2", "attention"), ("gemma2_odd", "full"),
                                         ("gemma1", "full")])
def test_dpo_loss_and_gradients_equal_unrolled(name, remat, pairs_factory):
  cfg = CONFIGS[name]
  model = make_policy_model(cfg, remat=remat, compute_dtype="float32", scan_layers=False)
  scanned = make_policy_model(cfg, remat=remat, compute_dtype="float32", scan_layers=True)
  assert scanned.config.scan_layers and not model.config.scan_layers
  batch = pairs_factory(B, T, seed=5)
  rng = np.random.RandomState(0)
  batch["ref_chosen_logps"] = rng.normal(-40, 3, B).astype(np.float32)
  batch["ref_rejected_logps"] = rng.normal(-40, 3, B).astype(np.float32)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  loss_fn = get_loss_fn("dpo", beta=0.1)
  mesh = parallel.create_mesh({"data": 1}, devices=jax.devices()[:1])
  params = create_train_state(model, make_optimizer(LR), jax.random.key(0), mesh).params

  def grads(m, p):
    fn = functools.partial(_loss_and_metrics, model=m, loss_fn=loss_fn, chunk_size=8)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(p, batch)

  (loss, metrics), g = grads(model, params)
  (sloss, smetrics), sg = grads(scanned, stack_layers(params, scanned.config))
  np.testing.assert_allclose(sloss, loss, rtol=1e-6)
  assert smetrics.keys() == metrics.keys()
  for k in metrics:
    np.testing.assert_allclose(smetrics[k], metrics[k], rtol=1e-6, atol=1e-6, err_msg=k)
  _assert_grads_close(sg, g, scanned.config)


def _optimizer():
  return make_optimizer(LR, eps=1e-4, max_grad_norm=1.0)


def _run(model, mesh, params, pairs, steps=2, num_microbatches=1):
  step = TrainStep(model, _optimizer(), get_loss_fn("dpo", beta=0.1), mesh,
                   num_microbatches=num_microbatches, chunk_size=8, max_length=T)
  state = create_train_state(model, step.optimizer, jax.random.key(0), mesh, params=params)
  for leaf, sharding in zip(jax.tree_util.tree_leaves(state),
                            jax.tree_util.tree_leaves(step.state_shardings)):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
  batch = step.shard_batch(pairs)
  metrics = []
  for _ in range(steps):
    state, m = step(state, batch)
    metrics.append({k: float(v) for k, v in m.items()})
  return state, metrics


@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_sharded_train_step_equals_unrolled(small_config, pairs_factory, same_training,
                                            num_microbatches):
  cfg = small_config.replace(attention_types=(LOCAL, GLOBAL) * 2)
  mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = make_policy_model(cfg, compute_dtype="float32", scan_layers=False)
  scanned = make_policy_model(cfg, compute_dtype="float32", scan_layers=True)
  pairs = pairs_factory(B, T, seed=3)
  init = create_train_state(model, _optimizer(), jax.random.key(0), mesh).params
  pairs.update(reference_logps(model, init, pairs, mesh, batch_size=B, chunk_size=8))
  # The reference pass of a scanned model gives the same log-probs.
  sref = reference_logps(scanned, stack_layers(init, scanned.config), pairs, mesh,
                         batch_size=B, chunk_size=8)
  for k, v in sref.items():
    np.testing.assert_allclose(v, pairs[k], rtol=1e-6, err_msg=k)

  state, metrics = _run(model, mesh, init, pairs, num_microbatches=num_microbatches)
  sstate, smetrics = _run(scanned, mesh, stack_layers(init, scanned.config), pairs,
                          num_microbatches=num_microbatches)
  # Adam's moments mirror the stacked params, with their shardings.
  mu = sstate.opt_state[1][0].mu["layers"]["block_0"]["attn"]["q_einsum"]
  assert mu.shape[0] == 2 and mu.sharding.spec[0] is None and mu.sharding.spec[1] == "tensor"
  init_h = parallel.global_to_host(init)
  final = parallel.global_to_host(state.params)
  sfinal = unstack_layers(parallel.global_to_host(sstate.params), scanned.config)
  same_training(init_h, sfinal, final, smetrics, metrics, LR)


def test_scan_layers_is_a_gin_knob_of_the_policy_model():
  # Scanned by default; gin or the argument unrolls; None keeps the config's own setting.
  assert make_policy_model(get_config("tiny")).config.scan_layers
  gin.parse_config("make_policy_model.scan_layers = False")
  try:
    assert not make_policy_model(get_config("tiny")).config.scan_layers
  finally:
    gin.clear_config()
  assert not make_policy_model(get_config("tiny"), scan_layers=None).config.scan_layers
  assert make_policy_model(get_config("tiny", scan_layers=True),
                           scan_layers=None).config.scan_layers

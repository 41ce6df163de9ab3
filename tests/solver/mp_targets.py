"""Functions the multi-process solver tests run in every process (see
eva_jax.testing.multiprocess). Each returns numpy only, identical on every process."""

import jax
import numpy as np

from eva_jax import parallel
from eva_jax.models import get_config
from eva_jax.solver import (TrainStep, create_train_state, get_loss_fn, make_optimizer,
                            make_pair_batch, make_policy_model, reference_logps)


def _pairs(n, max_length, seed, vocab):
  rng = np.random.RandomState(seed)
  draw = lambda lo, hi: [list(rng.randint(3, vocab, rng.randint(lo, hi + 1))) for _ in range(n)]
  return make_pair_batch(draw(1, 8), draw(1, 16), draw(1, 16), max_length=max_length)


def train_steps(mesh_shape, steps=2, pairs=8, max_length=24, num_microbatches=1, seed=0):
  """Reference log-probs, then `steps` DPO steps on the global mesh of all processes.

  Every process builds the same global pairs, computes the same reference log-probs, and
  feeds the train step only its own rows (`process_slice`), as the round loop does.
  Returns {"params": final params, "metrics": per-step metrics, "ref": reference log-probs}.
  """
  cfg = get_config("tiny", attention_types=("local", "global"))
  mesh = parallel.create_mesh(mesh_shape)
  model = make_policy_model(cfg, remat="full", compute_dtype="float32")
  opt = make_optimizer(1e-3, eps=1e-4)
  state = create_train_state(model, opt, jax.random.key(seed), mesh)
  batch = _pairs(pairs, max_length, seed=11, vocab=cfg.vocab_size)
  ref = reference_logps(model, state.params, batch, mesh, batch_size=pairs, chunk_size=8)
  batch.update(ref)
  step = TrainStep(model, opt, get_loss_fn("dpo", beta=0.1), mesh,
                   num_microbatches=num_microbatches, chunk_size=8, max_length=max_length)
  rows = parallel.process_slice(pairs)
  global_batch = step.shard_batch({k: v[rows] for k, v in batch.items()})
  metrics = []
  for _ in range(steps):
    state, m = step(state, global_batch)
    metrics.append({k: float(v) for k, v in parallel.global_to_host(m).items()})
  return {"params": parallel.global_to_host(state.params), "metrics": metrics, "ref": ref,
          "process_count": jax.process_count(), "devices": jax.device_count()}

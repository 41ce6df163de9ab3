"""Shared fixtures for the solver tests: a 2-layer tiny Gemma 2 and random pair batches."""

import jax
import numpy as np
import pytest

from eva_jax.models import get_config
from eva_jax.solver import make_pair_batch


def random_pairs(n, max_length, seed=0, vocab=384, max_prompt=10, max_response=20):
  """`n` random pairs (token ids >= 3, so never pad/eos/bos) packed by make_pair_batch."""
  rng = np.random.RandomState(seed)
  draw = lambda lo, hi: [list(rng.randint(3, vocab, rng.randint(lo, hi + 1))) for _ in range(n)]
  return make_pair_batch(draw(1, max_prompt), draw(1, max_response), draw(1, max_response),
                         max_length=max_length)


def assert_same_training(init, final, final_want, metrics, metrics_want, learning_rate):
  """Two runs from the same `init`: updates (final - init) equal to 1e-3 relative and
  3e-4 * learning_rate absolute, per-step metrics to 1e-5.

  The absolute part: float32 gradients summed in another order (another mesh, a scanned
  layer loop) differ by a few ulps of their terms, ~3e-8 for terms near 0.1, and Adam turns a
  gradient error d on a near-zero gradient into an update error of learning_rate * d / eps
  (eps = 1e-4 in these tests)."""
  for a, b, a0 in zip(jax.tree_util.tree_leaves(final), jax.tree_util.tree_leaves(final_want),
                      jax.tree_util.tree_leaves(init)):
    np.testing.assert_allclose(a - a0, b - a0, rtol=1e-3, atol=3e-4 * learning_rate)
  for i, (m, mw) in enumerate(zip(metrics, metrics_want)):
    assert m.keys() == mw.keys()
    for k in m:
      if i == 0 and k == "rewards/accuracies":
        continue  # step 0: policy = reference, rewards are 0 +- rounding; their sign is noise
      np.testing.assert_allclose(m[k], mw[k], rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.fixture(scope="session")
def same_training():
  return assert_same_training


@pytest.fixture(scope="session")
def small_config():
  # Two layers (one local, one global) keep compile times low; still soft-capped Gemma 2.
  return get_config("tiny", attention_types=("local", "global"))


@pytest.fixture(scope="session")
def pairs_factory():
  return random_pairs

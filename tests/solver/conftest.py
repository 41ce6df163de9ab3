"""Shared fixtures for the solver tests: a 2-layer tiny Gemma 2 and random pair batches."""

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


@pytest.fixture(scope="session")
def small_config():
  # Two layers (one local, one global) keep compile times low; still soft-capped Gemma 2.
  return get_config("tiny", attention_types=("local", "global"))


@pytest.fixture(scope="session")
def pairs_factory():
  return random_pairs

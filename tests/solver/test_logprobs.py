"""Chunked response log-probs: equal to the full-logits computation, in value and gradient,
without a [B, T, V] array anywhere in the program, and the same on a sharded mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_jax import parallel
from eva_jax.models import Transformer
from eva_jax.solver import logprobs, pair_logps, sequence_logps


_CACHE = {}


def _setup(config, pairs_factory, n=3, t=24):
  """(model, params, pairs); params initialised once per module (eager init is slow)."""
  model = Transformer(config)
  pairs = pairs_factory(n, t, seed=1)
  if config not in _CACHE:
    _CACHE[config] = jax.jit(model.init)(jax.random.key(0), pairs["chosen_tokens"])["params"]
  return model, _CACHE[config], pairs


def _naive(model, params, tokens, mask):
  return jax.jit(lambda p: logprobs.naive_sequence_logps(model, p, tokens, mask))(params)


@pytest.mark.parametrize("chunk_size", [5, 8, 24, 100])  # ragged tail, exact, one, more than T
def test_chunked_equals_full_logits(small_config, pairs_factory, chunk_size):
  model, params, pairs = _setup(small_config, pairs_factory)
  tokens, mask = pairs["chosen_tokens"], pairs["chosen_loss_mask"]
  got, count = jax.jit(lambda p: sequence_logps(model, p, tokens, mask,
                                                chunk_size=chunk_size))(params)
  want, want_count = _naive(model, params, tokens, mask)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-4)
  np.testing.assert_array_equal(count, mask[:, 1:].sum(1))
  np.testing.assert_array_equal(count, want_count)
  assert (np.asarray(count) > 0).all()


def test_gradients_equal_full_logits(small_config, pairs_factory):
  model, params, pairs = _setup(small_config, pairs_factory)
  tokens, mask = pairs["chosen_tokens"], pairs["chosen_loss_mask"]
  w = jnp.array([1.0, -2.0, 0.5])
  g = jax.jit(jax.grad(lambda p: sequence_logps(model, p, tokens, mask, chunk_size=7)[0] @ w))(
      params)
  g_ref = jax.jit(jax.grad(lambda p: _naive(model, p, tokens, mask)[0] @ w))(params)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _shapes(jaxpr):
  """Shapes of every value computed in `jaxpr` and in the jaxprs nested in its equations."""
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield tuple(getattr(v.aval, "shape", ()))
    for p in eqn.params.values():
      for inner in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(inner, "jaxpr", inner)  # ClosedJaxpr -> Jaxpr
        if hasattr(inner, "eqns"):
          yield from _shapes(inner)


def test_no_full_batch_logits_in_forward_or_backward(small_config, pairs_factory):
  model, params, pairs = _setup(small_config, pairs_factory, n=2, t=32)
  tokens, mask = pairs["chosen_tokens"], pairs["chosen_loss_mask"]
  v = small_config.vocab_size

  def loss(p):
    return sequence_logps(model, p, tokens, mask, chunk_size=8)[0].sum()
  shapes = set(_shapes(jax.make_jaxpr(jax.grad(loss))(params).jaxpr))
  vocab_shapes = {s for s in shapes if v in s and len(s) >= 2 and s != (v, small_config.embed_dim)}
  assert vocab_shapes and all(np.prod(s) <= 2 * 8 * v for s in vocab_shapes), vocab_shapes
  # The naive version does materialise [B, T, V]: the walk above would have seen it.
  naive = set(_shapes(jax.make_jaxpr(
      lambda p: logprobs.naive_sequence_logps(model, p, tokens, mask)[0].sum())(params).jaxpr))
  assert (2, 32, v) in naive


def test_pair_logps_interleaves_chosen_and_rejected(small_config, pairs_factory):
  model, params, pairs = _setup(small_config, pairs_factory)
  pairs["ref_chosen_logps"] = np.array([1.0, 2.0, 3.0], np.float32)
  pairs["ref_rejected_logps"] = np.array([4.0, 5.0, 6.0], np.float32)
  out = jax.jit(lambda p, b: pair_logps(model, p, b, chunk_size=8))(params, pairs)
  for side in ("chosen", "rejected"):
    want, count = _naive(model, params, pairs[f"{side}_tokens"], pairs[f"{side}_loss_mask"])
    np.testing.assert_allclose(getattr(out, side), want, rtol=2e-5, atol=1e-4)
    np.testing.assert_array_equal(getattr(out, f"{side}_length"), count)
  np.testing.assert_array_equal(out.ref_rejected, [4.0, 5.0, 6.0])
  assert pair_logps(model, params, pairs, with_reference=False).ref_chosen is None


def test_sharded_vocab_and_batch_match_one_device(small_config, pairs_factory):
  model = Transformer(small_config)
  pairs = pairs_factory(4, 24, seed=2)
  tokens, mask = pairs["chosen_tokens"], pairs["chosen_loss_mask"]
  results = []
  for shape in ({"data": 1}, {"data": 2, "tensor": 4}):
    devices = jax.devices()[:1] if shape == {"data": 1} else jax.devices()
    mesh = parallel.create_mesh(shape, devices=devices)
    params = parallel.init_params(model, jax.random.key(0), mesh, None, tokens)
    fn = jax.jit(lambda p, t, m: sequence_logps(model, p, t, m, chunk_size=8)[0])
    with parallel.with_mesh_rules(mesh):
      t_g, m_g = parallel.host_to_global((tokens, mask), mesh)
      results.append(np.asarray(fn(params, t_g, m_g)))
  np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-4)

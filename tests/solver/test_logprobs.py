"""Chunked response log-probs: equal to the full-logits computation, in value and gradient,
without a [B, T, V] array anywhere in the program, and the same on a sharded mesh."""

import re

import flax.linen as nn
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


def test_the_chunk_loops_carry_no_logits_sized_array(small_config, pairs_factory):
  """Under value_and_grad, no while loop of the program takes a [B, chunk, V] operand: JAX's
  partial evaluation of the chunk scan hoisted the compare-and-select's iota and zeros out of
  the forward loop, two chunk-logits-sized arrays read by every chunk; the chunk's own VJP
  (a gather forward) leaves nothing of that size to hoist."""
  model, params, pairs = _setup(small_config, pairs_factory, n=2, t=32)
  tokens, mask = pairs["chosen_tokens"], pairs["chosen_loss_mask"]
  v = small_config.vocab_size

  def loss(p):
    return sequence_logps(model, p, tokens, mask, chunk_size=8)[0].sum()
  text = jax.jit(jax.value_and_grad(loss)).lower(params).as_text()
  loops = [line for line in text.splitlines() if "stablehlo.while" in line]
  assert len(loops) >= 2  # the forward and the backward chunk loops (and the layers')
  chunk_logits = re.compile(rf"tensor<2x8x{v}x")
  assert not any(chunk_logits.search(line) for line in loops), [
      line[:200] for line in loops if chunk_logits.search(line)]


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


def _longest_response(mask):
  return int(np.asarray(mask).sum(axis=1).max())


@pytest.mark.parametrize("extra", [0, 3])  # exactly the longest response, and some slack
def test_scored_length_equals_full_logits(small_config, pairs_factory, extra):
  """Unembedding only the scored positions (prompts of different lengths per row) gives the
  same log-probs, counts and gradients as unembedding all of them."""
  model, params, pairs = _setup(small_config, pairs_factory, n=4, t=32)
  tokens, mask = pairs["chosen_tokens"], pairs["chosen_loss_mask"]
  starts = np.argmax(mask, axis=1)
  assert len(set(starts.tolist())) > 1, starts  # the responses start at different positions
  scored = _longest_response(mask) + extra
  assert scored < 32
  fn = lambda p, s: sequence_logps(model, p, tokens, mask, chunk_size=5, scored_length=s)
  got, count = jax.jit(lambda p: fn(p, scored))(params)
  want, want_count = _naive(model, params, tokens, mask)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-4)
  np.testing.assert_array_equal(count, want_count)
  w = jnp.array([1.0, -2.0, 0.5, 0.25])
  g = jax.jit(jax.grad(lambda p: fn(p, scored)[0] @ w))(params)
  g_all = jax.jit(jax.grad(lambda p: fn(p, None)[0] @ w))(params)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_all)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_scored_length_unembeds_only_the_scored_positions(small_config, pairs_factory):
  model, params, pairs = _setup(small_config, pairs_factory, n=2, t=32)
  tokens, mask = pairs["chosen_tokens"], pairs["chosen_loss_mask"]
  v, scored = small_config.vocab_size, _longest_response(mask)

  def vocab_shapes(scored_length):
    loss = lambda p: sequence_logps(model, p, tokens, mask, chunk_size=32,
                                    scored_length=scored_length)[0].sum()
    return {s for s in _shapes(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
            if len(s) == 3 and s[-1] == v}
  assert vocab_shapes(None) == {(2, 32, v)}
  assert vocab_shapes(scored) == {(2, scored, v)}
  assert vocab_shapes(32) == {(2, 32, v)}  # >= T: all positions, as None


def test_scored_positions_keep_order_and_fill_with_unscored():
  weights = jnp.array([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 1]], jnp.float32)
  got = np.asarray(logprobs.scored_positions(weights, 4))
  np.testing.assert_array_equal(got[0, :3], [1, 2, 4])
  assert got[1, 0] == 5
  for row, w in zip(got, np.asarray(weights)):  # the fill slots carry no weight
    assert len(set(row.tolist())) == 4 and w[row].sum() == w.sum()


def test_scored_length_below_one_is_refused(small_config, pairs_factory):
  model, params, pairs = _setup(small_config, pairs_factory)
  with pytest.raises(ValueError, match="scored_length must be >= 1"):
    sequence_logps(model, params, pairs["chosen_tokens"], pairs["chosen_loss_mask"],
                   scored_length=0)


def _table_casts(jaxpr, shape, in_loop=False):
  """(inside a scan or while body?, from dtype, to dtype) of each convert_element_type of a
  `shape` array in `jaxpr` and the jaxprs nested in it."""
  for eqn in jaxpr.eqns:
    if (eqn.primitive.name == "convert_element_type"
        and tuple(eqn.invars[0].aval.shape) == shape):
      yield in_loop, str(eqn.invars[0].aval.dtype), str(eqn.outvars[0].aval.dtype)
    loop = in_loop or eqn.primitive.name in ("scan", "while")
    for p in eqn.params.values():
      for inner in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          yield from _table_casts(inner, shape, loop)


def test_float32_table_is_cast_once_outside_the_chunk_loops(small_config, pairs_factory):
  """With float32 params and bfloat16 compute, the chunks read a bfloat16 copy of the table
  made once before the loops: the one float32 -> bfloat16 [V, D] convert left inside them is
  the table gradient's own rounding in the backward (`einsum_f32`'s), where the forward and
  the backward chunk loops each cast the table too before. The gradients are those of the
  full logits to bfloat16's precision, the table's in float32."""
  cfg = small_config.replace(dtype="bfloat16")
  model = Transformer(cfg)
  pairs = pairs_factory(3, 24, seed=1)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), pairs["chosen_tokens"])["params"])
  table = params["embedder"]["input_embedding"]
  assert table.dtype == jnp.float32
  tokens, mask = pairs["chosen_tokens"], pairs["chosen_loss_mask"]
  w = jnp.array([1.0, -2.0, 0.5])
  loss = lambda p: sequence_logps(model, p, tokens, mask, chunk_size=7)[0] @ w
  casts = list(_table_casts(jax.make_jaxpr(jax.grad(loss))(params).jaxpr, table.shape))
  assert casts.count((True, "float32", "bfloat16")) == 1, casts
  assert casts.count((False, "float32", "bfloat16")) == 1, casts
  g = jax.jit(jax.grad(loss))(params)
  g_ref = jax.jit(jax.grad(lambda p: _naive(model, p, tokens, mask)[0] @ w))(params)
  assert g["embedder"]["input_embedding"].dtype == jnp.float32
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.03 * np.abs(b).max())


def test_log_normaliser_of_bounded_logits_equals_logsumexp():
  """One pass (no max) for logits within a soft-cap; the shifted form otherwise."""
  rng = np.random.default_rng(0)
  v = 256000
  rows = [rng.uniform(-30, 30, v), np.full(v, -30.0), np.full(v, 30.0),
          np.where(np.arange(v) == 7, 30.0, -30.0), rng.normal(0, 3, v)]
  logits = jnp.asarray(np.stack(rows), jnp.float32)
  exact = np.asarray(logits, np.float64)  # the reference in float64, shifted by the max
  top = exact.max(axis=-1, keepdims=True)
  want = (top + np.log(np.exp(exact - top).sum(axis=-1, keepdims=True)))[:, 0]
  got = jax.jit(lambda x: logprobs.log_normaliser(x, 30.0))(logits)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
  # One pass: a sum of exps, no max over the row.
  primitives = {e.primitive.name for e in jax.make_jaxpr(
      lambda x: logprobs.log_normaliser(x, 30.0))(logits).jaxpr.eqns}
  assert "reduce_sum" in primitives and "reduce_max" not in primitives, primitives
  # Unbounded (or too loose a bound for one pass): exp would overflow; the max is subtracted.
  big = logits * 40.0
  for bound in (None, 1200.0):
    got = jax.jit(lambda x: logprobs.log_normaliser(x, bound))(big)
    np.testing.assert_allclose(got, jax.nn.logsumexp(big, axis=-1), rtol=1e-6)
    assert np.isfinite(np.asarray(got)).all()


def _vocab_reductions(jaxpr, vocab):
  """Names of the reductions over a last axis of `vocab` entries in `jaxpr` and nested ones."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("reduce_max", "reduce_sum"):
      shape = eqn.invars[0].aval.shape
      if shape and shape[-1] == vocab and len(shape) - 1 in eqn.params["axes"]:
        yield eqn.primitive.name
    for p in eqn.params.values():
      for inner in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          yield from _vocab_reductions(inner, vocab)


@pytest.mark.parametrize("cap", [30.0, None])
def test_backward_reuses_the_forward_log_normaliser(small_config, pairs_factory, cap):
  """The backward chunk reads the log-normaliser the forward computed: the only reductions over
  the vocabulary in the gradient's program are the forward's (one sum for soft-capped logits,
  a max and a sum without a cap; before, the backward recomputed both). Gradients equal the
  full logits'."""
  cfg = small_config.replace(final_logit_softcap=cap)
  model, params, pairs = _setup(cfg, pairs_factory)
  tokens, mask = pairs["chosen_tokens"], pairs["chosen_loss_mask"]
  w = jnp.array([1.0, -2.0, 0.5])
  loss = lambda p: sequence_logps(model, p, tokens, mask, chunk_size=7)[0] @ w
  found = sorted(_vocab_reductions(jax.make_jaxpr(jax.grad(loss))(params).jaxpr,
                                   cfg.vocab_size))
  assert found == (["reduce_sum"] if cap else ["reduce_max", "reduce_sum"]), found
  g = jax.jit(jax.grad(loss))(params)
  g_ref = jax.jit(jax.grad(lambda p: _naive(model, p, tokens, mask)[0] @ w))(params)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

"""Token selection: the exact nucleus without a sort (every top-p method against float64 and
against each other), top-k, greedy, sampling statistics, and no sort in the sampler's program."""

import functools
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_jax.sampler import Sampler, sampling

_spec = importlib.util.spec_from_file_location(
    "sampler_tests_reference", os.path.join(os.path.dirname(__file__), "reference.py"))
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


METHODS = {"threshold": sampling.nucleus_mask_threshold, "radix": sampling.nucleus_mask_radix,
           "sort": sampling.nucleus_mask_sort}
_JIT = {name: jax.jit(fn) for name, fn in METHODS.items()}  # top_p traced: one compile a shape
TOP_PS = (1e-6, 0.05, 0.5, 0.9, 0.999999, 1.0)
# A token may land on either side of the boundary only if the float64 mass before its tie group
# is this close to top_p: float32 sums of up to 256k probabilities (the sort's cumsum and the
# threshold search's blocked sums both stay below ~1e-6 here).
MARGIN = 2e-6


def _nucleus64(logits, top_p, keep=None, scale=1.0):
  """float64 nucleus of softmax(float32 logits * scale), and per token |mass before its tie
  group - top_p|.

  Tokens with equal logits form one group (all in or all out); top_p is rounded to float32 as
  the device sees it. Rows with nothing finite are kept whole (& keep), like the sort.
  """
  z = np.where(keep, logits, -np.inf) if keep is not None else logits
  z = z.astype(np.float64)
  top_p = float(np.float32(top_p))
  out = np.zeros(z.shape, bool)
  margin = np.full(z.shape, np.inf)
  for r in range(z.shape[0]):
    if not np.any(np.isfinite(z[r])):
      out[r] = True
      continue
    p = np.exp((z[r] - z[r].max()) * scale)
    p /= p.sum()
    values, group = np.unique(-z[r], return_inverse=True)  # groups, largest logit first
    mass = np.bincount(group, weights=p, minlength=len(values))
    before = np.cumsum(mass) - mass
    out[r] = (before < top_p)[group]
    margin[r] = np.abs(before - top_p)[group]
  return (out & keep if keep is not None else out), margin


def _check_nucleus(logits, keep=None, top_ps=TOP_PS, methods=tuple(METHODS)):
  """Every method against float64 (and the threshold search against the sort) at each top_p:
  equal except for tokens within MARGIN of the boundary. Returns how many tokens differed
  from the sort, per top_p, for the threshold search."""
  logits = np.asarray(logits, np.float32)
  jkeep = None if keep is None else jnp.asarray(keep)
  differ = {}
  for top_p in top_ps:
    want, margin = _nucleus64(logits, top_p, keep)
    got = {name: np.asarray(_JIT[name](jnp.asarray(logits), jnp.float32(top_p), jkeep))
           for name in methods}
    for name, mask in got.items():
      bad = (mask != want) & (margin >= MARGIN)
      assert not bad.any(), (name, top_p, np.argwhere(bad)[:5], margin[mask != want].max())
      if keep is not None:
        assert not np.any(mask & ~keep), (name, top_p)
      assert np.all(mask.sum(-1) >= 1) or keep is not None, (name, top_p)  # never empty
    if "threshold" in got and "sort" in got:
      split = got["threshold"] != got["sort"]
      assert not np.any(split & (margin >= MARGIN)), (top_p, margin[split].max())
      differ[top_p] = int(split.sum())
  return differ


def _random_logits(rng, rows, vocab):
  scale = rng.uniform(0.05, 8.0, size=(rows, 1))
  return (rng.normal(size=(rows, vocab)) * scale).astype(np.float32)


@pytest.mark.parametrize("shape", [(48, 384), (7, 1000), (5, 257), (3, 1), (2, 2)])
def test_nucleus_equals_float64_reference_and_sort(shape):
  rng = np.random.default_rng(shape[0] * 1000 + shape[1])
  logits = _random_logits(rng, *shape)
  if shape[1] >= 20:
    logits[:4, :10] = logits[:4, :1]  # ties at the top
    logits[4:6, 5:] = -np.inf  # masked tokens
  _check_nucleus(logits)


def test_nucleus_with_a_top_k_keep_mask_and_whole_masked_rows():
  rng = np.random.default_rng(1)
  logits = _random_logits(rng, 12, 384)
  logits[0] = -np.inf  # nothing finite: the whole row (& keep), as the sort does
  logits[1, 7:] = -np.inf
  keep = np.array(sampling.top_k_mask(jnp.asarray(logits), 30))
  keep[2] = False  # a row top-k left nothing of: stays empty
  _check_nucleus(logits, keep)
  _check_nucleus(logits)


def test_nucleus_ties_at_the_boundary():
  rng = np.random.default_rng(2)
  # Few distinct values: every boundary is a tie group, often a large one.
  many_ties = rng.integers(-3, 4, size=(16, 500)).astype(np.float32)
  # Uniform rows: one group holding the whole vocabulary; a single distinct token on top.
  flat = np.zeros((4, 300), np.float32)
  flat[1, 17] = 0.5
  flat[2, :150] = 1.0
  flat[3, ::3] = -1e-7  # distinct logits whose exp rounds to the same float32 (radix: tied)
  _check_nucleus(many_ties)
  _check_nucleus(flat, methods=("threshold", "sort"))
  # A group of equal logits straddling top_p: in whole, though its last members are not needed.
  four = np.array([[2.0, 1.0, 1.0, 1.0, 1.0, -np.inf]], np.float32)
  for fn in METHODS.values():
    np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(four), 0.6))[0],
                                  [True] * 5 + [False])
    np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(four), 0.2))[0],
                                  [True] + [False] * 5)


def test_nucleus_extreme_logits():
  rng = np.random.default_rng(3)
  base = rng.normal(size=(6, 400)).astype(np.float32)
  rows = np.stack([
      base[0] * 1e4,  # one dominant token (everything else exp()s to 0)
      base[1] * 1e-6,  # near-uniform: the nucleus is almost the whole vocabulary
      base[2] + 1e30,  # huge offset: all tie in float32
      base[3] * 3e37,  # near the float32 range, l - max overflows to -inf
      # Tiny positive logits (distinct, but exp() of them all rounds to 1: the old radix
      # would tie them) and zeros of both signs. (Denormals are left out: XLA flushes them to
      # zero in comparisons, for every method alike.)
      np.where(base[4] > 0, base[4] * 1e-30, base[4]),
      np.where(base[5] > 1.5, 40.0, -40.0),  # two levels, 80 apart
  ]).astype(np.float32)
  rows[4, :3] = [0.0, -0.0, 0.0]
  _check_nucleus(rows, methods=("threshold", "sort"))


def test_nucleus_bf16_origin_logits():
  rng = np.random.default_rng(4)
  logits = jnp.asarray(_random_logits(rng, 16, 2000)).astype(jnp.bfloat16)
  # bf16 keeps 8 bits of mantissa: thousands of exact ties, as from a bf16 unembedding.
  _check_nucleus(np.asarray(logits.astype(jnp.float32)))


def test_nucleus_full_gemma_vocabulary_row():
  rng = np.random.default_rng(5)
  vocab = 256000
  logits = np.stack([rng.normal(size=vocab) * 0.3,  # random weights: near-flat, the worst case
                     rng.normal(size=vocab) * 3.0]).astype(np.float32)
  differ = _check_nucleus(logits, top_ps=(1e-6, 0.5, 0.9, 0.999999, 1.0),
                          methods=("threshold", "sort"))
  # The near-flat row's nucleus at 0.9 holds ~90% of the vocabulary; both agree outright there.
  assert differ[0.5] == 0 and differ[0.9] <= 2, differ


@pytest.mark.parametrize("bits", [1, 2, 4, 6])
def test_threshold_bits_per_pass(bits):
  rng = np.random.default_rng(6)
  logits = _random_logits(rng, 8, 999)
  logits[:2, :50] = np.round(logits[:2, :50])
  fn = jax.jit(functools.partial(sampling.nucleus_mask_threshold, bits=bits))
  for top_p in (1e-6, 0.5, 0.9, 0.999999):
    want, margin = _nucleus64(logits, top_p)
    got = np.asarray(fn(jnp.asarray(logits), jnp.float32(top_p)))
    assert not np.any((got != want) & (margin >= MARGIN)), (bits, top_p)
  with pytest.raises(ValueError, match="bits=9"):
    sampling.nucleus_mask_threshold(jnp.asarray(logits), 0.5, bits=9)


def test_threshold_top_p_per_row():
  rng = np.random.default_rng(7)
  logits = np.tile(rng.normal(size=(1, 300)).astype(np.float32), (4, 1))  # one row, 4 top_p
  top_p = np.array([0.1, 0.5, 0.9, 0.99], np.float32)
  got = np.asarray(_JIT["threshold"](jnp.asarray(logits), jnp.asarray(top_p)))
  want = np.asarray(_JIT["sort"](jnp.asarray(logits), jnp.asarray(top_p)))
  np.testing.assert_array_equal(got, want)
  assert len(set(got.sum(-1))) == 4  # four different nuclei


def test_top_k_mask_keeps_k_and_ties():
  logits = jnp.asarray([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, 1.0, 1.0, 1.0, -1.0]])
  np.testing.assert_array_equal(sampling.top_k_mask(logits, 2),
                                [[False, True, False, True, False], [False, True, True, True,
                                                                     False]])


def test_top_p_samples_only_the_nucleus_with_renormalised_frequencies():
  probs = np.array([0.5, 0.3, 0.1, 0.05, 0.05])
  n = 20000
  logits = jnp.asarray(np.tile(np.log(probs), (n, 1)), jnp.float32)
  toks = np.asarray(sampling.sample_tokens(_keys(n), logits, greedy=False, temperature=1.0,
                                           top_k=None, top_p=0.75, use_top_p=True))
  # Nucleus for 0.75: {0 (mass before 0), 1 (mass before 0.5)}; token 2 has 0.8 before it.
  assert set(np.unique(toks)) == {0, 1}
  freq, want = np.mean(toks == 0), 0.5 / 0.8
  assert abs(freq - want) < 4 * np.sqrt(want * (1 - want) / n)


def test_temperature_and_no_filter_match_the_tempered_distribution():
  probs = np.array([0.4, 0.3, 0.2, 0.1])
  n = 20000
  logits = jnp.asarray(np.tile(np.log(probs), (n, 1)), jnp.float32)
  for temperature in (1.0, 0.5):
    toks = np.asarray(sampling.sample_tokens(_keys(n, 1), logits, greedy=False,
                                             temperature=temperature, top_k=None, top_p=1.0,
                                             use_top_p=False))
    want = probs ** (1 / temperature)
    want /= want.sum()
    freq = np.bincount(toks, minlength=4) / n
    np.testing.assert_array_less(np.abs(freq - want), 4 * np.sqrt(want * (1 - want) / n))


def test_top_k_one_and_greedy_pick_the_argmax_and_rows_are_independent():
  logits = jax.random.normal(jax.random.key(3), (16, 384))
  argmax = np.argmax(np.asarray(logits), -1)
  greedy = sampling.sample_tokens(_keys(16), logits, greedy=True, temperature=1.0, top_k=None,
                                  top_p=1.0, use_top_p=False)
  top1 = sampling.sample_tokens(_keys(16), logits, greedy=False, temperature=2.0, top_k=1,
                                top_p=0.9, use_top_p=True)
  np.testing.assert_array_equal(greedy, argmax)
  np.testing.assert_array_equal(top1, argmax)
  # A row's draw depends on its own key only, not on which other rows share the batch.
  kw = dict(greedy=False, temperature=1.0, top_k=None, top_p=0.9, use_top_p=True)
  full = sampling.sample_tokens(_keys(16), logits, **kw)
  half = sampling.sample_tokens(_keys(16)[8:], logits[8:], **kw)
  np.testing.assert_array_equal(full[8:], half)


def _mask_then_argmax(keys, logits, temperature, top_k, top_p, use_top_p, method):
  """Token selection the long way: a tempered copy, the nucleus as a mask (the threshold
  method's from the logits as given with the tempered masses, as the fused draw defines it;
  the sort's from the copy), Gumbel-max, then a separate log-softmax."""
  scale = 1 / jnp.float32(temperature)
  scaled = logits * scale
  keep = None
  if method == "threshold":
    keep = None if top_k is None else sampling.top_k_mask(logits, top_k)
    if use_top_p:
      tau = sampling.nucleus_threshold(logits, jnp.float32(top_p), keep, logit_scale=scale)
      keep = logits >= tau[:, None] if keep is None else (logits >= tau[:, None]) & keep
  else:
    keep = None if top_k is None else sampling.top_k_mask(scaled, top_k)
    if use_top_p:
      keep = METHODS[method](scaled, jnp.float32(top_p), keep)
  if keep is not None:
    scaled = jnp.where(keep, scaled, -jnp.inf)
  gumbel = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[-1:], jnp.float32))(keys)
  tokens = jnp.argmax(scaled + gumbel, axis=-1).astype(jnp.int32)
  return tokens, sampling.token_logprobs(logits, tokens)


@pytest.mark.parametrize("method", ["threshold", "sort"])
@pytest.mark.parametrize("vocab", [257, 1000])  # 257: the blocked passes pad the row
def test_sample_tokens_and_logprobs_equal_the_mask_then_argmax_reference(method, vocab):
  """One fused token draw (the search on unscaled logits, the draw and the log-prob's
  normaliser in one pass) gives the same tokens as masking a scaled copy and taking the
  argmax, and the same log-probs as a log-softmax, across temperatures, top-k and top-p."""
  rng = np.random.default_rng(vocab)
  logits = _random_logits(rng, 24, vocab)
  logits[0, :20] = logits[0, :1]  # ties at the top
  logits[1, 9:] = -np.inf  # masked tokens
  logits[2, ::2] = np.round(logits[2, ::2])
  logits = jnp.asarray(logits)
  fused = jax.jit(sampling.sample_tokens_and_logprobs, static_argnames=(
      "greedy", "top_k", "use_top_p", "top_p_method", "bits"))
  reference = jax.jit(_mask_then_argmax, static_argnums=(3, 5, 6))
  seen = set()
  for seed, (temperature, top_k, top_p, use_top_p) in enumerate([
      (0.7, None, 0.9, True), (1.0, None, 0.5, True), (2.5, None, 0.999999, True),
      (0.7, 5, 0.9, True), (1.3, None, 1.0, False), (0.7, 40, 1.0, False)]):
    keys = _keys(24, seed)
    got_tok, got_lp = fused(keys, logits, greedy=False, temperature=jnp.float32(temperature),
                            top_k=top_k, top_p=jnp.float32(top_p), use_top_p=use_top_p,
                            top_p_method=method)
    want_tok, want_lp = reference(keys, logits, temperature, top_k, top_p, use_top_p, method)
    np.testing.assert_array_equal(got_tok, want_tok)
    np.testing.assert_allclose(got_lp, want_lp, rtol=0, atol=2e-6)
    assert np.all(np.asarray(got_tok) < vocab)
    seen.update(np.asarray(got_tok).tolist())
  assert len(seen) > 24  # the draws vary: the check compares something
  # Greedy: the argmax, and the same log-softmax.
  tok, lp = sampling.sample_tokens_and_logprobs(_keys(24), logits, greedy=True, temperature=1.0,
                                                top_k=None, top_p=1.0, use_top_p=False)
  np.testing.assert_array_equal(tok, np.argmax(np.asarray(logits), -1))
  np.testing.assert_allclose(lp, sampling.token_logprobs(logits, tok), atol=0)


def test_logits_given_over_a_unit_sample_the_logits_nucleus_with_their_logprobs():
  """Logits handed over as tanh(z / cap) with logit_unit=cap (as the sampler reads a Gemma 2's
  soft-capped unembedding): the tokens come from the tempered nucleus of the logits
  cap * tanh(z / cap), the same draws as from the logits themselves except at the float32
  boundary, and the log-probs are the logits' log-softmax."""
  rng = np.random.default_rng(10)
  cap = 30.0
  over = np.tanh(rng.normal(size=(64, 2000)) * rng.uniform(0.02, 0.3, (64, 1))).astype(
      np.float32)
  logits = jnp.asarray(over) * jnp.float32(cap)  # what the model's cap computes
  fused = jax.jit(sampling.sample_tokens_and_logprobs, static_argnames=(
      "greedy", "top_k", "use_top_p", "top_p_method", "bits", "logit_unit"))
  for seed, (temperature, top_k, top_p) in enumerate([(0.7, None, 0.9), (1.0, 50, 0.5),
                                                      (1.5, None, 0.99)]):
    kw = dict(greedy=False, temperature=jnp.float32(temperature), top_k=top_k,
              top_p=jnp.float32(top_p), use_top_p=True)
    tok, lp = fused(_keys(64, seed), jnp.asarray(over), logit_unit=cap, **kw)
    want_tok, _ = fused(_keys(64, seed), logits, **kw)
    keep = None if top_k is None else np.asarray(sampling.top_k_mask(logits, top_k))
    nucleus, margin = _nucleus64(np.asarray(logits), top_p, keep, scale=1 / temperature)
    tok = np.asarray(tok)
    rows = np.arange(64)
    assert np.all(nucleus[rows, tok] | (margin[rows, tok] < MARGIN)), temperature
    assert np.mean(tok == np.asarray(want_tok)) >= 0.95
    np.testing.assert_allclose(lp, sampling.token_logprobs(logits, jnp.asarray(tok)),
                               rtol=0, atol=2e-6)


def test_threshold_search_with_a_logit_scale_is_the_tempered_nucleus():
  """tau on the logits as given, masses of softmax(logits / temperature): the float64
  tempered nucleus (ties at the logits' resolution), up to float32 rounding at the boundary;
  with top-k's keep mask too."""
  rng = np.random.default_rng(8)
  logits = _random_logits(rng, 16, 999)
  logits[:2, :50] = np.round(logits[:2, :50])  # tie groups
  logits[2, 7:] = -np.inf
  keep = np.asarray(sampling.top_k_mask(jnp.asarray(logits), 60))
  search = jax.jit(sampling.nucleus_threshold)
  for temperature in (0.3, 0.7, 1.0, 4.0):
    scale = 1 / np.float32(temperature)
    for top_p in (1e-6, 0.5, 0.9, 0.999999):
      for k in (None, keep):
        want, margin = _nucleus64(logits, top_p, k, scale=float(scale))
        tau = search(jnp.asarray(logits), jnp.float32(top_p),
                     None if k is None else jnp.asarray(k), logit_scale=jnp.float32(scale))
        got = logits >= np.asarray(tau)[:, None]
        got = got if k is None else got & k
        assert not np.any((got != want) & (margin >= MARGIN)), (temperature, top_p)
        assert np.all(got.sum(-1) >= 1)


def test_argmax_and_sum_tie_rule_and_masked_rows():
  scores = jnp.asarray([[1.0, 3.0, 3.0, 2.0, 3.0],  # ties: the first index, like jnp.argmax
                        [-np.inf] * 5,  # nothing allowed: index 0, like jnp.argmax
                        [0.0, np.nan, 5.0, np.nan, 1.0]], jnp.float32)  # NaN wins, first one
  weights = jnp.asarray(np.arange(15, dtype=np.float32).reshape(3, 5))
  best, total = sampling._argmax_and_sum(scores, weights)
  np.testing.assert_array_equal(best, [1, 0, 1])
  np.testing.assert_array_equal(best, jnp.argmax(scores, -1))
  np.testing.assert_allclose(total, [10.0, 35.0, 60.0])
  # A whole Gemma row, blocked (256000 = 500 x 512): the argmax and an accurate sum.
  rng = np.random.default_rng(9)
  row = rng.normal(size=(2, 256000)).astype(np.float32)
  row[1, 123456] = row[1, 200001] = 10.0
  best, total = sampling._argmax_and_sum(jnp.asarray(row), jnp.exp(jnp.asarray(row)))
  np.testing.assert_array_equal(best, [np.argmax(row[0]), 123456])
  np.testing.assert_allclose(total, np.exp(row.astype(np.float64)).sum(-1), rtol=1e-6)


def test_token_logprobs_is_log_softmax():
  logits = jax.random.normal(jax.random.key(4), (3, 50)) * 4
  toks = jnp.asarray([0, 7, 49])
  want = jax.nn.log_softmax(logits, -1)[jnp.arange(3), toks]
  np.testing.assert_allclose(sampling.token_logprobs(logits, toks), want, atol=1e-6)


def test_validate_rejects_bad_settings():
  with pytest.raises(ValueError, match="temperature=-0.5"):
    sampling.validate(-0.5, None, 1.0, 10)
  with pytest.raises(ValueError, match=r"top_k=0.*\[1, 10\]"):
    sampling.validate(1.0, 0, 1.0, 10)
  with pytest.raises(ValueError, match="top_p=1.5"):
    sampling.validate(1.0, None, 1.5, 10)
  assert sampling.DEFAULT_TOP_P_METHOD == "threshold" and set(sampling.TOP_P_METHODS) == set(
      METHODS)
  with pytest.raises(ValueError, match="top_p_method='heap'"):
    sampling.filter_mask(jnp.zeros((1, 4)), None, 0.5, True, "heap")
  sampling.validate(0.0, 10, 1.0, 10)


_SORT_OP = re.compile(r"\ssort\(")


@pytest.mark.parametrize("method", ["threshold", "sort"])
def test_decode_program_sorts_only_with_the_sort_method(method):
  """The sampler's compiled program (prefill + decode loop) with top-p on and no top-k: the
  default method leaves no sort op in it; the sort method's has one (so the check can fail)."""
  model, mesh, params = ref.load_sibling("mp_targets").build("tiny", num_devices=1)
  sampler = Sampler(model, mesh, top_p_method=method) if method != "threshold" else Sampler(
      model, mesh)  # the default
  assert sampler.top_p_method == method
  prompts = [[2, 5, 9, 11], [2, 7]]
  out = sampler.sample(params, prompts, max_new_tokens=6, temperature=0.8, top_p=0.85,
                       top_k=None, stop_tokens=[])
  assert [len(s.tokens) for per in out for s in per] == [6, 6]
  (program,) = sampler._programs.values()
  hlo = program.as_text()
  # The decode loop, and in it the threshold search's own loop over bit groups.
  assert len(re.findall(r"\swhile\(", hlo)) >= (2 if method == "threshold" else 1)
  assert bool(_SORT_OP.search(hlo)) == (method == "sort")

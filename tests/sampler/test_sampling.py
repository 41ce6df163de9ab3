"""Token selection: the exact nucleus without a sort, top-k, greedy, and sampling statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_jax.sampler import sampling


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


def _nucleus64(logits, top_p, keep=None):
  """float64 reference nucleus and, per token, how far its mass-before is from top_p."""
  z = np.where(keep, logits, -np.inf) if keep is not None else logits.astype(np.float64)
  out = np.zeros(z.shape, bool)
  margin = np.full(z.shape, np.inf)
  for r in range(z.shape[0]):
    p = np.exp(z[r] - z[r].max())
    p /= p.sum()
    order = np.argsort(-z[r], kind="stable")
    before = np.cumsum(p[order]) - p[order]
    last = np.sum(before < top_p) - 1
    out[r] = z[r] >= z[r, order[last]]
    margin[r, order] = np.abs(before - top_p)
  return out, margin


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("with_top_k", [False, True])
def test_radix_nucleus_equals_float64_reference(top_p, with_top_k):
  rng = np.random.default_rng(int(top_p * 100) + with_top_k)
  scale = rng.uniform(0.05, 8.0, size=(48, 1))
  logits = (rng.normal(size=(48, 384)) * scale).astype(np.float32)
  logits[:4, :10] = logits[:4, :1]  # ties at the top
  logits[4:8, 100:] = -np.inf  # masked tokens
  keep = np.asarray(sampling.top_k_mask(jnp.asarray(logits), 30)) if with_top_k else None
  radix = np.asarray(sampling.nucleus_mask_radix(jnp.asarray(logits), top_p,
                                                 None if keep is None else jnp.asarray(keep)))
  sort = np.asarray(sampling.nucleus_mask_sort(jnp.asarray(logits), top_p,
                                               None if keep is None else jnp.asarray(keep)))
  want, margin = _nucleus64(logits, top_p, keep)
  # Only a token whose mass-before lies within float32 rounding of top_p may differ.
  for got in (radix, sort):
    differ = got != want
    assert np.all(margin[differ] < 1e-5), margin[differ]
  assert np.mean(radix == want) > 0.999
  assert radix.sum(-1).min() >= 1  # never empty
  if keep is not None:
    assert not np.any(radix & ~keep)


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
  with pytest.raises(ValueError, match="top_p_method='heap'"):
    sampling.filter_mask(jnp.zeros((1, 4)), None, 0.5, True, "heap")
  sampling.validate(0.0, 10, 1.0, 10)

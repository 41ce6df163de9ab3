"""Token selection from float32 logits: greedy, temperature, top-k, top-p (nucleus).

Everything here works on one decode step's logits [R, V] (R rows, V vocabulary) and is meant to
run inside the sampler's jitted loop, so nothing syncs with the host.

Conventions:

* Filters are applied in HF's order: temperature, then top-k, then top-p on what top-k kept.
* Ties at a boundary are kept together: top-k keeps every token whose logit equals the k-th
  largest, and top-p keeps every token whose logit equals the last one the nucleus needs.
* The nucleus for `top_p` is the smallest set of highest-probability tokens whose mass
  reaches `top_p`: the tokens with logit >= tau*, where tau* is the largest logit such that
  the mass of tokens with logit >= tau* is >= top_p.
* Randomness is per row: the caller passes one key per row, so a row's draws depend only on
  its own key (not on the batch size, the padding or the sharding).

The nucleus is found without sorting the vocabulary (a sort of [R, 256k] every step is a
sizeable share of a memory-bound decode step; unmeasured here): `nucleus_mask_radix` finds tau*
exactly by a radix search over the bits of the float32 probabilities, five bits per pass,
six reductions over [R, V] in all. `nucleus_mask_sort` is the textbook sort-and-cumsum version,
kept as the reference the tests compare against and as a fallback (`top_p_method="sort"`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array

TOP_P_METHODS = ("radix", "sort")

_RADIX_BITS = 5  # bits of the threshold decided per pass (31 thresholds per reduction)
_RADIX_TOP_BIT = 29  # weights in (0, 1]: bits 31 and 30 of their float32 pattern are 0
_NEG_INF = -jnp.inf


def validate(temperature: float, top_k: Optional[int], top_p: float, vocab_size: int) -> None:
  """Raises ValueError for settings no sampler can honour (called on the host)."""
  if not temperature >= 0:
    raise ValueError(f"temperature={temperature!r}: use 0 for greedy decoding or a positive "
                     "value to sample.")
  if top_k is not None and not 1 <= int(top_k) <= vocab_size:
    raise ValueError(f"top_k={top_k!r}: use None (no top-k filter) or an integer in "
                     f"[1, {vocab_size}] (the vocabulary size).")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p!r}: use a value in (0, 1]; 1 turns the nucleus filter off.")


def top_k_mask(logits: Array, k: int) -> Array:
  """bool [R, V]: tokens whose logit is >= the k-th largest of its row (`k` static)."""
  kth = jax.lax.top_k(logits, k)[0][:, -1:]
  return logits >= kth


def nucleus_mask_radix(logits: Array, top_p: Array, keep: Optional[Array] = None) -> Array:
  """bool [R, V]: the top-p nucleus of softmax(logits) restricted to `keep`, found exactly.

  Works on w = exp(logits - max) in (0, 1], whose float32 bits, read as uint32, sort like the
  values (positive floats) and have the top two bits clear (w <= 1 < 2). A radix search finds
  the largest key T with mass(w >= T) >= top_p * sum(w), most significant bits first: with
  the bits above `shift` fixed in `prefix`, all 31 five-bit digits d are tried in one fused
  reduction over V, and the largest d with mass(key >= prefix | d << shift) >= target is kept.
  mass(key >= 0) is the whole row, so the invariant holds from prefix = 0 on; six passes fix
  bits 29..0, and then {key >= T} is the nucleus. Each pass reads w once ([R, V] float32):
  six reads in all, against a sort of the whole vocabulary.

  Ties are kept together at the resolution of w (two logits whose exp rounds to the same
  float32 count as tied).

  Args:
    logits: float32 [R, V], already divided by the temperature.
    top_p: float32 scalar or [R] in (0, 1].
    keep: optional bool [R, V]; tokens outside it (e.g. cut by top-k) have no mass and are
      never in the nucleus.
  """
  logits = logits.astype(jnp.float32)
  if keep is None:
    keep = jnp.ones(logits.shape, bool)
  row_max = jnp.max(jnp.where(keep, logits, _NEG_INF), axis=-1, keepdims=True)
  weights = jnp.where(keep, jnp.exp(logits - row_max), 0.0)  # unnormalised probabilities
  # top_p * total mass: comparing unnormalised sums avoids dividing every element.
  target = jnp.reshape(jnp.asarray(top_p, jnp.float32), (-1, 1)) * jnp.sum(weights, -1,
                                                                          keepdims=True)
  keys = jax.lax.bitcast_convert_type(weights, jnp.uint32)
  digits = jnp.arange(1, 1 << _RADIX_BITS, dtype=jnp.uint32)  # [31]
  prefix = jnp.zeros((logits.shape[0], 1), jnp.uint32)
  for shift in range(_RADIX_TOP_BIT + 1 - _RADIX_BITS, -1, -_RADIX_BITS):
    thresholds = prefix | (digits[None, :] << shift)  # [R, 31]
    # mass[r, d] = sum_v w[r, v] * (key[r, v] >= thresholds[r, d]): one fused pass over V.
    mass = jnp.sum(jnp.where(keys[:, :, None] >= thresholds[:, None, :], weights[:, :, None],
                             0.0), axis=1)
    # mass is non-increasing in d, so the count of digits that qualify is the largest one.
    chosen = jnp.sum((mass >= target).astype(jnp.uint32), axis=-1, keepdims=True)
    prefix = prefix | (chosen << shift)
  return keep & (keys >= prefix)


def nucleus_mask_sort(logits: Array, top_p: Array, keep: Optional[Array] = None) -> Array:
  """The reference nucleus (sort, cumulative sum); same contract as `nucleus_mask_radix`."""
  logits = logits.astype(jnp.float32)
  if keep is not None:
    logits = jnp.where(keep, logits, _NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1)
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  top_p = jnp.reshape(jnp.asarray(top_p, jnp.float32), (-1, 1))
  # The last sorted token the nucleus needs is the last one whose mass before is < top_p.
  needed = mass_before < top_p
  last = jnp.sum(needed.astype(jnp.int32), axis=-1, keepdims=True) - 1
  tau = jnp.take_along_axis(sorted_logits, jnp.maximum(last, 0), axis=-1)
  mask = logits >= tau
  return mask if keep is None else mask & keep


def filter_mask(scaled_logits: Array, top_k: Optional[int], top_p: Array, use_top_p: bool,
                top_p_method: str = "radix") -> Optional[Array]:
  """bool [R, V] of tokens that may be sampled, or None when nothing is filtered."""
  keep = None
  if top_k is not None and top_k < scaled_logits.shape[-1]:
    keep = top_k_mask(scaled_logits, top_k)
  if use_top_p:
    if top_p_method == "radix":
      keep = nucleus_mask_radix(scaled_logits, top_p, keep)
    elif top_p_method == "sort":
      keep = nucleus_mask_sort(scaled_logits, top_p, keep)
    else:
      raise ValueError(f"top_p_method={top_p_method!r}: use one of {TOP_P_METHODS}.")
  return keep


def sample_tokens(row_keys: Array, logits: Array, *, greedy: bool, temperature: Array,
                  top_k: Optional[int], top_p: Array, use_top_p: bool,
                  top_p_method: str = "radix") -> Array:
  """One token per row: int32 [R].

  Args:
    row_keys: [R] PRNG keys, one per row (ignored when greedy).
    logits: float32 [R, V].
    greedy: static; argmax (first index on ties), ignoring the other settings.
    temperature: positive float32 scalar (traced: changing it does not recompile).
    top_k: static int or None.
    top_p: float32 scalar (traced); only used when the static `use_top_p` is set.
    top_p_method: "radix" (exact, no sort) or "sort" (reference).
  """
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits.astype(jnp.float32) / temperature
  keep = filter_mask(scaled, top_k, top_p, use_top_p, top_p_method)
  if keep is not None:
    scaled = jnp.where(keep, scaled, _NEG_INF)
  # Gumbel-max: argmax(l + g) with g ~ Gumbel(0, 1) draws from softmax(l); per-row keys keep
  # each row's draw independent of the rest of the batch.
  gumbel = jax.vmap(lambda k: jax.random.gumbel(k, scaled.shape[-1:], jnp.float32))(row_keys)
  return jnp.argmax(scaled + gumbel, axis=-1).astype(jnp.int32)


def token_logprobs(logits: Array, tokens: Array) -> Array:
  """log softmax(logits)[token] at temperature 1, unfiltered: float32 [R] (teacher forcing's)."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)

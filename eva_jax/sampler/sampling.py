"""Token selection from float32 logits: greedy, temperature, top-k, top-p (nucleus).

Everything here works on one decode step's logits [R, V] (R rows, V vocabulary) and is meant to
run inside the sampler's jitted loop, so nothing syncs with the host.

Conventions:

* Filters are applied in HF's order: temperature (the logits times 1 / temperature), then
  top-k, then top-p on what top-k kept.
* Ties at a boundary are kept together: top-k keeps every token whose logit equals the k-th
  largest, and top-p keeps every token whose logit equals the last one the nucleus needs.
* The nucleus for `top_p` is the smallest set of highest-probability tokens whose mass
  reaches `top_p`: the tokens with logit >= tau*, where tau* is the largest logit such that
  the mass of tokens with logit >= tau* is >= top_p.
* Randomness is per row: the caller passes one key per row, so a row's draws depend only on
  its own key (not on the batch size, the padding or the sharding).

Top-p without sorting the vocabulary. `nucleus_mask_threshold` (the default, `top_p_method=
"threshold"`) finds the nucleus exactly with a radix search over the bits of the logits, in a
`lax.fori_loop` whose every pass is one fused, plain row reduction; `nucleus_mask_sort` is the
textbook sort-and-cumsum version, the reference the tests compare against (`"sort"`);
`nucleus_mask_radix` is the first radix formulation, kept for comparison (`"radix"`; see below
why it is not the default).

How `nucleus_mask_threshold` works. The nucleus is {logit >= tau}, tau the smallest logit whose
group of larger-or-equal logits still needs it (module conventions above). Map every float32
to a uint32 key that sorts like the floats (flip the sign bit of positives, all bits of
negatives): tau's key T* is the largest key T with mass(logit >= float(T)) >= top_p * total,
and that predicate is monotone in T, so T* can be built most significant bits first. A pass
fixes `bits` more bits: with the bits above `shift` known (prefix), it measures the mass at
the 2^bits - 1 thresholds prefix + d << shift and keeps the largest d whose mass still reaches
the target. 32 bits = one pass of 32 mod `bits` (or `bits`) bits, then a loop of passes of
`bits`; with bits=3, 11 passes, 2 + 10 * 3 bits.

* Each pass reads the logits once and computes its 2^bits - 1 masses with ONE variadic
  `lax.reduce` (a row reduction: the reduced dimension is the minor one; then a tiny one over
  the blocks, below), so the program holds one big reduction fusion per pass whatever the
  backend's sibling-fusion heuristics do, and no [R, V, 2^bits] intermediate. The weights
  exp(logit - max) are recomputed inside the pass (one exp per element), from min(logit, hi)
  where hi bounds the pass's interval: an argument that changes every pass, so loop-invariant
  code motion cannot hoist exp out of the loop and make every pass read a second [R, V]
  array. Only tokens inside the pass's interval [prefix, hi) are summed; the mass above hi was
  measured by an earlier pass and is carried. With the row max, a step reads [R, V]
  1 + ceil(32 / bits) times (12 for bits=3) and writes nothing of that size.
* The sampler's step (`sample_tokens_and_logprobs`) hands the search the values the
  unembedding wrote (a Gemma 2's tanh(z / cap), before the cap's `* cap`) with the
  temperature and the cap as one `logit_scale` for the masses (`nucleus_threshold`), and
  draws the token and sums the log-prob's normaliser in one more pass: 13 reads of [R, V] a
  step and no write, where drawing from a tempered copy and a separate log-softmax took 15
  reads and a write (XLA:GPU, an H200 decode step of gemma2_2b at 256 rows, compiled here:
  27.5 -> 26.8 GB; XLA:TPU, one v5p chip: 27.5 either way, as it writes tanh's output apart
  from the unembedding's matmul).
* Summation order is fixed by blocking: [R, V] is viewed as [R, q, k] (k a divisor of V near
  sqrt(V); -inf padding when V has none), reduced over k and then over q. A flat variadic
  reduce is a plain sequential loop on XLA:CPU (relative error 4e-4 measured on 256k weights,
  against 5e-8 for a blocked or pairwise sum); blocked, the masses are within ~1e-6 of float64
  (measured on CPU; a GPU's tree-shaped reduction inside each block does at least as well),
  so the nucleus equals the sort's except for tokens whose float64 mass before them lies
  within float32 rounding of top_p (the tests check exactly that, up to V = 256000).
* Comparisons are in float (logit >= float(threshold key)), so -0 and +0 are one value, like
  in the sort; threshold keys beyond +-inf clamp to +-inf. Ties are kept together at logit
  resolution (as in the sort; not at the resolution of exp(), which can merge distinct logits).
* Rows that are all -inf give an all-True mask (& keep), like the sort. NaN or +inf logits are
  not supported (the sort gives NaN probabilities for them too).

Choosing `bits` (GPU reasoning; this code was only measured on CPU). At R=256, V=256k a pass
reads 268 MB of float32 logits: ~56 us at an H200's 4.8 TB/s. Its arithmetic per element is
~12 instructions (min, subtract, exp, compare, select) plus 3 (compare, select, add) per
threshold, i.e. 12 + 3 * (2^bits - 1); at ~33 T simple instructions/s over 65.5 M elements:
bits=2 -> ~41 us (memory-bound, 16 passes ~0.9 ms), bits=3 -> ~64 us (balanced, 11 passes
~0.7 ms), bits=4 -> ~110 us (compute-bound, 8 passes ~0.9 ms), bits=5 -> ~200 us. Each pass
also runs a few tiny [R, 2^bits] kernels (~10-20 us with launches), which favours fewer
passes. bits=3 is the default; `benchmarks/sampler.py --top_p_bench` times the choices. A
decode step of gemma2_2b at batch 256 takes ~20 ms, so ~1 ms is the budget to beat; sorting
[256, 256k] every step was measured at 0.92x of Tunix's throughput (issue 10). On a CPU (2
shared cores, where XLA emits variadic reductions as scalar loops) one step's token selection
on [256, 256000] took 17.1 s with bits=3 (18.8 s bits=2, 18.1 s bits=4), 27.8 s sorting and
22.3 s with the first radix, and compiled in 2-4 s: numbers about this CPU, not a GPU.

Why not the first radix (`nucleus_mask_radix`): it compares every weight with all 31
thresholds of a pass as a [R, V, 31] array reduced over V, a non-minor reduction with a tiny
minor dimension, in 6 unrolled passes; XLA:GPU (jax 0.11.2, H200) reported a very slow
compile in that input_reduce_fusion and had not finished after 200 s.

Why no top-k fast path (sort only the top K when their mass already reaches top_p): the batch
shares one program, so a `lax.cond` can only take the fast branch when every row's nucleus fits
in K, which near-flat rows (and random weights) never do; the check itself costs a top-k (a
pass over the vocabulary, and a sort on GPU for larger K) on every step, i.e. it slows down
the worst case it cannot help, and saves under 1 ms of a ~20 ms step in the best case.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array

TOP_P_METHODS = ("threshold", "radix", "sort")
DEFAULT_TOP_P_METHOD = "threshold"

THRESHOLD_BITS = 3  # bits of tau's key fixed per pass of `nucleus_mask_threshold`
_KEY_SIGN = 0x80000000
_KEY_NEG_INF = 0x007FFFFF  # key of -inf: the smallest key of a non-NaN float
_KEY_POS_INF = 0xFF800000  # key of +inf: the largest

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


def _key_to_float(key: Array) -> Array:
  """float32 whose order-preserving key is `key` (uint32), keys beyond +-inf clamped to +-inf.

  The key of a float is its bit pattern with the sign bit flipped if positive and every bit
  flipped if negative, so keys compare like the floats. The map is monotone; -0 and +0 (keys
  0x7FFFFFFF and 0x80000000) come out as the two zeros, which float comparisons treat as one.
  """
  key = jnp.clip(key, jnp.uint32(_KEY_NEG_INF), jnp.uint32(_KEY_POS_INF))
  bits = jnp.where(key >= jnp.uint32(_KEY_SIGN), key ^ jnp.uint32(_KEY_SIGN), ~key)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _block_size(v: int) -> int:
  """k for viewing a row of `v` as [ceil(v / k), k]: a divisor of v within a factor 2 of
  sqrt(v), preferably a multiple of 128 (then 32; whole vector loads on GPUs), the closest to
  sqrt(v) among those; else a power of two (the caller pads with -inf). 256000 -> 512."""
  root = math.sqrt(v)
  divisors = [d for d in range(max(1, math.ceil(root / 2)), math.floor(2 * root) + 1)
              if v % d == 0]
  for align in (128, 32, 1):
    aligned = [d for d in divisors if d % align == 0]
    if aligned:
      return min(aligned, key=lambda d: abs(math.log(d / root)))
  return 1 << max(0, math.ceil(math.log2(root)))


def _blocked_sums(operands: list) -> Array:
  """float32 [R, len(operands)]: the row sums of [R, q, k] operands, as one variadic reduction
  over k and one over q (one fusion each; fixed order, so accurate on every backend)."""
  zeros = (jnp.float32(0),) * len(operands)
  add = lambda a, b: tuple(x + y for x, y in zip(a, b))
  partial = jax.lax.reduce(tuple(operands), zeros, add, (2,))
  return jnp.stack(jax.lax.reduce(tuple(partial), zeros, add, (1,)), axis=-1)


def _row_blocks(x: Array, fill) -> Array:
  """[R, V] viewed as [R, q, k] (k = `_block_size(V)`), the tail padded with `fill`."""
  rows, vocab = x.shape
  k = _block_size(vocab)
  q = -(-vocab // k)
  if q * k != vocab:
    x = jnp.pad(x, ((0, 0), (0, q * k - vocab)), constant_values=fill)
  return x.reshape(rows, q, k)


def nucleus_threshold(logits: Array, top_p: Array, keep: Optional[Array] = None, *,
                      bits: int = THRESHOLD_BITS, logit_scale: Optional[Array] = None,
                      row_max: Optional[Array] = None) -> Array:
  """float32 [R]: tau, the nucleus of softmax(logits * logit_scale) being {logits >= tau}
  (& keep), found without a sort.

  The search of `nucleus_mask_threshold` (module docstring), returning the threshold instead
  of the mask so that a caller can apply it in a pass it runs anyway (`sample_tokens_and_
  logprobs` draws the token in that pass). Rows with nothing finite (or nothing in `keep`)
  give -inf: everything.

  Args:
    logits: float32 [R, V].
    top_p: float32 scalar or [R].
    keep: optional bool [R, V]; tokens outside it (e.g. cut by top-k) have no mass and are
      never in the nucleus.
    bits: static, 1..8: bits of the threshold fixed per pass over the vocabulary (2^bits - 1
      masses per pass, ceil(32 / bits) passes).
    logit_scale: optional positive float32 scalar (1 / temperature, times the unit the logits
      are given in): the masses are those of softmax(logits * logit_scale), weights
      exp((logit - max) * logit_scale), while tau
      stays a threshold on `logits` as given. So no scaled [R, V] copy is written and read
      back, and the caller's mask `logits >= tau` compares the very values the search did:
      a scaled value recomputed in another fusion may round differently (XLA:GPU turned
      (x * 30) * c, a soft-capped logit over the temperature, into x * (30 * c) in some
      fusions and not others), and one ulp there can empty a one-token nucleus.
      Ties are kept together at the resolution of `logits`.
    row_max: optional float32 [R], the row max of `logits` in `keep`, when the caller has it
      (one pass fewer).
  """
  if not 1 <= bits <= 8:
    raise ValueError(f"bits={bits!r}: use 1..8 bits per pass.")
  logits = logits.astype(jnp.float32)
  if keep is not None:
    logits = jnp.where(keep, logits, _NEG_INF)
  rows = logits.shape[0]
  blocks = _row_blocks(logits, _NEG_INF)
  if row_max is None:
    row_max = jnp.max(logits, axis=-1)
  shift_by = jnp.where(row_max == _NEG_INF, 0.0, row_max)[:, None, None]  # all -inf: no NaN
  scale = (lambda x: x) if logit_scale is None else (lambda x: x * logit_scale)
  top_p = jnp.broadcast_to(jnp.reshape(jnp.asarray(top_p, jnp.float32), (-1,)), (rows,))

  def choose(masses, target, prefix, hi, above, shift, n):
    """Keeps the largest digit whose threshold's mass reaches the target (masses fall with d)."""
    count = jnp.sum(masses >= target[:, None], axis=-1, dtype=jnp.int32)  # in 0..n
    ucount = count.astype(jnp.uint32)
    top = count == n
    # The interval becomes [prefix + count << shift, next threshold or the old hi).
    new_hi = jnp.where(top, hi, prefix + ((ucount + 1) << shift))
    new_above = jnp.where(top, above, jnp.sum(
        jnp.where(jnp.arange(n) == count[:, None], masses, 0.0), axis=-1))
    return prefix + (ucount << shift), new_hi, new_above

  # First pass: the top `first` bits over the whole row, and the row's total mass with them.
  first = 32 - bits * ((32 - 1) // bits)  # in 1..bits
  n0 = (1 << first) - 1
  shift0 = jnp.uint32(32 - first)
  lows = _key_to_float(jnp.arange(1, n0 + 1, dtype=jnp.uint32) << shift0)  # [n0]
  weights = jnp.exp(scale(blocks - shift_by))
  sums = _blocked_sums([jnp.where(blocks >= lows[d], weights, 0.0) for d in range(n0)]
                       + [weights])
  target = top_p * sums[:, -1]
  zero = jnp.zeros((rows,), jnp.uint32)
  state = choose(sums[:, :-1], target, zero, jnp.full((rows,), 0xFFFFFFFF, jnp.uint32),
                 jnp.zeros((rows,), jnp.float32), shift0, n0)

  n = (1 << bits) - 1
  digits = jnp.arange(1, n + 1, dtype=jnp.uint32)
  num_passes = (32 - first) // bits

  def one_pass(i, state):
    prefix, hi, above = state
    shift = (num_passes - 1 - i).astype(jnp.uint32) * jnp.uint32(bits)
    lows = _key_to_float(prefix[:, None] + (digits << shift))[:, None, :]  # [R, 1, n]
    high = _key_to_float(hi)[:, None, None]
    # Tokens at or above `high` are in `above`; min() keeps exp's argument pass-dependent.
    weights = jnp.where(blocks < high,
                        jnp.exp(scale(jnp.minimum(blocks, high) - shift_by)), 0.0)
    sums = _blocked_sums([jnp.where(blocks >= lows[..., d:d + 1], weights, 0.0)
                          for d in range(n)])
    return choose(above[:, None] + sums, target, prefix, hi, above, shift, n)

  prefix, _, _ = jax.lax.fori_loop(0, num_passes, one_pass, state)
  # A row with nothing to keep ends at the largest key (its target is 0): -inf keeps it all.
  return jnp.where(row_max == _NEG_INF, _NEG_INF, _key_to_float(prefix))


def nucleus_mask_threshold(logits: Array, top_p: Array, keep: Optional[Array] = None, *,
                           bits: int = THRESHOLD_BITS) -> Array:
  """bool [R, V]: the top-p nucleus of softmax(logits) restricted to `keep`, without a sort.

  Same contract and result as `nucleus_mask_sort` (up to float32 rounding of the masses, at
  tokens whose mass before them is within ~1e-6 of top_p); see the module docstring for the
  method and `nucleus_threshold` for the arguments (`logits` already divided by the
  temperature). Rows that are entirely -inf (or outside `keep`) give `keep` (all True
  without it).
  """
  tau = nucleus_threshold(logits, top_p, keep, bits=bits)
  mask = logits.astype(jnp.float32) >= tau[:, None]
  return mask if keep is None else mask & keep


def nucleus_mask_radix(logits: Array, top_p: Array, keep: Optional[Array] = None) -> Array:
  """bool [R, V]: the first radix formulation of the nucleus (slow to compile on GPU, see the
  module docstring); exact like `nucleus_mask_threshold` but with ties at the resolution of w.

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
  """The reference nucleus (sort, cumulative sum); same contract as `nucleus_mask_threshold`."""
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
                top_p_method: str = DEFAULT_TOP_P_METHOD) -> Optional[Array]:
  """bool [R, V] of tokens that may be sampled, or None when nothing is filtered."""
  keep = None
  if top_k is not None and top_k < scaled_logits.shape[-1]:
    keep = top_k_mask(scaled_logits, top_k)
  if use_top_p:
    if top_p_method == "threshold":
      keep = nucleus_mask_threshold(scaled_logits, top_p, keep)
    elif top_p_method == "radix":
      keep = nucleus_mask_radix(scaled_logits, top_p, keep)
    elif top_p_method == "sort":
      keep = nucleus_mask_sort(scaled_logits, top_p, keep)
    else:
      raise ValueError(f"top_p_method={top_p_method!r}: use one of {TOP_P_METHODS}.")
  return keep


def _argmax_and_sum(scores: Array, weights: Array) -> tuple[Array, Array]:
  """int32 [R] argmax of `scores` (the first index on ties, like jnp.argmax) and float32 [R]
  sum of `weights`, both [R, V], in one blocked variadic reduction: one read of whatever the
  two are computed from, in a fixed summation order (see `_blocked_sums`)."""
  vocab = scores.shape[-1]
  index = jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
  operands = (_row_blocks(scores, _NEG_INF), _row_blocks(index, vocab),
              _row_blocks(weights, 0.0))

  def combine(a, b):
    (va, ia, sa), (vb, ib, sb) = a, b
    # NaN counts as the largest value, as in jnp.argmax; the rule is symmetric in a and b,
    # as a reduction's must be.
    nan_a, nan_b = jnp.isnan(va), jnp.isnan(vb)
    same = (va == vb) | (nan_a & nan_b)
    take_a = (va > vb) | (nan_a & ~nan_b) | (same & (ia < ib))
    return jnp.where(take_a, va, vb), jnp.where(take_a, ia, ib), sa + sb

  init = (jnp.float32(_NEG_INF), jnp.int32(vocab), jnp.float32(0))
  partial = jax.lax.reduce(operands, init, combine, (2,))
  _, best, total = jax.lax.reduce(partial, init, combine, (1,))
  return best, total


def _argmax_then_sum(scores: Array, weights: Array) -> tuple[Array, Array]:
  return jnp.argmax(scores, axis=-1).astype(jnp.int32), jnp.sum(weights, axis=-1)


def _draw(scores: Array, weights: Array) -> tuple[Array, Array]:
  """(argmax of scores, sum of weights) per row: one blocked reduction on GPUs, where XLA does
  not fuse the two plain ones (a read of the logits saved); two plain ones elsewhere, since
  XLA:TPU relays out the blocked view's operands (1.05 GB more at 256 rows of 256k, compiled
  for a v5p chip); on the CPU they are the log-softmax's own."""
  return jax.lax.platform_dependent(scores, weights, cuda=_argmax_and_sum,
                                    rocm=_argmax_and_sum, default=_argmax_then_sum)


def sample_tokens(row_keys: Array, logits: Array, *, greedy: bool, temperature: Array,
                  top_k: Optional[int], top_p: Array, use_top_p: bool,
                  top_p_method: str = DEFAULT_TOP_P_METHOD, bits: int = THRESHOLD_BITS,
                  logit_unit: Optional[float] = None) -> Array:
  """One token per row: int32 [R] (`sample_tokens_and_logprobs`' tokens; same arguments)."""
  return sample_tokens_and_logprobs(
      row_keys, logits, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
      use_top_p=use_top_p, top_p_method=top_p_method, bits=bits, logit_unit=logit_unit)[0]


def sample_tokens_and_logprobs(row_keys: Array, logits: Array, *, greedy: bool,
                               temperature: Array, top_k: Optional[int], top_p: Array,
                               use_top_p: bool, top_p_method: str = DEFAULT_TOP_P_METHOD,
                               bits: int = THRESHOLD_BITS,
                               logit_unit: Optional[float] = None) -> tuple[Array, Array]:
  """One token per row and its log-prob: (int32 [R], float32 [R]).

  The log-prob is `token_logprobs`': log softmax(logits)[token] at temperature 1, unfiltered.
  The tempered logits are logits * (1 / temperature). With the threshold top-p (and no top-k)
  a step reads the float32 [R, V] array it is given 2 + ceil(32 / bits) times (13 for
  bits=3) and writes nothing of that size: its row max; the threshold search's passes, which
  search the values as given and weigh them by the tempered softmax (`nucleus_threshold`);
  and one last pass that masks, adds the Gumbel noise, takes the argmax and sums exp(logit -
  max) for the log-prob's normaliser (one blocked reduction on GPUs, `_draw`). (Drawing from
  a tempered copy and taking the log-prob by a separate log-softmax read the logits 15 times
  and wrote the copy.) Top-k and the nucleus keep ties at the resolution of the values as
  given (the sort and radix methods: of the tempered logits).

  Args:
    row_keys: [R] PRNG keys, one per row (ignored when greedy).
    logits: float32 [R, V]: the logits, or the logits divided by `logit_unit`.
    greedy: static; argmax (first index on ties), ignoring the other settings.
    temperature: positive float32 scalar (traced: changing it does not recompile).
    top_k: static int or None.
    top_p: float32 scalar (traced); only used when the static `use_top_p` is set.
    top_p_method: "threshold" (exact, no sort; the default), "radix" (the first no-sort
      version, slow to compile on GPU) or "sort" (reference).
    bits: static; the threshold search's bits per pass.
    logit_unit: static positive float or None: `logits` hold logits / logit_unit, e.g. a
      Gemma 2's tanh(z / cap) before the soft-cap's final `* cap`
      (`Transformer(logits_over_cap=True)`), which the search can then read where the
      unembedding wrote them, instead of a multiplied copy; the log-probs are those of the
      logits, logits * logit_unit.
  """
  given = logits.astype(jnp.float32)
  unit = 1.0 if logit_unit is None else float(logit_unit)
  logits = given if logit_unit is None else given * unit
  if greedy:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tokens, token_logprobs(logits, tokens)
  if top_p_method not in TOP_P_METHODS:
    raise ValueError(f"top_p_method={top_p_method!r}: use one of {TOP_P_METHODS}.")
  given_max = jnp.max(given, axis=-1)
  # Within an ulp of the logits' max: the log-softmax's shift (any nearby value is exact).
  shift = jnp.where(given_max == _NEG_INF, 0.0, given_max * unit)  # a row of -inf: no NaN
  logit_scale = 1 / jnp.asarray(temperature, jnp.float32)
  scaled = logits * logit_scale
  if use_top_p and top_p_method == "threshold":
    # Top-k and the nucleus on the values as given (the order of the tempered logits, ties at
    # the given values' resolution), with the tempered masses; see `nucleus_threshold`.
    keep = None if top_k is None or top_k >= given.shape[-1] else top_k_mask(given, top_k)
    tau = nucleus_threshold(given, top_p, keep, bits=bits, logit_scale=logit_scale * unit,
                            row_max=given_max)
    allowed = given >= tau[:, None]
    allowed = allowed if keep is None else allowed & keep
  else:
    allowed = filter_mask(scaled, top_k, top_p, use_top_p, top_p_method)
  if allowed is not None:
    scaled = jnp.where(allowed, scaled, _NEG_INF)
  # Gumbel-max: argmax(l + g) with g ~ Gumbel(0, 1) draws from softmax(l); per-row keys keep
  # each row's draw independent of the rest of the batch.
  gumbel = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[-1:], jnp.float32))(row_keys)
  tokens, total = _draw(scaled + gumbel, jnp.exp(logits - shift[:, None]))
  picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
  return tokens, picked - (shift + jnp.log(total))


def token_logprobs(logits: Array, tokens: Array) -> Array:
  """log softmax(logits)[token] at temperature 1, unfiltered: float32 [R] (teacher forcing's)."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)

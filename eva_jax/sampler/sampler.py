"""Sharded, batched generation with a KV cache: one jitted program per bucket.

    sampler = Sampler(model, mesh)
    samples = sampler.sample(params, prompts, num_samples=6, max_new_tokens=512,
                             temperature=0.7, top_p=0.9, seed=round_index)
    samples[i][j].tokens, samples[i][j].logprobs, samples[i][j].finish_reason

The program (`_generate`): prefill the B prompts once with the KV cache and unembed only each
row's last position (no [B, P, V] logits); repeat the prompt cache rows n times into the
[B * n, S] decode cache (S = P + max_new_tokens); sample the first token from the
prefill logits; then a `lax.while_loop` feeds one token per step until every row has emitted
one of its stop tokens or `max_new_tokens` tokens are out. Params are arguments; the cache is
made inside the program, so that XLA lays it out as the loop reads it (a cache passed in and
returned, donated, keeps the default layout at the program's edges: XLA:TPU copied it into its
own for the loop and back, 12.3 GiB more for gemma2_2b's 256 rows x 512 slots on one v5p
chip). Nothing reaches the host until the loop is over.

Layout. Prompts are left-padded to a bucketed length P, so every row's next token lands in the
same cache slot (the model's scalar `cache_index`), positions count real tokens (padding is
transparent), and slot distances equal position distances after the prompt: Gemma 2's
sliding-window layers stay exact however far generation runs past the window. Generated
slots are marked valid from the start: causality already hides slots not yet written.

Buckets. A call's prompts are sorted by length and cut into chunks of at most
`max_batch_rows // num_samples` prompts; a chunk's prompt count is padded to a batch bucket
(data-parallel size x a power of two, or the full chunk) with dummy rows that start finished
and are dropped, and its longest prompt picks the prompt bucket (powers of two from
`min_prompt_bucket`, or `prompt_length_buckets`). So a round compiles one program per (prompt
bucket, batch bucket, num_samples, max_new_tokens, sampling mode), counted by
`num_compilations`. temperature, top_p and the seed are traced: changing them does not
recompile. Every process computes the same buckets from the same global prompt list.

Randomness. Row (prompt i, sample j) at step t draws from fold_in(fold_in(fold_in(key(seed),
i), j), t), with i the prompt's index in the call's list: samples do not depend on the
chunking, the padding, the mesh or the number of processes.

Outputs per sample: the new tokens (a stop token, when one ended the row, is the last token
and is included), their log-probs under the model at temperature 1 with no filtering (what
teacher forcing gives), and the finish reason ("stop" or "length").
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Optional, Sequence, Union

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eva_jax import parallel
from eva_jax.models.transformer import (GemmaForSequenceClassification, Transformer,
                                        cache_logical_axes, default_positions, init_cache,
                                        is_stacked, to_matmul_layout, unstack_layers)
from eva_jax.sampler import sampling

Array = jax.Array

TRUNCATION_RULES = ("error", "left")
DECODE_PARAMS = ("gathered", "cast", "as_given")
FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
  """One generated continuation.

  Attributes:
    tokens: the new token ids; when `finish_reason == "stop"` the last one is the stop token.
    logprobs: float32 [len(tokens)], log p(token | prefix) under the model at temperature 1
      with no top-k / top-p filtering (teacher forcing's values).
    finish_reason: "stop" (a stop token was emitted) or "length" (`max_new_tokens` reached).
  """

  tokens: list[int]
  logprobs: np.ndarray
  finish_reason: str

  @property
  def length(self) -> int:
    return len(self.tokens)

  @property
  def total_logprob(self) -> float:
    return float(np.sum(self.logprobs, dtype=np.float64))


def power_of_two_buckets(smallest: int, largest: int) -> tuple[int, ...]:
  """smallest, 2 * smallest, ... up to and including `largest` (added if not on the ladder)."""
  if smallest < 1 or largest < 1:
    raise ValueError(f"Bucket bounds must be positive, got {smallest} and {largest}.")
  out = []
  b = smallest
  while b < largest:
    out.append(b)
    b *= 2
  out.append(largest)
  return tuple(out)


def pick_bucket(size: int, buckets: Sequence[int], what: str) -> int:
  """The smallest bucket >= size."""
  for b in buckets:
    if b >= size:
      return b
  raise ValueError(f"{what} {size} exceeds the largest bucket {max(buckets)}.")


# Stop-token slots a program takes at least (EOS, <end_of_turn>, ...), so that typical stop
# lists share a program.
_MIN_STOP_SLOTS = 4


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


@gin.configurable
class Sampler:
  """Generates continuations of token-id prompts with a Gemma `Transformer` on a mesh.

  Args:
    model: the causal LM (`eva_jax.models.Transformer`).
    mesh: device mesh (default: `parallel.create_mesh()`, all devices on `data`); the batch is
      split over the data axes, heads and kv heads over `tensor`, as `rules` say.
    rules: logical axis rules (default: `parallel.logical_axis_rules()`).
    max_prompt_length: the longest prompt accepted (after truncation).
    truncation: what to do with a longer prompt: "error" (raise ValueError naming it) or "left"
      (keep its last `max_prompt_length` tokens; a leading BOS is kept as the first of them).
    min_prompt_bucket: smallest prompt bucket of the default power-of-two ladder.
    prompt_length_buckets: explicit increasing prompt buckets (overrides the ladder); the
      largest must be >= `max_prompt_length`.
    max_batch_rows: most rows (prompts x samples) one program decodes at once; longer lists
      are cut into chunks (bounds the KV cache's memory).
    cache_dtype: KV-cache dtype (default: the model's compute dtype, bf16 for real configs).
    top_p_method: "threshold" (exact nucleus without sorting the vocabulary), "radix" (an
      older no-sort formulation, slow to compile on GPU) or "sort".
    decode_params: how `sample()` hands the params to the decode program (`prepare_params`).
      "gathered" (default): a copy with the weight matrices in the compute dtype (the model
      casts them to it before every matmul anyway, so samples are unchanged) laid out
      `parallel.replicated_over_batch`: whole on every device of the data and fsdp axes,
      split over `tensor` as before, so a decode step reads local bfloat16 weights instead of
      all-gathering float32 FSDP shards for every token. It costs params / tensor-size bytes
      per device while sampling. "cast": the compute-dtype copy in the rules' own layout.
      Both unstack a scanned model's layers (`stack_layers`) and, but on TPUs, put the
      projection weights in the matmul layout (`GemmaConfig.weight_layout`,
      `to_matmul_layout`): the decode program is that unrolled model's (`decode_model`).
      "as_given": the params as passed (no copy).
    decode_segments: the decode loop runs as this many loops, one after the other, over
      `max_new_tokens` cut into equal parts (ends rounded up to multiples of 16). The loop of
      part i runs on a cache of the prompt's and the first i + 1 parts' slots, copied into
      the next, wider cache between loops, so a step reads only the cache written so far
      (with prompt 256 and 256 new tokens, 4 segments read 81% of it on average) and reads
      it whole, in place (attending over a slice of a bigger cache made XLA copy the slice
      out every step: 1.4x slower on a CPU). Costs: each part compiles its own loop body;
      two caches live at once while one is copied into the next (the last two: up to twice
      one whole cache). On a CPU, 4 segments were no faster than 1 (within noise on a
      cache-heavy shape), hence the default 1. GPU and TPU unmeasured.
  """

  def __init__(self, model: Transformer, mesh: Optional[Mesh] = None, rules=None, *,
               max_prompt_length: int = 1024, truncation: str = "error",
               min_prompt_bucket: int = 16,
               prompt_length_buckets: Optional[Sequence[int]] = None,
               max_batch_rows: int = 512, cache_dtype: Any = None,
               top_p_method: str = sampling.DEFAULT_TOP_P_METHOD,
               decode_params: str = "gathered", decode_segments: int = 1):
    if isinstance(model, GemmaForSequenceClassification) or not isinstance(model, Transformer):
      raise TypeError(f"Sampler needs a causal LM (eva_jax.models.Transformer), got "
                      f"{type(model).__name__}.")
    if truncation not in TRUNCATION_RULES:
      raise ValueError(f"Sampler truncation={truncation!r}: use one of {TRUNCATION_RULES}.")
    if top_p_method not in sampling.TOP_P_METHODS:
      raise ValueError(f"Sampler top_p_method={top_p_method!r}: use one of "
                       f"{sampling.TOP_P_METHODS}.")
    if decode_params not in DECODE_PARAMS:
      raise ValueError(f"Sampler decode_params={decode_params!r}: use one of "
                       f"{DECODE_PARAMS}.")
    if int(decode_segments) < 1:
      raise ValueError(f"Sampler decode_segments={decode_segments} must be >= 1.")
    if max_prompt_length < 1 or max_batch_rows < 1:
      raise ValueError(f"Sampler: max_prompt_length={max_prompt_length} and max_batch_rows="
                       f"{max_batch_rows} must be positive.")
    self.model = model
    self.mesh = parallel.create_mesh() if mesh is None else mesh
    # The decode copy (any decode_params but "as_given") is unrolled, so a decode step reads
    # each layer's weights in place, where the scanned loop slices them out of the stack
    # every step (1.75x slower decode on a CPU); and, but on TPUs, in the matmul weight
    # layout (`GemmaConfig.weight_layout`): the checkpoint one makes XLA:GPU copy out or
    # transpose the projection weights every step, while XLA:TPU reads it in place and
    # would relayout the matmul one's [D, 2, F] gate (a dimension of 2 in its tiles) once a
    # call (3.3 GiB more for gemma2_2b at 64 rows on one v5p chip).
    on_tpu = parallel.mesh_platform(self.mesh) == "tpu"
    self.decode_model = (
        Transformer(model.config.replace(
            scan_layers=False, weight_layout="checkpoint" if on_tpu else "matmul"))
        if decode_params != "as_given" else model)
    self.config = self.decode_model.config
    self.rules = parallel.logical_axis_rules() if rules is None else tuple(rules)
    self.max_prompt_length = int(max_prompt_length)
    self.truncation = truncation
    if prompt_length_buckets is None:
      self.prompt_buckets = power_of_two_buckets(min(min_prompt_bucket, max_prompt_length),
                                                 max_prompt_length)
    else:
      buckets = tuple(int(b) for b in prompt_length_buckets)
      if list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
        raise ValueError(f"Sampler prompt_length_buckets={buckets}: use increasing positive "
                         "lengths.")
      if buckets[-1] < max_prompt_length:
        raise ValueError(f"Sampler prompt_length_buckets: the largest bucket {buckets[-1]} is "
                         f"below max_prompt_length={max_prompt_length}; add a bucket >= it.")
      self.prompt_buckets = buckets
    self.max_batch_rows = int(max_batch_rows)
    self.cache_dtype = jnp.dtype(cache_dtype or self.config.dtype)
    self.top_p_method = top_p_method
    self.decode_params = decode_params
    self.decode_segments = int(decode_segments)
    self.dp = parallel.data_parallel_size(self.mesh, self.rules)
    self.num_compilations = 0
    self.compile_seconds: list[float] = []
    self.last_stats: list[dict] = []
    self._programs: dict[tuple, Any] = {}
    self._decode_abstract = None
    self._prepare_programs: dict[tuple, Any] = {}

  # ---------------------------------------------------------------- decode params

  def _decode_params_abstract(self) -> tuple[Any, Any]:
    """(logical axes, abstract params) of the decode model's param tree, built once."""
    if self._decode_abstract is None:
      self._decode_abstract = parallel.params_logical_axes(self.decode_model,
                                                           jnp.ones((1, 8), jnp.int32))
    return self._decode_abstract

  def _to_decode_tree(self, params) -> Any:
    """The model's params (stacked if it scans) -> the unrolled tree of the decode copy, in
    its weight layout (traceable); a tree already in that form is returned as it is."""
    if self.decode_model is self.model:
      return params
    if is_stacked(params):
      params = unstack_layers(params, self.model.config)
    if self.config.weight_layout == self.model.config.weight_layout:
      return params
    try:
      prepared = jax.tree_util.tree_map(lambda x, want: x.shape == want.shape, params,
                                        self._decode_params_abstract()[1])
    except ValueError:
      return to_matmul_layout(params)  # another tree: decode_layout names the mismatch
    return params if all(jax.tree_util.tree_leaves(prepared)) else to_matmul_layout(params)

  def decode_layout(self, params) -> Any:
    """`jax.ShapeDtypeStruct`s (with shardings) of the params as the decode program reads them
    under `decode_params`; `params` may be arrays or abstract values with shardings."""
    if self.decode_params == "as_given":
      return jax.tree_util.tree_map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(
              x, "sharding", None) or NamedSharding(self.mesh, P())), params)
    tree = jax.eval_shape(self._to_decode_tree, params)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    param_axes, _ = self._decode_params_abstract()
    named = jax.tree_util.tree_flatten_with_path(param_axes,
                                                 is_leaf=lambda x: isinstance(x, tuple))[0]
    keys = lambda pairs: [jax.tree_util.keystr(path) for path, _ in pairs]
    if keys(named) != keys(leaves):
      raise ValueError("Sampler: the params' tree is not the sampler's model's (a scanned "
                       "model needs stacked params, see `stack_layers`; an unrolled one "
                       "the `layer_i` tree).")
    rules = (parallel.replicated_over_batch(self.rules) if self.decode_params == "gathered"
             else self.rules)
    compute = jnp.dtype(self.config.dtype)
    specs = []
    for (path, x), (_, axes) in zip(leaves, named):
      dtype = jnp.dtype(x.dtype)
      # Norm scales stay as they are: the model reads them in float32, every other float
      # weight in the compute dtype.
      if jnp.issubdtype(dtype, jnp.floating) and getattr(path[-1], "key", None) != "scale":
        dtype = compute
      spec = parallel.logical_to_spec(axes, self.mesh, rules, x.shape)
      specs.append(jax.ShapeDtypeStruct(x.shape, dtype, sharding=NamedSharding(self.mesh, spec)))
    return jax.tree_util.tree_unflatten(treedef, specs)

  def prepare_params(self, params) -> Any:
    """The params as the decode program reads them (see `decode_params`).

    `sample()` calls it on every call; params it already prepared come back as they are, so
    a caller sampling in many calls can prepare once (and drop the copy after)."""
    params = jax.tree_util.tree_map(
        lambda x: x if isinstance(x, jax.Array) else self._put(np.asarray(x), batch=False),
        params)
    specs = self.decode_layout(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if treedef == jax.tree_util.tree_structure(specs) and all(
        x.shape == t.shape and x.dtype == t.dtype and
        x.sharding.is_equivalent_to(t.sharding, x.ndim)
        for x, t in zip(leaves, treedef.flatten_up_to(specs))):
      return params
    key = (treedef, tuple((x.shape, x.dtype, x.sharding) for x in leaves))
    if key not in self._prepare_programs:
      self._prepare_programs[key] = jax.jit(
          lambda p: jax.tree_util.tree_map(lambda x, t: x.astype(t.dtype),
                                           self._to_decode_tree(p), specs),
          out_shardings=jax.tree_util.tree_map(lambda t: t.sharding, specs))
    return self._prepare_programs[key](params)

  # ---------------------------------------------------------------- host side

  def _prepare_prompt(self, index: int, prompt: Sequence[int]) -> np.ndarray:
    tokens = np.asarray(prompt)
    if tokens.ndim != 1 or (tokens.size and not np.issubdtype(tokens.dtype, np.integer)):
      raise ValueError(f"Sampler: prompt {index} is not a flat list of token ids (got an array "
                       f"of shape {tokens.shape} and dtype {tokens.dtype}).")
    if not tokens.size:
      raise ValueError(f"Sampler: prompt {index} is empty; a prompt needs at least one token "
                       "(Gemma prompts start with BOS).")
    vocab = self.config.vocab_size
    bad = tokens[(tokens < 0) | (tokens >= vocab)]
    if bad.size:
      raise ValueError(f"Sampler: prompt {index} has token ids outside [0, {vocab}): "
                       f"{bad[:5].tolist()}; tokenize with the model's tokenizer.")
    tokens = tokens.astype(np.int32)
    if len(tokens) <= self.max_prompt_length:
      return tokens
    if self.truncation == "error":
      raise ValueError(f"Sampler: prompt {index} has {len(tokens)} tokens, more than "
                       f"max_prompt_length={self.max_prompt_length}; shorten it, raise "
                       "max_prompt_length, or set truncation='left'.")
    keep = self.max_prompt_length
    if tokens[0] == self.config.bos_id:
      return np.concatenate([tokens[:1], tokens[len(tokens) - (keep - 1):]])
    return tokens[-keep:]

  def _stop_lists(self, stop_tokens, num_prompts: int) -> list[tuple[int, ...]]:
    if stop_tokens is None:
      return [(self.config.eos_id,)] * num_prompts
    stop_tokens = list(stop_tokens)
    if stop_tokens and all(isinstance(s, (list, tuple, np.ndarray)) for s in stop_tokens):
      if len(stop_tokens) != num_prompts:
        raise ValueError(f"Sampler: stop_tokens has {len(stop_tokens)} lists for "
                         f"{num_prompts} prompts; pass one list per prompt or one flat list.")
      return [tuple(int(t) for t in s) for s in stop_tokens]
    if any(isinstance(s, (list, tuple, np.ndarray)) for s in stop_tokens):
      raise ValueError("Sampler: stop_tokens mixes ids and lists; pass one flat list of ids "
                       "or one list per prompt.")
    return [tuple(int(t) for t in stop_tokens)] * num_prompts

  def _chunk_prompts(self, num_samples: int) -> int:
    per = max(1, self.max_batch_rows // num_samples)
    return max(self.dp, per // self.dp * self.dp)

  def _batch_bucket(self, count: int, chunk: int) -> int:
    buckets = [b for b in power_of_two_buckets(self.dp, max(self.dp, chunk))
               if b % self.dp == 0]
    return pick_bucket(count, buckets, "Chunk of prompts")

  def _put(self, x: np.ndarray, batch: bool = True) -> Array:
    """Host numpy -> global array; each process fills only its own devices' shards."""
    x = np.asarray(x)
    sharding = (parallel.batch_sharding(self.mesh, x.ndim, self.rules) if batch and x.ndim
                else NamedSharding(self.mesh, P()))
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  def cache_shardings(self, rows: int, length: int) -> dict:
    shapes = jax.eval_shape(lambda: init_cache(self.config, rows, length, self.cache_dtype))
    return parallel.logical_shardings(cache_logical_axes(self.config), self.mesh, self.rules,
                                      shapes)

  def segment_ends(self, max_new_tokens: int) -> tuple[int, ...]:
    """The decode steps at which each part of the decode loop ends (see `decode_segments`):
    `max_new_tokens` cut into `decode_segments` equal parts, ends rounded up to multiples of
    16 (fewer parts when they would be shorter than that); the last end is max_new_tokens."""
    ends = []
    for i in range(1, self.decode_segments + 1):
      part = -(-max_new_tokens * i // self.decode_segments)  # ceil
      end = min(max_new_tokens, -(-part // 16) * 16)
      if not ends or end > ends[-1]:
        ends.append(end)
    return tuple(ends)

  def sample(self, params, prompts: Sequence[Sequence[int]], num_samples: int = 1,
             max_new_tokens: int = 64, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: float = 1.0, seed: int = 0,
             stop_tokens: Union[None, Sequence[int], Sequence[Sequence[int]]] = None
             ) -> list[list[Sample]]:
    """Samples `num_samples` continuations of every prompt.

    Every process passes the same global `prompts` and gets every sample back.

    Args:
      params: the model's params (jax arrays, e.g. from `parallel.init_params`, or numpy),
        in any layout; the decode program reads `prepare_params(params)`.
      prompts: token-id lists (BOS and chat template included by the caller).
      num_samples: n continuations per prompt; the prompt is prefilled once.
      max_new_tokens: the most new tokens per sample (stop token included).
      temperature: 0 for greedy decoding (top_k and top_p are then ignored), else the
        softmax temperature.
      top_k: keep the k most likely tokens (None: no filter).
      top_p: nucleus mass in (0, 1]; 1 turns it off.
      seed: the call's seed in [0, 2**31); the same seed and inputs give the same samples
        (a sample's draws depend on the seed, its prompt's index in `prompts` and its own
        index, not on the mesh, the chunking or the number of processes).
      stop_tokens: ids that end a row (default: the config's EOS); one flat list for every
        prompt, or one list per prompt (e.g. [EOS, <end_of_turn>]); [] never stops early.

    Returns:
      samples[i][j]: the j-th `Sample` of prompt i.
    """
    num_samples, max_new_tokens = int(num_samples), int(max_new_tokens)
    if num_samples < 1:
      raise ValueError(f"Sampler: num_samples={num_samples} must be >= 1.")
    if max_new_tokens < 1:
      raise ValueError(f"Sampler: max_new_tokens={max_new_tokens} must be >= 1.")
    sampling.validate(temperature, top_k, top_p, self.config.vocab_size)
    if not 0 <= int(seed) < 2 ** 31:
      raise ValueError(f"Sampler: seed={seed} must be in [0, 2**31).")
    prompts = [self._prepare_prompt(i, p) for i, p in enumerate(prompts)]
    stops = self._stop_lists(stop_tokens, len(prompts))
    params = self.prepare_params(params)
    results: list[Optional[list[Sample]]] = [None] * len(prompts)
    self.last_stats = []
    # Sort by length so a chunk's prompts share a tight bucket; stable, so every process
    # forms the same chunks.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    chunk = self._chunk_prompts(num_samples)
    for start in range(0, len(order), chunk):
      ids = order[start:start + chunk]
      out = self._run_chunk(params, [prompts[i] for i in ids], ids, [stops[i] for i in ids],
                            num_samples, max_new_tokens, temperature, top_k, top_p, seed,
                            chunk)
      for i, samples in zip(ids, out):
        results[i] = samples
    return results

  def _run_chunk(self, params, prompts, ids, stops, n, max_new, temperature, top_k, top_p,
                 seed, chunk) -> list[list[Sample]]:
    cfg = self.config
    b = self._batch_bucket(len(prompts), chunk)
    p_len = pick_bucket(max(len(p) for p in prompts), self.prompt_buckets, "Prompt length")
    n_stop = max(_MIN_STOP_SLOTS, _next_pow2(max(len(s) for s in stops)))
    tokens = np.full((b, p_len), cfg.pad_id, np.int32)
    mask = np.zeros((b, p_len), bool)
    index = np.full((b,), -1, np.int32)
    valid = np.zeros((b,), bool)
    stop_ids = np.full((b, n_stop), -1, np.int32)
    tokens[len(prompts):, -1] = cfg.bos_id  # dummy rows: one real token, finished at once
    mask[len(prompts):, -1] = True
    for r, (prompt, i, s) in enumerate(zip(prompts, ids, stops)):
      tokens[r, p_len - len(prompt):] = prompt
      mask[r, p_len - len(prompt):] = True
      index[r] = i
      valid[r] = True
      stop_ids[r, :len(s)] = s

    greedy = temperature == 0
    use_top_p = (not greedy) and top_p < 1.0
    top_k = None if greedy or top_k is None else int(top_k)
    rows, length = b * n, p_len + max_new
    args = (params, self._put(tokens), self._put(mask), self._put(index),
            self._put(valid), self._put(stop_ids), self._put(np.int32(seed), batch=False),
            self._put(np.float32(temperature if not greedy else 1.0), batch=False),
            self._put(np.float32(top_p), batch=False))
    statics = dict(num_samples=n, max_new=max_new, greedy=greedy, top_k=top_k,
                   use_top_p=use_top_p)
    signature = jax.tree_util.tree_structure(params), tuple(
        (x.shape, x.dtype, x.sharding) for x in jax.tree_util.tree_leaves(params))
    key = (b, p_len, n_stop, tuple(sorted(statics.items())), signature)
    compile_s = 0.0
    if key not in self._programs:
      start = time.perf_counter()
      self._programs[key] = self._compile(args, statics)
      compile_s = time.perf_counter() - start
      self.num_compilations += 1
      self.compile_seconds.append(compile_s)
    start = time.perf_counter()
    out = parallel.global_to_host(self._programs[key](*args))
    self.last_stats.append(dict(batch=b, prompt_bucket=p_len, rows=rows, cache_length=length,
                                decode_steps=int(out["steps"]) - 1, compile_s=compile_s,
                                run_s=time.perf_counter() - start))
    samples = []
    for r in range(len(prompts)):
      per_prompt = []
      for j in range(n):
        row = r * n + j
        k = int(out["lengths"][row])
        per_prompt.append(Sample(
            tokens=[int(t) for t in out["tokens"][row, :k]],
            logprobs=np.asarray(out["logprobs"][row, :k], np.float32),
            finish_reason=FINISH_STOP if out["stopped"][row] else FINISH_LENGTH))
      samples.append(per_prompt)
    return samples

  # ---------------------------------------------------------------- device side

  def _compile(self, args, statics):
    batch = lambda ndim: parallel.batch_sharding(self.mesh, ndim, self.rules)
    out_shardings = dict(tokens=batch(2), logprobs=batch(2), lengths=batch(1),
                         stopped=batch(1), steps=NamedSharding(self.mesh, P()))
    fn = jax.jit(functools.partial(self._generate, **statics), out_shardings=out_shardings)
    with parallel.with_mesh_rules(self.mesh, self.rules):
      return fn.lower(*args).compile()

  def compile_abstract(self, params, batch: int, prompt_len: int, *, num_samples: int,
                       max_new_tokens: int, greedy: bool = False, top_k: Optional[int] = None,
                       use_top_p: bool = True, num_stop: int = _MIN_STOP_SLOTS):
    """The generation program compiled for `batch` prompts of bucket `prompt_len` without
    running it: `params` may be abstract (`jax.ShapeDtypeStruct`s with shardings, in the
    layout the program reads, `decode_layout`), and the mesh a topology's devices. For the
    ahead-of-time checks (`eva_jax.aot`, `benchmarks/sampler.py --aot_compile_only`)."""
    batched = lambda shape, dtype: jax.ShapeDtypeStruct(
        shape, dtype, sharding=parallel.batch_sharding(self.mesh, len(shape), self.rules))
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype,
                                                sharding=NamedSharding(self.mesh, P()))
    args = (params, batched((batch, prompt_len), jnp.int32),
            batched((batch, prompt_len), jnp.bool_), batched((batch,), jnp.int32),
            batched((batch,), jnp.bool_), batched((batch, num_stop), jnp.int32),
            scalar(jnp.int32), scalar(jnp.float32), scalar(jnp.float32))
    return self._compile(args, dict(num_samples=num_samples, max_new=max_new_tokens,
                                    greedy=greedy, top_k=top_k, use_top_p=use_top_p))

  def _generate(self, params, tokens, prompt_mask, prompt_index, row_valid, stop_ids,
                seed, temperature, top_p, *, num_samples, max_new, greedy, top_k, use_top_p):
    """The whole generation as one traced program (see the module docstring).

    Args:
      tokens / prompt_mask: int32 / bool [B, P], prompts left-padded.
      prompt_index: int32 [B], each row's index in the caller's prompt list (-1: dummy).
      row_valid: bool [B]; dummy rows start finished.
      stop_ids: int32 [B, n_stop], -1 padded.
      seed: int32 scalar; temperature, top_p: float32 scalars.
    """
    cfg, n = self.config, num_samples
    b, p_len = tokens.shape
    rows = b * n
    apply = functools.partial(self.decode_model.apply, {"params": params})
    repeat = lambda x: jnp.repeat(x, n, axis=0)  # row r * n + j is sample j of prompt r

    # Prefill into a cache as long as the prompts, then place its rows n times in the decode
    # cache: the prompts are run once however many samples each gets.
    positions = default_positions(tokens, cfg.pad_id, prompt_mask)
    hidden, prompt_cache = apply(tokens, positions=positions, attention_mask=prompt_mask,
                                 cache=init_cache(cfg, b, p_len, self.cache_dtype),
                                 cache_index=jnp.int32(0), return_hidden=True)
    # Rows sit on each array's `batch` axis: 0 per layer, 1 in a scanned model's stacked
    # [R, B, S, K, H] arrays.
    cache_axes = cache_logical_axes(cfg)
    prompt_cache = jax.tree_util.tree_map(
        lambda small, axes: jnp.repeat(small, n, axis=axes.index("batch")), prompt_cache,
        cache_axes)

    ends = self.segment_ends(max_new)

    def grown(small, width):
      """A cache of `width` slots, zeros with `small`'s slots at its front."""
      target = init_cache(cfg, rows, width, self.cache_dtype)
      return jax.tree_util.tree_map(
          lambda big, part, s: jax.lax.with_sharding_constraint(
              jax.lax.dynamic_update_slice(big, part.astype(big.dtype), (0,) * big.ndim), s),
          target, small, self.cache_shardings(rows, width))

    # The logits over the soft-cap (when the model has one): the token choice reads them where
    # the unembedding wrote them and applies the cap itself (`sampling.sample_tokens_and_
    # logprobs`' logit_unit), with no multiplied copy written every step.
    over_cap = bool(cfg.final_logit_softcap)
    logits = repeat(apply(hidden[:, -1], over_cap, method="unembed"))  # [R, V] float32

    # Generated slots are valid from the start; causality hides the ones not written yet.
    attention_mask = jnp.concatenate([repeat(prompt_mask), jnp.ones((rows, max_new), bool)],
                                     axis=1)
    next_position = repeat(jnp.sum(prompt_mask, axis=1, dtype=jnp.int32))
    stop_ids = repeat(stop_ids)
    base = jax.random.key(seed)
    row_keys = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base, i), j))(
        repeat(prompt_index), jnp.tile(jnp.arange(n, dtype=jnp.int32), b))

    def pick(logits, step):
      keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
      return sampling.sample_tokens_and_logprobs(
          keys, logits, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
          use_top_p=use_top_p, top_p_method=self.top_p_method,
          logit_unit=cfg.final_logit_softcap if over_cap else None)

    def is_stop(tok):
      return jnp.any(tok[:, None] == stop_ids, axis=-1)

    tok, lp = pick(logits, 0)
    out_tokens = jnp.full((rows, max_new), cfg.pad_id, jnp.int32).at[:, 0].set(tok)
    out_logprobs = jnp.zeros((rows, max_new), jnp.float32).at[:, 0].set(lp)
    stopped = is_stop(tok)
    done = stopped | ~repeat(row_valid)
    lengths = jnp.ones((rows,), jnp.int32)

    def cond(state, end):
      step, done = state[0], state[3]
      return (step < end) & ~jnp.all(done)

    def body(state, window):
      step, cache, last, done, stopped, lengths, out_tokens, out_logprobs = state
      slot = p_len + step - 1  # where the previous token goes
      logits, cache = apply(last[:, None], positions=(next_position + step - 1)[:, None],
                            attention_mask=window, cache=cache, cache_index=slot,
                            logits_over_cap=over_cap)
      tok, lp = pick(logits[:, 0], step)
      active = ~done
      tok = jnp.where(active, tok, cfg.pad_id)
      lp = jnp.where(active, lp, 0.0)
      out_tokens = jax.lax.dynamic_update_slice(out_tokens, tok[:, None], (0, step))
      out_logprobs = jax.lax.dynamic_update_slice(out_logprobs, lp[:, None], (0, step))
      hit = active & is_stop(tok)
      return (step + 1, cache, tok, done | hit, stopped | hit, lengths + active,
              out_tokens, out_logprobs)

    state = (jnp.int32(1), prompt_cache, tok, done, stopped, lengths, out_tokens,
             out_logprobs)
    # One loop per segment, each over a cache of the slots written by its end (the step that
    # writes slot p_len + step - 1 runs while step < end) and one more, so that the width
    # p_len + end stays a multiple of 16. Between loops the cache is copied into the next,
    # wider one: a step then reads a whole, smaller buffer in place (a slice of a bigger one
    # would cost XLA a copy of the slice every step). A loop whose rows are all done exits
    # at once, so later segments cost only their copy then.
    for end in ends:
      width = p_len + end
      state = state[:1] + (grown(state[1], width),) + state[2:]
      state = jax.lax.while_loop(functools.partial(cond, end=end),
                                 functools.partial(body, window=attention_mask[:, :width]),
                                 state)
    step, _, _, _, stopped, lengths, out_tokens, out_logprobs = state
    return dict(tokens=out_tokens, logprobs=out_logprobs, lengths=lengths, stopped=stopped,
                steps=step)

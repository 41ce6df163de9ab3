"""The reward model: a Gemma 2 sequence classifier on the device mesh scores responses.

    make_reward.kind = "model"
    ModelReward.path = "gs://my-bucket/Skywork-Reward-Gemma-2-27B"   # an HF folder
    ModelReward.max_length = 2048

The checkpoint is an HF `Gemma2ForSequenceClassification` (or Gemma 1) folder, the format of
Skywork-Reward-Gemma-2-27B, loaded by `eva_jax.models.from_pretrained` straight into the mesh's
shardings (the same logical rules as the solver: heads and MLP over `tensor`, the model width
over `fsdp`). Its score for a sequence is read at the last real token.

Text -> ids. The reward model has its own tokenizer and chat template, which need not be the
solver's (the default tokenizer is the checkpoint folder's `tokenizer.model`):

* `chat_template="gemma"`: the conversation plus the response as the model's turn, rendered
  by Gemma's chat template without a generation prompt, i.e. exactly the ids of HF's
  `tokenizer.apply_chat_template(conversation + [{"role": "assistant", "content":
  response}])`, the input Skywork's reward models are trained on
  ("<bos><start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n{response}
  <end_of_turn>\\n"; the score is read at the final "\\n").
* any other string is a Python format string with the fields `{prompt}` (the last user
  turn's text) and `{response}`, encoded with BOS in front: for reward models trained on
  plain text, e.g. `"Question: {prompt}\\n\\nAnswer: {response}"`. Literal braces are
  written `{{` and `}}`.

Ids -> scores. A call's sequences are sorted by length and each goes to its length bucket
(powers of two from `min_length_bucket` up to `max_length`, or `length_buckets`); each
bucket's sequences are cut into batches of at most `batch_size` rows, right-padded to the
bucket's length, and the row count is padded to a batch bucket (the data-parallel size times a
power of two) with dummy rows whose scores are dropped. One jitted program runs per (batch
bucket, length bucket); it is compiled once, on first use, and counted in `num_compilations`
(its seconds in `compile_seconds`), so a round's repeated reward calls compile nothing new.
A sequence longer than `max_length` is cut on the left (BOS kept, then the last tokens: the
score is read at the end, so the end must survive) and counted in `num_truncated`, or refused
with `truncation="error"`.

Several processes: every process calls `score` with the same full lists, tokenizes and
buckets them identically, fills only its own devices' shards of each batch
(`jax.make_array_from_callback`), runs the same programs in the same order and gathers every
score (`parallel.global_to_host`), so every process returns the same full result.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence, Union

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from eva_jax import parallel
from eva_jax.models import hf_checkpoint, pretrained
from eva_jax.models.tokenizer import (MODEL, Messages, Tokenizer, chat_turns, encode_chat,
                                      get_tokenizer)
from eva_jax.models.transformer import GemmaForSequenceClassification
from eva_jax.rewards.base import REWARDS, Reward, _snippet, prompt_text
from eva_jax.sampler.sampler import pick_bucket, power_of_two_buckets

GEMMA_TEMPLATE = "gemma"
TRUNCATION_RULES = ("left", "error")
TOKENIZER_FILE = "tokenizer.model"


def _check_classifier_checkpoint(path) -> None:
  """Refuses, before any weight is read, a folder that is not a one-label classifier."""
  fmt = pretrained.detect_format(path)
  if fmt != pretrained.HF:
    raise ValueError(
        f"ModelReward: {os.fspath(path)} is an official Gemma Flax checkpoint, which is a "
        "causal LM; the reward model must be a sequence classifier in HF format "
        "(config.json with architectures [\"Gemma2ForSequenceClassification\"], like "
        "Skywork-Reward-Gemma-2-27B).")
  hf = hf_checkpoint.read_hf_config(path)
  cfg, arch = hf_checkpoint.config_from_hf(hf, os.fspath(path))
  if not hf_checkpoint.ARCHITECTURES[arch][1]:
    raise ValueError(
        f"ModelReward: {os.fspath(path)} holds a {arch}, not a sequence classifier; point "
        "ModelReward.path at a reward model (e.g. a Gemma2ForSequenceClassification such as "
        "Skywork-Reward-Gemma-2-27B).")
  if cfg.num_labels != 1:
    raise ValueError(
        f"ModelReward: {os.fspath(path)} is a classifier with num_labels={cfg.num_labels}; a "
        "reward model gives one score per sequence (num_labels=1).")


def _default_tokenizer(path) -> Tokenizer:
  from etils import epath  # pylint: disable=g-import-not-at-top  (orbax depends on etils)
  file = epath.Path(path) / TOKENIZER_FILE
  if not file.exists():
    raise FileNotFoundError(
        f"ModelReward: the checkpoint folder {os.fspath(path)} holds no {TOKENIZER_FILE}; "
        "pass the reward model's tokenizer as ModelReward.tokenizer (the path of its "
        "tokenizer.model or of a folder holding one).")
  return get_tokenizer(os.fspath(file))


def _check_template(template: str) -> None:
  if template == GEMMA_TEMPLATE:
    return
  if not isinstance(template, str) or "{prompt}" not in template or (
      "{response}" not in template):
    raise ValueError(
        f"ModelReward.chat_template={template!r}: use 'gemma' or a format string with the "
        "fields {prompt} and {response}, e.g. 'Question: {prompt}\\n\\nAnswer: {response}'.")
  try:
    template.format(prompt="", response="")
  except (KeyError, IndexError, ValueError) as e:
    raise ValueError(
        f"ModelReward.chat_template={template!r} is not a valid format string ({e!r}); the "
        "only fields are {prompt} and {response}; write literal braces as {{ and }}.") from e


@REWARDS.register("model")
@gin.configurable
class ModelReward(Reward):
  """A reward model (HF Gemma sequence classifier) on the mesh; see the module docstring.

  Args:
    path: the checkpoint folder (local or `gs://`), in HF format with one label.
    mesh: the device mesh (default: all devices on `data`); params go where the logical
      `rules` put them, the batch is split over the data axes.
    tokenizer: the reward model's tokenizer: None for the checkpoint folder's tokenizer.model,
      else a `get_tokenizer` spec (a tokenizer.model path or a folder holding one, "byte") or
      a `Tokenizer`.
    chat_template: "gemma" or a format string with {prompt} and {response} (see the module
      docstring).
    max_length: the most tokens scored per sequence.
    batch_size: the most sequences per program (rounded up to a multiple of the data-parallel
      size).
    min_length_bucket: the smallest length bucket of the power-of-two ladder.
    length_buckets: explicit increasing length buckets (override the ladder); the largest must
      be >= `max_length`.
    truncation: for a sequence longer than `max_length`: "left" (keep BOS and the last
      tokens; counted in `num_truncated`) or "error" (raise ValueError naming the prompt).
    param_dtype: cast params to this dtype while loading (default: the stored dtype).
    dtype: compute dtype (default: the params' dtype).
    rules: logical axis rules (default: `parallel.logical_axis_rules()`).

  Attributes:
    num_compilations / compile_seconds: programs compiled so far, and each one's seconds.
    num_truncated / num_scored: sequences truncated / scored so far.
    last_stats: per batch of the last call: batch and length buckets, rows, tokens,
      truncated rows and compile seconds.

  Raises:
    FileNotFoundError: `path` is missing, or holds no tokenizer.model and `tokenizer` is None.
    ValueError: the checkpoint is not a one-label sequence classifier, or an option is bad.
  """

  needs_mesh = True

  def __init__(self, path: Optional[str] = None, mesh: Optional[Mesh] = None,
               tokenizer: Union[None, str, Tokenizer] = None,
               chat_template: str = GEMMA_TEMPLATE, max_length: int = 2048,
               batch_size: int = 16, min_length_bucket: int = 64,
               length_buckets: Optional[Sequence[int]] = None, truncation: str = "left",
               param_dtype: Any = None, dtype: Any = None, rules=None):
    if path is None:
      raise ValueError("ModelReward needs the reward model's checkpoint folder: bind "
                       "ModelReward.path (an HF Gemma2ForSequenceClassification folder).")
    _check_classifier_checkpoint(path)
    tok = _default_tokenizer(path) if tokenizer is None else get_tokenizer(tokenizer)
    mesh = parallel.create_mesh() if mesh is None else mesh
    rules = parallel.logical_axis_rules() if rules is None else tuple(rules)
    model, params = pretrained.from_pretrained(path, mesh=mesh, rules=rules,
                                               param_dtype=param_dtype, dtype=dtype)
    self._setup(model, params, tok, mesh, rules, chat_template, max_length, batch_size,
                min_length_bucket, length_buckets, truncation,
                name=f"reward model {os.fspath(path)}")

  @classmethod
  def from_model(cls, model: GemmaForSequenceClassification, params: Any,
                 tokenizer: Union[str, Tokenizer], mesh: Optional[Mesh] = None, rules=None,
                 chat_template: str = GEMMA_TEMPLATE, max_length: int = 2048,
                 batch_size: int = 16, min_length_bucket: int = 64,
                 length_buckets: Optional[Sequence[int]] = None,
                 truncation: str = "left") -> "ModelReward":
    """A reward from a model and params already on `mesh` (e.g. random ones in a benchmark);
    the arguments are `ModelReward`'s."""
    self = cls.__new__(cls)
    mesh = parallel.create_mesh() if mesh is None else mesh
    rules = parallel.logical_axis_rules() if rules is None else tuple(rules)
    self._setup(model, params, get_tokenizer(tokenizer), mesh, rules, chat_template, max_length,
                batch_size, min_length_bucket, length_buckets, truncation,
                name="reward model")
    return self

  def _setup(self, model, params, tokenizer, mesh, rules, chat_template, max_length,
             batch_size, min_length_bucket, length_buckets, truncation, name) -> None:
    if not isinstance(model, GemmaForSequenceClassification):
      raise TypeError(f"ModelReward needs a GemmaForSequenceClassification, got "
                      f"{type(model).__name__}.")
    if model.config.num_labels != 1:
      raise ValueError(f"ModelReward: the classifier has num_labels={model.config.num_labels}; "
                       "a reward model gives one score per sequence (num_labels=1).")
    if truncation not in TRUNCATION_RULES:
      raise ValueError(f"ModelReward.truncation={truncation!r}: use one of "
                       f"{TRUNCATION_RULES}.")
    if max_length < 2 or batch_size < 1 or min_length_bucket < 1:
      raise ValueError(f"ModelReward: max_length={max_length} (>= 2), batch_size={batch_size} "
                       f"and min_length_bucket={min_length_bucket} (>= 1) are out of range.")
    _check_template(chat_template)
    if chat_template == GEMMA_TEMPLATE and (tokenizer.start_of_turn_id is None or
                                            tokenizer.end_of_turn_id is None):
      raise ValueError(
          f"ModelReward: the tokenizer {getattr(tokenizer, 'name', type(tokenizer).__name__)} "
          "has no <start_of_turn> / <end_of_turn> pieces, so chat_template='gemma' cannot "
          "render the chat; pass the reward model's own tokenizer, or a format-string "
          "chat_template with {prompt} and {response}.")
    if tokenizer.vocab_size > model.config.vocab_size:
      raise ValueError(
          f"ModelReward: the tokenizer has {tokenizer.vocab_size} ids but the reward model's "
          f"embedding only {model.config.vocab_size} rows; pass the reward model's own "
          "tokenizer (ModelReward.tokenizer).")
    self.name = name
    self.model, self.params, self.config = model, params, model.config
    self.tokenizer = tokenizer
    self.mesh, self.rules = mesh, rules
    self.chat_template = chat_template
    self.max_length = int(max_length)
    self.truncation = truncation
    if length_buckets is None:
      self.length_buckets = power_of_two_buckets(min(min_length_bucket, self.max_length),
                                                 self.max_length)
    else:
      buckets = tuple(int(b) for b in length_buckets)
      if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
        raise ValueError(f"ModelReward.length_buckets={buckets}: use increasing positive "
                         "lengths.")
      if buckets[-1] < self.max_length:
        raise ValueError(f"ModelReward.length_buckets: the largest bucket {buckets[-1]} is "
                         f"below max_length={self.max_length}; add a bucket >= it.")
      self.length_buckets = buckets
    # Every process holds the full inputs and fills its own shards, so a batch only has to
    # split evenly over the data-parallel devices, whatever the number of processes.
    self.dp = parallel.data_parallel_size(mesh, rules)
    self.batch_size = -(-int(batch_size) // self.dp) * self.dp
    self.batch_buckets = tuple(b for b in power_of_two_buckets(self.dp, self.batch_size)
                               if b % self.dp == 0)
    self.num_compilations = 0
    self.compile_seconds: list[float] = []
    self.num_truncated = 0
    self.num_scored = 0
    self.last_stats: list[dict] = []
    self._programs: dict[tuple[int, int], Any] = {}

  # ---------------------------------------------------------------- text -> ids

  def encode(self, conversation: Messages, response: str) -> list[int]:
    """The ids the reward model scores for `response` answering `conversation` (before
    truncation)."""
    if self.chat_template == GEMMA_TEMPLATE:
      if chat_turns(conversation)[-1][0] == MODEL:
        raise ValueError(f"{self.name}: the conversation ends with a model turn; it must end "
                         "with the user turn the response answers.")
      messages = ([{"role": "user", "content": conversation}] if isinstance(conversation, str)
                  else list(conversation))
      messages.append({"role": MODEL, "content": response})
      return encode_chat(self.tokenizer, messages, add_generation_prompt=False)
    text = self.chat_template.format(prompt=prompt_text(conversation), response=response)
    return self.tokenizer.encode(text, add_bos=True)

  def _fit(self, ids: list[int], what: str) -> tuple[np.ndarray, bool]:
    """(ids within max_length, whether they were truncated)."""
    if len(ids) <= self.max_length:
      return np.asarray(ids, np.int32), False
    if self.truncation == "error":
      raise ValueError(f"{self.name}: {what} has {len(ids)} tokens, more than max_length="
                       f"{self.max_length}; shorten it, raise ModelReward.max_length, or set "
                       "ModelReward.truncation='left'.")
    keep = self.max_length
    if ids[0] == self.tokenizer.bos_id:
      return np.asarray(ids[:1] + ids[len(ids) - (keep - 1):], np.int32), True
    return np.asarray(ids[-keep:], np.int32), True

  def _score(self, conversations, responses):
    ids = [self.encode(c, r) for c, r in zip(conversations, responses)]
    names = [f"the response to prompt {i} ({_snippet(prompt_text(c))!r})"
             for i, c in enumerate(conversations)]
    return self.score_ids(ids, names), {}

  # ---------------------------------------------------------------- ids -> scores

  def score_ids(self, id_lists: Sequence[Sequence[int]],
                names: Optional[Sequence[str]] = None) -> np.ndarray:
    """Scores token-id sequences (chat template and BOS included); every process passes the
    same lists and gets every score.

    Args:
      id_lists: one id list per sequence.
      names: what to call each sequence in an error (default "sequence i").

    Returns:
      float32 [N] scores in input order.

    Raises:
      ValueError: an empty sequence, an id outside the vocabulary, or (truncation="error") a
        sequence longer than `max_length`.
    """
    if self.params is None:
      raise RuntimeError(f"{self.name} was closed; build a new ModelReward to score again.")
    names = list(names) if names is not None else [f"sequence {i}" for i in range(len(id_lists))]
    rows, truncated = [], []
    vocab = self.config.vocab_size
    for i, ids in enumerate(id_lists):
      ids = [int(t) for t in ids]
      if not ids:
        raise ValueError(f"{self.name}: {names[i]} has no tokens.")
      if min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(f"{self.name}: {names[i]} has token ids outside [0, {vocab}); "
                         "tokenize with the reward model's tokenizer.")
      row, cut = self._fit(ids, names[i])
      rows.append(row)
      truncated.append(cut)
    scores = np.zeros((len(rows),), np.float32)
    self.last_stats = []
    # Sorted by length (stably, so every process forms the same batches), then grouped by
    # length bucket: every row runs in the smallest bucket that holds it.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    groups: dict[int, list[int]] = {}
    for i in order:
      groups.setdefault(pick_bucket(len(rows[i]), self.length_buckets, "Sequence length"),
                        []).append(i)
    pending = []  # dispatch every batch before reading any back: the device never waits
    for length, members in groups.items():
      for start in range(0, len(members), self.batch_size):
        ids = members[start:start + self.batch_size]
        pending.append((ids, self._run_batch([rows[i] for i in ids], length,
                                             sum(truncated[i] for i in ids))))
    for ids, out in pending:
      scores[ids] = parallel.global_to_host(out)[:len(ids)]
    self.num_truncated += int(sum(truncated))
    self.num_scored += len(rows)
    return scores

  def _put(self, x: np.ndarray) -> jax.Array:
    """Host numpy -> global array; each process fills only its own devices' shards."""
    sharding = parallel.batch_sharding(self.mesh, x.ndim, self.rules)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  def _run_batch(self, rows: list[np.ndarray], length: int, num_truncated: int) -> jax.Array:
    b = pick_bucket(len(rows), self.batch_buckets, "Batch")
    tokens = np.full((b, length), self.config.pad_id, np.int32)
    mask = np.zeros((b, length), bool)
    tokens[len(rows):, 0] = self.config.bos_id  # dummy rows: one real token, score dropped
    mask[len(rows):, 0] = True
    for r, row in enumerate(rows):
      tokens[r, :len(row)] = row
      mask[r, :len(row)] = True
    args = (self.params, self._put(tokens), self._put(mask))
    compile_s = 0.0
    key = (b, length)
    if key not in self._programs:
      start = time.perf_counter()
      self._programs[key] = self._compile(args)
      compile_s = time.perf_counter() - start
      self.num_compilations += 1
      self.compile_seconds.append(compile_s)
    self.last_stats.append(dict(batch=b, length_bucket=length, rows=len(rows),
                                tokens=int(sum(len(r) for r in rows)),
                                truncated=num_truncated, compile_s=compile_s))
    return self._programs[key](*args)

  def _compile(self, args):
    fn = jax.jit(self._forward, out_shardings=parallel.batch_sharding(self.mesh, 1, self.rules))
    with parallel.with_mesh_rules(self.mesh, self.rules):
      return fn.lower(*args).compile()

  def _forward(self, params, tokens, mask):
    """float32 scores [B] of right-padded `tokens` [B, T] (True in `mask` [B, T] on tokens)."""
    return self.model.apply({"params": params}, tokens, attention_mask=mask).astype(jnp.float32)

  def stats(self) -> dict:
    """Totals for metrics: compilations and their seconds, sequences scored and truncated."""
    return dict(num_compilations=self.num_compilations,
                compile_s=float(sum(self.compile_seconds)), num_scored=self.num_scored,
                num_truncated=self.num_truncated)

  def close(self) -> None:
    """Drops the params and compiled programs (frees device memory)."""
    self.params = None
    self._programs.clear()

"""Prompt files -> `PromptExample`s: the initial prompt set X_0 and the held-out prompts.

Formats (told from the extension, or `format=`):

* JSON lines (`.jsonl`, `.json`): one JSON object a line; blank lines are skipped. A `.json`
  file may instead hold one JSON list of objects.
* Parquet (`.parquet`, read with pyarrow): one record a row; only the needed columns are read.

Each record holds the prompt under `key` (gin: `load_prompts.key`), either as a plain string or
as chat `messages` (a list of {"role", "content"}, as in HF chat datasets). For messages, the
prompt is the *last user turn*; the turns before it become the example's `context`, and turns
after it (a dataset's reference answer) are dropped: the solver writes its own. Other fields
named in `metadata_keys` (a task id, a reference answer for a programmatic reward) travel with
the prompt.

Dropped, and counted in `PromptSet.stats`: empty prompts, duplicates (same case-folded,
whitespace-collapsed conversation as an earlier prompt, the creator's notion of "the same
prompt"), and prompts longer than `max_prompt_tokens` in the chat encoding the sampler feeds
the model. Everything else a file can get wrong raises `PromptFileError` naming the file and
the line (JSON lines, 1-based) or row / record (Parquet, JSON list; 0-based, as pandas and
pyarrow index them).

Paths are local or `gs://` (etils.epath), one path, a list, or globs. Every process of a
multi-host job reads the same files and gets the same examples in the same order, and
`split_heldout` draws the same held-out set everywhere (a hash of each prompt, no process RNG).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import gin
from etils import epath

from eva_jax.creator.buffer import normalize_text
from eva_jax.models import encode_chat
from eva_jax.models.tokenizer import Tokenizer, chat_turns, get_tokenizer

PathLike = Union[str, os.PathLike]

JSONL, PARQUET = "jsonl", "parquet"
FORMATS = (JSONL, PARQUET)
_EXTENSIONS = {".jsonl": JSONL, ".json": JSONL, ".parquet": PARQUET, ".pq": PARQUET}

STAT_KEYS = ("read", "kept", "dropped_empty", "dropped_duplicate", "dropped_too_long")

_PARQUET_BATCH_ROWS = 4096


class PromptFileError(ValueError):
  """A prompt file, or one of its records, cannot be read as prompts."""


@dataclasses.dataclass(frozen=True)
class PromptExample:
  """One prompt read from a file.

  Attributes:
    text: the user request (for chat messages, the last user turn's content).
    context: earlier turns of the conversation, each {"role": ..., "content": str}; () for a
      plain prompt.
    source: where it was read, "file:line" (JSON lines), "file:row N" (Parquet) or
      "file:record N" (a JSON list).
    metadata: the record's fields named in `metadata_keys` (JSON values).
  """

  text: str
  context: tuple[Mapping[str, str], ...] = ()
  source: str = ""
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def conversation(self) -> list[dict[str, str]]:
    """The chat the policy answers: the earlier turns, then `text` as the user turn."""
    return [dict(m) for m in self.context] + [{"role": "user", "content": self.text}]


@dataclasses.dataclass
class PromptSet:
  """Prompts read from files, in file order, and what was dropped on the way.

  Attributes:
    examples: the kept prompts.
    stats: counts, keys `STAT_KEYS`: records read, kept, and dropped as empty, duplicate, or
      longer than `max_prompt_tokens`.
    files: the files read, in order.
  """

  examples: list[PromptExample]
  stats: dict[str, int]
  files: list[str] = dataclasses.field(default_factory=list)

  def __len__(self) -> int:
    return len(self.examples)

  def __iter__(self) -> Iterator[PromptExample]:
    return iter(self.examples)

  def texts(self) -> list[str]:
    return [e.text for e in self.examples]


# --------------------------------------------------------------------------------------------
# Paths


# "builtin:NAME" names a prompt file shipped inside the package (eva_jax/data/builtin/NAME),
# so that gin files find it wherever eva_jax is installed.
BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "builtin")


def _has_glob(s: str) -> bool:
  return any(c in s for c in "*?[")


def expand_paths(paths: Union[PathLike, Sequence[PathLike]]) -> list[epath.Path]:
  """Files named by one path, a list, or globs (local or gs://; "builtin:NAME" for a file
  shipped in `eva_jax/data/builtin/`), in the given order; each glob's matches sorted.

  Raises:
    FileNotFoundError: a path does not exist, is a folder, or a glob matches nothing.
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  if not paths:
    raise FileNotFoundError("load_prompts: no prompt file given; pass a path, a list of paths "
                            "or a glob (gin: load_prompts.paths).")
  files = []
  for p in paths:
    s = os.fspath(p)
    if s.startswith(BUILTIN_PREFIX):  # a file shipped with the package
      s = os.path.join(BUILTIN_DIR, s[len(BUILTIN_PREFIX):])
    if _has_glob(s):
      # Split at the first component holding a wildcard: epath globs relative to a folder.
      parts = s.split("/")
      first = next(i for i, part in enumerate(parts) if _has_glob(part))
      base = "/".join(parts[:first]) or ("/" if s.startswith("/") else ".")
      matches = sorted(epath.Path(base).glob("/".join(parts[first:])), key=os.fspath)
      matches = [m for m in matches if not m.is_dir()]
      if not matches:
        raise FileNotFoundError(f"load_prompts: no file matches {s}.")
      files.extend(matches)
      continue
    path = epath.Path(s)
    if not path.exists():
      raise FileNotFoundError(f"load_prompts: prompt file {s} does not exist.")
    if path.is_dir():
      raise FileNotFoundError(f"load_prompts: {s} is a folder; pass its files or a glob such as "
                              f"{s.rstrip('/')}/*.jsonl.")
    files.append(path)
  return files


def _format_of(path: epath.Path, format: Optional[str]) -> str:  # pylint: disable=redefined-builtin
  if format is not None:
    return format
  ext = os.path.splitext(path.name)[1].lower()
  if ext not in _EXTENSIONS:
    raise PromptFileError(f"{path}: cannot tell the format from the extension {ext or '(none)'}"
                          f"; name it {' / '.join(_EXTENSIONS)} or pass format= (one of "
                          f"{FORMATS}).")
  return _EXTENSIONS[ext]


# --------------------------------------------------------------------------------------------
# Raw records: (source, dict)


def _jsonl_records(path: epath.Path) -> Iterator[tuple[str, Any]]:
  with path.open("rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise PromptFileError(f"{path}:{line}: not UTF-8 text ({e.reason}); save the file as "
                          "UTF-8.") from None
  if path.name.lower().endswith(".json") and text.lstrip().startswith("["):
    try:
      records = json.loads(text)
    except json.JSONDecodeError as e:
      raise PromptFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg}: column {e.colno}); a "
                            ".json prompt file holds one list of records, or one record a "
                            "line.") from None
    for i, record in enumerate(records):
      yield f"{path}:record {i}", record
    return
  for lineno, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise PromptFileError(f"{path}:{lineno}: not valid JSON ({e.msg}: column {e.colno}); each "
                            "line must be one JSON object.") from None
    yield f"{path}:{lineno}", record


def _parquet_records(path: epath.Path, wanted: Sequence[str]) -> Iterator[tuple[str, Any]]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  with path.open("rb") as f:
    try:
      pf = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
      raise PromptFileError(f"{path}: not a readable Parquet file ({e}).") from None
    names = pf.schema_arrow.names
    columns = [c for c in dict.fromkeys(wanted) if c in names]
    if not columns:
      raise PromptFileError(f"{path}: no column named {' or '.join(map(repr, wanted[:2]))}; its "
                            f"columns are {names}. Set load_prompts.key (gin) to the column "
                            "holding the prompt.")
    row = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
      for record in batch.to_pylist():
        yield f"{path}:row {row}", record
        row += 1


# --------------------------------------------------------------------------------------------
# One record -> (text, context)


def _content_str(content: Any, where: str, n: int) -> str:
  """A message's content as text: a str, or HF's list of {"type": "text", "text"} parts."""
  if isinstance(content, str):
    return content
  if isinstance(content, list) and all(
      isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
      for p in content):
    return "".join(p["text"] for p in content)
  raise PromptFileError(f"{where}: message {n} has content {content!r:.120}; expected a str or "
                        "a list of {'type': 'text', 'text': str} parts.")


def _from_messages(messages: list, field: str, where: str) -> tuple[str, tuple[dict, ...]]:
  turns = []
  for n, m in enumerate(messages):
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
      raise PromptFileError(f"{where}: {field!r} is not a valid chat: message {n} is {m!r:.120}"
                            "; each message must be {'role': str, 'content': str}.")
    turns.append({"role": m["role"], "content": _content_str(m["content"], where, n)})
  users = [n for n, t in enumerate(turns) if t["role"] == "user"]
  if not users:
    raise PromptFileError(f"{where}: the chat under {field!r} has no user turn (roles "
                          f"{[t['role'] for t in turns]}); a prompt is the last user message.")
  last = users[-1]
  prompt = turns[:last + 1]
  try:
    chat_turns(prompt)  # roles alternate, a system turn only first: what encode_chat accepts
  except (ValueError, TypeError) as e:
    raise PromptFileError(f"{where}: the chat under {field!r} is not a valid conversation: "
                          f"{e}") from None
  return turns[last]["content"], tuple(prompt[:-1])


def _prompt_of(record: Any, key: str, messages_key: Optional[str],
               where: str) -> tuple[str, tuple[dict, ...]]:
  if not isinstance(record, Mapping):
    raise PromptFileError(f"{where}: expected a JSON object (a record), got "
                          f"{type(record).__name__} {record!r:.80}.")
  # A Parquet row has every column, so a null chat column counts as absent.
  use_messages = messages_key is not None and record.get(messages_key) is not None
  field = messages_key if use_messages else key
  if field not in record:
    wanted = f"{messages_key!r} or {key!r}" if messages_key is not None else repr(key)
    raise PromptFileError(f"{where}: the record has no {wanted}; its keys are {sorted(record)}. "
                          "Set load_prompts.key (gin) to the field holding the prompt.")
  value = record[field]
  if isinstance(value, str) and field != messages_key:
    return value.strip(), ()
  if isinstance(value, (list, tuple)):
    text, context = _from_messages(list(value), field, where)
    return text.strip(), context
  expected = "a chat (a list of messages)" if field == messages_key else (
      "a str or a chat (a list of messages)")
  raise PromptFileError(f"{where}: {field!r} is {type(value).__name__} {value!r:.80}; expected "
                        f"{expected}.")


def _metadata_of(record: Mapping, keys: Sequence[str], where: str) -> dict:
  meta = {k: record[k] for k in keys if k in record}
  try:
    json.dumps(meta)
  except (TypeError, ValueError) as e:
    raise PromptFileError(f"{where}: metadata {sorted(meta)} is not JSON-serialisable ({e}); the "
                          "prompt buffer saves it as JSON.") from None
  return meta


def _dedup_key(text: str, context: Iterable[Mapping[str, str]]) -> str:
  parts = [f"{m['role']}\x00{normalize_text(m['content'])}" for m in context]
  return "\x01".join(parts + [normalize_text(text)])


# --------------------------------------------------------------------------------------------
# Keeping prompts


class PromptCollector:
  """Keeps prompts as `load_prompts` does, whatever they are read from: drops empty ones,
  duplicates and those longer than `max_prompt_tokens`, counts what it drops (`STAT_KEYS`),
  and stops at `limit`. Other prompt sources (seqio, TFDS) feed it too."""

  def __init__(self, *, tokenizer: Optional[Tokenizer] = None,
               max_prompt_tokens: Optional[int] = None, drop_duplicates: bool = True,
               limit: Optional[int] = None, metadata_keys: Sequence[str] = ()):
    self.tokenizer = tokenizer
    self.max_prompt_tokens = max_prompt_tokens
    self.drop_duplicates = drop_duplicates
    self.limit = limit
    self.metadata_keys = ((metadata_keys,) if isinstance(metadata_keys, str)
                          else tuple(metadata_keys))
    self.stats = dict.fromkeys(STAT_KEYS, 0)
    self.examples: list[PromptExample] = []
    self._seen: set[str] = set()
    self._meta_seen: set[str] = set()

  @property
  def full(self) -> bool:
    """Whether `limit` prompts are kept (read no further)."""
    return self.limit is not None and len(self.examples) >= self.limit

  def add(self, where: str, text: str, context: tuple = (),
          metadata: Optional[Mapping[str, Any]] = None) -> bool:
    """Counts one record read; keeps its prompt unless dropped. Returns whether kept."""
    self.stats["read"] += 1
    meta = dict(metadata or {})
    self._meta_seen.update(meta)
    if not text.strip():
      self.stats["dropped_empty"] += 1
      return False
    if self.drop_duplicates:
      dedup = _dedup_key(text, context)
      if dedup in self._seen:
        self.stats["dropped_duplicate"] += 1
        return False
      self._seen.add(dedup)
    example = PromptExample(text=text, context=context, source=where, metadata=meta)
    if self.max_prompt_tokens is not None and len(
        encode_chat(self.tokenizer, example.conversation())) > self.max_prompt_tokens:
      self.stats["dropped_too_long"] += 1
      return False
    self.examples.append(example)
    return True

  def finish(self, read_from: list[str], *, who: str, metadata_hint: str) -> PromptSet:
    """The kept prompts as a `PromptSet` (`files`: `read_from`).

    Raises:
      PromptFileError: a metadata key was in no record, or no prompt is left (the counts are
        given); messages start with `who`, and a missing metadata key's ends with
        `metadata_hint`.
    """
    stats = dict(self.stats, kept=len(self.examples))
    missing = [k for k in self.metadata_keys if k not in self._meta_seen]
    if missing:
      raise PromptFileError(f"{who}: metadata key(s) {missing} are in no record of "
                            f"{read_from}; {metadata_hint}.")
    if not self.examples:
      too_long = ("" if self.max_prompt_tokens is None else
                  f", {stats['dropped_too_long']} longer than max_prompt_tokens="
                  f"{self.max_prompt_tokens} (raise it)")
      raise PromptFileError(
          f"{who}: no prompt left in {read_from}: read {stats['read']}, dropped "
          f"{stats['dropped_empty']} empty, {stats['dropped_duplicate']} duplicate{too_long}.")
    return PromptSet(examples=list(self.examples), stats=stats, files=list(read_from))


# --------------------------------------------------------------------------------------------
# Public API


def check_prompt_limits(who: str, tokenizer: Any, max_prompt_tokens: Optional[int],
                        limit: Optional[int], tokenizer_hint: str) -> None:
  """ValueError naming `who` for a max_prompt_tokens without a tokenizer, or a bound < 1."""
  if max_prompt_tokens is not None:
    if tokenizer is None:
      raise ValueError(f"{who}: max_prompt_tokens needs a tokenizer to count tokens"
                       f"{tokenizer_hint}, or max_prompt_tokens=None.")
    if max_prompt_tokens < 1:
      raise ValueError(f"{who}: max_prompt_tokens={max_prompt_tokens} must be >= 1.")
  if limit is not None and limit < 1:
    raise ValueError(f"{who}: limit={limit} must be >= 1 (or None for no limit).")


@gin.configurable
def load_prompts(paths: Union[PathLike, Sequence[PathLike]] = gin.REQUIRED, *,
                 key: str = "prompt",
                 messages_key: Optional[str] = None,
                 format: Optional[str] = None,  # pylint: disable=redefined-builtin
                 tokenizer: Union[None, str, Tokenizer] = None,
                 max_prompt_tokens: Optional[int] = None,
                 drop_duplicates: bool = True,
                 limit: Optional[int] = None,
                 metadata_keys: Sequence[str] = ()) -> PromptSet:
  """Reads prompts from JSON-lines or Parquet files (see the module docstring).

  Args:
    paths: a file, a list of files, or globs (local or gs://), read in order.
    key: the field holding the prompt: a str, or chat messages (a list of {"role",
      "content"}), told apart per record.
    messages_key: a field holding chat messages, used when a record has it (else `key`).
    format: "jsonl" or "parquet" for every file; None: from each file's extension.
    tokenizer: a `Tokenizer` or a `get_tokenizer` spec ("byte", a tokenizer.model path),
      needed with `max_prompt_tokens`.
    max_prompt_tokens: drop prompts whose chat encoding (`encode_chat` with BOS and the
      generation prompt, as the sampler feeds them) is longer; None: keep all.
    drop_duplicates: drop a prompt whose conversation equals an earlier one's (case-folded,
      whitespace collapsed).
    limit: stop once this many prompts are kept; None: read everything.
    metadata_keys: record fields copied into `PromptExample.metadata` where present (each must
      be present in some record).

  Returns:
    A `PromptSet`: the kept examples in file order, and the counts of what was dropped.

  Raises:
    FileNotFoundError: a path does not exist, is a folder, or a glob matches nothing.
    PromptFileError: a file holds no records, a line is not JSON, a record lacks the prompt
      field or holds something else than a str or a chat, a chat has no user turn, a metadata
      key is in no record, or no prompt is left after dropping (the counts are given).
    ValueError: bad arguments (max_prompt_tokens without a tokenizer, an unknown format).
  """
  check_prompt_limits("load_prompts", tokenizer, max_prompt_tokens, limit,
                      "; pass tokenizer= (gin: load_prompts.tokenizer = 'byte' or a "
                      "tokenizer.model path)")
  if format is not None and format not in FORMATS:
    raise ValueError(f"load_prompts: format={format!r}; use one of {FORMATS} (or None to tell "
                     "it from each file's extension).")
  if isinstance(metadata_keys, str):
    metadata_keys = (metadata_keys,)
  tok = get_tokenizer(tokenizer) if tokenizer is not None else None

  files = expand_paths(paths)
  keep = PromptCollector(tokenizer=tok, max_prompt_tokens=max_prompt_tokens,
                         drop_duplicates=drop_duplicates, limit=limit,
                         metadata_keys=metadata_keys)
  read_files: list[str] = []
  wanted = [c for c in (messages_key, key) if c is not None] + list(metadata_keys)
  for path in files:
    if keep.full:
      break
    fmt = _format_of(path, format)
    records = _parquet_records(path, wanted) if fmt == PARQUET else _jsonl_records(path)
    read_files.append(os.fspath(path))
    in_file = 0
    for where, record in records:
      in_file += 1
      text, context = _prompt_of(record, key, messages_key, where)
      keep.add(where, text, context, _metadata_of(record, keep.metadata_keys, where))
      if keep.full:
        break
    if in_file == 0:
      raise PromptFileError(f"{path}: the prompt file holds no records; fill it, or leave it "
                            "out of load_prompts.paths.")
  return keep.finish(read_files, who="load_prompts",
                     metadata_hint="check load_prompts.metadata_keys")


def _rank(example: Union[PromptExample, str], seed: int) -> bytes:
  """A seeded hash of the prompt: where it falls in the split, whatever its position."""
  if isinstance(example, str):
    key = normalize_text(example)
  else:
    key = _dedup_key(example.text, example.context)
  return hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()


@gin.configurable
def split_heldout(examples: Union[PromptSet, Sequence[PromptExample]], *,
                  fraction: Optional[float] = None, count: Optional[int] = None,
                  seed: int = 0) -> tuple[list[PromptExample], list[PromptExample]]:
  """Splits prompts into a training and a held-out set, the same on every process.

  The held-out prompts are the `count` (or `round(fraction * n)`) with the smallest seeded
  hash of their normalised text, so a prompt's side depends on the prompt and the seed, not on
  file order or on the process; appending prompts to a file moves few others. (Duplicates, if
  kept, hash alike and are split together unless they straddle the cut.)

  Args:
    examples: the prompts (a `PromptSet` or a sequence of `PromptExample` or str).
    fraction: share held out, in (0, 1); or
    count: number held out, in [1, n - 1].
    seed: changes which prompts are held out.

  Returns:
    (train, heldout): disjoint, together all of `examples`, each in the input order.

  Raises:
    ValueError: neither or both of fraction / count, or a size that leaves a side empty.
  """
  items = list(examples.examples if isinstance(examples, PromptSet) else examples)
  n = len(items)
  if (fraction is None) == (count is None):
    raise ValueError(f"split_heldout: pass exactly one of fraction= or count= (got fraction="
                     f"{fraction}, count={count}).")
  if fraction is not None:
    if not 0 < fraction < 1:
      raise ValueError(f"split_heldout: fraction={fraction} must be in (0, 1).")
    count = int(round(fraction * n))
  if not 1 <= count <= n - 1:
    raise ValueError(f"split_heldout: holding out {count} of {n} prompts leaves "
                     f"{'no held-out' if count < 1 else 'no training'} prompt; hold out "
                     "between 1 and n - 1 (more prompts, or another fraction / count).")
  order = sorted(range(n), key=lambda i: (_rank(items[i], seed), i))
  held = set(order[:count])
  train = [x for i, x in enumerate(items) if i not in held]
  heldout = [x for i, x in enumerate(items) if i in held]
  return train, heldout


@gin.configurable
def load_train_and_heldout(train_paths: Union[PathLike, Sequence[PathLike]] = gin.REQUIRED,
                           heldout_paths: Union[None, PathLike, Sequence[PathLike]] = None, *,
                           heldout_fraction: Optional[float] = None,
                           heldout_count: Optional[int] = None, seed: int = 0,
                           tokenizer: Union[None, str, Tokenizer] = None,
                           ) -> tuple[PromptSet, PromptSet]:
  """The initial prompt set and the held-out evaluation prompts.

  Held-out prompts come from `heldout_paths`, or else from a fixed split of the training
  files (`split_heldout` with `heldout_fraction` or `heldout_count` and `seed`). Reading options
  (key, max_prompt_tokens, ...) are `load_prompts`' gin bindings, shared by both sets.

  Args:
    train_paths: the initial prompt files (see `load_prompts`).
    heldout_paths: the held-out prompt files; None: split them off `train_paths`.
    heldout_fraction: with no `heldout_paths`, the share of the training prompts held out; or
    heldout_count: their number.
    seed: the split's seed.
    tokenizer: passed to `load_prompts` (for `max_prompt_tokens`).

  Returns:
    (train, heldout) `PromptSet`s. After a split, `train.stats` are the files' counts with
    "kept" the training prompts and "held_out" the others; `heldout.stats` count the held-out
    prompts as read and kept.

  Raises:
    ValueError: held-out files together with a split size, or neither.
  """
  split = heldout_fraction is not None or heldout_count is not None
  if heldout_paths is not None:
    if split:
      raise ValueError("load_train_and_heldout: give heldout_paths or a split size "
                       "(heldout_fraction / heldout_count), not both.")
    kwargs = {} if tokenizer is None else {"tokenizer": tokenizer}
    return (load_prompts(train_paths, **kwargs), load_prompts(heldout_paths, **kwargs))
  if not split:
    raise ValueError("load_train_and_heldout: no held-out prompts; pass heldout_paths, or "
                     "heldout_fraction / heldout_count to split them off the training prompts.")
  kwargs = {} if tokenizer is None else {"tokenizer": tokenizer}
  return split_prompt_set(load_prompts(train_paths, **kwargs), fraction=heldout_fraction,
                          count=heldout_count, seed=seed)


def split_prompt_set(full: PromptSet, *, fraction: Optional[float] = None,
                     count: Optional[int] = None, seed: int = 0) -> tuple[PromptSet, PromptSet]:
  """`split_heldout` on a `PromptSet`: (train, heldout) `PromptSet`s. `train.stats` are
  `full`'s counts with "kept" the training prompts and "held_out" the others; `heldout.stats`
  count the held-out prompts as read and kept."""
  train, heldout = split_heldout(full, fraction=fraction, count=count, seed=seed)
  heldout_stats = {**dict.fromkeys(STAT_KEYS, 0), "read": len(heldout), "kept": len(heldout)}
  return (PromptSet(train, {**full.stats, "kept": len(train), "held_out": len(heldout)},
                    list(full.files)),
          PromptSet(heldout, heldout_stats, list(full.files)))

"""Tokenizers (Gemma's SentencePiece model and a byte-level one), Gemma's chat template, and
batch encoding into fixed-shape numpy arrays.

Both tokenizers share one interface (`Tokenizer`): the special ids `pad_id`, `eos_id`,
`bos_id`, `start_of_turn_id`, `end_of_turn_id`, `vocab_size`, `encode(text, add_bos, add_eos)`
and a plain `decode(ids)` that stops at nothing (`cut_at_stop` cuts a sampled sequence at its
first stop id).

Gemma's chat format, as its Hugging Face chat template renders it (a system message, which
Gemma has no role for, is folded into the first user turn as Gemma 3's template does):

    <bos><start_of_turn>user
    {system}

    {user}<end_of_turn>
    <start_of_turn>model
    {answer}<end_of_turn>
    <start_of_turn>model          <- the generation prompt

`<start_of_turn>` and `<end_of_turn>` are single tokens (user-defined pieces of Gemma's
SentencePiece model, ids 106 and 107); `encode_chat` inserts them as ids.
"""

from __future__ import annotations

import abc
import re
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import gin
import numpy as np

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
USER = "user"
MODEL = "model"
SYSTEM = "system"

# Roles accepted in messages, mapped onto Gemma's two roles; HF's "assistant" is Gemma's "model".
_ROLE_ALIASES = {"user": USER, "model": MODEL, "assistant": MODEL}

Message = Mapping[str, Any]
Messages = Union[str, Sequence[Message]]


class Tokenizer(abc.ABC):
  """The interface every tokenizer of this project has.

  Attributes:
    pad_id / eos_id / bos_id: special ids (Gemma's: 0, 1, 2).
    start_of_turn_id / end_of_turn_id: ids of the chat turn markers, or None where the
      vocabulary has none (then `encode_chat` raises).
  """

  pad_id: int
  eos_id: int
  bos_id: int
  start_of_turn_id: Optional[int]
  end_of_turn_id: Optional[int]

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce (a model's table may have more rows)."""

  @abc.abstractmethod
  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of `text`, optionally with BOS in front and EOS at the end."""

  @abc.abstractmethod
  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; pad/eos/bos decode to nothing, and nothing stops the decoding."""

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end a generated answer: EOS and, for chat models, `<end_of_turn>`."""
    if self.end_of_turn_id is None:
      return (self.eos_id,)
    return (self.eos_id, self.end_of_turn_id)


def _as_id_list(ids: Iterable[int], what: str) -> list[int]:
  """A list of Python ints from a list, numpy or jax array of rank 1."""
  arr = np.asarray(ids)
  if arr.ndim != 1:
    raise ValueError(f"{what}: expected a 1-D sequence of token ids, got shape {arr.shape}; "
                     "decode one row at a time.")
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    raise TypeError(f"{what}: token ids must be integers, got dtype {arr.dtype}.")
  return [int(i) for i in arr.tolist()]


def _check_text(text: Any, what: str) -> None:
  if not isinstance(text, str):
    raise TypeError(f"{what}: expected a str to encode, got {type(text).__name__}.")


class SentencePieceTokenizer(Tokenizer):
  """Gemma's SentencePiece tokenizer (`tokenizer.model`).

  The special ids are read from the model (its trainer spec for pad/eos/bos/unk and its
  user-defined pieces for the turn markers), not assumed.

  Build it with `from_path` (a local or `gs://` file, or a folder holding `tokenizer.model`)
  or `from_bytes` (a serialized ModelProto).
  """

  def __init__(self, model_proto: bytes, name: str = "<bytes>"):
    """Args:
      model_proto: the serialized SentencePiece ModelProto (the bytes of tokenizer.model).
      name: where the bytes came from; error messages name it.
    """
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    self.name = name
    expected = ("expected a SentencePiece model such as Gemma's tokenizer.model (a serialized "
                "ModelProto), e.g. the file of that name in a Hugging Face Gemma checkpoint")
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except Exception as e:  # sentencepiece raises RuntimeError with an internal message.
      raise ValueError(f"Tokenizer file {name} is not a SentencePiece model ({e}); "
                       f"{expected}.") from e
    if self._sp.get_piece_size() <= 0:  # An empty file parses as an empty ModelProto.
      raise ValueError(f"Tokenizer file {name} holds an empty SentencePiece model; {expected}.")
    self.pad_id = self._sp.pad_id()
    self.eos_id = self._sp.eos_id()
    self.bos_id = self._sp.bos_id()
    self.unk_id = self._sp.unk_id()
    for field in ("pad_id", "eos_id", "bos_id"):
      if getattr(self, field) < 0:
        raise ValueError(f"Tokenizer file {name}: the SentencePiece model defines no "
                         f"{field.removesuffix('_id')} piece; train it with "
                         f"{field}=... (Gemma's: pad 0, eos 1, bos 2).")
    self.start_of_turn_id = self._piece_id(START_OF_TURN)
    self.end_of_turn_id = self._piece_id(END_OF_TURN)

  @classmethod
  def from_bytes(cls, model_proto: bytes, name: str = "<bytes>") -> "SentencePieceTokenizer":
    return cls(model_proto, name=name)

  @classmethod
  def from_path(cls, path) -> "SentencePieceTokenizer":
    """Loads `path`: a tokenizer.model file or a folder holding one, local or `gs://`."""
    return cls(_read_model_bytes(path), name=str(path))

  def _piece_id(self, piece: str) -> Optional[int]:
    # piece_to_id answers unk_id for a piece the model lacks.
    i = self._sp.piece_to_id(piece)
    return i if self._sp.id_to_piece(i) == piece else None

  @property
  def processor(self):
    """The underlying `sentencepiece.SentencePieceProcessor`."""
    return self._sp

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    _check_text(text, f"SentencePieceTokenizer({self.name}).encode")
    # Marker text inside `text` becomes the marker id: the markers are user-defined pieces,
    # which SentencePiece always matches whole (HF's Gemma tokenizer does the same).
    return self._sp.encode(text, out_type=int, add_bos=add_bos, add_eos=add_eos)

  def decode(self, ids: Iterable[int]) -> str:
    ids = _as_id_list(ids, f"SentencePieceTokenizer({self.name}).decode")
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"SentencePieceTokenizer({self.name}).decode: token id {bad[0]} is "
                       f"outside the vocabulary [0, {self.vocab_size}); is the model's "
                       "vocab_size the tokenizer's?")
    return self._sp.decode(ids)


def _read_model_bytes(path) -> bytes:
  """The bytes of a tokenizer.model at `path` (a file, or a folder holding tokenizer.model)."""
  from etils import epath  # pylint: disable=g-import-not-at-top  (orbax depends on etils)

  p = epath.Path(path)
  try:
    if p.is_dir():
      p = p / "tokenizer.model"
    return p.read_bytes()
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f"Tokenizer file {p} not found; expected a SentencePiece model such as Gemma's "
        "tokenizer.model (a local or gs:// path, or a checkpoint folder holding "
        "tokenizer.model), or the spec 'byte' for the byte-level tokenizer.") from e


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as tokens, for tiny models: no file, no training, every text encodable.

  Ids: pad 0, eos 1, bos 2, `<start_of_turn>` 3, `<end_of_turn>` 4, unk 5 (never produced),
  6-7 reserved, then byte b at `BYTE_OFFSET + b` (8 ... 263); `vocab_size` is 264, within the
  `tiny` configs' 384 rows (the rest are never produced).

  Like the turn markers of Gemma's SentencePiece model, the marker texts inside a text encode
  to their ids, so `encode(format_chat(m), add_bos=True) == encode_chat(tok, m)`.
  Decoding invalid UTF-8 (e.g. a sample cut inside a character) gives U+FFFD instead of
  failing, and so do ids that are not bytes or markers (unk, reserved, or past the vocabulary:
  an untrained tiny model samples from all 384 rows).
  """

  BYTE_OFFSET = 8

  def __init__(self):
    self.pad_id, self.eos_id, self.bos_id = 0, 1, 2
    self.start_of_turn_id, self.end_of_turn_id = 3, 4
    self.unk_id = 5
    self._markers = {START_OF_TURN: self.start_of_turn_id, END_OF_TURN: self.end_of_turn_id}
    self._marker_text = {v: k for k, v in self._markers.items()}
    self._split = re.compile("(" + "|".join(map(re.escape, self._markers)) + ")")

  @property
  def vocab_size(self) -> int:
    return self.BYTE_OFFSET + 256

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    _check_text(text, "ByteTokenizer.encode")
    ids = [self.bos_id] if add_bos else []
    for part in self._split.split(text):
      if part in self._markers:
        ids.append(self._markers[part])
      else:
        ids.extend(b + self.BYTE_OFFSET for b in part.encode("utf-8"))
    if add_eos:
      ids.append(self.eos_id)
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    out, run = [], bytearray()

    def flush():
      if run:
        out.append(run.decode("utf-8", errors="replace"))
        run.clear()

    for i in _as_id_list(ids, "ByteTokenizer.decode"):
      if self.BYTE_OFFSET <= i < self.vocab_size:
        run.append(i - self.BYTE_OFFSET)
        continue
      flush()
      if i in self._marker_text:
        out.append(self._marker_text[i])
      elif i not in (self.pad_id, self.eos_id, self.bos_id):
        out.append("\ufffd")
    flush()
    return "".join(out)


@gin.configurable
def get_tokenizer(spec: Union[str, Tokenizer] = "byte") -> Tokenizer:
  """The tokenizer named by `spec`.

  Args:
    spec: "byte" for `ByteTokenizer`; otherwise the path (local or `gs://`) of a SentencePiece
      tokenizer.model or of a folder holding one (e.g. an HF Gemma checkpoint). A `Tokenizer`
      is returned as is.
  """
  if isinstance(spec, Tokenizer):
    return spec
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"get_tokenizer: spec must be 'byte' or the path of a tokenizer.model, got "
                     f"{spec!r}.")
  if spec == "byte":
    return ByteTokenizer()
  return SentencePieceTokenizer.from_path(spec)


def cut_at_stop(ids: Iterable[int], stop_ids: Iterable[int]) -> list[int]:
  """`ids` up to (not including) the first id in `stop_ids`; all of `ids` if none occurs."""
  stops = set(int(s) for s in stop_ids)
  ids = _as_id_list(ids, "cut_at_stop")
  for n, i in enumerate(ids):
    if i in stops:
      return ids[:n]
  return ids


# ----------------------------------------------------------------------------- chat template


def _content_text(content: Any, index: int, trim: bool) -> str:
  """Text of a message's content: a str, or HF's list of {"type": "text", "text": ...} parts.

  Gemma's template trims each text (Jinja's `trim`, i.e. `str.strip()`) but not the system text.
  """
  if isinstance(content, str):
    return content.strip() if trim else content
  if isinstance(content, Sequence):
    texts = []
    for part in content:
      if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(
          part.get("text"), str):
        raise ValueError(f"Chat message {index}: content parts must be "
                         f"{{'type': 'text', 'text': str}} (no images); got {part!r}.")
      texts.append(part["text"].strip() if trim else part["text"])
    return "".join(texts)
  raise TypeError(f"Chat message {index}: content must be a str or a list of text parts, got "
                  f"{type(content).__name__}.")


def chat_turns(messages: Messages) -> list[tuple[str, str]]:
  """Gemma's (role, text) turns of a conversation, as its HF chat template builds them.

  Args:
    messages: a str (one user prompt) or a list of {"role": ..., "content": ...} with roles
      alternating "user" / "model" ("assistant" is accepted as "model"), starting with "user".
      An optional first "system" message is prepended to the first user text with a blank line
      between, as Gemma 3's template does (Gemma 2's template refuses system messages).

  Returns:
    (role, text) per turn, role in {"user", "model"}, text stripped of surrounding whitespace.
  """
  if isinstance(messages, str):
    messages = [{"role": USER, "content": messages}]
  if isinstance(messages, Mapping) or not isinstance(messages, Sequence):
    raise TypeError("Chat messages must be a str or a list of {'role': ..., 'content': ...} "
                    f"dicts, got {type(messages).__name__}.")
  for n, m in enumerate(messages):
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
      raise ValueError(f"Chat message {n} must be a dict with 'role' and 'content', got {m!r}.")
  prefix, start = "", 0
  if messages and messages[0]["role"] == SYSTEM:
    prefix = _content_text(messages[0]["content"], 0, trim=False) + "\n\n"
    start = 1
    if len(messages) == 1:
      raise ValueError("Chat messages: a system message must be followed by a user message "
                       "(Gemma folds the system text into the first user turn).")
  if len(messages) == start:
    raise ValueError("Chat messages: the conversation is empty; give at least one user message.")
  turns = []
  for n in range(start, len(messages)):
    raw_role = messages[n]["role"]
    if raw_role == SYSTEM:
      raise ValueError(f"Chat message {n}: a system message may only come first.")
    if raw_role not in _ROLE_ALIASES:
      raise ValueError(f"Chat message {n}: unknown role {raw_role!r}; use 'user', 'model' (or "
                       "'assistant'), or 'system' first.")
    role = _ROLE_ALIASES[raw_role]
    expected = USER if (n - start) % 2 == 0 else MODEL
    if role != expected:
      raise ValueError(f"Chat message {n}: role {raw_role!r} where {expected!r} was expected; "
                       "roles must alternate user/model starting with user.")
    text = _content_text(messages[n]["content"], n, trim=True)
    turns.append((role, (prefix + text) if n == start else text))
  return turns


def format_chat(messages: Messages, add_generation_prompt: bool = True,
                bos_token: str = "") -> str:
  """Gemma's chat template as text.

  Args:
    messages: see `chat_turns`.
    add_generation_prompt: end with "<start_of_turn>model\\n", the prompt for the model's turn.
    bos_token: text put first. HF's template renders "<bos>" there; the default leaves it out
      because BOS is a control id that encoding this text cannot produce: pass the text to
      `tokenizer.encode(..., add_bos=True)`, or use `encode_chat`.

  Returns:
    e.g. "<start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n".
  """
  parts = [bos_token]
  for role, text in chat_turns(messages):
    parts.append(f"{START_OF_TURN}{role}\n{text}{END_OF_TURN}\n")
  if add_generation_prompt:
    parts.append(f"{START_OF_TURN}{MODEL}\n")
  return "".join(parts)


def _turn_ids(tokenizer: Tokenizer) -> tuple[int, int]:
  if tokenizer.start_of_turn_id is None or tokenizer.end_of_turn_id is None:
    name = getattr(tokenizer, "name", type(tokenizer).__name__)
    raise ValueError(f"Tokenizer {name} has no {START_OF_TURN} / {END_OF_TURN} pieces, so it "
                     "cannot encode Gemma's chat format; use Gemma's tokenizer.model (or one "
                     "trained with them as user_defined_symbols).")
  return tokenizer.start_of_turn_id, tokenizer.end_of_turn_id


def encode_chat(tokenizer: Tokenizer, messages: Messages, add_generation_prompt: bool = True,
                add_bos: bool = True) -> list[int]:
  """Token ids of `format_chat(messages, add_generation_prompt)`, with BOS first (once).

  The turn markers are inserted as their ids and only the text between them is encoded, so
  they stay single tokens whatever the tokenizer. (For Gemma's tokenizer, whose pieces never
  span a marker and which adds no dummy prefix, this equals encoding the whole text; a test
  checks it against HF's tokenizer and chat template.)
  """
  sot, eot = _turn_ids(tokenizer)
  ids = [tokenizer.bos_id] if add_bos else []
  newline = tokenizer.encode("\n")
  for role, text in chat_turns(messages):
    ids += [sot, *tokenizer.encode(f"{role}\n{text}"), eot, *newline]
  if add_generation_prompt:
    ids += [sot, *tokenizer.encode(f"{MODEL}\n")]
  return ids


def encode_response(tokenizer: Tokenizer, text: str, add_end_of_turn: bool = True) -> list[int]:
  """Ids of a model answer as the model should generate it: `text` then `<end_of_turn>`.

  Appended to `encode_chat(..., add_generation_prompt=True)` it gives the chat template's
  ids of the answered conversation, less the "\\n" after `<end_of_turn>` (generation stops at
  `<end_of_turn>`, so a trained answer ends there).
  """
  ids = tokenizer.encode(text)
  if add_end_of_turn:
    ids.append(_turn_ids(tokenizer)[1])
  return ids


# ----------------------------------------------------------------------------- batches

_SIDES = ("left", "right")


def encode_batch(tokenizer: Tokenizer,
                 texts_or_id_lists: Sequence[Union[str, Sequence[int]]],
                 max_length: Optional[int] = None,
                 padding_side: str = "left",
                 truncation_side: str = "left",
                 pad_to_multiple_of: Optional[int] = None,
                 truncation: Optional[bool] = True,
                 pad_to_max_length: bool = True,
                 add_bos: bool = True,
                 add_eos: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Encodes and pads rows into one fixed-shape batch.

  Args:
    tokenizer: encodes the str rows (with `add_bos` / `add_eos`) and gives `pad_id`.
    texts_or_id_lists: per row a str, or a sequence of ids used as is (e.g. `encode_chat`'s).
    max_length: most tokens kept per row; None: no limit.
    padding_side: "left" puts the pads before the tokens (prompts for generation, so that every
      row's last token is at the same column), "right" after them (training sequences).
    truncation_side: which end of an over-long row is dropped: "left" keeps the last
      `max_length` tokens (the end of a prompt, next to the generation prompt; BOS is dropped
      with the rest), "right" keeps the first `max_length`.
    pad_to_multiple_of: round the width up to a multiple of this (shape buckets, so that jitted
      programs compile once per bucket). The width may then exceed `max_length`; the tokens
      kept per row never do.
    truncation: True truncates over-long rows on `truncation_side`; None or False raises
      instead, naming the row.
    pad_to_max_length: the width is `max_length` (a fixed shape) when True and `max_length` is
      set; otherwise the longest row's length.
    add_bos / add_eos: passed to `tokenizer.encode` for str rows.

  Returns:
    ids: int32 [B, T], `pad_id` where there is no token.
    mask: bool [B, T], True on tokens.
  """
  if padding_side not in _SIDES:
    raise ValueError(f"encode_batch: padding_side={padding_side!r}; use 'left' or 'right'.")
  if truncation_side not in _SIDES:
    raise ValueError(f"encode_batch: truncation_side={truncation_side!r}; use 'left' or "
                     "'right'.")
  if max_length is not None and max_length <= 0:
    raise ValueError(f"encode_batch: max_length={max_length} must be positive (or None).")
  if pad_to_multiple_of is not None and pad_to_multiple_of <= 0:
    raise ValueError(f"encode_batch: pad_to_multiple_of={pad_to_multiple_of} must be positive "
                     "(or None).")
  if isinstance(texts_or_id_lists, str) or not len(texts_or_id_lists):
    raise ValueError("encode_batch: expected a non-empty list of texts or id lists, got "
                     f"{texts_or_id_lists!r}.")

  rows = []
  for n, row in enumerate(texts_or_id_lists):
    ids = (tokenizer.encode(row, add_bos=add_bos, add_eos=add_eos)
           if isinstance(row, str) else _as_id_list(row, f"encode_batch row {n}"))
    if max_length is not None and len(ids) > max_length:
      if not truncation:
        raise ValueError(f"encode_batch: row {n} has {len(ids)} tokens, more than "
                         f"max_length={max_length}; raise max_length, shorten the input, or pass "
                         "truncation=True (truncation_side='left' or 'right').")
      ids = ids[len(ids) - max_length:] if truncation_side == "left" else ids[:max_length]
    rows.append(ids)

  width = max(len(r) for r in rows)
  if max_length is not None and pad_to_max_length:
    width = max_length
  if pad_to_multiple_of:
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
  width = max(width, 1)  # A batch of empty rows still gets one (masked) column.

  ids = np.full((len(rows), width), tokenizer.pad_id, dtype=np.int32)
  mask = np.zeros((len(rows), width), dtype=bool)
  for n, r in enumerate(rows):
    start = width - len(r) if padding_side == "left" else 0
    ids[n, start:start + len(r)] = r
    mask[n, start:start + len(r)] = True
  return ids, mask

"""The prompt buffer: every prompt the run has seen, with its lineage and latest statistics.

Each prompt is a `PromptRecord`: an id, the text of the user request (plus, rarely, earlier
chat turns as `context`), where it came from (`parent_id`, `round_born`, `operator`, or
`source` for a prompt read from a file), and its latest reward statistics and
informativeness. The buffer keeps every record ever added (so the ancestry of any prompt can
be asked for) and the ids of the *active* set, the prompts the current round works on.

Ids are assigned in order, `r{round}-{n:05d}` (n counts the prompts born in that round), so
every process that builds the same buffer from the same inputs assigns the same ids.

The next round's set is the evolved children plus a retained share of the current set
(`next_round`). The buffer is saved as JSONL, one record a line, readable by a person.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from etils import epath

from eva_jax.creator.informativeness import reward_statistics

RETAIN_METHODS = ("random", "informative")

_STAT_FIELDS = ("reward_mean", "reward_max", "reward_min", "reward_std", "informativeness")


def normalize_text(text: str) -> str:
  """Case-folded text with whitespace collapsed: what "the same prompt" means."""
  return " ".join(text.casefold().split())


@dataclasses.dataclass
class PromptRecord:
  """One prompt and what the run knows about it."""

  id: str
  text: str
  parent_id: Optional[str] = None
  round_born: int = 0
  operator: Optional[str] = None
  source: Optional[str] = None
  context: tuple = ()
  metadata: dict = dataclasses.field(default_factory=dict)
  reward_mean: Optional[float] = None
  reward_max: Optional[float] = None
  reward_min: Optional[float] = None
  reward_std: Optional[float] = None
  num_scored: int = 0
  informativeness: Optional[float] = None
  round_scored: Optional[int] = None

  def conversation(self) -> list[dict]:
    """The chat the policy answers: earlier turns, then this prompt as the user turn."""
    return [dict(m) for m in self.context] + [{"role": "user", "content": self.text}]

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["context"] = [dict(m) for m in self.context]
    return d

  @classmethod
  def from_json(cls, d: dict, where: str = "") -> "PromptRecord":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names - {"active", "lineage"}
    if unknown or "id" not in d or "text" not in d:
      raise ValueError(f"Prompt buffer record {where}: expected fields {sorted(names)}, got "
                       f"{sorted(d)}.")
    d = {k: v for k, v in d.items() if k in names}
    d["context"] = tuple(dict(m) for m in d.get("context") or ())
    return cls(**d)


def _float_or_none(x) -> Optional[float]:
  x = float(x)
  return x if math.isfinite(x) else None


class PromptBuffer:
  """Every prompt of the run and the active set (see the module docstring)."""

  def __init__(self):
    self.records: dict[str, PromptRecord] = {}
    self.active: list[str] = []
    self._born: dict[int, int] = {}  # round -> prompts born in it so far

  # ------------------------------------------------------------------ building

  def add(self, text: str, *, round_born: int = 0, parent_id: Optional[str] = None,
          operator: Optional[str] = None, source: Optional[str] = None,
          context: Sequence[dict] = (), metadata: Optional[dict] = None) -> PromptRecord:
    """Adds a prompt (not yet active) and returns its record with a fresh id."""
    if not isinstance(text, str):
      raise TypeError(f"PromptBuffer.add: text must be a str, got {type(text).__name__}.")
    if parent_id is not None and parent_id not in self.records:
      raise KeyError(f"PromptBuffer.add: parent {parent_id!r} is not in the buffer.")
    n = self._born.get(round_born, 0)
    self._born[round_born] = n + 1
    record = PromptRecord(id=f"r{round_born}-{n:05d}", text=text, parent_id=parent_id,
                          round_born=round_born, operator=operator, source=source,
                          context=tuple(dict(m) for m in context),
                          metadata=dict(metadata or {}))
    self.records[record.id] = record
    return record

  @classmethod
  def from_texts(cls, texts: Iterable[Any], round_born: int = 0) -> "PromptBuffer":
    """A buffer whose active set is `texts`: strs, or objects with `text` and optionally
    `context`, `source` and `metadata` (e.g. `eva_jax.data` examples)."""
    buf = cls()
    for t in texts:
      if isinstance(t, str):
        rec = buf.add(t, round_born=round_born)
      else:
        rec = buf.add(t.text, round_born=round_born, source=getattr(t, "source", None),
                      context=getattr(t, "context", ()) or (),
                      metadata=getattr(t, "metadata", None))
      buf.active.append(rec.id)
    if not buf.active:
      raise ValueError("PromptBuffer.from_texts: no prompts given; the initial prompt set is "
                       "empty.")
    return buf

  # ------------------------------------------------------------------ reading

  def __len__(self) -> int:
    return len(self.active)

  def __getitem__(self, prompt_id: str) -> PromptRecord:
    try:
      return self.records[prompt_id]
    except KeyError:
      raise KeyError(f"Prompt {prompt_id!r} is not in the buffer.") from None

  def active_records(self) -> list[PromptRecord]:
    return [self.records[i] for i in self.active]

  def ancestry(self, prompt_id: str) -> list[PromptRecord]:
    """The chain of records from the original prompt down to `prompt_id` (inclusive)."""
    chain = [self[prompt_id]]
    while chain[-1].parent_id is not None:
      chain.append(self[chain[-1].parent_id])
    return chain[::-1]

  def normalized_texts(self) -> set[str]:
    """Normalised texts of every prompt ever in the buffer (for duplicate filtering)."""
    return {normalize_text(r.text) for r in self.records.values()}

  # ------------------------------------------------------------------ updating

  def update_statistics(self, ids: Sequence[str], rewards, info, round_index: int) -> None:
    """Records each prompt's latest reward statistics ([P, k] rewards, NaN ignored) and
    informativeness [P]."""
    stats = reward_statistics(rewards)
    info = np.asarray(info, np.float64)
    if len(ids) != len(info) or len(ids) != len(stats["num_scored"]):
      raise ValueError(f"update_statistics: {len(ids)} ids, {len(info)} info values and "
                       f"{len(stats['num_scored'])} reward rows; pass one of each per prompt.")
    for n, prompt_id in enumerate(ids):
      rec = self[prompt_id]
      for k in _STAT_FIELDS[:-1]:
        setattr(rec, k, _float_or_none(stats[k][n]))
      rec.informativeness = _float_or_none(info[n])
      rec.num_scored = int(stats["num_scored"][n])
      rec.round_scored = int(round_index)

  def next_round(self, children: Sequence[str], *, retain_fraction: float = 0.0,
                 retain: str = "random", seed: int = 0) -> dict[str, int]:
    """Makes the active set: `children` (ids) plus `int(retain_fraction * len(active))` of the
    current active prompts, chosen at random (seeded) or the most informative first.

    Returns:
      {"buffer/retained", "buffer/children", "buffer/active"}.
    """
    if not 0 <= retain_fraction <= 1:
      raise ValueError(f"next_round: retain_fraction={retain_fraction} must be in [0, 1].")
    if retain not in RETAIN_METHODS:
      raise ValueError(f"next_round: retain={retain!r}; use one of {RETAIN_METHODS}.")
    for c in children:
      self[c]  # pylint: disable=pointless-statement  (raises for an unknown id)
    n = int(retain_fraction * len(self.active))
    if retain == "random":
      order = np.random.default_rng(seed).permutation(len(self.active))
    else:
      info = np.array([self.records[i].informativeness for i in self.active], np.float64)
      order = np.argsort(-np.nan_to_num(info, nan=-np.inf), kind="stable")
    kept = [self.active[i] for i in sorted(order[:n])]
    fresh = [c for c in children if c not in set(kept)]
    self.active = kept + fresh
    if not self.active:
      raise ValueError("next_round: the next round has no prompts (no child survived the "
                       "filters and nothing was retained); raise retain_fraction or check the "
                       "evolver and filter counts in metrics.jsonl.")
    return {"buffer/retained": len(kept), "buffer/children": len(fresh),
            "buffer/active": len(self.active)}

  # ------------------------------------------------------------------ saving

  def to_jsonl(self, ids: Optional[Sequence[str]] = None, lineage: bool = False) -> str:
    """JSONL of the records `ids` (default: all), each with `active` (and with `lineage`,
    the ancestor ids from the original prompt down to its parent)."""
    active = set(self.active)
    lines = []
    for i in (self.records if ids is None else ids):
      d = self.records[i].to_json()
      d["active"] = i in active
      if lineage:
        d["lineage"] = [r.id for r in self.ancestry(i)[:-1]]
      lines.append(json.dumps(d, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)

  @classmethod
  def from_jsonl(cls, text: str, name: str = "<buffer>") -> "PromptBuffer":
    """The buffer `to_jsonl()` wrote (records in order; `active` marks the active set)."""
    buf = cls()
    for n, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        d = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{name}:{n}: not JSON ({e.msg}); the prompt buffer file is "
                         "damaged.") from e
      rec = PromptRecord.from_json(d, f"{name}:{n}")
      buf.records[rec.id] = rec
      if d.get("active"):
        buf.active.append(rec.id)
      buf._born[rec.round_born] = buf._born.get(rec.round_born, 0) + 1
    return buf

  def save(self, path) -> None:
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(self.to_jsonl())

  @classmethod
  def load(cls, path) -> "PromptBuffer":
    p = epath.Path(path)
    if not p.exists():
      raise FileNotFoundError(f"Prompt buffer file {p} does not exist.")
    return cls.from_jsonl(p.read_text(), str(p))

"""A closed world of text tasks with graded rewards and a difficulty ladder.

Every prompt is one `Task` rendered as an English instruction, and every task can be read
back from its prompt text (`parse_prompt`), so that the reward and the evolvers, which only
see text, know exactly what is asked:

| family | prompt | answer |
|---|---|---|
| `string` | "Reverse, then capitalize: hello" | "OLLEH" |
| `add` | "Add 37 and 45." / "Add 3, 12 and 40." | "82" / "55" |
| `count` | "Count the a's in banana." / "Count the a's and n's in banana." | "3" / "5" |

`string` tasks chain one to three operations on a lowercase word: `reverse`, `sort` (letters
in alphabetical order), `double` (every letter twice), `upper` (capital letters), `spaced`
(a space between the letters; only last).

Difficulty (`Task.difficulty`) is how hard a task is for a small byte-level model, in rough
"letters of work": the input's length, plus 2 for every extra operation (string), the
operands' digits plus 2 per extra operand (add), the word's length plus 2 for a second
letter to count (count). `level` groups difficulties into the ladder 1..6 that tables and
plots report.

Rewards give partial credit (`score`): a share for the exact answer, the rest for closeness:
string and sum answers by edit distance to the right answer (1 - distance / longer length),
counts by closeness (1 - |error| / (answer + 1)).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import gin
import numpy as np

LETTERS = "abcdefghijklmnopqrstuvwxyz"
FAMILIES = ("string", "add", "count")
STRING_OPS = ("reverse", "sort", "double", "upper", "spaced")
NUM_LEVELS = 6

_OP_PHRASES = {
    "reverse": "reverse",
    "sort": "sort the letters",
    "double": "double each letter",
    "upper": "capitalize",
    "spaced": "space out",
}
_PHRASE_OPS = {v: k for k, v in _OP_PHRASES.items()}
_STRING_RE = re.compile(r"^(?P<ops>[A-Za-z ,]+?): (?P<word>[a-z]+)$")
_ADD_RE = re.compile(r"^Add (?P<nums>\d+(?:, \d+)*) and (?P<last>\d+)\.$")
_COUNT_RE = re.compile(
    r"^Count the (?P<c1>[a-z])'s (?:and (?P<c2>[a-z])'s )?in (?P<word>[a-z]+)\.$")


@dataclasses.dataclass(frozen=True)
class Task:
  """One task. `text`: the word (string, count) or the operands joined by spaces (add);
  `ops`: the string operations in order, or the letters to count (count)."""

  family: str
  text: str
  ops: tuple[str, ...] = ()

  # ------------------------------------------------------------------ rendering

  def prompt(self) -> str:
    if self.family == "string":
      phrases = [_OP_PHRASES[o] for o in self.ops]
      head = ", then ".join(phrases)
      return f"{head[0].upper()}{head[1:]}: {self.text}"
    if self.family == "add":
      nums = self.text.split()
      return f"Add {', '.join(nums[:-1])} and {nums[-1]}."
    letters = " and ".join(f"{c}'s" for c in self.ops)
    return f"Count the {letters} in {self.text}."

  def answer(self) -> str:
    if self.family == "string":
      s = self.text
      for op in self.ops:
        s = _apply(op, s)
      return s
    if self.family == "add":
      return str(sum(int(n) for n in self.text.split()))
    return str(sum(self.text.count(c) for c in self.ops))

  # ------------------------------------------------------------------ difficulty

  @property
  def difficulty(self) -> int:
    if self.family == "string":
      return len(self.text) + 2 * (len(self.ops) - 1)
    if self.family == "add":
      nums = self.text.split()
      return max(len(n) for n in nums) * 2 - 1 + 2 * (len(nums) - 2)
    return len(self.text) - 1 + 2 * (len(self.ops) - 1)

  @property
  def level(self) -> int:
    """1..NUM_LEVELS: difficulty 1-3 is level 1, then one level per 2 of difficulty."""
    return int(min(NUM_LEVELS, max(1, (self.difficulty - 2) // 2 + 1)))


def _apply(op: str, s: str) -> str:
  if op == "reverse":
    return s[::-1]
  if op == "sort":
    return "".join(sorted(s))
  if op == "double":
    return "".join(c + c for c in s)
  if op == "upper":
    return s.upper()
  if op == "spaced":
    return " ".join(s)
  raise ValueError(f"Unknown string operation {op!r}; known: {', '.join(STRING_OPS)}.")


def valid_ops(ops: Sequence[str]) -> bool:
  """A string pipeline: 1-3 distinct known operations, `spaced` only last."""
  return (0 < len(ops) <= 3 and len(set(ops)) == len(ops) and all(o in STRING_OPS for o in ops)
          and ("spaced" not in ops or ops[-1] == "spaced"))


def parse_prompt(text: str) -> Task:
  """The task a prompt of this world asks for.

  Raises:
    ValueError: the text is not a prompt of this world.
  """
  text = text.strip()
  m = _ADD_RE.match(text)
  if m:
    nums = m.group("nums").split(", ") + [m.group("last")]
    return Task("add", " ".join(nums))
  m = _COUNT_RE.match(text)
  if m:
    letters = (m.group("c1"),) + ((m.group("c2"),) if m.group("c2") else ())
    return Task("count", m.group("word"), letters)
  m = _STRING_RE.match(text)
  if m:
    phrases = m.group("ops").lower().split(", then ")
    ops = tuple(_PHRASE_OPS.get(p) for p in phrases)
    if None not in ops and valid_ops(ops):
      return Task("string", m.group("word"), ops)
  raise ValueError(f"Not a closed-world prompt: {text[:120]!r}.")


# ------------------------------------------------------------------------------ rewards


def edit_distance(a: str, b: str) -> int:
  """Levenshtein distance (insertions, deletions, substitutions)."""
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def score(task: Task, response: str, exact_weight: float = 0.0) -> float:
  """Credit in [0, 1] for `response` as the answer to `task` (1: exactly right):
  `exact_weight` for an exact answer plus the rest for closeness (string and sum answers: 1 -
  edit distance / longer length; counts: 1 - |error| / (answer + 1))."""
  want, got = task.answer(), response.strip()
  if task.family == "count":
    closeness = (max(0.0, 1.0 - abs(int(got) - int(want)) / (int(want) + 1))
                 if re.fullmatch(r"\d{1,4}", got) else 0.0)
  else:
    closeness = max(0.0, 1.0 - edit_distance(got, want) / max(len(want), len(got), 1))
  return exact_weight * float(got == want) + (1.0 - exact_weight) * closeness


@gin.configurable
def reward(prompt: str, response: str, exact_weight: float = 0.5) -> float:
  """The world's programmatic reward on text (registered as "closed_world"). Half the credit
  is for the exact answer by default: closeness alone rewards near misses as much as a right
  answer of a longer task would be rewarded, and training on pairs of near misses teaches
  the solver little that is right (in the closed world it made sums worse)."""
  if not 0.0 <= exact_weight <= 1.0:
    raise ValueError(f"closed-world reward: exact_weight={exact_weight} must be in [0, 1].")
  return score(parse_prompt(prompt), response, exact_weight)


# ------------------------------------------------------------------------------ generation


def random_word(rng: np.random.Generator, length: int) -> str:
  return "".join(rng.choice(list(LETTERS), size=length))


def random_number(rng: np.random.Generator, digits: int) -> str:
  lo = 0 if digits == 1 else 10 ** (digits - 1)
  return str(int(rng.integers(lo, 10 ** digits)))


def make_task(family: str, difficulty: int, rng: np.random.Generator,
              ops: Optional[Sequence[str]] = None) -> Task:
  """A random task of `family` with about `difficulty` (the closest the family allows, >= its
  easiest); `ops` fixes a string pipeline (its length is part of the difficulty)."""
  if family == "string":
    if ops is None:
      n_ops = 1 if difficulty < 6 else int(rng.integers(1, 3))
      ops = _random_ops(rng, n_ops)
    length = max(2, difficulty - 2 * (len(ops) - 1))
    return Task("string", random_word(rng, length), tuple(ops))
  if family == "add":
    digits = max(1, min(6, (difficulty + 1) // 2))
    return Task("add", f"{random_number(rng, digits)} {random_number(rng, digits)}")
  if family == "count":
    length = max(2, min(20, difficulty + 1))
    letter = str(rng.choice(list(LETTERS[:6])))
    word = list(random_word(rng, length))
    # Make the answer non-zero more often than chance would.
    for i in rng.choice(length, size=int(rng.integers(0, max(1, length // 3) + 1)),
                        replace=False):
      word[i] = letter
    return Task("count", "".join(word), (letter,))
  raise ValueError(f"Unknown task family {family!r}; known: {', '.join(FAMILIES)}.")


def _random_ops(rng: np.random.Generator, n: int) -> tuple[str, ...]:
  while True:
    ops = tuple(str(o) for o in rng.choice(list(STRING_OPS), size=n, replace=False))
    if valid_ops(ops):
      return ops


def make_prompts(count: int, difficulties: Sequence[int], seed: int,
                 families: Sequence[str] = FAMILIES) -> list[Task]:
  """`count` distinct random tasks, families and difficulties drawn uniformly."""
  rng = np.random.default_rng(seed)
  out, seen = [], set()
  while len(out) < count:
    family = str(rng.choice(list(families)))
    task = make_task(family, int(rng.choice(list(difficulties))), rng)
    if task.prompt() not in seen:
      seen.add(task.prompt())
      out.append(task)
  return out

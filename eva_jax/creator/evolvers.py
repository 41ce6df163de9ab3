"""Evolvers: parents in, children (text, operator name, parent id) out.

An evolver rewrites each selected prompt (a *parent*) into `num_children` new prompts. For each
child an operator is drawn uniformly from the evolver's operators (EvolInstruct's in-depth and
in-breadth ones, `meta_prompts.OPERATORS`, or a programmatic evolver's own), and

* `mode="chain"` (default; the authors' code through distilabel's EvolInstruct): child c
  rewrites child c - 1 (the parent for c = 0) and every child is kept; when a rewrite fails,
  the chain goes on from the last text that exists;
* `mode="independent"`: every child rewrites the parent, all in one batch.

Backends implement `rewrite(requests) -> [(reply or None, failure reason or None)]`:

* `ProgrammaticEvolver` (here): a Python function registered by name (the closed-world tasks
  register theirs) applied to text;
* `LMEvolver` and `ChatCompletionsEvolver` (`lm_evolvers.py`): a language model following the
  meta-prompts, on our own sampler or behind an OpenAI-compatible endpoint; their replies go
  through `parse_reply`.

The operator draws, the pairing for `mix` and each request's seed come from `seed` alone, so
every process draws the same plan. Evolvers with `process0_only` (an HTTP endpoint) ask on
process 0 and broadcast the replies.

What comes out still goes through the filters (`filters.py`), which drop empty, over-long,
duplicate, echoed and refused children and count each.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from typing import Callable, Optional, Sequence, Union

import gin
import numpy as np

from eva_jax import parallel
from eva_jax.creator.meta_prompts import OPERATORS
from eva_jax.registry import Registry

EVOLVERS: Registry = Registry("evolver")
PROGRAMMATIC_EVOLVERS: Registry = Registry("programmatic evolver")
MODES = ("chain", "independent")

Reply = tuple[Optional[str], Optional[str]]  # (reply text, failure reason)


@dataclasses.dataclass(frozen=True)
class Parent:
  id: str
  text: str


@dataclasses.dataclass(frozen=True)
class Child:
  """A new prompt. `step` is its place among its parent's children; `raw` the unparsed reply."""

  parent_id: str
  text: str
  operator: str
  step: int
  raw: str = ""


@dataclasses.dataclass(frozen=True)
class RewriteRequest:
  """Rewrite `text` with `operator` (`other`: the second prompt of `mix`); `seed` is this
  request's own seed."""

  text: str
  operator: str
  other: str
  seed: int


@dataclasses.dataclass
class EvolveResult:
  """Children in (parent, step) order, how many rewrites were asked and how many failed (with
  the first few reasons)."""

  children: list[Child]
  requests: int = 0
  failed: int = 0
  failure_examples: list[str] = dataclasses.field(default_factory=list)


class Evolver(abc.ABC):
  """Turns parents into children (see the module docstring).

  Args:
    num_children: children per parent (the paper: 4).
    mode: "chain" or "independent".
    operators: the operators to draw from (default: all the backend supports).
  """

  name: str = "evolver"
  process0_only: bool = False
  supported_operators: tuple[str, ...] = OPERATORS

  def __init__(self, *, num_children: int = 4, mode: str = "chain",
               operators: Optional[Sequence[str]] = None):
    if num_children < 1:
      raise ValueError(f"{self.name}: num_children={num_children} must be >= 1.")
    if mode not in MODES:
      raise ValueError(f"{self.name}: mode={mode!r}; use one of {MODES}.")
    ops = tuple(self.supported_operators if operators is None else operators)
    unknown = [o for o in ops if o not in self.supported_operators]
    if unknown or not ops:
      raise ValueError(f"{self.name}: unknown operators {unknown or list(ops)}; this evolver "
                       f"supports {', '.join(self.supported_operators)}.")
    self.num_children, self.mode, self.operators = int(num_children), mode, ops

  @abc.abstractmethod
  def rewrite(self, requests: Sequence[RewriteRequest]) -> list[Reply]:
    """One (reply, failure reason) per request, in order; a failed request has reply None."""

  def parse(self, reply: str) -> str:
    """The new prompt in a reply (backends that talk to a model strip its chatter)."""
    return reply.strip()

  def _rewrite_everywhere(self, requests: list[RewriteRequest]) -> list[Reply]:
    if self.process0_only:
      replies = parallel.run_on_process0(lambda: self.rewrite(requests))
    else:
      replies = self.rewrite(requests)
    if len(replies) != len(requests):
      raise RuntimeError(f"{self.name}: {len(replies)} replies for {len(requests)} requests.")
    return replies

  def plan(self, num_parents: int, seed: int):
    """(operators [P, C], partner parent index [P, C] (-1: none), request seeds [P, C])."""
    rng = np.random.default_rng(seed)
    p, c = num_parents, self.num_children
    ops = list(self.operators)
    if p < 2 and "mix" in ops and len(ops) > 1:
      ops.remove("mix")  # mixing needs a second parent
    op_idx = rng.integers(0, len(ops), size=(p, c))
    partner = np.full((p, c), -1, np.int64)
    if p >= 2:
      # A uniformly drawn parent other than itself.
      draw = rng.integers(0, p - 1, size=(p, c))
      partner = np.where(draw >= np.arange(p)[:, None], draw + 1, draw)
    seeds = rng.integers(0, 2 ** 31 - 1, size=(p, c))
    return np.asarray(ops, object)[op_idx], partner, seeds

  def evolve(self, parents: Sequence[Parent], seed: int = 0) -> EvolveResult:
    """Children of `parents` (see the module docstring)."""
    parents = list(parents)
    result = EvolveResult(children=[])
    if not parents:
      return result
    ops, partner, seeds = self.plan(len(parents), seed)
    steps = ([list(range(self.num_children))] if self.mode == "independent"
             else [[c] for c in range(self.num_children)])
    current = [p.text for p in parents]
    by_parent: list[list[Child]] = [[] for _ in parents]
    for cs in steps:
      jobs = [(i, c) for i in range(len(parents)) for c in cs]
      requests = [RewriteRequest(text=current[i] if self.mode == "chain" else parents[i].text,
                                 operator=str(ops[i, c]),
                                 other=(parents[partner[i, c]].text
                                        if ops[i, c] == "mix" and partner[i, c] >= 0 else ""),
                                 seed=int(seeds[i, c])) for i, c in jobs]
      replies = self._rewrite_everywhere(requests)
      result.requests += len(requests)
      for (i, c), req, (reply, reason) in zip(jobs, requests, replies):
        if reply is None:
          result.failed += 1
          if len(result.failure_examples) < 5:
            result.failure_examples.append(str(reason))
          continue
        text = self.parse(reply)
        by_parent[i].append(Child(parents[i].id, text, req.operator, c, reply))
        if text:
          current[i] = text
    result.children = [child for cs in by_parent for child in sorted(cs, key=lambda x: x.step)]
    return result


# --------------------------------------------------------------------------------------------
# Replies of language models.

_MARKER = re.compile(
    r"^[ \t]*[#*]*[ \t]*(?:(?:rewritten|new|evolved|created|final|improved|revised)[ \t]+"
    r"(?:prompt|request|question|instruction)|prompt)[ \t]*#?[ \t]*\**[ \t]*:[ \t]*\**",
    re.I | re.M)
_PREAMBLE = re.compile(
    r"^\s*(?:sure|okay|ok|certainly|of course|absolutely|here(?:'s| is| are)|below is)\b[^\n]*"
    r":\s*\n", re.I)
_CHATTER = re.compile(
    r"^\s*(?:\**\s*)?(?:note|explanation|changes|rationale|why)\b\s*\**\s*:|"
    r"^\s*(?:this|the)\s+(?:new|rewritten|revised|evolved|updated)?\s*(?:prompt|version|"
    r"request|question|rewrite)\b|^\s*in this (?:version|prompt|rewrite)\b|"
    r"^\s*i(?: have|'ve)?\s+(?:added|made|changed|kept|replaced|included)\b|"
    r"^\s*let me know\b|^\s*i hope\b", re.I)
_QUOTES = ("\"\"", "''", "``", "\u201c\u201d", "\u2018\u2019", "**")


def parse_reply(reply: str) -> str:
  """The new prompt in a model's reply: the text after the last "Rewritten prompt:"-style
  marker, without a leading "Sure, here is ...:" line, trailing explanations ("Note: ...",
  "This version adds ..."), code fences or wrapping quotes."""
  text = reply.replace("\r\n", "\n").strip()
  fence = re.fullmatch(r"```[\w-]*\n(.*?)\n?```", text, re.S)
  if fence:
    text = fence.group(1).strip()
  markers = list(_MARKER.finditer(text))
  if markers:
    text = text[markers[-1].end():].strip()
  text = _PREAMBLE.sub("", text, count=1).strip()
  paragraphs = re.split(r"\n\s*\n", text)
  while len(paragraphs) > 1 and _CHATTER.match(paragraphs[-1]):
    paragraphs.pop()
  text = "\n\n".join(paragraphs).strip()
  changed = True
  while changed and len(text) >= 2:
    changed = False
    for q in _QUOTES:
      if text.startswith(q[0]) and text.endswith(q[-1]) and len(text) > len(q):
        inner = text[len(q) // 2:len(text) - len(q) // 2].strip()
        if q[0] not in inner or q == "**":
          text, changed = inner, True
  return text


# --------------------------------------------------------------------------------------------
# Programmatic evolvers.

ProgrammaticFn = Callable[[str, str, str, np.random.Generator], Optional[str]]


@dataclasses.dataclass(frozen=True)
class ProgrammaticSpec:
  """`fn(text, operator, other, rng) -> new text or None` and the operators it implements."""

  fn: ProgrammaticFn
  operators: tuple[str, ...]


def register_programmatic_evolver(name: str, operators: Sequence[str]):
  """Decorator: registers `fn(text, operator, other, rng) -> str | None` under `name`, so that
  `ProgrammaticEvolver.fn = "name"` uses it."""
  def add(fn: ProgrammaticFn) -> ProgrammaticFn:
    PROGRAMMATIC_EVOLVERS.register(name, ProgrammaticSpec(fn, tuple(operators)))
    return fn
  return add


_CONSTRAINTS = ("Answer in at most 50 words.", "Use exactly three bullet points.",
                "Do not use the word 'very'.", "End your answer with a one-line summary.",
                "Write the answer as a numbered list.", "Include one concrete example.")
_PERSONAS = ("a high-school teacher", "a software engineer", "a nurse", "a historian",
             "a small-business owner", "a ten-year-old")


def _lower_first(text: str) -> str:
  return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


@register_programmatic_evolver(
    "templates", operators=("add_constraints", "deepen", "concretize", "increase_reasoning",
                            "complicate_input", "persona", "mix", "abstract"))
def template_evolver(text: str, operator: str, other: str, rng: np.random.Generator) -> str:
  """Text templates for EvolInstruct's operators: a stand-in for an LM evolver where none is
  wanted (tests, a CPU smoke run); it does not understand the prompt."""
  text = text.strip()
  if operator == "add_constraints":
    return f"{text} {_CONSTRAINTS[rng.integers(len(_CONSTRAINTS))]}"
  if operator == "deepen":
    return f"{text} Go into expert-level depth."
  if operator == "concretize":
    return f"{text} Work through one specific, named case."
  if operator == "increase_reasoning":
    return f"{text} Show your reasoning step by step."
  if operator == "complicate_input":
    return f"{text} Also handle the case where the input is empty or malformed."
  if operator == "persona":
    return f"As {_PERSONAS[rng.integers(len(_PERSONAS))]}, I ask: {text}"
  if operator == "mix":
    return f"{text} Then, relate it to this: {other.strip()}"
  if operator == "abstract":
    return f"What general principle is behind this request, and how would you solve any " \
           f"request like it? \"{text}\""
  raise ValueError(f"template_evolver: no template for operator {operator!r}.")


@EVOLVERS.register("programmatic")
@gin.configurable
class ProgrammaticEvolver(Evolver):
  """Applies a registered (or "module:function") programmatic evolver to text.

  Args:
    fn: a name in `PROGRAMMATIC_EVOLVERS`, "module:function" naming a registered spec or a
      function (then `operators` must be given), or a `ProgrammaticSpec`.
    num_children / mode / operators: see `Evolver`.
  """

  def __init__(self, fn: Union[str, ProgrammaticSpec, Callable] = "templates", *,
               num_children: int = 4, mode: str = "chain",
               operators: Optional[Sequence[str]] = None):
    from eva_jax.rewards.programmatic import resolve_callable  # pylint: disable=g-import-not-at-top
    spec = fn
    if isinstance(fn, str) and ":" not in fn:
      spec = PROGRAMMATIC_EVOLVERS.get(fn)
    elif not isinstance(fn, ProgrammaticSpec):
      resolved = fn if callable(fn) and not isinstance(fn, str) else resolve_callable(
          fn, PROGRAMMATIC_EVOLVERS, "ProgrammaticEvolver.fn")
      if isinstance(resolved, ProgrammaticSpec):
        spec = resolved
      else:
        if operators is None:
          raise ValueError(f"ProgrammaticEvolver: {fn!r} is a plain function; name the "
                           "operators it implements (ProgrammaticEvolver.operators) or "
                           "register it with register_programmatic_evolver.")
        spec = ProgrammaticSpec(resolved, tuple(operators))
    self.spec = spec
    self.supported_operators = spec.operators
    self.name = f"programmatic evolver {getattr(spec.fn, '__name__', '')}".strip()
    super().__init__(num_children=num_children, mode=mode, operators=operators)

  def rewrite(self, requests):
    replies = []
    for r in requests:
      try:
        out = self.spec.fn(r.text, r.operator, r.other, np.random.default_rng(r.seed))
      except Exception as e:  # pylint: disable=broad-except
        replies.append((None, f"{type(e).__name__}: {e}"))
        continue
      replies.append((out, None) if isinstance(out, str) else
                     (None, f"returned {type(out).__name__}, not text"))
    return replies


@gin.configurable
def make_evolver(kind: str = "programmatic") -> Evolver:
  """The evolver registered as `kind` (its own parameters bound in gin)."""
  return EVOLVERS.get(kind)()

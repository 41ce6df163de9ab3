"""Filters on evolved prompts, each counting what it dropped.

A child is dropped by the first filter (in the configured order) that rejects it, and counted
under that filter's name (`filter/<name>` in metrics):

| name | drops a child that |
|---|---|
| `empty` | has no text |
| `too_short` | has fewer than `min_chars` characters |
| `too_long` | has more than `max_tokens` tokens in the solver's tokenizer (chat template included) |
| `echo` | repeats the meta-prompt (contains one of its marker phrases) |
| `refusal` | starts like a refusal ("I'm sorry, but I can't ...") |
| `duplicate` | equals (normalised) its parent, any prompt ever in the buffer, or an earlier child |
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Optional, Sequence

import gin

from eva_jax.creator.buffer import normalize_text
from eva_jax.creator.evolvers import Child
from eva_jax.creator.meta_prompts import ECHO_MARKERS
from eva_jax.registry import Registry

FILTERS: Registry = Registry("filter")
DEFAULT_FILTERS = ("empty", "too_short", "too_long", "echo", "refusal", "duplicate")

_REFUSAL = re.compile(
    r"^\W*(?:i['\u2019]?m sorry|i am sorry|sorry,|i apologi[sz]e|i can(?:not|['\u2019]t)\b|"
    r"i am (?:not able|unable)|i['\u2019]m (?:not able|unable)|i won['\u2019]t\b|"
    r"i will not\b|as an ai\b|as a language model\b|unfortunately,? i\b)", re.I)


@dataclasses.dataclass
class FilterContext:
  """What the filters compare against.

  Attributes:
    parent_texts: parent id -> text.
    seen: normalised texts already taken (the buffer's, then each kept child's).
    count_tokens: text -> number of solver tokens (None: `too_long` keeps everything).
    min_chars / max_tokens: the length bounds.
    echo_markers: phrases of the meta-prompts.
  """

  parent_texts: dict[str, str]
  seen: set[str]
  count_tokens: Optional[Callable[[str], int]] = None
  min_chars: int = 10
  max_tokens: Optional[int] = None
  echo_markers: Sequence[str] = ECHO_MARKERS


@FILTERS.register("empty")
def _empty(child: Child, ctx: FilterContext) -> bool:
  return bool(child.text.strip())


@FILTERS.register("too_short")
def _too_short(child: Child, ctx: FilterContext) -> bool:
  return len(child.text.strip()) >= ctx.min_chars


@FILTERS.register("too_long")
def _too_long(child: Child, ctx: FilterContext) -> bool:
  if ctx.max_tokens is None or ctx.count_tokens is None:
    return True
  return ctx.count_tokens(child.text) <= ctx.max_tokens


@FILTERS.register("echo")
def _echo(child: Child, ctx: FilterContext) -> bool:
  text = child.text.casefold()
  return not any(m.casefold() in text for m in ctx.echo_markers)


@FILTERS.register("refusal")
def _refusal(child: Child, ctx: FilterContext) -> bool:
  return not _REFUSAL.match(child.text[:200])


@FILTERS.register("duplicate")
def _duplicate(child: Child, ctx: FilterContext) -> bool:
  norm = normalize_text(child.text)
  parent = ctx.parent_texts.get(child.parent_id)
  if parent is not None and norm == normalize_text(parent):
    return False
  return norm not in ctx.seen


@gin.configurable(denylist=["children", "parent_texts", "seen", "count_tokens"])
def filter_children(children: Iterable[Child], *, parent_texts: dict[str, str],
                    seen: Iterable[str] = (), count_tokens: Optional[Callable[[str], int]] = None,
                    filters: Sequence[str] = DEFAULT_FILTERS, min_chars: int = 10,
                    max_tokens: Optional[int] = None) -> tuple[list[Child], dict[str, int]]:
  """(kept children, {"filter/<name>": dropped}) with every configured filter counted.

  Args:
    children: the evolver's output, in order.
    parent_texts: parent id -> text (for `duplicate`).
    seen: normalised texts of every prompt ever in the buffer.
    count_tokens: text -> solver tokens of the prompt as the solver will see it.
    filters: names, applied in order (unknown names raise, listing the known ones).
    min_chars: `too_short`'s bound.
    max_tokens: `too_long`'s bound (None: no bound).
  """
  fns = [(name, FILTERS.get(name)) for name in filters]
  ctx = FilterContext(parent_texts=dict(parent_texts), seen=set(seen), count_tokens=count_tokens,
                      min_chars=min_chars, max_tokens=max_tokens)
  counts = {f"filter/{name}": 0 for name, _ in fns}
  kept = []
  for child in children:
    rejected = next((name for name, fn in fns if not fn(child, ctx)), None)
    if rejected is not None:
      counts[f"filter/{rejected}"] += 1
      continue
    kept.append(child)
    ctx.seen.add(normalize_text(child.text))
  return kept, counts

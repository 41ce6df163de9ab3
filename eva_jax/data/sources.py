"""Where a run's prompts come from, and how they are grouped in reports.

`initial_prompts()` (gin: `initial_prompts.source`) returns the run's (training, held-out)
`PromptSet`s from a registered source: "files" (`load_train_and_heldout`: JSONL / Parquet
files), "seqio" / "tfds" (`seqio_prompts` / `tfds_prompts` in eva_jax.data.seqio_tfds: a seqio
Task or Mixture, a TFDS dataset; the `seqio` extra) or a generator such as the closed world's
("closed_world"). Sources register with
`PROMPT_SOURCES.register(name, fn)`; `fn(tokenizer=...)` returns the two sets.

`PROMPT_GROUPS` holds functions from a prompt's text to its groups, e.g.
{"level": "3", "family": "add"}: the round loop reports the held-out reward and the
informativeness per group when `EvaConfig.prompt_groups` names one.

`resolve_builtin` maps "builtin:NAME" to a file or folder shipped in eva_jax/data/builtin/
(prompt files, the closed world's starting checkpoint), wherever eva_jax is installed.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import gin

from eva_jax.data.prompts import BUILTIN_DIR, BUILTIN_PREFIX, PromptSet, load_train_and_heldout
from eva_jax.registry import Registry

PROMPT_SOURCES: Registry = Registry("prompt source")
PROMPT_GROUPS: Registry = Registry("prompt grouping")

PROMPT_SOURCES.register("files", load_train_and_heldout)


def resolve_builtin(path: Optional[str]) -> Optional[str]:
  """"builtin:NAME" -> the shipped eva_jax/data/builtin/NAME; anything else unchanged."""
  if isinstance(path, str) and path.startswith(BUILTIN_PREFIX):
    return os.path.join(BUILTIN_DIR, path[len(BUILTIN_PREFIX):])
  return path


@gin.configurable
def initial_prompts(source: str = "files", tokenizer: Any = None) -> tuple[PromptSet, PromptSet]:
  """(training, held-out) prompts from the source registered as `source`."""
  return PROMPT_SOURCES.get(source)(tokenizer=tokenizer)


def prompt_groups(name: Optional[str]) -> Optional[Callable[[str], dict]]:
  """The grouping function registered as `name` (None: no grouping)."""
  return None if name is None else PROMPT_GROUPS.get(name)

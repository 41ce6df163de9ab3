"""The closed world: text tasks with graded rewards and a difficulty ladder, programmatic
evolvers for them, and a small warm-started solver, so that eva runs for real on a laptop.

Registers, by name, what `eva_tiny.gin` uses:

* the programmatic reward "closed_world" (`tasks.reward`, on the prompt's and the response's
  text);
* the programmatic evolver "closed_world" (`evolvers.py`);
* the prompt source "closed_world" (`closed_world_prompts`): training prompts on the easy
  levels, held-out prompts on every level;
* the prompt grouping "closed_world" ({"level", "family"} of a prompt), which the loop uses to
  report the held-out reward per level and informativeness per task family.
"""

from __future__ import annotations

from typing import Any, Sequence

import gin

from eva_jax.closed_world import evolvers, tasks
from eva_jax.closed_world.tasks import Task, parse_prompt
from eva_jax.data.prompts import PromptExample, PromptSet
from eva_jax.data.sources import PROMPT_GROUPS, PROMPT_SOURCES
from eva_jax.rewards.programmatic import REWARD_FNS

REWARD_FNS.register("closed_world", tasks.reward)


def _example(task: Task, source: str) -> PromptExample:
  return PromptExample(text=task.prompt(), source=source,
                       metadata={"family": task.family, "level": task.level,
                                 "difficulty": task.difficulty})


@gin.configurable
def closed_world_prompts(tokenizer: Any = None, *, num_train: int = 64,
                         train_difficulties: Sequence[int] = (2, 3, 4, 5),
                         heldout_per_level: int = 16, families: Sequence[str] = tasks.FAMILIES,
                         seed: int = 0) -> tuple[PromptSet, PromptSet]:
  """(training, held-out) prompts of the closed world.

  Args:
    tokenizer: unused (the prompts are short); accepted as every prompt source is.
    num_train: training prompts, families and `train_difficulties` drawn uniformly.
    heldout_per_level: held-out prompts per level 1..6 (families mixed), none of them a
      training prompt.
    families: the task families drawn from.
    seed: the draw's seed (the held-out draw uses its own stream).
  """
  del tokenizer
  train = tasks.make_prompts(num_train, train_difficulties, seed, families)
  taken = {t.prompt() for t in train}
  heldout = []
  pool = tasks.make_prompts(40 * heldout_per_level * tasks.NUM_LEVELS, range(1, 16),
                            seed + 10_000, families)
  for level in range(1, tasks.NUM_LEVELS + 1):
    at_level = [t for t in pool if t.level == level and t.prompt() not in taken]
    heldout += at_level[:heldout_per_level]
  stats = {"read": len(train), "kept": len(train)}
  return (PromptSet([_example(t, f"closed_world:train/{n}") for n, t in enumerate(train)],
                    stats),
          PromptSet([_example(t, f"closed_world:heldout/{n}") for n, t in enumerate(heldout)],
                    {"read": len(heldout), "kept": len(heldout)}))


PROMPT_SOURCES.register("closed_world", closed_world_prompts)


@PROMPT_GROUPS.register("closed_world")
def prompt_group(text: str) -> dict:
  """{"level": "1".."6", "family": "string" | "add" | "count"} of a closed-world prompt."""
  task = parse_prompt(text)
  return {"level": str(task.level), "family": task.family}


__all__ = ["Task", "closed_world_prompts", "evolvers", "parse_prompt", "prompt_group", "tasks"]

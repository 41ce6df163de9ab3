"""Programmatic evolvers of the closed world, mirroring EvolInstruct's operators on its tasks.

In depth (the child is harder by `Task.difficulty`):

* `longer_input` (EvolInstruct's "complicate the input"): one more letter, one more digit in
  every operand, one more letter in the word to count;
* `add_constraint` ("add constraints"): a string task must also be written in capital letters
  or with spaces between the letters; a sum gets one more operand; a count one more letter;
* `extra_step` ("more reasoning steps"): a string task gets one more transformation before its
  last one; a sum gets one more operand; a count one more letter to count.

In breadth (a sibling at the same difficulty):

* `sibling_task` ("a new prompt in the same domain"): a task of another family, or another
  string transformation, at the parent's difficulty;
* `new_content`: the same kind of task with a fresh input of the same size.

Registered as the programmatic evolver "closed_world"; a parent that is not a prompt of this
world, or a change the task cannot take (a fourth string operation), is a failed rewrite.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from eva_jax.closed_world import tasks as T
from eva_jax.creator.evolvers import register_programmatic_evolver

IN_DEPTH = ("longer_input", "add_constraint", "extra_step")
IN_BREADTH = ("sibling_task", "new_content")
OPERATORS = IN_DEPTH + IN_BREADTH

_MAX_DIGITS = 6
_MAX_OPERANDS = 4
_MAX_WORD = 20


def _longer(task: T.Task, rng: np.random.Generator) -> T.Task:
  if task.family == "add":
    nums = task.text.split()
    if max(len(n) for n in nums) >= _MAX_DIGITS:
      raise ValueError("the operands already have the most digits")
    return T.Task("add", " ".join(n + str(int(rng.integers(0, 10))) for n in nums))
  if len(task.text) >= _MAX_WORD:
    raise ValueError("the word is already as long as it gets")
  pos = int(rng.integers(0, len(task.text) + 1))
  letter = task.ops[0] if task.family == "count" and rng.random() < 0.5 else \
      str(rng.choice(list(T.LETTERS)))
  return dataclasses.replace(task, text=task.text[:pos] + letter + task.text[pos:])


def _one_more_operand(task: T.Task, rng: np.random.Generator) -> T.Task:
  nums = task.text.split()
  if len(nums) >= _MAX_OPERANDS:
    raise ValueError("the sum already has the most operands")
  digits = max(len(n) for n in nums)
  return T.Task("add", " ".join(nums + [T.random_number(rng, digits)]))


def _one_more_letter(task: T.Task, rng: np.random.Generator) -> T.Task:
  if len(task.ops) >= 2:
    raise ValueError("the count already has two letters")
  other = str(rng.choice([c for c in T.LETTERS[:6] if c != task.ops[0]]))
  return dataclasses.replace(task, ops=task.ops + (other,))


def _constraint(task: T.Task, rng: np.random.Generator) -> T.Task:
  if task.family == "add":
    return _one_more_operand(task, rng)
  if task.family == "count":
    return _one_more_letter(task, rng)
  options = [o for o in ("upper", "spaced") if o not in task.ops]
  if not options or len(task.ops) >= 3:
    raise ValueError("the string task already has its constraints")
  op = str(rng.choice(options))
  ops = task.ops[:-1] + (op, "spaced") if task.ops[-1] == "spaced" else task.ops + (op,)
  if not T.valid_ops(ops):
    raise ValueError(f"cannot add {op} to {task.ops}")
  return dataclasses.replace(task, ops=ops)


def _extra_step(task: T.Task, rng: np.random.Generator) -> T.Task:
  if task.family == "add":
    return _one_more_operand(task, rng)
  if task.family == "count":
    return _one_more_letter(task, rng)
  if len(task.ops) >= 3:
    raise ValueError("the string task already has three steps")
  options = [o for o in ("reverse", "sort", "double") if o not in task.ops]
  if not options:
    raise ValueError("no transformation left to add")
  ops = (str(rng.choice(options)),) + task.ops
  if not T.valid_ops(ops):
    raise ValueError(f"cannot extend {task.ops}")
  return dataclasses.replace(task, ops=ops)


def _sibling(task: T.Task, rng: np.random.Generator) -> T.Task:
  families = [f for f in T.FAMILIES if f != task.family]
  if task.family == "string":
    families.append("string")  # another transformation is a sibling too
  # Families in random order; the first that has a task at exactly this difficulty (sums
  # have odd difficulties only) gives the sibling.
  for family in rng.permutation(families):
    for _ in range(20):
      child = T.make_task(str(family), task.difficulty, rng)
      if child.difficulty == task.difficulty and child.prompt() != task.prompt():
        return child
  raise ValueError(f"no sibling task at difficulty {task.difficulty}")


def _new_content(task: T.Task, rng: np.random.Generator) -> T.Task:
  for _ in range(20):
    if task.family == "string":
      child = T.make_task("string", task.difficulty, rng, ops=task.ops)
    elif task.family == "add":
      nums = task.text.split()
      child = T.Task("add", " ".join(T.random_number(rng, len(n)) for n in nums))
    else:
      child = T.make_task("count", task.difficulty - 2 * (len(task.ops) - 1), rng)
      child = dataclasses.replace(child, ops=task.ops)
    if child.prompt() != task.prompt() and child.difficulty == task.difficulty:
      return child
  raise ValueError("no new content of the same size")


_OPS = {"longer_input": _longer, "add_constraint": _constraint, "extra_step": _extra_step,
        "sibling_task": _sibling, "new_content": _new_content}


def evolve_task(task: T.Task, operator: str, rng: np.random.Generator) -> T.Task:
  """The child of `task` under `operator` (ValueError when the task cannot take it)."""
  if operator not in _OPS:
    raise ValueError(f"Unknown closed-world operator {operator!r}; known: {', '.join(_OPS)}.")
  return _OPS[operator](task, rng)


@register_programmatic_evolver("closed_world", operators=OPERATORS)
def closed_world_evolver(text: str, operator: str, other: str, rng: np.random.Generator) -> str:
  """The programmatic evolver on prompt text (see the module docstring)."""
  del other
  return evolve_task(T.parse_prompt(text), operator, rng).prompt()

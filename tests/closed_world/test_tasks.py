"""The closed world: graded rewards on hand-made answers, prompts that parse back, evolvers
that make harder (in depth) or sibling (in breadth) prompts by the tasks' own difficulty."""

import numpy as np
import pytest

from eva_jax import closed_world
from eva_jax.closed_world import evolvers as E
from eva_jax.closed_world import tasks as T
from eva_jax.creator import Parent, ProgrammaticEvolver
from eva_jax.data import PROMPT_GROUPS, initial_prompts
from eva_jax.rewards import ProgrammaticReward


@pytest.mark.parametrize("prompt, right, partly, wrong", [
    ("Reverse: hello", "olleh", "olleb", "xyz"),
    ("Sort the letters: dcab", "abcd", "abdc", "zzzzzzzz"),
    ("Double each letter: abc", "aabbcc", "aabbc", "q"),
    ("Capitalize: cat", "CAT", "CAt", "dog"),
    ("Space out: abc", "a b c", "abc", "xyzxyzxyz"),
    ("Reverse, then capitalize, then space out: abc", "C B A", "C BA", "nope nope"),
    ("Sort the letters, then double each letter: ba", "aabb", "abab", "zzzzz"),
    ("Add 37 and 45.", "82", "83", "hello"),
    ("Add 3, 12 and 40.", "55", "56", "9999"),
    ("Count the a's in banana.", "3", "2", "three"),
    ("Count the a's and n's in banana.", "5", "4", "0"),
])
def test_reward_gives_full_partial_and_no_credit(prompt, right, partly, wrong):
  assert T.reward(prompt, right) == 1.0
  assert T.reward(prompt, f"  {right}\n") == 1.0  # surrounding whitespace is ignored
  assert 0.0 < T.reward(prompt, partly) < 1.0
  assert T.reward(prompt, partly) > T.reward(prompt, wrong)
  assert T.reward(prompt, wrong) <= 0.25


def test_partial_credit_by_hand():
  # Closeness alone (exact_weight 0), then the default: half the credit for the exact answer.
  assert T.reward("Reverse: abcd", "dcbx", exact_weight=0.0) == pytest.approx(0.75)  # 1 edit
  assert T.reward("Reverse: abcd", "dcbx") == pytest.approx(0.375)
  assert T.reward("Add 37 and 45.", "8", exact_weight=0.0) == pytest.approx(0.5)  # 1 deletion
  assert T.reward("Count the a's in banana.", "2", exact_weight=0.0) == pytest.approx(0.75)
  assert T.reward("Count the a's in banana.", "2") == pytest.approx(0.375)
  with pytest.raises(ValueError, match="exact_weight=2 must be in"):
    T.reward("Add 1 and 2.", "3", exact_weight=2)
  assert T.reward("Count the a's in banana.", "") == 0.0


def test_prompts_parse_back_and_other_text_is_refused():
  for task in T.make_prompts(300, range(1, 16), seed=0):
    assert T.parse_prompt(task.prompt()) == task
    assert 1 <= task.level <= T.NUM_LEVELS
  for text in ("Say hi.", "Reverse: Hello", "Add 1.", "Sort the letters, then sort the "
               "letters: ab", "Space out, then reverse: ab"):
    with pytest.raises(ValueError, match="Not a closed-world prompt"):
      T.parse_prompt(text)
  with pytest.raises(ValueError, match="Not a closed-world prompt"):
    ProgrammaticReward("closed_world").score(["Say hi."], ["hi"])


def test_difficulty_ladder_covers_every_level():
  levels = {t.level for t in T.make_prompts(400, range(1, 16), seed=1)}
  assert levels == set(range(1, T.NUM_LEVELS + 1))
  assert T.Task("string", "abc", ("reverse",)).difficulty < T.Task(
      "string", "abc", ("reverse", "upper")).difficulty


def test_every_operator_makes_a_valid_harder_or_sibling_prompt():
  rng = np.random.default_rng(0)
  made = {op: 0 for op in E.OPERATORS}
  for task in T.make_prompts(200, range(1, 12), seed=2):
    for op in E.OPERATORS:
      try:
        child = E.evolve_task(task, op, rng)
      except ValueError:
        continue  # e.g. a fourth string operation: a failed rewrite, counted by the evolver
      made[op] += 1
      assert T.parse_prompt(child.prompt()) == child and child.prompt() != task.prompt()
      if op in E.IN_DEPTH:
        assert child.difficulty > task.difficulty, (task, op, child)
      else:
        assert child.difficulty == task.difficulty, (task, op, child)
      if op == "new_content":
        assert (child.family, child.ops) == (task.family, task.ops)
  assert all(n >= 100 for n in made.values()), made


def test_registered_evolver_reward_source_and_groups():
  train, heldout = initial_prompts(source="closed_world")
  assert len(train.examples) == 64 and len(heldout.examples) == 16 * T.NUM_LEVELS
  assert not {e.text for e in train} & {e.text for e in heldout}
  assert {e.metadata["level"] for e in heldout} == set(range(1, T.NUM_LEVELS + 1))
  assert PROMPT_GROUPS.get("closed_world")("Add 37 and 45.") == {"level": "1", "family": "add"}
  parents = [Parent(str(n), e.text) for n, e in enumerate(train.examples[:8])]
  out = ProgrammaticEvolver("closed_world", num_children=4).evolve(parents, seed=0)
  assert len(out.children) + out.failed == 32 and len(out.children) >= 28
  for child in out.children:
    task = T.parse_prompt(child.text)
    assert task.difficulty >= 1 and child.operator in E.OPERATORS
  assert closed_world.prompt_group is PROMPT_GROUPS.get("closed_world")


def test_shipped_solver_is_the_warm_start_model_and_the_script_runs(tmp_path):
  from eva_jax import models  # pylint: disable=import-outside-toplevel
  from eva_jax.closed_world import warm_start  # pylint: disable=import-outside-toplevel
  from eva_jax.data import resolve_builtin  # pylint: disable=import-outside-toplevel
  shipped = resolve_builtin("builtin:closed_world_solver")
  cfg = models.pretrained_config(shipped)
  assert cfg.replace(dtype="float32", param_dtype="float32") == warm_start.solver_config()
  info = warm_start.train(str(tmp_path / "ws"), steps=2, batch_size=4, probe=1)
  assert info["steps"] == 2 and set(info["greedy_reward_by_level"]) == set(range(1, 7))
  model, params = models.from_pretrained(tmp_path / "ws")
  assert model.config == models.pretrained_config(tmp_path / "ws")

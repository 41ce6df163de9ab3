"""A reward that is a Python function of text, named in gin.

    make_reward.kind = "programmatic"
    ProgrammaticReward.fn = "my_package.rewards:exact_answer"    # "module:function"
    ProgrammaticReward.fn = "response_length"                    # a registered name
    ProgrammaticReward.fn = @my_gin_registered_fn                # a gin reference

`fn(prompt, response) -> float` gets the last user turn's text and the response text (with
`batched=True`, `fn(prompts, responses) -> list[float]` gets whole lists). An exception for one
item fails that item (with the exception as its reason), so a broken item is named rather than
silently scored.
"""

from __future__ import annotations

import importlib
from typing import Callable, Union

import gin
import numpy as np

from eva_jax.registry import Registry
from eva_jax.rewards.base import REWARDS, Reward, prompt_text

REWARD_FNS: Registry = Registry("programmatic reward function")


def resolve_callable(spec: Union[str, Callable], registry: Registry, what: str) -> Callable:
  """A callable from a callable, a registered name, or a "module:function" import path."""
  if callable(spec):
    return spec
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"{what}: expected a callable, a registered name or 'module:function', "
                     f"got {spec!r}.")
  if ":" not in spec:
    return registry.get(spec)
  module_name, _, attr = spec.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({e}).") from e
  fn = module
  for part in attr.split("."):
    fn = getattr(fn, part, None)
    if fn is None:
      raise ValueError(f"{what} {spec!r}: module {module_name!r} has no {attr!r}.")
  if not callable(fn):
    raise ValueError(f"{what} {spec!r} is not callable.")
  return fn


@REWARD_FNS.register("response_length")
def response_length(prompt: str, response: str) -> float:
  """The number of characters of the response (a toy reward, and the README's)."""
  del prompt
  return float(len(response))


@REWARD_FNS.register("letter_fraction")
def letter_fraction(prompt: str, response: str) -> float:
  """The share of the response's characters that are ASCII letters or spaces, in [0, 1] (a
  toy reward with partial credit that even a random byte-level model can learn to raise)."""
  del prompt
  if not response:
    return 0.0
  return sum(c == " " or ("a" <= c.lower() <= "z") for c in response) / len(response)


@REWARDS.register("programmatic")
@gin.configurable
class ProgrammaticReward(Reward):
  """Scores with `fn` (see the module docstring).

  Args:
    fn: a callable, a name registered in `REWARD_FNS`, or "module:function".
    batched: `fn` takes lists and returns one score per item.
  """

  def __init__(self, fn: Union[str, Callable] = "response_length", batched: bool = False):
    self.fn = resolve_callable(fn, REWARD_FNS, "ProgrammaticReward.fn")
    self.batched = batched
    self.name = f"programmatic reward {getattr(self.fn, '__name__', repr(self.fn))}"

  def _score(self, conversations, responses):
    prompts = [prompt_text(c) for c in conversations]
    if self.batched:
      return list(self.fn(prompts, responses)), {}
    scores = np.full((len(responses),), np.nan)
    reasons = {}
    for i, (p, r) in enumerate(zip(prompts, responses)):
      try:
        scores[i] = float(self.fn(p, r))
      except Exception as e:  # pylint: disable=broad-except
        reasons[i] = f"{type(e).__name__}: {e}"
    return scores, reasons

"""The reward interface: (conversation, response text) pairs in, float32 scores out, in order.

Every reward (a reward model on the mesh, a Python function, an HTTP server) is a `Reward`;
callers use `reward.score(conversations, responses, on_failure=...)`:

* `conversations[i]` is what the policy answered: a str (one user turn) or a list of
  {"role", "content"} messages (the chat format of `eva_jax.models.tokenizer.chat_turns`);
  `responses[i]` is the policy's answer as text.
* The result is a `RewardScores`: `scores` float32 [N] in input order, `failed` bool [N] and
  a reason for every failed item.
* A score that could not be computed is never passed on silently: a reward that returns the
  wrong number of scores raises `RewardError`; a NaN or infinite score, an exception for one
  item or an item the server gave up on raises `RewardError` naming the prompt
  (`on_failure="raise"`, the default), or is marked failed (NaN), counted and left to the
  caller (`on_failure="skip"`).

Several processes: every process calls `score` with the same full lists and gets the same
full result. Rewards computed on the device mesh (the reward model) run on every process;
rewards with `process0_only` (an HTTP server, which N processes asking would load N times
and might answer differently) run on process 0 and the result is broadcast.

Implementations subclass `Reward`, implement `_score` and register under a name, so that gin
picks one with `make_reward.kind = "..."`.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Optional, Sequence

import gin
import numpy as np

from eva_jax import parallel
from eva_jax.models.tokenizer import Messages, chat_turns
from eva_jax.registry import Registry

ON_FAILURE = ("raise", "skip")

REWARDS: Registry = Registry("reward")


class RewardError(ValueError):
  """A reward that could not be computed, with the prompt it belongs to."""


@dataclasses.dataclass
class RewardScores:
  """Scores of N responses, in input order.

  Attributes:
    scores: float32 [N]; NaN where the item failed.
    failed: bool [N].
    reasons: {index: why} for every failed item.
  """

  scores: np.ndarray
  failed: np.ndarray
  reasons: dict[int, str]

  @property
  def num_failed(self) -> int:
    return int(np.sum(self.failed))


def prompt_text(conversation: Messages) -> str:
  """The last user turn's text of a conversation (what a reward "names the prompt" by)."""
  turns = chat_turns(conversation)
  users = [text for role, text in turns if role == "user"]
  return users[-1] if users else turns[-1][1]


def _snippet(text: str, limit: int = 160) -> str:
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


class Reward(abc.ABC):
  """Scores responses; see the module docstring for the contract.

  Attributes:
    name: shown in errors and metrics.
    process0_only: with several processes, only process 0 computes (the result is broadcast).
    transient_failures: a failed item says more about the reward's infrastructure (a server
      that gave up) than about the response, so a caller may skip it by default; a local
      reward's NaN is a bug and should stop the run (the round loop's `on_reward_failure`
      "auto" follows this).
  """

  name: str = "reward"
  process0_only: bool = False
  transient_failures: bool = False

  @abc.abstractmethod
  def _score(self, conversations: list[Messages], responses: list[str]
             ) -> tuple[Any, dict[int, str]]:
    """(scores [N] with NaN for failed items, {index: reason} for failed items)."""

  def score(self, conversations: Sequence[Messages], responses: Sequence[str],
            on_failure: str = "raise") -> RewardScores:
    """Scores `responses[i]` as the answer to `conversations[i]`.

    Args:
      conversations / responses: equal-length lists (see the module docstring).
      on_failure: "raise" (RewardError naming the first failed prompt) or "skip" (failed
        items get NaN, `failed` True and a reason).

    Raises:
      RewardError: the reward returned the wrong number of scores, or an item failed and
        `on_failure == "raise"`.
      ValueError: mismatched inputs or an unknown `on_failure`.
    """
    if on_failure not in ON_FAILURE:
      raise ValueError(f"{self.name}: on_failure={on_failure!r}; use one of {ON_FAILURE}.")
    conversations, responses = list(conversations), list(responses)
    if len(conversations) != len(responses):
      raise ValueError(f"{self.name}: {len(conversations)} conversations but "
                       f"{len(responses)} responses; pass one response per conversation.")
    for i, r in enumerate(responses):
      if not isinstance(r, str):
        raise ValueError(f"{self.name}: response {i} is a {type(r).__name__}, not text; "
                         "decode token ids with the tokenizer first.")
    n = len(responses)
    if n == 0:
      return RewardScores(np.zeros((0,), np.float32), np.zeros((0,), bool), {})
    if self.process0_only:
      out = parallel.run_on_process0(lambda: self._score(conversations, responses))
    else:
      out = self._score(conversations, responses)
    raw, reasons = out
    reasons = {int(k): str(v) for k, v in dict(reasons or {}).items()}
    try:
      scores = np.asarray(raw, np.float64)
    except (TypeError, ValueError) as e:
      raise RewardError(f"{self.name}: returned scores that are not numbers ({e}); a reward "
                        "must return one float per response.") from e
    if scores.shape != (n,):
      raise RewardError(f"{self.name}: returned {scores.size} scores (shape {scores.shape}) "
                        f"for {n} responses; a reward must return exactly one score per "
                        "response, in order.")
    failed = ~np.isfinite(scores)
    for i in np.flatnonzero(failed):
      reasons.setdefault(int(i), f"the score is {scores[i]}")
    reasons = {i: r for i, r in reasons.items() if failed[i]}
    if failed.any() and on_failure == "raise":
      i = int(np.flatnonzero(failed)[0])
      raise RewardError(
          f"{self.name}: no score for the response to prompt {i} "
          f"({_snippet(prompt_text(conversations[i]))!r}): {reasons[i]}. "
          f"{int(failed.sum())} of {n} responses failed; fix the reward, or let the caller "
          "skip failed items (on_failure='skip').")
    scores = np.where(failed, np.nan, scores).astype(np.float32)
    return RewardScores(scores, failed, reasons)

  def close(self) -> None:
    """Releases what the reward holds (device memory, connections)."""


@gin.configurable
def make_reward(kind: str = "programmatic", mesh: Optional[Any] = None) -> Reward:
  """The reward registered as `kind` (its own parameters bound in gin), e.g.
  `make_reward.kind = "model"` with `ModelReward.path = "/ckpt/skywork"`.

  Args:
    kind: a registered name (`REWARDS.names()`).
    mesh: passed to rewards that run on the device mesh (the reward model).
  """
  cls = REWARDS.get(kind)
  if getattr(cls, "needs_mesh", False):
    return cls(mesh=mesh)
  return cls()

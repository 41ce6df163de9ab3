"""Preference pairs from the solver's own samples, and the round's mix of pairs.

Pairs: of the k samples of a prompt, chosen = the best-rewarded, rejected = the worst (the
first sample on ties, as numpy's argmax / argmin). Samples whose reward failed (NaN) are left
out; a prompt with fewer than two scored samples gives no pair (`dropped_unscored`), and a
prompt whose best and worst rewards tie gives no pair (`dropped_ties`: there is nothing to
prefer; the authors' code keeps such pairs, with chosen == rejected's reward).

Mix (the authors' `combine_ds.py`): each set of pairs is shuffled with the seed and cut to
`int(len * fraction)` of its own size, then the two are concatenated and shuffled again; by
default 80% of the pairs on evolved prompts and 20% of the fresh pairs on the round's current
prompts, so the mix holds about as many pairs as the evolved set.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import gin
import numpy as np


@dataclasses.dataclass(frozen=True)
class PairChoice:
  """One pair: sample indices into prompt `prompt_index`'s k samples, and their rewards."""

  prompt_index: int
  chosen: int
  rejected: int
  chosen_reward: float
  rejected_reward: float


@gin.configurable(denylist=["rewards"])
def best_worst_pairs(rewards, *, tie_tolerance: float = 0.0
                     ) -> tuple[list[PairChoice], dict[str, int]]:
  """(pairs, counts) from rewards [P, k] (NaN: a failed reward).

  Args:
    tie_tolerance: best - worst <= this counts as a tie (0: only exact ties).

  Returns:
    The pairs in prompt order, and {"pairs", "dropped_ties", "dropped_unscored"}.
  """
  rewards = np.asarray(rewards, np.float64)
  if rewards.ndim != 2:
    raise ValueError(f"best_worst_pairs: rewards must be [prompts, samples], got shape "
                     f"{rewards.shape}.")
  if not tie_tolerance >= 0:
    raise ValueError(f"best_worst_pairs: tie_tolerance={tie_tolerance} must be >= 0.")
  pairs, ties, unscored = [], 0, 0
  for p, row in enumerate(rewards):
    scored = np.isfinite(row)
    if scored.sum() < 2:
      unscored += 1
      continue
    masked_hi = np.where(scored, row, -np.inf)
    masked_lo = np.where(scored, row, np.inf)
    best, worst = int(np.argmax(masked_hi)), int(np.argmin(masked_lo))
    if row[best] - row[worst] <= tie_tolerance:
      ties += 1
      continue
    pairs.append(PairChoice(p, best, worst, float(row[best]), float(row[worst])))
  return pairs, {"pairs": len(pairs), "dropped_ties": ties, "dropped_unscored": unscored}


@gin.configurable(denylist=["evolved", "fresh", "seed"])
def mix_pairs(evolved: Sequence[Any], fresh: Sequence[Any], *, seed: int = 0,
              evolved_fraction: float = 0.8, fresh_fraction: float = 0.2
              ) -> tuple[list[Any], dict[str, int]]:
  """The round's training pairs: `int(len * fraction)` of each set, shuffled together.

  Args:
    evolved: pairs on the evolved prompts.
    fresh: pairs on the round's current prompts (sampled by the round's starting policy).
    seed: the shuffle's seed.
    evolved_fraction / fresh_fraction: in [0, 1], each of its own set's size.

  Returns:
    (the mixed pairs, {"mix/evolved", "mix/fresh", "mix/total"}).
  """
  for name, f in (("evolved_fraction", evolved_fraction), ("fresh_fraction", fresh_fraction)):
    if not 0 <= f <= 1:
      raise ValueError(f"mix_pairs: {name}={f} must be in [0, 1] (a share of its own set).")
  rng = np.random.default_rng(seed)
  take_e = rng.permutation(len(evolved))[:int(len(evolved) * evolved_fraction)]
  take_f = rng.permutation(len(fresh))[:int(len(fresh) * fresh_fraction)]
  mixed = [evolved[i] for i in take_e] + [fresh[i] for i in take_f]
  mixed = [mixed[i] for i in rng.permutation(len(mixed))]
  return mixed, {"mix/evolved": len(take_e), "mix/fresh": len(take_f), "mix/total": len(mixed)}

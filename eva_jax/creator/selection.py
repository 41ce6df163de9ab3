"""Selection: which prompts of the buffer the creator evolves, from their informativeness.

Methods (`select_prompts.method`):

* `weighted` (default, the paper's): n = int(fraction * P) prompts drawn *without
  replacement* with probability proportional to weights w = minmax(info) + epsilon, where
  minmax(v) = (v - min v) / (max v - min v) over the prompts with a finite info (1 for all
  of them when the info is flat). Drawing without replacement is successive sampling: draw one
  prompt with probability w_i / sum(w), remove it, renormalise, repeat (numpy's
  `choice(replace=False, p=w)`, which pandas' `DataFrame.sample(weights=...)` in the authors'
  code calls). It is done in one pass with Efraimidis-Spirakis keys: key_i = log(u_i) / w_i,
  u_i ~ U(0, 1), and the n largest keys win, which has exactly the successive-sampling law.
  With epsilon = 0 the least informative prompt has weight 0 and is never drawn, as in the
  authors' code; when fewer than n prompts have a positive weight, only those are returned.
* `greedy`: the n most informative prompts (ties broken by position).
* `uniform`: n prompts uniformly without replacement (ablation).

Prompts whose info is NaN (no scored sample) are never selected by `weighted` or `greedy`.
The draw depends only on `seed` and the inputs, so every process selects the same prompts.
"""

from __future__ import annotations

import gin
import numpy as np

from eva_jax.registry import Registry

METHODS: Registry = Registry("selection method")


def minmax_weights(info: np.ndarray, epsilon: float) -> np.ndarray:
  """w = minmax(info) + epsilon over finite entries; 0 where info is NaN."""
  info = np.asarray(info, np.float64)
  finite = np.isfinite(info)
  w = np.zeros_like(info)
  if finite.any():
    lo, hi = np.min(info[finite]), np.max(info[finite])
    w[finite] = (info[finite] - lo) / (hi - lo) if hi > lo else 1.0
    w[finite] += epsilon
  return w


@METHODS.register("weighted")
def _weighted(info, n, rng, epsilon):
  w = minmax_weights(info, epsilon)
  u = rng.random(len(w))
  with np.errstate(divide="ignore"):
    keys = np.where(w > 0, np.log(u) / np.where(w > 0, w, 1.0), -np.inf)
  n = min(n, int(np.sum(w > 0)))
  # argsort is stable: among equal keys (only -inf ones in practice) the lower index wins.
  return np.argsort(-keys, kind="stable")[:n]


@METHODS.register("greedy")
def _greedy(info, n, rng, epsilon):
  del rng, epsilon
  info = np.asarray(info, np.float64)
  n = min(n, int(np.sum(np.isfinite(info))))
  return np.argsort(-np.nan_to_num(info, nan=-np.inf), kind="stable")[:n]


@METHODS.register("uniform")
def _uniform(info, n, rng, epsilon):
  del epsilon
  return rng.permutation(len(info))[:n]


def selection_count(num_prompts: int, fraction: float) -> int:
  """int(fraction * P), at least 1."""
  return max(1, int(fraction * num_prompts))


@gin.configurable(denylist=["info", "seed"])
def select_prompts(info, *, fraction: float = 0.25, method: str = "weighted",
                   epsilon: float = 0.05, seed: int = 0) -> np.ndarray:
  """Indices (ascending) of the prompts to evolve.

  Args:
    info: informativeness [P] (NaN: not scored).
    fraction: share of the P prompts to select, in (0, 1].
    method: "weighted", "greedy" or "uniform" (see the module docstring).
    epsilon: added to the min-max normalised weights of `weighted` (0: the authors' code).
    seed: the draw's seed (the loop derives it from the run's seed and the round).

  Raises:
    ValueError: an empty buffer, a fraction outside (0, 1], a negative epsilon or an unknown
      method.
  """
  fn = METHODS.get(method)
  info = np.asarray(info, np.float64)
  if info.ndim != 1:
    raise ValueError(f"select_prompts: info must be one value per prompt, got shape "
                     f"{info.shape}.")
  if info.size == 0:
    raise ValueError("select_prompts: the prompt buffer is empty; there is nothing to select. "
                     "Check the prompt file and the filters that dropped prompts.")
  if not 0 < fraction <= 1:
    raise ValueError(f"select_prompts: fraction={fraction} must be in (0, 1] (the share of "
                     "the buffer to evolve; the paper uses 0.25).")
  if not epsilon >= 0:
    raise ValueError(f"select_prompts: epsilon={epsilon} must be >= 0.")
  rng = np.random.default_rng(seed)
  picked = fn(info, selection_count(info.size, fraction), rng, epsilon)
  return np.sort(np.asarray(picked, np.int64))

"""Informativeness: how much the policy can still learn from a prompt, from its samples' rewards.

Each metric maps rewards [P, k] (k samples of each of P prompts; NaN for a sample whose reward
failed, which is ignored) to info [P] (NaN for a prompt with no scored sample, or with fewer
than the metric needs). Higher means "select this prompt more often".

| name | info(x) | notes |
|---|---|---|
| `reward_gap` | max r - min r | the paper's default and best ("advantage") |
| `max_mean` | max r - mean r | the online variant |
| `std` | population std of r (ddof 0) | the authors' code uses the variance; same ranking |
| `mean_inverse` | -mean r | "where the solver is weak"; after min-max normalisation this is the authors' 1 - normalised mean |
| `uniform` | 0 | ablation: every prompt equally likely |

Leave-one-out advantage, mean_i(r_i - mean_{j != i} r_j), is identically zero and is not offered.
"""

from __future__ import annotations

import warnings

import numpy as np

from eva_jax.registry import Registry

METRICS: Registry = Registry("informativeness metric")


def _nan_reduce(fn, rewards: np.ndarray, min_count: int = 1) -> np.ndarray:
  """fn over each row's finite entries; NaN for rows with fewer than `min_count` of them."""
  count = np.sum(np.isfinite(rewards), axis=1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: handled below
    out = fn(rewards)
  return np.where(count >= min_count, out, np.nan)


@METRICS.register("reward_gap")
def reward_gap(rewards: np.ndarray) -> np.ndarray:
  return _nan_reduce(lambda r: np.nanmax(r, axis=1) - np.nanmin(r, axis=1), rewards)


@METRICS.register("max_mean")
def max_mean(rewards: np.ndarray) -> np.ndarray:
  return _nan_reduce(lambda r: np.nanmax(r, axis=1) - np.nanmean(r, axis=1), rewards)


@METRICS.register("std")
def std(rewards: np.ndarray) -> np.ndarray:
  return _nan_reduce(lambda r: np.nanstd(r, axis=1), rewards)


@METRICS.register("mean_inverse")
def mean_inverse(rewards: np.ndarray) -> np.ndarray:
  return _nan_reduce(lambda r: -np.nanmean(r, axis=1), rewards)


@METRICS.register("uniform")
def uniform(rewards: np.ndarray) -> np.ndarray:
  return _nan_reduce(lambda r: np.zeros(r.shape[0]), rewards)


def informativeness(rewards, metric: str = "reward_gap") -> np.ndarray:
  """info [P] (float64) of rewards [P, k] under the metric named `metric` (see the table).

  Raises:
    ValueError: an unknown metric (the message lists the known ones), or rewards that are
      not a [P, k] array.
  """
  fn = METRICS.get(metric)
  rewards = np.asarray(rewards, np.float64)
  if rewards.ndim != 2:
    raise ValueError(f"informativeness: rewards must be [prompts, samples], got shape "
                     f"{rewards.shape}.")
  return fn(rewards).astype(np.float64)


def reward_statistics(rewards) -> dict[str, np.ndarray]:
  """Per-prompt mean, max, min, std and number of scored samples of rewards [P, k] (NaN
  entries ignored), as the prompt buffer records them."""
  rewards = np.asarray(rewards, np.float64)
  return {
      "reward_mean": _nan_reduce(lambda r: np.nanmean(r, axis=1), rewards),
      "reward_max": _nan_reduce(lambda r: np.nanmax(r, axis=1), rewards),
      "reward_min": _nan_reduce(lambda r: np.nanmin(r, axis=1), rewards),
      "reward_std": _nan_reduce(lambda r: np.nanstd(r, axis=1), rewards),
      "num_scored": np.sum(np.isfinite(rewards), axis=1),
  }

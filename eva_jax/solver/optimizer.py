"""The solver's optimizer: AdamW with linear warm-up, cosine decay and global-norm clipping.

Defaults are the eva paper's DPO recipe (lr 5e-7, cosine with 10% warm-up) and TRL's
defaults for the rest (betas 0.9 / 0.999, eps 1e-8, max grad norm 1.0, no weight decay).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import gin
import jax.numpy as jnp
import optax


class Optimizer(NamedTuple):
  """An optax transformation, its learning-rate schedule (for metrics), and the dtype its
  moment estimates are kept in."""

  tx: optax.GradientTransformation
  learning_rate: Callable
  state_dtype: jnp.dtype


@gin.configurable
def learning_rate_schedule(learning_rate: float = 5e-7, total_steps: int = 1000,
                           warmup_ratio: float = 0.1, schedule: str = "cosine",
                           end_ratio: float = 0.0) -> Callable:
  """step -> learning rate: linear warm-up over `warmup_ratio * total_steps`, then `schedule`
  ("cosine", "linear" or "constant") down to `end_ratio * learning_rate` at `total_steps`."""
  if total_steps < 1:
    raise ValueError(f"learning_rate_schedule: total_steps must be >= 1, got {total_steps}.")
  if not 0.0 <= warmup_ratio < 1.0:
    raise ValueError(f"learning_rate_schedule: warmup_ratio must be in [0, 1), got "
                     f"{warmup_ratio}.")
  warmup = int(round(warmup_ratio * total_steps))
  end = learning_rate * end_ratio
  if schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, total_steps, end)
  if schedule == "linear":
    decay = optax.linear_schedule(learning_rate, end, max(total_steps - warmup, 1))
  elif schedule == "constant":
    decay = optax.constant_schedule(learning_rate)
  else:
    raise ValueError(f"learning_rate_schedule: unknown schedule {schedule!r}; use 'cosine', "
                     "'linear' or 'constant'.")
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup), decay],
                              [warmup])


@gin.configurable
def make_optimizer(learning_rate: Optional[Callable | float] = None, *, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                   max_grad_norm: Optional[float] = 1.0,
                   state_dtype: str = "float32") -> Optimizer:
  """AdamW behind global-norm clipping.

  Args:
    learning_rate: a schedule or a constant; default `learning_rate_schedule()` (gin-bound).
    weight_decay: decoupled, applied to every parameter (as TRL / HF Trainer do by default
      except for biases and norms; Gemma has no biases, and eva's recipe uses 0).
    max_grad_norm: clip the global gradient norm to this (None: no clipping).
    state_dtype: dtype of Adam's first and second moments. float32 (the default) even when
      params are bfloat16; the train state is initialised from params cast to this dtype.
  """
  schedule = learning_rate_schedule() if learning_rate is None else learning_rate
  if not callable(schedule):
    schedule = optax.constant_schedule(float(schedule))
  parts = []
  if max_grad_norm is not None:
    if max_grad_norm <= 0:
      raise ValueError(f"make_optimizer: max_grad_norm must be > 0 or None, got "
                       f"{max_grad_norm}.")
    parts.append(optax.clip_by_global_norm(max_grad_norm))
  dtype = jnp.dtype(state_dtype)
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mu_dtype=dtype))
  return Optimizer(optax.chain(*parts), schedule, dtype)

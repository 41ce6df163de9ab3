"""The solver's optimizer: AdamW with linear warm-up, cosine decay and global-norm clipping.

Defaults are the eva paper's DPO recipe (lr 5e-7, cosine with 10% warm-up) and TRL's
defaults for the rest (betas 0.9 / 0.999, eps 1e-8, max grad norm 1.0, no weight decay).

Mixed precision with a master copy (`make_optimizer(master_dtype="float32")`, for params
stored in bfloat16): the optimizer state holds the params in `master_dtype` and the update
is applied there; the train state's params become that copy cast back to their own dtype.
The forward and backward then read bfloat16 weights (no casts of float32 weights) while
updates far below bfloat16's resolution (lr 5e-7 on weights of ~1e-2) still add up. It costs 2
bytes a param of memory, and it is not a collective saving: compiled for TPU, XLA already
all-gathers float32 FSDP params as bfloat16 and reduces the same gradients either way.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import gin
import jax
import jax.numpy as jnp
import optax


class Optimizer(NamedTuple):
  """An optax transformation, its learning-rate schedule (for metrics), the dtype its
  moment estimates are kept in, the dtype of its master copy of the params (None: the
  update is applied to the params themselves) and that of Adam's first moment (None: as
  `state_dtype`)."""

  tx: optax.GradientTransformation
  learning_rate: Callable
  state_dtype: jnp.dtype
  master_dtype: Optional[jnp.dtype] = None
  mu_dtype: Optional[jnp.dtype] = None


class MasterWeightsState(NamedTuple):
  """`master`: the params in the master dtype (sharded as the params); `inner`: the state of
  the transformation that updates them."""

  master: Any
  inner: Any


def cast_floating(tree: Any, dtype) -> Any:
  """Every floating leaf of `tree` in `dtype` (integer leaves as they are)."""
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def with_master_weights(inner: optax.GradientTransformation, master_dtype,
                        state_dtype) -> optax.GradientTransformation:
  """`inner` applied to a copy of the params in `master_dtype` kept in the state.

  `update` returns the update of the master copy; the new params are the new `state.master`
  cast to the params' dtypes (`apply_to_params`), not params + update, which in bfloat16 would
  round small updates away. `inner`'s state is initialised from the copy cast to
  `state_dtype` (the dtype of Adam's moments)."""

  def init(params):
    master = cast_floating(params, master_dtype)
    return MasterWeightsState(master=master,
                              inner=inner.init(cast_floating(master, state_dtype)))

  def update(grads, state, params=None):
    del params  # the update is computed on, and applied to, the master copy
    updates, inner_state = inner.update(cast_floating(grads, master_dtype), state.inner,
                                        state.master)
    master = optax.apply_updates(state.master, updates)
    return updates, MasterWeightsState(master=master, inner=inner_state)

  return optax.GradientTransformation(init, update)


def apply_to_params(optimizer: Optimizer, params: Any, updates: Any, opt_state: Any) -> Any:
  """The new params after `optimizer.tx.update` returned (`updates`, `opt_state`): the master
  copy cast to each param's dtype, or params + updates without one; dtypes kept."""
  if optimizer.master_dtype is not None:
    new = opt_state.master
  else:
    new = optax.apply_updates(params, updates)
  return jax.tree_util.tree_map(lambda n, p: n.astype(p.dtype), new, params)


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
                   state_dtype: str = "float32", mu_dtype: Optional[str] = None,
                   master_dtype: Optional[str] = None) -> Optimizer:
  """AdamW behind global-norm clipping.

  Args:
    learning_rate: a schedule or a constant; default `learning_rate_schedule()` (gin-bound).
    weight_decay: decoupled, applied to every parameter (as TRL / HF Trainer do by default
      except for biases and norms; Gemma has no biases, and eva's recipe uses 0).
    max_grad_norm: clip the global gradient norm to this (None: no clipping).
    state_dtype: dtype of Adam's first and second moments. float32 (the default) even when
      params are bfloat16; the train state is initialised from params cast to this dtype.
    mu_dtype: the first moment's dtype when it differs from `state_dtype`. "bfloat16" saves 2
      bytes a param and is safe for the first moment (each step moves it by 1 - b1 = 10%,
      far above bfloat16's 0.4% resolution); the second moment decays by 1 - b2 = 0.1% a
      step, which bfloat16 rounds away, so it stays in `state_dtype`.
    master_dtype: keep a copy of the params in this dtype in the optimizer state, update it
      and cast it back to the params' dtype each step (module docstring); for
      `make_policy_model.param_dtype = "bfloat16"` with "float32" here. None: no copy.
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
  mu = None if mu_dtype is None else jnp.dtype(mu_dtype)
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mu_dtype=dtype if mu is None else mu))
  tx = optax.chain(*parts)
  if master_dtype is None:
    return Optimizer(tx, schedule, dtype, mu_dtype=mu)
  master = jnp.dtype(master_dtype)
  if not jnp.issubdtype(master, jnp.floating):
    raise ValueError(f"make_optimizer: master_dtype must be a floating dtype such as "
                     f"'float32', got {master_dtype!r}.")
  return Optimizer(with_master_weights(tx, master, dtype), schedule, dtype, master, mu)

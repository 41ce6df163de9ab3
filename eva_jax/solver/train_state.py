"""The solver's train state (one pytree), its shardings, and the policy model's policies.

`TrainState(step, params, opt_state)` holds only arrays, so Orbax saves it as is and `jit`
donates it whole. Params are sharded by their logical axes (`eva_jax.parallel`); every
optimizer leaf that mirrors a param (Adam's moments) takes that param's sharding, the rest
(step counters) is replicated.

Dtype policy (gin: `make_policy_model`): params are *stored* in `param_dtype` (float32 by
default: updates of lr 5e-7 vanish in bfloat16 weights) and cast to `compute_dtype`
(bfloat16) for matmuls inside the model; log-softmax and losses run in float32; Adam's moments
are in `Optimizer.state_dtype` (float32). With bfloat16 params, `make_optimizer(master_dtype=
"float32")` keeps a float32 master copy in the optimizer state that the updates go to.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import optax

from eva_jax import parallel
from eva_jax.models.config import GemmaConfig
from eva_jax.models.transformer import Transformer
from eva_jax.solver.optimizer import Optimizer, cast_floating

# Example input for shape-only model inits (the params do not depend on it).
_EXAMPLE_IDS = jax.ShapeDtypeStruct((1, 8), jnp.int32)


@flax.struct.dataclass
class TrainState:
  """step: int32 []; params: the model's param tree; opt_state: the optax state."""

  step: jax.Array
  params: Any
  opt_state: Any


@gin.configurable
def make_policy_model(config: GemmaConfig, remat: str = "full", compute_dtype: str = "bfloat16",
                      param_dtype: str = "float32",
                      scan_layers: Optional[bool] = True,
                      attention_impl: Optional[str] = None) -> Transformer:
  """The policy `Transformer` under the solver's remat and dtype policies.

  Args:
    config: the model config (its own dtype fields are replaced by the two below).
    remat: per-block rematerialisation: "none", "attention" (save everything but the
      attention scores and softmax, recomputed from q, k, v: the largest activations for a
      few percent more FLOPs), "full" (save only block inputs), "dots" (save matmul outputs
      without batch dims) or "dots_all".
    compute_dtype: matmul / activation dtype.
    param_dtype: storage dtype of params in the train state.
    scan_layers: compile the layers as one scan (`GemmaConfig.scan_layers`: one block, or one
      Gemma 2 (local, global) pair, compiled once; the params, and so the train state, are
      then stacked: `eva_jax.models.stack_layers`; checkpoints on disk and exports keep the
      per-layer tree, and the sampler decodes from an unrolled copy). True by default: the
      train step compiles several times faster and ran as fast on a CPU. False: one
      program per layer; None: the config's own setting.
    attention_impl: "xla" or "flash" (the fused Pallas kernel: no [B, heads, T, T] scores
      kept or recomputed; `GemmaConfig.attention_impl`); None: the config's own setting.
  """
  changes = dict(dtype=compute_dtype, param_dtype=param_dtype)
  if scan_layers is not None:
    changes["scan_layers"] = bool(scan_layers)
  if attention_impl is not None:
    changes["attention_impl"] = attention_impl
  if changes.get("attention_impl", config.attention_impl) == "flash" and (
      jax.default_backend() == "cpu"):
    logging.warning("make_policy_model: attention_impl='flash' on a CPU runs the kernels in "
                    "Pallas' interpreter, many times slower than 'xla' (it is meant for "
                    "tests); the kernels are for GPUs and TPUs.")
  return Transformer(config.replace(**changes), remat=remat)


def init_opt_state(optimizer: Optimizer, params: Any) -> Any:
  """Optimizer state for `params`, its moments in `optimizer.state_dtype` (and its master
  copy, if any, from `params` at their full precision)."""
  if optimizer.master_dtype is not None:
    return optimizer.tx.init(params)  # `with_master_weights` casts
  return optimizer.tx.init(cast_floating(params, optimizer.state_dtype))


def _check_master_dtype(model: nn.Module, optimizer: Optimizer) -> None:
  master = optimizer.master_dtype
  param = jnp.dtype(model.config.param_dtype)
  if master is not None and jnp.dtype(master).itemsize <= param.itemsize:
    raise ValueError(
        f"make_optimizer.master_dtype = {jnp.dtype(master).name!r} is no wider than the "
        f"params' own dtype ({param.name}): the master copy would keep nothing the params do "
        f"not. Store the params in bfloat16 (make_policy_model.param_dtype = 'bfloat16') or "
        f"drop master_dtype.")


def train_state_shardings(model: nn.Module, optimizer: Optimizer, mesh: Mesh,
                          rules=None) -> tuple[TrainState, TrainState]:
  """(NamedShardings, abstract ShapeDtypeStructs) of the train state, nothing allocated."""
  _check_master_dtype(model, optimizer)
  rules = parallel.logical_axis_rules() if rules is None else rules
  axes, abstract_params = parallel.params_logical_axes(model, _EXAMPLE_IDS)
  param_sh = parallel.logical_shardings(axes, mesh, rules, abstract_params)
  abstract_opt = jax.eval_shape(lambda p: init_opt_state(optimizer, p), abstract_params)
  replicated = NamedSharding(mesh, P())
  opt_sh = optax.tree_map_params(optimizer.tx, lambda _, sh: sh, abstract_opt, param_sh,
                                 transform_non_params=lambda _: replicated)
  shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=abstract_opt)
  return shardings, abstract


def create_train_state(model: nn.Module, optimizer: Optimizer, rng: jax.Array, mesh: Mesh,
                       rules=None, params: Optional[Any] = None) -> TrainState:
  """A fresh train state, built directly in its shardings.

  Args:
    rng: initialises params when `params` is None (the same key gives the same params on
      any mesh: JAX's partitionable threefry).
    params: existing params (e.g. from `from_pretrained`); cast to the model's param dtype and
      resharded as the train state wants (an optimizer's master copy is made from them as
      given, before the cast).
  """
  rules = parallel.logical_axis_rules() if rules is None else rules
  shardings, abstract = train_state_shardings(model, optimizer, mesh, rules)

  def init(key, given):
    if given is None:
      full = p = nn.unbox(model.init(key, jnp.ones(_EXAMPLE_IDS.shape, jnp.int32))["params"])
    else:
      full = jax.tree_util.tree_map(jnp.asarray, given)
      p = jax.tree_util.tree_map(lambda x, a: x.astype(a.dtype), full, abstract.params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=p,
                      opt_state=init_opt_state(optimizer, full))

  with parallel.with_mesh_rules(mesh, rules):
    return jax.jit(init, out_shardings=shardings)(rng, params)

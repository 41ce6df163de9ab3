"""Meshes, logical axis rules, and moving data between hosts and global arrays.

Conventions (t5x / MaxText style):

* A mesh has the axes `data`, `fsdp`, `tensor`. `mesh_shape` gives their sizes; one may be -1
  ("the rest of the devices").
* Every parameter and activation carries logical axis names (`batch, length, embed, mlp,
  heads, kv_heads, head_dim, vocab, cache_length`, and `layers` for the stacked dimension of
  scanned layers); `logical_axis_rules` maps them onto mesh axes. Rules are tried in order
  and a mesh axis is used at most once per array, so an activation [batch, length, embed]
  gets batch -> (data, fsdp) and leaves embed replicated, while a weight [vocab, embed] gets
  embed -> fsdp.
* Shardings are shape-aware: a mesh axis that does not divide a dimension is dropped for that
  dimension (e.g. one kv head under tensor=2 stays replicated) instead of failing to compile.
* Host code sees numpy. `host_to_global` turns each process's slice of a batch into one global
  array; `global_to_host` gathers a global array back into numpy on every process. Both are
  right for any `jax.process_count()`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("embed", "fsdp"),
    ("embed", None),
    ("length", None),
    ("cache_length", None),
    ("head_dim", None),
    # The stacked leading dimension of scanned layers (params and KV cache): never split, each
    # device holds every layer's share of its shard (`GemmaConfig.scan_layers`).
    ("layers", None),
)


@gin.configurable
def logical_axis_rules(rules: Optional[Sequence[tuple[str, Any]]] = None):
  """The logical -> mesh axis rules in force (gin-bindable, as t5x's)."""
  return tuple(tuple(r) for r in (DEFAULT_RULES if rules is None else rules))


@gin.configurable
def create_mesh(mesh_shape: Optional[Mapping[str, int]] = None,
                devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh over `devices` (default: all) with axes data, fsdp, tensor.

  Args:
    mesh_shape: sizes per axis, e.g. {"data": -1, "tensor": 2}; missing axes are 1 and one
      axis may be -1 for the remaining devices. Default: everything on `data`.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = {"data": -1, "fsdp": 1, "tensor": 1}
  if mesh_shape:
    unknown = set(mesh_shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"create_mesh: unknown mesh axes {sorted(unknown)}; the axes are "
                       f"{MESH_AXES}.")
    shape = {"data": 1, "fsdp": 1, "tensor": 1}
    shape.update({k: int(v) for k, v in mesh_shape.items()})
  free = [a for a, s in shape.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"create_mesh: at most one axis may be -1, got {dict(shape)}.")
  fixed = math.prod(s for s in shape.values() if s != -1)
  if free:
    if len(devices) % fixed:
      raise ValueError(f"create_mesh: {len(devices)} devices do not divide into {dict(shape)}.")
    shape[free[0]] = len(devices) // fixed
  if math.prod(shape.values()) != len(devices):
    raise ValueError(f"create_mesh: mesh {dict(shape)} needs {math.prod(shape.values())} "
                     f"devices but {len(devices)} are available; use -1 for one axis.")
  dims = tuple(shape[a] for a in MESH_AXES)
  try:
    grid = mesh_utils.create_device_mesh(dims, devices=devices)
  except (ValueError, AssertionError, NotImplementedError):
    grid = np.asarray(devices, dtype=object).reshape(dims)
  return Mesh(grid, MESH_AXES)


def _as_tuple(axes) -> tuple:
  if axes is None:
    return ()
  return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def logical_to_spec(logical_axes: Sequence[Optional[str]], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]], shape: Optional[Sequence[int]] = None) -> P:
  """PartitionSpec for one array from its logical axis names (shape-aware when `shape`)."""
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(logical_axes):
    chosen: Any = None
    if name is not None:
      for rule_name, mesh_axes in rules:
        if rule_name != name:
          continue
        axes = tuple(a for a in _as_tuple(mesh_axes) if mesh.shape.get(a, 1) > 1)
        if any(a in used for a in axes):
          continue
        if shape is not None and axes:
          # Keep the longest prefix of mesh axes that divides the dimension.
          while axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        chosen = axes
        break
    if chosen:
      used.update(chosen)
      spec.append(chosen[0] if len(chosen) == 1 else chosen)
    else:
      spec.append(None)
  return P(*spec)


def _is_axes(x) -> bool:
  return isinstance(x, (tuple, P)) and all(isinstance(a, (str, type(None))) for a in x)


def logical_shardings(logical_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]],
                      shapes: Any = None) -> Any:
  """NamedShardings for a tree of logical axis tuples (and, optionally, matching shapes)."""
  if shapes is None:
    return jax.tree_util.tree_map(lambda ax: NamedSharding(mesh, logical_to_spec(ax, mesh, rules)),
                                  logical_tree, is_leaf=_is_axes)
  return jax.tree_util.tree_map(
      lambda ax, s: NamedSharding(mesh, logical_to_spec(ax, mesh, rules, np.shape(s))),
      logical_tree, shapes, is_leaf=_is_axes)


def params_logical_axes(model: nn.Module, *init_args, **init_kwargs) -> tuple[Any, Any]:
  """(logical axes tree, abstract params tree) of `model.init(...)["params"]`, built with
  `jax.eval_shape`, so nothing is allocated."""
  boxed = jax.eval_shape(model.init, jax.random.key(0), *init_args, **init_kwargs)["params"]
  axes = nn.get_partition_spec(boxed)
  axes = jax.tree_util.tree_map(lambda s: tuple(s), axes, is_leaf=lambda x: isinstance(x, P))
  return axes, nn.unbox(boxed)


def params_shardings(model: nn.Module, mesh: Mesh, rules=None, *init_args, **init_kwargs):
  """NamedShardings for every param of `model`; `init_args` are example inputs for init."""
  rules = logical_axis_rules() if rules is None else rules
  axes, abstract = params_logical_axes(model, *init_args, **init_kwargs)
  return logical_shardings(axes, mesh, rules, abstract)


def init_params(model: nn.Module, rng: jax.Array, mesh: Mesh, rules=None, *init_args,
                **init_kwargs):
  """Initialises params directly in their shardings (no full copy on one device)."""
  shardings = params_shardings(model, mesh, rules, *init_args, **init_kwargs)

  def init(key):
    return nn.unbox(model.init(key, *init_args, **init_kwargs)["params"])

  with with_mesh_rules(mesh, rules):
    return jax.jit(init, out_shardings=shardings)(rng)


def replicated_over_batch(rules=None) -> tuple[tuple[str, Any], ...]:
  """`rules` with the batch's mesh axes taken out of every rule but `batch`'s own.

  Arrays laid out by the result are whole on every device that holds a different part of the
  batch and keep their other splits (e.g. heads over `tensor`): the sampler's decode layout
  for params, which then never gathers FSDP shards inside the decode loop.
  """
  rules = logical_axis_rules() if rules is None else rules
  batch_axes = set(next((_as_tuple(axes) for name, axes in rules if name == "batch"), ()))
  out = []
  for name, axes in rules:
    if name != "batch":
      kept = tuple(a for a in _as_tuple(axes) if a not in batch_axes)
      axes = kept[0] if len(kept) == 1 else (kept or None)
    out.append((name, axes))
  return tuple(out)


def mesh_platform(mesh: Mesh) -> str:
  """The platform the mesh's devices are on ("cpu", "gpu", "tpu"), for choices made when a
  program is built for them; the devices of a topology compiled ahead of time say theirs."""
  return mesh.devices.flat[0].platform


def batch_sharding(mesh: Mesh, ndim: int, rules=None) -> NamedSharding:
  """Sharding of a [batch, ...] array: batch over the data axes, the rest replicated."""
  rules = logical_axis_rules() if rules is None else rules
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh, rules))


def data_parallel_size(mesh: Mesh, rules=None) -> int:
  """How many ways the batch dimension is split under `rules`."""
  spec = batch_sharding(mesh, 1, rules).spec[0]
  return math.prod(mesh.shape[a] for a in _as_tuple(spec))


def host_to_global(local_tree: Any, mesh: Mesh, rules=None, shardings: Any = None) -> Any:
  """Process-local numpy arrays -> global jax arrays.

  Each process passes its own contiguous slice of the global batch along axis 0 (every
  process the same size); by default arrays are sharded [batch, ...] over the data axes.
  With one process the local arrays are the global arrays.
  """
  def convert(x, sharding=None):
    x = np.asarray(x)
    if sharding is None:
      sharding = batch_sharding(mesh, max(x.ndim, 1), rules)
    if x.ndim == 0:
      sharding = NamedSharding(mesh, P())
    return jax.make_array_from_process_local_data(sharding, x)

  if shardings is None:
    return jax.tree_util.tree_map(convert, local_tree)
  return jax.tree_util.tree_map(convert, local_tree, shardings)


def global_to_host(tree: Any) -> Any:
  """Global jax arrays -> full numpy arrays on every process."""
  def gather(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree_util.tree_map(gather, tree)


def process_slice(global_size: int) -> slice:
  """This process's contiguous slice of a global batch of `global_size` rows."""
  n, i = jax.process_count(), jax.process_index()
  if global_size % n:
    raise ValueError(f"A global batch of {global_size} rows does not split evenly over "
                     f"{n} processes; make it a multiple of {n}.")
  per = global_size // n
  return slice(i * per, (i + 1) * per)


@contextlib.contextmanager
def with_mesh_rules(mesh: Mesh, rules=None) -> Iterator[Mesh]:
  """Activates `mesh` and the logical rules, so that logical constraints inside jitted code
  resolve to mesh axes."""
  rules = logical_axis_rules() if rules is None else rules
  # `jax.set_mesh` replaces the deprecated `with mesh:` (jax >= 0.7 has it).
  mesh_ctx = jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh
  with mesh_ctx, nn.logical_axis_rules(rules):
    yield mesh


def broadcast_from_process0(obj: Any) -> Any:
  """Process 0's `obj` (any picklable host value) on every process; `obj` itself with one
  process. For host-side results that only process 0 computes (e.g. answers of an HTTP
  server, which every process asking would multiply and could make differ)."""
  if jax.process_count() == 1:
    return obj
  import pickle  # pylint: disable=import-outside-toplevel
  payload = np.frombuffer(pickle.dumps(obj), np.uint8) if jax.process_index() == 0 else None
  # Two broadcasts: the length (so every process holds a buffer of the right shape), then
  # the bytes.
  size = int(multihost_utils.broadcast_one_to_all(
      np.int64(payload.size if payload is not None else 0)))
  buf = payload if payload is not None else np.zeros((size,), np.uint8)
  data = multihost_utils.broadcast_one_to_all(buf)
  return pickle.loads(np.asarray(data, np.uint8).tobytes())


class _Raised(NamedTuple):
  error: BaseException


def run_on_process0(fn: Callable[[], Any]) -> Any:
  """`fn()` computed on process 0 only, its result returned on every process. An exception
  raised by `fn` on process 0 is raised on every process too, so that no process waits
  forever for a result that will not come."""
  if jax.process_count() == 1:
    return fn()
  out = None
  if jax.process_index() == 0:
    try:
      out = fn()
    except Exception as e:  # pylint: disable=broad-except
      out = _Raised(e)
  out = broadcast_from_process0(out)
  if isinstance(out, _Raised):
    raise out.error
  return out

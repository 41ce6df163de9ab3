"""`from_pretrained`: a Gemma checkpoint folder -> (model, params sharded on a mesh).

Two formats, told apart by the folder's content:

* HF transformers: `config.json` + `model.safetensors` (or shards and
  `model.safetensors.index.json`), architectures Gemma / Gemma2 `*ForCausalLM` and
  `*ForSequenceClassification`. The config comes from config.json.
* Official Gemma Flax: an Orbax PyTree checkpoint (`_METADATA`, ...), any of the FLAT /
  STACKED / KAULDRON / NESTED layouts. It carries no config: pass `config=` (a name such as
  "gemma2_2b" or a GemmaConfig).

Params are built directly in their shardings: each HF tensor is memory-mapped and every
device's shard is read from the map by `jax.make_array_from_callback` (so each host reads only
what its devices hold); official checkpoints are restored by Orbax into shardings. Nothing
builds the whole model on one device first.

Scanned models (`scan_layers=True`, see `transformer.stack_layers`): checkpoints hold the
per-layer tree, and the stacked params are built as directly. HF: each device's shard of a
stacked leaf [R, ...] is read from the R layers' memory maps (`_StackedLeaf`), so nothing but
the final stacked arrays is ever placed. Official: Orbax restores the per-layer arrays into
their shardings, then each leaf is stacked by a jitted function whose output has the stacked
param's sharding and its R inputs are freed at once: the peak is the model plus one stacked
leaf (e.g. every layer's MLP gate), never a second model.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from eva_jax import parallel
from eva_jax.models import hf_checkpoint, official_checkpoint, transformer
from eva_jax.models.config import GemmaConfig, config_names, get_config
from eva_jax.models.transformer import GemmaForSequenceClassification, Transformer

PathLike = Union[str, os.PathLike]

HF, OFFICIAL = "hf", "official"


def detect_format(path: PathLike) -> str:
  """"hf" or "official" from a checkpoint folder's content.

  Raises:
    FileNotFoundError: the folder does not exist, or holds neither format.
  """
  p = hf_checkpoint.as_path(path)
  if not p.exists():
    raise FileNotFoundError(
        f"from_pretrained: {os.fspath(path)} does not exist; pass a folder holding an HF "
        f"checkpoint (config.json + model*.safetensors) or an official Gemma Flax (Orbax) "
        f"checkpoint.")
  if not p.is_dir():
    raise FileNotFoundError(
        f"from_pretrained: {os.fspath(path)} is a file; pass the folder that holds it "
        f"(config.json + model*.safetensors, or the Orbax checkpoint folder).")
  if (p / hf_checkpoint.CONFIG_FILE).exists():
    return HF
  if official_checkpoint.is_orbax_checkpoint(p):
    return OFFICIAL
  if (p / hf_checkpoint.INDEX_FILE).exists() or any(True for _ in p.glob("*.safetensors")):
    hf_checkpoint.read_hf_config(p)  # raises: config.json is missing
  found = sorted(c.name for c in p.iterdir())[:12]
  raise FileNotFoundError(
      f"from_pretrained: {os.fspath(path)} holds neither an HF checkpoint (config.json + "
      f"model*.safetensors) nor an Orbax checkpoint (_METADATA); found {found}.")


def _dtype_name(x) -> str:
  return jnp.dtype(x).name


def _place(leaf, sharding, dtype) -> jax.Array:
  """One param from a lazy host view, each device's shard read separately."""
  def shard(index):
    return np.array(leaf[index], dtype=dtype)  # reads only the slice; copies off the mmap
  return jax.make_array_from_callback(tuple(leaf.shape), sharding, shard)


def _tree_set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _tree_paths(tree, prefix=()):
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _tree_paths(v, prefix + (k,))
  else:
    yield prefix, tree


class _StackedLeaf(hf_checkpoint.Stacked):
  """A stacked param [R, ...] as lazy views of its R per-layer leaves (read per shard)."""

  def release(self):
    for part in self.parts:
      part.release()


def _scanned_leaves(leaves: Mapping[tuple, Any], config: GemmaConfig) -> dict[tuple, Any]:
  """{unrolled path: lazy leaf} -> {scanned path: lazy (stacked) leaf}."""
  out: dict[tuple, Any] = {}
  groups: dict[tuple, dict[int, Any]] = {}
  for path, leaf in leaves.items():
    if not path[0].startswith("layer_"):
      out[path] = leaf
      continue
    prefix, index = transformer.scanned_location(config, int(path[0][len("layer_"):]))
    if index is None:
      out[prefix + path[1:]] = leaf
    else:
      groups.setdefault(prefix + path[1:], {})[index] = leaf
  for path, parts in groups.items():
    out[path] = _StackedLeaf([parts[r] for r in range(len(parts))])
  return out


@functools.lru_cache(maxsize=None)
def _stack_fn(out_sharding):
  return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=out_sharding)


def _stack_on_devices(params: dict, config: GemmaConfig, shardings: Mapping) -> dict:
  """Unrolled params (jax arrays, any sharding) -> the stacked tree in `shardings`, leaf by
  leaf, each leaf's per-layer arrays deleted as soon as it is stacked."""
  out: dict = {k: v for k, v in params.items() if not k.startswith("layer_")}
  groups: dict[tuple, dict[int, jax.Array]] = {}
  for path, leaf in _tree_paths(params):
    if not path[0].startswith("layer_"):
      continue
    prefix, index = transformer.scanned_location(config, int(path[0][len("layer_"):]))
    if index is None:
      _tree_set(out, prefix + path[1:], leaf)
    else:
      groups.setdefault(prefix + path[1:], {})[index] = leaf
  for path, parts in groups.items():
    sharding = shardings
    for key in path:
      sharding = sharding[key]
    xs = [parts[r] for r in range(len(parts))]
    _tree_set(out, path, _stack_fn(sharding)(*xs))
    for x in xs:
      x.delete()
  return out


def pretrained_config(path: PathLike, *, config: Union[str, GemmaConfig, None] = None
                      ) -> GemmaConfig:
  """The model config of a checkpoint folder, without reading its weights (HF: from
  config.json, or `config` when given; official: `config`, required as in `from_pretrained`).
  """
  fmt = detect_format(path)
  if fmt == HF:
    hf = hf_checkpoint.read_hf_config(path)
    source = os.fspath(hf_checkpoint.as_path(path) / hf_checkpoint.CONFIG_FILE)
    cfg, _ = hf_checkpoint.config_from_hf(hf, source)
    return cfg if config is None else get_config(config).replace(num_labels=cfg.num_labels)
  if config is None:
    raise ValueError(
        f"{os.fspath(path)} is an official Gemma Flax (Orbax) checkpoint, which carries no "
        f"model config; pass its config, e.g. 'gemma2_2b' (one of {', '.join(config_names())}).")
  return get_config(config)


def from_pretrained(path: PathLike, *, config: Union[str, GemmaConfig, None] = None,
                    mesh: Optional[Mesh] = None, rules=None, param_dtype: Any = None,
                    dtype: Any = None, remat: str = "none",
                    scan_layers: Optional[bool] = None) -> tuple[nn.Module, dict]:
  """Loads a Gemma checkpoint (HF or official Flax) as (model, params).

  `model.apply({"params": params}, input_ids[B, T] int32)` gives float32 logits [B, T, V] (a
  causal LM) or scores [B] (a sequence classifier with one label; [B, num_labels] otherwise).

  Args:
    path: a local or `gs://` folder; see the module docstring for the two formats.
    config: official checkpoints: the model's config (required), a name from
      `config_names()` or a GemmaConfig. HF checkpoints: optional; replaces the config read
      from config.json (the tensors are checked against it).
    mesh: where params go; default: all devices on `data` (params replicated).
    rules: logical axis rules (default `parallel.logical_axis_rules()`).
    param_dtype: cast params to this dtype while loading; default: the stored dtype.
    dtype: compute dtype of the model; default: official: the config's `dtype`; HF: the
      params' dtype (float32 checkpoints compute in float32, bfloat16 ones in bfloat16).
    remat: rematerialisation policy of the model ("none", "full", "dots", "dots_all").
    scan_layers: build a scanned model (`GemmaConfig.scan_layers`) and return its stacked
      params (`transformer.stack_layers` of the checkpoint's tree, placed directly; see the
      module docstring); None: the config's own setting (from `config` when given, else
      off).

  Returns:
    (Transformer or GemmaForSequenceClassification, params placed in the mesh's shardings).

  Raises:
    FileNotFoundError: the folder, config.json or a shard the index names is missing.
    ValueError: an unknown architecture, a missing, unexpected or wrongly shaped tensor, or an
      official checkpoint without `config`.
  """
  fmt = detect_format(path)
  mesh = parallel.create_mesh() if mesh is None else mesh
  rules = parallel.logical_axis_rules() if rules is None else rules
  example = jnp.ones((1, 1), jnp.int32)

  if fmt == HF:
    hf = hf_checkpoint.read_hf_config(path)
    source = os.fspath(hf_checkpoint.as_path(path) / hf_checkpoint.CONFIG_FILE)
    cfg, arch = hf_checkpoint.config_from_hf(hf, source)
    classifier = hf_checkpoint.ARCHITECTURES[arch][1]
    if config is not None:
      cfg = get_config(config).replace(num_labels=cfg.num_labels) if classifier else \
          get_config(config)
    ckpt = hf_checkpoint.SafetensorsCheckpoint(path)
    leaves, stored = hf_checkpoint.hf_leaves(ckpt, cfg, classifier)
    pdtype = _dtype_name(param_dtype or stored)
    cfg = cfg.replace(param_dtype=pdtype, dtype=_dtype_name(dtype or pdtype))
    if scan_layers is not None:
      cfg = cfg.replace(scan_layers=bool(scan_layers))
    if cfg.scan_layers:
      leaves = _scanned_leaves(leaves, cfg)
    model_cls = GemmaForSequenceClassification if classifier else Transformer
    model = model_cls(cfg, remat=remat)
    shardings = parallel.params_shardings(model, mesh, rules, example)
    params: dict = {}
    for p, sharding in _tree_paths(shardings):
      leaf = leaves[p]
      _tree_set(params, p, _place(leaf, sharding, pdtype))
      leaf.release()  # remote files: drop the bytes once the leaf is on its devices
    return model, params

  if config is None:
    raise ValueError(
        f"from_pretrained: {os.fspath(path)} is an official Gemma Flax (Orbax) checkpoint, "
        f"which carries no model config; pass config=, e.g. config='gemma2_2b' (one of "
        f"{', '.join(config_names())}) or a GemmaConfig.")
  cfg = get_config(config)
  if dtype is not None:
    cfg = cfg.replace(dtype=_dtype_name(dtype))
  if param_dtype is not None:
    cfg = cfg.replace(param_dtype=_dtype_name(param_dtype))
  if scan_layers is not None:
    cfg = cfg.replace(scan_layers=bool(scan_layers))
  model = Transformer(cfg, remat=remat)
  shardings = parallel.params_shardings(model, mesh, rules, example)
  unrolled = cfg.replace(scan_layers=False)
  unrolled_shardings = (parallel.params_shardings(Transformer(unrolled), mesh, rules, example)
                        if cfg.scan_layers else shardings)
  params = official_checkpoint.load_official(path, unrolled, unrolled_shardings, mesh, rules,
                                             param_dtype)
  if cfg.scan_layers:
    params = _stack_on_devices(params, cfg, shardings)
  if param_dtype is None:
    stored = jax.tree_util.tree_leaves(params)[0].dtype
    model = Transformer(cfg.replace(param_dtype=_dtype_name(stored)), remat=remat)
  return model, params

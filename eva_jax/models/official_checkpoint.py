"""Official Gemma Flax checkpoints (Orbax PyTree) <-> eva_jax Gemma params.

The released Gemma 1 / Gemma 2 Flax checkpoints are Orbax PyTree checkpoints in one of four
layouts (../shared/reference/gemma_checkpoint_formats.md, section 3), detected in this order:

* STACKED: keys `transformer/stacked_layers/attention_type_{j}/...`, each leaf holding
  [L / P, ...] (P = number of attention types); layer = slice * P + j.
* FLAT (the released files): every key starts with `transformer/`, e.g.
  `transformer/layer_0/attn/q_einsum` -> {"w": [N, D, H]}; every leaf sits one level under its
  key, the MLP's included (`transformer/layer_0/mlp/linear` -> {"w"}).
* KAULDRON: exactly `collections, opt_state, params, step`; the model is under `params`.
* NESTED: anything else: the `model.init` tree (`layer_0/mlp/linear` without a `w`).

Our tree is NESTED with two normalisations (see transformer.py): a fused `qkv_einsum`
[3, N, D, H] (multi-head checkpoints) is split into `q_einsum` + `kv_einsum`, a transposed
gate [2, F, D] (9B / 27B) becomes [2, D, F], and embedding rows past `config.vocab_size`
(256128 -> 256000) are dropped. Arrays are restored straight into shardings on the mesh
(Orbax restore args), and the few that need a conversion are converted by a jitted function
whose output has the param's final sharding, so no host or device ever holds the whole model.

`save_official` writes the FLAT layout (or the others), which lets tests build official-format
checkpoints without the gemma library.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh, NamedSharding

from eva_jax import parallel
from eva_jax.models import transformer
from eva_jax.models.config import GemmaConfig

PathLike = Union[str, os.PathLike]

FLAT, NESTED, STACKED, KAULDRON = "flat", "nested", "stacked", "kauldron"
LAYOUTS = (FLAT, NESTED, STACKED, KAULDRON)
_KAULDRON_KEYS = {"collections", "opt_state", "params", "step"}
_ROOT = "transformer"
_MLP_LEAVES = ("gating_einsum", "linear")  # the leaves that lose their "w" in NESTED
_STACKED_RE = re.compile(r"^transformer/stacked_layers/attention_type_(\d+)/(.*)$")

# Logical axes of each official leaf as stored (our layout where it is the same).
_STORED_AXES = {
    "q_einsum": ("heads", "embed", "head_dim"),
    "kv_einsum": (None, "kv_heads", "embed", "head_dim"),
    "qkv_einsum": (None, "heads", "embed", "head_dim"),
    "attn_vec_einsum": ("heads", "head_dim", "embed"),
    "gating_einsum": (None, "embed", "mlp"),
    "gating_einsum_t": (None, "mlp", "embed"),
    "linear": ("mlp", "embed"),
    "scale": ("embed",),
    "input_embedding": ("vocab", "embed"),
}


def _abs(path: PathLike) -> epath.Path:
  s = os.fspath(path)
  return epath.Path(s if "://" in s else os.path.abspath(s))


def is_orbax_checkpoint(path: PathLike) -> bool:
  """Whether `path` looks like an Orbax checkpoint folder (here or in a `default/` child)."""
  p = _abs(path)
  markers = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")
  return any((p / m).exists() for m in markers) or (p / "default" / "_METADATA").exists()


def _item_dir(path: PathLike) -> epath.Path:
  p = _abs(path)
  # Kauldron writes the params item into `default/` when item metadata is missing.
  if not (p / "_METADATA").exists() and (p / "default" / "_METADATA").exists():
    return p / "default"
  return p


def read_tree_metadata(path: PathLike) -> dict:
  """The checkpoint's tree with ArrayMetadata (shape, dtype) leaves; nothing is read."""
  directory = _item_dir(path)
  try:
    md = ocp.PyTreeCheckpointer().metadata(directory)
  except Exception as e:  # Orbax raises many types for unreadable folders.
    raise ValueError(f"{directory} is not a readable Orbax PyTree checkpoint ({e}); an "
                     f"official Gemma Flax checkpoint is the folder holding _METADATA.") from e
  md = getattr(md, "item_metadata", md)
  md = getattr(md, "tree", md)
  if not isinstance(md, Mapping):
    raise ValueError(f"{directory}: unexpected Orbax metadata {type(md).__name__}; expected a "
                     f"tree of arrays.")
  return dict(md)


def detect_layout(tree: Mapping[str, Any]) -> str:
  """FLAT / NESTED / STACKED / KAULDRON from the top-level keys, in the fact sheet's order."""
  keys = list(tree)
  if any(k.startswith(f"{_ROOT}/stacked_layers") for k in keys):
    return STACKED
  if keys and all(k.startswith(f"{_ROOT}/") or k.startswith("SigLiPFromPatches_0/")
                  for k in keys):
    return FLAT
  if set(keys) == _KAULDRON_KEYS:
    return KAULDRON
  return NESTED


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _flat_key_to_nested(key: str, leaf: str) -> tuple[str, ...]:
  parts = tuple(key.split("/")[1:])
  if parts and parts[-1] in _MLP_LEAVES and leaf == "w":
    return parts
  return parts + (leaf,)


def _sources(tree: Mapping, layout: str) -> dict[tuple[str, ...], tuple[tuple, Optional[int]]]:
  """{official NESTED path: (path in the checkpoint tree, index along a stacked axis)}."""
  out: dict[tuple[str, ...], tuple[tuple, Optional[int]]] = {}
  if layout == KAULDRON:
    return {p: (("params",) + p, None) for p in _flatten(tree["params"])}
  if layout == NESTED:
    return {p: (p, None) for p in _flatten(tree)}
  stacked_types = set()
  for key in tree:
    m = _STACKED_RE.match(key)
    if m:
      stacked_types.add(int(m.group(1)))
  pattern = len(stacked_types)
  for key, sub in tree.items():
    if not key.startswith(f"{_ROOT}/") or not isinstance(sub, Mapping):
      continue  # e.g. the vision encoder of multimodal checkpoints
    m = _STACKED_RE.match(key)
    for leaf, meta in sub.items():
      if m:
        j, rest = int(m.group(1)), m.group(2)
        nested = _flat_key_to_nested(f"{_ROOT}/{rest}", leaf)
        for s in range(meta.shape[0]):
          out[(f"layer_{s * pattern + j}",) + nested] = ((key, leaf), s)
      else:
        out[_flat_key_to_nested(key, leaf)] = ((key, leaf), None)
  return out


def _display(ckpt_path: tuple, index: Optional[int]) -> str:
  if len(ckpt_path) == 2 and "/" in ckpt_path[0]:
    name = f"{ckpt_path[0]}.{ckpt_path[1]}"  # how Orbax names FLAT arrays
  else:
    name = "/".join(str(p) for p in ckpt_path)
  return name if index is None else f"{name}[{index}]"


class _Plan:
  """Which stored arrays make each of our params, and how."""

  def __init__(self, directory, tree, layout, config: GemmaConfig):
    self.directory, self.tree, self.layout, self.config = directory, tree, layout, config
    self.src = _sources(tree, layout)
    self.meta = {p: _get(tree, cp) for p, (cp, _) in self.src.items()}
    self.used: set[tuple] = set()

  def shape(self, path):
    shape = tuple(self.meta[path].shape)
    return shape[1:] if self.src[path][1] is not None else shape

  def name(self, path):
    return _display(*self.src[path])

  def need(self, path, shapes: Sequence[tuple], what: str):
    """Checks that `path` exists with one of `shapes`; returns the shape found."""
    if path not in self.src:
      raise ValueError(f"{self.directory}: the {self.layout.upper()} checkpoint has no "
                       f"{_describe(path, self.layout)} ({what}); check that config matches "
                       f"the checkpoint (layers: {self.config.num_layers}).")
    shape = self.shape(path)
    if shape not in [tuple(s) for s in shapes]:
      raise ValueError(f"{self.directory}: {self.name(path)} has shape {list(shape)}, expected "
                       f"{' or '.join(str(list(s)) for s in shapes)} for {what} from config.")
    self.used.add(path)
    return shape


def _describe(path: tuple, layout: str) -> str:
  if layout == FLAT or layout == STACKED:
    key = "/".join((_ROOT,) + path[:-1]) if path[-1] not in _MLP_LEAVES else \
        "/".join((_ROOT,) + path)
    leaf = path[-1] if path[-1] not in _MLP_LEAVES else "w"
    return f"{key}.{leaf}"
  return "/".join(path)


def _get(tree: Mapping, path: Sequence) -> Any:
  for k in path:
    tree = tree[k]
  return tree


# Conversions, each jitted once per (shape, sharding): the output lands in the param's sharding.
def _ident(x):
  return x


def _q_of_qkv(x):
  return x[0]


def _kv_of_qkv(x):
  return x[1:]


def _untranspose(x):
  return jnp.swapaxes(x, 1, 2)


@functools.lru_cache(maxsize=None)
def _jitted(fn, out_sharding, static_rows: Optional[int] = None, indexed: bool = False):
  """`fn` jitted with its output in `out_sharding`; `indexed`: applied to x[i] (a STACKED
  slice, i traced so that every slice shares one program); `static_rows`: x[:rows]."""
  if static_rows is not None:
    return jax.jit(lambda x: fn(x[:static_rows]), out_shardings=out_sharding)
  if indexed:
    return jax.jit(lambda x, i: fn(x[i]), out_shardings=out_sharding)
  return jax.jit(fn, out_shardings=out_sharding)


def load_official(path: PathLike, config: GemmaConfig, shardings: Mapping,
                  mesh: Mesh, rules=None, param_dtype: Any = None) -> dict:
  """Restores an official Gemma Flax checkpoint into our param tree, sharded.

  Args:
    path: the checkpoint folder (the one holding `_METADATA`; local or `gs://`).
    config: the model's config (the checkpoint carries none).
    shardings: NamedShardings of every param of our model (`parallel.params_shardings`).
    mesh: the mesh `shardings` live on (intermediate arrays are sharded on it too).
    rules: logical axis rules (default `parallel.logical_axis_rules()`).
    param_dtype: cast params to this dtype; default: keep the stored dtype.

  Returns:
    Our NESTED params (q_einsum + kv_einsum, gate [2, D, F], `config.vocab_size` rows).

  Raises:
    ValueError: a param is missing, has an unexpected shape, or the checkpoint holds layers
      the config does not have.
  """
  cfg = config
  rules = parallel.logical_axis_rules() if rules is None else rules
  directory = _item_dir(path)
  tree = read_tree_metadata(directory)
  layout = detect_layout(tree)
  plan = _Plan(directory, tree, layout, cfg)
  v, d, f, n, k, h = (cfg.vocab_size, cfg.embed_dim, cfg.hidden_dim, cfg.num_heads,
                      cfg.num_kv_heads, cfg.head_dim)

  # steps: (our path, stored path, conversion, stored logical axes, static rows)
  steps: list[tuple[tuple, tuple, Any, tuple, Optional[int]]] = []
  emb = ("embedder", "input_embedding")
  if emb not in plan.src:
    plan.need(emb, [(v, d)], "the embedding")
  rows = plan.shape(emb)[0]
  if rows < v or plan.shape(emb)[1:] != (d,):
    raise ValueError(f"{directory}: {plan.name(emb)} has shape {list(plan.shape(emb))}, "
                     f"expected [>= {v}, {d}] (rows past config.vocab_size={v} are dropped).")
  plan.used.add(emb)
  steps.append((emb, emb, _ident, _STORED_AXES["input_embedding"], v if rows > v else None))
  steps.append((("final_norm", "scale"), ("final_norm", "scale"), _ident,
                _STORED_AXES["scale"], None))
  plan.need(("final_norm", "scale"), [(d,)], "the final norm")
  for i in range(cfg.num_layers):
    lay = f"layer_{i}"
    norms = ["pre_attention_norm", "pre_ffw_norm"]
    if cfg.use_post_attn_norm:
      norms.append("post_attention_norm")
    if cfg.use_post_ffw_norm:
      norms.append("post_ffw_norm")
    for norm in norms:
      p = (lay, norm, "scale")
      plan.need(p, [(d,)], f"layer {i}'s {norm}")
      steps.append((p, p, _ident, _STORED_AXES["scale"], None))
    qkv = (lay, "attn", "qkv_einsum", "w")
    if qkv in plan.src:
      # Multi-head checkpoints fuse q, k and v: [3, N, D, H] (only possible when K == N).
      plan.need(qkv, [(3, n, d, h)], f"layer {i}'s fused q/k/v (needs num_kv_heads == "
                                      f"num_heads = {n})")
      steps.append(((lay, "attn", "q_einsum"), qkv, _q_of_qkv, _STORED_AXES["qkv_einsum"], None))
      steps.append(((lay, "attn", "kv_einsum"), qkv, _kv_of_qkv, _STORED_AXES["qkv_einsum"],
                    None))
    else:
      q, kv = (lay, "attn", "q_einsum", "w"), (lay, "attn", "kv_einsum", "w")
      plan.need(q, [(n, d, h)], f"layer {i}'s queries")
      plan.need(kv, [(2, k, d, h)], f"layer {i}'s keys/values")
      steps.append(((lay, "attn", "q_einsum"), q, _ident, _STORED_AXES["q_einsum"], None))
      steps.append(((lay, "attn", "kv_einsum"), kv, _ident, _STORED_AXES["kv_einsum"], None))
    o = (lay, "attn", "attn_vec_einsum", "w")
    plan.need(o, [(n, h, d)], f"layer {i}'s attention output")
    steps.append(((lay, "attn", "attn_vec_einsum"), o, _ident, _STORED_AXES["attn_vec_einsum"],
                  None))
    g = (lay, "mlp", "gating_einsum")
    # Gemma 2 9B / 27B store the gate as [2, F, D]; with D == F the two cannot be told apart
    # and [2, D, F] is assumed.
    gshape = plan.need(g, [(2, d, f), (2, f, d)], f"layer {i}'s MLP gate")
    if gshape == (2, d, f):
      steps.append(((lay, "mlp", "gating_einsum"), g, _ident, _STORED_AXES["gating_einsum"], None))
    else:
      steps.append(((lay, "mlp", "gating_einsum"), g, _untranspose,
                    _STORED_AXES["gating_einsum_t"], None))
    lin = (lay, "mlp", "linear")
    plan.need(lin, [(f, d)], f"layer {i}'s MLP output")
    steps.append(((lay, "mlp", "linear"), lin, _ident, _STORED_AXES["linear"], None))

  unused = sorted(set(plan.src) - plan.used)
  if unused:
    raise ValueError(f"{directory}: {plan.name(unused[0])} is not part of the model the config "
                     f"describes ({len(unused)} unexpected arrays in all); check num_layers "
                     f"({cfg.num_layers}) and the norms of the config.")

  # Restore args: an array whose stored form is our form is restored straight into its final
  # sharding; the others into a sharding of their stored shape, then converted.
  restore_args: dict = {}
  direct: dict[tuple, bool] = {}
  for ours, stored, fn, axes, static_rows in steps:
    cpath, index = plan.src[stored]
    target = _get(shardings, ours)
    stored_shape = tuple(plan.meta[stored].shape)
    is_direct = fn is _ident and index is None and static_rows is None
    direct[ours] = is_direct
    if is_direct:
      sharding = target
    else:
      if index is not None:
        axes = (None,) + tuple(axes)
      sharding = NamedSharding(mesh, parallel.logical_to_spec(axes, mesh, rules, stored_shape))
    node = restore_args
    for key in cpath[:-1]:
      node = node.setdefault(key, {})
    if cpath[-1] not in node:
      node[cpath[-1]] = ocp.ArrayRestoreArgs(
          sharding=sharding, dtype=None if param_dtype is None else jnp.dtype(param_dtype))
  restored = _restore(directory, restore_args)

  # Stored arrays that needed a conversion are freed as soon as their last param is built, so
  # the peak is one stored array above the final params, not a second model.
  uses: dict[tuple, int] = {}
  for ours, stored, *_ in steps:
    if not direct[ours]:
      uses[plan.src[stored][0]] = uses.get(plan.src[stored][0], 0) + 1
  params: dict = {}
  for ours, stored, fn, _, static_rows in steps:
    cpath, index = plan.src[stored]
    x = _get(restored, cpath)
    target = _get(shardings, ours)
    if direct[ours]:
      y = x
    elif index is not None:
      y = _jitted(fn, target, indexed=True)(x, index)
    else:
      y = _jitted(fn, target, static_rows)(x)
    if not direct[ours]:
      uses[cpath] -= 1
      if not uses[cpath]:
        x.delete()
    node = params
    for key in ours[:-1]:
      node = node.setdefault(key, {})
    node[ours[-1]] = y
  return params


def _restore(directory: epath.Path, restore_args: dict) -> dict:
  # partial_restore: a Kauldron checkpoint's optimizer state and step are never read.
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    return ckptr.restore(directory, args=ocp.args.PyTreeRestore(
        item=restore_args, restore_args=restore_args, partial_restore=True))


# --------------------------------------------------------------------------------------------
# Export


def to_official(params: Mapping, config: GemmaConfig, *, fused_qkv: Optional[bool] = None,
                transposed_gating: bool = False, vocab_rows: Optional[int] = None) -> dict:
  """Our params -> the official NESTED tree (jax arrays; shardings follow the inputs).

  Args:
    params: our params, per layer or stacked (a scanned model's; unstacked here).
    fused_qkv: write `qkv_einsum` [3, N, D, H]; default: when K == N, as gemma does.
    transposed_gating: write the gate as [2, F, D] (Gemma 2 9B / 27B).
    vocab_rows: pad the embedding with zero rows to this many (256128 for released sizes).
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  cfg = config
  params = nn.unbox(params)
  if transformer.is_stacked(params):  # a scanned model's params: the per-layer tree
    params = transformer.unstack_layers(params, cfg)
  fused = cfg.num_kv_heads == cfg.num_heads if fused_qkv is None else fused_qkv
  if fused and cfg.num_kv_heads != cfg.num_heads:
    raise ValueError(f"to_official: a fused qkv_einsum needs num_kv_heads == num_heads, got "
                     f"{cfg.num_kv_heads} and {cfg.num_heads}.")
  emb = jnp.asarray(params["embedder"]["input_embedding"])
  if vocab_rows is not None:
    if vocab_rows < emb.shape[0]:
      raise ValueError(f"to_official: vocab_rows={vocab_rows} is less than the "
                       f"{emb.shape[0]} embedding rows.")
    emb = jnp.pad(emb, ((0, vocab_rows - emb.shape[0]), (0, 0)))
  out: dict = {"embedder": {"input_embedding": emb},
               "final_norm": {"scale": params["final_norm"]["scale"]}}
  for i in range(cfg.num_layers):
    src = params[f"layer_{i}"]
    norms = ["pre_attention_norm", "pre_ffw_norm"]
    norms += ["post_attention_norm"] if cfg.use_post_attn_norm else []
    norms += ["post_ffw_norm"] if cfg.use_post_ffw_norm else []
    layer = {name: {"scale": src[name]["scale"]} for name in norms}
    attn = src["attn"]
    if fused:
      layer["attn"] = {"qkv_einsum": {"w": jnp.concatenate(
          [jnp.asarray(attn["q_einsum"])[None], jnp.asarray(attn["kv_einsum"])], axis=0)}}
    else:
      layer["attn"] = {"q_einsum": {"w": attn["q_einsum"]},
                       "kv_einsum": {"w": attn["kv_einsum"]}}
    layer["attn"]["attn_vec_einsum"] = {"w": attn["attn_vec_einsum"]}
    gating = src["mlp"]["gating_einsum"]
    if transposed_gating:
      gating = jnp.swapaxes(jnp.asarray(gating), 1, 2)
    layer["mlp"] = {"gating_einsum": gating, "linear": src["mlp"]["linear"]}
    out[f"layer_{i}"] = layer
  return out


def _to_flat(nested: Mapping) -> dict:
  flat: dict = {}
  for path, x in _flatten(nested).items():
    if path[-1] in _MLP_LEAVES:
      flat.setdefault("/".join((_ROOT,) + path), {})["w"] = x
    else:
      flat.setdefault("/".join((_ROOT,) + path[:-1]), {})[path[-1]] = x
  return flat


def _to_stacked(nested: Mapping, config: GemmaConfig) -> dict:
  types = list(dict.fromkeys(config.attention_types))
  pattern = len(types)
  if config.num_layers % pattern or any(
      config.attention_types[i] != types[i % pattern] for i in range(config.num_layers)):
    raise ValueError(f"save_official: the STACKED layout needs a repeating attention pattern, "
                     f"got {config.attention_types}.")
  flat = _to_flat({k: v for k, v in nested.items() if not k.startswith("layer_")})
  layer_flat = {i: _to_flat(nested[f"layer_{i}"]) for i in range(config.num_layers)}
  for j in range(pattern):
    for key in layer_flat[0]:
      rest = key[len(_ROOT) + 1:]
      skey = f"{_ROOT}/stacked_layers/attention_type_{j}/{rest}"
      for leaf in layer_flat[0][key]:
        parts = [layer_flat[i][key][leaf] for i in range(j, config.num_layers, pattern)]
        flat.setdefault(skey, {})[leaf] = jnp.stack([jnp.asarray(p) for p in parts])
  return flat


def save_official(path: PathLike, params: Mapping, config: GemmaConfig, *, layout: str = FLAT,
                  fused_qkv: Optional[bool] = None, transposed_gating: bool = False,
                  vocab_rows: Optional[int] = None, force: bool = False) -> None:
  """Writes params as an official Gemma Flax checkpoint (Orbax PyTree).

  FLAT is the layout of the released checkpoints; NESTED, STACKED and KAULDRON exist so that
  their detection can be tested. With several JAX processes, every process calls this.

  Args:
    path: the checkpoint folder (must not exist unless `force`).
    params: our params (jax or numpy arrays; a scanned model's stacked tree is unstacked).
    config: the model's config.
    layout: one of "flat", "nested", "stacked", "kauldron".
    fused_qkv / transposed_gating / vocab_rows: see `to_official`.
    force: overwrite an existing folder.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"save_official: unknown layout {layout!r}; use one of {LAYOUTS}.")
  nested = to_official(params, config, fused_qkv=fused_qkv,
                       transposed_gating=transposed_gating, vocab_rows=vocab_rows)
  if layout == FLAT:
    tree = _to_flat(nested)
  elif layout == STACKED:
    tree = _to_stacked(nested, config)
  elif layout == KAULDRON:
    tree = {"params": nested, "opt_state": {"count": np.zeros((), np.int32)},
            "collections": {"unused": np.zeros((), np.int32)}, "step": np.zeros((), np.int64)}
  else:
    tree = nested
  ocp.PyTreeCheckpointer().save(_abs(path), tree, force=force)

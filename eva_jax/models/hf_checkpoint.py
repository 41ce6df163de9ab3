"""HF transformers checkpoints (config.json + safetensors) <-> eva_jax Gemma params.

Reading is lazy: every safetensors tensor is a memory map of its file (a ranged read for
`gs://` and other remote paths), and the reshapes and transposes that turn HF tensors into our
tree (the official Gemma NESTED layout, see transformer.py) are numpy *views* of those maps, so
indexing one shard of a parameter reads only that shard's bytes. `pretrained.from_pretrained`
places each leaf straight into its sharding from these views.

Tensor mapping (N heads, K kv heads, H head_dim, D width, F MLP width; see
../shared/reference/gemma_checkpoint_formats.md, section 4):

| ours (NESTED)                          | HF (`model.` prefix)                          |
|----------------------------------------|-----------------------------------------------|
| embedder/input_embedding [V, D]        | embed_tokens.weight [V, D] (lm_head tied)     |
| layer_i/attn/q_einsum [N, D, H]        | layers.i.self_attn.q_proj.weight [N*H, D]     |
| layer_i/attn/kv_einsum [2, K, D, H]    | k_proj.weight, v_proj.weight [K*H, D]         |
| layer_i/attn/attn_vec_einsum [N, H, D] | o_proj.weight [D, N*H]                        |
| layer_i/mlp/gating_einsum [2, D, F]    | mlp.gate_proj.weight, mlp.up_proj.weight [F, D]|
| layer_i/mlp/linear [F, D]              | mlp.down_proj.weight [D, F]                   |
| layer_i/pre_attention_norm/scale       | input_layernorm.weight                        |
| layer_i/post_attention_norm/scale      | post_attention_layernorm.weight (Gemma 2)     |
| layer_i/pre_ffw_norm/scale             | Gemma 2: pre_feedforward_layernorm.weight;    |
|                                        | Gemma 1: post_attention_layernorm.weight      |
| layer_i/post_ffw_norm/scale            | post_feedforward_layernorm.weight (Gemma 2)   |
| final_norm/scale                       | norm.weight                                   |
| score [D, num_labels] (classifier)     | score.weight [num_labels, D] (no prefix)      |

Every conversion is a reshape, transpose or stack, so HF -> eva_jax -> HF is bit-exact when
the dtype is kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from eva_jax.models import transformer
from eva_jax.models.config import GLOBAL, LOCAL, GemmaConfig

PathLike = Union[str, os.PathLike]

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Architecture -> (HF model_type, is a sequence classifier).
ARCHITECTURES = {
    "GemmaForCausalLM": ("gemma", False),
    "Gemma2ForCausalLM": ("gemma2", False),
    "GemmaForSequenceClassification": ("gemma", True),
    "Gemma2ForSequenceClassification": ("gemma2", True),
}

# HF's defaults for fields a config.json may omit (transformers' GemmaConfig / Gemma2Config),
# so a sparse config.json means here what it means to transformers.
_HF_DEFAULTS = {
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                  head_dim=256, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1,
                  bos_token_id=2, tie_word_embeddings=True),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1,
                   bos_token_id=2, tie_word_embeddings=True, query_pre_attn_scalar=256,
                   sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
}

# GELU variants that are the tanh approximation Gemma uses. Gemma 1's legacy "gelu" means the
# tanh approximation too (transformers rewrites it); for Gemma 2 "gelu" is the exact erf GELU.
_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new")

_LAYER_TYPES = {"sliding_attention": LOCAL, "full_attention": GLOBAL}

# Tensors a HF checkpoint may carry that our model does not need: the tied output matrix and
# the RoPE buffers old transformers versions saved.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NP_TO_ST = {v: k for k, v in _ST_DTYPES.items()}


# --------------------------------------------------------------------------------------------
# Paths


def as_path(path: PathLike) -> epath.Path:
  """A local or remote (`gs://...`) path; remote ones go through etils/fsspec."""
  return path if isinstance(path, epath.Path) else epath.Path(os.fspath(path))


def is_local(path: PathLike) -> bool:
  s = os.fspath(path)
  return "://" not in s or s.startswith("file://")


# --------------------------------------------------------------------------------------------
# Config


def read_hf_config(folder: PathLike) -> dict:
  """The parsed config.json of an HF checkpoint folder."""
  path = as_path(folder) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: an HF checkpoint folder needs config.json next to its "
        f"model*.safetensors files (write it with `save_pretrained` or `save_hf`).")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); re-export the checkpoint.") from e


def _architecture(hf: Mapping[str, Any], source: str) -> str:
  archs = hf.get("architectures") or []
  if not archs:
    model_type = hf.get("model_type")
    fallback = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM"}.get(model_type)
    if fallback is None:
      raise ValueError(f"{source}: no `architectures` and model_type {model_type!r}; eva_jax "
                       f"loads {', '.join(sorted(ARCHITECTURES))}.")
    return fallback
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    raise ValueError(f"{source}: unknown architecture {archs!r}; eva_jax loads "
                     f"{', '.join(sorted(ARCHITECTURES))}.")
  return archs[0]


def config_from_hf(hf: Mapping[str, Any], source: str = CONFIG_FILE
                   ) -> tuple[GemmaConfig, str]:
  """HF config.json content -> (GemmaConfig, architecture name).

  Args:
    hf: the parsed config.json.
    source: where it came from, for error messages.

  Raises:
    ValueError: unknown architecture, or a setting our model does not implement (untied
      output matrix, attention biases, another activation or RoPE type, bidirectional
      attention).
  """
  arch = _architecture(hf, source)
  model_type, classifier = ARCHITECTURES[arch]
  if hf.get("model_type", model_type) != model_type:
    raise ValueError(f"{source}: architecture {arch} needs model_type {model_type!r}, got "
                     f"{hf.get('model_type')!r}.")
  c = {**_HF_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None or
                                       k in ("final_logit_softcapping",
                                             "attn_logit_softcapping", "sliding_window")}}

  def unsupported(what: str):
    raise ValueError(f"{source}: {what}; eva_jax's Gemma model does not implement it.")

  if not c.get("tie_word_embeddings", True):
    unsupported("tie_word_embeddings is false (a separate lm_head)")
  if c.get("attention_bias"):
    unsupported("attention_bias is true")
  if c.get("use_bidirectional_attention"):
    unsupported("use_bidirectional_attention is true")

  if model_type == "gemma":
    act = c.get("hidden_act") or c.get("hidden_activation") or "gelu_pytorch_tanh"
    allowed = _TANH_GELUS + ("gelu",)
  else:
    act = c.get("hidden_activation") or "gelu_pytorch_tanh"
    allowed = _TANH_GELUS
  if act not in allowed:
    unsupported(f"activation {act!r} (Gemma uses the tanh GELU: {', '.join(allowed)})")

  rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
  if isinstance(rope, Mapping) and rope.get("rope_type", rope.get("type", "default")) != "default":
    unsupported(f"RoPE type {rope.get('rope_type', rope.get('type'))!r} (only 'default')")
  rope_theta = (rope.get("rope_theta") if isinstance(rope, Mapping) else None) or \
      c.get("rope_theta") or 10000.0

  num_layers = int(c["num_hidden_layers"])
  head_dim = int(c["head_dim"])
  sliding_window = None
  attn_cap = final_cap = None
  if model_type == "gemma":
    types = (GLOBAL,) * num_layers
    query_scalar = float(head_dim)  # Gemma 1 scales queries by head_dim ** -0.5.
    post_norms = False
  else:
    hf_types = c.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    if len(hf_types) != num_layers:
      raise ValueError(f"{source}: layer_types has {len(hf_types)} entries for "
                       f"num_hidden_layers={num_layers}.")
    bad = sorted(set(hf_types) - set(_LAYER_TYPES))
    if bad:
      unsupported(f"layer types {bad} (known: {sorted(_LAYER_TYPES)})")
    types = tuple(_LAYER_TYPES[t] for t in hf_types)
    if LOCAL in types:
      sliding_window = c.get("sliding_window")
      if not sliding_window:
        raise ValueError(f"{source}: sliding_attention layers need a positive sliding_window.")
      sliding_window = int(sliding_window)
    query_scalar = float(c["query_pre_attn_scalar"])
    attn_cap = c.get("attn_logit_softcapping")
    final_cap = c.get("final_logit_softcapping")
    post_norms = True

  num_labels = 1
  if classifier:
    if c.get("id2label"):
      num_labels = len(c["id2label"])
    else:
      num_labels = int(c.get("num_labels", 2))  # HF's default when no labels are named.
  eos = c["eos_token_id"]
  if isinstance(eos, (list, tuple)):
    eos = eos[0]
  config = GemmaConfig(
      vocab_size=int(c["vocab_size"]), embed_dim=int(c["hidden_size"]),
      hidden_dim=int(c["intermediate_size"]), num_heads=int(c["num_attention_heads"]),
      num_kv_heads=int(c["num_key_value_heads"]), head_dim=head_dim, attention_types=types,
      sliding_window=sliding_window,
      attn_logit_softcap=float(attn_cap) if attn_cap else None,
      final_logit_softcap=float(final_cap) if final_cap else None,
      query_pre_attn_scalar=query_scalar, use_post_attn_norm=post_norms,
      use_post_ffw_norm=post_norms, rope_base=float(rope_theta),
      norm_eps=float(c["rms_norm_eps"]),
      pad_id=int(c["pad_token_id"]), eos_id=int(eos), bos_id=int(c["bos_token_id"]),
      num_labels=num_labels)
  return config, arch


def default_architecture(config: GemmaConfig, classifier: bool = False) -> str:
  family = "Gemma2" if config.is_gemma2 else "Gemma"
  return f"{family}For{'SequenceClassification' if classifier else 'CausalLM'}"


def hf_config_dict(config: GemmaConfig, architecture: str, dtype: Any) -> dict:
  """GemmaConfig -> the config.json content transformers builds the same model from.

  Raises:
    ValueError: when `architecture` cannot express `config` (e.g. Gemma 1 with soft-caps).
  """
  if architecture not in ARCHITECTURES:
    raise ValueError(f"save_hf: unknown architecture {architecture!r}; use one of "
                     f"{', '.join(sorted(ARCHITECTURES))}.")
  model_type, classifier = ARCHITECTURES[architecture]
  cfg = config
  problems = []
  if model_type == "gemma":
    if LOCAL in cfg.attention_types:
      problems.append("sliding-window layers")
    if cfg.attn_logit_softcap or cfg.final_logit_softcap:
      problems.append("logit soft-caps")
    if cfg.use_post_attn_norm or cfg.use_post_ffw_norm:
      problems.append("post norms")
    if cfg.query_pre_attn_scalar != cfg.head_dim:
      problems.append(f"query_pre_attn_scalar={cfg.query_pre_attn_scalar} != head_dim")
  elif not (cfg.use_post_attn_norm and cfg.use_post_ffw_norm):
    problems.append("missing post norms (HF Gemma 2 always has both)")
  if problems:
    raise ValueError(f"save_hf: architecture {architecture} cannot express this config "
                     f"({', '.join(problems)}); use a Gemma2* architecture or change the config.")
  out = {
      "architectures": [architecture], "model_type": model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
      "rope_theta": cfg.rope_base,  # for transformers < 5
      "pad_token_id": cfg.pad_id, "eos_token_id": cfg.eos_id, "bos_token_id": cfg.bos_id,
      "tie_word_embeddings": True, "attention_bias": False, "attention_dropout": 0.0,
      "max_position_embeddings": 8192, "initializer_range": 0.02, "use_cache": True,
      "dtype": str(np.dtype(dtype)), "torch_dtype": str(np.dtype(dtype)),
  }
  if model_type == "gemma":
    out["hidden_act"] = "gelu_pytorch_tanh"
  else:
    out.update(
        hidden_activation="gelu_pytorch_tanh",
        # transformers' config type-checks this field as an int.
        query_pre_attn_scalar=(int(cfg.query_pre_attn_scalar)
                               if float(cfg.query_pre_attn_scalar).is_integer()
                               else cfg.query_pre_attn_scalar),
        sliding_window=cfg.sliding_window or 4096,
        layer_types=["sliding_attention" if t == LOCAL else "full_attention"
                     for t in cfg.attention_types],
        attn_logit_softcapping=cfg.attn_logit_softcap,
        final_logit_softcapping=cfg.final_logit_softcap)
  if classifier:
    out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
    out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
  return out


# --------------------------------------------------------------------------------------------
# Safetensors files


class SafetensorsFile:
  """One .safetensors file: header parsed eagerly, tensors read lazily.

  `get(name)` is a read-only memory map for local files (nothing is read until indexed) and
  one ranged read for remote files.
  """

  def __init__(self, path: PathLike):
    self.path = as_path(path)
    self.local = is_local(path)
    try:
      with self.path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
          raise ValueError("shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20:
          raise ValueError(f"header length {n} is implausible")
        raw = f.read(n)
        if len(raw) != n:
          raise ValueError("truncated header")
      header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
      raise ValueError(f"{self.path} is not a valid safetensors file ({e}); re-download or "
                       f"re-export it.") from e
    self.data_start = 8 + n
    self.metadata = header.pop("__metadata__", {}) or {}
    self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for name, e in header.items():
      if e["dtype"] not in _ST_DTYPES:
        raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}.")
      dtype, shape = _ST_DTYPES[e["dtype"]], tuple(int(s) for s in e["shape"])
      begin, end = (int(x) for x in e["data_offsets"])
      if end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{self.path}: tensor {name} has {end - begin} bytes for shape "
                         f"{list(shape)} {e['dtype']}; the file is corrupt.")
      self.entries[name] = (dtype, shape, begin, end)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self.entries[name][0]

  def get(self, name: str) -> np.ndarray:
    dtype, shape, begin, end = self.entries[name]
    if math.prod(shape) == 0:
      return np.zeros(shape, dtype)
    if self.local:
      return np.memmap(os.fspath(self.path).removeprefix("file://"), dtype=dtype, mode="r",
                       offset=self.data_start + begin, shape=shape)
    with self.path.open("rb") as f:
      f.seek(self.data_start + begin)
      buf = f.read(end - begin)
    return np.frombuffer(buf, dtype).reshape(shape)


class SafetensorsCheckpoint:
  """The tensors of an HF folder: `model.safetensors`, or the shards that
  `model.safetensors.index.json` names."""

  def __init__(self, folder: PathLike):
    self.folder = as_path(folder)
    index = self.folder / INDEX_FILE
    self.files: dict[str, SafetensorsFile] = {}
    self.where: dict[str, str] = {}
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not a safetensors index (JSON with a `weight_map`): "
                         f"{e}.") from e
      by_file: dict[str, list[str]] = {}
      for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
      for fname, names in sorted(by_file.items()):
        path = self.folder / fname
        if not path.exists():
          raise FileNotFoundError(
              f"{index} names shard {fname} (holding {names[0]} and {len(names) - 1} more "
              f"tensors) but {path} does not exist; download every shard or re-export.")
        f = SafetensorsFile(path)
        for name in names:
          if name not in f.entries:
            raise ValueError(f"{index} says {name} is in {fname}, but {path} has no such "
                             f"tensor; the index and the shards do not match.")
          self.where[name] = fname
        self.files[fname] = f
    else:
      names = sorted(p.name for p in self.folder.glob("*.safetensors"))
      if not names:
        found = sorted(p.name for p in self.folder.iterdir())[:12]
        raise FileNotFoundError(
            f"{self.folder} has neither {SINGLE_FILE} nor {INDEX_FILE} (found: {found}); "
            f"eva_jax reads safetensors only: re-save with `save_pretrained` (safetensors is "
            f"its default) or `save_hf`.")
      for fname in names:
        f = SafetensorsFile(self.folder / fname)
        for name in f.entries:
          if name in self.where:
            raise ValueError(f"{self.folder}: tensor {name} is in both {self.where[name]} and "
                             f"{fname}; keep one copy (or add {INDEX_FILE}).")
          self.where[name] = fname
        self.files[fname] = f

  @property
  def names(self) -> list[str]:
    return list(self.where)

  def file_of(self, name: str) -> epath.Path:
    return self.files[self.where[name]].path

  def shape(self, name: str) -> tuple[int, ...]:
    return self.files[self.where[name]].shape(name)

  def dtype(self, name: str) -> np.dtype:
    return self.files[self.where[name]].dtype(name)

  def get(self, name: str) -> np.ndarray:
    return self.files[self.where[name]].get(name)


def _header_bytes(entries: Sequence[tuple[str, np.dtype, tuple[int, ...]]]) -> bytes:
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, dtype, shape in entries:
    n = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _NP_TO_ST[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + n]}
    offset += n
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # The data starts 8-byte aligned, as safetensors writes it.
  return struct.pack("<Q", len(raw)) + raw



# --------------------------------------------------------------------------------------------
# Lazy views


class Stacked:
  """Arrays (views of memory-mapped tensors) stacked on a new leading axis, lazily.

  Indexing with a tuple of slices, as `jax.make_array_from_callback` does, reads only the
  requested part of each stacked array.
  """

  def __init__(self, parts: Sequence[Any]):
    self.parts = list(parts)
    self.shape = (len(self.parts),) + tuple(self.parts[0].shape)
    self.dtype = self.parts[0].dtype
    self.ndim = len(self.shape)

  def __getitem__(self, index) -> np.ndarray:
    index = index if isinstance(index, tuple) else (index,)
    first, rest = (index[0], index[1:]) if index else (slice(None), ())
    if isinstance(first, (int, np.integer)):
      return np.asarray(self.parts[first][rest])
    return np.stack([np.asarray(self.parts[i][rest])
                     for i in range(*first.indices(len(self.parts)))])

  def __array__(self, dtype=None, copy=None):
    out = self[(slice(None),)]
    return out if dtype is None else out.astype(dtype)


def _q_in(a, n, h, d):   # [N*H, D] -> [N, D, H]
  return a.reshape(n, h, d).transpose(0, 2, 1)


def _q_out(x, n, h, d):  # [N, D, H] -> [N*H, D]
  return np.asarray(x).transpose(0, 2, 1).reshape(n * h, d)


@dataclasses.dataclass(frozen=True)
class LeafMap:
  """How one of our params relates to HF tensors.

  Attributes:
    path: the param's path in our tree, e.g. ("layer_0", "attn", "kv_einsum").
    hf_names: the HF tensors it is made of.
    hf_shapes: their shapes.
    shape: our param's shape.
    to_ours: HF arrays (views allowed) -> our array (a view or a `Stacked`).
    to_hf: our array -> HF arrays, in `hf_names` order.
  """

  path: tuple[str, ...]
  hf_names: tuple[str, ...]
  hf_shapes: tuple[tuple[int, ...], ...]
  shape: tuple[int, ...]
  to_ours: Callable[..., Any]
  to_hf: Callable[[Any], list]


def leaf_maps(config: GemmaConfig, classifier: bool = False,
              prefix: str = "model.") -> list[LeafMap]:
  """The HF <-> ours mapping of every param of `config`'s model, in our tree's order."""
  cfg = config
  v, d, f, n, k, h = (cfg.vocab_size, cfg.embed_dim, cfg.hidden_dim, cfg.num_heads,
                      cfg.num_kv_heads, cfg.head_dim)
  ident = lambda a: a  # noqa: E731
  maps = [LeafMap(("embedder", "input_embedding"), (prefix + "embed_tokens.weight",),
                  ((v, d),), (v, d), ident, lambda x: [x])]
  gemma2 = cfg.use_post_attn_norm or cfg.use_post_ffw_norm
  for i in range(cfg.num_layers):
    p = f"{prefix}layers.{i}."
    lay = f"layer_{i}"

    def norm(ours, hf):
      return LeafMap((lay, ours, "scale"), (p + hf + ".weight",), ((d,),), (d,), ident,
                     lambda x: [x])

    maps.append(norm("pre_attention_norm", "input_layernorm"))
    maps += [
        LeafMap((lay, "attn", "q_einsum"), (p + "self_attn.q_proj.weight",), ((n * h, d),),
                (n, d, h), lambda a: _q_in(a, n, h, d), lambda x: [_q_out(x, n, h, d)]),
        LeafMap((lay, "attn", "kv_einsum"),
                (p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"),
                ((k * h, d), (k * h, d)), (2, k, d, h),
                lambda a, b: Stacked([_q_in(a, k, h, d), _q_in(b, k, h, d)]),
                lambda x: [_q_out(x[0], k, h, d), _q_out(x[1], k, h, d)]),
        LeafMap((lay, "attn", "attn_vec_einsum"), (p + "self_attn.o_proj.weight",),
                ((d, n * h),), (n, h, d), lambda a: a.T.reshape(n, h, d),
                lambda x: [np.asarray(x).reshape(n * h, d).T]),
    ]
    if cfg.use_post_attn_norm:
      maps.append(norm("post_attention_norm", "post_attention_layernorm"))
    # Gemma 1 has no post-attention norm; its HF "post_attention_layernorm" is our pre-FFW norm.
    maps.append(norm("pre_ffw_norm",
                     "pre_feedforward_layernorm" if gemma2 else "post_attention_layernorm"))
    maps += [
        LeafMap((lay, "mlp", "gating_einsum"),
                (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), ((f, d), (f, d)),
                (2, d, f), lambda a, b: Stacked([a.T, b.T]),
                lambda x: [np.asarray(x[0]).T, np.asarray(x[1]).T]),
        LeafMap((lay, "mlp", "linear"), (p + "mlp.down_proj.weight",), ((d, f),), (f, d),
                lambda a: a.T, lambda x: [np.asarray(x).T]),
    ]
    if cfg.use_post_ffw_norm:
      maps.append(norm("post_ffw_norm", "post_feedforward_layernorm"))
  maps.append(LeafMap(("final_norm", "scale"), (prefix + "norm.weight",), ((d,),), (d,), ident,
                      lambda x: [x]))
  if classifier:
    maps.append(LeafMap(("score",), ("score.weight",), ((cfg.num_labels, d),),
                        (d, cfg.num_labels), lambda a: a.T, lambda x: [np.asarray(x).T]))
  return maps


def _prefix(names: Iterable[str]) -> str:
  names = list(names)
  if any(n.startswith("model.") for n in names):
    return "model."
  return ""


def hf_leaves(ckpt: SafetensorsCheckpoint, config: GemmaConfig, classifier: bool
              ) -> tuple[dict[tuple[str, ...], Any], np.dtype]:
  """Lazy views of our params in an HF checkpoint, checked against `config`.

  Returns:
    ({path in our tree: array-like view}, the dtype the embedding is stored in).

  Raises:
    ValueError: a tensor is missing, has the wrong shape, or is not part of the model.
  """
  prefix = _prefix(ckpt.names)
  maps = leaf_maps(config, classifier, prefix)
  expected = {name for m in maps for name in m.hf_names}
  missing = [name for m in maps for name in m.hf_names if name not in ckpt.where]
  if missing:
    raise ValueError(
        f"{ckpt.folder}: tensor {missing[0]} is missing ({len(missing)} missing in all; "
        f"expected by config.json for a {config.num_layers}-layer "
        f"{'Gemma 2' if config.is_gemma2 else 'Gemma'}"
        f"{' classifier' if classifier else ''}). Check that config.json belongs to these "
        f"weights.")
  extra = [name for name in ckpt.names if name not in expected and
           not name.endswith(_IGNORED_SUFFIXES) and name != "lm_head.weight"]
  if extra:
    raise ValueError(
        f"{ckpt.folder}: tensor {extra[0]} (in {ckpt.where[extra[0]]}) is not part of the model "
        f"config.json describes ({len(extra)} unexpected in all); check the architecture and "
        f"num_hidden_layers in config.json.")
  for m in maps:
    for name, shape in zip(m.hf_names, m.hf_shapes):
      if ckpt.shape(name) != tuple(shape):
        raise ValueError(f"{ckpt.file_of(name)}: tensor {name} has shape "
                         f"{list(ckpt.shape(name))}, expected {list(shape)} from config.json.")
  return {m.path: _LazyLeaf(ckpt, m) for m in maps}, ckpt.dtype(maps[0].hf_names[0])


class _LazyLeaf:
  """One of our params as a view of its HF tensors; nothing is read until indexed."""

  def __init__(self, ckpt: SafetensorsCheckpoint, m: LeafMap):
    self.ckpt, self.map = ckpt, m
    self.shape = m.shape
    self.dtype = ckpt.dtype(m.hf_names[0])
    self._view = None

  def view(self):
    if self._view is None:
      self._view = self.map.to_ours(*(self.ckpt.get(n) for n in self.map.hf_names))
    return self._view

  def release(self):
    """Drops the view (and, for remote files, the bytes read)."""
    self._view = None

  def __getitem__(self, index) -> np.ndarray:
    return np.asarray(self.view()[index])

  def __array__(self, dtype=None, copy=None):
    out = np.array(self.view())
    return out if dtype is None else out.astype(dtype)


# --------------------------------------------------------------------------------------------
# Export


def _get(tree: Mapping, path: Sequence[str]):
  for key in path:
    tree = tree[key]
  return tree


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array):
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _plan_shards(sizes: Sequence[int], max_shard_bytes: int) -> list[int]:
  """Shard number of each tensor, in order: a new shard starts when the next tensor would
  push the current one past `max_shard_bytes` (a larger tensor gets a shard of its own)."""
  shard, used, out = 0, 0, []
  for s in sizes:
    if used and used + s > max_shard_bytes:
      shard, used = shard + 1, 0
    out.append(shard)
    used += s
  return out


def save_hf(path: PathLike, model_or_config: Any, params: Mapping, architecture: Optional[str]
            = None, max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes an HF checkpoint folder (config.json, safetensors, index when sharded).

  transformers loads it with `AutoModelForCausalLM.from_pretrained(path)` (or
  `AutoModelForSequenceClassification`). Tensors keep the params' dtype, so a checkpoint
  loaded with `from_pretrained` and saved here is bit-identical to the original, tensor by
  tensor. With several JAX processes every process must call this (params are gathered leaf by
  leaf); process 0 writes.

  Args:
    path: output folder (local or `gs://`); created if missing, files in it are overwritten.
    model_or_config: a `Transformer` / `GemmaForSequenceClassification` or a GemmaConfig.
    params: the model's params (jax arrays, sharded or not, or numpy); a scanned model's
      stacked tree is written as the per-layer one, one layer at a time.
    architecture: HF architecture name; default from the model (classifier or causal LM) and
      the config (Gemma 2 if it has post norms or sliding windows).
    max_shard_bytes: largest safetensors file; more bytes than this -> shards plus
      `model.safetensors.index.json`.
  """
  if isinstance(model_or_config, GemmaConfig):
    config, classifier = model_or_config, None
  elif isinstance(getattr(model_or_config, "config", None), GemmaConfig):
    config = model_or_config.config
    classifier = isinstance(model_or_config, transformer.GemmaForSequenceClassification)
  else:
    raise TypeError(f"save_hf: expected a model or a GemmaConfig, got "
                    f"{type(model_or_config).__name__}.")
  if set(params) == {"params"}:
    params = params["params"]
  params = nn.unbox(params)
  if classifier is None:
    classifier = "score" in params
  if architecture is None:
    architecture = default_architecture(config, classifier)
  if architecture not in ARCHITECTURES:
    raise ValueError(f"save_hf: unknown architecture {architecture!r}; use one of "
                     f"{', '.join(sorted(ARCHITECTURES))}.")
  classifier = ARCHITECTURES[architecture][1]
  maps = leaf_maps(config, classifier)

  entries = []  # (hf name, dtype, shape, leaf number)
  for li, m in enumerate(maps):
    try:
      leaf = transformer.get_layer_param(params, config, m.path)
    except (KeyError, TypeError, IndexError) as e:
      raise ValueError(f"save_hf: params have no {'/'.join(m.path)}, which a "
                       f"{architecture} with this config needs.") from e
    if tuple(leaf.shape) != m.shape:
      raise ValueError(f"save_hf: param {'/'.join(m.path)} has shape {list(leaf.shape)}, "
                       f"expected {list(m.shape)} from the config.")
    for name, shape in zip(m.hf_names, m.hf_shapes):
      entries.append((name, np.dtype(leaf.dtype), tuple(shape), li))
  dtype = entries[0][1]
  sizes = [math.prod(s) * dt.itemsize for _, dt, s, _ in entries]
  shard_of = _plan_shards(sizes, max_shard_bytes)
  num_shards = shard_of[-1] + 1
  writer = jax.process_index() == 0
  out = as_path(path)
  if writer:
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(
        json.dumps(hf_config_dict(config, architecture, dtype), indent=2, sort_keys=True))
    # Weights of an earlier export to this folder would be read with the new ones.
    for stale in list(out.glob("*.safetensors")) + [out / INDEX_FILE]:
      if stale.exists():
        stale.unlink()

  def fname(s):
    return SINGLE_FILE if num_shards == 1 else \
        f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"

  # Leaves are fetched (gathered across processes if needed) once, in the same order in every
  # process, and written tensor by tensor: only one leaf is on the host at a time.
  cached: dict[int, dict[str, np.ndarray]] = {}
  handle = None
  for s in range(num_shards):
    in_shard = [e for e, sh in zip(entries, shard_of) if sh == s]
    if writer:
      handle = (out / fname(s)).open("wb")
      handle.write(_header_bytes([(n, dt, shp) for n, dt, shp, _ in in_shard]))
    for name, _, _, li in in_shard:
      if li not in cached:
        cached.clear()
        m = maps[li]
        # A scanned model's stacked leaf is sliced on its devices: one layer on the host.
        cached[li] = dict(zip(m.hf_names, m.to_hf(_to_host(
            transformer.get_layer_param(params, config, m.path)))))
      if writer:
        data = np.ascontiguousarray(cached[li][name])
        handle.write(memoryview(data.reshape(-1).view(np.uint8)))  # no extra copy
    if writer:
      handle.close()
  if writer and num_shards > 1:
    index = {"metadata": {"total_size": int(sum(sizes))},
             "weight_map": {n: fname(sh) for (n, _, _, _), sh in zip(entries, shard_of)}}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"save_hf:{os.fspath(path)}")

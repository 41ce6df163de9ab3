"""Tiny random checkpoints for the checkpoint tests (HF via transformers, official via eva_jax).

Every weight, norms included, is drawn at random: HF initialises Gemma's norm scales to zero,
which would hide a missing or swapped norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from eva_jax.models import GemmaConfig, Transformer
from eva_jax.models.config import GLOBAL, LOCAL

VOCAB = 128


def hf_config(kind: str, **overrides):
  """A tiny transformers config.

  kinds: "gemma" (Gemma 1, multi-query), "gemma2" (Gemma 2, grouped-query, head_dim 24 !=
  hidden / heads = 16, a 6-token window and soft-caps small enough to clip), "gemma2_cls" /
  "gemma_cls" (the sequence classifiers; one label and pad id 0 unless overridden).
  """
  import transformers  # pylint: disable=g-import-not-at-top
  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                head_dim=24, pad_token_id=0, bos_token_id=2, eos_token_id=1)
  if kind.startswith("gemma2"):
    kw = dict(common, num_hidden_layers=3, num_key_value_heads=2, sliding_window=6,
              query_pre_attn_scalar=20, attn_logit_softcapping=3.0,
              final_logit_softcapping=2.0, rope_theta=500.0)
    cls = transformers.Gemma2Config
  else:
    kw = dict(common, num_hidden_layers=2, num_key_value_heads=1, rope_theta=500.0)
    cls = transformers.GemmaConfig
  if kind.endswith("_cls"):
    kw["num_labels"] = 1
  kw.update(overrides)
  config = cls(**kw)
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  return config


def hf_model(kind: str, seed: int = 0, dtype=None, **overrides):
  """A transformers model with every parameter random (norm scales non-zero)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = hf_config(kind, **overrides)
  cls = {"gemma": transformers.GemmaForCausalLM, "gemma2": transformers.Gemma2ForCausalLM,
         "gemma_cls": transformers.GemmaForSequenceClassification,
         "gemma2_cls": transformers.Gemma2ForSequenceClassification}[kind]
  torch.manual_seed(seed)
  model = cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, 0.3 if "norm" in name else 0.15)
  if dtype is not None:
    model = model.to(dtype)
  return model


def hf_outputs(model, ids: np.ndarray, attention_mask=None, position_ids=None) -> np.ndarray:
  """Float32 logits [B, T, V] of a causal LM, or scores [B] / [B, L] of a classifier."""
  import torch  # pylint: disable=g-import-not-at-top
  kw = {}
  if attention_mask is not None:
    kw["attention_mask"] = torch.tensor(np.asarray(attention_mask, np.int64))
  if position_ids is not None:
    kw["position_ids"] = torch.tensor(np.asarray(position_ids, np.int64))
  with torch.no_grad():
    out = model(torch.tensor(np.asarray(ids, np.int64)), **kw).logits.float().numpy()
  if out.ndim == 2 and out.shape[-1] == 1:
    out = out[:, 0]
  return out


def rel_err(ours, ref) -> float:
  """max |ours - ref| / max |ref|."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def token_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
  """Random ids that avoid the pad (0), eos (1) and bos (2) ids."""
  return np.random.RandomState(seed).randint(3, VOCAB, (batch, length)).astype(np.int32)


def eva_config(kind: str = "gemma2", **overrides) -> GemmaConfig:
  """Our config for official-checkpoint tests. D = 64 != F = 96, so a transposed gate is
  recognisable by shape."""
  if kind == "gemma2":
    cfg = GemmaConfig(vocab_size=VOCAB, embed_dim=64, hidden_dim=96, num_heads=4,
                      num_kv_heads=2, head_dim=24, attention_types=(LOCAL, GLOBAL) * 2,
                      sliding_window=6, attn_logit_softcap=3.0, final_logit_softcap=2.0,
                      query_pre_attn_scalar=20, use_post_attn_norm=True,
                      use_post_ffw_norm=True)
  elif kind == "gemma_mha":  # K == N: the official format fuses q, k, v into qkv_einsum
    cfg = GemmaConfig(vocab_size=VOCAB, embed_dim=64, hidden_dim=96, num_heads=4,
                      num_kv_heads=4, head_dim=24, attention_types=(GLOBAL,) * 2,
                      query_pre_attn_scalar=24)
  else:
    raise ValueError(kind)
  return cfg.replace(**overrides) if overrides else cfg


def random_params(config: GemmaConfig, seed: int = 0) -> dict:
  """Our params with every leaf random (numpy, in config.param_dtype)."""
  model = Transformer(config)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 1), jnp.int32)))
  leaves, treedef = jax.tree_util.tree_flatten(abstract["params"],
                                               is_leaf=lambda x: hasattr(x, "unbox"))
  rng = np.random.RandomState(seed)
  out = [(rng.standard_normal(x.unbox().shape) * 0.15).astype(x.unbox().dtype)
         for x in leaves]
  return jax.tree_util.tree_unflatten(treedef, out)


def assert_trees_equal(a, b):
  """Same structure, same dtypes, bit-identical values."""
  fa, ta = jax.tree_util.tree_flatten_with_path(a)
  fb, tb = jax.tree_util.tree_flatten_with_path(b)
  assert ta == tb, (ta, tb)
  for (path, x), (_, y) in zip(fa, fb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, (path, x.dtype, y.dtype, x.shape, y.shape)
    assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), jax.tree_util.keystr(path)

"""Gemma-family model configurations.

One frozen dataclass describes Gemma (1) and Gemma 2 decoders; the named configs carry the
published hyper-parameters (see ../shared/reference/gemma_checkpoint_formats.md, section 1).

Vocabulary: the official Flax tables have 256128 rows, HF and the SentencePiece model 256000;
rows past 256000 are unused padding whose logits would be exactly 0 and would take probability
mass in a full-vocabulary softmax. The named configs therefore use 256000, and the official
checkpoint loader drops the padding rows.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import gin

GLOBAL = "global"
LOCAL = "local"

GEMMA_VOCAB = 256000
# `GemmaConfig.attention_impl`'s values.
ATTENTION_IMPLS = ("xla", "flash")
# `GemmaConfig.weight_layout`'s values.
WEIGHT_LAYOUTS = ("checkpoint", "matmul")


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """Hyper-parameters of a Gemma / Gemma 2 decoder.

  Attributes:
    vocab_size: rows of the (tied) embedding table.
    embed_dim: model width D.
    hidden_dim: MLP width F (each of the two GeGLU branches).
    num_heads: query heads N.
    num_kv_heads: key/value heads K (1: multi-query, N: multi-head, else grouped-query).
    head_dim: H, explicit (Gemma's H is not D / N).
    attention_types: one entry per layer, `"global"` or `"local"` (sliding window).
    sliding_window: W for local layers: query i sees keys j with i - W < j <= i.
    attn_logit_softcap: if set, attention logits s -> cap * tanh(s / cap) before the softmax.
    final_logit_softcap: if set, output logits l -> cap * tanh(l / cap).
    query_pre_attn_scalar: queries are multiplied by this ** -0.5 (H for most sizes, D // N for
      Gemma 2 27B), as HF's `query_pre_attn_scalar`.
    use_post_attn_norm / use_post_ffw_norm: Gemma 2's extra norms after each sub-block.
    rope_base: RoPE base frequency.
    norm_eps: RMSNorm epsilon.
    dtype: compute dtype of matmuls (activations); softmax, norms' statistics and logits'
      log-softmax run in float32 regardless.
    param_dtype: dtype params are initialised in.
    pad_id / bos_id / eos_id: special ids (Gemma's: 0, 2, 1).
    num_labels: output width of the sequence-classification head (1 for a reward model).
    scan_layers: build the layers as one `nn.scan` over a repeating unit of blocks (one
      block for Gemma 1, a (local, global) pair for Gemma 2), so XLA compiles a unit once
      instead of every layer; layers past the last whole unit (an odd Gemma 2 depth) stay
      unrolled. Same math; the param tree and KV cache are stacked (see
      `transformer.stack_layers`); checkpoints on disk keep the per-layer tree.
    attention_impl: how full sequences (no KV cache: training, reference and reward
      scoring) attend. "xla": scores and softmax as XLA ops; "flash": the fused Pallas kernel
      of `models.flash_attention` (Triton on GPUs, JAX's splash attention on TPUs, an
      interpreter on the CPU: tests only), which never materialises the [B, heads, T, T]
      scores; and each decode step through its decode kernel, which reads the KV cache only
      up to the step's slot (on GPUs; XLA ops on TPUs). Prefill keeps XLA's attention.
    weight_layout: the axis order of the projection weights. "checkpoint" (the param tree
      everywhere but the sampler's decode copy): Gemma's own, q_einsum [N, D, H], kv_einsum
      [2, K, D, H], gating_einsum [2, D, F]. "matmul": embed first, q_einsum [D, N, H],
      kv_einsum [D, 2, K, H], gating_einsum [D, 2, F] (`transformer.to_matmul_layout`), so
      each projection is one matmul reading its weight in place: in the checkpoint layout
      XLA:GPU copies out the gate and up halves and transposes q and kv weights on every
      call, about 5 GB a decode step at gemma2_2b's size (`eva_jax.hlo_traffic`), which the
      sampler's decode loop, reading every weight per token, pays on every step. Same math.
      The sampler's decode copy takes it everywhere but on TPUs, which read the checkpoint
      layout in place.
  """

  vocab_size: int = 256
  embed_dim: int = 64
  hidden_dim: int = 128
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  attention_types: tuple[str, ...] = (LOCAL, GLOBAL)
  sliding_window: Optional[int] = None
  attn_logit_softcap: Optional[float] = None
  final_logit_softcap: Optional[float] = None
  query_pre_attn_scalar: float = 16.0
  use_post_attn_norm: bool = False
  use_post_ffw_norm: bool = False
  rope_base: float = 10_000.0
  norm_eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  pad_id: int = 0
  eos_id: int = 1
  bos_id: int = 2
  num_labels: int = 1
  scan_layers: bool = False
  attention_impl: str = "xla"
  weight_layout: str = "checkpoint"

  def __post_init__(self):
    object.__setattr__(self, "attention_types", tuple(self.attention_types))
    for t in self.attention_types:
      if t not in (GLOBAL, LOCAL):
        raise ValueError(f"GemmaConfig.attention_types: unknown attention type {t!r}; "
                         f"use {GLOBAL!r} or {LOCAL!r}.")
    if LOCAL in self.attention_types and not self.sliding_window:
      raise ValueError("GemmaConfig: local attention layers need a positive sliding_window.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"GemmaConfig: num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"GemmaConfig.attention_impl={self.attention_impl!r}: use one of "
                       f"{', '.join(map(repr, ATTENTION_IMPLS))}.")
    if self.weight_layout not in WEIGHT_LAYOUTS:
      raise ValueError(f"GemmaConfig.weight_layout={self.weight_layout!r}: use one of "
                       f"{', '.join(map(repr, WEIGHT_LAYOUTS))}.")
    if self.head_dim % 2:
      raise ValueError(f"GemmaConfig: head_dim={self.head_dim} must be even for RoPE.")

  @property
  def num_layers(self) -> int:
    return len(self.attention_types)

  @property
  def is_gemma2(self) -> bool:
    return self.use_post_attn_norm or self.use_post_ffw_norm or LOCAL in self.attention_types

  def replace(self, **changes) -> "GemmaConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self, include_embedding: bool = True) -> int:
    """Parameter count of the causal LM (embedding counted once: it is tied)."""
    d, f, n, k, h = (self.embed_dim, self.hidden_dim, self.num_heads, self.num_kv_heads,
                     self.head_dim)
    norms = 2 + 2 * (self.use_post_attn_norm or self.use_post_ffw_norm)
    per_layer = n * d * h * 2 + 2 * k * d * h + 3 * d * f + norms * d
    total = self.num_layers * per_layer + d
    if include_embedding:
      total += self.vocab_size * d
    return total


def _alternating(num_layers: int) -> tuple[str, ...]:
  # Gemma 2: even layers local (sliding window), odd layers global; HF's default layer_types.
  return tuple(LOCAL if i % 2 == 0 else GLOBAL for i in range(num_layers))


def _gemma1(**kw) -> GemmaConfig:
  num_layers = kw.pop("num_layers")
  return GemmaConfig(attention_types=(GLOBAL,) * num_layers, query_pre_attn_scalar=kw["head_dim"],
                     dtype="bfloat16", **kw)


def _gemma2(**kw) -> GemmaConfig:
  num_layers = kw.pop("num_layers")
  kw.setdefault("query_pre_attn_scalar", kw["head_dim"])
  return GemmaConfig(attention_types=_alternating(num_layers), sliding_window=4096,
                     attn_logit_softcap=50.0, final_logit_softcap=30.0,
                     use_post_attn_norm=True, use_post_ffw_norm=True, dtype="bfloat16", **kw)


def tiny() -> GemmaConfig:
  """A Gemma 2-shaped model small enough for CPU tests (byte-level vocabulary)."""
  return GemmaConfig(vocab_size=384, embed_dim=64, hidden_dim=128, num_heads=4, num_kv_heads=2,
                     head_dim=16, attention_types=_alternating(4), sliding_window=16,
                     attn_logit_softcap=50.0, final_logit_softcap=30.0, query_pre_attn_scalar=16,
                     use_post_attn_norm=True, use_post_ffw_norm=True)


def tiny_gemma1() -> GemmaConfig:
  """A Gemma 1-shaped model for CPU tests: all global, multi-query, no caps or post norms."""
  return GemmaConfig(vocab_size=384, embed_dim=64, hidden_dim=128, num_heads=4, num_kv_heads=1,
                     head_dim=16, attention_types=(GLOBAL,) * 3, query_pre_attn_scalar=16)


def gemma_2b() -> GemmaConfig:
  return _gemma1(vocab_size=GEMMA_VOCAB, embed_dim=2048, hidden_dim=16384, num_heads=8,
                 num_kv_heads=1, head_dim=256, num_layers=18)


def gemma_7b() -> GemmaConfig:
  return _gemma1(vocab_size=GEMMA_VOCAB, embed_dim=3072, hidden_dim=24576, num_heads=16,
                 num_kv_heads=16, head_dim=256, num_layers=28)


def gemma2_2b() -> GemmaConfig:
  return _gemma2(vocab_size=GEMMA_VOCAB, embed_dim=2304, hidden_dim=9216, num_heads=8,
                 num_kv_heads=4, head_dim=256, num_layers=26)


def gemma2_9b() -> GemmaConfig:
  return _gemma2(vocab_size=GEMMA_VOCAB, embed_dim=3584, hidden_dim=14336, num_heads=16,
                 num_kv_heads=8, head_dim=256, num_layers=42)


def gemma2_27b() -> GemmaConfig:
  # 27B scales queries by (D // N) ** -0.5 = 144 ** -0.5, not head_dim ** -0.5.
  return _gemma2(vocab_size=GEMMA_VOCAB, embed_dim=4608, hidden_dim=36864, num_heads=32,
                 num_kv_heads=16, head_dim=128, num_layers=46, query_pre_attn_scalar=144)


NAMED_CONFIGS = {
    "tiny": tiny,
    "tiny_gemma1": tiny_gemma1,
    "gemma_2b": gemma_2b,
    "gemma_7b": gemma_7b,
    "gemma2_2b": gemma2_2b,
    "gemma2_9b": gemma2_9b,
    "gemma2_27b": gemma2_27b,
}


@gin.configurable
def get_config(name: str = "tiny", overrides: Optional[dict] = None, **kw) -> GemmaConfig:
  """Returns the named config, with `overrides` (gin-bindable) and keyword arguments replacing
  fields, e.g. `get_config("gemma2_2b", dtype="float32")`."""
  overrides = {**(overrides or {}), **kw}
  if isinstance(name, GemmaConfig):
    return name.replace(**overrides) if overrides else name
  if name not in NAMED_CONFIGS:
    raise ValueError(f"Unknown model config {name!r}; known configs: "
                     f"{', '.join(sorted(NAMED_CONFIGS))}.")
  cfg = NAMED_CONFIGS[name]()
  return cfg.replace(**overrides) if overrides else cfg


def config_names() -> Sequence[str]:
  return sorted(NAMED_CONFIGS)

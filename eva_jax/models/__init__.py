"""Gemma-family models, configs, tokenizers and checkpoint import/export."""

from eva_jax.models.config import GemmaConfig, get_config, config_names
from eva_jax.models.transformer import (Transformer, GemmaForSequenceClassification, init_cache,
                                        cache_logical_axes)

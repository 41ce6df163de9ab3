"""Gemma-family models, configs, tokenizers and checkpoint import/export."""

from eva_jax.models.config import GemmaConfig, get_config, config_names
from eva_jax.models.transformer import (Transformer, GemmaForSequenceClassification, init_cache,
                                        cache_logical_axes, stack_layers, unstack_layers)
from eva_jax.models.tokenizer import (ByteTokenizer, SentencePieceTokenizer, Tokenizer,
                                      encode_batch, encode_chat, format_chat, get_tokenizer)
from eva_jax.models.pretrained import from_pretrained, pretrained_config
from eva_jax.models.hf_checkpoint import save_hf
from eva_jax.models.official_checkpoint import save_official

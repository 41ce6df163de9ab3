"""Prompt sources: JSON-lines and Parquet prompt files (local or gs://), held-out splits; seqio
Tasks / Mixtures and TFDS datasets (the `seqio` extra, imported only when read)."""

from eva_jax.data.prompts import (FORMATS, STAT_KEYS, PromptCollector, PromptExample,
                                  PromptFileError, PromptSet, expand_paths, load_prompts,
                                  load_train_and_heldout, split_heldout, split_prompt_set)
from eva_jax.data.sources import (PROMPT_GROUPS, PROMPT_SOURCES, initial_prompts, prompt_groups,
                                  resolve_builtin)
from eva_jax.data.seqio_tfds import (PromptSourceError, read_seqio_prompts, read_tfds_prompts,
                                     seqio_prompts, tfds_prompts)

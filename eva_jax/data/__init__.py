"""Prompt sources: JSON-lines and Parquet prompt files (local or gs://), held-out splits."""

from eva_jax.data.prompts import (FORMATS, STAT_KEYS, PromptExample, PromptFileError, PromptSet,
                                  expand_paths, load_prompts, load_train_and_heldout,
                                  split_heldout)
from eva_jax.data.sources import (PROMPT_GROUPS, PROMPT_SOURCES, initial_prompts, prompt_groups,
                                  resolve_builtin)

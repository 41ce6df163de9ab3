"""The creator: informativeness, selection, evolvers, filters, the prompt buffer, pairs."""

from eva_jax.creator.buffer import PromptBuffer, PromptRecord, normalize_text
from eva_jax.creator.evolvers import (EVOLVERS, PROGRAMMATIC_EVOLVERS, Child, EvolveResult,
                                      Evolver, Parent, ProgrammaticEvolver, ProgrammaticSpec,
                                      RewriteRequest, make_evolver, parse_reply,
                                      register_programmatic_evolver)
from eva_jax.creator.filters import DEFAULT_FILTERS, FILTERS, filter_children
from eva_jax.creator.informativeness import METRICS, informativeness, reward_statistics
from eva_jax.creator.lm_evolvers import ChatCompletionsEvolver, LMEvolver
from eva_jax.creator.meta_prompts import IN_BREADTH, IN_DEPTH, OPERATORS, meta_prompt
from eva_jax.creator.pairs import PairChoice, best_worst_pairs, mix_pairs
from eva_jax.creator.selection import METHODS, minmax_weights, select_prompts

"""Sharded, batched KV-cache generation with log-probs (prefill + while_loop decode)."""

from eva_jax.sampler.sampler import (FINISH_LENGTH, FINISH_STOP, Sample, Sampler,
                                     pick_bucket, power_of_two_buckets)
from eva_jax.sampler.sampling import (nucleus_mask_radix, nucleus_mask_sort, sample_tokens,
                                      sample_tokens_and_logprobs, token_logprobs, top_k_mask)

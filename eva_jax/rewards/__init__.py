"""Rewards: a batch of (conversation, response text) in, float32 scores out (see `base`)."""

from eva_jax.rewards.base import (ON_FAILURE, REWARDS, Reward, RewardError, RewardScores,
                                  make_reward, prompt_text)
from eva_jax.rewards.programmatic import REWARD_FNS, ProgrammaticReward, resolve_callable
from eva_jax.rewards.http import HTTPReward
from eva_jax.rewards.model import ModelReward

"""The reward-model tests' checkpoint and inputs, and the function the 2-process test runs.

Imported as `tests.rewards.mp_targets` by the tests and in the child processes. No PyTorch:
the checkpoint is written by `save_hf` (which transformers loads, as the parity tests check).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from eva_jax import parallel
from eva_jax.models import GemmaForSequenceClassification, SentencePieceTokenizer, save_hf
from eva_jax.rewards import ModelReward
from tests.models import checkpoint_helpers as H
from tests.models.test_tokenizer import _train

# Tiny buckets: 16, 32 and 64 tokens; at most 4 rows per program.
OPTIONS = dict(min_length_bucket=16, max_length=64, batch_size=4)


def words(n: int, seed: int) -> str:
  """`n` words drawn with `seed` (each about one token of the test tokenizer)."""
  rng = random.Random(seed)
  vocab = "the a model user prompt answer reward policy evolve creator solver game".split()
  return " ".join(rng.choice(vocab) for _ in range(n))


# Lengths (with Gemma's chat template) from ~12 to ~60 tokens: all three length buckets, and
# more rows in some buckets than one batch holds. A system message and a multi-turn chat too.
CONVERSATIONS = [
    "hi",
    [{"role": "user", "content": words(20, 1)}],
    "why?",
    words(3, 2),
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": words(6, 3)}],
    words(12, 4),
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
     {"role": "user", "content": words(8, 5)}],
    words(30, 6),
    "ok",
    words(5, 7),
    "what is the reward?",
    words(9, 8),
]
RESPONSES = ["ok", words(14, 11), "because", "the model", words(4, 12), "a policy 42.",
             words(6, 13), words(3, 14), "", words(9, 15),
             "the reward is 7", words(2, 16)]


def make_checkpoint(folder, seed: int = 0) -> str:
  """A random one-label Gemma 2 classifier in HF format with a SentencePiece tokenizer.model
  (Gemma's specials and turn markers) in `folder`, whose vocabulary sets the model's; returns the folder."""
  os.makedirs(folder, exist_ok=True)
  tok_file = os.path.join(folder, "tokenizer.model")
  _train(Path(tok_file))
  vocab = SentencePieceTokenizer.from_path(tok_file).vocab_size
  cfg = H.eva_config("gemma2", vocab_size=vocab)
  params = H.random_params(cfg, seed=seed)
  rng = np.random.RandomState(seed + 1)
  params["score"] = (rng.standard_normal((cfg.embed_dim, 1)) * 0.3).astype(np.float32)
  save_hf(folder, GemmaForSequenceClassification(cfg), params)
  return str(folder)


def copy_tokenizer(src_folder, dst_folder) -> None:
  shutil.copy(os.path.join(src_folder, "tokenizer.model"),
              os.path.join(dst_folder, "tokenizer.model"))


def score_in_process(path: str, mesh_shape: Optional[dict] = None, num_devices: int = 0,
                     options: Optional[dict] = None) -> dict:
  """Loads the reward on a mesh of `num_devices` devices (0: every device of every process)
  and scores CONVERSATIONS twice; returns numpy and counts only (the same on every process)."""
  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  mesh = parallel.create_mesh(mesh_shape, devices=devices)
  reward = ModelReward(path, mesh=mesh, **{**OPTIONS, **(options or {})})
  first = reward.score(CONVERSATIONS, RESPONSES).scores
  compilations = reward.num_compilations
  again = reward.score(CONVERSATIONS, RESPONSES).scores
  return {"process_count": jax.process_count(), "devices": mesh.devices.size,
          "scores": first, "again": again, "compilations": compilations,
          "compilations_after_second_call": reward.num_compilations,
          "keys": sorted({(s["batch"], s["length_bucket"]) for s in reward.last_stats})}

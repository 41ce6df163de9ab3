"""Run in each JAX process by test_multiprocess.py (eva_jax.testing.multiprocess)."""

import sys

import jax

from eva_jax.data import PromptSourceError, seqio_prompts, tfds_prompts


def _pairs(prompts):
  return [(e.text, e.source) for e in prompts]


def read_sources(tfds_data_dir: str) -> dict:
  out = {"index": jax.process_index()}
  train, heldout = seqio_prompts(task="eva_test_lines_bytes", modules=["tests_seqio.seqio_tasks"],
                                 heldout_split="validation")
  out["seqio"] = (_pairs(train), _pairs(heldout))
  # No module defines the builder here: TFDS reads the prepared dataset from its files.
  train, heldout = tfds_prompts(name="eva_tiny_prompts", data_dir=tfds_data_dir,
                                heldout_count=1)
  out["tfds"] = (_pairs(train), _pairs(heldout))
  try:
    seqio_prompts(task="eva_no_such_task", heldout_split="validation")
  except PromptSourceError as e:
    out["error"] = str(e)
  out["tensorflow"] = "tensorflow" in sys.modules
  return out

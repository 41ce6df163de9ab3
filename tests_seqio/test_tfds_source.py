"""The "tfds" prompt source on a TFDS dataset built here from a generator (no download):
text, nested text and chat features, slices, gin + initial_prompts, held-out splits, and
every bad input with the message that names it."""

from __future__ import annotations

import gin
import pytest

from eva_jax.data import (PromptFileError, PromptSourceError, initial_prompts,
                          read_tfds_prompts, tfds_prompts)
from tests_seqio.tiny_builder import TEST, TRAIN, EvaTinyPrompts

NAME = "eva_tiny_prompts"
KEPT = ["What is 2+2?", "Write a haiku.", "Name a prime.", "Écris un mot."]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  EvaTinyPrompts(data_dir=path).download_and_prepare()
  return path


def test_text_feature_sources_stats_and_metadata(data_dir):
  got = read_tfds_prompts(NAME, "train", "prompt", data_dir=data_dir,
                          metadata_keys=("n", "meta/question", "score", "tokens"))
  assert got.texts() == KEPT  # the empty prompt and a case variant dropped
  assert got.stats == {"read": 6, "kept": 4, "dropped_empty": 1, "dropped_duplicate": 1,
                       "dropped_too_long": 0}
  assert got.files == [f"tfds:{NAME}/train"]
  # Examples in the split's order (no shuffling): their index is their "n".
  assert [e.source for e in got] == [f"tfds:{NAME}/train:{e.metadata['n']}" for e in got]
  assert got.examples[1].metadata == {"n": 1, "meta/question": "Q1: Write a haiku.",
                                      "score": 1.0, "tokens": [0, 1]}
  again = read_tfds_prompts(NAME, "train", "prompt", data_dir=data_dir)
  assert [e.source for e in again] == [e.source for e in got]


def test_nested_and_chat_features_and_slices(data_dir):
  nested = read_tfds_prompts(NAME, "test", "meta/question", data_dir=data_dir)
  assert nested.texts() == [f"Q{n}: {p}" for n, p in enumerate(TEST)]
  chats = read_tfds_prompts(NAME, "train[:2]", "messages", data_dir=data_dir)
  assert chats.texts() == TRAIN[:2]
  assert chats.examples[0].context == ({"role": "system", "content": "Be brief."},)
  assert chats.files == [f"tfds:{NAME}/train[:2]"]
  assert read_tfds_prompts(NAME, "train", "prompt", data_dir=data_dir, limit=1).texts() == \
      KEPT[:1]


def test_gin_initial_prompts_with_a_heldout_split(data_dir):
  gin.parse_config(f"""
      initial_prompts.source = "tfds"
      tfds_prompts.name = "{NAME}"
      tfds_prompts.split = "train"
      tfds_prompts.feature = "prompt"
      tfds_prompts.data_dir = "{data_dir}"
      tfds_prompts.heldout_split = "test"
  """)
  train, heldout = initial_prompts()
  assert train.texts() == KEPT
  assert heldout.texts() == TEST
  # A held-out share of the training split instead.
  gin.clear_config()
  train, heldout = tfds_prompts(name=NAME, data_dir=data_dir, heldout_fraction=0.25)
  assert len(train) == 3 and len(heldout) == 1
  assert sorted(train.texts() + heldout.texts()) == sorted(KEPT)


def test_unknown_dataset_split_feature_and_unprepared_data_are_named(data_dir, tmp_path):
  with pytest.raises(PromptSourceError, match=r"tfds_prompts: TFDS has no dataset named "
                     r"'eva_no_such_dataset' \(.*\). Check tfds_prompts.name"):
    tfds_prompts(name="eva_no_such_dataset", data_dir=data_dir, heldout_split="test")
  with pytest.raises(PromptSourceError, match=rf"the TFDS dataset '{NAME}' has no split 'dev' "
                     r".*its splits are \['test', 'train'\]"):
    read_tfds_prompts(NAME, "dev", data_dir=data_dir)
  with pytest.raises(PromptSourceError, match=rf"the TFDS dataset '{NAME}' has no feature "
                     r"'question'; its features are \['messages', 'messages/content', "
                     r"'messages/role', 'meta', 'meta/question', 'n', 'prompt', 'score', "
                     r"'tokens'\]. Set read_tfds_prompts.feature"):
    read_tfds_prompts(NAME, "train", "question", data_dir=data_dir)
  with pytest.raises(PromptSourceError, match=rf"feature 'tokens' of the TFDS dataset '{NAME}' "
                     r"holds token ids \(int64 of shape \[None\]\), not text, and TFDS prompts "
                     r"must be text"):
    read_tfds_prompts(NAME, "train", "tokens", data_dir=data_dir)
  with pytest.raises(PromptSourceError, match=rf"feature 'meta' of the TFDS dataset '{NAME}' is a "
                     r"dict of \['question'\]"):
    read_tfds_prompts(NAME, "train", "meta", data_dir=data_dir)
  empty_dir = str(tmp_path / "nothing_here")
  with pytest.raises(PromptSourceError, match=rf"the TFDS dataset '{NAME}' is not prepared in "
                     rf"{empty_dir}. Build it there .*or set read_tfds_prompts.download = True"):
    read_tfds_prompts(NAME, "train", data_dir=empty_dir)
  # download=True prepares it (here from the generator: nothing to download).
  assert read_tfds_prompts(NAME, "test", data_dir=empty_dir, download=True).texts() == TEST
  with pytest.raises(PromptSourceError, match=r"the 'train\[6:\]' split of the TFDS dataset "
                     rf"'{NAME}' holds no examples"):
    read_tfds_prompts(NAME, "train[6:]", data_dir=data_dir)
  with pytest.raises(PromptFileError, match=r"no prompt left in .*read 1, dropped 1 empty"):
    read_tfds_prompts(NAME, "train[2:3]", data_dir=data_dir)

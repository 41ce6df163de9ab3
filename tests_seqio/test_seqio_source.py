"""The "seqio" prompt source on real seqio Tasks and Mixtures: text, tokenized and TFRecord
features, gin + initial_prompts, held-out splits, files and fractions, and every bad input
with the message that names it."""

from __future__ import annotations

import json

import gin
import pytest
import seqio
import tensorflow as tf

from eva_jax.data import (PromptFileError, PromptSourceError, initial_prompts,
                          read_seqio_prompts, seqio_prompts)
from eva_jax.models import ByteTokenizer, encode_chat

MODULE = "tests_seqio.seqio_tasks"  # registers eva_test_lines* over tests_seqio/data/*.txt
TRAIN = ["What is 2+2?", "Write a haiku about rain.", "Name three primes.",
         'Translate "chat" into English.', "Écris un poème sur la mer."]
VALIDATION = ["Explain recursion briefly.", "What is the capital of Peru?"]
ALL_STATS = {"read": 7, "kept": 5, "dropped_empty": 1, "dropped_duplicate": 1,
             "dropped_too_long": 0}


@pytest.fixture
def registered():
  """Registers Tasks / Mixtures for one test (name -> kwargs) and removes them after."""
  names = []

  def add(name, mixture=None, **kwargs):
    if mixture is not None:
      seqio.MixtureRegistry.add(name, mixture)
    else:
      seqio.TaskRegistry.add(name, **kwargs)
    names.append((name, mixture is not None))
    return name
  yield add
  for name, is_mixture in names:
    (seqio.MixtureRegistry if is_mixture else seqio.TaskRegistry).remove(name)


def _lines_task(add, name, tmp_path, splits: dict, features=None, preprocessors=None):
  files = {}
  for split, lines in splits.items():
    files[split] = str(tmp_path / f"{name}-{split}.txt")
    with open(files[split], "w", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in lines))
  from tests_seqio.seqio_tasks import TEXT, line_as_inputs  # pylint: disable=g-import-not-at-top
  return add(name, source=seqio.TextLineDataSource(files),
             preprocessors=preprocessors or [line_as_inputs], output_features=features or TEXT)


# --------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("task", ["eva_test_lines", "eva_test_lines_bytes", "eva_test_lines_ids"])
def test_text_pretokenized_and_token_id_features_read_alike(task):
  got = read_seqio_prompts(task, "train", "inputs", modules=[MODULE])
  assert got.texts() == TRAIN  # a blank line and a case / space variant dropped
  assert got.stats == ALL_STATS
  assert [e.source for e in got] == [f"seqio:{task}/train:{n}" for n in (0, 1, 4, 5, 6)]
  assert got.files == [f"seqio:{task}/train"]
  assert got.examples[0].context == () and got.examples[0].metadata == {}


def test_limit_metadata_duplicates_and_max_prompt_tokens():
  got = read_seqio_prompts("eva_test_lines", "train", "inputs", modules=MODULE, limit=2,
                           metadata_keys=("line_length",))
  assert got.texts() == TRAIN[:2]
  assert [e.metadata for e in got] == [{"line_length": 12}, {"line_length": 25}]
  everything = read_seqio_prompts("eva_test_lines", "train", "inputs", modules=MODULE,
                                  drop_duplicates=False)
  assert len(everything) == 6 and everything.stats["dropped_duplicate"] == 0
  tok = ByteTokenizer()
  cap = len(encode_chat(tok, [{"role": "user", "content": "Name three primes."}]))
  short = read_seqio_prompts("eva_test_lines", "train", "inputs", modules=MODULE, tokenizer=tok,
                             max_prompt_tokens=cap)
  assert short.texts() == ["What is 2+2?", "Name three primes."]
  assert short.stats["dropped_too_long"] == 3


def test_tfrecord_task_with_chat_free_text_and_int_metadata(registered, tmp_path):
  path = str(tmp_path / "q.tfrecord")
  with tf.io.TFRecordWriter(path) as w:
    for n, q in enumerate(["alpha?", "beta?", "gamma?"]):
      w.write(tf.train.Example(features=tf.train.Features(feature={
          "question": tf.train.Feature(bytes_list=tf.train.BytesList(value=[q.encode()])),
          "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[100 + n])),
      })).SerializeToString())
  registered("eva_test_tfrecord", source=seqio.TFExampleDataSource(
      {"train": path}, feature_description={"question": tf.io.FixedLenFeature([], tf.string),
                                            "id": tf.io.FixedLenFeature([], tf.int64)}),
             preprocessors=[], output_features={})
  got = read_seqio_prompts("eva_test_tfrecord", "train", "question", metadata_keys=["id"])
  assert got.texts() == ["alpha?", "beta?", "gamma?"]
  assert [e.metadata for e in got] == [{"id": 100}, {"id": 101}, {"id": 102}]
  assert json.dumps([e.metadata for e in got])  # plain ints, not numpy
  with pytest.raises(PromptSourceError, match=r"the feature 'id' of the seqio Task "
                     r"'eva_test_tfrecord' is int64 of shape \[\]; a prompt feature holds one "
                     r"text \(a string\), chat messages"):
    read_seqio_prompts("eva_test_tfrecord", "train", "id")


def test_a_mixture_is_read_task_by_task_whole(registered, tmp_path):
  _lines_task(registered, "eva_test_mix_a", tmp_path, {"train": ["a1", "a2"]})
  _lines_task(registered, "eva_test_mix_b", tmp_path, {"train": ["b1"], "validation": ["bv"]})
  _lines_task(registered, "eva_test_mix_c", tmp_path, {"train": ["c1"]})
  registered("eva_test_mix", mixture=[("eva_test_mix_b", 3.0), ("eva_test_mix_a", 1.0),
                                      ("eva_test_mix_c", 0.0)])
  got = read_seqio_prompts("eva_test_mix", "train", "inputs")
  assert got.texts() == ["a1", "a2", "b1"]  # by task name; rate 0 left out
  assert got.files == ["seqio:eva_test_mix_a/train", "seqio:eva_test_mix_b/train"]
  assert read_seqio_prompts("eva_test_mix", "validation", "inputs").texts() == ["bv"]
  assert read_seqio_prompts("eva_test_mix", "train", "inputs", limit=1).files == [
      "seqio:eva_test_mix_a/train"]


# --------------------------------------------------------------------------------------------
# The source: gin, initial_prompts, held-out prompts


def test_gin_initial_prompts_with_a_heldout_split():
  gin.parse_config(f"""
      initial_prompts.source = "seqio"
      seqio_prompts.task = "eva_test_lines_bytes"
      seqio_prompts.modules = ["{MODULE}"]
      seqio_prompts.split = "train"
      seqio_prompts.feature = "inputs"
      seqio_prompts.heldout_split = "validation"
      seqio_prompts.limit = 4
  """)
  train, heldout = initial_prompts(tokenizer=ByteTokenizer())
  assert train.texts() == TRAIN[:4]
  assert heldout.texts() == VALIDATION
  assert heldout.files == ["seqio:eva_test_lines_bytes/validation"]
  # What the round loop makes of them: the buffer's conversations.
  from eva_jax.creator.buffer import PromptBuffer  # pylint: disable=g-import-not-at-top
  buf = PromptBuffer.from_texts(train.examples)
  assert [r.conversation() for r in buf.active_records()] == [
      [{"role": "user", "content": t}] for t in TRAIN[:4]]


def test_heldout_fraction_is_the_seeded_split_of_the_files_source():
  train, heldout = seqio_prompts(task="eva_test_lines", modules=MODULE, heldout_count=2, seed=3)
  assert len(train) == 3 and len(heldout) == 2
  assert sorted(train.texts() + heldout.texts()) == sorted(TRAIN)
  assert train.stats["held_out"] == 2 and train.stats["read"] == 7
  again, _ = seqio_prompts(task="eva_test_lines", modules=MODULE, heldout_count=2, seed=3)
  assert again.texts() == train.texts()
  _, other = seqio_prompts(task="eva_test_lines", modules=MODULE, heldout_fraction=0.4, seed=4)
  assert len(other) == 2


def test_train_from_seqio_heldout_from_prompt_files(tmp_path):
  path = tmp_path / "heldout.jsonl"
  path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Held 1?", "Held 2?"]))
  gin.parse_config(f"""
      initial_prompts.source = "seqio"
      seqio_prompts.task = "eva_test_lines"
      seqio_prompts.modules = ["{MODULE}"]
      seqio_prompts.heldout_paths = ["{path}"]
      seqio_prompts.heldout_limit = 1
  """)
  train, heldout = initial_prompts()
  assert train.texts() == TRAIN
  assert heldout.texts() == ["Held 1?"] and heldout.files == [str(path)]


# --------------------------------------------------------------------------------------------
# Bad input


def test_unknown_task_split_module_and_feature_are_named(registered, tmp_path):
  with pytest.raises(PromptSourceError, match=r"no seqio Task or Mixture named 'eva_test_line' "
                     r"is registered \(close: \['eva_test_lines'.*Import the module that "
                     r"registers it"):
    read_seqio_prompts("eva_test_line", modules=MODULE)
  with pytest.raises(PromptSourceError, match=r"the seqio Task 'eva_test_lines' has no split "
                     r"'test'; its splits are \['train', 'validation'\]"):
    read_seqio_prompts("eva_test_lines", "test", modules=MODULE)
  with pytest.raises(ImportError, match=r"cannot import 'no_such_tasks_module'"):
    read_seqio_prompts("eva_test_lines", modules=["no_such_tasks_module"])
  with pytest.raises(PromptSourceError, match=r"Task 'eva_test_lines_bytes' has no feature "
                     r"'targets'; its features are \['inputs', 'inputs_pretokenized', "
                     r"'line_length'\]. Set seqio_prompts.feature"):
    seqio_prompts(task="eva_test_lines_bytes", modules=MODULE, feature="targets",
                  heldout_split="validation")
  with pytest.raises(PromptSourceError, match=r"'line_length' of the seqio Task 'eva_test_lines' "
                     r"is int32 of shape \[\]; a prompt feature holds one text"):
    read_seqio_prompts("eva_test_lines", "train", "line_length", modules=MODULE)
  with pytest.raises(PromptSourceError, match=r"has no feature\(s\) \['id'\] \(metadata_keys\)"):
    read_seqio_prompts("eva_test_lines", modules=MODULE, metadata_keys=["id"])


def test_token_ids_without_a_vocabulary_are_refused(registered, tmp_path):
  from tests_seqio.seqio_tasks import line_as_inputs  # pylint: disable=g-import-not-at-top
  passthrough = {"inputs": seqio.Feature(seqio.PassThroughVocabulary(256))}

  @seqio.map_over_dataset
  def as_bytes(ex):
    return {"inputs": tf.cast(tf.io.decode_raw(ex["inputs"], tf.uint8), tf.int32)}
  _lines_task(registered, "eva_test_passthrough", tmp_path, {"train": ["abc"]},
              features=passthrough, preprocessors=[line_as_inputs, as_bytes])
  with pytest.raises(PromptSourceError, match=r"'inputs' of the seqio Task "
                     r"'eva_test_passthrough' holds token ids \(int32 of shape \[None\]\), not "
                     r"text, and its vocabulary \(PassThroughVocabulary\) cannot turn them into "
                     r"text, nor is there a 'inputs_pretokenized' copy"):
    read_seqio_prompts("eva_test_passthrough", "train", "inputs")


def test_an_empty_split_and_nothing_left_are_errors(registered, tmp_path):
  _lines_task(registered, "eva_test_empty", tmp_path, {"train": [], "validation": ["", " "]})
  with pytest.raises(PromptSourceError, match=r"the 'train' split of the seqio Task "
                     r"'eva_test_empty' holds no examples; fill it, or read another split"):
    read_seqio_prompts("eva_test_empty", "train", "inputs")
  with pytest.raises(PromptFileError, match=r"read_seqio_prompts: no prompt left in "
                     r"\['seqio:eva_test_empty/validation'\]: read 2, dropped 2 empty"):
    read_seqio_prompts("eva_test_empty", "validation", "inputs")


def test_a_missing_source_file_is_named(registered, tmp_path):
  from tests_seqio.seqio_tasks import TEXT, line_as_inputs  # pylint: disable=g-import-not-at-top
  missing = str(tmp_path / "gone.txt")
  registered("eva_test_missing_file", source=seqio.TextLineDataSource({"train": missing}),
             preprocessors=[line_as_inputs], output_features=TEXT)
  with pytest.raises(PromptSourceError, match=r"read_seqio_prompts: reading the 'train' split "
                     r"of the seqio Task 'eva_test_missing_file' failed: NotFoundError: .*"
                     r"gone.txt"):
    read_seqio_prompts("eva_test_missing_file", "train", "inputs")


def test_non_utf8_text_is_named(registered, tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes("ok\ncaf\u00e9\n".encode("latin-1"))
  from tests_seqio.seqio_tasks import TEXT, line_as_inputs  # pylint: disable=g-import-not-at-top
  registered("eva_test_latin1", source=seqio.TextLineDataSource({"train": str(path)}),
             preprocessors=[line_as_inputs], output_features=TEXT)
  with pytest.raises(PromptSourceError, match=r"seqio:eva_test_latin1/train:1: 'inputs' is not "
                     r"UTF-8 text"):
    read_seqio_prompts("eva_test_latin1", "train", "inputs")

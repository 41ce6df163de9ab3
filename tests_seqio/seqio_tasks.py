"""seqio Tasks over the text files in tests_seqio/data/, registered on import: what a user's
`seqio_prompts.modules = ["my_project.tasks"]` module does.

* eva_test_lines: each line as the string feature "inputs" (no vocabulary).
* eva_test_lines_bytes: each line tokenized with seqio.ByteVocabulary ("inputs" holds token
  ids; seqio.preprocessors.tokenize keeps the text as "inputs_pretokenized").
* eva_test_lines_ids: the same without the pretokenized copy (ids decoded with the vocabulary).
"""

import functools
import os

import seqio
import tensorflow as tf

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SPLITS = {"train": os.path.join(DATA, "train.txt"),
          "validation": os.path.join(DATA, "validation.txt")}


@seqio.map_over_dataset
def line_as_inputs(line):
  return {"inputs": line, "line_length": tf.strings.length(line)}


TEXT = {"inputs": seqio.Feature(seqio.PassThroughVocabulary(1), dtype=tf.string, rank=0)}
BYTES = {"inputs": seqio.Feature(seqio.ByteVocabulary())}


def _add(name, preprocessors, features):
  if name not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(name, source=seqio.TextLineDataSource(SPLITS),
                           preprocessors=preprocessors, output_features=features)


_add("eva_test_lines", [line_as_inputs], TEXT)
_add("eva_test_lines_bytes", [line_as_inputs, seqio.preprocessors.tokenize], BYTES)
_add("eva_test_lines_ids",
     [line_as_inputs, functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False)],
     BYTES)

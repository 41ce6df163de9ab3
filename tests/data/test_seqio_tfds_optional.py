"""The seqio / TFDS prompt sources without the `seqio` extra: registering them imports no
TensorFlow, reading says how to install it, and bad settings are refused before any import.
(tests_seqio/ reads real seqio Tasks and TFDS datasets, in an environment with the extra.)"""

from __future__ import annotations

import json
import subprocess
import sys

import gin
import pytest

from eva_jax.data import (PROMPT_SOURCES, initial_prompts, read_seqio_prompts,
                          read_tfds_prompts, seqio_prompts, tfds_prompts)

TF_MODULES = ("tensorflow", "seqio", "tensorflow_datasets")


@pytest.fixture
def no_tensorflow(monkeypatch):
  """As if the seqio extra were not installed, whether or not it is."""
  for name in TF_MODULES:
    monkeypatch.setitem(sys.modules, name, None)


def test_registering_the_sources_imports_no_tensorflow():
  child = (
      "import json, sys\n"
      "import gin\n"
      "import eva_jax.data as data\n"
      "gin.parse_config('initial_prompts.source = \"seqio\"\\n"
      "seqio_prompts.task = \"my_task\"\\n"
      "tfds_prompts.name = \"my_dataset\"')\n"
      "print(json.dumps({'sources': data.PROMPT_SOURCES.names(), 'loaded': sorted(\n"
      f"    m for m in sys.modules if m.split('.')[0] in {TF_MODULES!r})}}))\n")
  out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                       timeout=300, check=True)
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert {"files", "seqio", "tfds"} <= set(got["sources"])
  assert got["loaded"] == []


def test_reading_without_the_extra_says_how_to_install_it(no_tensorflow, tmp_path):
  hint = r'pip install "eva-jax\[seqio\]"'
  with pytest.raises(ImportError, match=rf"read_seqio_prompts: .*needs tensorflow.*{hint}"):
    read_seqio_prompts("my_task", "train", "inputs")
  with pytest.raises(ImportError, match=rf"read_tfds_prompts: .*needs tensorflow.*{hint}"):
    read_tfds_prompts("my_dataset", "train", "prompt", data_dir=str(tmp_path))
  # Through gin and initial_prompts, as a run reads them.
  gin.parse_config("""
      initial_prompts.source = "seqio"
      seqio_prompts.task = "my_task"
      seqio_prompts.heldout_split = "validation"
  """)
  with pytest.raises(ImportError, match=rf"seqio_prompts: .*{hint}"):
    initial_prompts()
  gin.clear_config()
  gin.parse_config("""
      initial_prompts.source = "tfds"
      tfds_prompts.name = "my_dataset"
      tfds_prompts.heldout_fraction = 0.25
  """)
  with pytest.raises(ImportError, match=rf"tfds_prompts: .*{hint}"):
    initial_prompts()


def test_bad_settings_are_refused_before_reading(no_tensorflow):
  # Each ValueError comes before TensorFlow would be imported (it is "missing" here).
  with pytest.raises(ValueError, match=r"seqio_prompts: no held-out prompts; set "
                     r"seqio_prompts.heldout_split"):
    seqio_prompts(task="t")
  with pytest.raises(ValueError, match=r"give one of heldout_split, heldout_paths and "
                     r"heldout_fraction / heldout_count; got heldout_split and heldout_paths"):
    seqio_prompts(task="t", heldout_split="validation", heldout_paths="h.jsonl")
  with pytest.raises(ValueError, match=r"heldout_split='train' is the training split"):
    tfds_prompts(name="d", heldout_split="train")
  with pytest.raises(ValueError, match=r"tfds_prompts: name=''; set tfds_prompts.name"):
    tfds_prompts(name="", heldout_split="test")
  with pytest.raises(ValueError, match=r"seqio_prompts: feature=None"):
    seqio_prompts(task="t", feature=None, heldout_fraction=0.1)
  with pytest.raises(ValueError, match=r"limit=0 must be >= 1"):
    seqio_prompts(task="t", limit=0, heldout_fraction=0.1)
  with pytest.raises(ValueError, match=r"heldout_limit=0 must be >= 1"):
    seqio_prompts(task="t", heldout_limit=0, heldout_split="validation")
  with pytest.raises(ValueError, match=r"max_prompt_tokens needs a tokenizer"):
    read_tfds_prompts("d", max_prompt_tokens=8)


def test_the_sources_are_registered():
  assert PROMPT_SOURCES.get("seqio") is seqio_prompts
  assert PROMPT_SOURCES.get("tfds") is tfds_prompts

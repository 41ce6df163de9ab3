"""A tiny TFDS dataset built from a generator (no download): `EvaTinyPrompts(data_dir=...)
.download_and_prepare()`; registered as "eva_tiny_prompts" on import."""

import numpy as np
import tensorflow_datasets as tfds

TRAIN = ["What is 2+2?", "Write a haiku.", "", "what is 2+2?", "Name a prime.", "Écris un mot."]
TEST = ["Explain recursion.", "What is the capital of Peru?"]


class EvaTinyPrompts(tfds.core.GeneratorBasedBuilder):
  """Prompts as text, nested text, chat messages and token ids."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    # disable_shuffling: the split keeps the generator's order (TFDS shuffles it otherwise).
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                 features=tfds.features.FeaturesDict({
                                     "prompt": tfds.features.Text(),
                                     "n": np.int64,
                                     "meta": {"question": tfds.features.Text()},
                                     "messages": tfds.features.Sequence({
                                         "role": tfds.features.Text(),
                                         "content": tfds.features.Text()}),
                                     "tokens": tfds.features.Tensor(shape=(None,),
                                                                    dtype=np.int64),
                                     "score": np.float32,
                                 }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(TRAIN), "test": self._generate_examples(TEST)}

  def _generate_examples(self, prompts):
    for n, p in enumerate(prompts):
      yield n, {"prompt": p, "n": n, "meta": {"question": f"Q{n}: {p}"},
                "messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": p or "(empty)"}],
                "tokens": np.arange(n + 1, dtype=np.int64), "score": float(n)}

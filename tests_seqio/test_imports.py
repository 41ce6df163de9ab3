"""With TensorFlow, seqio and TFDS installed, registering the sources (importing eva_jax.data,
parsing gin that names them) still imports none of them; reading does."""

import json
import subprocess
import sys

CHILD = r"""
import json, sys
import gin
import eva_jax.data, eva_jax.loop
gin.parse_config('initial_prompts.source = "seqio"\nseqio_prompts.task = "eva_test_lines"\n'
                 'seqio_prompts.modules = ["tests_seqio.seqio_tasks"]\n'
                 'seqio_prompts.heldout_split = "validation"')
def loaded():
  return sorted(m for m in sys.modules
                if m.split(".")[0] in ("tensorflow", "seqio", "tensorflow_datasets"))
before = loaded()
train, heldout = eva_jax.data.initial_prompts()
print(json.dumps({"before": before, "after": len(loaded()), "train": len(train)}))
"""


def test_registration_imports_no_tensorflow_reading_does():
  out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                       timeout=300, check=True)
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["before"] == []
  assert got["after"] > 0 and got["train"] == 5

"""How every benchmark reports: one JSON line on stdout, and the same object in a file."""

from __future__ import annotations

import json
import os
from typing import Optional


def emit(result: dict, out: Optional[str], default_name: str) -> dict:
  """Prints `result` as one JSON line and writes it to `out` (a `--out` flag), or else to
  $OUT/`default_name` when OUT is set; returns it. XLA_FLAGS, which change both compile time
  and speed (e.g. `--xla_gpu_autotune_level=0`), are recorded as `xla_flags`; and JAX's
  persistent compilation cache directory, where compile times may be cache loads instead."""
  import jax  # pylint: disable=import-outside-toplevel
  result = {**result, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "compilation_cache_dir": (jax.config.jax_compilation_cache_dir
                                      if jax.config.jax_enable_compilation_cache else None)}
  text = json.dumps(result)
  print(text, flush=True)
  path = out or (os.path.join(os.environ["OUT"], default_name) if os.environ.get("OUT")
                 else None)
  if path:
    with open(path, "w") as f:
      f.write(text + "\n")
  return result

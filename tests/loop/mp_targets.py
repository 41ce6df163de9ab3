"""What the 2-process loop test runs in each process (imported as tests.loop.mp_targets)."""

from __future__ import annotations

import importlib.util
import os

import jax

_spec = importlib.util.spec_from_file_location(
    "loop_helpers_mp", os.path.join(os.path.dirname(__file__), "helpers.py"))
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)


def run_rounds(workdir: str, bindings: list) -> dict:
  """Runs the fast tiny configuration in this process (one of several, or alone)."""
  status = H.run_here(workdir, bindings)
  return {"status": status, "process_index": jax.process_index(),
          "process_count": jax.process_count(), "devices": jax.device_count()}

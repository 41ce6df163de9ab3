"""The round-loop tests' shared, expensive fixture: one uninterrupted run to compare with."""

import importlib.util
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    "loop_helpers_conftest", os.path.join(os.path.dirname(__file__), "helpers.py"))
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
  """An uninterrupted 2-round run of the fast tiny configuration (in this process)."""
  workdir = tmp_path_factory.mktemp("reference")
  assert H.run_here(workdir) == 0
  return workdir

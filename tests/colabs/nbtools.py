"""Running the colabs/ notebooks in tests, papermill-style, with nbclient; and stripping them.

    nb = execute(path, {"NUM_ROUNDS": 2}, cwd=tmp_path)   # the executed notebook

Parameters are injected as papermill does: a code cell tagged "injected-parameters" with one
assignment per parameter, inserted right after the cell tagged "parameters" (which keeps its
defaults, so the injected values win). `probe` cells run after the notebook's last cell, in
the same kernel: tests use them to read what the notebook computed.

The kernel is the "python3" kernel of this Python (ipykernel in the same environment), started
with this process's environment (JAX_PLATFORMS, XLA_FLAGS and the compilation cache as
tests/conftest.py sets them) and the repository on PYTHONPATH.

As a script, strips outputs and execution counts from notebooks in place (what git keeps):

    python tests/colabs/nbtools.py strip colabs/*.ipynb
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Mapping, Optional, Sequence

import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLABS = os.path.join(REPO, "colabs")
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
# What the kernel must see as this process does.
ENV_CHECKED = ("JAX_PLATFORMS", "XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")


def notebook_paths() -> list[str]:
  return sorted(os.path.join(COLABS, f) for f in os.listdir(COLABS) if f.endswith(".ipynb"))


def read(path: str):
  with open(path, encoding="utf-8") as f:
    return nbformat.read(f, as_version=4)


def parameters_index(nb) -> int:
  """The index of the cell tagged "parameters" (ValueError if there is none)."""
  for i, cell in enumerate(nb.cells):
    if PARAMETERS_TAG in cell.get("metadata", {}).get("tags", []):
      return i
  raise ValueError("the notebook has no cell tagged 'parameters'")


def parameter_names(nb) -> list[str]:
  """The names the "parameters" cell assigns (ValueError if it does anything else)."""
  import ast  # pylint: disable=import-outside-toplevel
  names = []
  for node in ast.parse(nb.cells[parameters_index(nb)].source).body:
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and
            isinstance(node.targets[0], ast.Name)):
      raise ValueError(f"the parameters cell may only assign names; line {node.lineno} does "
                       f"something else: {ast.unparse(node)!r}")
    names.append(node.targets[0].id)
  return names


def inject_parameters(nb, params: Mapping[str, Any]):
  """A copy of `nb` with an "injected-parameters" cell after its "parameters" cell.

  Raises:
    ValueError: a name in `params` is not a parameter of the notebook (a typo would otherwise
      leave the default in force).
  """
  unknown = sorted(set(params) - set(parameter_names(nb)))
  if unknown:
    raise ValueError(f"not parameters of the notebook: {unknown}")
  nb = nbformat.from_dict(nb)  # a deep copy
  lines = ["# Parameters injected by tests/colabs"]
  lines += [f"{name} = {value!r}" for name, value in params.items()]
  cell = nbformat.v4.new_code_cell("\n".join(lines))
  cell.metadata["tags"] = [INJECTED_TAG]
  nb.cells.insert(parameters_index(nb) + 1, cell)
  return nb


def kernel_env() -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(
      os.pathsep) if p])
  env.setdefault("EVA_JAX_NO_PROGRESS", "1")
  env.setdefault("MPLBACKEND", "Agg")
  return env


def execute(path: str, params: Mapping[str, Any], cwd: str, *,
            probe: Sequence[str] = (), timeout: int = 600):
  """Runs notebook `path` with `params` injected (and `probe` cells appended) in a fresh
  "python3" kernel whose working directory is `cwd`; returns the executed notebook.

  Raises:
    nbclient.exceptions.CellExecutionError: a cell raised (its traceback in the message).
  """
  from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel
  nb = inject_parameters(read(path), params)
  # First, the kernel must be this environment's Python (where eva_jax and ipykernel are)
  # and see the environment the tests set (tests/conftest.py).
  env = kernel_env()
  same = {k: env.get(k) for k in ENV_CHECKED}
  nb.cells.insert(0, nbformat.v4.new_code_cell(
      "import os, sys\n"
      f"assert sys.prefix == {sys.prefix!r}, (sys.prefix, sys.executable)\n"
      f"assert {{k: os.environ.get(k) for k in {ENV_CHECKED!r}}} == {same!r}"))
  for source in probe:
    nb.cells.append(nbformat.v4.new_code_cell(source))
  client = NotebookClient(nb, kernel_name="python3", timeout=timeout,
                          resources={"metadata": {"path": str(cwd)}})
  start = time.perf_counter()
  client.execute(env=env)
  nb.metadata["eva_jax_test_seconds"] = time.perf_counter() - start
  return nb


def outputs_text(nb) -> str:
  """Every stream and text/plain output of the executed notebook, joined."""
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.get("output_type") == "stream":
        parts.append(out.get("text", ""))
      elif "data" in out:
        parts.append(out["data"].get("text/plain", ""))
  return "".join(parts)


def stripped_text(path: str) -> str:
  """The notebook's file content without outputs, execution counts and Colab's per-user
  metadata (what git keeps)."""
  nb = read(path)
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs = []
      cell.execution_count = None
    for key in ("executionInfo", "outputId", "colab"):
      cell.metadata.pop(key, None)
  return nbformat.writes(nb) + "\n"


def strip(path: str) -> bool:
  """Strips the notebook in place (see `stripped_text`); returns whether it changed."""
  after = stripped_text(path)
  with open(path, encoding="utf-8") as f:
    changed = f.read() != after
  if changed:
    with open(path, "w", encoding="utf-8") as f:
      f.write(after)
  return changed


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] != "strip":
    print(__doc__)
    return 2
  for path in argv[1:] or notebook_paths():
    if strip(path):
      print(f"stripped {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

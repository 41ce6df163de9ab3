"""The notebook tests' shared pieces: the notebook runner (nbtools.py, loaded by path: the
tests folder is not a package) and the quickstart's run, which inside_a_run.ipynb reads."""

import importlib.util
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    "colabs_nbtools", os.path.join(os.path.dirname(__file__), "nbtools.py"))
NB = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(NB)

# The quickstart, shrunk: 2 rounds of 16 closed-world prompts, 12 held-out, k = 4, 12 new
# tokens, 8 pairs a round (one step of 8 pairs: one pair per CPU device).
QUICKSTART_BINDINGS = [
    "closed_world_prompts.num_train = 16",
    "closed_world_prompts.heldout_per_level = 2",
    "EvaConfig.num_samples = 4",
    "EvaConfig.max_new_tokens = 12",
    "EvaConfig.eval_max_new_tokens = 12",
    "EvaConfig.pairs_per_round = 8",
    "EvaConfig.batch_size = 8",
    "EvaConfig.epochs = 1",
]
QUICKSTART_ROUNDS = 2


@pytest.fixture(scope="session")
def nbtools():
  return NB


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
  """quickstart.ipynb executed with small parameters: {"notebook", "workdir", "plot",
  "rounds"}."""
  folder = tmp_path_factory.mktemp("quickstart")
  workdir, plot = folder / "run", folder / "quickstart.png"
  nb = NB.execute(os.path.join(NB.COLABS, "quickstart.ipynb"),
                  dict(INSTALL=False, WORKDIR=str(workdir), NUM_ROUNDS=QUICKSTART_ROUNDS,
                       GIN_BINDINGS=QUICKSTART_BINDINGS, PLOT_PATH=str(plot)),
                  cwd=str(folder))
  return dict(notebook=nb, workdir=workdir, plot=plot, rounds=QUICKSTART_ROUNDS)

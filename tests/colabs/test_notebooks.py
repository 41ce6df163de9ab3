"""The colabs/ notebooks, executed on the CPU with small parameters (nbclient, a "python3"
kernel of this environment), and what each one produced: quickstart.ipynb's run and plot,
your_model.ipynb's exported checkpoint (loaded back here: the trained params' logits), with a
programmatic reward and with a tiny reward model, inside_a_run.ipynb's lineage tree and
figure; and that the notebooks in git are stripped and have a parameters cell."""

import json
import os

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_jax import metrics, models
from eva_jax.data import resolve_builtin

PNG = b"\x89PNG\r\n\x1a\n"
NOTEBOOKS = ("quickstart.ipynb", "your_model.ipynb", "inside_a_run.ipynb")
COLABS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "colabs")


def _assert_png(path) -> None:
  data = open(path, "rb").read()
  assert data[:8] == PNG and len(data) > 5000, (path, len(data))


# ------------------------------------------------------------------------------ in git


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_in_git_is_stripped_and_has_a_parameters_cell(name, nbtools):
  path = os.path.join(COLABS, name)
  raw = json.load(open(path, encoding="utf-8"))
  assert raw["nbformat"] == 4
  code = [c for c in raw["cells"] if c["cell_type"] == "code"]
  for cell in code:
    assert cell["outputs"] == [] and cell["execution_count"] is None, (
        f"{name} has outputs; strip it: python tests/colabs/nbtools.py strip {path}")
  assert "parameters" in code[0]["metadata"].get("tags", []), (
      f"{name}: the first code cell must be tagged 'parameters'")
  nb = nbtools.read(path)
  names = nbtools.parameter_names(nb)  # assignments only
  assert "INSTALL" in names and "EVA_JAX_SOURCE" in names
  assert nbtools.stripped_text(path) == open(path, encoding="utf-8").read(), (
      f"{name} is not stripped: python tests/colabs/nbtools.py strip {path}")


def test_injected_parameters_follow_the_parameters_cell(nbtools):
  nb = nbtools.read(os.path.join(COLABS, "quickstart.ipynb"))
  out = nbtools.inject_parameters(nb, {"NUM_ROUNDS": 1, "GIN_BINDINGS": ["a = 1"]})
  i = nbtools.parameters_index(out)
  assert out.cells[i + 1].metadata["tags"] == ["injected-parameters"]
  assert "NUM_ROUNDS = 1\nGIN_BINDINGS = ['a = 1']" in out.cells[i + 1].source
  assert len(out.cells) == len(nb.cells) + 1
  with pytest.raises(ValueError, match="NUM_ROUND"):
    nbtools.inject_parameters(nb, {"NUM_ROUND": 1})


# ------------------------------------------------------------------------------ executed


def test_quickstart_runs_the_rounds_and_plots(quickstart_run, nbtools):
  rounds = quickstart_run["rounds"]
  lines = metrics.read_metrics(quickstart_run["workdir"])
  assert [l["round"] for l in lines if "eval/reward_mean" in l] == list(range(rounds + 1))
  assert any(l.get("evolve/kept", 0) > 0 for l in lines)
  assert sorted(os.listdir(quickstart_run["workdir"] / "prompts")) == [
      f"round_{t}.jsonl" for t in range(1, rounds + 1)]
  _assert_png(quickstart_run["plot"])
  text = nbtools.outputs_text(quickstart_run["notebook"])
  assert f"eva_jax: done, {rounds} rounds" in text and "held-out evaluation per round" in text


def test_inside_a_run_draws_the_lineage_of_the_quickstart_run(quickstart_run, nbtools,
                                                              tmp_path):
  workdir = quickstart_run["workdir"]
  figure, probe = tmp_path / "lineage.png", tmp_path / "probe.json"
  nb = nbtools.execute(
      os.path.join(COLABS, "inside_a_run.ipynb"),
      dict(INSTALL=False, WORKDIR=str(workdir), LINEAGE_PATH=str(figure), MAX_TREES=1000),
      cwd=str(tmp_path),
      probe=[f"import json\njson.dump({{'edges': tree.edges, "
             f"'lines': len(figure.axes[0].lines)}}, open({str(probe)!r}, 'w'))"])
  # The edges, read here from the round files: every evolved prompt and its parent.
  want = []
  for t in range(1, quickstart_run["rounds"] + 1):
    for line in (workdir / "prompts" / f"round_{t}.jsonl").read_text().splitlines():
      record = json.loads(line)
      if record["parent_id"] is None:
        continue
      edge = (record["parent_id"], record["id"])
      assert record["lineage"][-1] == record["parent_id"]
      if record["round_born"] == t:  # born in round t
        want.append(edge)
      else:  # an earlier child, kept in round t's prompt set
        assert record["active"] and edge in want
  got = json.load(open(probe))
  assert [tuple(e) for e in got["edges"]] == want and want
  # Children of round 2 whose parents were born in round 1 or 0: the tree spans the rounds.
  assert {c.split("-")[0] for _, c in want} == {
      f"r{t}" for t in range(1, quickstart_run["rounds"] + 1)}
  assert got["lines"] == len(want)  # one line per edge (every tree drawn)
  _assert_png(figure)
  text = nbtools.outputs_text(nb)
  assert "eva rounds (held-out reward" in text and "seconds per phase" in text


def _tiny_reward_model(folder) -> str:
  """A random one-label Gemma 2 classifier on the byte tokenizer's ids, in HF format (written
  by eva_jax: no PyTorch needed)."""
  cfg = models.get_config("tiny", num_labels=1, dtype="float32", param_dtype="float32")
  model = models.GemmaForSequenceClassification(cfg)
  params = nn.unbox(model.init(jax.random.key(7), jnp.ones((1, 8), jnp.int32))["params"])
  models.save_hf(folder, model, params)
  return str(folder)


@pytest.mark.parametrize("reward_kind", ["programmatic", "model"])
def test_your_model_trains_one_round_and_exports_a_checkpoint_that_loads_back(
    reward_kind, nbtools, tmp_path):
  export, probe = tmp_path / "export", tmp_path / "probe.npz"
  params = dict(INSTALL=False, NUM_PROMPTS=16, NUM_SAMPLES=4, MAX_NEW_TOKENS=16,
                EXPORT_DIR=str(export))
  if reward_kind == "model":
    params.update(REWARD_KIND="model", REWARD_TOKENIZER="byte", REWARD_MAX_LENGTH=64,
                  REWARD_MODEL_PATH=_tiny_reward_model(tmp_path / "reward_model"))
  nb = nbtools.execute(
      os.path.join(COLABS, "your_model.ipynb"), params, cwd=str(tmp_path),
      probe=["import numpy as np\n"
             "probe_ids = np.asarray([prompt_ids[0]], np.int32)\n"
             f"np.savez({str(probe)!r}, ids=probe_ids, steps=int(state.step), "
             "pairs=len(pairs), reward=type(reward).__name__, "
             "logits=np.asarray(policy.apply({'params': state.params}, probe_ids)))"])
  got = np.load(probe)
  assert int(got["steps"]) >= 1 and int(got["pairs"]) >= 1
  assert str(got["reward"]) == {"programmatic": "ProgrammaticReward",
                                "model": "ModelReward"}[reward_kind]
  assert json.load(open(export / "config.json"))["architectures"] == ["Gemma2ForCausalLM"]
  # The export, loaded here, gives the trained params' logits, which differ from the
  # starting solver's (the round trained it).
  model, loaded = models.from_pretrained(str(export))
  logits = np.asarray(model.apply({"params": loaded}, got["ids"]))
  np.testing.assert_allclose(logits, got["logits"], rtol=1e-5, atol=1e-5)
  start, start_params = models.from_pretrained(resolve_builtin("builtin:closed_world_solver"))
  assert not np.allclose(np.asarray(start.apply({"params": start_params}, got["ids"])), logits)
  text = nbtools.outputs_text(nb)
  assert "exported to" in text and "the export loads back" in text

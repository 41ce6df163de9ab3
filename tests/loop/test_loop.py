"""The eva round loop end to end on the tiny config, in this process: outputs, resume after a
crash in every phase, bad inputs."""

import importlib.util
import json
import os

import numpy as np
import pytest

from eva_jax import checkpointing, metrics, solver
from eva_jax.loop import ConfigMismatchError, PHASES
from eva_jax.preemption import SimulatedCrash

_spec = importlib.util.spec_from_file_location(
    "loop_helpers", os.path.join(os.path.dirname(__file__), "helpers.py"))
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)


def test_two_rounds_write_metrics_checkpoints_config_and_prompts(reference_run):
  lines = metrics.read_metrics(reference_run)
  assert all("round" in line for line in lines)
  evals = [line for line in lines if "eval/reward_mean" in line]
  assert [e["round"] for e in evals] == [0, 1, 2]
  assert evals[0]["eval/win_rate"] == 0.5  # round 0 against itself: all ties
  phases = [(line["round"], line.get("phase")) for line in lines if line.get("phase")]
  assert [p for r, p in phases if r == 1] == list(PHASES) + ["end"]
  train = [line for line in lines if "train/loss" in line]
  assert train and all(np.isfinite(t["train/loss"]) for t in train)
  assert [t["step"] for t in train] == list(range(1, len(train) + 1))
  # Each round's learning-rate schedule spans that round's real number of steps.
  for r in (1, 2):
    rates = [t["train/learning_rate"] for t in train if t["round"] == r]
    schedule = solver.learning_rate_schedule(learning_rate=1e-4, warmup_ratio=0.0,
                                             total_steps=len(rates))
    np.testing.assert_allclose(rates, [float(schedule(i)) for i in range(len(rates))],
                               rtol=1e-5)
  assert any(line.get("evolve/kept", 0) > 0 for line in lines)

  config = (reference_run / "config.gin").read_text()
  assert "EvaConfig.num_samples = 2" in config and "get_config.name = 'tiny'" in config
  assert sorted(os.listdir(reference_run / "checkpoints")) == ["round", "train"]
  assert os.listdir(reference_run / "tensorboard")

  # Round files: the round's prompts and the children born in it, with lineage.
  rows = [json.loads(l) for l in (reference_run / "prompts" / "round_1.jsonl").read_text()
          .splitlines()]
  born = [r for r in rows if r["round_born"] == 1]
  assert born and all(r["parent_id"] and r["lineage"][-1] == r["parent_id"] and r["operator"]
                      for r in born)
  scored = [r for r in rows if r["round_born"] == 0]
  assert scored and all(r["round_scored"] == 1 and r["informativeness"] is not None
                        for r in scored)


def test_a_finished_run_started_again_does_nothing(reference_run, capsys):
  before = (reference_run / "metrics.jsonl").read_text()
  assert H.run_here(reference_run) == 0
  assert "is finished (2 rounds); nothing to do" in capsys.readouterr().out
  assert (reference_run / "metrics.jsonl").read_text() == before


def test_crash_in_every_phase_then_resume_equals_the_uninterrupted_run(reference_run,
                                                                        tmp_path):
  """One run crashed (in this process, as a kill would) once inside every phase of round 1,
  resumed each time: it ends bit-identical to the reference."""
  for phase in PHASES[:8] + ("train_step",) + PHASES[8:]:
    with pytest.raises(SimulatedCrash):
      H.run_here(tmp_path, fault=f"1:{phase}:raise")
  assert H.run_here(tmp_path) == 0
  H.assert_same_run(tmp_path, reference_run)


def test_resume_with_another_config_names_the_differing_binding(reference_run, tmp_path):
  with pytest.raises(SimulatedCrash):
    H.run_here(tmp_path, fault="1:reward:raise")
  with pytest.raises(ConfigMismatchError, match=r"EvaConfig.batch_size: 8 in the saved run, "
                                                r"4 now"):
    H.run_here(tmp_path, ["EvaConfig.batch_size = 4"])


def test_bad_inputs_get_clear_errors(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "fine"}\n{"prompt": oops}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2"):
    H.run_here(tmp_path / "w1", [f"load_train_and_heldout.train_paths = '{bad}'"])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    H.run_here(tmp_path / "w2", [f"load_train_and_heldout.train_paths = '{tmp_path}/no.jsonl'"])
  (tmp_path / "empty.jsonl").write_text("")
  with pytest.raises(ValueError, match="empty"):
    H.run_here(tmp_path / "w3",
               [f"load_train_and_heldout.train_paths = '{tmp_path}/empty.jsonl'"])
  with pytest.raises(ValueError, match="No configurable matching 'EvaConfg'"):
    H.run_here(tmp_path / "w4", ["EvaConfg.num_rounds = 3"])
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    if not os.access(locked, os.W_OK):  # root can write anywhere
      with pytest.raises(PermissionError, match="is not writable"):
        H.run_here(locked / "w")
  finally:
    locked.chmod(0o700)


def test_a_nan_reward_names_the_prompt_and_loses_nothing(tmp_path):
  from eva_jax.rewards import REWARD_FNS, RewardError  # pylint: disable=import-outside-toplevel

  calls = {"n": 0}

  def flaky(prompt, response):  # NaN on the 40th response scored: in round 1's reward phase
    calls["n"] += 1
    return float("nan") if calls["n"] == 40 else float(len(response))

  REWARD_FNS.register("nan_on_40th", flaky, overwrite=True)
  with pytest.raises(RewardError, match=r"no score for the response to prompt \d+ \('[^']+'\)"):
    H.run_here(tmp_path, ["ProgrammaticReward.fn = 'nan_on_40th'"])
  saved = checkpointing.RunCheckpointer(tmp_path)
  _, meta, _ = saved.latest()
  saved.close()
  assert meta["round"] == 1 and meta["done"] == ["sample"]  # what was finished is kept
  assert H.run_here(tmp_path, ["ProgrammaticReward.fn = 'nan_on_40th'"]) == 0


def test_reference_can_be_the_initial_policy(reference_run, tmp_path):
  """With reference="initial", round 2's reference log-probs come from the starting policy,
  not from round 1's trained one (round 1 starts from the starting policy: the same)."""
  assert H.run_here(tmp_path, ["EvaConfig.reference = 'initial'"]) == 0
  def ref(workdir, r):
    return next(line["reference/chosen_logp_mean"] for line in metrics.read_metrics(workdir)
                if line.get("phase") == "reference" and line["round"] == r)
  assert ref(tmp_path, 1) == ref(reference_run, 1)
  assert ref(tmp_path, 2) != ref(reference_run, 2)

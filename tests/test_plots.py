"""WORKDIR/plots from metrics.jsonl: one figure for the held-out reward, one for
informativeness, each with the overall series and one per group."""

import json

from eva_jax import plots


def test_plots_from_metrics(tmp_path):
  lines = [{"round": 0, "eval/reward_mean": 0.5, "eval/reward/level_1": 0.9,
            "eval/reward/level_2": 0.1}]
  for r in (1, 2):
    lines.append({"round": r, "phase": "select", "info/mean": 0.2 / r, "info/max": 1.0,
                  "info/family_add": 0.1, "info/family_string": 0.3})
    lines.append({"round": r, "eval/reward_mean": 0.5 + r / 10, "eval/reward/level_1": 0.9,
                  "eval/reward/level_2": 0.1 * r})
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  assert plots._series(lines, "eval/reward/", "eval/reward_mean") == {  # pylint: disable=protected-access
      "all": ([0, 1, 2], [0.5, 0.6, 0.7]), "level 1": ([0, 1, 2], [0.9, 0.9, 0.9]),
      "level 2": ([0, 1, 2], [0.1, 0.1, 0.2])}
  written = plots.write_plots(tmp_path)
  assert [p.rsplit("/", 1)[1] for p in written] == ["heldout_reward.png", "informativeness.png"]
  for p in written:
    assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_run_figure_draws_both_panels_and_leaves_the_backend_alone(tmp_path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  backend = matplotlib.get_backend()
  lines = [{"round": 0, "eval/reward_mean": 0.5},
           {"round": 1, "info/mean": 0.2, "info/max": 1.0, "info/family_add": 0.1},
           {"round": 1, "eval/reward_mean": 0.6}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  assert sorted(plots.run_series(lines)["informativeness"]) == ["all", "family add"]
  fig = plots.run_figure(tmp_path, tmp_path / "sub" / "run.png")
  assert [ax.get_title() for ax in fig.axes] == ["held-out reward",
                                                 "informativeness of the round's prompts"]
  assert (tmp_path / "sub" / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert len(plots.run_figure(lines[:1]).axes) == 1  # no informativeness yet: one panel
  plots.write_plots(tmp_path)
  assert matplotlib.get_backend() == backend

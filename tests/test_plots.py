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

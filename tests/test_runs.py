"""eva_jax.runs: the rounds of a workdir's metrics.jsonl side by side, and the lineage of the
prompts in its round files (hand-written files in the loop's format)."""

import json

import pytest

from eva_jax import runs


def _record(pid, text, *, parent=None, born=0, operator=None, active=False, lineage=(),
            info=None):
  return {"id": pid, "text": text, "parent_id": parent, "round_born": born,
          "operator": operator, "active": active, "lineage": list(lineage),
          "informativeness": info}


def _workdir(tmp_path):
  lines = [
      {"round": 0, "data/read": 3},
      {"round": 0, "phase": "evaluate", "eval/reward_mean": 0.5, "eval/win_rate": 0.5,
       "eval/reward/level_1": 0.9, "eval/reward/level_10": 0.0, "eval/reward/level_2": 0.1},
      {"round": 0, "phase": "end"},
  ]
  for r in (1, 2):
    lines += [
        {"round": r, "phase": "select", "select/prompts": 3, "select/selected": 1,
         "info/mean": 0.1 * r},
        {"round": r, "phase": "evolve", "evolve/kept": r},
        {"round": r, "phase": "pairs", "pairs/train": 4},
        {"round": r, "step": 2 * r - 1, "epoch": 0, "train/loss": 0.7,
         "train/rewards/accuracies": 0.0},
        {"round": r, "step": 2 * r, "epoch": 0, "train/loss": 0.5,
         "train/rewards/accuracies": 1.0},
        {"round": r, "phase": "train", "train/steps": 2},
        {"round": r, "phase": "evaluate", "eval/reward_mean": 0.5 + r / 10,
         "eval/win_rate": 0.6, "eval/reward/level_1": 1.0},
    ]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  rounds = {
      1: [_record("r0-00000", "a", active=True, info=0.5),
          _record("r0-00001", "b", active=True, info=0.0),
          _record("r0-00002", "c", active=True, info=0.1),
          _record("r1-00000", "a+", parent="r0-00000", born=1, operator="deeper",
                  lineage=["r0-00000"])],
      2: [_record("r0-00001", "b", active=True, info=0.2),
          _record("r1-00000", "a+", parent="r0-00000", born=1, operator="deeper",
                  active=True, lineage=["r0-00000"], info=0.7),
          _record("r2-00000", "a++", parent="r1-00000", born=2, operator="deeper",
                  lineage=["r0-00000", "r1-00000"]),
          _record("r2-00001", "b'", parent="r0-00001", born=2, operator="sibling",
                  lineage=["r0-00001"])],
  }
  (tmp_path / "prompts").mkdir()
  for t, records in rounds.items():
    (tmp_path / "prompts" / f"round_{t}.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records))
  (tmp_path / "prompts" / "notes.txt").write_text("not a round file")
  return tmp_path


def test_round_summaries_and_table(tmp_path):
  workdir = _workdir(tmp_path)
  rows = runs.round_summaries(workdir, group="level")
  assert [r["round"] for r in rows] == [0, 1, 2]
  assert rows[0]["eval/reward_mean"] == 0.5 and rows[0]["train/loss"] is None
  assert rows[0]["info/mean"] is None and rows[0]["level 10"] == 0.0
  assert list(k for k in rows[0] if k.startswith("level")) == ["level 1", "level 2", "level 10"]
  assert rows[2]["train/loss"] == pytest.approx(0.6)  # the mean of the round's steps
  assert rows[2]["train/rewards/accuracies"] == 0.5
  assert rows[2]["evolve/kept"] == 2 and rows[2]["train/steps"] == 2
  assert rows[1]["eval/reward_mean"] == pytest.approx(0.6)
  assert "level 1" not in runs.round_summaries(workdir)[0]

  table = runs.round_table(workdir, group="level", title=None).splitlines()
  assert table[0].split() == ["round", "eval", "reward", "win", "rate", "level", "1", "level",
                              "2", "level", "10", "info", "prompts", "selected", "evolved",
                              "pairs", "steps", "loss", "accuracy"]
  assert len(table) == 2 + 3
  assert table[2].split()[0] == "0" and "-" in table[2].split()  # round 0 trained nothing


def test_lineage_edges_roots_and_ancestry(tmp_path):
  tree = runs.read_lineage(_workdir(tmp_path))
  assert tree.edges == [("r0-00000", "r1-00000"), ("r1-00000", "r2-00000"),
                        ("r0-00001", "r2-00001")]
  assert tree.rounds == {1: ["r0-00000", "r0-00001", "r0-00002"],
                         2: ["r0-00001", "r1-00000"]}
  assert tree.roots() == ["r0-00000", "r0-00001"]  # the most descendants first
  assert tree.descendants("r0-00000") == ["r1-00000", "r2-00000"]
  assert tree.children("r0-00002") == []
  assert tree.ancestry("r2-00000") == ["r0-00000", "r1-00000", "r2-00000"]
  assert tree.parent("r2-00001") == "r0-00001"
  # A node's record is the latest one (round 2's statistics).
  assert tree.nodes["r1-00000"]["informativeness"] == 0.7


def test_lineage_of_records_whose_ancestors_are_in_no_file():
  tree = runs.read_lineage({3: [_record("r3-00000", "x", parent="r2-00004", born=3,
                                        operator="o", lineage=["r1-00001", "r2-00004"])]})
  assert tree.nodes["r2-00004"] == {"id": "r2-00004", "text": None}
  assert "r1-00001" in tree.nodes and tree.edges == [("r2-00004", "r3-00000")]


def test_draw_lineage_draws_every_edge_and_saves_a_png(tmp_path):
  pytest.importorskip("matplotlib")
  tree = runs.read_lineage(_workdir(tmp_path))
  fig = runs.draw_lineage(tree, tmp_path / "out" / "lineage.png")
  assert len(fig.axes[0].lines) == len(tree.edges)
  assert (tmp_path / "out" / "lineage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  fig = runs.draw_lineage(tree, max_trees=1)  # only the first tree: a -> a+ -> a++
  assert len(fig.axes[0].lines) == 2


def test_missing_or_damaged_round_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="has not finished a round"):
    runs.read_round_prompts(tmp_path)
  (tmp_path / "prompts").mkdir()
  (tmp_path / "prompts" / "round_1.jsonl").write_text('{"id": 1}\nnot json\n')
  with pytest.raises(ValueError, match=r"round_1.jsonl:2: not JSON"):
    runs.read_round_prompts(tmp_path)

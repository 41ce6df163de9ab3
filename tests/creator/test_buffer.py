"""The prompt buffer: ids, lineage, statistics, the next round's set, JSONL round trip."""

import json

import numpy as np
import pytest

from eva_jax.creator import PromptBuffer


def _buffer_with_children():
  buf = PromptBuffer.from_texts(["Name a prime.", "Say hi.", "Count to 3.", "Spell cat."])
  a = buf.add("Name a prime above 100.", round_born=1, parent_id="r0-00000",
              operator="add_constraints")
  b = buf.add("Name a prime above 100 and prove it.", round_born=1, parent_id=a.id,
              operator="increase_reasoning")
  c = buf.add("As a teacher, say hi.", round_born=1, parent_id="r0-00001", operator="persona")
  return buf, [a.id, b.id, c.id]


def test_ids_are_sequential_per_round_and_ancestry_walks_to_the_root():
  buf, kids = _buffer_with_children()
  assert buf.active == ["r0-00000", "r0-00001", "r0-00002", "r0-00003"]
  assert kids == ["r1-00000", "r1-00001", "r1-00002"]
  assert [r.id for r in buf.ancestry("r1-00001")] == ["r0-00000", "r1-00000", "r1-00001"]
  assert buf["r1-00001"].operator == "increase_reasoning"
  with pytest.raises(KeyError, match="'r9-00000' is not in the buffer"):
    buf.ancestry("r9-00000")
  with pytest.raises(KeyError, match="parent 'nope' is not in the buffer"):
    buf.add("x", parent_id="nope")


def test_statistics_and_next_round():
  buf, kids = _buffer_with_children()
  rewards = np.array([[1.0, 3.0], [2.0, 2.0], [np.nan, np.nan], [0.0, 4.0]])
  buf.update_statistics(buf.active, rewards, [2.0, 0.0, np.nan, 4.0], round_index=1)
  r = buf["r0-00003"]
  assert (r.reward_mean, r.reward_max, r.reward_min, r.informativeness, r.num_scored) == (
      2.0, 4.0, 0.0, 4.0, 2)
  assert buf["r0-00002"].reward_mean is None and buf["r0-00002"].num_scored == 0

  counts = buf.next_round(kids, retain_fraction=0.5, retain="informative")
  assert counts == {"buffer/retained": 2, "buffer/children": 3, "buffer/active": 5}
  assert buf.active == ["r0-00000", "r0-00003"] + kids  # the two most informative
  assert len(buf.records) == 7  # every prompt is kept for lineage


def test_next_round_random_retention_is_seeded_and_errors():
  buf, kids = _buffer_with_children()
  clone, _ = _buffer_with_children()
  buf.next_round(kids, retain_fraction=0.5, seed=3)
  clone.next_round(kids, retain_fraction=0.5, seed=3)
  assert buf.active == clone.active and len(buf.active) == 5
  with pytest.raises(ValueError, match="retain_fraction=2 must be in"):
    buf.next_round(kids, retain_fraction=2)
  with pytest.raises(ValueError, match="the next round has no prompts"):
    buf.next_round([], retain_fraction=0.0)
  with pytest.raises(ValueError, match="the initial prompt set is empty"):
    PromptBuffer.from_texts([])


def test_jsonl_round_trip_with_lineage(tmp_path):
  buf, kids = _buffer_with_children()
  buf.update_statistics(buf.active, np.ones((4, 2)), np.zeros(4), round_index=1)
  buf.next_round(kids)
  buf.save(tmp_path / "buffer.jsonl")
  lines = (tmp_path / "buffer.jsonl").read_text().splitlines()
  assert len(lines) == 7 and json.loads(lines[4])["parent_id"] == "r0-00000"
  loaded = PromptBuffer.load(tmp_path / "buffer.jsonl")
  assert loaded.active == buf.active
  assert loaded.to_jsonl() == buf.to_jsonl()
  # A new prompt after loading gets the next free id of its round.
  assert loaded.add("new", round_born=1).id == "r1-00003"
  round_file = [json.loads(l) for l in buf.to_jsonl(buf.active, lineage=True).splitlines()]
  assert round_file[1]["lineage"] == ["r0-00000", "r1-00000"]

  (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{not json\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
    PromptBuffer.load(tmp_path / "bad.jsonl")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    PromptBuffer.load(tmp_path / "missing.jsonl")

"""eva_jax.metrics: metrics.jsonl commit / restore, TensorBoard files read back by TensorBoard's
own reader, progress bars, the summary table.

The TensorBoard tests need the `tensorboard` package (pure Python reader, no TensorFlow; it
belongs in the `test` extra). The gs:// test runs against the GCS emulator of
eva_jax.testing.gcs (fake-gcs-server, from the `test` extra).
"""

from __future__ import annotations

import io
import json
import math
import os
import struct

import google_crc32c
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from eva_jax import metrics
from eva_jax.metrics import MetricsWriter, format_table, read_metrics


def _raw_lines(workdir) -> list[str]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return f.read().splitlines()


def _phase(writer: MetricsWriter, round_index: int, phase: int) -> None:
  """A phase's lines: a few train steps and an evaluation, values a function of the phase."""
  for k in range(3):
    step = 10 * (2 * round_index + phase) + k
    writer.log({"round": round_index, "phase": f"p{phase}", "train/loss": 1.0 / (step + 1),
                "train/accuracy": np.float32(0.25 * k), "time/train_s": 0.001 * step},
               step=step)
  writer.log({"round": round_index, "eval/reward_mean": float(round_index + phase) / 4,
              "filter/dropped": [phase, 2]})


def _without_times(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


# --------------------------------------------------------------------------------------------
# metrics.jsonl


def test_lines_wait_for_commit_then_append(tmp_path):
  w = MetricsWriter(tmp_path, enabled=True)
  w.log({"round": 0, "train/loss": 0.5}, step=3)
  w.log({"eval/reward_mean": 1.25, "round": 0})
  assert w.num_pending == 2 and w.num_lines == 0
  assert _raw_lines(tmp_path) == []  # nothing on disk before commit
  assert w.commit() == 2
  assert w.num_pending == 0 and w.num_lines == 2
  assert read_metrics(tmp_path) == [{"round": 0, "train/loss": 0.5},
                                    {"round": 0, "eval/reward_mean": 1.25}]
  # "round" leads every line, whatever the order of the dict.
  assert all(line.startswith('{"round": 0') for line in _raw_lines(tmp_path))
  w.log({"round": 1, "eval/reward_mean": 2.0})
  assert w.commit() == 3 and w.commit() == 3  # an empty commit writes nothing
  assert [r["round"] for r in read_metrics(str(tmp_path))] == [0, 0, 1]


def test_values_become_plain_json_and_nan_is_null(tmp_path):
  w = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
  w.log({"round": np.int64(2), "a": np.float32(0.5), "b": np.int32(7), "c": np.bool_(True),
         "d": jnp.float32(1.5), "e": jnp.asarray(3, jnp.int32), "f": float("nan"),
         "g": np.float32("inf"), "h": -math.inf, "i": None, "j": "text",
         "k": np.array([1.0, np.nan, 2.0], np.float32), "l": (1, np.int8(2)),
         "m": np.array(4.0)})
  w.commit()
  raw = _raw_lines(tmp_path)[0]
  assert "NaN" not in raw and "Infinity" not in raw

  def no_constants(name):
    raise AssertionError(f"{name} in {raw}")

  record = json.loads(raw, parse_constant=no_constants)  # strict JSON
  assert record == {"round": 2, "a": 0.5, "b": 7, "c": True, "d": 1.5, "e": 3, "f": None,
                    "g": None, "h": None, "i": None, "j": "text", "k": [1.0, None, 2.0],
                    "l": [1, 2], "m": 4.0}
  assert {type(record[k]) for k in ("round", "b", "e")} == {int}


def test_bad_records_are_refused_with_a_reason(tmp_path):
  w = MetricsWriter(tmp_path, enabled=True)
  with pytest.raises(ValueError, match="no 'round' key.*add 'round'"):
    w.log({"train/loss": 1.0})
  with pytest.raises(ValueError, match="'round' must be an integer"):
    w.log({"round": 1.5})
  with pytest.raises(ValueError, match="'round' must be an integer"):
    w.log({"round": True})
  with pytest.raises(ValueError, match="step must be >= 0"):
    w.log({"round": 0}, step=-1)
  with pytest.raises(TypeError, match="'nested' is a dict; flatten it into keys like"):
    w.log({"round": 0, "nested": {"a": 1}})
  with pytest.raises(ValueError, match=r"'big' is an array of shape \(2, 2\)"):
    w.log({"round": 0, "big": np.zeros((2, 2))})
  with pytest.raises(TypeError, match="'obj' has type object"):
    w.log({"round": 0, "obj": object()})
  with pytest.raises(TypeError, match="keys are non-empty strings"):
    w.log({"round": 0, 3: 1.0})
  assert w.num_pending == 0 and w.commit() == 0
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_disabled_process_counts_but_writes_nothing(tmp_path):
  w = MetricsWriter(tmp_path / "run", enabled=False)
  _phase(w, 0, 0)
  assert w.commit() == 4
  w.restore(2)
  assert w.num_lines == 2
  _phase(w, 0, 1)
  assert w.commit() == 6
  assert not os.path.exists(tmp_path / "run")
  with pytest.raises(ValueError, match="no 'round' key"):  # same checks as on process 0
    w.log({})


def test_restore_drops_lines_of_an_unsaved_phase(tmp_path):
  # Uninterrupted: 2 rounds x 2 phases.
  full = MetricsWriter(tmp_path / "full", enabled=True)
  for r in range(2):
    for p in range(2):
      _phase(full, r, p)
      full.commit()

  # Interrupted: phase (0, 1) is committed but its checkpoint is never saved; (1, 0) is
  # logged but not even committed. The restarted process resumes after phase (0, 0).
  run = tmp_path / "run"
  w = MetricsWriter(run, enabled=True)
  _phase(w, 0, 0)
  saved = w.commit()
  _phase(w, 0, 1)
  w.commit()
  _phase(w, 1, 0)
  with open(run / "metrics.jsonl", "ab") as f:
    f.write(b'{"round": 1, "cut sh')  # a commit cut short by the crash
  assert len(_raw_lines(run)) == 9

  resumed = MetricsWriter(run, enabled=True)
  assert resumed.num_lines == 8  # the partial line is not a line
  assert len(_raw_lines(run)) == 8  # ... and is gone, so appends start on a fresh line
  resumed.restore(saved)
  assert resumed.num_lines == saved == 4 and len(_raw_lines(run)) == 4
  for r, p in [(0, 1), (1, 0), (1, 1)]:
    _phase(resumed, r, p)
    resumed.commit()
  assert _without_times(read_metrics(run)) == _without_times(read_metrics(tmp_path / "full"))
  assert resumed.num_lines == full.num_lines == 16

  # Pending lines are dropped by restore; a checkpoint counting lines that are gone is named.
  resumed.log({"round": 9})
  resumed.restore(16)
  assert resumed.num_pending == 0
  with pytest.raises(ValueError, match=r"metrics.jsonl has 16 complete lines, but the "
                     r"checkpoint being resumed counts 17.*fresh workdir"):
    resumed.restore(17)


def test_read_metrics_names_a_missing_file_and_a_bad_line(tmp_path):
  with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
    read_metrics(tmp_path)
  (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n{"round": \n[1]\n{"round": 1')
  with pytest.raises(ValueError, match="metrics.jsonl, line 2: not valid JSON"):
    read_metrics(tmp_path)
  (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n[1]\n')
  with pytest.raises(ValueError, match="line 2: a JSON object was expected, got list"):
    read_metrics(tmp_path)
  (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1')
  assert read_metrics(tmp_path) == [{"round": 0}]  # a last line cut short is left out


# --------------------------------------------------------------------------------------------
# TensorBoard, read back with TensorBoard's own reader.


def _event_files(workdir) -> list[str]:
  d = os.path.join(workdir, "tensorboard")
  return sorted(os.path.join(d, n) for n in os.listdir(d))


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
  # pylint: disable-next=g-import-not-at-top
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _check_records(path) -> list[bytes]:
  """TFRecord framing checked with google-crc32c (not the writer's code); the payloads."""
  def masked(data):
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

  with open(path, "rb") as f:
    buf = f.read()
  payloads, pos = [], 0
  while pos < len(buf):
    (length,) = struct.unpack("<Q", buf[pos:pos + 8])
    assert struct.unpack("<I", buf[pos + 8:pos + 12])[0] == masked(buf[pos:pos + 8])
    data = buf[pos + 12:pos + 12 + length]
    assert struct.unpack("<I", buf[pos + 12 + length:pos + 16 + length])[0] == masked(data)
    payloads.append(data)
    pos += 16 + length
  assert pos == len(buf)
  return payloads


def test_tensorboard_scalars_read_back(tmp_path):
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  w = MetricsWriter(tmp_path, enabled=True)
  w.log({"round": 0, "train/loss": 0.75, "train/accuracy": np.float32(0.5), "phase": "train",
         "ok": True, "sizes": [1, 2]}, step=7)
  w.log({"round": 0, "train/loss": 0.5}, step=8)
  w.log({"round": 1, "eval/reward_mean": -1.25, "eval/nan": float("nan"), "big": 1e39})
  w.commit()
  files = _event_files(tmp_path)
  assert len(files) == 1 and "tfevents" in os.path.basename(files[0])

  events = [event_pb2.Event.FromString(p) for p in _check_records(files[0])]
  assert events[0].file_version == "brain.Event:2"
  assert [e.step for e in events[1:]] == [7, 8, 1]
  assert all(e.wall_time > 1e9 for e in events)

  got = _scalars(tmp_path / "tensorboard")
  assert set(got) == {"train/loss", "train/accuracy", "eval/reward_mean", "eval/nan", "big"}
  assert got["train/loss"] == [(7, 0.75), (8, 0.5)]
  assert got["train/accuracy"] == [(7, 0.5)]
  assert got["eval/reward_mean"] == [(1, -1.25)]  # step = the round when none is given
  assert math.isnan(got["eval/nan"][0][1]) and got["big"] == [(1, math.inf)]


def test_tensorboard_matches_metrics_after_resume(tmp_path):
  full = MetricsWriter(tmp_path / "full", enabled=True)
  for p in range(3):
    _phase(full, 0, p)
    full.commit()

  run = tmp_path / "run"
  w = MetricsWriter(run, enabled=True)
  _phase(w, 0, 0)
  saved = w.commit()
  _phase(w, 0, 1)
  w.commit()
  _phase(w, 0, 2)
  w.commit()
  resumed = MetricsWriter(run, enabled=True)
  resumed.restore(saved)
  assert len(_event_files(run)) == 1  # one event file, cut back like metrics.jsonl
  assert len(_check_records(_event_files(run)[0])) == 1 + saved
  for p in (1, 2):
    _phase(resumed, 0, p)
    resumed.commit()
  assert len(_event_files(run)) == 1
  want = _scalars(tmp_path / "full" / "tensorboard")
  assert _scalars(run / "tensorboard") == want
  assert want["eval/reward_mean"] == [(0, 0.0), (0, 0.25), (0, 0.5)]
  assert [s for s, _ in want["train/loss"]] == [0, 1, 2, 10, 11, 12, 20, 21, 22]

  # Event files that lack committed lines (a crash between the two writes of a commit) are
  # completed from metrics.jsonl, so that lines and events stay one to one.
  for path in _event_files(run):
    os.remove(path)
  rebuilt = MetricsWriter(run, enabled=True)
  assert len(_check_records(_event_files(run)[0])) == 1 + rebuilt.num_lines


def test_crc32c_fallback_matches_google_crc32c():
  assert metrics.crc32c_python(b"123456789") == 0xE3069283  # the CRC-32C check value
  rng = np.random.default_rng(0)
  for n in (0, 1, 7, 100, 1000):
    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    assert metrics.crc32c_python(data) == google_crc32c.value(data)


# --------------------------------------------------------------------------------------------
# gs://


def test_gs_workdir_commit_restore_and_tensorboard(tmp_path):
  from eva_jax.testing.gcs import gcs_emulator  # pylint: disable=g-import-not-at-top
  with gcs_emulator() as bucket:
    workdir = f"{bucket}/run"
    w = MetricsWriter(workdir, enabled=True)
    _phase(w, 0, 0)
    assert not epath.Path(f"{workdir}/metrics.jsonl").exists()  # pending until commit
    saved = w.commit()
    assert saved == 4 and len(read_metrics(workdir)) == 4
    _phase(w, 0, 1)
    w.commit()
    assert len(read_metrics(workdir)) == 8

    resumed = MetricsWriter(workdir, enabled=True)
    assert resumed.num_lines == 8
    resumed.restore(saved)
    assert len(read_metrics(workdir)) == 4
    _phase(resumed, 0, 1)
    resumed.log({"round": 0, "extra": 1})
    assert resumed.commit() == 9
    records = read_metrics(workdir)
    assert [r.get("phase") for r in records] == ["p0"] * 3 + [None] + ["p1"] * 3 + [None] * 2

    tb = list(epath.Path(f"{workdir}/tensorboard").iterdir())
    assert len(tb) == 1
    (tmp_path / tb[0].name).write_bytes(tb[0].read_bytes())
  assert len(_check_records(tmp_path / tb[0].name)) == 1 + 9
  got = _scalars(tmp_path)
  assert [s for s, _ in got["train/loss"]] == [0, 1, 2, 10, 11, 12]
  assert got["extra"] == [(0, 1.0)]


# --------------------------------------------------------------------------------------------
# Progress, timers, tables.


def test_progress_bar_shows_on_process0_and_hides_on_request(monkeypatch):
  monkeypatch.delenv(metrics.NO_PROGRESS_ENV, raising=False)
  out = io.StringIO()
  with metrics.progress(total=5, desc="scoring", unit="pair", file=out) as bar:
    assert not bar.disable
    bar.update(2)
    bar.update(3)
  assert bar.n == 5
  assert "scoring" in out.getvalue() and "5/5" in out.getvalue()

  monkeypatch.setenv(metrics.NO_PROGRESS_ENV, "1")
  out = io.StringIO()
  bar = metrics.progress(range(4), desc="sampling", file=out)
  assert list(bar) == [0, 1, 2, 3] and bar.disable and out.getvalue() == ""
  monkeypatch.delenv(metrics.NO_PROGRESS_ENV)
  bar = metrics.progress(range(2), enabled=False, file=out)
  assert list(bar) == [0, 1] and out.getvalue() == ""


def test_timed_adds_up_phase_times():
  times = {}
  for _ in range(2):
    with metrics.timed(times, "time/sample_s"):
      pass
  with pytest.raises(RuntimeError):
    with metrics.timed(times, "time/train_s"):
      raise RuntimeError("the time of a failed phase is still recorded")
  assert set(times) == {"time/sample_s", "time/train_s"}
  assert all(isinstance(v, float) and v >= 0 for v in times.values())


def test_format_table_aligns_and_shortens():
  table = format_table(
      ["phase", "seconds", "tokens/s", "note"],
      [["sample", 12.34567, 123456.7, None],
       ["train", 0.5, np.int64(42), "x" * 60],
       ["evaluate", 1e-5, 3e7, "ok"]],
      title="round 0", max_width=20)
  lines = table.split("\n")
  assert lines[0] == "round 0"
  header, rule, rows = lines[1], lines[2], lines[3:]
  assert len(rows) == 3
  widths = [len(d) for d in rule.split("  ")]
  starts = [sum(widths[:j]) + 2 * j for j in range(len(widths))]

  def cell(line, j):
    return line[starts[j]:starts[j] + widths[j]]

  # Numbers right-aligned (their header too), text left-aligned.
  assert [cell(r, 1) for r in [header] + rows] == [
      "seconds".rjust(widths[1]), "12.35".rjust(widths[1]), "0.5".rjust(widths[1]),
      "1.000e-05".rjust(widths[1])]
  assert [cell(r, 2).strip() for r in rows] == ["123457", "42", "3.000e+07"]
  assert cell(rows[1], 2).endswith("42") and cell(header, 2).endswith("tokens/s")
  assert cell(rows[2], 0) == "evaluate" and cell(rows[1], 0).startswith("train ")
  assert cell(rows[0], 3).strip() == "-"
  assert cell(rows[1], 3) == "x" * 19 + "…" and widths[3] == 20
  assert all(not line.endswith(" ") for line in lines)
  with pytest.raises(ValueError, match="row 1 has 1 cells but there are 2 headers"):
    format_table(["a", "b"], [[1, 2], [3]])

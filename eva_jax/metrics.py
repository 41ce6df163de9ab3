"""What a run reports: `WORKDIR/metrics.jsonl`, TensorBoard scalars, progress bars, tables.

    writer = MetricsWriter(workdir)           # writes on process 0 only
    writer.restore(saved_num_lines)           # on resume: drop lines of an unsaved phase
    writer.log({"round": 0, "train/loss": 0.69}, step=12)
    writer.log({"round": 0, "eval/reward_mean": 1.3})
    num_lines = writer.commit()               # then save `num_lines` with the checkpoint

`metrics.jsonl` is the record of a run: one JSON object a line, each with "round" (each
round's evaluation line has "eval/reward_mean"). TensorBoard event files under
`WORKDIR/tensorboard/` mirror it, one `Event` per line, so that the two can be cut back to the
same point.

Why lines are queued until `commit`. A run resumes from the last phase it saved, and a resumed
run must end with the same lines as an uninterrupted one. So the loop logs a phase's lines,
commits them when the phase ends, then saves its checkpoint with `num_lines`; a resumed run
calls `restore(num_lines)`, which drops whatever a phase that was never saved had written.
Committing before saving matters: a checkpoint must never count lines that are not on disk.

Storage. The workdir is a local folder or a `gs://` URL (through `etils.epath`). Locally,
`commit` appends, flushes and fsyncs. Objects on GCS cannot be appended to, so there `commit`
rewrites the whole object from the lines in memory: commit once per phase, not per step.

TensorBoard without TensorFlow. Event files are TFRecord files (length, masked CRC32C of the
length, data, masked CRC32C of the data) of `Event` protocol buffers, encoded here by hand:
first an `Event{wall_time, file_version: "brain.Event:2"}`, then one
`Event{wall_time, step, summary}` per line, with one `Summary.Value{tag, simple_value}` per
number in the line (tag = the metric key, e.g. "train/loss"; "round" is not repeated as a
scalar). `restore` cuts the event file back to the same line as `metrics.jsonl` and writes it
as a new file (later name, old one deleted): a TensorBoard left running across a resume may
keep showing the dropped points until it is reloaded.

Several processes: only process 0 writes files; the others validate and count lines the same
way (so `num_lines` agrees everywhere) and write nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import struct
import sys
import time
from typing import Any, Iterable, Iterator, Optional, Sequence

import jax
import numpy as np
import tqdm
from etils import epath

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Event files of this writer: `events.out.tfevents.<10-digit seconds>.eva-jax`. The zero-padded
# time makes name order the order of creation (TensorBoard reads a run's files in name order).
_EVENT_PREFIX = "events.out.tfevents."
_EVENT_SUFFIX = ".eva-jax"
NO_PROGRESS_ENV = "EVA_JAX_NO_PROGRESS"

_FLOAT32_MAX = float(np.finfo(np.float32).max)

PathLike = Any  # str, os.PathLike or epath.Path


# --------------------------------------------------------------------------------------------
# CRC32C (Castagnoli), for TFRecord framing.


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c_python(data: bytes) -> int:
  """CRC32C in pure Python: the fallback where google-crc32c is not installed (slow, but
  event files are small)."""
  crc = 0xFFFFFFFF
  table = _CRC_TABLE
  for b in data:
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


try:
  import google_crc32c  # pylint: disable=g-import-not-at-top  (a dependency of google-cloud)
  crc32c = google_crc32c.value
except ImportError:  # pragma: no cover - depends on the environment
  crc32c = crc32c_python


def _masked_crc32c(data: bytes) -> int:
  """TFRecord's mask: rotate right by 15 and add a constant (a CRC of data that holds CRCs is
  otherwise weak)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecord(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", _masked_crc32c(length)) + data +
          struct.pack("<I", _masked_crc32c(data)))


def _split_tfrecords(buf: bytes) -> list[bytes]:
  """The framed records of `buf`, up to the first incomplete or corrupt one (a write cut
  short by a crash leaves one at the end)."""
  records, pos = [], 0
  while pos + 12 <= len(buf):
    length_bytes = buf[pos:pos + 8]
    (length,) = struct.unpack("<Q", length_bytes)
    (length_crc,) = struct.unpack("<I", buf[pos + 8:pos + 12])
    end = pos + 12 + length + 4
    if length_crc != _masked_crc32c(length_bytes) or end > len(buf):
      break
    data = buf[pos + 12:end - 4]
    if struct.unpack("<I", buf[end - 4:end])[0] != _masked_crc32c(data):
      break
    records.append(buf[pos:end])
    pos = end
  return records


# --------------------------------------------------------------------------------------------
# Event protocol buffers, hand-encoded (tensorboard/compat/proto/event.proto, summary.proto).


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # int64 fields: two's complement, as protobuf does
  out = bytearray()
  while True:
    low, n = n & 0x7F, n >> 7
    if n:
      out.append(low | 0x80)
    else:
      out.append(low)
      return bytes(out)


def _length_delimited(field_tag: int, payload: bytes) -> bytes:
  return bytes([field_tag]) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
  if math.isfinite(value) and abs(value) > _FLOAT32_MAX:
    value = math.copysign(math.inf, value)  # struct refuses finite values past float32's range
  return struct.pack("<f", value)


def _encode_event(wall_time: float, step: int, *, file_version: Optional[str] = None,
                  scalars: Optional[Sequence[tuple[str, float]]] = None) -> bytes:
  """Event{wall_time = 1 (double), step = 2 (int64), file_version = 3, summary = 5}."""
  out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
  if file_version is not None:
    out += _length_delimited(0x1A, file_version.encode())
  if scalars is not None:
    # Summary{repeated Value value = 1}; Value{tag = 1 (string), simple_value = 2 (float)}.
    summary = b"".join(
        _length_delimited(0x0A, _length_delimited(0x0A, tag.encode()) + b"\x15" +
                          _float32(value)) for tag, value in scalars)
    out += _length_delimited(0x2A, summary)
  return out


def _header_record(wall_time: float) -> bytes:
  return _tfrecord(_encode_event(wall_time, 0, file_version="brain.Event:2"))


def _line_record(record: dict, step: int, wall_time: float) -> bytes:
  """One line's Event: every int or float value but "round" as a scalar (NaN and inf too:
  TensorBoard shows them)."""
  scalars = [(k, float(v)) for k, v in record.items()
             if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)]
  return _tfrecord(_encode_event(wall_time, step, scalars=scalars))


# --------------------------------------------------------------------------------------------
# Values.


def _plain(value: Any, key: str, *, depth: int = 0) -> Any:
  """`value` as a JSON-able Python value: numpy / jax scalars become Python scalars, 1-d arrays
  become lists; NaN and inf stay floats here (the JSON line writes them as null)."""
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, np.bool_):
    return bool(value)
  if isinstance(value, float):
    return float(value)
  if isinstance(value, jax.Array):
    if not value.is_fully_addressable:
      raise ValueError(
          f"Metric {key!r} is a jax.Array spread over several processes; bring it to the "
          "host first (parallel.global_to_host) or log a number.")
    value = np.asarray(value)
  if isinstance(value, (np.ndarray, np.generic)):
    if value.ndim == 0:
      return _plain(value.item(), key, depth=depth)
    if value.ndim == 1 and depth == 0:
      return [_plain(v, key, depth=1) for v in value.tolist()]
    raise ValueError(f"Metric {key!r} is an array of shape {value.shape}; log scalars or "
                     "short 1-d lists (summarise larger arrays first).")
  if isinstance(value, numbers.Real):  # e.g. fractions, other numeric scalar types
    return float(value)
  if isinstance(value, (list, tuple)) and depth == 0:
    return [_plain(v, key, depth=1) for v in value]
  if isinstance(value, dict):
    raise TypeError(f"Metric {key!r} is a dict; flatten it into keys like '{key}/name'.")
  raise TypeError(f"Metric {key!r} has type {type(value).__name__}; log numbers, strings, "
                  "bools, None, or lists of them.")


def _json_safe(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, list):
    return [_json_safe(v) for v in value]
  return value


def _as_step(value: Any, what: str) -> int:
  if isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0:
    value = np.asarray(value).item()
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{what} must be an integer, got {value!r}.")
  value = int(value)
  if value < 0:
    raise ValueError(f"{what} must be >= 0, got {value}.")
  return value


# --------------------------------------------------------------------------------------------
# Files: local (append, fsync, truncate) or remote (whole-object rewrites).


def _path_str(path: PathLike) -> str:
  return str(path) if isinstance(path, epath.Path) else os.fspath(path)


def _is_local(path: PathLike) -> bool:
  return "://" not in _path_str(path)


class _File:
  """One file of the workdir, written the way its storage allows."""

  def __init__(self, path: str):
    self.path = path
    self.local = _is_local(path)
    self._epath = epath.Path(path)

  def read(self) -> Optional[bytes]:
    if self.local:
      try:
        with open(self.path, "rb") as f:
          return f.read()
      except FileNotFoundError:
        return None
    return self._epath.read_bytes() if self._epath.exists() else None

  def append(self, data: bytes, everything: Optional[bytes]) -> None:
    """Adds `data` at the end; `everything` is the whole new content (what a remote object is
    rewritten with)."""
    if self.local:
      os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
      with open(self.path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    else:
      self.write(everything)

  def write(self, data: bytes) -> None:
    """Replaces the content at once (a local file through a renamed temporary file)."""
    if self.local:
      os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
      tmp = self.path + ".tmp"
      with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)
    else:
      self._epath.parent.mkdir(parents=True, exist_ok=True)
      self._epath.write_bytes(data)

  def truncate(self, data: bytes) -> None:
    """Cuts the file back to `data`, a prefix of its content."""
    if self.local:
      with open(self.path, "r+b") as f:
        f.truncate(len(data))
        f.flush()
        os.fsync(f.fileno())
    else:
      self.write(data)

  def unlink(self) -> None:
    if self.local:
      os.remove(self.path)
    else:
      self._epath.unlink()


def _join(directory: str, name: str) -> str:
  return os.path.join(directory, name) if _is_local(directory) else (
      directory.rstrip("/") + "/" + name)


def _complete_lines(data: bytes) -> list[bytes]:
  """The newline-terminated lines of `data` (each with its newline); a last line without one
  is a write cut short and is left out."""
  lines = data.split(b"\n")
  return [line + b"\n" for line in lines[:-1]]


# --------------------------------------------------------------------------------------------
# The writer.


class MetricsWriter:
  """Queues metric lines and commits them to `metrics.jsonl` and TensorBoard.

  Values. A record is a dict with str keys and at least "round"; values are numbers, strings,
  bools, None or short 1-d lists of them; numpy and jax scalars (and 1-d arrays) are converted
  to plain Python. JSON has no NaN or infinity: such floats are written as null in
  `metrics.jsonl` (TensorBoard gets them as they are).

  Resuming. A fresh writer on process 0 counts the complete lines already in `metrics.jsonl`
  (and drops a last line a crash cut short), but the other processes cannot see that file:
  in a run that may resume, call `restore(n)` on every process before logging (n = the count
  saved with the checkpoint, or 0 when there is none).

  Attributes:
    workdir: the run's folder (local path or gs:// URL).
    enabled: whether this process writes files.
    tensorboard: whether event files are written.
  """

  def __init__(self, workdir: PathLike, *, enabled: Optional[bool] = None,
               tensorboard: bool = True):
    """Creates the writer; touches no file on a disabled process.

    Args:
      workdir: the run's folder, local or gs://.
      enabled: whether to write; default: on process 0 only (`jax.process_index() == 0`).
      tensorboard: also write TensorBoard event files under `WORKDIR/tensorboard/`.
    """
    self.workdir = _path_str(workdir)
    self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
    self.tensorboard = tensorboard
    self._jsonl = _File(_join(self.workdir, METRICS_FILE))
    self._tb_dir = _join(self.workdir, TENSORBOARD_DIR)
    # Pending lines: (JSON line, record with raw floats, TensorBoard step, wall time).
    self._pending: list[tuple[bytes, dict, int, float]] = []
    self._num_lines = 0
    # What is committed, kept in memory where files are rewritten whole (gs://).
    self._jsonl_data: Optional[bytes] = None
    self._tb_file: Optional[_File] = None   # the event file being appended to
    self._tb_data = b""                     # its content (remote only)
    if self.enabled:
      data = self._jsonl.read() or b""
      self.restore(len(_complete_lines(data)))

  @property
  def num_lines(self) -> int:
    """Lines committed to `metrics.jsonl` (pending lines not included)."""
    return self._num_lines

  @property
  def num_pending(self) -> int:
    return len(self._pending)

  @property
  def metrics_path(self) -> str:
    return self._jsonl.path

  def log(self, record: dict, step: Optional[int] = None) -> None:
    """Queues one line; nothing reaches a file before `commit`.

    Args:
      record: {key: value} with at least "round" (an int >= 0).
      step: the TensorBoard step of the line's scalars (e.g. the global train step);
        default: the round.

    Raises:
      ValueError: no "round", a bad round or step, an array too large to be a metric.
      TypeError: a key that is not a str, or a value of another type (a dict, an object).
    """
    if not isinstance(record, dict):
      raise TypeError(f"A metrics record is a dict, got {type(record).__name__}.")
    if "round" not in record:
      raise ValueError(f"Metrics record has no 'round' key (keys: {sorted(map(str, record))}); "
                       "every line of metrics.jsonl names its round: add 'round'.")
    for key in record:
      if not isinstance(key, str) or not key:
        raise TypeError(f"Metric keys are non-empty strings, got {key!r}.")
    round_index = _as_step(record["round"], "The metrics record's 'round'")
    step = round_index if step is None else _as_step(step, "The metrics step")
    values = {"round": round_index}
    for key, value in record.items():
      if key != "round":
        values[key] = _plain(value, key)
    line = json.dumps({k: _json_safe(v) for k, v in values.items()}, allow_nan=False,
                      ensure_ascii=False)
    self._pending.append(((line + "\n").encode(), values, step, time.time()))

  def commit(self) -> int:
    """Writes the pending lines to `metrics.jsonl` and TensorBoard.

    Returns:
      The number of committed lines (`num_lines`): save it with the checkpoint.
    """
    if self._pending and self.enabled:
      lines = b"".join(p[0] for p in self._pending)
      if not self._jsonl.local:
        self._jsonl_data = (self._jsonl_data or b"") + lines
      self._jsonl.append(lines, self._jsonl_data)
      if self.tensorboard:
        self._tb_append(b"".join(_line_record(values, step, wall_time)
                                 for _, values, step, wall_time in self._pending))
    self._num_lines += len(self._pending)
    self._pending.clear()
    return self._num_lines

  def restore(self, num_lines: int) -> None:
    """Cuts `metrics.jsonl` and TensorBoard back to their first `num_lines` lines.

    Lines past that were written by a phase whose checkpoint was never saved; the resumed run
    writes them again. Pending lines are dropped too.

    Args:
      num_lines: `num_lines` as saved with the checkpoint being resumed (0 without one).

    Raises:
      ValueError: `metrics.jsonl` has fewer complete lines than `num_lines` (it was changed or
        removed after the checkpoint was saved).
    """
    num_lines = _as_step(num_lines, "num_lines")
    self._pending.clear()
    if self.enabled:
      data = self._jsonl.read() or b""
      lines = _complete_lines(data)
      if len(lines) < num_lines:
        raise ValueError(
            f"{self._jsonl.path} has {len(lines)} complete lines, but the checkpoint being "
            f"resumed counts {num_lines}: the file was changed or removed after it was saved. "
            "Put the file back, or start in a fresh workdir.")
      kept = b"".join(lines[:num_lines])
      if kept != data:
        self._jsonl.truncate(kept)
      self._jsonl_data = None if self._jsonl.local else kept
      if self.tensorboard:
        self._tb_restore(lines[:num_lines])
    self._num_lines = num_lines

  # TensorBoard -------------------------------------------------------------------------------

  def _event_files(self) -> list[str]:
    """This writer's event files in the workdir, oldest first."""
    if _is_local(self._tb_dir):
      names = os.listdir(self._tb_dir) if os.path.isdir(self._tb_dir) else []
    else:
      d = epath.Path(self._tb_dir)
      names = [p.name for p in d.iterdir()] if d.exists() else []
    return sorted(_join(self._tb_dir, n) for n in names
                  if n.startswith(_EVENT_PREFIX) and n.endswith(_EVENT_SUFFIX))

  def _new_event_file(self, after: Optional[str]) -> _File:
    """A new event file whose name sorts after `after` (a resume in the same second too)."""
    seconds = int(time.time())
    if after is not None:
      stamp = os.path.basename(after)[len(_EVENT_PREFIX):-len(_EVENT_SUFFIX)]
      if stamp.isdigit():
        seconds = max(seconds, int(stamp) + 1)
    return _File(_join(self._tb_dir, f"{_EVENT_PREFIX}{seconds:010d}{_EVENT_SUFFIX}"))

  def _tb_append(self, records: bytes) -> None:
    if self._tb_file is None:
      files = self._event_files()
      self._tb_file = self._new_event_file(files[-1] if files else None)
      records = _header_record(time.time()) + records
      self._tb_data = b""
    self._tb_data = b"" if self._tb_file.local else self._tb_data + records
    self._tb_file.append(records, self._tb_data)

  def _tb_restore(self, lines: list[bytes]) -> None:
    """Makes the newest event file hold a header and one Event per kept line, exactly."""
    files = self._event_files()
    newest = _File(files[-1]) if files else None
    data = (newest.read() or b"") if newest else b""
    records = _split_tfrecords(data)
    header, events = (records[0], records[1:]) if records else (None, [])
    n = len(lines)
    if newest is not None and len(files) == 1 and len(events) == n and header is not None \
        and header + b"".join(events) == data:
      self._tb_file, self._tb_data = newest, (b"" if newest.local else data)
      return  # already consistent: keep appending to it
    if newest is None and n == 0:
      self._tb_file, self._tb_data = None, b""
      return
    if len(events) < n:
      # Lines committed without their events (a crash between the two writes of a commit, or
      # a run that had TensorBoard off): rebuilt from metrics.jsonl, at step = round.
      logging.warning("TensorBoard event files in %s lack %d of %d lines of %s; rebuilding "
                      "them from it (at step = round).", self._tb_dir, n - len(events), n,
                      self._jsonl.path)
      events = events + [_line_record(json.loads(line), json.loads(line)["round"], time.time())
                         for line in lines[len(events):]]
    new_data = (header or _header_record(time.time())) + b"".join(events[:n])
    new = self._new_event_file(files[-1] if files else None)
    new.write(new_data)
    for path in files:  # superseded (a crash in an earlier restore can leave two)
      _File(path).unlink()
    self._tb_file, self._tb_data = new, (b"" if new.local else new_data)


def read_metrics(workdir: PathLike) -> list[dict]:
  """The lines of `WORKDIR/metrics.jsonl`, in order.

  A last line without a newline (a write a crash cut short) is left out.

  Raises:
    FileNotFoundError: there is no metrics.jsonl in `workdir`.
    ValueError: a line is not a JSON object (its line number is named).
  """
  f = _File(_join(_path_str(workdir), METRICS_FILE))
  data = f.read()
  if data is None:
    raise FileNotFoundError(f"{f.path} does not exist: is {workdir} the workdir of a run?")
  records = []
  for i, line in enumerate(_complete_lines(data), start=1):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{f.path}, line {i}: not valid JSON ({e}).") from e
    if not isinstance(record, dict):
      raise ValueError(f"{f.path}, line {i}: a JSON object was expected, got "
                       f"{type(record).__name__}.")
    records.append(record)
  return records


# --------------------------------------------------------------------------------------------
# Progress bars, phase timers, tables.


def progress(iterable: Optional[Iterable] = None, total: Optional[float] = None,
             desc: str = "", unit: str = "it", *, enabled: Optional[bool] = None, **kwargs):
  """A tqdm progress bar on stderr, shown on process 0 only.

  Used like tqdm: iterate over it, or `with progress(total=n) as bar: bar.update(k)`. Hidden
  (but still iterating and counting) on other processes and when the environment variable
  EVA_JAX_NO_PROGRESS is 1/true/yes. When stderr is not a terminal (a log file), the bar is
  redrawn at most every 30 s so that logs stay readable.

  Args:
    iterable: what to iterate over, or None to drive the bar with `update`.
    total: the expected number of items (default: len(iterable) where it has one).
    desc: the label in front of the bar.
    unit: what one item is called ("prompt", "token", ...).
    enabled: force showing (True) or hiding (False) the bar.
    **kwargs: passed on to tqdm.

  Returns:
    A `tqdm.tqdm`.
  """
  if enabled is None:
    off = os.environ.get(NO_PROGRESS_ENV, "").strip().lower() in ("1", "true", "yes")
    enabled = jax.process_index() == 0 and not off
  stream = kwargs.pop("file", sys.stderr)
  if "mininterval" not in kwargs and not (hasattr(stream, "isatty") and stream.isatty()):
    kwargs["mininterval"] = 30.0
  return tqdm.tqdm(iterable, total=total, desc=desc, unit=unit, file=stream,
                   disable=not enabled, dynamic_ncols=True, **kwargs)


@contextlib.contextmanager
def timed(times: dict, name: str) -> Iterator[None]:
  """Adds the wall time of the `with` body, in seconds, to `times[name]`.

      times = {}
      with timed(times, "time/sample_s"):
        ...
  """
  start = time.perf_counter()
  try:
    yield
  finally:
    times[name] = times.get(name, 0.0) + time.perf_counter() - start


def _is_number(value: Any) -> bool:
  return isinstance(value, (numbers.Number, np.number)) and not isinstance(value, (bool,
                                                                                    np.bool_))


def format_number(value: Any) -> str:
  """A number for a table: ints in full; floats with 4 significant digits, no exponent between
  1e-3 and 1e6 (12345.6 -> "12346"), scientific notation outside."""
  if isinstance(value, (numbers.Integral, np.integer)):
    return str(int(value))
  value = float(value)
  if not math.isfinite(value):
    return str(value)  # nan, inf, -inf
  magnitude = abs(value)
  if magnitude == 0:
    return "0"
  if magnitude >= 1e6 or magnitude < 1e-3:
    return f"{value:.3e}"
  if magnitude >= 1e4:
    return f"{value:.0f}"
  return f"{value:.4g}"


def _shorten(text: str, max_width: int) -> str:
  text = " ".join(text.split())  # a table cell is one line
  return text if len(text) <= max_width else text[:max_width - 1] + "…"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                 title: Optional[str] = None, *, max_width: int = 40) -> str:
  """A plain-text table with aligned columns (the end-of-round summary).

      format_table(["phase", "seconds"], [["sample", 12.3456], ["train", 80.0]], title="round 0")

  Numbers are right-aligned (see `format_number`), other cells left-aligned, None shows as
  "-", and text longer than `max_width` is cut with an ellipsis. A column whose cells are all
  numbers has its header right-aligned too.

  Args:
    headers: the column names.
    rows: one sequence per row, as long as `headers`.
    title: a line above the table.
    max_width: the widest a text cell (or header) may be.

  Returns:
    The table, lines joined with newlines, no trailing newline.

  Raises:
    ValueError: a row's length differs from the number of headers.
  """
  headers = [_shorten(str(h), max_width) for h in headers]
  cells, numeric = [], [True] * len(headers)
  for i, row in enumerate(rows):
    row = list(row)
    if len(row) != len(headers):
      raise ValueError(f"format_table: row {i} has {len(row)} cells but there are "
                       f"{len(headers)} headers ({headers}).")
    out = []
    for j, value in enumerate(row):
      if _is_number(value):
        out.append((format_number(value), True))
      else:
        numeric[j] &= value is None
        out.append(("-" if value is None else _shorten(str(value), max_width), value is None))
    cells.append(out)
  widths = [max([len(h)] + [len(r[j][0]) for r in cells]) for j, h in enumerate(headers)]

  def line(items: list[tuple[str, bool]]) -> str:
    return "  ".join(text.rjust(w) if right else text.ljust(w)
                     for (text, right), w in zip(items, widths)).rstrip()

  out = [] if title is None else [title]
  out.append(line([(h, numeric[j] and bool(cells)) for j, h in enumerate(headers)]))
  out.append("  ".join("-" * w for w in widths))
  out.extend(line(r) for r in cells)
  return "\n".join(out)

"""Orbax checkpoints of an eva run: the train state and the round state, local or gs://.

Under `WORKDIR/checkpoints/`:

* `train/<step>`: the solver's `TrainState` (params and optimizer state), saved
  asynchronously (the device-to-host copy is synchronous, the writing overlaps the next
  phase) at the end of each round's training and when a run is stopped mid-training; `<step>`
  counts the run's train steps. Restored into the shardings of whatever mesh the resuming run
  has, so a state saved on 8 devices with fsdp restores on 4 with data parallelism.
* `round/<n>`: the round state after every phase (`n` counts the saves): a JSON document
  (round, phase reached, the prompt buffer, the number of committed metric lines, the train
  step it goes with, the config, small phase outputs) and a tree of numpy arrays (samples,
  rewards, pairs, reference log-probs). Saved synchronously: it is small.

A round state is only usable with the train checkpoint it names. A train checkpoint whose
asynchronous write was cut short (a crash, a preemption) never appears among the finished
steps (Orbax commits a step by renaming it into place), so `latest()` walks back to the newest
round state whose train checkpoint exists: at most the phases since that save are redone.

Every process calls every method (Orbax coordinates them); the JSON and numpy items are
written by process 0.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

TRAIN_DIR = "train"
ROUND_DIR = "round"
_META, _ARRAYS = "meta", "arrays"
_EMPTY_KEY = "__empty_arrays__"  # Orbax refuses zero-size arrays; their shapes go in the JSON


class RunCheckpointer:
  """The train-state and round-state checkpoint managers of one workdir.

  Args:
    workdir: the run folder (local or gs://).
    max_to_keep: train checkpoints kept (>= 2, so the one the newest usable round state names
      survives while the next is written); round states keep a few more, for the walk back.
    async_train: write train checkpoints in the background.
  """

  def __init__(self, workdir, *, max_to_keep: int = 2, async_train: bool = True):
    if max_to_keep < 2:
      raise ValueError(f"RunCheckpointer: max_to_keep={max_to_keep} must be >= 2 (the newest "
                       "train checkpoint may still be in flight when a run stops).")
    root = epath.Path(workdir) / "checkpoints"
    self.train = ocp.CheckpointManager(
        root / TRAIN_DIR,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_train))
    self.round = ocp.CheckpointManager(
        root / ROUND_DIR, item_names=(_META, _ARRAYS),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep + 4, create=True,
                                             enable_async_checkpointing=False))

  # ---------------------------------------------------------------- train state

  def save_train(self, step: int, state: Any) -> None:
    """Starts writing `state` as train checkpoint `step` (returns before it is on disk)."""
    self.train.save(int(step), args=ocp.args.StandardSave(state))

  def train_steps(self) -> list[int]:
    """Finished train checkpoints (one still being written is not listed)."""
    return list(self.train.all_steps())

  def restore_train(self, step: int, abstract_state: Any) -> Any:
    """Train checkpoint `step` placed like `abstract_state` (a tree of ShapeDtypeStructs with
    shardings, e.g. `train_state_shardings`' abstract state with its shardings attached)."""
    return self.train.restore(int(step), args=ocp.args.StandardRestore(abstract_state))

  # ---------------------------------------------------------------- round state

  def save_round(self, index: int, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Saves round state `index`: `meta` (JSON-able) and `arrays` (name -> numpy)."""
    stored, empty = {}, {}
    for k, v in arrays.items():
      v = np.asarray(v)
      if v.size:
        stored[k] = v
      else:
        empty[k] = [list(v.shape), v.dtype.str]
    if not stored:
      stored["__placeholder__"] = np.zeros((1,), np.int8)
    meta = dict(meta, **{_EMPTY_KEY: empty})
    self.round.save(int(index), args=ocp.args.Composite(
        **{_META: ocp.args.JsonSave(meta), _ARRAYS: ocp.args.PyTreeSave(stored)}))
    self.round.wait_until_finished()

  def restore_round(self, index: int) -> tuple[dict, dict[str, np.ndarray]]:
    out = self.round.restore(int(index), args=ocp.args.Composite(
        **{_META: ocp.args.JsonRestore(), _ARRAYS: ocp.args.PyTreeRestore()}))
    meta = dict(out[_META])
    arrays = {k: np.asarray(v) for k, v in dict(out[_ARRAYS]).items() if k != "__placeholder__"}
    for k, (shape, dtype) in meta.pop(_EMPTY_KEY, {}).items():
      arrays[k] = np.zeros(shape, np.dtype(dtype))
    return meta, arrays

  def latest(self) -> Optional[tuple[int, dict, dict[str, np.ndarray]]]:
    """(index, meta, arrays) of the newest round state whose train checkpoint exists, or None
    when the workdir holds no usable state."""
    finished = set(self.train_steps())
    for index in sorted(self.round.all_steps(), reverse=True):
      meta, arrays = self.restore_round(index)
      if meta.get("train_step") in finished:
        return index, meta, arrays
    return None

  # ---------------------------------------------------------------- lifecycle

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self.train.wait_until_finished()
    self.round.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.train.close()
    self.round.close()


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the shardings a restore should produce."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def read_train_params(workdir) -> tuple[int, Any]:
  """(train step, params as numpy arrays) of the newest usable state in `workdir`: what a
  resumed run would continue from (for inspection, export and tests). Read onto one device of
  this process, whatever mesh and number of processes wrote it."""
  ckpt = RunCheckpointer(workdir)
  try:
    latest = ckpt.latest()
  finally:
    ckpt.close()
  if latest is None:
    raise FileNotFoundError(f"{workdir} holds no usable eva_jax checkpoint.")
  step = int(latest[1]["train_step"])
  reader = ocp.CheckpointManager(epath.Path(workdir) / "checkpoints" / TRAIN_DIR,
                                 item_handlers=ocp.StandardCheckpointHandler())
  try:
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
        reader.item_metadata(step))
    state = reader.restore(step, args=ocp.args.StandardRestore(target))
  finally:
    reader.close()
  return step, jax.tree_util.tree_map(np.asarray, state["params"])

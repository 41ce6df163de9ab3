"""What a run carries between phases and saves after each: `RoundState` and its parts.

The round state is everything besides the train state that a resumed run needs to continue
exactly where the last save left it: the round in progress and the phases of it already
finished, the prompt buffer, the held-out prompts, the baseline evaluation of round 0, the
number of committed metric lines, the train checkpoint it goes with, the config it was made
with, and the outputs of the finished phases of the current round (samples, rewards, the
selection, the children, pairs, reference log-probs). It splits into a JSON document and a
flat dict of numpy arrays (`to_checkpoint` / `from_checkpoint`), which is how
`RunCheckpointer` stores it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from eva_jax.creator.buffer import PromptBuffer


@dataclasses.dataclass
class Samples:
  """k responses to each of P prompts, ragged token lists packed flat.

  Attributes:
    tokens: int32 [total], every response's tokens, response (i, j) at row i * k + j.
    offsets: int64 [P * k + 1]: response r is tokens[offsets[r]:offsets[r + 1]].
    stopped: bool [P * k]: the response ended with a stop token (else: the length limit).
    num_prompts / num_samples: P and k.
  """

  tokens: np.ndarray
  offsets: np.ndarray
  stopped: np.ndarray
  num_prompts: int
  num_samples: int

  @classmethod
  def from_sampler(cls, samples: Sequence[Sequence[Any]], num_samples: int) -> "Samples":
    """From `Sampler.sample`'s output (samples[i][j].tokens, .finish_reason)."""
    flat = [s for per in samples for s in per]
    lengths = np.array([len(s.tokens) for s in flat], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = (np.concatenate([np.asarray(s.tokens, np.int32) for s in flat])
              if flat else np.zeros((0,), np.int32))
    stopped = np.array([s.finish_reason == "stop" for s in flat], bool)
    return cls(tokens.astype(np.int32), offsets, stopped, len(samples), num_samples)

  @classmethod
  def empty(cls, num_samples: int) -> "Samples":
    return cls(np.zeros((0,), np.int32), np.zeros((1,), np.int64), np.zeros((0,), bool), 0,
               num_samples)

  def response(self, prompt: int, sample: int) -> list[int]:
    r = prompt * self.num_samples + sample
    return self.tokens[self.offsets[r]:self.offsets[r + 1]].tolist()

  def lengths(self) -> np.ndarray:
    """[P, k] response lengths in tokens."""
    return np.diff(self.offsets).reshape(self.num_prompts, self.num_samples)

  def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}/tokens": self.tokens, f"{prefix}/offsets": self.offsets,
            f"{prefix}/stopped": self.stopped,
            f"{prefix}/shape": np.array([self.num_prompts, self.num_samples], np.int64)}

  @classmethod
  def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> "Samples":
    p, k = (int(x) for x in arrays[f"{prefix}/shape"])
    return cls(arrays[f"{prefix}/tokens"].astype(np.int32),
               arrays[f"{prefix}/offsets"].astype(np.int64),
               arrays[f"{prefix}/stopped"].astype(bool), p, k)


@dataclasses.dataclass
class RoundState:
  """The run's state besides the train state (see the module docstring).

  Attributes:
    round: the round in progress (0: the evaluation of the starting policy).
    done: phases of this round already finished, in order.
    buffer: the prompt buffer.
    heldout: the held-out evaluation conversations (lists of {"role", "content"}).
    train_step: the train checkpoint this state goes with (train steps done in the run).
    train_progress: steps of this round's training already done (a run stopped mid-training).
    metrics_lines: metric lines committed when this state was saved.
    config: the gin config the run was started with (`gin.config_str()`).
    history: one summary dict per finished round (for the end-of-round table).
    phase_meta: JSON outputs of finished phases (name -> dict).
    arrays: numpy outputs of finished phases, and `baseline/*` (round 0's evaluation), which
      lives for the whole run.
    save_index: how many round states were saved before this one.
  """

  round: int = 0
  done: list = dataclasses.field(default_factory=list)
  buffer: PromptBuffer = dataclasses.field(default_factory=PromptBuffer)
  heldout: list = dataclasses.field(default_factory=list)
  train_step: int = 0
  train_progress: int = 0
  metrics_lines: int = 0
  config: str = ""
  history: list = dataclasses.field(default_factory=list)
  phase_meta: dict = dataclasses.field(default_factory=dict)
  arrays: dict = dataclasses.field(default_factory=dict)
  save_index: int = 0

  def start_round(self, index: int) -> None:
    """Moves to round `index`: no phase done, phase outputs dropped (the baseline stays)."""
    self.round, self.done, self.train_progress = index, [], 0
    self.phase_meta = {}
    self.arrays = {k: v for k, v in self.arrays.items() if k.startswith("baseline/")}

  def to_checkpoint(self) -> tuple[dict, dict[str, np.ndarray]]:
    meta = {"round": self.round, "done": list(self.done), "heldout": self.heldout,
            "train_step": self.train_step, "train_progress": self.train_progress,
            "metrics_lines": self.metrics_lines, "config": self.config,
            "history": self.history, "phase_meta": self.phase_meta,
            "save_index": self.save_index}
    arrays = dict(self.arrays)
    arrays["buffer/jsonl"] = np.frombuffer(self.buffer.to_jsonl().encode("utf-8"), np.uint8)
    return meta, arrays

  @classmethod
  def from_checkpoint(cls, meta: dict, arrays: dict[str, np.ndarray],
                      name: Optional[str] = None) -> "RoundState":
    arrays = dict(arrays)
    text = np.asarray(arrays.pop("buffer/jsonl"), np.uint8).tobytes().decode("utf-8")
    return cls(round=int(meta["round"]), done=list(meta["done"]),
               buffer=PromptBuffer.from_jsonl(text, name or "<checkpoint buffer>"),
               heldout=list(meta["heldout"]), train_step=int(meta["train_step"]),
               train_progress=int(meta["train_progress"]),
               metrics_lines=int(meta["metrics_lines"]), config=str(meta["config"]),
               history=list(meta["history"]), phase_meta=dict(meta["phase_meta"]),
               arrays=arrays, save_index=int(meta["save_index"]))

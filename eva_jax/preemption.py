"""Stopping a run cleanly: SIGTERM (a preempted VM, a cluster scheduler) and test faults.

`StopSignal` installs a SIGTERM handler that only records the request; the round loop asks
`requested()` at safe points (after a phase is saved, between train steps, between sampling
and scoring chunks), saves what it has and exits 0 with a message. With several processes
the request may reach one process before the others, so `requested()` is a collective: every
process calls it at the same points and all agree (any process asked => all stop together).

`fault_point` lets tests crash or stop a run at a chosen place, as a preemption would:
`EVA_JAX_FAULT=<round>:<phase>:<kill|term|raise>` makes the process send itself SIGKILL
(nothing is saved: the run resumes from the last saved phase) or SIGTERM (the clean path
above), or raise `SimulatedCrash` (a crash without leaving the process, for in-process tests),
when the loop reaches that phase of that round (after the phase's work, before its save;
"train_step" is right after the first step of a round's training). Unset, it costs one
environment lookup.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

FAULT_ENV = "EVA_JAX_FAULT"


class Preempted(Exception):
  """Raised inside the loop when the run must stop; caught by `run`, which exits 0."""


class SimulatedCrash(BaseException):
  """A test's stand-in for a crash (a BaseException, so that nothing on the way catches it)."""


class StopSignal:
  """Records SIGTERM; `requested()` says whether to stop (agreed across processes)."""

  def __init__(self, install: bool = True):
    self._event = threading.Event()
    self._previous = None
    if install and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self._event.set()

  def request(self) -> None:
    self._event.set()

  def requested(self) -> bool:
    """True when any process was asked to stop. A collective with several processes: call it
    at the same points on every process."""
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.asarray([local], np.int32))
    return bool(np.any(flags))

  def restore(self) -> None:
    """Puts back the SIGTERM handler that was there before."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def fault_point(round_index: int, phase: str) -> None:
  """Sends this process the signal `EVA_JAX_FAULT` asks for at (round, phase), if any."""
  spec: Optional[str] = os.environ.get(FAULT_ENV)
  if not spec:
    return
  try:
    r, p, kind = spec.split(":")
    r = int(r)
  except ValueError as e:
    raise ValueError(f"{FAULT_ENV}={spec!r}: expected '<round>:<phase>:<kill|term|raise>'."
                     ) from e
  if (r, p) != (round_index, phase):
    return
  if kind == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
  elif kind == "term":
    os.kill(os.getpid(), signal.SIGTERM)
  elif kind == "raise":
    raise SimulatedCrash(f"{FAULT_ENV}={spec}")
  else:
    raise ValueError(f"{FAULT_ENV}={spec!r}: the fault must be 'kill', 'term' or 'raise'.")

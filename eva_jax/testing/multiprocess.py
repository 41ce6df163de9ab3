"""Runs one function in N CPU processes joined by `jax.distributed.initialize` on 127.0.0.1.

This is how the tests prove that code is right when `jax.process_count() > 1`: the same
function runs in every process (as on the hosts of a TPU pod), each process owning
`devices_per_process` CPU devices, and the parent compares what each process returned.

    results = run_in_processes("tests.solver.mp_targets:train_two_steps", num_processes=2,
                               devices_per_process=2, kwargs={"steps": 2})

`target` is "module:function"; the function is called with `**kwargs` after
`jax.distributed.initialize` and must return something picklable (numpy, not jax arrays).
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import tempfile
from typing import Any, Optional

_CHILD = r"""
import os, pickle, sys, importlib, traceback
sys.path[:0] = {paths!r}
import jax
try:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
except Exception:  # older or newer jax without the option: gloo is the default there
  pass
jax.distributed.initialize(coordinator_address={addr!r}, num_processes={n}, process_id={pid},
                           local_device_ids=list(range({dpp})))
module, fn = {target!r}.split(":")
try:
  result = getattr(importlib.import_module(module), fn)(**pickle.load(open({kwargs_file!r}, "rb")))
  with open({out_file!r}, "wb") as f:
    pickle.dump(result, f)
finally:
  jax.distributed.shutdown()
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_in_processes(target: str, num_processes: int = 2, devices_per_process: int = 1,
                     kwargs: Optional[dict] = None, timeout: float = 600,
                     extra_env: Optional[dict] = None) -> list[Any]:
  """Runs `target(**kwargs)` in `num_processes` processes; returns their results in order.

  Raises RuntimeError with every process's output when one fails or times out.
  """
  addr = f"127.0.0.1:{free_port()}"
  # The processes' logs and results live only as long as this call (they were left in the
  # system's temp folder, one folder a call, before).
  with tempfile.TemporaryDirectory(prefix="eva_mp_") as tmp:
    return _run(tmp, target, addr, num_processes, devices_per_process, kwargs, timeout,
                extra_env)


def _run(tmp: str, target: str, addr: str, num_processes: int, devices_per_process: int,
         kwargs: Optional[dict], timeout: float, extra_env: Optional[dict]) -> list[Any]:
  kwargs_file = os.path.join(tmp, "kwargs.pkl")
  with open(kwargs_file, "wb") as f:
    pickle.dump(kwargs or {}, f)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  env.update(extra_env or {})
  paths = [p for p in sys.path if p] + [os.getcwd()]
  procs, logs = [], []
  try:
    for pid in range(num_processes):
      out_file = os.path.join(tmp, f"result_{pid}.pkl")
      code = _CHILD.format(paths=paths, addr=addr, n=num_processes, pid=pid,
                           dpp=devices_per_process, target=target, kwargs_file=kwargs_file,
                           out_file=out_file)
      log = open(os.path.join(tmp, f"log_{pid}.txt"), "w+")
      logs.append(log)
      procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log,
                                    stderr=subprocess.STDOUT))
    failed = False
    for p in procs:
      try:
        failed |= p.wait(timeout=timeout) != 0
      except subprocess.TimeoutExpired:
        failed = True
        for q in procs:
          q.kill()
    if failed:
      outputs = []
      for pid, log in enumerate(logs):
        log.seek(0)
        outputs.append(f"--- process {pid} (exit {procs[pid].returncode}) ---\n"
                       f"{log.read()[-6000:]}")
      raise RuntimeError(f"run_in_processes({target}) failed:\n" + "\n".join(outputs))
    results = []
    for pid in range(num_processes):
      with open(os.path.join(tmp, f"result_{pid}.pkl"), "rb") as f:
        results.append(pickle.load(f))
    return results
  finally:
    for q in procs:  # interrupted: none may outlive the folder it writes into
      if q.poll() is None:
        q.kill()
        q.wait()
    for log in logs:
      log.close()

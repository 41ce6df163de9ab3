"""Shared by the round-loop tests: a small, fast configuration of the tiny run, ways to run
it (in this process or as `python -m eva_jax.main`), and the comparison of two runs.

Imported by path from the test files (see `load`) and as `tests.loop.helpers` in child
processes.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from typing import Optional, Sequence

import numpy as np

from eva_jax import checkpointing, metrics
from eva_jax.preemption import FAULT_ENV

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The machinery's smoke configuration (a random 2-layer tiny model, 16 training and 8
# held-out instructions, k = 2, 8 new tokens): every loop test runs it.
GIN_FILES = ["eva_smoke.gin"]


def load(name: str):
  """A module of this folder by file path (the tests folder is not a package)."""
  spec = importlib.util.spec_from_file_location(
      f"loop_tests_{name}", os.path.join(os.path.dirname(__file__), f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def args_for(workdir, bindings: Sequence[str] = (),
             gin_files: Sequence[str] = tuple(GIN_FILES)) -> list[str]:
  out = ["--workdir", str(workdir)]
  for f in gin_files:
    out += ["--gin_file", f]
  for b in bindings:
    out += ["--gin_bindings", b]
  return out


def run_here(workdir, bindings: Sequence[str] = (), fault: Optional[str] = None, **kw) -> int:
  """`python -m eva_jax.main` in this process (compiled programs are shared between runs)."""
  from eva_jax import main as eva_main  # pylint: disable=import-outside-toplevel
  old = os.environ.pop(FAULT_ENV, None)
  if fault:
    os.environ[FAULT_ENV] = fault
  try:
    return eva_main.main(args_for(workdir, bindings, **kw))
  finally:
    os.environ.pop(FAULT_ENV, None)
    if old is not None:
      os.environ[FAULT_ENV] = old


def run_subprocess(workdir, bindings: Sequence[str] = (), fault: Optional[str] = None,
                   timeout: float = 300, extra_env: Optional[dict] = None):
  """`python -m eva_jax.main` as a child process; returns the CompletedProcess."""
  env = dict(os.environ, EVA_JAX_NO_PROGRESS="1")
  env.pop(FAULT_ENV, None)
  if fault:
    env[FAULT_ENV] = fault
  env.update(extra_env or {})
  return subprocess.run([sys.executable, "-m", "eva_jax.main", *args_for(workdir, bindings)],
                        capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def run_cli_processes(workdir, num_processes: int = 2, devices_per_process: int = 2,
                      bindings: Sequence[str] = (), fault: Optional[str] = None,
                      timeout: float = 600) -> list:
  """`python -m eva_jax.main --coordinator_address=... --num_processes=N --process_id=i` in N
  processes on 127.0.0.1, as the hosts of a pod would run it; returns their CompletedProcess-
  like (returncode, stdout) in process order. `fault` goes to every process (a preemption
  takes the whole slice)."""
  from eva_jax.testing.multiprocess import free_port  # pylint: disable=import-outside-toplevel
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", FAULT_ENV)}
  env.update(EVA_JAX_NO_PROGRESS="1", JAX_PLATFORMS="cpu",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  if fault:
    env[FAULT_ENV] = fault
  address = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "eva_jax.main", *args_for(workdir, bindings),
       f"--coordinator_address={address}", f"--num_processes={num_processes}",
       f"--process_id={pid}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=env, cwd=REPO) for pid in range(num_processes)]
  out = []
  try:
    for p in procs:
      stdout, _ = p.communicate(timeout=timeout)
      out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, ""))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return out


def comparable_metrics(workdir) -> list[dict]:
  """metrics.jsonl without what depends on the clock."""
  return [{k: v for k, v in line.items() if not (k.startswith("time/") or
                                                 k.endswith("tokens_per_s"))}
          for line in metrics.read_metrics(workdir)]


def final_params(workdir):
  return checkpointing.read_train_params(workdir)


def assert_same_run(got_dir, want_dir) -> None:
  """Bit-identical final params and the same metric lines (times aside)."""
  import jax  # pylint: disable=import-outside-toplevel
  step_a, a = final_params(got_dir)
  step_b, b = final_params(want_dir)
  assert step_a == step_b
  fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert len(fa) == len(fb)
  for (path, x), (_, y) in zip(fa, fb):
    assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(path)
  got, want = comparable_metrics(got_dir), comparable_metrics(want_dir)
  assert len(got) == len(want), (len(got), len(want))
  for n, (g, w) in enumerate(zip(got, want)):
    assert g == w, (n, g, w)

"""eva_jax command line: `python -m eva_jax.main [--gin_file=F ...] [--gin_bindings=B ...]
[--workdir=DIR]`.

Parses the gin configuration (default: the embedded `eva_tiny.gin`), then runs the eva rounds
in DIR (default: a fresh temporary folder), or resumes them when DIR already holds a run made
with the same configuration. Writes DIR/metrics.jsonl, DIR/checkpoints/ (Orbax),
DIR/config.gin (the operative config), DIR/prompts/round_N.jsonl and DIR/tensorboard/.

Gin files are found by path, or by name among the files shipped in the package
(`--gin_file=eva_gemma.gin`, `--gin_file=losses/ipo.gin`). SIGTERM (a preempted VM) saves the
run and exits 0; the same command resumes it.

Several processes (one per host of a TPU pod or GPU cluster) run the same command; on TPU
pods `jax.distributed.initialize()` finds its peers by itself, elsewhere pass
--coordinator_address, --num_processes and --process_id (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Optional

import gin

GIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gin")
DEFAULT_GIN = "eva_tiny.gin"


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m eva_jax.main", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[],
                      help=f"gin config file, a path or the name of a shipped one; "
                      f"repeatable (default: {DEFAULT_GIN})")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="a gin binding such as 'EvaConfig.num_rounds = 3'; repeatable")
  parser.add_argument("--workdir", default=None,
                      help="run folder, local or gs:// (default: a fresh temporary folder); "
                      "a folder holding a run resumes it")
  parser.add_argument("--compilation_cache_dir", default=None,
                      help="JAX's persistent compilation cache: compiled programs are kept "
                      "there, and a later process (a resumed run, after a preemption) loads "
                      "them instead of compiling again. Default: WORKDIR/jax_cache when "
                      "--workdir is given and JAX_COMPILATION_CACHE_DIR is not set (process 0 "
                      "writes, every process reads: keep it where all reach, as the workdir); "
                      "'none' turns the cache off")
  parser.add_argument("--allow_config_change", action="store_true",
                      help="resume a run even though its configuration differs")
  parser.add_argument("--coordinator_address", default=None,
                      help="multi-process runs off TPU: host:port of process 0")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                      help="auto: join peers given by the flags above, by JAX_COORDINATOR_"
                      "ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or found by JAX itself on "
                      "a Cloud TPU VM, a SLURM or an Open MPI launch; on: always call "
                      "jax.distributed.initialize(); off: one process")
  return parser.parse_args(argv)


def resolve_gin_file(name: str) -> str:
  """A gin file's path: `name` itself when it exists (or is gs://), else the shipped file of
  that name."""
  if name.startswith("gs://") or os.path.exists(name):
    return name
  shipped = os.path.join(GIN_DIR, name)
  if os.path.exists(shipped):
    return shipped
  available = sorted(os.path.relpath(os.path.join(d, f), GIN_DIR)
                     for d, _, fs in os.walk(GIN_DIR) for f in fs if f.endswith(".gin"))
  raise FileNotFoundError(f"--gin_file {name!r} does not exist; pass a path to a .gin file "
                          f"or the name of a shipped one: {', '.join(available)}.")


def load_gin(files, bindings) -> None:
  files = [resolve_gin_file(f) for f in (files or [DEFAULT_GIN])]
  gin.clear_config()
  gin.add_config_file_search_path(GIN_DIR)
  gin.parse_config_files_and_bindings(files, bindings)


def _on_cloud_tpu_vm() -> bool:
  try:
    # pylint: disable-next=import-outside-toplevel
    from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    return bool(running_in_cloud_tpu_vm)
  except ImportError:  # a JAX that moved it: fall back on the TPU device files
    return any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0"))


def distributed_arguments(args, environ=None) -> Optional[dict]:
  """The arguments of `jax.distributed.initialize` for this launch, or None for one process.

  In order: the three flags (all or none); JAX's environment variables
  (JAX_COORDINATOR_ADDRESS, with JAX_NUM_PROCESSES and JAX_PROCESS_ID or else what JAX's
  cluster detection finds); a Cloud TPU VM, a SLURM
  job step or an Open MPI launch of several tasks, where JAX finds its peers by itself (no
  arguments). `--distributed=off` runs one process whatever the environment says.
  """
  environ = os.environ if environ is None else environ
  if args.distributed == "off":
    return None
  explicit = [args.coordinator_address, args.num_processes, args.process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("--coordinator_address, --num_processes and --process_id go together; "
                       "pass all three (or none: TPU pods find their peers by themselves).")
    if not 0 <= args.process_id < args.num_processes:
      raise ValueError(f"--process_id={args.process_id} must be in [0, --num_processes="
                       f"{args.num_processes}).")
    return dict(coordinator_address=args.coordinator_address,
                num_processes=args.num_processes, process_id=args.process_id)
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    if environ.get("JAX_NUM_PROCESSES") and environ.get("JAX_PROCESS_ID"):
      return dict(coordinator_address=environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(environ["JAX_NUM_PROCESSES"]),
                  process_id=int(environ["JAX_PROCESS_ID"]))
    return {}  # JAX reads the address itself and asks its cluster detection for the rest
  several = lambda key: int(environ.get(key, "1") or 1) > 1
  if (args.distributed == "on" or _on_cloud_tpu_vm() or several("SLURM_NTASKS")
      or several("OMPI_COMM_WORLD_SIZE")):
    return {}
  return None


def compilation_cache_dir(args, environ=None) -> Optional[str]:
  """Where this run keeps JAX's persistent compilation cache: `--compilation_cache_dir`, else
  WORKDIR/jax_cache; None where JAX's own setting stands (JAX_COMPILATION_CACHE_DIR is set, or
  the workdir is a fresh temporary folder no later run will see). "none": "" (off)."""
  environ = os.environ if environ is None else environ
  if args.compilation_cache_dir is not None:
    return "" if args.compilation_cache_dir.lower() == "none" else args.compilation_cache_dir
  if environ.get("JAX_COMPILATION_CACHE_DIR") or not args.workdir:
    return None
  return args.workdir.rstrip("/") + "/jax_cache"  # "/" also joins gs:// paths


def initialize_distributed(args) -> None:
  """Joins the other processes of a multi-process run (nothing to do with one process)."""
  kwargs = distributed_arguments(args)
  if kwargs is not None:
    import jax  # pylint: disable=import-outside-toplevel
    jax.distributed.initialize(**kwargs)


# Device files of the accelerators JAX drives (TPU: accel or vfio; NVIDIA; AMD ROCm).
_ACCELERATOR_FILES = ("/dev/accel0", "/dev/vfio/0", "/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd")


def default_platforms(environ=None) -> None:
  """JAX_PLATFORMS=cpu on a machine with no accelerator, unless the user set it: with libtpu
  installed (the `aot` extra, for the TPU fit check) JAX would otherwise spend seconds looking
  for a TPU and print libtpu's warnings at every start."""
  environ = os.environ if environ is None else environ
  if "JAX_PLATFORMS" not in environ and not any(os.path.exists(f) for f in _ACCELERATOR_FILES):
    environ["JAX_PLATFORMS"] = "cpu"


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  default_platforms()
  cache_dir = compilation_cache_dir(args)
  if cache_dir is not None:
    import jax  # pylint: disable=import-outside-toplevel
    # Before anything compiles: JAX decides at its first compile whether it uses the cache.
    jax.config.update("jax_enable_compilation_cache", bool(cache_dir))
    jax.config.update("jax_compilation_cache_dir", cache_dir or None)
  initialize_distributed(args)
  # Importing the loop registers every configurable before gin parses.
  from eva_jax import loop  # pylint: disable=import-outside-toplevel

  load_gin(args.gin_file, args.gin_bindings)
  import jax  # pylint: disable=import-outside-toplevel
  if args.workdir is None and jax.process_count() > 1:
    raise ValueError("A run of several processes needs --workdir, a folder every process can "
                     "reach (e.g. gs://bucket/run).")
  workdir = args.workdir or tempfile.mkdtemp(prefix="eva_jax_")
  return loop.run(workdir, allow_config_change=args.allow_config_change)


if __name__ == "__main__":
  sys.exit(main())

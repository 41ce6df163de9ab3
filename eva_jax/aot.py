"""Does a configuration fit a TPU slice (or a host's GPUs)? Compiles the round's programs for
it on this machine.

    python -m eva_jax.aot --gin_file=eva_gemma.gin --topology=v5p-64 \
        --solver_config=gemma2_9b --reward_config=gemma2_27b

Reads the gin files as `eva_jax.main` does, asks libtpu (`pip install "jax[tpu]"`; no TPU
needed) for the devices of `--topology`, builds the gin file's mesh over them and compiles, from
shapes alone, every program a round runs at its largest shapes:

* `train_step`: the preference-loss step on `EvaConfig.batch_size` pairs of `max_length` tokens
  (the gin file's remat, dtypes and micro-batches);
* `reference_logps`: the reference log-probs of `reference_logps.batch_size` pairs;
* `sampler`: the solver's generation program (prefill of the largest prompt bucket, k copies of
  the cache, the decode loop) for the largest chunk of prompts `Sampler.max_batch_rows` allows;
* `reward_model`: the reward model's scoring of `ModelReward.batch_size` sequences of the
  largest length bucket (when `make_reward.kind = "model"`).

For each it prints the per-chip memory XLA assigned (arguments, outputs, temporaries) plus the
buffers the round keeps on the chips meanwhile (the train state and the reward model's params
stay resident for the whole run), against the chip's HBM, and the time one call takes at
`--mfu`: its model FLOPs (6 N per trained token, 2 N per
token forward, plus attention; the MFU convention) over the chips' peak. XLA's own
`cost_analysis` FLOPs are reported beside them but not used: XLA counts a loop body once (the
micro-batch loop, scanned layers, the decode loop), and on v4 / v5p (two TensorCores a chip)
they come out per core. The sampler's decode steps are memory-bound: each takes the slower of
its FLOPs at `--mfu` and the bytes per chip XLA's cost analysis gives for one decode step
compiled on the side (params and cache reads, FSDP gathers included) at `--hbm_efficiency` of
the chip's bandwidth. It ends with the projected time of one round for
`--prompts_per_round` prompts (not when the sampler decodes scanned layers, whose loop XLA's
cost analysis counts once: `Sampler.decode_params = "as_given"` with the policy's default
`scan_layers`), and exits 1 naming each program that does not fit and the knobs to turn.

`--topology=h200-1` (or h100-N, up to 8) compiles with XLA:GPU for one host's GPUs instead,
without a GPU: JAX's CUDA plugin (`pip install "jax[cuda12]==<your jax version>"`) describes them
from a target description, and XLA compiles without autotuning (no device to time kernels on).
Its cost analysis reports no bytes accessed, so decode steps are timed by FLOPs alone there.

Chip figures (per chip; Cloud TPU documentation): HBM, peak bf16 FLOP/s and HBM bandwidth.
Topology names follow Cloud TPU's accelerator types: for v4 and v5p the number counts
TensorCores (two per chip: v5p-64 is 32 chips), for v5e and v6e it counts chips.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Optional

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  family: str
  hbm_gib: float
  peak_tflops: float  # bf16 (dense)
  hbm_gbps: float
  cores_in_name: bool  # the accelerator type's number counts TensorCores, not chips
  platform: str = "tpu"


CHIPS = {
    "v4": ChipSpec("v4", 32, 275, 1228, True),
    "v5e": ChipSpec("v5e", 16, 197, 819, False),
    "v5p": ChipSpec("v5p", 95, 459, 2765, True),
    "v6e": ChipSpec("v6e", 32, 918, 1640, False),
}
# GPUs of one host ("h200-1", "h100-8"), compiled for by XLA:GPU without a GPU (JAX's CUDA
# plugin, `pip install "jax[cuda12]"`, describes them from the target configs below). NVIDIA's
# figures: H100 SXM 80 GB, H200 141 GB (nvidia-smi: 143771 MiB), 989 bf16 dense TFLOP/s each.
GPUS = {
    "h100": ChipSpec("h100", 79.6, 989, 3350, False, platform="cuda"),
    "h200": ChipSpec("h200", 140.4, 989, 4800, False, platform="cuda"),
}
_GPU_TARGET = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 9 }}
device_description_str: "{name}"
"""
_GPU_NAMES = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200"}


def gpu_target_config(chip: ChipSpec) -> str:
  """XLA:GPU's target description (a GpuTargetConfigProto in text) of a Hopper GPU."""
  return _GPU_TARGET.format(bandwidth=int(chip.hbm_gbps * 1e9),
                            memory=int(chip.hbm_gib * GIB), name=_GPU_NAMES[chip.family])


_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}
# Chips -> the physical topology libtpu knows (Cloud TPU's tables).
_TOPOLOGIES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
                  256: "16x16"}
_TOPOLOGIES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
                  256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given, e.g. "v5p-64"
  chip: ChipSpec
  num_chips: int
  libtpu_name: str  # e.g. "v5p:2x4x4"; for GPUs the plugin's "1x1x<count>"


def parse_topology(name: str) -> Topology:
  """"v5p-64", "v5litepod-256", "v5e-16" or libtpu's "v5e:4x4" -> a `Topology`; also the
  GPUs of one host, "h200-1" or "h100-8"."""
  key = name.strip().lower()
  gpu = re.fullmatch(r"(h\d+)-(\d+)", key)
  if gpu and gpu.group(1) in GPUS:
    count = int(gpu.group(2))
    if not 1 <= count <= 8:
      raise ValueError(f"--topology={name!r}: GPUs of one host only, 1 to 8 "
                       f"({gpu.group(1)}-1 ... {gpu.group(1)}-8).")
    return Topology(name, GPUS[gpu.group(1)], count, f"1x1x{count}")
  m = re.fullmatch(r"(v\d+[a-z]*)[-:](.+)", key)
  family = _ALIASES.get(m.group(1), m.group(1)) if m else None
  if not m or family not in CHIPS:
    raise ValueError(f"--topology={name!r}: use a Cloud TPU accelerator type such as v5p-64, "
                     f"v5e-256 (or v5litepod-256), v4-32, v6e-8, or libtpu's form v5e:4x4; "
                     f"families: {', '.join(CHIPS)}; or one host's GPUs: "
                     f"{', '.join(f'{g}-1' for g in GPUS)} to -8.")
  chip, rest = CHIPS[family], m.group(2)
  table = _TOPOLOGIES_3D if family in ("v4", "v5p") else _TOPOLOGIES_2D
  if "x" in rest:
    dims = [int(d) for d in rest.split("x")]
    return Topology(name, chip, math.prod(dims), f"{family}:{rest}")
  count = int(rest)
  chips = count // 2 if chip.cores_in_name else count
  if chips not in table or (chip.cores_in_name and count % 2):
    sizes = sorted(c * 2 if chip.cores_in_name else c for c in table)
    raise ValueError(f"--topology={name!r}: no {family} slice of that size is known here; "
                     f"use one of {', '.join(f'{family}-{s}' for s in sizes)} or name the "
                     f"topology as libtpu does ({family}:AxB{'xC' if len(table) else ''}).")
  return Topology(name, chip, chips, f"{family}:{table[chips]}")


def topology_devices(topology: Topology):
  """The slice's devices from libtpu, or the GPUs' from JAX's CUDA plugin (AOT only: nothing
  runs on them)."""
  if topology.chip.platform == "cuda":
    try:
      from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
      desc = topologies.get_topology_desc(platform="cuda",
                                          target_config=gpu_target_config(topology.chip),
                                          topology=topology.libtpu_name)
    except Exception as e:  # the CUDA plugin missing
      raise RuntimeError(
          f"Cannot describe {topology.name} ({e.__class__.__name__}: {str(e)[:300]}). "
          "Compiling for GPUs without one needs JAX's CUDA plugin: pip install "
          "\"jax[cuda12]==<your jax version>\", and JAX_PLATFORMS=cpu.") from e
    return desc.devices
  # Several processes may describe topologies at once (tests, a user's second shell): libtpu
  # otherwise takes a machine-wide lock although nothing runs on a TPU here.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  kwargs = {}
  if topology.num_chips < 4:
    # libtpu assumes hosts of 2x2 chips and rejects a smaller slice (v5e-1: "1x1") unless told
    # the host is as small as the slice.
    dims = [int(d) for d in topology.libtpu_name.split(":")[-1].split("x")]
    kwargs["chips_per_host_bounds"] = tuple(dims + [1] * (3 - len(dims)))
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.libtpu_name,
                                        **kwargs)
  except Exception as e:  # libtpu missing, or a topology it does not know
    raise RuntimeError(
        f"Cannot describe TPU topology {topology.libtpu_name!r} ({e.__class__.__name__}: "
        f"{str(e)[:300]}). The fit check needs libtpu on this machine: "
        f"pip install \"jax[tpu]==<your jax version>\".") from e
  return desc.devices


# --------------------------------------------------------------------------- gin values

def gin_value(name: str, default: Any) -> Any:
  """The value gin binds to `name` ("Configurable.param"), else `default`."""
  import gin  # pylint: disable=import-outside-toplevel
  try:
    return gin.query_parameter(name)
  except ValueError:
    return default


def _model_config(path: Optional[str], override: Optional[str], what: str, flag: str):
  from eva_jax import models  # pylint: disable=import-outside-toplevel
  from eva_jax.data.sources import resolve_builtin  # pylint: disable=import-outside-toplevel
  if override:
    return models.get_config(override)
  if path is None:
    return None
  try:
    return models.pretrained_config(resolve_builtin(path))
  except Exception as e:  # unreadable here (e.g. a gs:// bucket this machine cannot reach)
    raise ValueError(f"The fit check cannot read the {what}'s config from {path!r} "
                     f"({e.__class__.__name__}: {str(e)[:200]}); name its architecture with "
                     f"{flag}, e.g. {flag}=gemma2_9b.") from e


# --------------------------------------------------------------------------- per program

KNOBS = {
    "train_step": "make_train_step.num_microbatches (more, or fewer when the batch does not "
                  "split over the data-parallel chips), make_policy_model.remat ('full'), "
                  "create_mesh.mesh_shape (fsdp over more chips), EvaConfig.batch_size or "
                  "EvaConfig.max_length (less)",
    "reference_logps": "reference_logps.batch_size (less), create_mesh.mesh_shape",
    "sampler": "Sampler.max_batch_rows (less), Sampler.cache_dtype ('bfloat16'), "
               "Sampler.decode_params ('cast' or 'as_given': no whole copy per chip), "
               "create_mesh.mesh_shape (tensor parallelism splits the cache's heads), "
               "EvaConfig.max_new_tokens",
    "reward_model": "ModelReward.batch_size or ModelReward.max_length (less), "
                    "ModelReward.param_dtype ('bfloat16'), create_mesh.mesh_shape (fsdp over "
                    "more chips)",
}

@dataclasses.dataclass
class ProgramReport:
  name: str
  argument_gib: float
  output_gib: float
  temp_gib: float
  alias_gib: float
  resident_elsewhere_gib: float  # buffers the round holds on the chip outside this program
  flops_per_chip: float  # model FLOPs of one call / chips (what MFU is measured against)
  xla_flops_per_chip: float  # XLA's cost_analysis (a loop body counted once; remat included)
  bytes_per_chip: float
  seconds: float  # one call at the stated MFU / bandwidth
  calls_per_round: float
  compile_s: float
  knobs: str
  note: str = ""
  error: str = ""  # why it could not be built or compiled for the slice (then it does not fit)

  @property
  def total_gib(self) -> float:
    return (self.argument_gib + self.output_gib + self.temp_gib - self.alias_gib
            + self.resident_elsewhere_gib)


def attention_pairs(cfg, query_len: int, key_len: Optional[int] = None) -> int:
  """(query, key) pairs a causal pass attends to, summed over layers: `query_len` queries at the
  end of `key_len` keys (prefill / training: equal; decode: 1 query), windows honoured."""
  key_len = query_len if key_len is None else key_len
  total = 0
  for kind in cfg.attention_types:
    window = cfg.sliding_window if kind == "local" and cfg.sliding_window else key_len
    seen = [min(key_len - query_len + q + 1, window) for q in range(query_len)]
    total += sum(seen)
  return total


def model_flops(cfg, sequences: int, query_len: int, key_len: Optional[int] = None,
                backward: bool = False) -> float:
  """Model FLOPs (the MFU convention: rematerialisation not counted) of a forward, or of a
  forward and backward (3x), over `sequences` rows of `query_len` new tokens each."""
  matmuls = 2.0 * cfg.num_params() * sequences * query_len
  attention = 4.0 * cfg.num_heads * cfg.head_dim * attention_pairs(cfg, query_len, key_len)
  return (3.0 if backward else 1.0) * (matmuls + sequences * attention)


def memory_gib(compiled) -> tuple[float, float, float, float]:
  """(arguments, outputs, temporaries, aliased) GiB per chip that XLA assigned `compiled`."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes / GIB, m.output_size_in_bytes / GIB,
          m.temp_size_in_bytes / GIB, m.alias_size_in_bytes / GIB)


def memory_total_gib(compiled) -> float:
  """GiB per chip of `compiled` alone: arguments + outputs + temporaries - aliased."""
  arg, out, temp, alias = memory_gib(compiled)
  return arg + out + temp - alias


def xla_cost(compiled) -> tuple[float, float]:
  """(FLOPs, bytes accessed) per chip (XLA reports an SPMD program's per-device cost); 0 where
  XLA reports nothing (XLA:GPU reports no cost analysis)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def per_chip_gib(abstract_tree, shardings) -> float:
  """Bytes one chip holds of a tree of ShapeDtypeStructs under `shardings` (the largest)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  total = 0
  for x, s in zip(jax.tree_util.tree_leaves(abstract_tree), jax.tree_util.tree_leaves(shardings)):
    shard = s.shard_shape(x.shape)
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total / GIB


def _abstract(tree, shardings):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                tree, shardings)


class FitCheck:
  """Builds the round's programs from the parsed gin config for `topology` and compiles them.

  Args:
    topology: the slice.
    mfu: model FLOP utilisation assumed for compute-bound programs.
    hbm_efficiency: the share of HBM bandwidth a memory-bound decode step reaches.
    prompts_per_round: prompts sampled, scored and selected in one round (the authors cut
      UltraFeedback's ~60k prompts into 6 splits: about 10k a round).
    solver_config / reward_config: named architectures (`eva_jax.models.config_names()`) when
      the gin file's checkpoints cannot be read from this machine.
    devices: the slice's devices (default: from libtpu).
  """

  def __init__(self, topology: Topology, *, mfu: float = 0.4, hbm_efficiency: float = 0.7,
               prompts_per_round: int = 10_000, solver_config: Optional[str] = None,
               reward_config: Optional[str] = None, devices=None):
    # pylint: disable=import-outside-toplevel
    import jax
    import jax.numpy as jnp
    from eva_jax import loop, parallel, solver
    if not 0 < mfu <= 1 or not 0 < hbm_efficiency <= 1:
      raise ValueError(f"--mfu={mfu} and --hbm_efficiency={hbm_efficiency} must be in (0, 1].")
    self.topology, self.mfu, self.hbm_efficiency = topology, mfu, hbm_efficiency
    self.prompts_per_round = int(prompts_per_round)
    self.devices = topology_devices(topology) if devices is None else devices
    self.mesh = parallel.create_mesh(devices=self.devices)
    self.rules = parallel.logical_axis_rules()
    self.cfg = loop.EvaConfig()
    initial = gin_value("InitialPolicy.path", None)
    cfg = _model_config(initial, solver_config, "solver", "--solver_config")
    if cfg is None:  # a random init of the gin file's named config
      from eva_jax import models
      cfg = models.get_config()
    self.policy = solver.make_policy_model(cfg)
    self.loss_fn = solver.get_loss_fn()
    self.optimizer = solver.make_optimizer(
        learning_rate=solver.learning_rate_schedule(total_steps=1000))
    self.state_shardings, self.abstract_state = solver.train_state_shardings(
        self.policy, self.optimizer, self.mesh, self.rules)
    self.train_state_gib = per_chip_gib(self.abstract_state, self.state_shardings)
    self.params_gib = per_chip_gib(self.abstract_state.params, self.state_shardings.params)
    # EvaConfig.reference = "initial" keeps the run's starting params for every round's
    # reference log-probs: a second copy of the params, resident all run.
    self.reference_params_gib = self.params_gib if self.cfg.reference == "initial" else 0.0
    self._sampler = None
    self.reward_model = None
    self.reward_gib = 0.0
    if gin_value("make_reward.kind", None) == "model":
      rcfg = _model_config(gin_value("ModelReward.path", None), reward_config, "reward model",
                           "--reward_config")
      if rcfg is None:
        raise ValueError("make_reward.kind = 'model' but ModelReward.path is not bound; bind "
                         "it or name the reward model's architecture with --reward_config.")
      from eva_jax.models import GemmaForSequenceClassification
      dtype = gin_value("ModelReward.param_dtype", None) or "bfloat16"
      rcfg = rcfg.replace(param_dtype=dtype, dtype=gin_value("ModelReward.dtype", None) or dtype,
                          num_labels=1)
      self.reward_model = GemmaForSequenceClassification(rcfg)
      axes, abstract = parallel.params_logical_axes(
          self.reward_model, jax.ShapeDtypeStruct((1, 8), jnp.int32))
      self.reward_shardings = parallel.logical_shardings(axes, self.mesh, self.rules, abstract)
      self.reward_abstract = abstract
      self.reward_gib = per_chip_gib(abstract, self.reward_shardings)

  @property
  def sampler(self):
    """The loop's sampler (built on first use, so that its settings' errors are the sampler
    program's)."""
    from eva_jax.sampler import Sampler  # pylint: disable=import-outside-toplevel
    if self._sampler is None:
      self._sampler = Sampler(self.policy, self.mesh, self.rules,
                              max_prompt_length=self.cfg.max_prompt_tokens, truncation="left")
    return self._sampler

  # ------------------------------------------------------------------ timing helpers

  def _seconds(self, flops: float, bytes_accessed: float) -> float:
    chip = self.topology.chip
    compute = flops / (chip.peak_tflops * 1e12 * self.mfu)
    memory = bytes_accessed / (chip.hbm_gbps * 1e9 * self.hbm_efficiency)
    return max(compute, memory)

  def _report(self, name, compiled, compile_s, resident_in_args, calls, knobs, flops,
              seconds=None, bytes_accessed=None, note=""):
    """`flops`: the call's model FLOPs (all chips); the call's time is their share per chip at
    the stated MFU, unless `seconds` is given."""
    arg, out, temp, alias = memory_gib(compiled)
    xla_flops, xla_bytes = xla_cost(compiled)
    per_chip = flops / self.topology.num_chips
    resident = self.train_state_gib + self.reward_gib + self.reference_params_gib
    return ProgramReport(
        name=name, argument_gib=arg, output_gib=out, temp_gib=temp, alias_gib=alias,
        resident_elsewhere_gib=max(0.0, resident - resident_in_args), flops_per_chip=per_chip,
        xla_flops_per_chip=xla_flops,
        bytes_per_chip=xla_bytes if bytes_accessed is None else bytes_accessed,
        seconds=self._seconds(per_chip, 0.0) if seconds is None else seconds,
        calls_per_round=calls, compile_s=compile_s, knobs=knobs, note=note)

  # ------------------------------------------------------------------ the programs

  def pairs_per_round(self) -> int:
    return int(self.cfg.pairs_per_round or self.prompts_per_round)

  def scored_length(self) -> int:
    """Positions per row the loop's train step and reference unembed (`EvaLoop`: the
    responses' bound). The projected FLOPs still count every position (the MFU convention)."""
    return min(self.cfg.max_new_tokens, self.cfg.max_length)

  def _pair_rows(self, pairs: int, share_prompt: bool) -> tuple[int, int]:
    """(sequences, tokens each) that `pairs` pairs run through the model: two rows of
    max_length each, or one packed row, the prompt once."""
    # pylint: disable=import-outside-toplevel
    from eva_jax.solver import batch as batch_lib
    if share_prompt:
      return pairs, batch_lib.shared_prompt_length(self.cfg.max_length, self.scored_length())
    return 2 * pairs, self.cfg.max_length

  def train_step(self) -> ProgramReport:
    # pylint: disable=import-outside-toplevel
    import jax
    import jax.numpy as jnp
    from eva_jax import solver
    from eva_jax.solver import batch as batch_lib
    cfg = self.cfg
    step = solver.make_train_step(self.policy, self.mesh, self.rules, optimizer=self.optimizer,
                                  loss_fn=self.loss_fn, max_length=cfg.max_length,
                                  scored_length=self.scored_length())
    step._check_divisible(cfg.batch_size)  # pylint: disable=protected-access
    batch = {k: jax.ShapeDtypeStruct(
        (cfg.batch_size, cfg.max_length) if k in batch_lib.TOKEN_KEYS else (cfg.batch_size,),
        jnp.int32 if k in batch_lib.TOKEN_KEYS else jnp.float32,
        sharding=step.batch_shardings[k]) for k in step.keys}
    state = _abstract(step.abstract_state, step.state_shardings)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    steps = cfg.epochs * math.ceil(self.pairs_per_round() / cfg.batch_size)
    flops = model_flops(self.policy.config, *self._pair_rows(cfg.batch_size, step.share_prompt),
                        backward=True)
    return self._report(
        "train_step", compiled, time.perf_counter() - start, self.train_state_gib, steps,
        KNOBS["train_step"], flops)

  def reference(self) -> Optional[ProgramReport]:
    # pylint: disable=import-outside-toplevel
    import jax
    import jax.numpy as jnp
    from eva_jax import parallel, solver
    if not self.loss_fn.needs_reference:
      return None
    batch_size = int(gin_value("reference_logps.batch_size", 64))
    unit = parallel.data_parallel_size(self.mesh, self.rules)
    batch_size = -(-batch_size // unit) * unit
    fn = solver.make_reference_fn(self.policy, self.mesh, self.rules,
                                  scored_length=self.scored_length(),
                                  param_shardings=self.state_shardings.params)
    rows = parallel.batch_sharding(self.mesh, 2, self.rules)
    tokens = jax.ShapeDtypeStruct((2 * batch_size, self.cfg.max_length), jnp.int32,
                                  sharding=rows)
    params = _abstract(self.abstract_state.params, self.state_shardings.params)
    start = time.perf_counter()
    with parallel.with_mesh_rules(self.mesh, self.rules):
      compiled = fn.lower(params, tokens, tokens).compile()
    calls = math.ceil(self.pairs_per_round() / batch_size)
    flops = model_flops(self.policy.config, *self._pair_rows(batch_size, fn.share_prompt))
    return self._report("reference_logps", compiled, time.perf_counter() - start,
                        self.params_gib, calls, KNOBS["reference_logps"], flops)

  def sampler_program(self) -> ProgramReport:
    # pylint: disable=import-outside-toplevel
    import jax
    from eva_jax.sampler.sampler import pick_bucket
    cfg, s = self.cfg, self.sampler
    k = cfg.num_samples
    chunk = s._chunk_prompts(k)  # pylint: disable=protected-access
    b = s._batch_bucket(min(chunk, cfg.sample_chunk), chunk)  # pylint: disable=protected-access
    p_len = pick_bucket(cfg.max_prompt_tokens, s.prompt_buckets, "Prompt length")
    rows, length = b * k, p_len + cfg.max_new_tokens
    # The program reads the sampler's decode copy of the params (`Sampler.decode_params`);
    # the train state stays resident beside it.
    params = s.decode_layout(_abstract(self.abstract_state.params, self.state_shardings.params))
    in_args = self.params_gib if s.decode_params == "as_given" else 0.0
    start = time.perf_counter()
    compiled = s.compile_abstract(
        params, b, p_len, num_samples=k, max_new_tokens=cfg.max_new_tokens,
        greedy=cfg.temperature == 0, use_top_p=cfg.temperature > 0 and cfg.top_p < 1.0)
    compile_s = time.perf_counter() - start
    # Decode segments (`Sampler.decode_segments`): steps up to each end run on a cache of the
    # slots written by then. A step is compiled on the side at the first and the last width;
    # the widths between are interpolated (bytes and FLOPs are affine in the width).
    ends = s.segment_ends(cfg.max_new_tokens)
    widths = [p_len + e for e in ends]
    steps = [e - prev for e, prev in zip(ends, (0,) + ends[:-1])]
    (_, prefill_bytes), *decode_costs = self._sampler_parts(
        params, b, p_len, rows, sorted({widths[0], widths[-1]}))
    first, last = decode_costs[0][1], decode_costs[-1][1]
    step_bytes = [first + (last - first) * (w - widths[0]) / max(1, widths[-1] - widths[0])
                  for w in widths]
    chips, model = self.topology.num_chips, self.policy.config
    # Model FLOPs for compute; XLA's bytes for the memory-bound decode step (its params and
    # cache reads, FSDP gathers included); every row runs to max_new_tokens (an upper bound).
    prefill_flops = model_flops(model, b, p_len)
    step_flops = [model_flops(model, rows, 1, key_len=w) for w in widths]
    decode_flops = sum(n * f for n, f in zip(steps, step_flops))
    prefill_s = self._seconds(prefill_flops / chips, prefill_bytes)
    decode_total_s = sum(n * self._seconds(f / chips, by)
                         for n, f, by in zip(steps, step_flops, step_bytes))
    decode_bytes = sum(n * by for n, by in zip(steps, step_bytes))
    calls = math.ceil(self.prompts_per_round / b)
    note = (f"{b} prompts x {k} samples, prompt bucket {p_len}, cache {length}; per call: "
            f"prefill {prefill_s:.2f} s + {cfg.max_new_tokens} decode steps of "
            f"{1e3 * decode_total_s / cfg.max_new_tokens:.1f} ms on average (each the "
            f"slower of its FLOPs and the {decode_bytes / cfg.max_new_tokens / GIB:.1f} GiB "
            f"per chip XLA says it reads on average, {last / GIB:.1f} over the whole cache; "
            f"decode segments: {len(ends)}; every row to max_new_tokens: an upper bound)")
    if not last:  # XLA:GPU's cost analysis reports no bytes accessed
      note += ("; XLA reports no bytes accessed for this target, so the decode steps are "
               "timed by their FLOPs alone: a lower bound")
    note += (f"; decode params: {s.decode_params}, "
             f"{per_chip_gib(params, [x.sharding for x in jax.tree_util.tree_leaves(params)]):.2f}"
             " GiB per chip")
    return self._report(
        "sampler", compiled, compile_s, in_args, calls, KNOBS["sampler"],
        prefill_flops + decode_flops, seconds=prefill_s + decode_total_s,
        bytes_accessed=prefill_bytes + decode_bytes, note=note)

  def _sampler_parts(self, params, b, p_len, rows, widths):
    """XLA's (FLOPs, bytes) per chip of the prefill and of one decode step attending over
    each of `widths` slots of the cache, compiled on the side (the generation program's
    decode loops have data-dependent trip counts)."""
    # pylint: disable=import-outside-toplevel
    import functools
    import jax
    import jax.numpy as jnp
    from eva_jax import parallel
    from eva_jax.models import init_cache
    s = self.sampler
    model, cfg = s.decode_model, s.config
    batch = lambda shape, dtype: jax.ShapeDtypeStruct(
        shape, dtype, sharding=parallel.batch_sharding(self.mesh, len(shape), self.rules))

    def prefill(p, tokens, mask):
      return model.apply({"params": p}, tokens, attention_mask=mask,
                         cache=init_cache(cfg, b, p_len, s.cache_dtype),
                         cache_index=jnp.int32(0), return_hidden=True)

    def decode(p, last, positions, mask, cache, slot):
      return model.apply({"params": p}, last, positions=positions, attention_mask=mask,
                         cache=cache, cache_index=slot)

    slot = jax.ShapeDtypeStruct((), jnp.int32)
    out = []
    with parallel.with_mesh_rules(self.mesh, self.rules):
      out.append(xla_cost(jax.jit(prefill).lower(params, batch((b, p_len), jnp.int32),
                                              batch((b, p_len), jnp.bool_)).compile()))
      for width in widths:
        cache = _abstract(jax.eval_shape(functools.partial(init_cache, cfg, rows, width,
                                                           s.cache_dtype)),
                          s.cache_shardings(rows, width))
        out.append(xla_cost(jax.jit(decode, donate_argnums=(4,)).lower(
            params, batch((rows, 1), jnp.int32), batch((rows, 1), jnp.int32),
            batch((rows, width), jnp.bool_), cache, slot).compile()))
    return out

  def reward_program(self) -> Optional[ProgramReport]:
    # pylint: disable=import-outside-toplevel
    import jax
    import jax.numpy as jnp
    from eva_jax import parallel
    from eva_jax.sampler.sampler import power_of_two_buckets
    if self.reward_model is None:
      return None
    max_length = int(gin_value("ModelReward.max_length", 2048))
    buckets = gin_value("ModelReward.length_buckets", None) or power_of_two_buckets(
        min(int(gin_value("ModelReward.min_length_bucket", 64)), max_length), max_length)
    length = max(buckets)
    dp = parallel.data_parallel_size(self.mesh, self.rules)
    batch_size = -(-int(gin_value("ModelReward.batch_size", 16)) // dp) * dp
    rows = parallel.batch_sharding(self.mesh, 2, self.rules)
    model = self.reward_model

    def forward(p, tokens, mask):
      return model.apply({"params": p}, tokens, attention_mask=mask).astype(jnp.float32)

    params = _abstract(self.reward_abstract, self.reward_shardings)
    start = time.perf_counter()
    with parallel.with_mesh_rules(self.mesh, self.rules):
      compiled = jax.jit(forward, out_shardings=parallel.batch_sharding(
          self.mesh, 1, self.rules)).lower(
              params, jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=rows),
              jax.ShapeDtypeStruct((batch_size, length), jnp.bool_, sharding=rows)).compile()
    # Every response of the round, plus the evolved prompts' and the held-out ones'.
    calls = math.ceil(self.prompts_per_round * self.cfg.num_samples * 2 / batch_size)
    return self._report(
        "reward_model", compiled, time.perf_counter() - start, self.reward_gib, calls,
        KNOBS["reward_model"], model_flops(model.config, batch_size, length),
        note=f"{batch_size} sequences of {length} tokens (the largest bucket); calls assume "
        "the round's responses and as many again for its evolved prompts")

  def run(self, only=None) -> list[ProgramReport]:
    builders = {"train_step": self.train_step, "reference_logps": self.reference,
                "sampler": self.sampler_program, "reward_model": self.reward_program}
    reports = []
    for name, build in builders.items():
      if only and name not in only:
        continue
      try:
        report = build()
      except Exception as e:  # pylint: disable=broad-except
        # A shape the mesh cannot split (ValueError from our checks) or XLA running out of
        # HBM while compiling (RESOURCE_EXHAUSTED): the program cannot run on this slice.
        if not (isinstance(e, ValueError) or "RESOURCE_EXHAUSTED" in str(e)):
          raise
        report = ProgramReport(name, *([float("nan")] * 5), 0.0, 0.0, 0.0, float("nan"), 0.0,
                               0.0, knobs=KNOBS[name], error=f"{e.__class__.__name__}: {e}"[:600])
      if report is not None:
        reports.append(report)
    return reports


# --------------------------------------------------------------------------- output

def summarize(check: FitCheck, reports: list[ProgramReport]) -> dict:
  chip = check.topology.chip
  scanned = bool(getattr(check.policy.config, "scan_layers", False))
  # The sampler's decode steps are timed from XLA's bytes, which count a scanned layer loop
  # once: no projection when the sampler decodes the stacked params (decode_params =
  # "as_given"); its default decode copy is unrolled.
  decode_scanned = any(r.name == "sampler" and not r.error for r in reports) and bool(
      check.sampler.decode_model.config.scan_layers)
  round_s = (None if decode_scanned or any(r.error for r in reports)
             else sum(r.seconds * r.calls_per_round for r in reports))
  return dict(
      topology=check.topology.name, libtpu_topology=check.topology.libtpu_name,
      chips=check.topology.num_chips, chip=dataclasses.asdict(chip),
      mesh=dict(check.mesh.shape), solver=dataclasses.asdict(check.policy.config),
      train_state_gib_per_chip=check.train_state_gib, reward_params_gib_per_chip=check.reward_gib,
      reference_params_gib_per_chip=check.reference_params_gib,
      mfu=check.mfu, hbm_efficiency=check.hbm_efficiency,
      prompts_per_round=check.prompts_per_round, pairs_per_round=check.pairs_per_round(),
      programs=[dict(dataclasses.asdict(r), total_gib=r.total_gib, fits=_fits(r, chip))
                for r in reports],
      scanned_layers=scanned, decode_scanned=decode_scanned,
      round_hours=None if round_s is None else round_s / 3600,
      fits=all(_fits(r, chip) for r in reports))


def _fits(report: ProgramReport, chip: ChipSpec) -> bool:
  return not report.error and report.total_gib <= chip.hbm_gib


def format_report(summary: dict) -> str:
  chip = summary["chip"]
  lines = [f"{summary['topology']} ({summary['chips']} chips of {chip['family']}, "
           f"{chip['hbm_gib']:g} GiB HBM each), mesh {summary['mesh']}; train state "
           f"{summary['train_state_gib_per_chip']:.2f} GiB/chip, reward params "
           f"{summary['reward_params_gib_per_chip']:.2f} GiB/chip"
           + (f", the initial params as reference {summary['reference_params_gib_per_chip']:.2f}"
              " GiB/chip" if summary["reference_params_gib_per_chip"] else "")
           + " (resident all round)",
           f"{'program':<16}{'args':>8}{'outputs':>9}{'temps':>8}{'resident':>10}{'total':>8}"
           f"{'HBM':>7}{'fits':>6}{'TFLOP/chip':>12}{'s/call':>9}{'calls':>8}{'compile s':>11}"]
  for p in summary["programs"]:
    lines.append(f"{p['name']:<16}{p['argument_gib']:>8.2f}{p['output_gib']:>9.2f}"
                 f"{p['temp_gib']:>8.2f}{p['resident_elsewhere_gib']:>10.2f}"
                 f"{p['total_gib']:>8.2f}{chip['hbm_gib']:>7g}"
                 f"{'yes' if p['fits'] else 'NO':>6}{p['flops_per_chip'] / 1e12:>12.2f}"
                 f"{p['seconds']:>9.3f}{p['calls_per_round']:>8.0f}{p['compile_s']:>11.1f}")
    if p["error"]:
      lines.append(f"  {p['name']}: cannot run on this slice: {p['error']}")
    elif p["note"]:
      lines.append(f"  {p['name']}: {p['note']}")
  hours = summary["round_hours"]
  lines.append(f"One round (~{summary['prompts_per_round']} prompts, "
               f"{summary['pairs_per_round']} pairs) at {summary['mfu']:.0%} MFU and "
               f"{summary['hbm_efficiency']:.0%} of HBM bandwidth: "
               + ("not projected (the sampler decodes the scanned layers: XLA's cost "
                  "analysis counts the layer loop once, so the decode steps' bytes come out "
                  "too low; run the check with Sampler.decode_params = 'gathered' or 'cast' "
                  "for times)"
                  if summary["decode_scanned"] else
                  "not projected (a program cannot run)" if hours is None else
                  f"{hours:.2f} h (sampler, reward, reference, train)")
               + "; memory in GiB per chip as XLA assigned it")
  return "\n".join(lines)


def parse_args(argv):
  from eva_jax.main import DEFAULT_GIN  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(prog="python -m eva_jax.aot", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gin_file", action="append", default=[],
                 help=f"as eva_jax.main (default: {DEFAULT_GIN})")
  p.add_argument("--gin_bindings", action="append", default=[], help="as eva_jax.main")
  p.add_argument("--topology", required=True, help="e.g. v5p-64, v5e-256, v4-32, v5e:2x2")
  p.add_argument("--solver_config", default=None,
                 help="the solver's architecture by name (when its checkpoint is not readable "
                 "here), e.g. gemma2_9b")
  p.add_argument("--reward_config", default=None,
                 help="the reward model's architecture by name, e.g. gemma2_27b")
  p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation")
  p.add_argument("--hbm_efficiency", type=float, default=0.7,
                 help="assumed share of HBM bandwidth in decode steps")
  p.add_argument("--prompts_per_round", type=int, default=10_000)
  p.add_argument("--programs", default=None,
                 help="comma-separated subset of train_step,reference_logps,sampler,"
                 "reward_model")
  p.add_argument("--json", default=None, help="also write the summary here")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  topology = parse_topology(args.topology)
  # Compiling for a slice runs nothing on a device: JAX's own backend stays the CPU even on a
  # machine with an accelerator (the TPU devices come from libtpu's topology description).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from eva_jax import loop  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  from eva_jax.main import load_gin  # pylint: disable=import-outside-toplevel
  load_gin(args.gin_file, args.gin_bindings)
  check = FitCheck(topology, mfu=args.mfu, hbm_efficiency=args.hbm_efficiency,
                   prompts_per_round=args.prompts_per_round, solver_config=args.solver_config,
                   reward_config=args.reward_config)
  only = set(args.programs.split(",")) if args.programs else None
  summary = summarize(check, check.run(only))
  print(format_report(summary), flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=1)
  failed = [p for p in summary["programs"] if not p["fits"]]
  for p in failed:
    why = (p["error"] if p["error"] else f"{p['total_gib']:.2f} GiB per chip of "
           f"{summary['chip']['hbm_gib']:g} GiB")
    print(f"eva_jax.aot: {p['name']} does not fit {summary['topology']}: {why}. Turn: "
          f"{p['knobs']}.", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

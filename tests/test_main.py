"""The command line: gin files by path or by shipped name, bindings, clear errors, and the
README's `python -m eva_jax.main` running the default rounds end to end."""

import os
import subprocess
import sys

import gin
import jax
import pytest

from eva_jax import main as eva_main
from eva_jax import metrics


def test_gin_files_resolve_by_path_or_shipped_name(tmp_path):
  assert eva_main.resolve_gin_file("eva_gemma.gin") == os.path.join(eva_main.GIN_DIR,
                                                                     "eva_gemma.gin")
  assert eva_main.resolve_gin_file("losses/ipo.gin").endswith("losses/ipo.gin")
  mine = tmp_path / "mine.gin"
  mine.write_text("EvaConfig.num_rounds = 1\n")
  assert eva_main.resolve_gin_file(str(mine)) == str(mine)
  with pytest.raises(FileNotFoundError, match=r"--gin_file 'nope.gin' does not exist; pass a "
                                              r"path .* or the name of a shipped one: ") as e:
    eva_main.resolve_gin_file("nope.gin")
  assert "eva_tiny.gin" in str(e.value) and "losses/dpo.gin" in str(e.value)


def test_missing_gin_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="--gin_file 'nope.gin' does not exist"):
    eva_main.main(["--gin_file", "nope.gin", "--workdir", str(tmp_path)])


def test_distributed_flags_go_together():
  with pytest.raises(ValueError, match="go together"):
    eva_main.main(["--coordinator_address", "127.0.0.1:1234"])


@pytest.mark.parametrize("argv,environ,want", [
    (["--workdir", "/runs/a"], {}, "/runs/a/jax_cache"),
    (["--workdir", "gs://bucket/runs/a/"], {}, "gs://bucket/runs/a/jax_cache"),
    (["--workdir", "/runs/a"], {"JAX_COMPILATION_CACHE_DIR": "/mine"}, None),
    ([], {}, None),  # a fresh temporary workdir: no later run would read it
    (["--workdir", "/runs/a", "--compilation_cache_dir", "/shared/cache"],
     {"JAX_COMPILATION_CACHE_DIR": "/mine"}, "/shared/cache"),
    (["--workdir", "/runs/a", "--compilation_cache_dir", "none"], {}, ""),
])
def test_where_the_compilation_cache_goes(argv, environ, want):
  args = eva_main.parse_args(argv)
  assert eva_main.compilation_cache_dir(args, environ) == want


def test_module_entry_point_runs_the_default_config(tmp_path):
  """The README's second set-up command (one short round instead of the default's three, and
  a workdir to look into): the closed world from the shipped warm-started solver. With no
  JAX_COMPILATION_CACHE_DIR, the compiled programs are kept in WORKDIR/jax_cache for the
  next process (this env writes every program there, however fast it compiled)."""
  env = dict(os.environ, XLA_FLAGS="")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  proc = subprocess.run([sys.executable, "-m", "eva_jax.main", "--workdir", str(tmp_path),
                         "--gin_bindings", "EvaConfig.num_rounds = 1"],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "eva_jax: after round 1" in proc.stdout and "done, 1 rounds" in proc.stdout
  assert "level 6" in proc.stdout and "evolved prompts beside their parents" in proc.stdout
  evals = [line for line in metrics.read_metrics(tmp_path) if "eval/reward_mean" in line]
  assert [e["round"] for e in evals] == [0, 1]
  assert all(f"eval/reward/level_{k}" in evals[0] for k in range(1, 7))
  # The shipped solver has partial competence: easy levels solved, hard ones not.
  assert evals[0]["eval/reward/level_1"] > 0.9 > evals[0]["eval/reward/level_6"]
  assert "InitialPolicy.path = 'builtin:closed_world_solver'" in (
      tmp_path / "config.gin").read_text()
  assert sorted(os.listdir(tmp_path / "plots")) == ["heldout_reward.png",
                                                    "informativeness.png"]
  assert len(os.listdir(tmp_path / "jax_cache")) > 5


@pytest.mark.parametrize("files", [["eva_gemma.gin"], ["eva_gemma.gin", "losses/simpo.gin"],
                                   ["eva_gemma.gin", "eva_gemma_api_evolver.gin"],
                                   ["eva_gemma.gin", "tpu/v5e_256.gin"]])
def test_shipped_gin_files_parse_and_compose(files):
  import gin  # pylint: disable=import-outside-toplevel
  from eva_jax import loop  # pylint: disable=import-outside-toplevel  (registers configurables)
  eva_main.load_gin(files, ["SOLVER = '/ckpt/gemma-2-9b-it'"])
  cfg = loop.EvaConfig()
  assert (cfg.num_samples, cfg.batch_size, cfg.epochs, cfg.max_length) == (6, 64, 2, 2048)
  assert loop.InitialPolicy().path == "/ckpt/gemma-2-9b-it"
  assert gin.query_parameter("get_loss_fn.name") == ("simpo" if "losses/simpo.gin" in files
                                                     else "dpo")
  v5e = "tpu/v5e_256.gin" in files
  assert gin.query_parameter("create_mesh.mesh_shape") == (
      {"data": 1, "fsdp": 64, "tensor": 4} if v5e else {"data": 1, "fsdp": -1, "tensor": 1})
  assert gin.query_parameter("make_train_step.num_microbatches") == (1 if v5e else 2)
  gin.clear_config()


def _launch(*argv):
  return eva_main.parse_args(list(argv))


@pytest.mark.parametrize("argv, environ, want", [
    ((), {}, None),  # one process
    (("--coordinator_address=h:1", "--num_processes=2", "--process_id=1"), {},
     dict(coordinator_address="h:1", num_processes=2, process_id=1)),
    ((), {"JAX_COORDINATOR_ADDRESS": "h:2", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
     dict(coordinator_address="h:2", num_processes=4, process_id=3)),
    ((), {"JAX_COORDINATOR_ADDRESS": "h:2"}, {}),  # JAX finds the rest itself
    ((), {"SLURM_NTASKS": "8"}, {}), ((), {"OMPI_COMM_WORLD_SIZE": "2"}, {}),
    ((), {"SLURM_NTASKS": "1"}, None),
    (("--distributed=on",), {}, {}),
    (("--distributed=off",), {"SLURM_NTASKS": "8"}, None),
])
def test_how_a_launch_joins_its_peers(monkeypatch, argv, environ, want):
  monkeypatch.setattr(eva_main, "_on_cloud_tpu_vm", lambda: False)
  assert eva_main.distributed_arguments(_launch(*argv), environ) == want


def test_a_cloud_tpu_vm_lets_jax_find_its_peers(monkeypatch):
  monkeypatch.setattr(eva_main, "_on_cloud_tpu_vm", lambda: True)
  assert eva_main.distributed_arguments(_launch(), {}) == {}


@pytest.mark.parametrize("argv, words", [
    (("--coordinator_address=h:1", "--num_processes=2"), "go together"),
    (("--coordinator_address=h:1", "--num_processes=2", "--process_id=2"),
     r"--process_id=2 must be in \[0, --num_processes=2\)")])
def test_incomplete_process_flags_are_refused(argv, words):
  with pytest.raises(ValueError, match=words):
    eva_main.distributed_arguments(_launch(*argv), {})


def test_no_accelerator_means_the_cpu_unless_the_user_chose(monkeypatch):
  monkeypatch.setattr(eva_main.os.path, "exists", lambda p: False)
  environ = {}
  eva_main.default_platforms(environ)
  assert environ == {"JAX_PLATFORMS": "cpu"}
  environ = {"JAX_PLATFORMS": "cuda"}
  eva_main.default_platforms(environ)
  assert environ == {"JAX_PLATFORMS": "cuda"}
  monkeypatch.setattr(eva_main.os.path, "exists", lambda p: p == "/dev/nvidia0")
  environ = {}
  eva_main.default_platforms(environ)
  assert environ == {}


def test_mixed_precision_gin_composes_after_a_main_file():
  """mixed_precision.gin on top of eva_gemma.gin: bfloat16 params with a float32 master copy,
  a bfloat16 first moment, remat "dots"; the rest of eva_gemma.gin's solver as it was."""
  from eva_jax import loop  # pylint: disable=unused-import  # registers the configurables
  from eva_jax.models import get_config
  from eva_jax.solver import make_optimizer, make_policy_model
  try:
    eva_main.load_gin(["eva_gemma.gin", "mixed_precision.gin"], [])
    model = make_policy_model(get_config("tiny"))
    opt = make_optimizer(1e-3)
    assert model.remat == "dots" and model.config.scan_layers
    assert (model.config.param_dtype, model.config.dtype) == ("bfloat16", "bfloat16")
    assert (opt.master_dtype, opt.mu_dtype, opt.state_dtype) == ("float32", "bfloat16",
                                                                 "float32")
  finally:
    gin.clear_config()


def test_flash_attention_gin_composes_after_mixed_precision():
  """flash_attention.gin on top of eva_gemma.gin and mixed_precision.gin: the fused attention
  for the policy, mixed precision kept, and the train step packs each pair in one row."""
  from eva_jax import loop, parallel  # pylint: disable=unused-import
  from eva_jax.models import get_config
  from eva_jax.solver import TrainStep, get_loss_fn, make_optimizer, make_policy_model
  try:
    eva_main.load_gin(["eva_gemma.gin", "mixed_precision.gin", "flash_attention.gin"], [])
    model = make_policy_model(get_config("tiny"))
    assert model.config.attention_impl == "flash" and model.remat == "dots"
    assert model.config.param_dtype == "bfloat16"
    mesh = parallel.create_mesh({"data": 1}, devices=jax.devices()[:1])
    step = TrainStep(model, make_optimizer(1e-3), get_loss_fn("dpo"), mesh, scored_length=8)
    assert step.share_prompt
  finally:
    gin.clear_config()

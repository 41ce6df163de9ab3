"""The TPU fit check (`python -m eva_jax.aot`): the round's programs compiled for a TPU slice
on this CPU (libtpu describes the slice; nothing runs on a TPU), and its verdicts."""

import json

import pytest

from eva_jax import aot

SMOKE = ["--gin_file=eva_smoke.gin"]


@pytest.mark.parametrize("name, chips, libtpu", [
    ("v5p-64", 32, "v5p:2x4x4"), ("v5e-256", 256, "v5e:16x16"),
    ("v5litepod-16", 16, "v5e:4x4"), ("v4-32", 16, "v4:2x2x4"), ("v5e:2x4", 8, "v5e:2x4"),
    ("V6E-8", 8, "v6e:2x4")])
def test_topology_names(name, chips, libtpu):
  t = aot.parse_topology(name)
  assert (t.num_chips, t.libtpu_name) == (chips, libtpu)


@pytest.mark.parametrize("name", ["v5e-1", "v5e-4", "v5p-8"])
def test_libtpu_describes_slices_smaller_than_a_host_too(name):
  topology = aot.parse_topology(name)
  assert len(aot.topology_devices(topology)) == topology.num_chips


def test_gpu_names_and_their_target_description():
  t = aot.parse_topology("H200-1")
  assert (t.num_chips, t.libtpu_name, t.chip.platform) == (1, "1x1x1", "cuda")
  assert aot.parse_topology("h100-8").num_chips == 8
  with pytest.raises(ValueError, match="GPUs of one host only, 1 to 8"):
    aot.parse_topology("h100-16")
  text = aot.gpu_target_config(t.chip)
  assert 'device_description_str: "NVIDIA H200"' in text
  assert f"device_memory_size: {int(140.4 * aot.GIB)}" in text
  assert "memory_bandwidth: 4800000000000" in text and "major: 9" in text


@pytest.mark.parametrize("name, words", [("v5p-63", "no v5p slice of that size"),
                                         ("v7x-8", "use a Cloud TPU accelerator type"),
                                         ("tpu", "use a Cloud TPU accelerator type")])
def test_bad_topology_names_say_what_to_use(name, words):
  with pytest.raises(ValueError, match=words):
    aot.parse_topology(name)


def _run(tmp_path, argv, capsys):
  out = tmp_path / "fit.json"
  code = aot.main([*argv, f"--json={out}"])
  captured = capsys.readouterr()
  return code, json.loads(out.read_text()), captured.out, captured.err


def test_the_smoke_config_fits_a_v5e_slice(tmp_path, capsys):
  code, summary, out, _ = _run(tmp_path, [*SMOKE, "--topology=v5e-4"], capsys)
  assert code == 0 and summary["fits"]
  assert summary["chips"] == 4 and summary["mesh"]["data"] == 4
  names = [p["name"] for p in summary["programs"]]
  assert names == ["train_step", "reference_logps", "sampler"]  # a programmatic reward
  for p in summary["programs"]:
    assert 0 < p["total_gib"] < 1 and p["flops_per_chip"] > 0 and p["calls_per_round"] >= 1
    assert p["xla_flops_per_chip"] > 0
  # The whole train state (params + 2 Adam moments, float32, replicated on `data`) is
  # resident while the sampler runs: its arguments hold the decode copy of the params.
  sampler = summary["programs"][2]
  assert sampler["resident_elsewhere_gib"] == pytest.approx(
      summary["train_state_gib_per_chip"], rel=0.01)
  assert "decode params: gathered" in sampler["note"]
  assert "train_step" in out and "One round" in out


def test_initial_params_as_reference_are_counted_resident(tmp_path, capsys):
  args = [*SMOKE, "--topology=v5e-4", "--programs=reference_logps"]
  _, plain, _, _ = _run(tmp_path, args, capsys)
  code, initial, out, _ = _run(
      tmp_path, [*args, "--gin_bindings=EvaConfig.reference = 'initial'"], capsys)
  assert code == 0 and plain["reference_params_gib_per_chip"] == 0
  params_gib = initial["reference_params_gib_per_chip"]
  assert params_gib == pytest.approx(initial["train_state_gib_per_chip"] / 3, rel=0.01)
  [a], [b] = plain["programs"], initial["programs"]
  assert b["resident_elsewhere_gib"] == pytest.approx(a["resident_elsewhere_gib"] + params_gib)
  assert "the initial params as reference" in out


def test_a_model_reward_is_compiled_too(tmp_path, capsys):
  code, summary, _, _ = _run(tmp_path, [
      *SMOKE, "--topology=v5e:2x2", "--reward_config=tiny", "--programs=reward_model",
      "--gin_bindings=make_reward.kind = 'model'", "--gin_bindings=ModelReward.batch_size = 8",
      "--gin_bindings=ModelReward.max_length = 200"], capsys)
  assert code == 0
  [reward] = summary["programs"]
  assert reward["name"] == "reward_model" and "8 sequences of 200 tokens" in reward["note"]
  assert summary["reward_params_gib_per_chip"] > 0


def test_a_config_that_cannot_fit_fails_naming_the_program_and_the_knob(tmp_path, capsys):
  # 4096 pairs of 8192 tokens in one micro-batch, no remat: activations far beyond 16 GiB.
  code, summary, _, err = _run(tmp_path, [
      *SMOKE, "--topology=v5e-4", "--programs=train_step",
      "--gin_bindings=EvaConfig.batch_size = 4096",
      "--gin_bindings=EvaConfig.max_length = 8192"], capsys)
  assert code == 1 and not summary["fits"]
  assert "eva_jax.aot: train_step does not fit v5e-4" in err
  assert "make_train_step.num_microbatches" in err


def test_a_batch_the_slice_cannot_split_is_reported_not_raised(tmp_path, capsys):
  code, summary, out, err = _run(tmp_path, [
      *SMOKE, "--topology=v5e-16", "--programs=train_step",
      "--gin_bindings=EvaConfig.batch_size = 8"], capsys)
  assert code == 1 and summary["round_hours"] is None
  assert "does not split into 1 micro-batches over 16 data-parallel shards" in err
  assert "cannot run on this slice" in out


def test_an_unreadable_checkpoint_asks_for_the_config_flag(capsys):
  with pytest.raises(ValueError, match="--solver_config"):
    aot.main([*SMOKE, "--topology=v5e-4",
              "--gin_bindings=InitialPolicy.path = '/nonexistent/gemma-2-9b-it'",
              "--gin_bindings=InitialPolicy.embedding_scale = 1.0"])


def test_scanned_and_unrolled_layers_project_the_same_round(tmp_path, capsys):
  # The train step is timed by its model FLOPs and the sampler by a decode step of its
  # unrolled decode copy, so scanning the policy's layers changes memory, not the projection.
  summaries = {}
  for scan in (True, False):
    code, summaries[scan], _, _ = _run(tmp_path, [
        *SMOKE, "--topology=v5e:2x2", "--programs=train_step,sampler",
        f"--gin_bindings=make_policy_model.scan_layers = {scan}"], capsys)
    assert code == 0 and summaries[scan]["scanned_layers"] == scan
    assert not summaries[scan]["decode_scanned"]
  assert summaries[True]["round_hours"] == pytest.approx(summaries[False]["round_hours"],
                                                         rel=0.02)
  assert all(p["total_gib"] > 0 for p in summaries[True]["programs"])


def test_decoding_scanned_layers_gets_memory_but_no_projected_time(tmp_path, capsys):
  # XLA's cost analysis counts a scanned layer loop once: no time is projected from it.
  code, summary, out, _ = _run(tmp_path, [
      *SMOKE, "--topology=v5e:2x2", "--programs=sampler",
      "--gin_bindings=Sampler.decode_params = 'as_given'"], capsys)
  assert code == 0 and summary["decode_scanned"] and summary["round_hours"] is None
  assert summary["programs"][0]["total_gib"] > 0
  assert "counts the layer loop once" in out


def test_model_flops_follow_the_mfu_convention():
  from eva_jax.models import get_config
  cfg = get_config("tiny")
  n, window = cfg.num_params(), cfg.sliding_window
  # 3 sequences of 10 tokens, forward: 2 N per token plus 4 H D per attended (query, key).
  pairs = sum(sum(min(q + 1, window if kind == "local" else 10) for q in range(10))
              for kind in cfg.attention_types)
  want = 2 * n * 30 + 3 * 4 * cfg.num_heads * cfg.head_dim * pairs
  assert aot.model_flops(cfg, 3, 10) == pytest.approx(want)
  assert aot.model_flops(cfg, 3, 10, backward=True) == pytest.approx(3 * want)
  # One decode query over a 40-slot cache sees min(40, window) keys on local layers.
  assert aot.attention_pairs(cfg, 1, 40) == sum(
      min(40, window) if kind == "local" else 40 for kind in cfg.attention_types)


def test_xla_counts_the_micro_batch_loop_once_the_model_flops_do_not(tmp_path, capsys):
  flops = {}
  for mb in (1, 2):
    code, summary, _, _ = _run(tmp_path, [
        *SMOKE, "--topology=v5e:2x2", "--programs=train_step",
        f"--gin_bindings=make_train_step.num_microbatches = {mb}"], capsys)
    assert code == 0
    p = summary["programs"][0]
    flops[mb] = (p["flops_per_chip"], p["xla_flops_per_chip"])
  assert flops[1][0] == flops[2][0]
  assert flops[2][1] == pytest.approx(flops[1][1] / 2, rel=0.05)

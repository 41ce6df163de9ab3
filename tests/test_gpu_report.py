"""benchmarks/gpu_report.py: a GPU session's results against issue 10's targets, from the
JSON files the benchmarks and the Tunix peers write (synthetic figures here)."""

import json


def _write(folder, name, obj):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / f"{name}.json").write_text(json.dumps(obj))


def _train(tokens_per_s, peak, compile_s=20.0, xla_flags=""):
  return dict(tokens_per_s=tokens_per_s, peak_memory_gib=peak, compile_s=compile_s, mfu=0.4,
              xla_flags=xla_flags)


def _sampler(new_tokens_per_s, roofline_fraction, compile_s=10.0, first_call_s=20.0, **more):
  return dict(new_tokens_per_s=new_tokens_per_s, roofline_fraction=roofline_fraction,
              compile_s=compile_s, first_call_s=first_call_s, xla_flags="", **more)


def test_two_parts_read_as_one_against_the_targets(tmp_path, capsys, benchmark_script):
  part1, part2 = tmp_path / "part1", tmp_path / "part2"
  _write(part1, "peer_tunix_dpo_gemma2_2b", dict(tokens_per_s=28_700, peak_gib=53.7,
                                                 device="NVIDIA H200", model="gemma2_2b"))
  _write(part1, "peer_tunix_generate_gemma2_2b", dict(new_tokens_per_s=14_000,
                                                     first_call_s=39.8))
  _write(part1, "train_default", _train(30_000, 47.0, compile_s=25.0))
  # 1.25x Tunix but over its peak: this one does not meet the target; the slower one does
  # (1.22x at 50 GiB), and one is enough.
  _write(part1, "train_mixed_precision_flash", _train(35_875, 60.0))
  _write(part2, "train_mixed_precision", _train(35_000, 50.0))
  _write(part1, "sampler_default", _sampler(29_000, 0.55, compile_s=12.0, first_call_s=30.0,
                                            hlo_roofline_fraction_bound=0.571))
  _write(part2, "sampler_flash_decode", _sampler(33_000, 0.6))
  (part2 / "sampler_sort.json").write_text('{"new_tokens_per_s": 1')  # killed mid-write

  summary = benchmark_script("gpu_report").main([str(part1), str(part2)])
  assert summary["about"]["device"] == ["NVIDIA H200"]
  assert summary["about"]["config"] == ["gemma2_2b"]
  assert set(summary["train"]) == {"default", "mixed_precision_flash", "mixed_precision"}
  assert set(summary["sampler"]) == {"default", "flash_decode"}
  assert abs(summary["train"]["default"]["vs_tunix"] - 30_000 / 28_700) < 1e-9
  targets = summary["targets"]
  shipped = targets["train: a shipped config >= 1.2x Tunix at <= its peak"]
  assert shipped["run"] == "mixed_precision" and shipped["verdict"] == "met"
  assert targets["train: the default >= 1.0x Tunix"]["verdict"] == "met"
  assert targets["train: the default compiles in < 30 s"]["verdict"] == "met"
  assert targets["sampler: the default >= 2x Tunix"]["verdict"] == "met"
  assert targets["sampler: the default >= 50% of its roofline"]["verdict"] == "met"
  assert targets["sampler: the first call faster than Tunix's"]["verdict"] == "met"
  assert json.loads((part1 / "gpu_report.json").read_text())["targets"] == targets
  # The step's static bound beside what it reached (older runs have none: "-").
  printed = capsys.readouterr().out
  assert "| default | 29000 | 2.07 | 0.55 | 0.57 | 12.0 | 30.0 | - |" in printed
  assert "| flash_decode | 33000 | 2.36 | 0.60 | - |" in printed


def test_over_the_peak_is_not_met(tmp_path, benchmark_script):
  _write(tmp_path, "peer_tunix_dpo_gemma2_2b", dict(tokens_per_s=28_700, peak_gib=53.7))
  _write(tmp_path, "train_mixed_precision_flash", _train(40_000, 60.0))
  _write(tmp_path, "train_mixed_precision", _train(30_000, 50.0))  # 1.05x
  shipped = benchmark_script("gpu_report").main([str(tmp_path)])["targets"][
      "train: a shipped config >= 1.2x Tunix at <= its peak"]
  assert shipped == dict(run="mixed_precision_flash", ok=False, verdict="NOT met")


def test_missing_figures_are_not_measured_never_met(tmp_path, capsys, benchmark_script):
  """No Tunix runs (a cut part) and a default whose step failed: the ratios are unknown."""
  _write(tmp_path, "train_mixed_precision", _train(35_000, 40.0))
  _write(tmp_path, "sampler_default", _sampler(29_000, 0.3, compile_s=25.0))
  summary = benchmark_script("gpu_report").main([str(tmp_path)])
  verdicts = {name: t["verdict"] for name, t in summary["targets"].items()}
  assert verdicts == {
      "train: a shipped config >= 1.2x Tunix at <= its peak": "not measured",
      "train: the default >= 1.0x Tunix": "not measured",
      "train: the default compiles in < 30 s": "not measured",
      "sampler: the default >= 2x Tunix": "not measured",
      "sampler: the default >= 50% of its roofline": "NOT met",
      "sampler: the default compiles in < 20 s": "NOT met",
      "sampler: the first call faster than Tunix's": "not measured",
  }
  printed = capsys.readouterr().out
  assert "| Tunix | not measured |" in printed and "| mixed_precision | 35000 |" in printed

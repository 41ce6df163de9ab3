"""benchmarks/attention.py runs and its error check can fail."""

import json

import pytest


def test_reports_both_implementations_and_their_agreement(tmp_path, benchmark_script):
  bench = benchmark_script("attention")
  out = tmp_path / "attention.json"
  result = bench.main(["--batch", "2", "--length", "48", "--heads", "4", "--kv_heads", "2",
                       "--head_dim", "16", "--pad", "5", "--window", "20", "--iters", "1",
                       "--dtype", "float32", "--block_q", "16", "--out", str(out)])
  assert json.loads(out.read_text()) == result
  for impl in ("flash", "xla"):
    assert result[impl]["step_s"] > 0 and result[impl]["tflops_per_s"] > 0
  assert set(result["flash_max_rel_error"]) == {"out", "dq", "dk", "dv"}
  assert max(result["flash_max_rel_error"].values()) < 1e-5
  assert result["blocks"]["block_q"] == 16


def test_flops_count_the_visible_pairs(benchmark_script):
  bench = benchmark_script("attention")
  # 4 positions, causal: 10 visible pairs; a window of 2: 7.
  assert bench.attention_flops(1, 4, 1, 1, None) == pytest.approx(2 * 7 * 10)
  assert bench.attention_flops(3, 4, 2, 8, 2) == pytest.approx(2 * 7 * 7 * 3 * 2 * 8)

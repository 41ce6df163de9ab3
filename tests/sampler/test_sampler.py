"""The sampler against the model's full forward (no cache), on tiny Gemma and Gemma 2 configs,
on one device and sharded over 8.

Tolerance: log-probs from the cached decode equal teacher-forced log-probs of the same
sequences to 1e-4 (absolute, float32 models); tokens are compared exactly. Every call here
has the same shapes (4 prompts, bucket 16, 2 samples, 24 new tokens), so the programs are
compiled once per sampling mode and reused across tests.
"""

import importlib.util
import os

import jax
import numpy as np
import pytest

from eva_jax.models import Transformer, stack_layers
from eva_jax.sampler import Sampler

_spec = importlib.util.spec_from_file_location(
    "sampler_tests_reference", os.path.join(os.path.dirname(__file__), "reference.py"))
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)
mp_targets = ref.load_sibling("mp_targets")

LOGPROB_ATOL = 1e-4
LENGTHS = (3, 7, 12, 1)  # mixed lengths: left padding up to 15 slots in the 16 bucket
MAX_NEW = 24  # 12 + 24 slots > tiny's sliding window of 16: local layers must slide
CACHE_LEN = 16 + MAX_NEW
COMMON = dict(num_samples=2, max_new_tokens=MAX_NEW)
SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.85)

_BUILT = {}


def one_device(config_name):
  """(model, params, sampler) on one device, built once per module and config."""
  if config_name not in _BUILT:
    model, mesh, params = mp_targets.build(config_name, num_devices=1)
    _BUILT[config_name] = (model, params, Sampler(model, mesh))
  return _BUILT[config_name]


@pytest.fixture(scope="module", params=["tiny", "tiny_gemma1"])
def setup(request):
  return one_device(request.param)


def tokens_of(results):
  return [[s.tokens for s in per] for per in results]


def test_greedy_with_cache_equals_full_forward_argmax(setup):
  model, params, sampler = setup
  prompts = mp_targets.prompts_for(LENGTHS)
  out = sampler.sample(params, prompts, temperature=0.0, stop_tokens=[], **COMMON)
  expected = ref.greedy_reference(model, params, prompts, MAX_NEW)
  for prompt, samples, want in zip(prompts, out, expected):
    assert len(samples) == 2
    for s in samples:
      assert s.tokens == want
      assert s.finish_reason == "length" and s.length == MAX_NEW
    lp, _ = ref.teacher_forced(model, params, prompt, [want], CACHE_LEN)
    np.testing.assert_allclose(samples[0].logprobs, lp[0], atol=LOGPROB_ATOL)
  # The comparison is only as strong as the continuations are varied.
  assert len({t for e in expected for t in e}) > 8


def test_sampled_logprobs_match_teacher_forcing_and_respect_filters(setup):
  model, params, sampler = setup
  prompts = mp_targets.prompts_for(LENGTHS, seed=1)
  out = sampler.sample(params, prompts, seed=3, stop_tokens=[], **SAMPLED, **COMMON)
  not_argmax = 0
  for prompt, samples in zip(prompts, out):
    lp, logits = ref.teacher_forced(model, params, prompt, [s.tokens for s in samples],
                                    CACHE_LEN)
    for s, want_lp, rows in zip(samples, lp, logits):
      np.testing.assert_allclose(s.logprobs, want_lp, atol=LOGPROB_ATOL)
      for t, tok in enumerate(s.tokens):
        assert ref.in_nucleus(rows[t], tok, SAMPLED["temperature"], SAMPLED["top_k"],
                              SAMPLED["top_p"]), (prompt, t, tok)
        not_argmax += tok != int(np.argmax(rows[t]))
  assert not_argmax > 10  # it really sampled
  # Samples of one prompt share the prefill but not the draws.
  assert all(len({tuple(s.tokens) for s in per}) == 2 for per in out)


def test_top_k_one_equals_greedy_and_seeds_are_reproducible(setup):
  _, params, sampler = setup
  prompts = mp_targets.prompts_for(LENGTHS, seed=2)
  greedy = sampler.sample(params, prompts, temperature=0.0, stop_tokens=[], **COMMON)
  top1 = sampler.sample(params, prompts, temperature=1.3, top_k=1, seed=5, stop_tokens=[],
                        **COMMON)
  assert tokens_of(top1) == tokens_of(greedy)

  a, b, c = (sampler.sample(params, prompts, seed=seed, stop_tokens=[], **SAMPLED, **COMMON)
             for seed in (7, 7, 8))
  assert tokens_of(a) == tokens_of(b)
  for pa, pb in zip(a, b):
    for sa, sb in zip(pa, pb):
      np.testing.assert_array_equal(sa.logprobs, sb.logprobs)
  assert tokens_of(a) != tokens_of(c)


def test_stop_tokens_per_row_end_rows_and_the_loop(setup):
  _, params, sampler = setup
  prompts = mp_targets.prompts_for(LENGTHS, seed=4)
  greedy = sampler.sample(params, prompts, temperature=0.0, stop_tokens=[], **COMMON)
  compiled = sampler.num_compilations
  g = [p[0].tokens for p in greedy]
  first = lambda r, t: g[r].index(t) + 1  # length up to the first occurrence of t
  # Per-prompt lists: prompt 1 never stops; the others stop where their token first shows.
  stops = [[g[0][4]], [], [999, g[2][2]], [g[3][0]]]
  out = sampler.sample(params, prompts, temperature=0.0, stop_tokens=stops, **COMMON)
  for r, per in enumerate(out):
    for s in per:
      if r == 1:
        assert s.tokens == g[1] and s.finish_reason == "length"
        continue
      k = first(r, stops[r][-1])
      assert s.tokens == g[r][:k] and s.finish_reason == "stop" and len(s.logprobs) == k
      np.testing.assert_allclose(s.logprobs, greedy[r][0].logprobs[:k], atol=1e-6)
  # When every row stops, the while_loop ends early instead of running to the budget.
  stops[1] = [g[1][6]]
  out = sampler.sample(params, prompts, temperature=0.0, stop_tokens=stops, **COMMON)
  lengths = [first(r, stops[r][-1]) for r in range(4)]
  assert [per[0].length for per in out] == lengths
  assert sampler.last_stats[-1]["decode_steps"] == max(lengths) - 1 < MAX_NEW - 1
  assert sampler.num_compilations == compiled  # other stop lists, same program


def _assert_same(results_a, results_b, atol=1e-5):
  assert tokens_of(results_a) == tokens_of(results_b)
  for pa, pb in zip(results_a, results_b, strict=True):
    for sa, sb in zip(pa, pb, strict=True):
      assert sa.finish_reason == sb.finish_reason
      np.testing.assert_allclose(sa.logprobs, sb.logprobs, atol=atol)


@pytest.mark.parametrize("config_name,mesh_shape", [("tiny", {"data": 4, "tensor": 2}),
                                                    ("tiny_gemma1", {"data": 2, "tensor": 4})])
def test_sharded_on_8_devices_equals_one_device(config_name, mesh_shape):
  assert len(jax.devices()) == 8
  model, params1, sampler1 = one_device(config_name)
  _, mesh8, params8 = mp_targets.build(config_name, mesh_shape)
  assert params8["layer_0"]["attn"]["q_einsum"].sharding.spec[0] == "tensor"
  np.testing.assert_array_equal(np.asarray(params1["layer_1"]["mlp"]["linear"]),
                                np.asarray(params8["layer_1"]["mlp"]["linear"]))
  sampler8 = Sampler(model, mesh8)
  assert sampler8.dp == mesh_shape["data"]
  prompts = mp_targets.prompts_for(LENGTHS, seed=6)
  for kw in (dict(temperature=0.0), dict(SAMPLED, seed=2)):
    kw = dict(kw, stop_tokens=[7, 9], **COMMON)
    _assert_same(sampler1.sample(params1, prompts, **kw), sampler8.sample(params8, prompts, **kw))


@pytest.mark.parametrize("config_name,mesh_shape,overrides", [
    ("tiny", None, {}),
    ("tiny_gemma1", None, {}),
    # An odd Gemma 2 depth: the last layer stays unrolled next to the stacked cache.
    ("tiny", None, {"attention_types": ("local", "global", "local")}),
    ("tiny", {"data": 4, "tensor": 2}, {})])
def test_scanned_model_samples_the_same_tokens(config_name, mesh_shape, overrides):
  """Scanned layers (`scan_layers`): the same greedy tokens as the unrolled model, its
  params stacked and its KV cache stacked [R, B, S, K, H] through the decode loop
  (decode_params="as_given"), or decoded from the unrolled copy the default makes."""
  if mesh_shape is None and not overrides:
    model, params, sampler = one_device(config_name)
  else:
    model, mesh, params = mp_targets.build(config_name, mesh_shape,
                                           num_devices=0 if mesh_shape else 1, **overrides)
    sampler = Sampler(model, mesh)
  scanned = Transformer(model.config.replace(scan_layers=True))
  sparams = stack_layers(params, scanned.config)
  ssampler = Sampler(scanned, sampler.mesh, decode_params="as_given")
  assert "layers" in ssampler.cache_shardings(4, 8)
  prompts = mp_targets.prompts_for(LENGTHS, seed=4)
  kw = dict(temperature=0.0, stop_tokens=[], **COMMON)
  want = sampler.sample(params, prompts, **kw)
  _assert_same(ssampler.sample(sparams, prompts, **kw), want)
  unrolled = Sampler(scanned, sampler.mesh)
  assert unrolled.model is scanned and not unrolled.config.scan_layers
  copy = unrolled.prepare_params(sparams)
  assert "layers" not in copy and "layers" not in unrolled.cache_shardings(4, 8)
  np.testing.assert_array_equal(np.asarray(copy["layer_2"]["mlp"]["linear"]),
                                np.asarray(params["layer_2"]["mlp"]["linear"]))
  _assert_same(unrolled.sample(sparams, prompts, **kw), want)


@pytest.mark.parametrize("config_name", ["tiny", "tiny_gemma1"])
def test_decode_segments_sample_as_one_loop_over_the_whole_cache(config_name):
  """Decode loops attending over the slots written so far (48 new tokens in 3 segments, past
  tiny's sliding window of 16) sample what one loop over the whole cache samples; rows that
  stop early end the later loops at once."""
  model, params, whole = one_device(config_name)
  whole = Sampler(model, whole.mesh, decode_segments=1)
  segmented = Sampler(model, whole.mesh, decode_segments=3)
  assert segmented.segment_ends(48) == (16, 32, 48)
  prompts = mp_targets.prompts_for(LENGTHS, seed=8)
  for kw in (dict(temperature=0.0, stop_tokens=[]), dict(SAMPLED, seed=5, stop_tokens=[7, 9])):
    kw = dict(kw, num_samples=2, max_new_tokens=48)
    _assert_same(whole.sample(params, prompts, **kw), segmented.sample(params, prompts, **kw))


@pytest.mark.parametrize("config_name,mesh_shape,every_mode", [
    ("tiny", None, True), ("tiny_gemma1", None, False), ("tiny", {"data": 4, "tensor": 2}, False)])
def test_flash_decode_samples_what_xla_attention_samples(config_name, mesh_shape, every_mode):
  """`attention_impl = "flash"`: every decode step through the decode kernel (Pallas'
  interpreter here), reading the cache only up to the step's slot, past tiny's sliding window
  of 16: the same tokens and log-probs as XLA's attention. Greedy everywhere (Gemma 2 and
  Gemma 1, one device and sharded); sampled, and with 4 decode segments (cache widths the
  kernel's key block must divide), on one device."""
  model, params, sampler = one_device(config_name)
  mesh = sampler.mesh
  if mesh_shape:
    _, mesh, params = mp_targets.build(config_name, mesh_shape)
  flash = Transformer(model.config.replace(attention_impl="flash"))
  prompts = mp_targets.prompts_for(LENGTHS, seed=9)
  modes = [dict(temperature=0.0, stop_tokens=[])]
  if every_mode:
    modes.append(dict(SAMPLED, seed=3, stop_tokens=[7, 9]))
  for kw in modes:
    kw = dict(kw, **COMMON)
    want = Sampler(model, mesh).sample(params, prompts, **kw)
    _assert_same(Sampler(flash, mesh).sample(params, prompts, **kw), want)
    if every_mode:
      _assert_same(Sampler(flash, mesh, decode_segments=4).sample(params, prompts, **kw), want)

"""The sampler's host side: buckets and compile counts, chunking, truncation, user errors,
and a bf16 model."""

import importlib.util
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from eva_jax import aot, parallel
from eva_jax.models import GemmaForSequenceClassification, Transformer, get_config, init_cache
from eva_jax.sampler import Sampler, pick_bucket, power_of_two_buckets

_spec = importlib.util.spec_from_file_location(
    "sampler_tests_reference", os.path.join(os.path.dirname(__file__), "reference.py"))
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)
mp_targets = ref.load_sibling("mp_targets")


@pytest.fixture(scope="module")
def tiny():
  return mp_targets.build("tiny", num_devices=1)


def test_bucket_ladders():
  assert power_of_two_buckets(16, 100) == (16, 32, 64, 100)
  assert power_of_two_buckets(16, 64) == (16, 32, 64)
  assert pick_bucket(17, (16, 32), "Prompt length") == 32
  with pytest.raises(ValueError, match="Prompt length 33 exceeds the largest bucket 32"):
    pick_bucket(33, (16, 32), "Prompt length")


def test_buckets_bound_the_number_of_compiled_programs(tiny):
  model, mesh, params = tiny
  sampler = Sampler(model, mesh, min_prompt_bucket=8, max_prompt_length=32)
  assert sampler.prompt_buckets == (8, 16, 32)
  kw = dict(max_new_tokens=4, num_samples=2, stop_tokens=[])
  sampler.sample(params, mp_targets.prompts_for([9, 3, 16]), temperature=0.7, top_p=0.9, **kw)
  assert sampler.num_compilations == 1
  assert sampler.last_stats[0]["batch"] == 4 and sampler.last_stats[0]["prompt_bucket"] == 16
  # Same buckets (4 prompts, longest 14): other seeds, temperatures and top_p values reuse it.
  sampler.sample(params, mp_targets.prompts_for([11, 10, 12, 14]), temperature=1.1,
                 top_p=0.5, seed=9, **kw)
  assert sampler.num_compilations == 1
  # A longer prompt moves to the next prompt bucket (and one prompt to batch bucket 1).
  sampler.sample(params, mp_targets.prompts_for([20]), temperature=0.7, top_p=0.9, **kw)
  assert sampler.num_compilations == 2
  assert sampler.last_stats[0]["batch"] == 1 and sampler.last_stats[0]["prompt_bucket"] == 32
  assert len(sampler.compile_seconds) == 2


def test_chunking_and_batch_padding_do_not_change_samples(tiny):
  model, mesh, params = tiny
  prompts = mp_targets.prompts_for([5, 9, 2, 14])
  kw = dict(num_samples=2, max_new_tokens=6, temperature=1.0, seed=11, stop_tokens=[])
  whole = Sampler(model, mesh)
  one = whole.sample(params, prompts[:3], **kw)
  assert [s["batch"] for s in whole.last_stats] == [4]  # 3 prompts + 1 dummy row
  chunked = Sampler(model, mesh, max_batch_rows=4)  # 2 prompts per program
  parts = chunked.sample(params, prompts, **kw)
  assert [s["batch"] for s in chunked.last_stats] == [2, 2]
  assert chunked.num_compilations == 1
  # Samples depend on (seed, prompt index, sample index), not on the chunk or the padding.
  assert [[s.tokens for s in p] for p in parts[:3]] == [[s.tokens for s in p] for p in one]


def test_bfloat16_model_samples_with_stated_tolerance():
  """bf16 weights, activations and cache: log-probs within 0.1 of the bf16 full forward."""
  model, mesh, params = mp_targets.build("tiny", num_devices=1, dtype="bfloat16",
                                         param_dtype="bfloat16")
  sampler = Sampler(model, mesh)
  assert sampler.cache_dtype == jnp.bfloat16
  prompts = mp_targets.prompts_for((3, 7, 12, 1), seed=5)
  out = sampler.sample(params, prompts, num_samples=2, max_new_tokens=24, temperature=1.0,
                       seed=1, stop_tokens=[])
  for prompt, samples in zip(prompts, out):
    lp, _ = ref.teacher_forced(model, params, prompt, [s.tokens for s in samples], 40)
    for s, want in zip(samples, lp):
      assert s.length == 24
      np.testing.assert_allclose(s.logprobs, want, atol=0.1)


def test_user_errors_name_the_problem(tiny):
  model, mesh, params = tiny
  sampler = Sampler(model, mesh, max_prompt_length=8, min_prompt_bucket=4)
  ok = [[2, 5, 6]]
  with pytest.raises(ValueError, match=r"prompt 1 has 9 tokens.*max_prompt_length=8"):
    sampler.sample(params, [[2, 3], list(range(2, 11))])
  with pytest.raises(ValueError, match="prompt 0 is empty"):
    sampler.sample(params, [[]])
  with pytest.raises(ValueError, match=r"prompt 0 has token ids outside \[0, 384\)"):
    sampler.sample(params, [[2, 384]])
  with pytest.raises(ValueError, match="prompt 0 is not a flat list of token ids"):
    sampler.sample(params, [[[2, 3]]])
  with pytest.raises(ValueError, match="prompt 1 is not a flat list of token ids"):
    sampler.sample(params, [[2], [2.5, 3.0]])
  with pytest.raises(ValueError, match="num_samples=0"):
    sampler.sample(params, ok, num_samples=0)
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    sampler.sample(params, ok, max_new_tokens=0)
  with pytest.raises(ValueError, match="temperature=-1"):
    sampler.sample(params, ok, temperature=-1)
  with pytest.raises(ValueError, match="top_p=0"):
    sampler.sample(params, ok, top_p=0)
  with pytest.raises(ValueError, match="top_k=385"):
    sampler.sample(params, ok, top_k=385)
  with pytest.raises(ValueError, match=r"seed=-1 must be in \[0, 2\*\*31\)"):
    sampler.sample(params, ok, seed=-1)
  with pytest.raises(ValueError, match="2 lists for 1 prompts"):
    sampler.sample(params, ok, stop_tokens=[[1], [1]])
  with pytest.raises(ValueError, match="mixes ids and lists"):
    sampler.sample(params, ok, stop_tokens=[1, [1]])
  with pytest.raises(ValueError, match="truncation='middle'"):
    Sampler(model, mesh, truncation="middle")
  with pytest.raises(ValueError, match="top_p_method='bisect'"):
    Sampler(model, mesh, top_p_method="bisect")
  with pytest.raises(ValueError, match="largest bucket 16 is below max_prompt_length=32"):
    Sampler(model, mesh, max_prompt_length=32, prompt_length_buckets=[8, 16])
  with pytest.raises(ValueError, match="increasing positive"):
    Sampler(model, mesh, max_prompt_length=16, prompt_length_buckets=[16, 8])
  with pytest.raises(TypeError, match="causal LM"):
    Sampler(GemmaForSequenceClassification(get_config("tiny")), mesh)
  assert sampler.sample(params, []) == []
  assert sampler.num_compilations == 0  # every error was raised before compiling


def test_left_truncation_keeps_bos_and_the_end(tiny):
  model, mesh, params = tiny
  sampler = Sampler(model, mesh, max_prompt_length=8, min_prompt_bucket=8, truncation="left")
  long = [2] + list(range(10, 30))
  kw = dict(max_new_tokens=5, temperature=0.0, stop_tokens=[])
  got = sampler.sample(params, [long, list(range(10, 30))], **kw)
  want = sampler.sample(params, [[2] + long[-7:], list(range(22, 30))], **kw)
  assert [p[0].tokens for p in got] == [p[0].tokens for p in want]
  assert sampler.num_compilations == 1


def test_knobs_bind_with_gin(tiny):
  model, mesh, _ = tiny
  try:
    gin.parse_config(["Sampler.min_prompt_bucket = 8", "Sampler.max_prompt_length = 64",
                      "Sampler.truncation = 'left'"])
    sampler = Sampler(model, mesh)
  finally:
    gin.clear_config()
  assert sampler.prompt_buckets == (8, 16, 32, 64) and sampler.truncation == "left"
  assert Sampler(model, mesh).prompt_buckets[0] == 16  # defaults again without gin


def _leaf_layouts(tree):
  return [(x.dtype, x.sharding.spec) for x in jax.tree_util.tree_leaves(tree)]


@pytest.fixture(scope="module")
def fsdp_bf16():
  """float32 params FSDP-sharded over 4 devices x tensor 2, bfloat16 compute (the train
  state's layout and dtypes)."""
  return mp_targets.build("tiny", {"fsdp": 4, "tensor": 2}, dtype="bfloat16",
                          param_dtype="float32")


def test_gathered_decode_params_sample_exactly_as_the_train_layout(fsdp_bf16):
  """The default decode copy (compute-dtype weights, whole on every data/fsdp device) gives
  the same tokens and log-probs, to the bit, as decoding the float32 FSDP shards."""
  model, mesh, params = fsdp_bf16
  given = Sampler(model, mesh, decode_params="as_given")
  gathered = Sampler(model, mesh)
  assert gathered.decode_params == "gathered"
  prepared = gathered.prepare_params(params)
  layer = prepared["layer_0"]
  # The matmul weight layout: embed first, heads still over `tensor`.
  assert layer["attn"]["q_einsum"].dtype == jnp.bfloat16
  assert layer["attn"]["q_einsum"].sharding.spec == P(None, "tensor", None)
  np.testing.assert_array_equal(
      np.asarray(layer["attn"]["q_einsum"].astype(jnp.float32)),
      np.transpose(np.asarray(params["layer_0"]["attn"]["q_einsum"].astype(jnp.bfloat16)
                              .astype(jnp.float32)), (1, 0, 2)))
  assert layer["attn"]["kv_einsum"].shape == (model.config.embed_dim, 2,
                                              model.config.num_kv_heads, model.config.head_dim)
  assert layer["mlp"]["gating_einsum"].sharding.spec == P(None, None, "tensor")
  assert params["layer_0"]["mlp"]["gating_einsum"].sharding.spec == P(None, "fsdp", "tensor")
  # Norm scales are read in float32 by the model: kept so, only replicated.
  assert layer["pre_ffw_norm"]["scale"].dtype == jnp.float32
  assert layer["pre_ffw_norm"]["scale"].sharding.spec == P(None)
  # Prepared params come back as they are (no second copy per call).
  again = jax.tree_util.tree_leaves(gathered.prepare_params(prepared))
  assert all(a is b for a, b in zip(again, jax.tree_util.tree_leaves(prepared)))
  # "cast": the rules' own splits (fsdp on embed), in the matmul layout's axis order.
  cast = Sampler(model, mesh, decode_params="cast").prepare_params(params)
  assert _leaf_layouts(cast["layer_1"]["mlp"]) == [(jnp.bfloat16, P("fsdp", None, "tensor")),
                                                   (jnp.bfloat16, P("tensor", "fsdp"))]

  prompts = mp_targets.prompts_for((3, 7, 12, 1), seed=6)
  for kw in (dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, seed=2)):
    kw = dict(kw, num_samples=2, max_new_tokens=24, stop_tokens=[])
    want, got = given.sample(params, prompts, **kw), gathered.sample(params, prompts, **kw)
    got_prepared = gathered.sample(prepared, prompts, **kw)
    for a, b, c in zip(want, got, got_prepared, strict=True):
      for sa, sb, sc in zip(a, b, c, strict=True):
        assert sa.tokens == sb.tokens == sc.tokens
        np.testing.assert_array_equal(sa.logprobs, sb.logprobs)
        np.testing.assert_array_equal(sa.logprobs, sc.logprobs)
  assert len({t for per in want for s in per for t in s.tokens}) > 8


def test_the_decode_copy_keeps_the_checkpoint_weight_layout_on_tpus(tiny):
  """On TPUs (here a v5e chip described by libtpu, nothing compiled) the decode copy keeps
  Gemma's weight layout, which XLA:TPU reads in place; elsewhere it is the matmul one."""
  model, mesh, _ = tiny
  tpu = parallel.create_mesh({"data": -1}, devices=aot.topology_devices(
      aot.parse_topology("v5e-1")))
  assert Sampler(model, tpu).config.weight_layout == "checkpoint"
  assert Sampler(model, mesh).config.weight_layout == "matmul"
  assert Sampler(model, mesh, decode_params="as_given").decode_model is model


def test_compiled_for_a_tpu_the_generation_program_holds_its_cache_once():
  """Compiled for a v5e chip (libtpu describes it; nothing runs), the generation program's
  memory is its KV cache about once: the program makes the cache itself, in the layout XLA:TPU
  picks for the decode loop. A cache passed in (donated) and returned kept the default layout
  at the program's edges, and XLA:TPU held it in its own layout besides: 2.8 caches here
  (3.0 for gemma2_2b's 256 rows x 512 slots on a v5p chip, 12.3 GiB more)."""
  cfg = get_config("tiny", head_dim=256, num_heads=8, num_kv_heads=4, dtype="bfloat16",
                   attention_types=("local", "global"), sliding_window=4096)
  model = Transformer(cfg)
  mesh = parallel.create_mesh({"data": -1}, devices=aot.topology_devices(
      aot.parse_topology("v5e-1")))
  example = jnp.ones((1, 8), jnp.int32)
  _, shapes = parallel.params_logical_axes(model, example)
  params = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
      parallel.params_shardings(model, mesh, None, example))
  rows, prompt_len, new = 64, 16, 1008
  sampler = Sampler(model, mesh, max_prompt_length=prompt_len,
                    prompt_length_buckets=[prompt_len], max_batch_rows=rows)
  compiled = sampler.compile_abstract(sampler.decode_layout(params), rows, prompt_len,
                                      num_samples=1, max_new_tokens=new)
  cache_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(
      jax.eval_shape(lambda: init_cache(sampler.config, rows, prompt_len + new,
                                        sampler.cache_dtype))))
  assert cache_bytes == 512 * 2**20
  total = aot.memory_total_gib(compiled) * aot.GIB
  assert cache_bytes < total < 1.2 * cache_bytes, total / cache_bytes


def test_gathered_decode_program_gathers_no_weights():
  """Over 8 FSDP devices, the program decoding the given float32 shards all-gathers weights
  (every layer, every step); the one reading the gathered copy has no all-gather at all."""
  model, mesh, params = mp_targets.build("tiny", {"fsdp": 8}, dtype="bfloat16",
                                         param_dtype="float32")
  prompts = mp_targets.prompts_for((3, 7, 12, 1, 5, 6, 7, 8), seed=6)
  counts = {}
  for mode in ("as_given", "gathered"):
    sampler = Sampler(model, mesh, decode_params=mode)
    sampler.sample(params, prompts, max_new_tokens=4, temperature=0.0)
    (program,) = sampler._programs.values()  # pylint: disable=protected-access
    counts[mode] = program.as_text().count("all-gather")
  assert counts["as_given"] > 10 and counts["gathered"] == 0, counts


def test_decode_params_errors_name_the_problem(tiny):
  model, mesh, params = tiny
  with pytest.raises(ValueError, match="decode_params='bf16'"):
    Sampler(model, mesh, decode_params="bf16")
  wrong = dict(params)
  wrong.pop("layer_1")
  with pytest.raises(ValueError, match="params' tree is not the sampler's model's"):
    Sampler(model, mesh).sample(wrong, [[2, 3]])


def test_segment_ends_cut_the_decode_loop(tiny):
  model, mesh, _ = tiny
  assert Sampler(model, mesh).segment_ends(512) == (512,)  # the default: one loop
  sampler = Sampler(model, mesh, decode_segments=4)
  assert sampler.segment_ends(512) == (128, 256, 384, 512)
  assert sampler.segment_ends(100) == (32, 64, 80, 100)  # ends on multiples of 16
  assert sampler.segment_ends(24) == (16, 24)
  assert sampler.segment_ends(8) == (8,)
  with pytest.raises(ValueError, match="decode_segments=0 must be >= 1"):
    Sampler(model, mesh, decode_segments=0)

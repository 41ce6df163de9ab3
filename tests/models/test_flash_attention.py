"""The fused attention kernel (`attention_impl = "flash"`) against XLA's attention, on the CPU
(Pallas' interpreter runs the same kernel code that Triton compiles on a GPU).

Rows with no visible key (left padding) differ by design (zero output instead of a uniform
average) and never reach a real position, so outputs are compared at real query rows and
everything downstream (logits at real positions, gradients) must agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core
from flax import linen as nn

from eva_jax import parallel
from eva_jax.models import Transformer, get_config
from eva_jax.models.flash_attention import (BlockSizes, attention_reference, flash_attention,
                                             packed_mask)

SMALL = BlockSizes(16, 16, 16, 16)


def _inputs(b, t, n, kv, h, dtype, pad_rows=((1, 7),), seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), dtype) for heads in (n, kv, kv))
  valid = np.ones((b, t), bool)
  for row, pad in pad_rows:
    valid[row, :pad] = False  # left padding: these queries see no key
  return q, k, v, jnp.asarray(valid)


def _max_rel_err(actual, desired, rows=None):
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  if rows is not None:
    actual, desired = actual * rows, desired * rows
  return float(np.max(np.abs(actual - desired)) / np.max(np.abs(desired)))


CASES = {
    # name: (batch, length, query heads, kv heads, head_dim, softcap, window)
    "gqa_softcap_window": (2, 40, 4, 2, 16, 5.0, 9),
    "mqa_softcap": (2, 33, 4, 1, 16, 5.0, None),
    "mha_plain": (2, 32, 2, 2, 16, None, None),
    "head_dim_not_a_power_of_two": (2, 20, 2, 1, 24, 5.0, 7),
    "window_longer_than_sequence": (2, 24, 2, 1, 16, 50.0, 64),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_reference_values_and_gradients(name):
  b, t, n, kv, h, cap, window = CASES[name]
  q, k, v, valid = _inputs(b, t, n, kv, h, jnp.float32)
  rows = np.asarray(valid)[:, :, None, None]
  out = flash_attention(q, k, v, valid, softcap=cap, window=window, blocks=SMALL)
  ref = attention_reference(q, k, v, valid, softcap=cap, window=window)
  assert out.shape == ref.shape and out.dtype == ref.dtype
  assert _max_rel_err(out, ref, rows) < 1e-5
  assert np.all(np.isfinite(np.asarray(out)))

  # A loss on real rows only: gradients must agree everywhere, padding included.
  weights = jnp.asarray(np.random.default_rng(1).normal(size=out.shape), jnp.float32) * rows

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

  flash_grads = jax.grad(loss(lambda q, k, v: flash_attention(
      q, k, v, valid, softcap=cap, window=window, blocks=SMALL)), (0, 1, 2))(q, k, v)
  ref_grads = jax.grad(loss(lambda q, k, v: attention_reference(
      q, k, v, valid, softcap=cap, window=window)), (0, 1, 2))(q, k, v)
  for got, want, what in zip(flash_grads, ref_grads, "qkv"):
    assert got.shape == want.shape, what
    assert _max_rel_err(got, want) < 1e-5, what


def test_bfloat16_inputs_and_default_blocks():
  q, k, v, valid = _inputs(2, 70, 4, 2, 32, jnp.bfloat16, pad_rows=((0, 11),))
  rows = np.asarray(valid)[:, :, None, None]
  out = flash_attention(q, k, v, valid, softcap=50.0, window=20)
  ref = attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), valid, softcap=50.0,
                            window=20)
  assert out.dtype == jnp.bfloat16
  assert _max_rel_err(out, ref, rows) < 2e-2  # bfloat16 probabilities and output


def test_errors_name_the_problem():
  q, k, v, valid = _inputs(1, 16, 2, 1, 16, jnp.float32, pad_rows=())
  with pytest.raises(ValueError, match="full sequences"):
    flash_attention(q, k[:, :8], v[:, :8], valid[:, :8])
  with pytest.raises(ValueError, match="not a multiple"):
    flash_attention(q[:, :, :1], jnp.concatenate([k, k], 2), jnp.concatenate([v, v], 2), valid)
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(block_q=48)
  from eva_jax.models.flash_attention import flash_decode  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="decodes one"):
    flash_decode(q[:, :2], k, v, valid, jnp.int32(1))
  with pytest.raises(ValueError, match="not a multiple"):
    flash_decode(q[:, :1, :1], jnp.concatenate([k, k], 2), jnp.concatenate([v, v], 2), valid,
                 jnp.int32(1))
  with pytest.raises(ValueError, match="attention_impl"):
    get_config("tiny", attention_impl="cudnn")
  model = Transformer(get_config("tiny", attention_impl="flash"))
  ids = jnp.ones((1, 8), jnp.int32)
  params = model.init(jax.random.key(0), ids)
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    model.apply(params, ids, attention_mask=jnp.ones((1, 8, 8), bool))


def _ids(cfg, batch=3, length=37):
  ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (batch, length)).astype(np.int32)
  ids[1, :5] = cfg.pad_id   # left padding
  ids[2, -4:] = cfg.pad_id  # right padding
  return jnp.asarray(ids)


def _loss(model, ids):
  valid = ids != model.config.pad_id

  def loss(params):
    logits = model.apply(params, ids, attention_mask=valid)
    logp = jax.nn.log_softmax(logits)[..., :5]
    return jnp.sum(jnp.where(valid[..., None], logp, 0.0)), logits

  return loss


@pytest.mark.parametrize("name,scan,remat", [("tiny", True, "dots"), ("tiny", False, "full"),
                                             ("tiny_gemma1", True, "none")])
def test_model_logits_and_gradients_equal_xla(name, scan, remat):
  """Gemma 2 (soft-cap, sliding window shorter than the sequence, grouped-query) and Gemma 1
  (multi-query), scanned and unrolled, under the remat policies the solver uses."""
  cfg = get_config(name, scan_layers=scan)
  ids = _ids(cfg)
  xla = Transformer(cfg, remat=remat)
  fused = Transformer(cfg.replace(attention_impl="flash"), remat=remat)
  params = nn.unbox(xla.init(jax.random.key(1), ids))
  (l_x, logits_x), g_x = jax.value_and_grad(_loss(xla, ids), has_aux=True)(params)
  (l_f, logits_f), g_f = jax.value_and_grad(_loss(fused, ids), has_aux=True)(params)
  rows = np.asarray(ids != cfg.pad_id)[..., None]
  assert _max_rel_err(logits_f, logits_x, rows) < 1e-5
  assert abs(float(l_f) - float(l_x)) <= 1e-5 * abs(float(l_x))
  for path, got in jax.tree_util.tree_leaves_with_path(g_f):
    want = g_x
    for key in path:
      want = want[key.key]
    assert _max_rel_err(got, want) < 1e-4, jax.tree_util.keystr(path)


def _all_shapes(jaxpr, out):
  for eqn in jaxpr.eqns:
    out.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
    for sub in jax_core.jaxprs_in_params(eqn.params):
      _all_shapes(sub, out)
  return out


def test_no_full_score_matrix_in_the_program():
  cfg = get_config("tiny")
  ids = _ids(cfg, length=40)
  t = ids.shape[1]
  fused = Transformer(cfg.replace(attention_impl="flash"), remat="full")
  params = nn.unbox(fused.init(jax.random.key(1), ids))
  grad = jax.grad(lambda p: _loss(fused, ids)(p)[0])
  shapes = _all_shapes(jax.make_jaxpr(grad)(params).jaxpr, set())
  assert not any(len(s) >= 2 and s[-2:] == (t, t) for s in shapes)
  xla = Transformer(cfg, remat="full")
  xla_shapes = _all_shapes(jax.make_jaxpr(jax.grad(lambda p: _loss(xla, ids)(p)[0]))(
      params).jaxpr, set())
  assert any(len(s) >= 2 and s[-2:] == (t, t) for s in xla_shapes)  # the check can fail


@pytest.mark.parametrize("mesh_shape", [{"data": 2, "fsdp": 2, "tensor": 2},
                                        {"fsdp": 2, "tensor": 4}])
def test_sharded_gradients_equal_one_device(mesh_shape):
  """Per-shard kernels (shard_map over batch and heads). With tensor=4 the 2 kv heads cannot
  be split 4 ways, so each query head gets its kv head's copy."""
  cfg = get_config("tiny", scan_layers=True)
  ids = _ids(cfg, batch=4, length=24)
  xla = Transformer(cfg, remat="full")
  params = nn.unbox(xla.init(jax.random.key(1), ids))
  (_, want_logits), want = jax.value_and_grad(_loss(xla, ids), has_aux=True)(params)

  fused = Transformer(cfg.replace(attention_impl="flash"), remat="full")
  mesh = parallel.create_mesh(mesh_shape)
  shardings = parallel.params_shardings(fused, mesh, None, ids)
  sharded = jax.device_put(params, {"params": shardings})
  step = jax.value_and_grad(_loss(fused, ids), has_aux=True)
  with parallel.with_mesh_rules(mesh):
    assert "shard_map" in str(jax.make_jaxpr(step)(sharded))  # the kernel runs per shard
    (_, logits), got = jax.jit(step)(sharded)
  rows = np.asarray(ids != cfg.pad_id)[..., None]
  assert _max_rel_err(logits, want_logits, rows) < 1e-5
  for got_leaf, want_leaf in zip(jax.tree_util.tree_leaves(got),
                                 jax.tree_util.tree_leaves(want)):
    assert _max_rel_err(got_leaf, want_leaf) < 1e-4


def test_tpu_path_splash_attention_matches_reference():
  """On TPUs (chosen by `lax.platform_dependent` when lowering for one) the kernel is JAX's
  splash attention: run here in Pallas' interpreter, with the grouped heads, soft-cap, local
  window and padding of the model, against the reference; its log-sum-exp against the
  GPU kernel's."""
  from eva_jax.models import flash_attention as F  # pylint: disable=import-outside-toplevel
  statics = dict(softcap=5.0, window=70)
  q, k, v, valid = _inputs(2, 256, 4, 2, 32, jnp.float32, pad_rows=((1, 30),))
  rows = np.asarray(valid)
  out, lse = F._splash(q, k, v, valid, with_lse=True, interpret=True, **statics)
  assert _max_rel_err(out, attention_reference(q, k, v, valid, **statics),
                      rows[:, :, None, None]) < 1e-5
  valid32 = valid.astype(jnp.int32)
  _, gpu_lse = F._forward(q, k, v, valid32, valid32, packed=False, blocks=BlockSizes(),
                         **statics)
  assert _max_rel_err(lse, gpu_lse, rows[:, None, :]) < 1e-5

  # A length that splash's 128-slot tiles do not divide: padded, then cut.
  q, k, v, valid = _inputs(2, 200, 4, 2, 32, jnp.float32, pad_rows=((1, 30),))
  rows = np.asarray(valid)
  weights = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)
  weights = weights * rows[:, :, None, None]
  splash_grads = jax.grad(lambda q, k, v: jnp.sum(F._splash(
      q, k, v, valid, with_lse=False, interpret=True, **statics) * weights), (0, 1, 2))(q, k, v)
  ref_grads = jax.grad(lambda q, k, v: jnp.sum(attention_reference(
      q, k, v, valid, **statics) * weights), (0, 1, 2))(q, k, v)
  for got, want, what in zip(splash_grads, ref_grads, "qkv"):
    assert _max_rel_err(got, want) < 1e-5, what


def test_tiles_are_gin_bindable():
  import gin  # pylint: disable=import-outside-toplevel
  with gin.unlock_config():
    gin.parse_config(["BlockSizes.block_q = 128", "BlockSizes.num_warps = 8"])
  try:
    assert (BlockSizes().block_q, BlockSizes().block_k, BlockSizes().num_warps) == (128, 64, 8)
    with gin.unlock_config():
      gin.parse_config(["BlockSizes.block_k = 48"])
    with pytest.raises(ValueError, match="block_k = 48"):
      BlockSizes()
  finally:
    gin.clear_config()


@pytest.mark.end_to_end  # libtpu's compiler: the Python 3.12 pass leaves it out (conftest.py)
def test_compiled_for_a_tpu_the_model_runs_splash_attention():
  """Lowered for a TPU (libtpu describes a v5e chip; nothing runs), the flash model's
  gradient holds Mosaic kernels (splash attention), not the CPU interpreter's or Triton's;
  the XLA model's holds none."""
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel

  from eva_jax import aot  # pylint: disable=import-outside-toplevel
  devices = aot.topology_devices(aot.parse_topology("v5e-4"))
  mesh = jax.sharding.Mesh(np.array(devices[:1]), ("data",))
  cfg = get_config("tiny", scan_layers=True)
  ids = _ids(cfg, length=40)
  texts = {}
  for impl in ("flash", "xla"):
    model = Transformer(cfg.replace(attention_impl=impl), remat="full")
    abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(1), ids)))
    on_chip = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=NamedSharding(mesh, PartitionSpec())),
        abstract)
    grad = jax.jit(jax.grad(lambda p: _loss(model, ids)(p)[0]))
    texts[impl] = grad.lower(on_chip).compile().as_text()
  assert "tpu_custom_call" in texts["flash"]
  assert "tpu_custom_call" not in texts["xla"]
  assert "triton" not in texts["flash"]


@pytest.mark.parametrize("cache_index,window,length", [(50, None, 80), (50, 20, 80),
                                                       (79, 33, 80), (3, None, 64),
                                                       (20, 8, 40)])
def test_decode_kernel_matches_reference_and_skips_unwritten_blocks(cache_index, window,
                                                                    length):
  """One decode step: the same output as XLA's decode over the whole cache, for rows that see
  at least one key (a real decode row sees its own slot). The kernel reads key blocks from
  the window's first to the one holding `cache_index`: NaN in the other slots changes
  nothing, while XLA's decode, which reads them, turns NaN. 40 slots: not a multiple of a
  16-slot block (no sampler makes it), so the cache is padded."""
  from eva_jax.models import flash_attention as F  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(cache_index)
  b, n, kv, h = 3, 4, 2, 16
  q = jnp.asarray(rng.normal(size=(b, 1, n, h)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, length, kv, h)), jnp.float32) for _ in range(2))
  slots = np.arange(length)
  visible = np.ones((b, length), bool)
  visible[1, :2] = False  # left padding
  visible &= slots[None, :] <= cache_index
  if window:
    visible &= (cache_index - slots[None, :]) < window
  visible = jnp.asarray(visible)
  decode = lambda k, v: F.flash_decode(q, k, v, visible, jnp.int32(cache_index),  # noqa: E731
                                       softcap=5.0, window=window)
  out = decode(k, v)
  assert out.shape == q.shape
  assert _max_rel_err(out[:, 0], F.decode_reference(q[:, 0], k, v, visible, softcap=5.0)) < 1e-5

  block = F.decode_block(length)
  first = max(cache_index - window + 1, 0) // block * block if window else 0
  end = (cache_index // block + 1) * block
  unread = np.zeros(length, bool)
  unread[:first] = unread[end:] = True  # before the window's first block, after the slot's
  if unread.any():
    k_nan, v_nan = (jnp.where(unread[None, :, None, None], jnp.nan, x) for x in (k, v))
    np.testing.assert_array_equal(np.asarray(decode(k_nan, v_nan)), np.asarray(out))
    assert np.isnan(np.asarray(F.decode_reference(q[:, 0], k_nan, v_nan, visible))).any()


def test_decode_blocks_divide_the_cache():
  from eva_jax.models import flash_attention as F  # pylint: disable=import-outside-toplevel
  assert [F.decode_block(s) for s in (64, 80, 96, 128, 512, 40)] == [64, 16, 32, 64, 64, 16]


def _packed_rows(b, t, seed=0):
  """Segments and positions [B, T] of rows packed as the solver packs a pair: a prompt
  (segment 1), a chosen response (2) and a rejected one (3) whose positions continue the
  prompt's, then padding (0)."""
  rng = np.random.default_rng(seed)
  segments, positions = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  for row in range(b):
    prompt, chosen, rejected = rng.integers(1, t // 3, size=3)
    ends = np.cumsum([prompt, chosen, rejected])
    segments[row, :ends[0]], segments[row, ends[0]:ends[1]] = 1, 2
    segments[row, ends[1]:ends[2]] = 3
    positions[row, :ends[1]] = np.arange(ends[1])
    positions[row, ends[1]:ends[2]] = prompt + np.arange(rejected)
  return jnp.asarray(segments), jnp.asarray(positions)


@pytest.mark.parametrize("window", [None, 7])
def test_packed_rows_match_reference_values_and_gradients(window):
  """Packed rows: a response's keys seen by its own queries only, the window in positions
  (a rejected token sees prompt keys further back in slots than the window, not in
  positions); values at real rows and all gradients equal XLA's attention under
  `packed_mask`."""
  b, t, n, kv, h = 3, 45, 4, 2, 16
  q, k, v, _ = _inputs(b, t, n, kv, h, jnp.float32, pad_rows=())
  segments, positions = _packed_rows(b, t)
  mask = np.asarray(packed_mask(segments, positions, window))
  if window:  # the case the test is about: visible in positions, out of the window in slots
    slots = np.arange(t)
    assert (mask & ((slots[:, None] - slots[None, :]) >= window)[None]).any()
  rows = (np.asarray(segments) != 0)[:, :, None, None]
  kw = dict(softcap=5.0, window=window)
  flash = lambda q, k, v: flash_attention(q, k, v, segments, positions=positions,
                                          blocks=SMALL, **kw)
  ref = lambda q, k, v: attention_reference(q, k, v, segments, positions=positions, **kw)
  assert _max_rel_err(flash(q, k, v), ref(q, k, v), rows) < 1e-5
  # Against the plain XLA attention with the mask spelled out.
  kv_heads, groups = kv, n // kv
  s = jnp.einsum("btkgh,bskh->bkgts", q.reshape(b, t, kv_heads, groups, h), k)
  s = jnp.where(jnp.asarray(mask)[:, None, None], jnp.tanh(s / 5.0) * 5.0, -1e30)
  spelled = jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(s, -1), v).reshape(b, t, n, h)
  assert _max_rel_err(flash(q, k, v), spelled, rows) < 1e-5
  weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * rows
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * weights)
  got = jax.grad(loss(flash), (0, 1, 2))(q, k, v)
  want = jax.grad(loss(ref), (0, 1, 2))(q, k, v)
  for g, w_, what in zip(got, want, "qkv"):
    assert _max_rel_err(g, w_) < 1e-5, what


def test_packed_rows_on_tpus_run_as_xla_ops():
  """Lowered for a TPU, packed rows take the XLA attention (splash takes no such mask)."""
  q, k, v, _ = _inputs(1, 32, 2, 1, 16, jnp.float32, pad_rows=())
  segments, positions = _packed_rows(1, 32)
  fn = jax.jit(jax.grad(lambda q: jnp.sum(flash_attention(
      q, k, v, segments, positions=positions, softcap=5.0, window=7, blocks=SMALL))))
  text = jax.export.export(fn, platforms=["tpu"])(q).mlir_module()
  assert "tpu_custom_call" not in text and "stablehlo.dot_general" in text
  unpacked = jax.jit(jax.grad(lambda q: jnp.sum(flash_attention(
      q, k, v, segments != 0, softcap=5.0, window=7, blocks=SMALL))))
  assert "tpu_custom_call" in jax.export.export(unpacked, platforms=["tpu"])(q).mlir_module()


def test_packed_rows_through_the_model_sharded_equal_xla():
  """`segment_ids` through the model: the fused kernel per shard (batch, heads) on packed
  rows gives XLA's logits and gradients (its [B, T, T] mask built from the same segments)."""
  cfg = get_config("tiny", scan_layers=True)
  ids = _ids(cfg, batch=4, length=24)
  segments, positions = _packed_rows(4, 24, seed=3)
  ids = jnp.where(segments == 0, cfg.pad_id, ids)
  rows = np.asarray(segments != 0)[..., None]

  def loss(model):
    def fn(params):
      logits = model.apply(params, ids, positions=positions, segment_ids=segments)
      return jnp.sum(jnp.where(rows, jax.nn.log_softmax(logits)[..., :5], 0.0)), logits
    return fn

  xla = Transformer(cfg, remat="full")
  params = nn.unbox(xla.init(jax.random.key(1), ids))
  (_, want_logits), want = jax.value_and_grad(loss(xla), has_aux=True)(params)
  fused = Transformer(cfg.replace(attention_impl="flash"), remat="full")
  mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = jax.device_put(params, {"params": parallel.params_shardings(fused, mesh, None, ids)})
  with parallel.with_mesh_rules(mesh):
    (_, logits), got = jax.jit(jax.value_and_grad(loss(fused), has_aux=True))(sharded)
  assert _max_rel_err(logits, want_logits, rows) < 1e-5
  for got_leaf, want_leaf in zip(jax.tree_util.tree_leaves(got),
                                 jax.tree_util.tree_leaves(want)):
    assert _max_rel_err(got_leaf, want_leaf) < 1e-4
  with pytest.raises(ValueError, match="segment_ids .* need positions"):
    xla.apply(params, ids, segment_ids=segments)

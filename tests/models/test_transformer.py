"""The Gemma model on its own: published sizes, KV-cache path, padding, remat, bad configs."""

import contextlib
import functools
import io
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from eva_jax.models import GemmaConfig, Transformer, get_config, init_cache
from eva_jax.models import transformer
from eva_jax.models.transformer import GemmaForSequenceClassification, to_matmul_layout


def _params(model, ids):
  return model.init(jax.random.key(0), ids)["params"]


@pytest.mark.parametrize("name,count", [
    # Published counts (eval_shape of the official models, 256128-row embeddings); ours use
    # the 256000 rows the tokenizer has.
    ("gemma2_2b", 2_614_636_800), ("gemma_2b", 2_506_434_560), ("gemma_7b", 8_538_074_112)])
def test_named_configs_have_published_sizes(name, count):
  cfg = get_config(name)
  assert cfg.num_params() + 128 * cfg.embed_dim == count


def test_abstract_param_count_matches_formula():
  cfg = get_config("tiny")
  abstract = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))
  leaves = jax.tree_util.tree_leaves(abstract["params"])
  assert sum(int(np.prod(x.shape)) for x in leaves) == cfg.num_params()


@pytest.mark.parametrize("name", ["tiny", "tiny_gemma1"])
def test_prefill_then_decode_with_cache_equals_full_forward(name):
  cfg = get_config(name)
  model = Transformer(cfg)
  rng = np.random.RandomState(0)
  t, s = 40, 48  # past the tiny sliding window of 16
  ids = jnp.asarray(rng.randint(3, cfg.vocab_size, (3, t)), jnp.int32)
  ids = ids.at[0, :7].set(cfg.pad_id)  # left padding
  params = _params(model, ids)
  full = model.apply({"params": params}, ids)

  positions = jnp.maximum(jnp.cumsum(ids != cfg.pad_id, -1) - 1, 0)
  valid = jnp.zeros((3, s), bool).at[:, :t].set(ids != cfg.pad_id)
  cache = init_cache(cfg, 3, s)
  step = jax.jit(lambda p, x, pos, c, i: model.apply({"params": p}, x, positions=pos,
                                                     attention_mask=valid, cache=c,
                                                     cache_index=i))
  logits, cache = step(params, ids[:, :25], positions[:, :25], cache, jnp.int32(0))
  pieces = [logits]
  for i in range(25, t):
    logits, cache = step(params, ids[:, i:i + 1], positions[:, i:i + 1], cache, jnp.int32(i))
    pieces.append(logits)
  cached = jnp.concatenate(pieces, axis=1)
  np.testing.assert_allclose(cached[0, 7:], full[0, 7:], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(cached[1:], full[1:], atol=2e-5, rtol=2e-5)

  for slots in (47, 49):
    with pytest.raises(ValueError, match=f"attention_mask covers {slots} slots but the cache "
                                         "has 48"):
      model.apply({"params": params}, ids[:, :1], attention_mask=jnp.ones((3, slots), bool),
                  cache=cache, cache_index=jnp.int32(0))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_weight_layout_gives_the_same_logits_and_decode_steps(dtype):
  """The matmul weight layout (the sampler's decode copy) is the checkpoint one with the
  projection weights' axes moved: same prefill and decode logits and caches, and the model
  declares exactly the shapes `to_matmul_layout` makes."""
  cfg = get_config("tiny", dtype=dtype)
  model, matmul = Transformer(cfg), Transformer(cfg.replace(weight_layout="matmul"))
  rng = np.random.RandomState(1)
  ids = jnp.asarray(rng.randint(3, cfg.vocab_size, (2, 20)), jnp.int32)
  params = nn.unbox(_params(model, ids))
  moved = to_matmul_layout(params)
  declared = jax.eval_shape(matmul.init, jax.random.key(0), ids)["params"]
  assert (jax.tree_util.tree_map(lambda x: x.shape, moved) ==
          jax.tree_util.tree_map(lambda x: x.shape, nn.unbox(declared)))
  layer = moved["layer_0"]
  np.testing.assert_array_equal(layer["attn"]["kv_einsum"][:, 1, 0],
                                params["layer_0"]["attn"]["kv_einsum"][1, 0])
  np.testing.assert_array_equal(layer["mlp"]["gating_einsum"][:, 0],
                                params["layer_0"]["mlp"]["gating_einsum"][0])
  tol = dict(atol=2e-5, rtol=2e-5) if dtype == "float32" else dict(atol=2e-2, rtol=2e-2)
  np.testing.assert_allclose(matmul.apply({"params": moved}, ids),
                             model.apply({"params": params}, ids), **tol)
  step = lambda m, p, x, c, i: m.apply({"params": p}, x, cache=c, cache_index=i,
                                       positions=jnp.broadcast_to(i + jnp.arange(x.shape[1]),
                                                                  x.shape))
  caches = {}
  for name, m, p in (("checkpoint", model, params), ("matmul", matmul, moved)):
    cache = init_cache(cfg, 2, 24)
    prefill, cache = step(m, p, ids, cache, jnp.int32(0))
    out, cache = step(m, p, ids[:, :1], cache, jnp.int32(20))
    caches[name] = (prefill, out, cache)
  for want, got in zip(jax.tree_util.tree_leaves(caches["checkpoint"]),
                       jax.tree_util.tree_leaves(caches["matmul"])):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)


def test_to_matmul_layout_moves_only_the_trailing_axes_of_stacked_weights():
  cfg = get_config("tiny")
  params = nn.unbox(_params(Transformer(cfg), jnp.ones((1, 4), jnp.int32)))
  stacked = transformer.stack_layers(params, cfg.replace(scan_layers=True))
  moved = to_matmul_layout(stacked)
  blocks = moved["layers"]["block_1"]
  repeats = cfg.num_layers // 2  # (local, global) pairs
  assert blocks["attn"]["q_einsum"].shape == (repeats, cfg.embed_dim, cfg.num_heads,
                                              cfg.head_dim)
  np.testing.assert_array_equal(blocks["attn"]["q_einsum"][1],
                                to_matmul_layout(params)["layer_3"]["attn"]["q_einsum"])
  np.testing.assert_array_equal(blocks["mlp"]["linear"],
                                stacked["layers"]["block_1"]["mlp"]["linear"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_attention_dot_and_multiply_reduce_forms_agree(dtype):
  """The decode step's two attention forms (the dot one runs on TPUs, the multiply-reduce
  one elsewhere) compute the same scores and weighted values, masked slots included."""
  rng = np.random.RandomState(3)
  b, s, k, g, h = 3, 40, 2, 3, 16
  cast = lambda x: jnp.asarray(x, dtype)
  qg = cast(rng.randn(b, 1, k, g, h))
  key, value = cast(rng.randn(b, s, k, h)), cast(rng.randn(b, s, k, h))
  want = transformer.decode_scores_multiply_reduce(qg, key)
  got = transformer.decode_scores_dot(qg, key)
  assert want.shape == got.shape == (b, k, g, 1, s) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  probs = jax.nn.softmax(want, axis=-1).astype(dtype)
  want = transformer.decode_values_multiply_reduce(probs, value)
  got = transformer.decode_values_dot(probs, value)
  assert want.shape == got.shape == (b, 1, k * g, h) and got.dtype == jnp.dtype(dtype)
  tol = 1e-5 if dtype == "float32" else 1e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=tol, rtol=tol)
  # Head j of the output is kv head j // g's (HF's repeat_kv grouping).
  np.testing.assert_allclose(np.asarray(got[:, 0, g], np.float32),
                             np.einsum("bs,bsh->bh", np.asarray(probs[:, 1, 0, 0], np.float32),
                                       np.asarray(value[:, :, 1], np.float32)),
                             atol=tol, rtol=tol)


def test_left_padding_is_transparent():
  cfg = get_config("tiny")
  model = Transformer(cfg)
  ids = jnp.asarray(np.random.RandomState(1).randint(3, cfg.vocab_size, (1, 30)), jnp.int32)
  padded = jnp.concatenate([jnp.zeros((1, 5), jnp.int32), ids], axis=1)
  params = _params(model, ids)
  np.testing.assert_allclose(model.apply({"params": params}, padded)[:, 5:],
                             model.apply({"params": params}, ids), atol=2e-5, rtol=2e-5)


def test_sliding_window_changes_long_sequences_only():
  cfg = get_config("tiny")
  ids = jnp.asarray(np.random.RandomState(2).randint(3, cfg.vocab_size, (1, 40)), jnp.int32)
  params = _params(Transformer(cfg), ids)
  windowed = Transformer(cfg).apply({"params": params}, ids)
  wide = Transformer(cfg.replace(sliding_window=4096)).apply({"params": params}, ids)
  w = cfg.sliding_window
  np.testing.assert_allclose(windowed[:, :w], wide[:, :w], atol=1e-6)
  assert float(jnp.max(jnp.abs(windowed[:, w:] - wide[:, w:]))) > 1e-3


@pytest.mark.parametrize("remat", ["full", "attention", "dots"])
def test_remat_keeps_values_and_gradients(remat):
  cfg = get_config("tiny")
  ids = jnp.asarray(np.random.RandomState(3).randint(3, cfg.vocab_size, (2, 12)), jnp.int32)
  params = _params(Transformer(cfg), ids)

  def loss(p, remat):
    return jnp.mean(Transformer(cfg, remat=remat).apply({"params": p}, ids) ** 2)

  g_plain = jax.grad(loss)(params, "none")
  g_remat = jax.grad(loss)(params, remat)
  for a, b in zip(jax.tree_util.tree_leaves(g_plain), jax.tree_util.tree_leaves(g_remat)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_attention_remat_keeps_no_attention_scores_for_the_backward_pass():
  # Scanned layers (the solver's default), 256 tokens: without remat the backward pass keeps
  # each layer's float32 scores, soft-capped scores and softmax [B, N, T, T]; remat
  # "attention" recomputes them from q, k, v, so XLA's temporaries shrink by at least one
  # such array per layer.
  cfg = get_config("tiny", scan_layers=True)
  b, t = 4, 256
  ids = jnp.asarray(np.random.RandomState(3).randint(3, cfg.vocab_size, (b, t)), jnp.int32)
  params = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), ids[:, :8]))["params"]

  def temps(remat):
    model = Transformer(cfg, remat=remat)
    grad = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, ids,
                                                           return_hidden=True) ** 2)))
    return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

  scores_bytes = b * cfg.num_heads * t * t * 4 * cfg.num_layers
  assert temps("attention") <= temps("none") - scores_bytes


def test_hidden_then_unembed_equals_logits_and_softcap_bounds_logits():
  cfg = get_config("tiny").replace(final_logit_softcap=0.5)
  model = Transformer(cfg)
  ids = jnp.asarray(np.random.RandomState(4).randint(3, cfg.vocab_size, (2, 9)), jnp.int32)
  params = _params(model, ids)
  logits = model.apply({"params": params}, ids)
  hidden = model.apply({"params": params}, ids, return_hidden=True)
  np.testing.assert_allclose(model.apply({"params": params}, hidden, method="unembed"), logits,
                             atol=1e-6)
  assert float(jnp.max(jnp.abs(logits))) <= 0.5
  # Over the cap (what the sampler reads): tanh's output, the logits once times the cap.
  over = model.apply({"params": params}, ids, logits_over_cap=True)
  np.testing.assert_array_equal(over * jnp.float32(0.5), logits)
  assert float(jnp.max(jnp.abs(over))) <= 1.0 and float(jnp.max(jnp.abs(over))) > 0.6
  # Without a cap (Gemma 1) they are the logits.
  plain = Transformer(cfg.replace(final_logit_softcap=None))
  np.testing.assert_array_equal(plain.apply({"params": params}, ids, logits_over_cap=True),
                                plain.apply({"params": params}, ids))


def _dot_input_dtypes(jaxpr, size=None):
  """Input dtypes of every dot_general in `jaxpr` (nested jaxprs too), or of those with a
  `size` dim."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      avals = [v.aval for v in eqn.invars]
      if size is None or any(size in a.shape for a in avals):
        yield tuple(str(a.dtype) for a in avals)
    for p in eqn.params.values():
      for inner in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          yield from _dot_input_dtypes(inner, size)


def _assert_gradients_match(got, want, dtype, float32_rtol: float):
  """Gradients in `dtype`: equal to autodiff's in float32, to bfloat16's precision in it."""
  for g, w in zip(got, want):
    assert g.dtype == dtype and g.shape == w.shape
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    if dtype == jnp.float32:
      np.testing.assert_allclose(g, w, rtol=float32_rtol, atol=1e-6)
    else:
      np.testing.assert_allclose(g, w, rtol=0.05, atol=0.02 * np.abs(w).max())


@pytest.mark.parametrize("spec,x_shape,y_shape", [
    ("...d,vd->...v", (3, 5, 32), (384, 32)),  # the unembedding
    ("btkgh,bskh->bkgts", (2, 7, 2, 3, 16), (2, 9, 2, 16)),  # attention scores, grouped
])
def test_einsum_f32_backward_runs_in_the_compute_dtype(spec, x_shape, y_shape):
  """`einsum_f32`'s matmuls take the compute dtype's operands in the backward pass too: with
  bfloat16 operands no matmul of the gradient takes a float32 operand (autodiff's take the
  float32 cotangent, and XLA upcasts the other operand to match: the check sees it), and
  the gradients agree with autodiff's to bfloat16's precision; in float32 they are
  autodiff's."""
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  y = jnp.asarray(rng.normal(size=y_shape) * 0.1, jnp.float32)
  out_shape = jax.eval_shape(functools.partial(jnp.einsum, spec), x, y).shape
  probe = jnp.asarray(rng.normal(size=out_shape), jnp.float32)

  def loss(einsum, x, y):
    return jnp.sum(jnp.tanh(einsum(spec, x, y) / 3.0) * probe)
  plain = lambda spec, x, y: jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)
  ours = jax.grad(functools.partial(loss, transformer.einsum_f32), (0, 1))
  autodiff = jax.grad(functools.partial(loss, plain), (0, 1))
  for dtype in (jnp.float32, jnp.bfloat16):
    args = (x.astype(dtype), y.astype(dtype))
    _assert_gradients_match(ours(*args), autodiff(*args), dtype, float32_rtol=1e-6)
  args = (x.astype(jnp.bfloat16), y.astype(jnp.bfloat16))
  ours_dots = list(_dot_input_dtypes(jax.make_jaxpr(ours)(*args).jaxpr))
  plain_dots = list(_dot_input_dtypes(jax.make_jaxpr(autodiff)(*args).jaxpr))
  assert len(ours_dots) == 3 and set(ours_dots) == {("bfloat16", "bfloat16")}, ours_dots
  assert any("float32" in dtypes for dtypes in plain_dots), plain_dots


def _lowered_dot_dtypes(fn, *args, platform: str) -> list[tuple[str, str]]:
  """Operand element types of every dot_general in `fn` lowered for `platform` (no such
  device needed: `jax.export` lowers only the branches `platform_dependent` picks for it)."""
  text = jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()
  dots = re.findall(r"stablehlo\.dot_general[^\n]*?: \(tensor<([^>]*)>, tensor<([^>]*)>\)", text)
  return [(a.split("x")[-1], b.split("x")[-1]) for a, b in dots]


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("remat", ["none", "dots", "dots_all", "attention", "full"])
def test_a_bfloat16_models_gradient_has_no_float32_matmul_on_gpus(scan_layers, remat):
  """In bfloat16 compute every matmul of the model's gradient lowered for a GPU (or the CPU)
  takes bfloat16 operands, the attention scores' and the unembedding's backward included,
  whatever the remat policy; lowered for a TPU the scores' gradient stays autodiff's, with its
  float32 cotangent (`attention_scores`)."""
  cfg = get_config("tiny").replace(dtype="bfloat16", param_dtype="bfloat16",
                                   scan_layers=scan_layers)
  model = Transformer(cfg, remat=remat)
  ids = jnp.asarray(np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 12)), jnp.int32)
  params = _params(model, ids)

  def loss(params):
    return jnp.sum(jax.nn.log_softmax(model.apply({"params": params}, ids))[..., 5])
  grad = jax.grad(loss)
  for platform in ("cuda", "cpu"):
    dots = _lowered_dot_dtypes(grad, params, platform=platform)
    assert len(dots) > 4 * (1 if scan_layers else cfg.num_layers), dots
    assert set(dots) == {("bf16", "bf16")}, (platform, dots)
  tpu = _lowered_dot_dtypes(grad, params, platform="tpu")
  assert len(tpu) == len(dots) and ("f32", "bf16") in tpu, tpu


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_scores_and_gradients_equal_autodiffs(dtype):
  """`attention_scores` (heads first, `einsum_f32`'s backward on the CPU) against autodiff of
  the plain einsum: equal in float32, to bfloat16's precision in bfloat16."""
  rng = np.random.default_rng(3)
  qg = jnp.asarray(rng.normal(size=(2, 7, 2, 3, 16)), dtype)
  key = jnp.asarray(rng.normal(size=(2, 9, 2, 16)), dtype)
  probe = jnp.asarray(rng.normal(size=(2, 2, 3, 7, 9)), jnp.float32)

  def loss(scores, qg, key):
    return jnp.sum(jax.nn.softmax(jnp.tanh(scores(qg, key) / 5.0), axis=-1) * probe)
  plain = lambda q, k: jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
  np.testing.assert_allclose(transformer.attention_scores(qg, key), plain(qg, key),
                             rtol=1e-6, atol=1e-5)
  ours = jax.grad(functools.partial(loss, transformer.attention_scores), (0, 1))(qg, key)
  want = jax.grad(functools.partial(loss, plain), (0, 1))(qg, key)
  _assert_gradients_match(ours, want, dtype, float32_rtol=1e-5)


def test_remat_dots_all_keeps_the_attention_scores():
  """"dots_all" keeps every matmul's output, the float32 attention scores (a custom VJP's,
  named `SCORES_NAME`) included; "dots" keeps no matmul with batch dims."""
  cfg = get_config("tiny").replace(dtype="bfloat16", param_dtype="bfloat16")
  ids = jnp.asarray(np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 12)), jnp.int32)
  groups = cfg.num_heads // cfg.num_kv_heads
  scores = f"f32[2,{cfg.num_kv_heads},{groups},12,12]"

  def kept(remat):
    model = Transformer(cfg, remat=remat)
    params = _params(model, ids)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      print_saved_residuals(lambda p: jnp.sum(model.apply({"params": p}, ids)), params)
    return [line.split()[0] for line in printed.getvalue().splitlines() if line.strip()]
  assert kept("dots_all").count(scores) == cfg.num_layers, kept("dots_all")
  assert scores not in kept("dots")


def test_classifier_reads_last_real_token():
  cfg = get_config("tiny")
  model = GemmaForSequenceClassification(cfg)
  ids = jnp.asarray(np.random.RandomState(5).randint(3, cfg.vocab_size, (1, 10)), jnp.int32)
  params = model.init(jax.random.key(0), ids)["params"]
  right_padded = jnp.concatenate([ids, jnp.zeros((1, 4), jnp.int32)], axis=1)
  scores = model.apply({"params": params}, jnp.concatenate([ids, ids]))
  assert scores.shape == (2,) and scores.dtype == jnp.float32
  np.testing.assert_allclose(model.apply({"params": params}, right_padded), scores[:1],
                             atol=1e-5)


def test_bad_configs_are_named():
  with pytest.raises(ValueError, match="unknown attention type 'sliding'"):
    GemmaConfig(attention_types=("sliding",))
  with pytest.raises(ValueError, match="sliding_window"):
    GemmaConfig(attention_types=("local",), sliding_window=None)
  with pytest.raises(ValueError, match="weight_layout='transposed'.*'matmul'"):
    GemmaConfig(sliding_window=8, weight_layout="transposed")
  with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
    GemmaConfig(num_heads=4, num_kv_heads=3, sliding_window=8)
  with pytest.raises(ValueError, match="Unknown model config 'gemma3'.*gemma2_2b"):
    get_config("gemma3")
  with pytest.raises(ValueError, match="Unknown remat policy"):
    ids = jnp.ones((1, 4), jnp.int32)
    Transformer(get_config("tiny"), remat="sometimes").init(jax.random.key(0), ids)

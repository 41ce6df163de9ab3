"""Scanned layers (`GemmaConfig.scan_layers`) against the unrolled model, on CPU in float32.

The scanned model runs the same ops per layer, but XLA fuses and orders them differently
inside a loop than in straight-line code, so values agree to float32 rounding, not bit for
bit: logits and caches to 2e-6 of their largest magnitude (observed: ~3e-7), gradients to
1e-5 of each leaf's largest entry. Param conversions (stack / unstack, loading, saving) are
exact.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from eva_jax import parallel
from eva_jax.models import (Transformer, from_pretrained, get_config, init_cache, save_hf,
                            stack_layers, unstack_layers)
from eva_jax.models import transformer as T
from eva_jax.models.config import GLOBAL, LOCAL
from eva_jax.models.official_checkpoint import save_official
from eva_jax.models.transformer import GemmaForSequenceClassification, scan_unit
from tests.models import checkpoint_helpers as H

REL = 2e-6


def assert_close(actual, desired, rel=REL):
  """max |actual - desired| <= rel * max |desired| (float32 rounding of O(1)-O(100) values)."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  assert actual.shape == desired.shape, (actual.shape, desired.shape)
  err = float(np.max(np.abs(actual - desired)))
  assert err <= rel * float(np.max(np.abs(desired))), (err, float(np.max(np.abs(desired))))


def _alternating(n):
  return tuple(LOCAL if i % 2 == 0 else GLOBAL for i in range(n))


# Gemma 2 with 4 layers, Gemma 2 with an odd depth (the last local layer stays unrolled),
# Gemma 1 (all global, multi-query).
CONFIGS = {
    "gemma2": get_config("tiny"),
    "gemma2_odd": get_config("tiny", attention_types=_alternating(5)),
    "gemma1": get_config("tiny_gemma1"),
}


def _ids(cfg, batch=3, length=40, seed=0, pad=7):
  ids = np.random.RandomState(seed).randint(3, cfg.vocab_size, (batch, length)).astype(np.int32)
  ids[0, :pad] = cfg.pad_id  # left padding
  return jnp.asarray(ids)


def _pair(name):
  """(unrolled model, scanned model, unrolled params, the same params stacked)."""
  cfg = CONFIGS[name]
  model = Transformer(cfg)
  scanned = Transformer(cfg.replace(scan_layers=True))
  params = nn.unbox(model.init(jax.random.key(1), jnp.ones((1, 8), jnp.int32))["params"])
  return model, scanned, params, stack_layers(params, scanned.config)


def test_scan_unit():
  assert scan_unit(get_config("gemma2_9b")) == ((LOCAL, GLOBAL), 21)
  assert scan_unit(get_config("gemma_7b")) == ((GLOBAL,), 28)
  assert scan_unit(CONFIGS["gemma2_odd"]) == ((LOCAL, GLOBAL), 2)
  assert scan_unit(get_config("tiny", attention_types=(LOCAL, LOCAL, GLOBAL) * 2)) == (
      (LOCAL, LOCAL, GLOBAL), 2)
  assert scan_unit(get_config("tiny", attention_types=(GLOBAL, LOCAL, LOCAL))) == (
      (GLOBAL, LOCAL, LOCAL), 1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_stacked_tree_is_the_scanned_models_and_round_trips(name):
  _, scanned, params, stacked = _pair(name)
  cfg = scanned.config
  boxed = jax.eval_shape(scanned.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
  abstract = nn.unbox(boxed)
  assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(abstract)
  for x, a in zip(jax.tree_util.tree_leaves(stacked), jax.tree_util.tree_leaves(abstract)):
    assert x.shape == a.shape and x.dtype == a.dtype
  unit, repeats = scan_unit(cfg)
  q = stacked["layers"]["block_0"]["attn"]["q_einsum"]
  assert q.shape[0] == repeats
  # Entry r of block j is layer r * len(unit) + j; a trailing layer keeps its own subtree.
  np.testing.assert_array_equal(q[1], params[f"layer_{len(unit)}"]["attn"]["q_einsum"])
  trailing = [k for k in stacked if k.startswith("layer_")]
  assert trailing == ([f"layer_{cfg.num_layers - 1}"] if name == "gemma2_odd" else [])
  # The stacked dimension has the logical axis "layers" (mapped to no mesh axis).
  axes = nn.get_partition_spec(boxed)["layers"]["block_0"]["attn"]["q_einsum"]
  assert tuple(axes) == ("layers", "heads", "embed", "head_dim")
  assert ("layers", None) in parallel.logical_axis_rules()
  H.assert_trees_equal(unstack_layers(stacked, cfg), params)
  H.assert_trees_equal(stack_layers(unstack_layers(stacked, cfg), cfg), stacked)
  # numpy in, numpy out (checkpoint conversions stay on the host).
  as_np = jax.tree_util.tree_map(np.asarray, params)
  assert all(isinstance(x, np.ndarray)
             for x in jax.tree_util.tree_leaves(stack_layers(as_np, cfg)))
  with pytest.raises(ValueError, match="already stacked"):
    stack_layers(stacked, cfg)
  with pytest.raises(ValueError, match="not stacked"):
    unstack_layers(params, cfg)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_equal_unrolled_with_padding_and_masks(name):
  model, scanned, params, stacked = _pair(name)
  cfg = model.config
  ids = _ids(cfg)  # 40 tokens: past the tiny sliding window of 16
  full = jax.jit(model.apply)({"params": params}, ids)
  assert_close(jax.jit(scanned.apply)({"params": stacked}, ids), full)
  # A [B, T] key mask and explicit positions, then a full [B, T, T] mask.
  mask = ids != cfg.pad_id
  pos = T.default_positions(ids, cfg.pad_id)
  kw = dict(positions=pos, attention_mask=mask)
  assert_close(scanned.apply({"params": stacked}, ids, **kw),
               model.apply({"params": params}, ids, **kw))
  full_mask = jnp.tril(jnp.ones((40, 40), bool))[None] & mask[:, None, :]
  assert_close(scanned.apply({"params": stacked}, ids, attention_mask=full_mask),
               model.apply({"params": params}, ids, attention_mask=full_mask))


@pytest.mark.parametrize("name,remat", [("gemma2", "none"), ("gemma2_odd", "none"),
                                         ("gemma1", "none"), ("gemma2", "full")])
def test_kv_cache_path_equals_unrolled(name, remat):
  # remat "full": the round loop samples with its (rematerialised) policy model.
  model, scanned, params, stacked = _pair(name)
  scanned = scanned.clone(remat=remat)
  cfg = model.config
  t, s = 40, 48
  ids = _ids(cfg, length=t)
  positions = T.default_positions(ids, cfg.pad_id)
  valid = jnp.zeros((3, s), bool).at[:, :t].set(ids != cfg.pad_id)

  def run(m, p):
    step = jax.jit(lambda p, x, pos, c, i: m.apply({"params": p}, x, positions=pos,
                                                   attention_mask=valid, cache=c,
                                                   cache_index=i))
    cache = init_cache(m.config, 3, s)
    logits, cache = step(p, ids[:, :25], positions[:, :25], cache, jnp.int32(0))
    pieces = [logits]
    for i in range(25, t):
      logits, cache = step(p, ids[:, i:i + 1], positions[:, i:i + 1], cache, jnp.int32(i))
      pieces.append(logits)
    return jnp.concatenate(pieces, axis=1), cache

  ref, ref_cache = run(model, params)
  out, cache = run(scanned, stacked)
  assert_close(out, ref)
  assert_close(out[1:], model.apply({"params": params}, ids)[1:])
  # The stacked cache holds each layer's keys and values where the unrolled one does.
  assert set(cache) == {"layers"} | ({f"layer_{cfg.num_layers - 1}"}
                                     if name == "gemma2_odd" else set())
  unit, repeats = scan_unit(cfg)
  assert cache["layers"]["block_0"]["k"].shape == (repeats, 3, s, cfg.num_kv_heads,
                                                   cfg.head_dim)
  for i in range(cfg.num_layers):
    prefix, index = T.scanned_location(cfg, i)
    got = cache
    for k in prefix:
      got = got[k]
    for kv in ("k", "v"):
      x = got[kv] if index is None else got[kv][index]
      assert_close(x, ref_cache[f"layer_{i}"][kv])
  axes = T.cache_logical_axes(scanned.config)["layers"]["block_0"]["k"]
  assert axes == ("layers",) + T.CACHE_AXES


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_inside_the_scan_keeps_values_and_gradients(remat):
  model, _, params, stacked = _pair("gemma2")
  cfg = model.config
  scanned = Transformer(cfg.replace(scan_layers=True), remat=remat)
  ids = _ids(cfg, length=24)

  def loss(m, p):
    return jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, ids))[..., 5])

  ref_val, ref_grad = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
  val, grad = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(stacked)
  np.testing.assert_allclose(val, ref_val, rtol=1e-5)
  for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(unstack_layers(grad, cfg))[0],
                          jax.tree_util.tree_leaves(ref_grad)):
    np.testing.assert_allclose(g, r, atol=1e-5 * float(jnp.max(jnp.abs(r))) + 1e-9,
                               err_msg=jax.tree_util.keystr(path))


def test_classifier_scans_too():
  cfg = CONFIGS["gemma2"]
  model = GemmaForSequenceClassification(cfg)
  scanned = GemmaForSequenceClassification(cfg.replace(scan_layers=True))
  ids = _ids(cfg, length=20)
  params = nn.unbox(model.init(jax.random.key(2), ids)["params"])
  assert_close(scanned.apply({"params": stack_layers(params, cfg)}, ids),
               model.apply({"params": params}, ids))


# ------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """An HF Gemma 2 checkpoint with an odd depth, an official FLAT Gemma 2 one and an official
  multi-head Gemma 1 one (fused qkv, transposed gate, padded embedding)."""
  root = tmp_path_factory.mktemp("scan_ckpts")
  odd = H.eva_config("gemma2", attention_types=_alternating(5))
  save_hf(root / "hf", odd, H.random_params(odd, seed=3), max_shard_bytes=100_000)
  g2 = H.eva_config("gemma2")
  save_official(root / "official", H.random_params(g2, seed=5), g2)
  mha = H.eva_config("gemma_mha")
  save_official(root / "official_mha", H.random_params(mha, seed=4), mha,
                transposed_gating=True, vocab_rows=H.VOCAB + 8)
  return {"hf": (root / "hf", None), "official": (root / "official", g2),
          "official_mha": (root / "official_mha", mha), "root": root}


@pytest.mark.parametrize("fmt", ["hf", "official", "official_mha"])
def test_from_pretrained_scanned_is_the_stacked_unrolled_load(checkpoints, fmt):
  path, config = checkpoints[fmt]
  mesh = parallel.create_mesh({"fsdp": 2, "tensor": 4})
  model, params = from_pretrained(path, config=config, mesh=mesh)
  smodel, sparams = from_pretrained(path, config=config, mesh=mesh, scan_layers=True)
  assert smodel.config.scan_layers and not model.config.scan_layers
  assert smodel.config == model.config.replace(scan_layers=True)
  H.assert_trees_equal(parallel.global_to_host(sparams),
                       stack_layers(parallel.global_to_host(params), smodel.config))
  # Placed in the scanned model's own shardings: the stacked axis whole, the rest split as
  # the per-layer params are.
  expected = parallel.params_shardings(smodel, mesh, None, jnp.ones((1, 1), jnp.int32))
  for x, s in zip(jax.tree_util.tree_leaves(sparams), jax.tree_util.tree_leaves(expected)):
    assert x.sharding.is_equivalent_to(s, x.ndim)
  q = sparams["layers"]["block_0"]["attn"]["q_einsum"]
  assert q.sharding.spec[0] is None and q.sharding.spec[1] == "tensor"
  ids = H.token_ids(2, 11, seed=9)
  with parallel.with_mesh_rules(mesh):
    assert_close(jax.jit(smodel.apply)({"params": sparams}, ids),
                 jax.jit(model.apply)({"params": params}, ids))
  # A scanned config given as `config` is honoured without the flag.
  if config is not None:
    m2, p2 = from_pretrained(path, config=config.replace(scan_layers=True), mesh=mesh)
    assert m2.config.scan_layers and "layers" in p2


def _files(folder):
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("max_shard_bytes", [100_000, 5 * 2**30])
def test_save_hf_from_a_scanned_model_writes_the_same_files(checkpoints, tmp_path,
                                                            max_shard_bytes):
  path, _ = checkpoints["hf"]
  mesh = parallel.create_mesh({"fsdp": 2, "tensor": 4})
  model, params = from_pretrained(path, mesh=mesh)
  smodel, sparams = from_pretrained(path, mesh=mesh, scan_layers=True)
  save_hf(tmp_path / "unrolled", model, params, max_shard_bytes=max_shard_bytes)
  save_hf(tmp_path / "scanned", smodel, sparams, max_shard_bytes=max_shard_bytes)
  assert _files(tmp_path / "scanned") == _files(tmp_path / "unrolled")
  # A config (scan flag on or off) with stacked params works too: the tree decides.
  save_hf(tmp_path / "by_config", model.config, sparams, max_shard_bytes=max_shard_bytes)
  assert _files(tmp_path / "by_config") == _files(tmp_path / "unrolled")


@pytest.mark.parametrize("layout", ["flat", "stacked"])
def test_save_official_from_a_scanned_model_matches_unrolled(checkpoints, tmp_path, layout):
  path, config = checkpoints["official"]
  mesh = parallel.create_mesh({"fsdp": 2, "tensor": 4})
  _, params = from_pretrained(path, config=config, mesh=mesh)
  smodel, sparams = from_pretrained(path, config=config, mesh=mesh, scan_layers=True)
  save_official(tmp_path / "unrolled", params, config, layout=layout)
  save_official(tmp_path / "scanned", sparams, smodel.config, layout=layout)
  _, a = from_pretrained(tmp_path / "unrolled", config=config, mesh=mesh)
  _, b = from_pretrained(tmp_path / "scanned", config=config, mesh=mesh)
  H.assert_trees_equal(parallel.global_to_host(b), parallel.global_to_host(a))
  H.assert_trees_equal(parallel.global_to_host(a), parallel.global_to_host(params))

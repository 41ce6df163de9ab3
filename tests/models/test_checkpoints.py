"""Checkpoint import/export: HF safetensors round trips, official Flax layouts, bad inputs."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_jax.models import from_pretrained, save_hf
from eva_jax.models import hf_checkpoint
from eva_jax.models import official_checkpoint as oc
from eva_jax.models.official_checkpoint import save_official
from tests.models import checkpoint_helpers as H

try:  # PyTorch and transformers write the HF checkpoints of the `parity` tests.
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
except ImportError:
  torch = transformers = None


def _parity(fn):
  """Marks a test that needs transformers `parity`; CI runs the others without PyTorch."""
  return pytest.mark.parity(fn)


def _hf_tensors(folder):
  """Every tensor of an HF folder (all shards) as torch tensors."""
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  out = {}
  for f in sorted(folder.glob("*.safetensors")):
    out.update(load_file(f))
  return out


def _assert_same_tensors(a, b):
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype, name
    assert torch.equal(a[name], b[name]), name


def _host(params):
  return jax.tree_util.tree_map(np.asarray, params)


# --------------------------------------------------------------------------------------------
# HF


@_parity
@pytest.mark.parametrize("kind,dtype", [("gemma2", "float32"), ("gemma2", "bfloat16"),
                                        ("gemma", "bfloat16"), ("gemma2_cls", "float32")])
def test_hf_round_trip_is_bit_exact(tmp_path, kind, dtype):
  hf = H.hf_model(kind, dtype=getattr(torch, dtype))
  hf.save_pretrained(tmp_path / "in")
  model, params = from_pretrained(tmp_path / "in")
  leaves = jax.tree_util.tree_leaves(params)
  assert {x.dtype for x in leaves} == {jnp.dtype(dtype)}  # the stored dtype is kept
  assert model.config.dtype == dtype
  save_hf(tmp_path / "out", model, params)
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json",
                                                                   "model.safetensors"]
  _assert_same_tensors(_hf_tensors(tmp_path / "in"), _hf_tensors(tmp_path / "out"))
  again = json.loads((tmp_path / "out" / "config.json").read_text())
  assert again["architectures"] == json.loads(
      (tmp_path / "in" / "config.json").read_text())["architectures"]


@_parity
def test_sharded_export_round_trips_and_transformers_loads_it(tmp_path):
  hf = H.hf_model("gemma2")
  hf.save_pretrained(tmp_path / "in")
  model, params = from_pretrained(tmp_path / "in")
  save_hf(tmp_path / "out", model, params, max_shard_bytes=60_000)
  files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
  assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  index = json.loads((tmp_path / "out" / hf_checkpoint.INDEX_FILE).read_text())
  assert set(index["weight_map"].values()) == set(files)
  for f in files:  # only a tensor larger than the limit gets a shard over it
    assert (tmp_path / "out" / f).stat().st_size < 60_000 + 40_000
  _assert_same_tensors(_hf_tensors(tmp_path / "in"), _hf_tensors(tmp_path / "out"))

  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                               attn_implementation="eager")
  ids = H.token_ids(2, 11)
  np.testing.assert_array_equal(H.hf_outputs(reloaded, ids), H.hf_outputs(hf, ids))
  _, params2 = from_pretrained(tmp_path / "out")
  H.assert_trees_equal(_host(params), _host(params2))
  # Exporting again into the same folder, unsharded, leaves no stale shard or index behind.
  save_hf(tmp_path / "out", model, params)
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json",
                                                                   "model.safetensors"]


@_parity
def test_loads_an_hf_sharded_checkpoint_like_a_single_file(tmp_path):
  hf = H.hf_model("gemma2_cls")
  hf.save_pretrained(tmp_path / "single")
  hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
  assert (tmp_path / "sharded" / hf_checkpoint.INDEX_FILE).exists()
  _, a = from_pretrained(tmp_path / "single")
  model, b = from_pretrained(tmp_path / "sharded")
  H.assert_trees_equal(_host(a), _host(b))
  assert model.config.num_labels == 1


def test_param_dtype_and_dtype_options(tmp_path):
  cfg = H.eva_config("gemma2")
  save_hf(tmp_path / "in", cfg, H.random_params(cfg))
  model, params = from_pretrained(tmp_path / "in", param_dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  assert model.config.dtype == "bfloat16"  # compute follows the params unless told
  model, params = from_pretrained(tmp_path / "in", param_dtype="bfloat16", dtype="float32",
                                  remat="full")
  assert model.config.dtype == "float32" and model.remat == "full"
  out = model.apply({"params": params}, jnp.asarray(H.token_ids(1, 5)))
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


def test_hf_config_override_is_checked_against_the_tensors(tmp_path):
  cfg = H.eva_config("gemma2")
  params = H.random_params(cfg)
  save_hf(tmp_path / "in", cfg, params)
  model, loaded = from_pretrained(tmp_path / "in", config=cfg.replace(sliding_window=4))
  assert model.config.sliding_window == 4  # the given config wins over config.json
  H.assert_trees_equal(params, _host(loaded))
  with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.gate_proj.weight has shape "
                                       r"\[96, 64\], expected \[32, 64\]"):
    from_pretrained(tmp_path / "in", config=cfg.replace(hidden_dim=32))


@_parity
def test_config_json_maps_every_field(tmp_path):
  cfg, arch = hf_checkpoint.config_from_hf(H.hf_config("gemma2").to_dict())
  assert arch == "Gemma2ForCausalLM"
  assert (cfg.vocab_size, cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads,
          cfg.head_dim) == (H.VOCAB, 64, 96, 4, 2, 24)
  assert cfg.attention_types == ("local", "global", "local")
  assert (cfg.sliding_window, cfg.attn_logit_softcap, cfg.final_logit_softcap,
          cfg.query_pre_attn_scalar, cfg.rope_base) == (6, 3.0, 2.0, 20.0, 500.0)
  assert cfg.use_post_attn_norm and cfg.use_post_ffw_norm
  g1, arch = hf_checkpoint.config_from_hf(H.hf_config("gemma").to_dict())
  assert arch == "GemmaForCausalLM" and not g1.is_gemma2
  assert g1.query_pre_attn_scalar == g1.head_dim == 24 and g1.num_kv_heads == 1
  # A config in the style of the released Gemma 1 files (legacy "gelu", rope_theta on top).
  legacy = {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_act": "gelu",
            "hidden_activation": None, "rope_theta": 10000.0, "num_hidden_layers": 2}
  g1, _ = hf_checkpoint.config_from_hf(legacy)
  assert (g1.vocab_size, g1.embed_dim, g1.num_kv_heads, g1.rope_base) == (256000, 3072, 16,
                                                                          10000.0)
  with pytest.raises(ValueError, match="activation 'gelu'"):
    hf_checkpoint.config_from_hf({**H.hf_config("gemma2").to_dict(),
                                  "hidden_activation": "gelu"})
  with pytest.raises(ValueError, match="tie_word_embeddings"):
    hf_checkpoint.config_from_hf({**H.hf_config("gemma2").to_dict(),
                                  "tie_word_embeddings": False})
  with pytest.raises(ValueError, match="cannot express"):
    hf_checkpoint.hf_config_dict(cfg, "GemmaForCausalLM", np.float32)


# --------------------------------------------------------------------------------------------
# Official Gemma Flax


@pytest.mark.parametrize("kind,options,dtype", [
    ("gemma2", {}, "float32"),
    ("gemma2", {}, "bfloat16"),
    ("gemma_mha", {}, "float32"),                          # K == N: fused qkv_einsum
    ("gemma2", {"transposed_gating": True}, "bfloat16"),   # [2, F, D] gate (9B / 27B)
    ("gemma2", {"vocab_rows": H.VOCAB + 128}, "float32"),  # 256128-style padded embedding
])
def test_official_flat_round_trip(tmp_path, kind, options, dtype):
  cfg = H.eva_config(kind, param_dtype=dtype)
  params = H.random_params(cfg, seed=1)
  save_official(tmp_path / "ckpt", params, cfg, **options)
  tree = oc.read_tree_metadata(tmp_path / "ckpt")
  assert oc.detect_layout(tree) == oc.FLAT
  attn = tree["transformer/layer_0/attn/qkv_einsum" if kind == "gemma_mha"
              else "transformer/layer_0/attn/q_einsum"]["w"]
  assert tuple(attn.shape) == ((3, 4, 64, 24) if kind == "gemma_mha" else (4, 64, 24))
  gate = tree["transformer/layer_0/mlp/gating_einsum"]["w"]
  assert tuple(gate.shape) == ((2, 96, 64) if options.get("transposed_gating") else (2, 64, 96))
  emb = tree["transformer/embedder"]["input_embedding"]
  assert tuple(emb.shape) == (options.get("vocab_rows", H.VOCAB), 64)

  model, loaded = from_pretrained(tmp_path / "ckpt", config=cfg)
  H.assert_trees_equal(params, _host(loaded))
  assert model.config == cfg


@pytest.mark.parametrize("layout,kind,options", [
    (oc.STACKED, "gemma2", {}), (oc.KAULDRON, "gemma2", {}), (oc.NESTED, "gemma2", {}),
    (oc.STACKED, "gemma_mha", {"transposed_gating": True})])
def test_official_layouts_are_detected_and_loaded(tmp_path, layout, kind, options):
  cfg = H.eva_config(kind)
  params = H.random_params(cfg, seed=2)
  save_official(tmp_path / "ckpt", params, cfg, layout=layout, vocab_rows=H.VOCAB + 8,
                **options)
  assert oc.detect_layout(oc.read_tree_metadata(tmp_path / "ckpt")) == layout
  _, loaded = from_pretrained(tmp_path / "ckpt", config=cfg)
  H.assert_trees_equal(params, _host(loaded))


def test_official_checkpoint_cast_and_named_config(tmp_path):
  cfg = H.eva_config("gemma2")
  save_official(tmp_path / "ckpt", H.random_params(cfg), cfg)
  model, loaded = from_pretrained(tmp_path / "ckpt", config=cfg, param_dtype=jnp.bfloat16,
                                  dtype="bfloat16")
  assert {x.dtype for x in jax.tree_util.tree_leaves(loaded)} == {jnp.dtype(jnp.bfloat16)}
  assert model.config.dtype == "bfloat16"
  out = model.apply({"params": loaded}, jnp.asarray(H.token_ids(1, 9)))
  assert out.shape == (1, 9, H.VOCAB) and bool(jnp.all(jnp.isfinite(out)))
  with pytest.raises(ValueError, match="has shape"):  # a named config of another size
    from_pretrained(tmp_path / "ckpt", config="tiny")


# --------------------------------------------------------------------------------------------
# Bad inputs: each error names the file / tensor and what was expected.


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf") / "gemma2"
  cfg = H.eva_config("gemma2", attention_types=("local", "global", "local"))
  save_hf(path, cfg, H.random_params(cfg))
  return path


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def test_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
    from_pretrained(tmp_path / "nowhere")


def test_folder_with_neither_format(tmp_path):
  (tmp_path / "x").mkdir()
  (tmp_path / "x" / "notes.txt").write_text("hi")
  with pytest.raises(FileNotFoundError, match="neither an HF checkpoint.*notes.txt"):
    from_pretrained(tmp_path / "x")


def test_missing_config_json(tmp_path, hf_dir):
  d = _copy(hf_dir, tmp_path / "c")
  (d / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match=r"c/config.json not found"):
    from_pretrained(d)


def test_index_naming_a_missing_shard(tmp_path):
  d = tmp_path / "s"
  cfg = H.eva_config("gemma2")
  save_hf(d, cfg, H.random_params(cfg), max_shard_bytes=40_000)
  shard = sorted(d.glob("model-*.safetensors"))[1]
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=f"index.json names shard {shard.name}.*does "
                                              f"not exist"):
    from_pretrained(d)


def test_unknown_architecture(tmp_path, hf_dir):
  d = _copy(hf_dir, tmp_path / "a")
  cfg = json.loads((d / "config.json").read_text())
  cfg["architectures"] = ["LlamaForCausalLM"]
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"config.json: unknown architecture.*LlamaForCausalLM.*"
                                       r"Gemma2ForCausalLM"):
    from_pretrained(d)


def _rewrite_tensors(folder, fn):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(folder / "model.safetensors")
  fn(tensors)
  save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_tensor_of_the_wrong_shape(tmp_path, hf_dir):
  d = _copy(hf_dir, tmp_path / "w")
  name = "model.layers.1.self_attn.k_proj.weight"
  _rewrite_tensors(d, lambda t: t.__setitem__(name, t[name][:24].copy()))
  with pytest.raises(ValueError, match=rf"model.safetensors: tensor {name} has shape \[24, 64\], "
                                       rf"expected \[48, 64\]"):
    from_pretrained(d)


def test_missing_tensor(tmp_path, hf_dir):
  d = _copy(hf_dir, tmp_path / "m")
  name = "model.layers.2.post_feedforward_layernorm.weight"
  _rewrite_tensors(d, lambda t: t.pop(name))
  with pytest.raises(ValueError, match=rf"tensor {name} is missing"):
    from_pretrained(d)


def test_unexpected_tensor(tmp_path, hf_dir):
  d = _copy(hf_dir, tmp_path / "u")
  cfg = json.loads((d / "config.json").read_text())
  cfg["num_hidden_layers"], cfg["layer_types"] = 2, cfg["layer_types"][:2]
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"tensor model.layers.2.\S+ .*is not part of the model"):
    from_pretrained(d)


def test_corrupt_safetensors_file(tmp_path, hf_dir):
  d = _copy(hf_dir, tmp_path / "t")
  (d / "model.safetensors").write_bytes(b"\x05\x00")
  with pytest.raises(ValueError, match="model.safetensors is not a valid safetensors file"):
    from_pretrained(d)


def test_official_checkpoint_without_config(tmp_path):
  cfg = H.eva_config("gemma2")
  save_official(tmp_path / "o", H.random_params(cfg), cfg)
  with pytest.raises(ValueError, match=r"official Gemma Flax .*pass config=.*gemma2_2b"):
    from_pretrained(tmp_path / "o")


def test_official_checkpoint_with_a_missing_or_misshapen_array(tmp_path):
  cfg = H.eva_config("gemma2")
  params = H.random_params(cfg)
  save_official(tmp_path / "o", params, cfg)
  with pytest.raises(ValueError, match=r"transformer/layer_0/attn/q_einsum.w has shape "
                                       r"\[4, 64, 24\], expected \[2, 64, 24\]"):
    from_pretrained(tmp_path / "o", config=cfg.replace(num_heads=2, num_kv_heads=2))
  no_post_norms = cfg.replace(use_post_attn_norm=False, use_post_ffw_norm=False)
  save_official(tmp_path / "g1", params, no_post_norms)
  with pytest.raises(ValueError, match=r"has no transformer/layer_0/post_attention_norm.scale"):
    from_pretrained(tmp_path / "g1", config=cfg)
  with pytest.raises(ValueError, match=r"transformer/layer_3.* not part of the model"):
    from_pretrained(tmp_path / "o", config=cfg.replace(attention_types=cfg.attention_types[:3]))


def test_save_hf_rejects_params_that_do_not_fit_the_config(tmp_path):
  cfg = H.eva_config("gemma2")
  params = H.random_params(cfg)
  with pytest.raises(ValueError, match=r"layer_0/attn/q_einsum has shape \[4, 64, 24\], "
                                       r"expected \[2, 64, 24\]"):
    save_hf(tmp_path / "x", cfg.replace(num_heads=2, num_kv_heads=2), params)
  with pytest.raises(ValueError, match="unknown architecture 'GPT2'"):
    save_hf(tmp_path / "x", cfg, params, architecture="GPT2")


# --------------------------------------------------------------------------------------------
# gs:// paths, against a local GCS emulator (the `gcs_bucket` fixture of tests/conftest.py).


def test_gs_paths_for_hf_and_official_checkpoints(gcs_bucket):
  cfg = H.eva_config("gemma2")
  params = H.random_params(cfg, seed=9)
  save_hf(f"{gcs_bucket}/hf", cfg, params, max_shard_bytes=100_000)
  model, loaded = from_pretrained(f"{gcs_bucket}/hf")
  H.assert_trees_equal(params, _host(loaded))
  assert model.config.sliding_window == cfg.sliding_window

  save_official(f"{gcs_bucket}/official", params, cfg, vocab_rows=H.VOCAB + 8)
  assert oc.detect_layout(oc.read_tree_metadata(f"{gcs_bucket}/official")) == oc.FLAT
  _, loaded = from_pretrained(f"{gcs_bucket}/official", config=cfg)
  H.assert_trees_equal(params, _host(loaded))

  with pytest.raises(FileNotFoundError, match=f"{gcs_bucket}/nothing does not exist"):
    from_pretrained(f"{gcs_bucket}/nothing")

"""Logits and scores of checkpoints loaded with `from_pretrained` match HF transformers.

Tiny random models (every weight random, norms included), PyTorch on CPU in float32, eager
attention; the bar is max |ours - hf| / max |hf| <= 1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:  # The `parity` extra; where it is missing (CI's Python 3.12) `-m "not parity"` deselects
  import transformers  # every test here, and a run that selects them fails loudly.
except ImportError:
  transformers = None

from eva_jax.models import Transformer, from_pretrained, save_hf  # noqa: E402
from eva_jax.models.official_checkpoint import save_official  # noqa: E402
from tests.models import checkpoint_helpers as H  # noqa: E402

pytestmark = pytest.mark.parity
TOL = 1e-4


def _load(tmp_path, kind, **overrides):
  hf = H.hf_model(kind, **overrides)
  hf.save_pretrained(tmp_path / kind)
  model, params = from_pretrained(tmp_path / kind)
  return hf, model, params


def _apply(model, params, ids):
  return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32)))


@pytest.mark.parametrize("kind", ["gemma", "gemma2"])
def test_causal_lm_logits_match_hf(tmp_path, kind):
  hf, model, params = _load(tmp_path, kind)
  cfg = model.config
  if kind == "gemma":
    assert cfg.num_kv_heads == 1 and not cfg.is_gemma2  # multi-query Gemma 1
  else:
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 24)
    assert cfg.query_pre_attn_scalar == 20 and cfg.sliding_window == 6
  ids = H.token_ids(2, 17)  # 17 > the sliding window of 6
  ref = H.hf_outputs(hf, ids)
  ours = _apply(model, params, ids)
  assert ours.shape == ref.shape == (2, 17, H.VOCAB)
  assert H.rel_err(ours, ref) <= TOL

  if kind == "gemma2":
    # The soft-caps, window and query scale really act here: without each, we no longer match.
    for change in (dict(attn_logit_softcap=None), dict(final_logit_softcap=None),
                   dict(sliding_window=64), dict(query_pre_attn_scalar=24.0)):
      other = _apply(Transformer(cfg.replace(**change)), params, ids)
      assert H.rel_err(other, ref) > 1e-2, change


@pytest.mark.parametrize("kind", ["gemma", "gemma2"])
def test_left_padded_batch_matches_hf_given_the_same_positions_and_mask(tmp_path, kind):
  hf, model, params = _load(tmp_path, kind)
  ids = H.token_ids(3, 16, seed=1)
  ids[0, :5] = 0
  ids[2, :9] = 0
  mask = (ids != 0).astype(np.int64)
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  ref = H.hf_outputs(hf, ids, attention_mask=mask, position_ids=positions)
  ours = _apply(model, params, ids)  # default positions and masks come from the pad id
  real = mask.astype(bool)
  assert H.rel_err(ours[real], ref[real]) <= TOL


@pytest.mark.parametrize("kind", ["gemma2_cls", "gemma_cls"])
def test_classifier_scores_match_hf_right_padded(tmp_path, kind):
  hf, model, params = _load(tmp_path, kind)
  assert model.config.num_labels == 1
  ids = H.token_ids(4, 14, seed=2)
  ids[1, 9:] = 0
  ids[3, 4:] = 0
  mask = (ids != 0).astype(np.int64)
  ref = H.hf_outputs(hf, ids, attention_mask=mask)
  ours = _apply(model, params, ids)
  assert ours.shape == ref.shape == (4,)
  assert H.rel_err(ours, ref) <= TOL
  # Scores are read at the last real token: row 3 equals that row unpadded.
  alone = _apply(model, params, ids[3:, :4])
  np.testing.assert_allclose(alone, ours[3:], rtol=1e-5, atol=1e-6)


def test_classifier_scores_match_hf_left_padded(tmp_path):
  hf, model, params = _load(tmp_path, "gemma2_cls")
  ids = H.token_ids(3, 12, seed=3)
  ids[0, :3] = 0
  ids[1, :7] = 0
  mask = (ids != 0).astype(np.int64)
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  ref = H.hf_outputs(hf, ids, attention_mask=mask, position_ids=positions)
  assert H.rel_err(_apply(model, params, ids), ref) <= TOL


def test_multi_label_classifier_matches_hf(tmp_path):
  hf, model, params = _load(tmp_path, "gemma2_cls", num_labels=3)
  assert model.config.num_labels == 3
  ids = H.token_ids(2, 9, seed=4)
  ref = H.hf_outputs(hf, ids)
  ours = _apply(model, params, ids)
  assert ours.shape == ref.shape == (2, 3)
  assert H.rel_err(ours, ref) <= TOL


@pytest.mark.parametrize("kind,variant", [("gemma2", {}),
                                          ("gemma_mha", {"transposed_gating": True})])
def test_official_checkpoint_matches_hf_after_export(tmp_path, kind, variant):
  """Official FLAT -> eva_jax -> HF export -> transformers: the same logits as eva_jax.

  This checks the official->HF mapping of the fact sheet end to end (fused qkv for K == N,
  transposed gate, Gemma 1's pre-FFW norm as HF's post_attention_layernorm).
  """
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = H.eva_config(kind)
  save_official(tmp_path / "official", H.random_params(cfg, seed=5), cfg,
                vocab_rows=cfg.vocab_size + 64, **variant)
  model, params = from_pretrained(tmp_path / "official", config=cfg)
  save_hf(tmp_path / "hf", model, params)
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                         attn_implementation="eager")
  ids = H.token_ids(2, 13, seed=6)
  assert H.rel_err(_apply(model, params, ids), H.hf_outputs(hf, ids)) <= TOL

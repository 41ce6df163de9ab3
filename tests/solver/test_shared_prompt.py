"""A pair as one packed row, its prompt computed once (`pair_logps(share_prompt=True)`): the
layout, the same log-probs and gradients as two rows (Gemma 2's sliding window crossed,
Gemma 1, scanned layers, prompts that differ), the host check, and when the train step
turns it on."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_jax import parallel
from eva_jax.models import Transformer, get_config
from eva_jax.solver import (TrainStep, create_train_state, get_loss_fn, make_optimizer,
                            make_pair_batch, make_policy_model, pair_logps, reference_logps)
from eva_jax.solver import batch as batch_lib
from eva_jax.models.flash_attention import packed_mask
from eva_jax.solver.logprobs import pack_shared_prompt

PAD = 0


def test_packing_lays_out_prompt_chosen_rejected():
  # Pair 0: prompt [5, 6], chosen [7, 8, 9], rejected [10]; pair 1: prompt [5], chosen [11],
  # rejected [12, 13].
  batch = make_pair_batch([[5, 6], [5]], [[7, 8, 9], [11]], [[10], [12, 13]], max_length=6)
  length = batch_lib.shared_prompt_length(6, 3)
  assert length == 9
  np.testing.assert_array_equal(batch_lib.packed_pair_lengths(batch, PAD), [6, 4])
  packed = pack_shared_prompt({k: jnp.asarray(v) for k, v in batch.items()}, PAD, length)
  np.testing.assert_array_equal(packed.tokens, [[5, 6, 7, 8, 9, 10, 0, 0, 0],
                                                [5, 11, 12, 13, 0, 0, 0, 0, 0]])
  # The rejected response keeps its own row's positions (after the prompt).
  np.testing.assert_array_equal(packed.positions[0, :6], [0, 1, 2, 3, 4, 2])
  np.testing.assert_array_equal(packed.positions[1, :4], [0, 1, 1, 2])
  np.testing.assert_array_equal(packed.segment_ids, [[1, 1, 2, 2, 2, 3, 0, 0, 0],
                                                     [1, 2, 3, 3, 0, 0, 0, 0, 0]])
  mask = np.asarray(packed_mask(packed.segment_ids))
  # Pair 0's rejected token (slot 5) sees the prompt and itself, not the chosen response.
  np.testing.assert_array_equal(mask[0, 5], [1, 1, 0, 0, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(mask[0, 4], [1, 1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(mask[1, 3], [1, 0, 1, 1, 0, 0, 0, 0, 0])
  assert not mask[:, :, 6:].any()  # padding is never a key
  # Rejected-row slot -> packed slot: the prompt is shared, the rest follows the chosen row.
  np.testing.assert_array_equal(packed.rejected_slots[0], [0, 1, 5, 6, 7, 8])
  np.testing.assert_array_equal(packed.rejected_slots[1], [0, 2, 3, 4, 5, 6])


_PARAMS = {}


def _model_and_params(config):
  model = Transformer(config)
  if config not in _PARAMS:
    _PARAMS[config] = jax.jit(model.init)(jax.random.key(0),
                                          jnp.ones((1, 8), jnp.int32))["params"]
  return model, _PARAMS[config]


def _long_pairs(config, seed=0):
  """Prompts of 1 to 30 tokens and responses of 1 to 24 in rows of 48: past the tiny
  configs' sliding window of 16, prompts and responses of different lengths per pair."""
  rng = np.random.RandomState(seed)
  draw = lambda lengths: [list(rng.randint(3, config.vocab_size, n)) for n in lengths]
  return make_pair_batch(draw([30, 1, 12, 20]), draw([9, 24, 3, 17]), draw([17, 2, 24, 1]),
                         max_length=48)


def _assert_same_logps_and_grads(model, params, batch, scored_length):
  def logps(p, share):
    out = pair_logps(model, p, batch, chunk_size=7, with_reference=False,
                     scored_length=scored_length, share_prompt=share)
    return out.chosen, out.rejected, out.chosen_length, out.rejected_length

  two_rows = jax.jit(lambda p: logps(p, False))(params)
  one_row = jax.jit(lambda p: logps(p, True))(params)
  for got, want in zip(one_row, two_rows):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  w = jnp.array([1.0, -2.0, 0.5, 0.25])
  grad = lambda share: jax.jit(jax.grad(
      lambda p: logps(p, share)[0] @ w - logps(p, share)[1] @ w))(params)
  for got, want in zip(jax.tree_util.tree_leaves(grad(True)),
                       jax.tree_util.tree_leaves(grad(False))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("name,scan,scored_length,attention_impl", [
    ("tiny", False, 24, "xla"), ("tiny", False, None, "xla"), ("tiny", True, 24, "xla"),
    ("tiny_gemma1", False, 24, "xla"), ("tiny", True, 24, "flash")])
def test_one_packed_row_equals_two_rows(name, scan, scored_length, attention_impl):
  """The fused kernel takes packed rows too (segments, the window in positions)."""
  config = get_config(name, dtype="float32", param_dtype="float32", scan_layers=scan,
                      attention_impl=attention_impl)
  model, params = _model_and_params(config)
  batch = _long_pairs(config)
  assert batch_lib.packed_pair_lengths(batch, PAD).max() > 3 * (config.sliding_window or 0)
  _assert_same_logps_and_grads(model, params, batch, scored_length)


def test_rows_whose_prompts_differ_share_their_common_prefix():
  """The format allows chosen and rejected rows with different prompts: the rows share only
  their common leading tokens, and the log-probs stay those of the two rows."""
  config = get_config("tiny", dtype="float32", param_dtype="float32")
  model, params = _model_and_params(config)
  batch = _long_pairs(config, seed=1)
  batch["rejected_tokens"][0, 3] += 1  # pair 0's prompts part after 3 tokens
  need = batch_lib.packed_pair_lengths(batch, PAD)
  assert need[0] == (30 + 9) + (30 + 17) - 3  # chosen row, then the rejected row past 3
  batch_lib.validate_pair_batch(batch, pad_id=PAD, scored_length=None, share_prompt=True)
  _assert_same_logps_and_grads(model, params, batch, None)


def test_a_pair_that_does_not_fit_its_packed_row_is_refused_on_the_host():
  batch = make_pair_batch([[5, 6, 7]], [[8, 9]], [[10, 11]], max_length=6)
  batch_lib.validate_pair_batch(batch, pad_id=PAD, scored_length=2, share_prompt=True)
  batch["rejected_tokens"][0, 0] = 4  # no shared prefix: 5 + 5 tokens > 6 + 2
  with pytest.raises(ValueError, match=r"pair 0 needs 10 tokens .*share_prompt = False"):
    batch_lib.validate_pair_batch(batch, pad_id=PAD, scored_length=2, share_prompt=True)
  batch_lib.validate_pair_batch(batch, pad_id=PAD, scored_length=2)  # unpacked, it is fine


def _step(attention_impl="xla", **kw):
  mesh = parallel.create_mesh({"data": 1}, devices=jax.devices()[:1])
  model = make_policy_model(get_config("tiny", attention_types=("local", "global")),
                            attention_impl=attention_impl)
  return TrainStep(model, make_optimizer(1e-3), get_loss_fn("dpo"), mesh, **kw)


def test_train_step_shares_the_prompt_where_it_applies():
  assert _step(scored_length=8).share_prompt
  assert not _step().share_prompt  # without scored_length a packed row would be ~2T
  assert _step(attention_impl="flash", scored_length=8).share_prompt
  assert not _step(scored_length=8, share_prompt=False).share_prompt
  with pytest.raises(ValueError, match="make_train_step: share_prompt=True needs scored_length"):
    _step(share_prompt=True)
  # On TPUs the fused attention (splash) takes no packed row's mask: pairs stay two rows
  # there unless asked for.
  from eva_jax.solver.train_step import _resolve_share_prompt  # noqa: PLC0415
  tpu_mesh = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="tpu")]))
  flash = make_policy_model(get_config("tiny"), attention_impl="flash")
  xla = make_policy_model(get_config("tiny"), attention_impl="xla")
  assert not _resolve_share_prompt(None, flash, tpu_mesh, 8, "here")
  assert _resolve_share_prompt(None, xla, tpu_mesh, 8, "here")
  assert _resolve_share_prompt(True, flash, tpu_mesh, 8, "here")


def test_train_step_refuses_pairs_that_do_not_share_their_prompt():
  step = _step(scored_length=2)
  batch = make_pair_batch([[5, 6, 7], [5, 6, 7]], [[8, 9], [8, 9]], [[10, 11], [9, 8]],
                          max_length=6)
  step.shard_batch(dict(batch, ref_chosen_logps=np.zeros(2, np.float32),
                        ref_rejected_logps=np.zeros(2, np.float32)))
  batch["rejected_tokens"][1, 0] = 4  # pair 1 now needs 5 + 5 tokens, its packed row has 8
  batch.update(ref_chosen_logps=np.zeros(2, np.float32),
               ref_rejected_logps=np.zeros(2, np.float32))
  with pytest.raises(ValueError, match="pair 1 needs"):
    step.shard_batch(batch)


def test_reference_logps_of_packed_rows_equal_two_rows():
  """The round's reference pass packs pairs too (on two data shards, the last batch padded)."""
  config = get_config("tiny", attention_types=("local", "global"))
  mesh = parallel.create_mesh({"data": 2}, devices=jax.devices()[:2])
  model = make_policy_model(config, compute_dtype="float32")
  params = create_train_state(model, make_optimizer(1e-3), jax.random.key(0), mesh).params
  pairs = _long_pairs(config)
  got, want = (reference_logps(model, params, pairs, mesh, batch_size=3, chunk_size=8,
                               scored_length=24, share_prompt=share)
               for share in (True, False))
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="reference_logps: share_prompt=True needs scored_length"):
    reference_logps(model, params, pairs, mesh, share_prompt=True)

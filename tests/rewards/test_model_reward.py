"""The reward model, from text to score: equal to HF transformers' Gemma2ForSequenceClassification
(CPU, float32) on the same text through the same chat template, one program per bucket, the
same scores on 8 devices and with 2 processes, truncation and errors.

The checkpoint (a tiny random Gemma 2 classifier with a SentencePiece tokenizer trained here,
Gemma's specials and turn markers included) is built once per module; buckets are tiny
(16, 32, 64 tokens; 4 rows).
"""

import os
import shutil

import gin
import jax
import numpy as np
import pytest

from eva_jax import parallel
from eva_jax.models import save_hf
from eva_jax.rewards import REWARDS, ModelReward, make_reward
from eva_jax.testing.multiprocess import run_in_processes
from tests.models import checkpoint_helpers as H
from tests.models.test_tokenizer import GEMMA3_TEMPLATE
from tests.rewards import mp_targets as M

TOL = 1e-4  # max |ours - hf| / max |hf|, as the model parity tests


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return M.make_checkpoint(tmp_path_factory.mktemp("reward_model") / "ckpt")


@pytest.fixture(scope="module")
def one_device(folder):
  """The reward on one device and what its first call gave (before other tests add programs)."""
  mesh = parallel.create_mesh(devices=jax.devices()[:1])
  reward = ModelReward(folder, mesh=mesh, **M.OPTIONS)
  scores = reward.score(M.CONVERSATIONS, M.RESPONSES).scores
  return dict(reward=reward, scores=scores, compilations=reward.num_compilations,
              stats=list(reward.last_stats))


def _keys(stats):
  return {(s["batch"], s["length_bucket"]) for s in stats}


def _hf(folder):
  """HF's tokenizer (with Gemma's chat template) and classifier from the same folder."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  # add_bos_token: Gemma's tokenizer_config.json sets it (the test folder has no such file).
  tok = transformers.GemmaTokenizer.from_pretrained(folder, add_bos_token=True)
  tok.chat_template = GEMMA3_TEMPLATE  # Gemma 2's, plus a system message folded in
  model, info = transformers.Gemma2ForSequenceClassification.from_pretrained(
      folder, attn_implementation="eager", output_loading_info=True)
  assert not any(info.values()), info  # every tensor read, none left random
  assert model.dtype == torch.float32  # the checkpoint's dtype
  return tok, model.eval()


def _hf_chat_ids(tok, conversation, response):
  messages = ([{"role": "user", "content": conversation}] if isinstance(conversation, str)
              else list(conversation))
  out = tok.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                tokenize=True, add_generation_prompt=False)
  return list(out["input_ids"] if hasattr(out, "keys") else out)


def _hf_scores(model, id_lists):
  # One unpadded sequence at a time: HF reads the score at its last token.
  return np.array([H.hf_outputs(model, np.asarray([ids]))[0] for ids in id_lists])


# ----------------------------------------------------------------------------- parity


@pytest.mark.parity
def test_text_to_score_matches_hf_across_length_buckets(folder, one_device):
  reward = one_device["reward"]
  hf_tok, hf_model = _hf(folder)
  hf_ids = [_hf_chat_ids(hf_tok, c, r) for c, r in zip(M.CONVERSATIONS, M.RESPONSES)]
  assert [reward.encode(c, r) for c, r in zip(M.CONVERSATIONS, M.RESPONSES)] == hf_ids
  ref = _hf_scores(hf_model, hf_ids)
  assert H.rel_err(one_device["scores"], ref) <= TOL
  assert one_device["scores"].dtype == np.float32
  assert np.std(ref) > 0.1  # the scores differ, so a mix-up of rows would show

  # Three length buckets, one with more rows than a batch; one program per (batch, length).
  stats = one_device["stats"]
  assert {s["length_bucket"] for s in stats} == {16, 32, 64}
  assert any(s["rows"] < s["batch"] for s in stats)  # dummy rows were added and dropped
  assert one_device["compilations"] == len(_keys(stats)) == len(stats)
  assert sum(s["rows"] for s in stats) == len(M.CONVERSATIONS)


@pytest.mark.parity
def test_plain_text_template_and_a_save_pretrained_checkpoint_match_hf(folder, tmp_path):
  """A format-string template (BOS + text), and the folder HF itself writes."""
  hf_tok, hf_model = _hf(folder)
  hf_model.save_pretrained(tmp_path)
  M.copy_tokenizer(folder, tmp_path)
  template = "Question: {prompt}\n\nAnswer: {response}"
  mesh = parallel.create_mesh(devices=jax.devices()[:1])
  reward = ModelReward(str(tmp_path), mesh=mesh, chat_template=template, **M.OPTIONS)
  convs, resps = M.CONVERSATIONS[:4], M.RESPONSES[:4]
  # The last user turn is {prompt} (conversation 4 has a system message: it is left out).
  texts = [template.format(prompt=c if isinstance(c, str) else c[-1]["content"], response=r)
           for c, r in zip(convs, resps)]
  hf_ids = [list(hf_tok(t)["input_ids"]) for t in texts]
  assert all(ids[0] == hf_tok.bos_token_id for ids in hf_ids)
  assert [reward.encode(c, r) for c, r in zip(convs, resps)] == hf_ids
  ours = reward.score(convs, resps).scores
  assert H.rel_err(ours, _hf_scores(hf_model, hf_ids)) <= TOL


# ----------------------------------------------------------------------------- buckets, order


def test_input_order_and_no_recompilation(one_device):
  reward = one_device["reward"]
  before = reward.num_compilations
  perm = np.random.RandomState(0).permutation(len(M.CONVERSATIONS))
  out = reward.score([M.CONVERSATIONS[i] for i in perm], [M.RESPONSES[i] for i in perm])
  np.testing.assert_array_equal(out.scores, one_device["scores"][perm])
  assert reward.num_compilations == before  # same buckets: nothing new
  assert _keys(reward.last_stats) == _keys(one_device["stats"])
  # Scores do not depend on the batch a row shares (padding and dummy rows are inert).
  alone = reward.score(M.CONVERSATIONS[:1], M.RESPONSES[:1]).scores
  np.testing.assert_allclose(alone, one_device["scores"][:1], rtol=1e-5, atol=1e-6)


def test_left_truncation_keeps_bos_and_the_end(one_device):
  reward = one_device["reward"]
  long_prompt = M.words(80, 21)
  ids = reward.encode(long_prompt, "fine")
  assert len(ids) > reward.max_length
  truncated_before = reward.num_truncated
  score = reward.score([long_prompt, "hi"], ["fine", "ok"]).scores
  assert reward.num_truncated == truncated_before + 1
  assert sum(s["truncated"] for s in reward.last_stats) == 1
  kept = ids[:1] + ids[len(ids) - (reward.max_length - 1):]
  assert kept[0] == reward.tokenizer.bos_id and len(kept) == reward.max_length
  np.testing.assert_allclose(score[0], reward.score_ids([kept])[0], rtol=1e-6)
  np.testing.assert_allclose(score[1], one_device["scores"][0], rtol=1e-5, atol=1e-6)
  assert reward.stats()["num_truncated"] == reward.num_truncated


# ----------------------------------------------------------------------------- meshes


def test_eight_devices_with_fsdp_and_tensor_axes(folder, one_device):
  mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  reward = ModelReward(folder, mesh=mesh, **M.OPTIONS)
  assert reward.dp == 4 and reward.batch_buckets == (4,)
  q = reward.params["layer_0"]["attn"]["q_einsum"]
  assert {"fsdp", "tensor"} <= {a for a in q.sharding.spec if a}  # really split
  scores = reward.score(M.CONVERSATIONS, M.RESPONSES).scores
  np.testing.assert_allclose(scores, one_device["scores"], rtol=1e-5, atol=1e-5)
  assert reward.num_compilations == len(_keys(reward.last_stats)) == 3


@pytest.mark.multiprocess
def test_two_processes_give_every_process_every_score(folder, one_device):
  # One length bucket keeps the children's compiling short (the buckets' logic is the same
  # with any process count; padding to a longer bucket leaves the scores as they are).
  results = run_in_processes("tests.rewards.mp_targets:score_in_process", num_processes=2,
                             devices_per_process=2,
                             kwargs=dict(path=folder, mesh_shape={"data": 2, "tensor": 2},
                                         options=dict(length_buckets=[64])))
  assert [(r["process_count"], r["devices"]) for r in results] == [(2, 4), (2, 4)]
  assert results[0]["keys"] == [(4, 64)]  # 12 rows: 3 batches of 4, split over data=2
  for r in results:
    np.testing.assert_allclose(r["scores"], one_device["scores"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(r["again"], r["scores"])
    assert r["compilations"] == r["compilations_after_second_call"] == len(r["keys"])
  assert results[0]["keys"] == results[1]["keys"]


# ----------------------------------------------------------------------------- errors, gin


def test_errors_name_the_thing_and_the_fix(folder, tmp_path):
  mesh = parallel.create_mesh(devices=jax.devices()[:1])
  # A causal LM is not a reward model.
  cfg = H.eva_config("gemma2", vocab_size=400)
  save_hf(tmp_path / "lm", cfg, H.random_params(cfg))
  M.copy_tokenizer(folder, tmp_path / "lm")
  with pytest.raises(ValueError, match="Gemma2ForCausalLM, not a sequence classifier"):
    ModelReward(str(tmp_path / "lm"), mesh=mesh)
  # No tokenizer.model beside the weights: say to pass one; passing one works.
  shutil.copytree(folder, tmp_path / "no_tok")
  os.remove(tmp_path / "no_tok" / "tokenizer.model")
  with pytest.raises(FileNotFoundError, match="no tokenizer.model.*ModelReward.tokenizer"):
    ModelReward(str(tmp_path / "no_tok"), mesh=mesh)
  reward = ModelReward(str(tmp_path / "no_tok"), mesh=mesh, tokenizer=folder, max_length=16,
                       min_length_bucket=16, truncation="error")
  # Too long with truncation="error": the prompt is named, nothing is compiled.
  with pytest.raises(ValueError, match=r"prompt 1 \('tell me more'\).*max_length=16"):
    reward.score(["hi", "tell me more"], ["ok", "the model " * 12])
  assert reward.num_compilations == 0
  with pytest.raises(ValueError, match="ends with a model turn"):
    reward.score([[{"role": "user", "content": "a"}, {"role": "model", "content": "b"}]], ["c"])
  for template, match in [("{prompt} only", "fields {prompt} and {response}"),
                          ("{prompt} {response} {other}", "not a valid format string")]:
    with pytest.raises(ValueError, match=match):
      ModelReward(folder, mesh=mesh, chat_template=template)
  with pytest.raises(ValueError, match="truncation='right'"):
    ModelReward(folder, mesh=mesh, truncation="right")
  with pytest.raises(ValueError, match="largest bucket 32 is below max_length=64"):
    ModelReward(folder, mesh=mesh, max_length=64, length_buckets=[16, 32])
  with pytest.raises(ValueError, match="bind ModelReward.path"):
    make_reward("model", mesh=mesh)


def test_gin_selects_the_model_reward(folder):
  assert REWARDS.get("model") is ModelReward and ModelReward.needs_mesh
  mesh = parallel.create_mesh(devices=jax.devices()[:2])
  gin.clear_config()
  try:
    gin.parse_config([f"ModelReward.path = '{folder}'", "ModelReward.max_length = 32",
                      "ModelReward.batch_size = 3", "make_reward.kind = 'model'"])
    reward = make_reward(mesh=mesh)
  finally:
    gin.clear_config()
  assert isinstance(reward, ModelReward) and reward.mesh is mesh
  assert reward.length_buckets == (32,) and reward.batch_buckets == (2, 4)

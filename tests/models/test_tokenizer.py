"""Tokenizers, Gemma's chat template and batch encoding.

A tiny SentencePiece model is trained here with Gemma's settings (pad 0, eos 1, bos 2, unk 3,
the turn markers as user-defined pieces, byte fallback, no dummy prefix, identity
normalisation), so nothing is downloaded.
"""

import io
import random

import gin
import numpy as np
import pytest
import sentencepiece as spm

from eva_jax.models import config as config_lib
from eva_jax.models import tokenizer as tok_lib
from eva_jax.models.tokenizer import (ByteTokenizer, SentencePieceTokenizer, cut_at_stop,
                                      encode_batch, encode_chat, encode_response, format_chat,
                                      get_tokenizer)

# Gemma 2's HF chat template (google/gemma-2-*-it tokenizer_config.json), verbatim.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/"
    "assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")

# Gemma 3's HF chat template (google/gemma-3-*-it), which folds a system message into the first
# user turn.
GEMMA3_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "user", "content": "  hello the model  \n"},
     {"role": "assistant", "content": "\nhi, a policy answer 42 "},
     {"role": "user", "content": "évolve the prompt 🙂"}],
    [{"role": "user", "content": "one"}, {"role": "model", "content": "two"}],
    [{"role": "user", "content": [{"type": "text", "text": " part one "},
                                  {"type": "text", "text": "part two"}]}],
]
SYSTEM_CONVERSATION = [{"role": "system", "content": "You are a terse solver. "},
                       {"role": "user", "content": " Solve 7 * 6. "},
                       {"role": "assistant", "content": "42"},
                       {"role": "user", "content": "Why?"}]


def _corpus(n=400, seed=0):
  rng = random.Random(seed)
  words = ("the a model user prompt answer reward policy gradient token evolve creator solver "
           "game play learn what is why hello one two").split()
  lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) +
           f" {rng.randint(0, 9999)}." for _ in range(n)]
  return lines + ["héllo wörld ünïcode", "日本語のテキスト", "emoji 🙂 ok", "line one\nline two"]


def _train(path, user_defined_symbols=("<start_of_turn>", "<end_of_turn>"),
           pad_id=0, eos_id=1, bos_id=2, unk_id=3):
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_corpus()), model_writer=buf, vocab_size=400, model_type="bpe",
      pad_id=pad_id, eos_id=eos_id, bos_id=bos_id, unk_id=unk_id, pad_piece="<pad>",
      eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
      user_defined_symbols=list(user_defined_symbols), byte_fallback=True,
      add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
      split_digits=True, allow_whitespace_only_pieces=True, hard_vocab_limit=False,
      minloglevel=2)
  path.write_bytes(buf.getvalue())
  return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("gemma_like")
  _train(d / "tokenizer.model")
  return d


@pytest.fixture(scope="module")
def sp_tok(model_dir):
  return SentencePieceTokenizer.from_path(str(model_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def byte_tok():
  return ByteTokenizer()


# ----------------------------------------------------------------------------- special ids


def test_special_ids_are_read_from_the_model(sp_tok):
  sp = sp_tok.processor
  assert (sp_tok.pad_id, sp_tok.eos_id, sp_tok.bos_id) == (0, 1, 2)
  assert [sp.id_to_piece(i) for i in (sp_tok.pad_id, sp_tok.eos_id, sp_tok.bos_id)] == [
      "<pad>", "<eos>", "<bos>"]
  assert sp.id_to_piece(sp_tok.start_of_turn_id) == "<start_of_turn>"
  assert sp.id_to_piece(sp_tok.end_of_turn_id) == "<end_of_turn>"
  assert sp_tok.start_of_turn_id != sp_tok.end_of_turn_id
  assert sp_tok.vocab_size == sp.get_piece_size() > 256  # bytes + merges + specials
  assert sp_tok.stop_ids == (sp_tok.eos_id, sp_tok.end_of_turn_id)


def test_other_special_ids_and_missing_turn_markers(tmp_path):
  # Ids laid out unlike Gemma's and no markers: the ids follow the model; chat encoding refuses.
  path = _train(tmp_path / "other.model", user_defined_symbols=(), pad_id=3, eos_id=2, bos_id=1,
                unk_id=0)
  tok = SentencePieceTokenizer.from_path(path)
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (3, 2, 1)
  assert tok.start_of_turn_id is None and tok.end_of_turn_id is None
  assert tok.stop_ids == (2,)
  assert tok.encode("hello", add_bos=True, add_eos=True) == [1, *tok.encode("hello"), 2]
  with pytest.raises(ValueError, match="<start_of_turn>.*other.model|other.model.*<start_of_turn>"):
    encode_chat(tok, "hi")


# ----------------------------------------------------------------------------- encode / decode

TEXTS = ["hello the model", "the reward 1234 and policy gradient.", "héllo wörld",
         "日本語 and 🙂 with byte fallback ÿ", "two\nlines  double  spaces ", ""]


def test_sentencepiece_round_trip(sp_tok):
  for text in TEXTS:
    ids = sp_tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert sp_tok.decode(ids) == text
    with_specials = sp_tok.encode(text, add_bos=True, add_eos=True)
    assert with_specials == [sp_tok.bos_id, *ids, sp_tok.eos_id]
    assert sp_tok.decode(with_specials) == text  # control ids decode to nothing
    assert sp_tok.decode(np.asarray(with_specials, np.int32)) == text
  # Merges were learnt: a frequent word takes fewer tokens than its bytes.
  assert len(sp_tok.encode("the model")) < len("the model")
  # Marker text is one user-defined piece, as in Gemma's tokenizer.
  assert sp_tok.encode("<end_of_turn>") == [sp_tok.end_of_turn_id]


def test_sentencepiece_decode_rejects_bad_ids(sp_tok):
  with pytest.raises(ValueError, match=f"{sp_tok.vocab_size + 5}.*outside the vocabulary"):
    sp_tok.decode([5, sp_tok.vocab_size + 5])
  with pytest.raises(ValueError, match="1-D"):
    sp_tok.decode(np.zeros((2, 3), np.int32))
  with pytest.raises(TypeError, match="str"):
    sp_tok.encode(b"bytes")


def test_byte_tokenizer_round_trips_utf8(byte_tok):
  assert byte_tok.vocab_size <= config_lib.get_config("tiny").vocab_size
  assert byte_tok.vocab_size <= config_lib.get_config("tiny_gemma1").vocab_size
  assert (byte_tok.pad_id, byte_tok.eos_id, byte_tok.bos_id) == (0, 1, 2)
  specials = {byte_tok.pad_id, byte_tok.eos_id, byte_tok.bos_id, byte_tok.start_of_turn_id,
              byte_tok.end_of_turn_id}
  assert len(specials) == 5 and max(specials) < ByteTokenizer.BYTE_OFFSET
  rng = random.Random(1)
  # Code points from every UTF-8 length class (1-4 bytes), surrogates excluded.
  ranges = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
  for _ in range(50):
    text = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 30)))
    ids = byte_tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert all(ByteTokenizer.BYTE_OFFSET <= i < byte_tok.vocab_size for i in ids)
    assert byte_tok.decode(ids) == text
    assert byte_tok.decode(byte_tok.encode(text, add_bos=True, add_eos=True)) == text
  for text in TEXTS:
    assert byte_tok.decode(byte_tok.encode(text)) == text


def test_byte_tokenizer_decodes_bad_input_without_crashing(byte_tok):
  ids = byte_tok.encode("é🙂")  # 2 + 4 bytes
  assert byte_tok.decode(ids[:1] + ids[2:4]) == "\ufffd\ufffd"  # cut characters
  assert byte_tok.decode(ids[:1] + [byte_tok.eos_id] + ids[:2]) == "\ufffdé"
  # unk, reserved and past-the-vocabulary ids (a tiny model has 384 rows) are replaced too.
  assert byte_tok.decode([byte_tok.unk_id, 7, 383] + ids[:2]) == "\ufffd\ufffd\ufffdé"
  assert byte_tok.decode([byte_tok.start_of_turn_id, *byte_tok.encode("x")]) == (
      "<start_of_turn>x")


# ----------------------------------------------------------------------------- chat template


def test_format_chat_literal_strings():
  assert format_chat("Hi there") == (
      "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n")
  assert format_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == (
      "<start_of_turn>user\nHi<end_of_turn>\n")
  assert format_chat(SYSTEM_CONVERSATION, bos_token="<bos>") == (
      "<bos><start_of_turn>user\nYou are a terse solver. \n\nSolve 7 * 6.<end_of_turn>\n"
      "<start_of_turn>model\n42<end_of_turn>\n"
      "<start_of_turn>user\nWhy?<end_of_turn>\n"
      "<start_of_turn>model\n")


@pytest.mark.parity
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_format_chat_matches_hf_jinja_templates(add_generation_prompt):
  from transformers.utils.chat_template_utils import render_jinja_template

  def render(template, messages):
    out = render_jinja_template([messages], chat_template=template, bos_token="<bos>",
                                add_generation_prompt=add_generation_prompt)
    return out[0][0] if isinstance(out, tuple) else out

  for messages in CONVERSATIONS + [SYSTEM_CONVERSATION]:
    ours = format_chat(messages, add_generation_prompt, bos_token="<bos>")
    assert ours == render(GEMMA3_TEMPLATE, messages)
    if isinstance(messages[0]["content"], str) and messages[0]["role"] != "system":
      assert ours == render(GEMMA2_TEMPLATE, messages)
  assert "<start_of_turn>model\n" in render(GEMMA3_TEMPLATE, CONVERSATIONS[0]) or (
      not add_generation_prompt)


@pytest.mark.parametrize("messages,match", [
    ([], "empty"),
    ([{"role": "system", "content": "s"}], "followed by a user"),
    ([{"role": "model", "content": "x"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1.*alternate"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only come first"),
    ([{"role": "tool", "content": "a"}], "unknown role 'tool'"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "user", "content": [{"type": "image"}]}], "no images"),
])
def test_chat_errors(messages, match):
  with pytest.raises(ValueError, match=match):
    format_chat(messages)


def test_encode_chat_turn_markers_are_single_ids(sp_tok, byte_tok):
  for tok in (sp_tok, byte_tok):
    for messages in CONVERSATIONS + [SYSTEM_CONVERSATION]:
      for gen in (True, False):
        ids = encode_chat(tok, messages, add_generation_prompt=gen)
        text = format_chat(messages, gen)
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
        assert ids.count(tok.start_of_turn_id) == text.count("<start_of_turn>")
        assert ids.count(tok.end_of_turn_id) == text.count("<end_of_turn>")
        # Segment-wise encoding equals encoding the whole text (no piece spans a marker).
        assert ids == tok.encode(text, add_bos=True)
        assert tok.decode(ids) == text
    ids = encode_chat(tok, "Hi", add_bos=False)
    sot = tok.start_of_turn_id
    assert ids == [sot, *tok.encode("user\nHi"), tok.end_of_turn_id, *tok.encode("\n"), sot,
                   *tok.encode("model\n")]
  # The byte tokenizer spells "user\n" in bytes between the markers.
  assert encode_chat(byte_tok, "Hi")[:7] == [2, 3] + [ByteTokenizer.BYTE_OFFSET + b
                                                      for b in b"user\n"]


@pytest.mark.parity
def test_encode_chat_matches_hf_gemma_tokenizer(model_dir, sp_tok):
  # HF converts the same tokenizer.model offline into its Gemma tokenizer.
  from transformers import GemmaTokenizer
  hf = GemmaTokenizer.from_pretrained(str(model_dir))
  hf.chat_template = GEMMA3_TEMPLATE
  assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id) == (
      sp_tok.pad_id, sp_tok.eos_id, sp_tok.bos_id)
  assert hf.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [
      sp_tok.start_of_turn_id, sp_tok.end_of_turn_id]
  for messages in CONVERSATIONS + [SYSTEM_CONVERSATION]:
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    hf_ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    assert encode_chat(sp_tok, messages) == hf_ids


def test_encode_response_and_cut_at_stop(sp_tok, byte_tok):
  for tok in (sp_tok, byte_tok):
    prompt = encode_chat(tok, CONVERSATIONS[0])
    answer = encode_response(tok, "The answer is 42.")
    full = encode_chat(tok, CONVERSATIONS[0] + [{"role": "model", "content": "The answer is 42."}],
                       add_generation_prompt=False)
    assert prompt + answer + tok.encode("\n") == full
    assert answer[-1] == tok.end_of_turn_id
    assert encode_response(tok, "x", add_end_of_turn=False) == tok.encode("x")
    sampled = answer + [tok.pad_id] * 3
    assert tok.decode(cut_at_stop(sampled, tok.stop_ids)) == "The answer is 42."
    assert cut_at_stop(np.asarray([10, 11, tok.eos_id, 12]), tok.stop_ids) == [10, 11]
    assert cut_at_stop([10, 11], tok.stop_ids) == [10, 11]


# ----------------------------------------------------------------------------- batches


def test_encode_batch_padding_sides(sp_tok):
  texts = ["hello the model", "a", "the reward 1234 and policy gradient."]
  rows = [sp_tok.encode(t, add_bos=True) for t in texts]
  longest = max(map(len, rows))
  for side in ("left", "right"):
    ids, mask = encode_batch(sp_tok, texts, max_length=None, padding_side=side)
    assert ids.shape == mask.shape == (3, longest)
    assert ids.dtype == np.int32 and mask.dtype == np.bool_
    for n, r in enumerate(rows):
      assert mask[n].sum() == len(r)
      assert ids[n][mask[n]].tolist() == r
      assert (ids[n][~mask[n]] == sp_tok.pad_id).all()
      kept = np.flatnonzero(mask[n])
      assert (kept == (np.arange(longest - len(r), longest) if side == "left"
                       else np.arange(len(r)))).all()
  # Fixed width, multiples, and the width of a shorter batch.
  assert encode_batch(sp_tok, texts, max_length=64)[0].shape == (3, 64)
  assert encode_batch(sp_tok, texts, max_length=64, pad_to_max_length=False)[0].shape == (
      3, longest)
  ids, mask = encode_batch(sp_tok, texts, max_length=None, pad_to_multiple_of=16)
  assert ids.shape[1] % 16 == 0 and longest <= ids.shape[1] < longest + 16
  # Id lists are used as they are (no BOS added); add_bos/add_eos apply to texts.
  ids, _ = encode_batch(sp_tok, [[7, 8, 9], "hi"], max_length=5, padding_side="right",
                        add_bos=False, add_eos=True)
  assert ids.tolist()[0] == [7, 8, 9, 0, 0]
  assert ids.tolist()[1][:len(sp_tok.encode("hi")) + 1] == sp_tok.encode("hi", add_eos=True)


def test_encode_batch_truncation(byte_tok):
  rows = [list(range(10, 20)), [30, 31]]
  ids, mask = encode_batch(byte_tok, rows, max_length=4, truncation_side="left",
                           padding_side="right")
  assert ids.tolist() == [[16, 17, 18, 19], [30, 31, 0, 0]]
  assert mask.tolist() == [[True] * 4, [True, True, False, False]]
  ids, _ = encode_batch(byte_tok, rows, max_length=4, truncation_side="right", padding_side="left")
  assert ids.tolist() == [[10, 11, 12, 13], [0, 0, 30, 31]]
  # Width rounds up past max_length; the kept tokens do not.
  ids, mask = encode_batch(byte_tok, rows, max_length=5, pad_to_multiple_of=4)
  assert ids.shape == (2, 8) and mask.sum(axis=1).tolist() == [5, 2]
  assert ids[0][mask[0]].tolist() == list(range(15, 20))
  for truncation in (None, False):
    with pytest.raises(ValueError, match="row 0 has 10 tokens.*max_length=4"):
      encode_batch(byte_tok, rows, max_length=4, truncation=truncation)
  # Texts: byte rows truncated on the left keep the end of the text.
  ids, mask = encode_batch(byte_tok, ["abcdef"], max_length=3, add_bos=True)
  assert byte_tok.decode(ids[0][mask[0]]) == "def"


@pytest.mark.parametrize("kwargs,match", [
    (dict(padding_side="middle"), "padding_side='middle'"),
    (dict(truncation_side="up"), "truncation_side='up'"),
    (dict(max_length=0), "max_length=0"),
    (dict(pad_to_multiple_of=0), "pad_to_multiple_of=0"),
])
def test_encode_batch_bad_arguments(byte_tok, kwargs, match):
  with pytest.raises(ValueError, match=match):
    encode_batch(byte_tok, ["abc"], **kwargs)
  with pytest.raises(ValueError, match="non-empty"):
    encode_batch(byte_tok, [])


# ----------------------------------------------------------------------------- loading


def test_loading_errors(tmp_path):
  missing = tmp_path / "nope" / "tokenizer.model"
  with pytest.raises(FileNotFoundError, match="nope.*not found.*SentencePiece"):
    SentencePieceTokenizer.from_path(str(missing))
  with pytest.raises(FileNotFoundError, match="tokenizer.model.*not found"):
    get_tokenizer(str(tmp_path))  # a folder without tokenizer.model
  text = tmp_path / "tokenizer.json"
  text.write_text('{"version": "1.0", "model": {"type": "BPE"}}\n')
  with pytest.raises(ValueError, match="tokenizer.json is not a SentencePiece model"):
    get_tokenizer(str(text))
  empty = tmp_path / "empty.model"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match="empty.model.*empty SentencePiece model"):
    SentencePieceTokenizer.from_path(empty)
  with pytest.raises(ValueError, match="spec must be"):
    get_tokenizer("")


def test_get_tokenizer(model_dir, sp_tok):
  assert isinstance(get_tokenizer("byte"), ByteTokenizer)
  for spec in (str(model_dir), str(model_dir / "tokenizer.model")):
    tok = get_tokenizer(spec)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.encode("hello the model") == sp_tok.encode("hello the model")
  assert get_tokenizer(sp_tok) is sp_tok
  # gin-configurable, as the rest of a run's configuration.
  gin.bind_parameter("tokenizer_test/get_tokenizer.spec", str(model_dir))
  with gin.config_scope("tokenizer_test"):
    assert isinstance(tok_lib.get_tokenizer(), SentencePieceTokenizer)
  assert isinstance(tok_lib.get_tokenizer(), ByteTokenizer)

"""Prompt files: JSON lines, Parquet and chat messages, drop counts, held-out splits, gs://, and
every bad input with the message that names it."""

from __future__ import annotations

import json
import random

import gin
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from etils import epath

from eva_jax.data import (PromptExample, PromptFileError, load_prompts, load_train_and_heldout,
                          split_heldout)
from eva_jax.models import ByteTokenizer, encode_chat


def _jsonl(path, lines) -> str:
  """Writes `lines` (dicts are dumped, strs written as they are); returns the path as str."""
  epath.Path(path).write_text(
      "".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
  return str(path)


def _parquet(path, columns: dict) -> str:
  with epath.Path(path).open("wb") as f:
    pq.write_table(pa.table(columns), f)
  return str(path)


CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": [{"type": "text", "text": "Another "},
                                     {"type": "text", "text": "one?"}]},
        {"role": "assistant", "content": "11"}]  # a reference answer: not part of the prompt


# --------------------------------------------------------------------------------------------
# Reading


def test_jsonl_prompts_sources_and_metadata(tmp_path):
  path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "  What is 2+2? ", "id": 7, "answer": "4"},
                                        "", "   ",  # blank lines are skipped, still counted
                                        {"prompt": "Write a haiku.", "id": 8}])
  got = load_prompts(path, metadata_keys=("id", "answer"))
  assert got.texts() == ["What is 2+2?", "Write a haiku."]
  assert [e.source for e in got] == [f"{path}:1", f"{path}:4"]
  assert [e.metadata for e in got] == [{"id": 7, "answer": "4"}, {"id": 8}]
  assert got.examples[0].context == ()
  assert got.examples[0].conversation() == [{"role": "user", "content": "What is 2+2?"}]
  assert got.stats == {"read": 2, "kept": 2, "dropped_empty": 0, "dropped_duplicate": 0,
                       "dropped_too_long": 0}
  assert got.files == [path]


def test_chat_messages_last_user_turn_is_the_prompt(tmp_path):
  path = _jsonl(tmp_path / "chat.jsonl", [{"prompt": CHAT}, {"prompt": "plain"}])
  chat, plain = load_prompts(path).examples
  assert chat.text == "Another one?"
  assert chat.context == ({"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Name a prime."},
                          {"role": "assistant", "content": "7"})
  assert chat.conversation()[-1] == {"role": "user", "content": "Another one?"}
  tok = ByteTokenizer()  # the conversation is what encode_chat accepts
  assert tok.decode(encode_chat(tok, chat.conversation())).count("Be brief.") == 1
  assert plain.text == "plain" and plain.context == ()
  # messages_key reads the chat column when a record has it, else the plain key.
  path = _jsonl(tmp_path / "mixed.jsonl", [{"messages": CHAT[1:3] + CHAT[1:2]},
                                            {"question": "plain one"}])
  got = load_prompts(path, key="question", messages_key="messages")
  assert got.texts() == ["Name a prime.", "plain one"]
  assert len(got.examples[0].context) == 2


def test_parquet_plain_and_chat_reads_only_needed_columns(tmp_path, monkeypatch):
  path = _parquet(tmp_path / "p.parquet", {
      "prompt": ["first", "second", "third"],
      "messages": [[{"role": "user", "content": "hi"}], None, CHAT[:2]],
      "task": ["t0", "t1", "t2"],
      "blob": [b"x" * 10] * 3})
  asked = []
  iter_batches = pq.ParquetFile.iter_batches
  monkeypatch.setattr(pq.ParquetFile, "iter_batches",
                      lambda self, **kw: asked.append(kw["columns"]) or iter_batches(self, **kw))
  got = load_prompts(path, messages_key="messages", metadata_keys=["task"])
  assert asked == [["messages", "prompt", "task"]]
  assert got.texts() == ["hi", "second", "Name a prime."]
  assert [e.source for e in got] == [f"{path}:row {i}" for i in range(3)]
  assert [e.metadata for e in got] == [{"task": f"t{i}"} for i in range(3)]
  assert got.examples[2].context == ({"role": "system", "content": "Be brief."},)


def test_json_list_globs_and_limit(tmp_path):
  (tmp_path / "d").mkdir()
  _jsonl(tmp_path / "d" / "b.jsonl", [{"prompt": "b1"}, {"prompt": "b2"}])
  _jsonl(tmp_path / "d" / "a.jsonl", [{"prompt": "a1"}])
  (tmp_path / "l.json").write_text(json.dumps([{"prompt": "l0"}, {"prompt": "l1"}], indent=1))
  got = load_prompts([str(tmp_path / "l.json"), str(tmp_path / "d" / "*.jsonl")])
  assert got.texts() == ["l0", "l1", "a1", "b1", "b2"]  # given order; a glob's matches sorted
  assert got.examples[1].source == f"{tmp_path / 'l.json'}:record 1"
  got = load_prompts(str(tmp_path / "d" / "*.jsonl"), limit=2)
  assert got.texts() == ["a1", "b1"] and got.stats["read"] == 2


def test_duplicates_empty_and_over_long_are_dropped_and_counted(tmp_path):
  tok = ByteTokenizer()
  short, long = "Sum 2 and 3.", "Explain " + "why " * 40 + "the sky is blue."
  limit = len(encode_chat(tok, [{"role": "user", "content": short}]))
  assert len(encode_chat(tok, [{"role": "user", "content": long}])) > limit
  path = _jsonl(tmp_path / "p.jsonl", [
      {"prompt": short}, {"prompt": "SUM 2   and\n3."},  # a duplicate up to case and spaces
      {"prompt": long}, {"prompt": "  "}, {"prompt": ""},
      {"prompt": [{"role": "user", "content": "ctx"}, {"role": "model", "content": "ok"},
                  {"role": "user", "content": short}]},  # same text, other context: kept
      {"prompt": "Sum 2 and 4."}])
  got = load_prompts(path, tokenizer=tok, max_prompt_tokens=limit)
  assert got.texts() == [short, "Sum 2 and 4."]  # the chat one is over the limit with its context
  assert got.stats == {"read": 7, "kept": 2, "dropped_empty": 2, "dropped_duplicate": 1,
                       "dropped_too_long": 2}
  got = load_prompts(path, drop_duplicates=False)
  assert got.stats["dropped_duplicate"] == 0 and len(got) == 5
  got = load_prompts(path, tokenizer="byte", max_prompt_tokens=10_000)
  assert got.texts() == [short, long, short, "Sum 2 and 4."]
  assert got.stats["dropped_duplicate"] == 1


# --------------------------------------------------------------------------------------------
# Bad inputs


def test_missing_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"prompt file .*nope.jsonl does not exist"):
    load_prompts(str(tmp_path / "nope.jsonl"))
  with pytest.raises(FileNotFoundError, match=r"no file matches .*/\*.parquet"):
    load_prompts(str(tmp_path / "*.parquet"))
  with pytest.raises(FileNotFoundError, match=r"is a folder; pass its files or a glob"):
    load_prompts(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no prompt file given"):
    load_prompts([])


def test_empty_files(tmp_path):
  for name, content in [("zero.jsonl", ""), ("blank.jsonl", "\n  \n"), ("list.json", "[]")]:
    (tmp_path / name).write_text(content)
    with pytest.raises(PromptFileError, match=rf"{name}: the prompt file holds no records"):
      load_prompts(str(tmp_path / name))
  path = _parquet(tmp_path / "e.parquet", {"prompt": pa.array([], pa.string())})
  with pytest.raises(PromptFileError, match=r"e.parquet: the prompt file holds no records"):
    load_prompts(path)
  path = _jsonl(tmp_path / "blank_prompts.jsonl", [{"prompt": " "}, {"prompt": ""}])
  with pytest.raises(PromptFileError, match=r"no prompt left in \[.*blank_prompts.jsonl'\]: "
                                            r"read 2, dropped 2 empty, 0 duplicate"):
    load_prompts(path)
  path = _jsonl(tmp_path / "long.jsonl", [{"prompt": "a long prompt"}, {"prompt": "a"}])
  with pytest.raises(PromptFileError, match=r"read 2, dropped 0 empty, 0 duplicate, 2 longer "
                                            r"than max_prompt_tokens=3 \(raise it\)"):
    load_prompts(path, tokenizer="byte", max_prompt_tokens=3)


def test_malformed_jsonl_line_names_file_line_and_parser_message(tmp_path):
  path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, "", '{"prompt": "unterminated'])
  with pytest.raises(PromptFileError, match=r"bad.jsonl:3: not valid JSON \(Unterminated "
                                            r"string starting at: column 12\)"):
    load_prompts(path)
  path = _jsonl(tmp_path / "notobj.jsonl", [{"prompt": "ok"}, '["a", "list"]'])
  with pytest.raises(PromptFileError, match=r"notobj.jsonl:2: expected a JSON object"):
    load_prompts(path)
  (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
  with pytest.raises(PromptFileError, match=r"latin1.jsonl:2: not UTF-8"):
    load_prompts(str(tmp_path / "latin1.jsonl"))


def test_records_without_the_key_or_with_a_bad_value(tmp_path):
  path = _jsonl(tmp_path / "k.jsonl", [{"prompt": "ok"}, {"question": "q", "id": 1}])
  with pytest.raises(PromptFileError, match=r"k.jsonl:2: the record has no 'prompt'; its keys "
                                            r"are \['id', 'question'\]\. Set load_prompts.key"):
    load_prompts(path)
  path = _jsonl(tmp_path / "v.jsonl", [{"prompt": 42}])
  with pytest.raises(PromptFileError, match=r"v.jsonl:1: 'prompt' is int 42; expected a str or "
                                            r"a chat"):
    load_prompts(path)
  path = _jsonl(tmp_path / "m.jsonl", [{"prompt": "ok"}, {"messages": "not a list"}])
  with pytest.raises(PromptFileError, match=r"m.jsonl:2: 'messages' is str .*expected a chat"):
    load_prompts(path, messages_key="messages")


def test_invalid_chats(tmp_path):
  cases = {
      "no_role": ([{"content": "hi"}], r":1: 'prompt' is not a valid chat: message 0"),
      "no_user": ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
                  r":1: the chat under 'prompt' has no user turn \(roles \['system', "
                  r"'assistant'\]\)"),
      "order": ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                r":1: the chat under 'prompt' is not a valid conversation: .*alternate"),
      "content": ([{"role": "user", "content": {"x": 1}}],
                  r":1: message 0 has content .*expected a str or a list of"),
  }
  for name, (chat, message) in cases.items():
    path = _jsonl(tmp_path / f"{name}.jsonl", [{"prompt": chat}])
    with pytest.raises(PromptFileError, match=rf"{name}.jsonl{message}"):
      load_prompts(path)


def test_parquet_errors_name_the_row_or_the_columns(tmp_path):
  path = _parquet(tmp_path / "n.parquet", {"prompt": ["a", "b", None]})
  with pytest.raises(PromptFileError, match=r"n.parquet:row 2: 'prompt' is NoneType None"):
    load_prompts(path)
  path = _parquet(tmp_path / "c.parquet", {"text": ["a"], "id": [1]})
  with pytest.raises(PromptFileError, match=r"c.parquet: no column named 'prompt'; its columns "
                                            r"are \['text', 'id'\]"):
    load_prompts(path)
  (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
  with pytest.raises(PromptFileError, match=r"junk.parquet: not a readable Parquet file"):
    load_prompts(str(tmp_path / "junk.parquet"))


def test_bad_arguments_and_formats(tmp_path):
  path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "id": 1}])
  with pytest.raises(ValueError, match="max_prompt_tokens needs a tokenizer"):
    load_prompts(path, max_prompt_tokens=8)
  with pytest.raises(PromptFileError, match=r"metadata key\(s\) \['task_id'\] are in no record"):
    load_prompts(path, metadata_keys=("id", "task_id"))
  (tmp_path / "p.csv").write_text("prompt\nhi\n")
  with pytest.raises(PromptFileError, match=r"p.csv: cannot tell the format from the extension "
                                            r"\.csv"):
    load_prompts(str(tmp_path / "p.csv"))
  assert load_prompts(_jsonl(tmp_path / "p.txt", [{"prompt": "x"}]), format="jsonl").texts() == [
      "x"]
  with pytest.raises(ValueError, match=r"format='csv'; use one of"):
    load_prompts(path, format="csv")


# --------------------------------------------------------------------------------------------
# Held-out split


def _examples(n):
  return [PromptExample(text=f"prompt number {i}", source=f"f:{i + 1}") for i in range(n)]


def test_split_is_fixed_disjoint_ordered_and_independent_of_input_order():
  items = _examples(40)
  train, held = split_heldout(items, fraction=0.25, seed=3)
  assert len(held) == 10 and len(train) == 30
  assert {e.text for e in train}.isdisjoint({e.text for e in held})
  assert sorted(train + held, key=lambda e: e.source) == sorted(items, key=lambda e: e.source)
  for part in (train, held):  # each side keeps the input order
    assert [items.index(e) for e in part] == sorted(items.index(e) for e in part)
  assert split_heldout(items, fraction=0.25, seed=3) == (train, held)
  shuffled = list(items)
  random.Random(0).shuffle(shuffled)
  assert {e.text for e in split_heldout(shuffled, count=10, seed=3)[1]} == {e.text for e in held}
  assert split_heldout(items, count=10, seed=4)[1] != held  # the seed picks another set
  # Appending prompts moves none of the old ones across the cut the other way: each prompt's
  # rank is its own, so the old prompts held out of 80 are the lowest-ranked of those held out
  # of 40, or the other way round.
  first = {e.text for e in held}
  again = {e.text for e in split_heldout(_examples(80), count=20, seed=3)[1]} & {
      e.text for e in items}
  assert again <= first or first <= again


def test_split_errors():
  items = _examples(3)
  with pytest.raises(ValueError, match="exactly one of fraction= or count="):
    split_heldout(items)
  with pytest.raises(ValueError, match="exactly one of"):
    split_heldout(items, fraction=0.5, count=1)
  with pytest.raises(ValueError, match=r"fraction=1.5 must be in \(0, 1\)"):
    split_heldout(items, fraction=1.5)
  with pytest.raises(ValueError, match="holding out 0 of 3 prompts leaves no held-out prompt"):
    split_heldout(items, fraction=0.1)
  with pytest.raises(ValueError, match="holding out 3 of 3 prompts leaves no training prompt"):
    split_heldout(items, count=3)


def test_train_and_heldout_from_files_a_split_and_gin(tmp_path):
  train_path = _jsonl(tmp_path / "train.jsonl", [{"q": f"train {i}"} for i in range(8)])
  held_path = _jsonl(tmp_path / "held.jsonl", [{"q": "held 0"}, {"q": "held 1"}])
  gin.clear_config()
  try:
    gin.parse_config("load_prompts.key = 'q'")  # reading options are shared by both sets
    train, held = load_train_and_heldout(train_path, held_path)
    assert len(train) == 8 and held.texts() == ["held 0", "held 1"]
    train, held = load_train_and_heldout(train_path, heldout_count=2, seed=1)
    assert len(train) == 6 and len(held) == 2
    assert train.stats["held_out"] == 2 and train.stats["read"] == 8
    assert set(train.texts()).isdisjoint(held.texts())
    with pytest.raises(ValueError, match="heldout_paths or a split size"):
      load_train_and_heldout(train_path, held_path, heldout_fraction=0.5)
    with pytest.raises(ValueError, match="no held-out prompts; pass heldout_paths"):
      load_train_and_heldout(train_path)
  finally:
    gin.clear_config()


# --------------------------------------------------------------------------------------------
# gs://


def test_gs_paths(gcs_bucket):
  _jsonl(f"{gcs_bucket}/prompts/a.jsonl", [{"prompt": "from gcs"}, "{broken"])
  _jsonl(f"{gcs_bucket}/prompts/b.jsonl", [{"prompt": "second file"}])
  _parquet(f"{gcs_bucket}/prompts/c.parquet", {"prompt": ["parquet row"]})
  with pytest.raises(PromptFileError, match=rf"{gcs_bucket}/prompts/a.jsonl:2: not valid JSON"):
    load_prompts(f"{gcs_bucket}/prompts/*.jsonl")
  _jsonl(f"{gcs_bucket}/prompts/a.jsonl", [{"prompt": "from gcs"}])
  got = load_prompts([f"{gcs_bucket}/prompts/*.jsonl", f"{gcs_bucket}/prompts/c.parquet"])
  assert got.texts() == ["from gcs", "second file", "parquet row"]
  assert got.examples[2].source == f"{gcs_bucket}/prompts/c.parquet:row 0"
  with pytest.raises(FileNotFoundError, match=rf"{gcs_bucket}/none.jsonl does not exist"):
    load_prompts(f"{gcs_bucket}/none.jsonl")

"""Evolvers (plan, chain / independent modes, programmatic), reply parsing and the filters."""

import numpy as np
import pytest

from eva_jax.creator import (Child, Parent, ProgrammaticEvolver, filter_children, make_evolver,
                             meta_prompt, parse_reply, register_programmatic_evolver)
from eva_jax.creator.meta_prompts import ECHO_MARKERS, OPERATORS

PARENTS = [Parent("r0-00000", "Name a prime."), Parent("r0-00001", "Say hi."),
           Parent("r0-00002", "Count to 3.")]


@register_programmatic_evolver("tagger", operators=("deepen", "persona", "mix"))
def _tagger(text, operator, other, rng):
  if "FAIL" in text:
    raise RuntimeError("cannot rewrite this one")
  return f"{text} [{operator}{'+' + other if other else ''}]"


def test_chain_mode_rewrites_the_previous_child_and_keeps_all():
  ev = ProgrammaticEvolver("tagger", num_children=3, operators=("deepen",))
  out = ev.evolve(PARENTS[:2], seed=0)
  assert out.requests == 6 and out.failed == 0
  texts = [c.text for c in out.children if c.parent_id == "r0-00000"]
  assert texts == ["Name a prime. [deepen]", "Name a prime. [deepen] [deepen]",
                   "Name a prime. [deepen] [deepen] [deepen]"]
  assert [c.step for c in out.children] == [0, 1, 2, 0, 1, 2]


def test_independent_mode_rewrites_the_parent_each_time():
  ev = ProgrammaticEvolver("tagger", num_children=2, mode="independent", operators=("deepen",))
  out = ev.evolve(PARENTS[:1], seed=0)
  assert [c.text for c in out.children] == ["Name a prime. [deepen]"] * 2


def test_plan_draws_operators_and_mix_partners_from_the_seed():
  ev = ProgrammaticEvolver("tagger", num_children=4)
  ops, partner, seeds = ev.plan(3, seed=5)
  ops2, partner2, seeds2 = ev.plan(3, seed=5)
  assert (ops == ops2).all() and (partner == partner2).all() and (seeds == seeds2).all()
  assert set(ops.ravel()) <= {"deepen", "persona", "mix"}
  assert (partner != np.arange(3)[:, None]).all()  # never mixed with itself
  # Operators are drawn uniformly: over many parents each shows up about a third of the time.
  ops, _, _ = ev.plan(600, seed=1)
  freq = [np.mean(ops == o) for o in ("deepen", "persona", "mix")]
  assert all(abs(f - 1 / 3) < 0.03 for f in freq), freq
  # One parent: nobody to mix with, so `mix` is not drawn.
  ops, partner, _ = ev.plan(1, seed=0)
  assert "mix" not in set(ops.ravel()) and (partner == -1).all()
  # A mix child names its partner's text.
  out = ProgrammaticEvolver("tagger", num_children=1, operators=("mix",)).evolve(PARENTS, 0)
  assert all("[mix+" in c.text for c in out.children)


def test_failures_are_counted_and_the_chain_continues():
  parents = [Parent("a", "FAIL here"), Parent("b", "fine")]
  out = ProgrammaticEvolver("tagger", num_children=2, operators=("deepen",)).evolve(parents, 0)
  assert out.failed == 2 and "RuntimeError: cannot rewrite this one" in out.failure_examples[0]
  assert [c.parent_id for c in out.children] == ["b", "b"]


def test_template_evolver_and_registry_errors():
  out = make_evolver("programmatic").evolve(PARENTS, seed=0)
  assert len(out.children) == 12 and all(c.text for c in out.children)
  assert {c.operator for c in out.children} <= set(OPERATORS)
  with pytest.raises(ValueError, match="Unknown evolver 'gpt'; known: chat_completions, lm, "
                                       "programmatic"):
    make_evolver("gpt")
  with pytest.raises(ValueError, match="Unknown programmatic evolver 'nope'"):
    ProgrammaticEvolver("nope")
  with pytest.raises(ValueError, match=r"unknown operators \['shift_topic'\]"):
    ProgrammaticEvolver("tagger", operators=("shift_topic",))
  with pytest.raises(ValueError, match="mode='tree'"):
    ProgrammaticEvolver("tagger", mode="tree")
  with pytest.raises(ValueError, match="plain function; name the operators"):
    ProgrammaticEvolver(lambda *a: "x")


def test_meta_prompts_fill_both_prompts_once():
  text = meta_prompt("mix", "Use {prompt} literally.", "Other {other}")
  assert "Use {prompt} literally." in text and "Other {other}" in text
  for op in OPERATORS:
    assert "<prompt>\nX\n</prompt>" in meta_prompt(op, "X", "Y")
  with pytest.raises(ValueError, match="Unknown evolution operator 'shuffle'"):
    meta_prompt("shuffle", "x")


@pytest.mark.parametrize("reply", [
    "Rewritten prompt: Write a haiku about rain.",
    "#Rewritten Prompt#:\nWrite a haiku about rain.",
    "Sure! Here is the new prompt:\n\n\"Write a haiku about rain.\"\n\nThis version narrows "
    "the form to a haiku.",
    "**New prompt:** Write a haiku about rain.\n\nNote: I made it specific.",
    "```\nWrite a haiku about rain.\n```",
    "\u201cWrite a haiku about rain.\u201d",
    "Write a haiku about rain.\n\nI added the haiku form.",
])
def test_parse_reply_strips_preambles_quotes_and_chatter(reply):
  assert parse_reply(reply) == "Write a haiku about rain."


def test_parse_reply_keeps_ordinary_prompts():
  for text in ("Prompt engineering: explain it to a child.", 'Explain "quotes" in Python.',
               '"a" and "b" are letters.', "Step 1.\n\nStep 2."):
    assert parse_reply(text) == text


def test_filters_drop_and_count_each_kind():
  parents = {"p": "Say hi.", "q": "Count to three."}
  children = [Child("p", "", "deepen", 0),                                 # empty
              Child("p", "Hi?", "deepen", 1),                              # too short
              Child("p", "word " * 40, "deepen", 2),                       # too long
              Child("p", f"Rewrite {ECHO_MARKERS[0]} this", "deepen", 3),  # echo
              Child("q", "I'm sorry, but I can't help with that.", "mix", 0),  # refusal
              Child("q", "  COUNT to   three. ", "mix", 1),                # duplicate of parent
              Child("q", "Name a prime.", "mix", 2),                       # in the buffer
              Child("q", "Count to four, slowly.", "mix", 3),              # kept
              Child("p", "count to four,  slowly.", "mix", 4)]             # duplicate child
  kept, counts = filter_children(children, parent_texts=parents, seen={"name a prime."},
                                 count_tokens=lambda t: len(t.split()), max_tokens=20)
  assert [c.text for c in kept] == ["Count to four, slowly."]
  assert counts == {"filter/empty": 1, "filter/too_short": 1, "filter/too_long": 1,
                    "filter/echo": 1, "filter/refusal": 1, "filter/duplicate": 3}
  _, counts = filter_children(children, parent_texts=parents, filters=("empty",))
  assert counts == {"filter/empty": 1}
  with pytest.raises(ValueError, match="Unknown filter 'short'; known: duplicate, echo, empty"):
    filter_children(children, parent_texts=parents, filters=("short",))


def test_chat_completions_evolver_parses_replies_and_counts_failures():
  import re  # pylint: disable=import-outside-toplevel
  from eva_jax.creator import ChatCompletionsEvolver  # pylint: disable=import-outside-toplevel
  from eva_jax.testing.http_server import Reply, Server  # pylint: disable=import-outside-toplevel

  def reply(n, body):
    meta = body["messages"][0]["content"]
    text = re.search(r"<prompt>\n(.*?)\n</prompt>", meta, re.S).group(1)
    if text == "Say hi.":
      return Reply(status=500, body={"error": "down"})
    return Reply(body={"choices": [{"message": {"role": "assistant", "content":
                                                f"Sure! Here is the new prompt:\n\n\"{text} "
                                                f"Twice.\"\n\nThis version repeats it."}}]})

  server = Server(reply, path="/v1/chat/completions")
  try:
    ev = ChatCompletionsEvolver(server.url[:-len("/chat/completions")], "m", num_children=2,
                                max_retries=1, backoff_s=0.01, max_concurrency=2)
    out = ev.evolve(PARENTS, seed=0)
  finally:
    server.close()
  assert out.requests == 6 and out.failed == 2 and "500" in out.failure_examples[0]
  texts = {c.parent_id: [] for c in out.children}
  for c in out.children:
    texts[c.parent_id].append(c.text)
  # Chained: the second child rewrites the first (quotes, preamble and chatter stripped).
  assert texts["r0-00000"] == ["Name a prime. Twice.", "Name a prime. Twice. Twice."]
  assert "r0-00001" not in texts
  assert server.count == 4 + 2 * 2  # 4 healthy requests, 2 failing ones tried twice

"""The meta-prompts an LM evolver is asked to follow: one per EvolInstruct-style operator.

Written for this project (in the spirit of EvolInstruct, Xu et al. 2023, whose operators the
eva paper uses). In-depth operators make a prompt harder without changing what it is about;
in-breadth operators make a new prompt beside it. Every meta-prompt shows the prompt between
markers and asks for the new prompt alone, so that the reply needs little parsing
(`eva_jax.creator.evolvers.parse_reply` strips what a model adds anyway).

`{prompt}` is the prompt to rewrite; `{other}` (the `mix` operator) a second prompt.
"""

from __future__ import annotations

import re

IN_DEPTH = ("add_constraints", "deepen", "concretize", "increase_reasoning",
            "complicate_input")
IN_BREADTH = ("same_domain", "persona", "shift_topic", "mix", "abstract")
OPERATORS = IN_DEPTH + IN_BREADTH

_HEADER = ("You rewrite prompts for training an AI assistant. Read the prompt between "
           "<prompt> and </prompt>, then write one new prompt as instructed.\n\n")

_FOOTER = ("\n\nThe new prompt must make sense on its own to a reader who has not seen the "
           "original, must be answerable by a capable assistant, and must be no more than "
           "about 60 words longer than the original. Reply with the new prompt only: no title, "
           "no quotes, no explanation.")

_BODIES = {
    "add_constraints": (
        "Instruction: keep the request as it is, but add one or two concrete requirements "
        "the answer must meet (a format, a length, something to include or to avoid)."),
    "deepen": (
        "Instruction: ask about the same subject in more depth, so that a good answer needs "
        "expert knowledge or a more thorough treatment than the original asks for."),
    "concretize": (
        "Instruction: replace general ideas in the request with specific ones (a named "
        "situation, concrete numbers, a particular case), keeping the same kind of task."),
    "increase_reasoning": (
        "Instruction: change the request so that answering it takes several explicit steps "
        "of reasoning, and ask for the steps to be shown."),
    "complicate_input": (
        "Instruction: keep the task, but give it a harder input to work on: longer data, a "
        "piece of code, a table, or a case with an exception to handle."),
    "same_domain": (
        "Instruction: write a different request from the same domain as this one, about as "
        "hard, that someone might really ask; it must not be a paraphrase of the original."),
    "persona": (
        "Instruction: write a request on the same theme as asked by a specific person (say "
        "who they are and what they need it for), so that the answer must suit them."),
    "shift_topic": (
        "Instruction: write a request that needs the same skill as this one, but applied to "
        "a clearly different topic."),
    "mix": (
        "Instruction: here is a second prompt between <other> and </other>:\n<other>\n{other}\n"
        "</other>\nWrite one request that combines the tasks or topics of both prompts into "
        "a single coherent question."),
    "abstract": (
        "Instruction: write a request about the general principle behind this one: what "
        "makes such problems hard, or how to solve any problem of this kind."),
}

META_PROMPTS = {op: _HEADER + "<prompt>\n{prompt}\n</prompt>\n\n" + body + _FOOTER
                for op, body in _BODIES.items()}

# Phrases that appear in the meta-prompts and not in ordinary requests: a child containing one
# of them is an echo of the meta-prompt, not a new prompt (the `echo` filter).
ECHO_MARKERS = ("<prompt>", "</prompt>", "<other>", "you rewrite prompts for training",
                "reply with the new prompt only", "must make sense on its own to a reader")


def meta_prompt(operator: str, prompt: str, other: str = "") -> str:
  """The meta-prompt of `operator` filled with `prompt` (and `other` for `mix`)."""
  if operator not in META_PROMPTS:
    raise ValueError(f"Unknown evolution operator {operator!r}; known: "
                     f"{', '.join(OPERATORS)}.")
  # One pass, so that braces inside the prompts are never read as placeholders.
  values = {"prompt": prompt, "other": other}
  return re.sub(r"\{(prompt|other)\}", lambda m: values[m.group(1)], META_PROMPTS[operator])

"""The LM evolver on the tiny model: meta-prompts through our sampler, children with lineage."""

import jax
import jax.numpy as jnp
import pytest

from eva_jax import models, parallel
from eva_jax.creator import LMEvolver, Parent, PromptBuffer, filter_children

QUESTIONS = ["Name a prime.", "Say hi.", "Count to 3."]


@pytest.fixture(scope="module")
def tiny_policy():
  model = models.Transformer(models.get_config("tiny", attention_types=("local", "global")))
  mesh = parallel.create_mesh()
  params = parallel.init_params(model, jax.random.key(0), mesh, None, jnp.ones((1, 8), jnp.int32))
  return model, params, mesh


def test_lm_evolver_children_have_lineage_and_are_reproducible(tiny_policy):
  model, params, mesh = tiny_policy
  tok = models.get_tokenizer("byte")
  buf = PromptBuffer.from_texts(QUESTIONS)
  parents = [Parent(r.id, r.text) for r in buf.active_records()]
  ev = LMEvolver(num_children=2, max_new_tokens=12, max_prompt_tokens=1024)
  with pytest.raises(RuntimeError, match="has no model yet"):
    ev.evolve(parents, seed=0)
  ev.use_solver(model, params, tok, mesh)

  seen_prompts = []
  sample = ev.sampler.sample
  ev.sampler.sample = lambda p, prompts, **kw: seen_prompts.extend(prompts) or sample(
      p, prompts, **kw)
  out = ev.evolve(parents, seed=3)
  assert out.requests == 6 and out.failed == 0 and len(out.children) == 6
  # The first chain step rewrote the parents themselves, through the chat template.
  first = tok.decode(seen_prompts[0])
  assert first.startswith("<start_of_turn>user\nYou rewrite prompts") and (
      "<prompt>\nName a prime.\n</prompt>" in first)
  assert first.endswith("<start_of_turn>model\n")
  assert [c.parent_id for c in out.children] == [p.id for p in parents for _ in range(2)]
  assert all(c.step in (0, 1) and c.operator in ev.operators for c in out.children)

  # Kept children go into the buffer with their lineage.
  kept, counts = filter_children(out.children, parent_texts={p.id: p.text for p in parents},
                                 seen=buf.normalized_texts(), min_chars=1)
  assert sum(counts.values()) + len(kept) == 6
  for c in kept:
    rec = buf.add(c.text, round_born=1, parent_id=c.parent_id, operator=c.operator)
    assert [r.id for r in buf.ancestry(rec.id)][0] == c.parent_id

  again = LMEvolver(num_children=2, max_new_tokens=12, max_prompt_tokens=1024)
  again.use_solver(model, params, tok, mesh)
  assert [c.raw for c in again.evolve(parents, seed=3).children] == [c.raw for c in out.children]


def test_lm_evolver_from_a_checkpoint(tiny_policy, tmp_path):
  model, params, mesh = tiny_policy
  models.save_hf(tmp_path / "evolver", model, parallel.global_to_host(params))
  ev = LMEvolver(str(tmp_path / "evolver"), tokenizer="byte", num_children=1, max_new_tokens=4,
                 max_prompt_tokens=1024)
  out = ev.evolve([Parent("a", "Say hi.")], seed=0)
  assert len(out.children) == 1 and out.children[0].parent_id == "a"
  with pytest.raises(ValueError, match="apply to a checkpoint source"):
    LMEvolver(tokenizer="byte")

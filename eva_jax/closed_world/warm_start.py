"""The closed world's starting solver: a small Gemma 2-shaped byte-level model given a short
supervised warm start on the easy levels, so that round 0 has partial competence.

    python -m eva_jax.closed_world.warm_start --out eva_jax/data/builtin/closed_world_solver

writes an HF-format checkpoint (config.json + model.safetensors, loaded by `from_pretrained`)
and `warm_start.json` (the settings, and the greedy answers' closeness to the right answers per
level on fresh tasks: `tasks.score` with exact_weight 0). The one shipped in the package was
made by this command with its defaults (15 minutes on 2 CPU cores); `eva_tiny.gin` starts
from it.

Training: cross-entropy on the answer (and the `<end_of_turn>` that ends it) of random tasks of
every family, fresh tasks every step, AdamW with a cosine schedule. Difficulty d is drawn with
probability proportional to `decay ** d` up to `--max_difficulty`: easy tasks are learned well
and hard ones only seen now and then, so the solver's competence fades gradually with
difficulty instead of falling off a cliff at the longest input it was shown (a cliff past which
no sample is ever right would leave self-play nothing to learn from).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eva_jax import models, parallel
from eva_jax.closed_world import tasks as T
from eva_jax.models.config import GemmaConfig
from eva_jax.models.tokenizer import ByteTokenizer, encode_chat, encode_response
from eva_jax.solver.logprobs import sequence_logps


def solver_config() -> GemmaConfig:
  """The closed world's solver: Gemma 2-shaped (alternating sliding-window and global layers,
  soft-caps, pre and post norms), byte-level vocabulary, 0.84M parameters."""
  return GemmaConfig(vocab_size=384, embed_dim=128, hidden_dim=384, num_heads=4, num_kv_heads=2,
                     head_dim=32, attention_types=("local", "global") * 2, sliding_window=64,
                     attn_logit_softcap=50.0, final_logit_softcap=30.0,
                     query_pre_attn_scalar=32, use_post_attn_norm=True, use_post_ffw_norm=True)


def encode_example(tok, task: T.Task, length: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, loss mask) of prompt + answer + <end_of_turn>, right-padded to `length`."""
  prompt = encode_chat(tok, task.prompt())
  answer = encode_response(tok, task.answer())
  ids = (prompt + answer)[:length]
  tokens = np.zeros((length,), np.int32)
  mask = np.zeros((length,), np.int32)
  tokens[:len(ids)] = ids
  mask[len(prompt):len(ids)] = 1
  return tokens, mask


def difficulty_weights(max_difficulty: int, decay: float) -> np.ndarray:
  """P(difficulty d) for d = 1..max_difficulty, proportional to decay ** d."""
  w = decay ** np.arange(1, max_difficulty + 1, dtype=np.float64)
  return w / w.sum()


def batch(tok, rng, size: int, length: int, max_difficulty: int, decay: float = 1.0):
  p = difficulty_weights(max_difficulty, decay)
  rows = [encode_example(tok, T.make_task(str(rng.choice(T.FAMILIES)),
                                          int(rng.choice(np.arange(1, max_difficulty + 1),
                                                         p=p)), rng),
                         length) for _ in range(size)]
  return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def greedy_scores(model, params, tok, prompts: list[T.Task], mesh, max_new_tokens: int = 32):
  """Greedy answers' closeness to the right answers (with our sampler on `mesh`)."""
  from eva_jax.sampler import Sampler  # pylint: disable=import-outside-toplevel
  sampler = Sampler(model, mesh, max_prompt_length=128, truncation="left")
  out = sampler.sample(params, [encode_chat(tok, t.prompt()) for t in prompts],
                       max_new_tokens=max_new_tokens, temperature=0.0,
                       stop_tokens=[tok.eos_id, tok.end_of_turn_id])
  texts = [tok.decode([i for i in s[0].tokens if i not in (tok.eos_id, tok.end_of_turn_id)])
           for s in out]
  return np.array([T.score(t, x) for t, x in zip(prompts, texts)])


def train(out: str, *, steps: int = 1500, batch_size: int = 64, length: int = 96,
          max_difficulty: int = 13, decay: float = 0.75, learning_rate: float = 2e-3,
          seed: int = 0, probe: int = 48) -> dict:
  """Trains the solver and writes it to `out`; returns what warm_start.json records.
  `probe`: fresh tasks per level whose greedy answers are scored at the end."""
  tok = ByteTokenizer()
  cfg = solver_config()
  model = models.Transformer(cfg)
  mesh = parallel.create_mesh({"data": 1}, devices=jax.devices()[:1])
  params = parallel.init_params(model, jax.random.key(seed), mesh, None,
                                jnp.ones((1, 8), jnp.int32))
  # Gemma's embedding init (std 1) makes the tied output logits spread over ~sqrt(D): the
  # first steps only undo it. std D^-0.5 gives unit-scale inputs (after the sqrt(D) scaling)
  # and unit-scale logits.
  table = params["embedder"]["input_embedding"]
  params["embedder"]["input_embedding"] = table * jnp.asarray(cfg.embed_dim ** -0.5, table.dtype)
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, steps // 20, steps,
                                                learning_rate * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, tokens, mask):
    def loss_fn(p):
      total, count = sequence_logps(model, p, tokens, mask, chunk_size=length)
      return -jnp.sum(total) / jnp.sum(count)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  start, losses = time.perf_counter(), []
  for s in range(steps):
    tokens, mask = batch(tok, rng, batch_size, length, max_difficulty, decay)
    params, opt_state, loss = step(params, opt_state, tokens, mask)
    losses.append(float(loss))
    if (s + 1) % 250 == 0:
      print(f"step {s + 1}/{steps}: loss {np.mean(losses[-250:]):.4f} "
            f"({time.perf_counter() - start:.0f} s)", flush=True)
  seconds = time.perf_counter() - start

  by_level = {}
  for level in range(1, T.NUM_LEVELS + 1):
    tasks = [t for t in T.make_prompts(400, range(1, 16), seed=1000 + level)
             if t.level == level]
    by_level[level] = float(greedy_scores(model, params, tok, tasks[:probe], mesh).mean())
    print(f"level {level}: greedy reward {by_level[level]:.3f}", flush=True)
  models.save_hf(out, model, parallel.global_to_host(params))
  info = {"steps": steps, "batch_size": batch_size, "length": length,
          "max_difficulty": max_difficulty, "decay": decay, "learning_rate": learning_rate,
          "seed": seed,
          "final_loss": float(np.mean(losses[-100:])), "train_seconds": round(seconds, 1),
          "greedy_reward_by_level": by_level, "params": cfg.num_params()}
  with open(os.path.join(out, "warm_start.json"), "w", encoding="utf-8") as f:
    json.dump(info, f, indent=1)
  return info


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="folder to write the checkpoint to")
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--max_difficulty", type=int, default=13)
  parser.add_argument("--decay", type=float, default=0.75,
                      help="P(difficulty d) is proportional to decay ** d: hard tasks are rare")
  parser.add_argument("--learning_rate", type=float, default=2e-3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  print(json.dumps(train(args.out, steps=args.steps, batch_size=args.batch_size,
                         max_difficulty=args.max_difficulty, decay=args.decay,
                         learning_rate=args.learning_rate, seed=args.seed)))


if __name__ == "__main__":
  main()

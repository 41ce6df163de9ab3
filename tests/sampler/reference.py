"""What the sampler must agree with: the model's full forward without a cache (float64 here).

Loaded by path from the sampler tests (`load_sibling`), so no package layout is needed.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np


def load_sibling(name: str):
  """Imports tests/sampler/<name>.py by path."""
  spec = importlib.util.spec_from_file_location(
      f"sampler_tests_{name}", os.path.join(os.path.dirname(__file__), f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def right_padded(seqs, length):
  ids = np.zeros((len(seqs), length), np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for r, s in enumerate(seqs):
    ids[r, :len(s)] = s
    mask[r, :len(s)] = True
  return ids, mask


_FORWARDS = {}


def full_logits(model, params, seqs, length):
  """Logits [B, length, V] (float64) of the full forward, each sequence unpadded at the start
  of its row (right padding), so no left padding is involved."""
  if model.config not in _FORWARDS:
    _FORWARDS[model.config] = jax.jit(
        lambda p, ids, mask: model.apply({"params": p}, ids, attention_mask=mask))
  ids, mask = right_padded(seqs, length)
  return np.asarray(_FORWARDS[model.config](params, ids, mask), np.float64)


def greedy_reference(model, params, prompts, max_new):
  """Step-by-step argmax of the full forward (no cache)."""
  seqs = [list(p) for p in prompts]
  length = max(len(p) for p in prompts) + max_new
  for _ in range(max_new):
    logits = full_logits(model, params, seqs, length)
    for r, s in enumerate(seqs):
      s.append(int(np.argmax(logits[r, len(s) - 1])))
  return [s[len(p):] for s, p in zip(seqs, prompts)]


def teacher_forced(model, params, prompt, continuations, length):
  """(log-probs, logits) of each continuation given the prompt: lists of [T] and [T, V]."""
  logits = full_logits(model, params, [list(prompt) + list(c) for c in continuations], length)
  out_lp, out_logits = [], []
  for r, c in enumerate(continuations):
    rows = logits[r, len(prompt) - 1:len(prompt) - 1 + len(c)]
    lsm = rows - np.logaddexp.reduce(rows, axis=-1, keepdims=True)
    out_lp.append(lsm[np.arange(len(c)), c])
    out_logits.append(rows)
  return out_lp, out_logits


def in_nucleus(logits, token, temperature, top_k, top_p, slack=1e-4):
  """Whether `token` may be drawn under the filters (float64; `slack` widens top_p so a token
  sitting exactly on the float32 boundary is not a false alarm)."""
  z = logits / temperature
  keep = np.ones_like(z, bool)
  if top_k is not None:
    keep = z >= np.sort(z)[-top_k]
  z = np.where(keep, z, -np.inf)
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-z)
  mass_before = np.cumsum(p[order]) - p[order]
  last = np.sum(mass_before < min(1.0, top_p + slack)) - 1
  return bool(keep[token] and z[token] >= z[order[last]])

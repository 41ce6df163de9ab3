"""Model set-up shared by the sampler tests, and the function the 2-process test runs.

Imported by path from the test files and as `tests.sampler.mp_targets` in child processes.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from eva_jax import parallel
from eva_jax.models import Transformer, get_config
from eva_jax.sampler import Sampler

# Random Gemma weights give logits with a spread of ~sqrt(D) (one token takes all the mass),
# and with a tied embedding the residual stream mostly unembeds to the current token, so greedy
# decoding repeats one token. Shrinking the embedding broadens next-token distributions;
# stronger blocks and a random final-norm scale make continuations depend on the context.
EMBED_SCALE = 0.15
BLOCK_GAIN = 3.0


def _vary(path, x):
  name = jax.tree_util.keystr(path)
  if "input_embedding" in name:
    return x * jnp.asarray(EMBED_SCALE, x.dtype)
  if "'linear'" in name or "attn_vec_einsum" in name:
    return x * jnp.asarray(BLOCK_GAIN, x.dtype)
  if "post_" in name:  # zero-centred scales: 1 + scale = BLOCK_GAIN
    return x + jnp.asarray(BLOCK_GAIN - 1, x.dtype)
  if "final_norm" in name:
    return (2 * jax.random.normal(jax.random.key(1), x.shape)).astype(x.dtype)
  return x


def build(config_name: str = "tiny", mesh_shape: Optional[dict] = None, num_devices: int = 0,
          **overrides):
  """(model, mesh, params) for a tiny config on `num_devices` devices (0: all)."""
  cfg = get_config(config_name, **overrides)
  model = Transformer(cfg)
  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  mesh = parallel.create_mesh(mesh_shape, devices=devices)
  params = parallel.init_params(model, jax.random.key(0), mesh, None,
                                jnp.ones((1, 8), jnp.int32))
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, params)
  params = jax.jit(lambda p: jax.tree_util.tree_map_with_path(_vary, p),
                   out_shardings=shardings)(params)
  return model, mesh, params


def prompts_for(lengths, vocab_size: int = 384, seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [[2] + [int(t) for t in rng.integers(3, vocab_size, n - 1)] for n in lengths]


def as_data(samples) -> list:
  """Samples -> picklable nested lists of (tokens, logprobs, finish_reason)."""
  return [[(s.tokens, np.asarray(s.logprobs), s.finish_reason) for s in per] for per in samples]


def sample_in_process(config_name: str, lengths, calls, mesh_shape=None, sampler_kwargs=None,
                      num_devices: int = 0) -> dict:
  """Builds the model on `num_devices` devices (0: every device of every process) and runs
  `calls` (kwargs of `Sampler.sample`); returns what each call gave, on every process."""
  model, mesh, params = build(config_name, mesh_shape, num_devices)
  sampler = Sampler(model, mesh, **(sampler_kwargs or {}))
  prompts = prompts_for(lengths)
  return {"process_count": jax.process_count(), "devices": mesh.devices.size,
          "results": [as_data(sampler.sample(params, prompts, **kw)) for kw in calls]}

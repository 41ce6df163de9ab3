"""Evolvers that are language models following the meta-prompts (`meta_prompts.py`).

* `LMEvolver`: a Gemma model of this project run through our own sampler, either the solver
  itself with its current params (`source="solver"`: the loop hands it the policy each round
  with `use_solver`) or another checkpoint (`source="/path"`: HF or official Gemma, local or
  gs://, loaded with `from_pretrained` onto the mesh). Each meta-prompt is sent as one user turn
  through the chat template; generation stops at `<end_of_turn>` or EOS.
* `ChatCompletionsEvolver`: an OpenAI-compatible `/chat/completions` endpoint (OpenAI, Gemini's
  OpenAI-compatible API, vLLM, ...), asked on process 0 with concurrency, timeouts and retries
  (`eva_jax.http_client`); the API key is read from the environment variable gin names.

Both parse replies with `parse_reply`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import gin

from eva_jax.creator.evolvers import EVOLVERS, Evolver, RewriteRequest, parse_reply
from eva_jax.creator.meta_prompts import meta_prompt


@EVOLVERS.register("lm")
@gin.configurable
class LMEvolver(Evolver):
  """Rewrites prompts with a Gemma model on the mesh (see the module docstring).

  Args:
    source: "solver" (the policy, handed over by `use_solver`) or a checkpoint path.
    config: the model config for an official Gemma checkpoint (see `from_pretrained`).
    tokenizer: tokenizer spec for a checkpoint `source` (default: its tokenizer.model).
    temperature / top_p / max_new_tokens: sampling (the authors used temperature 0.88 with
      GPT-4 through distilabel).
    max_prompt_tokens: longest meta-prompt; longer ones keep their end ("left" truncation).
    num_children / mode / operators: see `Evolver`.
    mesh: where a checkpoint `source` is loaded (default: all devices on `data`).
  """

  name = "LM evolver"

  def __init__(self, source: str = "solver", *, config: Any = None, tokenizer: Any = None,
               temperature: float = 0.88, top_p: float = 0.95, max_new_tokens: int = 512,
               max_prompt_tokens: int = 2048, num_children: int = 4, mode: str = "chain",
               operators: Optional[Sequence[str]] = None, mesh: Any = None):
    super().__init__(num_children=num_children, mode=mode, operators=operators)
    self.source = source
    self.temperature, self.top_p = float(temperature), float(top_p)
    self.max_new_tokens, self.max_prompt_tokens = int(max_new_tokens), int(max_prompt_tokens)
    self.model = self.params = self.tokenizer = self.sampler = None
    if source != "solver":
      from eva_jax import models  # pylint: disable=g-import-not-at-top
      model, params = models.from_pretrained(source, config=config, mesh=mesh)
      tok = models.get_tokenizer(tokenizer if tokenizer is not None else source)
      self._bind(model, params, tok, mesh)
    elif config is not None or tokenizer is not None:
      raise ValueError("LMEvolver: config and tokenizer apply to a checkpoint source; with "
                       "source='solver' the solver's own are used.")

  def _bind(self, model, params, tokenizer, mesh):
    from eva_jax.sampler import Sampler  # pylint: disable=g-import-not-at-top
    # Its own sampler (meta-prompts are longer than the solver's prompts), kept while the
    # model is the same so that its programs compile once per run.
    if self.sampler is None or self.sampler.model is not model:
      self.sampler = Sampler(model, mesh, max_prompt_length=self.max_prompt_tokens,
                             truncation="left")
    self.model, self.params, self.tokenizer = model, params, tokenizer

  def use_solver(self, model, params, tokenizer, mesh) -> None:
    """Hands over the policy (the loop calls this each round when `source == "solver"`)."""
    if self.source == "solver":
      self._bind(model, params, tokenizer, mesh)

  def rewrite(self, requests: Sequence[RewriteRequest]):
    if self.sampler is None:
      raise RuntimeError("LMEvolver(source='solver') has no model yet; the loop hands it the "
                         "policy with use_solver(...) before evolving.")
    from eva_jax.models import encode_chat  # pylint: disable=g-import-not-at-top
    from eva_jax.models.tokenizer import cut_at_stop  # pylint: disable=g-import-not-at-top
    tok = self.tokenizer
    prompts = [encode_chat(tok, meta_prompt(r.operator, r.text, r.other)) for r in requests]
    stops = [tok.eos_id] + ([tok.end_of_turn_id] if tok.end_of_turn_id is not None else [])
    # One seed per call (the sampler folds in each prompt's index), taken from the first
    # request: the requests' seeds all come from the evolve call's seed.
    seed = int(requests[0].seed) % (2 ** 31) if requests else 0
    samples = self.sampler.sample(self.params, prompts, num_samples=1,
                                  max_new_tokens=self.max_new_tokens,
                                  temperature=self.temperature, top_p=self.top_p, seed=seed,
                                  stop_tokens=stops)
    replies = []
    for per_prompt in samples:
      s = per_prompt[0]
      replies.append((tok.decode(cut_at_stop(s.tokens, stops)), None))
    return replies

  def parse(self, reply: str) -> str:
    return parse_reply(reply)


@EVOLVERS.register("chat_completions")
@gin.configurable
class ChatCompletionsEvolver(Evolver):
  """Rewrites prompts with an OpenAI-compatible chat-completions endpoint.

  Args:
    base_url: e.g. "https://api.openai.com/v1", "http://localhost:8000/v1" (vLLM) or
      "https://generativelanguage.googleapis.com/v1beta/openai" (Gemini).
    model: the endpoint's model name.
    api_key_env: name of the environment variable holding the API key (None: no key).
    temperature / top_p / max_tokens: sampling (the authors: temperature 0.88, 666 tokens).
    timeout_s / max_retries / backoff_s / backoff_max_s / max_concurrency: see
      `eva_jax.http_client.ChatCompletionsClient`.
    num_children / mode / operators: see `Evolver`.
  """

  name = "chat-completions evolver"
  process0_only = True

  def __init__(self, base_url: str = gin.REQUIRED, model: str = gin.REQUIRED, *,
               api_key_env: Optional[str] = None, temperature: float = 0.88,
               top_p: Optional[float] = None, max_tokens: int = 666, timeout_s: float = 60.0,
               max_retries: int = 3, backoff_s: float = 1.0, backoff_max_s: float = 30.0,
               max_concurrency: int = 8, num_children: int = 4, mode: str = "chain",
               operators: Optional[Sequence[str]] = None):
    super().__init__(num_children=num_children, mode=mode, operators=operators)
    from eva_jax.http_client import ChatCompletionsClient  # pylint: disable=g-import-not-at-top
    self.client = ChatCompletionsClient(base_url, model, api_key_env=api_key_env,
                                        timeout_s=timeout_s, max_retries=max_retries,
                                        backoff_s=backoff_s, backoff_max_s=backoff_max_s,
                                        max_concurrency=max_concurrency)
    self.temperature, self.top_p, self.max_tokens = temperature, top_p, int(max_tokens)
    self.name = f"chat-completions evolver ({model} at {base_url})"

  def rewrite(self, requests: Sequence[RewriteRequest]):
    conversations = [[{"role": "user", "content": meta_prompt(r.operator, r.text, r.other)}]
                     for r in requests]
    return self.client.complete(conversations, temperature=self.temperature,
                                max_tokens=self.max_tokens, top_p=self.top_p)

  def parse(self, reply: str) -> str:
    return parse_reply(reply)

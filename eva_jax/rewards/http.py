"""A reward computed by a server: batches of (conversation, response) POSTed as JSON.

    make_reward.kind = "http"
    HTTPReward.url = "http://10.0.0.5:8000/score"
    HTTPReward.batch_size = 32
    HTTPReward.api_key_env = "REWARD_API_KEY"     # optional: "Authorization: Bearer <key>"

Use it for a reward model too large for the training mesh, a judge behind an API, or a
verifier (code execution, a math checker) that runs elsewhere. Only process 0 calls the
server; the scores are broadcast to the other processes (`Reward.process0_only`).

Wire format (write a server against this). Each batch is one request:

    POST <url>
    Content-Type: application/json

    {"items": [
      {"prompt": "last user message",
       "conversation": [{"role": "user", "content": "..."},
                        {"role": "assistant", "content": "..."},
                        {"role": "user", "content": "last user message"}],
       "response": "the policy's answer to score"},
      ...]}

`conversation` is the whole chat up to the response, roles alternating "user" / "assistant"
and starting with "user" (a system message is folded into the first user message, as Gemma's
chat template does); `prompt` is its last user message. The reply must be

    200 OK
    {"scores": [1.5, -0.25, null, ...]}

with exactly one entry per item, in order: a number, or null for an item the server could not
score (only that item fails, with a reason naming the prompt). Extra fields are ignored.

Failures (see `eva_jax.http_client`): a connection error, a timeout, HTTP 5xx / 408 / 429, a
body that is not JSON, or a reply without a `scores` list of the right length is retried with
exponential back-off; after `max_retries` retries every item of the batch fails with the
reason (e.g. "gave up after 4 attempts: timed out after 60 s"). Another 4xx fails the batch at
once. What happens to failed items is the caller's choice (`Reward.score`'s `on_failure`):
an error naming the prompt, or NaN scores counted and skipped.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Optional

import gin
import numpy as np

from eva_jax import http_client
from eva_jax.models.tokenizer import MODEL, chat_turns
from eva_jax.rewards.base import REWARDS, Reward, prompt_text

# Roles on the wire: the OpenAI names, which reward servers built on HF chat templates expect.
_WIRE_ROLES = {"user": "user", MODEL: "assistant"}


def wire_conversation(conversation) -> list[dict[str, str]]:
  """The conversation as it is sent: [{"role": "user" | "assistant", "content": text}]."""
  return [{"role": _WIRE_ROLES[role], "content": text} for role, text in chat_turns(conversation)]


def _check_scores(reply: Any, n: int) -> None:
  """Raises ValueError unless `reply` is {"scores": [n numbers or nulls]}."""
  scores = reply.get("scores") if isinstance(reply, dict) else None
  if not isinstance(scores, list):
    keys = sorted(reply)[:10] if isinstance(reply, dict) else type(reply).__name__
    raise ValueError(f'expected {{"scores": [...]}}, got {keys}')
  if len(scores) != n:
    raise ValueError(f"{len(scores)} scores for {n} items; the server must return exactly one "
                     "score (or null) per item, in order")
  for i, s in enumerate(scores):
    if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))):
      raise ValueError(f"score {i} is {s!r}, not a number or null")


@REWARDS.register("http")
@gin.configurable
class HTTPReward(Reward):
  """Scores by POSTing batches to `url` (wire format in the module docstring).

  Args:
    url: the scoring endpoint, http:// or https://.
    batch_size: items per request.
    timeout_s: per request attempt; a server that answers later counts as timed out.
    max_retries: retries of a batch after its first attempt.
    backoff_s / backoff_max_s: exponential back-off between retries (`backoff_s * 2**k`, at
      most `backoff_max_s`).
    max_concurrency: batches in flight at once.
    headers: extra request headers.
    api_key_env: name of an environment variable whose value is sent as a Bearer token.

  Raises:
    ValueError: a bad URL or setting, or `api_key_env` naming an unset variable.
  """

  process0_only = True
  transient_failures = True

  def __init__(self, url: str = gin.REQUIRED, batch_size: int = 32, timeout_s: float = 60.0,
               max_retries: int = 3, backoff_s: float = 1.0, backoff_max_s: float = 30.0,
               max_concurrency: int = 4, headers: Optional[Mapping[str, str]] = None,
               api_key_env: Optional[str] = None):
    self.url = http_client.check_url(url, "HTTPReward.url")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
      raise ValueError(f"HTTPReward: batch_size={batch_size!r} must be an int >= 1.")
    http_client.check_settings(timeout_s, max_retries, backoff_s, backoff_max_s,
                               max_concurrency, "HTTPReward")
    self.batch_size = batch_size
    self.timeout_s = timeout_s
    self.max_retries = max_retries
    self.backoff_s = backoff_s
    self.backoff_max_s = backoff_max_s
    self.max_concurrency = max_concurrency
    self.headers = dict(headers or {})
    self.headers.update(http_client.bearer_headers(api_key_env, "HTTPReward"))
    self.name = f"http reward {url}"

  def _score(self, conversations, responses):
    n = len(responses)
    starts = list(range(0, n, self.batch_size))
    payloads = []
    for start in starts:
      items = []
      for i in range(start, min(start + self.batch_size, n)):
        try:
          items.append({"prompt": prompt_text(conversations[i]),
                        "conversation": wire_conversation(conversations[i]),
                        "response": responses[i]})
        except (TypeError, ValueError) as e:
          raise ValueError(f"{self.name}: conversation {i} cannot be sent: {e}") from e
      payloads.append({"items": items})
    results = http_client.post_json_many(
        self.url, payloads, headers=self.headers, timeout_s=self.timeout_s,
        max_retries=self.max_retries, backoff_s=self.backoff_s,
        backoff_max_s=self.backoff_max_s, max_concurrency=self.max_concurrency,
        validate=[functools.partial(_check_scores, n=len(p["items"])) for p in payloads])

    scores = np.full((n,), np.nan)
    reasons: dict[int, str] = {}
    for j, start in enumerate(starts):
      result = results[j]
      size = len(payloads[j]["items"])
      if not result.ok:
        for i in range(start, start + size):
          reasons[i] = f"batch of items {start}..{start + size - 1}: {result.error}"
        continue
      for k, s in enumerate(result.value["scores"]):
        if s is None:
          reasons[start + k] = "the server returned null for this item"
          continue
        try:
          value = float(s)
        except OverflowError:  # a JSON integer too large for a float
          value = math.inf
        if math.isfinite(value):
          scores[start + k] = value
        else:
          reasons[start + k] = f"the server returned the score {s}"
    return scores, reasons

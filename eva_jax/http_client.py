"""JSON over HTTP for the host-side stages that call servers: the HTTP reward and the
chat-completions evolver.

Both send many independent requests and must survive a server that is slow, briefly down or
broken without hanging the round or silently dropping items. `post_json_many` POSTs one JSON
body per item and returns one `HTTPResult` per item, in order, never raising for a failed
request:

* at most `max_concurrency` requests are in flight (a thread pool: the work is waiting on
  sockets, and a server such as vLLM batches concurrent requests itself);
* each attempt has a timeout: connecting and every read of the socket wait at most
  `timeout_s`, and a reply still arriving `timeout_s` after the request was sent is cut off;
* transient failures are retried with exponential back-off, `backoff_s * 2**k` seconds before
  retry k + 1, capped at `backoff_max_s` (a 429's `Retry-After` is honoured up to the cap).
  Transient: a connection error, a timeout, HTTP 5xx / 408 / 429, a body that is not JSON, and
  a reply the caller's `validate` rejects (an overloaded server sometimes answers garbage).
  Any other status (a 4xx: a wrong URL, a bad key, a request the server refuses) fails at once,
  with the status and the start of the body, because repeating it cannot help;
* so every item makes at most `1 + max_retries` requests, and a call at most
  `len(payloads) * (1 + max_retries)`.

Redirects are not followed (urllib would turn a redirected POST into a GET): point the URL at
the final address. Environment proxies (`http_proxy`, `no_proxy`) are honoured, except for
loopback hosts, which are always reached directly.

`ChatCompletionsClient` speaks the OpenAI chat-completions API on top (served by OpenAI, by
Gemini at https://generativelanguage.googleapis.com/v1beta/openai, by vLLM and others).

Only the standard library is used, so the core install needs no HTTP package.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import http.client
import ipaddress
import json
import math
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Mapping, Optional, Sequence, Union

# Statuses worth repeating: the server is overloaded, restarting or timed out on its side.
RETRY_STATUSES = frozenset({408, 429})
# How much of an error body goes into a failure reason.
_BODY_SNIPPET = 200
_READ_CHUNK = 1 << 16


@dataclasses.dataclass(frozen=True)
class HTTPResult:
  """The outcome of one item of `post_json_many`.

  Attributes:
    value: the parsed JSON reply (accepted by `validate`), or None when the item failed.
    error: why the item failed (e.g. "gave up after 4 attempts: HTTP 500 ..."), or None.
    attempts: the number of requests made for the item (1 + retries).
  """

  value: Any
  error: Optional[str]
  attempts: int

  @property
  def ok(self) -> bool:
    return self.error is None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
  """Turns a redirect into an HTTPError (urllib would resend a POST as a bodiless GET)."""

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    del req, fp, code, msg, headers, newurl
    return None


def check_url(url: str, what: str = "url") -> str:
  """Returns `url` if it is an absolute http(s) URL; raises ValueError naming `what` if not."""
  parsed = urllib.parse.urlsplit(url) if isinstance(url, str) else None
  if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
    raise ValueError(f"{what}={url!r} is not an http:// or https:// URL with a host; give the "
                     "full address, e.g. 'http://127.0.0.1:8000/score'.")
  try:
    parsed.port  # pylint: disable=pointless-statement
  except ValueError as e:
    raise ValueError(f"{what}={url!r} has a bad port ({e}); give a number, e.g. "
                     "'http://127.0.0.1:8000/score'.") from e
  return url


def bearer_headers(api_key_env: Optional[str], what: str) -> dict[str, str]:
  """{"Authorization": "Bearer <key>"} with the key read from the variable `api_key_env`.

  Args:
    api_key_env: the name of an environment variable, or None for no header.
    what: the component (for the error message).

  Raises:
    ValueError: the variable is named but unset or empty.
  """
  if api_key_env is None:
    return {}
  if not isinstance(api_key_env, str) or not api_key_env:
    raise ValueError(f"{what}: api_key_env={api_key_env!r} must be the name of an environment "
                     "variable (e.g. 'OPENAI_API_KEY'), or None to send no key.")
  key = os.environ.get(api_key_env, "").strip()
  if not key:
    raise ValueError(f"{what}: the environment variable {api_key_env} that should hold the API "
                     f"key is unset or empty; export {api_key_env}=<your key> before starting, "
                     "or set api_key_env = None for a server that needs no key.")
  return {"Authorization": f"Bearer {key}"}


def _is_loopback(host: Optional[str]) -> bool:
  if not host:
    return False
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def _opener(url: str) -> urllib.request.OpenerDirector:
  handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
  if _is_loopback(urllib.parse.urlsplit(url).hostname):
    handlers.append(urllib.request.ProxyHandler({}))
  return urllib.request.build_opener(*handlers)


def _snippet(data: bytes) -> str:
  text = " ".join(data[:_BODY_SNIPPET].decode("utf-8", "replace").split())
  return text + ("..." if len(data) > _BODY_SNIPPET else "")


def _is_timeout(e: BaseException) -> bool:
  if isinstance(e, (socket.timeout, TimeoutError)):
    return True
  return isinstance(e, urllib.error.URLError) and isinstance(e.reason,
                                                             (socket.timeout, TimeoutError))


def _retry_after(e: urllib.error.HTTPError) -> Optional[float]:
  value = e.headers.get("Retry-After") if e.headers is not None else None
  try:
    seconds = float(value) if value is not None else None
  except ValueError:
    return None  # an HTTP date: rare from APIs; the back-off applies
  return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def check_settings(timeout_s: float, max_retries: int, backoff_s: float, backoff_max_s: float,
                   max_concurrency: int, what: str) -> None:
  """Raises ValueError naming `what` for retry / timeout / concurrency settings that cannot
  work (shared by the clients built on `post_json_many`)."""
  if not isinstance(timeout_s, (int, float)) or not timeout_s > 0 or not math.isfinite(timeout_s):
    raise ValueError(f"{what}: timeout_s={timeout_s!r} must be a finite number of seconds > 0.")
  if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
    raise ValueError(f"{what}: max_retries={max_retries!r} must be an int >= 0 (0: no retry).")
  for name, value in (("backoff_s", backoff_s), ("backoff_max_s", backoff_max_s)):
    if not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value):
      raise ValueError(f"{what}: {name}={value!r} must be a finite number of seconds >= 0.")
  if (not isinstance(max_concurrency, int) or isinstance(max_concurrency, bool) or
      max_concurrency < 1):
    raise ValueError(f"{what}: max_concurrency={max_concurrency!r} must be an int >= 1 (the "
                     "number of requests in flight at once).")


def _post_one(opener: urllib.request.OpenerDirector, url: str, body: bytes,
              headers: Mapping[str, str], timeout_s: float, max_retries: int, backoff_s: float,
              backoff_max_s: float, validate: Optional[Callable[[Any], Any]]) -> HTTPResult:
  """One item: attempts until a valid reply, a non-retryable status, or the retries run out."""
  reason = ""
  wait_s = 0.0
  for attempt in range(1 + max_retries):
    if attempt:
      time.sleep(min(max(backoff_s * 2 ** (attempt - 1), wait_s), backoff_max_s))
    wait_s = 0.0
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    deadline = time.monotonic() + timeout_s
    try:
      with opener.open(request, timeout=timeout_s) as response:
        chunks = []
        while chunk := response.read(_READ_CHUNK):
          chunks.append(chunk)
          if time.monotonic() > deadline:
            raise TimeoutError("reply still arriving")
        data = b"".join(chunks)
    except urllib.error.HTTPError as e:
      try:
        detail = _snippet(e.read() or b"")
      except (OSError, http.client.HTTPException):
        detail = ""
      reason = f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")
      if e.code in RETRY_STATUSES or e.code >= 500:
        wait_s = (_retry_after(e) or 0.0) if e.code == 429 else 0.0
        continue
      if 300 <= e.code < 400:
        location = (e.headers or {}).get("Location")
        hint = f"a redirect to {location!r}; point the URL at the final address"
      else:
        hint = f"not retried: a {e.code} does not go away by repeating the request"
      return HTTPResult(None, f"{reason} ({hint})", attempt + 1)
    except Exception as e:  # pylint: disable=broad-except
      # Everything else a socket can throw is transient from here: refused, reset, timed out,
      # a half-written reply (http.client.HTTPException), a DNS hiccup (URLError).
      if _is_timeout(e):
        reason = f"timed out after {timeout_s:g} s"
      elif isinstance(e, urllib.error.URLError):
        reason = f"connection error: {e.reason}"
      else:
        reason = f"connection error: {type(e).__name__}: {e}"
      continue
    try:
      value = json.loads(data)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
      reason = f"the reply is not JSON ({e}): {_snippet(data)!r}"
      continue
    if validate is not None:
      try:
        validate(value)
      except ValueError as e:
        reason = f"malformed reply: {e}"
        continue
    return HTTPResult(value, None, attempt + 1)
  n = 1 + max_retries
  return HTTPResult(None, f"gave up after {n} attempt{'s' if n > 1 else ''}: {reason}", n)


def post_json_many(url: str, payloads: Sequence[Any], *,
                   headers: Optional[Mapping[str, str]] = None, timeout_s: float = 60.0,
                   max_retries: int = 3, backoff_s: float = 1.0, backoff_max_s: float = 30.0,
                   max_concurrency: int = 8,
                   validate: Union[None, Callable[[Any], Any], Sequence[Callable[[Any], Any]]]
                   = None) -> list[HTTPResult]:
  """POSTs every payload as JSON to `url`; see the module docstring for the policy.

  Args:
    url: an http:// or https:// URL.
    payloads: JSON-serialisable bodies, one request each.
    headers: extra request headers (e.g. Authorization); Content-Type is set.
    timeout_s: per attempt (connect, each socket read, and the whole reply).
    max_retries: extra attempts after the first for a transient failure.
    backoff_s / backoff_max_s: sleep `backoff_s * 2**k` before retry k + 1, at most the max.
    max_concurrency: requests in flight at once.
    validate: called with each parsed reply (or a sequence: one callable per payload); raises
      ValueError (with the reason) to reject the reply, which counts as a transient failure.
      Its return value is ignored.

  Returns:
    One HTTPResult per payload, in payload order.

  Raises:
    ValueError: a bad argument, or a payload that is not JSON-serialisable (named by index).
  """
  check_url(url)
  check_settings(timeout_s, max_retries, backoff_s, backoff_max_s, max_concurrency,
                 "post_json_many")
  bodies = []
  for i, payload in enumerate(payloads):
    try:
      bodies.append(json.dumps(payload, allow_nan=False).encode("utf-8"))
    except (TypeError, ValueError) as e:
      raise ValueError(f"post_json_many: payload {i} cannot be sent as JSON ({e}); pass "
                       "dicts, lists, str, finite numbers, bool and None only.") from e
  if not bodies:
    return []
  if validate is None or callable(validate):
    validators = [validate] * len(bodies)
  else:
    validators = list(validate)
    if len(validators) != len(bodies):
      raise ValueError(f"post_json_many: {len(validators)} validators for {len(bodies)} "
                       "payloads; pass one callable, or one per payload.")
  all_headers = {"Content-Type": "application/json", "Accept": "application/json",
                 "User-Agent": "eva_jax"}
  all_headers.update(headers or {})
  opener = _opener(url)

  def run(body: bytes, check: Optional[Callable[[Any], Any]]) -> HTTPResult:
    return _post_one(opener, url, body, all_headers, timeout_s, max_retries, backoff_s,
                     backoff_max_s, check)

  if max_concurrency == 1 or len(bodies) == 1:
    return [run(b, v) for b, v in zip(bodies, validators)]
  with concurrent.futures.ThreadPoolExecutor(
      max_workers=min(max_concurrency, len(bodies)), thread_name_prefix="eva_jax_http") as pool:
    return list(pool.map(run, bodies, validators))


Conversation = Union[str, Sequence[Mapping[str, Any]]]

# OpenAI's roles; Gemma's "model" (this project's chat format) is the API's "assistant".
_CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant",
               "model": "assistant"}


def _chat_messages(conversation: Conversation, index: int) -> list[dict[str, Any]]:
  if isinstance(conversation, str):
    return [{"role": "user", "content": conversation}]
  if isinstance(conversation, Mapping) or not isinstance(conversation, Sequence):
    raise ValueError(f"ChatCompletionsClient: conversation {index} is a "
                     f"{type(conversation).__name__}; pass a str or a list of "
                     "{'role', 'content'} messages.")
  if not conversation:
    raise ValueError(f"ChatCompletionsClient: conversation {index} is empty; give at least one "
                     "user message.")
  messages = []
  for n, m in enumerate(conversation):
    if not isinstance(m, Mapping) or m.get("role") not in _CHAT_ROLES or "content" not in m:
      raise ValueError(f"ChatCompletionsClient: conversation {index}, message {n} is {m!r}; "
                       "each message must be a dict with 'content' and a 'role' in "
                       f"{sorted(_CHAT_ROLES)}.")
    messages.append({"role": _CHAT_ROLES[m["role"]], "content": m["content"]})
  return messages


def _completion_text(reply: Any) -> str:
  """choices[0].message.content of a chat-completions reply; ValueError if there is none."""
  choices = reply.get("choices") if isinstance(reply, dict) else None
  if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
    error = reply.get("error") if isinstance(reply, dict) else None
    raise ValueError("no choices[0] in the reply" + (f" (error: {error})" if error else ""))
  message = choices[0].get("message")
  content = message.get("content") if isinstance(message, dict) else None
  if not isinstance(content, str):
    raise ValueError(f"choices[0].message.content is {type(content).__name__}, not text "
                     f"(finish_reason: {choices[0].get('finish_reason')!r})")
  return content


class ChatCompletionsClient:
  """Sends conversations to an OpenAI-compatible `POST {base_url}/chat/completions`.

      client = ChatCompletionsClient("http://127.0.0.1:8000/v1", "google/gemma-2-9b-it")
      [(text, error), ...] = client.complete(conversations, temperature=0.7, max_tokens=512)

  Args:
    base_url: the API root, ending before "/chat/completions" (e.g. "http://host:8000/v1",
      "https://generativelanguage.googleapis.com/v1beta/openai").
    model: the "model" field of each request.
    api_key_env: the name of the environment variable holding the key (sent as
      "Authorization: Bearer <key>"); None sends no key (a local vLLM).
    timeout_s / max_retries / backoff_s / backoff_max_s / max_concurrency: see
      `post_json_many`. A reply without `choices[0].message.content` text is retried.
    extra_body: more request fields, e.g. {"seed": 0} or a server's own options.

  Raises:
    ValueError: a bad URL or setting, or `api_key_env` naming an unset or empty variable.
  """

  def __init__(self, base_url: str, model: str, api_key_env: Optional[str] = None,
               timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 1.0,
               backoff_max_s: float = 30.0, max_concurrency: int = 8,
               extra_body: Optional[Mapping[str, Any]] = None):
    check_url(base_url, "ChatCompletionsClient.base_url")
    if not isinstance(model, str) or not model:
      raise ValueError(f"ChatCompletionsClient: model={model!r}; give the model name the server "
                       "serves (e.g. 'gemini-2.0-flash', or vLLM's --served-model-name).")
    check_settings(timeout_s, max_retries, backoff_s, backoff_max_s, max_concurrency,
                "ChatCompletionsClient")
    if extra_body is not None and not isinstance(extra_body, Mapping):
      raise ValueError(f"ChatCompletionsClient: extra_body={extra_body!r} must be a dict of "
                       "request fields.")
    self.url = base_url.rstrip("/") + "/chat/completions"
    self.model = model
    self.timeout_s = timeout_s
    self.max_retries = max_retries
    self.backoff_s = backoff_s
    self.backoff_max_s = backoff_max_s
    self.max_concurrency = max_concurrency
    self.extra_body = dict(extra_body or {})
    self._headers = bearer_headers(api_key_env, "ChatCompletionsClient")

  def complete(self, conversations: Sequence[Conversation], *, temperature: float,
               max_tokens: int, top_p: Optional[float] = None
               ) -> list[tuple[Optional[str], Optional[str]]]:
    """One completion per conversation.

    Args:
      conversations: each a str (one user message) or a list of {"role", "content"} messages
        (roles "system", "user", "assistant"; "model" is sent as "assistant").
      temperature / max_tokens / top_p: sampling settings sent with every request.

    Returns:
      (text, None) or (None, why it failed) per conversation, in order.

    Raises:
      ValueError: a malformed conversation (named by index).
    """
    base = {"model": self.model, **self.extra_body, "temperature": float(temperature),
            "max_tokens": int(max_tokens)}
    if top_p is not None:
      base["top_p"] = float(top_p)
    payloads = [{**base, "messages": _chat_messages(c, i)} for i, c in enumerate(conversations)]
    results = post_json_many(self.url, payloads, headers=self._headers,
                             timeout_s=self.timeout_s, max_retries=self.max_retries,
                             backoff_s=self.backoff_s, backoff_max_s=self.backoff_max_s,
                             max_concurrency=self.max_concurrency, validate=_completion_text)
    return [(_completion_text(r.value), None) if r.ok else (None, r.error) for r in results]

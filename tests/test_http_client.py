"""post_json_many and ChatCompletionsClient against servers started here on 127.0.0.1: healthy,
failing then recovering, always failing, hanging past the timeout, malformed, refusing; the
number of requests each case makes is asserted exactly."""

from __future__ import annotations

import socket
import time
import types

import pytest

from eva_jax import http_client
from eva_jax.http_client import ChatCompletionsClient, post_json_many
from eva_jax.testing.http_server import Reply, Server

FAST = dict(backoff_s=0.01, backoff_max_s=0.05)
HANG_S = 30.0  # how long a hanging handler would wait (it is released at teardown)


@pytest.fixture
def serve():
  servers = []

  def start(reply, path="/api"):
    servers.append(Server(reply, path))
    return servers[-1]

  yield start
  for s in servers:
    s.close()


def echo(n, body):
  del n
  return Reply(body={"echo": body["i"]})


def test_healthy_results_in_order_with_headers(serve):
  # Later payloads answer sooner, so the replies arrive out of order.
  server = serve(lambda n, body: Reply(body={"echo": body["i"]}, delay_s=0.01 * (9 - body["i"])))
  results = post_json_many(server.url, [{"i": i} for i in range(10)], headers={"X-Run": "r1"},
                           timeout_s=5, max_concurrency=4, **FAST)
  assert [r.value for r in results] == [{"echo": i} for i in range(10)]
  assert all(r.ok and r.error is None and r.attempts == 1 for r in results)
  assert server.count == 10
  assert sorted(r.body["i"] for r in server.requests) == list(range(10))
  headers = server.requests[0].headers
  assert headers["Content-Type"] == "application/json"
  assert headers["X-Run"] == "r1"


def test_no_payloads_no_request(serve):
  server = serve(echo)
  assert not post_json_many(server.url, [], timeout_s=1)
  assert server.count == 0


def test_500_then_recovers_within_retries(serve):
  server = serve(lambda n, body: Reply(500, {"error": "overloaded"}) if n < 3 else echo(n, body))
  results = post_json_many(server.url, [{"i": i} for i in range(4)], timeout_s=5, max_retries=3,
                           max_concurrency=2, **FAST)
  assert [r.value for r in results] == [{"echo": i} for i in range(4)]
  assert all(r.ok for r in results)
  # Every 500 costs exactly one more request.
  assert server.count == 4 + 3
  assert sum(r.attempts for r in results) == 7


def test_always_500_gives_up_with_the_status(serve):
  server = serve(lambda n, body: Reply(500, {"error": "model crashed"}))
  results = post_json_many(server.url, [{"i": i} for i in range(3)], timeout_s=5, max_retries=2,
                           max_concurrency=3, **FAST)
  for r in results:
    assert not r.ok and r.value is None and r.attempts == 3
    assert r.error.startswith("gave up after 3 attempts: HTTP 500")
    assert "model crashed" in r.error
  assert server.count == 3 * (1 + 2)


@pytest.mark.parametrize("status", [408, 429, 502, 503])
def test_transient_statuses_are_retried(serve, status):
  server = serve(lambda n, body: Reply(status, {}) if n == 0 else echo(n, body))
  (r,) = post_json_many(server.url, [{"i": 7}], timeout_s=5, max_retries=1, **FAST)
  assert r.ok and r.value == {"echo": 7} and r.attempts == 2
  assert server.count == 2


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_other_4xx_fail_at_once(serve, status):
  server = serve(lambda n, body: Reply(status, {"detail": "field 'i' is not allowed"}))
  results = post_json_many(server.url, [{"i": 0}, {"i": 1}], timeout_s=5, max_retries=3, **FAST)
  for r in results:
    assert not r.ok and r.attempts == 1
    assert r.error.startswith(f"HTTP {status}")
    assert "field 'i' is not allowed" in r.error and "not retried" in r.error
  assert server.count == 2


def test_redirect_is_not_followed(serve):
  server = serve(lambda n, body: Reply(302, {}, headers={"Location": "http://127.0.0.1:1/x"}))
  (r,) = post_json_many(server.url, [{"i": 0}], timeout_s=5, max_retries=3, **FAST)
  assert not r.ok and r.attempts == 1
  assert "HTTP 302" in r.error and "http://127.0.0.1:1/x" in r.error
  assert server.count == 1


def test_hang_past_timeout_is_cut_off_and_retried(serve):
  server = serve(lambda n, body: Reply(body={"late": True}, delay_s=HANG_S))
  start = time.monotonic()
  results = post_json_many(server.url, [{"i": 0}, {"i": 1}], timeout_s=0.3, max_retries=1,
                           max_concurrency=2, **FAST)
  elapsed = time.monotonic() - start
  for r in results:
    assert not r.ok and r.attempts == 2
    assert r.error == "gave up after 2 attempts: timed out after 0.3 s"
  assert server.count == 2 * 2
  # Not a speed test: without the timeout the call would wait HANG_S for the server.
  assert elapsed < HANG_S / 3


def test_malformed_json_is_retried_then_fails(serve):
  server = serve(lambda n, body: Reply(body=b'{"scores": [1, 2'))
  (r,) = post_json_many(server.url, [{"i": 0}], timeout_s=5, max_retries=2, **FAST)
  assert not r.ok and r.attempts == 3
  assert r.error.startswith("gave up after 3 attempts: the reply is not JSON")
  assert '{"scores": [1, 2' in r.error
  assert server.count == 3


def test_validate_rejection_is_retried(serve):
  server = serve(lambda n, body: Reply(body={"ok": n >= 1}))

  def validate(reply):
    if not reply["ok"]:
      raise ValueError("ok is false")

  (r,) = post_json_many(server.url, [{"i": 0}], timeout_s=5, max_retries=2, validate=validate,
                        **FAST)
  assert r.ok and r.value == {"ok": True} and r.attempts == 2
  assert server.count == 2

  def never(reply):
    raise ValueError("never good")

  (r,) = post_json_many(server.url, [{"i": 0}], timeout_s=5, max_retries=1, validate=never,
                        **FAST)
  assert r.error == "gave up after 2 attempts: malformed reply: never good"


def test_one_validator_per_payload(serve):
  server = serve(echo)
  seen = []
  validators = [lambda reply, k=k: seen.append((k, reply["echo"])) for k in range(3)]
  results = post_json_many(server.url, [{"i": i} for i in range(3)], timeout_s=5,
                           validate=validators, max_concurrency=3, **FAST)
  assert all(r.ok for r in results)
  assert sorted(seen) == [(0, 0), (1, 1), (2, 2)]
  with pytest.raises(ValueError, match="2 validators for 3 payloads"):
    post_json_many(server.url, [{"i": i} for i in range(3)], timeout_s=5,
                   validate=validators[:2])


def test_connection_refused_is_retried_then_fails():
  with socket.socket() as s:  # a port nobody listens on once this socket is closed
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  (r,) = post_json_many(f"http://127.0.0.1:{port}/x", [{"i": 0}], timeout_s=2, max_retries=2,
                        **FAST)
  assert not r.ok and r.attempts == 3
  assert r.error.startswith("gave up after 3 attempts: connection error")


@pytest.mark.parametrize("limit", [1, 3])
def test_concurrency_limit_is_honoured(serve, limit):
  server = serve(lambda n, body: Reply(body={"echo": body["i"]}, delay_s=0.1))
  results = post_json_many(server.url, [{"i": i} for i in range(8)], timeout_s=5,
                           max_concurrency=limit, **FAST)
  assert all(r.ok for r in results)
  assert server.count == 8
  assert server.max_in_flight <= limit
  if limit > 1:
    assert server.max_in_flight > 1


def test_backoff_is_exponential_and_capped(serve, monkeypatch):
  sleeps = []
  monkeypatch.setattr(http_client, "time",
                      types.SimpleNamespace(monotonic=time.monotonic, sleep=sleeps.append))
  server = serve(lambda n, body: Reply(503, {}))
  post_json_many(server.url, [{"i": 0}], timeout_s=5, max_retries=4, backoff_s=0.01,
                 backoff_max_s=0.03, max_concurrency=1)
  assert sleeps == pytest.approx([0.01, 0.02, 0.03, 0.03])
  assert server.count == 5


def test_retry_after_is_honoured_up_to_the_cap(serve, monkeypatch):
  sleeps = []
  monkeypatch.setattr(http_client, "time",
                      types.SimpleNamespace(monotonic=time.monotonic, sleep=sleeps.append))
  server = serve(lambda n, body: Reply(429, {}, headers={"Retry-After": "0.2" if n else "60"})
                 if n < 2 else echo(n, body))
  (r,) = post_json_many(server.url, [{"i": 0}], timeout_s=5, max_retries=2, backoff_s=0.01,
                        backoff_max_s=1.0)
  assert r.ok
  assert sleeps == pytest.approx([1.0, 0.2])


@pytest.mark.parametrize("kwargs, match", [
    (dict(url="ftp://127.0.0.1/x"), "not an http:// or https:// URL"),
    (dict(url="127.0.0.1:8000/score"), "not an http:// or https:// URL"),
    (dict(url="http://127.0.0.1:80a/score"), "has a bad port"),
    (dict(timeout_s=0), "timeout_s=0 must be"),
    (dict(max_concurrency=0), "max_concurrency=0 must be an int >= 1"),
    (dict(max_retries=-1), "max_retries=-1 must be an int >= 0"),
    (dict(backoff_s=-1.0), "backoff_s=-1.0 must be"),
    (dict(payloads=[{"i": 0}, {"bad": {1, 2}}]), "payload 1 cannot be sent as JSON"),
    (dict(payloads=[{"x": float("nan")}]), "payload 0 cannot be sent as JSON"),
])
def test_bad_arguments_are_named(kwargs, match):
  args = dict(url="http://127.0.0.1:9/x", payloads=[{"i": 0}], timeout_s=1.0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    post_json_many(args.pop("url"), args.pop("payloads"), **args)


# --- ChatCompletionsClient ------------------------------------------------------------------


def completion(text):
  return {"id": "x", "object": "chat.completion",
          "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": text}}]}


def echo_chat(n, body):
  del n
  return Reply(body=completion("re: " + body["messages"][-1]["content"]))


def test_chat_healthy_request_and_reply(serve):
  server = serve(echo_chat, path="/v1/chat/completions")
  base_url = server.url[:-len("/chat/completions")] + "/"  # a trailing slash is fine
  client = ChatCompletionsClient(base_url, "tiny-model", timeout_s=5, max_concurrency=3,
                                 extra_body={"seed": 3}, **FAST)
  conversations = ["first",
                   [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "hi"},
                    {"role": "model", "content": "hello"},
                    {"role": "user", "content": "second"}],
                   "third"]
  out = client.complete(conversations, temperature=0.7, max_tokens=64, top_p=0.9)
  assert out == [("re: first", None), ("re: second", None), ("re: third", None)]
  assert server.count == 3
  request = next(r for r in server.requests if r.body["messages"][-1]["content"] == "second")
  assert request.path == "/v1/chat/completions"
  assert request.body["model"] == "tiny-model"
  assert request.body["temperature"] == 0.7 and request.body["top_p"] == 0.9
  assert request.body["max_tokens"] == 64 and request.body["seed"] == 3
  assert [m["role"] for m in request.body["messages"]] == ["system", "user", "assistant", "user"]
  assert "Authorization" not in request.headers
  # top_p is left to the server's default unless given.
  client.complete(["x"], temperature=0.0, max_tokens=8)
  assert "top_p" not in server.requests[-1].body


def test_chat_500_then_recovers(serve):
  server = serve(lambda n, body: Reply(500, {"error": "busy"}) if n < 2 else echo_chat(n, body),
                 path="/v1/chat/completions")
  client = ChatCompletionsClient(server.url[:-len("/chat/completions")], "m", timeout_s=5,
                                 max_retries=2, max_concurrency=1, **FAST)
  assert client.complete(["a", "b"], temperature=1.0, max_tokens=4) == [("re: a", None),
                                                                         ("re: b", None)]
  assert server.count == 2 + 2


@pytest.mark.parametrize("body, reason", [
    ({"choices": []}, "malformed reply: no choices[0] in the reply"),
    ({"error": {"message": "quota"}}, "malformed reply: no choices[0] in the reply (error: "),
    ({"choices": [{"message": {"content": None}, "finish_reason": "length"}]},
     "choices[0].message.content is NoneType, not text (finish_reason: 'length')"),
    (b"<html>Bad Gateway</html>", "the reply is not JSON"),
])
def test_chat_malformed_reply_is_retried_then_reported(serve, body, reason):
  server = serve(lambda n, b: Reply(body=body) if n < 3 else echo_chat(n, b),
                 path="/v1/chat/completions")
  client = ChatCompletionsClient(server.url[:-len("/chat/completions")], "m", timeout_s=5,
                                 max_retries=1, max_concurrency=1, **FAST)
  # Two failures use up the first prompt's two attempts; the second prompt fails once more
  # and then succeeds.
  out = client.complete(["a", "b"], temperature=1.0, max_tokens=4)
  assert out[0][0] is None and out[0][1].startswith("gave up after 2 attempts: ")
  assert reason in out[0][1]
  assert out[1] == ("re: b", None)
  assert server.count == 4


def test_chat_hang_times_out(serve):
  server = serve(lambda n, body: Reply(body=completion("late"), delay_s=HANG_S),
                 path="/v1/chat/completions")
  client = ChatCompletionsClient(server.url[:-len("/chat/completions")], "m", timeout_s=0.3,
                                 max_retries=1, **FAST)
  start = time.monotonic()
  assert client.complete(["a"], temperature=1.0, max_tokens=4) == [
      (None, "gave up after 2 attempts: timed out after 0.3 s")]
  assert time.monotonic() - start < HANG_S / 3
  assert server.count == 2


def test_chat_api_key_header(serve, monkeypatch):
  monkeypatch.setenv("EVA_TEST_CHAT_KEY", "sk-test-123")
  server = serve(echo_chat, path="/v1/chat/completions")
  client = ChatCompletionsClient(server.url[:-len("/chat/completions")], "m",
                                 api_key_env="EVA_TEST_CHAT_KEY", timeout_s=5, **FAST)
  assert client.complete(["a"], temperature=1.0, max_tokens=4) == [("re: a", None)]
  assert server.requests[0].headers["Authorization"] == "Bearer sk-test-123"


@pytest.mark.parametrize("value", [None, "", "  "])
def test_chat_missing_api_key_is_an_error_at_construction(monkeypatch, value):
  if value is None:
    monkeypatch.delenv("EVA_TEST_CHAT_KEY", raising=False)
  else:
    monkeypatch.setenv("EVA_TEST_CHAT_KEY", value)
  with pytest.raises(ValueError, match="EVA_TEST_CHAT_KEY.*unset or empty.*export "
                     "EVA_TEST_CHAT_KEY="):
    ChatCompletionsClient("http://127.0.0.1:9/v1", "m", api_key_env="EVA_TEST_CHAT_KEY")


def test_chat_bad_settings_and_conversations():
  with pytest.raises(ValueError, match="base_url='localhost:8000/v1'"):
    ChatCompletionsClient("localhost:8000/v1", "m")
  with pytest.raises(ValueError, match="model=''"):
    ChatCompletionsClient("http://127.0.0.1:9/v1", "")
  with pytest.raises(ValueError, match="max_concurrency=0"):
    ChatCompletionsClient("http://127.0.0.1:9/v1", "m", max_concurrency=0)
  client = ChatCompletionsClient("http://127.0.0.1:9/v1", "m")
  with pytest.raises(ValueError, match="conversation 1, message 0 .*'role' in"):
    client.complete(["ok", [{"role": "robot", "content": "x"}]], temperature=1.0, max_tokens=4)
  with pytest.raises(ValueError, match="conversation 0 is empty"):
    client.complete([[]], temperature=1.0, max_tokens=4)

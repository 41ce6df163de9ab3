"""HTTPReward against scoring servers started here on 127.0.0.1: the wire format, and every
way a server fails (500 then recovery, always 500, a hang, malformed JSON, a wrong count, a
null score, a 4xx) reported for exactly the failed items, with exact request counts."""

from __future__ import annotations

import time

import gin
import numpy as np
import pytest

from eva_jax.rewards import REWARDS, HTTPReward, RewardError, make_reward
from eva_jax.testing.http_server import Reply, Server

FAST = dict(backoff_s=0.01, backoff_max_s=0.05)
HANG_S = 30.0  # how long a hanging handler would wait (it is released at teardown)


@pytest.fixture
def serve():
  servers = []

  def start(reply):
    servers.append(Server(reply, path="/score"))
    return servers[-1]

  yield start
  for s in servers:
    s.close()


def length_scores(items):
  """The test's reward: the length of the response, null for a response containing NULL."""
  return [None if "NULL" in it["response"] else float(len(it["response"])) for it in items]


def healthy(n, body):
  del n
  return Reply(body={"scores": length_scores(body["items"]), "model": "len"})


PROMPTS = [f"prompt number {i}" for i in range(7)]
RESPONSES = ["a" * (i + 1) for i in range(7)]


def expected_lengths(responses):
  return np.array([len(r) for r in responses], np.float32)


def reward(url, **kwargs):
  args = dict(batch_size=3, timeout_s=5.0, max_retries=2, max_concurrency=2, **FAST)
  args.update(kwargs)
  return HTTPReward(url, **args)


def test_healthy_wire_format_and_scores(serve):
  server = serve(healthy)
  conversations = list(PROMPTS)
  conversations[4] = [{"role": "system", "content": "Be kind."},
                      {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": " the last question "}]
  out = reward(server.url).score(conversations, RESPONSES)
  np.testing.assert_array_equal(out.scores, expected_lengths(RESPONSES))
  assert out.num_failed == 0 and not out.reasons
  assert server.count == 3  # ceil(7 / 3) batches, one request each
  batches = sorted([r.body for r in server.requests], key=lambda b: b["items"][0]["response"])
  assert [len(b["items"]) for b in batches] == [3, 3, 1]
  items = [it for b in batches for it in b["items"]]
  assert [it["response"] for it in items] == RESPONSES
  assert items[0] == {"prompt": "prompt number 0",
                      "conversation": [{"role": "user", "content": "prompt number 0"}],
                      "response": "a"}
  assert items[4]["prompt"] == "the last question"
  assert items[4]["conversation"] == [
      {"role": "user", "content": "Be kind.\n\nhi"},
      {"role": "assistant", "content": "hello"},
      {"role": "user", "content": "the last question"}]
  assert server.requests[0].headers["Content-Type"] == "application/json"


def test_500_then_recovers(serve):
  server = serve(lambda n, body: Reply(500, {"error": "warming up"}) if n < 2 else healthy(n, body))
  out = reward(server.url, max_retries=2).score(PROMPTS, RESPONSES)
  np.testing.assert_array_equal(out.scores, expected_lengths(RESPONSES))
  assert out.num_failed == 0
  assert server.count == 3 + 2  # each 500 costs one more request


def test_always_500_fails_every_item_after_the_retries(serve):
  server = serve(lambda n, body: Reply(500, {"error": "reward model crashed"}))
  out = reward(server.url, max_retries=2).score(PROMPTS, RESPONSES, on_failure="skip")
  assert out.failed.all() and np.isnan(out.scores).all()
  assert sorted(out.reasons) == list(range(7))
  for reason in out.reasons.values():
    assert "gave up after 3 attempts: HTTP 500" in reason and "reward model crashed" in reason
  assert out.reasons[6].startswith("batch of items 6..6: ")
  assert server.count == 3 * (1 + 2)


def test_hang_past_the_timeout_fails_the_batch(serve):
  server = serve(lambda n, body: Reply(body={"scores": [1.0] * len(body["items"])},
                                       delay_s=HANG_S))
  start = time.monotonic()
  out = reward(server.url, batch_size=8, timeout_s=0.3, max_retries=1).score(
      PROMPTS, RESPONSES, on_failure="skip")
  assert time.monotonic() - start < HANG_S / 3  # not a speed test: the timeout works
  assert out.failed.all()
  assert set(out.reasons.values()) == {
      "batch of items 0..6: gave up after 2 attempts: timed out after 0.3 s"}
  assert server.count == 2


def test_malformed_json_fails_the_batch(serve):
  server = serve(lambda n, body: Reply(body=b'{"scores": [1.0, 2.0,'))
  out = reward(server.url, max_retries=1).score(PROMPTS, RESPONSES, on_failure="skip")
  assert out.failed.all()
  assert all("gave up after 2 attempts: the reply is not JSON" in r for r in out.reasons.values())
  assert server.count == 3 * 2


@pytest.mark.parametrize("bad_reply, reason", [
    (lambda items: {"scores": length_scores(items)[:-1]}, "2 scores for 3 items"),
    (lambda items: {"score": length_scores(items)}, 'expected {"scores": [...]}'),
    (lambda items: {"scores": ["high"] * len(items)}, "score 0 is 'high', not a number"),
    (lambda items: [1.0] * len(items), 'expected {"scores": [...]}'),
])
def test_malformed_reply_fails_only_its_batch(serve, bad_reply, reason):
  # The batch holding "SHORT" gets a malformed reply; the others are fine.
  def reply(n, body):
    if any("SHORT" in it["response"] for it in body["items"]):
      return Reply(body=bad_reply(body["items"]))
    return healthy(n, body)

  server = serve(reply)
  responses = list(RESPONSES)
  responses[4] = "SHORT"
  out = reward(server.url, max_retries=2).score(PROMPTS, responses, on_failure="skip")
  assert np.flatnonzero(out.failed).tolist() == [3, 4, 5]
  assert sorted(out.reasons) == [3, 4, 5]
  for r in out.reasons.values():
    assert r.startswith("batch of items 3..5: gave up after 3 attempts: malformed reply: ")
    assert reason in r
  ok = ~out.failed
  np.testing.assert_array_equal(out.scores[ok], expected_lengths(responses)[ok])
  assert server.count == 2 + 3  # the good batches once, the bad one 1 + max_retries times


@pytest.mark.parametrize("how", ["null", "nan", "infinity"])
def test_a_null_or_non_finite_score_fails_only_its_item(serve, how):
  def reply(n, body):
    del n
    if how == "null":
      return Reply(body={"scores": length_scores(body["items"])})
    token = {"nan": "NaN", "infinity": "-Infinity"}[how]
    # Python's json writes (and reads) these non-standard tokens; some servers do too.
    scores = [token if "NULL" in it["response"] else str(float(len(it["response"])))
              for it in body["items"]]
    return Reply(body=('{"scores": [' + ", ".join(scores) + "]}").encode())

  server = serve(reply)
  responses = list(RESPONSES)
  responses[2] = "NULL here"
  out = reward(server.url).score(PROMPTS, responses, on_failure="skip")
  assert np.flatnonzero(out.failed).tolist() == [2]
  assert list(out.reasons) == [2]
  assert ("null" if how == "null" else "the score") in out.reasons[2]
  np.testing.assert_array_equal(np.delete(out.scores, 2),
                                np.delete(expected_lengths(responses), 2))
  assert server.count == 3  # a null is the server's answer, not retried


def test_on_failure_raise_names_the_prompt(serve):
  server = serve(healthy)
  responses = list(RESPONSES)
  responses[5] = "NULL"
  with pytest.raises(RewardError, match=r"prompt 5 \('prompt number 5'\).*returned null.*"
                     r"1 of 7 responses failed"):
    reward(server.url).score(PROMPTS, responses)
  assert server.count == 3


def test_gave_up_raise_names_the_first_prompt(serve):
  serve_500 = serve(lambda n, body: Reply(503, {}))
  with pytest.raises(RewardError, match=r"http reward .*prompt 0 \('prompt number 0'\).*gave up "
                     r"after 2 attempts: HTTP 503.*7 of 7 responses failed"):
    reward(serve_500.url, max_retries=1).score(PROMPTS, RESPONSES)
  assert serve_500.count == 3 * 2


def test_4xx_is_not_retried(serve):
  server = serve(lambda n, body: Reply(422, {"detail": "items[0].response: too long"}))
  out = reward(server.url, max_retries=3).score(PROMPTS, RESPONSES, on_failure="skip")
  assert out.failed.all()
  assert all("HTTP 422" in r and "too long" in r and "not retried" in r
             for r in out.reasons.values())
  assert server.count == 3


@pytest.mark.parametrize("limit", [1, 2])
def test_concurrency_limit_is_honoured(serve, limit):
  server = serve(lambda n, body: healthy(n, body)._replace(delay_s=0.1))
  prompts, responses = PROMPTS * 2, RESPONSES * 2
  out = reward(server.url, batch_size=2, max_concurrency=limit).score(prompts, responses)
  np.testing.assert_array_equal(out.scores, expected_lengths(responses))
  assert server.count == 7
  assert server.max_in_flight <= limit
  if limit > 1:
    assert server.max_in_flight > 1


def test_api_key_header_and_extra_headers(serve, monkeypatch):
  monkeypatch.setenv("EVA_TEST_REWARD_KEY", "secret-1")
  server = serve(healthy)
  reward(server.url, headers={"X-Experiment": "e1"},
         api_key_env="EVA_TEST_REWARD_KEY").score(PROMPTS[:1], RESPONSES[:1])
  assert server.requests[0].headers["Authorization"] == "Bearer secret-1"
  assert server.requests[0].headers["X-Experiment"] == "e1"
  monkeypatch.delenv("EVA_TEST_REWARD_KEY")
  with pytest.raises(ValueError, match="HTTPReward: the environment variable "
                     "EVA_TEST_REWARD_KEY .* unset or empty"):
    reward(server.url, api_key_env="EVA_TEST_REWARD_KEY")


def test_made_from_gin(serve):
  server = serve(healthy)
  assert REWARDS.get("http") is HTTPReward and HTTPReward.process0_only
  gin.clear_config()
  try:
    gin.parse_config([f"HTTPReward.url = '{server.url}'", "HTTPReward.batch_size = 4",
                      "HTTPReward.backoff_s = 0.01"])
    r = make_reward(kind="http")
    assert isinstance(r, HTTPReward) and r.batch_size == 4 and r.url == server.url
    np.testing.assert_array_equal(r.score(PROMPTS, RESPONSES).scores, expected_lengths(RESPONSES))
    assert server.count == 2
  finally:
    gin.clear_config()


def test_bad_settings_and_conversations(serve):
  with pytest.raises(ValueError, match="HTTPReward.url='localhost:8000' is not an http"):
    HTTPReward("localhost:8000")
  with pytest.raises(ValueError, match="batch_size=0 must be an int >= 1"):
    HTTPReward("http://127.0.0.1:9/score", batch_size=0)
  with pytest.raises(ValueError, match="HTTPReward: timeout_s=-1"):
    HTTPReward("http://127.0.0.1:9/score", timeout_s=-1)
  server = serve(healthy)
  bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
  with pytest.raises(ValueError, match="conversation 1 cannot be sent: Chat message 1"):
    reward(server.url).score(["fine", bad], ["x", "y"])
  assert server.count == 0
  assert len(reward(server.url).score([], []).scores) == 0
  assert server.count == 0

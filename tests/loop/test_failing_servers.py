"""A reward server and an evolver endpoint that fail part of the time do not stop a round:
their failures are counted in metrics.jsonl."""

import importlib.util
import os
import re

from eva_jax import metrics
from eva_jax.testing.http_server import Reply, Server

_spec = importlib.util.spec_from_file_location(
    "loop_helpers", os.path.join(os.path.dirname(__file__), "helpers.py"))
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)


def score(n, body):
  """Scores by length, but a batch holding the prompt "Spell the word cat." always fails."""
  items = body["items"]
  if any(i["prompt"] == "Spell the word cat." for i in items):
    return Reply(status=500, body={"error": "scorer crashed"})
  return Reply(body={"scores": [float(len(i["response"])) for i in items]})


def chat(n, body):
  """Rewrites the prompt between <prompt> tags; every third request fails."""
  if n % 3 == 2:
    return Reply(status=503, body={"error": "overloaded"})
  text = re.search(r"<prompt>\n(.*?)\n</prompt>", body["messages"][0]["content"], re.S).group(1)
  return Reply(body={"choices": [{"message": {"role": "assistant",
                                              "content": f"Rewritten prompt: {text} (v{n})"},
                                  "finish_reason": "stop"}]})


def test_failing_http_reward_and_evolver_are_counted_not_fatal(tmp_path):
  scorer, evolver = Server(score, path="/score"), Server(chat, path="/v1/chat/completions")
  try:
    base = evolver.url[:-len("/chat/completions")]
    status = H.run_here(tmp_path, [
        "EvaConfig.num_rounds = 1",
        "load_prompts.limit = 64",  # so that "Spell the word cat." is among the prompts
        "make_reward.kind = 'http'",
        f"HTTPReward.url = '{scorer.url}'",
        "HTTPReward.batch_size = 4", "HTTPReward.max_retries = 1",
        "HTTPReward.backoff_s = 0.01",
        "make_evolver.kind = 'chat_completions'",
        f"ChatCompletionsEvolver.base_url = '{base}'",
        "ChatCompletionsEvolver.model = 'test-model'",
        "ChatCompletionsEvolver.num_children = 2", "ChatCompletionsEvolver.max_retries = 0",
        "ChatCompletionsEvolver.max_concurrency = 1"])
  finally:
    scorer.close()
    evolver.close()
  assert status == 0
  lines = metrics.read_metrics(tmp_path)
  failed = sum(line.get("reward/failed", 0) + line.get("evaluate/failed", 0) +
               line.get("eval/failed", 0) for line in lines)
  assert failed > 0
  evolve = next(line for line in lines if line.get("phase") == "evolve")
  assert evolve["evolve/failed"] > 0 and evolve["evolve/kept"] > 0
  assert "503" in evolve["evolve/failure_example"]
  assert any(line.get("round") == 1 and "eval/reward_mean" in line for line in lines)

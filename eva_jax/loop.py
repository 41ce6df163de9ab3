"""The eva round as one resumable program.

    status = run(workdir)      # what `python -m eva_jax.main` calls after parsing gin

`EvaRun.round` is one round of offline eva, top to bottom (../shared/DESIGN.md, "One round"):

 1. `sample`           k responses per prompt of the active set, from the round's starting policy;
 2. `reward`           every response scored by the reward;
 3. `select`           informativeness per prompt (reward_gap by default), the prompts to evolve;
 4. `evolve`           children of the selected prompts, filtered, added to the buffer;
 5. `sample_children`  k responses per child;
 6. `reward_children`  scored;
 7. `pairs`            best-versus-worst pairs on both sets and their mix (80% evolved, 20% fresh);
 8. `reference`        the reference model's log-probs of every pair, once;
 9. `train`            epochs of the preference loss over the pairs;
10. `evaluate`         held-out prompts: mean reward, win rate against round 0, response length;

then the next round's active set (the children plus a retained share) and the round's files.
Round 0 only evaluates the starting policy.

Each phase is a function of its inputs and a seed derived from (run seed, round, phase); its
outputs go into the `RoundState`, which is saved (with the metric lines committed so far)
after every phase, and the train state after training. A run that is killed resumes from
the last saved phase and ends with the same params and metric lines as one that was not;
SIGTERM saves (mid-training too) and exits 0.

Several processes: every process runs the same programs on the same inputs in the same
order; host-side choices come from the same seeds; rewards and evolvers that talk to servers
ask on process 0 and broadcast; only process 0 writes metrics, prompt files and the config.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Callable, Optional, Sequence

import gin
import jax
import numpy as np
from etils import epath

from eva_jax import checkpointing, metrics as metrics_lib, models, parallel, plots, solver
# Registers the closed world's reward, evolver, prompt source and grouping by name.
from eva_jax import closed_world  # pylint: disable=unused-import
from eva_jax.creator import (LMEvolver, Parent, PromptBuffer, best_worst_pairs,
                             filter_children, informativeness, make_evolver, mix_pairs,
                             select_prompts)
from eva_jax.data import initial_prompts, prompt_groups, resolve_builtin
from eva_jax.models.tokenizer import cut_at_stop, encode_chat
from eva_jax.preemption import Preempted, StopSignal, fault_point
from eva_jax.rewards import make_reward
from eva_jax.round_state import RoundState, Samples
from eva_jax.sampler import Sampler

PHASES = ("sample", "reward", "select", "evolve", "sample_children", "reward_children",
          "pairs", "reference", "train", "evaluate")
REFERENCES = ("round_start", "initial")
REWARD_FAILURE_POLICIES = ("auto", "raise", "skip")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvaConfig:
  """The round's knobs (gin: `EvaConfig.num_samples = 6`). Defaults: the paper's.

  Attributes:
    num_rounds: eva rounds after round 0 (the evaluation of the starting policy).
    seed: the run's seed; every phase's seed derives from it, the round and the phase.
    num_samples: k, responses per prompt.
    max_new_tokens / temperature / top_p: sampling the solver.
    max_prompt_tokens: the longest prompt (chat template included); longer evolved prompts
      are filtered out, and pairs keep the prompt's last tokens up to it.
    max_length: prompt + response tokens of a training row.
    sample_chunk: prompts per sampler call (progress and stop checks between calls).
    reward_chunk: responses per reward call.
    informativeness: the metric ("reward_gap", "max_mean", "std", "mean_inverse",
      "uniform"); selection, evolvers, filters, pairs and the mix have their own gin
      configurables (`select_prompts`, `make_evolver`, `filter_children`, `best_worst_pairs`,
      `mix_pairs`).
    evolve: evolve the selected prompts (False: an ablation where the selected prompts' own
      pairs take the place of the children's, and no child is born).
    retain_fraction / retain: the share of the current set kept in the next one, and how
      ("random" or "informative").
    on_reward_failure: "auto" (skip and count failures of rewards whose failures are
      transient, such as an HTTP server; stop, naming the prompt, for the others), "raise"
      or "skip".
    reference: "round_start" (eva: the round's starting policy) or "initial" (the run's
      starting policy, as iterative-DPO recipes).
    epochs / batch_size: passes over the round's pairs and pairs per optimizer step (the last
      batch of an epoch is completed with pairs from its start). The learning-rate schedule
      (`learning_rate_schedule`) spans the round's real number of steps, and the optimizer
      state starts afresh each round, as in the authors' code.
    pairs_per_round: train on exactly this many pairs each round (the mix reshuffled and cut
      or repeated to it), so that ablations compare at an equal training budget; None: the
      mix as it comes.
    eval_num_samples / eval_temperature / eval_max_new_tokens: held-out sampling (the same
      seed every round, so rounds are compared on the same draws).
    max_to_keep: train checkpoints kept.
    save_every_steps: also save the train state every this many steps (None: only at the end
      of training and when stopped).
    async_checkpointing: write train checkpoints in the background.
    summary_examples: evolved prompts shown beside their parents at the end of a round.
    prompt_groups: a grouping registered in `eva_jax.data.PROMPT_GROUPS` (e.g. "closed_world":
      level and task family): the held-out reward and informativeness are also reported per
      group, and the end-of-round table shows the held-out reward per group of the first kind.
    plots: write WORKDIR/plots/*.png after every round (needs matplotlib, the `plots` extra).
  """

  num_rounds: int = 2
  seed: int = 0
  num_samples: int = 6
  max_new_tokens: int = 1024
  temperature: float = 0.7
  top_p: float = 0.9
  max_prompt_tokens: int = 1024
  max_length: int = 2048
  sample_chunk: int = 1024
  reward_chunk: int = 512
  informativeness: str = "reward_gap"
  evolve: bool = True
  retain_fraction: float = 0.0
  retain: str = "random"
  on_reward_failure: str = "auto"
  reference: str = "round_start"
  epochs: int = 2
  batch_size: int = 64
  pairs_per_round: Optional[int] = None
  eval_num_samples: int = 1
  eval_temperature: float = 0.7
  eval_max_new_tokens: Optional[int] = None
  max_to_keep: int = 2
  save_every_steps: Optional[int] = None
  async_checkpointing: bool = True
  summary_examples: int = 3
  prompt_groups: Optional[str] = None
  plots: bool = True

  def __post_init__(self):
    checks = [
        (self.num_rounds >= 0, "num_rounds must be >= 0"),
        (self.num_samples >= 2, "num_samples must be >= 2 (a pair needs two responses)"),
        (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
        (0 < self.max_prompt_tokens < self.max_length,
         "max_prompt_tokens must be in [1, max_length)"),
        (self.reference in REFERENCES, f"reference must be one of {REFERENCES}"),
        (self.on_reward_failure in REWARD_FAILURE_POLICIES,
         f"on_reward_failure must be one of {REWARD_FAILURE_POLICIES}"),
        (self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1"),
        (self.eval_num_samples >= 1, "eval_num_samples must be >= 1"),
        (self.save_every_steps is None or self.save_every_steps >= 1,
         "save_every_steps must be None or >= 1"),
        (self.pairs_per_round is None or self.pairs_per_round >= 1,
         "pairs_per_round must be None or >= 1"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f"EvaConfig: {message}.")


@gin.configurable
class InitialPolicy:
  """The run's starting policy.

  Args:
    path: a checkpoint folder (HF or official Gemma, local or gs://) loaded with
      `from_pretrained`; None: a seeded random init of the `get_config()` model (tiny
      configs).
    config: for an official checkpoint, its config name (see `from_pretrained`).
    embedding_scale: a random init's embedding table is multiplied by this. Gemma's init
      (1.0) gives logits so spread out that an untrained model puts all its probability on
      one token; a small scale gives an untrained tiny model varied samples (smoke runs).
  """

  def __init__(self, path: Optional[str] = None, config: Any = None,
               embedding_scale: float = 1.0):
    if path is not None and embedding_scale != 1.0:
      raise ValueError("InitialPolicy.embedding_scale applies to a random init only; "
                       "a checkpoint's weights are used as they are.")
    self.path = resolve_builtin(path)
    self.config, self.embedding_scale = config, float(embedding_scale)

  def model_config(self):
    """The model's config (for a checkpoint: read without loading its weights)."""
    if self.path is None:
      return models.get_config()
    return models.pretrained_config(self.path, config=self.config)

  def params(self, model, mesh, seed: int):
    """The starting params on `mesh` (the same on every call: a resumed run that needs them
    again, for reference="initial", rebuilds them)."""
    if self.path is None:
      params = parallel.init_params(model, jax.random.key(seed), mesh, None,
                                    np.ones((1, 8), np.int32))
      if self.embedding_scale != 1.0:
        table = params["embedder"]["input_embedding"]
        params["embedder"]["input_embedding"] = (
            table * np.asarray(self.embedding_scale, table.dtype))
      return params
    # A scanned policy (`scan_layers`) takes the checkpoint's layers stacked.
    _, params = models.from_pretrained(self.path, config=self.config, mesh=mesh,
                                       scan_layers=model.config.scan_layers)
    return params


def phase_seed(seed: int, round_index: int, phase: str) -> int:
  """A seed in [0, 2**31) for (run seed, round, phase), the same on every process."""
  key = [seed, round_index, PHASES.index(phase) if phase in PHASES else len(PHASES)]
  return int(np.random.SeedSequence(key).generate_state(1)[0] % (2 ** 31))


def parse_bindings(config_str: str) -> dict[str, str]:
  """{"scope/configurable.param": "value"} of a gin config string (comments dropped, values
  with continuation lines joined)."""
  out: dict[str, str] = {}
  key = None
  for line in config_str.splitlines():
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    if line[0].isspace() and key is not None:
      out[key] += " " + line.strip()
      continue
    name, sep, value = line.partition("=")
    if not sep:
      continue
    key = name.strip()
    out[key] = value.strip()
  return out


def config_difference(saved: str, current: str) -> list[str]:
  """Human-readable differences between two gin config strings, one per binding."""
  a, b = parse_bindings(saved), parse_bindings(current)
  diffs = []
  for k in sorted(set(a) | set(b)):
    if a.get(k) != b.get(k):
      diffs.append(f"{k}: {a.get(k, '(unset)')} in the saved run, "
                   f"{b.get(k, '(unset)')} now")
  return diffs


class ConfigMismatchError(ValueError):
  """The workdir holds a run made with another configuration."""


def _check_writable(workdir: epath.Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".eva_jax_write_probe_{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise PermissionError(f"The workdir {workdir} is not writable ({e}); pass --workdir with "
                          "a folder you can write to.") from e


class EvaRun:
  """One run in one workdir: set-up (fresh or resumed), then the rounds."""

  def __init__(self, workdir, *, config: Optional[EvaConfig] = None,
               stop: Optional[StopSignal] = None, allow_config_change: bool = False,
               log: Callable[[str], None] = print):
    self.workdir = epath.Path(workdir)
    self.cfg = config or EvaConfig()
    self.stop = stop or StopSignal(install=False)
    self.allow_config_change = allow_config_change
    self.is_chief = jax.process_index() == 0
    self._log = log
    self.mesh = parallel.create_mesh()
    self.tokenizer = models.get_tokenizer()
    self.stop_ids = [self.tokenizer.eos_id] + (
        [self.tokenizer.end_of_turn_id] if self.tokenizer.end_of_turn_id is not None else [])
    self.initial = InitialPolicy()
    self.policy = solver.make_policy_model(self.initial.model_config())
    self._initial_params = None
    self.loss_fn = solver.get_loss_fn()
    self.sampler = Sampler(self.policy, self.mesh, max_prompt_length=self.cfg.max_prompt_tokens,
                           truncation="left")
    self.reward = make_reward(mesh=self.mesh)
    self.group_of = prompt_groups(self.cfg.prompt_groups)
    self.evolver = make_evolver()
    self._train_steps: dict[tuple[int, int], solver.TrainStep] = {}
    # The optimizer's state has the same structure whatever the schedule's length, so any
    # round's optimizer describes the train state checkpoints hold.
    self._default_optimizer = solver.make_optimizer(
        learning_rate=solver.learning_rate_schedule(total_steps=1))
    self.state_shardings, self.abstract_state = solver.train_state_shardings(
        self.policy, self._default_optimizer, self.mesh)
    self.train_state = None
    self.rs = RoundState()
    self.ckpt = None
    self.writer = None

  def log(self, message: str) -> None:
    if self.is_chief:
      self._log(message)

  # ================================================================ the run

  def run(self) -> int:
    """Runs (or resumes) every round; returns the exit status (0 also when stopped)."""
    _check_writable(self.workdir)
    self.ckpt = checkpointing.RunCheckpointer(self.workdir, max_to_keep=self.cfg.max_to_keep,
                                              async_train=self.cfg.async_checkpointing)
    self.writer = metrics_lib.MetricsWriter(self.workdir)
    try:
      if not self._resume():
        self._start()
      if self.rs.round > self.cfg.num_rounds:
        self.log(f"eva_jax: the run in {self.workdir} is finished ({self.cfg.num_rounds} "
                 "rounds); nothing to do.")
        return 0
      if self.rs.round == 0:
        self.round0()
      for t in range(self.rs.round, self.cfg.num_rounds + 1):
        self.round(t)
      self.log(f"eva_jax: done, {self.cfg.num_rounds} rounds in {self.workdir}.")
      return 0
    except Preempted:
      self.log(f"eva_jax: stopped on request (SIGTERM) in round {self.rs.round} after "
               f"{', '.join(self.rs.done) or 'no phase'}; the state is saved in "
               f"{self.workdir}. Run the same command again to resume.")
      return 0
    finally:
      self.ckpt.close()

  def _start(self) -> None:
    """A fresh run: prompts, the starting policy (train checkpoint 0), round state 0."""
    self.writer.restore(0)
    train, heldout = initial_prompts(tokenizer=self.tokenizer)
    self.log(f"eva_jax: {len(train.examples)} training prompts, {len(heldout.examples)} "
             f"held-out; model {self.policy.config.num_params():,} params on mesh "
             f"{dict(self.mesh.shape)} ({jax.process_count()} process(es)); workdir "
             f"{self.workdir}")
    self.rs = RoundState(buffer=PromptBuffer.from_texts(train.examples),
                         heldout=[e.conversation() for e in heldout.examples],
                         config=gin.config_str())
    self.writer.log({"round": 0, **{f"data/{k}": v for k, v in train.stats.items()},
                     "data/heldout": len(heldout.examples)})
    self.train_state = self._fresh_train_state(self._starting_params())
    self.ckpt.save_train(0, self.train_state)
    self._write_config()
    self._save()

  def _resume(self) -> bool:
    latest = self.ckpt.latest()
    if latest is None:
      return False
    index, meta, arrays = latest
    self.rs = RoundState.from_checkpoint(meta, arrays, f"{self.workdir} round state {index}")
    diffs = config_difference(self.rs.config, gin.config_str())
    if diffs:
      if not self.allow_config_change:
        raise ConfigMismatchError(
            f"The workdir {self.workdir} holds a run made with another configuration; "
            "differing bindings:\n  " + "\n  ".join(diffs) + "\nResume with the same gin "
            "files and bindings, use another --workdir, or pass --allow_config_change.")
      self.log("eva_jax: resuming with a changed configuration:\n  " + "\n  ".join(diffs))
    self.writer.restore(self.rs.metrics_lines)
    sh = checkpointing.abstract_with_shardings(self.abstract_state, self.state_shardings)
    self.train_state = self.ckpt.restore_train(self.rs.train_step, sh)
    self.log(f"eva_jax: resuming {self.workdir} at round {self.rs.round} after "
             f"{', '.join(self.rs.done) or 'no phase'} (train step {self.rs.train_step}).")
    return True

  # ================================================================ one round

  def round0(self) -> None:
    """Round 0: the starting policy on the held-out prompts (the baseline of win rates)."""
    self.phase(0, "evaluate", lambda seed: self.evaluate(0))
    self.finish_round(0, children=[])

  def round(self, t: int) -> None:
    """One eva round, phase by phase (the module docstring lists them)."""
    cfg, buf = self.cfg, self.rs.buffer
    current = buf.active_records()
    conversations = [r.conversation() for r in current]

    samples = self.phase(t, "sample", lambda seed: self.sample(
        conversations, cfg.num_samples, seed, "sample"))
    rewards = self.phase(t, "reward", lambda seed: self.score(
        conversations, samples, "reward"))
    selected = self.phase(t, "select", lambda seed: self.select(current, rewards, t, seed))
    children = self.phase(t, "evolve", lambda seed: self.evolve(
        [current[i] for i in selected], t, seed))
    child_convs = [buf[c].conversation() for c in children]
    child_samples = self.phase(t, "sample_children", lambda seed: self.sample(
        child_convs, cfg.num_samples, seed, "sample_children"))
    child_rewards = self.phase(t, "reward_children", lambda seed: self.score(
        child_convs, child_samples, "reward_children"))
    pairs = self.phase(t, "pairs", lambda seed: self.make_pairs(
        (conversations, samples, rewards), (child_convs, child_samples, child_rewards),
        selected, seed))
    reference = self.phase(t, "reference", lambda seed: self.reference(pairs))
    self.phase(t, "train", lambda seed: self.train(t, {**pairs, **(reference or {})}, seed))
    self.phase(t, "evaluate", lambda seed: self.evaluate(t))
    self.finish_round(t, children)

  # ================================================================ phase plumbing

  def phase(self, t: int, name: str, fn: Callable[[int], Any]) -> Any:
    """Runs phase `name` of round `t` unless the saved state has it; stores its outputs,
    commits its metric lines, saves, and stops here if a stop was requested."""
    if name in self.rs.done:
      return self._load_output(name)
    start = time.perf_counter()
    output, record = fn(phase_seed(self.cfg.seed, t, name))
    fault_point(t, name)
    record = dict(record, **{f"time/{name}": time.perf_counter() - start})
    self.writer.log({"round": t, "phase": name, **record}, step=self.rs.train_step)
    self.rs.phase_meta.setdefault("records", {})[name] = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in record.items() if isinstance(v, (int, float))}
    self._store_output(name, output)
    self.rs.done.append(name)
    self._save()
    if self.stop.requested():
      raise Preempted()
    return output

  def _store_output(self, name: str, output: Any) -> None:
    if isinstance(output, Samples):
      self.rs.arrays.update(output.to_arrays(name))
    elif isinstance(output, dict):  # name -> numpy array
      self.rs.arrays.update({f"{name}/{k}": np.asarray(v) for k, v in output.items()})
    elif isinstance(output, np.ndarray):
      self.rs.arrays[name] = output
    elif isinstance(output, list):  # JSON-able
      self.rs.phase_meta[name] = output
    elif output is not None:
      raise TypeError(f"phase {name}: cannot store a {type(output).__name__}")

  def _load_output(self, name: str) -> Any:
    a = self.rs.arrays
    if f"{name}/shape" in a:
      return Samples.from_arrays(a, name)
    if name in a:
      return a[name]
    if name in self.rs.phase_meta:
      return self.rs.phase_meta[name]
    prefix = f"{name}/"
    found = {k[len(prefix):]: v for k, v in a.items() if k.startswith(prefix)}
    return found or None

  def _save(self) -> None:
    self.rs.metrics_lines = self.writer.commit()
    self.rs.save_index += 1
    meta, arrays = self.rs.to_checkpoint()
    self.ckpt.save_round(self.rs.save_index, meta, arrays)

  def _stop_between_chunks(self) -> None:
    """Mid-phase stop: nothing of the phase is kept (the last save is consistent)."""
    if self.stop.requested():
      raise Preempted()

  # ================================================================ phases

  def sample(self, conversations: Sequence, k: int, seed: int, desc: str,
             temperature: Optional[float] = None, max_new_tokens: Optional[int] = None):
    """Samples k responses per conversation with the current policy."""
    cfg = self.cfg
    if not conversations:
      return Samples.empty(k), {f"{desc}/prompts": 0}
    prompts = [encode_chat(self.tokenizer, c) for c in conversations]
    out = []
    start = time.perf_counter()
    # The decode copy of the params is made once for the phase's chunks, and dropped after.
    params = self.sampler.prepare_params(self.train_state.params)
    with metrics_lib.progress(total=len(prompts), desc=f"round {self.rs.round} {desc}",
                              unit="prompt") as bar:
      for c0 in range(0, len(prompts), cfg.sample_chunk):
        chunk = prompts[c0:c0 + cfg.sample_chunk]
        out.extend(self.sampler.sample(
            params, chunk, num_samples=k,
            max_new_tokens=max_new_tokens or cfg.max_new_tokens,
            temperature=cfg.temperature if temperature is None else temperature,
            top_p=cfg.top_p, seed=(seed + c0) % (2 ** 31), stop_tokens=self.stop_ids))
        bar.update(len(chunk))
        self._stop_between_chunks()
    samples = Samples.from_sampler(out, k)
    seconds = time.perf_counter() - start
    lengths = samples.lengths()
    return samples, {f"{desc}/prompts": len(prompts), f"{desc}/responses": int(lengths.size),
                     f"{desc}/length_mean": float(lengths.mean()),
                     f"{desc}/stop_rate": float(samples.stopped.mean()),
                     f"{desc}/tokens_per_s": float(lengths.sum() / max(seconds, 1e-9))}

  def _reward_policy(self) -> str:
    if self.cfg.on_reward_failure != "auto":
      return self.cfg.on_reward_failure
    return "skip" if getattr(self.reward, "transient_failures", False) else "raise"

  def _texts(self, samples: Samples) -> list[str]:
    return [self.tokenizer.decode(cut_at_stop(samples.response(i, j), self.stop_ids))
            for i in range(samples.num_prompts) for j in range(samples.num_samples)]

  def score(self, conversations: Sequence, samples: Samples, desc: str):
    """Rewards [P, k] (float32, NaN where the reward failed or the response is unusable)."""
    cfg, k = self.cfg, samples.num_samples
    texts = self._texts(samples)
    convs = [c for c in conversations for _ in range(k)]
    scores = np.full((len(texts),), np.nan, np.float32)
    failed, examples = 0, []
    policy = self._reward_policy()
    with metrics_lib.progress(total=len(texts), desc=f"round {self.rs.round} {desc}",
                              unit="response") as bar:
      for c0 in range(0, len(texts), cfg.reward_chunk):
        got = self.reward.score(convs[c0:c0 + cfg.reward_chunk],
                                texts[c0:c0 + cfg.reward_chunk], on_failure=policy)
        scores[c0:c0 + len(got.scores)] = got.scores
        failed += got.num_failed
        examples += list(got.reasons.values())[:3 - len(examples)]
        bar.update(len(got.scores))
        self._stop_between_chunks()
    # A response holding the pad id cannot be trained on (the model reads pad as padding).
    pad = np.array([self.policy.config.pad_id in samples.response(i, j)
                    for i in range(samples.num_prompts) for j in range(k)], bool)
    scores[pad] = np.nan
    rewards = scores.reshape(samples.num_prompts, k)
    record = {f"{desc}/failed": failed, f"{desc}/unusable_pad": int(pad.sum())}
    if np.isfinite(rewards).any():
      record[f"{desc}/mean"] = float(np.nanmean(rewards))
    if examples:
      record[f"{desc}/failure_example"] = examples[0][:300]
    return rewards, record

  def select(self, current, rewards, t: int, seed: int):
    """Informativeness of the current prompts and the indices of those to evolve."""
    info = informativeness(rewards, self.cfg.informativeness)
    self.rs.buffer.update_statistics([r.id for r in current], rewards, info, t)
    picked = select_prompts(info, seed=seed)
    finite = info[np.isfinite(info)]
    record = {"select/selected": int(len(picked)), "select/prompts": int(len(info))}
    if finite.size:
      record.update({"info/mean": float(finite.mean()), "info/max": float(finite.max()),
                     "info/min": float(finite.min()),
                     "info/zero_fraction": float(np.mean(finite == 0)),
                     "info/selected_mean": float(np.nanmean(info[picked])) if len(picked)
                     else float("nan")})
    record.update(self._group_means("info", [r.text for r in current], info))
    return np.asarray(picked, np.int64), record

  def _group_means(self, prefix: str, texts: Sequence[str], values) -> dict:
    """{prefix/kind_label: mean of the finite values of that group} under `prompt_groups`."""
    if self.group_of is None:
      return {}
    sums: dict[str, dict[str, list]] = {}  # kind -> label -> values, kinds in the fn's order
    for text, v in zip(texts, np.asarray(values, np.float64)):
      if not np.isfinite(v):
        continue
      for kind, label in self.group_of(text).items():
        sums.setdefault(kind, {}).setdefault(str(label), []).append(v)
    order = lambda label: (len(label), label)  # "2" before "10"
    return {f"{prefix}/{kind}_{label}": float(np.mean(vs[label]))
            for kind, vs in sums.items() for label in sorted(vs, key=order)}

  def evolve(self, parents_records, t: int, seed: int):
    """Children of the selected prompts, filtered; the kept ones join the buffer."""
    buf = self.rs.buffer
    if not self.cfg.evolve:
      return [], {"evolve/parents": len(parents_records), "evolve/kept": 0}
    if isinstance(self.evolver, LMEvolver):
      self.evolver.use_solver(self.policy, self.train_state.params, self.tokenizer, self.mesh)
    parents = [Parent(r.id, r.text) for r in parents_records]
    result = self.evolver.evolve(parents, seed=seed)
    kept, counts = filter_children(
        result.children, parent_texts={p.id: p.text for p in parents},
        seen=buf.normalized_texts(),
        count_tokens=lambda text: len(encode_chat(self.tokenizer, text)),
        max_tokens=self.cfg.max_prompt_tokens)
    ids = [buf.add(c.text, round_born=t, parent_id=c.parent_id, operator=c.operator).id
           for c in kept]
    record = {"evolve/parents": len(parents), "evolve/requests": result.requests,
              "evolve/failed": result.failed, "evolve/children": len(result.children),
              "evolve/kept": len(kept), **counts}
    if result.failure_examples:
      record["evolve/failure_example"] = result.failure_examples[0][:300]
    return ids, record

  def make_pairs(self, fresh, evolved, selected, seed: int):
    """The round's training pairs (token arrays of `solver.make_pair_batch`), with each
    pair's reward margin and whether it comes from the evolved (or, without evolution, the
    selected) prompts."""
    cfg = self.cfg
    (f_convs, f_samples, f_rewards), (e_convs, e_samples, e_rewards) = fresh, evolved
    f_pairs, f_counts = best_worst_pairs(f_rewards)
    if cfg.evolve:
      e_pairs, e_counts = best_worst_pairs(e_rewards) if len(e_convs) else ([], {})
      pool = [(True, e_convs, e_samples, p) for p in e_pairs]
    else:  # the ablation: the selected prompts' own pairs stand in for the children's
      chosen = set(int(i) for i in selected)
      pool = [(True, f_convs, f_samples, p) for p in f_pairs if p.prompt_index in chosen]
      e_counts = {"pairs": len(pool)}
    mixed, mix_counts = mix_pairs(pool, [(False, f_convs, f_samples, p) for p in f_pairs],
                                  seed=seed)
    if cfg.pairs_per_round is not None and mixed:
      order = np.random.default_rng([seed, 1]).permutation(len(mixed))
      mixed = [mixed[i] for i in np.resize(order, cfg.pairs_per_round)]
    record = {**{f"pairs/fresh_{k}": v for k, v in f_counts.items()},
              **{f"pairs/evolved_{k}": v for k, v in e_counts.items()}, **mix_counts,
              "pairs/train": len(mixed)}
    prompts, chosen_r, rejected_r, margins, source = [], [], [], [], []
    for from_pool, convs, samples, p in mixed:
      prompts.append(encode_chat(self.tokenizer, convs[p.prompt_index]))
      chosen_r.append(samples.response(p.prompt_index, p.chosen))
      rejected_r.append(samples.response(p.prompt_index, p.rejected))
      margins.append(p.chosen_reward - p.rejected_reward)
      source.append(from_pool)
    batch = solver.make_pair_batch(prompts, chosen_r, rejected_r, max_length=cfg.max_length,
                                   max_prompt_length=cfg.max_prompt_tokens,
                                   pad_id=self.policy.config.pad_id)
    batch["reward_margin"] = np.asarray(margins, np.float32)
    batch["evolved"] = np.asarray(source, bool)
    if margins:
      record["pairs/reward_margin_mean"] = float(np.mean(margins))
    return batch, record

  def _reference_params(self):
    if self.cfg.reference == "round_start":
      return self.train_state.params
    return self._starting_params()

  def reference(self, pairs: dict):
    """The reference model's log-probs of every pair (computed once per round; nothing for
    a reference-free loss)."""
    n = len(pairs["chosen_tokens"])
    if not (self.loss_fn.needs_reference and n):
      return None, {"reference/pairs": 0}
    ref = solver.reference_logps(self.policy, self._reference_params(),
                                 {k: pairs[k] for k in solver.TOKEN_KEYS}, self.mesh,
                                 scored_length=self._scored_length(pairs))
    return ref, {"reference/pairs": n,
                 "reference/chosen_logp_mean": float(np.mean(ref["ref_chosen_logps"])),
                 "reference/rejected_logp_mean": float(np.mean(ref["ref_rejected_logps"]))}

  def _scored_length(self, pairs: dict) -> int:
    """Positions per row that the train step and the reference unembed: the responses' bound
    (max_new_tokens: the prompt's positions carry no loss), or the longest scored response
    when a round resumed under a smaller max_new_tokens holds longer ones."""
    longest = max(int(np.max(np.sum(pairs[f"{side}_loss_mask"], axis=1)))
                  for side in ("chosen", "rejected"))
    return min(max(self.cfg.max_new_tokens, longest), self.cfg.max_length)

  def _train_step(self, total_steps: int, scored_length: int) -> solver.TrainStep:
    key = (total_steps, scored_length)
    if key not in self._train_steps:
      optimizer = solver.make_optimizer(
          learning_rate=solver.learning_rate_schedule(total_steps=total_steps))
      self._train_steps[key] = solver.make_train_step(
          self.policy, self.mesh, optimizer=optimizer, loss_fn=self.loss_fn,
          max_length=self.cfg.max_length, scored_length=scored_length)
    return self._train_steps[key]

  def train(self, t: int, pairs: dict, seed: int):
    """Epochs of the preference loss over the round's pairs (resumable step by step)."""
    cfg = self.cfg
    n = len(pairs["chosen_tokens"])
    if n == 0:
      self.log(f"eva_jax: round {t} has no pairs (every prompt tied); training skipped.")
      return None, {"train/steps": 0}
    per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * per_epoch
    step_fn = self._train_step(total, self._scored_length(pairs))
    keys = step_fn.keys
    if self.rs.train_progress == 0:  # a fresh optimizer for the round, as the authors do
      self.train_state = solver.create_train_state(self.policy, step_fn.optimizer,
                                                   jax.random.key(0), self.mesh,
                                                   params=self.train_state.params)
    rows_of_process = parallel.process_slice(cfg.batch_size)
    with metrics_lib.progress(total=total, initial=self.rs.train_progress,
                              desc=f"round {t} train", unit="step") as bar:
      for s in range(self.rs.train_progress, total):
        epoch, b = divmod(s, per_epoch)
        # Each epoch: a seeded permutation of the pairs, its end completed cyclically from
        # its start so that every batch is full (static shapes).
        order = np.resize(np.random.default_rng([seed, epoch]).permutation(n),
                          per_epoch * cfg.batch_size)
        rows = order[b * cfg.batch_size:(b + 1) * cfg.batch_size][rows_of_process]
        batch = step_fn.shard_batch({k: pairs[k][rows] for k in keys})
        step_start = time.perf_counter()
        self.train_state, m = step_fn(self.train_state, batch)
        m = {k: float(v) for k, v in parallel.global_to_host(m).items()}
        m["tokens_per_s"] = m["tokens"] / max(time.perf_counter() - step_start, 1e-9)
        self.rs.train_step += 1
        self.rs.train_progress = s + 1
        self.writer.log({"round": t, "step": self.rs.train_step, "epoch": epoch,
                         **{f"train/{k}": v for k, v in m.items()}}, step=self.rs.train_step)
        bar.update(1)
        if s == 0:
          fault_point(t, "train_step")
        stopping = self.stop.requested()
        if stopping or (cfg.save_every_steps and (s + 1) % cfg.save_every_steps == 0
                        and s + 1 < total):
          self.ckpt.save_train(self.rs.train_step, self.train_state)
          self._save()
          if stopping:
            raise Preempted()
    self.ckpt.save_train(self.rs.train_step, self.train_state)
    self.rs.train_progress = 0
    return None, {"train/steps": total, "train/pairs": n}

  def evaluate(self, t: int):
    """The current policy on the held-out prompts: reward, win rate against round 0, length."""
    cfg = self.cfg
    convs = self.rs.heldout
    seed = phase_seed(cfg.seed, 0, "evaluate")  # the same draws every round
    samples, _ = self.sample(convs, cfg.eval_num_samples, seed, "evaluate",
                             temperature=cfg.eval_temperature,
                             max_new_tokens=cfg.eval_max_new_tokens)
    rewards, rec = self.score(convs, samples, "evaluate")
    if t == 0:
      self.rs.arrays["baseline/eval_rewards"] = rewards
    base = self.rs.arrays["baseline/eval_rewards"]
    both = np.isfinite(rewards) & np.isfinite(base)
    wins = np.where(rewards > base, 1.0, np.where(rewards == base, 0.5, 0.0))
    texts = [c[-1]["content"] for c in convs]
    record = {"eval/reward_mean": float(np.nanmean(rewards)) if np.isfinite(rewards).any()
              else float("nan"),
              "eval/win_rate": float(wins[both].mean()) if both.any() else float("nan"),
              "eval/length_mean": float(samples.lengths().mean()),
              "eval/stop_rate": float(samples.stopped.mean()),
              "eval/prompts": len(convs), "eval/failed": rec["evaluate/failed"],
              **self._group_means("eval/reward", texts, np.nanmean(rewards, axis=1))}
    return rewards, record

  # ================================================================ end of a round

  def finish_round(self, t: int, children: Sequence[str]) -> None:
    """The round's files and summary, the next round's prompt set, then a save."""
    buf, cfg = self.rs.buffer, self.cfg
    record = {"round": t, "phase": "end"}
    self.rs.history.append(self._round_summary(t))
    if t > 0:
      self._write_round_prompts(t, children)
      record.update(buf.next_round(children, retain_fraction=cfg.retain_fraction,
                                   retain=cfg.retain, seed=phase_seed(cfg.seed, t, "end")))
    self.writer.log(record, step=self.rs.train_step)
    self._print_summary(t, children)
    self._write_config()
    self.rs.start_round(t + 1)
    self._save()
    if cfg.plots and self.is_chief:
      plots.write_plots(self.workdir, self._log)
    if self.stop.requested():
      raise Preempted()

  # The end-of-round table: column -> the phase record value it shows.
  _SUMMARY = (("eval reward", "eval/reward_mean"), ("win rate", "eval/win_rate"),
              ("info", "info/mean"), ("prompts", "select/prompts"),
              ("selected", "select/selected"), ("evolved", "evolve/kept"),
              ("pairs", "pairs/train"), ("steps", "train/steps"))

  def _round_summary(self, t: int) -> dict:
    """The round's row of the end-of-round table, from its phase records."""
    records = self.rs.phase_meta.get("records", {})
    merged = {k: v for r in records.values() for k, v in r.items()}
    row = {"round": t}
    row.update({col: merged.get(key) for col, key in self._SUMMARY})
    prefix = "eval/reward/"
    kinds = [k[len(prefix):] for k in merged if k.startswith(prefix)]
    if kinds:  # held-out reward per group of the first kind (e.g. per level)
      first = kinds[0].split("_")[0]
      row.update({k.split("_", 1)[1]: merged[prefix + k] for k in sorted(kinds)
                  if k.split("_")[0] == first})
      row["group_kind"] = first
    return row

  def _print_summary(self, t: int, children: Sequence[str]) -> None:
    if not self.is_chief:
      return
    history = self.rs.history
    cols = ["round"] + [c for c, _ in self._SUMMARY[:2]]
    groups = sorted({k for h in history for k in h if k not in cols and k != "group_kind"
                     and k not in dict(self._SUMMARY)}, key=lambda g: (len(g), g))
    kind = next((h["group_kind"] for h in history if "group_kind" in h), "")
    headers = cols + [f"{kind} {g}" for g in groups] + [c for c, _ in self._SUMMARY[2:]]
    rows = [[h.get(c) for c in cols] + [h.get(g) for g in groups] +
            [h.get(c) for c, _ in self._SUMMARY[2:]] for h in history]
    text = metrics_lib.format_table(headers, rows, title=f"eva_jax: after round {t} "
                                    "(held-out reward; informativeness of the round's prompts)")
    buf = self.rs.buffer
    examples = [buf[c] for c in children[:self.cfg.summary_examples]]
    if examples:
      text += "\n" + metrics_lib.format_table(
          ["operator", "parent", "evolved"],
          [[c.operator, buf[c.parent_id].text, c.text] for c in examples], max_width=60,
          title="evolved prompts beside their parents")
    self._log(text)

  def _write_round_prompts(self, t: int, children: Sequence[str]) -> None:
    if not self.is_chief:
      return
    ids = list(self.rs.buffer.active) + [c for c in children if c not in
                                         set(self.rs.buffer.active)]
    path = self.workdir / "prompts" / f"round_{t}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(self.rs.buffer.to_jsonl(ids, lineage=True))

  def _write_config(self) -> None:
    if self.is_chief:
      (self.workdir / "config.gin").write_text(gin.operative_config_str() or gin.config_str())

  # ================================================================ the policy

  def _starting_params(self):
    """The run's starting params (kept when they are the reference of every round)."""
    params = self._initial_params
    if params is None:
      params = self.initial.params(self.policy, self.mesh, self.cfg.seed)
      if self.cfg.reference == "initial":
        self._initial_params = params
    return params

  def _fresh_train_state(self, params):
    return solver.create_train_state(self.policy, self._default_optimizer,
                                     jax.random.key(self.cfg.seed), self.mesh, params=params)


def run(workdir, *, allow_config_change: bool = False, install_sigterm: bool = True) -> int:
  """Runs (or resumes) the gin-configured eva run in `workdir`; returns the exit status."""
  stop = StopSignal(install=install_sigterm)
  try:
    return EvaRun(workdir, stop=stop, allow_config_change=allow_config_change).run()
  finally:
    stop.restore()
    sys.stdout.flush()

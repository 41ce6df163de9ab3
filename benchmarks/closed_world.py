"""Does the creator help? eva against its ablations in the closed world, at an equal budget.

    python benchmarks/closed_world.py --seeds 0 1 2 --out /tmp/closed_world

Runs the default closed-world configuration (`eva_tiny.gin`) in four arms, each for every
seed, and writes OUT/closed_world.json, OUT/closed_world.md (a table) and OUT/closed_world.png
(held-out reward per round, mean and spread over seeds):

| arm | selection | evolution | pairs |
|---|---|---|---|
| `eva` | reward_gap, weighted | yes | 80% on the children, 20% fresh |
| `fixed` | - | no | the seed prompts' pairs, every round |
| `uniform` | uniform | yes | 80% on the children, 20% fresh |
| `no_evolution` | reward_gap, weighted | no | 80% on the selected prompts, 20% fresh |

Every arm trains on the same number of pairs with the same number of steps each round
(`EvaConfig.pairs_per_round`), from the same warm-started solver, and is evaluated on the same
held-out prompts (greedy decoding), so the arms differ only in which prompts their pairs come
from. A seed changes the run's sampling, selection and evolution draws.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

ARMS = {
    "eva": [],
    "fixed": ["EvaConfig.evolve = False", "EvaConfig.retain_fraction = 1.0",
              "mix_pairs.evolved_fraction = 0.0", "mix_pairs.fresh_fraction = 1.0"],
    "uniform": ["select_prompts.method = 'uniform'"],
    "no_evolution": ["EvaConfig.evolve = False", "EvaConfig.retain_fraction = 1.0"],
}


def run_arm(arm: str, seed: int, workdir: str, rounds: int, extra: list[str]) -> dict:
  from eva_jax import main as eva_main, metrics  # pylint: disable=import-outside-toplevel
  bindings = ARMS[arm] + [f"EvaConfig.seed = {seed}", f"EvaConfig.num_rounds = {rounds}",
                          "EvaConfig.plots = False"] + extra
  args = ["--workdir", workdir]
  for b in bindings:
    args += ["--gin_bindings", b]
  start = time.perf_counter()
  status = eva_main.main(args)
  seconds = time.perf_counter() - start
  if status != 0:
    raise RuntimeError(f"arm {arm} seed {seed} exited {status}")
  lines = metrics.read_metrics(workdir)
  evals = {line["round"]: line for line in lines if "eval/reward_mean" in line}
  levels = sorted({k for e in evals.values() for k in e if k.startswith("eval/reward/level_")},
                  key=lambda k: int(k.rsplit("_", 1)[1]))
  pairs = [line.get("pairs/train") for line in lines if line.get("phase") == "pairs"]
  steps = [line.get("train/steps") for line in lines if line.get("phase") == "train"]
  return {"arm": arm, "seed": seed, "seconds": seconds, "pairs": pairs, "steps": steps,
          "reward": [evals[r]["eval/reward_mean"] for r in sorted(evals)],
          "levels": {k.rsplit("_", 1)[1]: [evals[r].get(k) for r in sorted(evals)]
                     for k in levels}}


def summarize(runs: list[dict]) -> dict:
  out = {}
  for arm in ARMS:
    rs = [r for r in runs if r["arm"] == arm]
    if not rs:
      continue
    reward = np.array([r["reward"] for r in rs])
    out[arm] = {"mean": reward.mean(0).tolist(), "std": reward.std(0).tolist(),
                "final": [float(x) for x in reward[:, -1]],
                "levels_final_mean": {lv: float(np.mean([r["levels"][lv][-1] for r in rs]))
                                      for lv in rs[0]["levels"]},
                "pairs": rs[0]["pairs"], "steps": rs[0]["steps"]}
  return out


def table(summary: dict) -> str:
  rounds = len(next(iter(summary.values()))["mean"])
  head = "| arm | " + " | ".join(f"round {r}" for r in range(rounds)) + " | final, per seed |"
  rows = [head, "|" + "---|" * (rounds + 2)]
  for arm, s in summary.items():
    cells = [f"{m:.3f} ± {d:.3f}" for m, d in zip(s["mean"], s["std"])]
    rows.append(f"| {arm} | " + " | ".join(cells) + " | " +
                ", ".join(f"{x:.3f}" for x in s["final"]) + " |")
  levels = list(next(iter(summary.values()))["levels_final_mean"])
  rows += ["", "Final held-out reward per level (mean over seeds):", "",
           "| arm | " + " | ".join(f"level {lv}" for lv in levels) + " |",
           "|" + "---|" * (len(levels) + 1)]
  for arm, s in summary.items():
    rows.append(f"| {arm} | " + " | ".join(f"{s['levels_final_mean'][lv]:.3f}"
                                           for lv in levels) + " |")
  return "\n".join(rows) + "\n"


def plot(summary: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
  for arm, s in summary.items():
    mean, std = np.array(s["mean"]), np.array(s["std"])
    x = np.arange(len(mean))
    ax.plot(x, mean, marker="o", label=arm, linewidth=2.2 if arm == "eva" else 1.3)
    ax.fill_between(x, mean - std, mean + std, alpha=0.15)
  ax.set_xticks(np.arange(len(next(iter(summary.values()))["mean"])))
  ax.set_xlabel("round (0: the warm-started solver)")
  ax.set_ylabel("held-out reward (greedy)")
  ax.set_title("closed world: eva against its ablations, equal budget")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp())
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="extra bindings for every arm")
  parser.add_argument("--replot", default=None,
                      help="only redraw OUT/closed_world.png from this closed_world.json")
  args = parser.parse_args(argv)
  if args.replot:
    with open(args.replot, encoding="utf-8") as f:
      plot(json.load(f)["summary"], os.path.join(args.out, "closed_world.png"))
    return 0
  os.environ.setdefault("EVA_JAX_NO_PROGRESS", "1")
  os.makedirs(args.out, exist_ok=True)
  start, runs = time.perf_counter(), []
  for seed in args.seeds:
    for arm in args.arms:
      workdir = os.path.join(args.out, "runs", f"{arm}_seed{seed}")
      runs.append(run_arm(arm, seed, workdir, args.rounds, args.gin_bindings))
      print(json.dumps({k: runs[-1][k] for k in ("arm", "seed", "reward", "seconds")}),
            flush=True)
  summary = summarize(runs)
  result = {"benchmark": "closed_world", "seeds": args.seeds, "rounds": args.rounds,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
            "python": sys.version.split()[0], "seconds": round(time.perf_counter() - start, 1),
            "extra_bindings": args.gin_bindings, "summary": summary, "runs": runs}
  with open(os.path.join(args.out, "closed_world.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, "closed_world.md"), "w", encoding="utf-8") as f:
    f.write(table(summary))
  plot(summary, os.path.join(args.out, "closed_world.png"))
  print(table(summary))
  print(json.dumps({k: result[k] for k in ("benchmark", "seeds", "rounds", "machine",
                                           "seconds")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Plots of a run, from its metrics.jsonl: WORKDIR/plots/*.png (the `plots` extra).

* `heldout_reward.png`: the held-out reward per round, overall and per group (e.g. per
  difficulty level of the closed world);
* `informativeness.png`: the mean informativeness of each round's prompts, overall and per
  group (e.g. per task family).

matplotlib is optional: without it `write_plots` says once which extra to install.
"""

from __future__ import annotations

import io
from typing import Callable, Optional

from etils import epath

from eva_jax import metrics

_warned = False


def _series(lines: list[dict], prefix: str, overall: str) -> dict[str, tuple[list, list]]:
  """{label: (rounds, values)} for the overall key and every `prefix<group>` key."""
  out: dict[str, tuple[list, list]] = {}
  for line in lines:
    for key, value in line.items():
      if value is None or not isinstance(value, (int, float)):
        continue
      if key == overall:
        label = "all"
      elif key.startswith(prefix):
        label = key[len(prefix):].replace("_", " ")
      else:
        continue
      rounds, values = out.setdefault(label, ([], []))
      rounds.append(line["round"])
      values.append(value)
  return out


def _plot(path: epath.Path, series: dict, title: str, ylabel: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
  for label, (rounds, values) in sorted(series.items(), key=lambda kv: (kv[0] != "all", kv[0])):
    ax.plot(rounds, values, marker="o", label=label, linewidth=2.5 if label == "all" else 1.2,
            color="black" if label == "all" else None)
  ax.set_xlabel("round")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if len(series) > 1:
    ax.legend(fontsize=8, ncol=2)
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, format="png")
  plt.close(fig)
  path.write_bytes(buf.getvalue())


def write_plots(workdir, log: Optional[Callable[[str], None]] = None) -> list[str]:
  """Writes the run's plots; returns their paths (none without matplotlib)."""
  global _warned
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    if not _warned and log is not None:
      log("eva_jax: plots need matplotlib: pip install 'eva-jax[plots]' (skipped).")
    _warned = True
    return []
  lines = metrics.read_metrics(workdir)
  folder = epath.Path(workdir) / "plots"
  folder.mkdir(parents=True, exist_ok=True)
  written = []
  for name, prefix, overall, title, ylabel in (
      ("heldout_reward", "eval/reward/", "eval/reward_mean", "held-out reward", "mean reward"),
      ("informativeness", "info/", "info/mean", "informativeness of the round's prompts",
       "mean informativeness")):
    series = _series(lines, prefix, overall)
    series = {k: v for k, v in series.items() if k not in ("mean", "max", "min",
                                                             "zero fraction",
                                                             "selected mean")}
    if series:
      path = folder / f"{name}.png"
      _plot(path, series, title, ylabel)
      written.append(str(path))
  return written

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


def _draw(ax, series: dict, title: str, ylabel: str) -> None:
  for label, (rounds, values) in sorted(series.items(), key=lambda kv: (kv[0] != "all", kv[0])):
    ax.plot(rounds, values, marker="o", label=label, linewidth=2.5 if label == "all" else 1.2,
            color="black" if label == "all" else None)
  ax.xaxis.get_major_locator().set_params(integer=True)  # rounds are whole numbers
  ax.set_xlabel("round")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if len(series) > 1:
    ax.legend(fontsize=8, ncol=2)


def _png(fig) -> bytes:
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, format="png")
  return buf.getvalue()


def _plot(path: epath.Path, series: dict, title: str, ylabel: str) -> None:
  # A Figure without pyplot: no backend is chosen or changed (a notebook's stays as it is).
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(6.4, 4.0), dpi=100)
  _draw(fig.add_subplot(), series, title, ylabel)
  path.write_bytes(_png(fig))


# The run's figures: (file name, group prefix, overall key, title, y label).
FIGURES = (
    ("heldout_reward", "eval/reward/", "eval/reward_mean", "held-out reward", "mean reward"),
    ("informativeness", "info/", "info/mean", "informativeness of the round's prompts",
     "mean informativeness"))
# info/ keys that are statistics of the overall informativeness, not groups.
_INFO_STATS = ("mean", "max", "min", "zero fraction", "selected mean")


def run_series(lines: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
  """{figure name: {label: (rounds, values)}} of the run's metric lines: "all" is the overall
  series, the other labels the groups (e.g. "level 3", "family add"); figures without any
  data are left out."""
  out = {}
  for name, prefix, overall, _, _ in FIGURES:
    series = {k: v for k, v in _series(lines, prefix, overall).items()
              if k not in _INFO_STATS}
    if series:
      out[name] = series
  return out


def run_figure(workdir_or_lines, path=None):
  """The run's plots side by side in one matplotlib Figure (for notebooks): the held-out
  reward per round and the informativeness of each round's prompts, each overall and per
  group. Saved as PNG to `path` (local or gs://) when given.

  Args:
    workdir_or_lines: a workdir (local or gs://) or the lines of `metrics.read_metrics`.

  pyplot is not used, so a notebook's backend is left alone: display the returned figure
  (or the saved file). Needs matplotlib (the `plots` extra).
  """
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  lines = (list(workdir_or_lines) if isinstance(workdir_or_lines, (list, tuple))
           else metrics.read_metrics(workdir_or_lines))
  series = run_series(lines)
  shown = [f for f in FIGURES if f[0] in series]
  fig = Figure(figsize=(6.4 * max(1, len(shown)), 4.2), dpi=100)
  for n, (name, _, _, title, ylabel) in enumerate(shown):
    _draw(fig.add_subplot(1, len(shown), n + 1), series[name], title, ylabel)
  if path is not None:
    out = epath.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(_png(fig))
  return fig


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
  series = run_series(lines)
  for name, _, _, title, ylabel in FIGURES:
    if name in series:
      path = folder / f"{name}.png"
      _plot(path, series[name], title, ylabel)
      written.append(str(path))
  return written

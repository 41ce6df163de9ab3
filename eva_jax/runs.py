"""Reading a run's workdir after the fact: the rounds side by side, and the lineage of evolved
prompts (for notebooks and scripts; `colabs/inside_a_run.ipynb` uses it).

    summaries = round_summaries(workdir)        # one dict per round, from metrics.jsonl
    print(round_table(workdir))                 # the same as a plain-text table
    tree = read_lineage(workdir)                # every prompt of prompts/round_*.jsonl
    tree.edges                                  # [(parent id, child id), ...]
    fig = draw_lineage(tree, "lineage.png")     # parents to children across rounds

What the loop writes (see `eva_jax.loop`): `metrics.jsonl`, one JSON object a line, each with
"round" (a phase's line also has "phase" and the phase's numbers, a train step's line
"step" and "train/..."); and after every round t >= 1, `prompts/round_t.jsonl`, one prompt
record a line (`eva_jax.creator.PromptRecord` fields plus "active" and "lineage"): the round's
prompt set ("active": true, with the reward statistics and informativeness round t measured)
followed by the children born in round t ("parent_id", "operator", "round_born": t, and
"lineage": the ids of its ancestors from the original prompt down to its parent).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Optional, Sequence, Union

from etils import epath

from eva_jax import metrics as metrics_lib

PROMPTS_DIR = "prompts"
_ROUND_FILE = re.compile(r"^round_(\d+)\.jsonl$")

# The round table's columns: (header, metrics key). Train columns are means over the round's
# train steps (see `round_summaries`).
COLUMNS = (("eval reward", "eval/reward_mean"), ("win rate", "eval/win_rate"),
           ("info", "info/mean"), ("prompts", "select/prompts"),
           ("selected", "select/selected"), ("evolved", "evolve/kept"),
           ("pairs", "pairs/train"), ("steps", "train/steps"),
           ("loss", "train/loss"), ("accuracy", "train/rewards/accuracies"))
_MEANS = ("train/loss", "train/rewards/accuracies")


# ------------------------------------------------------------------------------ rounds


def _lines(workdir_or_lines) -> list[dict]:
  if isinstance(workdir_or_lines, (list, tuple)):
    return list(workdir_or_lines)
  return metrics_lib.read_metrics(workdir_or_lines)


def round_summaries(workdir_or_lines: Union[Any, Sequence[dict]],
                    group: Optional[str] = None) -> list[dict]:
  """One dict per round found in metrics.jsonl, in round order.

  Each has "round" and every key of `COLUMNS` (None where the round has no such number;
  round 0 only evaluates): the last value logged in the round, except "train/loss" and
  "train/rewards/accuracies", the means over the round's train steps. With `group` (e.g.
  "level" for the closed world), also the held-out reward of each group of that kind, keyed
  "<group> <label>" (from "eval/reward/<group>_<label>").

  Args:
    workdir_or_lines: a workdir (local or gs://) or the lines of `metrics.read_metrics`.
    group: a prompt-group kind of the run (`EvaConfig.prompt_groups`), or None.
  """
  merged: dict[int, dict] = {}
  steps: dict[int, dict[str, list]] = {}
  for line in _lines(workdir_or_lines):
    if "round" not in line:
      continue
    r = int(line["round"])
    into = merged.setdefault(r, {})
    for k, v in line.items():
      if k in _MEANS and "step" in line:
        if isinstance(v, (int, float)):
          steps.setdefault(r, {}).setdefault(k, []).append(float(v))
      elif v is not None:
        into[k] = v
  prefix = f"eval/reward/{group}_" if group else None
  out = []
  for r in sorted(merged):
    line = merged[r]
    row: dict[str, Any] = {"round": r}
    for _, key in COLUMNS:
      if key in _MEANS:
        values = steps.get(r, {}).get(key)
        row[key] = sum(values) / len(values) if values else None
      else:
        row[key] = line.get(key)
    if prefix:
      labels = sorted((k[len(prefix):] for k in line if k.startswith(prefix)),
                      key=lambda s: (len(s), s))  # "2" before "10"
      row.update({f"{group} {label}": line[prefix + label] for label in labels})
    out.append(row)
  return out


def round_table(workdir_or_lines: Union[Any, Sequence[dict]], group: Optional[str] = None,
                title: Optional[str] = "eva rounds (held-out reward; the round's prompts, "
                "pairs and training)") -> str:
  """`round_summaries` as a plain-text table (`metrics.format_table`), one row per round."""
  rows = round_summaries(workdir_or_lines, group)
  known = {"round"} | {key for _, key in COLUMNS}
  extra = []  # the group columns
  for row in rows:
    extra += [k for k in row if k not in known and k not in extra]
  headers = ["round"] + [h for h, _ in COLUMNS[:2]] + extra + [h for h, _ in COLUMNS[2:]]
  keys = ["round"] + [k for _, k in COLUMNS[:2]] + extra + [k for _, k in COLUMNS[2:]]
  return metrics_lib.format_table(headers, [[row.get(k) for k in keys] for row in rows],
                                  title=title)


# ------------------------------------------------------------------------------ lineage


def read_round_prompts(workdir) -> dict[int, list[dict]]:
  """{t: the records of prompts/round_t.jsonl, in file order} for every round file, as the
  JSON objects the loop wrote (see the module docstring).

  Raises:
    FileNotFoundError: the workdir has no prompts/ folder (no round finished yet).
    ValueError: a line is not JSON (file and line named).
  """
  folder = epath.Path(workdir) / PROMPTS_DIR
  if not folder.exists():
    raise FileNotFoundError(f"{folder} does not exist: the run in {workdir} has not finished "
                            "a round yet (round files are written at the end of rounds >= 1).")
  out: dict[int, list[dict]] = {}
  for path in folder.iterdir():
    m = _ROUND_FILE.match(path.name)
    if not m:
      continue
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not JSON ({e.msg}).") from e
    out[int(m.group(1))] = records
  return dict(sorted(out.items()))


@dataclasses.dataclass
class Lineage:
  """The prompts of a run's round files and who was evolved from whom.

  Attributes:
    nodes: {id: record}, each prompt's record from the last round file that lists it (so its
      latest statistics); an ancestor named only in a "lineage" list is {"id": id,
      "text": None}.
    edges: (parent id, child id) of every evolved prompt, in order of birth.
    rounds: {t: ids of round t's prompt set ("active" in round_t.jsonl)}.
  """

  nodes: dict[str, dict]
  edges: list[tuple[str, str]]
  rounds: dict[int, list[str]]

  def children_index(self) -> dict[str, list[str]]:
    """{parent id: its children ids in order of birth} (compute once for many look-ups)."""
    index: dict[str, list[str]] = {}
    for p, c in self.edges:
      index.setdefault(p, []).append(c)
    return index

  def children(self, prompt_id: str) -> list[str]:
    """The prompts evolved from `prompt_id`, in order of birth."""
    return list(self.children_index().get(prompt_id, ()))

  def parent(self, prompt_id: str) -> Optional[str]:
    return self.nodes[prompt_id].get("parent_id")

  def descendants(self, prompt_id: str, index: Optional[dict] = None) -> list[str]:
    """Every prompt evolved from `prompt_id`, directly or not (depth first)."""
    index = self.children_index() if index is None else index
    out = []
    for c in index.get(prompt_id, ()):
      out += [c] + self.descendants(c, index)
    return out

  def roots(self) -> list[str]:
    """Prompts with descendants but no parent (the original prompts that were evolved), the
    most prolific first (ties: in id order)."""
    index = self.children_index()
    roots = [i for i, rec in self.nodes.items() if rec.get("parent_id") is None and i in index]
    return sorted(roots, key=lambda i: (-len(self.descendants(i, index)), i))

  def ancestry(self, prompt_id: str) -> list[str]:
    """Ids from the original prompt down to `prompt_id` (inclusive)."""
    chain = [prompt_id]
    while self.nodes[chain[-1]].get("parent_id") is not None:
      chain.append(self.nodes[chain[-1]]["parent_id"])
    return chain[::-1]


def read_lineage(workdir_or_rounds) -> Lineage:
  """The `Lineage` of a workdir's round files (or of `read_round_prompts`' result)."""
  rounds = (workdir_or_rounds if isinstance(workdir_or_rounds, dict)
            else read_round_prompts(workdir_or_rounds))
  nodes: dict[str, dict] = {}
  edges: list[tuple[str, str]] = []
  active: dict[int, list[str]] = {}
  for t, records in sorted(rounds.items()):
    for rec in records:
      pid = rec["id"]
      for ancestor in rec.get("lineage") or ():
        nodes.setdefault(ancestor, {"id": ancestor, "text": None})
      if rec.get("parent_id") is not None:
        nodes.setdefault(rec["parent_id"], {"id": rec["parent_id"], "text": None})
        if (rec["parent_id"], pid) not in edges:
          edges.append((rec["parent_id"], pid))
      nodes[pid] = rec
      if rec.get("active"):
        active.setdefault(t, []).append(pid)
  return Lineage(nodes=nodes, edges=edges, rounds=active)


def _short(text: Optional[str], width: int) -> str:
  text = "?" if text is None else " ".join(str(text).split())
  return text if len(text) <= width else text[:width - 1] + "\u2026"


def draw_lineage(tree: Lineage, path=None, *, max_trees: int = 12, label_width: int = 30):
  """A matplotlib Figure of the lineage: one row per prompt, x = the round it was born in,
  a line from every parent to each child, markers coloured by the evolving operator, each
  prompt's text beside it. Only prompts that were evolved appear (the `max_trees` most
  prolific original prompts and their descendants). Saved as PNG to `path` (local or gs://)
  when given.

  Needs matplotlib (the `plots` extra); pyplot is not used, so any backend is left alone
  (show it in a notebook by displaying the figure or the saved file).
  """
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  all_roots = tree.roots()
  roots = all_roots[:max_trees]
  index = tree.children_index()
  order: list[tuple[str, int]] = []  # (id, depth) in depth-first order

  def visit(pid, depth):
    order.append((pid, depth))
    for c in index.get(pid, ()):
      visit(c, depth + 1)

  for r in roots:
    visit(r, 0)
  y_of = {pid: -n for n, (pid, _) in enumerate(order)}
  round_of = {pid: int(tree.nodes[pid].get("round_born") or 0) for pid, _ in order}
  operators = sorted({tree.nodes[p].get("operator") for p, _ in order} - {None})
  colors = {op: f"C{n % 10}" for n, op in enumerate(operators)}
  last_round = max(round_of.values(), default=0)

  fig = Figure(figsize=(8.0 + 1.2 * last_round, max(2.5, 0.3 * len(order) + 1.2)), dpi=100)
  ax = fig.add_subplot()
  for parent, child in tree.edges:
    if parent in y_of and child in y_of:
      ax.plot([round_of[parent], round_of[parent], round_of[child]],
              [y_of[parent], y_of[child], y_of[child]], color="0.6", linewidth=1, zorder=1)
  for op in [None] + operators:
    ids = [p for p, _ in order if tree.nodes[p].get("operator") == op]
    if ids:
      ax.scatter([round_of[p] for p in ids], [y_of[p] for p in ids], s=36, zorder=2,
                 color="black" if op is None else colors[op],
                 label="original prompt" if op is None else op)
  for pid, _ in order:
    ax.annotate(_short(tree.nodes[pid].get("text"), label_width), (round_of[pid], y_of[pid]),
                xytext=(6, 0), textcoords="offset points", va="center", fontsize=7)
  ax.set_xticks(range(last_round + 1))
  ax.set_xlim(-0.3, last_round + 1.2)
  ax.set_yticks([])
  ax.set_xlabel("round born")
  ax.set_title(f"lineage of evolved prompts ({len(roots)} of {len(all_roots)} evolved "
               f"originals, {sum(1 for _, d in order if d)} descendants)")
  for side in ("left", "right", "top"):
    ax.spines[side].set_visible(False)
  if order:
    ax.legend(fontsize=7, loc="lower right", frameon=False)
  fig.tight_layout()
  if path is not None:
    import io  # pylint: disable=import-outside-toplevel
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out = epath.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
  return fig

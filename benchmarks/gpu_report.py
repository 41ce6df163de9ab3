"""Reads a GPU session's results ($OUT of `gpu_session.sh`: eva_jax's benchmark JSONs beside
the Tunix peers') and prints them against issue 10's targets, as Markdown; writes the same
as gpu_report.json there.

  python benchmarks/gpu_report.py [DIR ...]   # default: $OUT, else /tmp/gpu_session

Several DIRs (the two parts' folders) are read as one. The targets, on one GPU at the peers'
shapes:
  train step   a shipped configuration (mixed_precision*) at >= 1.2x Tunix's tokens/s with a
               peak no higher than Tunix's; the default at >= 1.0x; the default's compile
               under 30 s
  sampler      the default at >= 2x Tunix's new tokens/s and >= 50% of its roofline; compile
               under 20 s; the first call faster than Tunix's
A target whose figures are missing (a step cut or failed) reads "not measured", never "met".
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Optional

TRAIN_SPEEDUP, TRAIN_DEFAULT_SPEEDUP, TRAIN_COMPILE_S = 1.2, 1.0, 30.0
SAMPLER_SPEEDUP, SAMPLER_ROOFLINE, SAMPLER_COMPILE_S = 2.0, 0.5, 20.0


def load(dirs) -> dict:
  """{file stem: parsed JSON} of every *.json in `dirs` (later folders win on a clash); a
  file that does not parse (a step killed while writing) is left out."""
  found = {}
  for folder in dirs:
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
      stem = os.path.splitext(os.path.basename(path))[0]
      if stem == "gpu_report":
        continue
      try:
        with open(path) as f:
          found[stem] = json.load(f)
      except (OSError, ValueError):
        continue
  return found


def _peer(results: dict, prefix: str) -> Optional[dict]:
  names = sorted(k for k in results if k.startswith(prefix))
  return results[names[0]] if names else None


def _ratio(a, b) -> Optional[float]:
  return a / b if a is not None and b else None


def _verdict(ok: Optional[bool]) -> str:
  return "not measured" if ok is None else ("met" if ok else "NOT met")


def _all(*checks) -> Optional[bool]:
  return None if any(c is None for c in checks) else all(checks)


def _at_most(value, bound) -> Optional[bool]:
  return None if value is None or bound is None else value <= bound


def _at_least(value, bound) -> Optional[bool]:
  return None if value is None or bound is None else value >= bound


def summarize(results: dict) -> dict:
  """The rows and the target verdicts (see the module docstring) of a session's results."""
  tunix_train = _peer(results, "peer_tunix_dpo")
  tunix_sampler = _peer(results, "peer_tunix_generate")
  train, sampler = {}, {}
  for stem, r in results.items():
    if stem.startswith("train_") and "tokens_per_s" in r:
      train[stem[len("train_"):]] = dict(
          tokens_per_s=r["tokens_per_s"], peak_memory_gib=r.get("peak_memory_gib"),
          compile_s=r.get("compile_s"), mfu=r.get("mfu"), xla_flags=r.get("xla_flags", ""),
          share_prompt=r.get("share_prompt"),
          vs_tunix=_ratio(r["tokens_per_s"], (tunix_train or {}).get("tokens_per_s")))
    elif stem.startswith("sampler_") and "new_tokens_per_s" in r:
      sampler[stem[len("sampler_"):]] = dict(
          new_tokens_per_s=r["new_tokens_per_s"], roofline_fraction=r.get("roofline_fraction"),
          hlo_roofline_fraction_bound=r.get("hlo_roofline_fraction_bound"),
          compile_s=r.get("compile_s"), first_call_s=r.get("first_call_s"),
          xla_flags=r.get("xla_flags", ""),
          vs_tunix=_ratio(r["new_tokens_per_s"], (tunix_sampler or {}).get("new_tokens_per_s")))

  tunix_peak = (tunix_train or {}).get("peak_gib")
  shipped = {k: _all(_at_least(v["vs_tunix"], TRAIN_SPEEDUP),
                     _at_most(v["peak_memory_gib"], tunix_peak))
             for k, v in train.items() if k.startswith("mixed_precision")}
  # The fastest run that meets the target; else the fastest measured one, else any.
  fastest = lambda names: max(names, key=lambda k: train[k]["tokens_per_s"]) if names else None
  best = (fastest([k for k, ok in shipped.items() if ok])
          or fastest([k for k, ok in shipped.items() if ok is not None]) or fastest(list(shipped)))
  default, default_sampler = train.get("default"), sampler.get("default")
  targets = {
      "train: a shipped config >= 1.2x Tunix at <= its peak": dict(
          run=best, ok=shipped.get(best)),
      "train: the default >= 1.0x Tunix": dict(
          run="default", ok=_at_least((default or {}).get("vs_tunix"), TRAIN_DEFAULT_SPEEDUP)),
      "train: the default compiles in < 30 s": dict(
          run="default", ok=_at_most((default or {}).get("compile_s"), TRAIN_COMPILE_S)),
      "sampler: the default >= 2x Tunix": dict(
          run="default", ok=_at_least((default_sampler or {}).get("vs_tunix"), SAMPLER_SPEEDUP)),
      "sampler: the default >= 50% of its roofline": dict(
          run="default", ok=_at_least((default_sampler or {}).get("roofline_fraction"),
                                      SAMPLER_ROOFLINE)),
      "sampler: the default compiles in < 20 s": dict(
          run="default", ok=_at_most((default_sampler or {}).get("compile_s"),
                                     SAMPLER_COMPILE_S)),
      "sampler: the first call faster than Tunix's": dict(
          run="default", ok=_at_most((default_sampler or {}).get("first_call_s"),
                                     (tunix_sampler or {}).get("first_call_s"))),
  }
  for target in targets.values():
    target["verdict"] = _verdict(target["ok"])
  attention = results.get("attention")
  # Which device, model and JAX the figures come from (the targets mean gemma2_2b on a GPU).
  seen = lambda key: sorted({str(r[key]) for r in results.values() if r.get(key) is not None})
  about = dict(device=seen("device"), config=seen("config") + seen("model"), jax=seen("jax"))
  return dict(about=about, train=train, sampler=sampler, tunix_train=tunix_train,
              tunix_sampler=tunix_sampler, attention=attention, targets=targets)


def _f(x, fmt="{:.2f}") -> str:
  return "-" if x is None else fmt.format(x)


def markdown(summary: dict) -> str:
  about = summary["about"]
  lines = [f"device {', '.join(about['device']) or '?'}; model {', '.join(about['config']) or '?'}"
           f"; jax {', '.join(about['jax']) or '?'}", ""]
  tt, ts = summary["tunix_train"] or {}, summary["tunix_sampler"] or {}
  lines += ["| train step | tokens/s | x Tunix | peak GiB | compile s | MFU | prompt once "
            "| XLA_FLAGS |", "|---|---|---|---|---|---|---|---|"]
  once = lambda v: "-" if v is None else ("yes" if v else "no")
  for name, r in sorted(summary["train"].items()):
    lines.append(f"| {name} | {_f(r['tokens_per_s'], '{:.0f}')} | {_f(r['vs_tunix'])} | "
                 f"{_f(r['peak_memory_gib'], '{:.1f}')} | {_f(r['compile_s'], '{:.1f}')} | "
                 f"{_f(r['mfu'])} | {once(r.get('share_prompt'))} | "
                 f"{r['xla_flags'].strip() or '-'} |")
  lines.append(f"| Tunix | {_f(tt.get('tokens_per_s'), '{:.0f}')} | 1.00 | "
               f"{_f(tt.get('peak_gib'), '{:.1f}')} | - | - | no | - |" if tt else
               "| Tunix | not measured | | | | | | |")
  lines += ["", "| sampler | new tokens/s | x Tunix | roofline fraction | at most (HLO bytes) "
            "| compile s | first call s | XLA_FLAGS |", "|---|---|---|---|---|---|---|---|"]
  for name, r in sorted(summary["sampler"].items()):
    lines.append(f"| {name} | {_f(r['new_tokens_per_s'], '{:.0f}')} | {_f(r['vs_tunix'])} | "
                 f"{_f(r['roofline_fraction'])} | {_f(r.get('hlo_roofline_fraction_bound'))} | "
                 f"{_f(r['compile_s'], '{:.1f}')} | "
                 f"{_f(r['first_call_s'], '{:.1f}')} | {r['xla_flags'].strip() or '-'} |")
  lines.append(f"| Tunix | {_f(ts.get('new_tokens_per_s'), '{:.0f}')} | 1.00 | - | - | - | "
               f"{_f(ts.get('first_call_s'), '{:.1f}')} | - |" if ts else
               "| Tunix | not measured | | | | | | |")
  attention = summary["attention"]
  if attention:
    flash, xla = attention.get("flash", {}), attention.get("xla", {})
    errors = attention.get("flash_max_rel_error") or {}
    lines += ["", f"attention alone: flash {_f(flash.get('step_s'), '{:.4f}')} s, XLA "
              f"{_f(xla.get('step_s'), '{:.4f}')} s a step; flash's largest relative error "
              f"against XLA {_f(max(errors.values()) if errors else None, '{:.1e}')}"]
  lines += ["", "| target | run | verdict |", "|---|---|---|"]
  for name, t in summary["targets"].items():
    lines.append(f"| {name} | {t['run'] or '-'} | {t['verdict']} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  dirs = argv or [os.environ.get("OUT") or "/tmp/gpu_session"]
  summary = summarize(load(dirs))
  print(markdown(summary), flush=True)
  with open(os.path.join(dirs[0], "gpu_report.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


if __name__ == "__main__":
  main()

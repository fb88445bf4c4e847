"""Turns run folders into the paper's ablation table (markdown + CSV) and loss-curve plots.

    python experiments/summarize.py --ablation=runs/ablation/smoke \
        --stability=runs/stability/smoke --out=experiments/results/smoke --snapshot

Reads ABLATION/VARIANT/seedS/{summary.json, metrics.jsonl, analysis.json (optional)}
and STABILITY/VARIANT_lrLR/seedS/{summary.json, metrics.jsonl}. Writes to OUT:
  ablation.md, ablation.csv   per variant (mean over finished seeds): added parameters
                              (counted: num_params - baseline's), final validation
                              perplexity, Δ vs baseline, rank; mean gate score,
                              first-token attention, max activation from analysis.json;
                              the paper's numbers beside them (experiments/paper_results.py)
                              and the Spearman rank correlation of the two orderings
  stability.md, stability.csv per (variant, lr): steps reached, final loss, eval PPL,
                              loss spikes, finished or stopped
  loss_curves.png, stability.png
--snapshot first copies the small files of every run into OUT/runs/ and reads
those, so the committed table can be regenerated from what is committed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import pathlib
import re
import shutil
import statistics
import sys
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from experiments import paper_results  # pylint: disable=g-import-not-at-top,wrong-import-position

RUN_FILES = ("summary.json", "metrics.jsonl", "analysis.json", "config.json", "retrieval.json")
ANALYSIS_KEYS = ("gate_score_mean", "first_token_attention", "max_activation")
ABLATION_COLUMNS = (
    "variant", "seeds", "added_params", "active_params", "ppl", "delta_ppl", "rank",
    "train_gate_score_mean", "gate_score_mean", "first_token_attention", "max_activation",
    "paper_table", "paper_added_params_m", "paper_ppl", "paper_delta_ppl", "paper_rank",
    "paper_gate_score_mean", "paper_first_token_attention", "paper_max_activation")
STABILITY_COLUMNS = ("variant", "lr", "seed", "steps", "num_steps", "final_loss", "ppl",
                     "loss_spikes", "status")


def read_run(folder: pathlib.Path) -> dict[str, Any]:
  """{'summary', 'analysis', 'retrieval', 'config': dict or None, 'metrics': [rows]} of one run."""
  def load(name: str) -> Optional[dict[str, Any]]:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None
  metrics_path = folder / "metrics.jsonl"
  metrics = ([json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
             if metrics_path.exists() else [])
  return {"summary": load("summary.json"), "metrics": metrics,
          "analysis": load("analysis.json"), "retrieval": load("retrieval.json"),
          "config": load("config.json")}


def read_runs(root: pathlib.Path) -> dict[str, list[dict[str, Any]]]:
  """{name: [run of each seed folder]} for ROOT/NAME/seedS, names and seeds sorted."""
  out: dict[str, list[dict[str, Any]]] = {}
  for name_dir in sorted(p for p in root.iterdir() if p.is_dir()):
    seeds = sorted((p for p in name_dir.glob("seed*") if p.is_dir()),
                   key=lambda p: int(p.name[4:]))
    runs = [dict(read_run(p), seed=int(p.name[4:])) for p in seeds]
    if runs:
      out[name_dir.name] = runs
  return out


def read_grid(root: pathlib.Path,
              first: str = "testbed") -> dict[str, dict[str, list[dict[str, Any]]]]:
  """{setting: read_runs(ROOT/SETTING)} for every folder of ROOT, `first` first."""
  folders = sorted((p for p in root.iterdir() if p.is_dir()),
                   key=lambda p: (p.name != first, p.name))
  return {s.name: read_runs(s) for s in folders}


def tokens_per_step(run: dict[str, Any]) -> int:
  config = run["config"]
  return config["train"]["batch_size"] * config["data"]["seq_len"]


def train_minutes(run: dict[str, Any], until_step: Optional[int] = None) -> float:
  """Training time up to `until_step` (default: the end), from the logged tokens/s.

  Each logged row covers the steps since the previous one at its tokens_per_sec;
  compilation and evaluation are not included.
  """
  seconds, previous = 0.0, 0
  for r in run["metrics"]:
    if until_step is not None and r["step"] > until_step:
      break
    if r.get("tokens_per_sec"):
      seconds += (r["step"] - previous) * tokens_per_step(run) / r["tokens_per_sec"]
    previous = r["step"]
  return seconds / 60


def mean_std(values: list[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
  """Mean and sample std of the values that are not None (std None below two)."""
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def is_finished(run: dict[str, Any]) -> bool:
  return bool(run["summary"] and run["summary"].get("finished")
              and "eval_perplexity" in run["summary"])


def _mean(values: list[float]) -> Optional[float]:
  return statistics.fmean(values) if values else None


def ranks(values: list[float]) -> list[float]:
  """1-based ranks, smallest first; ties share their average rank."""
  order = sorted(range(len(values)), key=lambda i: values[i])
  out = [0.0] * len(values)
  i = 0
  while i < len(order):
    j = i
    while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
      j += 1
    for k in range(i, j + 1):
      out[order[k]] = (i + j) / 2 + 1
    i = j + 1
  return out


def spearman(a: list[float], b: list[float]) -> Optional[float]:
  """Spearman's rank correlation (Pearson correlation of average ranks); None below 3 pairs."""
  if len(a) < 3:
    return None
  ra, rb = np.array(ranks(a)), np.array(ranks(b))
  if ra.std() == 0 or rb.std() == 0:
    return None
  return float(np.corrcoef(ra, rb)[0, 1])


def _last_gate_mean(run: dict[str, Any]) -> Optional[float]:
  """Mean over layers of the gate score on the last logged training batch, if gated."""
  gated = [m for m in run["metrics"] if "gate_score_mean_per_layer" in m]
  return statistics.fmean(gated[-1]["gate_score_mean_per_layer"]) if gated else None


def ablation_rows(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
  """One row per variant (paper order first, then any others), ABLATION_COLUMNS keys."""
  names = [v for v in paper_results.ROWS if v in runs] + sorted(
      v for v in runs if v not in paper_results.ROWS)
  rows = []
  for name in names:
    done = [r for r in runs[name] if is_finished(r)]
    row: dict[str, Any] = {"variant": name, "seeds": len(done),
                           "ppl": _mean([r["summary"]["eval_perplexity"] for r in done]),
                           "num_params": done[0]["summary"]["num_params"] if done else None,
                           # runs from before MoE blocks are dense: every parameter active
                           "active_params": done[0]["summary"].get(
                               "active_params", done[0]["summary"]["num_params"]) if done
                                            else None}
    row["train_gate_score_mean"] = _mean([_last_gate_mean(r) for r in done
                                          if _last_gate_mean(r) is not None])
    for key in ANALYSIS_KEYS:
      row[key] = _mean([r["analysis"][key] for r in done
                        if r["analysis"] and r["analysis"].get(key) is not None])
    paper = paper_results.ROWS.get(name)
    row.update(paper_table=paper and paper.table,
               paper_added_params_m=paper and paper.added_params_m,
               paper_ppl=paper and paper.ppl,
               paper_gate_score_mean=paper and paper.gate_score_mean,
               paper_first_token_attention=paper and paper.first_token_attention,
               paper_max_activation=paper and paper.max_activation)
    rows.append(row)
  base = next((dict(r) for r in rows if r["variant"] == "baseline"), None)
  for row in rows:
    have = base is not None and base["ppl"] is not None and row["ppl"] is not None
    num_params = row.pop("num_params")
    row["added_params"] = num_params - base["num_params"] if have else None
    row["delta_ppl"] = row["ppl"] - base["ppl"] if have else None
    row["paper_delta_ppl"] = (row["paper_ppl"] - paper_results.ROWS["baseline"].ppl
                              if row["paper_ppl"] is not None else None)
  for key, rank_key in (("ppl", "rank"), ("paper_ppl", "paper_rank")):
    ranked = [r for r in rows if r["ppl"] is not None and r[key] is not None]
    for row, rank in zip(ranked, ranks([r[key] for r in ranked])):
      row[rank_key] = rank
  for row in rows:
    row.setdefault("rank", None)
    row.setdefault("paper_rank", None)
  return rows


def ablation_spearman(rows: list[dict[str, Any]]) -> Optional[float]:
  both = [r for r in rows if r["ppl"] is not None and r["paper_ppl"] is not None]
  return spearman([r["ppl"] for r in both], [r["paper_ppl"] for r in both])


def lr_of(name: str) -> tuple[str, float]:
  match = re.fullmatch(r"(.+)_lr([0-9.e+-]+)", name)
  if not match:
    raise ValueError(f"stability run folder {name!r} is not VARIANT_lrLR")
  return match.group(1), float(match.group(2))


def stability_rows(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
  """One row per (variant, lr, seed), sorted by variant then lr."""
  rows = []
  for name, seeds in runs.items():
    variant, lr = lr_of(name)
    for run in seeds:
      last = run["metrics"][-1] if run["metrics"] else {}
      summary = run["summary"] or {}
      rows.append({
          "variant": variant, "lr": lr, "seed": run["seed"], "steps": last.get("step", 0),
          "num_steps": summary.get("num_steps"), "final_loss": last.get("loss"),
          "ppl": summary.get("eval_perplexity"), "loss_spikes": last.get("loss_spikes"),
          "status": "finished" if is_finished(run) else "stopped"})
  return sorted(rows, key=lambda r: (r["variant"], r["lr"], r["seed"]))


def _fmt(value: Any) -> str:
  """Table cell: blank for None, floats to 6 significant digits."""
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.6g}"
  return str(value)


def to_csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(columns)
  for row in rows:
    writer.writerow([_fmt(row[c]) for c in columns])
  return buf.getvalue()


def to_markdown(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def plot_loss_curves(runs: dict[str, list[dict[str, Any]]], path: pathlib.Path) -> None:
  """Training loss (left) and validation loss (right) against step, one line per variant."""
  fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(14, 5.5), layout="constrained")
  colors = plt.cm.tab20(np.linspace(0, 1, max(len(runs), 1)))
  for color, (name, seeds) in zip(colors, runs.items()):
    style = "--" if name.startswith("baseline") else "-"
    for i, run in enumerate(seeds):
      label = name if i == 0 else None
      steps = [m["step"] for m in run["metrics"]]
      ax_train.plot(steps, [m["loss"] for m in run["metrics"]], style, color=color,
                    label=label, lw=1)
      evals = [m for m in run["metrics"] if "eval_loss" in m]
      ax_eval.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], style + "o",
                   color=color, ms=3, lw=1)
  ax_train.set(xlabel="step", ylabel="training loss", title="training loss")
  ax_eval.set(xlabel="step", ylabel="validation loss", title="validation loss")
  fig.legend(loc="outside right center", fontsize=8)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_stability(runs: dict[str, list[dict[str, Any]]], path: pathlib.Path) -> None:
  """Training loss against step: one panel per peak LR, baseline dashed vs gated solid."""
  by_lr: dict[float, list[tuple[str, dict[str, Any]]]] = {}
  for name, seeds in runs.items():
    variant, lr = lr_of(name)
    by_lr.setdefault(lr, []).extend((variant, run) for run in seeds)
  lrs = sorted(by_lr)
  fig, axes = plt.subplots(1, max(len(lrs), 1), figsize=(4 * max(len(lrs), 1), 4),
                           layout="constrained", sharey=True, squeeze=False)
  for ax, lr in zip(axes[0], lrs):
    for variant, run in by_lr[lr]:
      style = "--" if variant.startswith("baseline") else "-"
      ax.plot([m["step"] for m in run["metrics"]], [m["loss"] for m in run["metrics"]],
              style, label=f"{variant} seed {run['seed']}", lw=1)
      if not is_finished(run) and run["metrics"]:
        ax.plot(run["metrics"][-1]["step"], run["metrics"][-1]["loss"], "kx", ms=8)
    ax.set(title=f"peak lr {lr:g}", xlabel="step")
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel("training loss (x: stopped early)")
  fig.savefig(path, dpi=110)
  plt.close(fig)


def snapshot(src: pathlib.Path, dst: pathlib.Path) -> None:
  """Copies RUN_FILES of every SRC/NAME/seedS into DST/NAME/seedS (nothing else)."""
  for seed_dir in sorted(src.glob("*/seed*")):
    target = dst / seed_dir.relative_to(src)
    target.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
      if (seed_dir / name).exists():
        shutil.copyfile(seed_dir / name, target / name)


def testbed_cli(description: str, grid: str) -> tuple[pathlib.Path, pathlib.Path]:
  """Parses a testbed summarizer's --runs/--out/--snapshot for runs/GRID; returns (runs to read,
  out). With --snapshot the runs' small files are first copied into OUT/runs, read from there."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--runs", default=f"runs/{grid}", type=pathlib.Path)
  parser.add_argument("--out", default=f"experiments/results/{grid}", type=pathlib.Path)
  parser.add_argument("--snapshot", action="store_true",
                      help="copy each run's small files into OUT/runs first and read those")
  args = parser.parse_args()
  if not args.snapshot:
    return args.runs, args.out
  for setting in sorted(p for p in args.runs.iterdir() if p.is_dir()):
    snapshot(setting, args.out / "runs" / setting.name)
  return args.out / "runs", args.out


def summarize(ablation: pathlib.Path, stability: Optional[pathlib.Path],
              out: pathlib.Path, plots: bool = True) -> None:
  """Writes the tables (and plots) of OUT from the run folders."""
  out.mkdir(parents=True, exist_ok=True)
  runs = read_runs(ablation)
  rows = ablation_rows(runs)
  rho = ablation_spearman(rows)
  compared = sum(r["ppl"] is not None and r["paper_ppl"] is not None for r in rows)
  (out / "ablation.csv").write_text(to_csv(rows, ABLATION_COLUMNS))
  (out / "ablation.md").write_text(
      to_markdown(rows, ABLATION_COLUMNS)
      + f"\nSpearman rank correlation of validation perplexity, ours vs paper, over"
      f" {compared} variants: {_fmt(rho) or 'n/a'}\n\nppl: mean final validation perplexity"
      " over finished seeds; added_params: counted, num_params minus the baseline's;"
      " active_params: the parameters one token uses (all but the routed experts it is not"
      " sent to; every parameter of a dense model); rank and"
      " paper_rank: 1 = lowest perplexity, among the variants with a finished run here;"
      " train_gate_score_mean: the gate's mean over layers on the last logged training"
      " batch (metrics.jsonl);"
      " gate_score_mean, first_token_attention, max_activation: from each run's"
      " analysis.json (blank without one).\n\n"
      f"Paper: {paper_results.SOURCE}.\n")
  if plots:
    plot_loss_curves(runs, out / "loss_curves.png")
  if stability is not None:
    stab_runs = read_runs(stability)
    stab = stability_rows(stab_runs)
    (out / "stability.csv").write_text(to_csv(stab, STABILITY_COLUMNS))
    (out / "stability.md").write_text(to_markdown(stab, STABILITY_COLUMNS))
    if plots:
      plot_stability(stab_runs, out / "stability.png")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ablation", required=True, type=pathlib.Path,
                      help="folder of VARIANT/seedS run folders")
  parser.add_argument("--stability", type=pathlib.Path, help="folder of VARIANT_lrLR/seedS")
  parser.add_argument("--out", required=True, type=pathlib.Path)
  parser.add_argument("--snapshot", action="store_true",
                      help="copy the runs' small files to OUT/runs/ and summarize those")
  args = parser.parse_args()
  ablation, stability = args.ablation, args.stability
  if args.snapshot:
    snapshot(ablation, args.out / "runs" / "ablation")
    ablation = args.out / "runs" / "ablation"
    if stability is not None:
      snapshot(stability, args.out / "runs" / "stability")
      stability = args.out / "runs" / "stability"
  summarize(ablation, stability, args.out)
  print((args.out / "ablation.md").read_text())


if __name__ == "__main__":
  main()

"""Turns the stability-testbed runs into a table beside the paper's Table 2, and curves.

    python experiments/stability/summarize_stability.py --runs=runs/stability \
        --out=experiments/results/stability --snapshot

Reads RUNS/SETTING/VARIANT_lrLR/seedS/{summary.json, metrics.jsonl, config.json}
(configs/stability.py runs, which log every step with train.track_activations). Writes OUT:
  stability.md, stability.csv  per (setting, variant, lr): diverged seeds / seeds, final
                               validation loss mean ± std over the seeds that did not
                               diverge, loss spikes (the trainer's count, mean over seeds),
                               the peak over steps of the max |activation| and the max
                               attention logit over layers (mean over seeds), the final max
                               |activation|, training minutes; the difference to the
                               baseline's validation loss at the same setting and lr, and
                               whether it exceeds the seed spread; then the paper's Table 2
  stability_SETTING.png        training loss, max |activation| and max attention logit
                               against step, a column per lr, a line per run
A run diverged when it stopped before its last step (the trainer stops on a non-finite
loss; summarize only runs that are no longer running) or when its training loss ends
more than DIVERGE_MARGIN nats above its best (a spike it did not recover from; both
smoothed over SMOOTH steps). --snapshot first copies the small files of every run into
OUT/runs/ and reads those, so the committed table can be regenerated from what is
committed.
"""

from __future__ import annotations

import pathlib
import statistics
import sys
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from experiments import paper_results, summarize  # pylint: disable=g-import-not-at-top,wrong-import-position

DIVERGE_MARGIN = 1.0  # nats: a final loss this far above the run's best did not recover
SMOOTH = 10  # steps averaged for the best and the final training loss
COLUMNS = ("setting", "variant", "lr", "diverged", "seeds", "eval_loss", "eval_loss_std",
           "delta_vs_baseline", "beyond_spread", "loss_spikes", "peak_max_activation",
           "final_max_activation", "peak_attention_logit", "run_minutes")
PAPER_COLUMNS = ("setting", "variant", "lr", "ppl", "note")


def smoothed_losses(run: dict[str, Any]) -> list[float]:
  """Training loss averaged over each run of SMOOTH consecutive logged steps."""
  losses = [r["loss"] for r in run["metrics"]]
  return [statistics.fmean(losses[i:i + SMOOTH]) for i in range(0, len(losses), SMOOTH)]


def stopped(run: dict[str, Any]) -> bool:
  """The run ended before its last step (no finished summary.json)."""
  return not summarize.is_finished(run)


def diverged(run: dict[str, Any]) -> bool:
  losses = smoothed_losses(run)
  return stopped(run) or not losses or losses[-1] > min(losses) + DIVERGE_MARGIN


def _peak(run: dict[str, Any], key: str) -> Optional[float]:
  """Max over logged steps and layers of a per-layer metric (None if not tracked)."""
  values = [max(r[key]) for r in run["metrics"] if key in r]
  return max(values) if values else None


def _final(run: dict[str, Any], key: str) -> Optional[float]:
  values = [max(r[key]) for r in run["metrics"] if key in r]
  return values[-1] if values else None


def rows(grid: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
  """One row per (setting, variant, lr): settings as given, then variant and lr order."""
  out = []
  for setting, cells in grid.items():
    for name in sorted(cells, key=summarize.lr_of):
      variant, lr = summarize.lr_of(name)
      runs = cells[name]
      trained = [r for r in runs if not diverged(r)]
      row: dict[str, Any] = dict(setting=setting, variant=variant, lr=lr, seeds=len(runs),
                                 diverged=f"{len(runs) - len(trained)}/{len(runs)}")
      row["eval_loss"], row["eval_loss_std"] = summarize.mean_std(
          [r["summary"].get("eval_loss") for r in trained])
      row["loss_spikes"] = statistics.fmean(
          r["metrics"][-1].get("loss_spikes", 0) if r["metrics"] else 0 for r in runs)
      for column, key, pick in (
          ("peak_max_activation", "activation_max_per_layer", _peak),
          ("final_max_activation", "activation_max_per_layer", _final),
          ("peak_attention_logit", "attention_logit_max_per_layer", _peak)):
        row[column] = summarize.mean_std([pick(r, key) for r in runs])[0]
      row["run_minutes"] = statistics.fmean(summarize.train_minutes(r) for r in runs)
      out.append(row)
  return out


def add_deltas(table: list[dict[str, Any]]) -> None:
  """Each row's final validation loss minus the baseline's at the same setting and lr, and
  whether that exceeds the seed spread (the two std's added; blank below two seeds each)."""
  base = {(r["setting"], r["lr"]): r for r in table if r["variant"] == "baseline"}
  for row in table:
    ref = base.get((row["setting"], row["lr"]))
    have = ref is not None and row is not ref and None not in (row["eval_loss"],
                                                                ref["eval_loss"])
    row["delta_vs_baseline"] = row["eval_loss"] - ref["eval_loss"] if have else None
    spread = have and None not in (row["eval_loss_std"], ref["eval_loss_std"])
    row["beyond_spread"] = (("yes" if abs(row["delta_vs_baseline"]) > row["eval_loss_std"]
                             + ref["eval_loss_std"] else "no") if spread else None)


def plot_setting(cells: dict[str, list[dict[str, Any]]], title: str,
                 path: pathlib.Path) -> None:
  """Loss, max |activation| and max attention logit vs step: a column per lr."""
  lrs = sorted({summarize.lr_of(n)[1] for n in cells})
  variants = list(dict.fromkeys(summarize.lr_of(n)[0] for n in sorted(cells)))
  panels = (("loss", None, "training loss"),
            ("activation_max_per_layer", max, "max |activation| (over layers)"),
            ("attention_logit_max_per_layer", max, "max attention logit (over layers)"))
  fig, axes = plt.subplots(len(panels), len(lrs), figsize=(3.6 * len(lrs), 8.4),
                           squeeze=False, sharex=True, sharey="row")
  for name, runs in cells.items():
    variant, lr = summarize.lr_of(name)
    col = lrs.index(lr)
    for i, run in enumerate(runs):
      steps = [r["step"] for r in run["metrics"]]
      style = dict(color=f"C{variants.index(variant)}", alpha=0.75, lw=0.9,
                   label=variant if i == 0 else None)
      for row, (key, reduce, _) in enumerate(panels):
        values = [reduce(r[key]) if reduce else r[key] for r in run["metrics"] if key in r]
        if values:
          axes[row, col].plot(steps[:len(values)], values, **style)
      if stopped(run) and run["metrics"]:
        axes[0, col].plot(steps[-1], run["metrics"][-1]["loss"], "kx", ms=7)
    axes[0, col].set_title(f"{title}, peak lr {lr:g}", fontsize=9)
    axes[-1, col].set_xlabel("step")
  for row, (_, reduce, label) in enumerate(panels):
    axes[row, 0].set_ylabel(label + (" (x: stopped)" if row == 0 else ""), fontsize=8)
    if reduce:
      axes[row, 0].set_yscale("log")
  handles: dict[str, Any] = {}
  for ax in axes[0]:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(label, handle)
  if handles:
    axes[0, 0].legend(handles.values(), handles.keys(), fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def summarize_grid(root: pathlib.Path, out: pathlib.Path,
                   plots: bool = True) -> list[dict[str, Any]]:
  """Writes stability.md, stability.csv (and the plots) to `out`; returns the rows."""
  grid = summarize.read_grid(root)
  table = rows(grid)
  add_deltas(table)
  paper = [dict(setting=p.setting, variant=p.variant, lr=p.lr, ppl=p.ppl, note=p.note)
           for p in paper_results.TABLE2]
  out.mkdir(parents=True, exist_ok=True)
  (out / "stability.md").write_text(
      "Stability testbed (configs/stability.py), per (setting, variant, peak lr). diverged:"
      " seeds that stopped on a non-finite loss or ended more than"
      f" {DIVERGE_MARGIN:g} nats above their best training loss ({SMOOTH}-step means);"
      " eval_loss: final validation loss, mean (± std) over the other seeds; loss_spikes:"
      " the trainer's count (loss > 2x its 50-step median), mean over seeds; activations"
      " and logits: max over layers, peak over steps (or at the last step), mean over"
      " seeds; run_minutes: training only, from the logged tokens/s;"
      " delta_vs_baseline: eval_loss minus the baseline's at the same setting and lr;"
      " beyond_spread: |delta| > the two std's added.\n\n"
      + summarize.to_markdown(table, COLUMNS)
      + f"\n## The paper ({paper_results.TABLE2_SOURCE})\n\n"
      + summarize.to_markdown(paper, PAPER_COLUMNS))
  (out / "stability.csv").write_text(summarize.to_csv(table, COLUMNS))
  if plots:
    for setting, cells in grid.items():
      plot_setting(cells, setting, out / f"stability_{setting}.png")
  return table


def main() -> None:
  root, out = summarize.testbed_cli(__doc__.splitlines()[0], "stability")
  summarize_grid(root, out)
  print((out / "stability.md").read_text())


if __name__ == "__main__":
  main()

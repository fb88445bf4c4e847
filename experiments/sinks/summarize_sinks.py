"""Turns the sink-testbed runs into a table beside the paper's Table 4, and sink-onset plots.

    python experiments/sinks/summarize_sinks.py --runs=runs/sinks \
        --out=experiments/results/sinks --snapshot

Reads RUNS/SETTING/VARIANT/seedS/{summary.json, metrics.jsonl, config.json}
(configs/sinks.py runs with train.track_sinks). Writes to OUT:
  sinks.md, sinks.csv   per (setting, variant), mean ± std over finished seeds of the last
                        eval: first-token attention, sink rate, max activation, mean gate
                        score, validation loss; the sink onset (first eval step, and tokens
                        seen, with first-token attention >= ONSET) and the training
                        minutes to it and to the end (from the logged tokens/s, without
                        compilation and evals, mean over seeds); the paper's Table 4
                        numbers beside (experiments/paper_results.py)
  sink_onset.png        first-token attention and max activation against tokens seen, one
                        line per run, a panel per setting
--snapshot first copies the small files of every run into OUT/runs/ and reads those, so
the committed table can be regenerated from what is committed.
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

ONSET = 0.3  # the target: first-token attention of at least 0.3
TRACKED = ("first_token_attention", "sink_rate", "max_activation", "gate_score", "eval_loss")
COLUMNS = ("setting", "variant", "seeds", *[f"{k}{s}" for k in TRACKED for s in ("", "_std")],
           "onset_step", "onset_tokens_m", "onset_minutes", "run_minutes",
           "paper_first_token_attention",
           "paper_max_activation", "paper_gate_score_mean")


def sink_curve(run: dict[str, Any]) -> list[dict[str, Any]]:
  """The eval rows of a run that carry sink metrics, in step order."""
  return [r for r in run["metrics"] if "first_token_attention" in r]


def onset_step(run: dict[str, Any], threshold: float = ONSET) -> Optional[int]:
  """First eval step with first-token attention >= threshold (None: never)."""
  return next((r["step"] for r in sink_curve(run) if r["first_token_attention"] >= threshold),
              None)


def _last(run: dict[str, Any], key: str) -> Optional[float]:
  rows = sink_curve(run)
  if not rows:
    return None
  if key == "gate_score":
    gates = rows[-1].get("gate_score_mean_per_layer")
    return statistics.fmean(gates) if gates else None
  return rows[-1].get(key)


def rows(grid: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
  out = []
  for setting, variants in grid.items():
    for variant, runs in variants.items():
      done = [r for r in runs if r["summary"] and r["summary"].get("finished")]
      if not done:
        continue
      row: dict[str, Any] = dict.fromkeys(COLUMNS)
      row.update(setting=setting, variant=variant, seeds=len(done))
      for key in TRACKED:
        row[key], row[f"{key}_std"] = summarize.mean_std([_last(r, key) for r in done])
      onsets = [onset_step(r) for r in done]
      if all(o is not None for o in onsets):
        row["onset_step"] = statistics.fmean(onsets)
        row["onset_tokens_m"] = statistics.fmean(
            o * summarize.tokens_per_step(r) / 1e6 for o, r in zip(onsets, done))
        row["onset_minutes"] = statistics.fmean(
            summarize.train_minutes(r, o) for o, r in zip(onsets, done))
      row["run_minutes"] = statistics.fmean(summarize.train_minutes(r) for r in done)
      paper = paper_results.ROWS.get(variant)
      if paper is not None:
        row["paper_first_token_attention"] = paper.first_token_attention
        row["paper_max_activation"] = paper.max_activation
        row["paper_gate_score_mean"] = paper.gate_score_mean
      out.append(row)
  return out


def plot_onset(grid: dict[str, dict[str, list[dict[str, Any]]]], path: pathlib.Path) -> None:
  """First-token attention (top) and max activation (bottom) vs tokens seen, per setting."""
  settings = list(grid)
  fig, axes = plt.subplots(2, len(settings), figsize=(3.6 * len(settings), 6.4), squeeze=False,
                           sharex="col")
  for col, setting in enumerate(settings):
    for variant, runs in grid[setting].items():
      for i, run in enumerate(runs):
        curve = sink_curve(run)
        if not curve or not run["summary"]:
          continue
        tokens = [r["step"] * summarize.tokens_per_step(run) / 1e6 for r in curve]
        style = dict(color=f"C{list(grid[setting]).index(variant)}", alpha=0.8, lw=1.2,
                     label=variant if i == 0 else None)
        axes[0, col].plot(tokens, [r["first_token_attention"] for r in curve], **style)
        axes[1, col].plot(tokens, [r["max_activation"] for r in curve], **style)
    axes[0, col].axhline(ONSET, color="gray", ls=":", lw=1)
    if axes[0, col].get_legend_handles_labels()[0]:
      axes[0, col].legend(fontsize=7)
    axes[0, col].set(title=setting, ylim=(0, 1))
    axes[1, col].set(xlabel="tokens seen (M)", yscale="log")
  axes[0, 0].set_ylabel("first-token attention")
  axes[1, 0].set_ylabel("max |activation|")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def summarize_grid(root: pathlib.Path, out: pathlib.Path) -> list[dict[str, Any]]:
  """Writes sinks.md, sinks.csv and sink_onset.png to `out`; returns the rows."""
  grid = summarize.read_grid(root)
  table = rows(grid)
  out.mkdir(parents=True, exist_ok=True)
  header = (f"Sink testbed (configs/sinks.py): last eval of each run, mean (± std over seeds)."
            f" Onset: first eval with first-token attention >= {ONSET}. Paper: Table 4"
            f" ({paper_results.SOURCE}).\n\n")
  (out / "sinks.md").write_text(header + summarize.to_markdown(table, COLUMNS))
  (out / "sinks.csv").write_text(summarize.to_csv(table, COLUMNS))
  plot_onset(grid, out / "sink_onset.png")
  return table


def main() -> None:
  root, out = summarize.testbed_cli(__doc__.splitlines()[0], "sinks")
  for row in summarize_grid(root, out):
    print(row["setting"], row["variant"], summarize._fmt(row["first_token_attention"]),  # pylint: disable=protected-access
          summarize._fmt(row["max_activation"]), f"onset {row.get('onset_step')}")  # pylint: disable=protected-access


if __name__ == "__main__":
  main()

"""Turns the long-context testbed's runs into a retrieval table and plot.

    python experiments/long_context/summarize_long_context.py --runs=runs/long_context \
        --out=experiments/results/long_context --snapshot

Reads RUNS/SETTING/VARIANT/seedS/{summary.json, metrics.jsonl, config.json,
retrieval.json} (configs/long_context.py runs, then `analyze --retrieval`, or
`analysis.run_retrieval`). Writes to OUT:
  long_context.md, long_context.csv  per (setting, variant, RoPE method, length multiple):
                  passkey accuracy (mean over depths), mean ± std over seeds and the
                  per-seed values, with the final validation loss at the training length
  retrieval.png   accuracy against length multiple, a row per setting, a panel per RoPE
                  method, a line per variant (mean over seeds; each seed faint)
  long_context_runs.md, long_context_runs.csv  one row per run: training minutes, the step
                  its answer loss fell below 0.1, final validation loss, accuracy at 1x,
                  at 2x with each RoPE method, at 4x and 8x with YaRN
  long_context_summary.md  per (setting, variant): seeds that retrieve at L, mean accuracy
                  per method and multiple (the headline table)
  long_context_probes.md  with OUT/probes/NAME/{config.json, metrics.jsonl, summary.json}
                  (the short runs of the search for a setting): one row per probe
--snapshot first copies the small files of every run into OUT/runs/ and reads those, so
the committed table can be regenerated from what is committed.
"""

from __future__ import annotations

import itertools
import pathlib
import statistics
import sys
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from experiments import summarize  # pylint: disable=g-import-not-at-top,wrong-import-position

COLUMNS = ("setting", "variant", "method", "multiple", "seeds", "accuracy", "accuracy_std",
           "per_seed", "eval_loss")
RUN_COLUMNS = ("setting", "variant", "seed", "train_minutes", "learned_step", "eval_loss",
               "1x", "2x_none", "2x_linear", "2x_ntk", "2x_yarn", "4x_yarn", "8x_yarn")
PROBE_COLUMNS = ("probe", "gate", "seed", "d_model", "num_heads", "learning_rate", "num_steps",
                 "steps_run", "learned_step", "last_loss", "status")
PIVOT_COLUMNS = ("setting", "variant", "seeds", "retrieve_1x", "1x", "2x_none", "2x_linear",
                 "2x_ntk", "2x_yarn", "4x_yarn", "8x_yarn", "4x_ntk", "8x_ntk", "yarn_beyond",
                 "p_vs_baseline")
RETRIEVES = 0.9  # a run "retrieves at L" when its 1x accuracy is at least this
LEARNED_LOSS = 0.1  # a run has learned to retrieve once its training answer loss is below this


def read_grid(root: pathlib.Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
  """{setting: {variant: [finished runs with retrieval.json]}} from ROOT/SETTING/VARIANT/seedS."""
  grid = {}
  for setting in sorted(p for p in root.iterdir() if p.is_dir()):
    variants = {v: [r for r in runs if r["retrieval"] and r["summary"]
                    and r["summary"].get("finished")]
                for v, runs in summarize.read_runs(setting).items()}
    grid[setting.name] = {v: runs for v, runs in variants.items() if runs}
  return grid


def rows(grid: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
  out = []
  for setting, variants in grid.items():
    for variant, runs in variants.items():
      losses = [r["summary"].get("eval_loss") for r in runs]
      eval_loss = statistics.fmean(losses) if None not in losses else None
      for method, by_k in runs[0]["retrieval"]["mean"].items():
        for k in by_k:
          values = [r["retrieval"]["mean"][method][k] for r in runs]
          out.append({
              "setting": setting, "variant": variant, "method": method, "multiple": int(k),
              "seeds": len(runs), "accuracy": statistics.fmean(values),
              "accuracy_std": statistics.stdev(values) if len(values) > 1 else None,
              "per_seed": " ".join(f"{v:.2f}" for v in values), "eval_loss": eval_loss})
  return out


def _round(value: Optional[float], digits: int) -> Optional[float]:
  return None if value is None else round(value, digits)


def learned_step(run: dict[str, Any], threshold: float = LEARNED_LOSS) -> Optional[int]:
  """The first logged step whose training (answer) loss is below `threshold`; None if none."""
  return next((r["step"] for r in run["metrics"]
               if r.get("loss") is not None and r["loss"] < threshold), None)


def run_rows(grid: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
  """One row per run: training minutes, the step it learned, the final validation (answer)
  loss, and accuracy at 1x (no scaling), 2x with every method, 4x and 8x with YaRN."""
  out = []
  for setting, variants in grid.items():
    for variant, runs in variants.items():
      for run in runs:
        mean = run["retrieval"]["mean"]
        def acc(method: str, k: int) -> Optional[float]:
          return _round(mean.get(method, {}).get(str(k)), 2)  # pylint: disable=cell-var-from-loop
        row = {"setting": setting, "variant": variant, "seed": run["seed"],
               "train_minutes": round(summarize.train_minutes(run), 1),
               "learned_step": learned_step(run), "eval_loss": _round(run["summary"].get("eval_loss"), 4),
               "1x": acc("none", 1)}
        row.update({f"2x_{m}": acc(m, 2) for m in ("none", "linear", "ntk", "yarn")})
        row.update({f"{k}x_{m}": acc(m, k) for m in ("yarn", "ntk") for k in (4, 8)})
        out.append(row)
  return out


def permutation_p(a: list[float], b: list[float]) -> float:
  """Exact two-sided permutation p-value of the difference of means of `a` and `b`: the
  fraction of the ways to split a + b into groups of their sizes whose |difference| is at
  least the observed one."""
  if not a or not b:
    raise ValueError(f"permutation_p needs two non-empty samples, got {a!r} and {b!r}")
  pooled, n = a + b, len(a)
  observed = abs(statistics.fmean(a) - statistics.fmean(b))
  hits = total = 0
  for idx in itertools.combinations(range(len(pooled)), n):
    chosen = set(idx)
    x = [pooled[i] for i in chosen]
    y = [pooled[i] for i in range(len(pooled)) if i not in chosen]
    hits += abs(statistics.fmean(x) - statistics.fmean(y)) >= observed - 1e-12
    total += 1
  return hits / total


def _yarn_beyond(row: dict[str, Any]) -> Optional[float]:
  """A run's mean YaRN accuracy over 2x, 4x and 8x L (None if one was not measured)."""
  values = [row[f"{k}x_yarn"] for k in (2, 4, 8)]
  return None if None in values else statistics.fmean(values)


def pivot_rows(per_run: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per (setting, variant): how many seeds retrieve at L (1x accuracy >= RETRIEVES), the
  mean over seeds of each accuracy column of `per_run` (run_rows plus 4x/8x NTK), the mean of
  yarn_beyond (YaRN accuracy averaged over 2x/4x/8x) and, for a gated variant, the exact
  permutation p-value of its per-seed yarn_beyond against the same setting's baseline."""
  groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for row in per_run:
    groups.setdefault((row["setting"], row["variant"]), []).append(row)
  out = []
  for (setting, variant), runs in groups.items():
    row = {"setting": setting, "variant": variant, "seeds": len(runs),
           "retrieve_1x": f"{sum(r['1x'] >= RETRIEVES for r in runs)}/{len(runs)}"}
    for column in PIVOT_COLUMNS[4:13]:  # the accuracy columns of run_rows
      values = [r[column] for r in runs]
      row[column] = None if None in values else round(statistics.fmean(values), 2)
    out.append(row)
  for row in out:
    runs = groups[row["setting"], row["variant"]]
    beyond = [_yarn_beyond(r) for r in runs]
    base = [_yarn_beyond(r) for r in groups.get((row["setting"], "baseline"), [])]
    row["yarn_beyond"] = None if None in beyond else round(statistics.fmean(beyond), 3)
    row["p_vs_baseline"] = (
        round(permutation_p(beyond, base), 3)
        if base and row["variant"] != "baseline" and None not in beyond + base else None)
  return out


def probe_rows(root: pathlib.Path) -> list[dict[str, Any]]:
  """One row per probe folder ROOT/NAME/{config.json, metrics.jsonl, summary.json}: short
  training runs (possibly stopped early) from the search for a setting, without retrieval."""
  out = []
  for folder in sorted(p for p in root.iterdir() if p.is_dir()):
    run = summarize.read_run(folder)
    if run["config"] is None or run["summary"] is None or not run["metrics"]:
      raise ValueError(f"probe {folder} needs config.json, summary.json and metrics.jsonl")
    config, summary = run["config"], run["summary"]
    losses = [r for r in run["metrics"] if r.get("loss") is not None]
    out.append({
        "probe": folder.name, "gate": summary.get("gate"), "seed": config["train"]["seed"],
        "d_model": config["model"]["d_model"], "num_heads": config["model"]["num_heads"],
        "learning_rate": config["train"]["learning_rate"],
        "num_steps": config["train"]["num_steps"], "steps_run": summary.get("step"),
        "learned_step": learned_step(run),
        "last_loss": _round(losses[-1]["loss"], 4) if losses else None,
        "status": "finished" if summary.get("finished") else "stopped"})
  return out


def plot(grid: dict[str, dict[str, list[dict[str, Any]]]], path: pathlib.Path) -> None:
  """Accuracy vs length multiple: a row per setting, a panel per RoPE method, a line per variant."""
  settings = [s for s, variants in grid.items() if variants]
  methods = (list(next(iter(grid[settings[0]].values()))[0]["retrieval"]["mean"])
             if settings else [])
  fig, axes = plt.subplots(max(len(settings), 1), max(len(methods), 1),
                           figsize=(3.2 * max(len(methods), 1), 2.9 * max(len(settings), 1)),
                           squeeze=False, sharey=True)
  for row, setting in enumerate(settings):
    for col, method in enumerate(methods):
      ax = axes[row, col]
      for i, (variant, runs) in enumerate(grid[setting].items()):
        ks = sorted(int(k) for k in runs[0]["retrieval"]["mean"][method])
        per_seed = [[r["retrieval"]["mean"][method][str(k)] for k in ks] for r in runs]
        for values in per_seed:
          ax.plot(ks, values, color=f"C{i}", alpha=0.25, lw=1)
        ax.plot(ks, [statistics.fmean(v) for v in zip(*per_seed)], "o-", color=f"C{i}",
                label=f"{variant} ({len(runs)} seeds)", lw=1.8)
      ax.set(title=f"{setting}: RoPE {method}", xscale="log", ylim=(-0.03, 1.03))
      ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
      ax.set_xticks([], minor=True)
    axes[row, 0].set_ylabel("passkey accuracy")
    axes[row, 0].legend(fontsize=7)
  for ax in axes[-1]:
    ax.set_xlabel("length / training length")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def summarize_grid(root: pathlib.Path, out: pathlib.Path,
                   probes: Optional[pathlib.Path] = None) -> list[dict[str, Any]]:
  """Writes long_context.md, long_context.csv, long_context_runs.md/.csv and retrieval.png
  to `out` (and long_context_probes.md from the probe folders of `probes`); returns the
  rows."""
  grid = read_grid(root)
  table = rows(grid)
  out.mkdir(parents=True, exist_ok=True)
  header = ("Long-context testbed (configs/long_context.py): greedy passkey accuracy, mean over"
            " needle depths, then mean (± std) over seeds; multiple = evaluation length /"
            " training length.\n\n")
  (out / "long_context.md").write_text(header + summarize.to_markdown(table, COLUMNS))
  (out / "long_context.csv").write_text(summarize.to_csv(table, COLUMNS))
  per_run = run_rows(grid)
  (out / "long_context_runs.md").write_text(
      "Long-context testbed, one row per run: train_minutes from the logged tokens/s (no"
      " compilation or evaluation); learned_step = first logged step with training answer loss"
      f" < {LEARNED_LOSS} (blank: never); eval_loss = final validation loss (answer tokens"
      " only); then passkey accuracy (mean over depths) at multiples of the training length"
      " with a RoPE scaling method (1x: none).\n\n"
      + summarize.to_markdown(per_run, RUN_COLUMNS))
  (out / "long_context_runs.csv").write_text(summarize.to_csv(per_run, RUN_COLUMNS))
  (out / "long_context_summary.md").write_text(
      "Long-context testbed, per setting and variant: retrieve_1x = seeds whose accuracy at"
      f" the training length is >= {RETRIEVES}; then the mean over seeds of passkey accuracy at"
      " multiples of the training length with a RoPE scaling method (1x: none); yarn_beyond ="
      " mean over seeds of a run's YaRN accuracy averaged over 2x, 4x and 8x; p_vs_baseline ="
      " exact two-sided permutation p-value of the per-seed yarn_beyond against the baseline's"
      " in the same setting.\n\n"
      + summarize.to_markdown(pivot_rows(per_run), PIVOT_COLUMNS))
  if probes is not None:
    (out / "long_context_probes.md").write_text(
        "Probes for a setting where every run learns retrieval at L: short training runs of"
        " the testbed with changes (no retrieval measured; 'stopped' = ended by hand once"
        " the trend was clear). learned_step = first logged step with training answer loss"
        f" < {LEARNED_LOSS}; last_loss = the last logged training answer loss.\n\n"
        + summarize.to_markdown(probe_rows(probes), PROBE_COLUMNS))
  plot(grid, out / "retrieval.png")
  return table


def main() -> None:
  root, out = summarize.testbed_cli(__doc__.splitlines()[0], "long_context")
  probes = out / "probes"
  for row in summarize_grid(root, out, probes if probes.is_dir() else None):
    print(row["variant"], row["method"], row["multiple"], f"{row['accuracy']:.3f}")


if __name__ == "__main__":
  main()

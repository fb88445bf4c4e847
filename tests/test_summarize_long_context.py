"""The long-context summarizer on fabricated runs, and that the committed long-context
results are exactly what it produces from the committed run files."""

import json
import pathlib
import statistics

import pytest

from experiments.long_context import summarize_long_context

RESULTS = (pathlib.Path(__file__).resolve().parents[1] / "experiments" / "results"
           / "long_context")


def _write_run(folder: pathlib.Path, mean: dict, finished: bool = True,
               losses: tuple[float, ...] = (0.2,)) -> None:
  folder.mkdir(parents=True)
  (folder / "summary.json").write_text(json.dumps({"finished": finished, "eval_loss": 0.1}))
  (folder / "metrics.jsonl").write_text("".join(
      json.dumps({"step": 10 * (i + 1), "loss": loss, "tokens_per_sec": 64.0}) + "\n"
      for i, loss in enumerate(losses)))
  (folder / "config.json").write_text(json.dumps({"train": {"batch_size": 8},
                                                  "data": {"seq_len": 16}}))
  (folder / "retrieval.json").write_text(json.dumps({"mean": mean}))


def test_rows_average_seeds_per_method_and_length(tmp_path: pathlib.Path):
  root = tmp_path / "runs"
  _write_run(root / "testbed/baseline/seed0", {"none": {"1": 1.0, "2": 0.5}})
  _write_run(root / "testbed/baseline/seed1", {"none": {"1": 0.8, "2": 0.0}})
  _write_run(root / "testbed/baseline/seed2", {"none": {"1": 0.0, "2": 0.0}}, finished=False)
  _write_run(root / "testbed/sdpa_elementwise/seed0", {"none": {"1": 1.0, "2": 1.0}})
  table = summarize_long_context.summarize_grid(root, tmp_path / "out")
  by = {(r["variant"], r["multiple"]): r for r in table}
  assert by["baseline", 1]["seeds"] == 2  # the unfinished seed is left out
  assert by["baseline", 1]["accuracy"] == pytest.approx(0.9)
  assert by["baseline", 1]["accuracy_std"] == pytest.approx(statistics.stdev([1.0, 0.8]))
  assert by["baseline", 2]["per_seed"] == "0.50 0.00"
  assert by["sdpa_elementwise", 2]["accuracy"] == 1.0
  assert by["sdpa_elementwise", 2]["accuracy_std"] is None
  assert (tmp_path / "out" / "retrieval.png").stat().st_size > 0


def test_run_rows_one_per_run_with_learned_step_and_yarn_columns(tmp_path: pathlib.Path):
  root = tmp_path / "runs"
  mean = {m: {"1": 1.0, "2": 0.5, "4": 0.25, "8": 0.125} for m in ("none", "linear", "ntk")}
  mean["yarn"] = {"1": 1.0, "2": 0.75, "4": 0.5, "8": 1 / 3}
  _write_run(root / "lr/baseline/seed0", mean, losses=(2.0, 0.5, 0.05, 0.2, 0.01))
  _write_run(root / "lr/baseline/seed3", mean, losses=(2.0, 1.9))
  table = summarize_long_context.summarize_grid(root, tmp_path / "out")
  assert table  # the aggregate table is still written
  per_run = summarize_long_context.run_rows(summarize_long_context.read_grid(root))
  assert [(r["seed"], r["learned_step"]) for r in per_run] == [(0, 30), (3, None)]
  first = per_run[0]
  # 5 logged rows of 10 steps x 8 x 16 tokens at 64 tokens/s: 100 s
  assert first["train_minutes"] == pytest.approx(round(100 / 60, 1))
  assert (first["1x"], first["2x_none"], first["2x_yarn"], first["4x_yarn"],
          first["8x_yarn"]) == (1.0, 0.5, 0.75, 0.5, 0.33)
  pivot = summarize_long_context.pivot_rows(per_run + [dict(per_run[0], seed=1, **{"1x": 0.5})])
  assert len(pivot) == 1 and pivot[0]["seeds"] == 3 and pivot[0]["retrieve_1x"] == "2/3"
  assert pivot[0]["1x"] == pytest.approx(round((1.0 + 1.0 + 0.5) / 3, 2))
  assert pivot[0]["8x_yarn"] == 0.33 and pivot[0]["4x_ntk"] == 0.25
  text = (tmp_path / "out" / "long_context_runs.md").read_text()
  assert "| lr | baseline | 3 |" in text and "| lr | baseline | 0 | 1.7 | 30 |" in text


def test_permutation_p_is_exact_and_refuses_empty_samples():
  # 3 vs 3, completely separated: 2 of the C(6, 3) = 20 splits are as extreme
  assert summarize_long_context.permutation_p([1.0, 0.9, 0.8], [0.1, 0.0, 0.2]) == 0.1
  assert summarize_long_context.permutation_p([0.5, 0.5], [0.5, 0.5]) == 1.0
  with pytest.raises(ValueError, match="two non-empty samples"):
    summarize_long_context.permutation_p([], [1.0])


def test_pivot_compares_each_gated_variant_with_its_settings_baseline():
  def run(variant, seed, yarn):
    row = {"setting": "s", "variant": variant, "seed": seed, "1x": 1.0}
    row.update({c: 0.0 for c in summarize_long_context.PIVOT_COLUMNS[5:13]})
    row.update({"2x_yarn": yarn, "4x_yarn": yarn, "8x_yarn": yarn})
    return row
  rows = summarize_long_context.pivot_rows(
      [run("baseline", s, y) for s, y in enumerate((0.9, 0.8, 0.7))]
      + [run("sdpa_elementwise", s, y) for s, y in enumerate((0.1, 0.0, 0.2))])
  by = {r["variant"]: r for r in rows}
  assert by["baseline"]["p_vs_baseline"] is None
  assert by["baseline"]["yarn_beyond"] == pytest.approx(0.8)
  assert by["sdpa_elementwise"]["yarn_beyond"] == pytest.approx(0.1)
  assert by["sdpa_elementwise"]["p_vs_baseline"] == 0.1


def test_learned_step_is_the_first_step_below_the_threshold():
  run = {"metrics": [{"step": 50, "loss": 0.3}, {"step": 100, "eval_loss": 0.05},
                     {"step": 150, "loss": 0.09}]}
  assert summarize_long_context.learned_step(run) == 150  # eval-only rows are skipped
  assert summarize_long_context.learned_step(run, threshold=0.01) is None


def test_probe_rows_read_config_and_metrics_and_refuse_incomplete_folders(
    tmp_path: pathlib.Path):
  probes = tmp_path / "probes"
  _write_run(probes / "lr_b0", {}, losses=(2.0, 0.05, 0.04))
  _write_run(probes / "wide_e0", {}, finished=False, losses=(2.0, 1.5))
  for name, lr in (("lr_b0", 1e-3), ("wide_e0", 3e-3)):
    (probes / name / "config.json").write_text(json.dumps(
        {"train": {"seed": 2, "learning_rate": lr, "num_steps": 50},
         "model": {"d_model": 64, "num_heads": 4}}))
  rows = summarize_long_context.probe_rows(probes)
  assert [(r["probe"], r["learned_step"], r["last_loss"], r["status"], r["learning_rate"])
          for r in rows] == [("lr_b0", 20, 0.04, "finished", 1e-3),
                             ("wide_e0", None, 1.5, "stopped", 3e-3)]
  (probes / "wide_e0" / "summary.json").unlink()
  with pytest.raises(ValueError, match="wide_e0 needs config.json, summary.json"):
    summarize_long_context.probe_rows(probes)


@pytest.mark.skipif(not (RESULTS / "runs").exists(), reason="no committed long-context runs")
def test_committed_results_are_regenerated_from_committed_runs(tmp_path: pathlib.Path):
  summarize_long_context.summarize_grid(RESULTS / "runs", tmp_path, RESULTS / "probes")
  for name in ("long_context.md", "long_context.csv", "long_context_runs.md",
               "long_context_runs.csv", "long_context_probes.md",
               "long_context_summary.md"):
    assert (tmp_path / name).read_text() == (RESULTS / name).read_text(), name



@pytest.mark.skipif(not (RESULTS / "README.md").exists(), reason="no long-context write-up")
def test_readme_quotes_the_generated_tables_verbatim():
  """The write-up's tables are copies of the summarizer's, not numbers typed by hand."""
  readme = (RESULTS / "README.md").read_text()
  for name in ("long_context_summary.md", "long_context_runs.md"):
    table = [l for l in (RESULTS / name).read_text().splitlines() if l.startswith("|")]
    assert table and "\n".join(table) in readme, f"README.md does not quote {name}"

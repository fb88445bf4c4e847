"""The long-context summarizer on fabricated runs, and that the committed long-context
results are exactly what it produces from the committed run files."""

import json
import pathlib
import statistics

import pytest

from experiments.long_context import summarize_long_context

RESULTS = (pathlib.Path(__file__).resolve().parents[1] / "experiments" / "results"
           / "long_context")


def _write_run(folder: pathlib.Path, mean: dict, finished: bool = True) -> None:
  folder.mkdir(parents=True)
  (folder / "summary.json").write_text(json.dumps({"finished": finished, "eval_loss": 0.1}))
  (folder / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 0.2}) + "\n")
  (folder / "config.json").write_text(json.dumps({"train": {"batch_size": 8}}))
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


@pytest.mark.skipif(not (RESULTS / "runs").exists(), reason="no committed long-context runs")
def test_committed_results_are_regenerated_from_committed_runs(tmp_path: pathlib.Path):
  summarize_long_context.summarize_grid(RESULTS / "runs", tmp_path)
  for name in ("long_context.md", "long_context.csv"):
    assert (tmp_path / name).read_text() == (RESULTS / name).read_text(), name

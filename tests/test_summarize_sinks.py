"""The sink-testbed summarizer on fabricated runs, and that the committed sink results are
exactly what it produces from the committed run files."""

import json
import pathlib
import statistics

import pytest

from experiments import paper_results
from experiments.sinks import summarize_sinks

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "results" / "sinks"


def _write_run(folder: pathlib.Path, first: list[float], act: list[float],
               gates: list[float] | None = None, finished: bool = True) -> None:
  folder.mkdir(parents=True)
  rows = []
  for i, (f, a) in enumerate(zip(first, act)):
    row = {"step": 100 * (i + 1), "loss": 1.5, "eval_loss": 1.4 + 0.01 * i,
           "tokens_per_sec": 8 * 64 * 100 / 60.0 / (i + 1),  # row i: (i + 1) minutes
           "first_token_attention": f, "sink_rate": float(f > 0.3), "max_activation": a}
    if gates is not None:
      row["gate_score_mean_per_layer"] = gates
    rows.append(row)
  (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (folder / "summary.json").write_text(json.dumps({"finished": finished}))
  (folder / "config.json").write_text(json.dumps(
      {"train": {"batch_size": 8}, "data": {"seq_len": 64}}))


def test_rows_onset_and_paper_columns(tmp_path: pathlib.Path):
  root = tmp_path / "sinks"
  _write_run(root / "testbed/baseline/seed0", [0.1, 0.35, 0.6], [5.0, 9.0, 20.0])
  _write_run(root / "testbed/baseline/seed1", [0.2, 0.25, 0.5], [4.0, 8.0, 30.0])
  _write_run(root / "testbed/sdpa_elementwise/seed0", [0.1, 0.05, 0.02], [5.0, 6.0, 7.0],
             gates=[0.2, 0.4])
  _write_run(root / "testbed/sdpa_elementwise/seed1", [0.9], [1.0], finished=False)
  table = {r["variant"]: r for r in summarize_sinks.summarize_grid(root, tmp_path / "out")}

  base = table["baseline"]
  assert base["seeds"] == 2
  assert base["first_token_attention"] == pytest.approx(0.55)
  assert base["first_token_attention_std"] == pytest.approx(statistics.stdev([0.6, 0.5]))
  assert base["max_activation"] == pytest.approx(25.0)
  assert base["sink_rate"] == pytest.approx(1.0)
  assert base["eval_loss"] == pytest.approx(1.42)
  assert base["onset_step"] == pytest.approx(250.0)  # 200 and 300
  assert base["onset_tokens_m"] == pytest.approx(250 * 8 * 64 / 1e6)
  assert base["onset_minutes"] == pytest.approx((3 + 6) / 2)  # 1 + 2 and 1 + 2 + 3 minutes
  assert base["run_minutes"] == pytest.approx(6.0)
  assert base["paper_first_token_attention"] == paper_results.ROWS["baseline"].first_token_attention

  gated = table["sdpa_elementwise"]
  assert gated["seeds"] == 1  # the unfinished seed is left out
  assert gated["first_token_attention"] == pytest.approx(0.02)
  assert gated["gate_score"] == pytest.approx(0.3)
  assert gated["onset_step"] is None  # never reached 0.3
  assert gated["paper_max_activation"] == paper_results.ROWS["sdpa_elementwise"].max_activation

  md = (tmp_path / "out" / "sinks.md").read_text()
  assert "| testbed | baseline | 2 | 0.55 |" in md
  assert (tmp_path / "out" / "sink_onset.png").stat().st_size > 10_000


@pytest.mark.skipif(not (RESULTS / "runs").exists(), reason="no committed sink results")
def test_committed_results_regenerate(tmp_path: pathlib.Path):
  summarize_sinks.summarize_grid(RESULTS / "runs", tmp_path)
  for name in ("sinks.md", "sinks.csv"):
    assert (tmp_path / name).read_text() == (RESULTS / name).read_text(), name

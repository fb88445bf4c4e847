"""The summarizer: its parsing and arithmetic on fabricated run folders, and that the
committed smoke results are exactly what it produces from the committed run files."""

import json
import math
import pathlib

import pytest
from scipy import stats

from configs import ablation
from experiments import paper_results, summarize

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "results" / "smoke"


def _write_run(folder: pathlib.Path, *, ppl: float | None, num_params: int,
               losses: list[float], finished: bool = True,
               analysis: dict | None = None, gates: list[float] | None = None) -> None:
  folder.mkdir(parents=True)
  rows = [{"step": 10 * (i + 1), "loss": l, "loss_spikes": 0} for i, l in enumerate(losses)]
  if gates is not None:
    rows[0]["gate_score_mean_per_layer"] = [0.5, 0.5]
    rows[-1]["gate_score_mean_per_layer"] = gates
  if ppl is not None:
    rows[-1]["eval_loss"] = math.log(ppl)
  (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  summary = {"step": rows[-1]["step"], "num_steps": 10 * len(losses) if finished else 99,
             "finished": finished, "num_params": num_params, "gate_params": 0}
  if ppl is not None:
    summary["eval_perplexity"] = ppl
  (folder / "summary.json").write_text(json.dumps(summary))
  if analysis is not None:
    (folder / "analysis.json").write_text(json.dumps(analysis))


@pytest.fixture
def fake_grid(tmp_path: pathlib.Path) -> pathlib.Path:
  root = tmp_path / "ablation"
  _write_run(root / "baseline/seed0", ppl=20.0, num_params=1000, losses=[3.0, 2.5])
  _write_run(root / "baseline/seed1", ppl=22.0, num_params=1000, losses=[3.1, 2.6])
  _write_run(root / "sdpa_elementwise/seed0", ppl=18.0, num_params=1256, losses=[3.0, 2.4],
             analysis={"gate_score_mean": 0.2, "first_token_attention": 0.05,
                       "max_activation": 90.0}, gates=[0.1, 0.3])
  _write_run(root / "key_elementwise/seed0", ppl=25.0, num_params=1064, losses=[3.0, 2.7])
  # Stopped before the end: no validation perplexity counts.
  _write_run(root / "dense_elementwise/seed0", ppl=None, num_params=1512, losses=[3.0],
             finished=False)
  return root


def test_ablation_rows_from_fabricated_runs(fake_grid):
  rows = {r["variant"]: r for r in summarize.ablation_rows(summarize.read_runs(fake_grid))}
  assert list(rows) == ["baseline", "sdpa_elementwise", "key_elementwise",
                        "dense_elementwise"]  # paper order
  base, g1, g3, g5 = (rows[v] for v in rows)
  assert (base["seeds"], base["ppl"], base["delta_ppl"], base["added_params"]) == (2, 21.0,
                                                                                   0.0, 0)
  assert (g1["ppl"], g1["delta_ppl"], g1["added_params"], g1["rank"]) == (18.0, -3.0, 256, 1)
  assert (base["rank"], g3["rank"]) == (2, 3)
  assert (g1["gate_score_mean"], g1["first_token_attention"], g1["max_activation"]) == (
      0.2, 0.05, 90.0)
  assert g1["train_gate_score_mean"] == pytest.approx(0.2)
  assert base["gate_score_mean"] is None and base["train_gate_score_mean"] is None
  assert (g5["seeds"], g5["ppl"], g5["rank"], g5["added_params"]) == (0, None, None, None)
  paper = paper_results.ROWS
  assert g1["paper_ppl"] == paper["sdpa_elementwise"].ppl
  assert g1["paper_delta_ppl"] == pytest.approx(paper["sdpa_elementwise"].ppl
                                                - paper["baseline"].ppl)
  # Paper ranks among the variants we ran: G1 5.761 < G3 6.016 < baseline 6.026.
  assert (g1["paper_rank"], g3["paper_rank"], base["paper_rank"]) == (1, 2, 3)
  assert g1["paper_first_token_attention"] == 0.048
  # Ours: G1 < base < G3; paper: G1 < G3 < base -> ranks (1,2,3) vs (1,3,2).
  assert summarize.ablation_spearman(list(rows.values())) == pytest.approx(0.5)


def test_written_tables_and_plots(fake_grid, tmp_path):
  stab = tmp_path / "stability"
  _write_run(stab / "baseline_lr0.1/seed0", ppl=None, num_params=1000, losses=[3.0, 9.0],
             finished=False)
  _write_run(stab / "sdpa_elementwise_lr0.1/seed0", ppl=19.0, num_params=1256,
             losses=[3.0, 2.5])
  _write_run(stab / "baseline_lr0.003/seed0", ppl=20.0, num_params=1000, losses=[3.0, 2.5])
  out = tmp_path / "out"
  summarize.summarize(fake_grid, stab, out)
  lines = (out / "ablation.csv").read_text().splitlines()
  assert lines[0].split(",") == list(summarize.ABLATION_COLUMNS)
  assert lines[1].startswith("baseline,2,0,1000,21,0,2,,,,,1.1,0,6.026,0,3,")  # all active
  assert lines[2].startswith("sdpa_elementwise,1,256,1256,18,-3,1,0.2,0.2,0.05,90,")
  assert "over 3 variants: 0.5" in (out / "ablation.md").read_text()
  assert (out / "stability.csv").read_text().splitlines()[1:] == [
      "baseline,0.003,0,20,20,2.5,20,0,finished",
      "baseline,0.1,0,20,99,9,,0,stopped",
      "sdpa_elementwise,0.1,0,20,20,2.5,19,0,finished"]
  for png in ("loss_curves.png", "stability.png"):
    assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_snapshot_copies_only_the_small_files(fake_grid, tmp_path):
  (fake_grid / "baseline/seed0/checkpoints").mkdir()
  (fake_grid / "baseline/seed0/log.txt").write_text("x")
  summarize.snapshot(fake_grid, tmp_path / "copy")
  assert sorted(p.name for p in (tmp_path / "copy/baseline/seed0").iterdir()) == [
      "metrics.jsonl", "summary.json"]
  assert (tmp_path / "copy/sdpa_elementwise/seed0/analysis.json").exists()


@pytest.mark.parametrize("a, b", [([1, 2, 3, 4], [1, 3, 2, 4]), ([5, 1, 1, 2], [4, 2, 3, 1]),
                                  ([0.3, 0.1, 0.2, 0.9, 0.5], [9, 8, 7, 6, 5])])
def test_spearman_matches_scipy(a, b):
  assert summarize.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)


def test_committed_smoke_results_are_what_the_code_produces(tmp_path):
  summarize.summarize(RESULTS / "runs" / "ablation", RESULTS / "runs" / "stability",
                      tmp_path, plots=False)
  for name in ("ablation.csv", "ablation.md", "stability.csv", "stability.md"):
    assert (tmp_path / name).read_text() == (RESULTS / name).read_text(), name
  runs = summarize.read_runs(RESULTS / "runs" / "ablation")
  assert set(runs) == set(ablation.variants("smoke")) <= set(paper_results.ROWS)
  assert all(summarize.is_finished(r) for seeds in runs.values() for r in seeds)

"""experiments/gpu_check.py: the CPU dry run end to end, and a stage's status on timeout/failure.

The dry run runs the same three stages as on the GPU at tiny shapes (about 30 s on 2 idle cores:
three subprocesses importing jax, the kernels in their interpreters) and must leave the files the
device tool brings back: at most eight, every stage ok, the JSON keys the README's results
tables are made from.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = ("kernels", "attention", "throughput")


def test_dry_run_writes_every_stage(tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "experiments/gpu_check.py", "--dry-run", f"--out={out}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "GPU check summary" in proc.stdout
  files = {p.name for p in out.iterdir()}
  assert files == {"results.json", "results.md"} | {f"{s}.{e}" for s in STAGES
                                                     for e in ("json", "log")}
  results = json.loads((out / "results.json").read_text())
  assert results["dry_run"] is True and results["device"].startswith("cpu")
  env = results["environment"]
  assert {"date", "python", "nvidia_smi", "packages"} <= env.keys() and "jax" in env["packages"]
  assert [s["name"] for s in results["stages"]] == list(STAGES)
  for stage in results["stages"]:
    assert stage["status"] == "ok" and stage["returncode"] == 0, stage
    assert {"device", "markdown", "summary"} <= stage["result"].keys(), stage["name"]
    assert stage["result"] == json.loads((out / f"{stage['name']}.json").read_text())
  kernels, attention, throughput = (s["result"] for s in results["stages"])
  assert {r["status"] for r in kernels["rows"]} <= {"pass", "unsupported"}
  triton = next(r for r in kernels["rows"] if r["impl"] == "pallas_gpu")
  assert triton["status"] == "pass" and set(triton["errors"]) == {"o", "dq", "dk", "dv", "dgate"}
  methods = {r["method"] for r in attention["rows"] if r["error"] is None}
  assert {"ours (pallas_gpu)", "xla reference"} <= methods
  assert all(run["tokens_per_sec"] > 0 and run["ratio_to_matmul"] > 0
             for run in throughput["runs"])
  md = (out / "results.md").read_text()
  for stage in STAGES:
    assert f"| {stage} | ok |" in md and f"## {stage}: ok" in md
  assert "| impl | case |" in md and "| attention_impl |" in md and "fwd+bwd speed-up" in md


def test_stage_statuses(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT / "experiments"))
  gpu_check = importlib.import_module("gpu_check")
  scripts = {"sleeps": "import time; time.sleep(30)",
             "fails": "raise SystemExit('broken on purpose')",
             "silent": "pass"}
  statuses = {}
  for name, code in scripts.items():
    (tmp_path / f"{name}.py").write_text(code)
    stage = gpu_check.Stage(name, str(tmp_path / f"{name}.py"), (), (), 1)
    statuses[name] = gpu_check.run_stage(stage, tmp_path, dry_run=False, limit_s=2)
  assert statuses["sleeps"]["status"] == "timeout" and statuses["sleeps"]["returncode"] is None
  assert statuses["fails"]["status"] == "failed"
  assert "broken on purpose" in statuses["fails"]["log_tail"]
  assert statuses["silent"]["status"] == "no-json" and statuses["silent"]["result"] is None

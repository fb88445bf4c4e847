"""The GPU check: kernel correctness, attention and training benchmarks, in one command.

On the lent H200, from the repository root (``gpu_check.sh`` installs the carried wheels first;
README "Running the GPU check" gives the device call):

    experiments/gpu_check.sh                  # writes to $OUT
    python experiments/gpu_check.py --dry-run --out=/tmp/gpu_check   # CPU: tiny shapes

Stages, each a subprocess with a time limit (90, 210 and 150 s; time a stage leaves unused passes
to the next, so all three end within 7.5 minutes):

  kernels     experiments/kernel_check.py: pallas_mgpu and pallas_gpu compiled, values and
              dq/dk/dv/dgate against a float32 reference (head_dim 64/128/256, the last with
              Qwen3-Next's and Qwen3.5's heads, GQA, headwise, segment ids, odd lengths)
  attention   experiments/benchmarks/attention.py: seven shapes (Qwen3-Next's and Qwen3.5's,
              head_dim 256, among them) × two gates, both kernels vs cuDNN + XLA gate vs XLA,
              forward and forward+backward, in one process
  throughput  experiments/benchmarks/train_throughput.py --config=configs/gpt_125m.py
              --impls=cudnn,pallas,xla: tokens/s, model TFLOP/s, ratio to a bf16 matmul

The dry run runs the same stages at tiny shapes (kernels in their interpreters, no cuDNN) and
writes the same files. Each stage writes <stage>.json (rows, a markdown table, summary lines)
and <stage>.log under --out; results.json (environment: device, driver, package versions, date;
per stage: status, seconds, return code, the end of its log if it failed, and its JSON) and
results.md are rewritten after every stage, so a kill leaves what finished. That is eight
files, the most the device tool brings back. A stage's status: ok, failed (non-zero exit; for
kernels, a case out of tolerance or erroring), timeout, or no-json (exited 0 without writing
its JSON). Exit status 0 when every stage is ok.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
            "jax-cuda12-pjrt", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "protobuf")


@dataclasses.dataclass(frozen=True)
class Stage:
  """A script run with args on the GPU, or dry_args in the dry run, and given --json=PATH."""

  name: str
  script: str  # relative to the repository root, or absolute
  args: tuple[str, ...]  # on the GPU
  dry_args: tuple[str, ...]  # CPU dry run
  limit_s: int


# The dry run times pallas_gpu alone: Mosaic GPU's interpreter (jax >= 0.11) is too slow to time
# in the test's budget; the kernels stage still runs it there.
STAGES = (
    Stage("kernels", "experiments/kernel_check.py", (), ("--small",), 90),
    Stage("attention", "experiments/benchmarks/attention.py", ("--impl=pallas_gpu,pallas_mgpu",),
          ("--impl=pallas_gpu", "--small"), 210),
    Stage("throughput", "experiments/benchmarks/train_throughput.py",
          ("--config=configs/gpt_125m.py", "--impls=cudnn,pallas,xla"),
          ("--config=configs/default.py", "--impls=xla", "--steps=1", "--warmup=1",
           "--matmul_size=256", "--config.train.batch_size=2", "--config.data.seq_len=64",
           "--config.model.num_layers=1"), 150),
)


def environment() -> dict:
  """Date, host, Python, package versions and nvidia-smi's GPU line (None without a GPU)."""
  try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
                         check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    smi = None
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "host": platform.node(), "python": platform.python_version(), "nvidia_smi": smi,
          "packages": versions}


def run_stage(stage: Stage, out: pathlib.Path, dry_run: bool, limit_s: float) -> dict:
  """Runs one stage in a subprocess under limit_s; its status, time and JSON (None if absent)."""
  json_path, log_path = out / f"{stage.name}.json", out / f"{stage.name}.log"
  json_path.unlink(missing_ok=True)
  cmd = [sys.executable, stage.script, *(stage.dry_args if dry_run else stage.args),
         f"--json={json_path.resolve()}"]
  env = os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
      filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
  start = time.perf_counter()
  with open(log_path, "w") as log:
    log.write(" ".join(cmd) + "\n")
    log.flush()
    try:
      rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                          timeout=limit_s, check=False).returncode
    except subprocess.TimeoutExpired:
      rc = None
  result = json.loads(json_path.read_text()) if json_path.exists() else None
  status = ("timeout" if rc is None else "failed" if rc else "ok" if result else "no-json")
  log_tail = None if status == "ok" else log_path.read_text()[-2000:]
  return {"name": stage.name, "status": status, "returncode": rc,
          "seconds": round(time.perf_counter() - start, 1), "limit_s": round(limit_s, 1),
          "command": " ".join(cmd[1:]), "log_tail": log_tail, "result": result}


def device(stages: list[dict]) -> str | None:
  """The device kind a stage's jax reported (the orchestrator never starts jax itself: it would
  hold GPU memory the stages need)."""
  return next((s["result"]["device"] for s in stages if s["result"]), None)


def markdown(results: dict) -> str:
  """results.md: environment, stage table, then each stage's summary and table."""
  env = results["environment"]
  lines = [f"# GPU check{' (dry run)' if results['dry_run'] else ''}, {env['date']}", "",
           "| | |", "|---|---|", f"| device (jax) | {results['device']} |",
           f"| nvidia-smi (name, driver, memory) | {env['nvidia_smi']} |",
           f"| Python | {env['python']} |", f"| host | {env['host']} |",
           *(f"| {name} | {version} |" for name, version in env["packages"].items()), "",
           "| stage | status | seconds | limit s | command |", "|---|---|---|---|---|",
           *(f"| {s['name']} | {s['status']} | {s['seconds']} | {s['limit_s']} | "
             f"`{s['command']}` |" for s in results["stages"])]
  for s in results["stages"]:
    lines += ["", f"## {s['name']}: {s['status']}", ""]
    if s["result"]:
      lines += [*(f"- {line}" for line in s["result"]["summary"]), "", s["result"]["markdown"]]
    if s["log_tail"]:
      lines += ["", "End of the log:", "", "```", s["log_tail"].rstrip(), "```"]
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dry-run", action="store_true",
                      help="the same stages at tiny shapes, for a CPU")
  parser.add_argument("--out", type=pathlib.Path, default=os.environ.get("OUT"),
                      help="output folder (default: $OUT)")
  args = parser.parse_args()
  if args.out is None:
    parser.error("--out is required when $OUT is not set")
  args.out.mkdir(parents=True, exist_ok=True)
  results = {"dry_run": args.dry_run, "environment": environment(), "device": None, "stages": []}
  spare_s = 0.0
  for stage in STAGES:
    print(f"[gpu_check] {stage.name} ...", flush=True)
    ran = run_stage(stage, args.out, args.dry_run, stage.limit_s + spare_s)
    spare_s = max(0.0, ran["limit_s"] - ran["seconds"])
    results["stages"].append(ran)
    results["device"] = device(results["stages"])
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(markdown(results))
    print(f"[gpu_check] {stage.name}: {ran['status']} in {ran['seconds']} s", flush=True)
  print(f"\nGPU check summary: {results['device']}, {results['environment']['nvidia_smi']}, "
        f"jax {results['environment']['packages'].get('jax')}, "
        f"{results['environment']['date']}")
  for s in results["stages"]:
    print(f"{s['name']}: {s['status']} ({s['seconds']} s of {s['limit_s']})")
    for line in (s["result"] or {}).get("summary", []):
      print(f"  {line}")
  print(f"Files in {args.out}: results.json, results.md, <stage>.json, <stage>.log")
  raise SystemExit(int(any(s["status"] != "ok" for s in results["stages"])))


if __name__ == "__main__":
  main()

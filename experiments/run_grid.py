"""Runs the ablation grid (or the LR-stability sweep) sequentially here, or prints its commands.

    python experiments/run_grid.py --scale=smoke                       # all 19 variants, seed 0
    python experiments/run_grid.py --scale=small --seeds=0,1,2 --print_only   # for a cluster
    python experiments/run_grid.py --grid=stability --scale=testbed --seeds=0,1,2  # lr x gate
    python experiments/run_grid.py --scale=small --config.data.tokenizer=gpt2  # overrides
    python experiments/run_grid.py --scale=smoke --analyze   # + analysis.json for each run
    python experiments/run_grid.py --grid=sinks --scale=testbed --seeds=0,1,2   # sink testbed
    python experiments/run_grid.py --grid=long_context --scale=testbed --seeds=0,1 --analyze

Run folders: ROOT/ablation/SCALE/VARIANT/seedS, ROOT/stability/SCALE/VARIANT_lrLR/seedS and
ROOT/sinks/SETTING/VARIANT/seedS, ROOT/long_context/SETTING/VARIANT/seedS (for --grid=sinks,
stability and long_context, --scale names a setting of configs/sinks.py, configs/stability.py or
configs/long_context.py; stability also takes ablation scales; long_context's --analyze runs the
passkey retrieval only).
A run whose summary.json says finished is skipped; an unfinished one resumes from
its checkpoint (train.py does that). Each run is a separate process; `--config.*`
flags are passed on to every run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import ablation, long_context, sinks, stability  # pylint: disable=g-import-not-at-top,wrong-import-position


def runs(grid: str, scale: str, variants: list[str], seeds: list[int], lrs: list[float],
         root: pathlib.Path) -> list[tuple[str, pathlib.Path, int]]:
  """(config argument, run folder, seed) for every cell of the grid."""
  cells = []
  for variant in variants:
    if grid in ("ablation", "sinks", "long_context"):
      cells += [(f"configs/{grid}.py:{variant},{scale}", root / grid / scale / variant)]
    else:
      cells += [(f"configs/stability.py:{variant},{scale},{lr:g}",
                 root / "stability" / scale / f"{variant}_lr{lr:g}") for lr in lrs]
  return [(arg, folder / f"seed{seed}", seed) for arg, folder in cells for seed in seeds]


def command(config_arg: str, workdir: pathlib.Path, seed: int,
            overrides: tuple[str, ...] = ()) -> list[str]:
  return [sys.executable, "-m", "gated_attention_jax.main", f"--config={config_arg}",
          f"--workdir={workdir}", f"--config.train.seed={seed}", *overrides]


def analyze_command(workdir: pathlib.Path, grid: str) -> list[str]:
  extra = ["--retrieval_only"] if grid == "long_context" else []
  return [sys.executable, "-m", "gated_attention_jax.analyze", f"--workdir={workdir}", *extra]


def run_logged(cmd: list[str], workdir: pathlib.Path) -> bool:
  """Runs cmd from the repository root, appending its output to workdir/log.txt."""
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / "log.txt", "a") as log:
    return subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode == 0


def finished(workdir: pathlib.Path) -> bool:
  summary = workdir / "summary.json"
  return summary.exists() and json.loads(summary.read_text()).get("finished", False)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--grid", choices=("ablation", "stability", "sinks", "long_context"),
                      default="ablation")
  parser.add_argument("--scale", required=True,
                      help=f"ablation: one of {sorted(ablation.SCALES)}; sinks: a setting,"
                      f" one of {list(sinks.SETTINGS)}; stability: a setting, one of"
                      f" {list(stability.SETTINGS)}, or an ablation scale; long_context: a"
                      f" setting, one of {list(long_context.SETTINGS)}")
  parser.add_argument("--variants", default="",
                      help="comma-separated; default: every variant of the grid")
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in stability.LEARNING_RATES),
                      help="stability grid only: peak learning rates")
  parser.add_argument("--root", default="runs", type=pathlib.Path)
  parser.add_argument("--print_only", action="store_true",
                      help="print one command per run instead of running them")
  parser.add_argument("--analyze", action="store_true",
                      help="also run gated_attention_jax.analyze on every finished run that"
                      " has no analysis.json (sinks, activations, gates: summarize's columns)")
  args, overrides = parser.parse_known_args()
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments (only --config.* overrides pass through): {bad}")
  scales = {"ablation": ablation.SCALES, "sinks": sinks.SETTINGS,
            "long_context": long_context.SETTINGS,
            "stability": {**stability.SETTINGS, **ablation.SCALES}}[args.grid]
  if args.scale not in scales:
    parser.error(f"--scale for --grid={args.grid} must be one of {list(scales)},"
                 f" got {args.scale!r}")
  default = list({"ablation": ablation.variants(args.scale), "stability": stability.VARIANTS,
                  "sinks": sinks.VARIANTS, "long_context": long_context.VARIANTS}[args.grid])
  variants = args.variants.split(",") if args.variants else default
  cells = runs(args.grid, args.scale, variants, [int(s) for s in args.seeds.split(",")],
               [float(lr) for lr in args.lrs.split(",")], args.root)
  failed = []
  for i, (config_arg, workdir, seed) in enumerate(cells):
    cmds = [command(config_arg, workdir, seed, tuple(overrides))]
    if args.analyze:
      cmds.append(analyze_command(workdir, args.grid))
    if args.print_only:
      print(" && ".join(shlex.join(["python", *c[1:]]) for c in cmds))
      continue
    if finished(workdir):
      print(f"[{i + 1}/{len(cells)}] done already: {workdir}", flush=True)
    else:
      print(f"[{i + 1}/{len(cells)}] {shlex.join(cmds[0])}", flush=True)
      if not run_logged(cmds[0], workdir):
        failed.append(str(workdir))
        print(f"  failed (see {workdir / 'log.txt'})", flush=True)
        continue
    analysis = "retrieval.json" if args.grid == "long_context" else "analysis.json"
    if args.analyze and not (workdir / analysis).exists():
      print(f"  {shlex.join(cmds[1])}", flush=True)
      if not run_logged(cmds[1], workdir):
        failed.append(f"{workdir} (analysis)")
        print(f"  analysis failed (see {workdir / 'log.txt'})", flush=True)
  if failed:
    sys.exit(f"{len(failed)} runs failed: {failed}")


if __name__ == "__main__":
  main()

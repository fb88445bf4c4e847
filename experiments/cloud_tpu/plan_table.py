"""The Cloud TPU planning table: paper-scale configs compiled by libtpu for whole slices.

    JAX_PLATFORMS=cpu .toolchains/jax-0.11.2/bin/python experiments/cloud_tpu/plan_table.py \\
        [--minutes 15] [--write]

For each model (`paper_1p7b`, `paper_1p7b_48l`; baseline and G1 elementwise) and slice, the
train step (Pallas attention, scan_layers, remat full, FSDP over the whole slice) is compiled
by `plan.plan` at 1 sequence of 4096 tokens per chip. Per-device memory grows linearly with the
batch per chip; the slope (bytes per extra sequence per chip) is measured once per model and
TPU generation, by a second compile at 2 per chip on the first slice of that generation, and the
largest batch per chip that fits is extrapolated from it (a model's baseline and G1 variants
share a slope when only one was measured, marked *). For the cells in `VERIFY` the largest
batch is then searched by compiling: the extrapolation first, then bisection (libtpu refuses
a step that does not fit HBM, quickly). Results are kept in
experiments/results/cloud_tpu_plans.json as they come, so a rerun resumes; `--write` puts the
table between the markers in experiments/cloud_tpu/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from configs import ablation  # pylint: disable=g-import-not-at-top,wrong-import-position
from gated_attention_jax import aot, plan  # pylint: disable=g-import-not-at-top,wrong-import-position
RESULTS = ROOT / "experiments" / "results" / "cloud_tpu_plans.json"
README = ROOT / "experiments" / "cloud_tpu" / "README.md"
BEGIN, END = "<!-- plan_table: begin -->", "<!-- plan_table: end -->"
# Cloud TPU slice name -> libtpu topology. v4 / v5p names count TensorCores (2 per chip),
# v5e / v6e names count chips: v5p-64 is 32 chips, v6e-256 is 256.
SLICES = {"v5p-64": "v5p:4x4x2", "v5p-256": "v5p:4x4x8", "v6e-256": "v6e:16x16"}
MODELS = [("paper_1p7b", "baseline"), ("paper_1p7b", "sdpa_elementwise"),
          ("paper_1p7b_48l", "baseline"), ("paper_1p7b_48l", "sdpa_elementwise")]
# Cells whose extrapolated largest batch is also compiled.
VERIFY = {("paper_1p7b", "baseline", "v5p-256"), ("paper_1p7b", "baseline", "v6e-256")}
# Compile order when time is short: the pod slices first, then v5p-64 (which reuses v5p's slopes).
CELLS = ([(scale, variant, s) for scale, variant in MODELS for s in ("v5p-256", "v6e-256")]
         + [(scale, variant, "v5p-64") for scale, variant in MODELS])


def _config(scale: str, variant: str, topology: str, per_chip: int):
  config = ablation.make_config(variant, scale)
  config.model.update(attention_impl="pallas", scan_layers=True, remat="full")
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  config.train.batch_size = per_chip * len(aot.target_devices(topology))
  return config


def _plan(results: dict, key: str, scale: str, variant: str, slice_name: str,
          per_chip: int) -> dict:
  if key not in results:
    topology = SLICES[slice_name]
    numbers = plan.plan(_config(scale, variant, topology, per_chip), aot.target_devices(topology),
                        topology=topology, hbm_bytes=aot.hbm_bytes(topology))
    results[key] = {"slice": slice_name, "per_chip": per_chip, **numbers}
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{key}: fits {numbers['fits']}, {numbers['compile_seconds']:.0f} s", flush=True)
  return results[key]


def run(deadline: float) -> dict:
  """Compiles the cells (slope compiles first) until done or past `deadline` (time.time())."""
  results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
  for scale, variant, slice_name in CELLS:
    if time.time() > deadline:
      break
    _plan(results, f"{scale}/{variant}/{slice_name}/1", scale, variant, slice_name, 1)
    generation = slice_name.split("-")[0]
    if _slope(results, scale, variant, generation) is None and time.time() < deadline:
      two = _plan(results, f"{scale}/{variant}/{slice_name}/2", scale, variant, slice_name, 2)
      one = results[f"{scale}/{variant}/{slice_name}/1"]
      results[f"{scale}/{variant}/{generation}/slope"] = (
          two["per_device_bytes"]["total"] - one["per_device_bytes"]["total"])
      RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    while (scale, variant, slice_name) in VERIFY and time.time() < deadline:
      fit, too_big = _bounds(results, scale, variant, slice_name)
      if too_big is None:  # try the extrapolation first, then bisect
        guess = _largest(results, scale, variant, slice_name)
        if guess is None or guess[0] <= fit:
          break
        per_chip = guess[0]
      elif too_big - fit > 1:
        per_chip = (fit + too_big) // 2
      else:
        break
      _plan(results, f"{scale}/{variant}/{slice_name}/{per_chip}", scale, variant, slice_name,
            per_chip)
  return results


def _bounds(results: dict, scale: str, variant: str, slice_name: str) -> tuple[int, int | None]:
  """(largest sequences per chip compiled and fitting, smallest compiled and not; None: none)."""
  prefix = f"{scale}/{variant}/{slice_name}/"
  fit, too_big = 0, None
  for key, cell in results.items():
    if key.startswith(prefix) and key[len(prefix):].isdigit():
      per_chip = int(key[len(prefix):])
      if cell["fits"]:
        fit = max(fit, per_chip)
      else:
        too_big = per_chip if too_big is None else min(too_big, per_chip)
  return fit, too_big


def _slope(results: dict, scale: str, variant: str, generation: str) -> tuple[int, str] | None:
  """(bytes per extra sequence per chip, "" or a mark when another gate variant's is used)."""
  for other, mark in ((variant, ""), *((v, "*") for s, v in MODELS if s == scale and v != variant)):
    if f"{scale}/{other}/{generation}/slope" in results:
      return results[f"{scale}/{other}/{generation}/slope"], mark
  return None


def _largest(results: dict, scale: str, variant: str,
             slice_name: str) -> tuple[int, str] | None:
  """Largest sequences per chip that fit by the linear extrapolation (and the slope's mark)."""
  cell = results.get(f"{scale}/{variant}/{slice_name}/1")
  slope = _slope(results, scale, variant, slice_name.split("-")[0])
  if cell is None or slope is None:
    return None
  spare = cell["hbm_bytes_per_device"] - cell["per_device_bytes"]["total"]
  return (0 if spare < 0 else 1 + int(spare // slope[0])), slope[1]


def table(results: dict) -> str:
  rows = ["| model | gate | slice (chips, topology) | mesh | GiB/chip at 1 seq/chip (HBM) |"
          " largest seqs/chip compiled to fit | linear extrapolation from 1, 2 seqs/chip |"
          " paper batch 1024 = seqs/chip | compile (s) | XLA step estimate at 1 seq/chip (s) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
  for slice_name, topology in SLICES.items():
    for scale, variant in MODELS:
      cell = results.get(f"{scale}/{variant}/{slice_name}/1")
      gate = "G1 elementwise" if variant == "sdpa_elementwise" else "none"
      if cell is None:
        rows.append(f"| {scale} | {gate} | {slice_name} ({topology}) | | not compiled yet |"
                    " | | | | |")
        continue
      chips, total = cell["num_devices"], cell["per_device_bytes"]["total"]
      hbm = cell["hbm_bytes_per_device"]
      guess = _largest(results, scale, variant, slice_name)
      guess = "n/a" if guess is None else f"{guess[0]}{guess[1]}"
      fit, too_big = _bounds(results, scale, variant, slice_name)
      compiled = f"{fit}" + (" (larger not tried)" if too_big is None else
                              f" ({too_big} does not fit)")
      mesh = "fsdp={fsdp}".format(**cell["mesh"])
      estimate = cell["estimated_step_seconds"]
      rows.append(f"| {scale} | {gate} | {slice_name} ({chips}, {topology}) | {mesh} |"
                  f" {total / 2**30:.2f} ({hbm / 2**30:.0f}) | {compiled} | {guess} |"
                  f" {1024 / chips:g} | {cell['compile_seconds']:.0f} |"
                  f" {f'{estimate:.3f}' if estimate and estimate > 0 else 'n/a'} |")
  return ("\n".join(rows) + "\n\n* extrapolated with the other gate variant's slope (the G1 gate"
          " adds little per sequence next to the logits over 151936 tokens).\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--minutes", type=float, default=15.0,
                      help="stop starting compiles after this long")
  parser.add_argument("--write", action="store_true")
  args = parser.parse_args()
  results = run(time.time() + 60 * args.minutes)
  text = (f"Compiled by libtpu {datetime.date.today()} (jax {jax.__version__}) on a CPU machine;"
          " bf16 compute, float32 parameters and Adam moments, seq 4096, vocab 151936.\n\n"
          + table(results))
  print(text)
  if args.write:
    readme = README.read_text()
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    README.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


if __name__ == "__main__":
  main()

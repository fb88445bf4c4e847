"""The Cloud TPU planning table: paper-scale configs compiled by libtpu for whole slices
(and, for comparison, by XLA GPU for one H100 / H200).

    JAX_PLATFORMS=cpu .toolchains/jax-0.11.2/bin/python experiments/cloud_tpu/plan_table.py \\
        [--minutes 15] [--write]

For each model (`paper_1p7b`, `paper_1p7b_48l`, and the 15B mixture of experts
`paper_moe_15b`; baseline and G1 elementwise) and slice, the train step (Pallas attention,
scan_layers, remat full, FSDP over the whole slice; for the MoE, expert parallelism over
`EXPERT_AXIS` devices and FSDP over the rest) is compiled by `plan.plan` at 1 sequence of 4096
tokens per chip, every cell first. Then the largest batch
per chip that fits is searched by compiling: a first guess from the bytes per extra sequence
of a cell already searched (same TPU generation if there is one), then steps up by an eighth
while it fits, then bisection, until a batch that fits sits next to one that libtpu refuses
for lack of HBM. Compiles near the boundary take 1-2 minutes here (refused or not), refusals
far above it seconds. Results are kept in experiments/results/cloud_tpu_plans.json as they come,
so a rerun resumes; `--write` puts the table between the markers in
experiments/cloud_tpu/README.md.
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
SLICES = {"v5p-64": "v5p:4x4x2", "v5p-256": "v5p:4x4x8", "v5p-512": "v5p:8x8x4",
          "v6e-256": "v6e:16x16",
          "h100": "h100", "h200": "h200"}  # and one GPU, for comparison (XLA GPU, deviceless)
DENSE_MODELS = [("paper_1p7b", "baseline"), ("paper_1p7b", "sdpa_elementwise"),
                ("paper_1p7b_48l", "baseline"), ("paper_1p7b_48l", "sdpa_elementwise")]
MOE_MODELS = [("paper_moe_15b", "sdpa_elementwise"), ("paper_moe_15b", "baseline")]
# The MoE's 128 experts over 8 devices, 16 each (the paper does not say how it split them);
# the expert weights and moments a chip holds still shrink with the whole slice (FSDP).
EXPERT_AXIS = 8
# (scale, variant, slice) in the order the search visits them: first the MoE on the v5p
# slices it needs (15B parameters with Adam moments are 170 GiB before any activation).
CELLS = ([(scale, variant, s) for scale, variant in MOE_MODELS for s in ("v5p-64", "v5p-512")]
         + [(scale, variant, s) for s in ("v5p-256", "v6e-256", "v5p-64", "h100", "h200")
            for scale, variant in DENSE_MODELS])


def _config(scale: str, variant: str, topology: str, per_chip: int):
  config = ablation.make_config(variant, scale)
  config.model.update(attention_impl="pallas", scan_layers=True, remat="full")
  config.mesh.update(data=1, fsdp=-1, tensor=1,
                     expert=EXPERT_AXIS if config.model.mlp_type == "moe" else 1)
  config.train.batch_size = per_chip * len(aot.target_devices(topology))
  return config


def run(deadline: float) -> dict:
  """Compiles every cell at 1 per chip, then searches the largest batches, until `deadline`."""
  results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
  for cell in CELLS:
    if time.time() < deadline:
      _plan(results, *cell, 1)
  for cell in CELLS:
    while time.time() < deadline and (per_chip := _next_batch(results, *cell)) is not None:
      _plan(results, *cell, per_chip)
  return results


def _plan(results: dict, scale: str, variant: str, slice_name: str, per_chip: int) -> dict:
  key = f"{scale}/{variant}/{slice_name}/{per_chip}"
  if key not in results:
    topology = SLICES[slice_name]
    numbers = plan.plan(_config(scale, variant, topology, per_chip), aot.target_devices(topology),
                        topology=topology, hbm_bytes=aot.hbm_bytes(topology))
    results[key] = {"slice": slice_name, "per_chip": per_chip, **numbers}
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{key}: fits {numbers['fits']}, {numbers['compile_seconds']:.0f} s", flush=True)
  return results[key]


def _compiled(results: dict, scale: str, variant: str, slice_name: str) -> dict[int, dict]:
  """{sequences per chip: plan} of one cell."""
  prefix = f"{scale}/{variant}/{slice_name}/"
  return {int(key[len(prefix):]): cell for key, cell in results.items()
          if key.startswith(prefix) and key[len(prefix):].isdigit()}


def _bounds(results: dict, scale: str, variant: str, slice_name: str) -> tuple[int, int | None]:
  """(largest sequences per chip compiled and fitting, smallest compiled and not; None: none)."""
  compiled = _compiled(results, scale, variant, slice_name)
  fit = max((n for n, cell in compiled.items() if cell["fits"]), default=0)
  too_big = min((n for n, cell in compiled.items() if not cell["fits"]), default=None)
  return fit, too_big


def _bytes_per_sequence(results: dict, scale: str, slice_name: str) -> float | None:
  """Bytes per extra sequence per chip, from 1 per chip to the largest fit, of a searched
  cell: of the same model and TPU generation if there is one, else the same generation."""
  generation = slice_name.split("-")[0]
  searched = []
  for other_scale, variant, other in CELLS:
    fit, too_big = _bounds(results, other_scale, variant, other)
    if too_big is not None and fit > 1:
      compiled = _compiled(results, other_scale, variant, other)
      slope = ((compiled[fit]["per_device_bytes"]["total"]
                - compiled[1]["per_device_bytes"]["total"]) / (fit - 1))
      searched.append((other.split("-")[0] != generation, other_scale != scale, slope))
  return min(searched)[2] if searched else None


def _next_batch(results: dict, scale: str, variant: str, slice_name: str) -> int | None:
  """The next sequences per chip to compile in the search of a cell; None when done."""
  compiled = _compiled(results, scale, variant, slice_name)
  if 1 not in compiled or not compiled[1]["fits"]:
    return None
  fit, too_big = _bounds(results, scale, variant, slice_name)
  if too_big is None and fit == 1:  # the first guess
    slope = _bytes_per_sequence(results, scale, slice_name) or compiled[1]["per_device_bytes"]["total"]
    spare = compiled[1]["hbm_bytes_per_device"] - compiled[1]["per_device_bytes"]["total"]
    return 1 + max(1, int(spare // slope))
  if too_big is None:
    return fit + max(1, fit // 8)
  return (fit + too_big) // 2 if too_big - fit > 1 else None


def table(results: dict) -> str:
  rows = ["| model | gate | slice (chips, topology) | mesh | GiB/chip at 1 seq/chip (HBM) |"
          " largest seqs/chip that fits (smallest refused) | GiB/chip there |"
          " paper batch 1024 = seqs/chip | compile at 1 seq/chip (s) |",
          "|---|---|---|---|---|---|---|---|---|"]
  for slice_name, topology in SLICES.items():
    for scale, variant in [(scale, variant) for scale, variant, s in CELLS if s == slice_name]:
      compiled = _compiled(results, scale, variant, slice_name)
      gate = "G1 elementwise" if variant == "sdpa_elementwise" else "none"
      if 1 not in compiled:
        rows.append(f"| {scale} | {gate} | {slice_name} ({topology}) | | not compiled yet |"
                    " | | | |")
        continue
      cell = compiled[1]
      chips, total = cell["num_devices"], cell["per_device_bytes"]["total"]
      hbm = cell["hbm_bytes_per_device"]
      fit, too_big = _bounds(results, scale, variant, slice_name)
      largest = f"{fit} ({too_big})" if too_big else (
          f"{fit} (not searched yet)" if fit == 1 else f"{fit} (none refused yet)")
      at_largest = compiled[fit]["per_device_bytes"]["total"] / 2**30
      mesh = " ".join(f"{axis}={size}" for axis, size in cell["mesh"].items() if size > 1)
      rows.append(f"| {scale} | {gate} | {slice_name} ({chips}, {topology}) |"
                  f" {mesh or 'fsdp=1'} | {total / 2**30:.2f} ({hbm / 2**30:.0f}) |"
                  f" {largest} | {at_largest:.1f} | {1024 / chips:g} |"
                  f" {cell['compile_seconds']:.0f} |")
  return "\n".join(rows) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--minutes", type=float, default=15.0,
                      help="stop starting compiles after this long")
  parser.add_argument("--write", action="store_true")
  args = parser.parse_args()
  results = run(time.time() + 60 * args.minutes)
  text = (f"Compiled by libtpu (TPU rows) and deviceless XLA GPU (H100/H200 rows)"
          f" {datetime.date.today()} (jax {jax.__version__}) on a CPU machine; bf16 compute,"
          " float32 parameters and Adam moments, seq 4096, vocab 151936.\n\n"
          + table(results))
  print(text)
  if args.write:
    readme = README.read_text()
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    README.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


if __name__ == "__main__":
  main()

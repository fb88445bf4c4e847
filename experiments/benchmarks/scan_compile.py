"""Compile time of the train step, layers unrolled vs under `nnx.scan` (`model.scan_layers`).

    python experiments/benchmarks/scan_compile.py [--layers 2 12 48] [--write]

The default config's model (D 128, 4 heads, remat "full", G1 elementwise gate) with 2, 12 and
48 layers; each train step (forward, backward, AdamW) traced, lowered and compiled once, on
one CPU device, by `plan.plan` (its `compile_seconds`), with no compilation cache. `--write`
puts the Markdown table between the `scan_compile` markers in README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import sys

import jax

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from gated_attention_jax import plan  # pylint: disable=g-import-not-at-top,wrong-import-position

README = REPO / "README.md"
BEGIN, END = "<!-- scan_compile: begin -->", "<!-- scan_compile: end -->"


def compile_seconds(num_layers: int, scan: bool) -> float:
  config = default.get_config()
  config.model.update(num_layers=num_layers, scan_layers=scan, remat="full")
  config.mesh.update(data=1)
  return plan.plan(config, jax.devices()[:1])["compile_seconds"]


def _cpu() -> str:
  for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or "unknown CPU"


def table(layers: list[int]) -> str:
  rows = ["| layers | unrolled (s) | scanned (s) | unrolled / scanned |", "|---|---|---|---|"]
  for n in layers:
    unrolled, scanned = compile_seconds(n, False), compile_seconds(n, True)
    rows.append(f"| {n} | {unrolled:.1f} | {scanned:.1f} | {unrolled / scanned:.1f}x |")
    print(rows[-1], flush=True)
  header = (f"Train-step compile time (trace + lower + compile), {datetime.date.today()},"
            f" jax {jax.__version__}, {_cpu()}, {os.cpu_count()} cores shared with other jobs (wall"
            " seconds),"
            " default config's model, remat full, one CPU device.\n\n")
  return header + "\n".join(rows) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[2, 12, 48])
  parser.add_argument("--write", action="store_true")
  args = parser.parse_args()
  jax.config.update("jax_enable_compilation_cache", False)
  text = table(args.layers)
  print(text)
  if args.write:
    head, _, rest = README.read_text().partition(BEGIN)
    README.write_text(f"{head}{BEGIN}\n{text}{END}{rest.partition(END)[2]}")


if __name__ == "__main__":
  main()

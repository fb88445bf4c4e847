"""What `jax.lax.ragged_dot` (the MoE block's grouped matmul) compiles to on each platform.

    JAX_PLATFORMS=cpu .toolchains/jax-0.11.2/bin/python experiments/benchmarks/ragged_dot_lowering.py \\
        --out=experiments/results/moe

For T tokens already sorted into E equal groups, x (T, D) times one (D, F) weight per group is
T·D·F multiply-adds whatever E is (the grouped ideal, 2·T·D·F FLOPs); a compiler that densifies
it computes every token against every expert: E times that. Compiled ahead of time on this CPU
machine for the CPU, a TPU v5p (libtpu) and an H200 (deviceless XLA GPU), the FLOPs of each
compiled program (XLA's cost analysis) are reported against the ideal, at E = 8, 32, 128, with
whether the optimised HLO keeps a ragged-dot instruction. A compile's verdict, not a timing.
Writes ragged_dot_lowering_jax<version>.json and .md under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re

import jax
import jax.numpy as jnp

from gated_attention_jax import aot

TARGETS = ("cpu", "v5p:2x2x1", "h200")
EXPERTS = (8, 32, 128)
# A GPU matmul fusion's signature: (a [., .], b [., .]) -> [M, N], in either operand order.
_GEMM = re.compile(r"gemm_fusion\S*computation \([\w.]+: \w+\[(\d+),(\d+)\]\S*,"
                   r" [\w.]+: \w+\[(\d+),(\d+)\]\S*\) -> \w+\[(\d+),(\d+)\]")


def _gemm_flops(hlo: str) -> float | None:
  """2·M·K·N summed over the GPU matmul fusions of an optimised HLO (None if there are none):
  the deviceless GPU compile gives no cost analysis. K from the operands' sizes, M·K · K·N."""
  flops = []
  for a0, a1, b0, b1, m, n in _GEMM.findall(hlo):
    k = round((int(a0) * int(a1) * int(b0) * int(b1) / (int(m) * int(n))) ** 0.5)
    flops.append(2 * int(m) * k * int(n))
  return float(sum(flops)) if flops else None


def compile_flops(target: str, tokens: int, d: int, f: int, experts: int) -> dict:
  """FLOPs and HLO of ragged_dot((T, D), (E, D, F), equal groups) compiled for `target`."""
  x = jax.ShapeDtypeStruct((tokens, d), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((experts, d, f), jnp.bfloat16)
  sizes = jax.ShapeDtypeStruct((experts,), jnp.int32)
  fn = lambda x, w, sizes: jax.lax.ragged_dot(x, w, sizes)
  if target == "cpu":
    compiled = jax.jit(fn).lower(x, w, sizes).compile()
  else:
    compiled = aot.compile_for(fn, (x, w, sizes), target)
  cost = compiled.cost_analysis() or {}  # the deviceless GPU compile gives none
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = compiled.as_text()
  flops = cost.get("flops") if cost.get("flops") else _gemm_flops(text)
  return {"target": target, "experts": experts, "flops": flops,
          "ideal_flops": 2 * tokens * d * f, "ragged_dot_in_hlo": "ragged-dot" in text}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--d_model", type=int, default=2048)
  parser.add_argument("--expert_dim", type=int, default=768)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args()
  rows = [compile_flops(t, args.tokens, args.d_model, args.expert_dim, e)
          for t in TARGETS for e in EXPERTS]
  header = (f"`jax.lax.ragged_dot` compiled ahead of time, jax {jax.__version__},"
            f" {datetime.date.today()}: x ({args.tokens}, {args.d_model}) bf16 times E weights"
            f" ({args.d_model}, {args.expert_dim}), E equal groups. FLOPs from XLA's cost"
            " analysis (GPU: 2·M·K·N of its matmul fusions); ideal = 2·T·D·F (each token"
            " through its one expert).")
  lines = [header, "", "| target | E | FLOPs | / ideal | ragged-dot kept in HLO |",
           "|---|---|---|---|---|"]
  for r in rows:
    ratio = "n/a" if r["flops"] is None else f"{r['flops'] / r['ideal_flops']:.2f}"
    flops = "n/a" if r["flops"] is None else f"{r['flops']:.3g}"
    lines.append(f"| {r['target']} | {r['experts']} | {flops} | {ratio} |"
                 f" {'yes' if r['ragged_dot_in_hlo'] else 'no'} |")
  args.out.mkdir(parents=True, exist_ok=True)
  name = f"ragged_dot_lowering_jax{jax.__version__}"
  (args.out / f"{name}.json").write_text(json.dumps(
      {"jax": jax.__version__, "date": str(datetime.date.today()), "tokens": args.tokens,
       "d_model": args.d_model, "expert_dim": args.expert_dim, "rows": rows}, indent=1) + "\n")
  (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()

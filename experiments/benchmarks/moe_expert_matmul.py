"""The MoE block's two grouped expert matmuls (`moe.grouped_swiglu`): compiled work and CPU time.

    JAX_PLATFORMS=cpu .toolchains/jax-0.11.2/bin/python \\
        experiments/benchmarks/moe_expert_matmul.py --out=experiments/results/moe

Each token's SwiGLU through each of its k experts, forward and backward, is 18·M·D·F FLOPs
for the M = T·k assignments (the grouped ideal). For "ragged_dot" (`jax.lax.ragged_dot`) and
"blocked" (groups padded to whole blocks, one batched matmul), compiled ahead of time here
for the CPU, a TPU v5p (libtpu) and an H200 (deviceless XLA GPU): the compiled FLOPs against
the ideal (XLA's cost analysis; the GPU compile has none, so 2·|out|·K summed over the dots of
its optimised HLO) and the compiled temporary memory, at E = 8, 32, 128. Then wall time on
this CPU (median of --repeats, after a warm-up) of the jitted forward and backward at a small
shape, "blocked" as a ratio to "ragged_dot" measured in the same run. Compiles are a
verdict on work, not on GPU or TPU time. Writes moe_expert_matmul_jax<version>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import platform as host
import re

import jax
import jax.numpy as jnp
import numpy as np

import timing
from gated_attention_jax import aot, moe

TARGETS = ("cpu", "v5p:2x2x1", "h200")
IMPLS = ("ragged_dot", "blocked")
EXPERTS = (8, 32, 128)
_DEF = re.compile(r"(%[\w.\-]+) = \w+\[([\d,]*)\]")
_DOT = re.compile(r"= \w+\[([\d,]*)\]\S* dot\((%[\w.\-]+), [^)]*\),.*?lhs_contracting_dims="
                  r"\{([\d,]*)\}")


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


def hlo_dot_flops(hlo: str) -> float:
  """2 · |output| · contracted size, summed over the dot instructions of an HLO module."""
  shapes = {name: _dims(dims) for name, dims in _DEF.findall(hlo)}
  flops = 0.0
  for out, lhs, contracting in _DOT.findall(hlo):
    k = math.prod(shapes[lhs][i] for i in _dims(contracting))
    flops += 2 * math.prod(_dims(out)) * k
  return flops


def train_step(impl: str):
  """(x, experts, weights...) -> gradients of a scalar of the experts' outputs."""
  def loss(x, experts, w_gate, w_up, w_down):
    out = moe.grouped_swiglu(x, experts, w_gate, w_up, w_down, impl)
    return jnp.sum(jnp.sin(out.astype(jnp.float32)))
  return jax.grad(loss, argnums=(0, 2, 3, 4))


def shapes(tokens: int, k: int, experts: int, d: int, f: int, dtype) -> tuple:
  return (jax.ShapeDtypeStruct((tokens, d), dtype), jax.ShapeDtypeStruct((tokens, k), jnp.int32),
          jax.ShapeDtypeStruct((experts, d, f), dtype),
          jax.ShapeDtypeStruct((experts, d, f), dtype),
          jax.ShapeDtypeStruct((experts, f, d), dtype))


def compiled_work(target: str, impl: str, args: argparse.Namespace, experts: int) -> dict:
  specs = shapes(args.tokens, args.top_k, experts, args.d_model, args.expert_dim, jnp.bfloat16)
  fn = train_step(impl)
  compiled = (jax.jit(fn).lower(*specs).compile() if target == "cpu"
              else aot.compile_for(fn, specs, target))
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = cost.get("flops") or hlo_dot_flops(compiled.as_text())
  memory = compiled.memory_analysis()
  ideal = 18 * args.tokens * args.top_k * args.d_model * args.expert_dim
  return {"target": target, "impl": impl, "experts": experts, "flops": flops,
          "ideal_flops": ideal, "temp_bytes": getattr(memory, "temp_size_in_bytes", None)}


def cpu_time(impl: str, args: argparse.Namespace, experts: int) -> float:
  """Median seconds of the jitted forward and backward on this CPU, float32, random routing."""
  rng = np.random.default_rng(0)
  t, k, d, f = args.time_tokens, args.top_k, args.time_d_model, args.time_expert_dim
  routed = np.argsort(rng.random((t, experts)), axis=-1)[:, :k].astype(np.int32)
  values = [rng.normal(size=s.shape).astype(np.float32) if s.dtype != jnp.int32 else routed
            for s in shapes(t, k, experts, d, f, jnp.float32)]
  return timing.median_seconds(jax.jit(train_step(impl)), values, args.repeats)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--top_k", type=int, default=8)
  parser.add_argument("--d_model", type=int, default=2048)
  parser.add_argument("--expert_dim", type=int, default=768)
  parser.add_argument("--time_tokens", type=int, default=512)
  parser.add_argument("--time_d_model", type=int, default=64)
  parser.add_argument("--time_expert_dim", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args()
  rows = [compiled_work(t, impl, args, e) for t in TARGETS for e in EXPERTS for impl in IMPLS]
  timings = [{"impl": impl, "experts": e, "seconds": cpu_time(impl, args, e)}
             for e in EXPERTS for impl in IMPLS]
  today, cpu = str(datetime.date.today()), host.processor() or host.machine()
  lines = [f"`moe.grouped_swiglu` forward + backward, jax {jax.__version__}, {today}.", "",
           f"Compiled ahead of time on this CPU machine: T={args.tokens} tokens, top-{args.top_k},"
           f" D={args.d_model}, F={args.expert_dim}, bf16. FLOPs from XLA's cost analysis (GPU:"
           " its dots); ideal = 18·T·k·D·F; temp = the compiled program's temporary memory.", "",
           "| target | E | impl | FLOPs | / ideal | temp GiB |", "|---|---|---|---|---|---|"]
  for r in rows:
    temp = "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**30:.2f}"
    lines.append(f"| {r['target']} | {r['experts']} | {r['impl']} | {r['flops']:.3g} |"
                 f" {r['flops'] / r['ideal_flops']:.2f} | {temp} |")
  lines += ["", f"Wall time on this CPU ({cpu}, {jax.device_count()} device(s)), float32,"
            f" T={args.time_tokens}, top-{args.top_k}, D={args.time_d_model},"
            f" F={args.time_expert_dim}, random routing, median of {args.repeats}:", "",
            "| E | ragged_dot ms | blocked ms | blocked / ragged_dot |", "|---|---|---|---|"]
  for e in EXPERTS:
    by = {r["impl"]: r["seconds"] for r in timings if r["experts"] == e}
    lines.append(f"| {e} | {1e3 * by['ragged_dot']:.2f} | {1e3 * by['blocked']:.2f} |"
                 f" {by['blocked'] / by['ragged_dot']:.2f} |")
  args.out.mkdir(parents=True, exist_ok=True)
  name = f"moe_expert_matmul_jax{jax.__version__}"
  (args.out / f"{name}.json").write_text(json.dumps(
      {"jax": jax.__version__, "date": today, "cpu": cpu, "args": {
          k: v for k, v in vars(args).items() if k != "out"}, "compiled": rows,
       "cpu_seconds": timings}, indent=1) + "\n")
  (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()

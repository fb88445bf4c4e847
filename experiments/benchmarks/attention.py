"""Times gated_flash_attention against cuDNN attention + an XLA sigmoid gate and the XLA reference.

Usage:
  python experiments/benchmarks/attention.py [--impl auto] [--write]   # paper shapes (GPU/TPU)
  python experiments/benchmarks/attention.py --impl pallas_gpu,pallas_mgpu --json out.json
  python experiments/benchmarks/attention.py --small --impl pallas_gpu   # CPU smoke test

All inputs bf16, causal, sigmoid gate. Rows: (B, T, N, K, H) shape × gate kind (elementwise
(B, T, N, H) / headwise (B, T, N)) × method. FLOP convention: causal forward = half of
4·B·T·S·N·H (two matmuls, 2 FLOPs per MAC, half the tiles); forward+backward = 3.5 × forward
(backward recomputes q·kᵀ and does four more matmuls: 2.5 × forward). The gate's elementwise
work is not counted. All methods of a table are timed in the same run, so the ratios compare
like with like (run-to-run noise on one machine is ~5%). Speed-ups are relative to the baseline:
cuDNN + XLA gate on a GPU, the XLA reference elsewhere (cuDNN needs a GPU). A method that fails at
a shape (compile error, out of memory) is reported with its error and the others still run;
``--json`` writes the rows, the markdown table and a summary (rewritten after every row).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp

import timing
from gated_attention_jax.kernels import IMPLS, gated_flash_attention, reference

# (B, T, N, K, H). Targets: ours >= 1.0x cuDNN + gate there. They run first, so that a time
# limit (experiments/gpu_check.py) cuts the others.
TARGET_SHAPES = [(4, 4096, 16, 16, 128), (1, 16384, 16, 16, 128)]
# Then the released gated models' heads (Qwen3-Next 16 / 2 and Qwen3.5 8 / 2 of 256), where
# the kernels' "auto" picks Triton over Mosaic GPU, which spills there: which is faster?
SHAPES = TARGET_SHAPES + [(2, 4096, 16, 2, 256), (2, 4096, 8, 2, 256), (4, 4096, 16, 8, 128),
                          (16, 1024, 16, 16, 128), (8, 2048, 32, 32, 64)]
SMALL_SHAPES = [(1, 64, 2, 1, 64)]
GATES = ("elementwise", "headwise")
RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"


def _ours(impl: str) -> Callable:
  return lambda q, k, v, g: gated_flash_attention(q, k, v, g, causal=True, impl=impl)


def _cudnn_then_gate(q, k, v, g):
  y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  act = reference.activation(g.astype(jnp.float32), "sigmoid")
  return (y * (act if g.ndim == 4 else act[..., None])).astype(q.dtype)


def _time_ms(fn: Callable, args, repeats: int) -> float:
  """Median wall time in ms of a jitted call, after one compile+warm-up call."""
  return 1e3 * timing.median_seconds(fn, args, repeats)


def _bench(attend: Callable, args, repeats: int) -> tuple[float, float]:
  """(forward ms, forward+backward ms) of attend(q, k, v, gate)."""
  fwd = jax.jit(attend)
  fwd_bwd = jax.jit(lambda q, k, v, g, do: jax.vjp(attend, q, k, v, g)[1](do))
  return _time_ms(fwd, args[:4], repeats), _time_ms(fwd_bwd, args, repeats)


def _inputs(shape, gate: str):
  b, t, n, kh, h = shape
  keys = jax.random.split(jax.random.key(0), 5)
  normal = lambda key, s: jax.random.normal(key, s, jnp.bfloat16)
  gate_shape = (b, t, n, h) if gate == "elementwise" else (b, t, n)
  return (normal(keys[0], (b, t, n, h)), normal(keys[1], (b, t, kh, h)),
          normal(keys[2], (b, t, kh, h)), normal(keys[3], gate_shape),
          normal(keys[4], (b, t, n, h)))


def _baseline() -> str:
  """The method the speed-ups are relative to: cuDNN + XLA gate on GPUs, else the XLA reference."""
  return "cudnn + xla gate" if jax.default_backend() == "gpu" else "xla reference"


def _row(shape, gate: str, method: str, times: tuple[float, float] | str,
         base: tuple[float, float] | str) -> dict:
  """One row: ms, TFLOP/s and speed-up over the baseline; times is an error string on failure."""
  b, t, n, _, h = shape
  fwd_flops = 4 * b * t * t * n * h / 2
  row = {"shape": list(shape), "gate": gate, "method": method, "error": None}
  if isinstance(times, str):
    return row | {"error": times}
  (fwd_ms, bwd_ms), ok = times, not isinstance(base, str)
  return row | {"fwd_ms": fwd_ms, "fwd_tflops": fwd_flops / fwd_ms / 1e9,
                "fwd_bwd_ms": bwd_ms, "fwd_bwd_tflops": 3.5 * fwd_flops / bwd_ms / 1e9,
                "fwd_speedup": base[0] / fwd_ms if ok else None,
                "fwd_bwd_speedup": base[1] / bwd_ms if ok else None}


def run(shapes, impls: list[str], repeats: int,
        on_row: Callable[[list[dict]], object] = lambda rows: None) -> list[dict]:
  """Benchmarks every shape × gate × method, the baseline first, and returns the rows, calling
  on_row(rows) after each. A method that fails somewhere (compile error, out of memory) gets an
  error row there; the others still run."""
  methods = {"xla reference": _ours("xla")} | {f"ours ({impl})": _ours(impl) for impl in impls}
  if jax.default_backend() == "gpu":
    methods = {"cudnn + xla gate": _cudnn_then_gate} | methods
  rows = []
  for shape in shapes:
    for gate in GATES:
      args = _inputs(shape, gate)
      base = None  # the baseline's (first method's) times, or its error
      for name, fn in methods.items():
        try:
          times = _bench(fn, args, repeats)
        except Exception as e:  # pylint: disable=broad-except
          times = f"{type(e).__name__}: {e}"[:300]
        base = times if base is None else base
        rows.append(_row(shape, gate, name, times, base))
        on_row(rows)
  return rows


def report(rows: list[dict]) -> dict:
  """--json's content: the rows, their markdown table, and a summary line per kernel at the
  target shapes (elementwise gate; the first shape when none of them ran)."""
  fmt = lambda x, spec: "n/a" if x is None else format(x, spec)
  lines = [f"Device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
           f"{jax.__version__}, bf16, causal, sigmoid gate.", "",
           "| (B, T, N, K, H) | gate | method | fwd ms | fwd TFLOP/s | fwd+bwd ms "
           "| fwd+bwd TFLOP/s | fwd speed-up | fwd+bwd speed-up |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    cells = [fmt(r.get(key), spec) for key, spec in (
        ("fwd_ms", ".3f"), ("fwd_tflops", ".3g"), ("fwd_bwd_ms", ".3f"),
        ("fwd_bwd_tflops", ".3g"), ("fwd_speedup", ".2f"), ("fwd_bwd_speedup", ".2f"))]
    lines.append(f"| {tuple(r['shape'])} | {r['gate']} | {r['method']} | {' | '.join(cells)} |")
  lines += ["", f"Speed-up = {_baseline()} time / that row's time (>1: faster than "
            f"{_baseline()}). FLOPs: causal fwd = 2·B·T²·N·H, fwd+bwd = 3.5 × fwd."]
  errors = [f"- {tuple(r['shape'])} {r['gate']} {r['method']}: {r['error']}"
            for r in rows if r["error"]]
  lines += ["", "Errors:", *errors] if errors else []
  shapes = [s for s in TARGET_SHAPES if list(s) in [r["shape"] for r in rows]] or [
      tuple(rows[0]["shape"])]
  summary = [
      f"{r['method']} {tuple(r['shape'])} elementwise: "
      + (f"error {r['error']}" if r["error"] else
         f"fwd {fmt(r['fwd_speedup'], '.2f')}x, fwd+bwd {fmt(r['fwd_bwd_speedup'], '.2f')}x "
         f"the speed of {_baseline()}")
      for r in rows if r["method"].startswith("ours") and r["gate"] == "elementwise"
      and tuple(r["shape"]) in shapes]
  return {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
          "jax": jax.__version__, "baseline": _baseline(), "rows": rows,
          "markdown": "\n".join(lines), "summary": summary}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--impl", default="auto",
                      help=f"kernel(s) behind 'ours', comma-separated, from {IMPLS}")
  parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--write", action="store_true",
                      help="also write experiments/results/attention_<device>.md")
  parser.add_argument("--json", type=pathlib.Path,
                      help="write rows, table and summary here (rewritten after every row)")
  args = parser.parse_args()
  impls = args.impl.split(",")
  for impl in impls:
    if impl not in IMPLS:
      parser.error(f"--impl: {impl!r} is not one of {IMPLS}")
  write_json = lambda rows: args.json and args.json.write_text(json.dumps(report(rows), indent=1))
  rows = run(SMALL_SHAPES if args.small else SHAPES, impls, 2 if args.small else args.repeats,
             write_json)
  table = report(rows)["markdown"]
  print(table)
  if args.write:
    device = re.sub(r"[^a-z0-9]+", "_", jax.devices()[0].device_kind.lower()).strip("_")
    path = RESULTS / f"attention_{device}{'_small' if args.small else ''}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
  main()

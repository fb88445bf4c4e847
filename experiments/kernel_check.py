"""Values and gradients of the GPU kernels against a float32 reference, compiled on the GPU.

    python experiments/kernel_check.py [--impls=pallas_gpu,pallas_mgpu] [--json=PATH]
    python experiments/kernel_check.py --small     # CPU: tiny shapes, kernels in their interpreters

For every impl × case: o = gated_flash_attention(q, k, v, gate, impl=impl) on bf16 inputs and its
vjp (dq, dk, dv, dgate) against ``kernels.reference.gated_attention`` on the same inputs cast to
float32, with float32 matmuls at full precision (no TF32). Error of each output:
max|got - want| / max|want|; a case passes when every error is <= 2e-2 and every value is finite
(the bf16 tolerance of tests/test_kernels*.py: the kernels round p, ds and their outputs to bf16).
Cases cover head_dim 64/128/256, GQA, headwise and elementwise gates, segment ids, causal or not,
odd lengths and T != S, at the kernels' default block sizes. Each row's status: pass, fail,
error (a compile error or crash, recorded; the next case still runs) or unsupported (the API
refuses the impl for these inputs, e.g. Mosaic GPU under jax < 0.11: not a failure). The JSON is
rewritten after every case. Exit status 1 when any case fails or errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from gated_attention_jax.kernels import gated_flash_attention, reference, resolve_impl

TOLERANCE = 2e-2
OUTPUTS = ("o", "dq", "dk", "dv", "dgate")
STATUSES = ("pass", "fail", "error", "unsupported")


@dataclasses.dataclass(frozen=True)
class Case:
  """One check: q (B=b, T=t, N=n, H=h), k/v (b, S=s, K=k, h), causal or not, gate, segments."""

  name: str
  b: int
  t: int
  s: int
  n: int
  k: int
  h: int
  causal: bool = True
  gate: str | None = "elementwise"  # "elementwise", "headwise" or None
  segments: bool = False  # packed documents (needs t == s)


CASES = (
    Case("h64_causal", 2, 1024, 1024, 8, 8, 64),
    Case("h128_gqa4", 2, 2048, 2048, 16, 4, 128),
    # The released gated models' attention: Qwen3-Next (16 query / 2 kv heads of 256), Qwen3.5
    # (8 / 2).
    Case("h256_qwen3_next_16x2", 1, 1024, 1024, 16, 2, 256),
    Case("h256_qwen3p5_8x2", 1, 1024, 1024, 8, 2, 256),
    Case("h128_headwise", 2, 1024, 1024, 8, 8, 128, gate="headwise"),
    Case("h128_gqa2_segments", 2, 1024, 1024, 8, 4, 128, segments=True),
    Case("h128_odd_noncausal_headwise", 1, 999, 999, 8, 8, 128, causal=False, gate="headwise"),
    Case("h64_t_lt_s_odd_ungated", 1, 333, 1031, 4, 2, 64, gate=None),
)
SMALL_CASES = (Case("small_odd_gqa2_segments", 1, 40, 40, 2, 1, 64, segments=True),)


def _inputs(case: Case, seed: int = 0):
  """bf16 (q, k, v, gate, do) and int32 segment ids (or None) of one case."""
  keys = jax.random.split(jax.random.key(seed), 5)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.bfloat16)
  q = normal(keys[0], (case.b, case.t, case.n, case.h))
  k = normal(keys[1], (case.b, case.s, case.k, case.h))
  v = normal(keys[2], (case.b, case.s, case.k, case.h))
  gate = {"elementwise": (case.b, case.t, case.n, case.h), "headwise": (case.b, case.t, case.n),
          None: None}[case.gate]
  gate = None if gate is None else normal(keys[3], gate)
  do = normal(keys[4], (case.b, case.t, case.n, case.h))
  seg = None
  if case.segments:  # documents of ~t/3 tokens, boundaries off the tile grid
    starts = np.random.default_rng(seed).random((case.b, case.t)) < 3 / case.t
    seg = jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)
  return q, k, v, gate, do, seg


def _value_and_grads(attend, q, k, v, gate, do):
  """(o, (dq, dk, dv, dgate)) of attend(q, k, v, gate) with cotangent do, in one jit."""
  def run(q, k, v, gate, do):
    o, vjp = jax.vjp(attend, q, k, v, gate)
    return o, vjp(do)
  return jax.jit(run)(q, k, v, gate, do)


def _errors(got, want) -> dict[str, float]:
  """{output: max|got - want| / max|want|} over (o, (dq, dk, dv, dgate)); inf if not finite."""
  leaves = lambda tree: jax.tree.leaves(tree, is_leaf=lambda x: x is None)
  errors = {}
  for name, g, w in zip(OUTPUTS, leaves(got), leaves(want)):
    if g is not None:
      g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
      errors[name] = (float(np.max(np.abs(g - w)) / np.max(np.abs(w))) if np.all(np.isfinite(g))
                      else float("inf"))
  return errors


def report(rows: list[dict], device: str) -> dict:
  """The stage's JSON: the rows, a markdown table of them and a one-line summary."""
  lines = ["| impl | case | (B, T, S, N, K, H) | causal | gate | segments | "
           + " | ".join(OUTPUTS) + " | result |",
           "|---" * (len(OUTPUTS) + 7) + "|"]
  for r in rows:
    errs = " | ".join(f"{r['errors'][o]:.1e}" if o in r["errors"] else "-" for o in OUTPUTS)
    lines.append(f"| {r['impl']} | {r['case']} | {tuple(r['shape'])} | {r['causal']} "
                 f"| {r['gate']} | {r['segments']} | {errs} | {r['status']} {r['error'] or ''} |")
  counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
  failed = [f"{r['impl']} {r['case']} ({r['status']})" for r in rows
            if r["status"] in ("fail", "error")]
  summary = (", ".join(f"{n} {s}" for s, n in counts.items() if n)
             + f" (max|err| / max|ref| <= {TOLERANCE:g} vs the float32 reference)"
             + (f"; failed: {', '.join(failed)}" if failed else ""))
  return {"device": device, "jax": jax.__version__, "tolerance": TOLERANCE, "rows": rows,
          "markdown": "\n".join(lines), "summary": [summary]}


def check(impl: str, case: Case, references: dict) -> dict:
  """One row: the case, its status ("pass", "fail", "error", or "unsupported": refused by the API
  for these inputs, e.g. Mosaic GPU under jax < 0.11), errors and seconds. references caches
  each case's float32 reference outputs (as numpy) across impls."""
  start = time.perf_counter()
  row = {"impl": impl, "case": case.name, "shape": [case.b, case.t, case.s, case.n, case.k, case.h],
         "causal": case.causal, "gate": case.gate, "segments": case.segments, "errors": {},
         "error": None}
  q, k, v, gate, do, seg = _inputs(case)
  try:
    resolve_impl(impl, q, gate, seg)
  except ValueError as e:
    return row | {"status": "unsupported", "error": str(e), "seconds": 0.0}
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  try:
    if case.name not in references:
      with jax.default_matmul_precision("highest"):
        references[case.name] = jax.device_get(_value_and_grads(
            lambda q, k, v, g: reference.gated_attention(
                q, k, v, g, causal=case.causal, scale=case.h ** -0.5, gate_activation="sigmoid",
                q_segment_ids=seg, kv_segment_ids=seg),
            f32(q), f32(k), f32(v), f32(gate), f32(do)))
    got = _value_and_grads(lambda q, k, v, g: gated_flash_attention(
        q, k, v, g, causal=case.causal, segment_ids=seg, impl=impl), q, k, v, gate, do)
    row["errors"] = _errors(got, references[case.name])
    row["status"] = "pass" if max(row["errors"].values()) <= TOLERANCE else "fail"
  except Exception as e:  # pylint: disable=broad-except
    row |= {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
  return row | {"seconds": time.perf_counter() - start}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--impls", default="pallas_gpu,pallas_mgpu",
                      help="comma-separated kernel impls to check")
  parser.add_argument("--small", action="store_true", help="tiny shapes (CPU dry run)")
  parser.add_argument("--json", type=pathlib.Path, help="write the results here")
  args = parser.parse_args()
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
  rows, references = [], {}
  for impl in args.impls.split(","):  # impl by impl: a crash in one leaves the rows before it
    for case in SMALL_CASES if args.small else CASES:
      rows.append(row := check(impl, case, references))
      print(f"{impl} {case.name}: {row['status']} {row['errors']} {row['error'] or ''} "
            f"({row['seconds']:.1f} s)", flush=True)
      if args.json:
        args.json.write_text(json.dumps(report(rows, device), indent=1))
  print(report(rows, device)["markdown"])
  raise SystemExit(int(any(r["status"] in ("fail", "error") for r in rows)))


if __name__ == "__main__":
  main()

"""Compiles the fused kernels for their real targets (TPU v5e/v5p/v6e, H100/H200) from a CPU machine.

    JAX_PLATFORMS=cpu .toolchains/jax-0.11.2/bin/python -m gated_attention_jax.compile_check \\
        --json=compile.json

Every impl is compiled, forward and forward+backward, for every target it claims (``TARGETS``)
over ``CASES``: head_dim 32/64/96/128/256, MHA/GQA/MQA, elementwise/headwise/no gate, segment
ids, causal and not, lengths that are not tile multiples, T != S, bf16 and float32,
Qwen3-Next's heads, and Gemma 2's sliding window with a logit soft cap. All cases run on each impl's first target; its other targets (the same
compiler with other memory sizes: H200 beside H100, v5p and v6e beside v5e) get
``SPOT_CASES``, the largest tiles, unless ``--all_cases``. The released gated models'
attention layers (``LAYER_CASES``: ``GatedAttention`` as in Qwen3-Next and Qwen3.5, partial
rotary included) are compiled forward and backward through the model's ``attention_impl``
(``LAYER_TARGETS``), recording which kernel the program calls. A case the API
refuses (``ValueError`` before compiling, e.g. an impl the installed jax cannot serve) is
recorded as refused with its message; anything else that fails is a failure. Needs an
environment from ``tools/aot_toolchains.sh`` (libtpu, the CUDA plugin and ptxas).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

# TPU targets are one host's chips, compiled for on one of them: the kernels run per device
# (under shard_map when sharded).
TARGETS = {
    "pallas_tpu": ("v5e:2x2", "v5p:2x2x1", "v6e:2x2"),
    "pallas_gpu": ("h100", "h200"),
    "pallas_mgpu": ("h100", "h200"),
}


@dataclasses.dataclass(frozen=True)
class Case:
  """One kernel call: q (batch, t, heads, head_dim), k/v (batch, s, kv_heads, head_dim)."""

  name: str
  head_dim: int
  heads: int = 4
  kv_heads: int = 4
  t: int = 1000
  s: int = 1000
  gate: str = "elementwise"  # "elementwise", "headwise" or "none"
  segments: bool = False
  causal: bool = True
  dtype: str = "bfloat16"
  batch: int = 2
  sliding_window: int | None = None
  logit_soft_cap: float | None = None


CASES = (
    Case("hd64_mha_elementwise_causal_odd", head_dim=64),
    Case("hd128_gqa_headwise_segments", head_dim=128, heads=8, kv_heads=2, t=512, s=512,
         gate="headwise", segments=True),
    Case("hd256_mqa_ungated_noncausal_odd", head_dim=256, heads=4, kv_heads=1, t=777, s=777,
         gate="none", causal=False),
    Case("hd128_cross_t_lt_s", head_dim=128, t=200, s=1100),
    Case("hd64_f32", head_dim=64, t=300, s=300, dtype="float32"),
    Case("hd96_gqa_headwise", head_dim=96, heads=4, kv_heads=2, t=256, s=256, gate="headwise"),
    Case("hd32_mqa_segments", head_dim=32, heads=8, kv_heads=1, t=128, s=128, segments=True),
    # Qwen3-Next's attention: 16 query / 2 kv heads of 256, elementwise gate.
    Case("qwen3_next_hd256_gqa16x2", head_dim=256, heads=16, kv_heads=2, t=1024, s=1024,
         batch=1),
    # Gemma 2's local attention: a sliding window (tiles outside it skipped) and a soft cap.
    Case("gemma2_hd128_window_softcap_gqa", head_dim=128, heads=8, kv_heads=4, t=1000, s=1000,
         sliding_window=256, logit_soft_cap=50.0, batch=1),
)
SPOT_CASES = ("hd256_mqa_ungated_noncausal_odd", "hd128_gqa_headwise_segments")


@dataclasses.dataclass(frozen=True)
class LayerCase:
  """A released gated model's attention layer (``GatedAttention``, G1 elementwise gate, QK-norm,
  bf16 compute, float32 parameters) on x (batch, t, d_model)."""

  name: str
  d_model: int
  heads: int
  kv_heads: int
  head_dim: int = 256
  partial_rotary_factor: float = 0.25
  t: int = 256
  batch: int = 1


# The attention layers of the released gated models: Qwen3-Next's 16 query / 2 kv heads and
# Qwen3.5's 8 / 2, head_dim 256, partial rotary 0.25. d_model and length are small here (the
# kernel's tiles do not depend on them; the kernel case above has Qwen3-Next's heads at 1024
# tokens), as libtpu's compile of the layer's backward grows with both (30 s at d_model 2048 x
# 1024 tokens, 11 s at 256 x 256).
LAYER_CASES = (
    LayerCase("qwen3_next_attention_16x2_hd256", d_model=256, heads=16, kv_heads=2),
    LayerCase("qwen3p5_attention_8x2_hd256", d_model=256, heads=8, kv_heads=2),
)
# The model's attention_impl per target: "auto" is the fused kernel on a TPU; on a GPU it is
# cuDNN, which the deviceless toolchain lacks, so "pallas" (the kernels' own "auto": Triton at
# head_dim 256 on Hopper). One target per compiler (v5p / v6e and H200 share them), forward
# and backward in one program (the gradient of the parameters and the input).
LAYER_TARGETS = {"v5e:2x2": "auto", "h100": "pallas"}


def _shapes(case: Case):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  dtype = jnp.dtype(case.dtype)
  sds = jax.ShapeDtypeStruct
  q = sds((case.batch, case.t, case.heads, case.head_dim), dtype)
  kv = sds((case.batch, case.s, case.kv_heads, case.head_dim), dtype)
  gate = {"elementwise": q, "headwise": sds(q.shape[:3], dtype), "none": None}[case.gate]
  seg = ((sds((case.batch, case.t), jnp.int32), sds((case.batch, case.s), jnp.int32))
         if case.segments else None)
  return q, kv, kv, gate, seg


def compile_case(impl: str, target: str, case: Case, backward: bool) -> dict:
  """Compiles one case; returns {status: ok|refused|failed, seconds, error?}."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from gated_attention_jax import aot  # pylint: disable=g-import-not-at-top
  from gated_attention_jax.kernels import api  # pylint: disable=g-import-not-at-top

  def forward(q, k, v, gate, segment_ids):
    return api.gated_flash_attention(q, k, v, gate, causal=case.causal,
                                     segment_ids=segment_ids, impl=impl, interpret=False,
                                     sliding_window=case.sliding_window,
                                     logit_soft_cap=case.logit_soft_cap)

  def forward_backward(q, k, v, gate, segment_ids):
    def loss(q, k, v, gate):
      return jnp.sum(forward(q, k, v, gate, segment_ids).astype(jnp.float32))
    argnums = (0, 1, 2) if gate is None else (0, 1, 2, 3)
    return jax.grad(loss, argnums=argnums)(q, k, v, gate)

  start = time.perf_counter()
  record = {"impl": impl, "target": target, "case": case.name,
            "pass": "fwd+bwd" if backward else "fwd"}
  try:
    q, k, v, gate, seg = _shapes(case)
    fn = forward_backward if backward else forward
    q_seg, kv_seg = seg if seg is not None else (None, None)
    aot.compile_for(lambda q, k, v, gate, q_seg, kv_seg: fn(
        q, k, v, gate, None if q_seg is None else (q_seg, kv_seg)),
                    (q, k, v, gate, q_seg, kv_seg), target)
    record["status"] = "ok"
  except ValueError as e:
    # Raised by the API before anything compiles (an argument or an impl it refuses), or by a
    # compiler; only the former counts as a refusal.
    refused = any("gated_attention_jax" in frame.filename and "/kernels/" in frame.filename
                  and frame.name in ("gated_flash_attention", "resolve_impl", "_check_args")
                  for frame in traceback.extract_tb(e.__traceback__))
    record["status"] = "refused" if refused else "failed"
    record["error"] = f"{type(e).__name__}: {e}"[:2000]
  except Exception as e:  # pylint: disable=broad-except
    record["status"] = "failed"
    record["error"] = f"{type(e).__name__}: {e}"[:2000]
  record["seconds"] = round(time.perf_counter() - start, 2)
  return record


def compile_layer_case(target: str, case: LayerCase) -> dict:
  """Compiles one released model's attention layer for ``target``: the gradient of its
  parameters and input (forward and backward); returns {status: ok|failed, seconds,
  kernel_calls (the Pallas kernels' custom calls in the compiled program), error?}."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from gated_attention_jax import aot  # pylint: disable=g-import-not-at-top
  from gated_attention_jax.attention import GatedAttention  # pylint: disable=g-import-not-at-top
  from gated_attention_jax.gate import GateConfig  # pylint: disable=g-import-not-at-top

  impl = LAYER_TARGETS[target]
  record = {"impl": f"layer:{impl}", "target": target, "case": case.name, "pass": "fwd+bwd"}
  start = time.perf_counter()
  try:
    abstract = nnx.eval_shape(lambda: GatedAttention(
        case.d_model, case.heads, case.kv_heads, case.head_dim, GateConfig(position="sdpa"),
        partial_rotary_factor=case.partial_rotary_factor, qk_norm=True, norm_style="offset",
        attention_impl=impl, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    leaves, treedef = jax.tree.flatten(state)

    def loss(x, leaves):
      layer = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
      return jnp.sum(layer(x).astype(jnp.float32))

    x = jax.ShapeDtypeStruct((case.batch, case.t, case.d_model), jnp.bfloat16)
    compiled = aot.compile_for(lambda x, *leaves: jax.grad(loss, argnums=(0, 1))(x, leaves),
                               (x, *leaves), target)
    record["kernel_calls"] = aot.kernel_calls(compiled, "gpu" if aot.is_gpu_target(target)
                                              else "tpu")
    record["status"] = "ok"
  except Exception as e:  # pylint: disable=broad-except
    record["status"] = "failed"
    record["error"] = f"{type(e).__name__}: {e}"[:2000]
  record["seconds"] = round(time.perf_counter() - start, 2)
  return record


def _log(r: dict, log) -> None:
  print(f"{r['status']:8s} {r['seconds']:6.1f}s  {r['impl']:11s} {r['target']:10s} {r['pass']:7s} "
        f"{r['case']}" + (f"\n         {r['error'][:300]}" if "error" in r else ""),
        file=log, flush=True)


def run(impls, targets=None, cases=CASES, passes=("fwd", "fwd+bwd"), all_cases=False,
        layer_cases=LAYER_CASES, log=sys.stderr) -> dict:
  """Compiles every (impl, target, case, pass) and every layer case on its ``LAYER_TARGETS``
  (within ``targets``); returns {jax, jaxlib, results: [...]}."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top

  results = []
  for target in LAYER_TARGETS:
    for case in layer_cases if not targets or target in targets else ():
      results.append(compile_layer_case(target, case))
      _log(results[-1], log)
  for impl in impls:
    for target in TARGETS[impl]:
      if targets and target not in targets:
        continue
      spot = target != TARGETS[impl][0] and not all_cases
      for case in cases:
        if spot and case.name not in SPOT_CASES:
          continue
        for p in passes:
          results.append(compile_case(impl, target, case, backward=p == "fwd+bwd"))
          _log(results[-1], log)
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "results": results}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--impls", default=",".join(TARGETS), help="comma-separated impls")
  parser.add_argument("--targets", default="", help="comma-separated targets (default: all)")
  parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
  parser.add_argument("--all_cases", action="store_true",
                      help="every case on every target (default: SPOT_CASES beyond the first)")
  parser.add_argument("--layer_cases", default=",".join(c.name for c in LAYER_CASES),
                      help="comma-separated released models' attention layers to compile"
                           " (default: all; empty: none)")
  parser.add_argument("--json", default="", help="write the results here")
  args = parser.parse_args(argv)
  if os.environ.get("JAX_PLATFORMS") != "cpu":
    parser.error("set JAX_PLATFORMS=cpu (else the CUDA plugin looks for a GPU and fails)")
  impls = [i for i in args.impls.split(",") if i]
  for impl in impls:
    if impl not in TARGETS:
      parser.error(f"--impls: {impl!r} is not one of {sorted(TARGETS)}")
  names = {n for n in args.cases.split(",") if n}
  unknown = names - {c.name for c in CASES}
  if unknown:
    parser.error(f"--cases: unknown {sorted(unknown)}; known: {[c.name for c in CASES]}")
  cases = tuple(c for c in CASES if not names or c.name in names)
  layer_names = {n for n in args.layer_cases.split(",") if n}
  unknown = layer_names - {c.name for c in LAYER_CASES}
  if unknown:
    parser.error(f"--layer_cases: unknown {sorted(unknown)}; known:"
                 f" {[c.name for c in LAYER_CASES]}")
  report = run(impls, {t for t in args.targets.split(",") if t}, cases,
               all_cases=args.all_cases,
               layer_cases=tuple(c for c in LAYER_CASES if c.name in layer_names))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
  failed = [r for r in report["results"] if r["status"] == "failed"]
  print(f"{len(report['results']) - len(failed)} compiled or refused, {len(failed)} failed "
        f"(jax {report['jax']})")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

"""Every kernel impl compiles for every target it claims, under each toolchain's jax.

``gated_attention_jax.compile_check`` runs in each ``.toolchains/jax-<version>``
environment (started in the background by conftest): Mosaic TPU (libtpu) compiles
``pallas_tpu`` for v5e, v5p and v6e; XLA's GPU compiler, Triton, Mosaic GPU and ptxas compile
``pallas_gpu`` and ``pallas_mgpu`` for H100 and H200, forward and forward+backward, over its
``CASES``. This is a compiler's verdict, not a run: numbers and speed need the hardware.

What must hold: nothing fails; the API refuses exactly the inputs an impl documents it cannot
serve (``REFUSED``: Triton needs power-of-two head_dims, Mosaic GPU bf16/f16 and head_dim a
multiple of 64, and jax >= 0.11), before compiling, with its reason; every (impl, target, pass)
was tried. Under jax 0.11.2 (the GPU machine's), the released gated models' attention layers
(Qwen3-Next / Qwen3.5: head_dim 256, 16 / 2 and 8 / 2 heads, partial rotary 0.25) compile
forward and backward through the model's attention_impl and call the fused kernel: Mosaic TPU
on v5e, Triton on H100 (at head_dim 256 the kernels' "auto" prefers it to Mosaic GPU).
"""

from __future__ import annotations

import json

import pytest

from gated_attention_jax import compile_check
from tests import toolchains

REFUSED = {
    "pallas_tpu": set(),
    "pallas_gpu": {"hd96_gqa_headwise"},
    "pallas_mgpu": {"hd64_f32", "hd96_gqa_headwise", "hd32_mqa_segments"},
}
ALL_CASES = {case.name for case in compile_check.CASES}


def _expected_refusals(impl: str, version: str) -> set[str]:
  if impl == "pallas_mgpu" and tuple(map(int, version.split(".")[:2])) < (0, 11):
    return ALL_CASES  # Mosaic GPU cannot lower under jax 0.10: refused, naming the version
  return REFUSED[impl]


@pytest.mark.parametrize("version", toolchains.VERSIONS)
def test_kernels_compile_for_their_targets(version: str):
  job = toolchains.compile_job(version)
  if job is None:
    if toolchains.must_run():
      pytest.fail(toolchains.missing_reason(version))
    pytest.skip(toolchains.missing_reason(version))
  rc, log, seconds = job.result()
  assert job.json.exists(), f"compile_check wrote no results (rc {rc}):\n{log[-3000:]}"
  report = json.loads(job.json.read_text())
  assert report["jax"] == version
  results = report["results"]
  failed = [r for r in results if r["status"] == "failed"]
  assert not failed, "\n".join(f"{r['impl']} {r['target']} {r['pass']} {r['case']}: "
                               f"{r['error'][:400]}" for r in failed)
  assert rc == 0, log[-3000:]
  layers = {(r["target"], r["case"]): r for r in results if r["impl"].startswith("layer:")}
  results = [r for r in results if not r["impl"].startswith("layer:")]
  for impl, targets in compile_check.TARGETS.items():
    expected = _expected_refusals(impl, version)
    for target in targets:
      for p in ("fwd", "fwd+bwd"):
        mine = [r for r in results if (r["impl"], r["target"], r["pass"]) == (impl, target, p)]
        tried = {r["case"] for r in mine}
        spots = ALL_CASES if target == targets[0] else set(compile_check.SPOT_CASES)
        assert tried == spots, (impl, target, p, sorted(spots - tried))
        refused = {r["case"] for r in mine if r["status"] == "refused"}
        assert refused == expected & spots, (impl, target, p, sorted(refused))
        for r in mine:
          if r["status"] == "refused":
            assert impl in r["error"] and "ValueError" in r["error"], r
  if version != toolchains.LAYER_VERSION:
    assert not layers
  else:  # the released models' attention layers call the fused kernel, forward and backward
    assert set(layers) == {(t, c.name) for t in compile_check.LAYER_TARGETS
                           for c in compile_check.LAYER_CASES}
    for (target, case), r in layers.items():
      # forward, then the backward's dq and dk/dv kernels (one custom call each)
      want = {"tpu_custom_call": 3} if target.startswith("v5e") else {
          "__gpu$xla.gpu.triton": 3}  # head_dim 256 on Hopper: Triton, where Mosaic GPU spills
      assert r["kernel_calls"] == want, (target, case, r["kernel_calls"])
  print(f"jax {version}: {len(results)} compiles/refusals in {seconds:.0f} s")

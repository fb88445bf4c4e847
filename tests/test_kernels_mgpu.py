"""flash_mgpu (Mosaic GPU, Hopper) forward and backward in GPU interpret mode on CPU against
kernels.reference.

The interpreter (``jax._src.pallas.mosaic_gpu.interpret``) simulates SMEM, TMA copies, barriers,
wgmma and the two warpgroups (producer / consumer) as concurrent threads, and raises if a
thread waits on some but not all phases of a barrier. Shapes are small (T, S up to 192, H = 64,
64-row q tiles, 64-column kv tiles) so each case spans several kv tiles and causal skipping is
exercised; the 3-kv-tile case makes the 2-slot k/v pipeline reuse a slot (producer waits on the
consumer's "free" barrier).

Tolerances. Inputs are bfloat16; the reference (``reference.gated_attention``) sees the same bf16
inputs and also rounds p to bf16 before p·v. Both accumulate in float32, but the kernel rounds p
after the online-softmax rescaling (p relative to the running max, not the final one), so p's
rounding differs by up to one bf16 ulp (4e-3 relative) and outputs are bf16 themselves: we
require max|err| <= 2e-2 · max|ref| for o and y (observed <= 5.4e-3). lse is float32 from
float32 logits of bf16 inputs: |err| <= 1e-4 + 1e-4·|ref| (observed 5e-7). Dropping the mask
makes every case fail.

Backward: ``jax.vjp`` of ``gated_flash_attention(impl="pallas_mgpu")`` (forward kernel, the
shared custom_vjp with ``api._gate_backward``, then ``flash_mgpu.backward``'s dq and dk/dv
kernels) against ``jax.vjp`` of ``reference.gated_attention`` evaluated in float32 on the same
bf16 inputs (and the same bf16 cotangent). The kernels round p, ds (and dy, y) to bf16 before
their matmuls and return bf16 gradients, so we require max|err| <= 2e-2 · max|ref| for dq, dk,
dv and dgate (observed <= 7.9e-3 · max|ref|, i.e. about one bf16 ulp of the largest entry). Cases: causal + GQA + elementwise gate, non-causal
+ segments + headwise gate, causal T < S (3 kv tiles) ungated, causal + padded S + segments
(T > S there, so some query rows see no key: lse = +inf, p = 0). The 2-slot pipelines of the
backward kernels reuse slots in the 3-kv-tile case (dq) and in the G = 2 cases (dk/dv streams
G × q tiles).

The interpreter cases use 64-row kv tiles at H = 64; ``test_default_tiles`` runs the kernels
with their default tiles (``tiles.mgpu_block_kv``: a 128-row kv tile in the forward at H = 64),
forward and backward. Mosaic GPU needs jax >= 0.11 (``tiles.MGPU_MIN_JAX``): under an older jax the API
refuses the impl (``test_refused_before_jax_0_11``) and the interpreter tests skip; CI runs
them under the newest jax (tests/test_newest_jax.py).

Runtime: about 110 s for the whole file on 2 CPU cores (cold compilation cache).
The comparisons run op by op, not under one outer jit: the interpreter runs each warpgroup's
jaxpr on its own thread from inside a host callback, and under an outer jit on a 2-core
machine those inner runs waited on XLA's busy CPU threads and the suite deadlocked (2026-12-07).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gated_attention_jax.kernels import api, common, flash_mgpu, platform, reference, tiles

_OLD_JAX = tiles.jax_version() < tiles.MGPU_MIN_JAX
needs_mgpu_jax = pytest.mark.skipif(
    _OLD_JAX, reason=f"Mosaic GPU needs jax >= {tiles.MGPU_MIN_JAX}; the API refuses it here "
    "(test_refused_before_jax_0_11); CI runs these under the newest jax (test_newest_jax.py)")


def _cfg(causal, activation="sigmoid", block_kv=64, h=64):
  return common.KernelConfig(impl="mosaic_gpu", causal=causal, scale=1.0 / math.sqrt(h),
                             gate_activation=activation,
                             block_sizes=common.BlockSizes(block_q=64, block_kv=block_kv),
                             interpret=True)


def _ref_lse(q, k, cfg, q_seg, kv_seg):
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  kr = jnp.repeat(k, n // kh, axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", q, kr, preferred_element_type=jnp.float32) * cfg.scale
  mask = reference.attention_mask(t, s, causal=cfg.causal, q_segment_ids=q_seg,
                                  kv_segment_ids=kv_seg)[:, None]
  lse = jax.nn.logsumexp(jnp.where(mask, logits, -jnp.inf), axis=-1)  # -inf: nothing visible
  return jnp.transpose(jnp.where(jnp.isneginf(lse), jnp.inf, lse), (0, 2, 1))


CASES = {
    # name: (B, T, S, N, K, causal, gate, segments, activation)
    "causal_gqa_elementwise": (1, 128, 128, 4, 2, True, "elementwise", False, "sigmoid"),
    "noncausal_headwise_segments": (1, 128, 128, 2, 1, False, "headwise", True, "silu"),
    "causal_t_lt_s_ungated_3_kv_tiles": (2, 64, 192, 2, 2, True, None, False, "sigmoid"),
    "causal_padded_kv_segments": (1, 128, 100, 2, 1, True, "elementwise", True, "ns_sigmoid"),
}


def _inputs(name):
  b, t, s, n, kh, causal, gate_kind, segments, activation = CASES[name]
  h, dtype = 64, jnp.bfloat16
  keys = jax.random.split(jax.random.key(sum(map(ord, name))), 6)
  q = jax.random.normal(keys[0], (b, t, n, h), dtype)
  k = jax.random.normal(keys[1], (b, s, kh, h), dtype)
  v = jax.random.normal(keys[2], (b, s, kh, h), dtype)
  gate = None
  if gate_kind:
    gate = jax.random.normal(keys[3], (b, t, n, h) if gate_kind == "elementwise" else (b, t, n),
                             dtype)
  q_seg = kv_seg = None
  if segments:  # two segments, boundary off the tile grid; causal offset keeps ends aligned
    kv_seg = (jnp.arange(s)[None, :] >= s // 2 + 5).astype(jnp.int32).repeat(b, 0)
    q_seg = (jnp.arange(t)[None, :] + (s - t) >= s // 2 + 5).astype(jnp.int32).repeat(b, 0)
  do = jax.random.normal(keys[5], (b, t, n, h), dtype)
  return q, k, v, gate, q_seg, kv_seg, do


@needs_mgpu_jax
@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_reference(name):
  b, t, s, n, kh, causal, gate_kind, segments, activation = CASES[name]
  dtype = jnp.bfloat16
  q, k, v, gate, q_seg, kv_seg, _ = _inputs(name)
  cfg = _cfg(causal, activation)

  o, y, lse = flash_mgpu.forward(q, k, v, gate, q_seg, kv_seg, cfg, save_residuals=True)
  ref_kw = dict(causal=causal, scale=cfg.scale, gate_activation=activation,
                q_segment_ids=q_seg, kv_segment_ids=kv_seg)
  o_ref = reference.gated_attention(q, k, v, gate, **ref_kw)
  y_ref = reference.gated_attention(q, k, v, None, **ref_kw)
  lse_ref = _ref_lse(q, k, cfg, q_seg, kv_seg)

  assert o.shape == o_ref.shape and o.dtype == dtype
  assert y.shape == y_ref.shape and lse.shape == (b, t, n) and lse.dtype == jnp.float32
  for got, want in ((o, o_ref), (y, y_ref)):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.max(np.abs(got - want)) <= 2e-2 * np.max(np.abs(want)), name
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_ref), rtol=1e-4, atol=1e-4)



@needs_mgpu_jax
@pytest.mark.parametrize("name", list(CASES))
def test_backward_matches_reference(name):
  b, t, s, n, kh, causal, gate_kind, segments, activation = CASES[name]
  _check_vjp(*_inputs(name), causal=causal, activation=activation,
             blocks=common.BlockSizes(block_q=64, block_kv=64), label=name)


@needs_mgpu_jax
def test_default_tiles():
  """Default tiles (a 128-row kv tile in the forward at H = 64): values and all gradients."""
  b, t, s, n, kh, h = 1, 192, 256, 2, 1, 64
  assert tiles.mgpu_block_kv(h) == 128 and tiles.mgpu_block_kv(h, backward=True) == 64
  keys = jax.random.split(jax.random.key(7), 5)
  q, gate, do = (jax.random.normal(keys[i], (b, t, n, h), jnp.bfloat16) for i in (0, 3, 4))
  k, v = (jax.random.normal(keys[i], (b, s, kh, h), jnp.bfloat16) for i in (1, 2))
  _check_vjp(q, k, v, gate, None, None, do, causal=True, activation="sigmoid", blocks=None,
             label="default_tiles")


@needs_mgpu_jax
@pytest.mark.parametrize("name, window, cap", [
    ("causal_t_lt_s_ungated_3_kv_tiles", 40, 3.0),  # q tile 2 skips kv tile 0 (keys <= 88)
    ("noncausal_headwise_segments", 30, None),
    ("causal_gqa_elementwise", None, 1.5),
])
def test_window_and_soft_cap(name, window, cap):
  """A sliding window (tiles outside the band skipped, edges masked) and a logit soft cap
  (its derivative in the dq and dk/dv kernels): values and all gradients."""
  b, t, s, n, kh, causal, gate_kind, segments, activation = CASES[name]
  _check_vjp(*_inputs(name), causal=causal, activation=activation,
             blocks=common.BlockSizes(block_q=64, block_kv=64), label=name, window=window,
             soft_cap=cap)


def _check_vjp(q, k, v, gate, q_seg, kv_seg, do, *, causal, activation, blocks, label,
               window=None, soft_cap=None):
  h = q.shape[-1]
  seg = None if q_seg is None else (q_seg, kv_seg)
  features = dict(sliding_window=window, logit_soft_cap=soft_cap)

  def kernel(q, k, v, gate):
    return api.gated_flash_attention(q, k, v, gate, causal=causal, segment_ids=seg,
                                     gate_activation=activation, impl="pallas_mgpu",
                                     block_sizes=blocks, **features)

  def ref(q, k, v, gate):
    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    return reference.gated_attention(f32(q), f32(k), f32(v), f32(gate), causal=causal,
                                     scale=1.0 / math.sqrt(h), gate_activation=activation,
                                     q_segment_ids=q_seg, kv_segment_ids=kv_seg, **features)

  o, vjp = jax.vjp(kernel, q, k, v, gate)
  got = vjp(do)
  o_ref, vjp_ref = jax.vjp(ref, q, k, v, gate)
  want = vjp_ref(do.astype(jnp.float32))
  for name, g, w, x in zip(("o", "dq", "dk", "dv", "dgate"), (o, *got), (o_ref, *want),
                           (q, q, k, v, gate)):
    if x is None:
      continue
    assert g.shape == x.shape and g.dtype == x.dtype, (label, name)
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.all(np.isfinite(g)), (label, name)
    err = np.max(np.abs(g - w))
    assert err <= 2e-2 * np.max(np.abs(w)), (label, name, err / np.max(np.abs(w)))


def _hopper(kind="NVIDIA H100 80GB HBM3"):
  """Traces inside see a GPU of ``kind`` (no GPU needed: only the platform and kind are read)."""
  mesh = jax.sharding.AbstractMesh(
      (1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
      abstract_device=jax.sharding.AbstractDevice(device_kind=kind, num_cores=None,
                                                  platform="cuda"))
  return jax.sharding.use_abstract_mesh(mesh)


def test_auto_picks_by_target_and_inputs():
  bf16 = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
  with _hopper():
    assert platform.target_platform() == "gpu"
    assert api.resolve_impl("auto", bf16) == ("pallas_gpu" if _OLD_JAX else "pallas_mgpu")
    assert api.resolve_impl("auto", bf16.astype(jnp.float32)) == "pallas_gpu"  # no tf32
    assert api.resolve_impl("auto", jnp.zeros((1, 64, 2, 96), jnp.bfloat16)) == "xla"
    # head_dim 256: Mosaic GPU spills registers there and Triton does not, so Triton first;
    # 192 (not a power of two) only Mosaic GPU serves.
    assert api.resolve_impl("auto", jnp.zeros((1, 64, 2, 256), jnp.bfloat16)) == "pallas_gpu"
    assert api.resolve_impl("auto", jnp.zeros((1, 64, 2, 192), jnp.bfloat16)) == (
        "xla" if _OLD_JAX else "pallas_mgpu")
  with _hopper("NVIDIA A100-SXM4-80GB"):
    assert api.resolve_impl("auto", bf16) == "pallas_gpu"  # Mosaic GPU kernels are Hopper-only
  assert api.resolve_impl("auto", bf16) == {"tpu": "pallas_tpu"}.get(jax.default_backend(),
                                                                      "xla")


def test_refusals_name_the_reason():
  with pytest.raises(ValueError, match="power of two"):
    api.resolve_impl("pallas_gpu", jnp.zeros((1, 64, 2, 96), jnp.bfloat16))
  if not _OLD_JAX:  # (older: every pallas_mgpu call is refused for the jax version)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
      api.resolve_impl("pallas_mgpu", jnp.zeros((1, 64, 2, 64), jnp.float32))
    with pytest.raises(ValueError, match="multiple of 64"):
      api.resolve_impl("pallas_mgpu", jnp.zeros((1, 64, 2, 96), jnp.bfloat16))
    # block_kv 256 at H = 256: four 128 KB k/v slots cannot fit
    with pytest.raises(ValueError, match="shared memory"):
      api.resolve_impl("pallas_mgpu", jnp.zeros((1, 64, 2, 256), jnp.bfloat16),
                       block_sizes=common.BlockSizes(block_kv=256))


@pytest.mark.skipif(not _OLD_JAX, reason="this jax serves Mosaic GPU")
def test_refused_before_jax_0_11():
  q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"needs jax >= 0\.11"):
    api.gated_flash_attention(q, q, q, None, impl="pallas_mgpu")

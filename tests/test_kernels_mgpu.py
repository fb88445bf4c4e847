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

Runtime: about 90 s for the whole file on 2 CPU cores (cold compilation cache).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gated_attention_jax.kernels import api, common, flash_mgpu, reference

pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")


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



@pytest.mark.parametrize("name", list(CASES))
def test_backward_matches_reference(name):
  b, t, s, n, kh, causal, gate_kind, segments, activation = CASES[name]
  q, k, v, gate, q_seg, kv_seg, do = _inputs(name)
  h = q.shape[-1]
  seg = None if q_seg is None else (q_seg, kv_seg)

  def kernel(q, k, v, gate):
    return api.gated_flash_attention(q, k, v, gate, causal=causal, segment_ids=seg,
                                     gate_activation=activation, impl="pallas_mgpu",
                                     block_sizes=common.BlockSizes(block_q=64, block_kv=64))

  def ref(q, k, v, gate):
    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    return reference.gated_attention(f32(q), f32(k), f32(v), f32(gate), causal=causal,
                                     scale=1.0 / math.sqrt(h), gate_activation=activation,
                                     q_segment_ids=q_seg, kv_segment_ids=kv_seg)

  _, vjp = jax.vjp(kernel, q, k, v, gate)
  got = vjp(do)
  _, vjp_ref = jax.vjp(ref, q, k, v, gate)
  want = vjp_ref(do.astype(jnp.float32))
  for label, g, w, x in zip(("dq", "dk", "dv", "dgate"), got, want, (q, k, v, gate)):
    if x is None:
      continue
    assert g.shape == x.shape and g.dtype == x.dtype, (name, label)
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.all(np.isfinite(g)), (name, label)
    err = np.max(np.abs(g - w))
    assert err <= 2e-2 * np.max(np.abs(w)), (name, label, err / np.max(np.abs(w)))


def test_mgpu_impl_is_explicit_only():
  assert "pallas_mgpu" in api.IMPLS and api._KERNELS["pallas_mgpu"] is flash_mgpu
  assert api._NATIVE_BACKEND["pallas_mgpu"] == "gpu" and "pallas_mgpu" not in api._AUTO.values()

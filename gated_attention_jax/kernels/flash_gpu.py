"""Gated flash attention in the portable (Triton-style) Pallas GPU API: forward, dq, dk/dv.

Dimension names: B batch, T query length, S key length, N query heads, K kv heads, H head_dim,
G = N // K. Tiles are read straight from the (B, T, N, H) layout (no transposes): each program
owns one q tile (forward, dq) or one kv tile (dk/dv) and loops over the other sequence with
``lax.fori_loop``; the loop bounds keep to the causal / sliding-window band, so tiles outside it
are never visited. A logit soft cap is applied to each score tile (its derivative 1 - tanh²
scales the backward's score gradients). dk/dv programs own all G query heads of their kv head (GQA without repeating
K/V). Lengths are zero-padded to a tile multiple and the padding is masked.

Status: this is the portable fallback behind ``impl="pallas_gpu"``. JAX's Triton Pallas backend
is deprecated in favour of Mosaic GPU; a Hopper kernel (wgmma, TMA pipelining, warp
specialisation) would be the fast path. Here it has only run under ``interpret=True`` on CPU
(what the tests check); it has not been compiled or timed on a GPU. Programs take the whole
padded K/V (forward, dq) or Q (dk/dv) sequence as one block and slice tiles out of it; Triton
prefers power-of-two block shapes, so lengths that pad to a non-power-of-two may need extra
padding there (unverified). The custom_vjp wiring
lives in ``api``; this module supplies ``forward`` and ``backward``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gated_attention_jax.kernels import common, tiles
from gated_attention_jax.kernels.reference import activation_and_grad


def _tiles(cfg: common.KernelConfig, kernel: str, t: int, s: int, h: int):
  """(block_q, block_kv, compiler params) of ``kernel``: ``cfg.block_sizes`` where given, else
  ``tiles.triton_tiles``'s budget-derived defaults."""
  default = tiles.triton_tiles(h, kernel)
  pick = cfg.block_sizes.forward if kernel == "fwd" else cfg.block_sizes.backward
  block_q, block_kv = pick(t, s, (default.block_q, default.block_kv))
  if cfg.interpret:
    return block_q, block_kv, None
  from jax.experimental.pallas import triton as pltriton  # GPU-only import
  return block_q, block_kv, pltriton.CompilerParams(num_warps=default.num_warps,
                                                     num_stages=default.num_stages)


def _live_kv_blocks(cfg, qi, block_q, block_kv, offset, nk):
  """The kv tiles [start, stop) q tile ``qi`` visits (the causal / sliding-window band)."""
  return common.live_kv_blocks(qi, block_q, block_kv, offset, nk, causal=cfg.causal,
                               window=cfg.sliding_window)


def _mask(cfg, q_start, kv_start, block_q, block_kv, offset, kv_len, kv_padded, q_seg, kv_seg):
  return common.tile_mask(q_start, kv_start, block_q, block_kv, causal=cfg.causal,
                          offset=offset, kv_len=kv_len, kv_padded=kv_padded,
                          window=cfg.sliding_window,
                          q_seg=None if q_seg is None else q_seg[:, None],
                          kv_seg=None if kv_seg is None else kv_seg[None, :])


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, cfg: common.KernelConfig, block_kv: int, offset: int, kv_len: int,
                kv_padded: bool, has_gate: bool, has_segments: bool, save_residuals: bool):
  refs = iter(refs)
  q_ref, k_ref, v_ref = next(refs), next(refs), next(refs)
  gate_ref = next(refs) if has_gate else None
  q_seg_ref, kv_seg_ref = (next(refs), next(refs)) if has_segments else (None, None)
  o_ref = next(refs)
  y_ref, lse_ref = (next(refs), next(refs)) if save_residuals else (None, None)

  block_q, h = q_ref.shape
  qi = pl.program_id(2)
  nk = k_ref.shape[0] // block_kv
  q = q_ref[...]
  q_seg = q_seg_ref[...] if has_segments else None

  def body(ki, carry):
    m_prev, l_prev, acc = carry
    kv_rows = pl.ds(ki * block_kv, block_kv)
    k, v = k_ref[kv_rows, :], v_ref[kv_rows, :]
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * cfg.scale
    s = common.soft_cap(s, cfg.logit_soft_cap)[0]
    mask = _mask(cfg, qi * block_q, ki * block_kv, block_q, block_kv, offset, kv_len,
                 kv_padded, q_seg, kv_seg_ref[kv_rows] if has_segments else None)
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    m_new, p, alpha = common.online_softmax_step(s, m_prev)
    acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v,
                                         preferred_element_type=jnp.float32)
    return m_new, alpha * l_prev + jnp.sum(p, axis=1), acc

  init = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32),
          jnp.zeros((block_q, h), jnp.float32))
  m, l, acc = jax.lax.fori_loop(*_live_kv_blocks(cfg, qi, block_q, block_kv, offset, nk),
                                body, init)
  y = acc / jnp.where(l == 0.0, 1.0, l)[:, None]
  if save_residuals:
    y_ref[...] = y.astype(y_ref.dtype)
    lse_ref[...] = jnp.where(l == 0.0, jnp.inf, m + jnp.log(l))
  if has_gate:
    act = activation_and_grad(gate_ref[...], cfg.gate_activation)[0]
    y = y * (act if act.ndim == 2 else act[:, None])
  o_ref[...] = y.astype(o_ref.dtype)


def forward(q, k, v, gate, q_seg, kv_seg, cfg: common.KernelConfig, *, save_residuals: bool):
  """Gated attention forward.

  q: (B, T, N, H); k, v: (B, S, K, H); gate: (B, T, N, H), (B, T, N) or None;
  q_seg: (B, T), kv_seg: (B, S) or both None.
  Returns o (B, T, N, H) and, if save_residuals, the ungated output y (B, T, N, H) and the
  log-sum-exp lse (B, T, N) float32 (+inf for rows that see no key); else (o, None, None).
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  group = n // kh
  block_q, block_kv, params = _tiles(cfg, "fwd", t, s, h)
  tp, sp = common.round_up(t, block_q), common.round_up(s, block_kv)

  q_spec = pl.BlockSpec((None, block_q, None, h), lambda bi, ni, qi: (bi, qi, ni, 0))
  row_spec = pl.BlockSpec((None, block_q, None), lambda bi, ni, qi: (bi, qi, ni))
  kv_spec = pl.BlockSpec((None, sp, None, h), lambda bi, ni, qi: (bi, 0, ni // group, 0))
  inputs = [common.pad_axis(q, 1, tp), common.pad_axis(k, 1, sp), common.pad_axis(v, 1, sp)]
  in_specs = [q_spec, kv_spec, kv_spec]
  if gate is not None:
    inputs.append(common.pad_axis(gate, 1, tp))
    in_specs.append(q_spec if gate.ndim == 4 else row_spec)
  if q_seg is not None:
    inputs += [common.pad_axis(q_seg, 1, tp), common.pad_axis(kv_seg, 1, sp)]
    in_specs += [pl.BlockSpec((None, block_q), lambda bi, ni, qi: (bi, qi)),
                 pl.BlockSpec((None, sp), lambda bi, ni, qi: (bi, 0))]
  out_shape = [jax.ShapeDtypeStruct((b, tp, n, h), q.dtype)]
  out_specs = [q_spec]
  if save_residuals:
    out_shape += [jax.ShapeDtypeStruct((b, tp, n, h), q.dtype),
                  jax.ShapeDtypeStruct((b, tp, n), jnp.float32)]
    out_specs += [q_spec, row_spec]

  kernel = functools.partial(
      _fwd_kernel, cfg=cfg, block_kv=block_kv, offset=s - t, kv_len=s, kv_padded=sp != s,
      has_gate=gate is not None, has_segments=q_seg is not None,
      save_residuals=save_residuals)
  outs = pl.pallas_call(
      kernel,
      grid=(b, n, tp // block_q),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=params,
      interpret=cfg.interpret,
      name="gated_flash_fwd_gpu",
  )(*inputs)
  if not save_residuals:
    return outs[0][:, :t], None, None
  return outs[0][:, :t], outs[1][:, :t], outs[2][:, :t]


# ----------------------------------------------------------------------------- backward


def _probs_and_dscores(q, k, v, dy, lse, delta, mask, cfg: common.KernelConfig):
  """Recomputed probabilities p and gradients ds of the scaled logits (before any soft cap):
  p ⊙ (dy vᵀ − delta), times 1 - tanh² under a cap; (bq, bk) f32."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32) * cfg.scale
  s, dcap = common.soft_cap(s, cfg.logit_soft_cap)
  p = jnp.exp(s - lse[:, None])  # lse = +inf on rows that see nothing -> p = 0
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dp = jax.lax.dot_general(dy, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  ds = p * (dp - delta[:, None])
  return p, ds if dcap is None else ds * dcap


def _dq_kernel(*refs, cfg: common.KernelConfig, block_kv: int, offset: int, kv_len: int,
               kv_padded: bool, has_segments: bool):
  refs = iter(refs)
  q_ref, k_ref, v_ref, dy_ref, lse_ref, delta_ref = (next(refs) for _ in range(6))
  q_seg_ref, kv_seg_ref = (next(refs), next(refs)) if has_segments else (None, None)
  dq_ref = next(refs)

  block_q, h = q_ref.shape
  qi = pl.program_id(2)
  nk = k_ref.shape[0] // block_kv
  q, dy, lse, delta = q_ref[...], dy_ref[...], lse_ref[...], delta_ref[...]
  q_seg = q_seg_ref[...] if has_segments else None

  def body(ki, dq):
    kv_rows = pl.ds(ki * block_kv, block_kv)
    k = k_ref[kv_rows, :]
    mask = _mask(cfg, qi * block_q, ki * block_kv, block_q, block_kv, offset, kv_len,
                 kv_padded, q_seg, kv_seg_ref[kv_rows] if has_segments else None)
    _, ds = _probs_and_dscores(q, k, v_ref[kv_rows, :], dy, lse, delta, mask, cfg)
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  dq = jax.lax.fori_loop(*_live_kv_blocks(cfg, qi, block_q, block_kv, offset, nk), body,
                         jnp.zeros((block_q, h), jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: common.KernelConfig, block_q: int, group: int, offset: int,
                kv_len: int, kv_padded: bool, has_segments: bool):
  refs = iter(refs)
  q_ref, k_ref, v_ref, dy_ref, lse_ref, delta_ref = (next(refs) for _ in range(6))
  q_seg_ref, kv_seg_ref = (next(refs), next(refs)) if has_segments else (None, None)
  dk_ref, dv_ref = next(refs), next(refs)

  block_kv, h = k_ref.shape
  ki = pl.program_id(2)
  nq = q_ref.shape[0] // block_q
  k, v = k_ref[...], v_ref[...]
  kv_seg = kv_seg_ref[...] if has_segments else None
  first, stop = common.live_q_blocks(ki, block_q, block_kv, offset, nq, causal=cfg.causal,
                                     window=cfg.sliding_window)
  transpose_lhs = (((0,), (0,)), ((), ()))

  def body(qi, carry, g):
    dk, dv = carry
    q_rows = pl.ds(qi * block_q, block_q)
    q, dy = q_ref[q_rows, g, :], dy_ref[q_rows, g, :]
    mask = _mask(cfg, qi * block_q, ki * block_kv, block_q, block_kv, offset, kv_len,
                 kv_padded, q_seg_ref[q_rows] if has_segments else None, kv_seg)
    p, ds = _probs_and_dscores(q, k, v, dy, lse_ref[q_rows, g], delta_ref[q_rows, g], mask,
                               cfg)
    dv = dv + jax.lax.dot_general(p.astype(dy.dtype), dy, transpose_lhs,
                                  preferred_element_type=jnp.float32)
    dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, transpose_lhs,
                                  preferred_element_type=jnp.float32)
    return dk, dv

  carry = (jnp.zeros((block_kv, h), jnp.float32), jnp.zeros((block_kv, h), jnp.float32))
  for g in range(group):  # static: G <= 8 in practice
    carry = jax.lax.fori_loop(first, stop, functools.partial(body, g=g), carry)
  dk_ref[...] = (carry[0] * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = carry[1].astype(dv_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, lse, dy, delta, cfg: common.KernelConfig):
  """Flash backward for the ungated attention given dy = dO ⊙ act(gate).

  q, dy: (B, T, N, H); k, v: (B, S, K, H); lse, delta: (B, T, N) float32, delta = Σ_H dy ⊙ y;
  q_seg: (B, T), kv_seg: (B, S) or None. Returns dq (B, T, N, H), dk, dv (B, S, K, H).
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  group = n // kh
  block_q, block_kv, params = _tiles(cfg, "bwd", t, s, h)
  tp, sp = common.round_up(t, block_q), common.round_up(s, block_kv)
  static = dict(cfg=cfg, offset=s - t, kv_len=s, kv_padded=sp != s,
                has_segments=q_seg is not None)
  # Padded query rows carry dy = 0 and delta = 0, so they add nothing to dk and dv.
  q_p, dy_p = common.pad_axis(q, 1, tp), common.pad_axis(dy, 1, tp)
  lse_p, delta_p = common.pad_axis(lse, 1, tp), common.pad_axis(delta, 1, tp)
  k_p, v_p = common.pad_axis(k, 1, sp), common.pad_axis(v, 1, sp)
  segments = ([common.pad_axis(q_seg, 1, tp), common.pad_axis(kv_seg, 1, sp)]
              if q_seg is not None else [])

  # dq: one program per (B, N, q tile), looping over kv tiles up to the diagonal.
  q_spec = pl.BlockSpec((None, block_q, None, h), lambda bi, ni, qi: (bi, qi, ni, 0))
  row_spec = pl.BlockSpec((None, block_q, None), lambda bi, ni, qi: (bi, qi, ni))
  kv_spec = pl.BlockSpec((None, sp, None, h), lambda bi, ni, qi: (bi, 0, ni // group, 0))
  seg_specs = [pl.BlockSpec((None, block_q), lambda bi, ni, qi: (bi, qi)),
               pl.BlockSpec((None, sp), lambda bi, ni, qi: (bi, 0))] if segments else []
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_kv=block_kv, **static),
      grid=(b, n, tp // block_q),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + seg_specs,
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct((b, tp, n, h), q.dtype),
      compiler_params=params,
      interpret=cfg.interpret,
      name="gated_flash_dq_gpu",
  )(q_p, k_p, v_p, dy_p, lse_p, delta_p, *segments)

  # dk, dv: one program per (B, K, kv tile), looping over its G heads and the live q tiles.
  q_spec = pl.BlockSpec((None, tp, group, h), lambda bi, hi, ki: (bi, 0, hi, 0))
  row_spec = pl.BlockSpec((None, tp, group), lambda bi, hi, ki: (bi, 0, hi))
  kv_spec = pl.BlockSpec((None, block_kv, None, h), lambda bi, hi, ki: (bi, ki, hi, 0))
  seg_specs = [pl.BlockSpec((None, tp), lambda bi, hi, ki: (bi, 0)),
               pl.BlockSpec((None, block_kv), lambda bi, hi, ki: (bi, ki))] if segments else []
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=block_q, group=group, **static),
      grid=(b, kh, sp // block_kv),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + seg_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct((b, sp, kh, h), k.dtype),
                 jax.ShapeDtypeStruct((b, sp, kh, h), v.dtype)],
      compiler_params=params,
      interpret=cfg.interpret,
      name="gated_flash_dkv_gpu",
  )(q_p, k_p, v_p, dy_p, lse_p, delta_p, *segments)
  return dq[:, :t], dk[:, :s], dv[:, :s]

"""Gated flash attention for TPU (Pallas / Mosaic TPU): forward, dq and dk/dv kernels.

Dimension names: B batch, T query length, S key length, N query heads, K kv heads, H head_dim,
G = N // K query heads per kv head. The kernels work on head-major copies (B, N, T, H) so every
tile's last two dims are (rows, H) with H the full minor dim; lengths are zero-padded to a
multiple of the tile and the padding is masked. The grid's last axes are the reduction:
forward and dq walk kv tiles, dk/dv walk (query head in the group, q tile), so GQA never
materialises repeated K/V. Tiles outside the causal / sliding-window band are skipped with
``pl.when`` and their index maps are clamped into the live tiles, so no DMA is issued for them
either. A logit soft cap is applied to each score tile; the backward multiplies the score
gradients by its derivative 1 - tanh².

On a non-TPU backend ``api`` passes ``interpret=True`` and the kernels run in Pallas'
interpreter (the body as XLA ops over the grid), or under a ``pltpu.InterpretParams`` the caller
gave (jax's TPU emulator); both are for tests.
The custom_vjp wiring lives in ``api``; this module supplies ``forward`` and ``backward``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gated_attention_jax.kernels import common
from gated_attention_jax.kernels.reference import activation_and_grad

_PARALLEL = pltpu.GridDimensionSemantics.PARALLEL
_ARBITRARY = pltpu.GridDimensionSemantics.ARBITRARY


def _heads_major(x: jax.Array, length: int) -> jax.Array:
  """(B, L, heads, ...) -> (B, heads, L_padded, ...), zero-padded along L."""
  return jnp.swapaxes(common.pad_axis(x, 1, length), 1, 2)


def _segment_inputs(q_seg, kv_seg, tp: int, sp: int):
  """Segment ids as (B, Tp, 1) and (B, 1, Sp) so tiles have legal TPU minor dims."""
  return common.pad_axis(q_seg, 1, tp)[:, :, None], common.pad_axis(kv_seg, 1, sp)[:, None, :]


def _banded(cfg: common.KernelConfig) -> bool:
  """Whether some tiles are skipped: causal masking or a sliding window."""
  return cfg.causal or cfg.sliding_window is not None


def _kv_range(cfg: common.KernelConfig, qi, block_q: int, block_kv: int, offset: int, nk: int):
  return common.live_kv_blocks(qi, block_q, block_kv, offset, nk, causal=cfg.causal,
                               window=cfg.sliding_window)


def _run_if_live(cfg: common.KernelConfig, step, qi, ki, block_q: int, block_kv: int,
                 offset: int, nk: int) -> None:
  """Runs ``step`` for tile (qi, ki) unless the causal / window band misses it."""
  if not _banded(cfg):
    step()
    return
  start, stop = _kv_range(cfg, qi, block_q, block_kv, offset, nk)
  pl.when((ki >= start) & (ki < stop))(step)


def _mask(cfg: common.KernelConfig, qi, ki, block_q: int, block_kv: int, offset: int,
          kv_len: int, kv_padded: bool, q_seg_ref, kv_seg_ref):
  return common.tile_mask(
      qi * block_q, ki * block_kv, block_q, block_kv, causal=cfg.causal, offset=offset,
      kv_len=kv_len, kv_padded=kv_padded, window=cfg.sliding_window,
      q_seg=None if q_seg_ref is None else q_seg_ref[...],
      kv_seg=None if kv_seg_ref is None else kv_seg_ref[...])


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, cfg: common.KernelConfig, offset: int, kv_len: int, kv_padded: bool,
                has_gate: bool, has_segments: bool, save_residuals: bool):
  refs = iter(refs)
  q_ref, k_ref, v_ref = next(refs), next(refs), next(refs)
  gate_ref = next(refs) if has_gate else None
  q_seg_ref, kv_seg_ref = (next(refs), next(refs)) if has_segments else (None, None)
  o_ref = next(refs)
  y_ref, lse_ref = (next(refs), next(refs)) if save_residuals else (None, None)
  m_sc, l_sc, acc_sc = next(refs), next(refs), next(refs)

  block_q, block_kv = q_ref.shape[0], k_ref.shape[0]
  qi, ki = pl.program_id(2), pl.program_id(3)

  @pl.when(ki == 0)
  def _init():
    m_sc[...] = jnp.full_like(m_sc, -jnp.inf)
    l_sc[...] = jnp.zeros_like(l_sc)
    acc_sc[...] = jnp.zeros_like(acc_sc)

  def _step():
    s = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * cfg.scale
    s = common.soft_cap(s, cfg.logit_soft_cap)[0]
    mask = _mask(cfg, qi, ki, block_q, block_kv, offset, kv_len, kv_padded, q_seg_ref,
                 kv_seg_ref)
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    m_prev = m_sc[...]
    m_new, p, alpha = common.online_softmax_step(s, m_prev)
    m_sc[...] = m_new
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[...] = alpha * acc_sc[...] + jnp.dot(
        p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)

  _run_if_live(cfg, _step, qi, ki, block_q, block_kv, offset, pl.num_programs(3))

  @pl.when(ki == pl.num_programs(3) - 1)
  def _finalize():
    l = l_sc[...]
    y = acc_sc[...] / jnp.where(l == 0.0, 1.0, l)
    if save_residuals:
      y_ref[...] = y.astype(y_ref.dtype)
      lse_ref[...] = jnp.where(l == 0.0, jnp.inf, m_sc[...] + jnp.log(l))
    if has_gate:
      y = y * activation_and_grad(gate_ref[...], cfg.gate_activation)[0]
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
  block_q, block_kv = cfg.block_sizes.forward(t, s)
  tp, sp = common.round_up(t, block_q), common.round_up(s, block_kv)
  nq, nk = tp // block_q, sp // block_kv
  offset = s - t

  def kv_block(qi, ki):
    if not _banded(cfg):
      return ki
    return common.clamp_block(ki, *_kv_range(cfg, qi, block_q, block_kv, offset, nk), nk)

  q_spec = pl.BlockSpec((None, None, block_q, h), lambda bi, ni, qi, ki: (bi, ni, qi, 0))
  kv_spec = pl.BlockSpec((None, None, block_kv, h),
                         lambda bi, ni, qi, ki: (bi, ni // group, kv_block(qi, ki), 0))
  row_spec = pl.BlockSpec((None, None, block_q, 1), lambda bi, ni, qi, ki: (bi, ni, qi, 0))
  inputs = [_heads_major(q, tp), _heads_major(k, sp), _heads_major(v, sp)]
  in_specs = [q_spec, kv_spec, kv_spec]
  if gate is not None:
    inputs.append(_heads_major(gate if gate.ndim == 4 else gate[..., None], tp))
    in_specs.append(q_spec if gate.ndim == 4 else row_spec)
  if q_seg is not None:
    inputs += _segment_inputs(q_seg, kv_seg, tp, sp)
    in_specs += [
        pl.BlockSpec((None, block_q, 1), lambda bi, ni, qi, ki: (bi, qi, 0)),
        pl.BlockSpec((None, 1, block_kv), lambda bi, ni, qi, ki: (bi, 0, kv_block(qi, ki))),
    ]
  out_shape = [jax.ShapeDtypeStruct((b, n, tp, h), q.dtype)]
  out_specs = [q_spec]
  if save_residuals:
    out_shape += [jax.ShapeDtypeStruct((b, n, tp, h), q.dtype),
                  jax.ShapeDtypeStruct((b, n, tp, 1), jnp.float32)]
    out_specs += [q_spec, row_spec]

  kernel = functools.partial(
      _fwd_kernel, cfg=cfg, offset=offset, kv_len=s, kv_padded=sp != s,
      has_gate=gate is not None, has_segments=q_seg is not None,
      save_residuals=save_residuals)
  outs = pl.pallas_call(
      kernel,
      grid=(b, n, nq, nk),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32),
                      pltpu.VMEM((block_q, 1), jnp.float32),
                      pltpu.VMEM((block_q, h), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=(_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY)),
      interpret=cfg.interpret,
      name="gated_flash_fwd_tpu",
  )(*inputs)
  o = jnp.swapaxes(outs[0], 1, 2)[:, :t]
  if not save_residuals:
    return o, None, None
  y = jnp.swapaxes(outs[1], 1, 2)[:, :t]
  lse = jnp.swapaxes(outs[2][..., 0], 1, 2)[:, :t]
  return o, y, lse


# ----------------------------------------------------------------------------- backward


def _probs_and_dscores(q, k, v, dy, lse, delta, mask, cfg: common.KernelConfig):
  """Recomputed probabilities p and gradients ds of the scaled logits (before any soft cap):
  p ⊙ (dy vᵀ − delta), times 1 - tanh² under a cap; (bq, bk) f32."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32) * cfg.scale
  s, dcap = common.soft_cap(s, cfg.logit_soft_cap)
  p = jnp.exp(s - lse)  # lse = +inf on rows that see nothing -> p = 0
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dp = jax.lax.dot_general(dy, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  ds = p * (dp - delta)
  return p, ds if dcap is None else ds * dcap


def _dq_kernel(*refs, cfg: common.KernelConfig, offset: int, kv_len: int, kv_padded: bool,
               has_segments: bool):
  refs = iter(refs)
  q_ref, k_ref, v_ref, dy_ref, lse_ref, delta_ref = (next(refs) for _ in range(6))
  q_seg_ref, kv_seg_ref = (next(refs), next(refs)) if has_segments else (None, None)
  dq_ref, dq_sc = next(refs), next(refs)

  block_q, block_kv = q_ref.shape[0], k_ref.shape[0]
  qi, ki = pl.program_id(2), pl.program_id(3)

  @pl.when(ki == 0)
  def _init():
    dq_sc[...] = jnp.zeros_like(dq_sc)

  def _step():
    mask = _mask(cfg, qi, ki, block_q, block_kv, offset, kv_len, kv_padded, q_seg_ref,
                 kv_seg_ref)
    k = k_ref[...]
    _, ds = _probs_and_dscores(q_ref[...], k, v_ref[...], dy_ref[...], lse_ref[...],
                               delta_ref[...], mask, cfg)
    dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  _run_if_live(cfg, _step, qi, ki, block_q, block_kv, offset, pl.num_programs(3))

  @pl.when(ki == pl.num_programs(3) - 1)
  def _finalize():
    dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: common.KernelConfig, offset: int, kv_len: int, kv_padded: bool,
                has_segments: bool):
  refs = iter(refs)
  q_ref, k_ref, v_ref, dy_ref, lse_ref, delta_ref = (next(refs) for _ in range(6))
  q_seg_ref, kv_seg_ref = (next(refs), next(refs)) if has_segments else (None, None)
  dk_ref, dv_ref, dk_sc, dv_sc = (next(refs) for _ in range(4))

  block_q, block_kv = q_ref.shape[0], k_ref.shape[0]
  ki, gi, qi = pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((gi == 0) & (qi == 0))
  def _init():
    dk_sc[...] = jnp.zeros_like(dk_sc)
    dv_sc[...] = jnp.zeros_like(dv_sc)

  def _step():
    mask = _mask(cfg, qi, ki, block_q, block_kv, offset, kv_len, kv_padded, q_seg_ref,
                 kv_seg_ref)
    q, dy = q_ref[...], dy_ref[...]
    p, ds = _probs_and_dscores(q, k_ref[...], v_ref[...], dy, lse_ref[...], delta_ref[...],
                               mask, cfg)
    transpose_lhs = (((0,), (0,)), ((), ()))
    dv_sc[...] += jax.lax.dot_general(p.astype(dy.dtype), dy, transpose_lhs,
                                      preferred_element_type=jnp.float32)
    dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, transpose_lhs,
                                      preferred_element_type=jnp.float32)

  _run_if_live(cfg, _step, qi, ki, block_q, block_kv, offset, pl.num_programs(2))

  @pl.when((gi == pl.num_programs(3) - 1) & (qi == pl.num_programs(4) - 1))
  def _finalize():
    dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, lse, dy, delta, cfg: common.KernelConfig):
  """Flash backward for the ungated attention given dy = dO ⊙ act(gate).

  q, dy: (B, T, N, H); k, v: (B, S, K, H); lse, delta: (B, T, N) float32, delta = Σ_H dy ⊙ y;
  q_seg: (B, T), kv_seg: (B, S) or None. Returns dq (B, T, N, H), dk, dv (B, S, K, H).
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  group = n // kh
  block_q, block_kv = cfg.block_sizes.backward(t, s)
  tp, sp = common.round_up(t, block_q), common.round_up(s, block_kv)
  nq, nk = tp // block_q, sp // block_kv
  offset = s - t
  static = dict(cfg=cfg, offset=offset, kv_len=s, kv_padded=sp != s,
                has_segments=q_seg is not None)
  # Padded query rows carry dy = 0 and delta = 0, so they add nothing to dk and dv.
  inputs = [_heads_major(q, tp), _heads_major(k, sp), _heads_major(v, sp),
            _heads_major(dy, tp), _heads_major(lse[..., None], tp),
            _heads_major(delta[..., None], tp)]
  segments = list(_segment_inputs(q_seg, kv_seg, tp, sp)) if q_seg is not None else []

  # dq: grid (B, N, q tiles, kv tiles); kv index clamped to the last live tile.
  def kv_block(qi, ki):
    if not _banded(cfg):
      return ki
    return common.clamp_block(ki, *_kv_range(cfg, qi, block_q, block_kv, offset, nk), nk)

  q_spec = pl.BlockSpec((None, None, block_q, h), lambda bi, ni, qi, ki: (bi, ni, qi, 0))
  row_spec = pl.BlockSpec((None, None, block_q, 1), lambda bi, ni, qi, ki: (bi, ni, qi, 0))
  kv_spec = pl.BlockSpec((None, None, block_kv, h),
                         lambda bi, ni, qi, ki: (bi, ni // group, kv_block(qi, ki), 0))
  seg_specs = [
      pl.BlockSpec((None, block_q, 1), lambda bi, ni, qi, ki: (bi, qi, 0)),
      pl.BlockSpec((None, 1, block_kv), lambda bi, ni, qi, ki: (bi, 0, kv_block(qi, ki))),
  ] if segments else []
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **static),
      grid=(b, n, nq, nk),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + seg_specs,
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct((b, n, tp, h), q.dtype),
      scratch_shapes=[pltpu.VMEM((block_q, h), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=(_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY)),
      interpret=cfg.interpret,
      name="gated_flash_dq_tpu",
  )(*inputs, *segments)

  # dk, dv: grid (B, K, kv tiles, heads in group, q tiles); q index clamped to the first live tile.
  def q_block(ki, qi):
    if not _banded(cfg):
      return qi
    return common.clamp_block(qi, *common.live_q_blocks(
        ki, block_q, block_kv, offset, nq, causal=cfg.causal, window=cfg.sliding_window), nq)

  q_spec = pl.BlockSpec((None, None, block_q, h),
                        lambda bi, ki_, kv, gi, qi: (bi, ki_ * group + gi, q_block(kv, qi), 0))
  row_spec = pl.BlockSpec((None, None, block_q, 1),
                          lambda bi, ki_, kv, gi, qi: (bi, ki_ * group + gi, q_block(kv, qi), 0))
  kv_spec = pl.BlockSpec((None, None, block_kv, h), lambda bi, ki_, kv, gi, qi: (bi, ki_, kv, 0))
  seg_specs = [
      pl.BlockSpec((None, block_q, 1), lambda bi, ki_, kv, gi, qi: (bi, q_block(kv, qi), 0)),
      pl.BlockSpec((None, 1, block_kv), lambda bi, ki_, kv, gi, qi: (bi, 0, kv)),
  ] if segments else []
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **static),
      grid=(b, kh, nk, group, nq),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + seg_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct((b, kh, sp, h), k.dtype),
                 jax.ShapeDtypeStruct((b, kh, sp, h), v.dtype)],
      scratch_shapes=[pltpu.VMEM((block_kv, h), jnp.float32),
                      pltpu.VMEM((block_kv, h), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=(_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY, _ARBITRARY)),
      interpret=cfg.interpret,
      name="gated_flash_dkv_tpu",
  )(*inputs, *segments)

  def back(x, length):
    return jnp.swapaxes(x, 1, 2)[:, :length]

  return back(dq, t), back(dk, s), back(dv, s)

"""Gated flash attention as Mosaic GPU (Hopper) Pallas kernels: forward (wgmma, TMA, warp
specialisation), dq and dk/dv backward (the same); behind ``impl="pallas_mgpu"``.

Dimension names: B batch, T query length, S key length, N query heads, K kv heads, H head_dim,
G = N // K.

Forward: one CTA per (q tile of 64 rows, query head, batch), two warpgroups. Warpgroup 1 is the
producer: it TMA-loads the q tile (and the gate tile) once, then streams k/v tiles (and kv
segment ids) through ``tiles.MGPU_SLOTS`` SMEM slots, each guarded by a "full" barrier (TMA
arrivals) and a "free" barrier (consumer arrival). Warpgroup 0 is the consumer: per kv tile it
runs s = q·kᵀ on wgmma (kᵀ is a transposed view of the k slot, no copy), the masked online
softmax in registers, writes p to SMEM and runs p·v on wgmma, then frees the slot. Under causal
masking both loops stop at the diagonal. The epilogue stores the ungated output y (through the
q tile's SMEM, free by then), the log-sum-exp lse and o = y ⊙ act(gate) (an elementwise gate is
loaded straight into o's SMEM tile and overwritten by o) with TMA. GQA: the kv head is n // G;
K/V are never repeated.

Backward (same contract as ``flash_gpu.backward``): a dq kernel, one CTA per (q tile, query head,
batch) streaming k/v tiles up to the diagonal, and a dk/dv kernel, one CTA per (kv tile, kv head,
batch) streaming (query head of the group, live q tile) pairs. Both recompute p = exp(s − lse)
from the saved lse, accumulate in float32 registers and run every matmul on wgmma with SMEM
operands; operands that need a transposed view (kᵀ, vᵀ in dq; qᵀ, dyᵀ in dk/dv) are
transposed SMEM views of the tiles already loaded. dk/dv works in the transposed frame
(sᵀ = k·qᵀ, dpᵀ = v·dyᵀ) so dv += pᵀ·dy and dk += dsᵀ·q. dq is staged out through the q tile's
SMEM and dk/dv through the k/v tiles', which the loop no longer needs.

Tiles and what is accepted come from ``tiles``: 64 query rows, kv tiles of 64 rows (128 in
the forward at head_dim 64), bf16/f16 inputs, head_dim a multiple of 64 up to 256, jax >= 0.11
(0.10's Mosaic GPU cannot infer the softmax's layouts); ``tiles.mgpu_smem_bytes`` is the exact
scratch each kernel allocates and is checked against Hopper's 232,448 bytes before compiling.

Every wgmma accumulator is read right after its wgmma (``_matmul``), which waits for it, so an
SMEM tile (p, ds) is never rewritten while a wgmma still reads it. Not done (FA3 has them): p
kept in registers as wgmma's A operand, two consumer warpgroups ping-ponging softmax and
matmuls, and overlapping a tile's softmax with the next tile's q·kᵀ. Verified by compiling for
H100/H200 (``compile_check``) and in jax's Mosaic GPU interpreter (tests/test_kernels_mgpu.py);
not yet run on a GPU, so runtime-only faults (barrier phase errors, async ordering) are
unverified.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from gated_attention_jax.kernels import common, tiles
from gated_attention_jax.kernels.reference import activation_and_grad

BLOCK_Q = tiles.MGPU_BLOCK_Q
_CONSUMER, _PRODUCER = 0, 1


def _interpret_params(cfg: common.KernelConfig):
  if not cfg.interpret:
    return None
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return InterpretGPUParams()


def _swizzled(shape, dtype):
  """SMEM operand of wgmma: (8, 128 bytes) tiles with a 128-byte swizzle."""
  elems = 128 // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)),
                                              plgpu.SwizzleTransform(128)))


def _t(ref):
  """Transposed view of a 2-D SMEM tile (a wgmma operand; nothing is copied)."""
  return ref.transpose((1, 0))


def _block_kv(cfg: common.KernelConfig, t: int, s: int, h: int, backward: bool) -> int:
  pick = cfg.block_sizes.backward if backward else cfg.block_sizes.forward
  return max(64, pick(t, s, (BLOCK_Q, tiles.mgpu_block_kv(h, backward)))[1])


def _matmul(a_s, b_s, m: int, n: int):
  """a_s (m, k) · b_s (k, n) on wgmma into a fresh f32 accumulator; returns the value (reading
  the accumulator waits for the wgmma, so its SMEM operands may be overwritten afterwards)."""

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a_s, b_s)
    return acc_ref[...]

  return pl.run_scoped(body, plgpu.ACC((m, n), jnp.float32))


def _kv_band(cfg: common.KernelConfig, qi, block_kv: int, offset: int, nk: int):
  """(first kv tile, number of kv tiles) q tile ``qi`` visits: the causal / window band."""
  start, stop = common.live_kv_blocks(qi, BLOCK_Q, block_kv, offset, nk, causal=cfg.causal,
                                      window=cfg.sliding_window)
  start = jnp.asarray(start, jnp.int32)
  return start, jnp.maximum(jnp.asarray(stop, jnp.int32) - start, 0)


def _produce(n_steps, nbuf: int, free, load):
  """Producer loop: ``load(step, slot)`` for each step, reusing a slot once it is freed."""

  def step(j, carry):
    slot = lax.rem(j, nbuf)

    @pl.when(j >= nbuf)
    def _():  # wait until the consumer is done with this slot's previous tile
      plgpu.barrier_wait(free.at[slot])

    load(j, slot)
    return carry

  lax.fori_loop(0, n_steps, step, 0)
  for j in range(nbuf):  # drain: observe the last release of every used slot
    last = n_steps - nbuf + j

    @pl.when(last >= 0)
    def _():
      plgpu.barrier_wait(free.at[lax.rem(last, nbuf)])


def _consume(n_steps, nbuf: int, full, free, compute, init):
  """Consumer loop: waits for each slot, ``carry = compute(step, slot, carry)``, frees it."""

  def step(j, carry):
    slot = lax.rem(j, nbuf)
    plgpu.barrier_wait(full.at[slot])
    carry = compute(j, slot, carry)
    plgpu.barrier_arrive(free.at[slot])
    return carry

  return lax.fori_loop(0, n_steps, step, init)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, cfg: common.KernelConfig, block_kv: int, group: int, offset: int,
                kv_len: int, kv_padded: bool, gate_kind: str | None, has_segments: bool,
                nbuf: int):
  refs = iter(refs)
  q_g, k_g, v_g = next(refs), next(refs), next(refs)
  gate_g = next(refs) if gate_kind else None
  q_seg_g, kv_seg_g = (next(refs), next(refs)) if has_segments else (None, None)
  o_g, y_g, lse_g = next(refs), next(refs), next(refs)
  q_s, k_s, v_s, p_s, o_s, lse_s = (next(refs) for _ in range(6))
  # An elementwise gate tile lands in o's SMEM (read in the epilogue, then overwritten by o).
  gate_s = o_s if gate_kind == "elementwise" else (next(refs) if gate_kind else None)
  q_seg_s, kv_seg_s = (next(refs), next(refs)) if has_segments else (None, None)
  q_bar, full, free = next(refs), next(refs), next(refs)

  qi, ni, bi = lax.axis_index("q"), lax.axis_index("n"), lax.axis_index("b")
  wg = lax.axis_index("wg")
  kvh = ni // group
  q_rows = pl.ds(qi * BLOCK_Q, BLOCK_Q)
  nk = k_g.shape[1] // block_kv
  first_kv, n_live = _kv_band(cfg, qi, block_kv, offset, nk)  # step j reads kv tile first_kv + j

  @pl.when(wg == _PRODUCER)
  def _producer():
    plgpu.copy_gmem_to_smem(q_g.at[bi, q_rows, ni, :], q_s, q_bar.at[0])
    if gate_kind == "elementwise":
      plgpu.copy_gmem_to_smem(gate_g.at[bi, q_rows, ni, :], gate_s, q_bar.at[0])
    elif gate_kind == "headwise":
      plgpu.copy_gmem_to_smem(gate_g.at[bi, ni, q_rows], gate_s, q_bar.at[0])
    if has_segments:
      plgpu.copy_gmem_to_smem(q_seg_g.at[bi, q_rows], q_seg_s, q_bar.at[0])

    def load(j, slot):
      kv_rows = pl.ds((first_kv + j) * block_kv, block_kv)
      plgpu.copy_gmem_to_smem(k_g.at[bi, kv_rows, kvh, :], k_s.at[slot], full.at[slot])
      plgpu.copy_gmem_to_smem(v_g.at[bi, kv_rows, kvh, :], v_s.at[slot], full.at[slot])
      if has_segments:
        plgpu.copy_gmem_to_smem(kv_seg_g.at[bi, kv_rows], kv_seg_s.at[slot], full.at[slot])

    _produce(n_live, nbuf, free, load)

  @pl.when(wg == _CONSUMER)
  def _consumer():
    plgpu.barrier_wait(q_bar.at[0])
    q_seg = q_seg_s[...][:, None] if has_segments else None
    h = q_s.shape[1]

    def compute(j, slot, carry):
      m_prev, l_prev, acc = carry
      s = _matmul(q_s, _t(k_s.at[slot]), BLOCK_Q, block_kv) * cfg.scale
      s = common.soft_cap(s, cfg.logit_soft_cap)[0]
      mask = common.tile_mask(
          qi * BLOCK_Q, (first_kv + j) * block_kv, BLOCK_Q, block_kv, causal=cfg.causal,
          offset=offset, kv_len=kv_len, kv_padded=kv_padded, window=cfg.sliding_window,
          q_seg=q_seg,
          kv_seg=kv_seg_s.at[slot][...][None, :] if has_segments else None)
      if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
      m_new, p, alpha = common.online_softmax_step(s, m_prev)
      p_s[...] = p.astype(p_s.dtype)
      plgpu.commit_smem()
      pv = _matmul(p_s, v_s.at[slot], BLOCK_Q, h)
      return m_new, alpha * l_prev + jnp.sum(p, axis=1), alpha[:, None] * acc + pv

    init = (jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), jnp.zeros((BLOCK_Q,), jnp.float32),
            jnp.zeros((BLOCK_Q, h), jnp.float32))
    m, l, acc = _consume(n_live, nbuf, full, free, compute, init)
    y = acc / jnp.where(l == 0.0, 1.0, l)[:, None]
    lse_s[...] = jnp.where(l == 0.0, jnp.inf, m + jnp.log(l))
    if gate_kind:
      act = activation_and_grad(gate_s[...], cfg.gate_activation)[0]
      o = y * (act if act.ndim == 2 else act[:, None])
    else:
      o = y
    q_s[...] = y.astype(q_s.dtype)  # q's tile is free: every wgmma reading it has finished
    o_s[...] = o.astype(o_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o_g.at[bi, q_rows, ni, :])
    plgpu.copy_smem_to_gmem(q_s, y_g.at[bi, q_rows, ni, :])
    plgpu.copy_smem_to_gmem(lse_s, lse_g.at[bi, ni, q_rows])
    plgpu.wait_smem_to_gmem(0)


def forward(q, k, v, gate, q_seg, kv_seg, cfg: common.KernelConfig, *, save_residuals: bool):
  """Gated attention forward (Mosaic GPU); same contract as ``flash_gpu.forward``.

  q: (B, T, N, H); k, v: (B, S, K, H); gate: (B, T, N, H), (B, T, N) or None;
  q_seg: (B, T), kv_seg: (B, S) or both None.
  Returns o (B, T, N, H) and, if save_residuals, the ungated output y (B, T, N, H) and the
  log-sum-exp lse (B, T, N) float32 (+inf for rows that see no key); else (o, None, None).
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  group = n // kh
  block_kv = _block_kv(cfg, t, s, h, backward=False)
  tp, sp = common.round_up(t, BLOCK_Q), common.round_up(s, block_kv)
  nbuf = max(1, min(tiles.MGPU_SLOTS, sp // block_kv))
  dtype = q.dtype

  inputs = [common.pad_axis(q, 1, tp), common.pad_axis(k, 1, sp), common.pad_axis(v, 1, sp)]
  gate_kind = None
  if gate is not None:
    gate_kind = "elementwise" if gate.ndim == 4 else "headwise"
    gate = common.pad_axis(gate.astype(dtype), 1, tp)
    inputs.append(gate if gate.ndim == 4 else jnp.transpose(gate, (0, 2, 1)))  # (B, N, T)
  has_segments = q_seg is not None
  if has_segments:
    inputs += [common.pad_axis(q_seg.astype(jnp.int32), 1, tp),
               common.pad_axis(kv_seg.astype(jnp.int32), 1, sp)]

  scratch = [
      _swizzled((BLOCK_Q, h), dtype),  # q, then y
      _swizzled((nbuf, block_kv, h), k.dtype),  # k slots
      _swizzled((nbuf, block_kv, h), v.dtype),  # v slots
      _swizzled((BLOCK_Q, block_kv), v.dtype),  # p
      plgpu.SMEM((BLOCK_Q, h), dtype),  # o (and the elementwise gate before it)
      plgpu.SMEM((BLOCK_Q,), jnp.float32),  # lse
  ]
  if gate_kind == "headwise":
    scratch.append(plgpu.SMEM((BLOCK_Q,), dtype))
  if has_segments:
    scratch += [plgpu.SMEM((BLOCK_Q,), jnp.int32), plgpu.SMEM((nbuf, block_kv), jnp.int32)]
  scratch += [
      plgpu.Barrier(num_arrivals=1 + bool(gate_kind) + has_segments, num_barriers=1),  # q
      plgpu.Barrier(num_arrivals=2 + has_segments, num_barriers=nbuf),  # full (TMA)
      plgpu.Barrier(num_arrivals=1, num_barriers=nbuf),  # free (consumer)
  ]
  out_shape = [jax.ShapeDtypeStruct((b, tp, n, h), dtype),
               jax.ShapeDtypeStruct((b, tp, n, h), dtype),
               jax.ShapeDtypeStruct((b, n, tp), jnp.float32)]

  kernel = functools.partial(
      _fwd_kernel, cfg=cfg, block_kv=block_kv, group=group, offset=s - t, kv_len=s,
      kv_padded=sp != s, gate_kind=gate_kind, has_segments=has_segments, nbuf=nbuf)
  o, y, lse = plgpu.kernel(
      kernel,
      out_type=out_shape,
      scratch_types=scratch,
      grid=(tp // BLOCK_Q, n, b),
      grid_names=("q", "n", "b"),
      num_threads=2,
      thread_name="wg",
      interpret=_interpret_params(cfg),
  )(*inputs)
  if not save_residuals:
    return o[:, :t], None, None
  return o[:, :t], y[:, :t], jnp.transpose(lse, (0, 2, 1))[:, :t]


# ----------------------------------------------------------------------------- backward


def _dq_kernel(*refs, cfg: common.KernelConfig, block_kv: int, group: int, offset: int,
               kv_len: int, kv_padded: bool, has_segments: bool, nbuf: int):
  refs = iter(refs)
  q_g, dy_g, lse_g, delta_g, k_g, v_g = (next(refs) for _ in range(6))
  q_seg_g, kv_seg_g = (next(refs), next(refs)) if has_segments else (None, None)
  dq_g = next(refs)
  q_s, dy_s, lse_s, delta_s, k_s, v_s, ds_s = (next(refs) for _ in range(7))
  q_seg_s, kv_seg_s = (next(refs), next(refs)) if has_segments else (None, None)
  once, full, free = next(refs), next(refs), next(refs)

  qi, ni, bi = lax.axis_index("q"), lax.axis_index("n"), lax.axis_index("b")
  wg = lax.axis_index("wg")
  kvh = ni // group
  q_rows = pl.ds(qi * BLOCK_Q, BLOCK_Q)
  h = q_s.shape[1]
  nk = k_g.shape[1] // block_kv
  first_kv, n_live = _kv_band(cfg, qi, block_kv, offset, nk)  # step j reads kv tile first_kv + j

  @pl.when(wg == _PRODUCER)
  def _producer():
    plgpu.copy_gmem_to_smem(q_g.at[bi, q_rows, ni, :], q_s, once.at[0])
    plgpu.copy_gmem_to_smem(dy_g.at[bi, q_rows, ni, :], dy_s, once.at[0])
    plgpu.copy_gmem_to_smem(lse_g.at[bi, ni, q_rows], lse_s, once.at[0])
    plgpu.copy_gmem_to_smem(delta_g.at[bi, ni, q_rows], delta_s, once.at[0])
    if has_segments:
      plgpu.copy_gmem_to_smem(q_seg_g.at[bi, q_rows], q_seg_s, once.at[0])

    def load(j, slot):
      kv_rows = pl.ds((first_kv + j) * block_kv, block_kv)
      plgpu.copy_gmem_to_smem(k_g.at[bi, kv_rows, kvh, :], k_s.at[slot], full.at[slot])
      plgpu.copy_gmem_to_smem(v_g.at[bi, kv_rows, kvh, :], v_s.at[slot], full.at[slot])
      if has_segments:
        plgpu.copy_gmem_to_smem(kv_seg_g.at[bi, kv_rows], kv_seg_s.at[slot], full.at[slot])

    _produce(n_live, nbuf, free, load)

  @pl.when(wg == _CONSUMER)
  def _consumer():
    plgpu.barrier_wait(once.at[0])
    lse, delta = lse_s[...][:, None], delta_s[...][:, None]
    q_seg = q_seg_s[...][:, None] if has_segments else None

    def compute(j, slot, dq):
      s = _matmul(q_s, _t(k_s.at[slot]), BLOCK_Q, block_kv) * cfg.scale
      s, dcap = common.soft_cap(s, cfg.logit_soft_cap)
      p = jnp.exp(s - lse)  # lse = +inf on rows that see nothing -> p = 0
      mask = common.tile_mask(
          qi * BLOCK_Q, (first_kv + j) * block_kv, BLOCK_Q, block_kv, causal=cfg.causal,
          offset=offset, kv_len=kv_len, kv_padded=kv_padded, window=cfg.sliding_window,
          q_seg=q_seg, kv_seg=kv_seg_s.at[slot][...][None, :] if has_segments else None)
      if mask is not None:
        p = jnp.where(mask, p, 0.0)
      dp = _matmul(dy_s, _t(v_s.at[slot]), BLOCK_Q, block_kv)
      ds = p * (dp - delta)
      ds_s[...] = (ds if dcap is None else ds * dcap).astype(ds_s.dtype)
      plgpu.commit_smem()
      return dq + _matmul(ds_s, k_s.at[slot], BLOCK_Q, h)

    dq = _consume(n_live, nbuf, full, free, compute, jnp.zeros((BLOCK_Q, h), jnp.float32))
    q_s[...] = (dq * cfg.scale).astype(q_s.dtype)  # q's tile is free now: stage dq there
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_s, dq_g.at[bi, q_rows, ni, :])
    plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(*refs, cfg: common.KernelConfig, block_kv: int, group: int, offset: int,
                kv_len: int, kv_padded: bool, has_segments: bool, nbuf: int):
  refs = iter(refs)
  k_g, v_g, q_g, dy_g, lse_g, delta_g = (next(refs) for _ in range(6))
  q_seg_g, kv_seg_g = (next(refs), next(refs)) if has_segments else (None, None)
  dk_g, dv_g = next(refs), next(refs)
  k_s, v_s, q_s, dy_s, lse_s, delta_s, pt_s, dst_s = (next(refs) for _ in range(8))
  q_seg_s, kv_seg_s = (next(refs), next(refs)) if has_segments else (None, None)
  once, full, free = next(refs), next(refs), next(refs)

  ki, hi, bi = lax.axis_index("kv"), lax.axis_index("h"), lax.axis_index("b")
  wg = lax.axis_index("wg")
  kv_rows = pl.ds(ki * block_kv, block_kv)
  h = k_s.shape[1]
  nq = q_g.shape[1] // BLOCK_Q
  first, stop = common.live_q_blocks(ki, BLOCK_Q, block_kv, offset, nq, causal=cfg.causal,
                                     window=cfg.sliding_window)  # the causal / window band
  first = jnp.asarray(first, jnp.int32)
  n_q_live = jnp.maximum(jnp.asarray(stop, jnp.int32) - first, 0)
  n_steps = group * n_q_live  # step j: query head hi·G + j // n_q_live, q tile first + j % ...

  def head_and_tile(j):  # only called when n_steps > 0, i.e. n_q_live >= 1
    live = jnp.maximum(n_q_live, 1)
    return hi * group + j // live, first + lax.rem(j, live)

  @pl.when(wg == _PRODUCER)
  def _producer():
    plgpu.copy_gmem_to_smem(k_g.at[bi, kv_rows, hi, :], k_s, once.at[0])
    plgpu.copy_gmem_to_smem(v_g.at[bi, kv_rows, hi, :], v_s, once.at[0])
    if has_segments:
      plgpu.copy_gmem_to_smem(kv_seg_g.at[bi, kv_rows], kv_seg_s, once.at[0])

    def load(j, slot):
      ni, qi = head_and_tile(j)
      q_rows = pl.ds(qi * BLOCK_Q, BLOCK_Q)
      bar = full.at[slot]
      plgpu.copy_gmem_to_smem(q_g.at[bi, q_rows, ni, :], q_s.at[slot], bar)
      plgpu.copy_gmem_to_smem(dy_g.at[bi, q_rows, ni, :], dy_s.at[slot], bar)
      plgpu.copy_gmem_to_smem(lse_g.at[bi, ni, q_rows], lse_s.at[slot], bar)
      plgpu.copy_gmem_to_smem(delta_g.at[bi, ni, q_rows], delta_s.at[slot], bar)
      if has_segments:
        plgpu.copy_gmem_to_smem(q_seg_g.at[bi, q_rows], q_seg_s.at[slot], bar)

    _produce(n_steps, nbuf, free, load)

  @pl.when(wg == _CONSUMER)
  def _consumer():
    plgpu.barrier_wait(once.at[0])
    kv_seg = kv_seg_s[...][:, None] if has_segments else None

    def compute(j, slot, carry):
      dk, dv = carry
      _, qi = head_and_tile(j)
      st = _matmul(k_s, _t(q_s.at[slot]), block_kv, BLOCK_Q) * cfg.scale  # sᵀ (bkv, bq)
      st, dcapt = common.soft_cap(st, cfg.logit_soft_cap)
      pt = jnp.exp(st - lse_s.at[slot][...][None, :])
      mask = common.tile_mask(
          qi * BLOCK_Q, ki * block_kv, BLOCK_Q, block_kv, causal=cfg.causal, offset=offset,
          kv_len=kv_len, kv_padded=kv_padded, kv_rows=True, window=cfg.sliding_window,
          q_seg=q_seg_s.at[slot][...][None, :] if has_segments else None, kv_seg=kv_seg)
      if mask is not None:
        pt = jnp.where(mask, pt, 0.0)
      dpt = _matmul(v_s, _t(dy_s.at[slot]), block_kv, BLOCK_Q)
      pt_s[...] = pt.astype(pt_s.dtype)
      dst = pt * (dpt - delta_s.at[slot][...][None, :])
      dst_s[...] = (dst if dcapt is None else dst * dcapt).astype(dst_s.dtype)
      plgpu.commit_smem()
      dv = dv + _matmul(pt_s, dy_s.at[slot], block_kv, h)
      dk = dk + _matmul(dst_s, q_s.at[slot], block_kv, h)
      return dk, dv

    init = (jnp.zeros((block_kv, h), jnp.float32), jnp.zeros((block_kv, h), jnp.float32))
    dk, dv = _consume(n_steps, nbuf, full, free, compute, init)
    # k's and v's tiles are free now (every wgmma reading them has finished): stage dk, dv there.
    k_s[...] = (dk * cfg.scale).astype(k_s.dtype)
    v_s[...] = dv.astype(v_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_s, dk_g.at[bi, kv_rows, hi, :])
    plgpu.copy_smem_to_gmem(v_s, dv_g.at[bi, kv_rows, hi, :])
    plgpu.wait_smem_to_gmem(0)


def backward(q, k, v, q_seg, kv_seg, lse, dy, delta, cfg: common.KernelConfig):
  """Flash backward (Mosaic GPU) for the ungated attention given dy = dO ⊙ act(gate).

  Same contract as ``flash_gpu.backward``: q, dy: (B, T, N, H); k, v: (B, S, K, H);
  lse, delta: (B, T, N) float32, delta = Σ_H dy ⊙ y; q_seg: (B, T), kv_seg: (B, S) or None.
  Returns dq (B, T, N, H) in q.dtype, dk, dv (B, S, K, H) in k.dtype / v.dtype.
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  group = n // kh
  block_kv = _block_kv(cfg, t, s, h, backward=True)
  tp, sp = common.round_up(t, BLOCK_Q), common.round_up(s, block_kv)
  has_segments = q_seg is not None
  static = dict(cfg=cfg, block_kv=block_kv, group=group, offset=s - t, kv_len=s,
                kv_padded=sp != s, has_segments=has_segments)
  # Padded query rows carry dy = 0, delta = 0 and q = 0 (so p = 1, finite): they add nothing.
  q_p, dy_p = common.pad_axis(q, 1, tp), common.pad_axis(dy.astype(q.dtype), 1, tp)
  lse_t = jnp.transpose(common.pad_axis(lse, 1, tp), (0, 2, 1))  # (B, N, T)
  delta_t = jnp.transpose(common.pad_axis(delta.astype(jnp.float32), 1, tp), (0, 2, 1))
  k_p, v_p = common.pad_axis(k, 1, sp), common.pad_axis(v, 1, sp)
  segments = ([common.pad_axis(q_seg.astype(jnp.int32), 1, tp),
               common.pad_axis(kv_seg.astype(jnp.int32), 1, sp)] if has_segments else [])
  ws = dict(num_threads=2, thread_name="wg", interpret=_interpret_params(cfg))

  # dq: one CTA per (q tile, query head, batch), streaming kv tiles up to the diagonal.
  nbuf = max(1, min(tiles.MGPU_SLOTS, sp // block_kv))
  dq = plgpu.kernel(
      functools.partial(_dq_kernel, nbuf=nbuf, **static),
      out_type=jax.ShapeDtypeStruct((b, tp, n, h), q.dtype),
      scratch_types=[
          _swizzled((BLOCK_Q, h), q.dtype),  # q, then dq
          _swizzled((BLOCK_Q, h), q.dtype),  # dy
          plgpu.SMEM((BLOCK_Q,), jnp.float32),  # lse
          plgpu.SMEM((BLOCK_Q,), jnp.float32),  # delta
          _swizzled((nbuf, block_kv, h), k.dtype),  # k slots
          _swizzled((nbuf, block_kv, h), v.dtype),  # v slots
          _swizzled((BLOCK_Q, block_kv), k.dtype),  # ds
          *([plgpu.SMEM((BLOCK_Q,), jnp.int32), plgpu.SMEM((nbuf, block_kv), jnp.int32)]
            if has_segments else []),
          plgpu.Barrier(num_arrivals=4 + has_segments, num_barriers=1),  # once (q side)
          plgpu.Barrier(num_arrivals=2 + has_segments, num_barriers=nbuf),  # full (TMA)
          plgpu.Barrier(num_arrivals=1, num_barriers=nbuf),  # free (consumer)
      ],
      grid=(tp // BLOCK_Q, n, b),
      grid_names=("q", "n", "b"),
      **ws,
  )(q_p, dy_p, lse_t, delta_t, k_p, v_p, *segments)

  # dk, dv: one CTA per (kv tile, kv head, batch), streaming (query head of the group, live
  # q tile) pairs.
  nbuf = max(1, min(tiles.MGPU_SLOTS, group * (tp // BLOCK_Q)))
  dk, dv = plgpu.kernel(
      functools.partial(_dkv_kernel, nbuf=nbuf, **static),
      out_type=[jax.ShapeDtypeStruct((b, sp, kh, h), k.dtype),
                jax.ShapeDtypeStruct((b, sp, kh, h), v.dtype)],
      scratch_types=[
          _swizzled((block_kv, h), k.dtype),  # k, then dk
          _swizzled((block_kv, h), v.dtype),  # v, then dv
          _swizzled((nbuf, BLOCK_Q, h), q.dtype),  # q slots
          _swizzled((nbuf, BLOCK_Q, h), q.dtype),  # dy slots
          plgpu.SMEM((nbuf, BLOCK_Q), jnp.float32),  # lse slots
          plgpu.SMEM((nbuf, BLOCK_Q), jnp.float32),  # delta slots
          _swizzled((block_kv, BLOCK_Q), q.dtype),  # pᵀ
          _swizzled((block_kv, BLOCK_Q), q.dtype),  # dsᵀ
          *([plgpu.SMEM((nbuf, BLOCK_Q), jnp.int32), plgpu.SMEM((block_kv,), jnp.int32)]
            if has_segments else []),
          plgpu.Barrier(num_arrivals=2 + has_segments, num_barriers=1),  # once (kv side)
          plgpu.Barrier(num_arrivals=4 + has_segments, num_barriers=nbuf),  # full (TMA)
          plgpu.Barrier(num_arrivals=1, num_barriers=nbuf),  # free (consumer)
      ],
      grid=(sp // block_kv, kh, b),
      grid_names=("kv", "h", "b"),
      **ws,
  )(k_p, v_p, q_p, dy_p, lse_t, delta_t, *segments)
  return dq[:, :t], dk[:, :s], dv[:, :s]

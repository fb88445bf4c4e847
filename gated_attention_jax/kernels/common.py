"""Configuration and tile-level helpers shared by the TPU and GPU flash kernels.

Dimension names: B batch, T query length, S key length, N query heads, K kv heads, H head_dim.
Query row ``i`` sits at absolute position ``i + S - T`` (ends aligned), key column ``j`` at ``j``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Smallest tile edge: Triton's dot needs >= 16, and 16 rows fill a bf16 TPU sublane tile.
MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes along T (``block_q*``) and S (``block_kv*``) for forward and backward kernels.

  None leaves a size to the impl: 128 x 128 on TPU, and on GPUs what ``tiles`` derives from the
  target's shared-memory and register budgets for the head_dim and dtype. The backward sizes
  default to the forward ones when those are given. Each size is capped at the next power of
  two of the (short) sequence it tiles, so tiny inputs do not pay for huge padded tiles.
  """

  block_q: int | None = None
  block_kv: int | None = None
  block_q_bwd: int | None = None
  block_kv_bwd: int | None = None

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if value is not None and (value < MIN_BLOCK or value & (value - 1)):
        raise ValueError(f"BlockSizes.{f.name} must be a power of two >= {MIN_BLOCK}, got {value}.")

  def forward(self, t: int, s: int, default: tuple[int, int] = (128, 128)) -> tuple[int, int]:
    """Effective (block_q, block_kv) for the forward pass on lengths T=t, S=s."""
    bq = default[0] if self.block_q is None else self.block_q
    bk = default[1] if self.block_kv is None else self.block_kv
    return _fit(bq, t), _fit(bk, s)

  def backward(self, t: int, s: int, default: tuple[int, int] = (128, 128)) -> tuple[int, int]:
    """Effective (block_q, block_kv) for the backward passes on lengths T=t, S=s."""
    bq = next(b for b in (self.block_q_bwd, self.block_q, default[0]) if b is not None)
    bk = next(b for b in (self.block_kv_bwd, self.block_kv, default[1]) if b is not None)
    return _fit(bq, t), _fit(bk, s)


def _fit(block: int, length: int) -> int:
  return min(block, max(MIN_BLOCK, pl.next_power_of_2(length)))


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static (hashable) settings of one kernel call; the custom_vjp's non-differentiable argument."""

  impl: str
  causal: bool
  scale: float
  gate_activation: str
  block_sizes: BlockSizes
  interpret: bool | pltpu.InterpretParams  # see api.gated_flash_attention
  sliding_window: int | None = None  # keys less than this many positions from the query
  logit_soft_cap: float | None = None  # cap · tanh(logits / cap) on the scaled logits


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, length: int) -> jax.Array:
  """Zero-pads ``x`` along ``axis`` up to ``length``."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pad)


def live_kv_blocks(qi, block_q: int, block_kv: int, offset: int, num_kv_blocks: int, *,
                   causal: bool, window: int | None):
  """kv tiles [start, stop) that q tile ``qi`` must visit: those the causal / window band
  ``row + offset - window < col <= row + offset`` (``col < row + offset + window`` without
  causal) reaches; (0, num_kv_blocks) for neither."""
  first_row, last_row = qi * block_q + offset, (qi + 1) * block_q - 1 + offset
  start, stop = 0, num_kv_blocks
  if causal:
    stop = jnp.clip(last_row // block_kv + 1, 0, num_kv_blocks)
  elif window is not None:
    stop = jnp.clip((last_row + window - 1) // block_kv + 1, 0, num_kv_blocks)
  if window is not None:
    start = jnp.clip((first_row - window + 1) // block_kv, 0, num_kv_blocks)
  return start, stop


def live_q_blocks(ki, block_q: int, block_kv: int, offset: int, num_q_blocks: int, *,
                  causal: bool, window: int | None):
  """q tiles [start, stop) that see kv tile ``ki`` (the same band as ``live_kv_blocks``)."""
  first_col, last_col = ki * block_kv - offset, (ki + 1) * block_kv - 1 - offset
  start, stop = 0, num_q_blocks
  if causal:
    start = jnp.clip(first_col // block_q, 0, num_q_blocks)
  elif window is not None:
    start = jnp.clip((first_col - window + 1) // block_q, 0, num_q_blocks)
  if window is not None:
    stop = jnp.clip((last_col + window - 1) // block_q + 1, 0, num_q_blocks)
  return start, stop


def clamp_block(i, start, stop, num_blocks: int):
  """Block index ``i`` clamped into the live [start, stop) (to a valid block when that is
  empty): index maps of skipped tiles repeat a live tile's index, so no DMA is issued for them."""
  lo = jnp.minimum(start, num_blocks - 1)
  return jnp.clip(i, lo, jnp.maximum(stop - 1, lo))


def soft_cap(s, cap: float | None):
  """(cap · tanh(s / cap), its derivative 1 - tanh²) of a float32 logit tile; (s, None) for no
  cap. The backward multiplies the score gradients by the derivative."""
  if cap is None:
    return s, None
  t = jnp.tanh(s / cap)
  return cap * t, 1.0 - t * t


def online_softmax_step(s, m_prev):
  """One online-softmax step of flash attention over a masked logit tile.

  s: (block_q, block_kv) float32 logits, -inf where masked; m_prev: the running row
  max, (block_q,) or (block_q, 1). Returns (m_new, p = exp(s - m_new), alpha =
  exp(m_prev - m_new)) in m_prev's layout; rows that see no key yet keep m = -inf
  and get p = 0.
  """
  keep = m_prev.ndim == 2
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=keep))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet
  p = jnp.exp(s - (m_safe if keep else m_safe[:, None]))
  return m_new, p, jnp.exp(m_prev - m_safe)


def tile_mask(q_start, kv_start, block_q: int, block_kv: int, *, causal: bool, offset: int,
              kv_len: int, kv_padded: bool, q_seg=None, kv_seg=None, kv_rows: bool = False,
              window: int | None = None):
  """Boolean (block_q, block_kv) visibility mask of one tile, or None if everything is visible.

  q_seg: (block_q, 1) and kv_seg: (1, block_kv) segment ids, or None. kv_rows=True gives
  the transposed (block_kv, block_q) mask, with q_seg (1, block_q) and kv_seg (block_kv, 1).
  window: keys less than ``window`` positions from the query (``reference.make_mask``).
  """
  mask = None

  def _and(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if causal or kv_padded or window is not None:
    shape = (block_kv, block_q) if kv_rows else (block_q, block_kv)
    q_axis, kv_axis = (1, 0) if kv_rows else (0, 1)
    kv_pos = kv_start + jax.lax.broadcasted_iota(jnp.int32, shape, kv_axis)
    q_pos = q_start + offset + jax.lax.broadcasted_iota(jnp.int32, shape, q_axis)
    if causal:
      mask = _and(mask, kv_pos <= q_pos)
    if window is not None:
      mask = _and(mask, kv_pos > q_pos - window)
      if not causal:
        mask = _and(mask, kv_pos < q_pos + window)
    if kv_padded:
      mask = _and(mask, kv_pos < kv_len)
  if q_seg is not None:
    mask = _and(mask, q_seg == kv_seg)
  return mask

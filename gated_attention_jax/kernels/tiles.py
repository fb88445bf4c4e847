"""The GPU kernels' default tiles and what they accept, from the target's shared memory and registers.

One place for both GPU impls (the TPU kernel's defaults are ``BlockSizes``'s 128 x 128, which fit
VMEM at every head_dim the API accepts):

* ``pallas_mgpu`` (Mosaic GPU, Hopper): every SMEM buffer is allocated explicitly, so
  ``mgpu_smem_bytes`` is the kernel's exact scratch size; a shape whose tiles exceed Hopper's
  232,448 bytes per block is refused before compiling. 64-row q tiles (one consumer warpgroup,
  wgmma M = 64); kv tiles from ``mgpu_block_kv``, two pipeline slots.
* ``pallas_gpu`` (Triton-style Pallas): Triton decides its shared memory itself; the tiles here
  keep the float32 accumulators at <= 64 registers per thread (block_q · H / (32 · num_warps))
  and the score tile at <= 32, so the 255-register budget is not spilled, and the operand tiles
  of one pipeline stage under half of a Hopper block's shared memory.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# shared_memory_per_block_optin of sm_90 (gated_attention_jax/targets/h100_sxm.txtpb, h200.txtpb).
HOPPER_SMEM_BYTES = 232_448
MGPU_BLOCK_Q = 64  # rows per consumer warpgroup: wgmma's M
MGPU_SLOTS = 2  # TMA pipeline depth of the streamed tiles
MGPU_MIN_JAX = (0, 11)
MGPU_DTYPES = (jnp.bfloat16, jnp.float16)
GPU_MAX_HEAD_DIM = 256
# The largest head_dim at which no Mosaic GPU kernel spilled registers on H100 (kernel_report:
# none at 64 or 128; 328-1,344 B at 256): ``impl="auto"`` prefers Triton above it.
MGPU_SPILL_FREE_HEAD_DIM = 128


def jax_version() -> tuple[int, int]:
  major, minor = jax.__version__.split(".")[:2]
  return int(major), int(minor)


# ----------------------------------------------------------------------------- Mosaic GPU


def mgpu_block_kv(head_dim: int, backward: bool = False) -> int:
  """Default kv tile of the Mosaic GPU kernels: 128 rows in the forward at head_dim 64, else 64.

  The consumer warpgroup's 128 threads hold the float32 accumulator (64 · H / 128 registers
  each) and the score tile (64 · block_kv / 128) within ptxas's 255: at H = 128 a 128-row kv
  tile spilled (kernel_report), a 64-row one does not. The dk/dv kernel holds two (block_kv, H)
  accumulators, so its kv tile is wgmma's minimum M, 64.
  """
  return 128 if head_dim <= 64 and not backward else 64


def mgpu_smem_bytes(kernel: str, head_dim: int, block_kv: int, itemsize: int, *,
                    gate: str | None = None, segments: bool = False,
                    slots: int = MGPU_SLOTS) -> int:
  """Bytes of SMEM scratch that ``flash_mgpu``'s ``kernel`` ("fwd", "dq", "dkv") allocates."""
  bq, h, bk, e = MGPU_BLOCK_Q, head_dim, block_kv, itemsize
  if kernel == "fwd":  # q (reused for y), o (also holds an elementwise gate), k/v slots, p, lse
    total = 2 * bq * h * e + slots * 2 * bk * h * e + bq * bk * e + bq * 4
    total += bq * e if gate == "headwise" else 0
    total += (bq + slots * bk) * 4 if segments else 0
  elif kernel == "dq":  # q (reused for dq), dy, lse, delta, k/v slots, ds
    total = 2 * bq * h * e + 2 * bq * 4 + slots * 2 * bk * h * e + bq * bk * e
    total += (bq + slots * bk) * 4 if segments else 0
  elif kernel == "dkv":  # k, v (reused for dk, dv), q/dy/lse/delta slots, pᵀ, dsᵀ
    total = 2 * bk * h * e + slots * (2 * bq * h * e + 2 * bq * 4) + 2 * bk * bq * e
    total += (slots * bq + bk) * 4 if segments else 0
  else:
    raise ValueError(f"kernel must be 'fwd', 'dq' or 'dkv', got {kernel!r}.")
  return total


def mgpu_unsupported(head_dim: int, dtype, block_kv: int | None, *, gate: str | None,
                     segments: bool) -> str | None:
  """Why ``pallas_mgpu`` cannot serve these inputs (None if it can)."""
  if jax_version() < MGPU_MIN_JAX:
    return (f"impl='pallas_mgpu' needs jax >= {'.'.join(map(str, MGPU_MIN_JAX))} (Mosaic GPU's "
            f"layout inference); this is jax {jax.__version__}. Upgrade jax, or use "
            "impl='pallas_gpu' or 'xla'.")
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in MGPU_DTYPES]:
    return (f"impl='pallas_mgpu' takes bfloat16 or float16 inputs (wgmma would run float32 as "
            f"tf32), got {jnp.dtype(dtype).name}; use impl='pallas_gpu' or 'xla' for float32.")
  if head_dim % 64 or head_dim > GPU_MAX_HEAD_DIM:
    return (f"impl='pallas_mgpu' needs head_dim a multiple of 64 up to {GPU_MAX_HEAD_DIM} "
            f"(128-byte swizzled wgmma tiles; larger ones exceed shared memory), got "
            f"{head_dim}; use impl='pallas_gpu' or 'xla'.")
  for kernel in ("fwd", "dq", "dkv"):
    bk = (mgpu_block_kv(head_dim, backward=kernel != "fwd") if block_kv is None
          else max(64, block_kv))
    need = mgpu_smem_bytes(kernel, head_dim, bk, jnp.dtype(dtype).itemsize, gate=gate,
                           segments=segments)
    if need > HOPPER_SMEM_BYTES:
      return (f"impl='pallas_mgpu' with head_dim {head_dim} and block_kv {bk} needs {need:,} "
              f"bytes of shared memory in its {kernel} kernel; H100/H200 have "
              f"{HOPPER_SMEM_BYTES:,} per block. Use a smaller BlockSizes.block_kv.")
  return None


# ----------------------------------------------------------------------------- Triton-style


@dataclasses.dataclass(frozen=True)
class TritonTiles:
  """Tiles and launch parameters of one ``flash_gpu`` kernel."""

  block_q: int
  block_kv: int
  num_warps: int
  num_stages: int


def triton_tiles(head_dim: int, kernel: str) -> TritonTiles:
  """Default tiles of ``flash_gpu``'s forward ("fwd") or backward ("bwd": dq and dk/dv) kernels
  (the same for bf16 and float32 inputs: the accumulators are float32 either way).

  Registers per thread of the float32 accumulators: block_q · H / (32 · num_warps) in the
  forward and dq, 2 · block_kv · H / (32 · num_warps) (dk and dv) in dk/dv: at most 64 here.
  """
  warps = 8 if head_dim >= 128 else 4
  if kernel == "fwd":  # a 128 x 128 score tile on 4 warps alone is 128 registers: it spilled
    return TritonTiles(128 if head_dim <= 128 else 64, 64, warps, 2)
  if kernel == "bwd":
    block = 64 if head_dim <= 128 else 32
    return TritonTiles(block, block, warps, 2)
  raise ValueError(f"kernel must be 'fwd' or 'bwd', got {kernel!r}.")


def triton_unsupported(head_dim: int) -> str | None:
  """Why ``pallas_gpu`` cannot serve this head_dim (None if it can)."""
  if head_dim > GPU_MAX_HEAD_DIM or head_dim < 16 or head_dim & (head_dim - 1):
    return (f"impl='pallas_gpu' needs head_dim a power of two in [16, {GPU_MAX_HEAD_DIM}] "
            f"(Triton's tile shapes; larger tiles exceed shared memory), got {head_dim}; use "
            "impl='xla'.")
  return None

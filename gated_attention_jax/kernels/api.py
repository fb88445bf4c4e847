"""``gated_flash_attention``: argument checks, backend dispatch and the shared custom_vjp.

Dimension names: B batch, T query length, S key length, N query heads, K kv heads, H head_dim.
The kernel families (``flash_tpu``, ``flash_gpu``, ``flash_mgpu``) expose the same two functions,
``forward(q, k, v, gate, q_seg, kv_seg, cfg, save_residuals)`` and
``backward(q, k, v, q_seg, kv_seg, lse, dy, delta, cfg)``; one custom_vjp wires any of them.
``impl="auto"`` picks by the platform being lowered for (``platform.target_platform``): TPU ->
``pallas_tpu``; a Hopper GPU (H100/H200) -> ``pallas_mgpu`` where it serves the inputs (jax >=
0.11, bf16/f16, head_dim a multiple of 64 up to 256) and its registers do not spill (head_dim <=
128), else ``pallas_gpu`` (any GPU; head_dim a power of two up to 256; first at head_dim 256,
where Mosaic GPU spills), else ``xla``. An explicit impl that cannot serve the inputs is refused
with the reason before anything compiles (``tiles``).
The gate is applied in the forward kernel's epilogue; the backward's preprocessing pass turns
dO into dy = dO ⊙ act(g), dgate = dO ⊙ y ⊙ act'(g) (summed over H when headwise) and
delta = Σ_H dy ⊙ y, from the saved ungated output y — the gate is never divided out.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from gated_attention_jax.kernels import (common, flash_gpu, flash_mgpu, flash_tpu, platform,
                                         reference, tiles)

IMPLS = ("auto", "pallas_tpu", "pallas_gpu", "pallas_mgpu", "xla")
_KERNELS = {"pallas_tpu": flash_tpu, "pallas_gpu": flash_gpu, "pallas_mgpu": flash_mgpu}
# Off its native backend a Pallas impl runs in interpret mode (cfg.interpret = True): pallas_mgpu
# then uses the Mosaic GPU interpreter (``flash_mgpu._interpret_params``), the others
# ``pallas_call(interpret=True)`` (the kernel body as XLA ops on the host); pallas_tpu also takes a
# ``pltpu.InterpretParams`` (jax's TPU emulator).
_NATIVE_BACKEND = {"pallas_tpu": "tpu", "pallas_gpu": "gpu", "pallas_mgpu": "gpu"}


def gated_flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gate: jax.Array | None,
    *,
    causal: bool = True,
    segment_ids: jax.Array | Sequence[jax.Array] | None = None,
    scale: float | None = None,
    gate_activation: str = "sigmoid",
    sliding_window: int | None = None,
    logit_soft_cap: float | None = None,
    impl: str = "auto",
    block_sizes: common.BlockSizes | None = None,
    interpret: bool | pltpu.InterpretParams | None = None,
) -> jax.Array:
  """softmax(soft_cap(scale · q kᵀ) + mask) v ⊙ act(gate).

  Args:
    q: (B, T, N, H) queries. k, v: (B, S, K, H) keys and values, N a multiple of K (GQA).
    gate: (B, T, N, H) elementwise gate, (B, T, N) headwise gate, or None (ungated).
    causal: query i sits at position S - T + i and sees keys j <= S - T + i.
    segment_ids: (B, T) int (needs T == S) or a pair ((B, T), (B, S)); tokens only attend
      within equal ids. Rows that see no key output zeros.
    scale: logit scale, default 1 / sqrt(H).
    gate_activation: one of ``reference.GATE_ACTIVATIONS``.
    sliding_window: w keeps the keys less than w positions from the query (with ``causal``:
      the w keys ending at it); tiles outside the window are skipped. None: no window.
    logit_soft_cap: cap · tanh(logits / cap) on the scaled logits, before the mask (Gemma 2);
      the backward multiplies the score gradients by 1 - tanh². None: no cap.
    impl: "pallas_tpu", "pallas_gpu", "pallas_mgpu" (Mosaic GPU, Hopper), "xla" or "auto" (see
      the module docstring). A Pallas impl on a backend it was not written for runs in
      interpret mode (see ``interpret``).
    block_sizes: kernel tile sizes (Pallas impls only).
    interpret: run a Pallas impl in its interpreter (True) or compile it (False). None: compile
      when the platform being lowered for is the impl's own — the abstract mesh's device inside
      ``aot.lowering_for`` (ahead-of-time compiles for a TPU or GPU from a CPU machine), else
      jax's default backend — and interpret otherwise. True runs pallas_tpu and pallas_gpu in
      Pallas' interpreter (the kernel body as XLA ops over the grid; uninitialised scratch and
      padding read as NaN) and pallas_mgpu in the Mosaic GPU interpreter. For pallas_tpu a
      ``pltpu.InterpretParams`` runs jax's TPU emulator instead (VMEM, DMAs and semaphores
      simulated with host callbacks; it can shuffle parallel grid axes and detect races;
      ~3x slower).
  Returns:
    (B, T, N, H) array in q.dtype.
  """
  q_seg, kv_seg = _check_args(q, k, v, gate, segment_ids, gate_activation, impl)
  if sliding_window is not None and (not isinstance(sliding_window, int)
                                     or isinstance(sliding_window, bool) or sliding_window <= 0):
    raise ValueError(f"sliding_window must be None or a positive int, got {sliding_window!r}.")
  if logit_soft_cap is not None and not 0 < logit_soft_cap < math.inf:
    raise ValueError(f"logit_soft_cap must be None or a finite number > 0, got"
                     f" {logit_soft_cap!r}.")
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  features = dict(sliding_window=sliding_window, logit_soft_cap=logit_soft_cap)
  impl = resolve_impl(impl, q, gate, q_seg, block_sizes)
  if impl == "xla":
    return reference.gated_attention(q, k, v, gate, causal=causal, scale=scale,
                                     gate_activation=gate_activation,
                                     q_segment_ids=q_seg, kv_segment_ids=kv_seg, **features)
  cfg = common.KernelConfig(
      impl=impl, causal=bool(causal), scale=scale, gate_activation=gate_activation,
      block_sizes=block_sizes or common.BlockSizes(),
      interpret=_interpret_mode(impl, interpret), sliding_window=sliding_window,
      logit_soft_cap=None if logit_soft_cap is None else float(logit_soft_cap))
  return _flash(cfg, q, k, v, gate, q_seg, kv_seg)


def _interpret_mode(impl: str, interpret) -> bool | pltpu.InterpretParams:
  """``interpret`` checked and resolved for ``impl`` (see ``gated_flash_attention``)."""
  if interpret is None:
    return platform.target_platform() != _NATIVE_BACKEND[impl]
  if isinstance(interpret, bool) or (impl == "pallas_tpu" and
                                     isinstance(interpret, pltpu.InterpretParams)):
    return interpret
  allowed = "None, True, False" + (" or a pltpu.InterpretParams" if impl == "pallas_tpu" else "")
  raise ValueError(f"interpret must be {allowed} for impl={impl!r}, got {interpret!r}.")


def resolve_impl(impl: str, q: jax.Array, gate: jax.Array | None = None,
                 segment_ids: jax.Array | None = None,
                 block_sizes: common.BlockSizes | None = None) -> str:
  """The impl ``gated_flash_attention`` runs for these inputs on the platform being lowered for
  (``"auto"`` resolved); raises ValueError with the reason when ``impl`` cannot serve them."""
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}.")
  gate_kind = None if gate is None else ("elementwise" if gate.ndim == 4 else "headwise")
  has_segments = segment_ids is not None
  if impl == "auto":
    impl = _auto_impl(platform.target_platform(), q, gate_kind, has_segments, block_sizes)
  reason = _unsupported(impl, q, gate_kind, has_segments, block_sizes)
  if reason:
    raise ValueError(reason)
  return impl


def _unsupported(impl: str, q, gate_kind, has_segments: bool,
                 block_sizes: common.BlockSizes | None) -> str | None:
  """Why ``impl`` cannot serve these inputs on its target (None if it can)."""
  h = q.shape[-1]
  if impl == "pallas_mgpu":
    block_kv = None if block_sizes is None else (block_sizes.block_kv_bwd or block_sizes.block_kv)
    return tiles.mgpu_unsupported(h, q.dtype, block_kv, gate=gate_kind, segments=has_segments)
  if impl == "pallas_gpu":
    return tiles.triton_unsupported(h)
  return None


def _auto_impl(target: str, q, gate_kind, has_segments: bool, block_sizes) -> str:
  if target == "tpu":
    return "pallas_tpu"
  if target != "gpu":
    return "xla"
  candidates = ("pallas_gpu",)
  if platform.is_hopper(platform.target_device_kind()):
    # Mosaic GPU first where its kernels keep within 255 registers (head_dim <= 128); at head_dim
    # 256 they spill 328-1,344 B and Triton's do not (kernel_report), so Triton goes first.
    mgpu_first = q.shape[-1] <= tiles.MGPU_SPILL_FREE_HEAD_DIM
    candidates = ("pallas_mgpu", "pallas_gpu") if mgpu_first else ("pallas_gpu", "pallas_mgpu")
  for impl in candidates:
    if _unsupported(impl, q, gate_kind, has_segments, block_sizes) is None:
      return impl
  return "xla"


def _check_args(q, k, v, gate, segment_ids, gate_activation, impl):
  """Raises ValueError on bad arguments; returns (q_seg, kv_seg) as int32 arrays or Nones."""
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}.")
  if gate_activation not in reference.GATE_ACTIVATIONS:
    raise ValueError(
        f"gate_activation must be one of {reference.GATE_ACTIVATIONS}, got {gate_activation!r}.")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have shape (batch, seq, heads, head_dim), got {x.shape}.")
    if x.dtype not in (jnp.float32, jnp.bfloat16):
      raise ValueError(f"{name}.dtype must be float32 or bfloat16, got {x.dtype}.")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have equal shapes (B, S, K, H), got {k.shape} and {v.shape}.")
  b, t, n, h = q.shape
  if k.shape[0] != b or k.shape[3] != h:
    raise ValueError(f"k/v (B, S, K, H) = {k.shape} must match q (B, T, N, H) = {q.shape} in "
                     "B and H.")
  if n % k.shape[2]:
    raise ValueError(f"q heads N={n} must be a multiple of k/v heads K={k.shape[2]}.")
  if gate is not None and gate.shape not in ((b, t, n, h), (b, t, n)):
    raise ValueError(f"gate must have shape (B, T, N, H)={(b, t, n, h)} (elementwise) or "
                     f"(B, T, N)={(b, t, n)} (headwise), got {gate.shape}.")
  if segment_ids is None:
    return None, None
  s = k.shape[1]
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError("segment_ids must be one (B, T) array or a pair (q_ids (B, T), "
                       f"kv_ids (B, S)), got a sequence of {len(segment_ids)}.")
    q_seg, kv_seg = segment_ids
  else:
    if t != s:
      raise ValueError(f"a single segment_ids array needs T == S (got T={t}, S={s}); pass a "
                       "pair (q_segment_ids, kv_segment_ids).")
    q_seg = kv_seg = segment_ids
  for name, x, shape in (("q segment_ids", q_seg, (b, t)), ("kv segment_ids", kv_seg, (b, s))):
    if x is None or x.shape != shape or not jnp.issubdtype(x.dtype, jnp.integer):
      got = "None" if x is None else f"{x.dtype}{list(x.shape)}"
      raise ValueError(f"{name} must be an integer array of shape {shape}, got {got}.")
  return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: common.KernelConfig, q, k, v, gate, q_seg, kv_seg):
  return _KERNELS[cfg.impl].forward(q, k, v, gate, q_seg, kv_seg, cfg, save_residuals=False)[0]


def _flash_fwd(cfg: common.KernelConfig, q, k, v, gate, q_seg, kv_seg):
  o, y, lse = _KERNELS[cfg.impl].forward(q, k, v, gate, q_seg, kv_seg, cfg,
                                          save_residuals=True)
  return o, (q, k, v, gate, q_seg, kv_seg, y, lse)


def _flash_bwd(cfg: common.KernelConfig, residuals, do):
  q, k, v, gate, q_seg, kv_seg, y, lse = residuals
  dy, dgate, delta = _gate_backward(do, y, gate, cfg.gate_activation)
  dq, dk, dv = _KERNELS[cfg.impl].backward(q, k, v, q_seg, kv_seg, lse, dy, delta, cfg)
  return dq, dk, dv, dgate, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _gate_backward(do, y, gate, activation: str):
  """Backward preprocessing: (dy (B, T, N, H) in y.dtype, dgate or None, delta (B, T, N) f32)."""
  do32, y32 = do.astype(jnp.float32), y.astype(jnp.float32)
  if gate is None:
    dy, dgate = do32, None
  else:
    act, dact = reference.activation_and_grad(gate, activation)
    if gate.ndim == 4:
      dy, dgate = do32 * act, do32 * y32 * dact
    else:
      dy, dgate = do32 * act[..., None], jnp.sum(do32 * y32, axis=-1) * dact
    dgate = dgate.astype(gate.dtype)
  delta = jnp.sum(dy * y32, axis=-1)
  return dy.astype(y.dtype), dgate, delta

"""Attention math, separate from the layer that owns the parameters.

`attend` dispatches on an implementation string:
  - "xla": a plain einsum/softmax reference (float32 logits and softmax); the only
    path that can also return the attention probabilities (for analysis).
  - "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (GPU only).
  - "pallas": `gated_attention_jax.kernels.gated_flash_attention`, which can also
    fuse a G1 output gate into the kernel's epilogue: the Pallas GPU kernel on GPUs,
    the Pallas TPU kernel elsewhere (in TPU interpret mode on CPU: slow, for tests).

Masks are built from token indices (causal: key index <= query index, with the
queries offset by `q_offset` when they continue a KV cache) and segment ids
(packed documents: keys and queries must share a segment id).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from gated_attention_jax import gate as gate_lib
from gated_attention_jax import kernels
from gated_attention_jax import layers

ATTENTION_IMPLS = ("xla", "cudnn", "pallas")
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def check_impl(impl: str) -> None:
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")


def make_mask(batch: int, q_len: int, kv_len: int, *, causal: bool,
              q_offset: jax.Array | int = 0,
              q_segment_ids: Optional[jax.Array] = None,
              kv_segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """Boolean mask `(B, 1, T, S)`: True where query t may attend to key s."""
  q_idx = jnp.arange(q_len)[:, None] + q_offset
  kv_idx = jnp.arange(kv_len)[None, :]
  mask = jnp.ones((q_len, kv_len), bool)
  if causal:
    mask = kv_idx <= q_idx
  mask = jnp.broadcast_to(mask, (batch, 1, q_len, kv_len))
  if q_segment_ids is not None:
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    mask = mask & same[:, None]
  return mask


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                  scale: float) -> tuple[jax.Array, jax.Array]:
  """Reference softmax attention with GQA by grouping (no repeated K/V).

  Args:
    q: `(B, T, N, H)`; k, v: `(B, S, K, H)` with N a multiple of K.
    mask: `(B, 1, T, S)` boolean.
  Returns:
    out `(B, T, N, H)` in q's dtype and probabilities `(B, N, T, S)` in float32 (or wider).
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
  acc = jnp.promote_types(q.dtype, jnp.float32)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=acc)
  logits = logits * scale
  logits = jnp.where(mask[:, :, None], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v,
                   preferred_element_type=acc)
  return out.reshape(b, t, n, h).astype(q.dtype), probs.reshape(b, n, t, -1)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                    mask: Optional[jax.Array], scale: float,
                    implementation: str = "cudnn") -> jax.Array:
  """`jax.nn.dot_product_attention`; a plain causal call when no other mask is needed."""
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=causal and mask is None, scale=scale,
      implementation=implementation)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str, scale: float,
           causal: bool = True, q_offset: jax.Array | int = 0,
           q_segment_ids: Optional[jax.Array] = None,
           kv_segment_ids: Optional[jax.Array] = None,
           fused_gate: Optional[jax.Array] = None, gate_activation: str = "sigmoid",
           return_probs: bool = False) -> tuple[jax.Array, Optional[jax.Array]]:
  """Softmax attention, optionally with a fused G1 gate.

  Args:
    q: `(B, T, N, H)`; k, v: `(B, S, K, H)`.
    q_offset: index of the first query among the keys (KV-cache decoding); only
      the "xla" path supports a non-zero offset.
    q_segment_ids, kv_segment_ids: `(B, T)`, `(B, S)` or None.
    fused_gate: G1 gate logits `(B, T, N, H)` or `(B, T, N)`; the output is then
      attention ⊙ act(fused_gate). Fused in the kernel for "pallas", applied
      after attention otherwise.
    return_probs: also return `(B, N, T, S)` probabilities ("xla" only).
  Returns:
    `(out (B, T, N, H), probs or None)`.
  """
  check_impl(impl)
  b, t = q.shape[:2]
  s = k.shape[1]
  decoding = not (isinstance(q_offset, int) and q_offset == 0)
  if return_probs and impl != "xla":
    raise ValueError(f"attention probabilities need attention_impl='xla', got {impl!r}")
  if decoding and impl != "xla":
    impl = "xla"  # cache-offset masks are built explicitly; kernels see full sequences
  probs = None
  if impl == "pallas":
    segment_ids = None if q_segment_ids is None else (q_segment_ids, kv_segment_ids)
    kernel = "pallas_gpu" if jax.default_backend() == "gpu" else "pallas_tpu"
    out = kernels.gated_flash_attention(q, k, v, fused_gate, causal=causal,
                                        segment_ids=segment_ids, scale=scale,
                                        gate_activation=gate_activation, impl=kernel)
    return out, None
  if impl == "cudnn" and not decoding:
    mask = None
    if q_segment_ids is not None:
      mask = make_mask(b, t, s, causal=causal, q_segment_ids=q_segment_ids,
                       kv_segment_ids=kv_segment_ids)
    out = cudnn_attention(q, k, v, causal=causal, mask=mask, scale=scale)
  else:
    mask = make_mask(b, t, s, causal=causal, q_offset=q_offset,
                     q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    out, probs = xla_attention(q, k, v, mask, scale)
  if fused_gate is not None:
    scores = gate_lib.activate(fused_gate.astype(layers.accum_dtype(out.dtype)), gate_activation)
    out = gate_lib.combine(out, scores, "multiply")
  return out, (probs if return_probs else None)

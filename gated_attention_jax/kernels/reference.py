"""Pure-jnp gated attention: the ``impl="xla"`` path and the source of the gate activations.

Dimension names: B batch, T query length, S key length, N query heads, K kv heads, H head_dim.
Softmax runs in float32; matmuls accumulate in float32. Rows that see no key output zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GATE_ACTIVATIONS = ("sigmoid", "silu", "ns_sigmoid", "identity")


def activation_and_grad(x: jax.Array, name: str) -> tuple[jax.Array, jax.Array]:
  """(act(x), act'(x)) in float32; used by the kernels' epilogue and backward preprocessing."""
  x = x.astype(jnp.float32)
  if name == "identity":
    return x, jnp.ones_like(x)
  s = jax.nn.sigmoid(x)
  ds = s * (1.0 - s)
  if name == "sigmoid":
    return s, ds
  if name == "ns_sigmoid":
    return 0.5 + 0.5 * s, 0.5 * ds
  if name == "silu":
    return x * s, s + x * ds
  raise ValueError(f"gate_activation must be one of {GATE_ACTIVATIONS}, got {name!r}.")


def attention_mask(t: int, s: int, *, causal: bool, q_segment_ids: jax.Array | None,
                   kv_segment_ids: jax.Array | None) -> jax.Array:
  """Boolean visibility mask of shape (B or 1, T, S); query i sits at position i + S - T."""
  mask = jnp.ones((1, t, s), bool)
  if causal:
    rows = jnp.arange(t)[:, None] + (s - t)
    mask = mask & (jnp.arange(s)[None, :] <= rows)[None]
  if q_segment_ids is not None:
    mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  return mask


def gated_attention(q: jax.Array, k: jax.Array, v: jax.Array, gate: jax.Array | None, *,
                    causal: bool, scale: float, gate_activation: str,
                    q_segment_ids: jax.Array | None = None,
                    kv_segment_ids: jax.Array | None = None) -> jax.Array:
  """softmax(scale·q kᵀ + mask) v ⊙ act(gate), differentiable by autodiff.

  q: (B, T, N, H); k, v: (B, S, K, H) with N % K == 0; gate: (B, T, N, H), (B, T, N) or None;
  segment ids: (B, T) and (B, S) int or None. Returns (B, T, N, H) in q.dtype.
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  mask = attention_mask(t, s, causal=causal, q_segment_ids=q_segment_ids,
                        kv_segment_ids=kv_segment_ids)[:, None, None]
  # Double where: fully masked rows give p = 0 and finite gradients instead of NaN.
  logits = jnp.where(mask, logits, -1e30)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(logits - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0.0, 1.0, denom)
  y = jnp.einsum("bkgts,bskh->btkgh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  y = y.reshape(b, t, n, h)
  if gate is not None:
    act = activation_and_grad(gate, gate_activation)[0]
    y = y * (act if gate.ndim == 4 else act[..., None])
  return y.astype(q.dtype)

"""Pure-jnp gated attention: the one reference every attention path is checked against.

`make_mask` is the one mask builder (causal with an explicit query offset, sliding windows,
packed segments); `attention` the one softmax attention (GQA by grouping, an optional logit soft
cap, optionally returning the probabilities), used by the layer's "xla" path (`attention_ops.xla_attention`) and by the
kernels' reference `gated_attention`; `GATE_ACTIVATIONS` the one table of gate activations
(`activation`, and `activation_and_grad` for the kernels' epilogue and backward).

Dimension names: B batch, T query length, S key length, N query heads, K kv heads, G = N / K,
H head_dim. Logits, softmax and matmul accumulation run in float32, or the inputs' dtype when
wider (float64 tests). Rows that see no key output zeros (and have finite gradients).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _sigmoid_grad(x: jax.Array) -> jax.Array:
  s = jax.nn.sigmoid(x)
  return s * (1.0 - s)


# name: (act, act'), elementwise.
_ACTIVATIONS: dict[str, tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array], jax.Array]]] = {
    "sigmoid": (jax.nn.sigmoid, _sigmoid_grad),
    "silu": (jax.nn.silu, lambda x: jax.nn.sigmoid(x) + x * _sigmoid_grad(x)),
    "ns_sigmoid": (lambda x: 0.5 + 0.5 * jax.nn.sigmoid(x), lambda x: 0.5 * _sigmoid_grad(x)),
    # 2·sigmoid: 1 at zero logits, so a zero-initialised gate starts as the identity (retrofits)
    "2sigmoid": (lambda x: 2.0 * jax.nn.sigmoid(x), lambda x: 2.0 * _sigmoid_grad(x)),
    "identity": (lambda x: x, jnp.ones_like),
}
GATE_ACTIVATIONS = tuple(_ACTIVATIONS)


def _lookup(name: str, field: str):
  if name not in _ACTIVATIONS:
    raise ValueError(f"{field} must be one of {GATE_ACTIVATIONS}, got {name!r}")
  return _ACTIVATIONS[name]


def activation(x: jax.Array, name: str, field: str = "gate_activation") -> jax.Array:
  """The gate activation `name` of x, elementwise, in x's dtype (`field` names the setting in
  the error for an unknown name)."""
  return _lookup(name, field)[0](x)


def activation_and_grad(x: jax.Array, name: str) -> tuple[jax.Array, jax.Array]:
  """(act(x), act'(x)) in float32; used by the kernels' epilogue and backward preprocessing."""
  act, grad = _lookup(name, "gate_activation")
  x = x.astype(jnp.float32)
  return act(x), grad(x)


def make_mask(batch: int, q_len: int, kv_len: int, *, causal: bool,
              q_offset: jax.Array | int = 0,
              q_segment_ids: jax.Array | None = None,
              kv_segment_ids: jax.Array | None = None,
              sliding_window: int | None = None) -> jax.Array:
  """Boolean mask `(B, 1, T, S)`: True where query t may attend to key s.

  q_offset: the key index of the first query, a scalar or per row `(B,)` (0 for a full
    sequence, the cache length when decoding, S - T for the kernels' end-aligned queries).
  Segment ids `(B, T)` and `(B, S)`: queries see only keys of their own segment.
  sliding_window: w keeps the keys less than w positions from the query (Gemma 2/3's
    `q - w < s < q + w`): with `causal`, the w keys ending at the query.
  """
  q_idx = jnp.arange(q_len)[None, :, None] + jnp.reshape(jnp.asarray(q_offset), (-1, 1, 1))
  kv_idx = jnp.arange(kv_len)[None, None, :]
  mask = kv_idx <= q_idx if causal else jnp.ones((1, q_len, kv_len), bool)
  if sliding_window is not None:
    mask = mask & (kv_idx > q_idx - sliding_window) & (kv_idx < q_idx + sliding_window)
  mask = jnp.broadcast_to(mask[:, None], (batch, 1, q_len, kv_len))
  if q_segment_ids is not None:
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    mask = mask & same[:, None]
  return mask


def soft_cap(logits: jax.Array, cap: float | None) -> jax.Array:
  """cap · tanh(logits / cap) (Gemma 2's attention-logit soft cap); logits unchanged for None."""
  return logits if cap is None else cap * jnp.tanh(logits / cap)


def attention_mask(t: int, s: int, *, causal: bool, q_segment_ids: jax.Array | None,
                   kv_segment_ids: jax.Array | None,
                   sliding_window: int | None = None) -> jax.Array:
  """`make_mask` in the kernels' convention, `(B or 1, T, S)`: query i sits at key S - T + i."""
  batch = 1 if q_segment_ids is None else q_segment_ids.shape[0]
  return make_mask(batch, t, s, causal=causal, q_offset=s - t, q_segment_ids=q_segment_ids,
                   kv_segment_ids=kv_segment_ids, sliding_window=sliding_window)[:, 0]


def grouped_logits(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
  """scale · q kᵀ per GQA group, `(B, K, G, T, S)`, in float32 (or wider), no repeated K."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  acc = jnp.promote_types(q.dtype, jnp.float32)
  groups = q.reshape(b, t, kv_heads, n // kv_heads, h)
  return jnp.einsum("BTKGH,BSKH->BKGTS", groups, k, preferred_element_type=acc) * scale


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
              out_dtype=None, logit_soft_cap: float | None = None
              ) -> tuple[jax.Array, jax.Array]:
  """Softmax attention with GQA by grouping.

  q `(B, T, N, H)`; k, v `(B, S, K, H)` with N % K == 0; mask `(B or 1, 1 or N, T, S)` boolean.
  logit_soft_cap: cap · tanh(logits / cap) on the scaled logits, before the mask.
  Returns out `(B, T, N, H)` in `out_dtype` (default q's) and probabilities `(B, N, T, S)` in
  float32 (or wider); rows that see no key get zero probabilities and output.
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  logits = soft_cap(grouped_logits(q, k, scale), logit_soft_cap)
  # (B, 1 or K, 1 or G, T, S) against the logits' (B, K, G, T, S)
  heads = (kv_heads, n // kv_heads) if mask.shape[1] == n else (1, 1)
  mask = mask.reshape(mask.shape[0], *heads, *mask.shape[2:])
  # Double where: fully masked rows give p = 0 and finite gradients instead of NaN.
  logits = jnp.where(mask, logits, -1e30)
  p = jnp.where(mask, jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", p.astype(v.dtype), v, preferred_element_type=p.dtype)
  return out.reshape(b, t, n, h).astype(out_dtype or q.dtype), p.reshape(b, n, t, -1)


def gated_attention(q: jax.Array, k: jax.Array, v: jax.Array, gate: jax.Array | None, *,
                    causal: bool, scale: float, gate_activation: str,
                    q_segment_ids: jax.Array | None = None,
                    kv_segment_ids: jax.Array | None = None,
                    sliding_window: int | None = None,
                    logit_soft_cap: float | None = None) -> jax.Array:
  """softmax(soft_cap(scale·q kᵀ) + mask) v ⊙ act(gate), differentiable by autodiff: the
  kernels' reference.

  q: (B, T, N, H); k, v: (B, S, K, H) with N % K == 0; gate: (B, T, N, H), (B, T, N) or None;
  segment ids: (B, T) and (B, S) int or None. Queries end-aligned with the keys (query i at
  key S - T + i). Returns (B, T, N, H) in q.dtype.
  """
  b, t = q.shape[:2]
  s = k.shape[1]
  mask = make_mask(b, t, s, causal=causal, q_offset=s - t, q_segment_ids=q_segment_ids,
                   kv_segment_ids=kv_segment_ids, sliding_window=sliding_window)
  acc = jnp.promote_types(q.dtype, jnp.float32)
  y, _ = attention(q, k, v, mask, scale, out_dtype=acc, logit_soft_cap=logit_soft_cap)
  if gate is not None:
    act = activation(gate.astype(acc), gate_activation)
    y = y * (act if gate.ndim == 4 else act[..., None])
  return y.astype(q.dtype)

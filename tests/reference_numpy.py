"""An independent float64 numpy implementation of gated attention, straight from the paper.

Written loop-and-formula style on purpose, sharing no code with the library: the
tests compare `GatedAttention` against it.
"""

from __future__ import annotations

import numpy as np


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


ACTIVATIONS = {
    "sigmoid": sigmoid,
    "silu": lambda x: x * sigmoid(x),
    "ns_sigmoid": lambda x: 0.5 + 0.5 * sigmoid(x),
    "identity": lambda x: x,
}


def rms(x, w, eps, offset=False):
  x_hat = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
  return x_hat * ((1.0 + w) if offset else w)


def rope(x, positions, theta, rotary_fraction=1.0):
  """x (B, T, heads, H): rotate pairs (i, i + rd/2) of the first rd channels."""
  out = x.copy()
  rd = int(x.shape[-1] * rotary_fraction)
  rd -= rd % 2
  half = rd // 2
  for i in range(half):
    angle = positions[:, :, None] * theta ** (-2.0 * i / rd)  # (B, T, 1)
    a, b = x[..., i], x[..., i + half]
    out[..., i] = a * np.cos(angle) - b * np.sin(angle)
    out[..., i + half] = b * np.cos(angle) + a * np.sin(angle)
  return out


def gated_attention(x, p, *, gate, num_heads, num_kv_heads, positions, segment_ids=None,
                    qk_norm=False, eps=1e-6, theta=10000.0, rotary_fraction=1.0,
                    causal=True, mask=None, sliding_window=None, logit_soft_cap=None,
                    query_scale=None):
  """x (B, T, D); p: dict of float64 arrays named like the layer's parameters.

  mask: bool (B or 1, 1 or N, T, T); sliding_window w: keys j with |i - j| < w (Gemma's
  `_create_sliding_mask`); logit_soft_cap c: c·tanh(logits / c) before masking (Gemma 2);
  query_scale: the logit scale (default head_dim^-0.5). Rows that see no key output zeros."""
  b, t, d = x.shape
  n, k_heads = num_heads, num_kv_heads
  h = p["q_proj"].shape[-1]
  group = n // k_heads
  q = np.einsum("btd,dnh->btnh", x, p["q_proj"])
  k = np.einsum("btd,dkh->btkh", x, p["k_proj"])
  v = np.einsum("btd,dkh->btkh", x, p["v_proj"])

  scores = None
  if gate.position != "none":
    if gate.input_dependent:
      w = p["attn_gate_proj"]
      logits = np.tensordot(x, w, axes=([2], [0]))
    else:
      logits = np.broadcast_to(p["gate_theta"], (b, t) + p["gate_theta"].shape)
    scores = ACTIVATIONS[gate.activation](logits)
    if gate.sharing == "head_shared":
      heads = scores.shape[2]
      per = group if gate.position in ("sdpa", "query") else heads
      shared = scores.copy()
      for start in range(0, heads, per):
        shared[:, :, start:start + per] = scores[:, :, start:start + per].mean(
            axis=2, keepdims=True)
      scores = shared
    if gate.granularity == "headwise" and gate.position != "dense":
      scores = scores[..., None]

  def apply(y):
    return y * scores if gate.combine == "multiply" else y + scores

  if gate.position == "query":
    q = apply(q)
  if gate.position == "key":
    k = apply(k)
  if gate.position == "value":
    v = apply(v)
  if qk_norm:
    q, k = rms(q, p["q_norm"], eps), rms(k, p["k_norm"], eps)
  q = rope(q, positions, theta, rotary_fraction)
  k = rope(k, positions, theta, rotary_fraction)

  y = np.zeros((b, t, n, h))
  for bi in range(b):
    for head in range(n):
      kv = head // group
      scale = 1 / np.sqrt(h) if query_scale is None else query_scale
      logits = q[bi, :, head] @ k[bi, :, kv].T * scale
      if logit_soft_cap is not None:
        logits = logit_soft_cap * np.tanh(logits / logit_soft_cap)
      allowed = np.ones((t, t), bool)
      if causal:
        allowed &= np.tril(np.ones((t, t), bool))
      if sliding_window is not None:
        allowed &= np.abs(np.arange(t)[:, None] - np.arange(t)[None, :]) < sliding_window
      if segment_ids is not None:
        allowed &= segment_ids[bi][:, None] == segment_ids[bi][None, :]
      if mask is not None:
        allowed &= mask[bi % mask.shape[0], head % mask.shape[1]]
      logits = np.where(allowed, logits, -np.inf)
      row_max = logits.max(axis=-1, keepdims=True)
      probs = np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0))
      probs /= np.maximum(probs.sum(axis=-1, keepdims=True), 1e-300)
      y[bi, :, head] = probs @ v[bi, :, kv]

  if gate.sdpa_transform == "rmsnorm":
    y = rms(y, p["sdpa_norm"], eps)
  elif gate.sdpa_transform == "silu":
    y = y * sigmoid(y)
  if gate.position == "sdpa":
    y = apply(y)
  out = np.einsum("btnh,nhd->btd", y, p["o_proj"])
  if gate.position == "dense":
    out = apply(out)
  return out

"""`OutputGate`: the paper's G1 gate as a module of its own, for anyone's attention.

Keep your attention (Flax's `MultiHeadDotProductAttention`, gemma's, MaxText's) and gate its
per-head output before the output projection:

    y = attention(...)               # (B, T, N, H), before W_O
    y = output_gate(x, y)            # x: the block input (B, T, D) that fed Q, K, V
    out = o_proj(y)

The parameters and math are `GatedAttention`'s G1 gate (`gate.make_params`, `gate.logits`,
`gate.scores`, `gate.combine`): the same `attn_gate_proj` `(D, N[, H])` (or `gate_theta`), drawn
from N(0, 0.02) by default, so weights move between the two unchanged. Linen models use
`linen_output_gate(...)` (the module through `flax.nnx.bridge`).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import bridge

from gated_attention_jax import checks
from gated_attention_jax import gate as gate_lib
from gated_attention_jax import layers


class OutputGate(nnx.Module):
  """y ⊙ act(x W_θ) (or y + act(x W_θ)) over the query heads: the paper's G1 gate.

  Args:
    d_model, num_heads, head_dim: D of the block input; N and H of the attention output.
    granularity: "elementwise" (W_θ `(D, N, H)`) or "headwise" (`(D, N)`).
    activation: one of `gate.ACTIVATIONS` (sigmoid, the paper's best, by default).
    combine: "multiply" or "add".
    sharing: "head_specific", or "head_shared" (averaged over the query heads of each of
      `num_kv_heads` groups; needs `num_kv_heads`).
    num_kv_heads: the kv heads of a GQA attention (default num_heads: MHA).
    input_dependent: False learns a zero-initialised score per head (channel) instead.
    init: the initializer of W_θ (default N(0, 0.02)).
    start, start_mean: `GateConfig.init` / `init_mean`: "normal", "identity" (zero weights; use
      activation "2sigmoid") or "mean" (a learned bias `gate_bias` starting the gate at
      start_mean).
  """

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *,
               granularity: str = "elementwise", activation: str = "sigmoid",
               combine: str = "multiply", sharing: str = "head_specific",
               num_kv_heads: Optional[int] = None, input_dependent: bool = True,
               init: Optional[layers.Initializer] = None, start: str = "normal",
               start_mean: float = 0.5, dtype: Any = None,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    checks.positive_ints(d_model=d_model, num_heads=num_heads, head_dim=head_dim,
                         num_kv_heads=num_kv_heads)
    if num_heads % num_kv_heads:
      raise ValueError(
          f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    self.config = gate_lib.GateConfig(position="sdpa", granularity=granularity,
                                      sharing=sharing, activation=activation, combine=combine,
                                      input_dependent=input_dependent, init=start,
                                      init_mean=start_mean)
    self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
    self.num_kv_heads = num_kv_heads
    self.dtype = dtype
    self.attn_gate_proj, self.gate_theta, self.gate_bias = gate_lib.make_params(
        self.config, rngs, d_model, num_heads, num_kv_heads, head_dim, init=init,
        param_dtype=param_dtype)

  def scores(self, x: jax.Array) -> jax.Array:
    """The gate values `(B, T, N[, H])` after activation and sharing, from x `(B, T, D)`."""
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"x must be (batch, seq, {self.d_model}), got shape {x.shape}")
    x = x.astype(self.dtype or x.dtype)
    return gate_lib.scores(gate_lib.logits(x, self.attn_gate_proj, self.gate_theta,
                                           self.gate_bias),
                           self.config, self.num_kv_heads)

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """x `(B, T, D)` the block input, y `(B, T, N, H)` the attention output before W_O (or
    `(B, T, N·H)`, heads flattened) → y gated, same shape and dtype as y."""
    want = (*x.shape[:2], self.num_heads, self.head_dim)
    if y.shape not in (want, (*want[:2], self.num_heads * self.head_dim)):
      raise ValueError(f"y must be (batch, seq, num_heads, head_dim) = {want} (or the heads"
                       f" flattened) for x of shape {x.shape}, got {y.shape}")
    gated = gate_lib.combine(y.reshape(want), self.scores(x), self.config.combine)
    return gated.reshape(y.shape).astype(y.dtype)


def linen_output_gate(d_model: int, num_heads: int, head_dim: int, *,
                      name: Optional[str] = None, **kwargs) -> bridge.ToLinen:
  """`OutputGate` as a Linen module (`flax.nnx.bridge.to_linen`): create it inside a
  `@nn.compact` method and call it as `gate(x, y)`; its parameters are `attn_gate_proj` (or
  `gate_theta`) in the Linen tree, drawn from the 'params' RNG."""
  return bridge.to_linen(OutputGate, d_model, num_heads, head_dim, name=name, **kwargs)

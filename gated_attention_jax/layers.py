"""Small building blocks: parameters with logical axis names, norms, embedding, MLPs.

Every parameter carries logical axis names (`out_sharding` metadata, e.g.
`("embed", "q_heads", "head_dim")`); `gated_attention_jax.sharding` maps them to
mesh axes by one table of rules. Parameters are created unsharded
(`eager_sharding=False`) so layers build the same way with or without a mesh.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]

NORM_STYLES = ("scale", "offset")
NORM_TYPES = ("rmsnorm", "layernorm")
MLP_TYPES = ("swiglu", "relu")
INIT_STDDEV = 0.02  # the paper's N(0, 0.02) for every linear weight, gate rows included


def normal_init(stddev: float = INIT_STDDEV) -> Initializer:
  return jax.nn.initializers.normal(stddev)


def make_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str],
               init: Initializer, dtype: jnp.dtype) -> nnx.Param:
  """An `nnx.Param` of `shape` with logical axis names `axes`."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype),
                   out_sharding=tuple(axes), eager_sharding=False)


def accum_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """float32, or float64 when the input is float64 (reference tests run in float64)."""
  return jnp.promote_types(dtype, jnp.float32)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / sqrt(mean(x^2) + eps) over the last axis, computed in float32 (or wider)."""
  x32 = x.astype(accum_dtype(x.dtype))
  return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis.

  style "scale": x_hat * w with w initialised to ones (Llama, Qwen3).
  style "offset": x_hat * (1 + w) with w initialised to zeros (Qwen3-Next, Gemma).
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, style: str = "scale",
               axis_name: str = "norm", param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    if style not in NORM_STYLES:
      raise ValueError(f"norm_style must be one of {NORM_STYLES}, got {style!r}")
    self.eps = eps
    self.style = style
    init = jax.nn.initializers.ones if style == "scale" else jax.nn.initializers.zeros
    self.weight = make_param(rngs, (dim,), (axis_name,), init, param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.weight[...].astype(accum_dtype(x.dtype))
    scale = w if self.style == "scale" else 1.0 + w
    return (rms_normalize(x, self.eps) * scale).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis: (x - mean) / std * w + b (w ones, b zeros at init)."""

  def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.eps = eps
    self.weight = make_param(rngs, (dim,), ("norm",), jax.nn.initializers.ones, param_dtype)
    self.bias = make_param(rngs, (dim,), ("norm",), jax.nn.initializers.zeros, param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(accum_dtype(x.dtype))
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = rms_normalize(centred, self.eps)
    w, b = (p[...].astype(x32.dtype) for p in (self.weight, self.bias))
    return (y * w + b).astype(x.dtype)


def make_norm(norm_type: str, dim: int, *, eps: float, style: str, param_dtype: jnp.dtype,
              rngs: nnx.Rngs) -> nnx.Module:
  """The block norm named by `norm_type` (RMSNorm takes `style`; LayerNorm has a bias)."""
  if norm_type == "layernorm":
    return LayerNorm(dim, eps=eps, param_dtype=param_dtype, rngs=rngs)
  if norm_type == "rmsnorm":
    return RMSNorm(dim, eps=eps, style=style, param_dtype=param_dtype, rngs=rngs)
  raise ValueError(f"norm_type must be one of {NORM_TYPES}, got {norm_type!r}")


class Embed(nnx.Module):
  """Token embedding `(V, D)`; `attend` gives tied output logits."""

  def __init__(self, vocab_size: int, d_model: int, *, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.embedding = make_param(rngs, (vocab_size, d_model), ("vocab", "embed"),
                                normal_init(), param_dtype)

  def __call__(self, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`(B, T)` int → `(B, T, D)`."""
    return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """`(B, T, D)` → `(B, T, V)` float32 logits."""
    return jnp.einsum("BTD,VD->BTV", x, self.embedding[...].astype(x.dtype),
                      preferred_element_type=accum_dtype(x.dtype))


class SwiGLU(nnx.Module):
  """SwiGLU MLP: W_down(silu(x W_gate) * x W_up)."""

  def __init__(self, d_model: int, mlp_dim: int, *, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.gate_proj = make_param(rngs, (d_model, mlp_dim), ("embed", "mlp"), normal_init(),
                                param_dtype)
    self.up_proj = make_param(rngs, (d_model, mlp_dim), ("embed", "mlp"), normal_init(),
                              param_dtype)
    self.down_proj = make_param(rngs, (mlp_dim, d_model), ("mlp", "embed"), normal_init(),
                                param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`(B, T, D)` → `(B, T, D)` in x's dtype."""
    dt = x.dtype
    h = jax.nn.silu(x @ self.gate_proj[...].astype(dt)) * (x @ self.up_proj[...].astype(dt))
    return h @ self.down_proj[...].astype(dt)


class ReluMLP(nnx.Module):
  """Two-layer ReLU MLP: W_down(relu(x W_up)) (GPT-2 style without biases)."""

  def __init__(self, d_model: int, mlp_dim: int, *, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.up_proj = make_param(rngs, (d_model, mlp_dim), ("embed", "mlp"), normal_init(),
                              param_dtype)
    self.down_proj = make_param(rngs, (mlp_dim, d_model), ("mlp", "embed"), normal_init(),
                                param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`(B, T, D)` → `(B, T, D)` in x's dtype."""
    dt = x.dtype
    return jax.nn.relu(x @ self.up_proj[...].astype(dt)) @ self.down_proj[...].astype(dt)


def make_mlp(mlp_type: str, d_model: int, mlp_dim: int, *, param_dtype: jnp.dtype,
             rngs: nnx.Rngs) -> nnx.Module:
  if mlp_type == "swiglu":
    return SwiGLU(d_model, mlp_dim, param_dtype=param_dtype, rngs=rngs)
  if mlp_type == "relu":
    return ReluMLP(d_model, mlp_dim, param_dtype=param_dtype, rngs=rngs)
  raise ValueError(f"mlp_type must be one of {MLP_TYPES}, got {mlp_type!r}")

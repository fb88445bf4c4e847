"""Rotary position embeddings (rotate-half layout, partial rotary) and RoPE scaling.

Scaling methods for context extension, selected by `RopeScaling.method`:
  - "none": plain RoPE.
  - "linear": position interpolation (Chen et al. 2023): frequencies / factor.
  - "ntk": NTK-aware scaling: base * factor ** (d / (d - 2)).
  - "yarn": YaRN (Peng et al. 2023), the HF transformers formulation: a linear ramp
    between interpolated and original frequencies over the rotary dims, plus an
    attention factor 0.1 * ln(factor) + 1 on cos and sin.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_SCALING_METHODS = ("none", "linear", "ntk", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE scaling for long-context evaluation.

  Attributes:
    method: one of ROPE_SCALING_METHODS.
    factor: context extension factor s (> 0; 1 means no scaling).
    original_max_len: training context length (YaRN's ramp depends on it).
    beta_fast, beta_slow: YaRN's ramp bounds, in rotations over the context.
  """

  method: str = "none"
  factor: float = 1.0
  original_max_len: int = 2048
  beta_fast: float = 32.0
  beta_slow: float = 1.0

  def __post_init__(self):
    if self.method not in ROPE_SCALING_METHODS:
      raise ValueError(
          f"rope_scaling.method must be one of {ROPE_SCALING_METHODS}, got {self.method!r}")
    if not self.factor > 0:
      raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor!r}")
    if self.original_max_len <= 0:
      raise ValueError(
          f"rope_scaling.original_max_len must be > 0, got {self.original_max_len!r}")


def rotary_dim(head_dim: int, partial_rotary_factor: float, prefix: str = "") -> int:
  """Number of leading channels of each head that are rotated: int(head_dim · factor), which
  must be even (channels rotate in pairs). ValueError naming the fields (`prefix` + name)."""
  if isinstance(partial_rotary_factor, bool) or not isinstance(
      partial_rotary_factor, (int, float)) or not 0.0 < partial_rotary_factor <= 1.0:
    raise ValueError(
        f"{prefix}partial_rotary_factor must be in (0, 1], got {partial_rotary_factor!r}")
  rd = int(head_dim * partial_rotary_factor)
  if rd % 2:
    raise ValueError(f"{prefix}head_dim ({head_dim}) x {prefix}partial_rotary_factor"
                     f" ({partial_rotary_factor}) must be even with RoPE (channels rotate in"
                     f" pairs), got {rd} rotated channels")
  return rd


def inverse_frequencies(rd: int, theta: float,
                        scaling: RopeScaling = RopeScaling()) -> tuple[np.ndarray, float]:
  """Per-pair inverse frequencies (rd // 2,) and the attention factor on cos/sin."""
  exponents = np.arange(0, rd, 2, dtype=np.float64) / rd
  if scaling.method == "ntk":
    theta = theta * scaling.factor ** (rd / (rd - 2))
  inv_freq = theta ** -exponents
  if scaling.method == "linear":
    return inv_freq / scaling.factor, 1.0
  if scaling.method == "yarn":
    def correction_dim(num_rotations: float) -> float:
      return (rd * math.log(scaling.original_max_len / (num_rotations * 2 * math.pi))
              ) / (2 * math.log(theta))
    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), rd - 1)
    if low == high:
      high += 0.001
    ramp = np.clip((np.arange(rd // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep_original = 1.0 - ramp
    inv_freq = inv_freq / scaling.factor * (1.0 - keep_original) + inv_freq * keep_original
    attention_factor = 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0
    return inv_freq, attention_factor
  return inv_freq, 1.0


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float,
               partial_rotary_factor: float = 1.0,
               scaling: RopeScaling = RopeScaling()) -> jax.Array:
  """Rotates the first `rotary_dim` channels of every head (rotate-half layout).

  Args:
    x: `(B, T, heads, H)`.
    positions: `(B, T)` integer positions.
  Returns:
    `(B, T, heads, H)` in x's dtype; the rotation is computed in float32 (or wider).
  """
  head_dim = x.shape[-1]
  rd = rotary_dim(head_dim, partial_rotary_factor)
  inv_freq, attention_factor = inverse_frequencies(rd, theta, scaling)
  compute = jnp.promote_types(x.dtype, jnp.float32)
  angles = positions[..., None].astype(compute) * jnp.asarray(inv_freq, compute)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # (B, T, 1, rd)
  cos = jnp.cos(angles) * attention_factor
  sin = jnp.sin(angles) * attention_factor
  rot, rest = x[..., :rd].astype(compute), x[..., rd:]
  half = rd // 2
  rotated_half = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
  out = (rot * cos + rotated_half * sin).astype(x.dtype)
  return jnp.concatenate([out, rest], axis=-1) if rd < head_dim else out

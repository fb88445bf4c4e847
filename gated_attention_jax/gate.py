"""The gate of gated attention as one validated config object, and its pure math.

Qiu et al. (2025) gate an attention layer at one of five positions with a score
computed from the same pre-normed input X that feeds Q/K/V:

    multiplicative:  Y' = Y * act(X W_theta)
    additive:        Y' = Y + act(X W_theta)

`GateConfig` names every axis the paper ablates (the README's gate table maps each
field to the paper). The gate's parameters and math live here, used by `GatedAttention`
(every position) and `OutputGate` (G1 around anyone's attention): `make_params`
(W_theta, or the input-independent theta), `logits` (X W_theta), `scores` (act, then the
head sharing) and `combine` (multiply or add).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gated_attention_jax import layers
from gated_attention_jax.kernels import reference

POSITIONS = ("none", "sdpa", "value", "key", "query", "dense")
GRANULARITIES = ("elementwise", "headwise")
SHARINGS = ("head_specific", "head_shared")
ACTIVATIONS = reference.GATE_ACTIVATIONS
COMBINES = ("multiply", "add")
SDPA_TRANSFORMS = ("none", "rmsnorm", "silu")
INITS = ("normal", "identity", "mean")
# act⁻¹ of the activations a gate can start at a chosen mean with (init="mean"), and the open
# interval of means each reaches.
_INVERSES = {
    "sigmoid": ((0.0, 1.0), lambda m: math.log(m / (1.0 - m))),
    "2sigmoid": ((0.0, 2.0), lambda m: math.log(m / (2.0 - m))),
    "ns_sigmoid": ((0.5, 1.0), lambda m: math.log((2.0 * m - 1.0) / (2.0 - 2.0 * m))),
}

# Paper names of the positions, for tables and logs.
PAPER_NAMES = {"sdpa": "G1", "value": "G2", "key": "G3", "query": "G4", "dense": "G5"}


def _check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"gate.{field} must be one of {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class GateConfig:
  """Which gate an attention layer has; validated at construction.

  Attributes:
    position: "none" (no gate), "sdpa" (G1, after SDPA, before W_O), "value" (G2),
      "key" (G3), "query" (G4), "dense" (G5, after W_O).
    granularity: "elementwise" (a score per channel of each head) or "headwise"
      (one scalar per head).
    sharing: "head_specific", or "head_shared": scores averaged over the query
      heads that share a kv head (positions sdpa/query) or over all kv heads
      (positions value/key). With MHA (one query head per kv head) a head-shared
      G1/G4 gate equals the head-specific one.
    activation: "sigmoid", "silu", "ns_sigmoid" (0.5 + 0.5 * sigmoid, the paper's
      non-sparse probe), "identity", or "2sigmoid" (2 * sigmoid: 1 at zero logits).
    combine: "multiply" (Y * act(XW)) or "add" (Y + act(XW)).
    input_dependent: False replaces XW by a zero-initialised learned parameter
      with the gate's per-token shape (no projection from X).
    sdpa_transform: "none", "rmsnorm" (RMSNorm over each head's SDPA output) or
      "silu" (SiLU of the SDPA output): the paper's non-linearity probes. They
      apply to the SDPA output before any G1 gate.
    init: how the gate starts. "normal": W_theta ~ N(0, 0.02) (the official code); "identity":
      W_theta = 0 with a gate that is then exactly the identity (multiply with "2sigmoid", or
      add with "identity" / "silu"), for retrofitting a trained model; "mean": N(0, 0.02)
      plus a learned bias `gate_bias` (the input-independent theta itself) set so that the
      gate starts at `init_mean` (sigmoid, 2sigmoid or ns_sigmoid).
    init_mean: the starting gate value of init="mean".
  """

  position: str = "none"
  granularity: str = "elementwise"
  sharing: str = "head_specific"
  activation: str = "sigmoid"
  combine: str = "multiply"
  input_dependent: bool = True
  sdpa_transform: str = "none"
  init: str = "normal"
  init_mean: float = 0.5

  def __post_init__(self):
    _check_choice("position", self.position, POSITIONS)
    _check_choice("granularity", self.granularity, GRANULARITIES)
    _check_choice("sharing", self.sharing, SHARINGS)
    _check_choice("activation", self.activation, ACTIVATIONS)
    _check_choice("combine", self.combine, COMBINES)
    _check_choice("sdpa_transform", self.sdpa_transform, SDPA_TRANSFORMS)
    _check_choice("init", self.init, INITS)
    if self.init == "identity":
      at_zero = float(activate(jnp.zeros(()), self.activation))
      if at_zero != (1.0 if self.combine == "multiply" else 0.0):
        raise ValueError(
            f"gate.init='identity' needs a gate that is the identity at zero weights (combine"
            f" 'multiply' with activation '2sigmoid', or 'add' with 'identity' or 'silu'); got"
            f" activation={self.activation!r}, combine={self.combine!r}")
    if self.init == "mean":
      if self.activation not in _INVERSES:
        raise ValueError(f"gate.init='mean' needs gate.activation in {tuple(_INVERSES)}, got"
                         f" {self.activation!r}")
      (low, high), _ = _INVERSES[self.activation]
      if not (isinstance(self.init_mean, (int, float)) and low < self.init_mean < high):
        raise ValueError(f"gate.init_mean must be in ({low}, {high}) for activation"
                         f" {self.activation!r}, got {self.init_mean!r}")
    if not isinstance(self.input_dependent, bool):
      raise ValueError(
          "gate.input_dependent must be one of (True, False), got"
          f" {self.input_dependent!r}")
    if self.position == "dense" and self.granularity != "elementwise":
      raise ValueError(
          "gate.granularity must be 'elementwise' when gate.position='dense'"
          " (G5 gates the d_model output, which has no heads); got"
          f" {self.granularity!r}")
    if self.position == "dense" and self.sharing != "head_specific":
      raise ValueError(
          "gate.sharing must be 'head_specific' when gate.position='dense'"
          f" (G5 has no heads to share over); got {self.sharing!r}")

  @property
  def enabled(self) -> bool:
    return self.position != "none"

  @property
  def gates_query_heads(self) -> bool:
    """Whether the gate covers the query heads (G1, G4); G2 / G3 cover the kv heads, G5 none."""
    return self.position in ("sdpa", "query")

  def score_shape(self, d_model: int, num_heads: int, num_kv_heads: int,
                  head_dim: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Per-token shape of the gate's scores and its logical axis names: `(d_model,)` for G5,
    else `(heads[, head_dim])` over the query heads (G1, G4) or the kv heads (G2, G3)."""
    if self.position == "dense":
      return (d_model,), ("dense_gate",)
    heads, axis = ((num_heads, "q_heads") if self.gates_query_heads
                   else (num_kv_heads, "kv_heads"))
    if self.granularity == "headwise":
      return (heads,), (axis,)
    return (heads, head_dim), (axis, "head_dim")

  def sharing_groups(self, num_kv_heads: int) -> int:
    """How many groups a head-shared gate averages its scores over: the query heads of each
    kv head (G1, G4), or all the kv heads at once (G2, G3)."""
    return num_kv_heads if self.gates_query_heads else 1

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "GateConfig":
    """Builds from a mapping (e.g. an ml_collections `config.gate`), rejecting unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"gate has no fields {unknown}; allowed fields are {sorted(names)}")
    return cls(**dict(values))

  def describe(self) -> str:
    """A short human-readable name, e.g. 'G1 sdpa elementwise sigmoid multiply'."""
    if not self.enabled:
      base = "no gate"
    else:
      parts = [PAPER_NAMES[self.position], self.position, self.granularity]
      if self.sharing == "head_shared":
        parts.append("head-shared")
      parts += [self.activation, self.combine]
      if not self.input_dependent:
        parts.append("input-independent")
      if self.init != "normal":
        parts.append(f"init {self.init}" + (f" {self.init_mean:g}" if self.init == "mean" else ""))
      base = " ".join(parts)
    if self.sdpa_transform != "none":
      base += f" + sdpa {self.sdpa_transform}"
    return base


def activate(x: jax.Array, activation: str) -> jax.Array:
  """The gate's activation, elementwise (the one table: `kernels.reference.GATE_ACTIVATIONS`)."""
  return reference.activation(x, activation, field="gate.activation")


def share_over_heads(scores: jax.Array, num_groups: int) -> jax.Array:
  """Averages gate scores over the heads of each group, keeping the head axis.

  Args:
    scores: `(B, T, heads)` or `(B, T, heads, H)` gate scores.
    num_groups: the number of groups the heads fall into (consecutive heads
      form one group); 1 averages over all heads.
  Returns:
    An array of the same shape, each head holding its group's mean.
  """
  b, t, heads = scores.shape[:3]
  grouped = scores.reshape(b, t, num_groups, heads // num_groups, *scores.shape[3:])
  mean = jnp.mean(grouped, axis=3, keepdims=True)
  return jnp.broadcast_to(mean, grouped.shape).reshape(scores.shape)


def combine(y: jax.Array, scores: jax.Array, how: str) -> jax.Array:
  """Applies gate scores to the gated tensor; headwise scores broadcast over channels."""
  if scores.ndim == y.ndim - 1:
    scores = scores[..., None]
  if how == "multiply":
    return y * scores.astype(y.dtype)
  return y + scores.astype(y.dtype)


def make_params(config: GateConfig, rngs: nnx.Rngs, d_model: int, num_heads: int,
                num_kv_heads: int, head_dim: int, *, init: layers.Initializer | None = None,
                param_dtype: Any = jnp.float32
                ) -> tuple[nnx.Param | None, nnx.Param | None, nnx.Param | None]:
  """(attn_gate_proj `(D, *score_shape)`, gate_theta `score_shape`, gate_bias `score_shape`), None
  where absent (all three for no gate), as `config.init` says: W_theta drawn from `init`
  (default N(0, 0.02), the paper's) or zero ("identity"), plus a bias at act⁻¹(init_mean)
  ("mean"); an input-independent theta starts at zero (or act⁻¹(init_mean))."""
  if not config.enabled:
    return None, None, None
  shape, axes = config.score_shape(d_model, num_heads, num_kv_heads, head_dim)
  start = (jax.nn.initializers.constant(_INVERSES[config.activation][1](config.init_mean))
           if config.init == "mean" else jax.nn.initializers.zeros)
  if not config.input_dependent:
    return None, layers.make_param(rngs, shape, axes, start, param_dtype), None
  weights = jax.nn.initializers.zeros if config.init == "identity" else (
      init or layers.normal_init())
  proj = layers.make_param(rngs, (d_model, *shape), ("embed", *axes), weights, param_dtype)
  bias = (layers.make_param(rngs, shape, axes, start, param_dtype) if config.init == "mean"
          else None)
  return proj, None, bias


def logits(x: jax.Array, proj: nnx.Param | None, gate_theta: nnx.Param | None,
           gate_bias: nnx.Param | None = None) -> jax.Array:
  """Pre-activation scores `(B, T, *score_shape)` from the pre-normed input x `(B, T, D)`:
  x W_theta (+ the bias), or theta broadcast."""
  if proj is not None:
    out = jnp.einsum("BTD,D...->BT...", x, proj[...].astype(x.dtype))
    return out if gate_bias is None else out + gate_bias[...].astype(x.dtype)
  theta = gate_theta[...].astype(x.dtype)
  return jnp.broadcast_to(theta, (*x.shape[:2], *theta.shape))


def scores(gate_logits: jax.Array, config: GateConfig, num_kv_heads: int) -> jax.Array:
  """act(logits), averaged over each sharing group of heads for head-shared gates."""
  out = activate(gate_logits, config.activation)
  if config.sharing == "head_shared":
    out = share_over_heads(out, config.sharing_groups(num_kv_heads))
  return out

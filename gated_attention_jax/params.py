"""Parameter counting, and the paper's formulas for what each gate variant adds."""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence, Union

import jax
from flax import linen, nnx

from gated_attention_jax.gate import GateConfig


Params = Union[nnx.Module, Mapping[str, Any]]
Path = tuple[str, ...]

# Parameter names that belong to an attention gate (`GatedAttention`, `OutputGate`): W_theta,
# the input-independent theta, the bias of init="mean" and the SDPA-RMSNorm probe. None is
# the SwiGLU's `gate_proj` (checkpoints from before the rename: `training.renames`).
GATE_PARAM_NAMES = ("attn_gate_proj", "gate_theta", "gate_bias", "sdpa_norm")
# Named groups of a model's parameters (`in_group`, `train.trainable`).
GROUPS = ("all", "gate", "attention", "mlp", "norms", "embeddings")


def names(path: Sequence[Any]) -> Path:
  """A pytree path (of an `nnx.State`, a Linen tree) as its names, without the trailing
  "value" of an NNX variable: ("blocks", "0", "attn", "attn_gate_proj")."""
  out = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
  return out[:-1] if out and out[-1] == "value" else out


def in_group(path: Path, group: str) -> bool:
  """Whether the parameter at `path` (`names`) belongs to `group` (one of `GROUPS`): the
  attention gates (`GATE_PARAM_NAMES`), everything under "attn", under "mlp" (MoE routers
  included), every norm's scale, or the token / position embeddings and the output head."""
  if group == "all":
    return True
  if group == "gate":
    return any(n in path for n in GATE_PARAM_NAMES)
  if group == "attention":
    return "attn" in path
  if group == "mlp":
    return "mlp" in path
  if group == "norms":
    return any(n.endswith("norm") for n in path)
  if group == "embeddings":
    return any(n in ("embed", "pos_embed", "lm_head") for n in path)
  raise ValueError(f"group must be one of {GROUPS}, got {group!r}")


def gate_filter(path: Sequence[Any], value: Any = None) -> bool:  # pylint: disable=unused-argument
  """An NNX filter for the attention gates' parameters (not the SwiGLU's `gate_proj`):
  `nnx.state(model, nnx.All(nnx.Param, gaj.gate_filter))`."""
  return in_group(names(path), "gate")


def selector(spec: str, field: str = "trainable") -> Callable[[Path], bool]:
  """A predicate over parameter paths (`names`) from `spec`: comma-separated `GROUPS`
  ("gate", "attention,norms"), or else a regular expression searched in the "/"-joined path
  ("blocks/0/attn/attn_gate_proj"; e.g. "attn/(q|k)_proj"). ValueError naming `field`
  otherwise."""
  groups = [g.strip() for g in spec.split(",")] if isinstance(spec, str) else []
  if groups and all(g in GROUPS for g in groups):
    return lambda path: any(in_group(path, g) for g in groups)
  try:
    pattern = re.compile(spec)
  except (re.error, TypeError) as e:
    raise ValueError(f"{field} must be comma-separated groups from {GROUPS} or a regular"
                     f" expression over parameter paths (e.g. 'attn/(q|k)_proj'), got"
                     f" {spec!r} ({e})") from None
  return lambda path: pattern.search("/".join(path)) is not None


def leaves(tree: Any) -> dict[Path, Any]:
  """{names of the path: leaf} of a pytree (an `nnx.State`, a Linen tree, an optimizer state)."""
  return {names(path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _param_leaves(params: Params) -> list[tuple[Path, Any]]:
  """(names of the path, array) of every parameter of an NNX module or a Linen tree: a
  `variables` dict (its "params" collection is used) or the params tree itself, boxed
  (`nn.Partitioned`, bridge metadata) or not."""
  if isinstance(params, nnx.Module):
    tree = nnx.state(params, nnx.Param)
  elif isinstance(params, Mapping):
    tree = linen.meta.unbox(params.get("params", params))
  else:
    raise ValueError("expected an NNX module or a Linen parameter tree (a mapping), got"
                     f" {type(params).__name__}")
  return list(leaves(tree).items())


def count_params(params: Params) -> int:
  """Number of scalar parameters of an NNX module (its `nnx.Param`s) or a Linen tree."""
  return sum(math.prod(x.shape) for _, x in _param_leaves(params))


def count_active_params(module: nnx.Module) -> int:
  """Parameters one token uses: all of them but, in each mixture-of-experts block, the routed
  experts it is not sent to (k of E used); equal to `count_params` for a dense model."""
  from gated_attention_jax import moe  # pylint: disable=g-import-not-at-top
  unused = 0
  for _, node in nnx.iter_graph(module):
    if isinstance(node, moe.MoE):
      experts = sum(math.prod(p.shape) for p in (node.gate_proj, node.up_proj, node.down_proj))
      e, k = node.cfg.num_experts, node.cfg.experts_per_token
      unused += experts * (e - k) // e
  return count_params(module) - unused


def gate_params_per_layer(d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
                          gate: GateConfig) -> int:
  """Parameters one attention layer gains from its gate, by the paper's formulas.

  G1/G4 elementwise: d_model·N·H; headwise: d_model·N. G2/G3 elementwise:
  d_model·K·H; headwise: d_model·K. G5: d_model². Input-independent gates keep
  only the per-token score shape (no d_model factor); a gate started at a mean
  (`init="mean"`) adds a bias of that shape. The SDPA RMSNorm probe adds its head_dim scale.
  """
  added = head_dim if gate.sdpa_transform == "rmsnorm" else 0
  if not gate.enabled:
    return added
  per_token = math.prod(gate.score_shape(d_model, num_heads, num_kv_heads, head_dim)[0])
  bias = per_token if gate.input_dependent and gate.init == "mean" else 0
  return added + bias + (d_model * per_token if gate.input_dependent else per_token)


def gate_params(params: Params) -> int:
  """Gate parameters of a model: an NNX module (a `Transformer`, a `GatedAttention`, a model of
  your own with `OutputGate`s) or a Linen tree (`bridge.to_linen` models, `linen_output_gate`).

  Counts the parameters the gates hold (`in_group(path, "gate")`), not a formula; for a
  `Transformer` that is the model minus its ungated twin.
  """
  return sum(math.prod(x.shape) for path, x in _param_leaves(params) if in_group(path, "gate"))

"""Parameter counting, and the paper's formulas for what each gate variant adds."""

from __future__ import annotations

import math
from typing import Any, Mapping, Union

import jax
from flax import linen, nnx

from gated_attention_jax.gate import GateConfig


Params = Union[nnx.Module, Mapping[str, Any]]

# Parameter names that belong to an attention gate (`GatedAttention`, `OutputGate`): W_theta,
# the input-independent theta and the SDPA-RMSNorm probe. An MLP's SwiGLU `gate_proj` (under
# "mlp") is not one.
GATE_PARAM_NAMES = ("gate_proj", "gate_theta", "sdpa_norm")


def _param_leaves(params: Params) -> list[tuple[tuple[str, ...], Any]]:
  """(path of names, array) of every parameter of an NNX module or a Linen tree: a `variables`
  dict (its "params" collection is used) or the params tree itself, boxed (`nn.Partitioned`,
  bridge metadata) or not."""
  if isinstance(params, nnx.Module):
    tree = nnx.state(params, nnx.Param)
  elif isinstance(params, Mapping):
    tree = params.get("params", params)
  else:
    raise ValueError("expected an NNX module or a Linen parameter tree (a mapping), got"
                     f" {type(params).__name__}")
    tree = linen.meta.unbox(tree)
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return [(tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path), x)
          for path, x in leaves]


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
  only the per-token score shape (no d_model factor). The SDPA RMSNorm probe adds
  its head_dim scale.
  """
  added = head_dim if gate.sdpa_transform == "rmsnorm" else 0
  if not gate.enabled:
    return added
  per_token = math.prod(gate.score_shape(d_model, num_heads, num_kv_heads, head_dim)[0])
  return added + (d_model * per_token if gate.input_dependent else per_token)


def gate_params(params: Params) -> int:
  """Gate parameters of a model: an NNX module (a `Transformer`, a `GatedAttention`, a model of
  your own with `OutputGate`s) or a Linen tree (`bridge.to_linen` models, `linen_output_gate`).

  Counts the parameters the gates hold (`GATE_PARAM_NAMES`, outside any "mlp"), not a formula;
  for a `Transformer` that is the model minus its ungated twin.
  """
  return sum(math.prod(x.shape) for path, x in _param_leaves(params)
             if "mlp" not in path and any(n in path for n in GATE_PARAM_NAMES))

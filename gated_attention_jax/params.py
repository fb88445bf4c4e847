"""Parameter counting, and the paper's formulas for what each gate variant adds."""

from __future__ import annotations

import math

import jax
from flax import nnx

from gated_attention_jax.gate import GateConfig


def count_params(module: nnx.Module) -> int:
  """Number of scalar parameters (`nnx.Param`) in a module."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


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


def gate_params(model: nnx.Module) -> int:
  """Gate parameters counted in a built `Transformer`: the model minus its ungated twin.

  Counts the real modules (not the formula): builds the same architecture with
  no gate abstractly (`nnx.eval_shape`, no memory) and subtracts.
  """
  from gated_attention_jax.transformer import Transformer  # pylint: disable=g-import-not-at-top
  cfg = model.config.replace(gate=GateConfig())
  baseline = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return count_params(model) - count_params(baseline)

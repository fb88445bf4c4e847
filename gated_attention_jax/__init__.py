"""gated_attention_jax: gated attention (Qiu et al. 2025) in JAX / Flax NNX.

Public API:
  GateConfig        the gate variant (position, granularity, sharing, activation, ...)
  GatedAttention    the NNX attention layer with that gate
  OutputGate        the G1 gate alone, for anyone's attention (`linen_output_gate` for Linen)
  Transformer       a decoder-only LM built from it, configured by TransformerConfig
  RopeScaling       RoPE scaling (none / linear / NTK / YaRN) for long context
  generate          batched sampling with the KV cache (ragged prompts, greedy / top-k / top-p)
  count_params, count_active_params, gate_params, gate_params_per_layer   parameter counting
  gate_filter       an NNX filter for the attention gates' parameters (`nnx.state(model, ...)`)
  load_run          (config, step, model) of a training run's newest intact checkpoint, read-only
                    (`checkpointing.load_model`; imported on first use: it brings in orbax)
  save_model        writes a model and its experiment config as a run folder (`train.save_model`)
"""

from gated_attention_jax.attention import GatedAttention
from gated_attention_jax.gate import GateConfig
from gated_attention_jax.output_gate import OutputGate, linen_output_gate
from gated_attention_jax.params import (count_active_params, count_params, gate_filter,
                                        gate_params, gate_params_per_layer)
from gated_attention_jax.rope import RopeScaling
from gated_attention_jax.sampler import Generation, generate
from gated_attention_jax.transformer import Transformer, TransformerConfig

__all__ = [
    "GateConfig", "GatedAttention", "Generation", "OutputGate", "RopeScaling", "Transformer",
    "TransformerConfig", "count_active_params", "count_params", "gate_filter", "generate",
    "gate_params", "gate_params_per_layer", "linen_output_gate", "load_run", "save_model",
]
__version__ = "0.1.0"


def __getattr__(name: str):
  if name == "load_run":
    from gated_attention_jax.training.checkpointing import load_model  # pylint: disable=g-import-not-at-top
    return load_model
  if name == "save_model":
    from gated_attention_jax.training.train import save_model  # pylint: disable=g-import-not-at-top
    return save_model
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""PyTorch checkpoint interop: the official gated Qwen3 code and HF Qwen3-Next layouts.

  load_attention / export_attention   one attention layer ⇄ its torch state dict
  load_official / export_official     a whole official checkpoint directory ⇄ `Transformer`
  config_from_hf / config_to_hf       official config.json ⇄ `TransformerConfig`
  layouts                             the pure-numpy weight permutations
  safetensors_io                      numpy-only safetensors reading and writing
"""

from gated_attention_jax.interop import layouts, safetensors_io
from gated_attention_jax.interop.models import (config_from_hf, config_to_hf, export_attention,
                                                export_official, load_attention, load_official)

__all__ = ["config_from_hf", "config_to_hf", "export_attention", "export_official",
           "layouts", "load_attention", "load_official", "safetensors_io"]

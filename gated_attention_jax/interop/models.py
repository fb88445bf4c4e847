"""PyTorch attention layers and whole official checkpoints → our NNX modules, and back.

`load_attention` builds a `GatedAttention` from one torch attention module's
weights; `load_official` builds a `Transformer` from a checkpoint directory of the
official gated Qwen3 code (config.json + safetensors), with numpy only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gated_attention_jax.attention import GatedAttention
from gated_attention_jax.gate import GateConfig
from gated_attention_jax.interop import layouts
from gated_attention_jax.interop import safetensors_io
from gated_attention_jax.transformer import Transformer, TransformerConfig

NORM_STYLE = {"official": "scale", "qwen3_next": "offset"}
# The official code's config flags for the G1 output gate (configuration_qwen3.py).
HEADWISE_FLAG = "headwise_attn_output_gate"
ELEMENTWISE_FLAG = "elementwise_attn_output_gate"

Path = tuple[Any, ...]


def _build(factory: Callable[[], nnx.Module], params: Mapping[Path, np.ndarray]) -> nnx.Module:
  """Builds `factory()` without random init and sets every parameter from `params`.

  The key sets must match exactly; each array is cast to its parameter's dtype.
  """
  graphdef, state = nnx.split(nnx.eval_shape(factory))
  flat = list(nnx.to_flat_state(state))
  missing = sorted(str(p) for p, _ in flat if p not in params)
  extra = sorted(str(p) for p in set(params) - {p for p, _ in flat})
  if missing or extra:
    raise ValueError(f"checkpoint does not match the module: missing {missing}, unexpected"
                     f" {extra}")
  leaves = []
  for path, var in flat:
    value = np.asarray(params[path])
    if value.shape != var.shape:
      raise ValueError(f"{'.'.join(map(str, path))}: checkpoint shape {value.shape},"
                       f" module shape {var.shape}")
    leaves.append((path, var.replace(jnp.asarray(value, var.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _flat_params(module: nnx.Module) -> dict[Path, np.ndarray]:
  """{path: numpy array} for every `nnx.Param` of a module."""
  return {path: np.asarray(var[...])
          for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


# --- one attention layer ------------------------------------------------------

def load_attention(state_dict: Mapping[str, np.ndarray], *, layout: str, d_model: int,
                   num_heads: int, num_kv_heads: int, head_dim: int, gate_granularity: str,
                   partial_rotary_factor: float = 1.0, rope_theta: float = 10000.0,
                   rms_norm_eps: float = 1e-6, dtype: Any = jnp.float32) -> GatedAttention:
  """A `GatedAttention` computing what the torch module with these weights computes.

  Args:
    state_dict: the torch module's own names (`q_proj.weight`, ..., `q_norm.weight`,
      `k_norm.weight`) → arrays; q/k norms are optional (together).
    layout: "official" (gate rows grouped per kv group, norm x̂·w) or "qwen3_next"
      (gate rows interleaved per head, norm x̂·(1 + w)); see `layouts`.
    gate_granularity: "elementwise", "headwise" or "none" (no gate rows).
    dtype: parameter and compute dtype.
  Returns:
    The layer; `layer(x, positions=...)` with x `(B, T, D)` is causal attention.
  """
  shape = layouts.AttentionShape(d_model, num_heads, num_kv_heads, head_dim, gate_granularity)
  params = layouts.attention_from_torch(state_dict, layout, shape)
  gate = (GateConfig() if gate_granularity == "none"
          else GateConfig(position="sdpa", granularity=gate_granularity, activation="sigmoid"))

  def factory() -> GatedAttention:
    return GatedAttention(d_model, num_heads, num_kv_heads, head_dim, gate,
                          rope_theta=rope_theta, partial_rotary_factor=partial_rotary_factor,
                          qk_norm="q_norm" in params, norm_eps=rms_norm_eps,
                          norm_style=NORM_STYLE[layout], dtype=dtype, param_dtype=dtype,
                          rngs=nnx.Rngs(0))

  return _build(factory, {_attention_path(name): value for name, value in params.items()})


def _attention_path(name: str) -> Path:
  return (name, "weight") if name.endswith("_norm") else (name,)


def _shape_of(layer: GatedAttention) -> layouts.AttentionShape:
  """The layer's dimensions, after checking it is a layer a torch layout can hold."""
  g = layer.gate
  if g.enabled and (g.position, g.activation, g.combine, g.sharing, g.input_dependent,
                    g.sdpa_transform) != ("sdpa", "sigmoid", "multiply", "head_specific",
                                          True, "none"):
    raise ValueError(f"only the G1 sigmoid multiplicative gate has a torch layout, got"
                     f" {g.describe()!r}")
  return layouts.AttentionShape(layer.d_model, layer.num_heads, layer.num_kv_heads,
                                layer.head_dim, g.granularity if g.enabled else "none")


def export_attention(layer: GatedAttention, layout: str) -> dict[str, np.ndarray]:
  """The torch state dict (`q_proj.weight`, ...) of `layer` in `layout`; inverse of
  `load_attention`. The layer's norm style must be the layout's."""
  shape = _shape_of(layer)
  if layer.q_norm is not None and layer.q_norm.style != NORM_STYLE[layout]:
    raise ValueError(f"layout {layout!r} needs norm_style {NORM_STYLE[layout]!r}, the layer"
                     f" has {layer.q_norm.style!r}")
  params = {path[0]: value for path, value in _flat_params(layer).items()}
  return layouts.attention_to_torch(params, layout, shape)


# --- whole official models ------------------------------------------------------

def config_from_hf(hf: Mapping[str, Any], *, dtype: str = "float32",
                   param_dtype: Optional[str] = None) -> TransformerConfig:
  """`TransformerConfig` from the official gated Qwen3 config.json (a dict).

  Reads `headwise_attn_output_gate` / `elementwise_attn_output_gate` (the official
  code's flags), `use_qk_norm` (default True) and rope_theta either at the top level
  or in transformers-5 `rope_parameters`. Qwen3 rotates every channel (it ignores any
  partial_rotary_factor). Raises on what the model cannot express:
  biases, sliding windows, RoPE scaling, activations other than SiLU.
  """
  rope_params = dict(hf.get("rope_parameters") or {})
  scaling = hf.get("rope_scaling") or {}
  rope_type = rope_params.get("rope_type", scaling.get("rope_type", scaling.get("type",
                                                                                "default")))
  unsupported = {
      "attention_bias / qkv_bias": hf.get("attention_bias") or hf.get("qkv_bias"),
      "use_sliding_window": hf.get("use_sliding_window"),
      f"rope_type {rope_type!r}": rope_type != "default",
      f"hidden_act {hf.get('hidden_act')!r}": hf.get("hidden_act", "silu") != "silu",
      "both gate flags": hf.get(HEADWISE_FLAG) and hf.get(ELEMENTWISE_FLAG),
  }
  bad = [name for name, present in unsupported.items() if present]
  if bad:
    raise ValueError(f"config.json has features the JAX model does not support: {bad}")
  granularity = ("headwise" if hf.get(HEADWISE_FLAG) else
                 "elementwise" if hf.get(ELEMENTWISE_FLAG) else None)
  gate = (GateConfig(position="sdpa", granularity=granularity, activation="sigmoid")
          if granularity else GateConfig())
  num_heads = hf["num_attention_heads"]
  return TransformerConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
      mlp_dim=hf["intermediate_size"], tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qk_norm=bool(hf.get("use_qk_norm", True)), norm_eps=hf.get("rms_norm_eps", 1e-6),
      norm_style="scale",
      rope_theta=float(rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))),
      gate=gate, dtype=dtype, param_dtype=param_dtype or dtype)


def config_to_hf(cfg: TransformerConfig) -> dict[str, Any]:
  """The official config.json fields for `cfg` (inverse of `config_from_hf`)."""
  if (cfg.norm_style, cfg.rope_scaling.method, cfg.partial_rotary_factor) != ("scale", "none", 1.0):
    raise ValueError("the official layout needs norm_style 'scale', full rotary and no RoPE"
                     " scaling")
  g = cfg.gate
  official_gate = GateConfig(position="sdpa", granularity=g.granularity)
  same = lambda f: getattr(g, f.name) == getattr(official_gate, f.name)
  if g.enabled and not all(same(f) for f in dataclasses.fields(g) if f.name != "init_mean"):
    raise ValueError(f"the official layout holds no gate but the G1 sigmoid output gate"
                     f" (head-specific, multiplicative, input-dependent, no bias), got"
                     f" {g.describe()!r}")
  return {
      "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.mlp_dim, "hidden_act": "silu",
      "tie_word_embeddings": cfg.tie_embeddings, "use_qk_norm": cfg.qk_norm,
      "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
      "attention_bias": False, "qkv_bias": False,
      HEADWISE_FLAG: g.enabled and g.granularity == "headwise",
      ELEMENTWISE_FLAG: g.enabled and g.granularity == "elementwise",
  }


def _block_names(i: int) -> dict[str, Path]:
  """Torch name (after `model.layers.{i}.`) → our path, for everything but attention."""
  return {"input_layernorm.weight": ("blocks", i, "attn_norm", "weight"),
          "post_attention_layernorm.weight": ("blocks", i, "mlp_norm", "weight"),
          "mlp.gate_proj.weight": ("blocks", i, "mlp", "gate_proj"),
          "mlp.up_proj.weight": ("blocks", i, "mlp", "up_proj"),
          "mlp.down_proj.weight": ("blocks", i, "mlp", "down_proj")}


def _attn_shape(cfg: TransformerConfig) -> layouts.AttentionShape:
  return layouts.AttentionShape(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                cfg.gate.granularity if cfg.gate.enabled else "none")


def params_from_official(weights: Mapping[str, np.ndarray],
                         cfg: TransformerConfig) -> dict[Path, np.ndarray]:
  """Official/HF Qwen3 torch names → our `Transformer` parameter paths and shapes."""
  weights = dict(weights)
  out: dict[Path, np.ndarray] = {("embed", "embedding"): weights.pop("model.embed_tokens.weight"),
                                 ("final_norm", "weight"): weights.pop("model.norm.weight")}
  head = weights.pop("lm_head.weight", None)
  if not cfg.tie_embeddings:
    if head is None:
      raise ValueError("untied model but the checkpoint has no lm_head.weight")
    out[("lm_head",)] = head.T
  shape = _attn_shape(cfg)
  for i in range(cfg.num_layers):
    prefix = f"model.layers.{i}."
    for name, path in _block_names(i).items():
      w = weights.pop(prefix + name)
      out[path] = w if w.ndim == 1 else w.T  # torch Linear (out, in) → (in, out)
    attn_prefix = prefix + "self_attn."
    attn = {name[len(attn_prefix):]: weights.pop(name) for name in list(weights)
            if name.startswith(attn_prefix)}
    for name, value in layouts.attention_from_torch(attn, "official", shape).items():
      out[("blocks", i, "attn", *_attention_path(name))] = value
  if weights:
    raise ValueError(f"checkpoint has weights the model does not use: {sorted(weights)}")
  return out


def params_to_official(model: Transformer) -> dict[str, np.ndarray]:
  """Inverse of `params_from_official`: torch names → arrays."""
  cfg = model.config
  params = _flat_params(model)
  out = {"model.embed_tokens.weight": params[("embed", "embedding")],
         "model.norm.weight": params[("final_norm", "weight")]}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = params[("lm_head",)].T
  shape = _attn_shape(cfg)
  for i in range(cfg.num_layers):
    prefix = f"model.layers.{i}."
    for name, path in _block_names(i).items():
      w = params[path]
      out[prefix + name] = w if w.ndim == 1 else w.T
    attn = {path[3]: value for path, value in params.items() if path[:3] == ("blocks", i, "attn")}
    for name, value in layouts.attention_to_torch(attn, "official", shape).items():
      out[prefix + "self_attn." + name] = value
  return {name: np.ascontiguousarray(value) for name, value in out.items()}


def load_official(directory: str | os.PathLike, *, dtype: str = "float32",
                  param_dtype: Optional[str] = None) -> Transformer:
  """A `Transformer` from an official gated-Qwen3 checkpoint directory (numpy only).

  The directory holds `config.json` and `model.safetensors` (or sharded files with
  `model.safetensors.index.json`); `model(tokens)` then gives the torch model's logits.
  """
  with open(os.path.join(directory, "config.json")) as f:
    cfg = config_from_hf(json.load(f), dtype=dtype, param_dtype=param_dtype)
  params = params_from_official(safetensors_io.load_checkpoint(directory), cfg)
  return _build(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), params)


def export_official(model: Transformer, directory: str | os.PathLike, *,
                    dtype: Optional[str] = None) -> None:
  """Writes `config.json` and `model.safetensors` in the official layout (`dtype`:
  one of `safetensors_io.WRITE_DTYPES`, or None to keep the parameter dtype)."""
  os.makedirs(directory, exist_ok=True)
  hf = config_to_hf(model.config)
  hf["torch_dtype"] = dtype or model.config.param_dtype
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  safetensors_io.save_file(params_to_official(model), os.path.join(directory, "model.safetensors"),
                           dtype=dtype, metadata={"format": "pt"})

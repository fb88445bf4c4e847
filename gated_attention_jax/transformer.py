"""A decoder-only language model with gated attention in every layer.

Token embedding (+ learned position embedding) → `num_layers` pre-norm blocks
(norm → GatedAttention → residual, norm → MLP → residual) → final norm → tied or
untied logits. The same `GateConfig` is used in every layer. Defaults are the
paper's Qwen3-style stack (RMSNorm, SwiGLU, RoPE); `norm_type="layernorm"`,
`mlp_type="relu"`, `position_embedding="learned"` give the GPT-2-style stack of
Guo et al.'s Bigram-Backcopy recipe. `scan_layers=True` stacks the blocks'
parameters along a leading `layers` axis and applies them with `nnx.scan` (one
block compiled once, as MaxText's `scan_layers`); `layer_stack` converts
parameters between the two layouts.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from gated_attention_jax import attention_ops
from gated_attention_jax import checks
from gated_attention_jax import layers
from gated_attention_jax import moe as moe_lib
from gated_attention_jax import rope
from gated_attention_jax import sharding
from gated_attention_jax.attention import (GatedAttention, check_mode, default_positions,
                                           resolve_mode)
from gated_attention_jax.gate import GateConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
          "float64": jnp.float64}  # float64 for reference tests (needs jax_enable_x64)
REMAT_POLICIES = ("none", "full", "save_matmuls")
POSITION_EMBEDDINGS = ("rope", "learned", "none")
MLP_TYPES = layers.MLP_TYPES + ("moe",)  # "moe": routed experts where `moe` makes a layer sparse


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Architecture of the LM; validated at construction.

  dtype is the compute dtype (activations, matmul inputs); param_dtype the
  storage dtype of the parameters. Logits, softmax and norms run in float32.
  """

  vocab_size: int = 512
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 64
  mlp_dim: int = 768
  tie_embeddings: bool = True
  qk_norm: bool = True
  norm_eps: float = 1e-6
  norm_style: str = "scale"
  rope_theta: float = 10000.0
  partial_rotary_factor: float = 1.0
  rope_scaling: rope.RopeScaling = rope.RopeScaling()
  position_embedding: str = "rope"  # one of POSITION_EMBEDDINGS
  max_positions: int = 0  # rows of the learned position table (position_embedding "learned")
  norm_type: str = "rmsnorm"  # one of layers.NORM_TYPES (block and final norms)
  mlp_type: str = "swiglu"  # one of MLP_TYPES
  moe: moe_lib.MoEConfig = moe_lib.MoEConfig()  # the sparse layers' experts (mlp_type "moe")
  gate: GateConfig = GateConfig()
  attention_impl: str = "xla"
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False  # blocks stacked on a leading "layers" axis, applied by nnx.scan

  def __post_init__(self):
    checks.positive_ints(**{f"model.{name}": getattr(self, name) for name in (
        "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
        "mlp_dim")})
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads ({self.num_heads}) must be a multiple of"
                       f" model.num_kv_heads ({self.num_kv_heads})")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"model.{name} must be one of {tuple(DTYPES)}, got"
                         f" {getattr(self, name)!r}")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"model.scan_layers must be a bool, got {self.scan_layers!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    for name, allowed in (("position_embedding", POSITION_EMBEDDINGS),
                          ("norm_type", layers.NORM_TYPES), ("mlp_type", MLP_TYPES)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.{name} must be one of {allowed}, got {getattr(self, name)!r}")
    if (self.position_embedding == "learned") != (self.max_positions > 0):
      raise ValueError(f"model.max_positions must be > 0 exactly when model.position_embedding"
                       f" is 'learned', got {self.max_positions!r} with"
                       f" {self.position_embedding!r}")
    if self.norm_style not in layers.NORM_STYLES:
      raise ValueError(f"model.norm_style must be one of {layers.NORM_STYLES}, got"
                       f" {self.norm_style!r}")
    if self.attention_impl not in attention_ops.ATTENTION_IMPLS:
      raise ValueError(f"model.attention_impl must be one of"
                       f" {attention_ops.ATTENTION_IMPLS}, got {self.attention_impl!r}")
    if self.position_embedding == "rope":
      rope.rotary_dim(self.head_dim, self.partial_rotary_factor, prefix="model.")
    checks.positive_floats(**{f"model.{name}": getattr(self, name)
                              for name in ("rope_theta", "norm_eps")})
    if not isinstance(self.gate, GateConfig):
      raise ValueError(f"model.gate must be a GateConfig, got {type(self.gate).__name__}")
    if self.mlp_type == "moe":
      sparse = self.moe.sparse_layers(self.num_layers)
      if not sparse:
        raise ValueError(f"model.moe.sparse_step ({self.moe.sparse_step}) and"
                         f" model.moe.dense_layers ({list(self.moe.dense_layers)}) select no"
                         f" layer of {self.num_layers} to be sparse")
      if self.scan_layers and len(sparse) != self.num_layers:
        raise ValueError(f"model.scan_layers stacks alike layers, but model.moe makes only"
                         f" layers {list(sparse)} of {self.num_layers} sparse: set"
                         " model.scan_layers=False, or moe.sparse_step=1 and no dense_layers")

  @classmethod
  def from_dict(cls, model: Mapping[str, Any],
                gate: Optional[Mapping[str, Any]] = None) -> "TransformerConfig":
    """Builds from config sections (ml_collections `config.model`, `config.gate`).

    `model.rope_scaling`, if present, is a mapping of `RopeScaling` fields.
    """
    values = dict(model)
    allowed = {f.name for f in dataclasses.fields(cls)} - {"gate"}
    unknown = sorted(set(values) - allowed)
    if unknown:
      raise ValueError(f"model has no fields {unknown}; allowed fields are {sorted(allowed)}")
    if "rope_scaling" in values:
      values["rope_scaling"] = rope.RopeScaling(**dict(values["rope_scaling"]))
    if "moe" in values:
      values["moe"] = moe_lib.MoEConfig.from_dict(values["moe"])
    return cls(**values, gate=GateConfig.from_dict(gate or {}))

  def replace(self, **changes: Any) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)


def _norm(cfg: TransformerConfig, rngs: nnx.Rngs) -> nnx.Module:
  return layers.make_norm(cfg.norm_type, cfg.d_model, eps=cfg.norm_eps, style=cfg.norm_style,
                          param_dtype=DTYPES[cfg.param_dtype], rngs=rngs)


class Block(nnx.Module):
  """Pre-norm transformer block; its MLP is the routed experts (`moe.MoE`) where the config
  makes layer `layer` sparse (every layer alike when `layer` is None: the scanned stack)."""

  def __init__(self, cfg: TransformerConfig, *, layer: Optional[int] = None, rngs: nnx.Rngs):
    p = DTYPES[cfg.param_dtype]
    self.attn_norm = _norm(cfg, rngs)
    self.attn = GatedAttention(
        cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.gate,
        rope_theta=cfg.rope_theta, partial_rotary_factor=cfg.partial_rotary_factor,
        rope_scaling=cfg.rope_scaling, use_rope=cfg.position_embedding == "rope",
        qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps,
        norm_style=cfg.norm_style, attention_impl=cfg.attention_impl,
        dtype=DTYPES[cfg.dtype], param_dtype=p, rngs=rngs)
    self.mlp_norm = _norm(cfg, rngs)
    if cfg.mlp_type == "moe" and (layer is None or cfg.moe.is_sparse(layer)):
      self.mlp = moe_lib.MoE(cfg.d_model, cfg.moe, param_dtype=p, rngs=rngs)
    else:
      self.mlp = layers.make_mlp("swiglu" if cfg.mlp_type == "moe" else cfg.mlp_type,
                                 cfg.d_model, cfg.mlp_dim, param_dtype=p, rngs=rngs)

  def __call__(self, x: jax.Array, positions: Optional[jax.Array],
               segment_ids: Optional[jax.Array], mode: str, return_intermediates: bool):
    attn = self.attn.forward(self.attn_norm(x), positions, segment_ids, mode=mode,
                             intermediates=return_intermediates)
    inter = attn.intermediates
    h = sharding.constrain(x + attn.out, ("batch", "seq", "embed"))
    if isinstance(self.mlp, moe_lib.MoE):  # padding (segment 0) left out of its balancing terms
      mlp, balance = self.mlp(self.mlp_norm(h),
                              None if segment_ids is None else segment_ids > 0)
      if return_intermediates:
        inter = {**inter, **balance}
    else:
      mlp = self.mlp(self.mlp_norm(h))
    out = sharding.constrain(h + mlp, ("batch", "seq", "embed"))
    return out, inter


def _remat_policy(name: str):
  if name == "save_matmuls":
    return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
  return None


_NO_SCANNED_DECODE = ("KV-cache decoding is not supported with model.scan_layers=True: decode"
                      " with the unrolled twin, layer_stack.unroll(model) (generate does so)")


def _stacked_blocks(cfg: TransformerConfig, rngs: nnx.Rngs) -> Block:
  """`num_layers` blocks as one `Block` whose parameters have a leading `layers` axis."""

  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs: nnx.Rngs) -> Block:
    return Block(cfg, rngs=rngs)

  return make(rngs)


def _loop_blocks(blocks: nnx.List, cfg: TransformerConfig, x: jax.Array,
                 positions: Optional[jax.Array], segment_ids: Optional[jax.Array],
                 mode: str, return_intermediates: bool):
  """Unrolled stack: `x` `(B, T, D)` through each block; per-layer lists of intermediates."""
  run_block = Block.__call__
  if cfg.remat != "none":
    run_block = nnx.remat(run_block, policy=_remat_policy(cfg.remat), static_argnums=(4, 5))
  collected: dict[str, list[jax.Array]] = {}
  for block in blocks:
    x, inter = run_block(block, x, positions, segment_ids, mode, return_intermediates)
    if return_intermediates:
      for name, value in {"hidden_states": x, **inter}.items():
        collected.setdefault(name, []).append(value)
  return x, collected


def _scan_blocks(blocks: Block, cfg: TransformerConfig, x: jax.Array,
                 positions: Optional[jax.Array], segment_ids: Optional[jax.Array],
                 return_intermediates: bool):
  """Stacked blocks applied by `nnx.scan` (remat per block); the same outputs as `_loop_blocks`."""

  def apply(block: Block, x: jax.Array):
    return block(x, positions, segment_ids, "train", return_intermediates)

  if cfg.remat != "none":
    apply = nnx.remat(apply, policy=_remat_policy(cfg.remat))

  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0),
            transform_metadata={nnx.PARTITION_NAME: "layers"})
  def step(block: Block, x: jax.Array):
    x, inter = apply(block, x)
    return x, ({"hidden_states": x, **inter} if return_intermediates else {})

  x, stacked = step(blocks, x)
  return x, {name: list(value) for name, value in stacked.items()}


class Transformer(nnx.Module):
  """Decoder-only LM. `model(tokens)` with tokens `(B, T)` → float32 logits `(B, T, V)`.

  `model.forward(tokens, ..., intermediates=True)` returns a `ModelOutput` whose
  intermediates hold per-layer lists: `hidden_states` (block outputs `(B, T, D)`),
  `queries` `(B, T, N, H)`, `keys` and `values` `(B, S, K, H)`, and, where available, `attention_probs` `(B, N, T, S)`
  ("xla" path) and `gate_scores` (the same lists with `scan_layers`); the sparse layers'
  balancing terms (`moe.balance_terms`: `moe_balance_loss`, `moe_router_z_loss`,
  `moe_expert_load`, `moe_router_entropy`, scalars, one per sparse layer).

  Decoding: `model.init_cache(batch, max_length)`, then `mode="decode"` calls append to
  every layer's KV cache; `mode="prefill"` marks a prompt written from slot 0, attended
  with the config's `attention_impl` (see `GatedAttention.forward`, and `generate`). The
  booleans `decode=True` / `prefill=True` of earlier versions still work, deprecated.
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    p = DTYPES[cfg.param_dtype]
    self.embed = layers.Embed(cfg.vocab_size, cfg.d_model, param_dtype=p, rngs=rngs)
    self.pos_embed = None if cfg.position_embedding != "learned" else layers.make_param(
        rngs, (cfg.max_positions, cfg.d_model), (None, "embed"), layers.normal_init(), p)
    if cfg.scan_layers:
      self.blocks = _stacked_blocks(cfg, rngs)
    else:
      self.blocks = nnx.List([Block(cfg, layer=i, rngs=rngs) for i in range(cfg.num_layers)])
    self.final_norm = _norm(cfg, rngs)
    self.lm_head = None if cfg.tie_embeddings else layers.make_param(
        rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), layers.normal_init(), p)

  def _positions(self, tokens: jax.Array, positions: Optional[jax.Array],
                 segment_ids: Optional[jax.Array], decode: bool) -> jax.Array:
    """Rows of the learned position table: given, else the cache's next slots when
    decoding, else per segment, else 0..T-1."""
    if positions is not None:
      return positions
    if decode:
      cache_index = self.blocks[0].attn.cache_index
      if cache_index is None:
        raise ValueError("decode=True needs a cache: call init_cache(batch, max_length) first")
      return cache_index[...][:, None] + jnp.arange(tokens.shape[1])
    return default_positions(tokens.shape, segment_ids)

  def init_cache(self, batch_size: int, max_length: int) -> None:
    """Allocates every layer's KV cache for decoding (see `GatedAttention.init_cache`)."""
    if self.config.scan_layers:
      raise ValueError(_NO_SCANNED_DECODE)
    for block in self.blocks:
      block.attn.init_cache(batch_size, max_length)

  def __call__(self, tokens: jax.Array, positions: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None, *, mode: Optional[str] = None,
               decode: bool = False, prefill: bool = False,
               return_intermediates: bool = False):
    """tokens `(B, T)` → logits `(B, T, V)`: `forward(...).logits`.

    Deprecated, kept working for a release: `decode=True` / `prefill=True` (use `mode`) and
    `return_intermediates=True`, which returns `(logits, intermediates)`: use
    `forward(..., intermediates=True)`, whose return type does not change.
    """
    mode = resolve_mode(mode, decode, prefill)
    if return_intermediates:
      warnings.warn("Transformer(return_intermediates=True) is deprecated: use"
                    " model.forward(tokens, ..., intermediates=True), a ModelOutput",
                    DeprecationWarning, stacklevel=2)
      result = self.forward(tokens, positions, segment_ids, mode=mode, intermediates=True)
      return result.logits, result.intermediates
    return self.forward(tokens, positions, segment_ids, mode=mode).logits

  def forward(self, tokens: jax.Array, positions: Optional[jax.Array] = None,
              segment_ids: Optional[jax.Array] = None, *, mode: str = "train",
              intermediates: bool = False) -> "ModelOutput":
    """tokens `(B, T)` → `ModelOutput(logits (B, T, V) float32, intermediates)`; `mode` as in
    `GatedAttention.forward`, the intermediates (per-layer lists, see the class docstring)
    filled when `intermediates`."""
    cfg = self.config
    check_mode(mode)
    return_intermediates = intermediates
    x = self.embed(tokens, DTYPES[cfg.dtype])
    if self.pos_embed is not None:
      x = x + jnp.take(self.pos_embed[...], self._positions(tokens, positions, segment_ids,
                                                              mode == "decode"),
                       axis=0).astype(x.dtype)
    x = sharding.constrain(x, ("batch", "seq", "embed"))
    if cfg.scan_layers:
      if mode != "train":
        raise ValueError(_NO_SCANNED_DECODE)
      x, collected = _scan_blocks(self.blocks, cfg, x, positions, segment_ids,
                                  return_intermediates)
    else:
      x, collected = _loop_blocks(self.blocks, cfg, x, positions, segment_ids, mode,
                                  return_intermediates)
    x = self.final_norm(x)
    if self.lm_head is None:
      logits = self.embed.attend(x)
    else:
      logits = jnp.einsum("BTD,DV->BTV", x, self.lm_head[...].astype(x.dtype),
                          preferred_element_type=layers.accum_dtype(x.dtype))
    return ModelOutput(logits, collected)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["logits", "intermediates"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class ModelOutput:
  """What `Transformer.forward` returns (a pytree: returnable from `jit`): float32 logits
  `(B, T, V)` and the per-layer intermediates (empty unless asked for)."""

  logits: jax.Array
  intermediates: dict[str, list[jax.Array]]

"""`GatedAttention`: softmax attention with a gate at any position the paper studies.

The layer owns the parameters and projections; the attention math lives in
`attention_ops`. Einsum names: B batch, T query length, S key length, D model
dim, N query heads, K kv heads, H head_dim.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gated_attention_jax import attention_ops
from gated_attention_jax import checks
from gated_attention_jax import gate as gate_lib
from gated_attention_jax import layers
from gated_attention_jax import rope
from gated_attention_jax import sharding
from gated_attention_jax.gate import GateConfig
from gated_attention_jax.kernels import platform

Intermediates = dict[str, jax.Array]


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """Positions that restart at 0 where the segment id changes: `(B, T)` → `(B, T)`."""
  idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
  changed = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=1)
  starts = jax.lax.cummax(jnp.where(changed, idx, 0), axis=1)
  return idx - starts


def default_positions(shape: tuple[int, int], segment_ids: Optional[jax.Array],
                      offset: jax.Array | int = 0) -> jax.Array:
  """Positions `(B, T)` when none are given: per segment, else offset + 0..T-1."""
  if segment_ids is not None:
    return positions_from_segments(segment_ids)
  return jnp.broadcast_to(jnp.arange(shape[1]) + offset, shape)


class GatedAttention(nnx.Module):
  """Multi-head (GQA/MQA) softmax attention with RoPE, QK-norm and a configurable gate.

  Call `layer(x, positions=None, segment_ids=None, mode="train")` with x `(B, T, D)`; it
  returns `(B, T, D)`. `layer.forward(x, ..., intermediates=True)` returns an
  `AttentionOutput` with the output and the intermediates (queries and keys as they enter
  the dot product, values, the "xla" path's probabilities, gate scores). The call runs in
  three steps, `_project`, `_attend` and `_output` (see `forward`).

  Gemma 2/3-style attention: `sliding_window=w` (keys less than w positions from the query:
  with `causal`, the w keys ending at it), `logit_soft_cap=c` (c · tanh(logits / c) on the
  scaled logits, before the mask) and `query_scale` (the logit scale, default head_dim^-0.5);
  a boolean `mask` per call (see `forward`), e.g. left padding.

  `attention_impl`: "xla" (the reference; the only one with `attention_probs`), "cudnn",
  "pallas" (the fused kernel) or "auto": chosen per call for the platform being compiled for
  (`attention_ops.choose_impl`: the kernel on TPU, cuDNN on GPU where it serves the inputs,
  "xla" on CPU), so a layer traced for a TPU from a CPU machine gets the TPU's choice.

  KV-cache decoding: `layer.init_cache(batch, max_length)`, then calls with
  `mode="decode"` (a prompt first, then one token at a time) append to the cache.
  `mode="prefill"` marks a call whose tokens start every row at cache slot 0: its queries
  attend to its own keys with the layer's `attention_impl` (the fused kernel or cuDNN;
  cached steps run the "xla" path). The booleans `decode=True` / `prefill=True` of earlier
  versions still work, deprecated.
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
               gate: GateConfig = GateConfig(), *, rope_theta: float = 10000.0,
               partial_rotary_factor: float = 1.0,
               rope_scaling: rope.RopeScaling = rope.RopeScaling(), use_rope: bool = True,
               qk_norm: bool = False, norm_eps: float = 1e-6, norm_style: str = "scale",
               causal: bool = True, sliding_window: Optional[int] = None,
               logit_soft_cap: Optional[float] = None, query_scale: Optional[float] = None,
               attention_impl: str = "xla",
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    checks.positive_ints(d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim)
    if num_heads % num_kv_heads:
      raise ValueError(
          f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if not isinstance(gate, GateConfig):
      raise ValueError(f"gate must be a GateConfig, got {type(gate).__name__}")
    attention_ops.check_impl(attention_impl)
    checks.positive_floats(rope_theta=rope_theta, norm_eps=norm_eps, **checks.given(
        logit_soft_cap=logit_soft_cap, query_scale=query_scale))
    checks.positive_ints(**checks.given(sliding_window=sliding_window))
    if use_rope:
      rope.rotary_dim(head_dim, partial_rotary_factor)  # a fraction giving an even count

    self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = (
        d_model, num_heads, num_kv_heads, head_dim)
    self.gate = gate
    self.rope_theta = rope_theta
    self.partial_rotary_factor = partial_rotary_factor
    self.rope_scaling = rope_scaling
    self.use_rope = use_rope
    self.causal = causal
    self.sliding_window = sliding_window
    self.logit_soft_cap = logit_soft_cap
    self.query_scale = head_dim ** -0.5 if query_scale is None else query_scale
    self.attention_impl = attention_impl
    self.dtype = dtype

    init = layers.normal_init()
    p = param_dtype
    self.q_proj = layers.make_param(rngs, (d_model, num_heads, head_dim),
                                    ("embed", "q_heads", "head_dim"), init, p)
    self.k_proj = layers.make_param(rngs, (d_model, num_kv_heads, head_dim),
                                    ("embed", "kv_heads", "head_dim"), init, p)
    self.v_proj = layers.make_param(rngs, (d_model, num_kv_heads, head_dim),
                                    ("embed", "kv_heads", "head_dim"), init, p)
    self.o_proj = layers.make_param(rngs, (num_heads, head_dim, d_model),
                                    ("q_heads", "head_dim", "embed"), init, p)
    norm = dict(eps=norm_eps, style=norm_style, axis_name="head_dim", param_dtype=p,
                rngs=rngs)
    self.q_norm = layers.RMSNorm(head_dim, **norm) if qk_norm else None
    self.k_norm = layers.RMSNorm(head_dim, **norm) if qk_norm else None
    self.sdpa_norm = (layers.RMSNorm(head_dim, **norm)
                      if gate.sdpa_transform == "rmsnorm" else None)

    self.attn_gate_proj, self.gate_theta, self.gate_bias = gate_lib.make_params(
        gate, rngs, d_model, num_heads, num_kv_heads, head_dim, param_dtype=p)

    self.cached_key = nnx.data(None)
    self.cached_value = nnx.data(None)
    self.cache_index = nnx.data(None)
    self.cache_overflow = nnx.data(None)

  # --- the gate -------------------------------------------------------------

  def gate_score_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Per-token shape of the gate scores and its logical axis names (`GateConfig.score_shape`)."""
    return self.gate.score_shape(self.d_model, self.num_heads, self.num_kv_heads, self.head_dim)

  def gate_logits(self, x: jax.Array) -> jax.Array:
    """Pre-activation gate `(B, T, *gate_score_shape)` from the pre-normed input x."""
    return gate_lib.logits(x, self.attn_gate_proj, self.gate_theta, self.gate_bias)

  def gate_scores(self, logits: jax.Array) -> jax.Array:
    """act(logits), averaged over heads for head-shared gates."""
    return gate_lib.scores(logits, self.gate, self.num_kv_heads)

  def fuses_gate(self) -> bool:
    """Whether the G1 gate goes into the attention op (the flash kernel's epilogue)."""
    g = self.gate
    return (g.position == "sdpa" and g.combine == "multiply"
            and g.sharing == "head_specific" and g.sdpa_transform == "none")

  # --- KV cache -------------------------------------------------------------

  def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> None:
    """Allocates an empty KV cache `(B, max_length, K, H)` for decoding.

    Each row keeps its own position: `cache_index` `(B,)` is the next free slot of
    every row, and `cache_overflow` `(B,)` records rows that were asked to write
    past `max_length` (see `__call__`).
    """
    checks.positive_ints(batch_size=batch_size, max_length=max_length)
    shape = (batch_size, max_length, self.num_kv_heads, self.head_dim)
    dtype = dtype or self.dtype
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
    self.cache_index = nnx.Cache(jnp.zeros((batch_size,), jnp.int32))
    self.cache_overflow = nnx.Cache(jnp.zeros((batch_size,), bool))

  def _check_cache(self, b: int, t: int) -> None:
    """Static checks of a decode call of `(b, t)` tokens against the cache."""
    if self.cache_index is None:
      raise ValueError("decode=True needs a cache: call init_cache(batch, max_length) first")
    cache_b, max_length = self.cached_key.shape[:2]
    if b != cache_b:
      raise ValueError(f"x has batch {b} but the KV cache was allocated for batch {cache_b}"
                       f" (init_cache(batch_size={cache_b}, ...))")
    if t > max_length:
      raise ValueError(f"x has {t} tokens, more than the KV cache holds"
                       f" (max_length={max_length})")

  def _append_to_cache(self, k: jax.Array, v: jax.Array, start: jax.Array
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Writes k, v `(B, T, K, H)` at slots start..start+T-1 of each row.

    Returns the whole cache (keys, values) and the per-row overflow flags `(B,)`.
    Slots past max_length are dropped (never wrapped onto earlier ones).
    """
    b, t = k.shape[:2]
    max_length = self.cached_key.shape[1]
    overflow = start + t > max_length
    if not isinstance(start, jax.core.Tracer) and bool(overflow.any()):
      rows = np.flatnonzero(np.asarray(overflow)).tolist()
      raise ValueError(
          f"decoding {t} token(s) from cache slot(s) {np.asarray(start)[rows].tolist()} of rows"
          f" {rows} overflows the KV cache (max_length={max_length}); allocate a longer cache"
          f" with init_cache")
    slots = start[:, None] + jnp.arange(t)
    rows = jnp.arange(b)[:, None]
    keys = self.cached_key[...].at[rows, slots].set(k.astype(self.cached_key.dtype), mode="drop")
    values = self.cached_value[...].at[rows, slots].set(v.astype(self.cached_value.dtype),
                                                        mode="drop")
    self.cached_key[...] = keys
    self.cached_value[...] = values
    self.cache_index[...] = start + t
    self.cache_overflow[...] = self.cache_overflow[...] | overflow
    return keys, values, overflow

  def _checked_inputs(self, x: jax.Array, positions: Optional[jax.Array],
                      segment_ids: Optional[jax.Array]):
    """(positions, segment_ids) broadcast to (B, T); ValueErrors naming the argument and both
    shapes (static shapes and dtypes only). A leading 1 broadcasts over the batch."""
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"x must be (batch, seq, {self.d_model}), got shape {x.shape}")
    if x.shape[1] == 0:
      raise ValueError(f"x has an empty sequence axis (shape {x.shape}); pass at least one token")
    checked = []
    for name, value in (("positions", positions), ("segment_ids", segment_ids)):
      if value is not None:
        if value.ndim != 2 or value.shape[0] not in (1, x.shape[0]) or value.shape[1] != x.shape[1]:
          raise ValueError(f"{name} must have shape (batch, seq) = {tuple(x.shape[:2])} like x,"
                           f" got {tuple(value.shape)} (a batch of 1 broadcasts)")
        if not jnp.issubdtype(value.dtype, jnp.integer):
          raise ValueError(f"{name} must be integers, got dtype {value.dtype}")
        value = jnp.broadcast_to(value, x.shape[:2])
      checked.append(value)
    return tuple(checked)

  def _checked_mask(self, mask: jax.Array, b: int, t: int, s: int) -> jax.Array:
    """`mask` as a 4-D boolean array broadcastable to (b, num_heads, t, s), else ValueError
    naming the shapes."""
    want = (b, self.num_heads, t, s)
    if (mask.dtype != jnp.bool_ or mask.ndim != 4
        or any(m not in (1, w) for m, w in zip(mask.shape, want))):
      raise ValueError(f"mask must be boolean and broadcastable to (batch, num_heads, T, S) ="
                       f" {want}, got {mask.dtype}{list(mask.shape)}")
    return mask

  # --- forward --------------------------------------------------------------

  def __call__(self, x: jax.Array, positions: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None, *, mask: Optional[jax.Array] = None,
               mode: Optional[str] = None,
               decode: bool = False, prefill: bool = False,
               return_intermediates: bool = False):
    """x `(B, T, D)` → `(B, T, D)`: `forward(...).out`.

    `mode` as in `forward`. Deprecated, kept working for a release: `decode=True`
    (mode "decode") and `decode=True, prefill=True` (mode "prefill"), and
    `return_intermediates=True`, which returns `(out, intermediates)`: use
    `forward(..., intermediates=True)`, whose return type does not change.
    """
    mode = resolve_mode(mode, decode, prefill)
    if return_intermediates:
      warnings.warn("GatedAttention(return_intermediates=True) is deprecated: use"
                    " layer.forward(x, ..., intermediates=True), an AttentionOutput",
                    DeprecationWarning, stacklevel=2)
      result = self.forward(x, positions, segment_ids, mask=mask, mode=mode, intermediates=True)
      return result.out, result.intermediates
    return self.forward(x, positions, segment_ids, mask=mask, mode=mode).out

  def forward(self, x: jax.Array, positions: Optional[jax.Array] = None,
              segment_ids: Optional[jax.Array] = None, *, mask: Optional[jax.Array] = None,
              mode: str = "train", intermediates: bool = False) -> "AttentionOutput":
    """x `(B, T, D)` → `AttentionOutput(out (B, T, D), intermediates)`, in three steps:
    `_project` (gate scores, q, k, v with any G2-G4 gate, QK-norm, RoPE), `_attend` (the KV
    cache, the attention op with a fused G1 gate) and `_output` (SDPA transform, unfused
    G1, W_O, G5).

    positions, segment_ids: `(B, T)` (or `(1, T)`) integers or None.
    mask: boolean, broadcastable to `(B, num_heads, T, S)` (S: T, or the cache's max_length
      when decoding), True where a query may see a key; combined with `causal`, the window and
      `segment_ids`. A padding mask `(B, 1, 1, S)` runs on every impl ("pallas" as segment
      ids); other masks on "xla" and "cudnn" only (ValueError naming the impl).
    mode (`MODES`): "train" — a forward pass over whole sequences (training, evaluation,
      analysis); "decode" — the T tokens of row b go to cache slots s..s+T-1, s =
      `positions[b, 0]` if positions are given (consecutive per row), else the row's
      `cache_index`, each query attending to the slots up to its own; "prefill" — the T
      tokens go to slots 0..T-1 of every row (positions, if given, must start at 0) and are
      attended with `attention_impl`, as in "train". A call that would write past the
      cache's max_length raises ValueError when its slots are concrete; under `jit` the rows
      that overflow return NaN and set `cache_overflow` (sticky, `(B,)` bool), so they never
      pass for real outputs.
    intermediates: also fill `AttentionOutput.intermediates` (see the class docstring).
    """
    positions, segment_ids = self._checked_inputs(x, positions, segment_ids)
    self._check_mode(mode, positions, segment_ids)
    b, t, _ = x.shape
    start = None
    if mode != "train":
      self._check_cache(b, t)
      start = (jnp.zeros((b,), jnp.int32) if mode == "prefill" else self.cache_index[...]
               if positions is None else jnp.asarray(positions[:, 0], jnp.int32))
      if positions is None:
        positions = start[:, None] + jnp.arange(t)
    elif positions is None:
      positions = default_positions((b, t), segment_ids)
    if mask is not None:
      mask = self._checked_mask(mask, b, t, self.cached_key.shape[1] if mode == "decode" else t)
    x = x.astype(self.dtype)
    logits, scores, q, k, v = self._project(x, positions, intermediates)
    y, probs, overflow, (keys, values) = self._attend(
        q, k, v, segment_ids, mask, mode, start, logits if self.fuses_gate() else None,
        intermediates)
    out = self._output(y, scores, fused=self.fuses_gate())
    if overflow is not None:
      out = jnp.where(overflow[:, None, None], jnp.nan, out)
    if not intermediates:
      return AttentionOutput(out, {})
    inter: Intermediates = {"queries": q, "keys": keys, "values": values}
    if probs is not None:
      inter["attention_probs"] = probs
    if scores is not None:
      inter["gate_scores"] = scores
    return AttentionOutput(out, inter)

  def _check_mode(self, mode: str, positions: Optional[jax.Array],
                  segment_ids: Optional[jax.Array]) -> None:
    check_mode(mode)
    if mode != "train" and (segment_ids is not None or not self.causal):
      raise ValueError("decode=True needs a causal layer and no segment_ids")
    if mode == "prefill" and positions is not None and not isinstance(
        positions, jax.core.Tracer) and (np.asarray(positions)[:, 0] != 0).any():
      raise ValueError("prefill=True writes every row from cache slot 0: positions must start"
                       f" at 0, got first positions {np.asarray(positions)[:, 0].tolist()}")

  def _project(self, x: jax.Array, positions: jax.Array, intermediates: bool):
    """(gate logits, gate scores, q, k, v): q `(B, T, N, H)`, k, v `(B, T, K, H)` with any
    G2-G4 gate applied, QK-norm and RoPE; the scores None where no gate needs them (a G1
    gate fused into the kernel, unless intermediates are asked for)."""
    g, dt = self.gate, self.dtype
    logits = self.gate_logits(x) if g.enabled else None
    if logits is not None:  # gate slices split exactly as the heads they gate
      logits = sharding.constrain(logits, ("batch", "seq", *self.gate_score_shape()[1]))
    scores = self.gate_scores(logits) if g.enabled and not (
        self.fuses_gate() and not intermediates) else None

    q = jnp.einsum("BTD,DNH->BTNH", x, self.q_proj[...].astype(dt))
    k = jnp.einsum("BTD,DKH->BTKH", x, self.k_proj[...].astype(dt))
    v = jnp.einsum("BTD,DKH->BTKH", x, self.v_proj[...].astype(dt))
    q = sharding.constrain(q, ("batch", "seq", "q_heads", "head_dim"))
    k = sharding.constrain(k, ("batch", "seq", "kv_heads", "head_dim"))
    v = sharding.constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
    if g.position == "query":
      q = gate_lib.combine(q, scores, g.combine)
    elif g.position == "key":
      k = gate_lib.combine(k, scores, g.combine)
    elif g.position == "value":
      v = gate_lib.combine(v, scores, g.combine)

    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.use_rope:
      rope_args = dict(theta=self.rope_theta, partial_rotary_factor=self.partial_rotary_factor,
                       scaling=self.rope_scaling)
      q = rope.apply_rope(q, positions, **rope_args)
      k = rope.apply_rope(k, positions, **rope_args)
    return logits, scores, q, k, v

  def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array,
              segment_ids: Optional[jax.Array], mask: Optional[jax.Array], mode: str,
              start: Optional[jax.Array],
              fused_logits: Optional[jax.Array], intermediates: bool):
    """(y `(B, T, N, H)`, probabilities or None, per-row cache overflow or None, (the keys,
    values attended)). Decoding appends k, v to the cache first and attends over it;
    `fused_logits`: a G1 gate applied by the attention op (in the kernel's epilogue)."""
    q_offset, overflow, impl = 0, None, self.attention_impl
    if mode != "train":
      cached_k, cached_v, overflow = self._append_to_cache(k, v, start)
      if mode == "prefill":  # the queries see only this call's keys: no cache
        if impl == "cudnn" and platform.target_platform() != "gpu":
          impl = "xla"  # cuDNN exists on GPUs only; generation elsewhere still works
      else:  # cached steps: the explicit cache-offset mask of the "xla" path
        k, v, q_offset, impl = cached_k, cached_v, start, "xla"
    impl = attention_ops.resolve_impl(impl, q, k, segment_ids is not None, mask,
                                      self.logit_soft_cap)
    y, probs = attention_ops.attend(
        q, k, v, impl=impl, scale=self.query_scale, causal=self.causal,
        q_offset=q_offset, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, mask=mask,
        sliding_window=self.sliding_window, logit_soft_cap=self.logit_soft_cap,
        fused_gate=fused_logits,
        gate_activation=self.gate.activation,
        return_probs=intermediates and impl == "xla")
    return y, probs, overflow, (k, v)

  def _output(self, y: jax.Array, scores: Optional[jax.Array], fused: bool) -> jax.Array:
    """The SDPA transform, an unfused G1 gate, W_O and a G5 gate: `(B, T, N, H)` →
    `(B, T, D)`."""
    g = self.gate
    if g.sdpa_transform == "rmsnorm":
      y = self.sdpa_norm(y)
    elif g.sdpa_transform == "silu":
      y = jax.nn.silu(y)
    if g.position == "sdpa" and not fused:
      y = gate_lib.combine(y, scores, g.combine)
    out = jnp.einsum("BTNH,NHD->BTD", y, self.o_proj[...].astype(self.dtype))
    if g.position == "dense":
      out = gate_lib.combine(out, scores, g.combine)
    return out


MODES = ("train", "prefill", "decode")  # GatedAttention.forward's call modes


def resolve_mode(mode: Optional[str], decode: bool, prefill: bool) -> str:
  """The call mode from `mode` or the deprecated `decode` / `prefill` booleans (which warn)."""
  if prefill and not decode:
    raise ValueError("prefill=True fills the KV cache: it needs decode=True")
  legacy = "prefill" if prefill else "decode" if decode else None
  if legacy is not None:
    warnings.warn(f"decode=/prefill= are deprecated: pass mode={legacy!r}", DeprecationWarning,
                  stacklevel=3)
    if mode is not None and mode != legacy:
      raise ValueError(f"mode={mode!r} contradicts decode={decode}, prefill={prefill}: pass"
                       " mode only")
    return legacy
  if mode is None:
    return "train"
  check_mode(mode)
  return mode


def check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["out", "intermediates"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class AttentionOutput:
  """What `GatedAttention.forward` returns (a pytree: returnable from `jit`).

  out: `(B, T, D)`.
  intermediates: empty unless asked for; then `queries` `(B, T, N, H)` and `keys`
    `(B, S, K, H)` as they enter the dot product (after QK-norm and RoPE; decoding: the
    whole cache), `values` `(B, S, K, H)` (after any G2 gate), `attention_probs`
    `(B, N, T, S)` on the "xla" path, and for gated layers `gate_scores`: the gate values
    after activation and sharing, `(B, T, heads[, H])` or `(B, T, D)`.
  """

  out: jax.Array
  intermediates: Intermediates

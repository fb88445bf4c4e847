"""Mixture-of-experts feed-forward block: routed SwiGLU experts, dropless, with balancing terms.

`MoEConfig` (the model config's `moe` section, used where `mlp_type="moe"`): E routed SwiGLU
experts of hidden size F; each token goes to its top-k experts by a softmax router (weights
renormalised over the k when `normalize_top_k`, Qwen3-MoE's `norm_topk_prob`); optional
shared experts every token uses (Qwen3-Next: one, scaled by a sigmoid gate of the token);
which layers are sparse follows Qwen3-MoE (`sparse_step` = `decoder_sparse_step`,
`dense_layers` = `mlp_only_layers`): the others keep the dense SwiGLU of `mlp_dim`.

Dropless: every (token, expert) assignment is computed. The N·k assignments are sorted by
expert and the experts applied to their groups (no capacity, no capacity factor, no
hand-written kernel), then unsorted and weighted: with `jax.lax.ragged_dot` on TPU, where
libtpu groups it, and elsewhere ("blocked") with each group padded to whole blocks and one
batched matmul, since XLA's CPU and GPU compilers densify ragged_dot (`expert_matmul_impl`).
Expert parallelism: under a mesh whose `expert` axis is larger than 1 the experts are split
over it and the tokens exchanged inside `jax.shard_map` (`expert_parallel`).

Balancing terms (returned by `MoE.__call__` per layer, weighted in the train step):
  balance loss  E · Σ_e f_e · P_e, with f_e the fraction of the N·k assignments routed to
                expert e and P_e the mean router probability of e over the N tokens: 1 when
                routing is uniform (Switch Transformer's loss, normalised by k). Computed
                over all tokens of the step's (global) batch, under sharding too, but
                padding (segment id 0 in packed batches), which every term leaves out.
  router z-loss mean over tokens of logsumexp(router logits)² (ST-MoE).
Statistics: expert load (max / mean assignments per expert; 1 is balanced) and the router's
mean entropy (nats).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from gated_attention_jax import checks
from gated_attention_jax import layers
from gated_attention_jax import sharding
from gated_attention_jax.kernels import platform

MoEAux = dict[str, jax.Array]
EXPERT_MATMULS = ("auto", "ragged_dot", "blocked")  # see `grouped_swiglu`, `expert_matmul_impl`


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """The routed experts of the sparse layers (`TransformerConfig.mlp_type == "moe"`)."""

  num_experts: int = 8
  experts_per_token: int = 2  # top-k
  expert_dim: int = 128  # hidden size F of each routed SwiGLU expert
  normalize_top_k: bool = True  # renormalise the k router weights to sum to 1
  num_shared_experts: int = 0  # experts every token uses (one SwiGLU of this x shared_dim)
  shared_expert_dim: int = 0  # hidden size of each shared expert (0: expert_dim)
  shared_expert_gate: bool = False  # scale the shared experts by sigmoid(x · w) (Qwen3-Next)
  sparse_step: int = 1  # layer i (from 0) is sparse when (i + 1) % sparse_step == 0 ...
  dense_layers: tuple[int, ...] = ()  # ... and i is not listed here
  balance_loss_weight: float = 0.01
  router_z_loss_weight: float = 0.001
  expert_matmul: str = "auto"  # the grouped matmul (EXPERT_MATMULS): "auto" picks per platform

  def __post_init__(self):
    checks.positive_ints(**{f"model.moe.{name}": getattr(self, name) for name in (
        "num_experts", "experts_per_token", "expert_dim", "sparse_step")})
    checks.non_negative_ints(**{f"model.moe.{name}": getattr(self, name)
                                for name in ("num_shared_experts", "shared_expert_dim")})
    if self.experts_per_token > self.num_experts:
      raise ValueError(f"model.moe.experts_per_token ({self.experts_per_token}) must be at most"
                       f" model.moe.num_experts ({self.num_experts})")
    for name in ("normalize_top_k", "shared_expert_gate"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"model.moe.{name} must be a bool, got {getattr(self, name)!r}")
    if self.shared_expert_gate and not self.num_shared_experts:
      raise ValueError("model.moe.shared_expert_gate needs model.moe.num_shared_experts > 0")
    for name in ("balance_loss_weight", "router_z_loss_weight"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float(
          "inf"):
        raise ValueError(f"model.moe.{name} must be a finite number >= 0, got {value!r}")
    if self.expert_matmul not in EXPERT_MATMULS:
      raise ValueError(f"model.moe.expert_matmul must be one of {list(EXPERT_MATMULS)}, got"
                       f" {self.expert_matmul!r}")
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.dense_layers):
      raise ValueError(f"model.moe.dense_layers must be layer indices >= 0, got"
                       f" {self.dense_layers!r}")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "MoEConfig":
    values = dict(values)
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
      raise ValueError(f"model.moe has no fields {unknown}; allowed fields are {sorted(allowed)}")
    if "dense_layers" in values:
      values["dense_layers"] = tuple(values["dense_layers"])
    return cls(**values)

  def is_sparse(self, layer: int) -> bool:
    """Whether layer `layer` (from 0) has routed experts (Qwen3-MoE's rule)."""
    return (layer + 1) % self.sparse_step == 0 and layer not in self.dense_layers

  def sparse_layers(self, num_layers: int) -> tuple[int, ...]:
    return tuple(i for i in range(num_layers) if self.is_sparse(i))


def route(logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Softmax top-k routing of router logits `(N, E)` (float32).

  Returns (probs `(N, E)`, expert ids `(N, k)`, weights `(N, k)`), the weights being the k
  probabilities, renormalised to sum to 1 when `normalize`.
  """
  probs = jax.nn.softmax(logits, axis=-1)
  weights, experts = jax.lax.top_k(probs, k)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return probs, experts, weights


def balance_terms(logits: jax.Array, probs: jax.Array, experts: jax.Array,
                  token_mask: jax.Array | None = None) -> MoEAux:
  """The balancing loss, router z-loss, expert load and router entropy of one layer's routing
  (see the module docstring); logits and probs `(N, E)`, experts `(N, k)`, computed over the
  tokens where `token_mask` `(N,)` is true (all when None: padding left out otherwise)."""
  num_experts = probs.shape[-1]
  weight = (jnp.ones(probs.shape[:1], probs.dtype) if token_mask is None
            else token_mask.astype(probs.dtype))
  num_tokens = jnp.maximum(jnp.sum(weight), 1.0)
  mean = lambda v: jnp.tensordot(weight, v, axes=1) / num_tokens  # over the counted tokens
  counts = jnp.zeros((num_experts,), probs.dtype).at[experts.reshape(-1)].add(
      jnp.repeat(weight, experts.shape[-1]))
  fraction = counts / (num_tokens * experts.shape[-1])
  log_z = jax.nn.logsumexp(logits, axis=-1)
  return {
      "moe_balance_loss": num_experts * jnp.sum(fraction * mean(probs)),
      "moe_router_z_loss": mean(log_z ** 2),
      "moe_expert_load": jnp.max(counts) / jnp.maximum(jnp.mean(counts), 1e-30),
      "moe_router_entropy": mean(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)),
  }


def expert_matmul_impl(impl: str, platform_name: str) -> str:
  """The grouped expert matmul that runs for `impl` (`EXPERT_MATMULS`) on `platform_name`.

  "auto": `jax.lax.ragged_dot` on TPU, where libtpu compiles it to a grouped matmul; "blocked"
  on GPU and CPU, where XLA densifies ragged_dot into every token times every expert (E times
  the work: experiments/results/moe/).
  """
  if impl != "auto":
    return impl
  return "ragged_dot" if platform_name == "tpu" else "blocked"


def block_rows(assignments: int, num_experts: int) -> int:
  """Rows per block of the "blocked" layout: the power of two nearest below half the mean
  group size, in [8, 512], so padding each group to whole blocks adds at most about half
  the assignments (a quarter on average) while blocks stay matmul-sized."""
  target = max(1, assignments // (2 * num_experts))
  return min(_MAX_BLOCK_ROWS, max(_MIN_BLOCK_ROWS, 1 << (target.bit_length() - 1)))


_MIN_BLOCK_ROWS, _MAX_BLOCK_ROWS = 8, 512


def sort_by_expert(experts: jax.Array,
                   num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The assignments `experts` `(N, k)` flattened `(M,)`, the stable order that groups them by
  expert `(M,)`, and each expert's group size `(E,)` int32."""
  flat = experts.reshape(-1)
  sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
  return flat, jnp.argsort(flat, stable=True), sizes


def blocked_layout(experts: jax.Array, num_experts: int,
                   block: int) -> tuple[jax.Array, jax.Array]:
  """Where each of the M = N·k assignments `experts` `(N, k)` goes when they are sorted by
  expert and each expert's group is padded to whole blocks of `block` rows.

  Returns (row `(M,)` of each assignment in the `(num_blocks · block,)` padded layout, expert
  `(num_blocks,)` of each block), with num_blocks = (M + E·(block − 1)) // block, enough for
  any routing; blocks past the last group hold no rows.
  """
  flat, order, sizes = sort_by_expert(experts, num_experts)
  m = flat.size
  rank = jnp.zeros((m,), jnp.int32).at[order].set(jnp.arange(m, dtype=jnp.int32))
  padded = -(-sizes // block) * block
  starts, padded_ends = jnp.cumsum(sizes) - sizes, jnp.cumsum(padded)
  rows = (padded_ends - padded)[flat] + rank - starts[flat]
  num_blocks = (m + num_experts * (block - 1)) // block
  first_rows = jnp.arange(num_blocks, dtype=jnp.int32) * block
  block_expert = jnp.minimum(jnp.searchsorted(padded_ends, first_rows, side="right"),
                             num_experts - 1)
  return rows, block_expert


def grouped_swiglu(x: jax.Array, experts: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, impl: str, valid: jax.Array | None = None) -> jax.Array:
  """Each token through each of its experts, dropless: `(N, D)` x `(N, k)` ids → `(N, k, D)`.

  Weights `(E, D, F)`, `(E, D, F)`, `(E, F, D)`. valid `(N, k)` bool: the assignments to
  compute (None: all); the others (an expert held elsewhere, `expert_parallel`) give zeros,
  sorted after every group so that ragged_dot skips them. The assignments are sorted by expert
  and each expert's SwiGLU applied to its group, by `impl`:
    "ragged_dot"  `jax.lax.ragged_dot` over the groups;
    "blocked"     each group padded to whole blocks of `block_rows` rows (zeros), every block
                  multiplied by its expert's weights in one batched matmul: about the grouped
                  work (plus the padding) in plain XLA ops on every platform, at the cost of
                  reading each expert's weights once per block.
  """
  n, k = experts.shape
  num_experts = w_gate.shape[0]
  # The skipped assignments form one more group, the last.
  groups = num_experts if valid is None else num_experts + 1
  ids = experts if valid is None else jnp.where(valid, experts, num_experts)
  if impl == "blocked":
    block = block_rows(n * k, groups)
    rows, block_expert = blocked_layout(ids, groups, block)
    block_expert = jnp.minimum(block_expert, num_experts - 1)  # the skipped group's: any
    num_blocks = block_expert.shape[0]
    padded = jnp.zeros((num_blocks * block, x.shape[-1]), x.dtype).at[rows].set(
        jnp.repeat(x, k, axis=0), unique_indices=True)
    dot = lambda a, w: jnp.einsum("BMD,BDF->BMF", a, w[block_expert].astype(a.dtype))
    blocks = padded.reshape(num_blocks, block, -1)
    h = jax.nn.silu(dot(blocks, w_gate)) * dot(blocks, w_up)
    out = dot(h, w_down).reshape(num_blocks * block, -1)[rows]
  elif impl == "ragged_dot":
    _, order, group_sizes = sort_by_expert(ids, groups)
    rows = x[order // k]  # (N·k, D), grouped by expert
    dot = lambda a, w: jax.lax.ragged_dot(a, w.astype(a.dtype), group_sizes[:num_experts])
    h = jax.nn.silu(dot(rows, w_gate)) * dot(rows, w_up)
    out = jnp.zeros_like(rows).at[order].set(dot(h, w_down))
  else:
    raise ValueError(f"expert matmul must be one of {EXPERT_MATMULS[1:]}, got {impl!r}")
  out = out.reshape(n, k, -1)
  return out if valid is None else jnp.where(valid[..., None], out, 0)


def expert_parallel(tokens: jax.Array, experts: jax.Array, weights: jax.Array,
                    w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, impl: str,
                    mesh: Mesh | AbstractMesh) -> jax.Array:
  """The routed experts' weighted sum `(N, D)` with the experts split over `mesh.expert`.

  tokens `(N, D)` and their routing (expert ids and weights `(N, k)`) are split over the
  batch axes (data, fsdp, expert), the weights `(E, D, F)` / `(E, F, D)` over expert (E),
  fsdp (D) and tensor (F), as the rules lay them out. Per device (`jax.shard_map`, every
  axis manual): its E/X experts' weights are gathered over fsdp (that slice only, never
  every expert's); the tokens of its expert-axis group are all-gathered (dropless: each
  device sees every assignment of the group and computes the ones routed to its experts);
  the partial outputs are reduce-scattered back to the devices that hold the tokens and
  summed over tensor (the F slices). Exchanging only the routed rows
  (`jax.lax.ragged_all_to_all`) would move k/X of the tokens instead of all, but XLA:CPU
  does not implement it (jax 0.10.2).
  """
  spec = lambda axes, x: sharding.logical_to_mesh_spec(axes, x.shape, mesh)
  token_spec, route_spec = spec(("batch", "embed"), tokens), spec(("batch", None), experts)
  in_spec, out_spec = spec(("experts", "embed", "mlp"), w_gate), spec(
      ("experts", "mlp", "embed"), w_down)
  if "expert" not in sharding.spec_axes(token_spec[0]) or in_spec[0] != "expert":
    raise ValueError(f"mesh.expert={mesh.shape['expert']} must divide the {tokens.shape[0]}"
                     f" tokens (split as {token_spec}) and the {w_gate.shape[0]} experts")

  def gather(x: jax.Array, x_spec: P, keep: tuple[int, ...]) -> jax.Array:
    """`x` whole along every dimension not in `keep`."""
    for dim, entry in enumerate(x_spec):
      if dim not in keep and sharding.spec_axes(entry):
        x = jax.lax.all_gather(x, sharding.spec_axes(entry), axis=dim, tiled=True)
    return x

  def local(x, ids, wts, wg, wu, wd):
    wg, wu, wd = gather(wg, in_spec, (0, 2)), gather(wu, in_spec, (0, 2)), gather(
        wd, out_spec, (0, 1))
    x, ids, wts = (jax.lax.all_gather(gather(a, s, (0,)), "expert", axis=0, tiled=True)
                   for a, s in ((x, token_spec), (ids, route_spec), (wts, route_spec)))
    here = ids - jax.lax.axis_index("expert") * wg.shape[0]
    valid = (here >= 0) & (here < wg.shape[0])
    routed = grouped_swiglu(x, jnp.where(valid, here, 0), wg, wu, wd, impl, valid)
    out = jnp.einsum("NKD,NK->ND", routed, wts.astype(x.dtype))
    out = jax.lax.psum_scatter(out, "expert", scatter_dimension=0, tiled=True)
    f_axes = sharding.spec_axes(in_spec[2])
    return jax.lax.psum(out, f_axes) if f_axes else out

  return jax.shard_map(local, mesh=mesh, in_specs=(token_spec, route_spec, route_spec,
                                                   in_spec, in_spec, out_spec),
                       out_specs=P(token_spec[0], None))(tokens, experts, weights, w_gate,
                                                         w_up, w_down)


class MoE(nnx.Module):
  """Routed SwiGLU experts (and shared ones): `(B, T, D)` → (`(B, T, D)`, balancing terms)."""

  def __init__(self, d_model: int, cfg: MoEConfig, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    e, f, p = cfg.num_experts, cfg.expert_dim, param_dtype
    init = layers.normal_init()
    self.router = layers.make_param(rngs, (d_model, e), ("embed", "experts"), init, p)
    self.gate_proj = layers.make_param(rngs, (e, d_model, f), ("experts", "embed", "mlp"),
                                       init, p)
    self.up_proj = layers.make_param(rngs, (e, d_model, f), ("experts", "embed", "mlp"), init, p)
    self.down_proj = layers.make_param(rngs, (e, f, d_model), ("experts", "mlp", "embed"),
                                       init, p)
    shared = cfg.num_shared_experts * (cfg.shared_expert_dim or cfg.expert_dim)
    self.shared = (layers.SwiGLU(d_model, shared, param_dtype=p, rngs=rngs)
                   if shared else None)
    self.shared_gate = (layers.make_param(rngs, (d_model, 1), ("embed", "norm"), init, p)
                        if cfg.shared_expert_gate else None)

  def __call__(self, x: jax.Array,
               token_mask: jax.Array | None = None) -> tuple[jax.Array, MoEAux]:
    """`token_mask` `(B, T)`: the tokens the balancing terms count (None: all); every token
    is routed and computed either way."""
    b, t, d = x.shape
    dt = x.dtype
    tokens = x.reshape(b * t, d)
    acc = layers.accum_dtype(dt)
    logits = jnp.dot(tokens, self.router[...].astype(dt), preferred_element_type=acc)
    probs, experts, weights = route(logits, self.cfg.experts_per_token,
                                    self.cfg.normalize_top_k)
    impl = expert_matmul_impl(self.cfg.expert_matmul, platform.target_platform())
    w = (self.gate_proj[...], self.up_proj[...], self.down_proj[...])
    mesh = sharding.context_mesh()
    if mesh is not None and mesh.shape.get("expert", 1) > 1:
      out = expert_parallel(tokens, experts, weights, *w, impl, mesh)
    else:
      out = jnp.einsum("NKD,NK->ND", grouped_swiglu(tokens, experts, *w, impl),
                       weights.astype(dt))
    if self.shared is not None:
      shared = self.shared(tokens)
      if self.shared_gate is not None:
        shared = shared * jax.nn.sigmoid(tokens @ self.shared_gate[...].astype(dt))
      out = out + shared
    mask = None if token_mask is None else token_mask.reshape(b * t)
    return out.reshape(b, t, d), balance_terms(logits, probs, experts, mask)

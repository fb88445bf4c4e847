"""Attention math, separate from the layer that owns the parameters.

`attend` dispatches on an implementation string:
  - "auto": resolved by `choose_impl` for the platform being lowered for (TPU: "pallas";
    GPU: "cudnn" where cuDNN serves the inputs, else "pallas"; anything else: "xla").
  - "xla": a plain einsum/softmax reference (float32 logits and softmax); the only
    path that can also return the attention probabilities (for analysis).
  - "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (GPU only).
  - "pallas": `gated_attention_jax.kernels.gated_flash_attention`, which can also
    fuse a G1 output gate into the kernel's epilogue: the Pallas GPU kernel on GPUs,
    the Pallas TPU kernel elsewhere (in Pallas' interpreter on CPU: slow, for tests).

Under a (data, fsdp, tensor, expert) context mesh (`sharding.under_mesh`), the "pallas"
kernel runs per shard (`jax.shard_map`): a `pallas_call` is opaque to XLA's
partitioner, which would otherwise gather q, k, v and the gate onto one device.
Each input is split as its logical axes say (`Q_AXES`, `KV_AXES`, ...: the
batch over (data, fsdp, expert), heads over tensor), exactly as the layer constrains
them, so nothing moves on the way in or out; `pallas_shard_plan` says how GQA's
kv heads follow their query heads and refuses meshes the kernel cannot serve.

Masks are built from token indices (causal: key index <= query index, with the
queries offset by `q_offset` when they continue a KV cache; a sliding window of w keeps
keys less than w positions away), segment ids (packed documents: keys and queries must share
a segment id) and any boolean `mask` the caller gives, broadcastable to (B, N, T, S). What
each impl serves (`unsupported`): "xla" everything; "cudnn" no logit soft cap (a window
alone is its `local_window_size`; with a mask or segments, one explicit mask); "pallas" a mask only as key padding, `(B, 1, 1, S)`,
which it runs as segment ids (`key_padding_segments`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh

from gated_attention_jax import gate as gate_lib
from gated_attention_jax import kernels
from gated_attention_jax import layers
from gated_attention_jax import sharding
from gated_attention_jax.kernels import platform
from gated_attention_jax.kernels import reference

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")
# Logical axes of the op's inputs (the layer constrains q, k, v and the gate to the same).
Q_AXES = ("batch", "seq", "q_heads", "head_dim")  # q, the output, an elementwise gate
KV_AXES = ("batch", "seq", "kv_heads", "head_dim")  # k, v
SEGMENT_AXES = ("batch", "seq")  # segment ids; a headwise gate is Q_AXES[:3]


def check_impl(impl: str) -> None:
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")


def cudnn_unsupported(device_kind: str | None, dtype, head_dim: int, q_len: int, kv_len: int,
                      segments: bool) -> Optional[str]:
  """Why `jax.nn.dot_product_attention(implementation="cudnn")` cannot serve these inputs
  on a GPU of `device_kind` (None if it can): its flash-attention checks, made before tracing."""
  max_head_dim = 256 if platform.is_hopper_or_newer(device_kind) else 128
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"it takes bfloat16 or float16, the model computes in {jnp.dtype(dtype).name}"
  if head_dim > max_head_dim or head_dim % 8:
    return (f"head_dim must be a multiple of 8 up to {max_head_dim} on"
            f" {device_kind or 'this GPU'}, got {head_dim}")
  if segments and (q_len % 2 or kv_len % 2):  # a mask is a bias to cuDNN: even lengths only
    return f"packed segments need even sequence lengths, got {q_len} and {kv_len}"
  return None


def unsupported(impl: str, *, mask_kind: Optional[str] = None,
                logit_soft_cap: Optional[float] = None) -> Optional[str]:
  """Why `impl` cannot run attention with these features (None if it can): `mask_kind` is
  None, "keys" (a key-padding mask, `(B, 1, 1, S)`) or "general"."""
  if impl == "cudnn" and logit_soft_cap is not None:
    return ("attention_impl='cudnn' has no logit soft cap (jax.nn.dot_product_attention);"
            " use attention_impl='xla' or 'pallas'")
  if impl == "pallas" and mask_kind == "general":
    return ("attention_impl='pallas' takes mask= only as key padding, shape (B, 1, 1, S) (run as"
            " segment ids); express packing with segment_ids, or use attention_impl='xla' or"
            " 'cudnn'")
  return None


def mask_kind(mask: Optional[jax.Array]) -> Optional[str]:
  """None, "keys" (a mask of shape (B or 1, 1, 1, S): key padding) or "general"."""
  if mask is None:
    return None
  return "keys" if mask.shape[1] == mask.shape[2] == 1 else "general"


def choose_impl(impl: str, platform_name: str, device_kind: str | None, *, dtype,
                head_dim: int, q_len: int, kv_len: int, segments: bool,
                mask_kind: Optional[str] = None,
                logit_soft_cap: Optional[float] = None) -> tuple[str, str]:
  """(the impl that runs, why) for `impl` on a `platform_name` ("tpu", "gpu", "cpu") device.

  Only "auto" is resolved: the fused Pallas kernel on TPU; on GPU cuDNN with the gate in
  XLA (no GPU measurement yet shows the fused kernel faster there), and the fused kernel
  where cuDNN cannot serve the inputs (`cudnn_unsupported`, `unsupported`); the XLA reference
  elsewhere (the kernels and cuDNN compile for TPU and GPU only) and where neither serves the
  features. Other impls are returned as given.
  """
  check_impl(impl)
  features = dict(mask_kind=mask_kind, logit_soft_cap=logit_soft_cap)
  if impl != "auto":
    return impl, "set by attention_impl"
  if platform_name == "tpu":
    reason = unsupported("pallas", **features)
    if reason:
      return "xla", f"the XLA reference on TPU: {reason}"
    return "pallas", "the fused Pallas kernel (Mosaic TPU) on TPU"
  if platform_name == "gpu":
    reason = (cudnn_unsupported(device_kind, dtype, head_dim, q_len, kv_len,
                                segments or mask_kind is not None)
              or unsupported("cudnn", **features))
    if reason:
      if unsupported("pallas", **features):
        return "xla", f"the XLA reference on GPU: neither cuDNN ({reason}) nor the kernel serves"
      return "pallas", f"the fused Pallas kernel on GPU: cuDNN cannot serve the inputs ({reason})"
    return "cudnn", ("cuDNN flash attention with the gate in XLA on GPU: no GPU measurement"
                     " yet shows the fused Pallas kernel faster")
  return "xla", (f"the XLA reference on {platform_name}: the Pallas kernels and cuDNN compile"
                 " for TPU and GPU only")


def resolve_impl(impl: str, q: jax.Array, k: jax.Array, segments: bool,
                 mask: Optional[jax.Array] = None,
                 logit_soft_cap: Optional[float] = None) -> str:
  """`impl` with "auto" resolved (`choose_impl`) for the platform being lowered for; raises
  ValueError naming the impl when it cannot serve the mask or soft cap (`unsupported`)."""
  features = dict(mask_kind=mask_kind(mask), logit_soft_cap=logit_soft_cap)
  impl = choose_impl(impl, platform.target_platform(), platform.target_device_kind(),
                     dtype=q.dtype, head_dim=q.shape[-1], q_len=q.shape[1], kv_len=k.shape[1],
                     segments=segments, **features)[0]
  reason = unsupported(impl, **features)
  if reason:
    raise ValueError(reason)
  return impl


def key_padding_segments(mask: jax.Array, q_segment_ids: Optional[jax.Array],
                         kv_segment_ids: Optional[jax.Array], q_len: int
                         ) -> tuple[jax.Array, jax.Array]:
  """A key-padding mask `(B or 1, 1, 1, S)` as (q, kv) segment ids for the kernels.

  Ids 2·seg for the queries and for kept keys, 2·seg + 1 for masked keys (seg: the given ids,
  or 0): a query sees a key iff both share a segment and the key is kept (ids up to 2^30).
  """
  keep = mask[:, 0, 0, :]  # (B or 1, S)
  b = max(keep.shape[0], 1 if q_segment_ids is None else q_segment_ids.shape[0])
  if q_segment_ids is None:
    q_segment_ids = jnp.zeros((b, q_len), jnp.int32)
    kv_segment_ids = jnp.zeros((b, keep.shape[1]), jnp.int32)
  q_seg = 2 * q_segment_ids.astype(jnp.int32)
  kv_seg = 2 * kv_segment_ids.astype(jnp.int32) + jnp.where(keep, 0, 1)
  return jnp.broadcast_to(q_seg, (b, q_len)), jnp.broadcast_to(kv_seg, (b, keep.shape[1]))


make_mask = reference.make_mask  # the one mask builder (explicit query offset)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                  logit_soft_cap: Optional[float] = None) -> tuple[jax.Array, jax.Array]:
  """The reference softmax attention (`kernels.reference.attention`): GQA by grouping.

  q `(B, T, N, H)`; k, v `(B, S, K, H)`; mask `(B, 1 or N, T, S)` boolean. Returns out
  `(B, T, N, H)` in q's dtype and probabilities `(B, N, T, S)` in float32 (or wider).
  """
  return reference.attention(q, k, v, mask, scale, logit_soft_cap=logit_soft_cap)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                    mask: Optional[jax.Array], scale: float,
                    sliding_window: Optional[int] = None,
                    implementation: str = "cudnn") -> jax.Array:
  """`jax.nn.dot_product_attention`: without an explicit `mask`, a plain causal call, and a
  sliding window as its `local_window_size` (w - 1 keys either side, none after the query when
  causal); with one, the mask must already hold the causal and window terms."""
  window = None
  if mask is None and sliding_window is not None:
    window = (sliding_window - 1, 0 if causal else sliding_window - 1)
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=causal and mask is None, scale=scale,
      local_window_size=window, implementation=implementation)


@dataclasses.dataclass(frozen=True)
class PallasShardPlan:
  """How the Pallas kernel's inputs split over a mesh (see `pallas_shard_plan`).

  in_specs: PartitionSpecs of (q, k, v, gate, q_segment_ids, kv_segment_ids), None
    for absent inputs; the output is split like q.
  head_axes: the mesh axes splitting the query heads (() if they are whole).
  slice_kv_head: the kv heads are whole on every device while the query heads are
    split, and each shard slices out the one kv head its query heads read (False:
    the kv heads are split with their query heads, or nothing is split).
  """

  in_specs: tuple
  head_axes: tuple[str, ...]
  slice_kv_head: bool


def pallas_shard_plan(q_shape: Sequence[int], kv_shape: Sequence[int],
                      mesh: Mesh | AbstractMesh, *, gate_ndim: int = 0,
                      segments: bool = False) -> PallasShardPlan:
  """Per-shard layout of the Pallas kernel on `mesh`, from the logical-axis rules.

  Query head i reads kv head i // G (G = N / K). A shard holding N / t consecutive
  query heads (t: the ways the rules split them) runs the GQA kernel on its own if
  its kv heads are split the same way (K % t == 0), or if all its query heads read
  one kv head (t % K == 0: the rules leave the K heads whole and the shard slices
  its head out). Any other split of the query heads raises ValueError naming the
  mesh axis and the head counts, as does a tensor axis that does not divide the
  query heads (the rules would leave them whole and every device on that axis
  would run the same kernel).

  Args:
    q_shape: (B, T, N, H); kv_shape: (B, S, K, H).
    gate_ndim: 4 (elementwise gate), 3 (headwise) or 0 (none).
    segments: whether segment ids are passed.
  """
  n, kv_heads = q_shape[2], kv_shape[2]
  q_spec = sharding.logical_to_mesh_spec(Q_AXES, q_shape, mesh)
  kv_spec = sharding.logical_to_mesh_spec(KV_AXES, kv_shape, mesh)
  head_axes, kv_axes = sharding.spec_axes(q_spec[2]), sharding.spec_axes(kv_spec[2])
  wanted = sharding.rule_axes("q_heads", mesh)
  t = math.prod(mesh.shape[a] for a in wanted)
  where = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in wanted)
  fits = [d for d in range(1, n + 1) if n % d == 0 and (kv_heads % d == 0 or d % kv_heads == 0)]
  advice = (f"; the kernel can split {n} query heads over {kv_heads} kv heads"
            f" {', '.join(map(str, fits))} ways (or use attention_impl='xla')")
  if head_axes != wanted:
    raise ValueError(f"attention_impl='pallas' runs per shard, but {where} does not divide"
                     f" the {n} query heads{advice}")
  if kv_axes not in (head_axes, ()) or (kv_axes != head_axes and t % kv_heads):
    raise ValueError(
        f"attention_impl='pallas' runs per shard, but {where} gives each device {n // t}"
        f" of the {n} query heads, which read parts of several of the {kv_heads} kv heads"
        f" (GQA groups of {n // kv_heads}): the split must divide the {kv_heads} kv heads or"
        f" be a multiple of {kv_heads}{advice}")
  spec = lambda axes, shape: sharding.logical_to_mesh_spec(axes, shape, mesh)
  return PallasShardPlan(
      in_specs=(q_spec, kv_spec, kv_spec,
                spec(Q_AXES[:gate_ndim], q_shape[:gate_ndim]) if gate_ndim else None,
                spec(SEGMENT_AXES, q_shape[:2]) if segments else None,
                spec(SEGMENT_AXES, kv_shape[:2]) if segments else None),
      head_axes=head_axes, slice_kv_head=kv_axes != head_axes)


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, gate: Optional[jax.Array], *,
                     causal: bool, scale: float, q_segment_ids: Optional[jax.Array] = None,
                     kv_segment_ids: Optional[jax.Array] = None,
                     gate_activation: str = "sigmoid", sliding_window: Optional[int] = None,
                     logit_soft_cap: Optional[float] = None) -> jax.Array:
  """The fused kernel (`kernels.gated_flash_attention`), per shard under a context mesh.

  Shapes as in `attend`. On a TPU or GPU (the platform being lowered for, see
  `platform.target_platform`) the kernel `impl="auto"` picks there (on Hopper the Mosaic GPU
  kernel where it serves the inputs); elsewhere the TPU kernel in interpret mode. Without a
  (data, fsdp, tensor, expert) context mesh of more than one device the kernel sees the whole
  arrays.
  """
  kernel = "auto" if platform.target_platform() in ("tpu", "gpu") else "pallas_tpu"
  group = q.shape[2] // k.shape[2]

  def run(q, k, v, gate, q_seg, kv_seg, head_axes=(), slice_kv_head=False):
    if slice_kv_head:  # this shard's query heads all read kv head (first local head) // G
      start = jax.lax.axis_index(head_axes) * q.shape[2] // group
      k, v = (jax.lax.dynamic_slice_in_dim(x, start, 1, axis=2) for x in (k, v))
    segment_ids = None if q_seg is None else (q_seg, kv_seg)
    return kernels.gated_flash_attention(q, k, v, gate, causal=causal, segment_ids=segment_ids,
                                         scale=scale, gate_activation=gate_activation,
                                         sliding_window=sliding_window,
                                         logit_soft_cap=logit_soft_cap, impl=kernel)

  args = (q, k, v, gate, q_segment_ids, kv_segment_ids)
  mesh = sharding.context_mesh()
  if mesh is None or mesh.size == 1:
    return run(*args)
  plan = pallas_shard_plan(q.shape, k.shape, mesh, gate_ndim=0 if gate is None else gate.ndim,
                           segments=q_segment_ids is not None)
  present = [i for i, a in enumerate(args) if a is not None]

  def local(*shards):
    full = [None] * len(args)
    for i, x in zip(present, shards):
      full[i] = x
    return run(*full, head_axes=plan.head_axes, slice_kv_head=plan.slice_kv_head)

  # check_vma=False: pallas_call's outputs carry no varying-manual-axes type. The
  # transpose then sums the cotangents of inputs a shard holds whole (k, v when each
  # shard slices its kv head, a batch that does not divide) over the devices that
  # share them (over a size-1 axis that is an all-reduce within one device: a no-op).
  # Every axis is manual, so the kernel only ever sees whole local shards.
  return jax.shard_map(local, mesh=mesh, in_specs=tuple(plan.in_specs[i] for i in present),
                       out_specs=plan.in_specs[0], check_vma=False)(*(args[i] for i in present))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str, scale: float,
           causal: bool = True, q_offset: jax.Array | int = 0,
           q_segment_ids: Optional[jax.Array] = None,
           kv_segment_ids: Optional[jax.Array] = None,
           mask: Optional[jax.Array] = None, sliding_window: Optional[int] = None,
           logit_soft_cap: Optional[float] = None,
           fused_gate: Optional[jax.Array] = None, gate_activation: str = "sigmoid",
           return_probs: bool = False) -> tuple[jax.Array, Optional[jax.Array]]:
  """Softmax attention, optionally with a fused G1 gate.

  Args:
    q: `(B, T, N, H)`; k, v: `(B, S, K, H)`.
    q_offset: index of the first query among the keys (KV-cache decoding), a
      scalar or per row `(B,)`; only the "xla" path supports a non-zero offset.
    q_segment_ids, kv_segment_ids: `(B, T)`, `(B, S)` or None.
    mask: boolean `(B or 1, 1 or N, T or 1, S or 1)`, True where a query may see a key, on
      top of the causal, window and segment masks; "pallas" takes key padding only.
    sliding_window: keys less than this many positions from the query (`make_mask`).
    logit_soft_cap: cap · tanh(logits / cap) on the scaled logits, before the mask.
    fused_gate: G1 gate logits `(B, T, N, H)` or `(B, T, N)`; the output is then
      attention ⊙ act(fused_gate). Fused in the kernel for "pallas", applied
      after attention otherwise.
    return_probs: also return `(B, N, T, S)` probabilities ("xla" only).
  Returns:
    `(out (B, T, N, H), probs or None)`.
  """
  impl = resolve_impl(impl, q, k, q_segment_ids is not None, mask, logit_soft_cap)
  b, t = q.shape[:2]
  s = k.shape[1]
  decoding = not (isinstance(q_offset, int) and q_offset == 0)
  if return_probs and impl != "xla":
    raise ValueError(f"attention probabilities need attention_impl='xla', got {impl!r}")
  if decoding and impl != "xla":
    impl = "xla"  # cache-offset masks are built explicitly; kernels see full sequences
  probs = None
  if impl == "pallas":
    if mask is not None:
      q_segment_ids, kv_segment_ids = key_padding_segments(mask, q_segment_ids, kv_segment_ids, t)
    out = pallas_attention(q, k, v, fused_gate, causal=causal, scale=scale,
                           q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                           gate_activation=gate_activation, sliding_window=sliding_window,
                           logit_soft_cap=logit_soft_cap)
    return out, None
  full = make_mask(b, t, s, causal=causal, q_offset=q_offset, q_segment_ids=q_segment_ids,
                   kv_segment_ids=kv_segment_ids, sliding_window=sliding_window)
  if mask is not None:
    full = full & mask
  if impl == "cudnn" and not decoding:
    plain = mask is None and q_segment_ids is None
    out = cudnn_attention(q, k, v, causal=causal, mask=None if plain else full, scale=scale,
                          sliding_window=sliding_window)
  else:
    out, probs = xla_attention(q, k, v, full, scale, logit_soft_cap)
  if fused_gate is not None:
    scores = gate_lib.activate(fused_gate.astype(layers.accum_dtype(out.dtype)), gate_activation)
    out = gate_lib.combine(out, scores, "multiply")
  return out, (probs if return_probs else None)

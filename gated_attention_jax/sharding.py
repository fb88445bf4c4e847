"""Device meshes and shardings, from one table of logical-axis rules.

Layers name the axes of every parameter (`("embed", "q_heads", "head_dim")`);
`LOGICAL_AXIS_RULES` maps those names to the mesh axes `data`, `fsdp`, `tensor`,
`expert`. FSDP shards parameters and optimizer state over `fsdp`; tensor parallelism
shards heads and the MLP over `tensor`; expert parallelism shards a mixture-of-experts
block's experts over `expert` (`moe.expert_parallel` moves the tokens); the batch goes
over (data, fsdp, expert) and the other weights' d_model over (fsdp, expert), so outside
the MoE blocks `expert` is one more FSDP axis.
A dimension whose size does not divide by its mesh axes is replicated instead
(e.g. 2 kv heads on a 4-way tensor axis), so every gate variant shards.

Activations are constrained by the same rules: `constrain(x, ("batch", "seq",
"embed"))` inside a function traced under `under_mesh(fn, mesh)`; without a
mesh it returns x unchanged. A gate's scores carry the logical head axis of the
tensor they gate (`q_heads` for G1/G4, `kv_heads` for G2/G3), so gate slices
are split exactly as the heads they multiply.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis name -> mesh axes (None: replicated). The one place parallelism is decided.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),  # activations' batch axis
    ("seq", None),
    ("vocab", "tensor"),
    ("embed", ("fsdp", "expert")),  # outside the experts, `expert` is one more FSDP axis
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("experts", "expert"),  # MoE expert weights (and fsdp / tensor by their other axes)
    ("dense_gate", "tensor"),
    ("norm", None),
    ("layers", None),  # scan_layers: the leading axis of the stacked blocks' parameters
)
# The mesh axes a batch is split over (the "batch" rule).
BATCH_AXES: tuple[str, ...] = dict(LOGICAL_AXIS_RULES)["batch"]


def _size(mesh_cfg: Any, axis: str) -> Any:
  """`mesh.<axis>` (configs saved before the expert axis existed have no `expert`: 1)."""
  return mesh_cfg.get(axis, 1) if axis == "expert" else mesh_cfg[axis]


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor, expert); one -1 takes the devices left over."""
  sizes = [_size(mesh_cfg, a) for a in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f"mesh.{axis} must be a positive int or -1, got {size!r}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one of mesh.{MESH_AXES} may be -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices do not"
                       f" divide by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices,"
                     f" {num_devices} are available")
  return tuple(sizes)


def dcn_shape(mesh_cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Slices along (data, fsdp, tensor, expert) from the `mesh.dcn` section (all 1: one
  slice)."""
  dcn = mesh_cfg.get("dcn") or {}
  sizes = tuple(dcn.get(a, 1) for a in MESH_AXES)
  for axis, size in zip(MESH_AXES, sizes):
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
      raise ValueError(f"mesh.dcn.{axis} must be a positive int, got {size!r}")
  return sizes


def global_mesh_shape(mesh_cfg: ml_collections.ConfigDict,
                      num_devices: int) -> tuple[int, ...]:
  """Sizes of the whole (data, fsdp, tensor, expert) mesh: per-slice sizes × `mesh.dcn`."""
  dcn = dcn_shape(mesh_cfg)
  if num_devices % math.prod(dcn):
    raise ValueError(f"mesh.dcn {dict(zip(MESH_AXES, dcn))}: {num_devices} devices do not"
                     f" divide into {math.prod(dcn)} slices")
  per_slice = mesh_shape(mesh_cfg, num_devices // math.prod(dcn))
  return tuple(s * d for s, d in zip(per_slice, dcn))


def make_mesh(mesh_cfg: ml_collections.ConfigDict,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A (data, fsdp, tensor, expert) mesh over all devices (all processes).

  Multi-slice: `mesh.dcn.{data,fsdp,tensor,expert}` count slices along each axis (usually
  only data > 1); `mesh.data/fsdp/tensor/expert` then describe one slice, and devices are
  laid out by `mesh_utils.create_hybrid_device_mesh` so that only the dcn axes
  cross the data-centre network.
  """
  devices = list(devices if devices is not None else jax.devices())
  global_mesh_shape(mesh_cfg, len(devices))  # validates
  dcn = dcn_shape(mesh_cfg)
  shape = mesh_shape(mesh_cfg, len(devices) // math.prod(dcn))
  if math.prod(dcn) > 1:
    grid = mesh_utils.create_hybrid_device_mesh(shape, dcn, devices)
    return Mesh(grid, MESH_AXES)
  # Auto axes: GSPMD propagates shardings between the ones we pin down.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def rule_axes(name: Optional[str], mesh: Mesh | AbstractMesh) -> tuple[str, ...]:
  """The axes of `mesh` (of size > 1) that the rule for logical axis `name` splits it over."""
  target = dict(LOGICAL_AXIS_RULES).get(name) if name is not None else None
  mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
  return tuple(a for a in mesh_axes if a in mesh.shape and mesh.shape[a] > 1)


def spec_axes(entry: Any) -> tuple[str, ...]:
  """The mesh axes one PartitionSpec entry names: None -> (), "a" -> ("a",), ("a", "b") as is."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def logical_to_mesh_spec(axes: Sequence[Optional[str]], shape: Sequence[int],
                         mesh: Mesh | AbstractMesh) -> P:
  """PartitionSpec for an array with logical `axes`, replicating non-divisible dims.

  A mesh axis is used at most once per array (the first dimension to claim it
  wins): activations `("batch", "seq", "embed")` shard the batch over fsdp and
  keep the embedding whole, as FSDP wants.
  """
  unknown = [a for a in axes if a is not None and a not in dict(LOGICAL_AXIS_RULES)]
  if unknown:
    raise ValueError(f"logical axes {unknown} have no rule in LOGICAL_AXIS_RULES")
  spec, used = [], set()
  for name, size in zip(axes, shape):
    mesh_axes = tuple(a for a in rule_axes(name, mesh) if a not in used)
    if mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
      used.update(mesh_axes)
      spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    else:
      spec.append(None)
  return P(*spec)


def _variable_sharding(variable: nnx.Variable, mesh: Mesh) -> nnx.Variable:
  axes = variable.get_metadata().get("out_sharding")
  spec = P() if axes is None else logical_to_mesh_spec(axes, variable.shape, mesh)
  return variable.replace(NamedSharding(mesh, spec))


def state_shardings(abstract_state: nnx.State, mesh: Mesh) -> nnx.State:
  """The state's tree with a NamedSharding in each variable, from its logical axes."""
  return jax.tree.map(lambda v: _variable_sharding(v, mesh), abstract_state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def optimizer_shardings(tx: optax.GradientTransformation, opt_state_shape: Any,
                        param_shardings: nnx.State, mesh: Mesh) -> Any:
  """Optimizer-state shardings: moments follow their parameter, counters replicate; the
  placeholders of a masked state (frozen parameters, `optax.multi_transform`) stay."""
  masked = lambda x: isinstance(x, optax.MaskedNode)
  return optax.tree_map_params(
      tx, lambda leaf, sharding: leaf if masked(leaf) else sharding, opt_state_shape,
      param_shardings, transform_non_params=lambda _: replicated(mesh), is_leaf=masked)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches `(B, T)` split over (data, fsdp, expert) on the batch axis.

  Each process feeds its own rows, so the batch must be split at least as many
  ways as there are processes.
  """
  axes = BATCH_AXES
  shards = math.prod(mesh.shape[a] for a in axes)
  if shards % jax.process_count():
    raise ValueError(f"the {' x '.join(axes)} mesh size ({shards}) must be a multiple of the"
                     f" number of processes ({jax.process_count()}): each process reads"
                     " its own rows of the batch")
  return NamedSharding(mesh, P(axes, None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs (the largest)."""
  totals: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    nbytes = math.prod(shard) * np.dtype(leaf.dtype).itemsize
    for device in leaf.sharding.device_set:
      totals[device] = totals.get(device, 0) + nbytes
  return max(totals.values(), default=0)


# --- activations ----------------------------------------------------------------


def under_mesh(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
  """`fn` traced with `mesh` as the context mesh, so `constrain` inside it takes effect."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return wrapped


def context_mesh() -> Optional[AbstractMesh]:
  """The (data, fsdp, tensor, expert) mesh a function is traced under (`under_mesh`), else
  None. A (data, fsdp, tensor) mesh built before the expert axis existed counts too: the
  rules skip axes a mesh lacks, as they skip those of size 1."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES[:3]) <= set(mesh.axis_names):
    return None
  return mesh


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
  """Pins activation `x` to the sharding its logical `axes` map to; a no-op without a mesh."""
  mesh = context_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_mesh_spec(axes, x.shape, mesh))

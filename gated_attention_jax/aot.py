"""Ahead-of-time compilation for TPUs and NVIDIA Hopper GPUs on a machine that has neither.

``target_devices("v5p:2x2x1")`` gives libtpu's devices of a TPU topology (any name libtpu knows:
v4, v5e, v5p, v6e, up to whole pods); ``target_devices("h100")`` / ``"h200"`` gives one device of a
deviceless CUDA compile, described by the XLA GPU target config this package carries
(``gated_attention_jax/targets/*.txtpb``). ``compile_for(fn, args, target)`` then compiles ``fn``
for it, with XLA, Mosaic TPU, Triton, Mosaic GPU and ptxas running for real: lowering errors,
VMEM/shared-memory overflows, register spills and partitioning errors show up; numbers and
speed do not (those need the hardware).

Needs, besides jax: ``libtpu`` (``pip install "jax[tpu]==<jax version>"``) for TPU targets; the
``jax-cuda13-plugin``/``jax-cuda13-pjrt`` (``cuda12`` for jax 0.10) wheels of the same version,
``nvidia-cuda-nvcc`` (ptxas) and ``absl-py`` for GPU targets, with ``JAX_PLATFORMS=cpu`` set before
jax starts (else the CUDA plugin looks for a GPU and fails). ``tools/aot_toolchains.sh`` builds
such environments.

Inside ``lowering_for(devices)`` (which ``compile_for`` enters) the trace knows the target's
platform and device kind (an abstract mesh carrying an ``AbstractDevice``): the fused kernels
read it (``kernels.platform``) to lower for the target, not for the machine's default backend.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

GPU_TARGETS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
# HBM per chip of the TPU generations (Cloud TPU documentation); a GPU's is in its target config.
TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
TPU_GENERATIONS = tuple(TPU_HBM_GIB)


def gpu_target_config(name: str) -> str:
  """Text of the XLA GPU target config (``GpuTargetConfigProto``) of ``name`` ("h100", "h200")."""
  if name not in GPU_TARGETS:
    raise ValueError(f"GPU target must be one of {sorted(GPU_TARGETS)}, got {name!r}.")
  return (importlib.resources.files("gated_attention_jax") / "targets" /
          GPU_TARGETS[name]).read_text()


def gpu_device_limits(name: str) -> dict[str, int]:
  """The target's per-block shared memory (opt-in) and register limits, read from its config."""
  fields = {}
  for line in gpu_target_config(name).splitlines():
    key, _, value = line.strip().partition(": ")
    if key in ("shared_memory_per_block_optin", "registers_per_block_limit",
               "device_memory_size", "core_count") and value.isdigit():
      fields[key] = int(value)
  return fields


def hbm_bytes(target: str) -> int:
  """Memory of one device of ``target``: a TPU generation's HBM per chip ("v5p:8x8x4" -> 95
  GiB), or the ``device_memory_size`` of the GPU target config ("h100" -> 79.1 GiB)."""
  if is_gpu_target(target):
    return gpu_device_limits(target)["device_memory_size"]
  generation = target.partition(":")[0]
  if generation not in TPU_HBM_GIB:
    raise ValueError(f"no HBM size known for target {target!r}; TPU generations"
                     f" {TPU_GENERATIONS}, GPUs {sorted(GPU_TARGETS)}")
  return TPU_HBM_GIB[generation] * 2**30


def is_gpu_target(target: str) -> bool:
  return target in GPU_TARGETS


@functools.cache
def target_devices(target: str) -> tuple[Any, ...]:
  """The devices of ``target``: a TPU topology name ("v5e:2x2", "v5p:8x8x4") or "h100"/"h200".

  Raises ValueError, naming the target, when it is not a known name or the compiler for it is not
  installed (with what to install).
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  if is_gpu_target(target):
    try:
      topo = topologies.get_topology_desc(topology_name="cuda", platform="cuda",
                                          target_config=gpu_target_config(target),
                                          topology="1x1x1")
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f"cannot compile for {target!r} here ({type(e).__name__}: {e}). A deviceless GPU "
          f"compile needs jax-cuda13-plugin and jax-cuda13-pjrt=={jax.__version__} (cuda12 for "
          "jax 0.10), nvidia-cuda-nvcc and absl-py, and JAX_PLATFORMS=cpu set before jax "
          "starts; tools/aot_toolchains.sh builds such an environment.") from e
    return tuple(topo.devices)
  generation, _, shape = target.partition(":")
  if generation not in TPU_GENERATIONS or not shape or not all(
      part.isdigit() for part in shape.split("x")):
    raise ValueError(f"target must be 'h100', 'h200' or a TPU topology '<generation>:<shape>' "
                     f"with generation one of {TPU_GENERATIONS} (e.g. 'v5e:2x2', 'v5p:8x8x4'), "
                     f"got {target!r}.")
  # Ahead-of-time compiles hold no TPU, so several processes may load libtpu at once (else the
  # second fails on libtpu's lockfile).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    topo = topologies.get_topology_desc(topology_name=target, platform="tpu")
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"libtpu cannot compile for TPU topology {target!r} ({type(e).__name__}: {e}). "
        "Shapes libtpu knows look like v5e:2x2, v5p:2x2x1, v6e:16x16, v5p:8x8x4; without "
        f"libtpu, install it with pip install 'jax[tpu]=={jax.__version__}'.") from e
  return tuple(topo.devices)


@contextlib.contextmanager
def lowering_for(devices: Sequence[Any], axis_names: Sequence[str] = ("x",),
                 axis_sizes: Sequence[int] | None = None):
  """Traces inside see the target's device kind and platform (an abstract mesh).

  jax 0.11+ needs this to lower Pallas kernels for a platform that is not the default backend;
  ``kernels.api`` reads it to choose the compiled (not interpreted) kernel. ``axis_sizes``
  defaults to all devices on the first axis and 1 on the others.
  """
  dev = devices[0]
  if axis_sizes is None:
    axis_sizes = (len(devices),) + (1,) * (len(axis_names) - 1)
  cores = getattr(dev, "num_cores", None)
  abstract = AbstractMesh(
      tuple(axis_sizes), tuple(axis_names), axis_types=(AxisType.Auto,) * len(axis_names),
      abstract_device=AbstractDevice(device_kind=dev.device_kind, num_cores=cores,
                                     platform=dev.platform))
  with jax.sharding.use_abstract_mesh(abstract):
    yield


# Custom-call targets of compiled Pallas kernels in the optimised HLO, per platform (GPU:
# Triton, and Mosaic GPU, which the kernels' "auto" picks on Hopper).
KERNEL_CALLS = {"tpu": ("tpu_custom_call",), "gpu": ("__gpu$xla.gpu.triton", "mosaic_gpu")}


def kernel_calls(compiled: Any, platform: str) -> dict[str, int]:
  """{custom-call target: count} of the Pallas kernels in a ``Compiled``'s optimised HLO
  (only the targets that occur)."""
  text = compiled.as_text()
  calls = {name: text.count(f'custom_call_target="{name}') for name in KERNEL_CALLS[platform]}
  return {name: n for name, n in calls.items() if n}


def compile_for(fn: Callable[..., Any], args: Sequence[Any], target: str, **jit_kwargs):
  """``jax.jit(fn, **jit_kwargs).lower(*args).compile()`` for ``target`` on one device.

  ``args`` are arrays' shapes as ``jax.ShapeDtypeStruct`` (or None); those without a sharding
  are placed on the target's first device. Returns the ``Compiled`` object
  (``memory_analysis()``, ``cost_analysis()``, ``as_text()``).
  """
  devices = target_devices(target)
  sharding = jax.sharding.SingleDeviceSharding(devices[0])
  placed = [a if a is None or getattr(a, "sharding", None) is not None else
            jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
  with lowering_for(devices[:1]):
    return jax.jit(fn, **jit_kwargs).lower(*placed).compile()

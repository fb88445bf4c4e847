"""The platform a trace lowers for: what the kernels read to pick and compile an implementation.

Outside any mesh it is jax's default backend; inside `aot.lowering_for(devices)` (an
ahead-of-time compile for a TPU or GPU from a CPU machine) or a concrete mesh of target
devices, it is that mesh's device. Nothing here imports anything above the kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

_GPU_PLATFORMS = ("cuda", "rocm", "gpu")
HOPPER_KINDS = ("H100", "H200", "H800", "H20", "GH200")  # compute capability 9.0
BLACKWELL_KINDS = ("B100", "B200", "B300")  # 10.x


def is_hopper(device_kind: str | None) -> bool:
  """Whether a GPU's device kind (e.g. "NVIDIA H100 80GB HBM3") names a Hopper GPU."""
  return any(k in (device_kind or "") for k in HOPPER_KINDS)


def is_hopper_or_newer(device_kind: str | None) -> bool:
  """Hopper or Blackwell: compute capability 9.0 or above."""
  return is_hopper(device_kind) or any(k in (device_kind or "") for k in BLACKWELL_KINDS)


def platform_of(devices: Sequence[Any]) -> str:
  """"tpu" or "gpu" (jax's backend names) for a target's devices."""
  platform = devices[0].platform
  return "gpu" if platform in _GPU_PLATFORMS else platform


def target_platform() -> str:
  """The platform the current trace lowers for: the abstract mesh's device (inside
  ``aot.lowering_for`` or a concrete mesh of target devices), else jax's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = getattr(mesh, "abstract_device", None)
  if device is not None and getattr(device, "platform", None):
    return "gpu" if device.platform in _GPU_PLATFORMS else device.platform
  return jax.default_backend()


def target_device_kind() -> str | None:
  """Device kind of the target being lowered for (the abstract mesh's, else the first local
  device's), e.g. "NVIDIA H100 80GB HBM3"; None when unknown."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  if device is not None and getattr(device, "device_kind", None):
    return device.device_kind
  try:
    return jax.local_devices()[0].device_kind
  except RuntimeError:
    return None

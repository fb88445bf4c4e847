"""Per-device memory of a config's train step on a mesh, without owning the devices.

    python -m gated_attention_jax.plan --config=configs/default.py --num_devices=256 \\
        --config.mesh.fsdp=-1 --device_memory_gib=95

The train step is compiled ahead of time (`.lower(...).compile()` on
ShapeDtypeStructs, nothing allocated) for `num_devices` fake CPU devices laid
out as the config's mesh. What is computed and what is measured:

- computed (exact, from the shardings): parameters, optimizer state and the
  batch per device, i.e. the shard shapes times the dtype sizes;
- measured (XLA's memory analysis of the compiled SPMD program, one device's
  share): arguments, outputs, aliased (donated) bytes, temporaries
  (activations saved for the backward pass, gradients, collectives' buffers,
  workspace) and the peak.

The measurement comes from the CPU compiler. TPU and GPU compilers fuse,
lay out and schedule differently, so the temporaries on the real device differ
(usually by tens of percent, not by orders of magnitude); keep a margin. Multi-slice
(`mesh.dcn` > 1) is planned as the equivalent single mesh: per-device
memory depends only on how arrays are split, not on which link joins the devices.
Attention is compiled with the "xla" implementation (the cuDNN and Pallas
kernels do not compile for CPU); it materialises the attention probabilities,
so for a flash-kernel config the temporaries are an upper bound.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from gated_attention_jax import experiment
from gated_attention_jax import sharding
from gated_attention_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", 0, "Devices of the target slice (0: the product of the mesh sizes).")
_DEVICE_MEMORY = flags.DEFINE_float(
    "device_memory_gib", 0.0, "Memory of one device in GiB (0: do not judge the fit);"
    " e.g. 16 TPU v5e, 32 v4, 95 v5p, 32 v6e, 80 H100.")

BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32,
                "positions": jnp.int32, "loss_mask": jnp.float32}


def _single_mesh(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Folds the `mesh.dcn` slices into one mesh of the same global shape, in place."""
  data, fsdp, tensor = sharding.global_mesh_shape(config.mesh, num_devices)
  config.mesh.update(data=data, fsdp=fsdp, tensor=tensor,
                     dcn={"data": 1, "fsdp": 1, "tensor": 1})


def plan(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]) -> dict[str, Any]:
  """Per-device bytes of `config`'s train step on a mesh over `devices` (and the mesh)."""
  config = ml_collections.ConfigDict(config.to_dict())
  _single_mesh(config, len(devices))
  planned_impl = config.model.attention_impl
  config.model.attention_impl = "xla"  # cudnn / pallas kernels do not compile for CPU
  model_cfg = experiment.validate(config, len(devices))
  trainer = train.Trainer(config, model_cfg, sharding.make_mesh(config.mesh, devices))
  shape = (config.train.batch_size, config.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=trainer.batch_sharding)
           for k, dtype in BATCH_DTYPES.items()}
  compiled = trainer.train_step.lower(trainer.abstract_state, batch).compile()
  mem = compiled.memory_analysis()
  state = trainer.abstract_state
  return {
      "mesh": {a: config.mesh[a] for a in sharding.MESH_AXES},
      "attention_impl": planned_impl,
      "num_params": trainer.num_params,
      "params": sharding.per_device_bytes(state["params"]),
      "optimizer": sharding.per_device_bytes(state["opt_state"]),
      "batch": sharding.per_device_bytes(batch),
      "arguments": mem.argument_size_in_bytes,
      "outputs": mem.output_size_in_bytes,
      "aliased": mem.alias_size_in_bytes,
      "temporaries": mem.temp_size_in_bytes,
      "total": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
  }


def _size(nbytes: int) -> str:
  return f"{nbytes / 2**30:10.3f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:10.3f} MiB"


def report(numbers: dict[str, Any], device_memory_gib: float) -> str:
  """A readable table of `plan`'s numbers, with a verdict when the device memory is given."""
  mesh = " ".join(f"{a}={size}" for a, size in numbers["mesh"].items())
  lines = [f"mesh {mesh}  ({numbers['num_params']:,} parameters)",
           "computed from the shardings (per device):",
           f"  parameters        {_size(numbers['params'])}",
           f"  optimizer state   {_size(numbers['optimizer'])}",
           f"  batch             {_size(numbers['batch'])}",
           "measured by XLA's memory analysis of the compiled step (per device, CPU compiler):",
           f"  arguments         {_size(numbers['arguments'])}",
           f"  outputs           {_size(numbers['outputs'])}",
           f"  aliased (donated) {_size(numbers['aliased'])}",
           f"  temporaries       {_size(numbers['temporaries'])}  (activations, gradients,"
           " workspace)",
           f"  total             {_size(numbers['total'])}  (arguments + outputs - aliased +"
           " temporaries)"]
  if numbers["attention_impl"] != "xla":
    lines.append(f"attention compiled as 'xla', not {numbers['attention_impl']!r}: it keeps the"
                 " (B, N, T, S) probabilities, so temporaries are an upper bound")
  if device_memory_gib > 0:
    verdict = "fits" if numbers["total"] <= device_memory_gib * 2**30 else "does NOT fit"
    lines.append(f"{verdict} in {device_memory_gib:g} GiB per device"
                 " (leave ~10-20% margin for the real compiler and the runtime)")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  sizes = [config.mesh[a] for a in sharding.MESH_AXES]
  n = _NUM_DEVICES.value or math.prod(sizes) * math.prod(sharding.dcn_shape(config.mesh))
  if n < 1 or (not _NUM_DEVICES.value and -1 in sizes):
    raise app.UsageError("give --num_devices when a mesh size is -1")
  # Fake CPU devices; must be set before the first backend use.
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", n)
  print(report(plan(config, jax.devices()), _DEVICE_MEMORY.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)

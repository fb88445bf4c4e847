"""Per-device memory, FLOPs and compile time of a config's train step on a target, without it.

    python -m gated_attention_jax.plan --config=configs/ablation.py:baseline,paper_1p7b \\
        --topology=v5p:4x4x2 --out=plan.json
    python -m gated_attention_jax.plan --config=... --topology=h100      # one GPU
    python -m gated_attention_jax.plan --config=... --num_devices=256 --device_memory_gib=95

The real train step (`train.Trainer.train_step`: the config's model, `attention_impl`, remat,
`scan_layers`, optimizer and shardings; the Pallas kernel under `shard_map`) is compiled ahead
of time on `jax.ShapeDtypeStruct`s, nothing allocated, for a mesh laid out as the config's
`mesh` section over the target's devices:

- `--topology=<TPU topology>` (any name libtpu knows: "v5e:2x2", "v5p:8x8x4", "v6e:16x16",
  "v4:4x4x4"): libtpu's compiler for that slice, Mosaic for the Pallas kernel;
- `--topology=h100` / `h200`: the deviceless XLA GPU compiler for one GPU (`aot`);
- neither: `num_devices` fake CPU devices, attention compiled as "xla" (the cuDNN and Pallas
  kernels do not compile for CPU); the CPU compiler's temporaries are then at best a loose
  upper bound for an accelerator.

`attention_impl="auto"` (the paper-scale configs' default) is resolved for the target as the
layers resolve it when the step is traced for it (`attention_ops.choose_impl`), and the report
says what it chose and why: the fused Pallas kernel on a TPU; cuDNN on a GPU where it serves
the inputs, which the deviceless toolchain cannot compile, so the step is then compiled with
the fused kernel (similar memory) and the report says so.

Reported per device: parameters, optimizer state and the batch (exact, from the shardings),
the compiler's arguments, outputs, donated bytes and temporaries (activations kept for the
backward pass, gradients, collective buffers, workspace), their total against the device's
memory, and the step's FLOPs and XLA's estimate of its time where the backend gives one, beside
the model's FLOPs (`train.flops_per_token`: 6 x the parameters a token multiplies, plus
attention) for the same tokens. XLA's cost analysis counts a loop's body once, so for
`scan_layers` the step's FLOPs are counted only with `--count_flops`: from the same step
compiled unrolled with 1 and 2 layers (two more compiles; the layers are alike, so the
whole step is the 1-layer step plus L - 1 times the difference). The compiler's arguments
exceed the exact shard sizes by its layouts' padding (TPU tiles of 8 x 128: much for small
arrays, little for large ones).
Needs libtpu (TPU) or the CUDA plugin (GPU): `tools/aot_toolchains.sh`; JAX_PLATFORMS=cpu.

libtpu itself refuses a step that needs more than the HBM (RESOURCE_EXHAUSTED, with the bytes
it needed): the plan then says it does not fit, with that message. Refused before compiling,
with the numbers: a target the compiler does not know, a mesh
whose size is not the target's device count, "cudnn" attention on a TPU, and a config whose
parameters, optimizer state and batch alone exceed the device's memory. Multi-slice
(`mesh.dcn` > 1) is planned as the equivalent single mesh: per-device memory depends only on
how arrays are split, not on which link joins the devices.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from gated_attention_jax import aot
from gated_attention_jax import sharding
from gated_attention_jax.kernels import platform as platform_lib
from gated_attention_jax.training import experiment
from gated_attention_jax.training import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", "", "Compile for this target: a TPU topology libtpu knows (v5p:8x8x4,"
    " v6e:16x16, ...) or h100 / h200. Empty: fake CPU devices.")
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", 0, "Fake CPU devices (no --topology; 0: the product of the mesh sizes).")
_DEVICE_MEMORY = flags.DEFINE_float(
    "device_memory_gib", 0.0, "Memory of one device in GiB (0: the target's HBM with"
    " --topology, else do not judge the fit).")
_COUNT_FLOPS = flags.DEFINE_bool(
    "count_flops", False, "With scan_layers, also count the step's FLOPs (XLA counts a loop"
    " body once): compile it unrolled at 1 and 2 layers and extrapolate to all of them.")
_OUT = flags.DEFINE_string("out", "", "Also write the plan as JSON to this file.")

BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32,
                "positions": jnp.int32, "loss_mask": jnp.float32}


def _single_mesh(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Folds the `mesh.dcn` slices into one mesh of the same global shape, in place."""
  shape = sharding.global_mesh_shape(config.mesh, num_devices)
  config.mesh.update(**dict(zip(sharding.MESH_AXES, shape)),
                     dcn={a: 1 for a in sharding.MESH_AXES})


def _gib(nbytes: float) -> str:
  return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def _abstract_batch(config: ml_collections.ConfigDict,
                    trainer: train.Trainer) -> dict[str, jax.ShapeDtypeStruct]:
  shape = (config.train.batch_size, config.data.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=trainer.batch_sharding)
          for k, dtype in BATCH_DTYPES.items()}


def _cost(compiled: Any) -> tuple[Optional[float], Optional[float]]:
  """(FLOPs, XLA's step-time estimate in seconds) per device, from the compiler's analysis."""
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  seconds = cost.get("optimal_seconds")  # libtpu's comes out negative for v6e: then none
  return cost.get("flops"), seconds if seconds and seconds > 0 else None


def _scanned_step_cost(config: ml_collections.ConfigDict, model_cfg: Any,
                       devices: Sequence[Any]) -> tuple[Optional[float], Optional[float]]:
  """`_cost` of a `scan_layers` model's whole step, which XLA's analysis of the scanned step
  misses (it counts a loop's body once): the step compiled unrolled with 1 and 2 layers, and
  the 1-layer step plus L - 1 times their difference (scanned layers are alike)."""
  costs = []
  for layers in (1, 2):
    small = ml_collections.ConfigDict(config.to_dict())
    small.model.update(num_layers=layers, scan_layers=False)
    trainer = train.Trainer(small, model_cfg.replace(num_layers=layers, scan_layers=False),
                            sharding.make_mesh(small.mesh, devices))
    costs.append(_cost(trainer.train_step.lower(trainer.abstract_state,
                                                _abstract_batch(small, trainer)).compile()))
  more = model_cfg.num_layers - 1
  return tuple(None if one is None or two is None else one + more * (two - one)
               for one, two in zip(*costs))


def plan(config: ml_collections.ConfigDict, devices: Sequence[Any], *,
         topology: str = "cpu", hbm_bytes: Optional[int] = None,
         count_flops: bool = False) -> dict[str, Any]:
  """Compiles `config`'s train step for a mesh over `devices`; the per-device numbers.

  Args:
    devices: the target's devices (`aot.target_devices(topology)`, or CPU devices).
    topology: the target's name, for the report ("cpu" for fake CPU devices).
    hbm_bytes: one device's memory; None: the fit is not judged.
    count_flops: with `scan_layers`, count the step's FLOPs and time estimate from two more
      compiles (`_scanned_step_cost`); without, they are not reported for a scanned step.
  Raises:
    ValueError (before compiling) when the mesh does not cover the devices, "cudnn" is asked
    of a TPU, or parameters + optimizer state + batch exceed `hbm_bytes`.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  platform = platform_lib.platform_of(devices)
  try:
    _single_mesh(config, len(devices))
  except ValueError as e:
    raise ValueError(f"{topology} has {len(devices)} devices: {e}") from e
  model_cfg = experiment.validate(config, len(devices), devices)
  requested = config.model.attention_impl
  chosen, why = experiment.attention_choice(config, model_cfg, devices)
  if platform == "tpu" and chosen == "cudnn":
    raise ValueError("attention_impl='cudnn' is a GPU library; for a TPU use"
                     " --config.model.attention_impl=auto or pallas (the Mosaic kernel) or xla")
  compiled_impl = chosen
  if platform == "cpu":
    compiled_impl = "xla"  # cudnn / pallas kernels do not compile for CPU
  elif requested == "auto" and chosen == "cudnn":
    compiled_impl = "pallas"  # the deviceless toolchain has no cuDNN; its memory is alike
  config.model.attention_impl = compiled_impl
  model_cfg = model_cfg.replace(attention_impl=compiled_impl)
  trainer = train.Trainer(config, model_cfg, sharding.make_mesh(config.mesh, devices))
  batch = _abstract_batch(config, trainer)
  state = trainer.abstract_state
  exact = {"params": sharding.per_device_bytes(state["params"]),
           "optimizer": sharding.per_device_bytes(state["opt_state"]),
           "batch": sharding.per_device_bytes(batch)}
  if hbm_bytes is not None and sum(exact.values()) > hbm_bytes:
    raise ValueError(
        f"cannot fit on {topology}: parameters {_gib(exact['params'])} + optimizer state"
        f" {_gib(exact['optimizer'])} + batch {_gib(exact['batch'])} per device ="
        f" {_gib(sum(exact.values()))} > {_gib(hbm_bytes)} of memory, before any activation;"
        f" shard further (mesh.fsdp) or use more devices")
  numbers = {
      "topology": topology, "num_devices": len(devices),
      "device_kind": devices[0].device_kind, "compiler": platform,
      "mesh": {a: config.mesh.get(a, 1) for a in sharding.MESH_AXES},
      "batch_size": config.train.batch_size, "seq_len": config.data.seq_len,
      "attention_impl": requested, "attention_choice": chosen, "attention_reason": why,
      "compiled_attention_impl": compiled_impl,
      "scan_layers": model_cfg.scan_layers, "remat": model_cfg.remat,
      "num_params": trainer.num_params, "active_params": trainer.active_params,
      "hbm_bytes_per_device": hbm_bytes, **_model_flops(config, model_cfg, trainer, len(devices)),
  }
  start = time.perf_counter()  # tracing, lowering and compiling
  try:
    compiled = trainer.train_step.lower(state, batch).compile()
  except RuntimeError as e:
    if "cuDNN" in str(e) and not isinstance(e, jax.errors.JaxRuntimeError):
      raise ValueError(
          f"attention_impl='cudnn' cannot be compiled ahead of time here ({e}): jax's cuDNN"
          " attention needs the cuDNN library, which the deviceless toolchain lacks. Plan"
          " with --config.model.attention_impl=pallas or xla (cuDNN's memory is like the"
          " fused kernel's).") from e
    if not isinstance(e, jax.errors.JaxRuntimeError):
      raise
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The target's compiler refuses a program that does not fit its memory (libtpu does).
    return {**numbers, "per_device_bytes": {**exact, "total": None}, "fits": False,
            "compiler_error": str(e).splitlines()[0],
            "compile_seconds": time.perf_counter() - start,
            "flops_per_device": None, "estimated_step_seconds": None}
  compile_seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes)
  flops, estimate = _cost(compiled)
  flops_counted = "the compiled step"
  if model_cfg.scan_layers:
    flops, estimate = (_scanned_step_cost(config, model_cfg, devices) if count_flops
                       else (None, None))
    flops_counted = ("the step compiled unrolled at 1 and 2 layers, extrapolated to"
                     f" {model_cfg.num_layers}" if count_flops else None)
  numbers.update({
      "per_device_bytes": {**exact, "arguments": mem.argument_size_in_bytes,
                           "outputs": mem.output_size_in_bytes,
                           "aliased": mem.alias_size_in_bytes,
                           "temporaries": mem.temp_size_in_bytes, "total": total},
      "fits": None if hbm_bytes is None else total <= hbm_bytes,
      "compile_seconds": compile_seconds,
      "flops_per_device": flops, "flops_counted": flops_counted,
      "estimated_step_seconds": estimate,
  })
  if compiled_impl == "pallas" and platform in aot.KERNEL_CALLS:
    calls = aot.kernel_calls(compiled, platform)
    numbers["kernel_custom_calls"] = sum(calls.values())
    numbers["kernel_call_targets"] = calls
  return numbers


def _model_flops(config: ml_collections.ConfigDict, model_cfg: Any, trainer: train.Trainer,
                 num_devices: int) -> dict[str, float]:
  """The model's FLOPs per device per step (`train.flops_per_token`, PaLM's convention): 6 x
  the parameters a token multiplies (the active ones but the input embedding) x its tokens,
  and attention's 12 x layers x heads x head_dim x seq_len per token apart."""
  tokens = config.train.batch_size * config.data.seq_len / num_devices
  matmul = train.flops_per_token(model_cfg, 0, trainer.active_params)
  total = train.flops_per_token(model_cfg, config.data.seq_len, trainer.active_params)
  return {"tokens_per_device": tokens, "matmul_params": matmul / 6,
          "model_matmul_flops_per_device": matmul * tokens,
          "model_attention_flops_per_device": (total - matmul) * tokens}


def _flops_lines(numbers: dict[str, Any]) -> list[str]:
  """The step's FLOPs against the model's, or why a scanned step's were not counted."""
  matmul = numbers["model_matmul_flops_per_device"]
  attention = numbers["model_attention_flops_per_device"]
  lines = [f"model FLOPs per device     {matmul:.4g} = 6 x {numbers['matmul_params']:,.0f}"
           f" parameters a token multiplies x {numbers['tokens_per_device']:,.0f} tokens,"
           f" + attention {attention:.4g}"]
  flops = numbers.get("flops_per_device")
  if flops:
    kernel = numbers["compiled_attention_impl"] in ("pallas", "cudnn")
    model, what = (matmul, "6 x params x tokens") if kernel else (
        matmul + attention, "the model's, attention included")
    lines.append(f"FLOPs per device per step  {flops:.4g} = {flops / model:.3f} x {what}"
                 f" (counted by XLA in {numbers['flops_counted']}"
                 f"{'; the attention kernel not counted' if kernel else ''})")
    if numbers["remat"] == "full":
      lines.append("  (remat 'full' runs each layer's forward twice: ~8/6 = 1.33 x expected)")
  elif numbers["scan_layers"] and "compiler_error" not in numbers:
    lines.append("FLOPs per device per step  not counted: XLA counts the scanned layers' loop"
                 " body once (--count_flops counts them from the step compiled unrolled at 1"
                 " and 2 layers)")
  return lines


def _batch_shards(numbers: dict[str, Any]) -> int:
  """The devices the batch is split over: mesh data x fsdp x expert (`sharding.BATCH_AXES`)."""
  return math.prod(numbers["mesh"].get(a, 1) for a in sharding.BATCH_AXES)


def _attention_lines(numbers: dict[str, Any]) -> list[str]:
  """What "auto" attention chose and why, and what was compiled instead where it differs."""
  chosen, compiled = numbers["attention_choice"], numbers["compiled_attention_impl"]
  lines = []
  if numbers["attention_impl"] == "auto":
    lines.append(f"attention_impl 'auto' chose {chosen!r} for {numbers['device_kind']}:"
                 f" {numbers['attention_reason']}")
  if compiled == "xla" != chosen:
    lines.append(f"attention compiled as 'xla', not {chosen!r}: it keeps the"
                 " (B, N, T, S) probabilities, so temporaries are an upper bound")
  elif compiled != chosen:
    lines.append(f"attention compiled as {compiled!r}, not {chosen!r}: jax's cuDNN attention"
                 " needs the cuDNN library, which the deviceless toolchain lacks (its memory"
                 " is like the fused kernel's)")
  return lines


def report(numbers: dict[str, Any]) -> str:
  """A readable table of `plan`'s numbers, with the verdict when the device memory is known."""
  mesh = " ".join(f"{a}={size}" for a, size in numbers["mesh"].items())
  b = numbers["per_device_bytes"]
  if "compiler_error" in numbers:
    return "\n".join([f"{numbers['topology']}: mesh {mesh}, batch {numbers['batch_size']} x"
                      f" {numbers['seq_len']}: does NOT fit, the compiler refused it:",
                      f"  {numbers['compiler_error']}",
                      f"  ({numbers['batch_size'] // _batch_shards(numbers)} sequences per"
                      " device: lower --config.train.batch_size, or use more devices)",
                      *_attention_lines(numbers)])
  compiler = {"cpu": "CPU compiler (fake devices)", "tpu": "libtpu",
              "gpu": "XLA GPU, deviceless"}[numbers["compiler"]]
  lines = [f"{numbers['topology']}: {numbers['num_devices']} x {numbers['device_kind']},"
           f" mesh {mesh}, {numbers['num_params']:,} parameters, batch"
           f" {numbers['batch_size']} x {numbers['seq_len']}, scan_layers"
           f" {numbers['scan_layers']}, remat {numbers['remat']}",
           "per device, computed from the shardings:",
           f"  parameters        {_gib(b['params'])}",
           f"  optimizer state   {_gib(b['optimizer'])}",
           f"  batch             {_gib(b['batch'])}",
           f"per device, from the compiled step ({compiler}):",
           f"  arguments         {_gib(b['arguments'])}",
           f"  outputs           {_gib(b['outputs'])}",
           f"  aliased (donated) {_gib(b['aliased'])}",
           f"  temporaries       {_gib(b['temporaries'])}  (activations, gradients, workspace)",
           f"  total             {_gib(b['total'])}  (arguments + outputs - aliased +"
           " temporaries)",
           f"traced, lowered and compiled in {numbers['compile_seconds']:.1f} s"]
  lines += _flops_lines(numbers)
  if numbers["estimated_step_seconds"]:
    lines.append(f"step time, XLA's estimate  {numbers['estimated_step_seconds']:.4g} s"
                 " (an estimate, not a measurement; from the same compiles as the FLOPs)")
  if "kernel_custom_calls" in numbers:
    targets = ", ".join(f"{n} {name}" for name, n in numbers["kernel_call_targets"].items())
    lines.append(f"Pallas kernel calls compiled for {numbers['compiler']}:"
                 f" {numbers['kernel_custom_calls']}{f' ({targets})' if targets else ''}")
  lines += _attention_lines(numbers)
  if numbers["fits"] is not None:
    verdict = "fits" if numbers["fits"] else "does NOT fit"
    lines.append(f"{verdict} in {_gib(numbers['hbm_bytes_per_device'])} per device"
                 " (the runtime needs some too: keep a margin)")
  return "\n".join(lines)


def _target(config: ml_collections.ConfigDict) -> tuple[str, Sequence[Any], Optional[int]]:
  """(name, devices, memory per device) from the flags; sets up fake CPU devices if asked."""
  gib = _DEVICE_MEMORY.value
  if _TOPOLOGY.value:
    if _NUM_DEVICES.value:
      raise app.UsageError("--num_devices is for fake CPU devices; a --topology has its own")
    devices = aot.target_devices(_TOPOLOGY.value)
    return (_TOPOLOGY.value, devices,
            int(gib * 2**30) if gib > 0 else aot.hbm_bytes(_TOPOLOGY.value))
  sizes = [config.mesh.get(a, 1) for a in sharding.MESH_AXES]
  n = _NUM_DEVICES.value or math.prod(sizes) * math.prod(sharding.dcn_shape(config.mesh))
  if n < 1 or (not _NUM_DEVICES.value and -1 in sizes):
    raise app.UsageError("give --num_devices when a mesh size is -1")
  # Fake CPU devices; must be set before the first backend use.
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", n)
  return "cpu", jax.devices(), int(gib * 2**30) if gib > 0 else None


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    topology, devices, hbm = _target(_CONFIG.value)
    numbers = plan(_CONFIG.value, devices, topology=topology, hbm_bytes=hbm,
                   count_flops=_COUNT_FLOPS.value)
  except ValueError as e:
    sys.exit(f"plan refused: {e}")
  print(report(numbers))
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(json.dumps(numbers, indent=2) + "\n")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)

"""The experiment config: its sections, defaults, and the one place it is validated.

Sections:
  model  TransformerConfig fields (vocab_size 0 = the tokenizer's, rounded up to 128;
         a synthetic task's exactly)
  gate   GateConfig fields
  data   see gated_attention_jax/data/config.py
  train  optimisation, logging, evaluation and checkpoint cadence
  mesh   data / fsdp / tensor / expert sizes (-1 fills the rest); a `dcn` section with
         the number of slices along each axis for multi-slice runs
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import jax
import ml_collections
from jax.sharding import AbstractMesh

from gated_attention_jax import attention_ops
from gated_attention_jax import params as params_lib
from gated_attention_jax import sharding
from gated_attention_jax.data import config as data_config
from gated_attention_jax.data import pipeline
from gated_attention_jax.gate import GateConfig
from gated_attention_jax.kernels import platform
from gated_attention_jax.moe import MoEConfig
from gated_attention_jax.transformer import TransformerConfig

VOCAB_MULTIPLE = 128
MAX_STEPS = 10**9

# What may differ when a run resumes: cadence, evaluation, bookkeeping and layout,
# nothing the trained weights or the data order depend on (a prefix covers a section).
RESUMABLE = ("train.num_steps", "train.log_every", "train.eval_every", "train.eval_batches",
             "train.checkpoint_every", "train.keep_checkpoints", "train.track_sinks",
             "train.spike_factor", "train.spike_window", "train.peak_tflops_per_device",
             "data.prefetch", "data.cache_dir", "model.attention_impl", "model.remat", "mesh",
             # read once, when a run starts: a resumed run continues from its own checkpoints
             "train.init_from", "train.init_from_digest", "train.init_from_drop_unused")


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default; config files start from this and update it."""
  model = {f.name: f.default for f in dataclasses.fields(TransformerConfig)
           if f.name not in ("gate", "rope_scaling", "moe")}
  model["moe"] = dataclasses.asdict(MoEConfig())
  model["vocab_size"] = 0
  model["rope_scaling"] = {"method": "none", "factor": 1.0, "original_max_len": 2048,
                           "beta_fast": 32.0, "beta_slow": 1.0}
  gate = {f.name: f.default for f in dataclasses.fields(GateConfig)}
  train = {
      "num_steps": 1000, "batch_size": 16,  # global batch (all processes)
      "learning_rate": 3e-3, "warmup_steps": 100, "min_lr_ratio": 0.1,
      "b1": 0.9, "b2": 0.95, "weight_decay": 0.1, "grad_clip": 1.0, "z_loss": 0.0,
      "seed": 0,
      "log_every": 10, "eval_every": 200, "eval_batches": 8,
      # at each eval, first-token attention, sink rate and max activation on the
      # first eval batch (metrics.jsonl keys first_token_attention, sink_rate, ...)
      "track_sinks": False,
      "track_activations": False,  # per logged step: max |activation|, attention logit per layer
      "checkpoint_every": 200, "keep_checkpoints": 3,
      "spike_factor": 2.0, "spike_window": 50,
      "peak_tflops_per_device": 0.0,  # 0: look the device up (MFU left out if unknown)
      # Start from trained weights (`training/init_from.py`): a run folder, DIR or DIR@STEP;
      # its parameters only (a fresh optimizer at step 0). The trainer records the step read
      # ("DIR@STEP") and the sha256 of the source's config.json (init_from_digest) in the new
      # run's config.json. Parameters the source has and this config lacks are refused unless
      # init_from_drop_unused.
      "init_from": "", "init_from_digest": "", "init_from_drop_unused": False,
      # Which parameters train: comma-separated groups (params.GROUPS: all, gate, attention,
      # mlp, norms, embeddings) or a regular expression over parameter paths; the others stay
      # bit-identical and get no optimizer state.
      "trainable": "all",
  }
  mesh = {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1,
          "dcn": {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}}
  return ml_collections.ConfigDict({
      "model": model, "gate": gate, "data": data_config.default_data_config(),
      "train": train, "mesh": mesh})


_POSITIVE_INTS = ("num_steps", "batch_size", "log_every", "eval_every", "eval_batches",
                  "checkpoint_every", "keep_checkpoints", "spike_window")
_NON_NEGATIVE = ("learning_rate", "warmup_steps", "min_lr_ratio", "weight_decay",
                 "grad_clip", "z_loss", "peak_tflops_per_device")


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_train(train: ml_collections.ConfigDict) -> None:
  for name in _POSITIVE_INTS:
    v = train[name]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"train.{name} must be a positive int, got {v!r}")
  if train.num_steps > MAX_STEPS:
    raise ValueError(f"train.num_steps must be in [1, {MAX_STEPS:.0e}], got {train.num_steps}")
  for name in _NON_NEGATIVE:
    if not _is_number(train[name]) or train[name] < 0:
      raise ValueError(f"train.{name} must be a finite number >= 0, got {train[name]!r}")
  if not isinstance(train.warmup_steps, int) or train.warmup_steps > train.num_steps:
    raise ValueError(f"train.warmup_steps must be an int in [0, train.num_steps ="
                     f" {train.num_steps}], got {train.warmup_steps!r}")
  if train.min_lr_ratio > 1:
    raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {train.min_lr_ratio!r}")
  for name in ("track_sinks", "track_activations"):
    if not isinstance(train.get(name, False), bool):
      raise ValueError(f"train.{name} must be a bool, got {train[name]!r}")
  for name in ("b1", "b2"):
    if not (_is_number(train[name]) and 0 <= train[name] < 1):
      raise ValueError(f"train.{name} must be in [0, 1), got {train[name]!r}")
  if not (_is_number(train.spike_factor) and train.spike_factor > 1):
    raise ValueError(f"train.spike_factor must be a finite number > 1, got"
                     f" {train.spike_factor!r}")
  params_lib.selector(train.get("trainable", "all"), "train.trainable")
  if not isinstance(train.get("init_from", ""), str):
    raise ValueError(f"train.init_from must be a run folder path (DIR or DIR@STEP) or '', got"
                     f" {train.init_from!r}")
  if not isinstance(train.get("init_from_drop_unused", False), bool):
    raise ValueError(f"train.init_from_drop_unused must be a bool, got"
                     f" {train.init_from_drop_unused!r}")


def config_from_json(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A run's `config.json` as the ConfigDict it was saved from: JSON gives lists where the
  config has tuples (`model.moe.dense_layers`); those become tuples again."""
  def restore(value: Any, default: Any) -> Any:
    if isinstance(value, dict) and isinstance(default, Mapping):
      return {k: restore(v, default.get(k)) for k, v in value.items()}
    return tuple(value) if isinstance(value, list) and isinstance(default, tuple) else value
  return ml_collections.ConfigDict(restore(dict(saved), base_config().to_dict()))


def model_config(config: ml_collections.ConfigDict) -> TransformerConfig:
  """The validated TransformerConfig of an experiment (vocab from the data if 0)."""
  model = config.model.to_dict()
  if model["vocab_size"] == 0:
    vocab = pipeline.vocab_size(config.data)
    synthetic = config.data.corpus in data_config.SYNTHETIC  # tiny vocabularies: kept exact
    model["vocab_size"] = vocab if synthetic else -(-vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
  return TransformerConfig.from_dict(model, config.gate.to_dict())


def attention_choice(config: ml_collections.ConfigDict, model: TransformerConfig,
                     devices: Sequence[Any] | None = None) -> tuple[str, str]:
  """(the attention impl the train step runs on `devices`, why): `model.attention_impl`
  with "auto" resolved as the layers resolve it when the step is traced for those devices
  (`attention_ops.choose_impl`). devices: the target's (default: this process's)."""
  devices = jax.devices() if devices is None else devices
  t = config.data.seq_len
  return attention_ops.choose_impl(
      model.attention_impl, platform.platform_of(devices), devices[0].device_kind,
      dtype=model.dtype, head_dim=model.head_dim, q_len=t, kv_len=t,
      segments=config.data.packing == "segments")


def validate(config: ml_collections.ConfigDict, num_devices: int,
             devices: Sequence[Any] | None = None) -> TransformerConfig:
  """Checks every section before anything is compiled; returns the model config.

  devices: the devices the step is compiled for, where "auto" attention is resolved
  (default: this process's)."""
  for section in ("model", "gate", "data", "train", "mesh"):
    if section not in config:
      raise ValueError(f"config has no section {section!r}")
  data_config.validate(config.data)
  validate_train(config.train)
  shape = sharding.global_mesh_shape(config.mesh, num_devices)
  sizes = dict(zip(sharding.MESH_AXES, shape))
  batch_shards = math.prod(sizes[a] for a in sharding.BATCH_AXES)
  if config.train.batch_size % batch_shards:
    raise ValueError(f"train.batch_size ({config.train.batch_size}) must be a multiple of"
                     f" the {' x '.join(sharding.BATCH_AXES)} mesh size ({batch_shards})")
  model = model_config(config)
  if model.mlp_type == "moe" and model.moe.num_experts % sizes["expert"]:
    experts = model.moe.num_experts
    allowed = [d for d in range(1, experts + 1) if experts % d == 0]
    raise ValueError(f"mesh.expert ({sizes['expert']}) must divide model.moe.num_experts"
                     f" ({experts}): each device on the expert axis holds an equal share of"
                     f" the experts; allowed: {allowed}")
  impl, why = attention_choice(config, model, devices)
  if impl == "pallas":  # the kernel runs per shard: can this mesh serve it?
    b, t = config.train.batch_size, config.data.seq_len
    try:
      attention_ops.pallas_shard_plan((b, t, model.num_heads, model.head_dim),
                                      (b, t, model.num_kv_heads, model.head_dim),
                                      AbstractMesh(shape, sharding.MESH_AXES))
    except ValueError as e:
      if model.attention_impl != "auto":
        raise
      raise ValueError(f"model.attention_impl='auto' chose 'pallas' ({why}), but {e}") from e
  if model.position_embedding == "learned" and config.data.seq_len > model.max_positions:
    raise ValueError(f"data.seq_len ({config.data.seq_len}) exceeds model.max_positions"
                     f" ({model.max_positions}) of the learned position embedding")
  return model


def min_device_bytes(config: ml_collections.ConfigDict, model: TransformerConfig,
                     mesh_shape: tuple[int, ...]) -> dict[str, int]:
  """A lower bound of one device's memory for a train step, by what needs it.

  Only what cannot be avoided: float32 parameters with gradients and two Adam
  moments, the float32 logits and their gradient, and (the "xla" attention) the
  saved attention probabilities. `python -m gated_attention_jax.plan` measures.
  """
  data, fsdp, tensor, expert = mesh_shape
  rows = max(config.train.batch_size // (data * fsdp * expert), 1)
  t = config.data.seq_len
  params = (model.vocab_size * model.d_model * (1 if model.tie_embeddings else 2)
            + model.num_layers * model.d_model * (
                (model.num_heads * 2 + model.num_kv_heads * 2) * model.head_dim
                + 3 * model.mlp_dim))
  need = {"parameters and optimizer state": 16 * params // (fsdp * expert * tensor),
          "logits": 2 * 4 * rows * t * model.vocab_size // tensor}
  if attention_choice(config, model)[0] == "xla":
    need["attention probabilities"] = (4 * rows * model.num_heads * t * t * model.num_layers
                                       // tensor)
  return need


def device_memory_bytes() -> int:
  """Memory of one local device (host memory shared by the local devices on CPU)."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()


def check_fits(config: ml_collections.ConfigDict, model: TransformerConfig,
               num_devices: int) -> None:
  """What `validate` cannot see without the data and the machine: the data's token
  ids fit the model's vocabulary, and `min_device_bytes` fits this machine's devices."""
  data_vocab = pipeline.vocab_size(config.data)
  if model.vocab_size < data_vocab:
    raise ValueError(f"model.vocab_size ({model.vocab_size}) is smaller than the data's"
                     f" {data_vocab} token ids (BOS/PAD included); set it to 0 to use the"
                     " data's")
  need = min_device_bytes(config, model, sharding.global_mesh_shape(config.mesh, num_devices))
  have = device_memory_bytes()
  if sum(need.values()) > have:
    parts = ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in need.items())
    raise ValueError(f"this config needs at least {sum(need.values()) / 2**30:.1f} GiB per"
                     f" device ({parts}) and a device has {have / 2**30:.1f} GiB: lower"
                     f" data.seq_len ({config.data.seq_len}), train.batch_size"
                     f" ({config.train.batch_size}) or model.vocab_size"
                     f" ({model.vocab_size}), or shard over more devices (mesh)")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def identity_differences(saved: Mapping[str, Any],
                         config: ml_collections.ConfigDict) -> list[str]:
  """`field: saved -> now` for every field outside RESUMABLE that differs from `saved`.

  saved: a run's `config.json` (the config as JSON). A field the saved config
  lacks (added to the code since) counts as its default; one the current config
  lacks (removed since) is ignored.
  """
  old, new = _flatten(saved), _flatten(json.loads(config.to_json_best_effort()))
  defaults = _flatten(json.loads(base_config().to_json_best_effort()))
  resumable = lambda k: any(k == r or k.startswith(r + ".") for r in RESUMABLE)
  differences = []
  for key in sorted(new):
    before = old.get(key, defaults.get(key))
    if not resumable(key) and before != new[key]:
      differences.append(f"{key}: {before!r} -> {new[key]!r}")
  return differences

"""The experiment config: its sections, defaults, and the one place it is validated.

Sections:
  model  TransformerConfig fields (vocab_size 0 = the tokenizer's, rounded up to 128;
         a synthetic task's exactly)
  gate   GateConfig fields
  data   see gated_attention_jax/data/config.py
  train  optimisation, logging, evaluation and checkpoint cadence
  mesh   data / fsdp / tensor sizes (-1 fills the rest); a `dcn` section with the
         number of slices along each axis for multi-slice runs
"""

from __future__ import annotations

import dataclasses

import ml_collections
from jax.sharding import AbstractMesh

from gated_attention_jax import attention_ops
from gated_attention_jax import sharding
from gated_attention_jax.data import config as data_config
from gated_attention_jax.data import pipeline
from gated_attention_jax.gate import GateConfig
from gated_attention_jax.transformer import TransformerConfig

VOCAB_MULTIPLE = 128


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default; config files start from this and update it."""
  model = {f.name: f.default for f in dataclasses.fields(TransformerConfig)
           if f.name not in ("gate", "rope_scaling")}
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
  }
  mesh = {"data": -1, "fsdp": 1, "tensor": 1, "dcn": {"data": 1, "fsdp": 1, "tensor": 1}}
  return ml_collections.ConfigDict({
      "model": model, "gate": gate, "data": data_config.default_data_config(),
      "train": train, "mesh": mesh})


_POSITIVE_INTS = ("num_steps", "batch_size", "log_every", "eval_every", "eval_batches",
                  "checkpoint_every", "keep_checkpoints", "spike_window")
_NON_NEGATIVE = ("learning_rate", "warmup_steps", "min_lr_ratio", "weight_decay",
                 "grad_clip", "z_loss", "peak_tflops_per_device")


def validate_train(train: ml_collections.ConfigDict) -> None:
  for name in _POSITIVE_INTS:
    v = train[name]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"train.{name} must be a positive int, got {v!r}")
  for name in _NON_NEGATIVE:
    if not isinstance(train[name], (int, float)) or train[name] < 0:
      raise ValueError(f"train.{name} must be a number >= 0, got {train[name]!r}")
  for name in ("track_sinks", "track_activations"):
    if not isinstance(train.get(name, False), bool):
      raise ValueError(f"train.{name} must be a bool, got {train[name]!r}")
  for name in ("b1", "b2"):
    if not 0 <= train[name] < 1:
      raise ValueError(f"train.{name} must be in [0, 1), got {train[name]!r}")
  if train.spike_factor <= 1:
    raise ValueError(f"train.spike_factor must be > 1, got {train.spike_factor!r}")


def model_config(config: ml_collections.ConfigDict) -> TransformerConfig:
  """The validated TransformerConfig of an experiment (vocab from the data if 0)."""
  model = config.model.to_dict()
  if model["vocab_size"] == 0:
    vocab = pipeline.vocab_size(config.data)
    synthetic = config.data.corpus in data_config.SYNTHETIC  # tiny vocabularies: kept exact
    model["vocab_size"] = vocab if synthetic else -(-vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
  return TransformerConfig.from_dict(model, config.gate.to_dict())


def validate(config: ml_collections.ConfigDict, num_devices: int) -> TransformerConfig:
  """Checks every section before anything is compiled; returns the model config."""
  for section in ("model", "gate", "data", "train", "mesh"):
    if section not in config:
      raise ValueError(f"config has no section {section!r}")
  data_config.validate(config.data)
  validate_train(config.train)
  shape = sharding.global_mesh_shape(config.mesh, num_devices)
  batch_shards = shape[0] * shape[1]
  if config.train.batch_size % batch_shards:
    raise ValueError(f"train.batch_size ({config.train.batch_size}) must be a multiple of"
                     f" the data x fsdp mesh size ({batch_shards})")
  model = model_config(config)
  if model.attention_impl == "pallas":  # the kernel runs per shard: can this mesh serve it?
    b, t = config.train.batch_size, config.data.seq_len
    attention_ops.pallas_shard_plan((b, t, model.num_heads, model.head_dim),
                                    (b, t, model.num_kv_heads, model.head_dim),
                                    AbstractMesh(shape, sharding.MESH_AXES))
  if model.position_embedding == "learned" and config.data.seq_len > model.max_positions:
    raise ValueError(f"data.seq_len ({config.data.seq_len}) exceeds model.max_positions"
                     f" ({model.max_positions}) of the learned position embedding")
  return model

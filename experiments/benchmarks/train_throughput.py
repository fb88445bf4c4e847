"""Training throughput of a config: tokens/s and model TFLOP/s vs a bf16 matmul, one run.

    python experiments/benchmarks/train_throughput.py --config=configs/gpt_125m.py
    # CPU smoke test:
    python experiments/benchmarks/train_throughput.py --config=configs/default.py --steps=5 \
        --matmul_size=1024

The train step is the real one (`Trainer.train_step`: forward, backward, AdamW),
fed one fixed batch of the real corpus that stays on the device, so the number
is the model's, not the input pipeline's. Model FLOPs use `train.flops_per_token`.
The baseline is a bf16 (matmul_size)^3 matmul timed on the same device in the
same run; the ratio is model TFLOP/s / matmul TFLOP/s.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from gated_attention_jax import experiment, sharding, train
from gated_attention_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps (compilation) first.")
_MATMUL = flags.DEFINE_integer("matmul_size", 8192, "Side of the bf16 baseline matmul.")


def matmul_tflops(n: int, repeats: int = 10) -> float:
  """Measured bf16 n×n×n matmul rate on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    out = f(a, b)
  out.block_until_ready()
  return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12


def main(argv):
  del argv
  config = _CONFIG.value
  model_cfg = experiment.validate(config, jax.device_count())
  trainer = train.Trainer(config, model_cfg, sharding.make_mesh(config.mesh))
  batch_size = config.train.batch_size // jax.process_count()
  local = next(iter(pipeline.make_train_iterator(config.data, batch_size=batch_size, seed=0)))
  batch = trainer.global_batch(local)
  state = trainer.init_state()
  for _ in range(_WARMUP.value):
    state, metrics = trainer.train_step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = trainer.train_step(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / _STEPS.value
  tokens = config.train.batch_size * config.data.seq_len
  flops = train.flops_per_token(model_cfg, config.data.seq_len, trainer.num_params)
  model_tflops = tokens * flops / seconds / 1e12 / jax.device_count()
  baseline = matmul_tflops(_MATMUL.value)
  result = {
      "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
      "params": trainer.num_params, "seq_len": config.data.seq_len,
      "global_batch": config.train.batch_size, "attention_impl": model_cfg.attention_impl,
      "dtype": model_cfg.dtype, "gate": model_cfg.gate.describe(),
      "step_ms": seconds * 1e3, "tokens_per_sec": tokens / seconds,
      "model_tflops_per_device": model_tflops, "matmul_tflops": baseline,
      "ratio_to_matmul": model_tflops / baseline,
  }
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)

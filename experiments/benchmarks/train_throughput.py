"""Training throughput of a config under several attention implementations, in one run.

    python experiments/benchmarks/train_throughput.py --config=configs/gpt_125m.py
    # = --impls=cudnn,pallas,xla: cuDNN + an XLA gate is the baseline, the fused
    #   Pallas kernel and plain XLA are divided by it
    # CPU smoke test (no cuDNN there; Pallas runs in its interpreter, slowly):
    python experiments/benchmarks/train_throughput.py --config=configs/default.py \
        --impls=xla,pallas --steps=2 --warmup=1 --matmul_size=512 \
        --config.train.batch_size=2 --config.data.seq_len=64 --config.model.num_layers=1

For each `--impls` entry the config's `model.attention_impl` is set to it and the
real train step is timed (`Trainer.train_step`: forward, backward, AdamW, on the
config's mesh, so "pallas" runs per shard), fed one fixed batch of the real corpus
that stays on the device, so the number is the model's, not the input pipeline's.
Model FLOPs use `train.flops_per_token`. Reported per implementation: tokens/s,
step time, model TFLOP/s per device, the ratio to the first implementation (the
baseline) and to a bf16 (matmul_size)^3 matmul timed on the same device in the
same run. Timings of different runs differ by ~5%: compare within one run. An
implementation that fails (compile error, out of memory) is reported with its error and
the others still run; `--json=PATH` also writes the result with a markdown table.
"""

from __future__ import annotations

import copy
import datetime
import json
import pathlib
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from gated_attention_jax import attention_ops, sharding
from gated_attention_jax.training import experiment, train
from gated_attention_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.",
                                          lock_config=True)
_IMPLS = flags.DEFINE_list("impls", ["cudnn", "pallas", "xla"],
                           f"attention_impl values to time, the first is the baseline; from"
                           f" {attention_ops.ATTENTION_IMPLS}.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps (compilation) first.")
_MATMUL = flags.DEFINE_integer("matmul_size", 8192, "Side of the bf16 baseline matmul.")
_JSON = flags.DEFINE_string("json", None, "Also write the result, with a markdown table and a "
                            "summary, to this file (rewritten after every implementation).")


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


def time_train_step(config) -> dict:
  """Seconds per train step of `config` and its model's size and FLOPs per token."""
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
  return {"seconds": seconds, "params": trainer.num_params,
          "flops_per_token": train.flops_per_token(model_cfg, config.data.seq_len,
                                                   trainer.num_params)}


def report(result: dict) -> dict:
  """result with a markdown table of its runs and a summary line per run (as --json writes)."""
  ratio = f"ratio_to_{_IMPLS.value[0]}"
  fmt = lambda x, spec: "n/a" if x is None else format(x, spec)
  params = fmt(result["params"], ",")
  lines = [f"Device: {result['device']} x{result['devices']}, jax {result['jax']}, {params} "
           f"params, seq {result['seq_len']}, global batch {result['global_batch']}, "
           f"{result['dtype']}, gate {result['gate']}; bf16 matmul "
           f"{result['matmul_tflops']:.1f} TFLOP/s.", "",
           f"| attention_impl | step ms | tokens/s | model TFLOP/s | {ratio} | ratio_to_matmul |",
           "|---|---|---|---|---|---|"]
  summary = []
  for run in result["runs"]:
    impl = run["attention_impl"]
    if "error" in run:
      lines.append(f"| {impl} | error: {run['error']} | | | | |")
      summary.append(f"{impl}: error {run['error']}")
      continue
    lines.append(f"| {impl} | {run['step_ms']:.1f} | {run['tokens_per_sec']:,.0f} | "
                 f"{run['model_tflops_per_device']:.3g} | {fmt(run[ratio], '.2f')} | "
                 f"{run['ratio_to_matmul']:.3f} |")
    summary.append(f"{impl}: {run['tokens_per_sec']:,.0f} tokens/s, "
                   f"{run['model_tflops_per_device']:.3g} model TFLOP/s, "
                   f"{run['ratio_to_matmul']:.3f}x the bf16 matmul rate")
  return result | {"markdown": "\n".join(lines), "summary": summary}


def main(argv):
  del argv
  for impl in _IMPLS.value:
    attention_ops.check_impl(impl)
  tokens = _CONFIG.value.train.batch_size * _CONFIG.value.data.seq_len
  model_cfg = experiment.validate(_CONFIG.value, jax.device_count())
  mesh = sharding.global_mesh_shape(_CONFIG.value.mesh, jax.device_count())
  result = {
      "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "jax": jax.__version__, "mesh": dict(zip(sharding.MESH_AXES, mesh)), "params": None,
      "seq_len": _CONFIG.value.data.seq_len, "global_batch": _CONFIG.value.train.batch_size,
      "dtype": model_cfg.dtype, "gate": model_cfg.gate.describe(),
      "matmul_tflops": matmul_tflops(_MATMUL.value), "runs": [],
  }
  base = None  # tokens/s of the first implementation
  for impl in _IMPLS.value:
    config = copy.deepcopy(_CONFIG.value)
    config.model.attention_impl = impl
    try:
      timed = time_train_step(config)
    except Exception as e:  # pylint: disable=broad-except
      result["runs"].append({"attention_impl": impl, "error": f"{type(e).__name__}: {e}"[:300]})
    else:
      tflops = tokens * timed["flops_per_token"] / timed["seconds"] / 1e12 / jax.device_count()
      if impl == _IMPLS.value[0]:
        base = tokens / timed["seconds"]
      result["params"] = timed["params"]
      result["runs"].append({
          "attention_impl": impl, "step_ms": timed["seconds"] * 1e3,
          "tokens_per_sec": tokens / timed["seconds"], "model_tflops_per_device": tflops,
          f"ratio_to_{_IMPLS.value[0]}": base and tokens / timed["seconds"] / base,
          "ratio_to_matmul": tflops / result["matmul_tflops"]})
    if _JSON.value:
      pathlib.Path(_JSON.value).write_text(json.dumps(report(result), indent=2))
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)

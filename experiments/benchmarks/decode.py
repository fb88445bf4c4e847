"""Greedy decoding speed: the KV-cached `generate` vs recomputing the whole sequence.

    python experiments/benchmarks/decode.py --config=configs/default.py \
        --batch_size=4 --prompt_len=64 --new_tokens=128

The model of `--config` (random initialisation: speed does not depend on the
weights) continues `batch_size` random prompts of `prompt_len` tokens by
`new_tokens` tokens, greedily, two ways, each one compiled program timed after a
warm-up call:
  - cached: `gated_attention_jax.generate` (prefill once, then one token per step
    against the KV cache);
  - recompute: a `fori_loop` running the full forward pass over the right-padded
    `(B, prompt_len + new_tokens)` buffer at every step (no cache).
Prints one JSON object: tokens/s of each, their ratio, the KV cache's bytes
(2 x layers x B x slots x kv_heads x head_dim x itemsize), whether the two agree
token for token, device, jax version and date.
"""

from __future__ import annotations

import datetime
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from gated_attention_jax.training import experiment
from gated_attention_jax.sampler import generate
from gated_attention_jax.transformer import DTYPES, Transformer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config.",
                                          lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", 4, "Prompts decoded together.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Tokens generated per prompt.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls of each (the best is reported).")


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "new_tokens"))
def recompute(state: nnx.State, buffer: jax.Array, *, graphdef: nnx.GraphDef, prompt_len: int,
              new_tokens: int) -> jax.Array:
  """Greedy decoding without a cache: `(B, P + new)` buffer → its last `new` tokens."""
  model = nnx.merge(graphdef, state)
  rows = jnp.arange(buffer.shape[0])

  def step(i, buffer):
    logits = model(buffer)[rows, prompt_len + i - 1]
    return buffer.at[rows, prompt_len + i].set(jnp.argmax(logits, -1).astype(buffer.dtype))

  return jax.lax.fori_loop(0, new_tokens, step, buffer)[:, prompt_len:]


def best_seconds(fn, repeats: int) -> float:
  fn()  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = experiment.model_config(_CONFIG.value)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  b, p, new = _BATCH.value, _PROMPT.value, _NEW.value
  prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, p))
  cached_out = {}

  def cached():
    cached_out["tokens"] = generate(model, prompts, new).tokens

  graphdef, state = nnx.split(model)
  buffer = jnp.zeros((b, p + new), jnp.int32).at[:, :p].set(jnp.asarray(prompts))
  recomputed_out = {}

  def recomputed():
    recomputed_out["tokens"] = np.asarray(recompute(state, buffer, graphdef=graphdef,
                                                    prompt_len=p, new_tokens=new))

  t_cached = best_seconds(cached, _REPEATS.value)
  t_recompute = best_seconds(recomputed, _REPEATS.value)
  slots = p + new - 1
  cache_bytes = (2 * cfg.num_layers * b * slots * cfg.num_kv_heads * cfg.head_dim
                 * jnp.dtype(DTYPES[cfg.dtype]).itemsize)
  print(json.dumps({
      "device": jax.devices()[0].device_kind, "jax": jax.__version__,
      "date": datetime.date.today().isoformat(),
      "model": {"layers": cfg.num_layers, "d_model": cfg.d_model, "heads": cfg.num_heads,
                "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "dtype": cfg.dtype,
                "gate": cfg.gate.position},
      "batch_size": b, "prompt_len": p, "new_tokens": new,
      "cached_tokens_per_sec": b * new / t_cached,
      "recompute_tokens_per_sec": b * new / t_recompute,
      "speedup": t_recompute / t_cached,
      "kv_cache_bytes": int(cache_bytes),
      "same_tokens": bool(np.array_equal(cached_out["tokens"], recomputed_out["tokens"])),
  }, indent=2))


if __name__ == "__main__":
  app.run(main)

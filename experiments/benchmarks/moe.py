"""The MoE block against what a JAX user writes without one: every expert on every token.

    JAX_PLATFORMS=cpu python experiments/benchmarks/moe.py --out=experiments/results/moe

Forward and backward (gradients of the input and every weight) of the routed experts of one
layer, jitted, on this CPU: `moe.MoE` (router, top-k, the dropless grouped SwiGLU by
`expert_matmul` "blocked" and "ragged_dot", the weighted sum) against the dense baseline, the
same router and top-k with each token sent through all E experts by einsum and the outputs
weighted by the routing weights (zero off the top k). Same weights, same routing, same k, at
E = 8, 32, 128: tokens per second (median of --repeats after a warm-up) and the ratio to the
dense baseline measured in the same run. The dense cost grows with E, the grouped one with k.
Writes moe_block_jax<version>.json and .md with the device, jax version and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform as host

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import timing
from gated_attention_jax import moe

EXPERTS = (8, 32, 128)
IMPLS = ("blocked", "ragged_dot")


def dense_experts(block: moe.MoE, x: jax.Array) -> jax.Array:
  """Every token through every expert, weighted by its routing weights (the baseline)."""
  logits = x @ block.router[...]
  _, experts, weights = moe.route(logits, block.cfg.experts_per_token, block.cfg.normalize_top_k)
  dense_weights = jnp.zeros(logits.shape, x.dtype).at[
      jnp.arange(x.shape[0])[:, None], experts].set(weights)
  h = jax.nn.silu(jnp.einsum("ND,EDF->NEF", x, block.gate_proj[...])) * jnp.einsum(
      "ND,EDF->NEF", x, block.up_proj[...])
  return jnp.einsum("NEF,EFD,NE->ND", h, block.down_proj[...], dense_weights)


def routed_experts(block: moe.MoE, x: jax.Array) -> jax.Array:
  return block(x[None])[0][0]


def step(forward):
  """Jitted gradients of a scalar of the layer's output, w.r.t. the input and the weights."""
  @nnx.jit
  def grads(block: moe.MoE, x: jax.Array):
    return nnx.grad(lambda b, x: jnp.sum(jnp.sin(forward(b, x))), argnums=(0, 1))(block, x)
  return grads


def tokens_per_second(forward, block: moe.MoE, x: jax.Array, repeats: int) -> float:
  return x.shape[0] / timing.median_seconds(step(forward), (block, x), repeats)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tokens", type=int, default=1024)
  parser.add_argument("--top_k", type=int, default=4)
  parser.add_argument("--d_model", type=int, default=64)
  parser.add_argument("--expert_dim", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args()
  x = jax.random.normal(jax.random.key(1), (args.tokens, args.d_model), jnp.float32)
  rows = []
  for e in EXPERTS:
    row = {"experts": e}
    for name in ("dense", *IMPLS):
      cfg = moe.MoEConfig(num_experts=e, experts_per_token=args.top_k,
                          expert_dim=args.expert_dim,
                          expert_matmul="blocked" if name == "dense" else name)
      block = moe.MoE(args.d_model, cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
      forward = dense_experts if name == "dense" else routed_experts
      # The same function: the baseline's outputs equal the block's.
      np.testing.assert_allclose(nnx.jit(forward)(block, x), nnx.jit(dense_experts)(block, x),
                                 rtol=1e-4, atol=1e-5)
      row[name] = tokens_per_second(forward, block, x, args.repeats)
    rows.append(row)
    print(row, flush=True)
  today, cpu = str(datetime.date.today()), host.processor() or host.machine()
  device = f"{jax.devices()[0].device_kind} ({cpu}, {jax.device_count()} device(s))"
  lines = [f"The MoE block's forward + backward against every expert on every token: jax"
           f" {jax.__version__}, {today}, {device}.", "",
           f"T={args.tokens} tokens, top-{args.top_k}, D={args.d_model}, F={args.expert_dim},"
           f" float32, one layer, median of {args.repeats} after a warm-up; tokens/s and the"
           " ratio to the dense baseline of the same run.", "",
           "| E | dense tokens/s | blocked tokens/s | blocked / dense | ragged_dot tokens/s |"
           " ragged_dot / dense |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['experts']} | {r['dense']:,.0f} | {r['blocked']:,.0f} |"
                 f" {r['blocked'] / r['dense']:.2f} | {r['ragged_dot']:,.0f} |"
                 f" {r['ragged_dot'] / r['dense']:.2f} |")
  args.out.mkdir(parents=True, exist_ok=True)
  name = f"moe_block_jax{jax.__version__}"
  (args.out / f"{name}.json").write_text(json.dumps(
      {"jax": jax.__version__, "date": today, "device": device,
       "args": {k: v for k, v in vars(args).items() if k != "out"}, "tokens_per_second": rows},
      indent=1) + "\n")
  (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()

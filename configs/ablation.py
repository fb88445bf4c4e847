"""The paper's ablation grid (Qiu et al. 2025, Tables 1, 3, 4): one config per (variant, scale).

    python -m gated_attention_jax.main --config=configs/ablation.py:sdpa_elementwise,smoke \
        --workdir=runs/ablation/smoke/sdpa_elementwise/seed0
    python experiments/run_grid.py --scale=smoke          # every variant, sequentially

VARIANT is a row of the paper's tables (`VARIANTS`; names are fixed):
  baseline, baseline_kv_heads_x2, baseline_q_heads_x1p5  Table 1 rows 1-3 (no gate)
  sdpa/value/key/query/dense_elementwise                  G1-G5, Table 1 rows 5-9
  sdpa_headwise, value_headwise                           rows 10-11
  sdpa_head_shared, value_head_shared                     rows 12-13
  sdpa_additive_silu, sdpa_elementwise_silu               rows 14-15
  sdpa_rmsnorm, sdpa_silu, sdpa_additive_identity         Table 3 (GroupNorm, SiLU, additive identity)
  sdpa_input_independent, sdpa_ns_sigmoid                 Table 4 (sparsity probes)

Parameter-matched baselines are matched as in the paper: `baseline_kv_heads_x2`
doubles the kv heads (adds 2·L·D·K·H, the K and V projections of K more heads;
the paper's 4 -> 8, +50M), `baseline_q_heads_x1p5` has 1.5x the query heads (adds
2·L·D·(N/2)·H, their Q and O projections, exactly the G1 elementwise gate's
L·D·N·H; the paper's 32 -> 48, +201M). Table 1 row 4 ("+4 experts", 400M) has no
counterpart: the model here is dense (no mixture of experts), so it is not a
variant.

SCALE:
  smoke           CPU, about a minute a run: D 64, 2 layers, 4 q / 2 kv heads x 16, seq 128,
                  150 steps of 16 windows (307k tokens). Shows the pipeline, not the paper.
  small           one GPU, sized after Gu et al.'s 60M model in which sinks emerge (10
                  layers, D 768, 8 heads): 8 q / 2 kv heads x 96, SwiGLU 2048, seq 1024,
                  bf16, attention "auto" (cuDNN on a GPU), 256 x 1024 = 262k tokens/step, 4000 steps = 1.05B
                  tokens. Cost: ~62M non-embedding params, ~0.6M tokens/s on an H100
                  (extrapolated from 1.45M tokens/s measured for a 27M model), so ~30 min a
                  run and ~10 GPU-hours for the 19 variants per seed. Gu et al. trained
                  ~1M tokens/step for 20k steps (20B tokens, ~9 GPU-hours a run here); this is
                  1/20 of that and whether their sinks have formed by then is untested:
                  check the baseline's first-token attention first, and raise
                  `--config.train.num_steps` if none has. The bundled 9 MB corpus overfits
                  after ~50M tokens (shared/reference/small_scale_measurements.md), so with
                  it the numbers are an overfitting study, not the paper's: use GPT-2 tokens
                  of your own text, `--config.data.tokenizer=gpt2
                  --config.data.corpus=text_dir --config.data.path=DIR` (or token_shards).
  paper_1p7b      Table 2/7's dense 1.7B-28: 28 layers, D 2048, 16 q / 8 kv heads x 128,
                  FFN 6144, tied embeddings, QK-norm, vocab 151936 (Qwen's; GPT-2 tokens
                  stand in), seq 4096, batch 1024 (4.2M tokens/step), 100k steps (~400B
                  tokens), lr 4e-3, 1k warmup, cosine to 3e-5, bf16, FSDP over all devices,
                  layers under nnx.scan (scan_layers: minutes less compiling; decode and the
                  PyTorch export need the checkpoint unrolled by layer_stack.relayout).
                  attention_impl "auto": the fused Pallas kernel on TPUs, cuDNN (gate in
                  XLA) on GPUs where it serves the inputs, XLA on CPU; `plan` and the run's
                  start line say which it chose and why.
  paper_1p7b_48l  Table 2's 48-layer model, lr 8e-3 (where the baseline is unstable).
Point the paper scales at real data with `--config.data.corpus=token_shards
--config.data.path=DIR`.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from gated_attention_jax.training import experiment

# variant -> (gate fields, query-head factor, kv-head factor)
VARIANTS: dict[str, tuple[dict[str, Any], float, int]] = {
    "baseline": ({}, 1, 1),
    "baseline_kv_heads_x2": ({}, 1, 2),
    "baseline_q_heads_x1p5": ({}, 1.5, 1),
    "sdpa_elementwise": ({"position": "sdpa"}, 1, 1),
    "value_elementwise": ({"position": "value"}, 1, 1),
    "key_elementwise": ({"position": "key"}, 1, 1),
    "query_elementwise": ({"position": "query"}, 1, 1),
    "dense_elementwise": ({"position": "dense"}, 1, 1),
    "sdpa_headwise": ({"position": "sdpa", "granularity": "headwise"}, 1, 1),
    "value_headwise": ({"position": "value", "granularity": "headwise"}, 1, 1),
    "sdpa_head_shared": ({"position": "sdpa", "sharing": "head_shared"}, 1, 1),
    "value_head_shared": ({"position": "value", "sharing": "head_shared"}, 1, 1),
    "sdpa_additive_silu": ({"position": "sdpa", "combine": "add", "activation": "silu"}, 1, 1),
    "sdpa_elementwise_silu": ({"position": "sdpa", "activation": "silu"}, 1, 1),
    "sdpa_rmsnorm": ({"sdpa_transform": "rmsnorm"}, 1, 1),
    "sdpa_silu": ({"sdpa_transform": "silu"}, 1, 1),
    "sdpa_additive_identity": ({"position": "sdpa", "combine": "add",
                                "activation": "identity"}, 1, 1),
    "sdpa_input_independent": ({"position": "sdpa", "input_dependent": False}, 1, 1),
    "sdpa_ns_sigmoid": ({"position": "sdpa", "activation": "ns_sigmoid"}, 1, 1),
    "baseline_plus_4_experts": ({}, 1, 1),
}
# Variants that add routed experts (MoE scales only): Table 1 row 4, the 15B model + 4 experts.
EXTRA_EXPERTS = {"baseline_plus_4_experts": 4}

_PAPER_MOE_15B = {
    "model": dict(vocab_size=151936, d_model=2048, num_layers=24, num_heads=32, num_kv_heads=4,
                  head_dim=128, mlp_dim=6144, tie_embeddings=False, qk_norm=True,
                  mlp_type="moe",
                  moe=dict(num_experts=128, experts_per_token=8, expert_dim=704,
                           num_shared_experts=1, shared_expert_dim=4096,
                           shared_expert_gate=True, balance_loss_weight=0.001,
                           router_z_loss_weight=0.001),
                  attention_impl="auto", dtype="bfloat16", remat="full", scan_layers=True),
    "data": dict(tokenizer="gpt2", seq_len=4096),
    "train": dict(num_steps=100_000, batch_size=1024, learning_rate=2e-3, warmup_steps=1000,
                  min_lr_ratio=0.01, log_every=50, eval_every=2000, eval_batches=16,
                  checkpoint_every=1000),
    "mesh": dict(data=1, fsdp=-1),
}

_PAPER_1P7B = {
    "model": dict(vocab_size=151936, d_model=2048, num_layers=28, num_heads=16,
                  num_kv_heads=8, head_dim=128, mlp_dim=6144, tie_embeddings=True,
                  qk_norm=True, attention_impl="auto", dtype="bfloat16", remat="full",
                  scan_layers=True),
    "data": dict(tokenizer="gpt2", seq_len=4096),
    "train": dict(num_steps=100_000, batch_size=1024, learning_rate=4e-3, warmup_steps=1000,
                  min_lr_ratio=3e-5 / 4e-3, log_every=50, eval_every=2000, eval_batches=16,
                  checkpoint_every=1000),
    "mesh": dict(data=1, fsdp=-1),
}



def _with_experts(scale: dict[str, dict[str, Any]], **moe: Any) -> dict[str, dict[str, Any]]:
  """`scale` with every layer's MLP made routed experts (`model.moe` fields `moe`)."""
  return {**scale, "model": {**scale["model"], "mlp_type": "moe", "moe": moe}}


SCALES: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {
        "model": dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      mlp_dim=192),
        "data": dict(seq_len=128),
        "train": dict(num_steps=150, batch_size=16, learning_rate=3e-3, warmup_steps=15,
                      log_every=10, eval_every=50, eval_batches=4, checkpoint_every=150,
                      keep_checkpoints=1),
    },
    "small": {
        "model": dict(d_model=768, num_layers=10, num_heads=8, num_kv_heads=2, head_dim=96,
                      mlp_dim=2048, attention_impl="auto", dtype="bfloat16"),
        "data": dict(seq_len=1024),
        "train": dict(num_steps=4000, batch_size=256, learning_rate=2e-3, warmup_steps=200,
                      log_every=20, eval_every=250, eval_batches=16, checkpoint_every=500),
    },
    "paper_moe_15b": _PAPER_MOE_15B,
    "paper_1p7b": _PAPER_1P7B,
    "paper_1p7b_48l": {**_PAPER_1P7B,
                       "model": {**_PAPER_1P7B["model"], "num_layers": 48},
                       "train": {**_PAPER_1P7B["train"], "learning_rate": 8e-3,
                                 "min_lr_ratio": 3e-5 / 8e-3}},
}


# The smoke and small scales with routed experts: 8 of 64 top-2, and 32 of 512 top-4.
SCALES["moe_smoke"] = _with_experts(SCALES["smoke"], num_experts=8, experts_per_token=2,
                                    expert_dim=64)
SCALES["moe_small"] = _with_experts(SCALES["small"], num_experts=32, experts_per_token=4,
                                    expert_dim=512)


def is_moe_scale(scale: str) -> bool:
  return SCALES[scale].get("model", {}).get("mlp_type") == "moe"


def variants(scale: str) -> list[str]:
  """The variants that apply at `scale`: all but the expert-adding ones on a dense scale."""
  return [v for v in VARIANTS if v not in EXTRA_EXPERTS or is_moe_scale(scale)]


def parse_cell(arg: str, variants, second: str, seconds) -> tuple[str, str]:
  """'VARIANT,SECOND' -> (variant, second), each checked against its allowed names."""
  parts = arg.split(",")
  if len(parts) != 2:
    raise ValueError(f"config argument must be 'VARIANT,{second.upper()}', got {arg!r}")
  variant, value = parts
  if variant not in variants:
    raise ValueError(f"unknown variant {variant!r}; one of {list(variants)}")
  if value not in seconds:
    raise ValueError(f"unknown {second} {value!r}; one of {list(seconds)}")
  return variant, value


def testbed_config(variant: str, *changes: dict) -> ml_collections.ConfigDict:
  """base_config updated by each {section: {field: value}} of ``changes`` in turn, with the
  gate of ``variant`` (one of VARIANTS): the config of a testbed cell (sinks, stability,
  long_context)."""
  config = experiment.base_config()
  for change in changes:
    for section, values in change.items():
      config[section].update(values)
  config.gate.update(VARIANTS[variant][0])
  return config


def parse(arg: str) -> tuple[str, str]:
  """'VARIANT,SCALE' -> (variant, scale), checked against VARIANTS and SCALES."""
  return parse_cell(arg, VARIANTS, "scale", SCALES)


def make_config(variant: str, scale: str) -> ml_collections.ConfigDict:
  """The experiment config of one grid cell."""
  config = experiment.base_config()
  for section, values in SCALES[scale].items():
    config[section].update(values)
  # BOS at every window start: the first token a sink can form on.
  config.data.packing = "windows"
  gate, q_factor, kv_factor = VARIANTS[variant]
  config.gate.update(gate)
  num_heads = config.model.num_heads * q_factor
  if num_heads != int(num_heads):
    raise ValueError(f"{variant}: {config.model.num_heads} query heads x {q_factor}"
                     " is not a whole number")
  config.model.num_heads = int(num_heads)
  config.model.num_kv_heads *= kv_factor
  if variant in EXTRA_EXPERTS:
    if not is_moe_scale(scale):
      raise ValueError(f"{variant} adds routed experts: it needs a MoE scale"
                       f" ({', '.join(s for s in SCALES if is_moe_scale(s))}), not {scale!r}")
    config.model.moe.num_experts += EXTRA_EXPERTS[variant]
  return config


def get_config(arg: str) -> ml_collections.ConfigDict:
  return make_config(*parse(arg))

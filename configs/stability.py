"""The stability testbed: peak learning rate x gate variant on a deep, narrow model.

    python -m gated_attention_jax.main --config=configs/stability.py:baseline,testbed,0.1 \
        --workdir=runs/stability/testbed/baseline_lr0.1/seed0
    python experiments/run_grid.py --grid=stability --scale=testbed --seeds=0,1,2
    python experiments/stability/summarize_stability.py --runs=runs/stability \
        --out=experiments/results/stability

Argument "VARIANT,SETTING,LR": VARIANT a name of configs/ablation.py (`VARIANTS` are the
grid's default: the baseline and the paper's G1 elementwise and headwise gates), LR the
peak learning rate, SETTING one of `SETTINGS` or of ablation.SCALES (the ablation's
model, warmup and cosine; at paper scale sweep `paper_1p7b_48l` over 2e-3, 4e-3, 8e-3,
the paper's Table 2).

The testbed is the paper's stack (RMSNorm, SwiGLU, RoPE, QK-norm, GQA, tied embeddings)
made deep and narrow: 16 layers of D 64 (4 q / 2 kv heads x 16), 0.8M parameters, on
the bundled corpus as bytes (windows of 64 that start with BOS), batch 16, 300 steps
(0.3M tokens), AdamW (β 0.9/0.95, weight decay 0.1), 30 warmup steps then cosine to
0.1x, no gradient clipping: ~2 minutes a run on 2 shared CPU cores. Every step is
logged with train.track_activations (max |block output| and max attention logit per
layer) and the trainer's spike count. A run that hits a non-finite loss stops
(train.py); its metrics.jsonl keeps the curve up to there.

SETTING, one factor changed from `testbed` at a time:
  testbed     the setting above
  no_qk_norm  without QK-norm (attention logits are then free to grow)
  layers_32   32 layers instead of 16 (Table 2's instability is a 48-layer one)
"""

from __future__ import annotations

from typing import Any

import ml_collections

from configs import ablation

VARIANTS = ("baseline", "sdpa_elementwise", "sdpa_headwise")
LEARNING_RATES = (1e-2, 3e-2, 1e-1, 3e-1)

_TESTBED: dict[str, dict[str, Any]] = {
    "model": dict(d_model=64, num_layers=16, num_heads=4, num_kv_heads=2, head_dim=16,
                  mlp_dim=192, qk_norm=True),
    "data": dict(seq_len=64, packing="windows"),
    "train": dict(num_steps=300, batch_size=16, warmup_steps=30, grad_clip=0.0,
                  log_every=1, eval_every=100, eval_batches=4, checkpoint_every=300,
                  keep_checkpoints=1, track_activations=True),
}

# setting -> changes to _TESTBED, section by section
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "testbed": {},
    "no_qk_norm": {"model": dict(qk_norm=False)},
    "layers_32": {"model": dict(num_layers=32)},
}


def parse(arg: str) -> tuple[str, str, float]:
  """'VARIANT,SETTING,LR' -> (variant, setting, lr), each checked."""
  parts = arg.split(",")
  if len(parts) != 3:
    raise ValueError(f"config argument must be 'VARIANT,SETTING,LR', got {arg!r}")
  variant, setting = ablation.parse_cell(",".join(parts[:2]), ablation.VARIANTS, "setting",
                                         {**SETTINGS, **ablation.SCALES})
  lr = float(parts[2])
  if not lr > 0:
    raise ValueError(f"learning rate must be > 0, got {lr}")
  return variant, setting, lr


def make_config(variant: str, setting: str, lr: float) -> ml_collections.ConfigDict:
  """The experiment config of one (variant, setting, lr) cell."""
  if setting not in SETTINGS:
    config = ablation.make_config(variant, setting)
  else:
    config = ablation.testbed_config(variant, _TESTBED, SETTINGS[setting])
  config.train.learning_rate = lr
  return config


def get_config(arg: str) -> ml_collections.ConfigDict:
  return make_config(*parse(arg))

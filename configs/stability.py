"""LR-stability sweep: baseline vs G1 elementwise at increasing peak learning rates.

    python -m gated_attention_jax.main --config=configs/stability.py:baseline,smoke,0.03 \
        --workdir=runs/stability/smoke/baseline_lr0.03/seed0
    python experiments/run_grid.py --grid=stability --scale=smoke

Argument "VARIANT,SCALE,LR": VARIANT one of `VARIANTS` (any name of configs/ablation.py
works), SCALE one of ablation.SCALES, LR the peak learning rate (warmup, cosine and
min-LR ratio as in the ablation scale). The paper (Table 2) finds the 48-layer 1.7B
baseline spikes at lr 8e-3 and diverges with a 4096 batch while the gated model
trains; at paper scale sweep `paper_1p7b_48l` over 2e-3, 4e-3, 8e-3. A run that hits
a non-finite loss stops (train.py); its metrics.jsonl keeps the curve up to there.
"""

from __future__ import annotations

import ml_collections

from configs import ablation

VARIANTS = ("baseline", "sdpa_elementwise")
# Peak learning rates of the smoke sweep: the ablation's 3e-3, then 10x and 100x it.
LEARNING_RATES = (3e-3, 3e-2, 3e-1)


def get_config(arg: str) -> ml_collections.ConfigDict:
  parts = arg.split(",")
  if len(parts) != 3:
    raise ValueError(f"config argument must be 'VARIANT,SCALE,LR', got {arg!r}")
  variant, scale = ablation.parse(",".join(parts[:2]))
  lr = float(parts[2])
  if not lr > 0:
    raise ValueError(f"learning rate must be > 0, got {lr}")
  config = ablation.make_config(variant, scale)
  config.train.learning_rate = lr
  return config

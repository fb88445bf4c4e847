"""The long-context retrieval testbed: a model trained at length L to find a passkey.

    python -m gated_attention_jax.main --config=configs/long_context.py:baseline,wide \
        --workdir=runs/long_context/wide/baseline/seed0
    python -m gated_attention_jax.analyze --workdir=runs/long_context/wide/baseline/seed0 \
        --retrieval_only
    # or the whole grid: experiments/run_grid.py --grid=long_context --scale=wide --analyze

Training data are passkey documents (`data.corpus="passkey"`, data/synthetic.py):
[BOS], filler, the needle "The pass key is 48213. Remember it." at a uniformly
random depth, filler, "What is the pass key? The pass key is 48213", byte tokens, L = 128.
The answer's digits are random, so they can only be predicted by copying them
from the needle; only the answer is in the loss (`data.passkey.answer_only`: with the
loss on whole documents nothing of the answer was learned in 800 steps). The model is the paper's stack (RMSNorm, SwiGLU, RoPE, QK-norm)
at 2 layers (copying needs an induction circuit of two), d 64, 4 heads of 16 over
2 kv heads. Passkey accuracy (greedy, `analysis/retrieval.py`) is then measured at
1x, 2x, 4x, 8x L with RoPE scaling none / linear / NTK / YaRN: the setting of the
paper's Table 5 (gated + YaRN keeps retrieval where the baseline collapses) at a
size that trains in CPU minutes.

VARIANT: baseline, sdpa_elementwise (G1), sdpa_headwise (names as in configs/ablation.py).
SETTING:
  testbed     the model above, batch 32, lr 3e-3, 1000 steps (4.1M tokens).
  steps_2500  the same for 2500 steps. In both, learning to retrieve at L is erratic: the
              answer loss sits near chance, then drops at a seed-dependent step, or never
              (baseline seed 0 had not learned by step 2500).
  wide        d 128, 8 heads of 16 over 4 kv heads, mlp 384 (0.43M parameters), lr 1e-3,
              800 steps (3.3M tokens, 4-5 CPU minutes): the setting where every run learns
              to retrieve at L (in experiments/results/long_context/: all 12 runs, 3
              variants x 4 seeds, at 1x accuracy 1.0, answer loss < 0.1 by step 300-600).
              Found by short probes (experiments/results/long_context/probes): lr 1e-3
              alone made the narrow baseline learn but left both G1 models at loss 0.4-0.6
              after 1000 steps; the width made G1 learn too; the wide model at lr 3e-3
              learned more slowly (loss 0.2 at step 400 vs 0.016 at 1e-3).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from configs import ablation

VARIANTS = ("baseline", "sdpa_elementwise", "sdpa_headwise")

_TESTBED: dict[str, dict[str, Any]] = {
    "model": dict(vocab_size=0, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, mlp_dim=192, qk_norm=True),
    "data": dict(corpus="passkey", tokenizer="byte", seq_len=128,
                 passkey=dict(answer_only=True)),
    "train": dict(num_steps=1000, batch_size=32, learning_rate=3e-3, warmup_steps=50,
                  log_every=50, eval_every=250, eval_batches=1, checkpoint_every=1000,
                  keep_checkpoints=1),
}

# setting -> changes to _TESTBED, section by section
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "testbed": {},
    "steps_2500": {"train": dict(num_steps=2500, checkpoint_every=2500)},
    # twice as wide (d 128, 8 heads of 16 over 4 kv heads) at a third of the learning rate:
    # every probe of it learned retrieval at L by step ~550 (see the docstring)
    "wide": {"model": dict(d_model=128, num_heads=8, num_kv_heads=4, mlp_dim=384),
             "train": dict(num_steps=800, learning_rate=1e-3, checkpoint_every=800)},
}


def parse(arg: str) -> tuple[str, str]:
  """'VARIANT,SETTING' -> (variant, setting), checked against VARIANTS and SETTINGS."""
  return ablation.parse_cell(arg, VARIANTS, "setting", SETTINGS)


def make_config(variant: str, setting: str) -> ml_collections.ConfigDict:
  """The experiment config of one (variant, setting) cell."""
  return ablation.testbed_config(variant, _TESTBED, SETTINGS[setting])


def get_config(arg: str) -> ml_collections.ConfigDict:
  return make_config(*parse(arg))

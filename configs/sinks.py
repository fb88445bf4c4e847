"""The attention-sink testbed: Bigram-Backcopy, where an ungated model forms a sink in minutes.

    python -m gated_attention_jax.main --config=configs/sinks.py:baseline,testbed \
        --workdir=runs/sinks/testbed/baseline/seed0
    python experiments/run_grid.py --grid=sinks --scale=testbed --seeds=0,1,2
    python experiments/sinks/summarize_sinks.py --runs=runs/sinks --out=experiments/results/sinks

The task (data/synthetic.py) and the model follow Guo et al. 2024 ("Active-Dormant
Attention Heads", code github.com/GuoTianYu2000/Active-Dormant-Attention, BBM/):
65 ordinary byte tokens with bigram statistics of Shakespeare, the 3 most frequent
(' ', 'e', 't') back-copy, BOS first; a GPT-2-style pre-LayerNorm transformer with
learned absolute positions, ReLU MLP (4x), one head, no QK-norm, untied output,
AdamW (β 0.9/0.99, weight decay 1e-4, no clipping), constant learning rate. Their
run is d 256, seq 256, batch 512, lr 3e-4, 10k+ steps on a GPU; here the same model
at d 128, seq 128, batch 32 and lr 3e-3 (10x) forms its sink within ~1000 steps:
a few minutes on 2 CPU cores. Every run tracks first-token attention, sink rate and
max activation at each eval (train.track_sinks).

VARIANT: the baseline and the gate variants of the paper's Table 4 (names as in
configs/ablation.py): baseline, sdpa_elementwise, sdpa_headwise, sdpa_head_shared,
value_elementwise, sdpa_input_independent, sdpa_ns_sigmoid.

SETTING (`--scale` of run_grid.py), one factor changed from `testbed` at a time, the
factors Gu et al. 2025 ("When Attention Sink Emerges") and Guo et al. name:
  testbed      the setting above (tokens seen: the x-axis of every run's curves)
  lr_1e-3      learning rate 1e-3 instead of 3e-3
  wd_0.1       weight decay 0.1 instead of 1e-4
  no_bos       no BOS: sequences start with their first ordinary token
  layers_3     3 layers (Guo et al.'s residual-state peaks need depth)
  bpe          GPT-2 BPE tokens: the 65 most frequent, their bigrams; triggers are the
               3 most frequent (newline, ',', '.')
  qwen_stack   the paper's stack instead of GPT-2's: RMSNorm, SwiGLU, RoPE, QK-norm
  gqa_4x1      4 query heads of 32 sharing one kv head (the testbed has one head, where a
               head-shared gate is the head-specific one: this setting tells them apart)
  bundled_text natural text instead of the task: the bundled corpus as bytes, windows
               that start with BOS (the data factor; `--config.data.corpus=token_shards
               --config.data.path=DIR` puts your own pre-tokenized corpus here)
"""

from __future__ import annotations

from typing import Any

import ml_collections

from configs import ablation

VARIANTS = ("baseline", "sdpa_elementwise", "sdpa_headwise", "sdpa_head_shared",
            "value_elementwise", "sdpa_input_independent", "sdpa_ns_sigmoid")

_TESTBED: dict[str, dict[str, Any]] = {
    "model": dict(vocab_size=0, d_model=128, num_layers=1, num_heads=1, num_kv_heads=1,
                  head_dim=128, mlp_dim=512, tie_embeddings=False, qk_norm=False,
                  norm_type="layernorm", norm_eps=1e-5, mlp_type="relu",
                  position_embedding="learned", max_positions=128),
    "data": dict(corpus="bigram_backcopy", tokenizer="byte", seq_len=128),
    "train": dict(num_steps=1500, batch_size=32, learning_rate=3e-3, warmup_steps=0,
                  min_lr_ratio=1.0, b1=0.9, b2=0.99, weight_decay=1e-4, grad_clip=0.0,
                  log_every=50, eval_every=100, eval_batches=1, checkpoint_every=1500,
                  keep_checkpoints=1, track_sinks=True),
}

# setting -> changes to _TESTBED, section by section
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "testbed": {},
    "lr_1e-3": {"train": dict(learning_rate=1e-3)},
    "wd_0.1": {"train": dict(weight_decay=0.1)},
    "no_bos": {"data": dict(bigram_backcopy=dict(bos=False))},
    "layers_3": {"model": dict(num_layers=3)},
    "bpe": {"data": dict(tokenizer="gpt2")},
    "qwen_stack": {"model": dict(norm_type="rmsnorm", norm_eps=1e-6, mlp_type="swiglu",
                                 mlp_dim=341, position_embedding="rope", max_positions=0,
                                 qk_norm=True)},
    "gqa_4x1": {"model": dict(num_heads=4, num_kv_heads=1, head_dim=32)},
    "bundled_text": {"data": dict(corpus="bundled", packing="windows")},
}


def parse(arg: str) -> tuple[str, str]:
  """'VARIANT,SETTING' -> (variant, setting), checked against VARIANTS and SETTINGS."""
  return ablation.parse_cell(arg, VARIANTS, "setting", SETTINGS)


def make_config(variant: str, setting: str) -> ml_collections.ConfigDict:
  """The experiment config of one (variant, setting) cell."""
  return ablation.testbed_config(variant, _TESTBED, SETTINGS[setting])


def get_config(arg: str) -> ml_collections.ConfigDict:
  return make_config(*parse(arg))

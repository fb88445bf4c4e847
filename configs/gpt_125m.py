"""A ~125M-parameter G1-gated LM at sequence 2048 (GPT-2-small sized), for one GPU.

    python -m gated_attention_jax.main --config=configs/gpt_125m.py --workdir=runs/125m
    python experiments/benchmarks/train_throughput.py --config=configs/gpt_125m.py

GPT-2 BPE tokens (vocab 50257 padded to 50304); bf16 compute, float32 parameters,
attention "auto" (cuDNN on a GPU, the fused Pallas kernel on a TPU, XLA on CPU).
"""

import ml_collections

from gated_attention_jax.training import experiment


def get_config() -> ml_collections.ConfigDict:
  config = experiment.base_config()
  config.model.update(vocab_size=50304, d_model=768, num_layers=12, num_heads=12,
                      num_kv_heads=12, head_dim=64, mlp_dim=2048, dtype="bfloat16",
                      attention_impl="auto")
  config.gate.update(position="sdpa", granularity="elementwise")
  config.data.update(tokenizer="gpt2", seq_len=2048, packing="segments")
  config.train.update(num_steps=5000, batch_size=16, learning_rate=1e-3, warmup_steps=500,
                      log_every=50, eval_every=500, checkpoint_every=1000)
  return config

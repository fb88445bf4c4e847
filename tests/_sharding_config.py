"""A tiny config for the sharding tests: 8 query heads over 2 kv heads (GQA), seq 32.

Also loaded by `gated_attention_jax.main --config=tests/_sharding_config.py`.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.update(d_model=32, num_layers=1, num_heads=8, num_kv_heads=2, head_dim=8,
                      mlp_dim=64)
  config.data.update(seq_len=32, prefetch=0)
  config.train.update(num_steps=4, batch_size=8, warmup_steps=2, log_every=1, eval_every=4,
                      eval_batches=1, checkpoint_every=4, keep_checkpoints=1)
  return config

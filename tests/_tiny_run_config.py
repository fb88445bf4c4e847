"""The tiny run of the run-folder tests: 1 layer, d_model 32, seq 32, 8 steps, a save every 4.

Also loaded by `gated_attention_jax.main --config=tests/_tiny_run_config.py`.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.update(d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64)
  config.data.update(seq_len=32, prefetch=0)
  config.train.update(num_steps=8, batch_size=4, warmup_steps=2, log_every=2, eval_every=4,
                      eval_batches=2, checkpoint_every=4, keep_checkpoints=5)
  return config

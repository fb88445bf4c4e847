"""The CPU default: a small G1-gated LM on the bundled corpus, a few minutes on 2 cores.

    python -m gated_attention_jax.main --config=configs/default.py --workdir=runs/default
    # overrides:  --config.train.num_steps=1000 --config.gate.position=none

Sections: model, gate, data, train, mesh (see gated_attention_jax/training/experiment.py).
"""

import ml_collections

from gated_attention_jax.training import experiment


def get_config() -> ml_collections.ConfigDict:
  config = experiment.base_config()
  config.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                      mlp_dim=384)
  config.gate.update(position="sdpa", granularity="elementwise")
  config.data.update(seq_len=128, packing="segments")
  config.train.update(num_steps=300, batch_size=16, learning_rate=3e-3, warmup_steps=30,
                      log_every=10, eval_every=100, eval_batches=8, checkpoint_every=100)
  return config

"""Data: bundled corpus preparation, tokenizers and the grain input pipeline.

Entry points: `pipeline.make_train_iterator`, `pipeline.make_eval_batches`,
`pipeline.vocab_size`, `config.default_data_config`; `python -m
gated_attention_jax.data.prepare` builds the bundled corpus ahead of time.
"""

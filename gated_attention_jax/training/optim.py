"""Optimizer and learning-rate schedule from `config.train`."""

from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to `learning_rate`, cosine decay to `learning_rate * min_lr_ratio`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.learning_rate, warmup_steps=train.warmup_steps,
      decay_steps=max(train.num_steps, train.warmup_steps + 1),
      end_value=train.learning_rate * train.min_lr_ratio)


def _decay_mask(params):
  """Weight decay on matrices only; norm scales (1-D) are not decayed."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW (β1, β2, weight decay from the config) after global-norm clipping.

  `train.grad_clip` = 0 turns clipping off (the published Bigram-Backcopy recipe).
  """
  clip = optax.clip_by_global_norm(train.grad_clip) if train.grad_clip > 0 else optax.identity()
  return optax.chain(
      clip,
      optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2,
                  weight_decay=train.weight_decay, mask=_decay_mask),
  )

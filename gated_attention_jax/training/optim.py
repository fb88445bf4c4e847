"""Optimizer and learning-rate schedule from `config.train`."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import ml_collections
import optax

from gated_attention_jax import params as params_lib


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to `learning_rate`, cosine decay to `learning_rate * min_lr_ratio`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.learning_rate, warmup_steps=train.warmup_steps,
      decay_steps=max(train.num_steps, train.warmup_steps + 1),
      end_value=train.learning_rate * train.min_lr_ratio)


def _decay_mask(params):
  """Weight decay on matrices only; norm scales (1-D) are not decayed."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(train: ml_collections.ConfigDict,
                   trainable: Optional[Callable[[params_lib.Path], bool]] = None
                   ) -> optax.GradientTransformation:
  """AdamW (β1, β2, weight decay from the config) after global-norm clipping.

  `train.grad_clip` = 0 turns clipping off (the published Bigram-Backcopy recipe).
  trainable: a predicate over parameter paths (`params.selector`; None: all): the others are
  frozen — zero updates, so they stay bit-identical, and no optimizer state; the clipping
  norm is the trainable gradients'.
  """
  clip = optax.clip_by_global_norm(train.grad_clip) if train.grad_clip > 0 else optax.identity()
  tx = optax.chain(
      clip,
      optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2,
                  weight_decay=train.weight_decay, mask=_decay_mask),
  )
  if trainable is None:
    return tx
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()},
                               lambda params: trainable_labels(params, trainable))


def trainable_labels(params: Any, trainable: Callable[[params_lib.Path], bool]) -> Any:
  """"train" or "freeze" at every leaf of a parameter tree."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if trainable(params_lib.names(path)) else "freeze", params)

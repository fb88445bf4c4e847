"""The language-modelling loss, shared by training and analysis: per-token cross entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gated_attention_jax.transformer import Transformer

Batch = dict[str, jax.Array]


def token_losses(model: Transformer, batch: Batch, use_segments: bool,
                 want_intermediates: bool) -> tuple[jax.Array, jax.Array, dict[str, list]]:
  """Per-token cross entropy and log-partition `(B, T)`, and the model's intermediates.

  The intermediates (per-layer lists, see Transformer) are empty unless requested.
  """
  segment_ids = batch["segment_ids"] if use_segments else None
  out = model.forward(batch["inputs"], batch["positions"], segment_ids,
                      intermediates=want_intermediates)
  logits, inter = out.logits, out.intermediates
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
  return log_z - target_logit, log_z, inter

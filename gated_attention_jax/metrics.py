"""Sink, activation and gate statistics over a model's per-layer intermediates.

Inputs are what the LM returns (lists with one array per layer, or the same
arrays stacked on a leading layer axis L):

- attention probabilities ``(L, B, N, T, S)``: softmax rows over keys;
- hidden states ``(L, B, T, D)``: each block's output;
- gate scores: post-activation gate values ``(L, B, T, ...)``.

Everything is computed in float64 numpy; results are plain Python floats and
lists so they can be written to JSON as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np

PerLayer = Union[np.ndarray, Sequence[Any]]
"""One array per layer (a list) or an array stacked on a leading layer axis."""


def stack_layers(per_layer: PerLayer) -> np.ndarray:
    """Stacks a list of per-layer arrays (numpy or jax) into one float64 array (L, ...)."""
    if isinstance(per_layer, (list, tuple)):
        if not per_layer:
            raise ValueError("need at least one layer")
        return np.stack([np.asarray(a, dtype=np.float64) for a in per_layer])
    return np.asarray(per_layer, dtype=np.float64)


def first_token_attention(
    attention_probs: PerLayer, query_mask: np.ndarray | None = None
) -> dict[str, Any]:
    """The paper's F-Attn: attention probability on key 0, averaged over queries, heads, layers.

    Args:
      attention_probs: (L, B, N, T, S) or a list of L arrays (B, N, T, S).
      query_mask: optional (B, T) boolean/0-1 mask of the query positions to
        average over (e.g. excluding padding); default: all queries, including
        query 0, whose causal row puts all its mass on key 0.

    Returns:
      ``first_token_attention``: the scalar average; ``per_layer``: (L,) list;
      ``per_head``: (L, N) nested list. Every query counts equally across the batch.
    """
    probs = stack_layers(attention_probs)
    first = probs[..., 0]  # (L, B, N, T)
    if query_mask is None:
        weights = np.ones(first.shape[1:2] + first.shape[3:4])
    else:
        weights = np.asarray(query_mask, dtype=np.float64)
    if weights.shape != (first.shape[1], first.shape[3]):
        raise ValueError(f"query_mask must be (B, T)={first.shape[1], first.shape[3]}, got {weights.shape}")
    if weights.sum() <= 0:
        raise ValueError("query_mask selects no query")
    per_head = np.einsum("lbnt,bt->ln", first, weights) / weights.sum()  # (L, N)
    return {
        "first_token_attention": float(per_head.mean()),
        "per_layer": per_head.mean(axis=1).tolist(),
        "per_head": per_head.tolist(),
    }


def sink_rate(attention_probs: PerLayer, eps: float = 0.3) -> dict[str, Any]:
    """Gu et al.'s sink rate: share of (layer, head) pairs whose first key is a sink.

    The importance of key k in one (layer, head, sequence) is
    ``alpha_k = mean over queries i >= k of A[i, k]``; for the first key (k = 0)
    that is the mean over all T queries. A pair is a sink when ``alpha_1 > eps``
    (strictly). The rate is the fraction of the L*N pairs that are sinks, per
    sequence, then averaged over the B sequences.

    Args:
      attention_probs: (L, B, N, T, S) or a list of L arrays (B, N, T, S).
      eps: threshold on alpha_1 (0.3 in Gu et al.).

    Returns:
      ``sink_rate``: scalar; ``per_sequence``: (B,) list; ``per_layer``: (L,)
      list (fraction of that layer's heads that are sinks, batch-averaged);
      ``alpha_first``: (L, N) nested list of alpha_1 averaged over the batch;
      ``eps``: the threshold used.
    """
    probs = stack_layers(attention_probs)
    alpha_first = probs[..., 0].mean(axis=-1)  # (L, B, N)
    is_sink = alpha_first > eps
    return {
        "sink_rate": float(is_sink.mean()),
        "per_sequence": is_sink.mean(axis=(0, 2)).tolist(),
        "per_layer": is_sink.mean(axis=(1, 2)).tolist(),
        "alpha_first": alpha_first.mean(axis=1).tolist(),
        "eps": float(eps),
    }


def massive_activations(
    hidden_states: PerLayer, min_magnitude: float = 100.0, median_ratio: float = 1000.0
) -> dict[str, Any]:
    """M-Act (max |h| per layer, averaged over layers) and Sun et al.'s massive-activation count.

    An entry h of a layer's output is massive when ``|h| > min_magnitude`` and
    ``|h| > median_ratio * median|h|``. Median scope (our choice, following
    Sun et al.'s "whole hidden state of the layer"): the median of |h| over all
    (T, D) entries of that layer's output for ONE sequence, i.e. one median per
    (layer, sequence). Padding positions are not excluded.

    Args:
      hidden_states: (L, B, T, D) or a list of L arrays (B, T, D).
      min_magnitude: absolute threshold (100 in Sun et al.).
      median_ratio: ratio to the median (1000 in Sun et al.).

    Returns:
      ``max_activation``: mean over layers of the per-layer max |h| (the paper's
      M-Act); ``per_layer_max``: (L,) list; ``massive_count``: total number of
      massive entries; ``per_layer_count``: (L,) list of counts.
    """
    magnitude = np.abs(stack_layers(hidden_states))  # (L, B, T, D)
    per_layer_max = magnitude.max(axis=(1, 2, 3))
    median = np.median(magnitude, axis=(2, 3), keepdims=True)  # (L, B, 1, 1)
    massive = (magnitude > min_magnitude) & (magnitude > median_ratio * median)
    per_layer_count = massive.sum(axis=(1, 2, 3))
    return {
        "max_activation": float(per_layer_max.mean()),
        "per_layer_max": per_layer_max.tolist(),
        "massive_count": int(per_layer_count.sum()),
        "per_layer_count": [int(c) for c in per_layer_count],
    }


def gate_statistics(
    gate_scores: PerLayer | None,
    bins: int = 50,
    hist_range: tuple[float, float] | None = (0.0, 1.0),
    low_threshold: float = 0.1,
) -> dict[str, Any] | None:
    """Summary of post-activation gate values (the paper's "gate score" column and Figure 3).

    Args:
      gate_scores: per layer an array (B, T, ...) (e.g. (B, T, N, H) elementwise
        or (B, T, N) headwise); a list may mix trailing shapes across layers.
        ``None`` or an empty list (ungated model) returns ``None``.
      bins: number of histogram bins.
      hist_range: histogram range; values outside it are not binned (their
        number is reported). ``None`` uses the data's min and max.
      low_threshold: reported fraction is of values strictly below it.

    Returns:
      ``gate_score_mean``, ``gate_score_median``, ``fraction_below`` (with
      ``low_threshold``), ``per_layer_mean`` (L,), ``first_token_mean`` (values
      at position 0) and ``rest_mean`` (positions >= 1, NaN if T == 1),
      ``histogram``: {``counts``, ``edges``, ``outside``}. Means weight every
      gate value equally.
    """
    if gate_scores is None or (isinstance(gate_scores, (list, tuple)) and not gate_scores):
        return None
    layers = [np.asarray(g, dtype=np.float64) for g in gate_scores]
    for g in layers:
        if g.ndim < 2:
            raise ValueError(f"gate scores must be (B, T, ...), got shape {g.shape}")
    flat = np.concatenate([g.ravel() for g in layers])
    first = np.concatenate([g[:, 0].ravel() for g in layers])
    rest = np.concatenate([g[:, 1:].ravel() for g in layers])
    counts, edges = np.histogram(flat, bins=bins, range=hist_range)
    return {
        "gate_score_mean": float(flat.mean()),
        "gate_score_median": float(np.median(flat)),
        "fraction_below": float((flat < low_threshold).mean()),
        "low_threshold": float(low_threshold),
        "per_layer_mean": [float(g.mean()) for g in layers],
        "first_token_mean": float(first.mean()),
        "rest_mean": float(rest.mean()) if rest.size else float("nan"),
        "histogram": {
            "counts": counts.tolist(),
            "edges": edges.tolist(),
            "outside": int(flat.size - counts.sum()),
        },
    }

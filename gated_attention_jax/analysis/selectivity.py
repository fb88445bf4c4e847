"""Softmax selectivity probes (Mudarisov et al., "Limitations of Normalization in Attention").

For one query with weights alpha (L,) over value vectors x (L, d) and I_N the
indices of the N largest weights (ties broken towards the lower index):

- distance: s = sum_{i in I_N} alpha_i x_i, d = || sum_{i not in I_N} alpha_i x_i - s ||_2;
- distinguishability: y_i = alpha_i x_i, s_N = sum_{i in I_N} y_i, D_i = ||y_i - s_N||,
  rho_max = max_{i in I_N} D_i, rho_min = min_{j not in I_N} D_j,
  P = N / (N + #{j not in I_N: D_j <= rho_max}), R = #{i in I_N: D_i < rho_min} / N,
  F = 2PR / (P + R) (0 when P + R = 0). With N = L there is no unselected
  token: rho_min = +inf, so P = R = 1;
- the softmax Jacobian J = (diag(alpha) - alpha alpha^T) / T, alpha = softmax(z / T);
- the weight bound: logits q.k_i / T with |q.k_i| <= D = max_i |q||k_i| give
  every weight in [e^{-2D/T} / L, e^{2D/T} / L].

All functions take a leading batch (...) and compute in float64 numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gated_attention_jax.metrics import PerLayer, stack_layers


def _topn_ranks(alpha: np.ndarray) -> np.ndarray:
    """Rank of each weight in descending order, ties to the lower index. (..., L) -> (..., L)."""
    order = np.argsort(-alpha, axis=-1, kind="stable")
    return np.argsort(order, axis=-1, kind="stable")


def _check_n(n: int, length: int) -> None:
    if not 1 <= n <= length:
        raise ValueError(f"N must be in [1, L={length}], got {n}")


def _distance(alpha: np.ndarray, x: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """|| sum_unsel alpha x - sum_sel alpha x ||: alpha (..., L), x (..., L, d), selected (..., L) -> (...)."""
    signed = np.where(selected, -alpha, alpha)
    return np.linalg.norm(np.einsum("...l,...ld->...d", signed, x), axis=-1)


def _distinguishability(
    alpha: np.ndarray, x: np.ndarray, selected: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 of I_N, each (...): alpha (..., L), x (..., L, d), selected (..., L)."""
    y = alpha[..., None] * x
    s = np.einsum("...l,...ld->...d", selected.astype(y.dtype), y)
    dist = np.linalg.norm(y - s[..., None, :], axis=-1)  # (..., L)
    rho_max = np.where(selected, dist, -np.inf).max(axis=-1, keepdims=True)
    rho_min = np.where(selected, np.inf, dist).min(axis=-1, keepdims=True)
    intruders = (~selected & (dist <= rho_max)).sum(axis=-1)
    separated = (selected & (dist < rho_min)).sum(axis=-1)
    precision = n / (n + intruders)
    recall = separated / n
    total = precision + recall
    f1 = np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1.0), 0.0)
    return precision, recall, f1


def topn_distance(alpha: np.ndarray, x: np.ndarray, n: int) -> np.ndarray:
    """Distance between the top-N weighted sum and the rest: alpha (..., L), x (..., L, d) -> (...)."""
    alpha = np.asarray(alpha, dtype=np.float64)
    _check_n(n, alpha.shape[-1])
    return _distance(alpha, np.asarray(x, dtype=np.float64), _topn_ranks(alpha) < n)


def fraction_to_n(fractions: Sequence[float], length: int) -> np.ndarray:
    """N = round(f * L) clipped to [1, L] for each fraction f = N / L. Returns int (F,)."""
    return np.clip(np.rint(np.asarray(fractions, dtype=np.float64) * length), 1, length).astype(int)


def distance_curve(
    alpha: np.ndarray, x: np.ndarray, fractions: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """topn_distance for N = fraction_to_n(fractions, L).

    alpha (..., L), x (..., L, d) -> (ns (F,), distances (..., F)).

    Note: at N = L the distance is ||sum alpha x|| (the attention output), not 0;
    the collapse the paper describes is as L grows with N / L fixed (for
    near-uniform weights and i.i.d. zero-mean values d falls like 1/sqrt(L)).
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    ns = fraction_to_n(fractions, alpha.shape[-1])
    ranks = _topn_ranks(alpha)
    return ns, np.stack([_distance(alpha, x, ranks < n) for n in ns], axis=-1)


def distinguishability(
    alpha: np.ndarray, x: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, f1) of the top-N set, each (...): alpha (..., L), x (..., L, d)."""
    alpha = np.asarray(alpha, dtype=np.float64)
    _check_n(n, alpha.shape[-1])
    return _distinguishability(alpha, np.asarray(x, dtype=np.float64), _topn_ranks(alpha) < n, n)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_jacobian(logits: np.ndarray, temperature: float) -> np.ndarray:
    """d softmax(z / T) / dz = (diag(alpha) - alpha alpha^T) / T: logits (..., L) -> (..., L, L)."""
    alpha = _softmax(np.asarray(logits, dtype=np.float64) / temperature)
    diag = alpha[..., :, None] * np.eye(alpha.shape[-1])
    return (diag - alpha[..., :, None] * alpha[..., None, :]) / temperature


def jacobian_norms(jacobian: np.ndarray) -> dict[str, np.ndarray]:
    """Norms of (..., L, L) Jacobians, each (...).

    ``frobenius`` (entry-wise 2-norm), ``max_abs`` (largest |entry|) and
    ``spectral`` (largest |eigenvalue|: J must be symmetric). For the softmax Jacobian, which is
    symmetric PSD with row i summing |entries| to 2 alpha_i (1 - alpha_i) / T:
    spectral <= min(max_i alpha_i, 1/2) / T (Rayleigh quotient and Gershgorin;
    equality at a two-way tie), max_abs <= 1 / (4T), frobenius <= trace
    = (1 - sum alpha^2) / T.
    """
    jac = np.asarray(jacobian, dtype=np.float64)
    return {
        "frobenius": np.linalg.norm(jac, axis=(-2, -1)),
        "max_abs": np.abs(jac).max(axis=(-2, -1)),
        # J is symmetric: its spectral norm is its largest |eigenvalue| (eigvalsh is
        # far cheaper than the SVD that ord=2 runs).
        "spectral": np.abs(np.linalg.eigvalsh(jac)).max(axis=-1),
    }


def jacobian_norm_curve(logits: np.ndarray, temperatures: Sequence[float]) -> dict[str, np.ndarray]:
    """Softmax-Jacobian norms vs temperature, averaged over the leading dims of logits (..., L).

    Returns ``temperatures`` (F,), ``frobenius``/``max_abs``/``spectral`` (F,)
    and the logit-free bounds ``spectral_bound`` = 1/(2T), ``max_abs_bound`` = 1/(4T).
    """
    temps = np.asarray(temperatures, dtype=np.float64)
    norms = [jacobian_norms(softmax_jacobian(logits, t)) for t in temps]
    curve = {key: np.array([nm[key].mean() for nm in norms]) for key in ("frobenius", "max_abs", "spectral")}
    return {"temperatures": temps, **curve, "spectral_bound": 0.5 / temps, "max_abs_bound": 0.25 / temps}


def weight_bounds(q: np.ndarray, keys: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on softmax(keys @ q / T): q (..., H), keys (..., L, H) -> (lower (...), upper (...)).

    D = max_i |q| |k_i| bounds every logit's magnitude times T (Cauchy-Schwarz),
    so each weight lies in [e^{-2D/T} / L, e^{2D/T} / L]. For scaled dot-product
    attention pass T = sqrt(H) (times any extra temperature).
    """
    q = np.asarray(q, dtype=np.float64)
    keys = np.asarray(keys, dtype=np.float64)
    d = np.linalg.norm(q, axis=-1) * np.linalg.norm(keys, axis=-1).max(axis=-1)
    length = keys.shape[-2]
    return np.exp(-2 * d / temperature) / length, np.exp(2 * d / temperature) / length


def weights_within_bounds(
    alpha: np.ndarray, q: np.ndarray, keys: np.ndarray, temperature: float, rtol: float = 1e-9
) -> bool:
    """Whether all weights alpha (..., L) lie in weight_bounds(q (..., H), keys (..., L, H), T).

    Pass alpha = softmax(keys @ q / T) (e.g. a model's attention row) to check the
    bound; any other weights show how far they are from what softmax can reach.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    lower, upper = weight_bounds(q, keys, temperature)
    return bool(np.all(alpha >= lower[..., None] * (1 - rtol)) and np.all(alpha <= upper[..., None] * (1 + rtol)))


def softmax_weights(q: np.ndarray, keys: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(keys @ q / T): q (..., H), keys (..., L, H) -> (..., L)."""
    logits = np.einsum("...lh,...h->...l", np.asarray(keys, np.float64), np.asarray(q, np.float64))
    return _softmax(logits / temperature)


def attention_selectivity(
    attention_probs: PerLayer,
    values: PerLayer,
    fractions: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0),
    query_positions: Sequence[int] | None = None,
    causal: bool = True,
) -> dict[str, Any]:
    """Distance and distinguishability of a model's attention, per layer and head.

    Query t sits at key position t + S - T (so T == S for a full forward). With
    ``causal`` its keys are 0..t + S - T (L = that + 1) and its weights over them
    are used as alpha; otherwise all S keys. Query head n reads kv head
    n // (N // K) (grouped-query attention, kv heads repeated).

    Args:
      attention_probs: (L_layers, B, N, T, S) or a list of (B, N, T, S).
      values: (L_layers, B, S, K, H) or a list of (B, S, K, H), N % K == 0.
      fractions: N / L values; N = fraction_to_n(fractions, L) per query.
      query_positions: query indices in [0, T) to average over; default the last.
      causal: restrict each query to keys at or before it.

    Returns:
      ``fractions`` (F,) list; ``distance``, ``precision``, ``recall``, ``f1``:
      (L_layers, N, F) nested lists averaged over the batch and the queries;
      ``mean_distance``, ``mean_precision``, ``mean_recall``, ``mean_f1``: (F,)
      lists averaged over layers and heads too.
    """
    probs = stack_layers(attention_probs)
    vals = stack_layers(values)
    n_layers, _, n_heads, n_queries, n_keys = probs.shape
    n_kv = vals.shape[3]
    if n_heads % n_kv:
        raise ValueError(f"query heads {n_heads} not a multiple of kv heads {n_kv}")
    positions = [n_queries - 1] if query_positions is None else list(query_positions)
    # (L_layers, B, S, K, H) -> (L_layers, B, N, S, H)
    vals = np.repeat(vals, n_heads // n_kv, axis=3).transpose(0, 1, 3, 2, 4)
    sums = np.zeros((4, n_layers, n_heads, len(fractions)))
    for t in positions:
        length = t + n_keys - n_queries + 1 if causal else n_keys
        alpha = probs[:, :, :, t, :length]  # (L_layers, B, N, length)
        x = vals[:, :, :, :length]
        ranks = _topn_ranks(alpha)
        for f, n in enumerate(fraction_to_n(fractions, length)):
            selected = ranks < n
            stats = (_distance(alpha, x, selected), *_distinguishability(alpha, x, selected, n))
            for k, stat in enumerate(stats):
                sums[k, :, :, f] += stat.mean(axis=1)
    means = sums / len(positions)
    out: dict[str, Any] = {"fractions": [float(f) for f in fractions]}
    for k, name in enumerate(("distance", "precision", "recall", "f1")):
        out[name] = means[k].tolist()
        out[f"mean_{name}"] = means[k].mean(axis=(0, 1)).tolist()
    return out

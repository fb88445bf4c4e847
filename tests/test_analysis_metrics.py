"""Analysis instruments on constructed inputs with known answers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gated_attention_jax import analysis as an


def causal_uniform(n_layers: int, batch: int, heads: int, length: int) -> np.ndarray:
    """(L, B, N, T, T) probabilities with A[i, k] = 1 / (i + 1) for k <= i."""
    rows = np.tril(np.ones((length, length))) / np.arange(1, length + 1)[:, None]
    return np.broadcast_to(rows, (n_layers, batch, heads, length, length)).copy()


def first_token_rows(p_first: np.ndarray, length: int) -> np.ndarray:
    """(..., T, S=T) non-causal rows with p on key 0 and the rest spread evenly over the others."""
    p = np.asarray(p_first, dtype=np.float64)[..., None, None]
    rows = np.broadcast_to((1 - p) / (length - 1), p.shape[:-2] + (length, length)).copy()
    rows[..., 0] = p[..., 0]
    return rows


# --------------------------------------------------------------------------- sinks


def test_all_mass_on_first_token_is_a_full_sink():
    probs = np.zeros((2, 3, 4, 5, 5))
    probs[..., 0] = 1.0
    fa = an.first_token_attention(probs)
    assert fa["first_token_attention"] == 1.0
    assert fa["per_layer"] == [1.0, 1.0]
    assert np.array_equal(fa["per_head"], np.ones((2, 4)))
    sr = an.sink_rate(probs)
    assert sr["sink_rate"] == 1.0
    assert sr["per_sequence"] == [1.0, 1.0, 1.0]
    assert np.array_equal(sr["alpha_first"], np.ones((2, 4)))


def test_uniform_causal_first_token_attention_is_mean_harmonic():
    length = 16
    probs = causal_uniform(3, 2, 4, length)
    expected = np.mean(1.0 / np.arange(1, length + 1))
    fa = an.first_token_attention(probs)
    assert fa["first_token_attention"] == pytest.approx(expected, rel=1e-12)
    assert np.allclose(fa["per_layer"], expected)
    # A list of per-layer jax arrays gives the same answer as the stacked array.
    as_list = an.first_token_attention([jnp.asarray(p, dtype=jnp.float32) for p in probs])
    assert as_list["first_token_attention"] == pytest.approx(expected, rel=1e-6)
    # Masking out query 0 (whose row is all on key 0) leaves queries 1..T-1.
    mask = np.ones((2, length), dtype=bool)
    mask[:, 0] = False
    masked = an.first_token_attention(probs, query_mask=mask)
    assert masked["first_token_attention"] == pytest.approx(np.mean(1.0 / np.arange(2, length + 1)))


def test_uniform_non_causal_first_token_attention_is_one_over_length():
    probs = np.full((2, 1, 3, 6, 10), 0.1)
    assert an.first_token_attention(probs)["first_token_attention"] == pytest.approx(0.1)


def test_query_mask_shape_is_checked():
    with pytest.raises(ValueError, match="query_mask"):
        an.first_token_attention(np.full((1, 2, 1, 4, 4), 0.25), query_mask=np.ones((4, 2)))


def test_sink_rate_counts_heads_above_eps():
    # (L=2, B=2, N=4) first-token probabilities; strictly above 0.3 is a sink.
    p_first = np.array(
        [
            [[0.9, 0.1, 0.31, 0.29], [0.5, 0.5, 0.5, 0.5]],
            [[0.0, 0.2, 0.6, 0.25], [0.05, 0.05, 0.05, 0.4]],
        ]
    )
    probs = first_token_rows(p_first, length=5)
    assert np.allclose(probs.sum(-1), 1.0)
    sr = an.sink_rate(probs, eps=0.3)
    # sequence 0: layer 0 {0.9, 0.31}, layer 1 {0.6} -> 3/8; sequence 1: 4 + 1 -> 5/8.
    assert sr["per_sequence"] == pytest.approx([3 / 8, 5 / 8])
    assert sr["sink_rate"] == pytest.approx(0.5)
    assert sr["per_layer"] == pytest.approx([6 / 8, 2 / 8])
    assert np.allclose(sr["alpha_first"], p_first.mean(axis=1))
    assert an.sink_rate(probs, eps=0.95)["sink_rate"] == 0.0
    # Strictly above: the heads at exactly 0.5 are not sinks at eps = 0.5.
    assert an.sink_rate(probs, eps=0.5)["per_sequence"] == pytest.approx([2 / 8, 0.0])


def test_uniform_causal_attention_has_no_sink():
    # alpha_1 = mean_i 1/(i+1) = H_64 / 64 ~ 0.074 < 0.3.
    assert an.sink_rate(causal_uniform(2, 1, 2, 64))["sink_rate"] == 0.0


# --------------------------------------------------------------------------- activations


def test_massive_activation_count_on_planted_tensor():
    rng = np.random.default_rng(0)
    signs = rng.choice([-1.0, 1.0], size=(3, 2, 8, 16))
    hidden = signs.copy()  # |h| = 1, median 1 -> threshold max(100, 1000) = 1000
    hidden[2] *= 0.01  # layer 2: median 0.01 -> threshold max(100, 10) = 100
    hidden[0, 0, 3, 5] = 999.0  # not > 1000 x median
    hidden[0, 1, 7, 0] = -1500.0  # counts (magnitude)
    hidden[1, 1, 2, 2] = 2000.0
    hidden[1, 1, 4, 9] = 1200.0
    hidden[2, 0, 0, 0] = 150.0  # > 100 and > 1000 x 0.01
    hidden[2, 1, 5, 5] = 99.0  # not > 100
    result = an.massive_activations(list(hidden))
    assert result["per_layer_count"] == [1, 2, 1]
    assert result["massive_count"] == 4
    assert result["per_layer_max"] == [1500.0, 2000.0, 150.0]
    assert result["max_activation"] == pytest.approx(3650.0 / 3)


def test_massive_activation_median_is_per_sequence():
    hidden = np.ones((1, 2, 4, 8))
    hidden[0, 1] = 0.01  # sequence 1 has median 0.01, sequence 0 median 1
    hidden[0, 1, 0, 0] = 150.0  # massive for its own sequence's median, not for a batch-wide one
    assert an.massive_activations(hidden)["massive_count"] == 1


# --------------------------------------------------------------------------- gates


def test_gate_statistics_known_values():
    layer0 = np.full((2, 3, 2), 0.05)
    layer0[:, 0] = 0.85
    layer1 = np.full((2, 3, 2), 0.5)
    stats = an.gate_statistics([layer0, jnp.asarray(layer1)], bins=10)
    assert stats["gate_score_mean"] == pytest.approx((4 * 0.85 + 8 * 0.05 + 12 * 0.5) / 24)
    assert stats["gate_score_median"] == pytest.approx(0.5)
    assert stats["fraction_below"] == pytest.approx(8 / 24)
    assert stats["per_layer_mean"] == pytest.approx([(4 * 0.85 + 8 * 0.05) / 12, 0.5])
    assert stats["first_token_mean"] == pytest.approx((4 * 0.85 + 4 * 0.5) / 8)
    assert stats["rest_mean"] == pytest.approx((8 * 0.05 + 8 * 0.5) / 16)
    hist = stats["histogram"]
    assert hist["edges"] == pytest.approx(np.linspace(0, 1, 11))
    assert hist["counts"] == [8, 0, 0, 0, 0, 12, 0, 0, 4, 0]
    assert hist["outside"] == 0
    stacked = an.gate_statistics(np.stack([layer0, layer1]), bins=10)
    assert stacked["gate_score_mean"] == pytest.approx(stats["gate_score_mean"])


def test_gate_statistics_out_of_range_and_ungated():
    silu_like = np.array([[[-0.2], [0.5], [1.5]]])  # (B=1, T=3, 1)
    stats = an.gate_statistics([silu_like], bins=4)
    assert stats["histogram"]["outside"] == 2
    assert sum(stats["histogram"]["counts"]) == 1
    assert an.gate_statistics([silu_like], bins=4, hist_range=None)["histogram"]["outside"] == 0
    assert an.gate_statistics(None) is None


# --------------------------------------------------------------------------- selectivity


def brute_force_distance(alpha: np.ndarray, x: np.ndarray, n: int) -> float:
    order = sorted(range(len(alpha)), key=lambda i: (-alpha[i], i))
    chosen = set(order[:n])
    s = sum(alpha[i] * x[i] for i in chosen)
    rest = sum((alpha[i] * x[i] for i in range(len(alpha)) if i not in chosen), np.zeros(x.shape[1]))
    return float(np.linalg.norm(rest - s))


@settings(max_examples=40, deadline=None, database=None)
@given(length=st.integers(1, 12), dim=st.integers(1, 5), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_topn_distance_matches_brute_force(length, dim, seed, data):
    rng = np.random.default_rng(seed)
    alpha = rng.dirichlet(np.ones(length))
    x = rng.normal(size=(length, dim))
    n = data.draw(st.integers(1, length))
    assert an.topn_distance(alpha, x, n) == pytest.approx(brute_force_distance(alpha, x, n), abs=1e-12)


def test_topn_ties_go_to_the_lower_index():
    x = np.eye(4)
    alpha = np.full(4, 0.25)
    # Key 0 selected: d = || (e1 + e2 + e3 - e0) / 4 || = 2 / 4; distance_curve agrees.
    assert an.topn_distance(alpha, x, 1) == pytest.approx(0.5)
    alpha = np.array([0.1, 0.3, 0.3, 0.3])
    x = np.array([[0.0], [1.0], [2.0], [4.0]])
    # Top-2 are keys 1 and 2: d = |0.1 * 0 + 0.3 * 4 - 0.3 * (1 + 2)| = 0.3.
    assert an.topn_distance(alpha, x, 2) == pytest.approx(0.3)
    assert an.distance_curve(alpha, x, [0.5])[1] == pytest.approx([0.3])


def test_topn_distance_rejects_bad_n():
    with pytest.raises(ValueError):
        an.topn_distance(np.array([0.5, 0.5]), np.ones((2, 3)), 3)


def test_identical_vectors_distance_is_mass_imbalance():
    length = 8
    c = np.array([3.0, 4.0])  # |c| = 5
    x = np.broadcast_to(c, (length, 2))
    uniform = np.full(length, 1 / length)
    assert an.topn_distance(uniform, x, length // 2) == pytest.approx(0.0, abs=1e-12)
    alpha = np.array([0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.03, 0.02])
    for n, top_mass in [(1, 0.4), (2, 0.6), (5, 0.9)]:
        assert an.topn_distance(alpha, x, n) == pytest.approx(abs(1 - 2 * top_mass) * 5.0)


def test_distance_collapses_as_n_grows_with_length():
    # Near-uniform weights, zero-mean vectors: at fixed N/L the distance falls like 1/sqrt(L).
    rng = np.random.default_rng(1)
    fractions = [0.1, 0.5, 1.0]
    means = {}
    for length in (16, 1024):
        alpha = rng.dirichlet(np.full(length, 1000.0), size=200)  # within ~3% of 1/L
        x = rng.normal(size=(200, length, 8))
        ns, dist = an.distance_curve(alpha, x, fractions)
        assert list(ns) == list(an.fraction_to_n(fractions, length))
        assert dist.shape == (200, 3)
        means[length] = dist.mean(axis=0)
    ratio = means[16] / means[1024]
    assert np.all((ratio > 5) & (ratio < 12)), ratio  # sqrt(1024 / 16) = 8


def test_distance_curve_matches_topn_distance():
    rng = np.random.default_rng(2)
    alpha = rng.dirichlet(np.ones(20), size=3)
    x = rng.normal(size=(3, 20, 4))
    ns, dist = an.distance_curve(alpha, x, [0.0, 0.26, 1.0])
    assert list(ns) == [1, 5, 20]
    for f, n in enumerate(ns):
        assert np.allclose(dist[:, f], an.topn_distance(alpha, x, int(n)))


def test_distinguishability_perfect_when_selected_cluster_apart():
    rng = np.random.default_rng(3)
    alpha = np.array([0.3, 0.3, 0.3] + [0.1 / 7] * 7)
    u = np.array([1.0, 0.0, 0.0])
    x = np.concatenate([np.tile(u / 0.3, (3, 1)), rng.uniform(-0.5, 0.5, size=(7, 3))])
    # y_sel = u, s_N = 3u: D_sel = 2 while every |y_unsel| < 0.02 gives D_unsel > 2.9.
    assert an.distinguishability(alpha, x, 3) == pytest.approx((1.0, 1.0, 1.0))


def test_distinguishability_partial_by_hand():
    alpha = np.array([0.4, 0.3, 0.1, 0.1, 0.1])
    y = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 3.5], [4.0, 2.0], [1.0, -2.0]])
    x = y / alpha[:, None]
    # s = (1, 2); D = [2, 1, 1.5, 3, 4]; rho_max = 2, rho_min = 1.5.
    precision, recall, f1 = an.distinguishability(alpha, x, 2)
    assert precision == pytest.approx(2 / 3)  # one intruder (D = 1.5 <= 2)
    assert recall == pytest.approx(1 / 2)  # only D = 1 < 1.5
    assert f1 == pytest.approx(4 / 7)
    # An unselected token sitting on s_N leaves nothing separated: recall 0, F 0.
    y[2] = [1.0, 2.0]
    assert an.distinguishability(alpha, y / alpha[:, None], 2) == pytest.approx((2 / 3, 0.0, 0.0))
    # Ties: an unselected D_j equal to rho_max is an intruder; a selected D_i equal to rho_min is not separated.
    y[2] = [1.0, 3.5]
    y[3] = [1.0, 0.0]  # D = 2 = rho_max
    assert an.distinguishability(alpha, y / alpha[:, None], 2)[0] == pytest.approx(2 / 4)
    y[2] = [1.0, 1.0]  # D = 1 = D_1 = rho_min
    assert an.distinguishability(alpha, y / alpha[:, None], 2)[1] == pytest.approx(0.0)
    # N = L: no unselected token, so P = R = 1.
    assert an.distinguishability(alpha, x, 5) == pytest.approx((1.0, 1.0, 1.0))


# --------------------------------------------------------------------------- Jacobian and bounds


@pytest.mark.parametrize("temperature", [0.05, 0.5, 1.0, 3.0])
def test_softmax_jacobian_matches_jax(temperature):
    logits = np.random.default_rng(4).normal(size=7)
    expected = jax.jacfwd(lambda z: jax.nn.softmax(z / temperature))(jnp.asarray(logits, jnp.float32))
    np.testing.assert_allclose(
        an.softmax_jacobian(logits, temperature), np.asarray(expected), rtol=1e-4, atol=1e-5 / temperature
    )


@settings(max_examples=60, deadline=None, database=None)
@given(
    length=st.integers(2, 16),
    scale=st.floats(0.01, 20.0),
    temperature=st.floats(0.02, 5.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_softmax_jacobian_norm_bounds(length, scale, temperature, seed):
    logits = np.random.default_rng(seed).normal(size=(3, length)) * scale
    alpha = np.exp(logits / temperature - (logits / temperature).max(-1, keepdims=True))
    alpha /= alpha.sum(-1, keepdims=True)
    norms = an.jacobian_norms(an.softmax_jacobian(logits, temperature))
    slack = 1e-12 / temperature  # rounding of 1 - sum(alpha^2) when alpha is nearly one-hot
    assert np.all(norms["spectral"] <= np.minimum(alpha.max(-1), 0.5) / temperature + slack)
    assert np.all(norms["max_abs"] <= 0.25 / temperature + slack)
    assert np.all(norms["frobenius"] <= (1 - (alpha**2).sum(-1)) / temperature + slack)
    assert np.all(norms["spectral"] <= norms["frobenius"] + slack)


def test_softmax_jacobian_bounds_are_tight_at_a_two_way_tie():
    logits = np.array([2.0, 2.0, -60.0, -60.0])
    norms = an.jacobian_norms(an.softmax_jacobian(logits, 0.5))
    assert norms["spectral"] == pytest.approx(1.0)  # 1 / (2T)
    assert norms["max_abs"] == pytest.approx(0.5)  # 1 / (4T)


def test_jacobian_norm_curve_grows_like_one_over_t_for_tied_logits():
    temps = [0.01, 0.1, 1.0]
    curve = an.jacobian_norm_curve(np.zeros((2, 8)), temps)
    # Uniform alpha: J = (I / L - 1 1^T / L^2) / T, spectral norm 1 / (L T).
    assert curve["spectral"] == pytest.approx([1 / (8 * t) for t in temps])
    assert curve["spectral_bound"] == pytest.approx([0.5 / t for t in temps])
    assert curve["max_abs_bound"] == pytest.approx([0.25 / t for t in temps])
    assert np.all(curve["max_abs"] <= curve["max_abs_bound"])


def test_weight_bounds_explicit():
    lower, upper = an.weight_bounds(np.array([1.0, 0.0]), np.array([[2.0, 0.0], [0.0, 1.0]]), 1.0)
    assert lower == pytest.approx(np.exp(-4.0) / 2)  # D = |q| max|k| = 2
    assert upper == pytest.approx(np.exp(4.0) / 2)


@settings(max_examples=50, deadline=None, database=None)
@given(
    length=st.integers(1, 64),
    dim=st.integers(1, 16),
    scale=st.floats(0.01, 1.0),
    temperature=st.floats(0.5, 10.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_softmax_weights_lie_within_bound(length, dim, scale, temperature, seed):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(2, dim)) * scale
    keys = rng.normal(size=(2, length, dim)) * scale
    assert an.weights_within_bounds(an.softmax_weights(q, keys, temperature), q, keys, temperature)


def test_weight_bound_check_rejects_weights_softmax_cannot_reach():
    q = np.array([0.5, 0.0])
    keys = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # D = 0.5: weights in [e^-1/4, e/4]
    alpha = an.softmax_weights(q, keys, 1.0)
    assert alpha == pytest.approx(np.exp([0.5, -0.5, 0.0, 0.0]) / np.exp([0.5, -0.5, 0.0, 0.0]).sum())
    assert an.weights_within_bounds(alpha, q, keys, 1.0)
    assert not an.weights_within_bounds(np.array([1.0, 0.0, 0.0, 0.0]), q, keys, 1.0)  # one-hot
    assert not an.weights_within_bounds(np.array([0.7, 0.1, 0.1, 0.1]), q, keys, 1.0)  # 0.7 > e/4


# --------------------------------------------------------------------------- model-level selectivity


def test_attention_selectivity_matches_per_head_computation():
    rng = np.random.default_rng(5)
    n_layers, batch, heads, kv_heads, length, head_dim = 2, 3, 4, 2, 9, 5
    logits = rng.normal(size=(n_layers, batch, heads, length, length)) * 2
    logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    values = rng.normal(size=(n_layers, batch, length, kv_heads, head_dim))
    fractions = [0.2, 0.5, 1.0]
    positions = [4, length - 1]
    out = an.attention_selectivity(list(probs), list(values), fractions, query_positions=positions)
    assert np.array(out["distance"]).shape == (n_layers, heads, 3)
    for layer in range(n_layers):
        for head in range(heads):
            for f, frac in enumerate(fractions):
                dist, prec = [], []
                for t in positions:
                    n = int(an.fraction_to_n([frac], t + 1)[0])
                    alpha = probs[layer, :, head, t, : t + 1]
                    x = values[layer, :, : t + 1, head // 2]
                    dist.append(an.topn_distance(alpha, x, n).mean())
                    prec.append(an.distinguishability(alpha, x, n)[0].mean())
                assert out["distance"][layer][head][f] == pytest.approx(np.mean(dist))
                assert out["precision"][layer][head][f] == pytest.approx(np.mean(prec))
    assert out["mean_f1"][-1] == pytest.approx(1.0)  # N = L: everything selected
    assert out["mean_distance"] == pytest.approx(np.array(out["distance"]).mean(axis=(0, 1)))


def test_attention_selectivity_default_last_query_non_causal_and_gqa_check():
    probs = np.full((1, 1, 2, 3, 6), 1 / 6)
    values = np.ones((1, 1, 6, 1, 4))
    out = an.attention_selectivity(probs, values, fractions=[0.5], causal=False)
    assert out["mean_distance"] == pytest.approx([0.0])  # identical values, balanced mass
    with pytest.raises(ValueError, match="multiple"):
        an.attention_selectivity(np.full((1, 1, 3, 3, 3), 1 / 3), np.ones((1, 1, 3, 2, 4)))


# --------------------------------------------------------------------------- plots


def read_png(path) -> np.ndarray:
    image = matplotlib.image.imread(path)
    assert image.std() > 0.01  # something was drawn
    return image


def test_plots_write_readable_pngs_of_expected_size(tmp_path):
    dpi, size = 50, (6.0, 3.0)
    expected = (int(size[1] * dpi), int(size[0] * dpi))
    probs = causal_uniform(2, 1, 2, 8)
    gates = an.gate_statistics([np.random.default_rng(6).uniform(size=(1, 8, 2))], bins=10)
    curve = an.jacobian_norm_curve(np.random.default_rng(7).normal(size=(4, 16)), [0.05, 0.1, 0.5, 1.0])
    selectivity = an.attention_selectivity(probs, np.ones((2, 1, 8, 2, 4)), fractions=[0.25, 0.5, 1.0])
    calls = {
        "attn.png": lambda p: an.plot_attention_maps({"baseline": probs, "gated": probs}, p, 1, 0, figsize=size, dpi=dpi),
        "attn_lin.png": lambda p: an.plot_attention_maps({"m": probs}, p, 0, 1, log_scale=False, figsize=size, dpi=dpi),
        "fattn.png": lambda p: an.plot_first_token_attention({"a": [0.5, 0.8], "b": [0.05, 0.04, 0.1]}, p, figsize=size, dpi=dpi),
        "gates.png": lambda p: an.plot_gate_histogram({"G1": gates["histogram"]}, p, figsize=size, dpi=dpi),
        "mact.png": lambda p: an.plot_max_activation({"a": [10.0, 1000.0], "b": [5.0, 90.0]}, p, figsize=size, dpi=dpi),
        "ppl.png": lambda p: an.plot_perplexity_vs_length(
            {"rope": {1: 20.0, 2: 60.0, 4: 300.0}, "yarn": {1: 20.0, 2: 22.0, 4: 25.0}}, p, figsize=size, dpi=dpi
        ),
        "sel.png": lambda p: an.plot_selectivity_distance({"m": selectivity}, p, figsize=size, dpi=dpi),
        "dist.png": lambda p: an.plot_distinguishability({"m": selectivity}, p, figsize=size, dpi=dpi),
        "jac.png": lambda p: an.plot_jacobian_norm(curve, p, figsize=size, dpi=dpi),
    }
    for name, draw in calls.items():
        path = tmp_path / "sub" / name
        assert draw(path) == path
        assert path.stat().st_size > 0
        assert read_png(path).shape[:2] == expected, name

"""Figures from analysis outputs. Each function writes one PNG and returns its path.

Figures are built with ``matplotlib.figure.Figure`` (rendered by Agg), never
through pyplot, so nothing global changes and no display is needed. The PNG is
exactly ``figsize * dpi`` pixels (no tight bounding box).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from gated_attention_jax.metrics import PerLayer, stack_layers

PathLike = Union[str, Path]


def _figure(figsize: tuple[float, float]) -> Figure:
    return Figure(figsize=figsize, layout="constrained")


def _save(fig: Figure, path: PathLike, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def plot_attention_maps(
    attention: Mapping[str, PerLayer],
    path: PathLike,
    layer: int,
    head: int,
    batch_index: int = 0,
    log_scale: bool = True,
    figsize: tuple[float, float] = (10.0, 4.5),
    dpi: int = 100,
) -> Path:
    """Side-by-side (T, S) attention maps of one (layer, head), one panel per model (paper Fig. 2).

    Args:
      attention: label -> attention probs (L, B, N, T, S) or a list of (B, N, T, S).
      log_scale: log colour scale (zeros, e.g. the causal upper triangle, left
        blank), shared by all panels, from the smallest positive weight (>= 1e-6) to 1.
    """
    fig = _figure(figsize)
    axes = fig.subplots(1, len(attention), squeeze=False)[0]
    grids = {label: stack_layers(probs)[layer, batch_index, head] for label, probs in attention.items()}
    smallest = min(grid[grid > 0].min() for grid in grids.values())
    norm = LogNorm(vmin=max(smallest, 1e-6), vmax=1.0) if log_scale else Normalize(0.0, 1.0)
    for ax, (label, grid) in zip(axes, grids.items()):
        shown = np.ma.masked_less_equal(grid, 0.0) if log_scale else grid
        image = ax.imshow(shown, cmap="viridis", norm=norm, interpolation="nearest", aspect="auto")
        ax.set_title(f"{label} (layer {layer}, head {head})")
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        fig.colorbar(image, ax=ax)
    return _save(fig, path, dpi)


def plot_first_token_attention(
    per_layer: Mapping[str, Sequence[float]],
    path: PathLike,
    figsize: tuple[float, float] = (7.0, 4.0),
    dpi: int = 100,
) -> Path:
    """First-token attention per layer, one line per model (label -> first_token_attention()['per_layer'])."""
    fig = _figure(figsize)
    ax = fig.subplots()
    for label, values in per_layer.items():
        ax.plot(np.arange(len(values)), values, marker="o", label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("attention on first token")
    ax.set_ylim(0.0, 1.0)
    ax.legend()
    return _save(fig, path, dpi)


def plot_gate_histogram(
    histograms: Mapping[str, Mapping[str, Sequence[float]]],
    path: PathLike,
    log_y: bool = False,
    figsize: tuple[float, float] = (7.0, 4.0),
    dpi: int = 100,
) -> Path:
    """Gate-score densities, one step curve per model (label -> gate_statistics()['histogram'])."""
    fig = _figure(figsize)
    ax = fig.subplots()
    for label, hist in histograms.items():
        counts = np.asarray(hist["counts"], dtype=np.float64)
        edges = np.asarray(hist["edges"], dtype=np.float64)
        ax.stairs(counts / max(counts.sum(), 1.0), edges, label=label)
    ax.set_xlabel("gate score")
    ax.set_ylabel("fraction of gate values")
    if log_y:
        ax.set_yscale("log")
    ax.legend()
    return _save(fig, path, dpi)


def plot_max_activation(
    per_layer: Mapping[str, Sequence[float]],
    path: PathLike,
    log_y: bool = True,
    figsize: tuple[float, float] = (7.0, 4.0),
    dpi: int = 100,
) -> Path:
    """Max |hidden state| per layer, one line per model (label -> massive_activations()['per_layer_max'])."""
    fig = _figure(figsize)
    ax = fig.subplots()
    for label, values in per_layer.items():
        ax.plot(np.arange(len(values)), values, marker="o", label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("max |hidden state|")
    if log_y:
        ax.set_yscale("log")
    ax.legend()
    return _save(fig, path, dpi)


def plot_perplexity_vs_length(
    results: Mapping[str, Mapping[float, float]],
    path: PathLike,
    figsize: tuple[float, float] = (7.0, 4.0),
    dpi: int = 100,
) -> Path:
    """Perplexity vs evaluation length, one line per RoPE method (method -> {length multiple: ppl})."""
    fig = _figure(figsize)
    ax = fig.subplots()
    for method, by_length in results.items():
        lengths = sorted(by_length)
        ax.plot(lengths, [by_length[k] for k in lengths], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("evaluation length / training length")
    ax.set_ylabel("perplexity")
    ax.legend()
    return _save(fig, path, dpi)


def plot_selectivity_distance(
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    path: PathLike,
    figsize: tuple[float, float] = (7.0, 4.0),
    dpi: int = 100,
) -> Path:
    """Mean top-N distance vs N/L, one line per model (label -> attention_selectivity() output)."""
    fig = _figure(figsize)
    ax = fig.subplots()
    for label, summary in curves.items():
        ax.plot(summary["fractions"], summary["mean_distance"], marker="o", label=label)
    ax.set_xlabel("N / L")
    ax.set_ylabel("distance ||rest - top-N||")
    ax.legend()
    return _save(fig, path, dpi)


def plot_distinguishability(
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    path: PathLike,
    figsize: tuple[float, float] = (7.0, 4.0),
    dpi: int = 100,
) -> Path:
    """Mean precision (solid), recall (dashed) and F (dotted) of the top-N tokens vs N/L,
    per model (label -> attention_selectivity() output)."""
    fig = _figure(figsize)
    ax = fig.subplots()
    for i, (label, summary) in enumerate(curves.items()):
        color = f"C{i}"
        for key, style in (("mean_precision", "-"), ("mean_recall", "--"), ("mean_f1", ":")):
            ax.plot(summary["fractions"], summary[key], linestyle=style, color=color,
                    label=f"{label} {key.removeprefix('mean_')}")
    ax.set_xlabel("N / L")
    ax.set_ylabel("distinguishable fraction")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize="small")
    return _save(fig, path, dpi)


def plot_jacobian_norm(
    curve: Mapping[str, Any],
    path: PathLike,
    figsize: tuple[float, float] = (7.0, 4.0),
    dpi: int = 100,
) -> Path:
    """Softmax-Jacobian norms vs temperature (log-log) with their bounds (a jacobian_norm_curve() output)."""
    fig = _figure(figsize)
    ax = fig.subplots()
    temps = np.asarray(curve["temperatures"])
    ax.plot(temps, curve["spectral"], marker="o", label="spectral norm")
    ax.plot(temps, curve["spectral_bound"], linestyle="--", label="bound 1/(2T)")
    ax.plot(temps, curve["max_abs"], marker="s", label="max |entry|")
    ax.plot(temps, curve["max_abs_bound"], linestyle=":", label="bound 1/(4T)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("temperature T")
    ax.set_ylabel("Jacobian norm")
    ax.legend()
    return _save(fig, path, dpi)

"""Analysis instruments: attention sinks, massive activations, gate statistics,
softmax selectivity (Mudarisov et al.), passkey retrieval and the figures drawn from them.

`analyze_model` / `analyze_run` run them all and write analysis.json and PNGs
(`python -m gated_attention_jax.analyze --workdir=DIR`). The sink, activation and gate
metrics live in `gated_attention_jax.metrics` (below training, which logs them too);
`from gated_attention_jax.analysis import metrics` still gives that module."""

from gated_attention_jax import metrics
from gated_attention_jax.metrics import (
    first_token_attention,
    gate_statistics,
    massive_activations,
    sink_rate,
    stack_layers,
)
from gated_attention_jax.analysis.plots import (
    plot_attention_maps,
    plot_first_token_attention,
    plot_gate_histogram,
    plot_jacobian_norm,
    plot_max_activation,
    plot_perplexity_vs_length,
    plot_selectivity_distance,
    plot_distinguishability,
)
from gated_attention_jax.analysis.retrieval import retrieval_accuracy, run_retrieval
from gated_attention_jax.analysis.run_analysis import (
    analyze_model,
    analyze_run,
    compare_runs,
    load_run,
)
from gated_attention_jax.analysis.selectivity import (
    attention_selectivity,
    distance_curve,
    distinguishability,
    fraction_to_n,
    jacobian_norm_curve,
    jacobian_norms,
    softmax_jacobian,
    softmax_weights,
    topn_distance,
    weight_bounds,
    weights_within_bounds,
)

__all__ = [
    "analyze_model",
    "analyze_run",
    "attention_selectivity",
    "compare_runs",
    "distance_curve",
    "distinguishability",
    "first_token_attention",
    "fraction_to_n",
    "gate_statistics",
    "jacobian_norm_curve",
    "jacobian_norms",
    "load_run",
    "massive_activations",
    "metrics",
    "plot_attention_maps",
    "plot_first_token_attention",
    "plot_gate_histogram",
    "plot_jacobian_norm",
    "plot_max_activation",
    "plot_perplexity_vs_length",
    "plot_selectivity_distance",
    "plot_distinguishability",
    "retrieval_accuracy",
    "run_retrieval",
    "sink_rate",
    "softmax_jacobian",
    "softmax_weights",
    "stack_layers",
    "topn_distance",
    "weight_bounds",
    "weights_within_bounds",
]

"""Runs every analysis instrument on a model and writes `analysis.json` and PNG plots.

`analyze_model(model, batches, sink_batches=..., out_dir=...)` works on any
`Transformer` and any batches; `analyze_run(workdir)` restores a training run
and feeds it batches from the run's own data config.

The analysis always runs a float32 copy of the model with `attention_impl="xla"`
(the only path that returns attention probabilities), whatever dtype and
attention kernel the model was trained with.

Batches are dicts of (B, T) arrays as `data.pipeline` yields them (`inputs`,
`positions`, `segment_ids`, and `targets`/`loss_mask` for perplexity). The sink
instruments assume each row starts with a real BOS at position 0: build them
with `data.packing = "windows"` (one segment per row, no padding).

Keys of the result (top-level scalars are what the grid table reads):

- `first_token_attention` (the paper's F-Attn, over `batches`; per layer/head
  under `first_token`), `sink_rate` (Gu et al., eps = 0.3, over `sink_batches`;
  details under `sink`), `max_activation` (M-Act) and
  `massive_activation_count` (details under `activations`);
- gated models only: `gate_score_mean`, `gate_score_median`,
  `gate_score_fraction_below` (< 0.1) and `gate` (per layer, first token vs rest,
  histogram);
- `long_context`: perplexity per RoPE scaling method and length multiple;
- `selectivity`: Mudarisov et al.'s top-N distance and distinguishability per
  layer/head for the last query of the first `selectivity_sequences` rows;
- `jacobian`: softmax-Jacobian norms vs temperature of those queries' real
  attention logits, per layer/head, and the largest ratio norm / bound;
- `plots`: PNG paths relative to the JSON file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gated_attention_jax import losses
from gated_attention_jax import metrics
from gated_attention_jax import rope
from gated_attention_jax.analysis import plots
from gated_attention_jax.analysis import selectivity
from gated_attention_jax.data import pipeline
from gated_attention_jax.training import checkpointing
from gated_attention_jax.transformer import Transformer, TransformerConfig

Batch = Mapping[str, Any]
PathLike = Union[str, pathlib.Path]

SINK_EPS = 0.3
SINK_SEQUENCES = 100
SINK_SEQ_LEN = 64
MULTIPLES = (1, 2, 4, 8)
FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
TEMPERATURES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
BOUND_RTOL = 1e-9


def graphdef_of(cfg: TransformerConfig) -> nnx.GraphDef:
  """The graph of a `Transformer(cfg)` (merge it with a state of the same shapes)."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[0]


def float32_state(model: Transformer) -> nnx.State:
  """The model's state with floating-point arrays cast to float32."""
  return jax.tree.map(
      lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      nnx.state(model))


def analysis_config(cfg: TransformerConfig) -> TransformerConfig:
  """cfg with float32 compute and storage, the "xla" attention path and no remat."""
  return cfg.replace(attention_impl="xla", dtype="float32", param_dtype="float32", remat="none")


@functools.partial(jax.jit, static_argnums=0)
def _intermediates(graphdef: nnx.GraphDef, state: nnx.State, batch: Batch) -> dict:
  model = nnx.merge(graphdef, state)
  return model.forward(batch["inputs"], batch["positions"], batch["segment_ids"],
                       intermediates=True).intermediates


@functools.partial(jax.jit, static_argnums=(0, 1))
def _nll_sum(graphdef: nnx.GraphDef, use_segments: bool, state: nnx.State,
             batch: Batch) -> tuple[jax.Array, jax.Array]:
  nll, _, _ = losses.token_losses(nnx.merge(graphdef, state), batch, use_segments, False)
  mask = batch["loss_mask"]
  return (nll * mask).sum(), mask.sum()


def _forward(graphdef: nnx.GraphDef, state: nnx.State, batch: Batch) -> dict[str, np.ndarray]:
  """Host copies of the intermediates, each stacked over layers: (L, B, ...)."""
  keys = ("inputs", "positions", "segment_ids")
  inter = _intermediates(graphdef, state, {k: jnp.asarray(batch[k]) for k in keys})
  return {name: np.stack([np.asarray(a) for a in per_layer]) for name, per_layer in inter.items()}


def _merge_massive(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Combines massive_activations() of disjoint batches (its medians are per sequence)."""
  per_layer_max = np.max([p["per_layer_max"] for p in parts], axis=0)
  per_layer_count = np.sum([p["per_layer_count"] for p in parts], axis=0)
  return {"max_activation": float(per_layer_max.mean()),
          "per_layer_max": per_layer_max.tolist(),
          "massive_count": int(per_layer_count.sum()),
          "per_layer_count": [int(c) for c in per_layer_count]}


def rope_scaling_for(base: rope.RopeScaling, method: str, multiple: float,
                     train_len: int) -> rope.RopeScaling:
  """RoPE scaling for evaluating at multiple x train_len.

  `RopeScaling(method, factor=multiple, original_max_len=train_len)` with base's
  other fields; plain RoPE for method "none" and for multiple 1, where every
  method reduces to it.
  """
  if method == "none" or multiple == 1:
    return dataclasses.replace(base, method="none", factor=1.0, original_max_len=train_len)
  return dataclasses.replace(base, method=method, factor=float(multiple),
                             original_max_len=train_len)


def long_context_perplexity(model: Transformer, batches_by_multiple: Mapping[int, Iterable[Batch]],
                            *, train_len: int, use_segments: bool,
                            methods: Sequence[str] = rope.ROPE_SCALING_METHODS
                            ) -> dict[str, Any]:
  """Perplexity at each length multiple k (batches of k x train_len) per RoPE method.

  The RoPE scaling is `rope_scaling_for(..., method, k, train_len)`, each
  distinct one evaluated once; the loss is the token-weighted mean cross
  entropy over `loss_mask`, as in training's evaluation (attention masked by
  segment iff `use_segments`).
  Without RoPE only method "none" is evaluated (the others rescale RoPE), and a
  learned position table is not read past its `max_positions` rows: longer
  multiples are left out (`multiples` lists those evaluated).
  Returns `perplexity` and `loss` as {method: {str(k): value}}, `tokens` {str(k): n}.
  """
  cfg = analysis_config(model.config)
  if cfg.position_embedding != "rope":
    methods = [m for m in methods if m == "none"]
  longest = cfg.max_positions if cfg.position_embedding == "learned" else None
  state = float32_state(model)
  batches = {k: list(b) for k, b in batches_by_multiple.items()
             if longest is None or k * train_len <= longest}
  losses: dict[tuple[rope.RopeScaling, int], tuple[float, float]] = {}
  out: dict[str, Any] = {"train_len": train_len, "multiples": sorted(batches),
                         "perplexity": {}, "loss": {}, "tokens": {}}
  for method in methods:
    out["perplexity"][method], out["loss"][method] = {}, {}
    for k in sorted(batches):
      scaling = rope_scaling_for(cfg.rope_scaling, method, k, train_len)
      if (scaling, k) not in losses:
        graphdef = graphdef_of(cfg.replace(rope_scaling=scaling))
        nll, tokens = 0.0, 0.0
        for batch in batches[k]:
          arrays = {name: jnp.asarray(v) for name, v in batch.items()}
          batch_nll, batch_tokens = _nll_sum(graphdef, use_segments, state, arrays)
          nll, tokens = nll + float(batch_nll), tokens + float(batch_tokens)
        losses[scaling, k] = nll / max(tokens, 1.0), tokens
      loss, tokens = losses[scaling, k]
      out["loss"][method][str(k)] = loss
      out["perplexity"][method][str(k)] = math.exp(min(loss, 50.0))
      out["tokens"][str(k)] = int(tokens)
  return out


def _jacobian(logits: np.ndarray, temperatures: Sequence[float]) -> dict[str, Any]:
  """Norms of softmax(logits / T)'s Jacobian vs T for logits (L, B, N, S).

  Returns the jacobian_norm_curve() keys averaged over every row, the same norms
  per layer and head (L, N, F) averaged over B, and the largest ratio of a
  single row's norm to its bound (spectral <= 1/(2T), max |entry| <= 1/(4T)).
  """
  lead = logits.shape[:-1]
  rows = [selectivity.jacobian_norm_curve(row, temperatures)
          for row in logits.reshape(-1, logits.shape[-1])]
  norms = {k: np.stack([r[k] for r in rows]).reshape(*lead, -1)  # (L, B, N, F)
           for k in ("frobenius", "max_abs", "spectral")}
  bounds = rows[0]
  ratio_spectral = float((norms["spectral"] / bounds["spectral_bound"]).max())
  ratio_max_abs = float((norms["max_abs"] / bounds["max_abs_bound"]).max())
  return {"temperatures": bounds["temperatures"].tolist(),
          **{k: v.mean(axis=(0, 1, 2)).tolist() for k, v in norms.items()},
          "spectral_bound": bounds["spectral_bound"].tolist(),
          "max_abs_bound": bounds["max_abs_bound"].tolist(),
          **{f"{k}_per_head": v.mean(axis=1).tolist() for k, v in norms.items()},
          "max_ratio_spectral_to_bound": ratio_spectral,
          "max_ratio_max_abs_to_bound": ratio_max_abs,
          "within_bounds": bool(max(ratio_spectral, ratio_max_abs) <= 1 + BOUND_RTOL)}


def _weight_bounds(probs: np.ndarray, queries: np.ndarray, keys: np.ndarray) -> dict[str, Any]:
  """Mudarisov et al.'s bound on each head's last-query attention weights.

  probs (L, B, N, T, S), queries (L, B, T, N, H), keys (L, B, S, K, H) from windows
  whose last query sees every key. The logits are q·k/sqrt(H), so T = sqrt(H) in
  `selectivity.weight_bounds`; every weight must lie between its row's bounds
  (ratio to the lower bound >= 1, to the upper bound <= 1).
  """
  group = probs.shape[2] // keys.shape[3]
  alpha = probs[:, :, :, -1, :].astype(np.float64)  # (L, B, N, S)
  q = queries[:, :, -1].astype(np.float64)  # (L, B, N, H)
  k = np.repeat(keys, group, axis=3).transpose(0, 1, 3, 2, 4).astype(np.float64)
  lower, upper = selectivity.weight_bounds(q, k, math.sqrt(q.shape[-1]))
  to_upper = float((alpha / upper[..., None]).max())
  to_lower = float((alpha / lower[..., None]).min())
  return {"max_ratio_to_upper": to_upper, "min_ratio_to_lower": to_lower,
          "log_bound_width_mean": float(np.log(upper / lower).mean()),
          "within_bounds": bool(to_upper <= 1 + BOUND_RTOL and to_lower >= 1 - BOUND_RTOL)}


def write_json(data: Mapping[str, Any], path: PathLike) -> pathlib.Path:
  """Writes data as JSON atomically (a temporary file renamed over the target)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(data, indent=2))
  os.replace(tmp, path)
  return path


def analyze_model(model: Transformer, batches: Iterable[Batch], *,
                  sink_batches: Iterable[Batch], out_dir: PathLike,
                  json_path: Optional[PathLike] = None,
                  long_context: Optional[Mapping[int, Iterable[Batch]]] = None,
                  train_len: Optional[int] = None, use_segments: bool = False,
                  rope_methods: Sequence[str] = rope.ROPE_SCALING_METHODS,
                  map_layers: Optional[Sequence[int]] = None, map_heads: Sequence[int] = (0,),
                  selectivity_sequences: int = 4,
                  fractions: Sequence[float] = FRACTIONS,
                  temperatures: Sequence[float] = TEMPERATURES,
                  label: Optional[str] = None,
                  extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """Runs every instrument on `model` (see the module docstring); writes PNGs and JSON.

  Args:
    model: any Transformer; analysed as a float32 "xla" copy.
    batches: BOS-first windows, e.g. at the training length, for F-Attn, M-Act,
      gate statistics, attention maps (row 0 of the first batch) and
      selectivity / Jacobian (first `selectivity_sequences` rows of the first batch).
    sink_batches: BOS-first windows for the sink rate (Gu et al.: 100 x 64).
    out_dir: folder for the PNGs.
    json_path: where to write the JSON (default out_dir/analysis.json).
    long_context: {k: batches of k x train_len} for the perplexity-vs-length
      study with `rope_methods` (skipped when None; needs `train_len`).
    use_segments: mask attention by segment_ids in the perplexity evaluation
      (as training does with data.packing "segments").
    map_layers, map_heads: attention maps drawn (default every layer, head 0).
    label: name in plot legends (default "gated" / "baseline").
    extra: more top-level entries for the JSON (e.g. the run's step).
  Returns:
    The dict written to JSON.
  """
  cfg = analysis_config(model.config)
  graphdef, state = graphdef_of(cfg), float32_state(model)
  label = label or ("gated" if cfg.gate.enabled else "baseline")
  out_dir = pathlib.Path(out_dir)
  json_path = pathlib.Path(json_path) if json_path is not None else out_dir / "analysis.json"

  first_cols, query_masks, massive, gates, first = [], [], [], [], None
  for batch in batches:
    inter = _forward(graphdef, state, batch)
    if first is None:
      first = inter
    first_cols.append(inter["attention_probs"][..., :1])  # (L, B, N, T, 1): F-Attn reads key 0
    query_masks.append(np.asarray(batch["segment_ids"]) > 0)
    massive.append(metrics.massive_activations(inter["hidden_states"]))
    if "gate_scores" in inter:
      gates.append(inter["gate_scores"])
  if first is None:
    raise ValueError("batches is empty")
  sink_cols = []
  for batch in sink_batches:
    if (np.asarray(batch["segment_ids"]) == 0).any():
      raise ValueError("sink_batches must be full windows without padding (too few "
                       "validation tokens?): the sink rate averages over every query")
    sink_cols.append(_forward(graphdef, state, batch)["attention_probs"][..., :1])
  if not sink_cols:
    raise ValueError("sink_batches is empty")

  f_attn = metrics.first_token_attention(np.concatenate(first_cols, axis=1),
                                         np.concatenate(query_masks))
  sinks = metrics.sink_rate(np.concatenate(sink_cols, axis=1), eps=SINK_EPS)
  acts = _merge_massive(massive)
  result: dict[str, Any] = {
      **(extra or {}), "label": label, "gate": cfg.gate.describe(),
      "first_token_attention": f_attn["first_token_attention"],
      "sink_rate": sinks["sink_rate"],
      "max_activation": acts["max_activation"],
      "massive_activation_count": acts["massive_count"],
  }
  pngs: dict[str, pathlib.Path] = {
      "first_token_attention": plots.plot_first_token_attention(
          {label: f_attn["per_layer"]}, out_dir / "first_token_attention.png"),
      "max_activation": plots.plot_max_activation(
          {label: acts["per_layer_max"]}, out_dir / "max_activation.png"),
  }
  gate_stats = metrics.gate_statistics(
      [np.concatenate([g[layer] for g in gates]) for layer in range(cfg.num_layers)]
      if gates else None)
  if gate_stats is not None:
    result.update(gate_score_mean=gate_stats["gate_score_mean"],
                  gate_score_median=gate_stats["gate_score_median"],
                  gate_score_fraction_below=gate_stats["fraction_below"])
    pngs["gate_histogram"] = plots.plot_gate_histogram(
        {label: gate_stats["histogram"]}, out_dir / "gate_histogram.png")

  probs, values = first["attention_probs"], first["values"]  # (L, B, N, T, S), (L, B, S, K, H)
  for layer in (range(cfg.num_layers) if map_layers is None else map_layers):
    for head in map_heads:
      pngs[f"attention_map_layer{layer}_head{head}"] = plots.plot_attention_maps(
          {label: probs}, out_dir / f"attention_map_layer{layer}_head{head}.png", layer, head)

  rows = slice(0, selectivity_sequences)
  select = selectivity.attention_selectivity(probs[:, rows], values[:, rows], fractions)
  select["num_sequences"] = int(probs[:, rows].shape[1])
  pngs["selectivity_distance"] = plots.plot_selectivity_distance(
      {label: select}, out_dir / "selectivity_distance.png")
  pngs["distinguishability"] = plots.plot_distinguishability(
      {label: select}, out_dir / "distinguishability.png")
  # The last query's logits q.k/sqrt(H) equal log p up to a per-row constant,
  # which softmax ignores; probabilities that underflowed to 0 become the float32 minimum.
  last = probs[:, rows, :, -1, :].astype(np.float64)
  jac = _jacobian(np.log(np.maximum(last, np.finfo(np.float32).tiny)), temperatures)
  pngs["jacobian_norm"] = plots.plot_jacobian_norm(jac, out_dir / "jacobian_norm.png")
  bounds = _weight_bounds(probs[:, rows], first["queries"][:, rows], first["keys"][:, rows])

  result.update(
      first_token={**f_attn, "num_sequences": int(sum(c.shape[1] for c in first_cols)),
                   "seq_len": int(probs.shape[3])},
      sink={**sinks, "num_sequences": int(sum(c.shape[1] for c in sink_cols)),
            "seq_len": int(sink_cols[0].shape[3])},
      activations=acts, selectivity=select, jacobian=jac, weight_bounds=bounds)
  if gate_stats is not None:
    result["gate_statistics"] = gate_stats
  if long_context is not None:
    if train_len is None:
      raise ValueError("long_context needs train_len")
    lc = long_context_perplexity(model, long_context, train_len=train_len,
                                 use_segments=use_segments, methods=rope_methods)
    result["long_context"] = lc
    pngs["perplexity_vs_length"] = plots.plot_perplexity_vs_length(
        {m: {float(k): v for k, v in by_k.items()} for m, by_k in lc["perplexity"].items()},
        out_dir / "perplexity_vs_length.png")
  result["plots"] = {name: os.path.relpath(p, json_path.parent) for name, p in pngs.items()}
  write_json(result, json_path)
  return result


# The read-only, parameters-only load of a run folder (under its public name).
load_run = checkpointing.load_model


def analyze_run(workdir: PathLike, step: Optional[int] = None, *,
                batch_size: Optional[int] = None, num_batches: int = 2,
                long_context_batches: int = 2, multiples: Sequence[int] = MULTIPLES,
                **kwargs: Any) -> dict[str, Any]:
  """Analyses a run folder: writes workdir/analysis.json and PNGs in workdir/analysis/.

  Data, all from the run's validation split:
    - F-Attn, M-Act, gates, maps, selectivity: `num_batches` batches of
      `batch_size` windows (data.packing forced to "windows") at the training length;
    - sink rate: 100 windows of 64 tokens ("windows" packing; fewer tokens if a learned
      position table is shorter);
    - long context: `long_context_batches` batches at k x the training length
      for k in `multiples`, packed as in training, of max(1, batch_size // k)
      rows (about the same tokens at every length); at k = 1 they are training's
      evaluation batches, so method "none" there is training's eval perplexity.
  batch_size defaults to the run's train.batch_size; kwargs go to analyze_model.
  """
  workdir = pathlib.Path(workdir)
  config, restored_step, model = load_run(workdir, step)
  data_cfg = config.data
  batch_size = batch_size or config.train.batch_size
  windows = ml_collections.ConfigDict(data_cfg.to_dict())
  windows.packing = "windows"
  train_len = data_cfg.seq_len
  sink_len = SINK_SEQ_LEN  # a learned position table has no rows past max_positions
  if model.config.position_embedding == "learned":
    sink_len = min(sink_len, model.config.max_positions)
  return analyze_model(
      model,
      pipeline.make_eval_batches(windows, batch_size=batch_size, num_batches=num_batches),
      sink_batches=pipeline.make_eval_batches(windows, batch_size=SINK_SEQUENCES,
                                              num_batches=1, seq_len=sink_len),
      out_dir=workdir / "analysis", json_path=workdir / "analysis.json",
      long_context={k: pipeline.make_eval_batches(data_cfg, batch_size=max(1, batch_size // k),
                                                  num_batches=long_context_batches,
                                                  seq_len=k * train_len)
                    for k in multiples},
      train_len=train_len, use_segments=data_cfg.packing == "segments",
      extra={"workdir": str(workdir), "step": restored_step}, **kwargs)


def compare_runs(workdirs: Sequence[PathLike], out_dir: PathLike) -> dict[str, pathlib.Path]:
  """Overlays the analysis.json of several analysed runs (e.g. gated vs baseline) in PNGs.

  Each run is labelled by its folder name. Draws first-token attention and max
  activation per layer, gate histograms (gated runs), top-N distance vs N/L,
  and perplexity vs length ("run method" lines). Returns {plot name: path}.
  """
  runs = {pathlib.Path(w).name: json.loads((pathlib.Path(w) / "analysis.json").read_text())
          for w in workdirs}
  out_dir = pathlib.Path(out_dir)
  pngs = {
      "first_token_attention": plots.plot_first_token_attention(
          {k: r["first_token"]["per_layer"] for k, r in runs.items()},
          out_dir / "first_token_attention.png"),
      "max_activation": plots.plot_max_activation(
          {k: r["activations"]["per_layer_max"] for k, r in runs.items()},
          out_dir / "max_activation.png"),
      "selectivity_distance": plots.plot_selectivity_distance(
          {k: r["selectivity"] for k, r in runs.items()}, out_dir / "selectivity_distance.png"),
      "distinguishability": plots.plot_distinguishability(
          {k: r["selectivity"] for k, r in runs.items()}, out_dir / "distinguishability.png"),
  }
  gated = {k: r["gate_statistics"]["histogram"] for k, r in runs.items() if "gate_statistics" in r}
  if gated:
    pngs["gate_histogram"] = plots.plot_gate_histogram(gated, out_dir / "gate_histogram.png")
  lengths = {f"{k} {m}": {float(n): v for n, v in by_k.items()}
             for k, r in runs.items() if "long_context" in r
             for m, by_k in r["long_context"]["perplexity"].items()}
  if lengths:
    pngs["perplexity_vs_length"] = plots.plot_perplexity_vs_length(
        lengths, out_dir / "perplexity_vs_length.png")
  return pngs

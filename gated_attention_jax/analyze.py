"""Analyses a trained run: `python -m gated_attention_jax.analyze --workdir=DIR [--step=N]`.

Writes DIR/analysis.json and PNG plots in DIR/analysis/ (see
`gated_attention_jax.analysis.run_analysis` for what each key means). The model
is analysed in float32 with attention_impl "xla", however it was trained.

`--retrieval` adds passkey retrieval (`gated_attention_jax.analysis.retrieval`):
DIR/retrieval.json; `--retrieval_only` runs nothing else.

Gated vs ungated: analyse both runs, then pass `--compare=OTHER_DIR[,...]` to
overlay their curves in DIR/analysis/compare/.
"""

from __future__ import annotations

import json

from absl import app, flags

from gated_attention_jax import console
from gated_attention_jax import rope
from gated_attention_jax.analysis import retrieval
from gated_attention_jax.analysis import run_analysis
from gated_attention_jax.training import checkpointing

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (config.json, checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None,
                                   "Rows per batch (default: the run's train.batch_size).")
_NUM_BATCHES = flags.DEFINE_integer(
    "num_batches", 2, "Batches of training-length windows for F-Attn, M-Act and gate statistics.")
_LONG_BATCHES = flags.DEFINE_integer("long_context_batches", 2,
                                     "Batches evaluated at each length multiple.")
_MULTIPLES = flags.DEFINE_list("multiples", [str(k) for k in run_analysis.MULTIPLES],
                               "Evaluation lengths as multiples of the training length.")
_METHODS = flags.DEFINE_list("rope_methods", list(rope.ROPE_SCALING_METHODS),
                             "RoPE scaling methods for the long-context study.")
_MAP_LAYERS = flags.DEFINE_list("map_layers", None,
                                "Layers whose attention maps are drawn (default: all).")
_MAP_HEADS = flags.DEFINE_list("map_heads", ["0"], "Heads whose attention maps are drawn.")
_COMPARE = flags.DEFINE_list(
    "compare", None, "Other analysed runs to overlay with this one in DIR/analysis/compare/.")
_SELECTIVITY_SEQUENCES = flags.DEFINE_integer(
    "selectivity_sequences", 4, "Sequences for the selectivity and softmax-Jacobian probes.")

_RETRIEVAL = flags.DEFINE_bool(
    "retrieval", False, "Also run passkey retrieval (greedy accuracy per length x depth x RoPE"
    " method, at --multiples and --rope_methods); writes DIR/retrieval.json.")
_RETRIEVAL_ONLY = flags.DEFINE_bool(
    "retrieval_only", False, "Run only the passkey retrieval (implies --retrieval).")
_RETRIEVAL_KEYS = flags.DEFINE_integer("retrieval_keys", 4, "Passkeys per retrieval cell.")
_RETRIEVAL_DEPTHS = flags.DEFINE_list("retrieval_depths", [str(d) for d in retrieval.DEPTHS],
                                      "Needle depths (fractions of the filler before it).")

SCALARS = ("first_token_attention", "sink_rate", "max_activation", "massive_activation_count",
           "gate_score_mean")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_libraries()
  with console.one_line_errors(ValueError, FileNotFoundError, checkpointing.CheckpointError):
    summary = _analyze()
  print(json.dumps(summary, indent=2))


def _analyze() -> dict:
  """Runs what the flags ask for; returns the summary printed at the end."""
  summary = {}
  if not _RETRIEVAL_ONLY.value:
    result = run_analysis.analyze_run(
        _WORKDIR.value, _STEP.value, batch_size=_BATCH_SIZE.value,
        num_batches=_NUM_BATCHES.value, long_context_batches=_LONG_BATCHES.value,
        multiples=[int(k) for k in _MULTIPLES.value], rope_methods=_METHODS.value,
        map_layers=None if _MAP_LAYERS.value is None else [int(l) for l in _MAP_LAYERS.value],
        map_heads=[int(h) for h in _MAP_HEADS.value],
        selectivity_sequences=_SELECTIVITY_SEQUENCES.value)
    if _COMPARE.value:
      run_analysis.compare_runs([_WORKDIR.value, *_COMPARE.value],
                                f"{_WORKDIR.value}/analysis/compare")
    summary = {k: result[k] for k in SCALARS if k in result}
    if "long_context" in result:
      summary["perplexity"] = result["long_context"]["perplexity"]
  if _RETRIEVAL.value or _RETRIEVAL_ONLY.value:
    summary["retrieval_accuracy"] = retrieval.run_retrieval(
        _WORKDIR.value, _STEP.value, multiples=[int(k) for k in _MULTIPLES.value],
        methods=_METHODS.value, depths=[float(d) for d in _RETRIEVAL_DEPTHS.value],
        num_keys=_RETRIEVAL_KEYS.value)["mean"]
  return summary


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)

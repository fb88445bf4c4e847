"""Where a Bigram-Backcopy model's attention goes: BOS, the previous token, itself, or triggers.

    python experiments/sinks/inspect_sink.py --workdir=runs/sinks/testbed/baseline/seed1

For the run's newest checkpoint on validation sequences of the task, per layer and
for trigger and non-trigger queries separately: the mean attention on key 0 (BOS),
on the previous token, on the query itself and on trigger keys, and the loss
beside the task's Bayes-optimal loss (0 after a trigger, the chain's entropy
elsewhere). A head that has gone dormant on non-trigger queries shows most of their
attention on BOS (a first-token sink) or on some other always-present keys.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from gated_attention_jax.analysis import run_analysis  # pylint: disable=g-import-not-at-top,wrong-import-position
from gated_attention_jax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position


def inspect(workdir: pathlib.Path, num_sequences: int = 32) -> dict:
  config, step, model = run_analysis.load_run(workdir)
  if config.data.corpus != "bigram_backcopy":
    raise ValueError(f"{workdir} was trained on data.corpus={config.data.corpus!r}, not the"
                     " Bigram-Backcopy task")
  source = pipeline.make_eval_batches(config.data, batch_size=num_sequences, num_batches=1)[0]
  task = pipeline.synthetic_source(config.data, "validation", config.data.seq_len)
  inputs, targets = source["inputs"], source["targets"]
  out = model.forward(jnp.asarray(inputs), jnp.asarray(source["positions"]), intermediates=True)
  logits, inter = out.logits, out.intermediates
  nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), targets[..., None], -1)[..., 0]
  trigger = task.trigger_mask(inputs)
  ordinary = ~trigger & (inputs < task.stats.vocab)
  p = task.stats.transitions
  entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
  out = {"step": step, "loss": float(nll.mean()),
         "bayes_loss": float(entropy[inputs[ordinary]].sum() / inputs.size),
         "loss_after_triggers": float(nll[trigger].mean()),
         "loss_elsewhere": float(nll[~trigger].mean()), "layers": []}
  t = np.arange(inputs.shape[1])
  key_is_trigger = trigger[:, None, None, :]
  for probs in inter["attention_probs"]:
    probs = np.asarray(probs, np.float64)  # (B, N, T, S)
    prev = np.concatenate([np.zeros_like(probs[:, :, :1, 0]), probs[:, :, t[1:], t[1:] - 1]], -1)
    parts = {"first_key": probs[..., 0], "previous_token": prev, "itself": probs[:, :, t, t],
             "trigger_keys": (probs * key_is_trigger).sum(-1)}
    layer = {}
    for name, queries in (("trigger_queries", trigger), ("other_queries", ~trigger)):
      mask = np.broadcast_to(queries[:, None], parts["first_key"].shape)
      layer[name] = {k: float(v[mask].mean()) for k, v in parts.items()}
    out["layers"].append(layer)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, type=pathlib.Path)
  parser.add_argument("--num_sequences", default=32, type=int)
  args = parser.parse_args()
  print(json.dumps(inspect(args.workdir, args.num_sequences), indent=1))


if __name__ == "__main__":
  main()

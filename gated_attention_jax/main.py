"""Runs an experiment: `python -m gated_attention_jax.main --config=configs/default.py --workdir=DIR`.

Overrides: `--config.train.num_steps=1000`, `--config.gate.position=none`, ...
(the config is locked: a misspelt field is an error). Multi-host: set
`--distributed` (Cloud TPU / SLURM auto-detection) or pass
`--coordinator_address`, `--num_processes`, `--process_id`.
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from gated_attention_jax import distributed
from gated_attention_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, metrics).")
_STOP_AT = flags.DEFINE_integer("stop_at_step", None,
                                "End after this step with a checkpoint (resume later).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize_from_flags()
  logging.info("JAX %s, %d processes, %d devices (%s)", jax.__version__, jax.process_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  try:
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                       stop_at_step=_STOP_AT.value)
  except (ValueError, FloatingPointError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print({k: v for k, v in summary.items()})


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)

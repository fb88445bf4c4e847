"""Runs an experiment: `python -m gated_attention_jax.main --config=configs/default.py --workdir=DIR`.

Overrides: `--config.train.num_steps=1000`, `--config.gate.position=none`, ...
(the config is locked: a misspelt field is an error). Rerunning in the same
`--workdir` resumes (only `experiment.RESUMABLE` fields may differ);
`--overwrite` deletes that run and starts over. INFO logs and the libraries'
logs (orbax, ...) are off unless `--verbosity=0` (or higher) is given. Multi-host: set `--distributed`
(Cloud TPU / SLURM auto-detection) or pass `--coordinator_address`,
`--num_processes`, `--process_id`.
"""

from __future__ import annotations

from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from gated_attention_jax import console
from gated_attention_jax.training import checkpointing
from gated_attention_jax.training import distributed
from gated_attention_jax.training import run_folder
from gated_attention_jax.training import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, metrics).")
_STOP_AT = flags.DEFINE_integer("stop_at_step", None,
                                "End after this step with a checkpoint (resume later).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Delete the run already in --workdir and start over.")


def format_summary(summary: dict[str, Any], workdir: str) -> str:
  """The end-of-run block: state, step, evaluation, parameters, where the files are."""
  state = ("finished" if summary["finished"] else
           "preempted (rerun to resume)" if summary["preempted"] else "stopped (rerun to resume)")
  lines = [f"run {state} at step {summary['step']}/{summary['num_steps']}"]
  if "eval_loss" in summary:
    lines.append(f"  eval loss {summary['eval_loss']:.4f}  perplexity"
                 f" {summary['eval_perplexity']:.2f}")
  active = summary.get("active_params", summary["num_params"])
  lines.append(f"  parameters {summary['num_params']:,} ({summary['gate_params']:,} in gates,"
               f" {summary['gate']})" + (f", {active:,} active per token"
                                          if active != summary["num_params"] else ""))
  lines.append(f"  files in {workdir}: metrics.jsonl, summary.json, checkpoints/, tensorboard/")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_libraries()
  distributed.initialize_from_flags()
  logging.info("JAX %s, %d processes, %d devices (%s)", jax.__version__, jax.process_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  try:
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                       stop_at_step=_STOP_AT.value, overwrite=_OVERWRITE.value)
  except (ValueError, FloatingPointError, run_folder.RunFolderError,
          checkpointing.CheckpointError) as e:
    console.fail(str(e))
  except OSError as e:
    disk = run_folder.disk_error(e)
    if disk is None:
      raise
    console.fail(f"{run_folder.describe_disk_error(disk, 'writing the run folder')}; rerun to"
                 " resume from the last checkpoint")
  if jax.process_index() == 0:
    print(format_summary(summary, _WORKDIR.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)

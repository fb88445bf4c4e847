"""Orbax checkpoints of a training run: model, optimizer state, step, data iterator, config.

Layout: `DIR/checkpoints/<step>/{state,data,config}`. Orbax writes each step to a
temporary folder and renames it when complete, so a crash never leaves a
half-written checkpoint that looks finished. `restore_latest` falls back to
the previous step, with a warning, when the newest one cannot be read.

There is no separate RNG state to save: training has no stochastic layers
(no dropout), parameters are initialised from `train.seed`, and the data order
is fully given by the seed and the saved iterator position, which is why a
resumed run reproduces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional

import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Saves and restores training checkpoints, keeping the newest `keep`."""

  def __init__(self, workdir: str | pathlib.Path, keep: int):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data", "config"))

  def save(self, step: int, *, state: Any, data_state: dict, config_json: dict) -> None:
    """Writes a checkpoint for `step` and waits until it is on disk."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_json)), force=True)
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, data iterator state) of `step`, laid out as `abstract_state` says.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct` with shardings: the
    restored arrays land on those shardings, whatever mesh saved them.
    """
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def restore_latest(self, abstract_state: Any,
                     step: Optional[int] = None) -> Optional[tuple[int, Any, dict]]:
    """Newest readable checkpoint (or `step`'s) as (step, state, data state); None if none."""
    candidates = [step] if step is not None else list(reversed(self.steps()))
    for s in candidates:
      try:
        state, data_state = self.restore(s, abstract_state)
        return s, state, data_state
      except Exception as e:  # pylint: disable=broad-except
        if step is not None:
          raise
        logging.warning("checkpoint at step %d in %s is unreadable (%s: %s); trying the"
                        " previous one", s, self.directory, type(e).__name__, e)
    return None

  def close(self) -> None:
    self.manager.close()

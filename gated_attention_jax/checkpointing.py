"""Orbax checkpoints of a training run: model, optimizer state, step, data iterator, config.

Layout: `DIR/checkpoints/<step>/{state,data,config,checksums}`. Orbax writes each
step to a temporary folder and renames it when complete, so a crash never leaves
a half-written checkpoint that looks finished. `checksums` holds a checksum of
every saved array and of the data-iterator state, computed from the values in
memory at save and compared with what is read back at restore.

`restore_latest` treats a checkpoint that cannot be read, or whose checksums do
not match, as damaged: it moves it to `DIR/checkpoints/quarantine/<step>` with
one warning and tries the previous one. Nothing is deleted here but the
temporary folder of a save that failed, and, by orbax's `max_to_keep`,
checkpoints older than the newest `keep` this run has saved.

There is no separate RNG state to save: training has no stochastic layers
(no dropout), parameters are initialised from `train.seed`, and the data order
is fully given by the seed and the saved iterator position, which is why a
resumed run reproduces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
import shutil
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

QUARANTINE = "quarantine"


class CheckpointError(RuntimeError):
  """No checkpoint of the run can be resumed from."""


class DamagedCheckpoint(ValueError):
  """A checkpoint's checksums do not match what was read back."""


def _array_checksum(x: jax.Array) -> jax.Array:
  """(sum, position-weighted sum) of the array's 32-bit words, mod 2**32.

  Integer sums do not depend on how the array is sharded, and an odd weight per
  position makes every single-bit flip change the second sum.
  """
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  elif x.dtype.itemsize >= 4:
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  else:
    words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
  words = words.reshape(-1).astype(jnp.uint32)
  weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
  return jnp.stack([words.sum(dtype=jnp.uint32), (words * weights).sum(dtype=jnp.uint32)])


@functools.lru_cache(maxsize=8)
def _checksums_fn(out_sharding: Optional[jax.sharding.Sharding]) -> Callable:
  return jax.jit(lambda xs: [_array_checksum(x) for x in xs], out_shardings=out_sharding)


def state_checksums(state: Any) -> dict[str, str]:
  """{tree path: hex checksum} of every array in `state` (any sharding, any process count)."""
  leaves = jax.tree_util.tree_leaves_with_path(state)
  sharding = leaves[0][1].sharding
  replicated = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
                if isinstance(sharding, jax.sharding.NamedSharding) else None)
  sums = _checksums_fn(replicated)([x for _, x in leaves])
  return {jax.tree_util.keystr(path): "".join(f"{int(w):08x}" for w in np.asarray(s))
          for (path, _), s in zip(leaves, sums)}


def json_checksum(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def directory_bytes(path: pathlib.Path) -> int:
  """Disk space the files under `path` take (allocated blocks, as `du` counts)."""
  return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


class Checkpointer:
  """Saves and restores training checkpoints, keeping the newest `keep`."""

  def __init__(self, workdir: str | pathlib.Path, keep: int):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True),
        item_names=("state", "data", "config", "checksums"))

  def save(self, step: int, *, state: Any, data_state: dict, config_json: dict) -> None:
    """Writes a checkpoint for `step` with its checksums and waits until it is on disk."""
    checksums = {"state": state_checksums(state), "data": json_checksum(data_state)}
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(config_json),
          checksums=ocp.args.JsonSave(checksums)), force=True)
      self.manager.wait_until_finished()
    except BaseException:
      self._discard_unfinished(step)
      raise

  def _discard_unfinished(self, step: int) -> None:
    """Removes the temporary folder of `step`'s failed save (frees what it took)."""
    if jax.process_index() == 0:
      for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def size(self, step: int) -> int:
    """Bytes on disk of `step`'s checkpoint."""
    return directory_bytes(self.directory / str(step))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, data iterator state) of `step`, laid out as `abstract_state` says.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct` with shardings: the
    restored arrays land on those shardings, whatever mesh saved them. Raises
    DamagedCheckpoint when the checksums saved with it do not match.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore()}
    verified = (self.directory / str(step) / "checksums").is_dir()
    if verified:
      items["checksums"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if not verified:
      logging.warning("checkpoint at step %d has no checksums (saved by an older version):"
                      " not verified", step)
      return restored["state"], restored["data"]
    saved = restored["checksums"]
    actual = state_checksums(restored["state"])
    bad = sorted(k for k in actual if saved["state"].get(k) != actual[k])
    if bad or set(saved["state"]) != set(actual):
      raise DamagedCheckpoint(f"checksum mismatch in {bad[:3] or 'the array list'}")
    if saved["data"] != json_checksum(restored["data"]):
      raise DamagedCheckpoint("checksum mismatch in the data-iterator state")
    return restored["state"], restored["data"]

  def restore_latest(self, abstract_state: Any, step: Optional[int] = None,
                     accept_data: Callable[[dict], None] = lambda d: None
                     ) -> Optional[tuple[int, Any, dict]]:
    """Newest intact checkpoint (or `step`'s) as (step, state, data state); None if none.

    Without `step`, a checkpoint that fails to read, to verify, or to
    `accept_data` (e.g. the data iterator's `set_state`) is quarantined and the
    previous one tried; if every one is, CheckpointError. With `step`, its
    checkpoint or the error.
    """
    if step is not None:
      state, data_state = self.restore(step, abstract_state)
      accept_data(data_state)
      return step, state, data_state
    steps = self.steps()
    for candidate in reversed(steps):
      try:
        state, data_state = self.restore(candidate, abstract_state)
        accept_data(data_state)
        ok = True
      except (ValueError, KeyError, TypeError, IndexError, OSError, RuntimeError) as e:
        reason, ok = f"{type(e).__name__}: {str(e)[:300]}", False
      if _all_processes(ok):
        return candidate, state, data_state
      self.quarantine(candidate, reason if not ok else "unreadable on another process")
    if steps:
      raise CheckpointError(
          f"every checkpoint in {self.directory} (steps {steps}) is damaged; they were moved"
          f" to {self.directory / QUARANTINE}. Nothing was resumed; move one back, or start"
          " over with --overwrite")
    return None

  def quarantine(self, step: int, reason: str) -> None:
    """Moves `step`'s checkpoint to `checkpoints/quarantine/<step>[.n]` (process 0 moves)."""
    if jax.process_index() == 0:
      base = self.directory / QUARANTINE / str(step)
      target, n = base, 0
      while target.exists():
        n += 1
        target = base.with_name(f"{step}.{n}")
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.directory / str(step)), target)
      logging.warning("checkpoint at step %d is damaged (%s): moved to %s", step, reason, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"quarantine {step}")
    self.manager.reload()

  def close(self) -> None:
    self.manager.close()


def _all_processes(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))

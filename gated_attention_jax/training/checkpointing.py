"""Orbax checkpoints of a training run: model, optimizer state, step, data iterator, config.

Layout: `DIR/checkpoints/<step>/{state,data,config,checksums}`. Orbax writes each
step to a temporary folder and renames it when complete, so a crash never leaves
a half-written checkpoint that looks finished. `checksums` holds a checksum of
every saved array and of the data-iterator state, computed from the values in
memory at save and compared with what is read back at restore.

`Checkpointer.restore_latest` (the resume path) treats any failure to read or
verify a checkpoint, whatever the storage stack raises, as damage: it moves the
checkpoint to `DIR/checkpoints/quarantine/<step>` with one warning line (the
traceback goes to `DIR/checkpoints/quarantine/damage.log`) and tries the previous
one. Anything else in `checkpoints/` that is not a checkpoint (a file where a step
folder would be, a stray file) is set aside there too, so a save never overwrites
it. Nothing is deleted here but the temporary folder of a save that failed, and,
by orbax's `max_to_keep`, checkpoints older than the newest `keep` this run has
saved.

`load_model(run_dir)` is the read-only load: the parameters of the newest intact
checkpoint (or a given step's) as a model, without the optimizer state; it writes,
moves and quarantines nothing (a damaged checkpoint is skipped with one warning).
Both read checkpoints saved under parameter names that have since changed (`renames`).

There is no separate RNG state to save: training has no stochastic layers
(no dropout), parameters are initialised from `train.seed`, and the data order
is fully given by the seed and the saved iterator position, which is why a
resumed run reproduces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import datetime
import functools
import gc
import hashlib
import json
import logging as py_logging
import os
import pathlib
import shutil
import sys
import traceback
import warnings
from typing import Any, Callable, Optional, TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from gated_attention_jax import sharding
from gated_attention_jax.training import experiment, renames
from gated_attention_jax.transformer import Transformer

QUARANTINE = "quarantine"
DAMAGE_LOG = "damage.log"
ITEMS = ("state", "data", "config", "checksums")
# What orbax itself may keep in the checkpoints folder besides step folders.
_ORBAX_ENTRIES = ("metadata", "descriptor", "_ROOT_METADATA")
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
T = TypeVar("T")


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
  first = leaves[0][1].sharding
  replicated = (jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
                if isinstance(first, jax.sharding.NamedSharding) else None)
  sums = _checksums_fn(replicated)([x for _, x in leaves])
  return {jax.tree_util.keystr(path): "".join(f"{int(w):08x}" for w in np.asarray(s))
          for (path, _), s in zip(leaves, sums)}


def json_checksum(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def directory_bytes(path: pathlib.Path) -> int:
  """Disk space the files under `path` take (allocated blocks, as `du` counts)."""
  return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def describe_error(e: BaseException) -> str:
  """One line: the type and first message line (at most 200 chars) of `e`'s root cause.

  orbax wraps tensorstore's read errors (which name the array and the file) in a
  bare `Exception` whose own message is a repr; the cause says what is wrong.
  """
  while e.__cause__ is not None:
    e = e.__cause__
  lines = str(e).strip().splitlines()
  first = lines[0].strip() if lines else ""
  if len(first) > 200:
    first = first[:197] + "..."
  return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _damage_reason(error: Optional[Exception]) -> str:
  """`describe_error(error)`, or why a step read here counts as damaged (None: elsewhere)."""
  return describe_error(error) if error is not None else "unreadable on another process"


def _from_orbax_read(tb: Any, obj: Any = None) -> bool:
  """Whether a traceback (or a coroutine `obj`) comes from orbax / tensorstore / asyncio."""
  code = getattr(obj, "cr_code", None)
  files = [code.co_filename] if code is not None else []
  while tb is not None:
    files.append(tb.tb_frame.f_code.co_filename)
    tb = tb.tb_next
  markers = (f"{os.sep}orbax{os.sep}", f"{os.sep}asyncio{os.sep}", f"{os.sep}tensorstore")
  return any(m in f for f in files for m in markers)


def _contain_read_leftovers() -> None:
  """Keeps the debris of failed checkpoint reads off the console (installed once).

  When one array read fails, orbax's event loop closes while other reads are in
  flight: their completion callbacks then raise "Event loop is closed", their
  coroutines are dropped unawaited and their futures' errors are never retrieved,
  reported (dozens of tracebacks) through `sys.unraisablehook`, the "asyncio"
  logger and a RuntimeWarning, long after the failure itself was caught. They go
  to the INFO log instead.
  """
  previous = sys.unraisablehook
  if getattr(previous, "contains_read_leftovers", False):
    return

  def hook(unraisable: Any) -> None:
    if _from_orbax_read(unraisable.exc_traceback, unraisable.object):
      logging.info("left over from a failed checkpoint read: %s", "".join(
          traceback.format_exception(unraisable.exc_type, unraisable.exc_value,
                                     unraisable.exc_traceback)))
    else:
      previous(unraisable)

  def unretrieved(record: py_logging.LogRecord) -> bool:
    """False (drop) for an orbax read's error that asyncio found never retrieved."""
    if record.exc_info and _from_orbax_read(record.exc_info[2]):
      logging.info("left over from a failed checkpoint read: %s", record.getMessage())
      return False
    return True

  hook.contains_read_leftovers = True
  sys.unraisablehook = hook
  py_logging.getLogger("asyncio").addFilter(unretrieved)
  warnings.filterwarnings("ignore", message=r"coroutine '_read_\w*' was never awaited",
                          category=RuntimeWarning)


def _newest_readable(steps: list[int], read: Callable[[int], T],
                     on_damage: Callable[[int, Optional[Exception]], None]
                     ) -> Optional[tuple[int, T]]:
  """(step, read(step)) of the newest of `steps` that every process reads; None if none.

  Any exception from `read` counts as damage (orbax re-raises tensorstore's read
  failures as a bare `Exception`); `on_damage(step, error)` is called for each
  damaged step, newest first (error None where only another process failed).
  """
  for candidate in reversed(steps):
    error, value = None, None
    try:
      value = read(candidate)
    except Exception as e:  # pylint: disable=broad-except
      error = e
      gc.collect()  # finalizes the failed read's dropped coroutines now, under the hook
    if _all_processes(error is None):
      return candidate, value
    on_damage(candidate, error)
  return None


class Checkpointer:
  """Saves and restores training checkpoints, keeping the newest `keep`."""

  def __init__(self, workdir: str | pathlib.Path, keep: int):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True),
        item_names=ITEMS)

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
      for tmp in self.directory.glob(f"{step}{_TMP_SUFFIX}*"):
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
    _contain_read_leftovers()
    old_names = renames.saved_with_old_names(self.directory / str(step) / "state")
    target = renames.to_saved(abstract_state) if old_names else abstract_state
    items = {"state": ocp.args.StandardRestore(target), "data": ocp.args.JsonRestore()}
    verified = (self.directory / str(step) / "checksums").is_dir()
    if verified:
      items["checksums"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = restored["state"]
    if not verified:
      logging.warning("checkpoint at step %d has no checksums (saved by an older version):"
                      " not verified", step)
    else:
      verify(restored["checksums"]["state"], state)
      if restored["checksums"]["data"] != json_checksum(restored["data"]):
        raise DamagedCheckpoint("checksum mismatch in the data-iterator state")
    return (renames.to_current(state) if old_names else state), restored["data"]

  def restore_latest(self, abstract_state: Any,
                     accept_data: Callable[[dict], None] = lambda d: None
                     ) -> Optional[tuple[int, Any, dict]]:
    """Newest intact checkpoint as (step, state, data state); None if there is none.

    First sets aside what in `checkpoints/` is not a checkpoint. A checkpoint that
    fails to read, to verify, or to `accept_data` (e.g. the data iterator's
    `set_state`) is quarantined and the previous one tried; if every one is,
    CheckpointError.
    """
    self.set_aside_strays()

    def read(candidate: int) -> tuple[Any, dict]:
      state, data_state = self.restore(candidate, abstract_state)
      accept_data(data_state)
      return state, data_state

    steps = self.steps()
    found = _newest_readable(steps, read, self.quarantine)
    if found is not None:
      candidate, (state, data_state) = found
      return candidate, state, data_state
    if steps:
      raise CheckpointError(
          f"every checkpoint in {self.directory} (steps {steps}) is damaged; they were moved"
          f" to {self.directory / QUARANTINE} (why: {self.directory / QUARANTINE / DAMAGE_LOG})."
          " Nothing was resumed; move one back, or start over with --overwrite")
    return None

  def set_aside_strays(self) -> None:
    """Moves what in `checkpoints/` is not a checkpoint to quarantine, with a warning each.

    A checkpoint is a step folder orbax lists; orbax's own entries (unfinished
    saves, root metadata) and the quarantine stay. A file named like a step would
    otherwise be replaced by that step's next save.
    """
    if jax.process_index() == 0:
      steps = {str(s) for s in self.steps()}
      for entry in sorted(self.directory.iterdir()):
        name = entry.name
        if ((name in steps and entry.is_dir()) or (name == QUARANTINE and entry.is_dir())
            or _TMP_SUFFIX in name or name in _ORBAX_ENTRIES):
          continue
        target = self._move_aside(name)
        logging.warning("%s is not a checkpoint: moved to %s (nothing in it was read or"
                        " changed)", entry, target)
    self._synced_reload("strays set aside")

  def quarantine(self, step: int, error: Optional[Exception]) -> None:
    """Moves `step`'s checkpoint to `checkpoints/quarantine/<step>[.n]` (process 0 moves).

    One warning line; `error`'s traceback goes to `checkpoints/quarantine/damage.log`.
    """
    if jax.process_index() == 0:
      target = self._move_aside(str(step))
      log = self.directory / QUARANTINE / DAMAGE_LOG
      details = ("".join(traceback.format_exception(error)) if error is not None
                 else "(this process read it; another did not)\n")
      with log.open("a") as f:
        f.write(f"=== {datetime.datetime.now().isoformat(timespec='seconds')} checkpoint at"
                f" step {step} moved to {target}\n{details}\n")
      logging.warning("checkpoint at step %d is damaged (%s): moved to %s; details in %s",
                      step, _damage_reason(error), target, log)
    self._synced_reload(f"quarantine {step}")

  def _move_aside(self, name: str) -> pathlib.Path:
    """Moves `checkpoints/<name>` to `checkpoints/quarantine/<name>[.n]`; returns where."""
    if not (self.directory / QUARANTINE).is_dir() and (self.directory / QUARANTINE).exists():
      raise CheckpointError(f"{self.directory / QUARANTINE} is not a folder, and damaged"
                            " checkpoints are moved there: move it out of the way and rerun")
    base = self.directory / QUARANTINE / name
    target, n = base, 0
    while target.exists():
      n += 1
      target = base.with_name(f"{name}.{n}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(self.directory / name), target)
    return target

  def _synced_reload(self, name: str) -> None:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(name)
    self.manager.reload()

  def close(self) -> None:
    self.manager.close()


def verify(saved: dict[str, str], state: Any, prefix: str = "") -> None:
  """DamagedCheckpoint unless `state`'s checksums equal `saved`'s entries under `prefix`.

  saved: `{tree path: checksum}` as `state_checksums` computed them at save;
  prefix: the tree path `state` had there (e.g. "['params']" for the parameters alone).
  """
  actual = {prefix + k: v for k, v in state_checksums(state).items()}
  expected = {k: v for k, v in saved.items() if k.startswith(prefix)}
  bad = sorted(k for k in actual if expected.get(k) != actual[k])
  if bad or set(expected) != set(actual):
    raise DamagedCheckpoint(f"checksum mismatch in {bad[:3] or 'the array list'}")


def abstract_params(model_cfg: Any, mesh: jax.sharding.Mesh
                    ) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, parameters as `jax.ShapeDtypeStruct`s with their shardings on `mesh`)."""
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
  shardings = sharding.state_shardings(params, mesh)
  return graphdef, jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), params, shardings)


def load_model(run_dir: str | pathlib.Path, step: Optional[int] = None, *,
               mesh: Optional[jax.sharding.Mesh] = None
               ) -> tuple[ml_collections.ConfigDict, int, Transformer]:
  """(experiment config, step, model) of a run folder's newest intact (or `step`'s) checkpoint.

  Read-only: reads `config.json` and the parameters (not the optimizer state) of
  one checkpoint, verified against its checksums; writes, moves and deletes
  nothing. Without `step`, a checkpoint that cannot be read or verified is
  skipped with one warning and the previous one read. mesh: where the
  parameters land (default: the run's `mesh` config on this machine's devices,
  or all of them on the fsdp axis when that config does not fit them).
  Raises FileNotFoundError (no config.json, no such step, no checkpoint) or
  CheckpointError (the given step's checkpoint, or every one, cannot be read).
  """
  run_dir = pathlib.Path(run_dir)
  path = run_dir / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: {run_dir} is not a training run folder")
  config = experiment.config_from_json(json.loads(path.read_text()))
  model_cfg = experiment.model_config(config)
  if mesh is None:
    try:
      mesh = sharding.make_mesh(config.mesh)
    except ValueError:
      mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1}))
  graphdef, target = abstract_params(model_cfg, mesh)
  directory = run_dir / "checkpoints"
  steps = sorted(int(p.name) for p in directory.iterdir()
                 if p.name.isdigit() and p.is_dir()) if directory.is_dir() else []
  if step is not None and step not in steps:
    raise FileNotFoundError(f"no checkpoint of step {step} in {directory} (steps: {steps})")

  def skip(candidate: int, error: Optional[Exception]) -> None:
    logging.warning("checkpoint at step %d of %s cannot be read (%s): skipped, reading the"
                    " previous one", candidate, run_dir, _damage_reason(error))

  def refuse(candidate: int, error: Optional[Exception]) -> None:
    raise CheckpointError(f"checkpoint at step {candidate} of {run_dir} cannot be read"
                          f" ({_damage_reason(error)})") from error

  found = _newest_readable([step] if step is not None else steps,
                           lambda s: _read_params(directory / str(s), target),
                           skip if step is None else refuse)
  if found is None:
    if steps:
      raise CheckpointError(f"every checkpoint in {directory} (steps {steps}) is damaged:"
                            " no model to load")
    raise FileNotFoundError(f"no checkpoint in {directory}")
  return config, found[0], nnx.merge(graphdef, found[1])


def _read_params(step_dir: pathlib.Path, target: nnx.State) -> nnx.State:
  """The parameters saved in `step_dir/state`, verified against `step_dir/checksums`."""
  _contain_read_leftovers()
  step_dir = step_dir.absolute()  # orbax reads only absolute paths
  old_names = renames.saved_with_old_names(step_dir / "state")
  item = {"params": renames.to_saved(target) if old_names else target}
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(
      sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), item)
  with ocp.PyTreeCheckpointer() as reader:
    params = reader.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))["params"]
  if (step_dir / "checksums").is_dir():
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as reader:
      saved = reader.restore(step_dir / "checksums", args=ocp.args.JsonRestore())
    verify(saved["state"], params, prefix="['params']")
  return renames.to_current(params) if old_names else params


def _all_processes(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))

"""The run folder's safety rules: one run at a time, one config per folder, room to save.

- `lock(workdir)`: an exclusive `fcntl.flock` on `workdir/.lock` holding the
  owner's pid; the OS releases it when the process ends, however it ends.
- `check_identity(workdir, config)`: the folder's `config.json` is the run's
  identity; a config that differs outside `experiment.RESUMABLE` is refused.
- `check_layout(workdir)`: each file a run writes is a file (a folder), or absent.
- `clear(workdir)`: `--overwrite`: removes what a run writes, nothing else.
- `check_free_space(directory, needed)` and `disk_error(e)`: a full or
  read-only disk is one clear line, not a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import re
import shutil
from typing import Iterator, Optional

import ml_collections

from gated_attention_jax.training import experiment

RUN_FILES = ("checkpoints", "tensorboard", "metrics.jsonl", "config.json", "summary.json")
RUN_FOLDERS = ("checkpoints", "tensorboard")
DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the folder is read-only", errno.EACCES: "permission denied"}


class RunFolderError(RuntimeError):
  """The run folder cannot be used as asked; the message says what to do."""


@contextlib.contextmanager
def lock(workdir: pathlib.Path) -> Iterator[None]:
  """Holds `workdir/.lock` for the block; RunFolderError if another process holds it."""
  path = workdir / ".lock"
  _check_type(path, folder=False)
  try:
    f = open(path, "a+")  # pylint: disable=consider-using-with
  except OSError as e:
    if disk_error(e) is None:
      raise
    raise RunFolderError(f"{describe_disk_error(e, f'writing in {workdir}')}: nothing was"
                         " changed; use a writable --workdir") from None
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      owner = f.read().strip() or "unknown"
      raise RunFolderError(f"{workdir} is in use by another run (pid {owner}); wait for it"
                           " to end, or use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    try:
      yield
    finally:
      f.truncate(0)
      fcntl.flock(f, fcntl.LOCK_UN)


def saved_config(workdir: pathlib.Path) -> Optional[dict]:
  """The folder's `config.json`, or None if it has none."""
  path = workdir / "config.json"
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise RunFolderError(f"{path} is not valid JSON ({e}); fix it, or start over with"
                         " --overwrite") from None


def check_identity(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """RunFolderError naming every field that may not change on resume and differs."""
  saved = saved_config(workdir)
  if saved is None:
    checkpoints = workdir / "checkpoints"
    if (workdir / "metrics.jsonl").exists() or (checkpoints.is_dir()
                                                and any(checkpoints.iterdir())):
      raise RunFolderError(f"{workdir} holds a run without its config.json: its config is"
                           " unknown; restore config.json, or start over with --overwrite")
    return
  differences = experiment.identity_differences(saved, config)
  if differences:
    raise RunFolderError(
        f"{workdir} holds a run with another config; refusing to resume it with this one."
        f" Differences (saved -> now): {'; '.join(differences)}. Only"
        f" {', '.join(experiment.RESUMABLE)} may change on resume; use another --workdir,"
        " or --overwrite to delete that run and start over")


def check_layout(workdir: pathlib.Path) -> None:
  """RunFolderError naming the first of `RUN_FILES` that has the wrong type.

  A folder where a run writes a file (or the reverse) would end the run with a
  traceback when it is written; refused before anything is read or trained.
  """
  for name in RUN_FILES:
    _check_type(workdir / name, folder=name in RUN_FOLDERS)


def _check_type(path: pathlib.Path, folder: bool) -> None:
  if os.path.lexists(path) and not (path.is_dir() if folder else path.is_file()):
    raise RunFolderError(f"{path} is not {'a folder' if folder else 'a file'}, as the run writes"
                         " it: move it out of the way and rerun (nothing was changed)")


def clear(workdir: pathlib.Path) -> None:
  """Deletes a previous run's files (`RUN_FILES`) from `workdir`."""
  for name in RUN_FILES:
    path = workdir / name
    if path.is_dir():
      shutil.rmtree(path)
    elif path.exists():
      path.unlink()


def check_free_space(directory: pathlib.Path, needed: int) -> None:
  """RunFolderError if `directory`'s file system has less than `needed` bytes free."""
  free = shutil.disk_usage(directory).free
  if free < needed:
    raise RunFolderError(f"only {free / 2**20:.1f} MiB free in {directory}, a checkpoint"
                         f" needs about {needed / 2**20:.1f} MiB: free some space and rerun"
                         " to resume (earlier checkpoints are intact)")


def disk_error(e: BaseException) -> Optional[OSError]:
  """The disk-full / read-only OSError behind `e` (its causes included), if any.

  tensorstore (orbax's array writer) reports it as a ValueError ending in
  `[os_error_code='28']`.
  """
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
      return e
    code = re.search(r"os_error_code='(\d+)'", str(e))
    if code and int(code.group(1)) in DISK_ERRNOS:
      return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
    e = e.__cause__ or e.__context__
  return None


def describe_disk_error(e: OSError, doing: str) -> str:
  where = f" ({e.filename})" if e.filename else ""
  return f"{doing} failed: {DISK_ERRNOS[e.errno]}{where}"

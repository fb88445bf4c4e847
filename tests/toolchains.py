"""The ahead-of-time toolchains (``tools/aot_toolchains.sh``) and the suite's background jobs.

Each toolchain is a Python 3.12 environment ``.toolchains/jax-<version>/`` with libtpu, the CUDA
plugin and ptxas. The compile checks and the newest-jax test run are slow subprocesses in them,
as are the 8-device drivers of tests/test_sharding.py in this Python; conftest starts them when
their tests are collected, so they overlap with the rest of the suite, and their tests wait for
them. Under pytest-xdist each job still starts once per session (see ``open_session``).
"""

from __future__ import annotations

from collections.abc import Callable

import dataclasses
import fcntl
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
# The GPU machine's jax and the newest on the registry; 0.10.2 is the default Python's jax.
VERSIONS = ("0.10.2", "0.11.2", "0.12.0.1")
NEWEST = VERSIONS[-1]
LAYER_VERSION = "0.11.2"  # the GPU machine's jax: compile_check's LAYER_CASES run under it
# Kernel, attention and model tests, run again under the newest jax (what Colab users get).
NEWEST_JAX_TESTS = ("tests/test_kernels.py", "tests/test_kernels_mgpu.py",
                    "tests/test_attention.py", "tests/test_model.py")


# XLA flags for the suite's CPU programs (conftest puts them in XLA_FLAGS, which subprocesses
# inherit): LLVM at optimisation level 0. The tests' programs are tiny, so optimising them
# costs more time than it saves (a fresh test_scan_layers.py: 73 s -> 38 s; test_kernels.py
# with test_attention.py: 232 s -> 178 s), and both sides of every comparison compile with the
# same flags. The toolchain jobs drop them: what they compile for TPU and GPU stays as users get it.
CPU_XLA_FLAGS = "--xla_backend_optimization_level=0"


def python(version: str) -> pathlib.Path | None:
  root = pathlib.Path(os.environ.get("GAJ_TOOLCHAINS", REPO / ".toolchains"))
  path = root / f"jax-{version}" / "bin" / "python"
  return path if path.exists() else None


def missing_reason(version: str) -> str:
  return (f"no jax {version} toolchain in .toolchains/ (build it with "
          f"`bash tools/aot_toolchains.sh {version}`; CI builds them all)")


def must_run() -> bool:
  """In CI a missing toolchain is a failure, not a skip."""
  return os.environ.get("CI", "").lower() in ("1", "true")


# The background jobs of one test session live in one folder, named in the environment by the
# session's first pytest process (the only one without xdist, the controller with it) before any
# worker starts: workers see the same folder, so each job starts once per session, whichever
# worker collects it first, and any worker can wait for it.
JOBS_ENV = "GAJ_TEST_JOBS"
_JOB_SETTINGS = ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR", JOBS_ENV, "PYTEST_XDIST_WORKER",
                 "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID")
# Runs argv[2:], then writes "<return code> <seconds>" to argv[1] in one rename.
_WRAPPER = ("import os, subprocess, sys, time; t = time.time(); rc = subprocess.call(sys.argv[2:]);"
            " open(sys.argv[1] + '.tmp', 'w').write(f'{rc} {time.time() - t:.0f}');"
            " os.replace(sys.argv[1] + '.tmp', sys.argv[1])")


def open_session() -> None:
  """Called by conftest in the session's first process: a fresh folder for its jobs."""
  if "PYTEST_XDIST_WORKER" not in os.environ:
    os.environ[JOBS_ENV] = tempfile.mkdtemp(prefix="gaj_test_jobs_")


def close_session() -> None:
  """Called by conftest when the first process ends: kills what still runs, removes the folder."""
  if "PYTEST_XDIST_WORKER" in os.environ or JOBS_ENV not in os.environ:
    return
  root = pathlib.Path(os.environ[JOBS_ENV])
  for pid_file in root.glob("*/pid"):
    if not (pid_file.parent / "rc").exists():
      try:
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)
      except (ProcessLookupError, ValueError):
        pass
  shutil.rmtree(root, ignore_errors=True)


def job_folder(name: str) -> pathlib.Path:
  """Where job `name` keeps its log, result files and whatever else it writes."""
  return pathlib.Path(os.environ[JOBS_ENV]) / name


def built_once(name: str, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
  """A folder `build` fills once per session, whichever process of it asks first; the others
  wait for it (a session fixture of each xdist worker would build its own)."""
  folder, done = job_folder(name), job_folder(f"{name}.built")
  with open(job_folder(f"{name}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
      folder.mkdir()
      build(folder)
      done.touch()
  return folder


@dataclasses.dataclass
class Job:
  """A subprocess started in the background by some process of this session."""

  name: str
  folder: pathlib.Path

  @property
  def log(self) -> pathlib.Path:
    return self.folder / "log.txt"

  @property
  def json(self) -> pathlib.Path:
    return self.folder / "result.json"

  def result(self, timeout: float = 1800) -> tuple[int, str, float]:
    """Waits for the job: (return code, output, seconds it ran)."""
    deadline = time.time() + timeout
    while not (self.folder / "rc").exists():
      if time.time() > deadline:
        raise TimeoutError(f"background job {self.name} still running after {timeout:.0f} s; "
                           f"its output so far:\n{self.log.read_text(errors='replace')[-3000:]}")
      time.sleep(0.5)
    rc, seconds = (self.folder / "rc").read_text().split()
    return int(rc), self.log.read_text(errors="replace"), float(seconds)


def env() -> dict[str, str]:
  """The environment of a toolchain subprocess: CPU platform, this repository importable."""
  out = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
  for name in _JOB_SETTINGS:  # real compiles, as users get them; a session of its own
    out.pop(name, None)
  return out


def start(name: str, argv: list[str], with_json: bool = False,
          environ: dict[str, str] | None = None) -> Job:
  """Starts `argv` once per session (any later call, from any process, gets the same job).

  `environ` defaults to a toolchain's (`env()`); output goes to `job.log`, and with `with_json`
  the command gets `--json=<job.json>`.
  """
  job = Job(name, job_folder(name))
  try:
    job.folder.mkdir()
  except FileExistsError:
    return job  # started by this or another process of the session
  argv = argv + ([f"--json={job.json}"] if with_json else [])
  with open(job.log, "w") as f:
    process = subprocess.Popen([sys.executable, "-c", _WRAPPER, str(job.folder / "rc"), *argv],
                               cwd=REPO, env=environ or env(), stdout=f,
                               stderr=subprocess.STDOUT, start_new_session=True)
  (job.folder / "pid").write_text(str(process.pid))
  return job


def compile_job(version: str) -> Job | None:
  """compile_check under ``version``'s toolchain; the released models' attention layers only
  under ``LAYER_VERSION`` (the kernels they call are compiled under every version)."""
  py = python(version)
  if py is None:
    return None
  layers = [] if version == LAYER_VERSION else ["--layer_cases="]
  return start(f"compile_{version}",
               [str(py), "-m", "gated_attention_jax.compile_check", *layers], with_json=True)


def newest_jax_job() -> Job | None:
  py = python(NEWEST)
  if py is None:
    return None
  return start("newest_jax", [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              *NEWEST_JAX_TESTS])

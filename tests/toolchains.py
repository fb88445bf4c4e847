"""The ahead-of-time toolchains (``tools/aot_toolchains.sh``) and the suite's background jobs.

Each toolchain is a Python 3.12 environment ``.toolchains/jax-<version>/`` with libtpu, the CUDA
plugin and ptxas. The compile checks and the newest-jax test run are slow subprocesses in them,
as are the 8-device drivers of tests/test_sharding.py in this Python; conftest starts them when
the test session starts (only if their tests were collected), so they overlap with the rest of
the suite on the second core, and their tests wait for them.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
# The GPU machine's jax and the newest on the registry; 0.10.2 is the default Python's jax.
VERSIONS = ("0.10.2", "0.11.2", "0.12.0.1")
NEWEST = VERSIONS[-1]
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


@dataclasses.dataclass
class Job:
  """A subprocess started in the background; ``result()`` waits for it."""

  name: str
  process: subprocess.Popen
  log: pathlib.Path
  json: pathlib.Path | None
  started: float

  def result(self, timeout: float = 1800) -> tuple[int, str, float]:
    """(return code, output, seconds from start to end)."""
    rc = self.process.wait(timeout=timeout)
    return rc, self.log.read_text(errors="replace"), time.time() - self.started


_JOBS: dict[str, Job] = {}


def env() -> dict[str, str]:
  """The environment of a toolchain subprocess: CPU platform, this repository importable."""
  out = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
  for name in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR"):  # real compiles, as users get them
    out.pop(name, None)
  return out


def start(name: str, argv: list[str], with_json: bool = False,
          environ: dict[str, str] | None = None) -> Job:
  """Starts `argv` once per session (a second call returns the same job); output in its log.

  `environ` defaults to a toolchain's (`env()`); the job's folder is `job.log.parent`.
  """
  if name in _JOBS:
    return _JOBS[name]
  out = pathlib.Path(tempfile.mkdtemp(prefix=f"gaj_{name}_"))
  json_path = out / "result.json" if with_json else None
  log = out / "log.txt"
  with open(log, "w") as f:
    process = subprocess.Popen(argv + ([f"--json={json_path}"] if json_path else []),
                               cwd=REPO, env=environ or env(), stdout=f, stderr=subprocess.STDOUT)
  _JOBS[name] = Job(name, process, log, json_path, time.time())
  return _JOBS[name]


def compile_job(version: str) -> Job | None:
  py = python(version)
  if py is None:
    return None
  return start(f"compile_{version}",
               [str(py), "-m", "gated_attention_jax.compile_check"], with_json=True)


def newest_jax_job() -> Job | None:
  py = python(NEWEST)
  if py is None:
    return None
  return start("newest_jax", [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              *NEWEST_JAX_TESTS])


def stop_all() -> None:
  for job in _JOBS.values():
    if job.process.poll() is None:
      job.process.kill()

"""Shared test fixtures."""

import os
import tempfile

import jax
import numpy as np
import pytest
from flax import nnx

from tests import toolchains

# Many tests compile the same small programs (train steps of tiny models), in this process and
# in the CLIs, drivers and notebook kernels they start: one persistent compilation cache for all
# of them (set in the environment, which subprocesses inherit) saves minutes on 2 CPU cores.
_CACHE = os.environ.get("GAJ_TEST_COMPILATION_CACHE",
                        os.path.join(tempfile.gettempdir(), "gaj_jax_cache"))
os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# Read when the CPU backend starts (no test has run yet), and by every subprocess.
if toolchains.CPU_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # xdist workers inherit it
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {toolchains.CPU_XLA_FLAGS}".strip()
toolchains.open_session()


# The compile checks (tests/test_compile_targets.py) and the newest-jax run
# (tests/test_newest_jax.py) are subprocesses in other Python environments, the 8-device drivers
# of tests/test_sharding.py subprocesses in this one: start them as soon as their tests are
# collected so they overlap with the rest of the suite; the toolchain tests run last.
_BACKGROUND = ("test_compile_targets.py", "test_newest_jax.py")


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: start only what will be waited for
def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  files = {item.path.name for item in items}
  if "test_compile_targets.py" in files:
    for version in toolchains.VERSIONS:
      toolchains.compile_job(version)
  if "test_newest_jax.py" in files:
    toolchains.newest_jax_job()
  sharding_fixtures = {name for item in items if item.path.name == "test_sharding.py"
                       for name in item.fixturenames}
  if sharding_fixtures & {"runs", "attend_runs"}:
    from tests import test_sharding  # pylint: disable=g-import-not-at-top
    if "runs" in sharding_fixtures:
      test_sharding.runs_job()
    if "attend_runs" in sharding_fixtures:
      test_sharding.attend_job()
  items.sort(key=lambda item: item.path.name in _BACKGROUND)


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  toolchains.close_session()


@pytest.fixture
def x64():
  """Runs a test with float64 enabled, restoring the previous setting afterwards."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)


@pytest.fixture(scope="session")
def tiny_run():
  """A run folder of a 6-step training run of a tiny byte-level model (seq_len 32).

  Trained once per session (with xdist, by the first worker that needs it). Tests read it or
  add their own outputs; one that changes what is there works on a copy.
  """
  from gated_attention_jax.training import train  # pylint: disable=g-import-not-at-top
  from tests.test_analyze import tiny_config  # pylint: disable=g-import-not-at-top

  return toolchains.built_once("tiny_run", lambda workdir: train.train_and_evaluate(
      tiny_config(), workdir))


def randomize_params(module: nnx.Module, seed: int, scale: float = 0.3) -> None:
  """Replaces every parameter with fresh N(0, scale²) values (norm weights around 1).

  Zero-initialised gates and unit norm weights would hide mistakes; random
  values make every parameter matter in a comparison.
  """
  rng = np.random.default_rng(seed)
  state = nnx.state(module, nnx.Param)
  new = jax.tree.map(
      lambda v: (rng.normal(size=v.shape) * scale + (1.0 if v.ndim == 1 else 0.0)
                 ).astype(v.dtype), state)
  nnx.update(module, new)


def params_as_numpy(layer: nnx.Module) -> dict:
  """{name: float64 array} for the direct parameters of an attention layer."""
  out = {}
  for name in ("q_proj", "k_proj", "v_proj", "o_proj", "attn_gate_proj", "gate_theta"):
    p = getattr(layer, name)
    if p is not None:
      out[name] = np.asarray(p[...], np.float64)
  for name in ("q_norm", "k_norm", "sdpa_norm"):
    norm = getattr(layer, name)
    if norm is not None:
      out[name] = np.asarray(norm.weight[...], np.float64)
  return out

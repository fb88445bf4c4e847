"""The kernel, attention and model tests pass under the newest jax too.

The default Python here has jax 0.10.2; Colab and Cloud TPU VM users install the newest release
(``toolchains.NEWEST``). conftest starts ``pytest toolchains.NEWEST_JAX_TESTS`` in that
toolchain's environment in the background; this test waits for it and fails with its output.
Under the newest jax the Mosaic GPU interpreter tests (skipped under 0.10.2) run too.
"""

from __future__ import annotations

import re

import pytest

from tests import toolchains


def test_kernel_attention_and_model_tests_pass_under_the_newest_jax():
  job = toolchains.newest_jax_job()
  if job is None:
    if toolchains.must_run():
      pytest.fail(toolchains.missing_reason(toolchains.NEWEST))
    pytest.skip(toolchains.missing_reason(toolchains.NEWEST))
  rc, log, seconds = job.result()
  summary = log.strip().splitlines()[-1] if log.strip() else ""
  assert rc == 0, f"under jax {toolchains.NEWEST}:\n{log[-6000:]}"
  passed = re.search(r"(\d+) passed", summary)
  assert passed and int(passed.group(1)) > 100, summary
  assert "failed" not in summary and "error" not in summary, summary
  print(f"jax {toolchains.NEWEST}: {summary} ({seconds:.0f} s)")

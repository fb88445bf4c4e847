"""Wall time of a jitted call, as the benchmarks here measure it."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import jax


def median_seconds(fn: Callable[..., Any], args: Sequence[Any], repeats: int) -> float:
  """Median wall seconds of `fn(*args)` over `repeats` calls, after one compile + warm-up
  call; each call waits for its outputs."""
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - start)
  return statistics.median(samples)

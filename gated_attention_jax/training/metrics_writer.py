"""Training metrics: `DIR/metrics.jsonl`, TensorBoard event files, a console progress line."""

from __future__ import annotations

import json
import math
import os
import pathlib
import statistics
import time
from collections import deque
from typing import Any

from absl import logging

from gated_attention_jax.training import tensorboard_events


class MetricsWriter:
  """Appends one JSON object per line (`{"step": ..., "loss": ...}`) and TensorBoard scalars.

  On resume, `truncate_after(step)` drops lines past the restored checkpoint so a
  resumed run's file reads as one uninterrupted run, and a torn last line (a
  write cut short by a kill) with a warning.
  """

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if enabled:
      self._tb = tensorboard_events.ScalarEventWriter(pathlib.Path(workdir) / "tensorboard")

  def truncate_after(self, step: int) -> None:
    if not self.enabled or not self.path.exists():
      return
    lines = self.path.read_text().splitlines()
    kept = []
    for i, line in enumerate(lines):
      try:
        row = json.loads(line) if line.strip() else None
      except ValueError:
        if i < len(lines) - 1:
          raise ValueError(f"{self.path} line {i + 1} is not JSON ({line[:80]!r}); fix or"
                           " delete that line, or start over with --overwrite") from None
        logging.warning("dropping the torn last line of %s (%r)", self.path, line[:80])
        continue
      if row is not None and row["step"] <= step:
        kept.append(line)
    lines = kept
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in lines))
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")
    scalars = {}
    for name, value in metrics.items():
      if isinstance(value, (int, float)):
        scalars[name] = value
      elif isinstance(value, list):
        scalars.update((f"{name}/{i}", v) for i, v in enumerate(value))
    self._tb.write(step, scalars)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class SpikeCounter:
  """Counts steps whose loss exceeds `factor` × the running median of the last `window`."""

  def __init__(self, factor: float, window: int):
    self.factor = factor
    self.recent: deque[float] = deque(maxlen=window)
    self.count = 0

  def update(self, loss: float) -> None:
    if len(self.recent) >= min(10, self.recent.maxlen) and loss > self.factor * statistics.median(
        self.recent):
      self.count += 1
    self.recent.append(loss)


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
  """Prints `step i/n  loss ...  tok/s ...  ETA ...` lines."""

  def __init__(self, total_steps: int, start_step: int):
    self.total = total_steps
    self.start_step = start_step
    self.start = time.time()

  def line(self, step: int, metrics: dict[str, Any]) -> str:
    elapsed = time.time() - self.start
    done = max(step - self.start_step, 1)
    eta = elapsed / done * (self.total - step)
    parts = [f"step {step}/{self.total}"]
    for key, fmt in (("loss", ".4f"), ("perplexity", ".2f"), ("eval_loss", ".4f"),
                     ("eval_perplexity", ".2f"), ("learning_rate", ".2e"),
                     ("grad_norm", ".3f"), ("moe_balance_loss", ".3f"),
                     ("moe_router_z_loss", ".3f"), ("tokens_per_sec", ",.0f")):
      if key in metrics and math.isfinite(metrics[key]):
        parts.append(f"{key.replace('_per_sec', '/s')} {metrics[key]:{fmt}}")
    parts.append(f"ETA {format_duration(eta)}")
    text = "  ".join(parts)
    print(text, flush=True)
    return text

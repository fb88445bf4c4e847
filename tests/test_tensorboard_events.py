"""The event files ``MetricsWriter`` writes hold what TensorBoard reads.

Decoded with tensorboardX's protobuf classes and its CRC-32C (an independent implementation of
the format, a test dependency only), and compared with what tensorboardX's own SummaryWriter
writes for the same scalars.
"""

from __future__ import annotations

import pathlib
import struct

import numpy as np
from tensorboardX import SummaryWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.record_writer import masked_crc32c

from gated_attention_jax.training import metrics_writer, tensorboard_events


def _events(path: pathlib.Path) -> list[Event]:
  """Every record of an event file, its two checksums verified."""
  data, i, events = path.read_bytes(), 0, []
  while i < len(data):
    header = data[i:i + 8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[i + 8:i + 12])[0] == masked_crc32c(header)
    payload = data[i + 12:i + 12 + length]
    assert struct.unpack("<I", data[i + 12 + length:i + 16 + length])[0] == masked_crc32c(payload)
    events.append(Event.FromString(payload))
    i += 16 + length
  assert i == len(data)
  return events


def _tagged(metrics: dict) -> list[tuple[str, float]]:
  """(tag, value) as TensorBoard should show a metrics row: lists per index, strings not at all."""
  out = []
  for name, value in metrics.items():
    if isinstance(value, float):
      out.append((name, value))
    elif isinstance(value, list):
      out += [(f"{name}/{i}", x) for i, x in enumerate(value)]
  return out


def _scalars(events: list[Event]) -> list[tuple[int, str, float]]:
  return sorted((e.step, v.tag, v.simple_value) for e in events for v in e.summary.value)


def test_crc32c_check_value():
  assert tensorboard_events.crc32c(b"123456789") == 0xE3069283  # the standard check value


def test_negative_step_encodes_like_protobuf():
  assert Event.FromString(tensorboard_events.event(1.0, -3)).step == -3


def test_metrics_writer_files_decode_like_tensorboardx(tmp_path):
  rng = np.random.default_rng(0)
  rows = [(step, {"loss": float(rng.normal()), "learning_rate": 3e-4 * step,
                  "gate_score_mean_per_layer": [float(x) for x in rng.random(3)],
                  "note": "skipped: not a number"}) for step in (1, 2, 10, 2**40)]
  ours = metrics_writer.MetricsWriter(tmp_path / "ours")
  theirs = SummaryWriter(str(tmp_path / "theirs"))
  for step, metrics in rows:
    ours.write(step, metrics)
    for tag, value in _tagged(metrics):
      theirs.add_scalar(tag, value, step)
  ours.close()
  theirs.close()

  [path] = (tmp_path / "ours" / "tensorboard").glob("events.out.tfevents.*")
  [reference] = (tmp_path / "theirs").glob("events.out.tfevents.*")
  events = _events(path)
  assert events[0].file_version == "brain.Event:2"
  assert _scalars(events) == _scalars(_events(reference))
  assert len(_scalars(events)) == 4 * 5
  assert all(e.wall_time > 1.7e9 for e in events)

"""TensorBoard event files of scalars, written with the standard library only.

An event file is a sequence of TFRecords (little-endian uint64 length, masked CRC-32C of those 8
bytes, the data, masked CRC-32C of the data), each an ``Event`` protocol buffer: first one with
``file_version`` "brain.Event:2", then one per ``write`` with a ``Summary`` of ``simple_value``s.
The five fields used are encoded here by hand. (tensorboardX, used before, imports torch when it is
installed: ~3 s of CPU at the start of every run.)
"""

from __future__ import annotations

import os
import pathlib
import socket
import struct
import time


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli polynomial, reflected
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
  crc = crc32c(data)
  return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
  """Base-128 varint; a negative int64 as its 64-bit two's complement (as protobuf does)."""
  n &= (1 << 64) - 1
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field (string, bytes or message)."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int, *, file_version: str | None = None,
          scalars: dict[str, float] | None = None) -> bytes:
  """An ``Event`` (wall_time = 1, step = 2, file_version = 3, summary = 5), serialised."""
  out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
  if file_version is not None:
    out += _field(3, file_version.encode())
  if scalars:  # Summary.value = 1: Value.tag = 1, Value.simple_value = 2 (float)
    values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                      for tag, value in scalars.items())
    out += _field(5, values)
  return out


def record(data: bytes) -> bytes:
  """``data`` framed as one TFRecord."""
  length = struct.pack("<Q", len(data))
  return length + _masked_crc(length) + data + _masked_crc(data)


class ScalarEventWriter:
  """Appends scalars to a new ``events.out.tfevents.*`` file in ``logdir`` (created if absent)."""

  def __init__(self, logdir: str | pathlib.Path):
    logdir = pathlib.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    self.path = logdir / (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
                          f".{os.getpid()}")
    self._file = open(self.path, "ab")  # pylint: disable=consider-using-with
    self._file.write(record(event(time.time(), 0, file_version="brain.Event:2")))
    self._file.flush()

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """One event at ``step`` holding every ``{tag: value}``; flushed to disk."""
    if scalars:
      self._file.write(record(event(time.time(), step, scalars=scalars)))
      self._file.flush()

  def close(self) -> None:
    self._file.close()

"""Reading and writing `.safetensors` files with numpy only (no torch, no safetensors package).

File format: an 8-byte little-endian header length n, n bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the raw little-endian tensor bytes (offsets relative to the end of the header).
bfloat16 is read as float32 (exact: the 16 bits become the top half of a float32)
and written from float arrays with round-to-nearest-even.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Mapping, Optional

import numpy as np

_NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_CODES = {np.dtype(v): k for k, v in _NUMPY_DTYPES.items()}
WRITE_DTYPES = ("float64", "float32", "float16", "bfloat16")


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
  """uint16 bfloat16 bit patterns → float32 values (exact)."""
  return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
  """float32 → uint16 bfloat16 bit patterns, round-to-nearest-even (NaN stays NaN)."""
  u = np.ascontiguousarray(x, np.float32).view(np.uint32)
  rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
  nan = np.isnan(x)
  return np.where(nan, np.uint16(0x7FC0), rounded) if nan.any() else rounded


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
  """The JSON header of a safetensors file and the byte offset where tensor data starts."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  return header, 8 + n


def load_file(path: str | os.PathLike,
              names: Optional[set[str]] = None) -> dict[str, np.ndarray]:
  """Reads every tensor (or only `names`) of a safetensors file; bf16 comes back as float32."""
  header, start = read_header(path)
  header.pop("__metadata__", None)
  data = np.memmap(path, dtype=np.uint8, mode="r")
  out: dict[str, np.ndarray] = {}
  for name, info in header.items():
    if names is not None and name not in names:
      continue
    begin, end = info["data_offsets"]
    raw = data[start + begin:start + end]
    shape = tuple(info["shape"])
    code = info["dtype"]
    if code == "BF16":
      out[name] = bf16_bits_to_float32(raw.view("<u2")).reshape(shape)
    elif code in _NUMPY_DTYPES:
      stored = np.dtype(_NUMPY_DTYPES[code]).newbyteorder("<")
      out[name] = raw.view(stored).reshape(shape).astype(_NUMPY_DTYPES[code])
    else:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {code!r}")
  return out


def load_checkpoint(directory: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of an HF-style checkpoint directory: `model.safetensors`, or the shards
  listed in `model.safetensors.index.json`."""
  index = os.path.join(directory, "model.safetensors.index.json")
  if not os.path.exists(index):
    return load_file(os.path.join(directory, "model.safetensors"))
  with open(index) as f:
    weight_map: dict[str, str] = json.load(f)["weight_map"]
  out: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    names = {name for name, file in weight_map.items() if file == shard}
    out.update(load_file(os.path.join(directory, shard), names))
  return out


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, *,
              dtype: Optional[str] = None,
              metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes tensors to a safetensors file, optionally casting floating ones to `dtype`.

  `dtype` is one of WRITE_DTYPES ("bfloat16" rounds to nearest even); None keeps
  each array's own dtype.
  """
  if dtype is not None and dtype not in WRITE_DTYPES:
    raise ValueError(f"dtype must be one of {WRITE_DTYPES} or None, got {dtype!r}")
  header: dict = {"__metadata__": dict(metadata)} if metadata else {}
  buffers = []
  offset = 0
  for name in sorted(tensors):
    array = np.asarray(tensors[name])
    if dtype is not None and np.issubdtype(array.dtype, np.floating):
      if dtype == "bfloat16":
        code, raw = "BF16", float32_to_bf16_bits(array.astype(np.float32)).astype("<u2")
      else:
        array = array.astype(dtype)
        code, raw = _CODES[array.dtype], array
    elif array.dtype in _CODES:
      code, raw = _CODES[array.dtype], array
    else:
      raise ValueError(f"tensor {name!r} has unsupported dtype {array.dtype}")
    blob = np.ascontiguousarray(raw).astype(raw.dtype.newbyteorder("<"), copy=False).tobytes()
    header[name] = {"dtype": code, "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(blob)]}
    buffers.append(blob)
    offset += len(blob)
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for blob in buffers:
      f.write(blob)

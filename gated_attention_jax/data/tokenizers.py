"""Tokenizers: `byte` (UTF-8 bytes, no files) and `gpt2` (GPT-2 BPE via tiktoken) for
training, and `CheckpointTokenizer`, an official checkpoint's own `tokenizer.json`, for
sampling from it.

The GPT-2 ranks file is `whisper/assets/gpt2.tiktoken` from the `openai-whisper`
sdist, extracted once into the data cache (see `sources.gpt2_ranks_file`); it is
never fetched from a model hub.
"""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

TOKENIZERS = ("byte", "gpt2")

# GPT-2's pre-tokenisation regex (tiktoken's r50k pattern).
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
GPT2_ENDOFTEXT = "<|endoftext|>"


class Tokenizer(Protocol):
  """What the data pipeline needs from a tokenizer."""

  name: str
  vocab_size: int
  bos_id: int
  pad_id: int
  eos_ids: tuple[int, ...]  # end a generated text when prompts do not start with BOS

  def encode(self, text: str) -> np.ndarray:
    """text -> (L,) int32 token ids (no BOS added)."""

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """`encode` over many documents."""

  def decode(self, ids: np.ndarray | list[int]) -> str:
    """(L,) ids -> text; special ids are dropped."""


class ByteTokenizer:
  """UTF-8 bytes 0..255, BOS = 256, PAD = 257."""

  name = "byte"
  bos_id = 256
  pad_id = 257
  eos_ids = ()
  vocab_size = 258

  def encode(self, text: str) -> np.ndarray:
    """text -> (L,) int32 UTF-8 byte values."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """`encode` over many documents."""
    return [self.encode(t) for t in texts]

  def decode(self, ids: np.ndarray | list[int]) -> str:
    """(L,) ids -> text; ids >= 256 are dropped, bad UTF-8 becomes U+FFFD."""
    arr = np.asarray(ids, dtype=np.int64)
    return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class GPT2Tokenizer:
  """GPT-2 BPE (50257 ids); BOS = PAD = <|endoftext|> = 50256, as in GPT-2.

  The ranks file is only read on the first encode/decode, so `vocab_size` and
  `bos_id` cost nothing.
  """

  name = "gpt2"
  bos_id = 50256
  pad_id = 50256
  eos_ids = (50256,)
  vocab_size = 50257

  def __init__(self, cache_dir: str | Path | None = None):
    self._cache_dir = cache_dir

  @functools.cached_property
  def _encoding(self):
    import tiktoken  # pylint: disable=g-import-not-at-top

    from gated_attention_jax.data import sources  # pylint: disable=g-import-not-at-top

    ranks = load_tiktoken_ranks(sources.gpt2_ranks_file(self._cache_dir))
    return tiktoken.Encoding(
        "gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={GPT2_ENDOFTEXT: self.bos_id},
    )

  def encode(self, text: str) -> np.ndarray:
    """text -> (L,) int32 BPE ids; special-token text is encoded as plain text."""
    return np.asarray(self._encoding.encode_ordinary(text), dtype=np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """Multithreaded `encode` over many documents."""
    return [np.asarray(ids, dtype=np.int32)
            for ids in self._encoding.encode_ordinary_batch(texts)]

  def decode(self, ids: np.ndarray | list[int]) -> str:
    """(L,) ids -> text; <|endoftext|> is dropped."""
    arr = np.asarray(ids, dtype=np.int64)
    return self._encoding.decode(arr[arr != self.bos_id].tolist())


def _read_json(path: Path) -> dict[str, Any]:
  return json.loads(path.read_text()) if path.exists() else {}


def _ids(value: Any) -> tuple[int, ...]:
  """An `*_token_id` field (None, an int or a list of ints) as a tuple."""
  if value is None:
    return ()
  return tuple(int(v) for v in (value if isinstance(value, list) else [value]))


class CheckpointTokenizer:
  """An official checkpoint directory's own tokenizer (`tokenizer.json`, read with Hugging
  Face `tokenizers`). Special ids come from `generation_config.json` and `config.json`:
  `eos_ids` = eos_token_id (a generated text ends there), `pad_id` = pad_token_id else the
  first eos id, `bos_id` = bos_token_id else `pad_id` (Qwen3 prompts have no BOS).
  `vocab_size` is the model's (config.json), which may exceed the tokenizer's.
  """

  name = "checkpoint"

  def __init__(self, directory: str | Path):
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.exists():
      raise FileNotFoundError(f"{directory} has no tokenizer.json: pass tokenizer= one of"
                              f" {TOKENIZERS} (--tokenizer) to sample with one of ours")
    try:
      import tokenizers as hf_tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("reading a checkpoint's tokenizer.json needs Hugging Face `tokenizers`"
                        f" (pip install tokenizers), or pass tokenizer= one of {TOKENIZERS}"
                        ) from e
    self._tokenizer = hf_tokenizers.Tokenizer.from_file(str(path))
    config = _read_json(directory / "config.json")
    generation = _read_json(directory / "generation_config.json")
    self.eos_ids = _ids(generation.get("eos_token_id", config.get("eos_token_id")))
    pad = _ids(config.get("pad_token_id")) or self.eos_ids or (0,)
    self.pad_id = pad[0]
    self.bos_id = (_ids(config.get("bos_token_id")) or (self.pad_id,))[0]
    self.vocab_size = max(int(config.get("vocab_size", 0)),
                          self._tokenizer.get_vocab_size(with_added_tokens=True))

  def encode(self, text: str) -> np.ndarray:
    """text -> (L,) int32 ids, no special tokens added."""
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """`encode` over many documents."""
    return [np.asarray(e.ids, np.int32)
            for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: np.ndarray | list[int]) -> str:
    """(L,) ids -> text; special tokens are dropped."""
    return self._tokenizer.decode(np.asarray(ids, np.int64).tolist(), skip_special_tokens=True)


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
  """Parses a `.tiktoken` file (`<base64 token> <rank>` per line)."""
  ranks = {}
  for line in Path(path).read_bytes().splitlines():
    if line:
      token, rank = line.split()
      ranks[base64.b64decode(token)] = int(rank)
  return ranks


def get_tokenizer(name: str, cache_dir: str | Path | None = None) -> Tokenizer:
  """Returns the tokenizer `name` (one of TOKENIZERS).

  cache_dir: data cache root holding the extracted GPT-2 ranks file
  ("" / None = default, see `sources.data_root`).
  """
  if name == "byte":
    return ByteTokenizer()
  if name == "gpt2":
    return GPT2Tokenizer(cache_dir or None)
  raise ValueError(f"data.tokenizer must be one of {TOKENIZERS}, got {name!r}")

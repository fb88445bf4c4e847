"""The on-disk token-shard format (what `prepare` writes, `corpus="token_shards"` reads).

A prepared corpus is one directory:

    manifest.json
    <split>-<k:05d>.tokens.npy    (N_k,) uint16 (vocab <= 65536) or uint32:
                                  the documents' tokens back to back, no BOS
    <split>-<k:05d>.lengths.npy   (D_k,) int64: each document's length in
                                  tokens, in order; sums to N_k

`split` is "train" or "validation"; a document never spans two shards, so a
split's documents are shard 0's, then shard 1's, ... `manifest.json`:

    {"format": "gated_attention_jax.token_shards", "version": 1,
     "tokenizer": "byte" | "gpt2", "vocab_size": int, "bos_id": int,
     "splits": {"train": {"documents": int, "tokens": int,
                          "document_names": [str, ...],   # optional
                          "shards": [{"tokens": "train-00000.tokens.npy",
                                      "lengths": "train-00000.lengths.npy",
                                      "documents": int, "num_tokens": int}]},
                "validation": {...}},
     "sha256": {"<file name>": "<hex digest>", ...},
     "sources": {...}}                                     # free-form provenance

Tokens are plain ids: the pipeline adds BOS at each document start. Every file
listed under "sha256" is verified (once per process) before use.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "gated_attention_jax.token_shards"
VERSION = 1
SPLITS = ("train", "validation")
MANIFEST = "manifest.json"
MAX_SHARD_TOKENS = 1 << 27


class DataIntegrityError(RuntimeError):
  """A shard is missing or does not match the checksum in its manifest."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One split's documents: document d is shards[shard[d]][start[d]:start[d] + length[d]]."""

  shards: tuple[np.ndarray, ...]  # memory-mapped (N_k,) token arrays
  shard: np.ndarray  # (D,) int32
  start: np.ndarray  # (D,) int64
  length: np.ndarray  # (D,) int64
  names: tuple[str, ...]  # (D,) or () when the manifest has none

  @property
  def num_documents(self) -> int:
    return len(self.length)

  def document(self, d: int) -> np.ndarray:
    """(length[d],) tokens of document d (a view into the shard)."""
    return self.shards[self.shard[d]][self.start[d]:self.start[d] + self.length[d]]


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def write_corpus(out_dir: Path, splits: dict[str, list[tuple[str, np.ndarray]]],
                 meta: dict[str, Any], overwrite: bool = True) -> None:
  """Atomically writes a corpus directory (an existing one is replaced only
  if `overwrite`; otherwise it is kept, e.g. another process made it first).

  splits: {split: [(document name, (L,) int token ids)]}; meta: manifest
  fields "tokenizer", "vocab_size", "bos_id", "sources". Everything is written
  to a sibling temp directory that is then renamed into place, so `out_dir`
  is always either absent, the old corpus, or the complete new one.
  """
  out_dir = Path(out_dir)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  dtype = np.uint16 if meta["vocab_size"] <= 1 << 16 else np.uint32
  tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
  try:
    tmp.chmod(0o755)  # mkdtemp makes it private
    manifest = {"format": FORMAT, "version": VERSION, **meta, "splits": {}, "sha256": {}}
    for split in SPLITS:
      docs = splits.get(split, [])
      groups, current, size = [], [], 0
      for name, ids in docs:  # greedy: new shard when the next doc would overflow
        if current and size + len(ids) > MAX_SHARD_TOKENS:
          groups.append(current)
          current, size = [], 0
        current.append((name, ids))
        size += len(ids)
      if current or not groups:
        groups.append(current)
      shard_entries = []
      for k, group in enumerate(groups):
        files = {"tokens": f"{split}-{k:05d}.tokens.npy",
                 "lengths": f"{split}-{k:05d}.lengths.npy"}
        tokens = (np.concatenate([ids for _, ids in group]) if group
                  else np.zeros((0,), np.int64))
        if tokens.size and (tokens.min() < 0 or tokens.max() >= meta["vocab_size"]):
          raise ValueError(f"token ids outside [0, {meta['vocab_size']}) in {split}")
        np.save(tmp / files["tokens"], tokens.astype(dtype))
        np.save(tmp / files["lengths"], np.array([len(i) for _, i in group], np.int64))
        for file in files.values():
          manifest["sha256"][file] = _sha256(tmp / file)
        shard_entries.append({**files, "documents": len(group),
                              "num_tokens": int(tokens.size)})
      manifest["splits"][split] = {
          "documents": len(docs), "tokens": int(sum(len(i) for _, i in docs)),
          "document_names": [name for name, _ in docs], "shards": shard_entries}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out_dir.exists() and overwrite:  # swap: move the old one aside, then rename
      old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex}"
      os.replace(out_dir, old)
      os.replace(tmp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      try:
        os.replace(tmp, out_dir)
      except OSError:  # it exists now (another process finished first): keep it
        if not (out_dir / MANIFEST).exists():
          raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(corpus_dir: Path) -> dict[str, Any]:
  """manifest.json of a corpus directory, with a clear error if absent/wrong."""
  path = Path(corpus_dir) / MANIFEST
  if not path.exists():
    raise FileNotFoundError(f"No {MANIFEST} in {corpus_dir}: not a prepared token-shard "
                            "directory (see gated_attention_jax.data.shards)")
  try:
    manifest = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}): not a {FORMAT} manifest") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get(
      "version") != VERSION:
    raise ValueError(f"{path} is not a {FORMAT} v{VERSION} manifest")
  vocab, bos = manifest.get("vocab_size"), manifest.get("bos_id")
  if not (isinstance(vocab, int) and isinstance(bos, int) and 0 <= bos < vocab):
    raise ValueError(f"{path}: vocab_size must be a positive int and bos_id an int in"
                     f" [0, vocab_size), got vocab_size={vocab!r}, bos_id={bos!r}")
  return manifest


def _verify(corpus_dir: Path) -> None:
  """Checks every listed file's sha256, once per process per file version."""
  manifest = read_manifest(corpus_dir)
  for file, digest in manifest["sha256"].items():
    path = corpus_dir / file
    stat = path.stat() if path.exists() else None
    key = (stat.st_size, stat.st_mtime_ns, stat.st_ino) if stat else None
    if key is None or _file_sha256(path, key) != digest:
      raise DataIntegrityError(
          f"{path} is missing or does not match the sha256 in its manifest. The "
          f"prepared data is corrupt: re-run `python -m gated_attention_jax.data.prepare"
          f" --tokenizer {manifest['tokenizer']}` (or delete {corpus_dir} so it is "
          "rebuilt on first use); for your own token shards, regenerate them.")


@functools.lru_cache(maxsize=None)
def _file_sha256(path: Path, stat_key: tuple[int, int, int]) -> str:
  """_sha256 cached on (path, size, mtime, inode)."""
  del stat_key  # cache key only
  return _sha256(path)


def _stat_key(path: Path) -> tuple[int, int, int]:
  stat = path.stat()
  return stat.st_size, stat.st_mtime_ns, stat.st_ino


@functools.lru_cache(maxsize=None)
def _max_token(path: Path, stat_key: tuple[int, int, int]) -> int:
  """Largest token id in a shard, cached on (path, size, mtime, inode)."""
  del stat_key  # cache key only
  tokens = np.load(path, mmap_mode="r")
  return int(tokens.max()) if tokens.size else -1


def load_split(corpus_dir: Path, split: str) -> Split:
  """Verifies the corpus and memory-maps one split."""
  corpus_dir = Path(corpus_dir).resolve()
  _verify(corpus_dir)
  info = read_manifest(corpus_dir)["splits"][split]
  shards, shard, start, length = [], [], [], []
  vocab = read_manifest(corpus_dir)["vocab_size"]
  for k, entry in enumerate(info["shards"]):
    shards.append(np.load(corpus_dir / entry["tokens"], mmap_mode="r"))
    top = _max_token(corpus_dir / entry["tokens"], _stat_key(corpus_dir / entry["tokens"]))
    if top >= vocab:
      raise DataIntegrityError(f"{corpus_dir / entry['tokens']} holds token id {top}, outside"
                               f" the manifest's vocab_size {vocab}: regenerate the shards")
    lengths = np.load(corpus_dir / entry["lengths"]).astype(np.int64)
    if lengths.sum() != len(shards[-1]):
      raise DataIntegrityError(f"{corpus_dir / entry['lengths']} does not sum to the "
                               "shard's token count")
    shard.append(np.full(len(lengths), k, np.int32))
    start.append(np.cumsum(lengths) - lengths)
    length.append(lengths)
  cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros((0,), dt)
  return Split(tuple(shards), cat(shard, np.int32), cat(start, np.int64),
               cat(length, np.int64), tuple(info.get("document_names", ())))

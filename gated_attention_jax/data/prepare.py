"""Builds token-shard corpora (format: `gated_attention_jax.data.shards`).

    python -m gated_attention_jax.data.prepare [--out DIR] [--tokenizer byte|gpt2]

prepares the bundled corpus (Shakespeare's 42 works + the 66 books of the King
James Bible, ~9.2M bytes; see `sources`) into `--out`, default
`<data root>/<tokenizer>` with data root = $GATED_ATTENTION_DATA or
~/.cache/gated_attention_jax/data. The pipeline calls `corpus_dir` instead,
which prepares on first use and reuses the cache afterwards.

Each work / Bible book / `.txt` file is one document. Documents go to
validation by a hash of their name: per source, the ceil(3%) (at least one, if
the source has two or more documents) with the smallest sha256(name), so the
split is fixed and never cuts a document.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path

import ml_collections
from absl import logging


from gated_attention_jax.data import shards
from gated_attention_jax.data import sources
from gated_attention_jax.data import tokenizers

VALIDATION_FRACTION = 0.03


def split_documents(names: list[str], groups: list[str]) -> list[bool]:
  """Per document: True if it goes to validation.

  Within each group (source), ceil(VALIDATION_FRACTION * n) documents with the
  smallest sha256(name) are chosen; a group of one document stays in train.
  """
  is_val = [False] * len(names)
  for group in sorted(set(groups)):
    members = [i for i, g in enumerate(groups) if g == group]
    if len(members) < 2:
      continue
    n_val = math.ceil(VALIDATION_FRACTION * len(members))
    members.sort(key=lambda i: hashlib.sha256(names[i].encode()).hexdigest())
    for i in members[:n_val]:
      is_val[i] = True
  return is_val


def build(documents: list[tuple[str, str]], groups: list[str], tokenizer_name: str,
          out_dir: Path, sources_meta: dict, cache_dir: str | Path | None = None,
          overwrite: bool = True) -> Path:
  """Tokenizes, splits by document and atomically writes `out_dir`.

  documents: [(name, text)] in a fixed order; empty texts are dropped.
  overwrite=False keeps an `out_dir` that appeared meanwhile.
  """
  tok = tokenizers.get_tokenizer(tokenizer_name, cache_dir)
  kept = [(i, name, text) for i, (name, text) in enumerate(documents) if text]
  ids = tok.encode_batch([text for _, _, text in kept])
  is_val = split_documents([name for _, name, _ in kept], [groups[i] for i, _, _ in kept])
  splits = {"train": [], "validation": []}
  for (_, name, _), doc_ids, val in zip(kept, ids, is_val):
    splits["validation" if val else "train"].append((name, doc_ids))
  meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
          "sources": sources_meta}
  shards.write_corpus(out_dir, splits, meta, overwrite)
  return out_dir


def prepare_bundled(tokenizer_name: str = "byte", out_dir: str | Path | None = None,
                    cache_dir: str | Path | None = None, overwrite: bool = True) -> Path:
  """(Re)builds the bundled corpus; returns its directory."""
  root = sources.data_root(cache_dir)
  out = Path(out_dir) if out_dir else root / tokenizer_name
  shakespeare, shakespeare_version = sources.shakespeare_documents(root)
  kjv, kjv_version = sources.kjv_documents(root)
  docs = shakespeare + kjv
  meta = {"corpus": "bundled",
          "packages": {sources.SHAKESPEARE.dist: shakespeare_version,
                       sources.KJV.dist: kjv_version}}
  if tokenizer_name == "gpt2":
    meta["packages"][sources.WHISPER.dist] = sources.WHISPER.version
  groups = [name.split("/")[0] for name, _ in docs]
  return build(docs, groups, tokenizer_name, out, meta, cache_dir, overwrite)


def _text_dir_files(path: Path) -> list[Path]:
  files = sorted(p for p in path.rglob("*.txt") if p.is_file())
  if not files:
    raise ValueError(f"data.path={str(path)!r} holds no .txt files")
  return files


def _read_text_file(file: Path) -> bytes:
  """The bytes of a text_dir file: a binary one (NUL bytes) is refused, one that is
  not UTF-8 is decoded with U+FFFD replacement characters and a warning."""
  data = file.read_bytes()
  if b"\0" in data:
    raise ValueError(f"{file} (in data.path) looks binary (it has NUL bytes), not text:"
                     " remove it from the folder or rename it to something not .txt")
  try:
    data.decode("utf-8")
  except UnicodeDecodeError as e:
    logging.warning("%s is not UTF-8 (first bad byte at offset %d): its undecodable bytes"
                    " become U+FFFD replacement characters", file, e.start)
  return data


def text_dir_key(path: Path) -> str:
  """sha256 over the folder's absolute path and every .txt file's name + bytes."""
  h = hashlib.sha256(str(path.resolve()).encode())
  for file in _text_dir_files(path):
    data = file.read_bytes()
    h.update(f"\0{file.relative_to(path).as_posix()}\0{len(data)}\0".encode())
    h.update(data)
  return h.hexdigest()[:16]


def prepare_text_dir(path: str | Path, tokenizer_name: str, out_dir: Path,
                     cache_dir: str | Path | None = None, overwrite: bool = True) -> Path:
  """Prepares a folder of .txt files (one document each, recursive)."""
  path = Path(path)
  docs = [(f.relative_to(path).as_posix(), sources.clean_text(_read_text_file(f)))
          for f in _text_dir_files(path)]
  meta = {"corpus": "text_dir", "path": str(path.resolve())}
  return build(docs, ["text_dir"] * len(docs), tokenizer_name, out_dir, meta, cache_dir,
               overwrite)


def corpus_dir(data_cfg: ml_collections.ConfigDict) -> Path:
  """Prepared corpus directory for a (validated) data config, preparing it on
  first use."""
  root = sources.data_root(data_cfg.cache_dir or None)
  if data_cfg.corpus == "token_shards":
    out = Path(data_cfg.path).expanduser()
    manifest = shards.read_manifest(out)
    if manifest["tokenizer"] != data_cfg.tokenizer:
      raise ValueError(f"data.tokenizer={data_cfg.tokenizer!r} but {out} was tokenized "
                       f"with {manifest['tokenizer']!r}")
    return out
  if data_cfg.corpus == "text_dir":
    path = Path(data_cfg.path).expanduser()
    out = root / f"text_dir-{text_dir_key(path)}" / data_cfg.tokenizer
    if not (out / shards.MANIFEST).exists():
      prepare_text_dir(path, data_cfg.tokenizer, out, data_cfg.cache_dir or None,
                       overwrite=False)
    return out
  out = root / data_cfg.tokenizer
  if not (out / shards.MANIFEST).exists():
    prepare_bundled(data_cfg.tokenizer, out, data_cfg.cache_dir or None, overwrite=False)
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=None, help="output dir (default: cache)")
  parser.add_argument("--tokenizer", default="byte", choices=tokenizers.TOKENIZERS)
  parser.add_argument("--cache_dir", default=None, help="data root (default: "
                      f"${sources.ENV_DATA_DIR} or ~/.cache/gated_attention_jax/data)")
  args = parser.parse_args(argv)
  out = prepare_bundled(args.tokenizer, args.out, args.cache_dir)
  manifest = shards.read_manifest(out)
  for split, info in manifest["splits"].items():
    print(f"{split}: {info['documents']} documents, {info['tokens']} tokens")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()

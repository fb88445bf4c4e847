"""grain input pipeline: packed fixed-length windows of tokens.

Every batch is a dict of numpy arrays, B = per-process batch size, T = seq_len:

    inputs       (B, T) int32    token ids (pad_id on padding)
    targets      (B, T) int32    the next token of the same document
    segment_ids  (B, T) int32    1, 2, ... per segment in a row; 0 = padding
    positions    (B, T) int32    position inside the segment
    loss_mask    (B, T) float32  1 where `targets` is a real next token

Packing (`data.packing`):

* "segments": each document is [BOS] + its tokens. A document of n tokens
  gives n (input, target) pairs (its last token is never an input, so no target
  crosses into the next document), cut into pieces of T; a piece is a segment
  with positions 0..L-1 (a continuation piece has no BOS and restarts its
  positions at 0). Full pieces fill a window alone; the shorter last pieces of
  documents are packed together by best-fit decreasing, padding the rest.
* "windows": the stream [BOS] doc_0 [BOS] doc_1 ... is cut into consecutive
  blocks of T targets; the inputs are BOS followed by the block's first T-1
  tokens, so every window starts with BOS, is one segment with positions
  0..T-1, and has no padding (the stream's last partial block is dropped in
  training, padded in eval). A block that begins at a document start has that
  document's BOS as its first target.

The packing plan is fixed per corpus and T; `make_train_iterator` shuffles
whole windows (a new permutation each epoch). Multi-process: the global stream
of windows is cut into blocks of B; process p reads blocks p, p+P, p+2P, ...,
so the global batch at step i (B*P rows) is the concatenation over p = 0..P-1
of process p's batch i, and equals what one process with batch size B*P reads
at step i. Each process reads only its own windows.
"""

from __future__ import annotations

import bisect
import functools

import grain
import ml_collections
import numpy as np

from gated_attention_jax.data import config as config_lib
from gated_attention_jax.data import prepare
from gated_attention_jax.data import shards
from gated_attention_jax.data import synthetic
from gated_attention_jax.data import tokenizers

default_data_config = config_lib.default_data_config

Batch = dict[str, np.ndarray]


class TooManyBatches(ValueError):
  """More evaluation batches asked for than the validation split holds."""

  def __init__(self, available: int, message: str):
    super().__init__(message)
    self.available = available


def _best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
  """Packs item indices into bins of `capacity` (every length <= capacity)."""
  bins: list[list[int]] = []
  free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin)
  for item in np.argsort(-lengths, kind="stable"):
    size = int(lengths[item])
    k = bisect.bisect_left(free, (size, -1))
    if k < len(free):
      remaining, b = free.pop(k)
    else:
      remaining, b = capacity, len(bins)
      bins.append([])
    bins[b].append(int(item))
    if remaining - size > 0:
      bisect.insort(free, (remaining - size, b))
  return bins


class PackedWindows:
  """grain data source: window w -> dict of (T,) arrays (see module docstring)."""

  def __init__(self, split: shards.Split, seq_len: int, packing: str, bos_id: int,
               pad_id: int, include_partial: bool = False):
    self._split, self._t, self._packing = split, seq_len, packing
    self._bos, self._pad = bos_id, pad_id
    if packing == "segments":
      n = split.length
      per_doc = -(-n // seq_len)  # pieces per document
      self._piece_doc = np.repeat(np.arange(len(n)), per_doc)
      first = np.cumsum(per_doc) - per_doc
      self._piece_start = (np.arange(len(self._piece_doc)) - np.repeat(first, per_doc)) * seq_len
      self._piece_len = np.minimum(seq_len, n[self._piece_doc] - self._piece_start)
      # Window w < len(full) is the full piece full[w]; the others pack the tails, best fit.
      self._full = np.flatnonzero(self._piece_len == seq_len)
      tails = np.flatnonzero(self._piece_len < seq_len)
      self._bins = [[int(tails[i]) for i in b]
                    for b in _best_fit_decreasing(self._piece_len[tails], seq_len)]
    else:
      self._doc_offset = np.concatenate([[0], np.cumsum(split.length + 1)])
      total = int(self._doc_offset[-1])
      self._num = -(-total // seq_len) if include_partial else total // seq_len

  def __len__(self) -> int:
    return len(self._full) + len(self._bins) if self._packing == "segments" else self._num

  def _stream(self, a: int, b: int) -> np.ndarray:
    """Tokens a..b-1 of the stream [BOS] doc_0 [BOS] doc_1 ... (clipped at its end)."""
    out = []
    d = int(np.searchsorted(self._doc_offset, a, side="right")) - 1
    while d < self._split.num_documents and self._doc_offset[d] < b:
      lo = max(a - self._doc_offset[d], 0)
      hi = min(b - self._doc_offset[d], self._split.length[d] + 1)
      if lo == 0:
        out.append(np.array([self._bos]))
        lo = 1
      out.append(self._split.document(d)[lo - 1:hi - 1])
      d += 1
    return np.concatenate(out).astype(np.int32)

  def __getitem__(self, w: int) -> Batch:
    t = self._t
    row = {"inputs": np.full(t, self._pad, np.int32),
           "targets": np.full(t, self._pad, np.int32),
           "segment_ids": np.zeros(t, np.int32),
           "positions": np.zeros(t, np.int32),
           "loss_mask": np.zeros(t, np.float32)}
    if self._packing == "windows":
      pieces = [self._stream(w * t, (w + 1) * t)]
      inputs = [np.concatenate([[self._bos], pieces[0][:-1]])]
    else:
      pieces, inputs = [], []
      for p in ([int(self._full[w])] if w < len(self._full) else
                self._bins[w - len(self._full)]):
        doc = self._split.document(self._piece_doc[p])
        a, n = int(self._piece_start[p]), int(self._piece_len[p])
        pieces.append(np.asarray(doc[a:a + n], np.int32))
        inputs.append(np.asarray(doc[a - 1:a + n - 1], np.int32) if a else
                      np.concatenate([[self._bos], doc[:n - 1]]).astype(np.int32))
    offset = 0
    for segment, (inp, tgt) in enumerate(zip(inputs, pieces), start=1):
      span = slice(offset, offset + len(tgt))
      row["inputs"][span], row["targets"][span] = inp, tgt
      row["segment_ids"][span] = segment
      row["positions"][span] = np.arange(len(tgt))
      row["loss_mask"][span] = 1.0
      offset += len(tgt)
    return row


@functools.lru_cache(maxsize=8)
def _bigram_statistics(tokenizer: str, cache_dir: str, vocab: int) -> synthetic.BigramStatistics:
  """The Bigram-Backcopy chain, from the bundled corpus's train split under `tokenizer`."""
  directory = prepare.corpus_dir(ml_collections.ConfigDict(
      {"corpus": "bundled", "path": "", "tokenizer": tokenizer, "cache_dir": cache_dir}))
  return synthetic.bigram_statistics(shards.load_split(directory, "train"), vocab)


def synthetic_source(data_cfg: ml_collections.ConfigDict, split: str, seq_len: int
                     ) -> synthetic.BigramBackcopy | synthetic.PasskeyDocuments:
  """The synthetic task's source for `split` ("train" or "validation": separate streams)."""
  stream = synthetic.TRAIN_STREAM if split == "train" else synthetic.VALIDATION_STREAM
  if data_cfg.corpus == "passkey":
    return synthetic.PasskeyDocuments(
        tokenizers.get_tokenizer(data_cfg.tokenizer, data_cfg.cache_dir or None),
        seq_len=seq_len, key_digits=data_cfg.passkey.key_digits, seed=0, stream=stream,
        answer_only=data_cfg.passkey.answer_only)
  bb = data_cfg.bigram_backcopy
  stats = _bigram_statistics(data_cfg.tokenizer, data_cfg.cache_dir, bb.vocab)
  return synthetic.BigramBackcopy(stats, num_triggers=bb.triggers, seq_len=seq_len,
                                  bos=bb.bos, seed=0, stream=stream)


def _load(data_cfg: ml_collections.ConfigDict, split: str, seq_len: int,
          include_partial: bool = False
          ) -> PackedWindows | synthetic.BigramBackcopy | synthetic.PasskeyDocuments:
  """The split's windows; data_cfg must already be validated."""
  if data_cfg.corpus in config_lib.SYNTHETIC:
    return synthetic_source(data_cfg, split, seq_len)
  directory = prepare.corpus_dir(data_cfg)
  manifest = shards.read_manifest(directory)
  tok = tokenizers.get_tokenizer(data_cfg.tokenizer, data_cfg.cache_dir or None)
  source = PackedWindows(shards.load_split(directory, split), seq_len, data_cfg.packing,
                         manifest["bos_id"], tok.pad_id, include_partial)
  if not len(source):
    where = (f"data.path={data_cfg.path!r} (a text_dir needs 2 or more .txt files: whole"
             f" files go to validation)" if data_cfg.corpus == "text_dir" else str(directory))
    raise ValueError(f"The {split} split of {where} is empty or shorter than one window of"
                     f" data.seq_len={seq_len} tokens")
  return source


def vocab_size(data_cfg: ml_collections.ConfigDict) -> int:
  """Number of token ids the model must embed (BOS/PAD included), from the config, the
  tokenizer or a shard manifest: no corpus is read or built (`experiment.validate` calls it)."""
  config_lib.validate(data_cfg)
  if data_cfg.corpus == "token_shards":
    return int(shards.read_manifest(prepare.corpus_dir(data_cfg))["vocab_size"])
  tokenizer_vocab = tokenizers.get_tokenizer(data_cfg.tokenizer,
                                             data_cfg.cache_dir or None).vocab_size
  if data_cfg.corpus != "bigram_backcopy":
    return tokenizer_vocab
  vocab = data_cfg.bigram_backcopy.vocab  # the task's own ids: known from the config
  if vocab > tokenizer_vocab:  # the corpus's distinct tokens are checked when it is built
    raise ValueError(f"data.bigram_backcopy.vocab={vocab} but tokenizer"
                     f" {data_cfg.tokenizer!r} has only {tokenizer_vocab} token ids")
  return synthetic.bigram_backcopy_vocab_size(vocab)


def make_train_iterator(data_cfg: ml_collections.ConfigDict, *, batch_size: int, seed: int,
                        process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Infinite iterator of (batch_size, T) train batches for this process.

  Windows are shuffled with `seed` (reshuffled each epoch) when data.shuffle;
  `get_state()` / `set_state()` checkpoint and restore the position exactly.
  """
  config_lib.validate(data_cfg)
  if batch_size < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need batch_size >= 1 and 0 <= process_index < process_count, got "
                     f"{batch_size=}, {process_index=}, {process_count=}")
  ds = grain.MapDataset.source(_load(data_cfg, "train", data_cfg.seq_len))
  if data_cfg.shuffle:
    ds = ds.seed(seed).shuffle()
  ds = ds.repeat().batch(batch_size, drop_remainder=True)
  ds = ds[process_index::process_count]
  read = grain.ReadOptions(num_threads=min(data_cfg.prefetch, 4),
                           prefetch_buffer_size=data_cfg.prefetch)
  return iter(ds.to_iter_dataset(read))


def _pad_rows(batch: Batch, batch_size: int, pad_id: int) -> Batch:
  """Pads a short last batch to batch_size rows of padding."""
  missing = batch_size - len(batch["inputs"])
  fill = {"inputs": pad_id, "targets": pad_id}
  return {k: np.concatenate([v, np.full((missing,) + v.shape[1:], fill.get(k, 0), v.dtype)])
          for k, v in batch.items()}


def make_eval_batches(data_cfg: ml_collections.ConfigDict, *, batch_size: int,
                      num_batches: int | None = None,
                      seq_len: int | None = None) -> grain.MapDataset:
  """Deterministic (batch_size, T) batches over the validation split, in order.

  T = seq_len or data.seq_len. num_batches=None covers every validation
  window once (the last batch padded with empty rows); a larger num_batches
  than the split holds is a ValueError. The result is re-iterable and has len().
  """
  config_lib.validate(data_cfg)
  t = data_cfg.seq_len if seq_len is None else seq_len
  if t < 2 or batch_size < 1:
    raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {t=}, {batch_size=}")
  source = _load(data_cfg, "validation", t, include_partial=True)
  if data_cfg.corpus in config_lib.SYNTHETIC:
    if num_batches is None:
      raise ValueError(f"data.corpus={data_cfg.corpus!r} is an endless stream: give"
                       " num_batches for its validation batches")
    pad_id = source.pad_id
  else:
    pad_id = tokenizers.get_tokenizer(data_cfg.tokenizer, data_cfg.cache_dir or None).pad_id
  ds = grain.MapDataset.source(source).batch(batch_size, drop_remainder=False)
  ds = ds.map(functools.partial(_pad_rows, batch_size=batch_size, pad_id=pad_id))
  if num_batches is not None:
    if not 0 < num_batches <= len(ds):
      raise TooManyBatches(len(ds), f"num_batches must be in [1, {len(ds)}] (validation"
                           f" batches of {batch_size}x{t}), got {num_batches}")
    ds = ds[:num_batches]
  return ds

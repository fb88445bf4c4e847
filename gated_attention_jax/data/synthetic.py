"""Synthetic tasks generated on the fly: seeded, infinite, grain data sources.

Bigram-Backcopy (Guo et al. 2024, "Active-Dormant Attention Heads", §2; their
`BBM/data.py`, task `bbm`). Over a vocabulary of V ordinary tokens plus BOS:

* the ordinary tokens are the V most frequent tokens of the bundled corpus
  (train split) under `data.tokenizer`; bigram statistics P(next | current)
  over consecutive pairs of those tokens give a Markov chain (the published
  recipe: the 65 characters of Shakespeare, bigrams from Shakespeare);
* the k most frequent tokens are *triggers* (' ', 'e', 't' for bytes);
* a sequence is [BOS], then a first token drawn from the unigram marginal with
  the triggers removed, then: after a trigger, the token *before* the trigger
  (back-copy); after any other token, a draw from the bigram chain.

Every trigger is preceded by an ordinary token (the first token is not a trigger,
and a back-copy repeats a token that preceded a trigger), so sequences never
lock into trigger cycles. An attention head must copy the previous token at
triggers and do nothing elsewhere; transformers learn the "nothing" as attention
on BOS with a near-zero value: an attention sink, with massive residual norms on
BOS in deeper models (Guo et al. Figs. 2-4).

Task token ids: 0..V-1 ordinary tokens by falling frequency (so triggers are
0..k-1), V = BOS, V+1 = PAD; `BigramBackcopy.vocab_size` = V + 2.
`BigramStatistics.tokens` maps task ids back to tokenizer ids for decoding.

Passkey retrieval documents (Mohtashami & Jaggi 2023, shortened): [BOS], filler
text ("The grass is green. ..."), at a random depth the needle "The pass key is
48213. Remember it.", more filler, the question "What is the pass key? The pass key is" and
the answer " 48213", in the tokens of `data.tokenizer`; `passkey_document` builds
one (the retrieval instrument, `analysis/retrieval.py`, asks the same question
without the answer). A model trained on them must learn to copy the key.

Sequence i of stream s is drawn from `np.random.default_rng([seed, s, i])`:
any index gives the same sequence in any process, at any time, so grain's
shuffling, sharding and checkpointed iterator state work unchanged.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from gated_attention_jax.data import shards
from gated_attention_jax.data.tokenizers import Tokenizer

NUM_SEQUENCES = 2**40  # "infinite": far more than any run draws
TRAIN_STREAM, VALIDATION_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class BigramStatistics:
  """The Markov chain of the task, over V ordinary tokens."""

  tokens: np.ndarray  # (V,) tokenizer ids, most frequent first
  transitions: np.ndarray  # (V, V) float64, rows sum to 1: P(next | current)
  marginal: np.ndarray  # (V,) unigram frequencies of the tokens (pairs' first element)

  @property
  def vocab(self) -> int:
    return len(self.tokens)


def bigram_statistics(split: shards.Split, vocab: int) -> BigramStatistics:
  """Bigram chain of the `vocab` most frequent tokens of `split`.

  Pairs are consecutive tokens inside a document with both among the `vocab`
  most frequent; a token with no such successor gets the marginal as its row.
  """
  docs = [np.asarray(split.document(d), np.int64) for d in range(split.num_documents)]
  counts = np.bincount(np.concatenate(docs))
  if np.count_nonzero(counts) < vocab:
    raise ValueError(f"data.bigram_backcopy.vocab={vocab} but the corpus has only"
                     f" {np.count_nonzero(counts)} distinct tokens")
  tokens = np.argsort(-counts, kind="stable")[:vocab]
  task_id = np.full(len(counts), -1, np.int64)
  task_id[tokens] = np.arange(vocab)
  pairs = np.zeros(vocab * vocab, np.int64)
  for doc in docs:
    ids = task_id[doc]
    a, b = ids[:-1], ids[1:]
    keep = (a >= 0) & (b >= 0)
    pairs += np.bincount(a[keep] * vocab + b[keep], minlength=vocab * vocab)
  pairs = pairs.reshape(vocab, vocab).astype(np.float64)
  marginal = pairs.sum(axis=1) / pairs.sum()
  rows = pairs.sum(axis=1, keepdims=True)
  transitions = np.where(rows > 0, pairs / np.maximum(rows, 1), marginal[None, :])
  return BigramStatistics(tokens=tokens.astype(np.int32), transitions=transitions,
                          marginal=marginal)


def bigram_backcopy_vocab_size(vocab: int) -> int:
  """Token ids of the Bigram-Backcopy task over `vocab` ordinary tokens: those, BOS and PAD."""
  return vocab + 2


class BigramBackcopy:
  """grain data source: index i -> one row of the Bigram-Backcopy task.

  Rows have the pipeline's keys (see `pipeline`): inputs/targets `(T,)`, one
  segment, positions 0..T-1, every target in the loss. With `bos`, inputs start
  with BOS; without it the sequence starts at its first ordinary token.
  """

  def __init__(self, stats: BigramStatistics, *, num_triggers: int, seq_len: int,
               bos: bool, seed: int, stream: int = TRAIN_STREAM):
    if not 1 <= num_triggers < stats.vocab:
      raise ValueError(f"data.bigram_backcopy.triggers must be in [1, {stats.vocab}), got"
                       f" {num_triggers}")
    self.stats, self.num_triggers = stats, num_triggers
    self.seq_len, self.bos, self.seed, self.stream = seq_len, bos, seed, stream
    self.bos_id, self.pad_id = stats.vocab, stats.vocab + 1
    first = stats.marginal.copy()
    first[:num_triggers] = 0.0
    self._first_cdf = list(np.cumsum(first / first.sum()))
    self._cdf = [list(np.cumsum(row)) for row in stats.transitions]

  @property
  def vocab_size(self) -> int:
    return bigram_backcopy_vocab_size(self.stats.vocab)

  def __len__(self) -> int:
    return NUM_SEQUENCES

  def _draw(self, cdf: list[float], u: float) -> int:
    return min(bisect.bisect_right(cdf, u * cdf[-1]), len(cdf) - 1)

  def sequence(self, index: int) -> np.ndarray:
    """`(T + 1,)` tokens of sequence `index`: inputs are [:-1], targets [1:]."""
    n = self.seq_len + 1
    u = np.random.default_rng([self.seed, self.stream, int(index)]).random(n).tolist()
    seq = [self.bos_id] if self.bos else []
    seq.append(self._draw(self._first_cdf, u[0]))
    k = self.num_triggers
    while len(seq) < n:
      x = seq[-1]
      seq.append(seq[-2] if x < k else self._draw(self._cdf[x], u[len(seq)]))
    return np.asarray(seq, np.int32)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return _row(self.sequence(index))

  def trigger_mask(self, inputs: np.ndarray) -> np.ndarray:
    """True where the input token is a trigger (its target is a back-copy)."""
    return np.asarray(inputs) < self.num_triggers

  def decode(self, ids: np.ndarray) -> list[int]:
    """Task ids -> tokenizer ids (BOS and PAD dropped)."""
    ids = np.asarray(ids)
    return self.stats.tokens[ids[ids < self.stats.vocab]].tolist()


def _row(seq: np.ndarray, loss_from: int = 0) -> dict[str, np.ndarray]:
  """The pipeline's row keys for a `(T + 1,)` one-segment sequence; targets from
  index `loss_from` on are in the loss."""
  t = seq.size - 1
  return {"inputs": seq[:-1], "targets": seq[1:],
          "segment_ids": np.ones(t, np.int32), "positions": np.arange(t, dtype=np.int32),
          "loss_mask": (np.arange(t) >= loss_from).astype(np.float32)}


PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and"
                  " back again. ")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. "
PASSKEY_QUESTION = " What is the pass key? The pass key is"
PASSKEY_ANSWER = " {key}"


def passkey_answer(tokenizer: Tokenizer, key: str, vocab_size: int) -> np.ndarray:
  """The answer's tokens (" KEY"); ValueError naming `key` if it does not round-trip."""
  answer = PASSKEY_ANSWER.format(key=key)
  ids = tokenizer.encode(answer)
  if not key or not key.strip() or tokenizer.decode(ids) != answer or (
      ids.size and ids.max() >= vocab_size):
    raise ValueError(f"key {key!r} cannot be tokenized by the {tokenizer.name!r} tokenizer"
                     f" within the model's {vocab_size} tokens")
  return ids


def passkey_document(tokenizer: Tokenizer, length: int, depth: float, key: str, *,
                     vocab_size: int, bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(prompt `(length,)`, answer `(A,)`) token ids: the needle after `depth` of the filler."""
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must be in [0, 1], got {depth!r}")
  answer = passkey_answer(tokenizer, key, vocab_size)
  needle = tokenizer.encode(PASSKEY_NEEDLE.format(key=key))
  question = tokenizer.encode(PASSKEY_QUESTION)
  fill = length - int(bos) - needle.size - question.size
  if fill < 0:
    raise ValueError(f"length {length} is too short for the needle and question"
                     f" ({length - fill} tokens)")
  filler = tokenizer.encode(PASSKEY_FILLER)
  stream = np.tile(filler, fill // max(filler.size, 1) + 1)[:fill]
  before = int(round(depth * fill))
  parts = [[tokenizer.bos_id]] if bos else []
  parts += [stream[:before], needle, stream[before:], question]
  return np.concatenate(parts).astype(np.int32), answer


class PasskeyDocuments:
  """grain data source: index i -> one passkey document of `seq_len + 1` tokens.

  A random `key_digits`-digit key at a uniformly random depth, the answer last
  (so its tokens are the last targets). Rows as `BigramBackcopy`'s; with
  `answer_only` only the answer's targets are in the loss.
  """

  def __init__(self, tokenizer: Tokenizer, *, seq_len: int, key_digits: int, seed: int,
               stream: int = TRAIN_STREAM, answer_only: bool = False):
    self.tokenizer, self.seq_len, self.key_digits = tokenizer, seq_len, key_digits
    self.answer_only = answer_only
    self.seed, self.stream = seed, stream
    self.bos_id, self.pad_id = tokenizer.bos_id, tokenizer.pad_id
    self.vocab_size = tokenizer.vocab_size

  def __len__(self) -> int:
    return NUM_SEQUENCES

  def sequence(self, index: int) -> tuple[np.ndarray, int]:
    """`(T + 1,)` tokens of document `index` (inputs [:-1], targets [1:]) and the
    answer's length."""
    rng = np.random.default_rng([self.seed, self.stream, int(index)])
    key = "".join(map(str, rng.integers(0, 10, self.key_digits)))
    answer = passkey_answer(self.tokenizer, key, self.vocab_size)
    prompt, _ = passkey_document(self.tokenizer, self.seq_len + 1 - answer.size, rng.random(),
                                 key, vocab_size=self.vocab_size)
    return np.concatenate([prompt, answer]).astype(np.int32), answer.size

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    seq, answer = self.sequence(index)
    return _row(seq, self.seq_len - answer if self.answer_only else 0)

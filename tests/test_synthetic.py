"""Bigram-Backcopy (data/synthetic.py): the chain, the sequences, the pipeline, the configs.

Numbers are checked against independent numpy counts: a hand-made corpus for the
chain, and empirical frequencies of generated sequences against the chain.
"""

from __future__ import annotations

from collections import Counter

import ml_collections
import numpy as np
import pytest

from configs import ablation, sinks
from gated_attention_jax.training import experiment
from gated_attention_jax.data import config as config_lib
from gated_attention_jax.data import pipeline
from gated_attention_jax.data import prepare
from gated_attention_jax.data import shards
from gated_attention_jax.data import synthetic
from gated_attention_jax.gate import GateConfig

V, K = 65, 3  # the published task: 65 ordinary tokens, 3 triggers
BOS, PAD = V, V + 1
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def _split(docs: list[list[int]]) -> shards.Split:
  """A Split holding `docs` back to back in one shard."""
  lengths = np.array([len(d) for d in docs], np.int64)
  return shards.Split(shards=(np.concatenate([np.asarray(d) for d in docs]).astype(np.uint16),),
                      shard=np.zeros(len(docs), np.int32),
                      start=np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
                      length=lengths, names=())


def _data_cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = config_lib.default_data_config()
  cfg.update(corpus="bigram_backcopy", seq_len=16, prefetch=0)
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="module")
def byte_split() -> shards.Split:
  """The bundled corpus's train split, byte tokens (already prepared in the cache)."""
  return shards.load_split(prepare.corpus_dir(_data_cfg()), "train")


@pytest.fixture(scope="module")
def byte_stats(byte_split) -> synthetic.BigramStatistics:
  return synthetic.bigram_statistics(byte_split, V)


# ---------------------------------------------------------------- the chain


def test_bigram_statistics_of_a_hand_made_corpus():
  # Counts: 5 x4, 7 x2, 2 x1, 9 x1 -> with vocab 3 the tokens are 5, 7, 2 (2 before 9:
  # ties keep the smaller id). Pairs inside documents with both ends kept:
  # (5,5) (5,7) (7,5) (5,2) in doc 0, (7,5) in doc 1 ((5,9) drops 9; the pair
  # (2,7) across the document boundary is not a pair). Token 2 has no successor.
  docs = [[5, 5, 7, 5, 2], [7, 5, 9]]
  stats = synthetic.bigram_statistics(_split(docs), 3)
  np.testing.assert_array_equal(stats.tokens, [5, 7, 2])
  assert stats.vocab == 3
  marginal = np.array([3, 2, 0]) / 5  # first elements of the 5 pairs
  np.testing.assert_allclose(stats.marginal, marginal, rtol=0, atol=1e-15)
  np.testing.assert_allclose(stats.transitions,
                             [[1 / 3, 1 / 3, 1 / 3], [1, 0, 0], marginal], rtol=0, atol=1e-15)


def test_bigram_statistics_match_an_independent_count(byte_split, byte_stats):
  docs = [np.asarray(byte_split.document(d)) for d in range(byte_split.num_documents)]
  counts = Counter(np.concatenate(docs).tolist())
  ranked = sorted(counts, key=lambda t: (-counts[t], t))[:V]
  np.testing.assert_array_equal(byte_stats.tokens, ranked)
  assert bytes(byte_stats.tokens[:K].tolist()) == b" et"  # the documented triggers
  index = {t: i for i, t in enumerate(ranked)}
  pairs = np.zeros((V, V))
  for doc in docs:
    for a, b in zip(doc[:-1].tolist(), doc[1:].tolist()):
      if a in index and b in index:
        pairs[index[a], index[b]] += 1
  assert (pairs.sum(1) > 0).all()  # every byte row has successors: no marginal rows
  np.testing.assert_allclose(byte_stats.transitions, pairs / pairs.sum(1, keepdims=True),
                             rtol=1e-12, atol=0)
  np.testing.assert_allclose(byte_stats.marginal, pairs.sum(1) / pairs.sum(), rtol=1e-12)


def test_asking_for_more_tokens_than_the_corpus_has_raises():
  with pytest.raises(ValueError, match=r"data\.bigram_backcopy\.vocab=5"):
    synthetic.bigram_statistics(_split([[1, 2, 3, 4, 1]]), 5)
  with pytest.raises(ValueError, match=r"data\.bigram_backcopy\.vocab=300"):
    pipeline.vocab_size(_data_cfg(bigram_backcopy=dict(vocab=300, triggers=3, bos=True)))


def test_source_rejects_bad_trigger_counts(byte_stats):
  for k in (0, V):
    with pytest.raises(ValueError, match=r"data\.bigram_backcopy\.triggers"):
      synthetic.BigramBackcopy(byte_stats, num_triggers=k, seq_len=8, bos=True, seed=0)


# ---------------------------------------------------------------- the sequences


def _sequences(stats, n: int, *, bos: bool = True, seed: int = 0, stream: int = 0,
               seq_len: int = 256) -> np.ndarray:
  src = synthetic.BigramBackcopy(stats, num_triggers=K, seq_len=seq_len, bos=bos, seed=seed,
                                 stream=stream)
  return np.stack([src.sequence(i) for i in range(n)])


def test_sequences_follow_the_task_rules(byte_stats):
  for bos in (True, False):
    seqs = _sequences(byte_stats, 300, bos=bos)
    assert seqs.shape == (300, 257) and seqs.dtype == np.int32
    body = seqs[:, 1:] if bos else seqs
    if bos:
      assert (seqs[:, 0] == BOS).all()
    assert ((body >= 0) & (body < V)).all()  # no BOS / PAD after the start
    assert (body[:, 0] >= K).all()  # the first ordinary token is never a trigger
    x, y = body[:, :-1], body[:, 1:]
    trigger = x < K
    assert trigger.sum() > 5000  # ~1/3 of the tokens: the rule below is exercised
    # After a trigger at j the next token is the one at j-1 (j >= 1: body[0] is no trigger).
    np.testing.assert_array_equal(body[:, 2:][trigger[:, 1:]], body[:, :-2][trigger[:, 1:]])
    assert not (trigger & (y < K)).any()  # triggers never follow each other
    # Everywhere else the step is a transition of the chain.
    assert (byte_stats.transitions[x[~trigger], y[~trigger]] > 0).all()


def test_sequences_are_a_function_of_seed_stream_and_index(byte_stats):
  a = synthetic.BigramBackcopy(byte_stats, num_triggers=K, seq_len=64, bos=True, seed=3)
  b = synthetic.BigramBackcopy(byte_stats, num_triggers=K, seq_len=64, bos=True, seed=3)
  np.testing.assert_array_equal(a.sequence(12345), b.sequence(12345))
  np.testing.assert_array_equal(a.sequence(2**39), b.sequence(2**39))  # far indices too
  assert not np.array_equal(a.sequence(7), a.sequence(8))
  for other in (dict(seed=4), dict(stream=synthetic.VALIDATION_STREAM)):
    c = synthetic.BigramBackcopy(byte_stats, num_triggers=K, seq_len=64, bos=True,
                                 **{"seed": 3, **other})
    assert not np.array_equal(a.sequence(7), c.sequence(7)), other
  # A row is the sequence split into inputs and next-token targets.
  seq, row = a.sequence(5), a[5]
  np.testing.assert_array_equal(row["inputs"], seq[:-1])
  np.testing.assert_array_equal(row["targets"], seq[1:])
  np.testing.assert_array_equal(row["positions"], np.arange(64))
  assert (row["segment_ids"] == 1).all() and (row["loss_mask"] == 1).all()
  assert len(a) >= 2**40 and a.vocab_size == V + 2
  np.testing.assert_array_equal(a.trigger_mask(seq), seq < K)
  assert bytes(a.decode(seq)) == bytes(byte_stats.tokens[seq[1:]].tolist())  # BOS dropped


def _assert_frequencies(counts: np.ndarray, p: np.ndarray, what: str) -> None:
  """Empirical frequencies counts/n against probabilities p, cell by cell.

  Tolerance: 5 binomial standard errors, sqrt(p(1-p)/n), with the variance floored
  at 1/n so that a cell of tiny p may still be hit a few times.
  """
  n = counts.sum()
  tol = 5 * np.sqrt(np.maximum(p * (1 - p), 1 / n) / n)
  err = np.abs(counts / n - p)
  assert (err <= tol).all(), (what, n, np.max(err / tol))


def test_empirical_frequencies_match_the_chain(byte_stats):
  seqs = _sequences(byte_stats, 1000, bos=True)[:, 1:]  # 1000 x 256 ordinary tokens
  # First tokens: the marginal without the triggers, renormalised.
  first = byte_stats.marginal.copy()
  first[:K] = 0
  _assert_frequencies(np.bincount(seqs[:, 0], minlength=V), first / first.sum(), "first")
  # Next-token frequencies of the 4 most frequent non-trigger rows.
  x, y = seqs[:, :-1].ravel(), seqs[:, 1:].ravel()
  rows = np.bincount(x[x >= K], minlength=V).argsort()[::-1][:4]
  for a in rows:
    counts = np.bincount(y[x == a], minlength=V)
    assert counts.sum() > 8000
    _assert_frequencies(counts, byte_stats.transitions[a], f"row {a}")


# ---------------------------------------------------------------- the pipeline


def test_train_iterator_rows(byte_stats):
  it = pipeline.make_train_iterator(_data_cfg(), batch_size=4, seed=0)
  batch = next(it)
  assert set(batch) == set(KEYS)
  for key in ("inputs", "targets", "segment_ids", "positions"):
    assert batch[key].shape == (4, 16) and batch[key].dtype == np.int32, key
  assert batch["loss_mask"].dtype == np.float32
  np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
  assert (batch["inputs"][:, 0] == BOS).all()
  assert (batch["segment_ids"] == 1).all() and (batch["loss_mask"] == 1).all()
  np.testing.assert_array_equal(batch["positions"], np.broadcast_to(np.arange(16), (4, 16)))
  # Unshuffled, the rows are sequences 0..3 of the train stream of a source built by hand.
  it = pipeline.make_train_iterator(_data_cfg(shuffle=False), batch_size=4, seed=0)
  src = synthetic.BigramBackcopy(byte_stats, num_triggers=K, seq_len=16, bos=True, seed=0)
  for step in range(2):
    batch = next(it)
    for r in range(4):
      np.testing.assert_array_equal(batch["inputs"][r], src[4 * step + r]["inputs"])
      np.testing.assert_array_equal(batch["targets"][r], src[4 * step + r]["targets"])


def test_train_iterator_resumes_and_depends_on_the_seed():
  cfg = _data_cfg()
  it = pipeline.make_train_iterator(cfg, batch_size=4, seed=0)
  first = [next(it) for _ in range(2)]
  state = it.get_state()
  rest = [next(it)["inputs"] for _ in range(3)]
  resumed = pipeline.make_train_iterator(cfg, batch_size=4, seed=0)
  resumed.set_state(state)
  for a in rest:
    np.testing.assert_array_equal(next(resumed)["inputs"], a)
  other = pipeline.make_train_iterator(cfg, batch_size=4, seed=1)
  assert not np.array_equal(next(other)["inputs"], first[0]["inputs"])


def test_eval_batches_are_the_validation_stream(byte_stats):
  cfg = _data_cfg()
  with pytest.raises(ValueError, match="num_batches"):
    pipeline.make_eval_batches(cfg, batch_size=4)
  batches = pipeline.make_eval_batches(cfg, batch_size=4, num_batches=2)
  assert len(batches) == 2
  again = list(pipeline.make_eval_batches(cfg, batch_size=4, num_batches=2))
  val = synthetic.BigramBackcopy(byte_stats, num_triggers=K, seq_len=16, bos=True, seed=0,
                                 stream=synthetic.VALIDATION_STREAM)
  train = synthetic.BigramBackcopy(byte_stats, num_triggers=K, seq_len=16, bos=True, seed=0)
  for b, (batch, same) in enumerate(zip(batches, again)):
    np.testing.assert_array_equal(batch["inputs"], same["inputs"])  # deterministic
    for r in range(4):
      np.testing.assert_array_equal(batch["inputs"][r], val[4 * b + r]["inputs"])
      assert not np.array_equal(batch["inputs"][r], train[4 * b + r]["inputs"])
  # A different length draws the same sequences, cut shorter.
  short = pipeline.make_eval_batches(cfg, batch_size=4, num_batches=1, seq_len=8)[0]
  np.testing.assert_array_equal(short["inputs"], batches[0]["inputs"][:, :8])


def test_vocab_size_and_no_bos():
  assert pipeline.vocab_size(_data_cfg()) == V + 2
  assert pipeline.vocab_size(_data_cfg(bigram_backcopy=dict(vocab=10, triggers=2,
                                                            bos=True))) == 12
  cfg = _data_cfg(bigram_backcopy=dict(vocab=V, triggers=K, bos=False))
  batch = next(pipeline.make_train_iterator(cfg, batch_size=4, seed=0))
  assert (batch["inputs"] < V).all() and (batch["targets"] < V).all()
  assert (batch["inputs"][:, 0] >= K).all()


def test_gpt2_tokens_give_their_own_chain():
  cfg = _data_cfg(tokenizer="gpt2")
  assert pipeline.vocab_size(cfg) == V + 2
  split = shards.load_split(prepare.corpus_dir(cfg), "train")
  counts = np.bincount(np.concatenate([split.document(d) for d in range(split.num_documents)]))
  stats = synthetic.bigram_statistics(split, V)
  np.testing.assert_array_equal(stats.tokens, np.argsort(-counts, kind="stable")[:V])
  assert stats.tokens.max() > 255  # GPT-2 ids, not bytes
  batch = next(pipeline.make_train_iterator(cfg, batch_size=4, seed=0))
  x, y = batch["inputs"][:, 1:], batch["targets"][:, 1:]  # after BOS
  assert (stats.transitions[x[x >= K], y[x >= K]] > 0).all()
  np.testing.assert_array_equal(y[x < K], batch["inputs"][:, :-1][x < K])  # back-copies


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("field, value, message", [
    ("vocab", 0, r"data\.bigram_backcopy\.vocab"),
    ("vocab", "65", r"data\.bigram_backcopy\.vocab"),
    ("vocab", True, r"data\.bigram_backcopy\.vocab"),
    ("triggers", 0, r"data\.bigram_backcopy\.triggers"),
    ("triggers", 2.0, r"data\.bigram_backcopy\.triggers"),
    ("triggers", V, r"data\.bigram_backcopy\.triggers \(65\) must be smaller"),
    ("bos", 1, r"data\.bigram_backcopy\.bos"),
])
def test_bad_bigram_backcopy_config_raises(field, value, message):
  fields = _data_cfg().to_dict()  # a plain dict: ConfigDict would refuse a new type
  fields["bigram_backcopy"][field] = value
  cfg = ml_collections.ConfigDict(fields)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(cfg)


def test_synthetic_corpus_takes_no_path():
  config_lib.validate(_data_cfg())
  with pytest.raises(ValueError, match=r"data\.path"):
    config_lib.validate(_data_cfg(path="/tmp"))


@pytest.mark.parametrize("setting", sorted(sinks.SETTINGS))
def test_every_sinks_config_validates(setting):
  for variant in sinks.VARIANTS:
    config = sinks.get_config(f"{variant},{setting}")
    model = experiment.validate(config, 1)
    assert model.gate == GateConfig.from_dict(ablation.VARIANTS[variant][0])
    assert model.gate.enabled == (variant != "baseline")
    assert config.train.track_sinks and config.train.grad_clip == 0
    assert model.num_layers == (3 if setting == "layers_3" else 1)
    gpt2_stack = ("learned", "layernorm", "relu")
    assert (model.position_embedding, model.norm_type, model.mlp_type) == (
        ("rope", "rmsnorm", "swiglu") if setting == "qwen_stack" else gpt2_stack)
    if setting == "bundled_text":  # the data factor: natural text, vocab rounded up
      assert config.data.corpus == "bundled" and model.vocab_size % 128 == 0
      continue
    assert config.data.corpus == "bigram_backcopy"
    assert model.vocab_size == V + 2  # kept exact, not rounded to 128
    assert config.data.bigram_backcopy.bos == (setting != "no_bos")
    assert config.data.tokenizer == ("gpt2" if setting == "bpe" else "byte")


@pytest.mark.parametrize("arg", ["baseline", "nope,testbed", "baseline,nope",
                                 "baseline,testbed,extra"])
def test_unknown_sinks_config_names_raise(arg):
  with pytest.raises(ValueError):
    sinks.get_config(arg)


def test_learned_positions_must_cover_seq_len():
  config = sinks.get_config("baseline,testbed")
  config.data.seq_len = config.model.max_positions + 1
  with pytest.raises(ValueError, match=r"model\.max_positions"):
    experiment.validate(config, 1)
  config.model.update(position_embedding="rope", max_positions=0)  # no table: any length
  experiment.validate(config, 1)

"""The data config (`config.data` in the training configs) and its validation."""

from __future__ import annotations

import ml_collections

from gated_attention_jax.data.tokenizers import TOKENIZERS

CORPORA = ("bundled", "text_dir", "token_shards", "bigram_backcopy", "passkey")
SYNTHETIC = ("bigram_backcopy", "passkey")  # generated on the fly (see data/synthetic.py)
PACKINGS = ("segments", "windows")


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults: the bundled corpus, byte tokens, 512-token packed documents."""
  return ml_collections.ConfigDict({
      "corpus": "bundled",  # one of CORPORA
      "path": "",  # folder for text_dir / token_shards; "" for bundled and synthetic
      "tokenizer": "byte",  # one of TOKENIZERS
      "seq_len": 512,  # T
      "packing": "segments",  # one of PACKINGS
      "shuffle": True,
      "prefetch": 2,  # batches prefetched by background threads; 0 = none
      "cache_dir": "",  # "" = $GATED_ATTENTION_DATA or ~/.cache/gated_attention_jax/data
      # corpus "bigram_backcopy": the task's chain is estimated from the bundled corpus
      # under `tokenizer`; packing does not apply (every row is one sequence).
      "bigram_backcopy": {
          "vocab": 65,  # ordinary tokens: the most frequent tokens of the bundled corpus
          "triggers": 3,  # the most frequent tokens back-copy
          "bos": True,  # sequences start with BOS
      },
      # corpus "passkey": passkey-retrieval documents of seq_len + 1 tokens under `tokenizer`
      "passkey": {
          "key_digits": 5,  # digits of each document's random key
          "answer_only": False,  # only the answer's tokens in the loss
      },
  })


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field and what it may be."""
  for field, allowed in (("corpus", CORPORA), ("tokenizer", TOKENIZERS),
                         ("packing", PACKINGS)):
    if cfg.get(field) not in allowed:
      raise ValueError(f"data.{field} must be one of {allowed}, got {cfg.get(field)!r}")
  for field in ("path", "cache_dir"):
    if not isinstance(cfg.get(field), str):
      raise ValueError(f"data.{field} must be a str, got {cfg.get(field)!r}")
  if (cfg.corpus in ("bundled",) + SYNTHETIC) != (cfg.path == ""):
    raise ValueError(f"data.path must be '' for corpus 'bundled'/'bigram_backcopy'/'passkey' and a"
                     f" folder for 'text_dir'/'token_shards', got {cfg.path!r} with "
                     f"corpus {cfg.corpus!r}")
  if not _is_int(cfg.get("seq_len")) or cfg.seq_len < 2:
    raise ValueError(f"data.seq_len must be an int >= 2, got {cfg.get('seq_len')!r}")
  if not isinstance(cfg.get("shuffle"), bool):
    raise ValueError(f"data.shuffle must be a bool, got {cfg.get('shuffle')!r}")
  if not _is_int(cfg.get("prefetch")) or cfg.prefetch < 0:
    raise ValueError(f"data.prefetch must be an int >= 0, got {cfg.get('prefetch')!r}")
  if cfg.corpus == "bigram_backcopy":
    _validate_bigram_backcopy(cfg.get("bigram_backcopy") or {})
  if cfg.corpus == "passkey":
    passkey = cfg.get("passkey") or {}
    if not _is_int(passkey.get("key_digits")) or passkey.get("key_digits") < 1:
      raise ValueError(f"data.passkey.key_digits must be a positive int, got"
                       f" {passkey.get('key_digits')!r}")
    if not isinstance(passkey.get("answer_only"), bool):
      raise ValueError(f"data.passkey.answer_only must be a bool, got"
                       f" {passkey.get('answer_only')!r}")


def _validate_bigram_backcopy(bb) -> None:
  for field in ("vocab", "triggers"):
    if not _is_int(bb.get(field)) or bb.get(field) < 1:
      raise ValueError(f"data.bigram_backcopy.{field} must be a positive int, got"
                       f" {bb.get(field)!r}")
  if bb["triggers"] >= bb["vocab"]:
    raise ValueError(f"data.bigram_backcopy.triggers ({bb['triggers']}) must be smaller"
                     f" than data.bigram_backcopy.vocab ({bb['vocab']})")
  if not isinstance(bb.get("bos"), bool):
    raise ValueError(f"data.bigram_backcopy.bos must be a bool, got {bb.get('bos')!r}")

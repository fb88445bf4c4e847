"""Passkey retrieval (Mohtashami & Jaggi 2023): does the model find a key hidden in filler?

A document (`data.synthetic.passkey_document`) is BOS, filler text ("The grass is green. The sky is blue. ..."), at a
chosen depth the needle "The pass key is 48213. Remember it.", more filler, and
the question "What is the pass key? The pass key is" (Mohtashami & Jaggi's text, shortened
for byte-level models with short contexts);
the model answers by greedy decoding, and a row is right when its first tokens
are exactly " 48213". `retrieval_accuracy` measures this per length (multiples
of the training length) x depth x RoPE scaling method, the retrieval form of
the paper's long-context claim (Table 5) that perplexity alone does not test.
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional, Sequence

import numpy as np
from flax import nnx

from gated_attention_jax import rope
from gated_attention_jax.analysis import run_analysis
from gated_attention_jax.data import synthetic
from gated_attention_jax.data.tokenizers import Tokenizer, get_tokenizer
from gated_attention_jax.sampler import generate
from gated_attention_jax.transformer import Transformer

DEPTHS = (0.1, 0.5, 0.9)


def retrieval_accuracy(model: Transformer, tokenizer: Tokenizer, *, train_len: int,
                       multiples: Sequence[int] = run_analysis.MULTIPLES,
                       depths: Sequence[float] = DEPTHS,
                       methods: Sequence[str] = rope.ROPE_SCALING_METHODS,
                       num_keys: int = 4, key_digits: int = 5, seed: int = 0,
                       bos: bool = True, keys: Optional[Sequence[str]] = None
                       ) -> dict[str, Any]:
  """Greedy passkey accuracy per RoPE method, length k x train_len and needle depth.

  Each document, answer included, is k x train_len tokens long.
  The model runs as a float32 "xla" copy with `run_analysis.rope_scaling_for(...,
  method, k, train_len)`; `num_keys` random `key_digits`-digit keys (or `keys`)
  per cell. As in `long_context_perplexity`, a model without RoPE gets method
  "none" only and a learned position table limits the lengths.
  Returns {"train_len", "depths", "multiples", "keys", "accuracy": {method: {str(k):
  {str(depth): fraction}}}, "mean": {method: {str(k): fraction over depths}}}.
  """
  cfg = run_analysis.analysis_config(model.config)
  if cfg.position_embedding != "rope":
    methods = [m for m in methods if m == "none"]
  if keys is None:
    rng = np.random.default_rng(seed)
    keys = ["".join(map(str, rng.integers(0, 10, key_digits))) for _ in range(num_keys)]
  state = run_analysis.float32_state(model)
  longest = cfg.max_positions if cfg.position_embedding == "learned" else None
  multiples = [k for k in sorted(multiples) if longest is None or k * train_len <= longest]
  width = max(synthetic.passkey_answer(tokenizer, key, cfg.vocab_size).size for key in keys)
  out: dict[str, Any] = {"train_len": train_len, "depths": list(depths),
                         "multiples": multiples, "keys": list(keys), "accuracy": {}, "mean": {}}
  for method in methods:
    out["accuracy"][method], out["mean"][method] = {}, {}
    for k in multiples:
      scaling = run_analysis.rope_scaling_for(cfg.rope_scaling, method, k, train_len)
      scaled = nnx.merge(run_analysis.graphdef_of(cfg.replace(rope_scaling=scaling)), state)
      by_depth = {}
      for depth in depths:
        docs = [synthetic.passkey_document(tokenizer, k * train_len - width + 1, depth, key,
                                           vocab_size=cfg.vocab_size, bos=bos) for key in keys]
        got = generate(scaled, [p for p, _ in docs], width).tokens
        by_depth[str(depth)] = float(np.mean(
            [np.array_equal(row[:a.size], a) for row, (_, a) in zip(got, docs)]))
      out["accuracy"][method][str(k)] = by_depth
      out["mean"][method][str(k)] = float(np.mean(list(by_depth.values())))
  return out


def run_retrieval(workdir: run_analysis.PathLike, step: Optional[int] = None,
                  **kwargs: Any) -> dict[str, Any]:
  """`retrieval_accuracy` of a run folder's checkpoint with its tokenizer and training
  length (`data.seq_len`); writes workdir/retrieval.json. kwargs go to retrieval_accuracy."""
  config, restored_step, model = run_analysis.load_run(workdir, step)
  tokenizer = get_tokenizer(config.data.tokenizer, config.data.cache_dir or None)
  result = retrieval_accuracy(model, tokenizer, train_len=config.data.seq_len, **kwargs)
  result.update(workdir=str(workdir), step=restored_step)
  run_analysis.write_json(result, pathlib.Path(workdir) / "retrieval.json")
  return result

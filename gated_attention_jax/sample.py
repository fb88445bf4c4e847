"""Samples text from a trained run or an official checkpoint.

  python -m gated_attention_jax.sample --workdir=RUN --prompt="ROMEO:" --prompt="And God" \
      --num_samples=2 --max_new_tokens=200 --temperature=0.8 --top_p=0.95 --seed=0
  python -m gated_attention_jax.sample --checkpoint=DIR --prompt_file=prompts.txt

A run's prompts are tokenized with its own tokenizer (`data.tokenizer`) and start
with BOS as its training documents do; a row ends after `--max_new_tokens` or at
the next BOS (the start of another document). An official checkpoint directory
(`config.json` + safetensors, loaded by `interop.load_official`) uses its own
`tokenizer.json` (`data.tokenizers.CheckpointTokenizer`; or `--tokenizer=byte|gpt2`),
no BOS, and stops at its eos ids (`generation_config.json` / `config.json`).
`--temperature=0` decodes greedily. Prints each prompt's samples.
"""

from __future__ import annotations

import pathlib
from typing import Optional, Sequence

import jax
from absl import app, flags

from gated_attention_jax import console
from gated_attention_jax import interop
from gated_attention_jax.data import tokenizers
from gated_attention_jax.sampler import generate
from gated_attention_jax.training import checkpointing
from gated_attention_jax.transformer import Transformer

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (config.json, checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Run checkpoint step (default: the newest).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Official checkpoint directory (instead of --workdir).")
_TOKENIZER = flags.DEFINE_enum("tokenizer", None, tokenizers.TOKENIZERS,
                               "Tokenizer for --checkpoint instead of its tokenizer.json (a run"
                               " uses its own).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat for several.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "A file with one prompt per line.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 100, "Tokens generated per sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass, in (0, 1].")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")


def load_model(workdir: Optional[str] = None, checkpoint: Optional[str] = None, *,
               step: Optional[int] = None, tokenizer: Optional[str] = None
               ) -> tuple[Transformer, tokenizers.Tokenizer, bool]:
  """(model, tokenizer, whether prompts start with BOS) of a run or an official checkpoint.

  tokenizer: for a checkpoint, one of `tokenizers.TOKENIZERS` instead of its own
  tokenizer.json (None); a run always uses its `data.tokenizer`.
  """
  if (workdir is None) == (checkpoint is None):
    raise ValueError("pass exactly one of workdir (a training run) and checkpoint (an official"
                     " checkpoint directory)")
  if workdir is not None:
    if tokenizer is not None:
      raise ValueError(f"tokenizer={tokenizer!r} applies to a checkpoint: a run (workdir) is"
                       " sampled with its own data.tokenizer")
    config, _, model = checkpointing.load_model(workdir, step)
    return (model, tokenizers.get_tokenizer(config.data.tokenizer, config.data.cache_dir or None),
            True)
  tok = (tokenizers.CheckpointTokenizer(checkpoint) if tokenizer is None
         else tokenizers.get_tokenizer(tokenizer))
  return interop.load_official(checkpoint), tok, False


def complete(model: Transformer, tokenizer: tokenizers.Tokenizer, prompts: Sequence[str], *,
             bos: bool, num_samples: int = 1, max_new_tokens: int = 100,
             temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, seed: int = 0) -> list[list[str]]:
  """`num_samples` continuations (text) of each prompt, all decoded in one batch."""
  if not prompts:
    raise ValueError("prompts is empty: pass at least one prompt")
  if num_samples <= 0:
    raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
  prefix = [tokenizer.bos_id] if bos else []
  stop = [tokenizer.bos_id] if bos else list(tokenizer.eos_ids)
  rows = [prefix + tokenizer.encode(p).tolist() for p in prompts for _ in range(num_samples)]
  sampling = temperature != 0
  out = generate(model, rows, max_new_tokens, key=jax.random.key(seed) if sampling else None,
                 temperature=temperature if sampling else 1.0, top_k=top_k, top_p=top_p,
                 stop_tokens=stop, pad_id=tokenizer.pad_id)
  texts = [tokenizer.decode(row[:n]) for row, n in zip(out.tokens, out.lengths)]
  return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_libraries()
  prompts = list(_PROMPT.value)
  if _PROMPT_FILE.value:
    prompts += [line for line in pathlib.Path(_PROMPT_FILE.value).read_text().splitlines()
                if line]
  if not prompts:
    raise app.UsageError("pass --prompt (repeatable) or --prompt_file")
  with console.one_line_errors(ValueError, FileNotFoundError, checkpointing.CheckpointError):
    model, tokenizer, bos = load_model(_WORKDIR.value, _CHECKPOINT.value, step=_STEP.value,
                                       tokenizer=_TOKENIZER.value)
  samples = complete(model, tokenizer, prompts, bos=bos, num_samples=_NUM_SAMPLES.value,
                     max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                     top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value)
  for prompt, texts in zip(prompts, samples):
    for i, text in enumerate(texts):
      print(f"=== prompt {prompt!r}, sample {i}\n{prompt}{text}")


if __name__ == "__main__":
  app.run(main)

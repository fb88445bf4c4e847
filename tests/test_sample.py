"""The sampling CLI and `load_run` on a tiny trained run and an exported official checkpoint."""

import pathlib
import re
import subprocess
import sys

import pytest
from flax import nnx

import gated_attention_jax as gaj
from gated_attention_jax import interop, sample
from tests.conftest import randomize_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tiny_run):
  return tiny_run


def test_load_run_is_public(workdir):
  config, step, model = gaj.load_run(workdir)
  assert step == 6 and isinstance(model, gaj.Transformer)
  assert model.config == gaj.TransformerConfig.from_dict(
      {**config.model.to_dict(), "vocab_size": model.config.vocab_size}, config.gate.to_dict())


def test_cli_samples_from_a_run(workdir, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("And God said\n\nROMEO:\n")
  result = subprocess.run(
      [sys.executable, "-m", "gated_attention_jax.sample", f"--workdir={workdir}",
       "--prompt=To be", f"--prompt_file={prompts}", "--num_samples=2", "--max_new_tokens=8",
       "--temperature=0.8", "--top_k=20", "--top_p=0.9", "--seed=1"],
      check=True, cwd=ROOT, capture_output=True, text=True)
  headers = [l for l in result.stdout.splitlines() if l.startswith("=== prompt")]
  assert len(headers) == 6 and "'ROMEO:', sample 1" in headers[-1]
  # Libraries' INFO logs (orbax logs each restore) stay off the console.
  assert not re.search(r"^I\d{4} ", result.stderr, re.M), result.stderr[-2000:]


def test_complete_from_an_official_checkpoint_is_greedy_generate(tmp_path):
  cfg = gaj.TransformerConfig(vocab_size=258, d_model=32, num_layers=1, num_heads=4,
                              num_kv_heads=2, head_dim=8, mlp_dim=48,
                              gate=gaj.GateConfig(position="sdpa"))
  model = gaj.Transformer(cfg, rngs=nnx.Rngs(0))
  randomize_params(model, 1, scale=0.5)
  interop.export_official(model, tmp_path)
  loaded, tok, bos = sample.load_model(checkpoint=str(tmp_path), tokenizer="byte")
  assert not bos
  texts = sample.complete(loaded, tok, ["ab", "hello"], bos=False, max_new_tokens=4,
                          temperature=0.0)
  want = gaj.generate(model, [tok.encode("ab"), tok.encode("hello")], 4, pad_id=tok.pad_id)
  assert texts == [[tok.decode(row)] for row in want.tokens]
  with pytest.raises(ValueError, match="exactly one of workdir"):
    sample.load_model()


def write_bpe_tokenizer(directory: pathlib.Path) -> None:
  """A small byte-level BPE tokenizer.json (the format of Qwen3's), trained here."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["the pass key is 48213. remember it."] * 20, trainer)
  tok.save(str(directory / "tokenizer.json"))


def test_checkpoint_is_sampled_with_its_own_tokenizer_and_eos(tmp_path):
  write_bpe_tokenizer(tmp_path)
  cfg = gaj.TransformerConfig(vocab_size=320, d_model=32, num_layers=1, num_heads=4,
                              num_kv_heads=2, head_dim=8, mlp_dim=48)
  model = gaj.Transformer(cfg, rngs=nnx.Rngs(0))
  randomize_params(model, 2, scale=0.5)
  interop.export_official(model, tmp_path)
  tok = sample.load_model(checkpoint=str(tmp_path))[1]
  assert tok.name == "checkpoint" and tok.vocab_size == 320 and tok.eos_ids == ()
  text = "the pass key is 48213."
  assert tok.decode(tok.encode(text)) == text and len(tok.encode(text)) < len(text)
  # The eos id from generation_config.json ends a row: make it the third greedy token.
  prompt = tok.encode("the key")
  greedy = gaj.generate(model, [prompt], 6).tokens[0]
  (tmp_path / "generation_config.json").write_text(f'{{"eos_token_id": [{int(greedy[2])}]}}')
  loaded, tok, bos = sample.load_model(checkpoint=str(tmp_path))
  assert tok.eos_ids == (int(greedy[2]),) and tok.pad_id == int(greedy[2]) and not bos
  texts = sample.complete(loaded, tok, ["the key"], bos=False, max_new_tokens=6,
                          temperature=0.0)
  assert texts == [[tok.decode(greedy[:3])]]
  result = subprocess.run(
      [sys.executable, "-m", "gated_attention_jax.sample", f"--checkpoint={tmp_path}",
       "--prompt=the key", "--max_new_tokens=6", "--temperature=0"],
      check=True, cwd=ROOT, capture_output=True, text=True)
  assert result.stdout.splitlines()[1:] == f"the key{texts[0][0]}".splitlines()


def test_checkpoint_tokenizer_bad_input(tmp_path, workdir):
  with pytest.raises(FileNotFoundError, match=r"has no tokenizer.json: pass tokenizer= one of"
                     r" \('byte', 'gpt2'\)"):
    sample.load_model(checkpoint=str(tmp_path))
  with pytest.raises(ValueError, match="tokenizer='gpt2' applies to a checkpoint"):
    sample.load_model(workdir, tokenizer="gpt2")

"""The sampling CLI and `load_run` on a tiny trained run and an exported official checkpoint."""

import pathlib
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

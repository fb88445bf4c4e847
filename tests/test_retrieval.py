"""Passkey retrieval: the documents, the scoring and the per-run instrument."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import gated_attention_jax as gaj
from gated_attention_jax.analysis import retrieval
from gated_attention_jax.data import synthetic
from gated_attention_jax.data.tokenizers import ByteTokenizer
from gated_attention_jax.sampler import Generation

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_hides_the_key_at_its_depth(depth):
  prompt, answer = synthetic.passkey_document(TOK, 300, depth, "40917", vocab_size=258)
  text = TOK.decode(prompt)
  assert prompt.size == 300 and prompt[0] == TOK.bos_id
  assert text.endswith(synthetic.PASSKEY_QUESTION) and TOK.decode(answer) == " 40917"
  needle = text.index(synthetic.PASSKEY_NEEDLE.format(key="40917"))
  filler = 300 - 1 - len(synthetic.PASSKEY_NEEDLE.format(key="40917")) - len(synthetic.PASSKEY_QUESTION)
  assert needle == round(depth * filler)
  assert text.count("40917") == 1  # the needle, not the question


@pytest.mark.parametrize("kwargs,message", [
    (dict(key=""), "key '' cannot be tokenized"),
    (dict(key="12é", vocab_size=150), "key .12é. cannot be tokenized .* 150 tokens"),
    (dict(depth=1.5), r"depth must be in \[0, 1\]"),
    (dict(length=60), "length 60 is too short"),
])
def test_bad_passkey_arguments_name_the_argument(kwargs, message):
  args = {"length": 300, "depth": 0.5, "key": "123", "vocab_size": 258, **kwargs}
  with pytest.raises(ValueError, match=message):
    synthetic.passkey_document(TOK, **args)


def test_accuracy_scores_exact_answers_per_method_and_length(monkeypatch):
  """With a generate that reads the key off the needle, every cell is 1; wrong
  answers score 0; each method and length gets its own RoPE scaling."""
  seen = []

  def oracle(model, prompts, max_new_tokens):
    seen.append((model.config.rope_scaling, len(prompts[0])))
    rows = []
    for prompt in prompts:
      text = TOK.decode(prompt)
      key = text.split("The pass key is ")[1].split(".")[0]
      row = TOK.encode(" " + key)
      rows.append(row if key != "00000" else row[::-1])  # one wrong answer
    return Generation(tokens=np.stack(rows), lengths=np.full(len(rows), max_new_tokens))

  monkeypatch.setattr(retrieval, "generate", oracle)
  model = gaj.Transformer(gaj.TransformerConfig(vocab_size=258, d_model=16, num_layers=1,
                                                num_heads=1, num_kv_heads=1, head_dim=16,
                                                mlp_dim=16), rngs=nnx.Rngs(0))
  out = retrieval.retrieval_accuracy(model, TOK, train_len=100, multiples=(1, 4),
                                     depths=(0.2, 0.8), keys=["12345", "00000"])
  assert out["mean"] == {m: {"1": 0.5, "4": 0.5} for m in ("none", "linear", "ntk", "yarn")}
  assert out["accuracy"]["yarn"]["4"] == {"0.2": 0.5, "0.8": 0.5}
  scalings = {(s.method, s.factor, s.original_max_len, n) for s, n in seen}
  assert ("yarn", 4.0, 100, 400 - 6 + 1) in scalings and ("none", 1.0, 100, 100 - 6 + 1) in scalings
  assert len(scalings) == 4 + 1  # every method is plain RoPE at 1x


def test_analyze_cli_writes_retrieval_json(tiny_run):
  subprocess.run(
      [sys.executable, "-m", "gated_attention_jax.analyze", f"--workdir={tiny_run}",
       "--retrieval_only", "--multiples=4,8", "--rope_methods=none,yarn",
       "--retrieval_depths=0.5", "--retrieval_keys=2"],
      check=True, cwd=ROOT, capture_output=True)
  out = json.loads((tiny_run / "retrieval.json").read_text())
  assert out["step"] == 6 and out["train_len"] == 32 and len(out["keys"]) == 2
  assert not (tiny_run / "analysis.json").exists()  # --retrieval_only: nothing else
  for by_k in out["accuracy"].values():
    assert set(by_k) == {"4", "8"} and all(0 <= a <= 1 for d in by_k.values() for a in d.values())


def test_passkey_corpus_rows_end_with_the_answer_copied_from_the_needle():
  from configs import long_context  # pylint: disable=g-import-not-at-top
  from gated_attention_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  data = long_context.get_config("baseline,testbed").data
  batch = next(pipeline.make_train_iterator(data, batch_size=4, seed=0))
  assert batch["inputs"].shape == (4, 128) and (batch["inputs"][:, 0] == TOK.bos_id).all()
  np.testing.assert_array_equal(batch["loss_mask"][:, -7:], [[0] + [1] * 6] * 4)
  assert batch["loss_mask"].sum() == 4 * 6  # answer_only: " " and the 5 digits
  for inputs, targets in zip(batch["inputs"], batch["targets"]):
    text = TOK.decode(np.append(inputs, targets[-1]))
    key = text.split("The pass key is ")[1][:5]
    assert key.isdigit() and text.endswith(synthetic.PASSKEY_QUESTION + " " + key)
  again = pipeline.make_eval_batches(data, batch_size=4, num_batches=1)[0]
  np.testing.assert_array_equal(again["inputs"],
                                pipeline.make_eval_batches(data, batch_size=4,
                                                           num_batches=1)[0]["inputs"])

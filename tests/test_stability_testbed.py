"""The stability testbed: per-step activation tracking, its configs, and its summarizer on
fabricated runs; and that the committed tables are what the summarizer makes of the
committed run files."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gated_attention_jax as gaj
from configs import ablation, stability
from experiments import paper_results
from experiments.stability import summarize_stability
from gated_attention_jax import attention_ops
from gated_attention_jax.training import experiment, train
from tests.test_train import read_metrics, tiny_config

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "results" / "stability"


def test_activation_stats_match_numpy():
  cfg = gaj.TransformerConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=8, mlp_dim=48, qk_norm=False)
  model = gaj.Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 61, size=(2, 9)))
  _, inter = model(tokens, return_intermediates=True)
  stats = train.activation_stats(inter, attention_ops.make_mask(2, 9, 9, causal=True))
  for layer in range(2):
    h = np.asarray(inter["hidden_states"][layer])
    q = np.asarray(inter["queries"][layer])
    k = np.repeat(np.asarray(inter["keys"][layer]), 2, axis=2)  # kv head j serves q 2j, 2j+1
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(8)
    causal = np.tril(np.ones((9, 9), bool))
    np.testing.assert_allclose(stats["activation_max_per_layer"][layer], np.abs(h).max(),
                               rtol=1e-6)
    np.testing.assert_allclose(stats["attention_logit_max_per_layer"][layer],
                               logits[:, :, causal].max(), rtol=1e-5)


def test_track_activations_logs_every_layer(tmp_path: pathlib.Path):
  assert not experiment.base_config().train.track_activations  # off by default
  train.train_and_evaluate(tiny_config(num_steps=3, log_every=1, track_activations=True),
                           tmp_path)
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3]
  for key in ("activation_max_per_layer", "attention_logit_max_per_layer"):
    assert all(len(r[key]) == 2 and all(np.isfinite(r[key])) for r in rows), key


def test_configs():
  config = stability.get_config("sdpa_headwise,testbed,0.02")
  assert config.train.learning_rate == 0.02 and config.train.track_activations
  assert config.train.log_every == 1 and config.gate.granularity == "headwise"
  for setting in stability.SETTINGS:
    stability.get_config(f"baseline,{setting},0.01")
  scale = stability.get_config("baseline,smoke,0.03")  # an ablation scale, its lr replaced
  expected = ablation.make_config("baseline", "smoke")
  expected.train.learning_rate = 0.03
  assert scale.to_dict() == expected.to_dict()
  for bad in ("baseline,testbed", "baseline,nowhere,0.01", "nogate,testbed,0.01",
              "baseline,testbed,-1"):
    with pytest.raises(ValueError):
      stability.get_config(bad)


def _write_run(folder: pathlib.Path, losses: list[float], finished: bool = True,
               eval_loss: float = 2.0) -> None:
  folder.mkdir(parents=True)
  rows = [{"step": i + 1, "loss": loss, "tokens_per_sec": 1024.0, "loss_spikes": i // 10,
           "activation_max_per_layer": [1.0, 10.0 * (i + 1)],
           "attention_logit_max_per_layer": [3.0, 2.0]} for i, loss in enumerate(losses)]
  (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  if finished:
    (folder / "summary.json").write_text(json.dumps(
        {"finished": True, "eval_loss": eval_loss, "eval_perplexity": np.exp(eval_loss)}))
  (folder / "config.json").write_text(json.dumps(
      {"train": {"batch_size": 16}, "data": {"seq_len": 64}}))


def test_summarizer_counts_divergence_and_gaps(tmp_path: pathlib.Path):
  root = tmp_path / "stability"
  smooth = [3.0 - 0.05 * i for i in range(20)]
  spiked = [3.0 - 0.05 * i for i in range(10)] + [6.0] * 10  # 10-step means: 2.775 -> 6.0
  _write_run(root / "testbed/baseline_lr0.01/seed0", smooth, eval_loss=2.0)
  _write_run(root / "testbed/baseline_lr0.01/seed1", smooth, eval_loss=2.2)
  _write_run(root / "testbed/sdpa_elementwise_lr0.01/seed0", smooth, eval_loss=1.7)
  _write_run(root / "testbed/sdpa_elementwise_lr0.01/seed1", smooth, eval_loss=1.8)
  _write_run(root / "testbed/baseline_lr0.03/seed0", spiked)  # finished, not recovered
  _write_run(root / "testbed/baseline_lr0.03/seed1", smooth[:7], finished=False)  # stopped
  _write_run(root / "testbed/sdpa_elementwise_lr0.03/seed0", smooth, eval_loss=1.6)
  table = summarize_stability.summarize_grid(root, tmp_path / "out")
  cells = {(r["variant"], r["lr"]): r for r in table}

  assert [(r["variant"], r["lr"]) for r in table] == [
      ("baseline", 0.01), ("baseline", 0.03), ("sdpa_elementwise", 0.01),
      ("sdpa_elementwise", 0.03)]
  base = cells[("baseline", 0.01)]
  assert base["diverged"] == "0/2" and base["eval_loss"] == pytest.approx(2.1)
  assert base["eval_loss_std"] == pytest.approx(np.std([2.0, 2.2], ddof=1))
  assert base["loss_spikes"] == 1 and base["peak_max_activation"] == 200.0
  assert base["peak_attention_logit"] == 3.0
  assert base["run_minutes"] == pytest.approx(20 * 1024 / 1024 / 60)
  unstable = cells[("baseline", 0.03)]
  assert unstable["diverged"] == "2/2" and unstable["eval_loss"] is None
  assert unstable["final_max_activation"] == pytest.approx((200.0 + 70.0) / 2)

  md = (tmp_path / "out" / "stability.md").read_text()
  gated = cells[("sdpa_elementwise", 0.01)]
  assert gated["delta_vs_baseline"] == pytest.approx(-0.35)
  assert gated["beyond_spread"] == "yes"  # 0.35 > 0.141 + 0.0707
  assert cells[("sdpa_elementwise", 0.03)]["delta_vs_baseline"] is None  # no baseline left
  assert base["delta_vs_baseline"] is None
  assert "| testbed | sdpa_elementwise | 0.01 | 0/2 | 2 | 1.75 |" in md
  assert "| 48L, 400B tokens | baseline | 0.008 | 9.195 |" in md
  assert len(paper_results.TABLE2) == 6
  assert (tmp_path / "out" / "stability_testbed.png").stat().st_size > 10_000


@pytest.mark.skipif(not (RESULTS / "runs").exists(), reason="no committed stability results")
def test_committed_results_regenerate(tmp_path: pathlib.Path):
  summarize_stability.summarize_grid(RESULTS / "runs", tmp_path, plots=False)
  for name in ("stability.md", "stability.csv"):
    assert (tmp_path / name).read_text() == (RESULTS / name).read_text(), name

"""The analysis command and API end to end on a tiny trained run."""

import json
import math
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from gated_attention_jax import analysis as an
from gated_attention_jax.analysis import run_analysis
from gated_attention_jax.data import pipeline
from gated_attention_jax.gate import GateConfig
from gated_attention_jax.transformer import Transformer, TransformerConfig
from tests import test_train

ROOT = pathlib.Path(__file__).resolve().parents[1]
BATCHES = 2
SELECTED = 2


def tiny_config() -> ml_collections.ConfigDict:
  """test_train's tiny model, 6 steps with one evaluation and one checkpoint at the end."""
  return test_train.tiny_config(num_steps=6, log_every=3, eval_every=6, eval_batches=BATCHES,
                                checkpoint_every=6)


def intermediates(model: Transformer, batches) -> list[dict]:
  out = []
  for batch in batches:
    _, inter = model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                     jnp.asarray(batch["segment_ids"]), return_intermediates=True)
    out.append({k: np.stack([np.asarray(a) for a in v]) for k, v in inter.items()})
  return out


def cat(inters: list[dict], key: str) -> np.ndarray:
  return np.concatenate([i[key] for i in inters], axis=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_run):
  """tiny_config's run (conftest's session run, copied), analysed."""
  workdir = tmp_path_factory.mktemp("run") / "run"
  shutil.copytree(tiny_run, workdir, ignore=shutil.ignore_patterns("analysis*", "retrieval*"))
  config = tiny_config()
  summary = json.loads((workdir / "summary.json").read_text())
  result = run_analysis.analyze_run(workdir, num_batches=BATCHES, long_context_batches=BATCHES,
                                    selectivity_sequences=SELECTED)
  return config, workdir, summary, result


def test_json_has_the_documented_keys_and_matches_the_return_value(run):
  _, workdir, summary, result = run
  on_disk = json.loads((workdir / "analysis.json").read_text())
  assert on_disk == json.loads(json.dumps(result))
  for key in ("first_token_attention", "sink_rate", "max_activation", "gate_score_mean",
              "gate_score_median", "gate_score_fraction_below"):
    assert isinstance(result[key], float) and math.isfinite(result[key]), key
  assert isinstance(result["massive_activation_count"], int)
  assert result["step"] == summary["step"] == 6
  assert not list(workdir.glob("*.tmp"))


def test_values_equal_the_metric_functions_applied_directly(run):
  config, workdir, _, result = run
  _, _, model = run_analysis.load_run(workdir)
  windows = ml_collections.ConfigDict(config.data.to_dict())
  windows.packing = "windows"
  batches = list(pipeline.make_eval_batches(windows, batch_size=4, num_batches=BATCHES))
  inters = intermediates(model, batches)
  sinks = intermediates(model, pipeline.make_eval_batches(windows, batch_size=100,
                                                          num_batches=1, seq_len=64))
  probs = cat(inters, "attention_probs")
  assert probs.shape == (2, 4 * BATCHES, 4, 32, 32)
  assert sinks[0]["attention_probs"].shape == (2, 100, 4, 64, 64)
  # Every window starts with BOS at position 0.
  assert all((b["positions"][:, 0] == 0).all() and (b["segment_ids"] == 1).all() for b in batches)

  f_attn = an.first_token_attention(probs)
  np.testing.assert_allclose(result["first_token_attention"], f_attn["first_token_attention"],
                             rtol=1e-6)
  np.testing.assert_allclose(result["first_token"]["per_head"], f_attn["per_head"], rtol=1e-6)
  sink = an.sink_rate(sinks[0]["attention_probs"], eps=0.3)
  assert result["sink_rate"] == sink["sink_rate"]
  np.testing.assert_allclose(result["sink"]["alpha_first"], sink["alpha_first"], rtol=1e-6)
  acts = an.massive_activations(cat(inters, "hidden_states"))
  np.testing.assert_allclose(result["max_activation"], acts["max_activation"], rtol=1e-6)
  assert result["massive_activation_count"] == acts["massive_count"]
  gates = an.gate_statistics(list(cat(inters, "gate_scores")))
  for key in ("gate_score_mean", "gate_score_median"):
    np.testing.assert_allclose(result[key], gates[key], rtol=1e-6)
  assert result["gate_statistics"]["histogram"]["counts"] == gates["histogram"]["counts"]

  first = inters[0]
  select = an.attention_selectivity(first["attention_probs"][:, :SELECTED],
                                    first["values"][:, :SELECTED], run_analysis.FRACTIONS)
  for key in ("distance", "f1", "mean_precision", "mean_recall"):
    np.testing.assert_allclose(result["selectivity"][key], select[key], rtol=1e-5, atol=1e-7)
  logits = np.log(first["attention_probs"][:, :SELECTED, :, -1, :].astype(np.float64))
  curve = an.jacobian_norm_curve(logits, run_analysis.TEMPERATURES)
  for key in ("spectral", "frobenius", "max_abs", "spectral_bound"):
    np.testing.assert_allclose(result["jacobian"][key], curve[key], rtol=1e-5)
  jac = result["jacobian"]
  assert jac["within_bounds"] and 0 < jac["max_ratio_spectral_to_bound"] <= 1 + 1e-9
  assert 0 < jac["max_ratio_max_abs_to_bound"] <= 1 + 1e-9

  # The softmax weight bound, rebuilt head by head from the model's own q and k:
  # the last query of layer 1, head 3 (kv head 1 of 2), logits q.k / sqrt(H).
  q = first["queries"][1, :SELECTED, -1, 3]  # (B, H)
  k = first["keys"][1, :SELECTED, :, 1]  # (B, S, H)
  alpha = first["attention_probs"][1, :SELECTED, 3, -1, :]  # (B, S)
  np.testing.assert_allclose(alpha, an.softmax_weights(q, k, np.sqrt(q.shape[-1])), rtol=1e-4,
                             atol=1e-7)  # float32 model vs float64 softmax
  assert an.weights_within_bounds(alpha, q, k, np.sqrt(q.shape[-1]), rtol=1e-6)
  bounds = result["weight_bounds"]
  assert bounds["within_bounds"]
  assert bounds["max_ratio_to_upper"] <= 1 and bounds["min_ratio_to_lower"] >= 1
  assert bounds["log_bound_width_mean"] > 0


def test_long_context_perplexity(run):
  _, _, summary, result = run
  lc = result["long_context"]
  assert lc["train_len"] == 32 and lc["multiples"] == [1, 2, 4, 8]
  assert set(lc["perplexity"]) == {"none", "linear", "ntk", "yarn"}
  # At 1x these are training's own evaluation batches: its eval perplexity, bit for bit or nearly.
  np.testing.assert_allclose(lc["perplexity"]["none"]["1"], summary["eval_perplexity"],
                             rtol=1e-5)
  for method, by_length in lc["perplexity"].items():
    assert set(by_length) == {"1", "2", "4", "8"}
    assert all(math.isfinite(v) and v > 1 for v in by_length.values()), method
  # Different methods really change the model beyond the training length.
  assert len({round(lc["perplexity"][m]["8"], 6) for m in lc["perplexity"]}) == 4
  assert lc["tokens"]["1"] == BATCHES * 4 * 32


def test_plots_are_written(run):
  _, workdir, _, result = run
  names = {"first_token_attention", "max_activation", "gate_histogram", "perplexity_vs_length",
           "selectivity_distance", "distinguishability", "jacobian_norm",
           "attention_map_layer0_head0",
           "attention_map_layer1_head0"}
  assert names <= set(result["plots"])
  for rel in result["plots"].values():
    path = workdir / rel
    assert path.parent == workdir / "analysis" and path.suffix == ".png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def ungated_model_and_batch() -> tuple[Transformer, dict]:
  cfg = TransformerConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                          head_dim=8, mlp_dim=32, attention_impl="xla",
                          gate=GateConfig(position="none"))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, 64, (2, 16), dtype=np.int32),
           "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)),
           "segment_ids": np.ones((2, 16), np.int32)}
  return model, batch


def analyze_ungated(out_dir: pathlib.Path) -> dict:
  model, batch = ungated_model_and_batch()
  return an.analyze_model(model, [batch], sink_batches=[batch], out_dir=out_dir)


def test_padded_sink_windows_are_refused(tmp_path):
  model, batch = ungated_model_and_batch()
  padded = {**batch, "segment_ids": np.concatenate(
      [batch["segment_ids"][:1], np.zeros_like(batch["segment_ids"][1:])])}
  with pytest.raises(ValueError, match="without padding"):
    an.analyze_model(model, [batch], sink_batches=[padded], out_dir=tmp_path)


def test_ungated_model_has_no_gate_keys(tmp_path):
  result = analyze_ungated(tmp_path / "baseline")
  assert "gate_score_mean" not in result and "gate_histogram" not in result["plots"]
  assert result["label"] == "baseline" and "long_context" not in result
  on_disk = json.loads((tmp_path / "baseline" / "analysis.json").read_text())
  assert on_disk["sink_rate"] == result["sink_rate"]


def test_compare_overlays_gated_and_ungated_runs(run, tmp_path):
  _, workdir, _, _ = run
  analyze_ungated(tmp_path / "baseline")
  pngs = an.compare_runs([workdir, tmp_path / "baseline"], tmp_path / "compare")
  assert set(pngs) == {"first_token_attention", "max_activation", "selectivity_distance",
                       "distinguishability", "gate_histogram", "perplexity_vs_length"}
  assert all(p.parent == tmp_path / "compare" and p.stat().st_size > 0 for p in pngs.values())


def test_cli_writes_the_analysis(run, tmp_path):
  _, workdir, _, _ = run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("analysis*"))
  subprocess.run(
      [sys.executable, "-m", "gated_attention_jax.analyze", f"--workdir={copy}", "--step=6",
       "--num_batches=1", "--long_context_batches=1", "--multiples=1,2",
       "--rope_methods=none,yarn", "--map_layers=1", "--map_heads=2,3",
       f"--compare={workdir}"],
      check=True, cwd=ROOT, capture_output=True)
  result = json.loads((copy / "analysis.json").read_text())
  assert result["step"] == 6 and result["first_token"]["num_sequences"] == 4
  assert set(result["long_context"]["perplexity"]) == {"none", "yarn"}
  assert result["long_context"]["multiples"] == [1, 2]
  maps = sorted(k for k in result["plots"] if k.startswith("attention_map"))
  assert maps == ["attention_map_layer1_head2", "attention_map_layer1_head3"]
  assert (copy / "analysis" / "compare" / "first_token_attention.png").exists()

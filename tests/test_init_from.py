"""Starting from trained weights (`train.init_from`) and training only part of a model
(`train.trainable`): a gate retrofitted from the CLI, longer context, layouts, refusals."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import gated_attention_jax as gaj
from gated_attention_jax import interop
from gated_attention_jax import params as params_lib
from gated_attention_jax import sharding
from gated_attention_jax.training import checkpointing, experiment, init_from, run_folder, train
from tests.test_train import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """An ungated tiny run of 40 steps (checkpoints at 24, 28, ..., 40)."""
  workdir = tmp_path_factory.mktemp("source")
  config = tiny_config(num_steps=40, eval_every=40)
  config.gate.position = "none"
  train.train_and_evaluate(config, workdir)
  return workdir


def _arrays(model):
  return {"/".join(params_lib.names(p)): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}


def test_retrofit_a_gate_that_alone_trains_from_the_cli(source, tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "gated_attention_jax.main", "--config=tests/_tiny_run_config.py",
       f"--workdir={tmp_path}", "--config.model.num_layers=2", "--config.model.mlp_dim=64",
       "--config.train.num_steps=4", f"--config.train.init_from={source}",
       "--config.gate.position=sdpa", "--config.train.trainable=gate"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"init_from {source}@40: loaded 24 arrays (30,912 parameters)" in out.stdout, out.stdout
  assert "initialised 2 new arrays as configured (2,048 parameters: attn_gate_proj)" in out.stdout
  assert "training 2,048 of" in out.stdout
  _, _, before = checkpointing.load_model(source)
  _, step, after = checkpointing.load_model(tmp_path)
  before, after = _arrays(before), _arrays(after)
  assert step == 4 and set(after) - set(before) == {f"blocks/{i}/attn/attn_gate_proj"
                                                    for i in range(2)}
  for name, value in before.items():  # every source parameter bit-identical
    np.testing.assert_array_equal(after[name], value, err_msg=name)
  saved = json.loads((tmp_path / "config.json").read_text())["train"]
  assert saved["init_from"] == f"{source}@40" and len(saved["init_from_digest"]) == 64
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["trainable_params"] == summary["gate_params"] == 2048
  # The new run resumes as any run does (its own checkpoints; the source is not read again).
  config = experiment.config_from_json(json.loads((tmp_path / "config.json").read_text()))
  config.train.num_steps, config.train.init_from = 6, str(tmp_path / "gone")
  assert train.train_and_evaluate(config, tmp_path)["step"] == 6


def test_longer_context_with_a_raised_rope_theta(source, tmp_path):
  config = tiny_config(num_steps=2, eval_every=2, init_from=str(source))
  config.gate.position = "none"
  config.data.seq_len = 64
  config.model.rope_theta = 40_000.0
  summary = train.train_and_evaluate(config, tmp_path)
  assert summary["finished"] and summary["trainable_params"] == summary["num_params"]
  config.train.init_from = ""
  train.train_and_evaluate(config, tmp_path / "scratch")
  extended, scratch = (json.loads((d / "metrics.jsonl").read_text().splitlines()[0])["loss"]
                       for d in (tmp_path, tmp_path / "scratch"))
  assert extended < scratch - 0.5  # trained weights, not random ones


def test_layouts_convert(source):
  config = tiny_config(init_from=f"{source}@40")
  config.gate.position = "none"
  config.model.scan_layers = True
  model_cfg = experiment.model_config(config)
  loaded = init_from.load(config, model_cfg, sharding.make_mesh(config.mesh))
  _, _, before = checkpointing.load_model(source)
  q = np.asarray(loaded.arrays[("blocks", "attn", "q_proj")])
  assert q.shape[0] == 2 and not loaded.added and loaded.source == f"{source}@40"
  for i in range(2):
    np.testing.assert_array_equal(q[i], np.asarray(before.blocks[i].attn.q_proj[...]))


@pytest.mark.parametrize("change, message", [
    (dict(init_from="/nonexistent/run"), r"train.init_from: /nonexistent/run is not a training"
                                         r" run folder \(no config.json\)"),
    (dict(init_from="SOURCE@3"), r"train.init_from: no checkpoint of step 3 in"),
    (dict(init_from="SOURCE", d_model=64), r"train.init_from: blocks/0/attn/k_proj is \(32, 2,"
                                           r" 8\) float32 in .*, this config makes it \(64, 2, 8\)"),
    (dict(init_from="SOURCE", num_layers=1), r"train.init_from: this config has no place for 11"
                                             r" parameter arrays .*init_from_drop_unused=True"),
    (dict(trainable="blocks/9/"), r"train.trainable='blocks/9/' selects no parameter"),
    (dict(trainable="gate("), r"train.trainable must be comma-separated groups"),
])
def test_bad_input_is_refused_before_the_folder_is_touched(source, tmp_path, change, message):
  config = tiny_config()
  for key in ("d_model", "num_layers"):
    if key in change:
      config.model[key] = change.pop(key)
  change = {k: v.replace("SOURCE", str(source)) for k, v in change.items()}
  config.train.update(**change)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_fine_tune_an_official_checkpoint(tmp_path):
  """An official gated-Qwen3 checkpoint folder (written by `interop.export_official`) as
  init_from: the arrays load as exported, and only the attention layers train."""
  config = tiny_config(num_steps=2, eval_every=2, trainable="attention")
  model_cfg = experiment.model_config(config)
  official = gaj.Transformer(model_cfg, rngs=nnx.Rngs(5))
  interop.export_official(official, tmp_path / "official")
  config.train.init_from = str(tmp_path / "official")
  loaded = init_from.load(config, model_cfg, sharding.make_mesh(config.mesh))
  assert not loaded.added and loaded.source == str(tmp_path / "official")
  for name, value in _arrays(official).items():
    np.testing.assert_array_equal(np.asarray(loaded.arrays[tuple(name.split("/"))]), value)
  summary = train.train_and_evaluate(config, tmp_path / "run")
  assert summary["finished"] and 0 < summary["trainable_params"] < summary["num_params"]
  _, _, tuned = checkpointing.load_model(tmp_path / "run")
  tuned = _arrays(tuned)
  np.testing.assert_array_equal(tuned["embed/embedding"], _arrays(official)["embed/embedding"])
  assert np.abs(tuned["blocks/0/attn/q_proj"] - _arrays(official)["blocks/0/attn/q_proj"]).max() > 0
  config.train.init_from = str(tmp_path / "official") + "@3"
  with pytest.raises(ValueError, match="an official checkpoint folder, which has no steps"):
    init_from.load(config, model_cfg, sharding.make_mesh(config.mesh))


def test_dropping_parameters_when_asked(source):
  config = tiny_config(init_from=str(source), init_from_drop_unused=True)
  config.model.num_layers = 1
  config.gate.position = "none"
  _, _, before = checkpointing.load_model(source)
  model_cfg = experiment.model_config(config)
  loaded = init_from.load(config, model_cfg, sharding.make_mesh(config.mesh))
  np.testing.assert_array_equal(np.asarray(loaded.arrays[("blocks", "0", "attn", "q_proj")]),
                                np.asarray(before.blocks[0].attn.q_proj[...]))


def test_groups_and_the_public_gate_filter():
  cfg = gaj.TransformerConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=8, mlp_dim=48, qk_norm=True,
                              gate=gaj.GateConfig(position="sdpa"))
  model = gaj.Transformer(cfg, rngs=nnx.Rngs(0))
  gates = nnx.state(model, nnx.All(nnx.Param, gaj.gate_filter))
  assert sum(x.size for x in jax.tree.leaves(gates)) == gaj.gate_params(model) == 2 * 32 * 32
  paths = [params_lib.names(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]
  chosen = lambda spec: sorted("/".join(p) for p in paths if params_lib.selector(spec)(p))
  assert chosen("gate") == ["blocks/0/attn/attn_gate_proj", "blocks/1/attn/attn_gate_proj"]
  assert "blocks/0/mlp/gate_proj" in chosen("mlp") and "blocks/0/mlp/gate_proj" not in chosen(
      "gate")
  assert chosen("norms") == sorted(p for p in chosen("all") if "norm" in p)
  assert chosen("embeddings") == ["embed/embedding"]
  assert chosen("attn/(q|k)_proj") == [f"blocks/{i}/attn/{n}_proj" for i in range(2)
                                        for n in "kq"]


def _small(gate):
  cfg = gaj.TransformerConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=8, mlp_dim=48, qk_norm=True, gate=gate)
  return gaj.Transformer(cfg, rngs=nnx.Rngs(0))


def test_an_identity_gate_starts_as_the_ungated_model():
  ungated = _small(gaj.GateConfig())
  gated = _small(gaj.GateConfig(position="sdpa", activation="2sigmoid", init="identity"))
  assert not np.asarray(gated.blocks[0].attn.attn_gate_proj[...]).any()
  nnx.update(gated, nnx.state(ungated, nnx.Param))
  tokens = jax.numpy.asarray([[3, 1, 4, 1, 5, 9, 2, 6]])
  np.testing.assert_array_equal(np.asarray(gated(tokens)), np.asarray(ungated(tokens)))


@pytest.mark.parametrize("activation, mean", [("sigmoid", 0.9), ("2sigmoid", 1.5),
                                              ("ns_sigmoid", 0.6)])
def test_a_gate_started_at_a_mean(activation, mean):
  gate = gaj.GateConfig(position="sdpa", granularity="headwise", activation=activation,
                        init="mean", init_mean=mean)
  model = _small(gate)
  scores = model.forward(jax.numpy.asarray([[3, 1, 4, 1, 5, 9, 2, 6]]),
                         intermediates=True).intermediates["gate_scores"]
  assert abs(float(np.mean(np.asarray(scores[0]))) - mean) < 0.02
  assert model.blocks[0].attn.gate_bias.shape == (4,)
  assert gaj.gate_params(model) == 2 * gaj.gate_params_per_layer(32, 4, 2, 8, gate) == 2 * 33 * 4
  with pytest.raises(ValueError, match="the official layout holds no gate but the G1 sigmoid"):
    interop.config_to_hf(model.config)


@pytest.mark.parametrize("fields, message", [
    (dict(init="identity"), r"gate.init='identity' needs a gate that is the identity at zero"),
    (dict(init="mean", activation="silu"), r"gate.init='mean' needs gate.activation in"),
    (dict(init="mean", init_mean=1.0), r"gate.init_mean must be in \(0.0, 1.0\)"),
    (dict(init="zeros"), r"gate.init must be one of \('normal', 'identity', 'mean'\)"),
])
def test_bad_gate_starts_are_refused(fields, message):
  with pytest.raises(ValueError, match=message):
    gaj.GateConfig(position="sdpa", **fields)


def test_a_model_changed_in_python_saved_as_a_run_folder(source, tmp_path):
  """`gaj.save_model`: a model edited in Python becomes a run folder that load_run, the
  sample CLI, init_from and training read; an occupied folder and a config that does not
  describe the model are refused before anything is written."""
  config, _, model = gaj.load_run(source)
  model.blocks[0].attn.q_proj[...] = model.blocks[0].attn.q_proj[...] * 0.5  # an edit
  folder = gaj.save_model(model, config, tmp_path / "edited", step=40)
  _, step, again = gaj.load_run(folder)
  assert step == 40
  for name, value in _arrays(model).items():
    np.testing.assert_array_equal(_arrays(again)[name], value, err_msg=name)
  out = subprocess.run([sys.executable, "-m", "gated_attention_jax.sample", f"--workdir={folder}",
                        "--prompt=ROMEO:", "--max_new_tokens=4"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  config.train.num_steps = 42
  assert train.train_and_evaluate(config, folder)["step"] == 42  # resumes from it
  with pytest.raises(run_folder.RunFolderError, match="already holds a run"):
    gaj.save_model(model, config, folder)
  config.model.d_model = 64
  with pytest.raises(ValueError, match="config does not describe the model: d_model"):
    gaj.save_model(model, config, tmp_path / "other")
  assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("gate", [
    gaj.GateConfig(position="value"), gaj.GateConfig(position="sdpa", activation="silu"),
    gaj.GateConfig(position="sdpa", sharing="head_shared"),
    gaj.GateConfig(position="sdpa", combine="add"),
    gaj.GateConfig(position="sdpa", input_dependent=False),
])
def test_export_refuses_gates_the_official_layout_cannot_hold(gate):
  """The official config has two flags (a G1 sigmoid gate, headwise or elementwise): any other
  gate used to be written as one of them, a silently different model."""
  cfg = gaj.TransformerConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4,
                              num_kv_heads=2, head_dim=8, mlp_dim=48, gate=gate)
  with pytest.raises(ValueError, match="the official layout holds no gate but the G1 sigmoid"):
    interop.config_to_hf(cfg)
  ok = cfg.replace(gate=gaj.GateConfig(position="sdpa", granularity="headwise"))
  assert interop.config_to_hf(ok)["headwise_attn_output_gate"]

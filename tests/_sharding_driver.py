"""Runs sharded training on 8 fake CPU devices and prints what it measured as JSON.

Started by tests/test_sharding.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the device count must be
set before JAX starts). Usage: `python tests/_sharding_driver.py MODE JSON_ARGS`.

  losses   {"runs": [{"gate": {...}, "model": {...}, "mesh": [d, f, t]}, ...], "steps": n}
           -> per run: losses of n steps, and every parameter's spec and shard shape
  restore  {"save_mesh": [...], "restore_mesh": [...], "workdir": path, "steps": n}
           -> losses continuing on the save mesh and on the restore mesh, restored specs
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import ml_collections

from gated_attention_jax import checkpointing, experiment, sharding, train
from gated_attention_jax.data import pipeline
from tests import _sharding_config


def _config(run: dict[str, Any]) -> ml_collections.ConfigDict:
  config = _sharding_config.get_config()
  config.gate.update(**run.get("gate", {}))
  config.model.update(**run.get("model", {}))
  return config


def _trainer(config: ml_collections.ConfigDict, mesh_shape: list[int]) -> train.Trainer:
  config.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
  n = mesh_shape[0] * mesh_shape[1] * mesh_shape[2]
  model_cfg = experiment.validate(config, n)
  return train.Trainer(config, model_cfg, sharding.make_mesh(config.mesh, jax.devices()[:n]))


def _train(trainer: train.Trainer, state: Any, data_iter: Any, steps: int) -> tuple[Any, list]:
  losses = []
  for _ in range(steps):
    state, metrics = trainer.train_step(state, trainer.global_batch(next(data_iter)))
    losses.append(float(metrics["loss"]))
  return state, losses


def _layout(state: Any) -> dict[str, dict[str, Any]]:
  """{param path: {"spec": [...], "shard": [...], "opt_spec": spec of Adam's mu}}."""
  def describe(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat}
  params = describe(state["params"])
  mu = describe(state["opt_state"])
  out = {}
  for path, leaf in params.items():
    mu_leaf = next(v for k, v in mu.items() if k.endswith(path) and ".mu" in k)
    out[path] = {"spec": [list(a) if isinstance(a, tuple) else a for a in leaf.sharding.spec],
                 "shard": list(leaf.addressable_shards[0].data.shape),
                 "opt_spec": str(mu_leaf.sharding.spec)}
  return out


def losses_mode(args: dict[str, Any]) -> list[dict[str, Any]]:
  results = []
  for run in args["runs"]:
    config = _config(run)
    trainer = _trainer(config, run["mesh"])
    data_iter = pipeline.make_train_iterator(config.data, batch_size=config.train.batch_size,
                                             seed=0)
    state, losses = _train(trainer, trainer.init_state(), data_iter, args["steps"])
    results.append({**run, "losses": losses, "layout": _layout(state)})
  return results


def restore_mode(args: dict[str, Any]) -> dict[str, Any]:
  config = _config({})
  steps = args["steps"]
  saver = _trainer(config, args["save_mesh"])
  data_iter = pipeline.make_train_iterator(config.data, batch_size=config.train.batch_size,
                                           seed=0)
  state, _ = _train(saver, saver.init_state(), data_iter, steps)
  ckpt = checkpointing.Checkpointer(args["workdir"], keep=2)
  ckpt.save(steps, state=state, data_state=data_iter.get_state(), config_json={})
  _, same_mesh = _train(saver, state, data_iter, steps)

  restorer = _trainer(_config({}), args["restore_mesh"])
  step, restored, data_state = ckpt.restore_latest(restorer.abstract_state)
  ckpt.close()
  data_iter = pipeline.make_train_iterator(config.data, batch_size=config.train.batch_size,
                                           seed=0)
  data_iter.set_state(data_state)
  layout = _layout(restored)
  _, other_mesh = _train(restorer, restored, data_iter, steps)
  return {"step": step, "same_mesh": same_mesh, "other_mesh": other_mesh, "layout": layout}


if __name__ == "__main__":
  mode, payload = sys.argv[1], json.loads(sys.argv[2])
  if jax.device_count() != 8:
    raise SystemExit(f"expected 8 fake devices, got {jax.device_count()}: set XLA_FLAGS")
  result = {"losses": losses_mode, "restore": restore_mode}[mode](payload)
  print("RESULT " + json.dumps(result))

"""Runs sharded training on 8 fake CPU devices and prints what it measured as JSON.

Started by tests/test_sharding.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the device count must be
set before JAX starts). Usage: `python tests/_sharding_driver.py MODE JSON_ARGS`.

  losses   {"runs": [{"gate": {...}, "model": {...}, "mesh": [d, f, t(, e)]}, ...], "steps": n}
           -> per run: losses of n steps (a run's own "steps" overrides n), and every
           parameter's spec and shard shape;
           a run with "hlo": true also lists the shapes of every all-gather in the
           compiled train step ("all_gathers": [[result shape, operand shapes...], ...])
           and counts its collectives ("collectives": {op: count})
  restore  {"save_mesh": [...], "restore_mesh": [...], "workdir": path, "steps": n}
           -> losses continuing on the save mesh and on the restore mesh, restored specs
  attend   {"cases": [{"mesh": [d, f, t], "heads": [N, K], "gate": "elementwise" |
           "headwise" | null, "segments": bool, "batch": B}, ...], "out": dir}
           -> per case: collective ops counted in the compiled HLO of attention_impl
           "pallas" (output and vjp) on inputs sharded by the logical rules; writes
           dir/case{i}.npz with its outputs and gradients ("got_*") and those of the
           unsharded "xla" path ("want_*")
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from gated_attention_jax import attention_ops, sharding
from gated_attention_jax.training import checkpointing, experiment, train
from gated_attention_jax.data import pipeline
from tests import _sharding_config


def _config(run: dict[str, Any]) -> ml_collections.ConfigDict:
  config = _sharding_config.get_config()
  config.gate.update(**run.get("gate", {}))
  config.model.update(**run.get("model", {}))
  return config


def _trainer(config: ml_collections.ConfigDict, mesh_shape: list[int]) -> train.Trainer:
  config.mesh.update(**dict(zip(sharding.MESH_AXES, mesh_shape)))  # expert: 1 unless given
  n = int(np.prod(mesh_shape))
  model_cfg = experiment.validate(config, n)
  return train.Trainer(config, model_cfg, sharding.make_mesh(config.mesh, jax.devices()[:n]))


def _train(trainer: train.Trainer, state: Any, data_iter: Any, steps: int,
           step_fn: Any = None) -> tuple[Any, list]:
  losses = []
  for _ in range(steps):
    state, metrics = (step_fn or trainer.train_step)(state,
                                                     trainer.global_batch(next(data_iter)))
    losses.append(float(metrics["loss"]))
  return state, losses


def _all_gathers(hlo: str) -> list[list[list[int]]]:
  """[[result shape, operand shapes...], ...] of each all-gather in compiled HLO text."""
  out = []
  for line in hlo.splitlines():
    if not re.search(r"\sall-gather(-start)?\(", line):
      continue
    shapes = re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", line.split(", channel_id")[0])
    out.append([[int(d) for d in s.split(",") if d] for s in shapes])
  return out


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
  # Every run trains on the same first batches (the runs change the model and the mesh, never
  # config.data or the batch size): read once.
  config = _config({})
  data_iter = pipeline.make_train_iterator(config.data, batch_size=config.train.batch_size,
                                           seed=0)
  batches = [next(data_iter) for _ in range(max(run.get("steps", args["steps"])
                                                for run in args["runs"]))]
  results = []
  for run in args["runs"]:
    config = _config(run)
    trainer = _trainer(config, run["mesh"])
    state, extra, step_fn = trainer.init_state(), {}, None
    if run.get("hlo"):  # the same executable that trains: compiled once, inspected
      step_fn = trainer.train_step.lower(state, trainer.global_batch(batches[0])).compile()
      extra["all_gathers"] = _all_gathers(step_fn.as_text())
      extra["collectives"] = _collectives(step_fn.as_text())
    state, losses = _train(trainer, state, iter(batches), run.get("steps", args["steps"]),
                           step_fn)
    results.append({**run, "losses": losses, "layout": _layout(state), **extra})
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


COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter", "all-reduce")


def _collectives(hlo: str) -> dict[str, int]:
  """How many of each of `COLLECTIVES` compiled HLO text holds, leaving out those whose every
  replica group is one device (they move nothing: a shard_map's sum over a size-1 axis)."""
  lines = [l for l in hlo.splitlines()
           if not re.search(r"replica_groups=\{\{\d+\}(,\{\d+\})*\}", l)]
  return {op: sum(bool(re.search(rf"\s{op}(-start)?\(", l)) for l in lines)
          for op in COLLECTIVES}


def _attention_inputs(case: dict[str, Any]) -> dict[str, Any]:
  """q, k, v, gate, segment ids and an output cotangent, float32, seeded by the case."""
  b, t, h = case.get("batch", 8), 32, 16
  n, kv_heads = case["heads"]
  rng = np.random.default_rng(n * 10 + kv_heads)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  gate = {"elementwise": (b, t, n, h), "headwise": (b, t, n), None: None}[case.get("gate")]
  return {"q": normal(b, t, n, h), "k": normal(b, t, kv_heads, h), "v": normal(b, t, kv_heads, h),
          "gate": None if gate is None else normal(*gate),
          "segments": (np.sort(rng.integers(0, 3, (b, t)), axis=1).astype(np.int32)
                       if case.get("segments") else None),
          "do": normal(b, t, n, h)}


def _attention_and_vjp(impl: str):
  def fn(q, k, v, gate, segments, do):
    def attend(q, k, v, gate):
      return attention_ops.attend(q, k, v, impl=impl, scale=q.shape[-1] ** -0.5,
                                  q_segment_ids=segments, kv_segment_ids=segments,
                                  fused_gate=gate)[0]
    out, vjp = jax.vjp(attend, q, k, v, gate)
    return (out, *vjp(do))
  return fn


def attend_mode(args: dict[str, Any]) -> list[dict[str, Any]]:
  names = ("out", "dq", "dk", "dv", "dgate")
  axes = {"q": attention_ops.Q_AXES, "k": attention_ops.KV_AXES, "v": attention_ops.KV_AXES,
          "segments": attention_ops.SEGMENT_AXES, "do": attention_ops.Q_AXES}
  results = []
  for i, case in enumerate(args["cases"]):
    inputs = _attention_inputs(case)
    want = jax.jit(_attention_and_vjp("xla"))(**inputs)
    n = int(np.prod(case["mesh"]))
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES,
                                                                 case["mesh"]))),
                              jax.devices()[:n])
    sharded = {}
    for name, x in inputs.items():
      logical = axes.get(name, attention_ops.Q_AXES[:None if x is None else x.ndim])
      sharded[name] = None if x is None else jax.device_put(
          x, NamedSharding(mesh, sharding.logical_to_mesh_spec(logical, x.shape, mesh)))
    compiled = jax.jit(sharding.under_mesh(_attention_and_vjp("pallas"), mesh)).lower(
        **sharded).compile()
    hlo = compiled.as_text()
    got = compiled(**sharded)
    arrays = {}
    for name, g, w in zip(names, got, want):
      if w is not None:
        arrays[f"got_{name}"], arrays[f"want_{name}"] = np.asarray(g), np.asarray(w)
    np.savez(pathlib.Path(args["out"]) / f"case{i}.npz", **arrays)
    results.append({**case, "collectives": _collectives(hlo),
        "in_shardings": [str(x.sharding.spec) for x in jax.tree.leaves(sharded)]})
  return results


if __name__ == "__main__":
  mode, payload = sys.argv[1], json.loads(sys.argv[2])
  if jax.device_count() != 8:
    raise SystemExit(f"expected 8 fake devices, got {jax.device_count()}: set XLA_FLAGS")
  result = {"losses": losses_mode, "restore": restore_mode, "attend": attend_mode}[mode](payload)
  print("RESULT " + json.dumps(result))

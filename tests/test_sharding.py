"""Sharded training on 8 fake CPU devices, two processes, cross-mesh restore, memory plan.

The device count must be set before JAX starts, so the 8-device checks run in
subprocesses (`tests/_sharding_driver.py`, `gated_attention_jax.main`,
`gated_attention_jax.plan`) with XLA_FLAGS=--xla_force_host_platform_device_count=8.
The model (tests/_sharding_config.py) has 8 query heads over 2 kv heads, so a
4-way tensor axis splits the query heads and replicates the kv heads, and a
2-way one splits both.

Loss tolerance: float32, rtol 1e-5. Sharding changes the order of the
reductions (partial sums per device, then all-reduce), which moves the last
bits; after a few steps the losses differ by ~1e-7 relative, far under 1e-5,
while a wrong gate slice or a missing gradient reduction changes them by >1e-3.
The same holds for attention_impl="pallas" (the TPU kernel in interpret mode, run
per shard) against "xla" on one device: the kernel's online softmax reorders the
sums too, ~1e-7 relative in the losses.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from gated_attention_jax import attention_ops, plan, sharding
from gated_attention_jax.training import experiment
from tests import _sharding_config, toolchains

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-5
STEPS = 3
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
# Gate variants whose slices must follow the head sharding, each on a mesh that splits
# its heads: (1, 2, 4) splits the 8 query heads 4 ways (a GQA group of 4 spans two
# devices), (2, 2, 2) splits the 2 kv heads (a head-shared value/key gate averages
# across devices).
# (Each variant costs two compilations on 2 CI cores: the ones here cover query-head,
# kv-head and d_model gate axes, headwise, head-shared and input-independent gates.)
VARIANTS = [
    ({"position": "sdpa", "granularity": "headwise", "sharing": "head_shared"}, (1, 2, 4)),
    ({"position": "dense"}, (1, 2, 4)),
    ({"position": "sdpa", "input_dependent": False}, (1, 2, 4)),
    ({"position": "value", "granularity": "headwise", "sharing": "head_shared"}, (2, 2, 2)),
]
REMATS = ["save_matmuls"]  # "full" is checked against no remat in test_model.py
# attention_impl="pallas" (G1 elementwise gate fused, segment ids): (8, 1, 1) splits the
# batch only, (2, 2, 2) splits query and kv heads 2 ways, (1, 2, 4) splits the query
# heads 4 ways and each device slices out the one kv head its 2 query heads read.
PALLAS_MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]
# Their steps: the first loss is the kernel's forward pass per shard, the second follows an
# update made with its backward pass; a third repeats the same code (~10 s of interpreted
# kernels per step on 2 CPU cores).
PALLAS_STEPS = 2
# A mixture-of-experts block (4 experts of 32, top 2) on the (2, 2, 2) mesh: its expert weights
# split over fsdp (d_model) and tensor (expert_dim), the balancing statistics over the whole
# global batch.
MOE = {"mlp_type": "moe", "moe": {"num_experts": 4, "experts_per_token": 2, "expert_dim": 32}}
# The same block with its experts split over the expert axis (data, fsdp, tensor, expert):
# 4 ways beside 2-way fsdp, and 2 ways beside 2-way fsdp and 2-way tensor.
EXPERT_MESHES = [(1, 2, 1, 4), (1, 2, 2, 2)]


def _env(num_devices: int) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
          "XLA_FLAGS": f"{toolchains.CPU_XLA_FLAGS} "
                       f"--xla_force_host_platform_device_count={num_devices}"}


def _driver_job(mode: str, args: dict) -> toolchains.Job:
  """The driver started in the background (conftest starts it at collection; once a session)."""
  return toolchains.start(f"sharding_{mode}", [sys.executable, str(ROOT / "tests" /
                                                               "_sharding_driver.py"), mode,
                                               json.dumps(args)], environ=_env(8))


def _result(job: toolchains.Job):
  """What the driver printed after RESULT (unbuffered: one write, never split by stderr)."""
  rc, log, _ = job.result(timeout=900)
  assert rc == 0, log[-4000:]
  line = next(l for l in log.splitlines() if l.startswith("RESULT "))
  return json.loads(line[len("RESULT "):])


def runs_job() -> toolchains.Job:
  """Every mesh and variant, with its one-device reference, in one subprocess."""
  plan = [{"mesh": [1, 1, 1]}] + [{"mesh": list(m)} for m in MESHES]
  for gate, mesh in VARIANTS:
    plan += [{"gate": gate, "mesh": [1, 1, 1]}, {"gate": gate, "mesh": list(mesh)}]
  plan += [{"model": {"remat": r}, "mesh": [2, 2, 2]} for r in REMATS]
  plan += [{"model": {"attention_impl": "pallas"}, "mesh": list(m), "hlo": True,
            "steps": PALLAS_STEPS} for m in PALLAS_MESHES]
  plan += [{"model": MOE, "mesh": [1, 1, 1]}, {"model": MOE, "mesh": [2, 2, 2]}]
  plan += [{"model": MOE, "mesh": list(m), "hlo": True} for m in EXPERT_MESHES]
  return _driver_job("losses", {"runs": plan, "steps": STEPS})


@pytest.fixture(scope="module")
def runs():
  key = lambda r: json.dumps([r.get("gate", {}), r.get("model", {}), r["mesh"]], sort_keys=True)
  return {key(r): r for r in _result(runs_job())}, key


def _get(runs, mesh, gate=None, model=None):
  table, key = runs
  return table[key({"gate": gate or {}, "model": model or {}, "mesh": list(mesh)})]


@pytest.mark.parametrize("mesh", MESHES, ids=str)
def test_mesh_matches_one_device(runs, mesh):
  one, many = _get(runs, (1, 1, 1))["losses"], _get(runs, mesh)["losses"]
  assert len(many) == STEPS
  np.testing.assert_allclose(many, one, rtol=RTOL)
  assert many[-1] < many[0] - 0.02  # the steps really trained (1 layer: ~0.05 in 3 steps)


@pytest.mark.parametrize("gate,mesh", VARIANTS, ids=str)
def test_gate_variant_matches_one_device_with_heads_split(runs, gate, mesh):
  one, many = _get(runs, (1, 1, 1), gate), _get(runs, mesh, gate)
  np.testing.assert_allclose(many["losses"], one["losses"], rtol=RTOL)
  # The gate's head axis (its d_model axis for G5) is split over `tensor`, as the heads
  # (the output) it gates: attn_gate_proj (D, heads[, H]), gate_theta (heads[, H]).
  name, gate_param = next((k, v) for k, v in many["layout"].items()
                          if k.startswith("['blocks'][0]['attn']['") and "gate_" in k)
  heads = {"value": 2, "key": 2, "dense": 32}.get(gate["position"], 8)
  axis = 1 if "gate_proj" in name else 0
  assert gate_param["spec"][axis] == "tensor", (name, gate_param)
  assert gate_param["shard"][axis] == heads // mesh[2], (name, gate_param)


@pytest.mark.parametrize("remat", REMATS)
def test_remat_policies_work_in_the_sharded_step(runs, remat):
  np.testing.assert_allclose(_get(runs, (2, 2, 2), model={"remat": remat})["losses"],
                             _get(runs, (1, 1, 1))["losses"], rtol=RTOL)


def test_moe_training_matches_one_device_with_experts_split(runs):
  one, many = _get(runs, (1, 1, 1), model=MOE), _get(runs, (2, 2, 2), model=MOE)
  np.testing.assert_allclose(many["losses"], one["losses"], rtol=RTOL)
  layout = lambda name: next(v for k, v in many["layout"].items()
                             if k.startswith(f"['blocks'][0]['mlp']['{name}']"))
  for name in ("gate_proj", "up_proj"):  # (experts, d_model, expert_dim)
    assert layout(name)["spec"] == [None, "fsdp", "tensor"], layout(name)
    assert layout(name)["shard"] == [4, 16, 16], layout(name)
  assert layout("down_proj")["shard"] == [4, 16, 16]  # (experts, expert_dim, d_model)
  assert layout("router")["shard"] == [16, 4]  # (d_model, experts): experts whole


@pytest.mark.parametrize("mesh", EXPERT_MESHES, ids=str)
def test_moe_training_matches_one_device_with_expert_parallelism(runs, mesh):
  data, fsdp, tensor, expert = mesh
  one, many = _get(runs, (1, 1, 1), model=MOE), _get(runs, mesh, model=MOE)
  np.testing.assert_allclose(many["losses"], one["losses"], rtol=RTOL)
  layout = lambda name: next(v for k, v in many["layout"].items()
                             if k.startswith(f"['blocks'][0]['mlp']['{name}']"))
  here = 4 // expert  # the experts one device holds
  tensor_axis = "tensor" if tensor > 1 else None
  for name in ("gate_proj", "up_proj"):  # (experts, d_model, expert_dim)
    assert layout(name)["spec"] == ["expert", "fsdp", tensor_axis], layout(name)
    assert layout(name)["shard"] == [here, 32 // fsdp, 32 // tensor], layout(name)
  assert layout("down_proj")["shard"] == [here, 32 // tensor, 32 // fsdp]
  gathered = [g[0] for g in many["all_gathers"]]  # result shapes
  # Each device gathers its own experts' weights over fsdp, never all 4 experts' ...
  assert [here, 32, 32 // tensor] in gathered, gathered
  whole = [[4, 32, 32 // tensor], [4, 32 // tensor, 32], [4, 32, 32]]
  assert not any(shape in whole for shape in gathered), gathered
  # ... and the tokens of its expert group (batch 8 x seq 32 over data x fsdp), whose
  # outputs go back reduce-scattered.
  assert [8 * 32 // (data * fsdp), 32] in gathered, gathered
  assert many["collectives"]["reduce-scatter"] > 0, many["collectives"]


def test_bad_expert_meshes_are_refused_before_compiling():
  config = _sharding_config.get_config()
  config.model.update(**MOE)
  config.train.batch_size = 12
  config.mesh.update(data=1, fsdp=1, tensor=1, expert=3)
  with pytest.raises(ValueError, match=r"mesh.expert \(3\) must divide model.moe.num_experts"
                                       r" \(4\).*allowed: \[1, 2, 4\]"):
    experiment.validate(config, 3)
  config.train.batch_size = 8
  with pytest.raises(ValueError, match=r"batch_size \(8\) must be a multiple of the data x"
                                       r" fsdp x expert mesh size \(3\)"):
    experiment.validate(config, 3)


@pytest.mark.parametrize("mesh", PALLAS_MESHES, ids=str)
def test_pallas_training_matches_xla_on_one_device(runs, mesh):
  run = _get(runs, mesh, model={"attention_impl": "pallas"})
  assert len(run["losses"]) == PALLAS_STEPS
  np.testing.assert_allclose(run["losses"], _get(runs, (1, 1, 1))["losses"][:PALLAS_STEPS],
                             rtol=RTOL)
  # q, k, v and the gate (B, T, heads, H) are the model's only rank-4 arrays (weights
  # have rank <= 3, other activations (B, T, D) rank 3): an all-gather of rank 4 would
  # be XLA gathering them around the kernel, as it does when the pallas_call is not
  # run per shard. FSDP's weight all-gathers are expected and ignored.
  gathered = [shapes[0] for shapes in run["all_gathers"]]
  assert not [s for s in gathered if len(s) == 4], gathered
  if mesh[1] > 1:  # the parse finds FSDP's weight gathers, so it would find others
    assert gathered, run["all_gathers"]


# Cases for attention_impl="pallas" at the op level (B 8, T 32, H 16 unless given).
ATTEND_CASES = [
    {"mesh": [2, 2, 2], "heads": [4, 2], "gate": "elementwise", "segments": True},  # K % t == 0
    {"mesh": [1, 2, 4], "heads": [4, 2], "gate": "headwise", "segments": True},  # t % K == 0
    {"mesh": [1, 2, 4], "heads": [8, 1], "gate": "elementwise"},  # MQA
    {"mesh": [8, 1, 1], "heads": [4, 2], "segments": True},  # ungated, batch only
    {"mesh": [2, 2, 2], "heads": [4, 2], "gate": "headwise", "batch": 2},  # B % 4 != 0
]


def attend_job() -> toolchains.Job:
  """The Pallas-per-shard cases in one subprocess, their arrays in the job's folder."""
  return _driver_job("attend", {"cases": ATTEND_CASES,
                                "out": str(toolchains.job_folder("sharding_attend"))})


@pytest.fixture(scope="module")
def attend_runs():
  job = attend_job()
  return _result(job), job.folder


@pytest.mark.parametrize("index", range(len(ATTEND_CASES)),
                         ids=[json.dumps(c, separators=(",", ":")) for c in ATTEND_CASES])
def test_pallas_attention_runs_per_shard(attend_runs, index):
  """Output and vjp of attend(impl="pallas") on inputs sharded by the logical rules.

  Tolerance: float32 against the unsharded "xla" path; the kernel's online softmax
  and tiled sums reorder the arithmetic (measured max |err| <= 3e-6 on values and
  gradients of size ~1-7), so atol = rtol = 1e-5; a wrong kv head or gate slice, or
  a missing sum of dk/dv over the devices sharing a kv head, is off by O(1).
  """
  results, out = attend_runs
  case = results[index]
  arrays = np.load(out / f"case{index}.npz")
  names = [k[len("got_"):] for k in arrays if k.startswith("got_")]
  assert {"out", "dq", "dk", "dv"} <= set(names)
  assert ("dgate" in names) == (case.get("gate") is not None)
  for name in names:
    np.testing.assert_allclose(arrays[f"got_{name}"], arrays[f"want_{name}"], rtol=1e-5,
                               atol=1e-5, err_msg=name)
  moved = {op: n for op, n in case["collectives"].items() if op != "all-reduce" and n}
  assert not moved, case  # nothing gathered, exchanged or scattered around the kernel
  if index == 0:  # every axis splits something and no device shares an input's shard
    assert case["collectives"]["all-reduce"] == 0, case


@pytest.mark.parametrize("tensor,error", [
    (2, "mesh.tensor=2 gives each device 3 of the 6 query heads, which read parts of"
        " several of the 3 kv heads"),
    (4, "mesh.tensor=4 does not divide the 6 query heads"),
])
def test_pallas_refuses_meshes_it_cannot_serve_before_compiling(tensor, error):
  """6 query heads over 3 kv heads: the rules split (tensor 2) or replicate (tensor 4)
  the query heads and replicate the kv heads, which the XLA path accepts, but no
  device's query heads would map onto whole kv heads of its own."""
  config = _sharding_config.get_config()
  config.model.update(num_heads=6, num_kv_heads=3)
  config.mesh.update(data=8 // tensor, fsdp=1, tensor=tensor)
  experiment.validate(config, 8)  # "xla": fine
  config.model.attention_impl = "pallas"
  with pytest.raises(ValueError, match=error + ".*split 6 query heads over 3 kv heads 1, 3, 6"):
    experiment.validate(config, 8)
  config.model.attention_impl = "auto"
  experiment.validate(config, 8)  # on these CPU devices "auto" is "xla": fine
  tpu = [jax.sharding.AbstractDevice(device_kind="TPU v5p", num_cores=None, platform="tpu")]
  with pytest.raises(ValueError, match="model.attention_impl='auto' chose 'pallas' .*" + error):
    experiment.validate(config, 8, tpu)  # for a TPU "auto" is the kernel
  # Traced under such a mesh (no devices needed, nothing compiled), attend says the same.
  q = jax.ShapeDtypeStruct((8, 32, 6, 8), np.float32)
  kv = jax.ShapeDtypeStruct((8, 32, 3, 8), np.float32)
  attend = lambda q, k, v: attention_ops.attend(q, k, v, impl="pallas", scale=0.3)[0]
  mesh = AbstractMesh((8 // tensor, 1, tensor, 1), sharding.MESH_AXES)
  with jax.sharding.use_abstract_mesh(mesh):
    with pytest.raises(ValueError, match=error):
      jax.eval_shape(attend, q, kv, kv)


def test_parameters_and_optimizer_state_are_sharded_as_the_rules_say(runs):
  # d_model 32, 8 q heads, 2 kv heads, head_dim 8, mlp 64, vocab 384 (byte tokenizer).
  expected = {  # mesh -> {param suffix: (spec, per-device shard shape)}
      (2, 2, 2): {"['embed']['embedding']": (["tensor", "fsdp"], [192, 16]),
                  "['attn']['q_proj']": (["fsdp", "tensor", None], [16, 4, 8]),
                  "['attn']['k_proj']": (["fsdp", "tensor", None], [16, 1, 8]),
                  "['attn']['o_proj']": (["tensor", None, "fsdp"], [4, 8, 16]),
                  "['mlp']['down_proj']": (["tensor", "fsdp"], [32, 16]),
                  "['attn_norm']['weight']": ([None], [32])},
      (1, 2, 4): {"['attn']['q_proj']": (["fsdp", "tensor", None], [16, 2, 8]),
                  # 2 kv heads do not split 4 ways: replicated over tensor.
                  "['attn']['k_proj']": (["fsdp", None, None], [16, 2, 8]),
                  "['attn']['attn_gate_proj']": (["fsdp", "tensor", None], [16, 2, 8])},
      (1, 8, 1): {"['attn']['q_proj']": (["fsdp", None, None], [4, 8, 8]),
                  "['mlp']['up_proj']": (["fsdp", None], [4, 64])},
      (8, 1, 1): {"['attn']['q_proj']": ([None, None, None], [32, 8, 8])},
  }
  for mesh, params in expected.items():
    layout = _get(runs, mesh)["layout"]
    for suffix, (spec, shard) in params.items():
      name = next(k for k in layout if k.startswith("['blocks'][0]") and suffix in k
                  or k.startswith(suffix))
      assert layout[name]["spec"] == spec, (mesh, name, layout[name])
      assert layout[name]["shard"] == shard, (mesh, name, layout[name])
      assert layout[name]["opt_spec"] == str(P(*[tuple(a) if isinstance(a, list) else a
                                                 for a in spec])), (mesh, name)


def test_checkpoint_saved_on_one_mesh_restores_onto_another(tmp_path):
  out = _result(_driver_job("restore", {"save_mesh": [8, 1, 1], "restore_mesh": [1, 2, 4],
                                        "workdir": str(tmp_path), "steps": STEPS}))
  assert out["step"] == STEPS
  assert out["layout"]["['blocks'][0]['attn']['q_proj'].value"]["spec"] == [
      "fsdp", "tensor", None]
  # Continuing on the new mesh gives the losses continuing on the old one would.
  np.testing.assert_allclose(out["other_mesh"], out["same_mesh"], rtol=RTOL)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _losses(workdir: pathlib.Path) -> list[float]:
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows] + [rows[-1]["eval_loss"]]


def test_two_processes_match_one_process(tmp_path):
  """Two OS processes x 4 CPU devices (gloo collectives, localhost coordinator) vs 1 x 8."""
  main = [sys.executable, "-m", "gated_attention_jax.main",
          "--config=tests/_sharding_config.py", "--config.mesh.data=2",
          "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
  port = _free_port()
  procs = [subprocess.Popen(main + [f"--workdir={tmp_path / 'multi'}",
                                    f"--coordinator_address=localhost:{port}",
                                    "--num_processes=2", f"--process_id={i}"],
                            env=_env(4), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  single = subprocess.run(main + [f"--workdir={tmp_path / 'single'}"], env=_env(8), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-4000:]
  assert single.returncode == 0, single.stderr[-4000:]
  # Train losses of every step, then the eval loss: each process fed only its own rows.
  np.testing.assert_allclose(_losses(tmp_path / "multi"), _losses(tmp_path / "single"),
                             rtol=RTOL)
  assert (tmp_path / "multi" / "checkpoints" / "4").is_dir()


def test_memory_plan_matches_the_shardings():
  proc = subprocess.run([sys.executable, "-m", "gated_attention_jax.plan",
                         "--config=tests/_sharding_config.py", "--num_devices=8",
                         "--config.mesh.data=1", "--config.mesh.fsdp=2",
                         "--config.mesh.tensor=4", "--device_memory_gib=1"],
                        env=_env(1), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "mesh data=1 fsdp=2 tensor=4" in proc.stdout
  assert "fits in 1.00 GiB" in proc.stdout


def test_plan_numbers_are_per_device():
  """The computed bytes are the shard sizes; the compiled arguments hold exactly them. The
  FLOPs of a scanned step, counted from 1 and 2 unrolled layers, are the unrolled step's."""
  code = ("import json; from gated_attention_jax import plan; from tests import"
          " _sharding_config as c; import jax; cfg = c.get_config();"
          " cfg.mesh.update(data=1, fsdp=2, tensor=4);"
          " cfg.model.update(num_layers=3, scan_layers=True);"
          " scanned = plan.plan(cfg, jax.devices(), count_flops=True);"
          " uncounted = plan.plan(cfg, jax.devices());"
          " cfg.model.scan_layers = False;"
          " print('RESULT', json.dumps([scanned, uncounted, plan.plan(cfg, jax.devices())]))")
  proc = subprocess.run([sys.executable, "-c", code], env=_env(8), cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result, uncounted, unrolled = json.loads(proc.stdout.split("RESULT ", 1)[1])
  # XLA counts a loop body once: the scanned step's own count would be about a third.
  assert uncounted["flops_per_device"] is None
  assert "not counted: XLA counts the scanned layers' loop body once" in plan.report(uncounted)
  np.testing.assert_allclose(result["flops_per_device"], unrolled["flops_per_device"],
                             rtol=1e-6)
  # remat "full" (the default) computes each layer's forward twice: more than 6 N per token.
  model = (result["model_matmul_flops_per_device"] + result["model_attention_flops_per_device"])
  assert 1.1 < result["flops_per_device"] / model < 2.0
  assert result["tokens_per_device"] == 8 * 32 / 8
  n = result["per_device_bytes"]
  one_copy = result["num_params"] * 4  # float32
  # Parameters split 8 ways except the replicated norms and kv projections: between
  # 1/8 and 1/2 of one copy per device; Adam keeps two moments of the same layout.
  assert one_copy / 8 <= n["params"] <= one_copy / 2
  assert abs(n["optimizer"] - 2 * n["params"]) <= 64  # + the step counters
  assert n["arguments"] == n["params"] + n["optimizer"] + n["batch"] + 4  # + step
  assert n["temporaries"] > 0 and n["total"] >= n["arguments"]


def test_logical_rules_replicate_what_does_not_divide():
  mesh = AbstractMesh((1, 2, 4, 1), sharding.MESH_AXES)
  assert sharding.logical_to_mesh_spec(("embed", "kv_heads", "head_dim"), (32, 2, 8),
                                       mesh) == P("fsdp", None, None)
  assert sharding.logical_to_mesh_spec(("embed", "q_heads", "head_dim"), (32, 8, 8),
                                       mesh) == P("fsdp", "tensor", None)
  # fsdp goes to the batch first, so activations keep the embedding whole.
  assert sharding.logical_to_mesh_spec(("batch", "seq", "embed"), (8, 32, 32),
                                       mesh) == P("fsdp", None, None)
  with pytest.raises(ValueError, match="no rule"):
    sharding.logical_to_mesh_spec(("heads",), (8,), mesh)
  # A mesh of your own without the expert axis (as built before it existed) still shards.
  old = AbstractMesh((1, 2, 4), sharding.MESH_AXES[:3])
  with jax.sharding.use_abstract_mesh(old):
    assert sharding.context_mesh() == old
  assert sharding.logical_to_mesh_spec(("embed", "q_heads", "head_dim"), (32, 8, 8),
                                       old) == P("fsdp", "tensor", None)


def test_constrain_is_a_no_op_without_a_mesh():
  x = jax.numpy.ones((2, 4, 8))
  assert sharding.constrain(x, ("batch", "seq", "embed")) is x


@pytest.mark.parametrize("mesh,error", [
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one"),
    ({"data": 3, "fsdp": 1, "tensor": 1}, "needs 3 devices"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, "do not divide"),
    ({"data": 0, "fsdp": 1, "tensor": 1}, "positive int or -1"),
])
def test_bad_mesh_sizes_are_rejected(mesh, error):
  with pytest.raises(ValueError, match=error):
    sharding.mesh_shape(mesh, 8)


def test_dcn_section_multiplies_the_per_slice_mesh():
  # 16 devices in 2 slices along data: each slice is (data -1 -> 4, fsdp 2, tensor 1).
  mesh = {"data": -1, "fsdp": 2, "tensor": 1, "dcn": {"data": 2, "fsdp": 1, "tensor": 1}}
  assert sharding.global_mesh_shape(mesh, 16) == (8, 2, 1, 1)  # no `expert`: 1 (older configs)
  assert sharding.global_mesh_shape({**mesh, "dcn": {}}, 16) == (8, 2, 1, 1)  # one slice
  assert sharding.global_mesh_shape({**mesh, "expert": 2}, 16) == (4, 2, 1, 2)
  with pytest.raises(ValueError, match="mesh.dcn.fsdp must be a positive int"):
    sharding.global_mesh_shape({**mesh, "dcn": {"data": 2, "fsdp": 0}}, 16)
  with pytest.raises(ValueError, match="do not divide into 3 slices"):
    sharding.global_mesh_shape({**mesh, "dcn": {"data": 3}}, 16)

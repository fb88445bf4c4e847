"""`plan --topology`: the real train step compiled by libtpu for a TPU slice, and the refusals.

Needs a toolchain with libtpu (`tools/aot_toolchains.sh` builds `.toolchains/jax-0.11.2` in
the repository root); the tests run its Python in a subprocess, and skip without it (fail in CI,
which builds it).
"""

import json
import subprocess

import pytest

from tests import toolchains

VERSION = "0.11.2"  # the GPU machine's jax
TOOLCHAIN = toolchains.python(VERSION)


@pytest.fixture(autouse=True)
def _needs_toolchain():
  if TOOLCHAIN is None:
    if toolchains.must_run():
      pytest.fail(toolchains.missing_reason(VERSION))
    pytest.skip(toolchains.missing_reason(VERSION))


def _run(args: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run([str(TOOLCHAIN), *args], env=toolchains.env(), cwd=toolchains.REPO,
                        capture_output=True, text=True, timeout=600)


def test_tpu_plan_compiles_the_pallas_kernel_the_scanned_stack_and_expert_parallelism(
    tmp_path):
  """attention_impl "auto" (the paper configs' default) resolves to the kernel for a TPU; the
  MoE blocks' experts split over the expert axis (beside tensor) compile through libtpu."""
  out = tmp_path / "plan.json"
  proc = _run(["-m", "gated_attention_jax.plan", "--config=tests/_sharding_config.py",
               "--topology=v5e:2x2", "--config.mesh.data=1", "--config.mesh.fsdp=1",
               "--config.mesh.tensor=2", "--config.mesh.expert=2",
               "--config.model.attention_impl=auto", "--config.model.mlp_type=moe",
               "--config.model.moe.num_experts=4", "--config.model.moe.expert_dim=32",
               "--config.model.scan_layers=True", "--config.model.num_layers=2",
               "--config.model.remat=full", "--count_flops", f"--out={out}"])
  assert proc.returncode == 0, proc.stderr[-4000:]
  n = json.loads(out.read_text())
  assert (n["topology"], n["num_devices"], n["compiler"]) == ("v5e:2x2", 4, "tpu")
  assert n["mesh"] == {"data": 1, "fsdp": 1, "tensor": 2, "expert": 2}
  assert n["device_kind"].startswith("TPU v5") and n["hbm_bytes_per_device"] == 16 * 2**30
  assert (n["attention_impl"], n["attention_choice"], n["compiled_attention_impl"]) == (
      "auto", "pallas", "pallas")
  assert "'auto' chose 'pallas' for TPU v5" in proc.stdout and "Mosaic TPU" in proc.stdout
  assert n["kernel_custom_calls"] >= 1  # Mosaic, not the interpreter (which leaves none)
  b = n["per_device_bytes"]
  # The compiled step's arguments hold the shards the rules give, padded to TPU tiles.
  assert b["arguments"] >= b["params"] + b["optimizer"] + b["batch"] + 4
  assert b["total"] == b["arguments"] + b["outputs"] - b["aliased"] + b["temporaries"]
  assert n["fits"] is True
  # libtpu counts the scanned step (from 1 and 2 unrolled layers): with remat "full" more than
  # 6 x the parameters a token multiplies x its tokens (the Pallas kernel is not counted).
  assert n["flops_counted"].startswith("the step compiled unrolled at 1 and 2 layers")
  assert 1.1 < n["flops_per_device"] / n["model_matmul_flops_per_device"] < 3
  assert "FLOPs per device per step" in proc.stdout
  assert "Pallas kernel calls compiled for tpu" in proc.stdout


def test_tpu_plan_refuses_before_compiling():
  code = """
import ml_collections
from configs import ablation
from gated_attention_jax import aot, plan
from tests import _sharding_config
def refusal(fn):
  try:
    fn()
  except ValueError as e:
    return str(e)
  return 'NOT REFUSED'
small = _sharding_config.get_config()
small.mesh.update(data=1, fsdp=3, tensor=1)
big = ablation.make_config('baseline', 'paper_1p7b')
big.model.attention_impl = 'pallas'
big.train.batch_size = 4
big.mesh.update(data=4, fsdp=1)  # every chip holds all 1.7B parameters and both Adam moments
print('UNKNOWN', refusal(lambda: aot.target_devices('v5e:3x7')))
print('MESH', refusal(lambda: plan.plan(small, aot.target_devices('v5e:2x2'), topology='v5e:2x2')))
print('FIT', refusal(lambda: plan.plan(big, aot.target_devices('v5e:2x2'), topology='v5e:2x2',
                                       hbm_bytes=aot.hbm_bytes('v5e:2x2'))))
small.mesh.update(fsdp=4)
small.model.attention_impl = 'cudnn'
print('CUDNN', refusal(lambda: plan.plan(small, aot.target_devices('v5e:2x2'))))
small.model.attention_impl = 'xla'  # (B, N, T, S) float32 probabilities: 32 GiB per chip
small.data.seq_len, small.train.batch_size = 8192, 32
oom = plan.plan(small, aot.target_devices('v5e:2x2'), topology='v5e:2x2',
                hbm_bytes=aot.hbm_bytes('v5e:2x2'))
print('OOM', oom['fits'], oom['compiler_error'])
print('ADVICE', plan.report(oom).splitlines()[2])
"""
  proc = _run(["-c", code])
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines()
               if line.split(" ", 1)[0] in ("UNKNOWN", "MESH", "FIT", "CUDNN", "OOM", "ADVICE"))
  assert "libtpu cannot compile for TPU topology 'v5e:3x7'" in lines["UNKNOWN"]
  assert "v5e:2x2 has 4 devices" in lines["MESH"] and "needs 3 devices" in lines["MESH"]
  # 1.7B float32 parameters and two Adam moments on every chip: ~19 GiB > 16 GiB.
  assert "cannot fit on v5e:2x2" in lines["FIT"] and "> 16.00 GiB" in lines["FIT"], lines["FIT"]
  assert "GPU library" in lines["CUDNN"]
  # Past the exact parts, libtpu itself refuses a step that needs more than the HBM.
  assert lines["OOM"].startswith("False RESOURCE_EXHAUSTED") and "HBM" in lines["OOM"]
  assert "(8 sequences per device: lower --config.train.batch_size" in lines["ADVICE"]


@pytest.mark.parametrize("impl,head_dim,kernel", [("auto", 64, "mosaic_gpu"),
                                                   ("pallas", 16, "__gpu$xla.gpu.triton")])
def test_h100_plan_compiles_the_pallas_kernel_and_the_scanned_step(tmp_path, impl, head_dim,
                                                                   kernel):
  """The kernel's `auto` picks Mosaic GPU on Hopper where it serves the shape (head_dim a
  multiple of 64), else Triton: either one's custom call must be in the compiled step. The
  model's "auto" chooses cuDNN for bf16 on a GPU, which the deviceless toolchain lacks: the
  plan compiles the fused kernel instead and says so."""
  out = tmp_path / "plan.json"
  proc = _run(["-m", "gated_attention_jax.plan", "--config=tests/_sharding_config.py",
               "--topology=h100", "--config.mesh.data=1", f"--config.model.attention_impl={impl}",
               f"--config.model.head_dim={head_dim}", "--config.model.dtype=bfloat16",
               "--config.model.scan_layers=True",
               f"--out={out}"])
  assert proc.returncode == 0, proc.stderr[-4000:]
  n = json.loads(out.read_text())
  chosen = "cudnn" if impl == "auto" else "pallas"
  assert (n["attention_choice"], n["compiled_attention_impl"]) == (chosen, "pallas"), n
  assert ("attention compiled as 'pallas', not 'cudnn'" in proc.stdout) == (impl == "auto")
  assert (n["num_devices"], n["compiler"], n["device_kind"]) == (1, "gpu", "NVIDIA H100 80GB HBM3")
  assert n["hbm_bytes_per_device"] == 84942979072 and n["fits"] is True  # the target config's
  assert n["per_device_bytes"]["temporaries"] > 0
  assert n["kernel_custom_calls"] >= 1 and list(n["kernel_call_targets"]) == [kernel], n
  # cuDNN attention needs the cuDNN library, which a deviceless toolchain lacks: one clear line.
  proc = _run(["-m", "gated_attention_jax.plan", "--config=tests/_sharding_config.py",
               "--topology=h100", "--config.mesh.data=1", "--config.model.attention_impl=cudnn"])
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "attention_impl='cudnn' cannot be compiled ahead of time" in proc.stderr

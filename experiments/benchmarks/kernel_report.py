"""Registers, spills, shared memory and compiler warnings of every GPU kernel, from the compilers.

    bash tools/aot_toolchains.sh 0.11.2
    JAX_PLATFORMS=cpu .toolchains/jax-0.11.2/bin/python experiments/benchmarks/kernel_report.py \\
        --out=experiments/results/kernel_report

Compiles ``pallas_gpu`` (Triton) and ``pallas_mgpu`` (Mosaic GPU) forward + backward for H100 or
H200 (sm_90a, deviceless; ``gated_attention_jax.aot``) at each head_dim, bf16, causal, with an
elementwise gate, and reads per kernel what ptxas reports (registers per thread, spill stores /
loads, stack) and the shared memory each kernel allocates: for Triton from XLA's thunk sequence
(``XLA_FLAGS=--xla_dump_to``), for Mosaic GPU from its resource dump (``MOSAIC_GPU_DUMP_TO``).
ptxas's ``-v`` output comes from XLA's log for Triton (``TF_CPP_VMODULE=subprocess_compilation=2``)
and from ``MOSAIC_GPU_DUMP_PTXAS`` for Mosaic GPU. Each compile runs in a subprocess, since those
switches are read when jax starts. Mosaic GPU kernels are unnamed in the dumps: they are numbered
in trace order, forward, dq, dk/dv.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

KERNELS = ("fwd", "dq", "dkv")
TRITON_NAMES = {"gated_flash_fwd_gpu": "fwd", "gated_flash_dq_gpu": "dq",
                "gated_flash_dkv_gpu": "dkv"}
_PTXAS = re.compile(
    r"Compiling entry function '(?P<name>[^']+)'.*?"
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
    r"(?P<loads>\d+) bytes spill loads.*?Used (?P<regs>\d+) registers", re.S)


def _worker(impl: str, target: str, head_dim: int, seq: int, dump: pathlib.Path) -> None:
  """Compiles one impl forward + backward (run in a subprocess with the dump switches set)."""
  from gated_attention_jax import compile_check  # pylint: disable=g-import-not-at-top

  case = compile_check.Case(f"report_hd{head_dim}", head_dim=head_dim, heads=8, kv_heads=8,
                            t=seq, s=seq, batch=2)
  record = compile_check.compile_case(impl, target, case, backward=True)
  (dump / "status.json").write_text(json.dumps(record))


def _ptxas_entries(text: str) -> list[dict]:
  """Per compiled function: name, registers, spill stores/loads, stack, warnings before it."""
  entries = []
  for block in re.split(r"(?=ptxas info\s+: \d+ bytes gmem)", text):
    m = _PTXAS.search(block)
    if not m:
      continue
    warnings = [w.strip() for w in re.findall(r"ptxas warning\s*:\s*(.*)", block)
                if "spilled" not in w]
    entries.append({"name": m["name"], "registers": int(m["regs"]),
                    "spill_stores": int(m["stores"]), "spill_loads": int(m["loads"]),
                    "stack": int(m["stack"]), "warnings": warnings})
  return entries


def _prior_warnings(text: str, name: str) -> list[str]:
  # ptxas prints "ptxas warning : ... in function 'X'" lines before X's info block.
  return sorted({w for w in re.findall(rf"ptxas warning\s*:\s*(.*'{re.escape(name)}'.*)", text)
                 if "spilled" not in w})


def report_one(impl: str, target: str, head_dim: int, seq: int, python: str) -> list[dict]:
  """Rows (one per kernel) for one impl x head_dim."""
  with tempfile.TemporaryDirectory() as tmp:
    dump = pathlib.Path(tmp)
    (dump / "xla").mkdir()
    (dump / "mosaic").mkdir()
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="0",
               TF_CPP_VMODULE="subprocess_compilation=2",
               XLA_FLAGS=f"--xla_dump_to={dump / 'xla'}", MOSAIC_GPU_DUMP_PTXAS="1",
               MOSAIC_GPU_DUMP_TO=str(dump / "mosaic"),
               PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2]))
    proc = subprocess.run([python, __file__, "--worker", impl, target, str(head_dim), str(seq),
                           str(dump)], env=env, capture_output=True, text=True, timeout=900)
    status_file = dump / "status.json"
    status = (json.loads(status_file.read_text()) if status_file.exists() else
              {"status": "failed", "error": proc.stderr[-2000:]})
    base = {"impl": impl, "target": target, "head_dim": head_dim, "status": status["status"]}
    if status["status"] != "ok":
      return [dict(base, kernel=k, error=status.get("error", "")[:300]) for k in KERNELS]
    rows = []
    if impl == "pallas_gpu":
      smem = {}
      for thunks in (dump / "xla").glob("*thunk_sequence.txt"):
        for name, nbytes in re.findall(r"(gated_flash_\w+_gpu) .*?shared_memory: (\d+) bytes",
                                       thunks.read_text()):
          smem[TRITON_NAMES[name]] = int(nbytes)
      for e in _ptxas_entries(proc.stderr):
        if e["name"] in TRITON_NAMES:
          kernel = TRITON_NAMES[e["name"]]
          e["warnings"] += _prior_warnings(proc.stderr, e["name"])
          rows.append(dict(base, kernel=kernel, smem_bytes=smem.get(kernel), **e))
    else:
      ptxas = sorted((dump / "mosaic").glob("*.ptxas"), key=lambda p: int(p.stem.split("_")[-1]))
      for kernel, path in zip(KERNELS, ptxas):
        resources = path.with_suffix(".resources.txt")
        m = re.search(r"smem_scratch_bytes=(\d+)", resources.read_text()) if resources.exists() \
            else None
        text = path.read_text()
        entries = _ptxas_entries(text)
        warnings = sorted({w for w in re.findall(r"ptxas warning\s*:\s*(.*)", text)
                           if "spilled" not in w})
        if entries:
          e = entries[0]
          e["warnings"] = warnings
          rows.append(dict(base, kernel=kernel, smem_bytes=int(m[1]) if m else None, **e))
    return sorted(rows, key=lambda r: KERNELS.index(r["kernel"]))


def markdown(rows: list[dict], header: str) -> str:
  lines = [header, "",
           "| impl | kernel | head_dim | registers | spill stores / loads (B) | stack (B) | "
           "shared memory (B) | ptxas warnings |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["status"] != "ok":
      lines.append(f"| {r['impl']} | {r['kernel']} | {r['head_dim']} | | | | | "
                   f"compile failed: {r.get('error', '')[:120]} |")
      continue
    smem = "" if r.get("smem_bytes") is None else f"{r['smem_bytes']:,}"
    lines.append(f"| {r['impl']} | {r['kernel']} | {r['head_dim']} | {r['registers']} | "
                 f"{r['spill_stores']} / {r['spill_loads']} | {r['stack']} | {smem} | "
                 f"{'; '.join(r['warnings']) or 'none'} |")
  return "\n".join(lines) + "\n"


def main() -> int:
  if len(sys.argv) > 1 and sys.argv[1] == "--worker":
    impl, target, head_dim, seq, dump = sys.argv[2:7]
    _worker(impl, target, int(head_dim), int(seq), pathlib.Path(dump))
    return 0
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--impls", default="pallas_gpu,pallas_mgpu")
  parser.add_argument("--target", default="h100", choices=("h100", "h200"))
  parser.add_argument("--head_dims", default="64,128,256")
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--out", default="", help="folder for kernel_report.json / .md")
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top

  rows = []
  for impl in args.impls.split(","):
    for head_dim in map(int, args.head_dims.split(",")):
      new = report_one(impl, args.target, head_dim, args.seq, sys.executable)
      rows += new
      for r in new:
        print(f"{impl:11s} hd{head_dim:<4d} {r['kernel']:4s} "
              + (f"{r['registers']:3d} regs, spills {r['spill_stores']}/{r['spill_loads']} B, "
                 f"smem {r.get('smem_bytes')}, warnings {r['warnings']}"
                 if r["status"] == "ok" else f"FAILED {r.get('error', '')[:200]}"), flush=True)
  header = (f"Kernel report: {args.target} (sm_90a, deviceless compile), jax {jax.__version__}, "
            f"bf16, causal, elementwise gate, B=2 T=S={args.seq} N=K=8, "
            f"{datetime.date.today().isoformat()}")
  table = markdown(rows, header)
  print(table)
  if args.out:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_report.json").write_text(json.dumps(
        {"jax": jax.__version__, "target": args.target, "date": datetime.date.today().isoformat(),
         "rows": rows}, indent=1))
    (out / "kernel_report.md").write_text(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The Colab notebooks run top to bottom on CPU, are committed without outputs, and have badges.

Each notebook is executed with nbclient in a fresh python3 kernel, from the repository root
(so `configs/` and `experiments/` import as in a Colab clone). The package is installed here,
so the notebooks' install cells skip pip; the tests check that they did. Training steps come
from GAJ_NOTEBOOK_STEPS, set small here.
"""

from __future__ import annotations

import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

from tests import toolchains

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "colab"
NOTEBOOKS = ("01_quickstart.ipynb", "02_attention_sinks.ipynb", "03_kernels_and_scale.ipynb")
BADGE_URL = ("https://colab.research.google.com/github/gated-attention-jax/gated_attention_jax/"
             "blob/main/colab/{}")
CELL_TIMEOUT_S = 300
NOT_INSTALLED = "gated_attention_jax is already importable: not installing"


def _execute(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> str:
  """Runs the notebook; returns all its stdout text. nbclient raises on any cell error.

  The kernel's TMPDIR is the test's, so the run folders a notebook makes with tempfile go
  where pytest cleans up.
  """
  monkeypatch.setenv("GAJ_NOTEBOOK_STEPS", "6")
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
  NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                 resources={"metadata": {"path": str(REPO)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  return "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")


def test_quickstart_runs(monkeypatch, tmp_path):
  text = _execute("01_quickstart.ipynb", monkeypatch, tmp_path)
  assert NOT_INSTALLED in text
  assert re.search(r"G1 elementwise \(best\)\s+G1 sdpa elementwise sigmoid multiply\s+229,440\s+65,536",
                   text)
  assert "attention mass from document 2 onto document 1: 0.0" in text
  diff = float(re.search(r"attention_impl='pallas': max \|logits - xla logits\| = (\S+)", text)[1])
  assert diff < 1e-4


def test_attention_sinks_runs(monkeypatch, tmp_path):
  text = _execute("02_attention_sinks.ipynb", monkeypatch, tmp_path)
  assert NOT_INSTALLED in text
  assert "baseline: no gate, 836,992 params" in text
  assert "G1 gated: G1 sdpa elementwise sigmoid multiply, 902,528 params" in text
  assert "after 6 steps" in text
  gated = re.search(r"G1 gated\s+([\d.]+)\s+0\.048\s+([\d.]+)\s+94\s+([\d.]+)\s+0\.116", text)
  assert gated, text
  assert 0.0 < float(gated[1]) < 1.0 and 0.0 < float(gated[3]) < 1.0
  for png in ("attention_layer0", "attention_layer3", "first_token_attention",
              "gate_histogram", "max_activation"):
    assert f"'{png}.png'" in text


def test_kernels_and_scale_runs(monkeypatch, tmp_path):
  monkeypatch.setenv("XLA_FLAGS", toolchains.CPU_XLA_FLAGS)  # no device count: the notebook sets it
  text = _execute("03_kernels_and_scale.ipynb", monkeypatch, tmp_path)
  assert "no accelerator: 8 simulated CPU devices" in text
  assert NOT_INSTALLED in text
  errors = re.findall(r"(pallas_\w+)\s+(\w+)\s+max \|fused - reference\| / max \|reference\| = (\S+)",
                      text)
  assert {(impl, name) for impl, name, _ in errors} == {
      (impl, name) for impl in ("pallas_tpu", "pallas_gpu")
      for name in ("out", "dq", "dk", "dv", "dgate")}
  assert max(float(e) for _, _, e in errors) < 1e-4
  assert "8 devices, mesh {'data': 2, 'fsdp': 2, 'tensor': 2, 'expert': 1}" in text
  assert "sharded training over 8 devices" in text
  assert re.search(r"q_proj .* P\('fsdp', 'tensor', None\)\s+\(128, 4, 32\)\s+\(64, 2, 32\)", text)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
  nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_notebook_list_is_complete():
  assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == list(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_readme_and_notebook_have_colab_badge(name):
  url = BADGE_URL.format(name)
  assert f"]({url})" in (REPO / "README.md").read_text()
  assert f"]({url})" in (NOTEBOOK_DIR / name).read_text()

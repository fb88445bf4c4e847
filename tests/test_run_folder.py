"""A run folder never loses data: changed configs, damaged checkpoints, strays in
checkpoints/, run files of the wrong type, torn metrics, kills, a second run, Ctrl-C,
a full or read-only disk; and reading a run (load_run, sample, analyze) changes nothing.

One tiny run (tests/_tiny_run_config.py, 8 steps, checkpoints at 4 and 8) is
trained once per module; each test damages or reuses a copy of it.
"""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

import gated_attention_jax as gaj
from gated_attention_jax import sharding
from gated_attention_jax.training import checkpointing, experiment, renames, run_folder, train
from gated_attention_jax.data import pipeline
from tests import _tiny_run_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def config(**train_overrides):
  c = _tiny_run_config.get_config()
  c.train.update(**train_overrides)
  return c


def rows(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir):
  return [(r["step"], r["loss"], r.get("eval_loss")) for r in rows(workdir)]


def snapshot(folder):
  """{relative path: sha256 of a file, "dir" for a folder} of everything in `folder`."""
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          if p.is_file() else "dir" for p in sorted(folder.rglob("*"))}


def package_warnings(caplog):
  """The warning lines this package logged (what the CLI's console shows of the logs)."""
  package = str(ROOT / "gated_attention_jax")
  return [r.getMessage() for r in caplog.records
          if r.levelname == "WARNING" and r.pathname.startswith(package)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained") / "run"
  train.train_and_evaluate(config(), workdir)
  return workdir


@pytest.fixture
def run(trained, tmp_path):
  """A private copy of the trained run folder."""
  return pathlib.Path(shutil.copytree(trained, tmp_path / "run"))


def _cli(workdir, *flags):
  return [sys.executable, "-m", "gated_attention_jax.main",
          "--config=tests/_tiny_run_config.py", f"--workdir={workdir}", *flags]


def _start(workdir, *flags, rows_before=1):
  """A CLI run in a subprocess, returned once it has written `rows_before` metrics rows."""
  proc = subprocess.Popen(_cli(workdir, *flags), cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics, deadline = workdir / "metrics.jsonl", time.time() + 240
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= rows_before):
    assert proc.poll() is None, proc.communicate()
    assert time.time() < deadline, "training did not start"
    time.sleep(0.2)
  return proc


@pytest.mark.parametrize("section, field, value", [
    ("model", "d_model", 64),  # a shape
    ("gate", "activation", "silu"),  # a meaning without a shape
    ("train", "seed", 1),
    ("data", "seq_len", 16),
])
def test_a_changed_config_is_refused_before_anything_is_touched(run, section, field, value):
  before = snapshot(run)
  changed = config()
  old = changed[section][field]
  changed[section][field] = value
  with pytest.raises(run_folder.RunFolderError,
                     match=rf"{section}\.{field}: {old!r} -> {value!r}.*--overwrite"):
    train.train_and_evaluate(changed, run)
  assert snapshot(run) == before


def test_a_resumable_change_continues_the_run(run, trained):
  summary = train.train_and_evaluate(config(num_steps=10, log_every=1, checkpoint_every=5),
                                     run)
  assert summary["finished"] and summary["step"] == 10
  steps = [r["step"] for r in rows(run)]
  assert steps == [2, 4, 6, 8, 9, 10]  # the old rows, then the new ones: no duplicates
  assert rows(run)[:4] == rows(trained)
  assert checkpointing.Checkpointer(run, keep=5).steps() == [4, 8, 10]


def test_overwrite_starts_over(run):
  summary = train.train_and_evaluate(config(seed=1), run, overwrite=True)
  assert summary["finished"]
  assert json.loads((run / "config.json").read_text())["train"]["seed"] == 1
  assert [r["step"] for r in rows(run)] == [2, 4, 6, 8]


def _flip_bytes(path, count=8):
  data = bytearray(path.read_bytes())
  for i in range(count):
    data[len(data) // 2 + i] ^= 0xFF
  path.write_bytes(bytes(data))


def test_a_flipped_bit_is_caught_quarantined_and_the_run_goes_on(run, trained, caplog):
  # The array data (OCDBT): orbax reads a flipped bit there without complaint.
  data = max((f for f in (run / "checkpoints" / "8" / "state").rglob("*") if f.is_file()),
             key=lambda f: f.stat().st_size)
  flipped = bytearray(data.read_bytes())
  flipped[len(flipped) // 2] ^= 1
  data.write_bytes(bytes(flipped))
  quarantined = snapshot(run / "checkpoints" / "8")
  summary = train.train_and_evaluate(config(), run)
  assert summary["finished"] and summary["step"] == 8
  assert "checkpoint at step 8 is damaged (DamagedCheckpoint: checksum mismatch" in caplog.text
  assert snapshot(run / "checkpoints" / "quarantine" / "8") == quarantined  # moved, not lost
  # Saved again at step 8 where the damaged one was: no "already exists" dead end.
  assert checkpointing.Checkpointer(run, keep=5).steps() == [4, 8]
  # Steps 5-8 were trained again from step 4's checkpoint, bit for bit.
  assert losses(run) == losses(trained)
  # Re-running the finished run trains nothing and keeps its evaluation in summary.json.
  again = train.train_and_evaluate(config(), run)
  assert again["eval_loss"] == summary["eval_loss"]
  assert json.loads((run / "summary.json").read_text())["eval_loss"] == summary["eval_loss"]


def test_a_bad_data_iterator_state_counts_as_damage(run):
  ckpt = run / "checkpoints" / "8"
  shutil.rmtree(ckpt / "checksums")  # as an older version saved it: nothing to verify
  (ckpt / "data" / "metadata").write_text(json.dumps({"no": "iterator state"}))
  trainer = train.Trainer(config(), train.experiment.model_config(config()),
                          train.sharding.make_mesh(config().mesh))
  data_iter = pipeline.make_train_iterator(config().data, batch_size=4, seed=0)
  step, _, _ = checkpointing.Checkpointer(run, keep=5).restore_latest(
      trainer.abstract_state, accept_data=data_iter.set_state)
  assert step == 4 and (run / "checkpoints" / "quarantine" / "8").is_dir()


def _array_files(state):
  return [f for f in (state / "ocdbt.process_0" / "d").iterdir() if f.is_file()]


def _zero(path):
  path.write_bytes(bytes(path.stat().st_size))


# The commonest real damage to a checkpoint's `state` (OCDBT) folder: each makes
# orbax's read fail (tensorstore errors, re-raised as a bare Exception).
DAMAGE = {
    "truncated array data": lambda state: [os.truncate(f, 10) for f in _array_files(state)],
    "zeroed array data": lambda state: [_zero(f) for f in _array_files(state)],
    "deleted array data": lambda state: [f.unlink() for f in _array_files(state)],
    "deleted OCDBT folder": lambda state: shutil.rmtree(state / "ocdbt.process_0"),
    "deleted state/d": lambda state: shutil.rmtree(state / "d"),
    "truncated manifests": lambda state: [os.truncate(f, 20)
                                          for f in state.rglob("manifest.ocdbt")],
}


# No unraisable exception may reach the console (pytest turns them into these warnings).
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", DAMAGE)
def test_an_unreadable_checkpoint_is_quarantined_with_one_line(run, trained, damage, caplog,
                                                               capfd):
  DAMAGE[damage](run / "checkpoints" / "8" / "state")
  damaged = snapshot(run / "checkpoints" / "8")
  summary = train.train_and_evaluate(config(), run)
  assert summary["finished"] and summary["step"] == 8
  assert losses(run) == losses(trained)  # steps 5-8 trained again from step 4, bit for bit
  assert snapshot(run / "checkpoints" / "quarantine" / "8") == damaged  # moved, not lost
  assert checkpointing.Checkpointer(run, keep=5).steps() == [4, 8]
  [line] = package_warnings(caplog)
  assert line.startswith("checkpoint at step 8 is damaged (") and "\n" not in line, line
  assert "damage.log" in line
  assert "Traceback" not in capfd.readouterr().err
  assert "Traceback" in (run / "checkpoints" / "quarantine" / "damage.log").read_text()


def test_the_commonest_damage_from_the_cli_is_one_line_and_the_run_finishes(run, trained):
  DAMAGE["truncated array data"](run / "checkpoints" / "8" / "state")
  result = subprocess.run(_cli(run), cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  [line] = result.stderr.splitlines()
  assert "checkpoint at step 8 is damaged (ValueError: OUT_OF_RANGE" in line, line
  assert "run finished at step 8/8" in result.stdout
  assert losses(run) == losses(trained)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["flipped bytes", "zeroed array data"])
def test_when_every_checkpoint_is_damaged_the_run_stops(run, damage, caplog, capfd):
  for state in (run / "checkpoints").glob("*/state"):
    if damage == "flipped bytes":
      for f in state.glob("d/*"):
        _flip_bytes(f, count=64)
    else:
      DAMAGE[damage](state)
  before = snapshot(run)
  with pytest.raises(checkpointing.CheckpointError, match="every checkpoint .* is damaged"):
    train.train_and_evaluate(config(), run)
  quarantine = run / "checkpoints" / "quarantine"
  assert sorted(p.name for p in quarantine.iterdir()) == ["4", "8", "damage.log"]
  after = snapshot(run)
  for step in ("4", "8"):  # moved whole; nothing else changed
    moved = {k.replace(f"checkpoints/quarantine/{step}", f"checkpoints/{step}", 1): v
             for k, v in after.items() if k.startswith(f"checkpoints/quarantine/{step}")}
    assert moved == {k: v for k, v in before.items() if k.startswith(f"checkpoints/{step}")}
  assert {k: v for k, v in after.items() if "checkpoints/" not in k} == {
      k: v for k, v in before.items() if "checkpoints/" not in k}
  assert len(package_warnings(caplog)) == 2
  assert "Traceback" not in capfd.readouterr().err


def test_what_is_not_a_checkpoint_is_set_aside_never_overwritten(run, trained, caplog):
  checkpoints = run / "checkpoints"
  shutil.rmtree(checkpoints / "8")
  (checkpoints / "8").write_text("a file where step 8's folder was")
  (checkpoints / "notes.txt").write_text("mine")
  summary = train.train_and_evaluate(config(), run)
  assert summary["finished"] and summary["step"] == 8
  assert losses(run) == losses(trained)
  assert (checkpoints / "quarantine" / "8").read_text() == "a file where step 8's folder was"
  assert (checkpoints / "quarantine" / "notes.txt").read_text() == "mine"
  assert checkpointing.Checkpointer(run, keep=5).steps() == [4, 8]
  lines = package_warnings(caplog)
  assert len(lines) == 2 and all("is not a checkpoint: moved to" in l for l in lines), lines


def test_a_file_where_the_quarantine_goes_stops_before_moving_anything(run):
  (run / "checkpoints" / "quarantine").write_text("mine")
  (run / "checkpoints" / "notes.txt").write_text("also mine")
  before = snapshot(run)
  with pytest.raises(checkpointing.CheckpointError, match=r"quarantine is not a folder"):
    train.train_and_evaluate(config(), run)
  assert snapshot(run) == before


@pytest.mark.parametrize("name", ["summary.json", "metrics.jsonl", "config.json", ".lock"])
def test_a_folder_where_the_run_writes_a_file_is_refused_before_anything(run, name):
  (run / name).unlink()
  (run / name).mkdir()
  before = snapshot(run)
  with pytest.raises(run_folder.RunFolderError, match=rf"{name} is not a file.*nothing was"):
    train.train_and_evaluate(config(), run)
  assert snapshot(run) == before


def test_a_summary_folder_from_the_cli_is_one_error_line(run):
  (run / "summary.json").unlink()
  (run / "summary.json").mkdir()
  result = subprocess.run(_cli(run), cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1
  assert result.stderr.splitlines() == [f"error: {run / 'summary.json'} is not a file, as the"
                                        " run writes it: move it out of the way and rerun"
                                        " (nothing was changed)"]


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_reading_a_run_with_a_damaged_newest_checkpoint_changes_nothing(run, trained, caplog):
  DAMAGE["truncated array data"](run / "checkpoints" / "8" / "state")
  before = snapshot(run)
  config_, step, model = gaj.load_run(run)
  assert step == 4 and config_.to_dict() == config().to_dict()
  [line] = package_warnings(caplog)
  assert line.startswith("checkpoint at step 8 of") and "cannot be read" in line, line
  _, _, intact = checkpointing.load_model(trained, step=4)
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(intact))):
    np.testing.assert_array_equal(a, b)
  # Asked for by step: one line saying why, nothing skipped or moved.
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"^checkpoint at step 8 of .* cannot be read \(ValueError: OUT_OF_RANGE"):
    checkpointing.load_model(run, step=8)
  assert snapshot(run) == before

  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  sample = subprocess.run(
      [sys.executable, "-m", "gated_attention_jax.sample", f"--workdir={run}", "--prompt=ROMEO",
       "--max_new_tokens=8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert sample.returncode == 0, sample.stderr
  assert "=== prompt 'ROMEO', sample 0" in sample.stdout
  [line] = sample.stderr.splitlines()
  assert "checkpoint at step 8 of" in line and "skipped" in line, line
  assert snapshot(run) == before

  analyze = subprocess.run(
      [sys.executable, "-m", "gated_attention_jax.analyze", f"--workdir={run}", "--num_batches=1",
       "--long_context_batches=1", "--multiples=1", "--selectivity_sequences=1",
       "--rope_methods=none"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert analyze.returncode == 0, analyze.stderr
  assert json.loads((run / "analysis.json").read_text())["step"] == 4
  after = snapshot(run)
  added = {k for k in after if k not in before}
  assert added and all(k.split("/")[0] in ("analysis.json", "analysis") for k in added), added
  assert {k: after[k] for k in before} == before


def test_a_torn_metrics_line_is_dropped(run, trained, caplog):
  with (run / "metrics.jsonl").open("a") as f:
    f.write('{"step": 9, "lo')
  train.train_and_evaluate(config(), run)  # finished: resumes at 8, trains nothing
  assert "torn last line" in caplog.text
  assert rows(run) == rows(trained)


def test_a_restart_before_the_first_checkpoint_does_not_duplicate_rows(run, trained):
  shutil.rmtree(run / "checkpoints")  # as a kill before the first save leaves it
  train.train_and_evaluate(config(), run)
  assert losses(run) == losses(trained)


def test_kill_9_while_saving_every_step_then_resume_is_exact(tmp_path, trained):
  workdir = tmp_path / "run"
  proc = _start(workdir, "--config.train.checkpoint_every=1", "--config.train.log_every=1",
                rows_before=3)
  proc.kill()  # SIGKILL: no handler runs; the lock goes with the process
  proc.communicate()
  assert not (workdir / "summary.json").exists()
  train.train_and_evaluate(config(), workdir)
  by_step = {r["step"]: r["loss"] for r in rows(workdir)}
  assert [by_step[r["step"]] for r in rows(trained)] == [r["loss"] for r in rows(trained)]
  assert len(by_step) == len(rows(workdir))  # one row per step


def test_a_second_run_is_refused_and_ctrl_c_saves(tmp_path):
  workdir = tmp_path / "run"
  proc = _start(workdir, "--config.train.num_steps=100000",
                "--config.train.checkpoint_every=100000", "--config.train.warmup_steps=2")
  with pytest.raises(run_folder.RunFolderError, match=rf"in use by another run \(pid {proc.pid}\)"):
    train.train_and_evaluate(config(), workdir)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert err.count("SIGINT received") == 1 and "Traceback" not in err, err
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["preempted"] and f"preempted (rerun to resume) at step {summary['step']}" in out
  assert checkpointing.Checkpointer(workdir, keep=5).steps() == [summary["step"]]


@pytest.fixture
def small_disk(tmp_path):
  """A tmpfs mount point (root only), unmounted afterwards."""
  mount = tmp_path / "disk"
  mount.mkdir()

  def mount_with(size_bytes, *options):
    opts = ",".join((f"size={size_bytes}",) + options)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mount)],
                            capture_output=True, text=True, check=False)
    if result.returncode:
      pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    return mount

  yield mount_with
  subprocess.run(["umount", str(mount)], check=False, capture_output=True)
  if os.path.ismount(mount):  # something still has a file open there: detach it anyway
    subprocess.run(["umount", "-l", str(mount)], check=False)
  assert not os.path.ismount(mount)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's loop
def test_a_full_disk_stops_with_one_line_and_keeps_the_checkpoints(trained, small_disk,
                                                                   monkeypatch):
  disk = small_disk(checkpointing.directory_bytes(trained) + 256 * 1024)  # < a checkpoint
  run = pathlib.Path(shutil.copytree(trained, disk / "run"))
  before = snapshot(run / "checkpoints")
  with pytest.raises(run_folder.RunFolderError, match=r"MiB free in .*earlier checkpoints"):
    train.train_and_evaluate(config(num_steps=9), run)  # the free-space check
  monkeypatch.setattr(run_folder, "check_free_space", lambda *a: None)
  with pytest.raises(run_folder.RunFolderError,
                     match=r"saving the checkpoint of step 9 failed: the disk is full.*"
                           r"\[4, 8\] are intact"):
    train.train_and_evaluate(config(num_steps=9), run)  # orbax's write fails: ENOSPC
  assert snapshot(run / "checkpoints") == before


def test_a_read_only_folder_is_named_and_left_alone(trained, small_disk):
  disk = small_disk(64 * 2**20)
  run = pathlib.Path(shutil.copytree(trained, disk / "run"))
  before = snapshot(run)
  subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
  with pytest.raises(run_folder.RunFolderError, match="the folder is read-only"):
    train.train_and_evaluate(config(num_steps=12), run)
  assert snapshot(run) == before


# Made by the package before training moved into gated_attention_jax/training/ (commit
# 3694e53: `main --config=tests/_tiny_run_config.py --stop_at_step=4`), and before the
# attention gate's projection was renamed from `gate_proj` to `attn_gate_proj`.
OLD_RUN = pathlib.Path(__file__).parent / "fixtures" / "run_0.1_flat_layout"


def test_a_run_folder_of_the_flat_layout_resumes(tmp_path, trained, capsys, monkeypatch):
  run = pathlib.Path(shutil.copytree(OLD_RUN, tmp_path / "run"))
  assert renames.saved_with_old_names(run / "checkpoints" / "4" / "state")
  monkeypatch.chdir(tmp_path)  # a relative run folder reads too
  _, step, model = gaj.load_run("run")
  assert step == 4 and snapshot(run) == snapshot(OLD_RUN)  # read-only
  saved = np.asarray(model.blocks[0].attn.attn_gate_proj[...])
  assert saved.shape == (32, 4, 8) and model.blocks[0].mlp.gate_proj.shape == (32, 64)
  resumed = config()
  resumed.model.attention_impl = "auto"  # a run may resume with another attention impl
  summary = train.train_and_evaluate(resumed, run)
  out = capsys.readouterr().out
  assert "resumed from step 4" in out
  assert "attention: xla (model.attention_impl 'auto': the XLA reference on cpu" in out, out
  assert summary["finished"] and summary["step"] == 8
  assert rows(run)[:2] == rows(OLD_RUN)  # its own rows kept, the new ones appended
  assert [r["step"] for r in rows(run)] == [2, 4, 6, 8]
  # The same losses as this machine's uninterrupted run (to float rounding: the
  # fixture's first four steps ran on another machine's CPU).
  np.testing.assert_allclose([r["loss"] for r in rows(run)], [r["loss"] for r in rows(trained)],
                             rtol=1e-5)
  assert checkpointing.Checkpointer(run, keep=5).steps() == [4, 8]
  # The new checkpoint is saved under today's names; the old one still reads the same.
  assert not renames.saved_with_old_names(run / "checkpoints" / "8" / "state")
  np.testing.assert_array_equal(
      np.asarray(gaj.load_run(run, 4)[2].blocks[0].attn.attn_gate_proj[...]), saved)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_old_names_cover_every_copy_of_a_parameter(scan_layers):
  """The renaming reaches the parameters and each optimizer moment, masked ones included,
  in both layer layouts, and touches nothing else (the SwiGLU's `gate_proj` stays)."""
  c = config(trainable="gate,norms")
  c.model.scan_layers = scan_layers
  model_cfg = experiment.model_config(c)
  state = train.Trainer(c, model_cfg, sharding.make_mesh(c.mesh)).abstract_state
  saved = renames.to_saved(state)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(saved)]
  assert not any("attn_gate_proj" in p for p in paths)
  assert sum("['attn']['gate_proj']" in p for p in paths) == 3  # params, mu, nu
  assert sum("['mlp']['gate_proj']" in p for p in paths) == 1  # frozen: no moments
  back = renames.to_current(saved)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  assert jax.tree.leaves(back) == jax.tree.leaves(state)

"""Training loop: sharded jit train step, evaluation, metrics, checkpoints, preemption.

`train_and_evaluate(config, workdir)` trains from scratch or resumes from the
newest intact checkpoint in `workdir/checkpoints` (the folder's config must be
the same, see `run_folder`), and returns a summary that is also written to
`workdir/summary.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import signal
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from gated_attention_jax import attention_ops
from gated_attention_jax import checks
from gated_attention_jax import losses
from gated_attention_jax import metrics as sink_metrics_lib
from gated_attention_jax import params as params_lib
from gated_attention_jax import sharding
from gated_attention_jax.data import pipeline
from gated_attention_jax.kernels import reference
from gated_attention_jax.training import checkpointing
from gated_attention_jax.training import experiment
from gated_attention_jax.training import init_from
from gated_attention_jax.training import metrics_writer
from gated_attention_jax.training import optim
from gated_attention_jax.training import run_folder
from gated_attention_jax.transformer import Transformer, TransformerConfig

# Peak dense bf16 TFLOP/s per device, for the MFU estimate (substring of device_kind).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v6": 918.0,
               "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v4": 275.0}

Batch = losses.Batch
# Per-layer training-batch metrics a step may return: the gate's mean, with
# train.track_activations the max |block output| and max attention logit, and per sparse
# layer the expert load (max / mean assignments) and router entropy.
PER_LAYER_METRICS = ("gate_score_mean_per_layer", "activation_max_per_layer",
                     "attention_logit_max_per_layer", "moe_expert_load_per_layer",
                     "moe_router_entropy_per_layer")
# Scalar training-batch metrics of MoE models: the balancing terms (mean over sparse layers).
MOE_METRICS = ("moe_balance_loss", "moe_router_z_loss")


def flops_per_token(cfg: TransformerConfig, seq_len: int, num_params: int) -> float:
  """Training FLOPs per token: 6·(non-embedding params + output projection) + attention.

  num_params: the parameters a token uses (`count_active_params`; all of a dense model's).
  The attention term is 12·layers·heads·head_dim·T (PaLM's convention, causal
  masking not discounted).
  """
  embedding = cfg.vocab_size * cfg.d_model
  matmul_params = (num_params - embedding * (1 if cfg.tie_embeddings else 2) + embedding
                   - cfg.max_positions * cfg.d_model)  # a learned position table is a lookup
  return 6.0 * matmul_params + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def peak_flops_per_device(train_cfg: ml_collections.ConfigDict) -> Optional[float]:
  if train_cfg.peak_tflops_per_device > 0:
    return train_cfg.peak_tflops_per_device * 1e12
  kind = jax.devices()[0].device_kind
  for name, tflops in PEAK_TFLOPS.items():
    if name in kind:
      return tflops * 1e12
  return None


def activation_stats(inter: dict[str, list[jax.Array]],
                     mask: jax.Array) -> dict[str, jax.Array]:
  """Per-layer max |block output| and max attention logit q·k/√H, each `(L,)`.

  inter: the model's intermediates; mask `(B, 1, T, S)`: the pairs attention may use.
  """
  def logit_max(q: jax.Array, k: jax.Array) -> jax.Array:
    logits = reference.grouped_logits(q, k, q.shape[-1] ** -0.5)  # (B, K, G, T, S)
    return jnp.max(jnp.where(mask[:, :, None], logits, -jnp.inf))

  return {"activation_max_per_layer": jnp.stack(
              [jnp.max(jnp.abs(h.astype(jnp.float32))) for h in inter["hidden_states"]]),
          "attention_logit_max_per_layer": jnp.stack(
              [logit_max(q, k) for q, k in zip(inter["queries"], inter["keys"])])}


def trainable_selector(train_cfg: ml_collections.ConfigDict,
                       abstract_params: Any) -> Optional[Callable[[params_lib.Path], bool]]:
  """The predicate of `train.trainable` over parameter paths (None for "all"); ValueError
  naming the field when it selects none of `abstract_params`."""
  spec = train_cfg.get("trainable", "all")
  if spec == "all":
    return None
  select = params_lib.selector(spec, "train.trainable")
  paths = list(params_lib.leaves(abstract_params))
  if not any(select(p) for p in paths):
    raise ValueError(f"train.trainable={spec!r} selects no parameter of this model; its"
                     f" parameters are e.g. {', '.join('/'.join(p) for p in paths[:3])}, and"
                     f" the groups are {params_lib.GROUPS}")
  return select


class Trainer:
  """Owns the compiled steps and shardings of one experiment on one mesh."""

  def __init__(self, config: ml_collections.ConfigDict, model_cfg: TransformerConfig,
               mesh: jax.sharding.Mesh):
    self.config = config
    self.model_cfg = model_cfg
    self.mesh = mesh
    self.use_segments = config.data.packing == "segments"
    self.want_gates = model_cfg.gate.enabled
    self.moe = model_cfg.moe if model_cfg.mlp_type == "moe" else None
    self.track_activations = config.train.get("track_activations", False)

    abstract_model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    self.graphdef, abstract_params = nnx.split(abstract_model)
    trainable = trainable_selector(config.train, abstract_params)
    self.tx = optim.make_optimizer(config.train, trainable)
    self.num_params = params_lib.count_params(abstract_model)
    self.trainable_params = self.num_params if trainable is None else sum(
        math.prod(x.shape) for p, x in params_lib.leaves(abstract_params).items()
        if trainable(p))
    self.active_params = params_lib.count_active_params(abstract_model)
    self.gate_params = params_lib.gate_params(abstract_model)
    param_sh = sharding.state_shardings(abstract_params, mesh)
    opt_shape = jax.eval_shape(self.tx.init, abstract_params)
    opt_sh = sharding.optimizer_shardings(self.tx, opt_shape, param_sh, mesh)
    self.state_shardings = {"params": param_sh, "opt_state": opt_sh,
                            "step": sharding.replicated(mesh)}
    self.abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        {"params": abstract_params, "opt_state": opt_shape,
         "step": jax.ShapeDtypeStruct((), jnp.int32)},
        self.state_shardings)
    self.batch_sharding = sharding.batch_sharding(mesh)

    # Traced under the mesh so that the model's activation constraints take effect.
    self.init_state = jax.jit(sharding.under_mesh(self._init_state, mesh),
                              out_shardings=self.state_shardings)
    self.train_step = jax.jit(sharding.under_mesh(self._train_step, mesh), donate_argnums=0,
                              out_shardings=(self.state_shardings, sharding.replicated(mesh)))
    self.eval_step = jax.jit(sharding.under_mesh(self._eval_step, mesh),
                             out_shardings=sharding.replicated(mesh))
    self.track_sinks = config.train.get("track_sinks", False)
    if self.track_sinks:
      # Sink tracking needs attention probabilities: the same parameters on the "xla" path.
      probe_cfg = model_cfg.replace(attention_impl="xla", remat="none")
      self.probe_graphdef = nnx.split(
          nnx.eval_shape(lambda: Transformer(probe_cfg, rngs=nnx.Rngs(0))))[0]
      self.sink_step = jax.jit(sharding.under_mesh(self._sink_step, mesh),
                               out_shardings=sharding.replicated(mesh))

  def _init_state(self) -> dict[str, Any]:
    model = Transformer(self.model_cfg, rngs=nnx.Rngs(self.config.train.seed))
    params = nnx.state(model)
    return {"params": params, "opt_state": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32)}

  def _train_step(self, state: dict[str, Any], batch: Batch):
    z_loss = self.config.train.z_loss

    def loss_fn(params):
      model = nnx.merge(self.graphdef, params)
      nll, log_z, inter = losses.token_losses(
          model, batch, self.use_segments,
          self.want_gates or self.track_activations or self.moe is not None)
      mask = batch["loss_mask"]
      count = jnp.maximum(mask.sum(), 1.0)
      ce = (nll * mask).sum() / count
      total = ce + z_loss * (log_z ** 2 * mask).sum() / count
      # The sparse layers' balancing terms (MOE_METRICS), averaged over those layers.
      balance = {} if self.moe is None else {
          name: jnp.mean(jnp.stack(inter[name])) for name in MOE_METRICS}
      if balance:
        total += (self.moe.balance_loss_weight * balance["moe_balance_loss"]
                  + self.moe.router_z_loss_weight * balance["moe_router_z_loss"])
      return total, (ce, inter, balance)

    (_, (ce, inter, balance)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": ce, "grad_norm": optax.tree.norm(grads),
               "learning_rate": optim.learning_rate_schedule(self.config.train)(state["step"])}
    if self.moe is not None:
      metrics.update(balance,
                     moe_expert_load_per_layer=jnp.stack(inter["moe_expert_load"]),
                     moe_router_entropy_per_layer=jnp.stack(inter["moe_router_entropy"]))
    if inter.get("gate_scores"):
      metrics["gate_score_mean_per_layer"] = jnp.stack(
          [jnp.mean(g.astype(jnp.float32)) for g in inter["gate_scores"]])
    if self.track_activations:
      segment_ids = batch["segment_ids"] if self.use_segments else None
      b, t = batch["inputs"].shape
      metrics.update(activation_stats(inter, attention_ops.make_mask(
          b, t, t, causal=True, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)))
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  def _eval_step(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
    model = nnx.merge(self.graphdef, params)
    nll, _, _ = losses.token_losses(model, batch, self.use_segments, False)
    mask = batch["loss_mask"]
    return {"nll_sum": (nll * mask).sum(), "tokens": mask.sum()}

  def _sink_step(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
    model = nnx.merge(self.probe_graphdef, params)
    segment_ids = batch["segment_ids"] if self.use_segments else None
    inter = model.forward(batch["inputs"], batch["positions"], segment_ids,
                          intermediates=True).intermediates
    return {"first_key_probs": jnp.stack([p[..., :1] for p in inter["attention_probs"]]),
            "hidden_states": jnp.stack(inter["hidden_states"]).astype(jnp.float32)}

  def sink_metrics(self, params: Any, local_batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """First-token attention, sink rate (eps 0.3) and max activation on one batch.

    Only when `self.track_sinks` (`train.track_sinks`).
    """
    out = jax.device_get(self.sink_step(params, self.global_batch(local_batch)))
    first = sink_metrics_lib.first_token_attention(out["first_key_probs"])
    sinks = sink_metrics_lib.sink_rate(out["first_key_probs"])
    massive = sink_metrics_lib.massive_activations(out["hidden_states"])
    return {"first_token_attention": first["first_token_attention"],
            "first_token_attention_per_layer": first["per_layer"],
            "sink_rate": sinks["sink_rate"],
            "max_activation": massive["max_activation"],
            "max_activation_per_layer": massive["per_layer_max"],
            "massive_count": massive["massive_count"]}

  def global_batch(self, local: dict[str, np.ndarray]) -> Batch:
    """This process's rows → one global array sharded over (data, fsdp)."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local.items()}

  def evaluate(self, params: Any, batches) -> dict[str, float]:
    nll, tokens = 0.0, 0.0
    for local in batches:
      out = self.eval_step(params, self.global_batch(local))
      nll += float(out["nll_sum"])
      tokens += float(out["tokens"])
    loss = nll / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


class _Preemption:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the loop checks after each step.

  A second signal stops at once (KeyboardInterrupt); the last checkpoint stays.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    for sig in self.SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handler, nothing to restore
        pass
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.requested:
      raise KeyboardInterrupt
    print(f"{signal.Signals(signum).name} received: saving a checkpoint after this step and"
          " exiting (again to stop without saving)", file=sys.stderr, flush=True)
    self.requested = True

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def _eval_batches(config: ml_collections.ConfigDict) -> list:
  """This process's rows of the global eval batches (the same rows at any process count)."""
  per_process = config.train.batch_size // jax.process_count()
  rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
  try:
    batches = pipeline.make_eval_batches(config.data, batch_size=config.train.batch_size,
                                         num_batches=config.train.eval_batches)
  except pipeline.TooManyBatches as e:
    raise ValueError(f"train.eval_batches must be in [1, {e.available}] (validation batches"
                     f" of train.batch_size x data.seq_len), got {config.train.eval_batches}"
                     ) from None
  return [{k: v[rows] for k, v in batch.items()} for batch in batches]


def _check_finite(step: int, loss: float, last_saved: Optional[int]) -> None:
  if not math.isfinite(loss):
    kept = (f"the last good checkpoint (step {last_saved}) is intact" if last_saved is not None
            else "no checkpoint was written")
    raise FloatingPointError(f"training loss is {loss} at step {step}: stopping; {kept}")


SUMMARY_KEYS = ("step", "num_steps", "preempted", "finished", "num_params", "active_params",
                "gate_params", "trainable_params", "gate")


def _summary_eval(workdir: pathlib.Path, step: int) -> dict[str, Any]:
  """Evaluation results of an earlier `summary.json` at `step` (a re-run that trains nothing)."""
  path = workdir / "summary.json"
  old = json.loads(path.read_text()) if path.exists() else {}
  if old.get("step") != step:
    return {}
  return {k: v for k, v in old.items() if k not in SUMMARY_KEYS}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       stop_at_step: Optional[int] = None,
                       overwrite: bool = False) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints of the same config).

  Everything that can be checked is checked before the folder is touched: the
  config, that the data and memory fit it, the lock (one run per folder) and, on resume,
  that the config is the folder's (`run_folder.check_identity`).
  stop_at_step: end (with a checkpoint) after this step, as a preemption would;
  the run resumes from there when called again.
  overwrite: delete the folder's previous run and start over.
  """
  workdir = pathlib.Path(workdir)
  model_cfg = experiment.validate(config, jax.device_count())
  experiment.check_fits(config, model_cfg, jax.device_count())
  trainable_selector(config.train, nnx.state(
      nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))))
  eval_batches = _eval_batches(config)
  initial = None
  if config.train.get("init_from") and (overwrite or not _has_checkpoints(workdir)):
    initial = init_from.load(config, model_cfg, sharding.make_mesh(config.mesh))
    config = config.copy_and_resolve_references()
    config.train.init_from, config.train.init_from_digest = initial.source, initial.digest
  is_chief = jax.process_index() == 0
  workdir.mkdir(parents=True, exist_ok=True)
  with (run_folder.lock(workdir) if is_chief else contextlib.nullcontext()), \
      _Preemption() as preemption, contextlib.ExitStack() as closers:
    if overwrite and is_chief:
      run_folder.clear(workdir)
    _sync("run folder cleared")
    run_folder.check_layout(workdir)
    run_folder.check_identity(workdir, config)
    _sync("run folder checked")
    if is_chief:
      (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    return _train(config, model_cfg, workdir, eval_batches, preemption, closers, stop_at_step,
                  initial)


def save_model(model: Transformer, config: ml_collections.ConfigDict,
               workdir: str | pathlib.Path, *, step: int = 0) -> pathlib.Path:
  """Writes `model` as a run folder of `config` (its `config.json` and one checkpoint at
  `step`) that `load_run`, `sample --workdir`, `analyze` and `train.init_from` read, and
  that `train_and_evaluate` resumes from like any checkpoint (with a fresh optimizer and the
  data from its start).

  The config must describe the model (`experiment.model_config(config) == model.config`, up
  to attention_impl and remat); a folder that already holds a run is refused, and nothing is
  written before every check passed. Returns the folder.
  """
  workdir = pathlib.Path(workdir)
  model_cfg = experiment.validate(config, jax.device_count())
  ignore = dict(attention_impl=model.config.attention_impl, remat=model.config.remat)
  if model_cfg.replace(**ignore) != model.config:
    differ = [f.name for f in dataclasses.fields(model_cfg)
              if getattr(model_cfg, f.name) != getattr(model.config, f.name)
              and f.name not in ignore]
    raise ValueError(f"config does not describe the model: {', '.join(differ)} differ"
                     " (the config's model and gate sections make another TransformerConfig)")
  checks.non_negative_ints(step=step)
  if any((workdir / name).exists() for name in run_folder.RUN_FILES):
    raise run_folder.RunFolderError(f"{workdir} already holds a run: save_model writes a new"
                                    " run folder; use another folder")
  mesh = sharding.make_mesh(config.mesh)
  trainer = Trainer(config, model_cfg, mesh)
  params = jax.device_put(nnx.state(model), trainer.state_shardings["params"])
  opt_state = jax.jit(trainer.tx.init, out_shardings=trainer.state_shardings["opt_state"])(
      params)
  data_iter = pipeline.make_train_iterator(
      config.data, batch_size=config.train.batch_size // jax.process_count(),
      seed=config.train.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  workdir.mkdir(parents=True, exist_ok=True)
  with run_folder.lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    config_json = json.loads(config.to_json_best_effort())
    with contextlib.closing(checkpointing.Checkpointer(workdir, keep=1)) as ckpt:
      ckpt.save(step, state={"params": params, "opt_state": opt_state,
                             "step": jnp.asarray(step, jnp.int32)},
                data_state=data_iter.get_state(), config_json=config_json)
    if jax.process_index() == 0:
      (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  return workdir


def _has_checkpoints(workdir: pathlib.Path) -> bool:
  folder = workdir / "checkpoints"
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _train(config: ml_collections.ConfigDict, model_cfg: TransformerConfig,
           workdir: pathlib.Path, eval_batches: list, preemption: _Preemption,
           closers: contextlib.ExitStack, stop_at_step: Optional[int],
           initial: Optional[init_from.InitWeights] = None) -> dict[str, Any]:
  """The training loop of `train_and_evaluate`, in a locked and checked folder.

  The checkpointer and metrics writer are closed by `closers`, whatever happens.
  initial: trained weights to start from (`train.init_from`) when there is no checkpoint.
  """
  mesh = sharding.make_mesh(config.mesh)
  is_chief = jax.process_index() == 0
  say = print if is_chief else lambda *a, **k: None
  trainer = Trainer(config, model_cfg, mesh)
  train_cfg = config.train
  ckpt = closers.enter_context(contextlib.closing(
      checkpointing.Checkpointer(workdir, keep=train_cfg.keep_checkpoints)))

  data_iter = pipeline.make_train_iterator(
      config.data, batch_size=train_cfg.batch_size // jax.process_count(),
      seed=train_cfg.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  restored = ckpt.restore_latest(trainer.abstract_state, accept_data=data_iter.set_state)
  if restored is None:
    state, start = trainer.init_state(), 0
    if initial is None:
      say(f"starting from scratch: {trainer.num_params:,} parameters"
          f" ({trainer.gate_params:,} in gates)", flush=True)
    else:
      say(initial.describe(state["params"]), flush=True)
      state["params"] = jax.device_put(initial.apply(state["params"]),
                                       trainer.state_shardings["params"])
  else:
    start, state, _ = restored
    say(f"resumed from step {start}", flush=True)
  if trainer.trainable_params != trainer.num_params:
    say(f"training {trainer.trainable_params:,} of {trainer.num_params:,} parameters"
        f" (train.trainable={train_cfg.trainable!r}); the others stay as they are", flush=True)
  impl, why = experiment.attention_choice(config, model_cfg)
  say(f"attention: {impl}" + (f" (model.attention_impl 'auto': {why})"
                              if model_cfg.attention_impl == "auto" else ""), flush=True)
  # Opened once the resume point is known: a resume that fails writes nothing.
  writer = closers.enter_context(contextlib.closing(
      metrics_writer.MetricsWriter(workdir, enabled=is_chief)))
  writer.truncate_after(start)

  tokens_per_step = train_cfg.batch_size * config.data.seq_len
  flops = flops_per_token(model_cfg, config.data.seq_len, trainer.active_params)
  peak = peak_flops_per_device(train_cfg)
  spikes = metrics_writer.SpikeCounter(train_cfg.spike_factor, train_cfg.spike_window)
  progress = metrics_writer.Progress(train_cfg.num_steps, start)
  last_saved = start if restored is not None else None
  end = train_cfg.num_steps if stop_at_step is None else min(stop_at_step, train_cfg.num_steps)
  eval_metrics: dict[str, float] = {}
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state))

  def save(step: int) -> None:
    nonlocal last_saved
    needed = max(state_bytes, ckpt.size(last_saved) if last_saved is not None else 0)
    run_folder.check_free_space(ckpt.directory, needed)
    try:
      ckpt.save(step, state=state, data_state=data_iter.get_state(),
                config_json=json.loads(config.to_json_best_effort()))
    except Exception as e:  # pylint: disable=broad-except
      disk = run_folder.disk_error(e)
      if disk is None:
        raise
      raise run_folder.RunFolderError(
          f"{run_folder.describe_disk_error(disk, f'saving the checkpoint of step {step}')};"
          f" the earlier checkpoints {ckpt.steps()} are intact: free space (or make"
          f" {workdir} writable) and rerun to resume") from e
    last_saved = step

  step, pending, preempted = start, None, False
  window_step, window_start = start, time.time()
  while step < end:
    state, metrics = trainer.train_step(state, trainer.global_batch(next(data_iter)))
    step += 1
    if pending is not None:  # check the previous step while this one runs
      _check_finite(step - 1, float(pending["loss"]), last_saved)
    pending = metrics
    stop_now = preemption.requested or step == end
    log = step % train_cfg.log_every == 0 or stop_now
    do_eval = step % train_cfg.eval_every == 0 or step == train_cfg.num_steps
    do_save = step % train_cfg.checkpoint_every == 0 or stop_now
    if log or do_eval or do_save:
      values = jax.device_get(metrics)
      pending = None
      loss = float(values["loss"])
      _check_finite(step, loss, last_saved)
      spikes.update(loss)
    if log or do_eval:
      tokens_per_sec = tokens_per_step * (step - window_step) / (time.time() - window_start)
      row = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
             "grad_norm": float(values["grad_norm"]),
             "learning_rate": float(values["learning_rate"]),
             "tokens_per_sec": tokens_per_sec,
             "model_tflops_per_sec": tokens_per_sec * flops / 1e12,
             "loss_spikes": spikes.count}
      if peak is not None:
        row["mfu"] = tokens_per_sec * flops / (peak * jax.device_count())
      for key in PER_LAYER_METRICS:
        if key in values:
          row[key] = [float(v) for v in values[key]]
      row.update({key: float(values[key]) for key in MOE_METRICS if key in values})
      if do_eval:
        eval_metrics = trainer.evaluate(state["params"], eval_batches)
        if trainer.track_sinks:
          eval_metrics.update(trainer.sink_metrics(state["params"], eval_batches[0]))
        row.update(eval_metrics)
      writer.write(step, row)
      if is_chief:
        progress.line(step, row)
      window_step, window_start = step, time.time()
    if do_save:
      save(step)
    if preemption.requested:
      preempted = True
      break

  if pending is not None:
    _check_finite(step, float(pending["loss"]), last_saved)
  if last_saved != step:
    save(step)
  if step == start and is_chief:  # nothing trained: keep the evaluation already recorded
    eval_metrics = _summary_eval(workdir, step)
  summary = {"step": step, "num_steps": train_cfg.num_steps, "preempted": preempted,
             "finished": step >= train_cfg.num_steps, "num_params": trainer.num_params,
             "active_params": trainer.active_params,
             "gate_params": trainer.gate_params, "trainable_params": trainer.trainable_params,
             "gate": model_cfg.gate.describe(),
             **eval_metrics}
  if is_chief:
    tmp = workdir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, workdir / "summary.json")
  return summary

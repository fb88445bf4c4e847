"""Starting a run from trained weights: `train.init_from`, a run folder (`DIR` or `DIR@STEP`)
or an official gated-Qwen3 / Hugging Face checkpoint folder (config.json + safetensors).

`load(config, model_cfg, mesh)` runs before the new run's folder is touched. It reads the
source's `config.json`, compares the source model's parameters with the new config's (in the
new config's layer layout: scanned and unrolled convert), refuses what does not fit by name,
and reads the parameters (only): of a run's newest intact checkpoint (or `STEP`'s) through the
read-only `checkpointing.load_model`, of an official checkpoint through
`interop.load_official` (cast to the new config's parameter dtype). The new run starts at step
0 with a fresh optimizer; parameters the new config adds (a gate) keep their configured
initialisation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
from typing import Any, Optional

import jax
import ml_collections
from flax import nnx

from gated_attention_jax import interop
from gated_attention_jax import layer_stack
from gated_attention_jax import params as params_lib
from gated_attention_jax.training import checkpointing
from gated_attention_jax.training import experiment
from gated_attention_jax.transformer import Transformer, TransformerConfig

FIELD = "train.init_from"


@dataclasses.dataclass(frozen=True)
class InitWeights:
  """What `load` read: the source (`DIR@STEP`), the sha256 of its config.json, and the arrays
  it gives the new model by path (`params.names`); `added`: the new model's paths it lacks."""

  source: str
  digest: str
  arrays: dict[params_lib.Path, jax.Array]
  added: tuple[params_lib.Path, ...]

  def apply(self, params: Any) -> Any:
    """`params` (the new model's state) with the source's arrays where it has them."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: self.arrays.get(params_lib.names(path), x), params)

  def describe(self, params: Any) -> str:
    """One console line: what was loaded and what was initialised as configured."""
    sizes = {p: math.prod(x.shape) for p, x in params_lib.leaves(params).items()}
    loaded = sum(sizes[p] for p in self.arrays)
    line = (f"init_from {self.source}: loaded {len(self.arrays)} arrays ({loaded:,} parameters)")
    if self.added:
      kinds = sorted({p[-1] if p[-1] != "weight" else p[-2] for p in self.added})
      line += (f"; initialised {len(self.added)} new arrays as configured"
               f" ({sum(sizes[p] for p in self.added):,} parameters: {', '.join(kinds)})")
    return line


def parse(spec: str) -> tuple[pathlib.Path, Optional[int]]:
  """`DIR` or `DIR@STEP` → (folder, step or None)."""
  folder, at, step = spec.rpartition("@")
  if at and step.isdigit():
    return pathlib.Path(folder), int(step)
  return pathlib.Path(spec), None


def _describe(x: Any) -> str:
  return f"{tuple(x.shape)} {x.dtype}"


def load(config: ml_collections.ConfigDict, model_cfg: TransformerConfig,
         mesh: jax.sharding.Mesh) -> InitWeights:
  """Reads `config.train.init_from` for a new run of `model_cfg` on `mesh`; ValueError naming
  the field (and the parameter) for a source that is not a run folder, holds no intact
  checkpoint, or whose parameters do not fit (shape, dtype; ones this config drops unless
  `train.init_from_drop_unused`)."""
  folder, step = parse(config.train.init_from)
  path = folder / "config.json"
  if not path.is_file():
    raise ValueError(f"{FIELD}: {folder} is not a training run folder (no config.json)")
  text = path.read_text()
  saved = json.loads(text)
  official = "hidden_size" in saved  # an official / Hugging Face config.json
  if official and step is not None:
    raise ValueError(f"{FIELD}: {folder} is an official checkpoint folder, which has no steps;"
                     f" drop @{step}")
  try:
    source_cfg = (interop.config_from_hf(saved, dtype=model_cfg.dtype,
                                         param_dtype=model_cfg.param_dtype) if official
                  else experiment.model_config(experiment.config_from_json(saved)))
  except (KeyError, ValueError) as e:
    raise ValueError(f"{FIELD}: the config.json of {folder} cannot be read: {e}") from e
  like = lambda cfg: nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  source_like = like(source_cfg.replace(scan_layers=model_cfg.scan_layers))
  source, target = params_lib.leaves(source_like), params_lib.leaves(like(model_cfg))
  where = "/".join
  for p, want in target.items():
    if p in source and (source[p].shape != want.shape or source[p].dtype != want.dtype):
      raise ValueError(f"{FIELD}: {where(p)} is {_describe(source[p])} in {folder}, this config"
                       f" makes it {_describe(want)}: the parameters cannot be loaded")
  dropped = sorted(set(source) - set(target))
  if dropped and not config.train.init_from_drop_unused:
    shown = ", ".join(where(p) for p in dropped[:4]) + (" ..." if len(dropped) > 4 else "")
    raise ValueError(f"{FIELD}: this config has no place for {len(dropped)} parameter arrays of"
                     f" {folder} ({shown}); set train.init_from_drop_unused=True to leave them"
                     " out")
  try:
    if official:
      model, name = interop.load_official(folder, dtype=model_cfg.dtype,
                                          param_dtype=model_cfg.param_dtype), f"{folder}"
    else:
      _, read_step, model = checkpointing.load_model(folder, step, mesh=mesh)
      name = f"{folder}@{read_step}"
  except (OSError, ValueError, checkpointing.CheckpointError) as e:
    raise ValueError(f"{FIELD}: {e}") from e
  state = nnx.state(model)
  if source_cfg.scan_layers != model_cfg.scan_layers:
    state = layer_stack.relayout(state, source_like)
  arrays = {p: x for p, x in params_lib.leaves(state).items() if p in target}
  return InitWeights(source=name,
                     digest=hashlib.sha256(text.encode()).hexdigest(), arrays=arrays,
                     added=tuple(p for p in target if p not in arrays))

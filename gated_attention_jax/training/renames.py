"""Parameter names that changed, and reading checkpoints saved under the old ones.

A checkpoint keeps the names of the version that saved it. Until December 2026 the attention
gate's projection was `attn/gate_proj`, the name the SwiGLU's projection has too (so
`nnx.PathContains("gate_proj")` picked both); it is now `attn/attn_gate_proj`. `checkpointing`
reads an older checkpoint by asking orbax for its arrays under the saved names and renaming
them once read and verified: nothing on disk changes, and the run's next save writes the new
names. `RENAMED` lists every such change; a run folder needs no conversion.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp
from flax import nnx

from gated_attention_jax import params as params_lib

# (the key above it, the name older checkpoints saved) -> the name now.
RENAMED: dict[tuple[str, str], str] = {("attn", "gate_proj"): "attn_gate_proj"}


def saved_with_old_names(state_dir: pathlib.Path) -> bool:
  """Whether the orbax tree in `state_dir` (a checkpoint's `state` item) has a name of
  `RENAMED`'s keys; reads its metadata, not its arrays."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(state_dir.absolute())
  finally:
    handler.close()
  tree = getattr(metadata, "tree", metadata)
  return any(pair in RENAMED for path in params_lib.leaves(tree)
             for pair in zip(path, path[1:]))


def to_saved(tree: Any) -> Any:
  """`tree` (dicts, `nnx.State`s, tuples) with today's names as older checkpoints saved them."""
  return _rename(tree, {(parent, new): old for (parent, old), new in RENAMED.items()})


def to_current(tree: Any) -> Any:
  """Inverse of `to_saved`: a tree read under the old names, with today's."""
  return _rename(tree, RENAMED)


def _rename(tree: Any, table: Mapping[tuple[Any, Any], Any], parent: Any = None) -> Any:
  if isinstance(tree, nnx.State):  # holds plain dicts below it: keep them plain
    return type(tree)(_rename(tree.raw_mapping, table, parent))
  if isinstance(tree, Mapping):
    return type(tree)({table.get((parent, key), key): _rename(value, table, key)
                       for key, value in tree.items()})
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # optax states are namedtuples
    return type(tree)(*(_rename(value, table) for value in tree))
  if isinstance(tree, (tuple, list)):
    return type(tree)(_rename(value, table) for value in tree)
  return tree

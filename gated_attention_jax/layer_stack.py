"""Parameters and checkpoints between the unrolled and the scanned (`scan_layers`) layouts.

Unrolled, a model's `blocks` holds one subtree per layer (`blocks/0/attn/q_proj` `(D, N, H)`);
scanned, one subtree whose arrays have a leading layers axis (`blocks/attn/q_proj` `(L, D, N, H)`).
`relayout(tree, like)` converts either way any tree holding such `blocks` entries — a model's
`nnx.State`, a whole train state (parameters, optimizer moments, step) as the trainer keeps it or
orbax restores it — into the layout of `like` (the target's abstract state); leaves outside
`blocks` are taken as they are. `unroll(model)` gives a scanned model's unrolled twin (KV-cache
decoding runs layer by layer).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gated_attention_jax.transformer import Transformer

BLOCKS = "blocks"

Path = tuple[Any, ...]


def _key(entry: Any) -> Any:
  """A path entry as a plain key; layer indices as ints whether stored as ints or strings."""
  key = getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry)))
  return int(key) if isinstance(key, str) and key.isdigit() else key


def _leaves(tree: Any) -> dict[Path, Any]:
  return {tuple(_key(e) for e in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _pick(source: dict[Path, Any], path: Path, like: Any) -> jax.Array:
  if path in source:
    return source[path]
  if BLOCKS not in path:
    raise ValueError(f"{'/'.join(map(str, path))} is in the target layout but not in the source")
  at = path.index(BLOCKS) + 1
  if isinstance(path[at], int):  # unrolled target: layer path[at] of the stacked source
    stacked = _pick(source, path[:at] + path[at + 1:], None)
    return stacked[path[at]]
  layers = [source.get(path[:at] + (i,) + path[at:]) for i in range(like.shape[0])]
  if any(layer is None for layer in layers):
    raise ValueError(f"the source has no unrolled layers 0..{like.shape[0] - 1} of"
                     f" {'/'.join(map(str, path))}")
  return jnp.stack(layers)


def relayout(tree: Any, like: Any) -> Any:
  """`tree`'s values in the structure of `like`: unrolled blocks stacked, or stacked ones split.

  Args:
    tree: state in one layout (arrays).
    like: the same state's abstract tree (`jax.ShapeDtypeStruct`s or arrays) in the other
      layout, e.g. `Trainer(config with model.scan_layers flipped).abstract_state`.
  Returns:
    A tree with `like`'s structure whose leaves come from `tree`; raises ValueError when a
    leaf has no source or a converted shape differs from `like`'s.
  """
  source = _leaves(tree)
  paths, treedef = jax.tree_util.tree_flatten_with_path(like)
  out = []
  for path, target in paths:
    keys = tuple(_key(e) for e in path)
    value = _pick(source, keys, target)
    if tuple(value.shape) != tuple(target.shape):
      raise ValueError(f"{'/'.join(map(str, keys))}: converted shape {tuple(value.shape)},"
                       f" the target wants {tuple(target.shape)}")
    out.append(value)
  return jax.tree_util.tree_unflatten(treedef, out)


def unroll(model: Transformer) -> Transformer:
  """`model` if its layers are unrolled, else a new unrolled `Transformer` holding the same
  parameters (`scan_layers=False`; the arrays are split out of the stack, `model` is kept)."""
  if not model.config.scan_layers:
    return model
  config = model.config.replace(scan_layers=False)
  graphdef, like = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, relayout(nnx.state(model), like))

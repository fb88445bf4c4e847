"""Batched autoregressive generation with the KV cache: `generate(model, prompts, ...)`.

Prompts of different lengths are right-padded into one `(B, P)` batch and
prefilled in one call. Row b's prompt sits at cache slots 0..len_b-1 and every
step writes row b's next token at its own slot len_b + i (per-row cache
positions), so a padded slot is overwritten before any query can reach it:
padding is never attended to. The prefill and the decode loop
(`jax.lax.while_loop`) are one compiled program per (model, batch shape,
max_new_tokens, sampling settings). The prefill attends with the model's
`attention_impl` (the fused Pallas kernel, or cuDNN on a GPU); the cached steps,
one query against the cache, run the "xla" path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gated_attention_jax import layer_stack
from gated_attention_jax.transformer import Transformer

Prompts = Sequence[Sequence[int]]


@dataclasses.dataclass(frozen=True)
class Generation:
  """What `generate` returns.

  tokens: `(B, max_new_tokens)` int32 generated tokens, `pad_id` after each row's end.
  lengths: `(B,)` generated tokens per row, the stop token included.
  """

  tokens: np.ndarray
  lengths: np.ndarray


def filter_logits(logits: jax.Array, *, temperature: float | jax.Array = 1.0,
                  top_k: Optional[int] = None, top_p: Optional[float] = None) -> jax.Array:
  """`(B, V)` logits / temperature, with tokens outside the top-k / top-p set at -inf.

  top_k keeps the k largest logits (ties with the k-th kept too); top_p keeps the
  smallest set of most likely tokens whose probability reaches p (at least one).
  """
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1
    threshold = jnp.take_along_axis(ordered, keep - 1, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def next_tokens(logits: jax.Array, key: Optional[jax.Array], *,
                temperature: float | jax.Array = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None) -> jax.Array:
  """`(B, V)` logits → `(B,)` int32 tokens: argmax if key is None, else a sample."""
  if key is None:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "max_new_tokens", "cache_length", "greedy", "top_k", "top_p", "stop_tokens",
    "pad_id"))
def _generate(state: nnx.State, tokens: jax.Array, lengths: jax.Array, key: jax.Array,
              temperature: jax.Array, *, graphdef: nnx.GraphDef, max_new_tokens: int,
              cache_length: int, greedy: bool, top_k: Optional[int], top_p: Optional[float],
              stop_tokens: tuple[int, ...], pad_id: int) -> tuple[jax.Array, jax.Array]:
  """Prefill `(B, P)` right-padded tokens, then decode; returns `(B, new)` tokens, `(B,)` lengths."""
  model = nnx.merge(graphdef, state)
  b, p = tokens.shape
  model.init_cache(b, cache_length)
  logits = model(tokens, jnp.broadcast_to(jnp.arange(p), (b, p)), mode="prefill")
  logits = logits[jnp.arange(b), lengths - 1]
  cached_graphdef, cache, rest = nnx.split(model, nnx.Cache, ...)

  def pick(logits: jax.Array, step: jax.Array) -> jax.Array:
    return next_tokens(logits, None if greedy else jax.random.fold_in(key, step),
                       temperature=temperature, top_k=top_k, top_p=top_p)

  def is_stop(token: jax.Array) -> jax.Array:
    return jnp.isin(token, jnp.asarray(stop_tokens, jnp.int32)) if stop_tokens else (
        jnp.zeros(token.shape, bool))

  first = pick(logits, 0)
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  done = is_stop(first)
  count = jnp.ones((b,), jnp.int32)

  def cond(carry):
    step, _, _, done, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, token, out, done, count, cache = carry
    model = nnx.merge(cached_graphdef, cache, rest)
    logits = model(token[:, None], (lengths + step - 1)[:, None], mode="decode")[:, 0]
    new = jnp.where(done, pad_id, pick(logits, step))
    out = out.at[:, step].set(new)
    count = count + (~done).astype(jnp.int32)
    done = done | is_stop(new)
    return step + 1, new, out, done, count, nnx.state(model, nnx.Cache)

  _, _, out, _, count, _ = jax.lax.while_loop(
      cond, body, (jnp.ones((), jnp.int32), first, out, done, count, cache))
  return out, count


def _check_ids(name: str, ids: np.ndarray, vocab_size: int) -> None:
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(f"{name} has token ids outside [0, {vocab_size}) (the model's vocab_size):"
                     f" min {ids.min()}, max {ids.max()}")


def generate(model: Transformer, prompts: Prompts, max_new_tokens: int, *,
             key: Optional[jax.Array] = None, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             stop_tokens: Sequence[int] = (), pad_id: int = 0,
             max_length: Optional[int] = None) -> Generation:
  """Continues each prompt by up to `max_new_tokens` tokens.

  Args:
    model: a `Transformer` (any gate, GQA, RoPE scaling, dtype, attention_impl; a
      `scan_layers` model decodes through its unrolled twin, `layer_stack.unroll`).
    prompts: B sequences of token ids, each non-empty, of any lengths.
    key: a PRNG key to sample; None decodes greedily (then temperature, top_k and
      top_p must be left at their defaults).
    temperature: > 0, divides the logits before sampling.
    top_k: sample among the k most likely tokens (1 <= k <= vocab_size).
    top_p: nucleus sampling, p in (0, 1].
    stop_tokens: a row ends after emitting one of these (it is counted in lengths).
    pad_id: written after each row's end in the returned tokens.
    max_length: KV-cache slots (default: longest prompt + max_new_tokens - 1).
  Returns:
    `Generation(tokens (B, max_new_tokens), lengths (B,))`.
  Raises:
    ValueError naming the argument for empty or out-of-vocabulary prompts, a prompt
    or generation longer than the cache or the learned position table, and
    sampling settings out of range.
  """
  cfg = model.config
  vocab = cfg.vocab_size
  if isinstance(prompts, (str, bytes)) or not len(prompts):
    raise ValueError("prompts must be a non-empty sequence of token-id sequences")
  rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
  for i, row in enumerate(rows):
    if not row.size:
      raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
    _check_ids(f"prompts[{i}]", row, vocab)
  if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or (
      max_new_tokens <= 0):
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if key is None:
    if temperature != 1.0 or top_k is not None or top_p is not None:
      raise ValueError("temperature, top_k and top_p apply to sampling: pass key=... to sample,"
                       " or leave them at their defaults for greedy decoding (key=None)")
  elif not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
    raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}"
                     " (for greedy decoding pass key=None)")
  if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= vocab):
    raise ValueError(f"top_k must be an int in [1, {vocab}] (the vocab size), got {top_k!r}")
  if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
    raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
  stop = tuple(int(t) for t in stop_tokens)
  _check_ids("stop_tokens", np.asarray(stop, np.int64), vocab)
  _check_ids("pad_id", np.asarray([pad_id]), vocab)

  longest = max(len(r) for r in rows)
  needed = longest + max_new_tokens - 1  # slots (and positions) the decode loop writes
  for limit, what in ((max_length, "max_length (the KV cache)"),
                      (cfg.max_positions if cfg.position_embedding == "learned" else None,
                       "the learned position table (model.max_positions)")):
    if limit is None:
      continue
    if longest > limit:
      raise ValueError(f"prompts: the longest prompt has {longest} tokens, more than {limit},"
                       f" {what}")
    if needed > limit:
      raise ValueError(f"max_new_tokens={max_new_tokens} overflows {what}: a {longest}-token"
                       f" prompt + {max_new_tokens} new tokens needs {needed} positions (the"
                       f" last new token is not fed back), {limit} are available")
  padded = np.full((len(rows), longest), pad_id, np.int32)
  for i, row in enumerate(rows):
    padded[i, :len(row)] = row
  graphdef, state = nnx.split(layer_stack.unroll(model))
  tokens, lengths = _generate(
      state, jnp.asarray(padded), jnp.asarray([len(r) for r in rows], jnp.int32),
      jax.random.key(0) if key is None else key, jnp.asarray(temperature, jnp.float32),
      graphdef=graphdef, max_new_tokens=max_new_tokens,
      cache_length=max_length or needed, greedy=key is None, top_k=top_k,
      top_p=None if top_p is None else float(top_p), stop_tokens=stop, pad_id=pad_id)
  return Generation(tokens=np.asarray(tokens), lengths=np.asarray(lengths))

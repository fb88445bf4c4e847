"""The sink testbed's model, optimizer and training pieces: LayerNorm, ReLU MLP, learned /
no position embeddings, AdamW without clipping, and the sink metrics of a tiny run
recomputed from its checkpoint."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gated_attention_jax as gaj
from configs import sinks
from gated_attention_jax import layers
from gated_attention_jax.training import experiment, optim, train
from gated_attention_jax.analysis import run_analysis
from gated_attention_jax.data import pipeline
from tests.conftest import randomize_params

SMALL = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=8, mlp_dim=48)


def small_model(seed=0, **overrides):
  cfg = gaj.TransformerConfig(**{**SMALL, **overrides}, gate=gaj.GateConfig(position="sdpa"))
  model = gaj.Transformer(cfg, rngs=nnx.Rngs(seed))
  randomize_params(model, seed + 1, scale=0.3)
  return model


def _tokens(seed, shape=(2, 9), vocab=61):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=shape))


# ---------------------------------------------------------------- layers


def test_layernorm_matches_numpy(x64):
  norm = layers.make_norm("layernorm", 16, eps=1e-5, style="scale", param_dtype=jnp.float64,
                          rngs=nnx.Rngs(0))
  assert isinstance(norm, layers.LayerNorm)
  randomize_params(norm, 1)
  w, b = np.asarray(norm.weight[...]), np.asarray(norm.bias[...])
  assert np.std(b) > 0.1  # the bias is random, not its zero init
  x = np.random.default_rng(2).normal(size=(3, 5, 16)) * 2.0 + 3.0  # an offset to remove
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  expected = (x - mean) / np.sqrt(var + 1e-5) * w + b
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expected, rtol=1e-12,
                             atol=1e-12)


def test_relu_mlp_matches_numpy(x64):
  mlp = layers.make_mlp("relu", 16, 24, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  assert isinstance(mlp, layers.ReluMLP)
  randomize_params(mlp, 1)
  x = np.random.default_rng(2).normal(size=(3, 5, 16))
  up, down = np.asarray(mlp.up_proj[...]), np.asarray(mlp.down_proj[...])
  hidden = x @ up
  assert (hidden < 0).mean() > 0.2  # the ReLU cuts something
  np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), np.maximum(hidden, 0) @ down,
                             rtol=1e-12, atol=1e-12)


def test_unknown_norm_and_mlp_types_raise():
  with pytest.raises(ValueError, match="norm_type must be one of"):
    layers.make_norm("batchnorm", 8, eps=1e-5, style="scale", param_dtype=jnp.float32,
                     rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="mlp_type must be one of"):
    layers.make_mlp("gelu", 8, 16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("changes, message", [
    (dict(norm_type="batchnorm"), r"model\.norm_type must be one of"),
    (dict(mlp_type="gelu"), r"model\.mlp_type must be one of"),
    (dict(position_embedding="alibi"), r"model\.position_embedding must be one of"),
    (dict(position_embedding="learned"), r"model\.max_positions must be > 0"),
    (dict(position_embedding="rope", max_positions=16), r"model\.max_positions must be > 0"),
    (dict(position_embedding="none", max_positions=16), r"model\.max_positions must be > 0"),
])
def test_bad_testbed_model_config_raises(changes, message):
  with pytest.raises(ValueError, match=message):
    gaj.TransformerConfig(**{**SMALL, **changes})


def test_gpt2_stack_has_the_gpt2_modules():
  model = small_model(norm_type="layernorm", mlp_type="relu", position_embedding="learned",
                      max_positions=16, tie_embeddings=False, num_layers=1)
  assert isinstance(model.final_norm, layers.LayerNorm)
  assert all(isinstance(b.mlp, layers.ReluMLP) and isinstance(b.attn_norm, layers.LayerNorm)
             for b in model.blocks)
  assert model.pos_embed[...].shape == (16, 32)
  assert all(not b.attn.use_rope for b in model.blocks)
  qwen = small_model(num_layers=1)
  assert qwen.pos_embed is None and qwen.blocks[0].attn.use_rope


# ---------------------------------------------------------------- positions


def test_without_positions_the_last_output_ignores_token_order():
  # One layer: the last query attends to keys and values of single tokens, so without
  # position information its output depends only on the multiset of earlier tokens.
  # (With more layers the earlier positions' states see different prefixes.)
  tokens = _tokens(0)
  perm = np.random.default_rng(1).permutation(8)
  shuffled = tokens.at[:, :8].set(tokens[:, perm])
  assert not np.array_equal(tokens, shuffled)
  for embedding, invariant in (("none", True), ("rope", False)):
    model = small_model(num_layers=1, position_embedding=embedding)
    a, b = np.asarray(model(tokens)[:, -1]), np.asarray(model(shuffled)[:, -1])
    if invariant:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    else:
      assert np.abs(a - b).max() > 1e-3, embedding
  # "none" ignores explicit positions altogether.
  model = small_model(position_embedding="none")
  np.testing.assert_array_equal(np.asarray(model(tokens, jnp.arange(9)[None] + 5)),
                                np.asarray(model(tokens)))


def test_learned_positions_add_a_row_of_the_table():
  # A learned-position model equals a position-free model whose "tokens" are the
  # (token, position) pairs, embedded as E[token] + P[position].
  t, p, v = 7, 8, SMALL["vocab_size"]
  learned = small_model(position_embedding="learned", max_positions=p, tie_embeddings=False)
  pairs = small_model(position_embedding="none", vocab_size=v * p, tie_embeddings=False)
  for mine, theirs in zip(pairs.blocks, learned.blocks):
    nnx.update(mine, nnx.state(theirs, nnx.Param))
  nnx.update(pairs.final_norm, nnx.state(learned.final_norm, nnx.Param))
  table = learned.embed.embedding[...][:, None, :] + learned.pos_embed[...][None, :, :]
  pairs.embed.embedding[...] = table.reshape(v * p, -1)
  pairs.lm_head[...] = jnp.zeros((SMALL["d_model"], v * p)).at[:, :v].set(learned.lm_head[...])

  tokens = _tokens(3, (2, t))
  segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1]])
  segment_positions = jnp.asarray([[0, 1, 2, 0, 1, 2, 3], list(range(7))])
  arange = jnp.broadcast_to(jnp.arange(t), (2, t))
  cases = [  # (positions, segment_ids) given to the learned model -> table rows it uses
      ((None, None), arange), ((arange, None), arange), ((arange + 1, None), arange + 1),
      ((None, segments), segment_positions)]
  for (positions, segment_ids), rows in cases:
    got = learned(tokens, positions, segment_ids)
    want = pairs(tokens * p + rows, None, segment_ids)[..., :v]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  shifted = learned(tokens, arange + 1)
  assert np.abs(np.asarray(shifted) - np.asarray(learned(tokens))).max() > 1e-3


def test_decoding_with_learned_positions(x64):
  model = small_model(num_layers=1, position_embedding="learned", max_positions=16,
                      dtype="float64", param_dtype="float64")
  tokens = _tokens(4, (2, 8))
  full = model(tokens)
  pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
  # Explicit positions, then none: decoding reads the table rows of the cache's next slots.
  for positions in (pos, None):
    model.init_cache(2, 16)
    at = (lambda a, b: None) if positions is None else (lambda a, b: positions[:, a:b])
    pieces = [model(tokens[:, :6], at(0, 6), decode=True)]
    pieces += [model(tokens[:, i:i + 1], at(i, i + 1), decode=True) for i in (6, 7)]
    np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, 1)), np.asarray(full),
                               rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- optimizer


def _adamw_numpy(params, grads, *, lr, b1, b2, wd, clip, eps=1e-8):
  """AdamW steps in numpy (decay on matrices only), after global-norm clipping if clip > 0."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  s = {k: np.zeros_like(v) for k, v in params.items()}
  for t, g in enumerate(grads, start=1):
    norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
    scale = min(1.0, clip / norm) if clip > 0 else 1.0
    for k in params:
      gk = g[k] * scale
      m[k] = b1 * m[k] + (1 - b1) * gk
      s[k] = b2 * s[k] + (1 - b2) * gk ** 2
      update = (m[k] / (1 - b1 ** t)) / (np.sqrt(s[k] / (1 - b2 ** t)) + eps)
      params[k] = params[k] - lr * (update + (wd * params[k] if params[k].ndim > 1 else 0))
  return params


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_adamw_steps_with_and_without_clipping(grad_clip, x64):
  cfg = sinks.get_config("baseline,testbed").train
  cfg.update(learning_rate=0.01, weight_decay=0.1, grad_clip=grad_clip)
  schedule = optim.learning_rate_schedule(cfg)
  assert [float(schedule(i)) for i in (0, 1, 1000)] == [0.01] * 3  # constant: no warmup
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))}
  # A large gradient (norm ~50: clipped to 1 when clipping) and then a small one.
  grads = [{k: rng.normal(size=v.shape) * 12 for k, v in params.items()},
           {k: rng.normal(size=v.shape) * 0.1 for k, v in params.items()}]
  tx = optim.make_optimizer(cfg)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
  kw = dict(lr=0.01, b1=cfg.b1, b2=cfg.b2, wd=0.1)
  want = _adamw_numpy(params, grads, clip=grad_clip, **kw)
  other = _adamw_numpy(params, grads, clip=1.0 - grad_clip, **kw)  # the other setting
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-10, atol=1e-12)
    assert np.abs(want[k] - params[k]).max() > 5e-3  # the step did something
  assert max(np.abs(want[k] - other[k]).max() for k in params) > 1e-3  # clipping matters


# ---------------------------------------------------------------- training


def test_tiny_testbed_run_tracks_sinks(tmp_path):
  config = sinks.get_config("baseline,testbed")
  config.model.update(d_model=32, head_dim=32, mlp_dim=64, max_positions=32, num_layers=2)
  config.data.update(seq_len=32, prefetch=0)
  config.train.update(num_steps=20, batch_size=8, log_every=10, eval_every=10,
                      checkpoint_every=20)
  summary = train.train_and_evaluate(config, tmp_path)
  rows = {r["step"]: r for r in map(json.loads,
                                    (tmp_path / "metrics.jsonl").read_text().splitlines())}
  assert sorted(rows) == [10, 20]
  for row in rows.values():
    assert 0 < row["first_token_attention"] <= 1
    assert len(row["first_token_attention_per_layer"]) == 2
    assert 0 <= row["sink_rate"] <= 1
    assert row["max_activation"] > 0 and len(row["max_activation_per_layer"]) == 2
    assert isinstance(row["massive_count"], int) and row["massive_count"] >= 0
  assert rows[10]["first_token_attention"] != rows[20]["first_token_attention"]

  # Recompute step 20's metrics from the final checkpoint on the first eval batch.
  run_config, step, model = run_analysis.load_run(tmp_path)
  assert step == 20
  batch = pipeline.make_eval_batches(run_config.data, batch_size=8, num_batches=1)[0]
  _, inter = model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                   jnp.asarray(batch["segment_ids"]), return_intermediates=True)
  first = np.stack([np.asarray(p, np.float64) for p in inter["attention_probs"]])[..., 0]
  hidden = np.abs(np.stack([np.asarray(h, np.float64) for h in inter["hidden_states"]]))
  assert first.shape == (2, 8, 1, 32)  # (L, B, N, T)
  row = rows[20]
  np.testing.assert_allclose(row["first_token_attention"], first.mean(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(row["first_token_attention_per_layer"],
                             first.mean(axis=(1, 2, 3)), rtol=0, atol=1e-6)
  assert row["sink_rate"] == (first.mean(axis=-1) > 0.3).mean()
  np.testing.assert_allclose(row["max_activation_per_layer"], hidden.max(axis=(1, 2, 3)),
                             rtol=1e-5)
  np.testing.assert_allclose(row["max_activation"], hidden.max(axis=(1, 2, 3)).mean(),
                             rtol=1e-5)
  # The summary carries the last eval's values.
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  for key in ("first_token_attention", "sink_rate", "max_activation", "massive_count"):
    assert summary[key] == on_disk[key] == row[key], key
  assert experiment.model_config(run_config).vocab_size == 67

  # The analysis CLI's path works on a learned-position model: no length past the
  # 32-row table is read (it would give NaN), and no RoPE scaling is evaluated.
  analysis = run_analysis.analyze_run(tmp_path, batch_size=4, num_batches=1,
                                      long_context_batches=1)
  assert analysis["long_context"]["multiples"] == [1]
  assert list(analysis["long_context"]["perplexity"]) == ["none"]
  assert np.isfinite(analysis["long_context"]["perplexity"]["none"]["1"])
  assert analysis["sink"]["seq_len"] == 32
  assert 0 <= analysis["sink"]["sink_rate"] <= 1

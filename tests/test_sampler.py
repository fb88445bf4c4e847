"""`generate`: ragged batches against uncached forward passes, sampling, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gated_attention_jax as gaj
from gated_attention_jax import sampler
from tests.conftest import randomize_params

SMALL = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=8, mlp_dim=48)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15]]  # ragged on purpose
NEW = 5


def small_model(gate=gaj.GateConfig(position="sdpa"), seed=0, **overrides):
  model = gaj.Transformer(gaj.TransformerConfig(**{**SMALL, **overrides}, gate=gate),
                          rngs=nnx.Rngs(seed))
  randomize_params(model, seed + 1, scale=0.5)
  return model


def uncached_greedy(model, prompt, steps, width=12):
  """argmax of a full forward pass over the sequence so far, once per new token.

  The sequence is right-padded to `width` (one compiled shape): with causal
  attention the logits at its last real token do not see the padding.
  """
  forward = nnx.jit(lambda m, t: m(t))
  tokens = list(prompt)
  for _ in range(steps):
    padded = jnp.asarray([tokens + [0] * (width - len(tokens))])
    tokens.append(int(jnp.argmax(forward(model, padded)[0, len(tokens) - 1])))
  return tokens[len(prompt):]


@pytest.mark.parametrize("gate,overrides", [
    (gaj.GateConfig(), {}),
    (gaj.GateConfig(position="sdpa"), {}),
    (gaj.GateConfig(position="value", granularity="headwise"), {}),
    (gaj.GateConfig(position="key"), dict(num_kv_heads=1)),  # MQA
    (gaj.GateConfig(position="query", sharing="head_shared"), {}),
    (gaj.GateConfig(position="dense"),
     dict(rope_scaling=gaj.RopeScaling("yarn", factor=2.0, original_max_len=8))),
    (gaj.GateConfig(position="sdpa", granularity="headwise"),
     dict(position_embedding="learned", max_positions=16)),
])
def test_greedy_ragged_batch_matches_uncached_argmax(gate, overrides, x64):
  model = small_model(gate, dtype="float64", param_dtype="float64", **overrides)
  out = gaj.generate(model, PROMPTS, NEW)
  assert out.tokens.shape == (3, NEW) and out.lengths.tolist() == [NEW] * 3
  for prompt, row in zip(PROMPTS, out.tokens):
    assert row.tolist() == uncached_greedy(model, prompt, NEW)


@pytest.mark.parametrize("impl", ["cudnn", "pallas"])
def test_other_attention_impls_and_bf16_decode_like_xla(impl):
  """On this CPU the "pallas" prefill runs the fused kernel in the interpreter."""
  reference = gaj.generate(small_model(), PROMPTS, NEW).tokens
  np.testing.assert_array_equal(gaj.generate(small_model(attention_impl=impl), PROMPTS,
                                             NEW).tokens, reference)
  bf16 = gaj.generate(small_model(attention_impl=impl, dtype="bfloat16"), PROMPTS, NEW)
  assert bf16.tokens.shape == (3, NEW) and (bf16.tokens < SMALL["vocab_size"]).all()


def prefill_jaxpr(model, tokens):
  def prefill(model, tokens):
    model.init_cache(tokens.shape[0], tokens.shape[1] + 2)
    return model(tokens, decode=True, prefill=True)
  return str(jax.make_jaxpr(nnx.jit(prefill))(model, tokens))


def test_prefill_attends_with_the_fused_kernel_and_fills_the_cache():
  tokens = jnp.asarray([p + [0] * (7 - len(p)) for p in PROMPTS])
  assert "pallas_call" in prefill_jaxpr(small_model(attention_impl="pallas"), tokens)
  assert "pallas_call" not in prefill_jaxpr(small_model(), tokens)
  # The prefill's logits are a forward pass without a cache; its keys are in the cache.
  model = small_model(attention_impl="pallas")
  full = nnx.jit(lambda m, t: m(t))(model, tokens)
  model.init_cache(3, 9)
  prefill = nnx.jit(lambda m, t: m(t, decode=True, prefill=True))  # writes the cache back
  np.testing.assert_allclose(prefill(model, tokens), full, rtol=2e-5, atol=2e-5)
  assert model.blocks[0].attn.cache_index[...].tolist() == [7, 7, 7]
  assert not np.asarray(model.blocks[0].attn.cached_key[...][:, 7:]).any()


@pytest.mark.parametrize("kwargs,message", [
    (dict(decode=False, prefill=True), "prefill=True fills the KV cache: it needs decode=True"),
    (dict(decode=True, prefill=True, positions=jnp.ones((1, 4), jnp.int32)),
     r"positions must start at 0, got first positions \[1\]"),
])
def test_prefill_bad_input(kwargs, message):
  model = small_model()
  model.init_cache(1, 8)
  with pytest.raises(ValueError, match=message):
    model(jnp.ones((1, 4), jnp.int32), **kwargs)


def test_stop_tokens_end_rows_and_pad_the_rest():
  model = small_model()
  greedy = gaj.generate(model, PROMPTS, NEW).tokens
  stop = int(greedy[1, 2])
  out = gaj.generate(model, PROMPTS, NEW, stop_tokens=[stop], pad_id=60)
  for row, full, length in zip(out.tokens, greedy, out.lengths):
    hits = np.flatnonzero(full == stop)
    want = NEW if not hits.size else hits[0] + 1
    assert length == want
    np.testing.assert_array_equal(row[:want], full[:want])
    assert (row[want:] == 60).all()


def test_sampling_is_reproducible_with_a_key():
  model = small_model()
  a = gaj.generate(model, PROMPTS, NEW, key=jax.random.key(3), temperature=2.0)
  b = gaj.generate(model, PROMPTS, NEW, key=jax.random.key(3), temperature=2.0)
  c = gaj.generate(model, PROMPTS, NEW, key=jax.random.key(4), temperature=2.0)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (a.tokens != c.tokens).any()
  # top_k=1 leaves one token: sampling is then greedy decoding.
  np.testing.assert_array_equal(
      gaj.generate(model, PROMPTS, NEW, key=jax.random.key(3), top_k=1).tokens,
      gaj.generate(model, PROMPTS, NEW).tokens)


def test_top_k_and_top_p_never_leave_the_allowed_set():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16)) * 2, jnp.float32)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  keys = jax.random.split(jax.random.key(0), 2000)
  for top_k, top_p in ((4, None), (None, 0.6), (3, 0.3)):
    draws = np.asarray(jax.vmap(lambda k: sampler.next_tokens(
        logits, k, top_k=top_k, top_p=top_p))(keys))  # (2000, 2)
    for row in range(2):
      order = np.argsort(-probs[row])
      allowed = order[:top_k or 16]
      if top_p is not None:  # the most likely tokens until their mass reaches p
        kept = probs[row][allowed] / probs[row][allowed].sum()
        allowed = allowed[:np.searchsorted(np.cumsum(kept), top_p) + 1]
      assert set(draws[:, row].tolist()) == set(allowed.tolist()), (top_k, top_p, row)


@pytest.mark.parametrize("args,kwargs,message", [
    ([], {}, "prompts must be a non-empty"),
    ([[1], []], {}, r"prompts\[1\] is empty"),
    ([[1, 61]], {}, r"prompts\[0\] has token ids outside \[0, 61\)"),
    ([[1]], dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
    ([[1]], dict(key=jax.random.key(0), temperature=0.0), "temperature must be > 0"),
    ([[1]], dict(temperature=0.5), "pass key=... to sample"),
    ([[1]], dict(key=jax.random.key(0), top_p=1.5), r"top_p must be in \(0, 1\]"),
    ([[1]], dict(key=jax.random.key(0), top_p=0.0), r"top_p must be in \(0, 1\]"),
    ([[1]], dict(key=jax.random.key(0), top_k=0), r"top_k must be an int in \[1, 61\]"),
    ([[1]], dict(stop_tokens=[99]), "stop_tokens has token ids outside"),
    ([[1] * 9], dict(max_length=8), "prompts: the longest prompt has 9 tokens.*max_length"),
    ([[1] * 6], dict(max_length=8, max_new_tokens=4), "max_new_tokens=4 overflows max_length"),
])
def test_bad_input_names_the_argument(args, kwargs, message):
  model = small_model(num_layers=1)
  kwargs = {"max_new_tokens": 2, **kwargs}
  with pytest.raises(ValueError, match=message):
    gaj.generate(model, args, **kwargs)


def test_learned_position_table_bounds_the_generation():
  model = small_model(num_layers=1, position_embedding="learned", max_positions=8)
  with pytest.raises(ValueError, match="prompts: .* 9 tokens.*model.max_positions"):
    gaj.generate(model, [[1] * 9], 1)
  with pytest.raises(ValueError, match="max_new_tokens=4 overflows the learned position table"):
    gaj.generate(model, [[1] * 6], 4)
  assert gaj.generate(model, [[1] * 6], 3).lengths.tolist() == [3]  # 8 positions exactly

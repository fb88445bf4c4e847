"""Gemma-style attention in `GatedAttention`: `mask=`, sliding windows, logit soft caps and the
query scale, against the float64 numpy model, on every impl that serves them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gated_attention_jax import GateConfig, GatedAttention, attention_ops
from tests import reference_numpy
from tests.conftest import params_as_numpy, randomize_params

D, N, K, H = 32, 4, 2, 8
G1 = GateConfig(position="sdpa")
GEMMA = dict(sliding_window=3, logit_soft_cap=2.0, query_scale=0.3, qk_norm=True,
             norm_style="offset")


def make_layer(gate=G1, *, dtype=jnp.float64, impl="xla", seed=0, **kwargs):
  layer = GatedAttention(D, N, K, H, gate, attention_impl=impl, dtype=dtype, param_dtype=dtype,
                         rngs=nnx.Rngs(seed), **kwargs)
  randomize_params(layer, seed + 1)
  return layer


def _left_padding(lengths, t):
  """(B, 1, 1, T) key mask of left-padded rows, as gemma builds from its input mask."""
  return (np.arange(t)[None, :] >= t - np.asarray(lengths)[:, None])[:, None, None, :]


@pytest.mark.parametrize("features", [
    dict(GEMMA),  # a Gemma 2/3 local-attention layer
    dict(sliding_window=1, causal=False),
    dict(logit_soft_cap=0.5, query_scale=1.0),
])
def test_gemma_style_layer_matches_numpy(features, x64):
  layer = make_layer(**features)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, D))
  mask = _left_padding([7, 4], 7)
  got = layer(jnp.asarray(x), mask=jnp.asarray(mask))
  model = {k: v for k, v in features.items() if k not in ("qk_norm", "norm_style")}
  p = params_as_numpy(layer)
  if features.get("norm_style") == "offset":  # x̂ · (1 + w)
    p = {**p, "q_norm": 1 + p["q_norm"], "k_norm": 1 + p["k_norm"]}
  want = reference_numpy.gated_attention(
      x, p, gate=G1, num_heads=N, num_kv_heads=K,
      positions=np.arange(7.0)[None].repeat(2, 0), qk_norm=features.get("qk_norm", False),
      mask=mask, **model)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10)


def test_per_head_mask_and_segments(x64):
  layer = make_layer()
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 6, D))
  mask = rng.random((1, N, 6, 6)) < 0.7
  segments = np.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1]])
  got = layer(jnp.asarray(x), segment_ids=jnp.asarray(segments), mask=jnp.asarray(mask))
  want = reference_numpy.gated_attention(
      x, params_as_numpy(layer), gate=G1, num_heads=N, num_kv_heads=K,
      positions=np.array([[0, 1, 2, 0, 1, 2], list(range(6))], np.float64),
      segment_ids=segments, mask=mask)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10)


def test_padding_changes_real_tokens_without_the_mask(x64):
  """What the issue saw in gemma: left padding moves real tokens' outputs unless masked."""
  layer = make_layer()
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 6, D)))
  alone = layer(x[:, 2:])
  masked = layer(x, mask=jnp.asarray(_left_padding([4], 6)), positions=jnp.arange(-2, 4)[None])
  np.testing.assert_allclose(np.asarray(masked[:, 2:]), np.asarray(alone), atol=1e-12)
  unmasked = layer(x, positions=jnp.arange(-2, 4)[None])
  assert np.abs(np.asarray(unmasked[:, 2:] - alone)).max() > 1e-3


@pytest.mark.parametrize("gate", [G1, GateConfig(position="sdpa", granularity="headwise")])
def test_pallas_kernel_serves_window_soft_cap_and_padding(gate):
  """The fused kernel (Pallas TPU, interpreted on CPU) with a window, a soft cap, a query scale
  and a key-padding mask (run as segment ids) equals the XLA path: values and gradients."""
  features = dict(GEMMA)
  xla = make_layer(gate, dtype=jnp.float32, **features)
  pallas = make_layer(gate, dtype=jnp.float32, impl="pallas", **features)
  nnx.update(pallas, nnx.state(xla, nnx.Param))
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 9, D)), jnp.float32)
  mask = jnp.asarray(_left_padding([9, 5], 9))
  segments = jnp.asarray([[1] * 5 + [2] * 4, [1] * 9])

  def loss(layer):
    return jnp.sum(jnp.sin(layer(x, segment_ids=segments, mask=mask)))

  run = nnx.jit(lambda layer: layer(x, segment_ids=segments, mask=mask))
  np.testing.assert_allclose(np.asarray(run(pallas)), np.asarray(run(xla)), rtol=1e-5,
                             atol=1e-5)
  grad = nnx.jit(nnx.grad(loss))
  for a, b in zip(jax.tree.leaves(grad(xla)), jax.tree.leaves(grad(pallas))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_decoding_with_a_window_and_padding_matches_the_full_pass(x64):
  layer = make_layer(**GEMMA)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 7, D)))
  keys = _left_padding([7, 5], 7)
  full = layer(x, mask=jnp.asarray(keys))
  layer.init_cache(2, 10)
  cache_mask = jnp.asarray(np.pad(keys, ((0, 0), (0, 0), (0, 0), (0, 3))))
  pieces = [layer(x[:, :4], mask=jnp.asarray(keys[..., :4]), mode="prefill")]
  pieces += [layer(x[:, t:t + 1], mask=cache_mask, mode="decode") for t in range(4, 7)]
  np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, 1)), np.asarray(full),
                             rtol=1e-10, atol=1e-10)


def test_what_an_impl_cannot_serve_is_one_line():
  x = jnp.zeros((2, 4, D))
  general = jnp.ones((2, 1, 4, 4), bool)
  with pytest.raises(ValueError, match=r"attention_impl='pallas' takes mask= only as key"
                                       r" padding, shape \(B, 1, 1, S\)"):
    make_layer(impl="pallas", dtype=jnp.float32)(x, mask=general)
  with pytest.raises(ValueError, match="attention_impl='cudnn' has no logit soft cap"):
    make_layer(impl="cudnn", dtype=jnp.float32, logit_soft_cap=5.0)(x)
  layer = make_layer(dtype=jnp.float32)
  with pytest.raises(ValueError, match=r"mask must be boolean and broadcastable to \(batch,"
                                       r" num_heads, T, S\) = \(2, 4, 4, 4\), got float32"):
    layer(x, mask=jnp.ones((2, 1, 4, 4)))
  with pytest.raises(ValueError, match=r"got bool\[2, 3, 4, 4\]"):
    layer(x, mask=jnp.ones((2, 3, 4, 4), bool))
  for name, value, rule in (("sliding_window", 0, "a positive int"),
                            ("sliding_window", 2.5, "a positive int"),
                            ("logit_soft_cap", -1.0, "a finite number > 0"),
                            ("query_scale", 0.0, "a finite number > 0")):
    with pytest.raises(ValueError, match=f"{name} must be {rule}"):
      GatedAttention(D, N, K, H, **{name: value}, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("platform, mask, cap, want", [
    ("tpu", "keys", 30.0, "pallas"),
    ("tpu", "general", None, "xla"),
    ("gpu", None, 30.0, "pallas"),
    ("gpu", "general", 30.0, "xla"),
    ("gpu", "general", None, "cudnn"),
])
def test_auto_picks_an_impl_that_serves_the_features(platform, mask, cap, want):
  impl, why = attention_ops.choose_impl(
      "auto", platform, "NVIDIA H100 80GB HBM3" if platform == "gpu" else "TPU v5p",
      dtype=jnp.bfloat16, head_dim=128, q_len=4096, kv_len=4096, segments=False,
      mask_kind=mask, logit_soft_cap=cap)
  assert impl == want, why


def test_key_padding_segments_keep_exactly_the_visible_pairs():
  rng = np.random.default_rng(5)
  keep = rng.random((3, 1, 1, 8)) < 0.6
  seg = np.sort(rng.integers(0, 3, (3, 8)), axis=1)
  for ids in (None, jnp.asarray(seg)):
    q_ids, kv_ids = attention_ops.key_padding_segments(jnp.asarray(keep), ids, ids, 8)
    sees = np.asarray(q_ids)[:, :, None] == np.asarray(kv_ids)[:, None, :]
    want = keep[:, 0] & (True if ids is None else seg[:, :, None] == seg[:, None, :])
    np.testing.assert_array_equal(sees, np.broadcast_to(want, sees.shape))


@pytest.mark.parametrize("causal", [True, False])
def test_the_cudnn_path_builds_the_same_window_and_mask(causal, x64):
  """The "cudnn" code path (jax.nn.dot_product_attention, run with XLA on CPU): a window alone
  as its local_window_size, a window with a mask as one explicit mask."""
  rng = np.random.default_rng(6)
  q = jnp.asarray(rng.normal(size=(2, 9, N, H)))
  k, v = (jnp.asarray(rng.normal(size=(2, 9, K, H))) for _ in range(2))
  keys = jnp.asarray(_left_padding([9, 6], 9))
  for mask in (None, keys):
    full = attention_ops.make_mask(2, 9, 9, causal=causal, sliding_window=4)
    full = full if mask is None else full & mask
    want, _ = attention_ops.xla_attention(q, k, v, full, 0.3)
    got = attention_ops.cudnn_attention(q, k, v, causal=causal, scale=0.3, sliding_window=4,
                                        mask=None if mask is None else full,
                                        implementation="xla")
    rows = slice(None) if mask is None else (1, slice(3, None))  # rows that see some key
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=1e-6)

"""GatedAttention against an independent float64 numpy implementation, and its invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from gated_attention_jax import GateConfig, GatedAttention
from gated_attention_jax import attention, attention_ops
from gated_attention_jax.attention import positions_from_segments
from gated_attention_jax.kernels import reference
from tests.conftest import params_as_numpy, randomize_params
from tests import reference_numpy

D, N, K, H = 32, 4, 2, 8

VARIANTS = {
    "baseline": GateConfig(),
    "sdpa_elementwise": GateConfig(position="sdpa"),
    "sdpa_headwise": GateConfig(position="sdpa", granularity="headwise"),
    "value_elementwise": GateConfig(position="value"),
    "value_headwise": GateConfig(position="value", granularity="headwise"),
    "key_elementwise": GateConfig(position="key"),
    "key_headwise": GateConfig(position="key", granularity="headwise"),
    "query_elementwise": GateConfig(position="query"),
    "query_headwise": GateConfig(position="query", granularity="headwise"),
    "dense_elementwise": GateConfig(position="dense"),
    "sdpa_head_shared": GateConfig(position="sdpa", sharing="head_shared"),
    "sdpa_headwise_head_shared": GateConfig(position="sdpa", granularity="headwise",
                                            sharing="head_shared"),
    "value_head_shared": GateConfig(position="value", sharing="head_shared"),
    "query_head_shared": GateConfig(position="query", sharing="head_shared"),
    "sdpa_additive_silu": GateConfig(position="sdpa", combine="add", activation="silu"),
    "sdpa_elementwise_silu": GateConfig(position="sdpa", activation="silu"),
    "sdpa_additive_identity": GateConfig(position="sdpa", combine="add",
                                         activation="identity"),
    "sdpa_input_independent": GateConfig(position="sdpa", input_dependent=False),
    "value_headwise_input_independent": GateConfig(position="value", granularity="headwise",
                                                   input_dependent=False),
    "sdpa_ns_sigmoid": GateConfig(position="sdpa", activation="ns_sigmoid"),
    "dense_additive": GateConfig(position="dense", combine="add", activation="silu"),
    "sdpa_rmsnorm": GateConfig(sdpa_transform="rmsnorm"),
    "sdpa_silu": GateConfig(sdpa_transform="silu"),
    "rmsnorm_then_gate": GateConfig(position="sdpa", sdpa_transform="rmsnorm"),
}


def make_layer(gate, *, kv_heads=K, qk_norm=False, rotary=1.0, dtype=jnp.float64, seed=0,
               impl="xla"):
  layer = GatedAttention(D, N, kv_heads, H, gate, qk_norm=qk_norm, partial_rotary_factor=rotary,
                         attention_impl=impl, dtype=dtype, param_dtype=dtype,
                         rngs=nnx.Rngs(seed))
  randomize_params(layer, seed + 1)
  return layer


# The layer's plain forward pass, compiled once per layer structure and input shape.
forward = nnx.jit(lambda layer, x, segment_ids=None: layer(x, segment_ids=segment_ids))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_matches_numpy_reference(name, x64):
  gate = VARIANTS[name]
  rng = np.random.default_rng(hash(name) % 2**32)
  qk_norm = name.startswith(("sdpa", "value"))  # QK-norm on for half the variants
  rotary = 0.5 if "head" in name else 1.0  # partial rotary on some
  layer = make_layer(gate, qk_norm=qk_norm, rotary=rotary)
  x = rng.normal(size=(2, 7, D))
  segments = np.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 3, 3]])
  positions = np.asarray(positions_from_segments(jnp.asarray(segments)))
  got = layer(jnp.asarray(x), jnp.asarray(positions), jnp.asarray(segments))
  want = reference_numpy.gated_attention(
      x, params_as_numpy(layer), gate=gate, num_heads=N, num_kv_heads=K,
      positions=positions.astype(np.float64), segment_ids=segments, qk_norm=qk_norm,
      rotary_fraction=rotary)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["sdpa_elementwise", "value_headwise", "dense_elementwise",
                                  "sdpa_head_shared", "sdpa_input_independent",
                                  "sdpa_rmsnorm"])
def test_gradients(name, x64):
  layer = make_layer(VARIANTS[name], qk_norm=True)
  graphdef, params = nnx.split(layer)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 5, D)))

  def f(x, params):
    return jnp.sum(jnp.tanh(nnx.merge(graphdef, params)(x)))

  # JAX's float64 gradient tolerance (1e-5): the finite differences it compares
  # against carry O(eps^2) truncation error.
  check_grads(jax.jit(f), (x, params), order=1, modes=["rev"])


def test_gqa_equals_mha_with_repeated_kv_heads(x64):
  gate = GateConfig(position="sdpa")
  gqa = make_layer(gate, kv_heads=K, qk_norm=True)
  mha = make_layer(gate, kv_heads=N, qk_norm=True)
  nnx.update(mha, nnx.state(gqa, nnx.Param).filter(
      lambda path, _: path[0] not in ("k_proj", "v_proj")))
  mha.k_proj[...] = jnp.repeat(gqa.k_proj[...], N // K, axis=1)
  mha.v_proj[...] = jnp.repeat(gqa.v_proj[...], N // K, axis=1)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 9, D)))
  np.testing.assert_allclose(np.asarray(forward(gqa, x)), np.asarray(forward(mha, x)),
                             rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["sdpa_elementwise", "key_elementwise", "dense_elementwise"])
def test_causality(name, x64):
  layer = make_layer(VARIANTS[name])
  rng = np.random.default_rng(5)
  x = rng.normal(size=(1, 10, D))
  changed = x.copy()
  changed[:, 6:] = rng.normal(size=(1, 4, D))
  a, b = forward(layer, jnp.asarray(x)), forward(layer, jnp.asarray(changed))
  np.testing.assert_array_equal(np.asarray(a[:, :6]), np.asarray(b[:, :6]))
  assert np.abs(np.asarray(a[:, 6:] - b[:, 6:])).max() > 1e-3


def test_segments_are_isolated(x64):
  layer = make_layer(VARIANTS["sdpa_elementwise"], qk_norm=True)
  rng = np.random.default_rng(6)
  x = rng.normal(size=(1, 10, D))
  segments = jnp.asarray([[1] * 4 + [2] * 6])
  packed = forward(layer, jnp.asarray(x), segments)
  alone_first = forward(layer, jnp.asarray(x[:, :4]))
  alone_second = forward(layer, jnp.asarray(x[:, 4:]))  # positions restart at 0 in each document
  np.testing.assert_allclose(np.asarray(packed[:, :4]), np.asarray(alone_first), atol=1e-12)
  np.testing.assert_allclose(np.asarray(packed[:, 4:]), np.asarray(alone_second), atol=1e-12)


def test_positions_from_segments():
  seg = jnp.asarray([[1, 1, 2, 2, 2, 0, 0], [3, 3, 3, 3, 1, 1, 1]])
  np.testing.assert_array_equal(np.asarray(positions_from_segments(seg)),
                                [[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 3, 0, 1, 2]])


@pytest.mark.parametrize("name", ["sdpa_elementwise", "value_elementwise", "key_headwise",
                                  "query_elementwise", "dense_elementwise"])
def test_decode_matches_full_forward(name, x64):
  layer = make_layer(VARIANTS[name], qk_norm=True)
  x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 9, D)))
  full = forward(layer, x)
  layer.init_cache(2, 12)
  decode = nnx.jit(lambda layer, x: layer(x, decode=True))  # updates the cache
  steps = [decode(layer, x[:, :5])]
  steps += [decode(layer, x[:, t:t + 1]) for t in range(5, 9)]
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(full),
                             rtol=1e-10, atol=1e-10)
  assert layer.cache_index[...].tolist() == [9, 9]


def test_intermediates_are_probabilities_and_gate_scores(x64):
  layer = make_layer(VARIANTS["sdpa_elementwise"])
  x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 6, D)))
  out, inter = layer(x, return_intermediates=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(layer(x)), atol=1e-12)
  probs = np.asarray(inter["attention_probs"])
  assert probs.shape == (2, N, 6, 6)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-12)
  assert np.all(np.triu(probs, k=1) == 0)  # causal
  want = jax.nn.sigmoid(jnp.einsum("BTD,DNH->BTNH", x, layer.attn_gate_proj[...]))
  np.testing.assert_allclose(np.asarray(inter["gate_scores"]), np.asarray(want), atol=1e-12)


def test_jax_nn_attention_path_matches_reference(x64):
  """The "cudnn" code path (jax.nn.dot_product_attention) run with XLA on CPU."""
  rng = np.random.default_rng(9)
  q = jnp.asarray(rng.normal(size=(2, 6, N, H)))
  k = jnp.asarray(rng.normal(size=(2, 6, K, H)))
  v = jnp.asarray(rng.normal(size=(2, 6, K, H)))
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1]])
  for segments in (None, seg):
    mask = attention_ops.make_mask(2, 6, 6, causal=True, q_segment_ids=segments,
                                   kv_segment_ids=segments)
    want, _ = attention_ops.xla_attention(q, k, v, mask, H ** -0.5)
    got = attention_ops.cudnn_attention(
        q, k, v, causal=True, mask=None if segments is None else mask, scale=H ** -0.5,
        implementation="xla")
    # jax.nn runs its softmax in float32 even for float64 inputs: ~1e-7 absolute.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


@pytest.mark.parametrize("name", ["sdpa_elementwise", "sdpa_headwise", "sdpa_head_shared"])
def test_pallas_impl_matches_xla(name):
  """attention_impl="pallas": the fused kernel for G1 gates, the ungated kernel otherwise.

  Runs the Pallas TPU kernel in interpret mode on CPU. float32: the kernel's online
  softmax reorders sums, ~1e-6 relative.
  """
  gate = VARIANTS[name]
  xla = make_layer(gate, dtype=jnp.float32, qk_norm=True)
  pallas = make_layer(gate, dtype=jnp.float32, qk_norm=True, impl="pallas")
  nnx.update(pallas, nnx.state(xla, nnx.Param))
  assert pallas.fuses_gate() == (name != "sdpa_head_shared")  # head-shared: kernel + XLA gate
  x = jnp.asarray(np.random.default_rng(11).normal(size=(1, 9, D)), jnp.float32)
  segments = jnp.asarray([[1] * 5 + [2] * 4])

  def loss(layer):
    return jnp.sum(jnp.sin(layer(x, segment_ids=segments)))

  np.testing.assert_allclose(np.asarray(forward(pallas, x, segments)),
                             np.asarray(forward(xla, x, segments)), rtol=1e-5,
                             atol=1e-5)
  grad = nnx.jit(nnx.grad(loss))
  grads_xla, grads_pallas = grad(xla), grad(pallas)
  for a, b in zip(jax.tree.leaves(grads_xla), jax.tree.leaves(grads_pallas)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


H100, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"


@pytest.mark.parametrize("platform, kind, dtype, head_dim, length, segments, want, why", [
    ("tpu", "TPU v5p", jnp.float32, 128, 4096, True, "pallas", "Mosaic TPU"),
    ("cpu", "cpu", jnp.bfloat16, 128, 4096, False, "xla", "TPU and GPU only"),
    ("gpu", H100, jnp.bfloat16, 128, 4096, True, "cudnn", "no GPU measurement yet"),
    ("gpu", H100, jnp.bfloat16, 256, 4096, False, "cudnn", "no GPU measurement yet"),
    ("gpu", H100, jnp.float32, 128, 4096, False, "pallas", "takes bfloat16 or float16"),
    ("gpu", H100, jnp.bfloat16, 260, 4096, False, "pallas", "multiple of 8 up to 256"),
    ("gpu", A100, jnp.bfloat16, 256, 4096, False, "pallas", "multiple of 8 up to 128"),
    ("gpu", H100, jnp.bfloat16, 64, 4095, True, "pallas", "even sequence lengths"),
    ("gpu", H100, jnp.bfloat16, 64, 4095, False, "cudnn", "no GPU measurement yet"),
])
def test_auto_impl_choice(platform, kind, dtype, head_dim, length, segments, want, why):
  """"auto": the kernel on TPU, cuDNN on GPU where its flash-attention checks pass (bf16/f16,
  head_dim <= 256 from Hopper on, else 128, even lengths with a mask), else the kernel."""
  impl, reason = attention_ops.choose_impl("auto", platform, kind, dtype=dtype,
                                           head_dim=head_dim, q_len=length, kv_len=length,
                                           segments=segments)
  assert (impl, why in reason) == (want, True), reason
  assert attention_ops.choose_impl("cudnn", platform, kind, dtype=dtype, head_dim=head_dim,
                                   q_len=length, kv_len=length, segments=segments)[0] == "cudnn"


def test_auto_layer_resolves_for_the_platform_it_is_traced_for():
  """On CPU "auto" runs the XLA reference (probabilities included); traced for a TPU (an
  abstract mesh's device, as in an ahead-of-time compile) the same layer calls the kernel."""
  gate = VARIANTS["sdpa_elementwise"]
  auto = make_layer(gate, dtype=jnp.float32, impl="auto")
  xla = make_layer(gate, dtype=jnp.float32)
  x = jnp.asarray(np.random.default_rng(12).normal(size=(2, 8, D)), jnp.float32)
  out, inter = auto(x, return_intermediates=True)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(xla(x)))
  assert "attention_probs" in inter
  assert "pallas_call" not in str(jax.make_jaxpr(lambda x: auto(x))(x))
  tpu = jax.sharding.AbstractDevice(device_kind="TPU v5p", num_cores=None, platform="tpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                                   abstract_device=tpu)
  with jax.sharding.use_abstract_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(lambda x: auto(x))(x))
    _, inter = jax.eval_shape(lambda x: auto(x, return_intermediates=True), x)
  assert jaxpr.count("pallas_call") == 1 and "attention_probs" not in inter


def test_bf16_compute_close_to_f32():
  gate = GateConfig(position="sdpa")
  f32 = make_layer(gate, dtype=jnp.float32)
  bf16 = GatedAttention(D, N, K, H, gate, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                        rngs=nnx.Rngs(0))
  nnx.update(bf16, nnx.state(f32, nnx.Param))
  assert bf16.q_proj[...].dtype == jnp.float32  # parameters stay float32
  x = jnp.asarray(np.random.default_rng(10).normal(size=(2, 8, D)), jnp.float32)
  out = forward(bf16, x)
  assert out.dtype == jnp.bfloat16
  # bf16 has an 8-bit mantissa: ~1e-2 relative error through a few matmuls.
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(forward(f32, x)), rtol=0.1,
                             atol=0.05)


@pytest.mark.parametrize("kwargs, message", [
    (dict(position="middle"), "gate.position must be one of"),
    (dict(granularity="channel"), "gate.granularity must be one of"),
    (dict(sharing="all"), "gate.sharing must be one of"),
    (dict(activation="tanh"), "gate.activation must be one of"),
    (dict(combine="mul"), "gate.combine must be one of"),
    (dict(sdpa_transform="layernorm"), "gate.sdpa_transform must be one of"),
    (dict(input_dependent="yes"), "gate.input_dependent must be one of"),
    (dict(position="dense", granularity="headwise"), "gate.granularity must be 'elementwise'"),
    (dict(position="dense", sharing="head_shared"), "gate.sharing must be 'head_specific'"),
])
def test_bad_gate_config_raises(kwargs, message):
  with pytest.raises(ValueError, match=message):
    GateConfig(**kwargs)


def test_bad_layer_arguments_raise():
  with pytest.raises(ValueError, match=r"num_heads \(6\) must be a multiple"):
    GatedAttention(D, 6, 4, H, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    GatedAttention(D, N, K, H, attention_impl="flash", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="partial_rotary_factor"):
    GatedAttention(D, N, K, H, partial_rotary_factor=0.0, rngs=nnx.Rngs(0))
  layer = GatedAttention(D, N, K, H, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="x must be"):
    layer(jnp.zeros((2, 3, D + 1)))
  with pytest.raises(ValueError, match="init_cache"):
    layer(jnp.zeros((2, 3, D)), decode=True)


def test_decoding_past_the_cache_never_returns_silent_garbage():
  layer = make_layer(VARIANTS["sdpa_elementwise"], dtype=jnp.float32)
  x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 5, D)), jnp.float32)
  layer.init_cache(2, 4)
  layer(x[:, :3], decode=True)
  with pytest.raises(ValueError, match=r"slot\(s\) \[3, 3\] .* overflows the KV cache"
                                       r" \(max_length=4\)"):
    layer(x[:, 3:5], decode=True)
  # Under jit the slots are not known while tracing: the row that overflows returns
  # NaN and sets its sticky cache_overflow flag; the other row is untouched.
  layer.init_cache(2, 4)
  step = nnx.jit(lambda layer, x, positions: layer(x, positions, decode=True))
  first = step(layer, x[:, :3], jnp.asarray([[0, 1, 2], [0, 1, 2]]))
  out = step(layer, x[:, 3:5], jnp.asarray([[3, 4], [1, 2]]))
  assert np.isfinite(np.asarray(first)).all()
  assert np.isnan(np.asarray(out[0])).all() and np.isfinite(np.asarray(out[1])).all()
  assert layer.cache_overflow[...].tolist() == [True, False]
  assert layer.cache_index[...].tolist() == [5, 3]


def test_bad_call_arguments_name_the_argument_and_shapes():
  layer = GatedAttention(D, N, K, H, rngs=nnx.Rngs(0))
  x = jnp.zeros((2, 3, D))
  with pytest.raises(ValueError, match=r"positions must have shape \(batch, seq\) = \(2, 3\)"
                                       r" like x, got \(2, 4\)"):
    layer(x, positions=jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"segment_ids must have shape .* got \(3,\)"):
    layer(x, segment_ids=jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids must be integers, got dtype float32"):
    layer(x, segment_ids=jnp.zeros((2, 3), jnp.float32))
  with pytest.raises(ValueError, match="empty sequence axis"):
    layer(jnp.zeros((2, 0, D)))
  layer.init_cache(2, 4)
  with pytest.raises(ValueError, match=r"x has batch 3 but the KV cache was allocated for"
                                       r" batch 2"):
    layer(jnp.zeros((3, 1, D)), decode=True)
  with pytest.raises(ValueError, match=r"x has 5 tokens, more than the KV cache holds"
                                       r" \(max_length=4\)"):
    layer(jnp.zeros((2, 5, D)), decode=True)
  for name in ("rope_theta", "norm_eps"):
    with pytest.raises(ValueError, match=f"{name} must be a finite number > 0, got -1.0"):
      GatedAttention(D, N, K, H, **{name: -1.0}, rngs=nnx.Rngs(0))


def test_forward_returns_an_attention_output_in_every_mode(x64):
  """`forward` keeps one return type; `mode` runs what the deprecated booleans ran, which
  still work (warning) as does the deprecated `return_intermediates` tuple."""
  layer = make_layer(VARIANTS["sdpa_elementwise"], qk_norm=True)
  x = jnp.asarray(np.random.default_rng(21).normal(size=(2, 7, D)))
  plain = layer.forward(x)
  assert isinstance(plain, attention.AttentionOutput) and plain.intermediates == {}
  full = nnx.jit(lambda layer, x: layer.forward(x, intermediates=True))(layer, x)
  np.testing.assert_allclose(np.asarray(full.out), np.asarray(plain.out), atol=1e-12)
  assert set(full.intermediates) == {"queries", "keys", "values", "attention_probs",
                                     "gate_scores"}
  with pytest.warns(DeprecationWarning, match="return_intermediates"):
    out, inter = layer(x, return_intermediates=True)
  np.testing.assert_allclose(np.asarray(inter["gate_scores"]),
                             np.asarray(full.intermediates["gate_scores"]), atol=1e-12)
  layer.init_cache(2, 9)
  step = nnx.jit(lambda layer, x, mode: layer(x, mode=mode), static_argnums=2)
  steps = [step(layer, x[:, :4], "prefill")] + [step(layer, x[:, t:t + 1], "decode")
                                                for t in range(4, 7)]
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(plain.out),
                             rtol=1e-10, atol=1e-10)
  with pytest.warns(DeprecationWarning, match="pass mode='decode'"):
    layer(x[:, :1], positions=jnp.full((2, 1), 7), decode=True)
  with pytest.raises(ValueError, match=r"mode must be one of \('train', 'prefill', 'decode'\),"
                                       r" got 'generate'"):
    layer(x, mode="generate")
  with pytest.raises(ValueError, match="mode='train' contradicts decode=True"):
    layer(x, mode="train", decode=True)


def test_the_reference_attention_zeroes_rows_that_see_no_key(x64):
  """One reference (kernels.reference.attention) behind the layer's "xla" path and the
  kernels' reference: a query whose segment has no visible key gets zero output and
  probabilities, with finite gradients, on both."""
  rng = np.random.default_rng(22)
  q = jnp.asarray(rng.normal(size=(1, 4, N, H)))
  k, v = (jnp.asarray(rng.normal(size=(1, 4, K, H))) for _ in range(2))
  q_seg, kv_seg = jnp.asarray([[1, 1, 2, 3]]), jnp.asarray([[1, 1, 2, 2]])  # query 3 sees none
  mask = attention_ops.make_mask(1, 4, 4, causal=True, q_segment_ids=q_seg,
                                 kv_segment_ids=kv_seg)
  out, probs = attention_ops.xla_attention(q, k, v, mask, H ** -0.5)
  assert np.all(np.asarray(out)[0, 3] == 0) and np.all(np.asarray(probs)[0, :, 3] == 0)
  np.testing.assert_allclose(np.asarray(probs)[0, :, :3].sum(-1), 1.0, atol=1e-12)
  kernel_ref = reference.gated_attention(q, k, v, None, causal=True, scale=H ** -0.5,
                                         gate_activation="sigmoid", q_segment_ids=q_seg,
                                         kv_segment_ids=kv_seg)
  np.testing.assert_array_equal(np.asarray(kernel_ref), np.asarray(out))
  grads = jax.grad(lambda q: jnp.sum(attention_ops.xla_attention(q, k, v, mask, 1.0)[0]))(q)
  assert np.all(np.isfinite(np.asarray(grads)))


def test_each_layer_rule_lives_in_one_place():
  """A bool is no head count, an odd rotated width is refused by the layer as by the config,
  and a gate's score shape is the GateConfig's."""
  with pytest.raises(ValueError, match="num_heads must be a positive int, got True"):
    GatedAttention(D, True, 1, H, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"head_dim \(6\) x partial_rotary_factor \(0.5\) must be"
                                       r" even with RoPE"):
    GatedAttention(D, N, K, 6, partial_rotary_factor=0.5, rngs=nnx.Rngs(0))
  GatedAttention(D, N, K, 6, partial_rotary_factor=0.5, use_rope=False, rngs=nnx.Rngs(0))
  for gate, want in ((GateConfig(position="sdpa"), ((N, H), ("q_heads", "head_dim"))),
                     (GateConfig(position="value", granularity="headwise"),
                      ((K,), ("kv_heads",))),
                     (GateConfig(position="dense"), ((D,), ("dense_gate",)))):
    layer = nnx.eval_shape(lambda: GatedAttention(D, N, K, H, gate, rngs=nnx.Rngs(0)))
    assert layer.gate_score_shape() == gate.score_shape(D, N, K, H) == want

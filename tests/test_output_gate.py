"""`OutputGate`: the G1 gate alone, in NNX and in Flax's own Linen attention; Linen counting."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.nnx import bridge

import gated_attention_jax as gaj


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("granularity,sharing,activation,combine", [
    ("elementwise", "head_specific", "sigmoid", "multiply"),
    ("headwise", "head_specific", "silu", "multiply"),
    ("elementwise", "head_shared", "sigmoid", "add"),
])
def test_gate_against_numpy(granularity, sharing, activation, combine, x64):
  d, n, kv, h = 12, 6, 2, 4
  gate = gaj.OutputGate(d, n, h, granularity=granularity, sharing=sharing, activation=activation,
                        combine=combine, num_kv_heads=kv, param_dtype=jnp.float64,
                        rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(2, 5, d)), rng.normal(size=(2, 5, n, h))
  w = np.asarray(gate.attn_gate_proj[...])
  logits = np.einsum("btd,d...->bt...", x, w)
  act = _sigmoid(logits) if activation == "sigmoid" else logits * _sigmoid(logits)
  if sharing == "head_shared":  # the mean over the query heads of each kv head
    act = np.repeat(act.reshape(2, 5, kv, n // kv, h).mean(3), n // kv, axis=2)
  act = act if granularity == "elementwise" else act[..., None]
  want = y * act if combine == "multiply" else y + act
  got = gate(jnp.asarray(x), jnp.asarray(y))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
  flat = gate(jnp.asarray(x), jnp.asarray(y.reshape(2, 5, n * h)))  # heads flattened
  np.testing.assert_allclose(np.asarray(flat), want.reshape(2, 5, n * h), atol=1e-12)


@pytest.mark.parametrize("granularity", ["elementwise", "headwise"])
def test_layout_is_the_layers_g1_gate(granularity):
  gate = gaj.OutputGate(64, 4, 16, granularity=granularity, rngs=nnx.Rngs(0))
  layer = gaj.GatedAttention(64, 4, 2, 16, gaj.GateConfig(position="sdpa",
                                                          granularity=granularity),
                             rngs=nnx.Rngs(0))
  assert gate.attn_gate_proj.shape == layer.attn_gate_proj.shape
  assert gate.attn_gate_proj.out_sharding == layer.attn_gate_proj.out_sharding
  assert np.std(np.asarray(gate.attn_gate_proj[...])) == pytest.approx(0.02, rel=0.15)
  assert gaj.gate_params(gate) == gaj.gate_params(layer) == gaj.gate_params_per_layer(
      64, 4, 2, 16, layer.gate)
  custom = gaj.OutputGate(64, 4, 16, init=jax.nn.initializers.zeros, rngs=nnx.Rngs(0))
  assert not np.asarray(custom.attn_gate_proj[...]).any()
  fixed = gaj.OutputGate(64, 4, 16, input_dependent=False, rngs=nnx.Rngs(0))
  assert fixed.attn_gate_proj is None and fixed.gate_theta.shape == (4, 16)


def test_bad_input_is_one_line():
  gate = gaj.OutputGate(8, 2, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"y must be \(batch, seq, num_heads, head_dim\)"):
    gate(jnp.ones((1, 3, 8)), jnp.ones((1, 3, 2, 5)))
  with pytest.raises(ValueError, match=r"x must be \(batch, seq, 8\)"):
    gate(jnp.ones((1, 3, 9)), jnp.ones((1, 3, 2, 4)))
  with pytest.raises(ValueError, match="gate.activation must be one of"):
    gaj.OutputGate(8, 2, 4, activation="tanh", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"num_heads \(2\) must be a multiple of num_kv_heads"):
    gaj.OutputGate(8, 2, 4, num_kv_heads=3, rngs=nnx.Rngs(0))


class GatedMHA(nn.Module):
  """The README recipe: Flax's attention with the G1 gate before its output projection."""

  num_heads: int
  head_dim: int

  @nn.compact
  def __call__(self, x, mask=None):
    gate = gaj.linen_output_gate(x.shape[-1], self.num_heads, self.head_dim, name="gate")
    attend = lambda q, k, v, mask=None: gate(x, nn.dot_product_attention(q, k, v, mask=mask))
    return nn.MultiHeadDotProductAttention(
        self.num_heads, qkv_features=self.num_heads * self.head_dim, use_bias=False,
        attention_fn=attend)(x, mask=mask)


def _causal(x):
  return nn.make_causal_mask(jnp.ones(x.shape[:2]))


def test_flax_attention_with_the_gate_equals_the_layer():
  x = jax.random.normal(jax.random.key(1), (2, 6, 16))
  block = GatedMHA(4, 8)
  variables = block.init(jax.random.key(0), x, _causal(x))
  params = nn.meta.unbox(variables)["params"]
  mha = params["MultiHeadDotProductAttention_0"]
  layer = gaj.GatedAttention(16, 4, 4, 8, gaj.GateConfig(position="sdpa"), use_rope=False,
                             rngs=nnx.Rngs(0))
  for name, value in (("q_proj", mha["query"]["kernel"]), ("k_proj", mha["key"]["kernel"]),
                      ("v_proj", mha["value"]["kernel"]), ("o_proj", mha["out"]["kernel"]),
                      ("attn_gate_proj", params["gate"]["attn_gate_proj"])):
    getattr(layer, name)[...] = value
  np.testing.assert_allclose(np.asarray(block.apply(variables, x, _causal(x))),
                             np.asarray(layer(x)), rtol=1e-5, atol=1e-6)
  assert gaj.gate_params(variables) == 16 * 4 * 8
  assert gaj.count_params(variables) == 5 * 16 * 4 * 8  # q, k, v, out and the gate


def test_the_recipe_block_trains():
  """A student GatedMHA learns a teacher's outputs; the gate's weights take part."""
  x = jax.random.normal(jax.random.key(2), (8, 12, 16))
  block = GatedMHA(4, 8)
  target = block.apply(block.init(jax.random.key(9), x, _causal(x)), x, _causal(x))
  variables = block.init(jax.random.key(0), x, _causal(x))
  opt = optax.adam(3e-2)
  state = opt.init(variables)

  @jax.jit
  def step(variables, state):
    loss, grads = jax.value_and_grad(
        lambda v: jnp.mean((block.apply(v, x, _causal(x)) - target) ** 2))(variables)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(variables, updates), state, loss

  losses = []
  start = nn.meta.unbox(variables)["params"]["gate"]["attn_gate_proj"]
  for _ in range(60):
    variables, state, loss = step(variables, state)
    losses.append(float(loss))
  assert losses[-1] < 0.2 * losses[0], losses[::10]
  moved = nn.meta.unbox(variables)["params"]["gate"]["attn_gate_proj"] - start
  assert float(jnp.abs(moved).max()) > 1e-2


def test_counting_linen_trees_equals_nnx():
  cfg = gaj.TransformerConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=8, mlp_dim=48,
                              gate=gaj.GateConfig(position="sdpa", granularity="headwise"))
  model = gaj.Transformer(cfg, rngs=nnx.Rngs(0))
  variables = jax.eval_shape(bridge.to_linen(gaj.Transformer, cfg).init, jax.random.key(0),
                             jnp.ones((1, 4), jnp.int32))
  assert gaj.count_params(variables) == gaj.count_params(variables["params"]) == (
      gaj.count_params(model))
  # The SwiGLU MLPs also hold a `gate_proj`: only the attention gates count.
  assert gaj.gate_params(variables) == gaj.gate_params(model) == 2 * 32 * 4
  with pytest.raises(ValueError, match="an NNX module or a Linen parameter tree"):
    gaj.count_params([1, 2])

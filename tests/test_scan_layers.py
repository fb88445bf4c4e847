"""`model.scan_layers`: the stacked, scanned block stack against the unrolled one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gated_attention_jax as gaj
from configs import default
from gated_attention_jax import layer_stack, sharding
from gated_attention_jax.training import checkpointing, experiment, train
from tests.conftest import randomize_params

SMALL = dict(vocab_size=61, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2,
             head_dim=8, mlp_dim=48)


def _pair(remat: str = "none"):
  """An unrolled model with random parameters and its scanned twin holding the same ones."""
  cfg = gaj.TransformerConfig(**SMALL, gate=gaj.GateConfig(position="sdpa"))
  unrolled = gaj.Transformer(cfg, rngs=nnx.Rngs(0))
  randomize_params(unrolled, 1, scale=0.2)
  scanned = gaj.Transformer(cfg.replace(scan_layers=True, remat=remat), rngs=nnx.Rngs(0))
  nnx.update(scanned, layer_stack.relayout(nnx.state(unrolled), nnx.state(scanned)))
  return unrolled, scanned


def test_stacked_parameters_carry_the_layers_axis():
  _, scanned = _pair()
  q = nnx.state(scanned)["blocks"]["attn"]["q_proj"]
  assert q.shape == (3, 32, 4, 8)
  assert q.get_metadata()["out_sharding"] == ("layers", "embed", "q_heads", "head_dim")
  mesh = jax.sharding.AbstractMesh((1, 2, 2, 1), sharding.MESH_AXES)
  spec = sharding.logical_to_mesh_spec(q.get_metadata()["out_sharding"], q.shape, mesh)
  assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)  # layers never split
  assert gaj.count_params(scanned) == gaj.count_params(_pair()[0])


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_matches_unrolled_with_intermediates_and_gradients(remat):
  unrolled, scanned = _pair(remat)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, size=(2, 9)))
  logits, inter = unrolled(tokens, return_intermediates=True)
  s_logits, s_inter = scanned(tokens, return_intermediates=True)
  np.testing.assert_allclose(s_logits, logits, rtol=1e-5, atol=1e-5)
  assert sorted(s_inter) == sorted(inter) and "attention_probs" in inter
  for name, per_layer in inter.items():
    assert len(s_inter[name]) == len(per_layer) == 3, name
    for a, b in zip(s_inter[name], per_layer):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)

  def loss(model):
    return jnp.mean(model(tokens) ** 2)

  grads = nnx.state(nnx.grad(loss)(unrolled))
  s_grads = layer_stack.relayout(nnx.state(nnx.grad(loss)(scanned)), grads)
  # float32: the scan sums the layers' contributions in another order, so an element that
  # cancels to near zero keeps an absolute error of ~1e-6 of its leaf's largest entries
  # (measured 1.2e-7 on a 9e-5 entry of a leaf whose largest is 0.08, AMD EPYC AVX2);
  # atol scales with each leaf. A gradient of the wrong layer or a dropped term is off by O(1).
  for a, b in zip(jax.tree.leaves(s_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


def test_relayout_round_trip_and_refusals():
  unrolled, scanned = _pair()
  back = layer_stack.relayout(nnx.state(scanned), nnx.state(unrolled))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(nnx.state(unrolled))):
    np.testing.assert_array_equal(a, b)
  deeper = nnx.eval_shape(lambda: gaj.Transformer(
      scanned.config.replace(num_layers=4), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="no unrolled layers 0..3"):
    layer_stack.relayout(nnx.state(unrolled), nnx.state(deeper))
  with pytest.raises(ValueError, match="KV-cache decoding is not supported"):
    scanned.init_cache(2, 16)
  with pytest.raises(ValueError, match="KV-cache decoding is not supported"):
    scanned(jnp.zeros((1, 1), jnp.int32), decode=True)


def test_a_scanned_model_generates_through_its_unrolled_twin():
  unrolled, scanned = _pair()
  assert layer_stack.unroll(unrolled) is unrolled
  twin = layer_stack.unroll(scanned)
  assert not twin.config.scan_layers and scanned.config.scan_layers
  for a, b in zip(jax.tree.leaves(nnx.state(twin)), jax.tree.leaves(nnx.state(unrolled))):
    np.testing.assert_array_equal(a, b)
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
  np.testing.assert_array_equal(gaj.generate(scanned, prompts, 4).tokens,
                                gaj.generate(unrolled, prompts, 4).tokens)


def _trainer(scan: bool) -> train.Trainer:
  config = default.get_config()
  config.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64, remat="full", scan_layers=scan)
  config.data.update(seq_len=16)
  config.train.update(batch_size=4, warmup_steps=1)
  config.mesh.update(data=1)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  return train.Trainer(config, experiment.validate(config, 1), mesh)


def test_train_checkpoint_converts_and_trains_to_the_same_losses(tmp_path):
  unrolled, scanned = _trainer(False), _trainer(True)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, unrolled.model_cfg.vocab_size, size=(3, 4, 17))
  batches = [{"inputs": t[:, :-1], "targets": t[:, 1:], "segment_ids": np.ones((4, 16), np.int32),
              "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (4, 16)),
              "loss_mask": np.ones((4, 16), np.float32)} for t in tokens]
  state = unrolled.init_state()
  state, _ = unrolled.train_step(state, unrolled.global_batch(batches[0]))
  ckpt = checkpointing.Checkpointer(tmp_path, keep=1)  # an unrolled run's checkpoint ...
  ckpt.save(1, state=state, data_state={}, config_json={})
  restored = ckpt.restore(1, unrolled.abstract_state)[0]
  ckpt.close()
  s_state = layer_stack.relayout(restored, scanned.abstract_state)  # ... resumed scanned
  for a, b in zip(jax.tree.leaves(layer_stack.relayout(s_state, unrolled.abstract_state)),
                  jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)  # and converted back, exactly
  for batch in batches[1:]:
    state, metrics = unrolled.train_step(state, unrolled.global_batch(batch))
    s_state, s_metrics = scanned.train_step(s_state, scanned.global_batch(batch))
    np.testing.assert_allclose(s_metrics["loss"], metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(s_metrics["grad_norm"], metrics["grad_norm"], rtol=1e-4)
  # Adam normalises each gradient, so where one is ~0 float noise moves a parameter by up to
  # the learning rate: the trained states agree to about one step.
  back = layer_stack.relayout(s_state, unrolled.abstract_state)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    np.testing.assert_allclose(a, b, atol=unrolled.config.train.learning_rate)

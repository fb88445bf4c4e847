"""RoPE and its scaling methods against hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from gated_attention_jax.rope import RopeScaling, apply_rope, inverse_frequencies, rotary_dim


def test_plain_frequencies():
  inv, factor = inverse_frequencies(8, 10000.0)
  np.testing.assert_allclose(inv, [1.0, 0.1, 0.01, 0.001])
  assert factor == 1.0


def test_linear_interpolation_divides_frequencies():
  inv, factor = inverse_frequencies(8, 10000.0, RopeScaling("linear", factor=4.0))
  np.testing.assert_allclose(inv, [0.25, 0.025, 0.0025, 0.00025])
  assert factor == 1.0


def test_ntk_raises_the_base():
  # base' = 10000 * 4 ** (8 / 6); inv_freq_i = base' ** (-2i / 8)
  base = 10000.0 * 4.0 ** (8 / 6)
  inv, _ = inverse_frequencies(8, 10000.0, RopeScaling("ntk", factor=4.0))
  np.testing.assert_allclose(inv, [base ** (-i / 4) for i in range(4)])
  assert inv[0] == 1.0 and inv[-1] < 0.001  # highest frequency kept, lowest stretched


def test_yarn_ramp_and_attention_factor():
  # rd = 16, base 10000, original length 64, factor 8, beta_fast 32, beta_slow 1.
  # correction dim(r) = 16 * ln(64 / (2 pi r)) / (2 ln 10000)
  low = math.floor(16 * math.log(64 / (2 * math.pi * 32)) / (2 * math.log(10000)))
  high = math.ceil(16 * math.log(64 / (2 * math.pi * 1)) / (2 * math.log(10000)))
  assert (max(low, 0), high) == (0, 3)
  inv, factor = inverse_frequencies(16, 10000.0, RopeScaling("yarn", factor=8.0,
                                                             original_max_len=64))
  base = 10000.0 ** (-np.arange(0, 16, 2) / 16)
  # ramp over pair index i: clip((i - 0) / (3 - 0), 0, 1): 0, 1/3, 2/3, 1, 1, ...
  ramp = np.clip(np.arange(8) / 3, 0, 1)
  want = base / 8 * ramp + base * (1 - ramp)
  np.testing.assert_allclose(inv, want)
  assert inv[0] == base[0]  # the fastest dims are not interpolated
  np.testing.assert_allclose(inv[4:], base[4:] / 8)  # the slowest fully interpolated
  assert factor == pytest.approx(0.1 * math.log(8) + 1)


def test_rotation_preserves_norm_and_relative_positions():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

  def score(pq, pk):
    rq = apply_rope(q, jnp.asarray([[pq]]), theta=10000.0)
    rk = apply_rope(k, jnp.asarray([[pk]]), theta=10000.0)
    return float(jnp.sum(rq * rk))

  np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-4)
  rq = apply_rope(q, jnp.asarray([[5]]), theta=10000.0)
  np.testing.assert_allclose(float(jnp.linalg.norm(rq)), float(jnp.linalg.norm(q)), rtol=1e-5)


def test_partial_rotary_leaves_the_tail_alone():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 2, 16)), jnp.float32)
  out = apply_rope(x, jnp.asarray([[0, 4, 9]]), theta=10000.0, partial_rotary_factor=0.25)
  assert rotary_dim(16, 0.25) == 4
  np.testing.assert_array_equal(np.asarray(out[..., 4:]), np.asarray(x[..., 4:]))
  assert np.abs(np.asarray(out[:, 1:, :, :4] - x[:, 1:, :, :4])).max() > 1e-3


def test_bad_scaling_raises():
  with pytest.raises(ValueError, match="rope_scaling.method must be one of"):
    RopeScaling("dynamic")
  with pytest.raises(ValueError, match="rope_scaling.factor must be > 0"):
    RopeScaling("linear", factor=0.0)

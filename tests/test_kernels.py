"""gated_flash_attention (xla, pallas_tpu, pallas_gpu) against an independent float64 numpy model.

On CPU the Pallas kernels run in Pallas' interpreter (``interpret=True``: the kernel body as XLA
ops over the grid, uninitialised scratch and padding read as NaN); ``test_pallas_tpu_under_emulator``
runs the TPU kernels in jax's TPU emulator (``pltpu.InterpretParams``) too. Shapes are small but span several tiles (16/32-row tiles on
lengths up to 64) so tile loops, padding and causal skipping are exercised.

Tolerances. float32 inputs vs the float64 model: |err| <= 1e-5 + 1e-5·|ref|. f32 has a 6e-8 unit
roundoff; length-64 dots, exp/log of the online softmax and the backward's re-derivation of p
from the saved lse gave max errors <= 1e-6 on these shapes, so 1e-5 leaves a 10x margin without
hiding real bugs (a wrong mask or a missed tile moves values by >1e-2). bfloat16 inputs: the kernels round p to
bf16 before p·v, dy before the backward matmuls and the outputs themselves (8-bit mantissa,
unit roundoff 4e-3; observed normalised errors <= 5.4e-3), so we require
max|err| <= 2e-2 · max|ref| per output against the float64 model evaluated on the same
bf16-rounded inputs.
"""

from __future__ import annotations

import dataclasses
import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.experimental.pallas import tpu as pltpu

from gated_attention_jax.kernels import BlockSizes, gated_flash_attention

IMPLS = ("xla", "pallas_tpu", "pallas_gpu")
PALLAS = ("pallas_tpu", "pallas_gpu")


# ----------------------------------------------------------------------------- float64 model


def _np_act(x: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
  s = 1.0 / (1.0 + np.exp(-x))
  return {
      "sigmoid": (s, s * (1 - s)),
      "silu": (x * s, s + x * s * (1 - s)),
      "ns_sigmoid": (0.5 + 0.5 * s, 0.5 * s * (1 - s)),
      "identity": (x, np.ones_like(x)),
      "2sigmoid": (2 * s, 2 * s * (1 - s)),
  }[name]


def _np_gated_attention(q, k, v, gate, do, *, causal, q_seg, kv_seg, activation, window=None,
                        soft_cap=None):
  """float64 output and (dq, dk, dv, dgate); gradients derived by hand, K/V repeated per head.

  window: keys j with |i' - j| < window (i' = i + S - T); soft_cap: c·tanh(logits / c)."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  group = n // kh
  kr, vr = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  mask = np.ones((b, 1, t, s), bool)
  rows, cols = np.arange(t)[:, None] + s - t, np.arange(s)[None, :]
  if causal:
    mask &= (cols <= rows)[None, None]
  if window is not None:
    mask &= (np.abs(cols - rows) < window)[None, None]
  if q_seg is not None:
    mask &= (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]
  logits = np.einsum("btnh,bsnh->bnts", q, kr) / np.sqrt(h)
  dcap = 1.0
  if soft_cap is not None:
    tanh = np.tanh(logits / soft_cap)
    logits, dcap = soft_cap * tanh, 1.0 - tanh ** 2
  logits = np.where(mask, logits, -np.inf)
  row_max = logits.max(-1, keepdims=True)
  row_max = np.where(np.isfinite(row_max), row_max, 0.0)
  p = np.where(mask, np.exp(logits - row_max), 0.0)
  denom = p.sum(-1, keepdims=True)
  p = p / np.where(denom == 0, 1.0, denom)
  y = np.einsum("bnts,bsnh->btnh", p, vr)
  if gate is None:
    o, dy, dgate = y, do, None
  else:
    a, da = _np_act(gate, activation)
    if gate.ndim == 3:
      o, dy, dgate = y * a[..., None], do * a[..., None], (do * y).sum(-1) * da
    else:
      o, dy, dgate = y * a, do * a, do * y * da
  dp = np.einsum("btnh,bsnh->bnts", dy, vr)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * dcap
  dq = np.einsum("bnts,bsnh->btnh", ds, kr) / np.sqrt(h)
  dk = np.einsum("bnts,btnh->bsnh", ds, q) / np.sqrt(h)
  dv = np.einsum("bnts,btnh->bsnh", p, dy)
  dk = dk.reshape(b, s, kh, group, h).sum(3)
  dv = dv.reshape(b, s, kh, group, h).sum(3)
  return o, (dq, dk, dv, dgate)


# ----------------------------------------------------------------------------- harness


@dataclasses.dataclass(frozen=True)
class Case:
  b: int
  t: int
  s: int
  n: int
  k: int
  h: int
  causal: bool = True
  gate: str | None = "elementwise"  # "elementwise", "headwise" or None
  activation: str = "sigmoid"
  segments: str | None = None  # None, "shared" (one (B, T) array) or "pair"
  blocks: BlockSizes = BlockSizes(16, 16)
  window: int | None = None
  soft_cap: float | None = None


def _inputs(case: Case, seed: int):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((case.b, case.t, case.n, case.h))
  k = rng.standard_normal((case.b, case.s, case.k, case.h))
  v = rng.standard_normal((case.b, case.s, case.k, case.h))
  do = rng.standard_normal((case.b, case.t, case.n, case.h))
  gate = {"elementwise": lambda: rng.standard_normal((case.b, case.t, case.n, case.h)),
          "headwise": lambda: rng.standard_normal((case.b, case.t, case.n)),
          None: lambda: None}[case.gate]()
  q_seg = kv_seg = None
  if case.segments == "shared":
    q_seg = kv_seg = np.cumsum(rng.random((case.b, case.t)) < 0.15, axis=1).astype(np.int32)
  elif case.segments == "pair":
    q_seg = rng.integers(0, 3, (case.b, case.t)).astype(np.int32)
    kv_seg = rng.integers(0, 3, (case.b, case.s)).astype(np.int32)
  return q, k, v, gate, do, q_seg, kv_seg


@functools.cache
def _compiled(case: Case, impl: str, interpret=None):
  """jit(inputs -> (plain forward, vjp forward, grads)) for one case, impl and interpret mode."""

  def attend(q, k, v, gate, q_seg, kv_seg):
    segment_ids = None if q_seg is None else (q_seg if case.segments == "shared" else
                                              (q_seg, kv_seg))
    return gated_flash_attention(q, k, v, gate, causal=case.causal, segment_ids=segment_ids,
                                 gate_activation=case.activation, impl=impl,
                                 sliding_window=case.window, logit_soft_cap=case.soft_cap,
                                 block_sizes=case.blocks, interpret=interpret)

  def run(q, k, v, gate, do, q_seg, kv_seg):
    o, vjp = jax.vjp(lambda *x: attend(*x, q_seg, kv_seg), q, k, v, gate)
    return attend(q, k, v, gate, q_seg, kv_seg), o, vjp(do)

  return jax.jit(run)


def _run(case: Case, impl: str, inputs, dtype, interpret=None):
  q, k, v, gate, do, q_seg, kv_seg = inputs
  cast = lambda x: None if x is None else jnp.asarray(x, dtype)
  seg = lambda x: None if x is None else jnp.asarray(x)
  plain, o, grads = _compiled(case, impl, interpret)(cast(q), cast(k), cast(v), cast(gate), cast(do),
                                           seg(q_seg), seg(kv_seg))
  f64 = lambda x: None if x is None else np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  return f64(plain), f64(o), tuple(f64(g) for g in grads)


def _rounded(inputs, dtype):
  """Inputs as the kernel sees them (rounded to dtype), in float64 for the model."""
  return tuple(x if x is None or x.dtype == np.int32 else
               np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)
               for x in inputs)


def _check(case: Case, impl: str, seed: int = 0, dtype=jnp.float32, interpret=None):
  inputs = _rounded(_inputs(case, seed), dtype)
  q, k, v, gate, do, q_seg, kv_seg = inputs
  want_o, want_grads = _np_gated_attention(q, k, v, gate, do, causal=case.causal, q_seg=q_seg,
                                           kv_seg=kv_seg, activation=case.activation,
                                           window=case.window, soft_cap=case.soft_cap)
  plain, o, grads = _run(case, impl, inputs, dtype, interpret)
  names = ("out", "out (vjp)", "dq", "dk", "dv", "dgate")
  for name, got, want in zip(names, (plain, o, *grads), (want_o, want_o, *want_grads)):
    if want is None:
      assert got is None, name
    elif dtype == jnp.float32:
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{impl} {name}")
    else:
      err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6)
      assert err <= 2e-2, f"{impl} {name}: normalised max error {err:.3g}"


# ----------------------------------------------------------------------------- value + grad tests

CASES = {
    "mha_full_tiles": Case(1, 64, 64, 2, 2, 64),
    "odd_len_gqa2_headwise_silu": Case(1, 37, 37, 4, 2, 64, gate="headwise", activation="silu",
                                       blocks=BlockSizes(16, 32, 32, 16)),
    "decode_like_t_lt_s_gqa4": Case(1, 24, 53, 4, 1, 32, activation="ns_sigmoid"),
    "t_gt_s_rows_without_keys": Case(1, 50, 20, 2, 2, 64, blocks=BlockSizes(16, 16, 32, 16)),
    "noncausal_gqa8_segments_identity": Case(1, 29, 29, 8, 1, 64, causal=False, gate="headwise",
                                             activation="identity", segments="shared"),
    "causal_segments_silu": Case(1, 64, 64, 4, 4, 64, activation="silu", segments="shared",
                                 blocks=BlockSizes(32, 16)),
    "ungated_segment_pair_h128": Case(1, 33, 47, 2, 1, 128, gate=None, segments="pair"),
    "noncausal_h256": Case(1, 16, 16, 2, 2, 256, causal=False),
    # Gemma 2/3: a sliding window (tiles left of it skipped) and a logit soft cap.
    "window_softcap_gqa2": Case(1, 64, 64, 4, 2, 32, window=20, soft_cap=3.0),
    "window_noncausal_segment_pair_2sigmoid": Case(1, 24, 53, 2, 1, 32, causal=False, window=9,
                                                   segments="pair", activation="2sigmoid",
                                                   blocks=BlockSizes(16, 16, 16, 32)),
    "softcap_headwise_t_gt_s_window": Case(1, 50, 20, 2, 2, 64, gate="headwise", window=7,
                                           soft_cap=2.0, activation="silu"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CASES))
def test_values_and_grads_f32(name: str, impl: str):
  _check(CASES[name], impl, seed=list(CASES).index(name))


@pytest.mark.parametrize("case,impl", [
    *((Case(1, 40, 40, 4, 2, 64), impl) for impl in IMPLS),
    *((Case(1, 29, 45, 4, 1, 64, gate="headwise", segments="pair"), impl) for impl in IMPLS),
])
def test_values_and_grads_bf16(case: Case, impl: str):
  _check(case, impl, seed=7, dtype=jnp.bfloat16)


@st.composite
def _cases(draw):
  k = draw(st.sampled_from([1, 2]))
  t = draw(st.integers(1, 56))
  segments = draw(st.sampled_from([None, "pair", "shared"]))
  s = t if segments == "shared" else draw(st.integers(1, 56))
  return Case(
      b=draw(st.integers(1, 2)), t=t, s=s, n=k * draw(st.sampled_from([1, 2, 4])), k=k,
      h=draw(st.sampled_from([16, 32, 64])), causal=draw(st.booleans()),
      gate=draw(st.sampled_from(["elementwise", "headwise", None])),
      activation=draw(st.sampled_from(["sigmoid", "silu", "ns_sigmoid", "identity", "2sigmoid"])),
      segments=segments,
      blocks=BlockSizes(*(draw(st.sampled_from([16, 32])) for _ in range(4))),
      window=draw(st.sampled_from([None, None, 1, 5, 24])),
      soft_cap=draw(st.sampled_from([None, None, 1.5, 30.0])))


@pytest.mark.parametrize("impl,examples", [("xla", 4), ("pallas_gpu", 3), ("pallas_tpu", 2)])
def test_random_shapes(impl: str, examples: int):
  @hypothesis.settings(max_examples=examples, deadline=None, database=None,
                       suppress_health_check=[hypothesis.HealthCheck.too_slow])
  @hypothesis.given(case=_cases(), seed=st.integers(0, 2**16))
  def check(case, seed):
    _check(case, impl, seed)

  check()


@pytest.mark.parametrize("name,seed", [("odd_len_gqa2_headwise_silu", 11),
                                       ("causal_segments_silu", 12)])
def test_pallas_tpu_under_emulator(name: str, seed: int):
  """The TPU kernels in jax's TPU emulator (VMEM simulated, uninitialised memory NaN, the
  parallel grid axes visited in a shuffled order) match the float64 model: forward, dq and dk/dv
  with GQA, padding, both gate kinds and segments. ~3x slower than Pallas' interpreter."""
  _check(CASES[name], "pallas_tpu", seed, interpret=pltpu.InterpretParams(random_seed=seed))


# ----------------------------------------------------------------------------- causal tile skipping


@pytest.mark.parametrize("impl", PALLAS)
def test_causal_kernels_skip_tiles_above_diagonal(impl: str):
  """Poisons tiles that only masked (row, col) pairs touch; a computed masked tile turns NaN.

  With 16×16 tiles on T = S = 64: q tiles 0-2 never see kv tile 3, and kv tiles 1-3 never see
  q tile 0. Multiplying a masked p = 0 by NaN yields NaN, so a kernel that visits those tiles
  (forward or dq with NaN in v[48:], dk/dv with NaN in q[:16]) leaks NaN into rows that must be
  finite and equal to the model's.
  """
  case = Case(1, 64, 64, 1, 1, 32)
  q, k, v, gate, do, _, _ = _inputs(case, seed=3)

  v_nan = v.copy()
  v_nan[:, 48:] = np.nan
  v_zero = np.where(np.isnan(v_nan), 0.0, v_nan)
  want_o, (want_dq, *_) = _np_gated_attention(q, k, v_zero, gate, do, causal=True, q_seg=None,
                                              kv_seg=None, activation="sigmoid")
  plain, o, (dq, *_) = _run(case, impl, (q, k, v_nan, gate, do, None, None), jnp.float32)
  for got, want in ((plain, want_o), (o, want_o), (dq, want_dq)):
    np.testing.assert_allclose(got[:, :48], want[:, :48], rtol=1e-5, atol=1e-5)

  q_nan = q.copy()
  q_nan[:, :16] = np.nan
  _, (_, want_dk, want_dv, _) = _np_gated_attention(
      np.where(np.isnan(q_nan), 0.0, q_nan), k, v, gate, do, causal=True, q_seg=None,
      kv_seg=None, activation="sigmoid")
  _, _, (_, dk, dv, _) = _run(case, impl, (q_nan, k, v, gate, do, None, None), jnp.float32)
  np.testing.assert_allclose(dk[:, 16:], want_dk[:, 16:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dv[:, 16:], want_dv[:, 16:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", PALLAS)
def test_window_kernels_skip_tiles_left_of_the_window(impl: str):
  """Poisons tiles that only the sliding window masks, as the causal test above does.

  With 16×16 tiles on T = S = 64 and a causal window of 16: q tile 3 (rows 48-63) sees keys
  33-63 only, so NaN in v[:32] must not reach its rows (forward, dq); kv tile 0 (keys 0-15) is
  seen by rows 0-30 only, so NaN in q[32:] must not reach dk, dv of keys 0-15.
  """
  case = Case(1, 64, 64, 1, 1, 32, window=16)
  q, k, v, gate, do, _, _ = _inputs(case, seed=4)
  model = functools.partial(_np_gated_attention, causal=True, q_seg=None, kv_seg=None,
                            activation="sigmoid", window=16)

  v_nan = v.copy()
  v_nan[:, :32] = np.nan
  want_o, (want_dq, *_) = model(q, k, np.nan_to_num(v_nan), gate, do)
  plain, o, (dq, *_) = _run(case, impl, (q, k, v_nan, gate, do, None, None), jnp.float32)
  for got, want in ((plain, want_o), (o, want_o), (dq, want_dq)):
    np.testing.assert_allclose(got[:, 48:], want[:, 48:], rtol=1e-5, atol=1e-5)

  q_nan = q.copy()
  q_nan[:, 32:] = np.nan
  _, (_, want_dk, want_dv, _) = model(np.nan_to_num(q_nan), k, v, gate, do)
  _, _, (_, dk, dv, _) = _run(case, impl, (q_nan, k, v, gate, do, None, None), jnp.float32)
  np.testing.assert_allclose(dk[:, :16], want_dk[:, :16], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dv[:, :16], want_dv[:, :16], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- API


def test_auto_on_cpu_is_xla():
  if jax.default_backend() != "cpu":
    pytest.skip("auto resolves to a Pallas kernel on accelerators")
  q, k, v, gate, *_ = (jnp.asarray(x, jnp.float32) if x is not None else None
                       for x in _inputs(Case(1, 8, 8, 2, 1, 16), 0))
  np.testing.assert_array_equal(gated_flash_attention(q, k, v, gate, impl="auto"),
                                gated_flash_attention(q, k, v, gate, impl="xla"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(impl="cuda"), "impl must be one of"),
    (dict(gate_activation="tanh"), "gate_activation must be one of"),
    (dict(k_heads=4), "multiple of k/v heads"),
    (dict(gate_shape=(1, 8, 6, 2)), "gate must have shape"),
    (dict(kv_len=9), "single segment_ids array needs T == S"),
    (dict(segment_ids=(np.zeros((1, 8), np.int32),)), "pair"),
    (dict(segment_ids=np.zeros((1, 8), np.float32)), "integer array"),
    (dict(segment_ids=(np.zeros((1, 8), np.int32), None)), "kv segment_ids must be"),
    (dict(v_shape=(1, 8, 2, 8)), "k and v must have equal shapes"),
    (dict(head_dim_k=8), "match q"),
    (dict(impl="pallas_gpu", interpret=pltpu.InterpretParams()),
     "interpret must be None, True, False for impl='pallas_gpu'"),
    (dict(impl="pallas_tpu", interpret="yes"), "or a pltpu.InterpretParams"),
    (dict(sliding_window=0), "sliding_window must be None or a positive int, got 0"),
    (dict(logit_soft_cap=-2.0), "logit_soft_cap must be None or a finite number > 0"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
  kv_heads, kv_len = kwargs.pop("k_heads", 2), kwargs.pop("kv_len", 8)
  q = jnp.zeros((1, 8, 6, 16))
  k = jnp.zeros((1, kv_len, kv_heads, kwargs.pop("head_dim_k", 16)))
  v = jnp.zeros(kwargs.pop("v_shape", k.shape))
  gate = jnp.zeros(kwargs.pop("gate_shape", (1, 8, 6)))
  if "segment_ids" not in kwargs and kv_len != 8:
    kwargs["segment_ids"] = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match=match):
    gated_flash_attention(q, k, v, gate, **kwargs)


def test_block_sizes_must_be_powers_of_two():
  with pytest.raises(ValueError, match="block_kv"):
    BlockSizes(block_kv=48)


# ----------------------------------------------------------------------------- hardware only


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (compiled Triton path)")
def test_pallas_gpu_compiled_on_gpu():
  _check(Case(2, 256, 256, 8, 2, 64, blocks=BlockSizes(64, 64)), "pallas_gpu", seed=1)
  _check(Case(1, 200, 256, 4, 4, 128, gate="headwise", blocks=BlockSizes(64, 64)),
         "pallas_gpu", seed=2, dtype=jnp.bfloat16)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU (compiled Mosaic path)")
def test_pallas_tpu_compiled_on_tpu():
  _check(Case(2, 256, 256, 8, 2, 128, blocks=BlockSizes(128, 128)), "pallas_tpu", seed=1)
  _check(Case(1, 200, 256, 4, 4, 128, gate="headwise", blocks=BlockSizes(128, 128)),
         "pallas_tpu", seed=2, dtype=jnp.bfloat16)

"""Interop with PyTorch checkpoints, checked against real PyTorch code with random weights.

References: HF transformers' `Qwen3NextAttention` (the "qwen3_next" layout) and HF's
`Qwen3Attention` / `Qwen3ForCausalLM` with the official gate split of Qiu et al.
added here (the "official" layout, as described in
shared/reference/gated_attention_paper.md).

Precision: HF computes RoPE angles, RMSNorm and the eager softmax in float32 even
for float64 inputs. The float64 tests therefore use torch's SDPA attention and swap
in float64 versions of the RoPE/RMSNorm formulas, leaving the weight layouts, head
grouping, gate split and block structure to HF's code, and compare to ~1e-9. The
float32 tests run HF's modules unmodified.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import safetensors.torch  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3NextConfig  # noqa: E402
from transformers.models.qwen3 import modeling_qwen3  # noqa: E402
from transformers.models.qwen3_next import modeling_qwen3_next  # noqa: E402

from gated_attention_jax import interop  # noqa: E402
from gated_attention_jax.interop import layouts, safetensors_io  # noqa: E402

D, N, K, H, T, B = 64, 4, 2, 16, 12, 2
VOCAB, FFN = 96, 80
POSITIONS = np.stack([np.arange(T), np.arange(T) + 7])  # a second row at an offset


def max_rel_diff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def randomize(module: "torch.nn.Module", seed: int) -> None:
  """Every parameter ~ N(0, 0.3²); vectors (norm weights) around 0.5 so no norm is identity."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3
      p.copy_(noise + (0.5 if p.ndim == 1 else 0.0))


def rope_cos_sin(positions: np.ndarray, rotary_dim: int, theta: float):
  """float64 (cos, sin) `(B, T, rd)` in HF's layout: inv_freq = theta^(-arange(0, rd, 2)/rd)."""
  inv_freq = theta ** -(torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
  freqs = torch.as_tensor(positions, dtype=torch.float64)[..., None] * inv_freq
  emb = torch.cat([freqs, freqs], dim=-1)
  return emb.cos(), emb.sin()


def _rms(x, eps):
  return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.fixture
def float64_torch_norms_and_rope(monkeypatch):
  """HF's RMSNorm and RoPE formulas without their float32 casts (float64 in, float64 out)."""
  monkeypatch.setattr(modeling_qwen3_next.Qwen3NextRMSNorm, "forward",
                      lambda self, x: _rms(x, self.eps) * (1.0 + self.weight))
  monkeypatch.setattr(modeling_qwen3.Qwen3RMSNorm, "forward",
                      lambda self, x: _rms(x, self.variance_epsilon) * self.weight)

  def rotary_forward(self, x, position_ids):
    return rope_cos_sin(position_ids.numpy(), self.config.head_dim,
                        self.config.rope_parameters["rope_theta"])

  monkeypatch.setattr(modeling_qwen3.Qwen3RotaryEmbedding, "forward", rotary_forward)


# --- the official layout, built from HF's Qwen3 attention -------------------------

class OfficialGatedAttention(modeling_qwen3.Qwen3Attention):
  """HF Qwen3 attention plus the official G1 gate: q_proj widened, split per kv group into
  [G*H query rows, G*H (elementwise) or G (headwise) gate rows]; output * sigmoid(gate)."""

  def __init__(self, config: Qwen3Config, layer_idx: int, granularity: str):
    super().__init__(config, layer_idx)
    self.granularity = granularity
    gate_rows = self.head_dim if granularity == "elementwise" else 1
    self.q_proj = torch.nn.Linear(config.hidden_size,
                                  config.num_attention_heads * (self.head_dim + gate_rows),
                                  bias=False)

  def forward(self, hidden_states, position_embeddings, attention_mask, **kwargs):
    bt = hidden_states.shape[:-1]
    g, h = self.num_key_value_groups, self.head_dim
    grouped = self.q_proj(hidden_states).view(*bt, self.config.num_key_value_heads, -1)
    query, gate = torch.split(grouped, [g * h, grouped.shape[-1] - g * h], dim=-1)
    query = query.reshape(*bt, -1, h)
    gate = gate.reshape(*bt, -1, h if self.granularity == "elementwise" else 1)
    query = self.q_norm(query).transpose(1, 2)
    key = self.k_norm(self.k_proj(hidden_states).view(*bt, -1, h)).transpose(1, 2)
    value = self.v_proj(hidden_states).view(*bt, -1, h).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = modeling_qwen3.apply_rotary_pos_emb(query, key, cos, sin)
    attend = modeling_qwen3.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, modeling_qwen3.eager_attention_forward)
    out, weights = attend(self, query, key, value, attention_mask, scaling=self.scaling,
                          dropout=0.0, **kwargs)
    out = out * torch.sigmoid(gate)  # (B, T, N, H) * (B, T, N, H or 1)
    return self.o_proj(out.reshape(*bt, -1)), weights


def qwen3_config(tie: bool) -> Qwen3Config:
  return Qwen3Config(vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN,
                     num_hidden_layers=2, num_attention_heads=N, num_key_value_heads=K,
                     head_dim=H, rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                     attn_implementation="sdpa")


def official_model(granularity: str, tie: bool, dtype, seed: int):
  """A tiny random `Qwen3ForCausalLM` with the official gate in every layer."""
  model = Qwen3ForCausalLM(qwen3_config(tie))
  if granularity != "none":
    for i, layer in enumerate(model.model.layers):
      layer.self_attn = OfficialGatedAttention(model.config, i, granularity)
  model = model.to(dtype).eval()
  randomize(model, seed)
  return model


def save_official(model, directory, granularity: str) -> None:
  """config.json with the official gate flags + model.safetensors, as released checkpoints."""
  hf = model.config.to_dict()
  hf.update(headwise_attn_output_gate=granularity == "headwise",
            elementwise_attn_output_gate=granularity == "elementwise", use_qk_norm=True,
            qkv_bias=False)
  (directory / "config.json").write_text(json.dumps(hf))
  weights = model.state_dict()
  if model.config.tie_word_embeddings:
    weights.pop("lm_head.weight")  # shared with the embedding, as save_pretrained does
  safetensors.torch.save_file({k: v.contiguous() for k, v in weights.items()},
                              str(directory / "model.safetensors"))


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(tokens), position_ids=torch.as_tensor(POSITIONS))
  return out.logits.numpy()


def attention_state_dict(module) -> dict:
  return {name: p.detach().numpy() for name, p in module.state_dict().items()}


def run_torch_attention(module, x: np.ndarray, cos, sin) -> np.ndarray:
  with torch.no_grad():
    out, _ = module(torch.as_tensor(x), (cos, sin), None)  # no mask: SDPA runs causal
  return out.numpy()


# --- one attention layer -----------------------------------------------------------

def qwen3_next_attention(partial: float, dtype):
  config = Qwen3NextConfig(hidden_size=D, num_attention_heads=N, num_key_value_heads=K,
                           head_dim=H, partial_rotary_factor=partial, rope_theta=500.0,
                           rms_norm_eps=1e-5, num_hidden_layers=1,
                           layer_types=["full_attention"], attn_implementation="sdpa")
  module = modeling_qwen3_next.Qwen3NextAttention(config, layer_idx=0).to(dtype).eval()
  randomize(module, seed=1)
  return config, module


@pytest.mark.parametrize("partial", [0.25, 1.0])
def test_qwen3_next_attention_float64(x64, float64_torch_norms_and_rope, partial):
  _, module = qwen3_next_attention(partial, torch.float64)
  x = np.random.default_rng(0).normal(size=(B, T, D))
  cos, sin = rope_cos_sin(POSITIONS, int(H * partial), 500.0)
  expected = run_torch_attention(module, x, cos, sin)
  layer = interop.load_attention(
      attention_state_dict(module), layout="qwen3_next", d_model=D, num_heads=N,
      num_kv_heads=K, head_dim=H, gate_granularity="elementwise",
      partial_rotary_factor=partial, rope_theta=500.0, rms_norm_eps=1e-5, dtype=jnp.float64)
  got = layer(jnp.asarray(x), positions=jnp.asarray(POSITIONS))
  assert max_rel_diff(got, expected) < 1e-9


def test_qwen3_next_attention_float32_unmodified_hf():
  config, module = qwen3_next_attention(0.25, torch.float32)
  x = np.random.default_rng(0).normal(size=(B, T, D)).astype(np.float32)
  rotary = modeling_qwen3_next.Qwen3NextRotaryEmbedding(config)
  cos, sin = rotary(torch.as_tensor(x), torch.as_tensor(POSITIONS))
  expected = run_torch_attention(module, x, cos, sin)
  layer = interop.load_attention(
      attention_state_dict(module), layout="qwen3_next", d_model=D, num_heads=N,
      num_kv_heads=K, head_dim=H, gate_granularity="elementwise", partial_rotary_factor=0.25,
      rope_theta=500.0, rms_norm_eps=1e-5)
  got = layer(jnp.asarray(x), positions=jnp.asarray(POSITIONS))
  assert max_rel_diff(got, expected) < 1e-5


@pytest.mark.parametrize("granularity", ["elementwise", "headwise", "none"])
def test_official_attention_float64(x64, float64_torch_norms_and_rope, granularity):
  config = qwen3_config(tie=False)
  module = (modeling_qwen3.Qwen3Attention(config, 0) if granularity == "none"
            else OfficialGatedAttention(config, 0, granularity)).double().eval()
  randomize(module, seed=2)
  x = np.random.default_rng(0).normal(size=(B, T, D))
  expected = run_torch_attention(module, x, *rope_cos_sin(POSITIONS, H, 500.0))
  layer = interop.load_attention(
      attention_state_dict(module), layout="official", d_model=D, num_heads=N,
      num_kv_heads=K, head_dim=H, gate_granularity=granularity, rope_theta=500.0,
      rms_norm_eps=1e-5, dtype=jnp.float64)
  got = layer(jnp.asarray(x), positions=jnp.asarray(POSITIONS))
  assert max_rel_diff(got, expected) < 1e-9


@pytest.mark.parametrize("layout,granularity", [("official", "elementwise"),
                                                ("official", "headwise"),
                                                ("official", "none"),
                                                ("qwen3_next", "elementwise")])
def test_attention_round_trip_is_exact(layout, granularity):
  shape = layouts.AttentionShape(D, N, K, H, granularity)
  rng = np.random.default_rng(3)
  sd = {"q_proj.weight": rng.normal(size=(N * (H + shape.gate_rows_per_head()), D)),
        "k_proj.weight": rng.normal(size=(K * H, D)), "v_proj.weight": rng.normal(size=(K * H, D)),
        "o_proj.weight": rng.normal(size=(D, N * H)), "q_norm.weight": rng.normal(size=H),
        "k_norm.weight": rng.normal(size=H)}
  sd = {k: v.astype(np.float32) for k, v in sd.items()}
  layer = interop.load_attention(sd, layout=layout, d_model=D, num_heads=N, num_kv_heads=K,
                                 head_dim=H, gate_granularity=granularity)
  back = interop.export_attention(layer, layout)
  assert sorted(back) == sorted(sd)
  for name in sd:
    np.testing.assert_array_equal(back[name], sd[name])


def test_layouts_coincide_only_without_grouping():
  rng = np.random.default_rng(4)
  for k, same in ((N, True), (K, False)):
    shape = layouts.AttentionShape(D, N, k, H, "elementwise")
    w = rng.normal(size=(2 * N * H, D))
    a = layouts.split_q_proj(w, "official", shape)
    b = layouts.split_q_proj(w, "qwen3_next", shape)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) == same


# --- whole official models -------------------------------------------------------------

@pytest.mark.parametrize("granularity,tie", [("elementwise", False), ("headwise", True),
                                             ("none", False)])
def test_official_model_logits_float64(x64, float64_torch_norms_and_rope, tmp_path,
                                       granularity, tie):
  torch_model = official_model(granularity, tie, torch.float64, seed=5)
  save_official(torch_model, tmp_path, granularity)
  tokens = np.random.default_rng(6).integers(0, VOCAB, size=(B, T))
  expected = torch_logits(torch_model, tokens)

  model = interop.load_official(tmp_path, dtype="float64")
  assert model.config.gate.enabled == (granularity != "none")
  got = model(jnp.asarray(tokens), positions=jnp.asarray(POSITIONS))
  assert max_rel_diff(got, expected) < 1e-9

  # Export with our writer, read back with the safetensors library into the torch model.
  out_dir = tmp_path / "exported"
  interop.export_official(model, out_dir)
  reloaded = official_model(granularity, tie, torch.float64, seed=7)
  reloaded.load_state_dict(safetensors.torch.load_file(str(out_dir / "model.safetensors")),
                           strict=not tie)  # tied: lm_head shares the embedding
  np.testing.assert_array_equal(torch_logits(reloaded, tokens), expected)
  assert interop.config_from_hf(json.loads((out_dir / "config.json").read_text()),
                                dtype="float64") == model.config


def test_official_model_bfloat16_checkpoint_unmodified_hf(tmp_path):
  torch_model = official_model("elementwise", False, torch.float32, seed=8)
  with torch.no_grad():  # bf16-representable weights, run by HF's float32 code
    for p in torch_model.parameters():
      p.copy_(p.to(torch.bfloat16).float())
  save_official(torch_model.to(torch.bfloat16), tmp_path, "elementwise")
  torch_model = official_model("elementwise", False, torch.float32, seed=8)
  torch_model.load_state_dict({k: v.float() for k, v in safetensors.torch.load_file(
      str(tmp_path / "model.safetensors")).items()})
  weights = safetensors_io.load_file(tmp_path / "model.safetensors")
  for name, value in torch_model.state_dict().items():
    np.testing.assert_array_equal(weights[name], value.numpy())

  tokens = np.random.default_rng(9).integers(0, VOCAB, size=(B, T))
  expected = torch_logits(torch_model, tokens)
  model = interop.load_official(tmp_path)
  got = model(jnp.asarray(tokens), positions=jnp.asarray(POSITIONS))
  assert max_rel_diff(got, expected) < 1e-5


def test_sharded_checkpoint_and_bfloat16_writer(tmp_path):
  rng = np.random.default_rng(10)
  tensors = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b": np.arange(4, dtype=np.int64),
             "c": rng.normal(size=(2, 2))}
  safetensors_io.save_file({"a": tensors["a"]}, tmp_path / "s1.safetensors", dtype="bfloat16")
  safetensors_io.save_file({"b": tensors["b"], "c": tensors["c"]}, tmp_path / "s2.safetensors")
  index = {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  loaded = safetensors_io.load_checkpoint(tmp_path)
  as_torch = safetensors.torch.load_file(str(tmp_path / "s1.safetensors"))["a"]
  assert as_torch.dtype == torch.bfloat16
  np.testing.assert_array_equal(
      loaded["a"], torch.as_tensor(tensors["a"]).to(torch.bfloat16).float().numpy())
  np.testing.assert_array_equal(loaded["b"], tensors["b"])
  np.testing.assert_array_equal(loaded["c"], tensors["c"])


def test_config_rejects_what_the_model_cannot_express():
  hf = qwen3_config(tie=False).to_dict()
  for change in ({"attention_bias": True}, {"use_sliding_window": True},
                 {"headwise_attn_output_gate": True, "elementwise_attn_output_gate": True},
                 {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}):
    with pytest.raises(ValueError, match="does not support"):
      interop.config_from_hf({**hf, **change})

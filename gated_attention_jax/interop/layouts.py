"""Weight permutations between PyTorch attention checkpoints and `GatedAttention`, in numpy.

PyTorch `nn.Linear` weights are `(out_features, in_features)`. Our layer keeps
einsum-shaped weights: q_proj / attn_gate_proj `(D, N, H)` (headwise gate `(D, N)`),
k_proj / v_proj `(D, K, H)`, o_proj `(N, H, D)`. Query head n reads kv head
n // G, G = N / K, as in HF's `repeat_kv`.

Layouts of the widened `q_proj` (rows = output features):
  "official" (Qiu et al.'s `modeling_qwen3.py`): viewed `(K, rows_per_group)`; each kv
    group holds [G*H query rows, then G*H gate rows] (elementwise) or
    [G*H query rows, G gate rows] (headwise). No gate: plain `(N*H)` query rows.
  "qwen3_next" (HF Qwen3-Next / Qwen3.5): viewed `(N, 2H)`; each head holds
    [H query rows, H gate rows]. Elementwise only.
The two coincide when G = 1 (elementwise).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import numpy as np

LAYOUTS = ("official", "qwen3_next")
GRANULARITIES = ("none", "elementwise", "headwise")


@dataclasses.dataclass(frozen=True)
class AttentionShape:
  """Dimensions of one attention layer; granularity "none" means no output gate."""

  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  granularity: str = "elementwise"

  def __post_init__(self):
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"gate_granularity must be one of {GRANULARITIES}, got"
                       f" {self.granularity!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads"
                       f" ({self.num_kv_heads})")

  @property
  def group(self) -> int:
    return self.num_heads // self.num_kv_heads

  def gate_rows_per_head(self) -> int:
    """Gate rows in the widened q_proj for each query head: H, 1 or 0."""
    return {"none": 0, "elementwise": self.head_dim, "headwise": 1}[self.granularity]


def _check_layout(layout: str, shape: AttentionShape) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  if layout == "qwen3_next" and shape.granularity != "elementwise":
    raise ValueError("layout 'qwen3_next' has an elementwise gate only, got"
                     f" gate_granularity={shape.granularity!r}")


def _check_shape(name: str, array: np.ndarray, expected: tuple[int, ...]) -> None:
  if tuple(array.shape) != expected:
    raise ValueError(f"{name} has shape {tuple(array.shape)}, expected {expected}")


def split_q_proj(weight: np.ndarray, layout: str,
                 shape: AttentionShape) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """Widened torch q_proj `(rows, D)` → q `(D, N, H)` and gate `(D, N, H)` / `(D, N)` / None."""
  _check_layout(layout, shape)
  s = shape
  n, k, h, g, d = s.num_heads, s.num_kv_heads, s.head_dim, s.group, s.d_model
  gr = s.gate_rows_per_head()
  _check_shape("q_proj.weight", weight, (n * (h + gr), d))
  if layout == "official":
    grouped = weight.reshape(k, g * (h + gr), d)
    q_rows, gate_rows = grouped[:, :g * h], grouped[:, g * h:]
  else:
    per_head = weight.reshape(n, 2 * h, d)
    q_rows, gate_rows = per_head[:, :h], per_head[:, h:]
  q = q_rows.reshape(n, h, d).transpose(2, 0, 1)
  if gr == 0:
    return q, None
  gate = gate_rows.reshape(n, gr, d).transpose(2, 0, 1)
  return q, (gate[:, :, 0] if s.granularity == "headwise" else gate)


def merge_q_proj(q: np.ndarray, gate: Optional[np.ndarray], layout: str,
                 shape: AttentionShape) -> np.ndarray:
  """Inverse of `split_q_proj`: q `(D, N, H)`, gate `(D, N, H)` / `(D, N)` / None → `(rows, D)`."""
  _check_layout(layout, shape)
  s = shape
  n, k, h, g, d = s.num_heads, s.num_kv_heads, s.head_dim, s.group, s.d_model
  gr = s.gate_rows_per_head()
  _check_shape("q_proj", q, (d, n, h))
  q_rows = q.transpose(1, 2, 0)  # (N, H, D)
  if gr == 0:
    if gate is not None:
      raise ValueError("gate weights given for gate_granularity='none'")
    return q_rows.reshape(n * h, d)
  if gate is None:
    raise ValueError(f"gate_granularity={s.granularity!r} needs gate weights")
  _check_shape("attn_gate_proj", gate, (d, n, h) if gr == h else (d, n))
  gate_rows = gate.reshape(d, n, gr).transpose(1, 2, 0)  # (N, gr, D)
  if layout == "official":
    merged = np.concatenate([q_rows.reshape(k, g * h, d), gate_rows.reshape(k, g * gr, d)],
                            axis=1)
  else:
    merged = np.concatenate([q_rows, gate_rows], axis=1)
  return merged.reshape(n * (h + gr), d)


def attention_from_torch(state_dict: Mapping[str, np.ndarray], layout: str,
                         shape: AttentionShape) -> dict[str, np.ndarray]:
  """Torch attention weights (own names) → our parameter names and shapes.

  Returns keys q_proj, k_proj, v_proj, o_proj, [attn_gate_proj], [q_norm, k_norm]
  (norm weights `(H,)` unchanged: the layer is built with the matching norm style).
  """
  s = shape
  d, n, k, h = s.d_model, s.num_heads, s.num_kv_heads, s.head_dim
  unknown = sorted(set(state_dict) - {f"{m}.weight" for m in
                                      ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm",
                                       "k_norm")})
  if unknown:
    raise ValueError(f"unsupported attention weights {unknown} (biases are not supported)")
  sd = {name: np.asarray(value) for name, value in state_dict.items()}
  q, gate = split_q_proj(sd["q_proj.weight"], layout, s)
  out = {"q_proj": q}
  if gate is not None:
    out["attn_gate_proj"] = gate
  for name in ("k_proj", "v_proj"):
    _check_shape(f"{name}.weight", sd[f"{name}.weight"], (k * h, d))
    out[name] = sd[f"{name}.weight"].T.reshape(d, k, h)
  _check_shape("o_proj.weight", sd["o_proj.weight"], (d, n * h))
  out["o_proj"] = sd["o_proj.weight"].T.reshape(n, h, d)
  if ("q_norm.weight" in sd) != ("k_norm.weight" in sd):
    raise ValueError("q_norm.weight and k_norm.weight must come together")
  for name in ("q_norm", "k_norm"):
    if f"{name}.weight" in sd:
      _check_shape(f"{name}.weight", sd[f"{name}.weight"], (h,))
      out[name] = sd[f"{name}.weight"]
  return out


def attention_to_torch(params: Mapping[str, np.ndarray], layout: str,
                       shape: AttentionShape) -> dict[str, np.ndarray]:
  """Inverse of `attention_from_torch`: our names and shapes → torch `*.weight` arrays."""
  s = shape
  d, n, k, h = s.d_model, s.num_heads, s.num_kv_heads, s.head_dim
  out = {"q_proj.weight": merge_q_proj(np.asarray(params["q_proj"]),
                                       params.get("attn_gate_proj"), layout, s)}
  for name in ("k_proj", "v_proj"):
    out[f"{name}.weight"] = np.asarray(params[name]).reshape(d, k * h).T
  out["o_proj.weight"] = np.asarray(params["o_proj"]).reshape(n * h, d).T
  for name in ("q_norm", "k_norm"):
    if name in params:
      out[f"{name}.weight"] = np.asarray(params[name])
  return {name: np.ascontiguousarray(value) for name, value in out.items()}

"""The paper's numbers for each ablation variant, typed once here (the summarizer reads them).

All rows come from the same 15B-A2.5B MoE trained on 400B tokens, so their
perplexities are comparable across tables. None = the paper gives no number.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

SOURCE = ("Qiu et al. 2025, 'Gated Attention for Large Language Models', arXiv 2505.06708:"
          " Table 1 (added params, avg PPL), Table 3 (extra rows), Table 4 (gate score,"
          " M-Act, F-Attn); 15B-A2.5B MoE, 400B tokens")


@dataclasses.dataclass(frozen=True)
class PaperRow:
  table: str  # e.g. "1.5" = Table 1, row 5
  added_params_m: Optional[float]
  ppl: float
  gate_score_mean: Optional[float] = None
  max_activation: Optional[float] = None
  first_token_attention: Optional[float] = None


# Keyed by the variant names of configs/ablation.py.
ROWS: dict[str, PaperRow] = {
    "baseline": PaperRow("1.1", 0, 6.026, None, 1053, 0.467),
    "baseline_kv_heads_x2": PaperRow("1.2", 50, 5.979),
    "baseline_q_heads_x1p5": PaperRow("1.3", 201, 5.953),
    "baseline_plus_4_experts": PaperRow("1.4", 400, 5.964),
    "sdpa_elementwise": PaperRow("1.5", 201, 5.761, 0.116, 94, 0.048),
    "value_elementwise": PaperRow("1.6", 25, 5.820, 0.221, 125, 0.297),
    "key_elementwise": PaperRow("1.7", 25, 6.016),
    "query_elementwise": PaperRow("1.8", 201, 5.981),
    "dense_elementwise": PaperRow("1.9", 100, 6.017),
    "sdpa_headwise": PaperRow("1.10", 1.6, 5.792, 0.172, 98, 0.073),
    "value_headwise": PaperRow("1.11", 0.2, 5.808),
    "sdpa_head_shared": PaperRow("1.12", 201, 5.801, 0.271, 286, 0.301),
    "value_head_shared": PaperRow("1.13", 25, 5.867),
    "sdpa_additive_silu": PaperRow("1.14", 201, 5.821),
    "sdpa_elementwise_silu": PaperRow("1.15", 201, 5.822),
    "sdpa_rmsnorm": PaperRow("3 (SDPA GroupNorm)", None, 5.847),
    "sdpa_silu": PaperRow("3 (SDPA SiLU)", None, 5.975),
    "sdpa_additive_identity": PaperRow("3 (additive identity)", None, 5.882),
    "sdpa_input_independent": PaperRow("4", None, 5.917, 0.335, 471, 0.364),
    "sdpa_ns_sigmoid": PaperRow("4", None, 5.900, 0.653, 892, 0.451),
}

# The attention geometry of Table 1's MoE (for checking the added-parameter formulas).
TABLE1_ATTENTION = {"d_model": 2048, "num_layers": 24, "num_heads": 32, "num_kv_heads": 4,
                    "head_dim": 128}

TABLE2_SOURCE = ("Qiu et al. 2025, Table 2: dense 1.7B (28 or 48 layers, hidden 2048, 16 q /"
                 " 8 kv heads, QK-norm), avg PPL at the max learning rate")


@dataclasses.dataclass(frozen=True)
class StabilityRow:
  setting: str
  variant: str  # a name of configs/ablation.py
  lr: float
  ppl: Optional[float]  # None: diverged
  note: str = ""


# Table 2 (the MMLU column is left out: nothing here measures it).
TABLE2: tuple[StabilityRow, ...] = (
    StabilityRow("28L, 400B tokens", "baseline", 4e-3, 7.499),
    StabilityRow("28L, 400B tokens", "sdpa_elementwise", 4e-3, 7.404),
    StabilityRow("48L, 400B tokens", "baseline", 8e-3, 9.195, "unstable (loss spikes)"),
    StabilityRow("48L, 400B tokens", "sdpa_elementwise", 8e-3, 7.325),
    StabilityRow("48L, 1T tokens, batch 4096", "baseline", 8e-3, None, "diverged"),
    StabilityRow("48L, 1T tokens, batch 4096", "sdpa_elementwise", 8e-3, 7.078),
)

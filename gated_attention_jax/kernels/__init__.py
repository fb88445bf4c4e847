"""Fused gated flash attention kernels (Pallas TPU, portable Pallas GPU, Mosaic GPU) and the XLA reference."""

from gated_attention_jax.kernels.api import IMPLS, gated_flash_attention, resolve_impl
from gated_attention_jax.kernels.common import BlockSizes
from gated_attention_jax.kernels.reference import GATE_ACTIVATIONS

__all__ = ["BlockSizes", "GATE_ACTIVATIONS", "IMPLS", "gated_flash_attention", "resolve_impl"]

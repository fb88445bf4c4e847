#!/usr/bin/env bash
# Will CONFIG fit on the slice? Runs the memory planner locally (no TPU needed).
# Usage: plan.sh CONFIG NUM_DEVICES DEVICE_MEMORY_GIB [--config.field=value ...]
#   plan.sh configs/ablation.py:sdpa_elementwise,paper_1p7b 64 95
set -euo pipefail
CONFIG="$1"; N="$2"; GIB="$3"; shift 3
cd "$(dirname "$0")/../.."
python -m gated_attention_jax.plan --config="$CONFIG" --num_devices="$N" \
  --device_memory_gib="$GIB" "$@"

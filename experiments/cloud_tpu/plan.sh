#!/usr/bin/env bash
# Will CONFIG fit on the slice? Compiles its train step with libtpu for the slice's topology,
# here, without the TPUs (needs the toolchain of tools/aot_toolchains.sh, or PYTHON= one with
# libtpu). Usage: plan.sh CONFIG TOPOLOGY [--config.field=value ...]
#   plan.sh configs/ablation.py:sdpa_elementwise,paper_1p7b v5p:4x4x2 \
#       --config.train.batch_size=256
set -euo pipefail
CONFIG="$1"; TOPOLOGY="$2"; shift 2
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-.toolchains/jax-0.11.2/bin/python}"
JAX_PLATFORMS=cpu PYTHONPATH="$PWD" "$PYTHON" -m gated_attention_jax.plan --config="$CONFIG" \
  --topology="$TOPOLOGY" "$@"

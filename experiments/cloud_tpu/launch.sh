#!/usr/bin/env bash
# Runs one config on all workers (one process per worker, jax.distributed from the TPU
# environment). Usage: launch.sh CONFIG RUN_NAME [--config.field=value ...]
#   launch.sh configs/ablation.py:sdpa_elementwise,paper_1p7b 1p7b/sdpa_elementwise/seed0
# Checkpoints, metrics.jsonl and each worker's log go to $BUCKET/runs/RUN_NAME (via the mount).
set -euo pipefail
source "$(dirname "$0")/env.sh"
CONFIG="$1"; RUN="$2"; shift 2
WORKDIR="$MOUNT/runs/$RUN"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd ~/gated_attention_jax && mkdir -p '$WORKDIR' &&
  log=~/logs/'$RUN'.\$(hostname).txt && mkdir -p \$(dirname \$log) &&
  python3 -m gated_attention_jax.main --distributed --config='$CONFIG' --workdir='$WORKDIR' $* \
    2>&1 | tee -a \$log;
  cp \$log '$WORKDIR/'
"

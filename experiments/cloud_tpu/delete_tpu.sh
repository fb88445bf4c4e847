#!/usr/bin/env bash
# Deletes the TPU VM (stops the billing). Checkpoints and logs stay in the bucket.
set -euo pipefail
source "$(dirname "$0")/env.sh"
gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet

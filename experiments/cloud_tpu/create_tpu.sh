#!/usr/bin/env bash
# Creates the TPU VM / pod slice. Add --spot (or --preemptible) to pay less:
# training resumes from the newest checkpoint after a preemption.
set -euo pipefail
source "$(dirname "$0")/env.sh"
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
  --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "$@"

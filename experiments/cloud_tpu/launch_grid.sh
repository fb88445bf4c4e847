#!/usr/bin/env bash
# Runs the whole ablation grid at one scale on the slice, one run after another, each
# using every worker. Usage: launch_grid.sh SCALE [SEEDS]   e.g. launch_grid.sh paper_1p7b 0
# Re-running resumes: a finished run ends at once, an unfinished one from its checkpoint.
set -euo pipefail
source "$(dirname "$0")/env.sh"
SCALE="$1"; SEEDS="${2:-0}"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd ~/gated_attention_jax &&
  python3 experiments/run_grid.py --scale='$SCALE' --seeds='$SEEDS' --root='$MOUNT/runs' \
      --print_only |
  while read -r cmd; do
    workdir=\$(echo \"\$cmd\" | sed -n 's/.*--workdir=\([^ ]*\).*/\1/p')
    mkdir -p \"\$workdir\"
    log=~/logs/\$(basename \$(dirname \$workdir))_\$(basename \$workdir).\$(hostname).txt
    mkdir -p ~/logs
    \$cmd --distributed 2>&1 | tee -a \$log || echo \"failed: \$workdir\"
    cp \$log \"\$workdir/\"
  done
"

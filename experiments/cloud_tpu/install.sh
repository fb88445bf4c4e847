#!/usr/bin/env bash
# On every worker: clone the repository, install it with TPU JAX, mount the bucket.
set -euo pipefail
source "$(dirname "$0")/env.sh"
BUCKET_NAME="${BUCKET#gs://}"; BUCKET_NAME="${BUCKET_NAME%%/*}"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  rm -rf ~/gated_attention_jax
  git clone --branch '$REPO_REF' '$REPO_URL' ~/gated_attention_jax
  cd ~/gated_attention_jax
  python3 -m pip install -U pip
  python3 -m pip install -e . 'jax[tpu]'
  if ! command -v gcsfuse >/dev/null; then
    export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s)
    echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" |
      sudo tee /etc/apt/sources.list.d/gcsfuse.list
    curl https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -
    sudo apt-get update && sudo apt-get install -y gcsfuse
  fi
  sudo mkdir -p '$MOUNT' && sudo chown \$USER '$MOUNT'
  mountpoint -q '$MOUNT' || gcsfuse --implicit-dirs '$BUCKET_NAME' '$MOUNT'
  python3 -c 'import jax; print(jax.process_count(), jax.device_count(), jax.devices()[0])'
"

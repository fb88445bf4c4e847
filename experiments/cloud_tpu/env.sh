# Settings shared by the scripts here: edit, or export them before running a script.
# UNTESTED on real TPUs (see README.md).
export TPU_NAME="${TPU_NAME:-gated-attn}"
export ZONE="${ZONE:-us-east5-a}"
export ACCELERATOR="${ACCELERATOR:-v5p-64}"          # pod slice type, e.g. v5litepod-16, v6e-8
export RUNTIME="${RUNTIME:-v2-alpha-tpuv5}"           # TPU VM image for that generation
export BUCKET="${BUCKET:?set BUCKET=gs://your-bucket (checkpoints and logs go there)}"
export REPO_URL="${REPO_URL:?set REPO_URL to a git URL of this repository}"
export REPO_REF="${REPO_REF:-main}"
export MOUNT="/mnt/bucket"                            # where every worker mounts BUCKET

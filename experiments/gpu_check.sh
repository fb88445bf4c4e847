#!/usr/bin/env bash
# The GPU check on the lent H200 (experiments/gpu_check.py has the details; arguments pass on).
# From the repository root: installs the carried wheels (.whl/, made by experiments/gpu_carry.sh)
# into /tmp/site as the device README says, reads the data cache from the carried .gpu_data/,
# then runs the stages with that machine's python3 (jax 0.11.2, the CUDA 13 plugin).
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .gpu_data ]; then
  export GATED_ATTENTION_DATA=$PWD/.gpu_data
fi
export PYTHONUNBUFFERED=1
exec python3 experiments/gpu_check.py "$@"

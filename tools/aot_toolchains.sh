#!/usr/bin/env bash
# Builds the ahead-of-time compile toolchains: one Python 3.12 virtual environment per jax version under
# .toolchains/jax-<version>/, each with libtpu (TPU AOT), the CUDA plugin, its PJRT and ptxas (deviceless
# H100/H200 compiles) and this package, so that `tests/test_compile_targets.py` and
# `experiments/benchmarks/kernel_report.py` compile the kernels for real targets on a CPU-only machine.
#
#   bash tools/aot_toolchains.sh            # the versions in AOT_JAX_VERSIONS below
#   bash tools/aot_toolchains.sh 0.12.0.1   # just one
#
# About 1.4 GB and a minute per version, from the package registry only. Idempotent: an environment whose
# `python -c "import jax"` already reports the version is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

# The default Python's jax (3.11 gets 0.10.2), the lent GPU machine's (0.11.2) and the newest on the
# registry (what Colab and Cloud TPU VMs install); tests/toolchains.py lists the same.
AOT_JAX_VERSIONS=(${AOT_JAX_VERSIONS:-0.10.2 0.11.2 0.12.0.1})
[ $# -gt 0 ] && AOT_JAX_VERSIONS=("$@")

python312=${AOT_PYTHON:-$( (pyenv root 2>/dev/null || echo "$HOME/.pyenv") )/versions/3.12.1/bin/python3.12}
[ -x "$python312" ] || python312=$(command -v python3.12 || true)
if [ -z "$python312" ] || [ ! -x "$python312" ]; then
  echo "aot_toolchains: no Python 3.12 found (set AOT_PYTHON=/path/to/python3.12)" >&2
  exit 1
fi

for version in "${AOT_JAX_VERSIONS[@]}"; do
  env_dir=.toolchains/jax-$version
  if [ -x "$env_dir/bin/python" ] && \
     [ "$("$env_dir/bin/python" -c 'import jax; print(jax.__version__)' 2>/dev/null)" = "$version" ]; then
    echo "aot_toolchains: $env_dir is ready"
    continue
  fi
  case "$version" in
    0.10.*) cuda=cuda12; nvcc="nvidia-cuda-nvcc-cu12==12.9.86" ;;
    *)      cuda=cuda13; nvcc="nvidia-cuda-nvcc" ;;
  esac
  echo "aot_toolchains: building $env_dir (jax $version, libtpu, jax-$cuda-plugin, ptxas)"
  rm -rf "$env_dir"
  "$python312" -m venv "$env_dir"
  pip=("$env_dir/bin/python" -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" "jax[tpu]==$version" "jaxlib==$version" absl-py
  "${pip[@]}" --no-deps "jax-$cuda-plugin==$version" "jax-$cuda-pjrt==$version" "$nvcc"
  "${pip[@]}" -e ".[test]" "jax==$version" "jaxlib==$version"
done

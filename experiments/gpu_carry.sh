#!/usr/bin/env bash
# Builds what the GPU check carries to the lent H200, which has no network: in the repository
# root (both folders are gitignored; run it in the checkout the device tool sends):
#   .whl/       Python 3.12 manylinux wheels of the imported packages that machine lacks
#               (grain and its array-record and portpicker, ml_collections; every
#               other requirement of theirs and of the project is on it: KINDS.md's list)
#   .gpu_data/  the bundled corpus tokenized with GPT-2 BPE plus the BPE ranks file, for
#               configs/gpt_125m.py (GATED_ATTENTION_DATA; prepared here from PyPI archives)
# About 10 MiB together; the device tool carries at most 64 MiB with the working tree. Then,
# with the device tool (README "Running the GPU check"):
#   run(command="experiments/gpu_check.sh", carry=[".whl", ".gpu_data"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0 portpicker==1.6.0)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]/#/--platform=}" -d .whl "${WHEELS[@]}"
if [ ! -f .gpu_data/gpt2/manifest.json ]; then
  python3 -m gated_attention_jax.data.prepare --tokenizer gpt2 --cache_dir .gpu_data
fi
# Only the GPT-2 corpus and its ranks file travel: not the PyPI archives it was read from, nor
# corpora a local `gpu_check.sh --dry-run` prepared here.
find .gpu_data -mindepth 1 -maxdepth 1 ! -name gpt2 ! -name _assets -exec rm -rf {} +
ls .whl
du -sh .whl .gpu_data

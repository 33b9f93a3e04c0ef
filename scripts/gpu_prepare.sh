#!/usr/bin/env bash
# Prepare, on a machine with network (a CPU is enough), what scripts/gpu_check.sh needs on a GPU
# machine that has none (Python 3.12 with torch, torchvision and transformers preinstalled):
#     bash scripts/gpu_prepare.sh
# It writes two git-ignored folders, to carry to the GPU machine with the working tree:
#   .whl/  the pinned wheels (requirements.txt) of the packages the check needs beyond torch
#          and torchvision, for CPython 3.12 on x86_64 Linux, and their small dependencies
#          (about 70 MB; pip download, no install here)
#   .gpu/  the test suite's synthetic world and tiny thinker, and the config and tokenizer of
#          the sentence embedder (scripts/gpu_assets.py; about 20 MB, a minute on 2 cores)
# PYTHON picks the interpreter that builds .gpu/ (default python3: the project's packages
# installed); PY picks the GPU machine's Python version (default 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PY=${PY:-3.12}
# the packages gpu_check.sh checks at their pins, beside the image's torch and torchvision
PINNED="transformers tqdm av soundfile scikit-learn pytest"
# their dependencies that an image with torch and transformers may lack (soundfile's, pytest's)
EXTRA="cffi pycparser pluggy iniconfig"

wheels=()
for name in $PINNED; do
    pin=$(grep -i -E "^$name==" requirements.txt) || {
        echo "gpu_prepare.sh: requirements.txt pins no $name" >&2
        exit 1
    }
    wheels+=("$pin")
done
mkdir -p .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$PY" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${wheels[@]}" $EXTRA
"$PYTHON" scripts/gpu_assets.py build .gpu
du -sh .whl .gpu

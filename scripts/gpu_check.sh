#!/usr/bin/env bash
# The project's CUDA paths on one GPU, in about 8 minutes. From the repo root, after
# `pip install -r requirements.txt`:
#     bash scripts/gpu_check.sh
# It prints the GPU and the library versions, runs every check of tests/test_gpu.py (train.py
# under torchrun and under plain python, kill and resume, the export, bf16 against fp32, one OPPO
# step of a Qwen2.5-Omni-7B-shaped thinker) and tests/test_device_rules.py, prints that step's
# figures, and exits non-zero when a check failed. PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

# no GPU, no check: without one every CUDA test would be skipped, and the run would "pass"
"$PYTHON" - <<'EOF'
import sys

import torch
import transformers

if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: torch sees no CUDA GPU")
print(f"GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
print(f"torch {torch.__version__}, transformers {transformers.__version__}")
EOF

# the 7B-shaped step's output lands here (test_a_7b_shaped_oppo_step_runs writes it)
export OPPO_GPU_OUT
OPPO_GPU_OUT=$(mktemp -d)
trap 'rm -rf "$OPPO_GPU_OUT"' EXIT

# one line per check, with the reason for any skip; a failure is reported at the end, after the
# step figures, so the figures show either way
status=0
OPPO_GPU_7B=1 "$PYTHON" -m pytest -v -rs tests/test_gpu.py tests/test_device_rules.py || status=$?

echo
echo "7B-shaped OPPO step (python -m tools.bench --config 7b --only step, B=1 G=8 256 tokens):"
if [ -f "$OPPO_GPU_OUT/bench_7b.txt" ]; then
    grep -v -e "Loading weights" -e "it/s]" "$OPPO_GPU_OUT/bench_7b.txt" | tail -n 20 || true
else
    echo "  none: the step did not start (see the test output above)"
fi
exit "$status"

#!/usr/bin/env bash
# Everything a GPU changes, in one command (under 6 minutes on one GPU): the CUDA tests (training
# steps of the fast path and the reference in fp32/bf16/fp16, the rule, -resume and
# -load_model_opt_dir, extraction, torchrun with NCCL), then the benchmarks with their ratios to
# the original code's anchors (bench/gpu_bench.sh).
# Usage: bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')"
# A failing test does not stop the benchmarks: both report, and the exit status is the first failure's.
status=0
echo "== tests/test_cuda.py"
timeout 150 "$PY" -m pytest -q -rs --durations=10 tests/test_cuda.py tests/test_fast.py tests/test_rule.py \
  || status=$?
echo "== bench/gpu_bench.sh"
bash bench/gpu_bench.sh || { rc=$?; [ "$status" -ne 0 ] || status=$rc; }
exit "$status"

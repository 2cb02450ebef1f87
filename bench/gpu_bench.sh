#!/usr/bin/env bash
# The three speed benchmarks on one GPU, in about 5 minutes; paste the output into bench/README.md.
#   training step: reference vs fast vs -amp bf16 / fp16 at batch 100 (crops/s, peak memory)
#   TTA extraction: one-segment loop vs batched fast path (windows/s)
#   data path: original read-normalise-crop vs indexed partial read (crops/s)
# Usage: bash bench/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "== bench/train_step.py (batch 100, cuDNN deterministic as the recipe runs)"
timeout 200 python bench/train_step.py --rounds 2 --steps 10 --warmup 3
echo "== bench/extract.py"
timeout 120 python bench/extract.py -nb_utt 200 -rounds 1
echo "== bench/data.py"
timeout 60 python bench/data.py

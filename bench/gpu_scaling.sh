#!/usr/bin/env bash
# DDP overhead and scaling on the GPUs of one machine (a few minutes):
#   single process vs torchrun --nproc_per_node=1 (DDP overhead), and N processes when N GPUs are visible.
# Usage: bash bench/gpu_scaling.sh [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-20}"
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
OUT=$(mktemp)
python bench/train_step.py --variant fast --steps "$STEPS" --label single | tee -a "$OUT"
torchrun --standalone --nproc_per_node=1 bench/train_step.py --variant fast --steps "$STEPS" --label ddp1 | tee -a "$OUT"
if [ "$NGPU" -gt 1 ]; then
  torchrun --standalone --nproc_per_node="$NGPU" bench/train_step.py --variant fast --steps "$STEPS" --bs $((100 / NGPU * NGPU)) \
    --label "ddp$NGPU" | tee -a "$OUT"
fi
python - "$OUT" "$NGPU" <<'PY'
import json, sys
runs = {r["label"]: r for r in map(json.loads, open(sys.argv[1]))}
single, ngpu = runs["single"], int(sys.argv[2])
print(f"device: {single['device']}")
print(f"DDP overhead (1 process): {runs['ddp1']['crops_per_s'] / single['crops_per_s']:.3f} x single-process step rate")
if ngpu > 1:
    r = runs[f"ddp{ngpu}"]
    print(f"{ngpu} GPUs: {r['crops_per_s']:.0f} crops/s = {r['crops_per_s'] / single['crops_per_s']:.2f} x one GPU, "
          f"scaling efficiency {r['crops_per_s'] / single['crops_per_s'] / ngpu:.2%}")
PY

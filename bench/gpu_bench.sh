#!/usr/bin/env bash
# The speed benchmarks on one GPU (about 4-5 minutes), with ratios against the anchors of bench/README.md
# (the original code measured on an H200, batch 100, paper model):
#   training step: reference (cuDNN deterministic, as shipped) vs the fast path / the plan / -amp bf16, fp16
#   TTA extraction: one-segment loop vs the batched fast path and the planned default (windows/s)
#   data path: original read-normalise-crop vs indexed partial read (crops/s)
# Usage: bash bench/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "== bench/train_step.py (batch 100, cuDNN deterministic as the recipe runs)"
# A step that fails or times out is reported and the others still run; the exit status says so.
status=0
for v in reference fast rule fast+bf16 fast+fp16; do
  timeout 100 "$PY" bench/train_step.py --variant "$v" --steps 8 --warmup 3 > "$OUT/step.txt" \
    || { status=$?; echo "train_step.py --variant $v failed ($status)"; }
  tail -n 1 "$OUT/step.txt" | grep '^{' | tee -a "$OUT/train.jsonl" || true
done
echo "== bench/extract.py"
# 1,000 utterances (~3,000 segments): enough for the planned default to settle its segments per
# forward; 2 rounds, so that no configuration is timed only on its first, cold pass.
timeout 240 "$PY" bench/extract.py -nb_utt 1000 -rounds 2 | tee "$OUT/extract.txt" \
  || { status=$?; echo "extract.py failed ($status)"; }
echo "== bench/data.py"
timeout 40 "$PY" bench/data.py || { status=$?; echo "data.py failed ($status)"; }
"$PY" - "$OUT" <<'PY'
import json, os, re, sys
out = sys.argv[1]
# anchors: the original code on an H200 (bench/README.md, "On a GPU")
SHIPPED, BENCHMARK, BF16, COMPILE_BF16 = 339.0, 862.0, 778.0, 928.0   # crops/s, batch 100
LOOP, PACKED = 2012.0, 3287.0                                          # TTA windows/s
lines = open(f"{out}/train.jsonl").read().splitlines() if os.path.exists(f"{out}/train.jsonl") else []
runs = {r["variant"]: r for r in map(json.loads, lines)}
same_gpu = runs.get("reference", {}).get("crops_per_s")  # this GPU's own baseline (as shipped)
print("\n== ratios against the original code's anchors (targets: training >= 3x as shipped at <= 16 GiB;"
      " extraction >= 2.5x the per-utterance loop)")
for v, r in runs.items():
    verdict = "meets" if r["crops_per_s"] >= 3 * SHIPPED and r["peak_mem_GiB_per_process"] <= 16 else "misses"
    plan = "/".join(r["plan"][s] for s in ("front_end", "blocks", "gru"))
    print(f"train {v:<10} {r['crops_per_s']:7.1f} crops/s = {r['crops_per_s'] / SHIPPED:5.2f}x as shipped "
          f"({r['crops_per_s'] / BENCHMARK:4.2f}x cudnn.benchmark, {r['crops_per_s'] / COMPILE_BF16:4.2f}x "
          f"compile+bf16), {r['peak_mem_GiB_per_process']:5.1f} GiB, plan {plan}: {verdict} the target"
          + (f"; {r['crops_per_s'] / same_gpu:4.2f}x the reference on this GPU" if same_gpu else ""))
text = open(f"{out}/extract.txt").read() if os.path.exists(f"{out}/extract.txt") else ""
for label, rate in re.findall(r"^(.*?)\s+([\d.]+) segments/s", text, flags=re.M):
    print(f"extract {label.strip():<36} {float(rate):8.1f} windows/s = {float(rate) / LOOP:5.2f}x the loop "
          f"anchor ({float(rate) / PACKED:4.2f}x 512 per forward)")
PY
exit "$status"

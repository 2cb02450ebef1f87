#!/usr/bin/env bash
# The speed benchmarks on one GPU (about 4-5 minutes), with ratios against the anchors of bench/README.md
# (the original code measured on an H200, batch 100, paper model):
#   training step: reference (cuDNN deterministic, as shipped) vs the fast path / the fixed rule / -amp bf16, fp16
#   TTA extraction: one-segment loop vs the batched fast path and the default packing (windows/s)
#   data path: original read-normalise-crop vs indexed partial read (crops/s)
# Usage: bash bench/gpu_bench.sh
# GPU_CHECK_DRY_RUN=1: the same steps on whatever device there is, with tiny sizes and no fp16 (a
# rehearsal: its figures mean nothing). BENCH_TSV=FILE: each result is also appended to FILE as a
# tab-separated row (bench/gpu_check.sh prints them in its final table). PYTHON: default python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT=$(mktemp -d)
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
  echo "dry run: tiny sizes, on $("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")"
  VARIANTS="reference fast rule fast+bf16"
  STEP_ARGS=(--config demo --bs 4 --steps 1 --warmup 1)
  EXTRACT_ARGS=(-nb_utt 3 -bs 1 2 -rounds 1)
  DATA_ARGS=(--files 8 --seconds 1 --rounds 1)
else
  VARIANTS="reference fast rule fast+bf16 fast+fp16"
  STEP_ARGS=(--steps 8 --warmup 3)
  # 1,000 utterances (~3,000 segments), 2 rounds, so that no configuration is timed only on its
  # first, cold pass.
  EXTRACT_ARGS=(-nb_utt 1000 -rounds 2)
  DATA_ARGS=()
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "== bench/train_step.py (cuDNN deterministic as the recipe runs)"
# A step that fails or times out is reported and the others still run; the exit status says so.
status=0
for v in $VARIANTS; do
  timeout 100 "$PY" bench/train_step.py --variant "$v" "${STEP_ARGS[@]}" > "$OUT/step.txt" \
    || { status=$?; echo "train_step.py --variant $v failed ($status)"; }
  tail -n 1 "$OUT/step.txt" | grep '^{' | tee -a "$OUT/train.jsonl" || true
done
echo "== bench/extract.py"
timeout 240 "$PY" bench/extract.py "${EXTRACT_ARGS[@]}" | tee "$OUT/extract.txt" \
  || { status=$?; echo "extract.py failed ($status)"; }
echo "== bench/data.py"
timeout 40 "$PY" bench/data.py "${DATA_ARGS[@]}" || { status=$?; echo "data.py failed ($status)"; }
"$PY" - "$OUT" <<'PY'
import json, os, re, sys
out = sys.argv[1]
rows = []
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
    rows.append((f"bench train_step {v}", f"{r['crops_per_s']:.1f}/s",
                 f"{r['crops_per_s'] / SHIPPED:.2f}x as shipped, {r['peak_mem_GiB_per_process']:.1f} GiB, {plan}"))
text = open(f"{out}/extract.txt").read() if os.path.exists(f"{out}/extract.txt") else ""
for label, rate in re.findall(r"^(.*?)\s+([\d.]+) segments/s", text, flags=re.M):
    print(f"extract {label.strip():<36} {float(rate):8.1f} windows/s = {float(rate) / LOOP:5.2f}x the loop "
          f"anchor ({float(rate) / PACKED:4.2f}x 512 per forward)")
    rows.append((f"bench extract {label.strip()}", f"{float(rate):.1f}/s",
                 f"{float(rate) / LOOP:.2f}x the loop anchor"))
if os.environ.get("BENCH_TSV"):
    with open(os.environ["BENCH_TSV"], "a") as f:
        f.writelines("\t".join(r) + "\n" for r in rows)
PY
exit "$status"

#!/usr/bin/env bash
# The first run on a GPU, in one command: the versions (torch, CUDA, cuDNN, driver), soundfile, every
# CUDA test (tests/test_cuda.py) in a pytest of its own under a time limit, then the benchmarks
# (bench/gpu_bench.sh), and one table of every step last. Exit status 1 if a test failed or ran out
# of time, else the benchmarks' status.
#
#   bash bench/gpu_check.sh              # on the GPU machine
#   bash bench/gpu_check.sh --dry-run    # (or GPU_CHECK_DRY_RUN=1) every step a CPU can run, tiny sizes
#
# Environment: PYTHON (default python3); WHEELS, a folder of wheels that installs soundfile when it is
# missing, never from the network (default wheels/, bench/README.md says how to fill it);
# TEST_TIMEOUT, seconds per test (default 180).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-wheels}"
TEST_TIMEOUT="${TEST_TIMEOUT:-180}"
export GPU_CHECK_DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
if [ "${1:-}" = "--dry-run" ]; then GPU_CHECK_DRY_RUN=1; fi
OUT=$(mktemp -d)
export BENCH_TSV="$OUT/rows.tsv"  # the final table: step, result, detail (gpu_bench.sh adds its rows)
row() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$BENCH_TSV"; }
status=0

echo "== versions"
"$PY" - <<'PY'
import subprocess
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout.strip()
    print(f"driver (nvidia-smi): {smi}")
except (OSError, subprocess.CalledProcessError):
    print("driver: no nvidia-smi here")
if torch.cuda.is_available():
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    print(f"torch sees {torch.cuda.device_count()} GPU(s): {names}")
else:
    print("torch sees NO GPU (torch.cuda.is_available() is False)")
PY
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')")
if [ -z "$gpu" ]; then
  row "GPU" "none" "torch sees no GPU"
  if [ "$GPU_CHECK_DRY_RUN" != 1 ]; then
    echo "error: torch sees no GPU, so there is nothing to check here (--dry-run rehearses on a CPU)"
    exit 1
  fi
else
  row "GPU" "$gpu" "$("$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)")"
fi

echo "== soundfile"
if "$PY" -c "import soundfile" 2>/dev/null; then
  row "soundfile" "present" "$("$PY" -c "import soundfile; print(soundfile.__version__)")"
elif [ -d "$WHEELS" ] && "$PY" -m pip install -q --no-index --find-links "$WHEELS" soundfile; then
  row "soundfile" "installed" "from $WHEELS, no network"
else
  echo "error: soundfile is missing and $WHEELS/ does not install it (bench/README.md: how to fill it)"
  exit 1
fi

echo "== tests/test_cuda.py, each test under timeout $TEST_TIMEOUT s"
ids=$("$PY" -m pytest -q -p no:cacheprovider --collect-only tests/test_cuda.py | grep '::')
if [ -z "$ids" ]; then row "tests/test_cuda.py" "failed" "no test collected"; status=1; fi
for id in $ids; do
  # SIGINT at the limit: pytest stops the test and still prints its summary (-rfEs: why, per test)
  timeout -s INT -k 30 "$TEST_TIMEOUT" "$PY" -m pytest -q -rfEs -p no:cacheprovider "$id" > "$OUT/test.log" 2>&1
  rc=$?
  summary=$(grep -E '^(FAILED|ERROR|SKIPPED)' "$OUT/test.log" | head -n 1 | cut -c 1-150)
  case "$rc" in
    0) if grep -q ' skipped' "$OUT/test.log"; then result=skipped; else result=passed; fi ;;
    124|137) result="timeout"; summary="over $TEST_TIMEOUT s"; status=1 ;;
    *) result="failed"; status=1 ;;
  esac
  if [ "$result" = failed ] || [ "$result" = timeout ]; then tail -n 30 "$OUT/test.log"; fi
  echo "$result  $id"
  row "${id#tests/}" "$result" "$summary"
done

echo "== bench/gpu_bench.sh"
bash bench/gpu_bench.sh
rc=$?
row "bench/gpu_bench.sh" "$([ "$rc" = 0 ] && echo done || echo "failed ($rc)")" \
    "$([ "$GPU_CHECK_DRY_RUN" = 1 ] && echo 'dry run: tiny sizes on CPU, no fp16' || echo 'GPU sizes')"
if [ "$status" = 0 ]; then status=$rc; fi

echo
echo "== summary$([ "$GPU_CHECK_DRY_RUN" = 1 ] && echo ' (dry run)')"
awk -F'\t' '{ printf "%-72s %-10s %s\n", $1, $2, $3 }' "$BENCH_TSV"
exit "$status"

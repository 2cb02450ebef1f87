#!/usr/bin/env bash
# Start an NGC PyTorch container with this repository, the data and the experiment folders mounted,
# then (optionally) run a command in it, e.g.:
#   ./launch_ngc.sh                                     # interactive shell in /workspace/RawNet
#   ./launch_ngc.sh python train_RawNet2.py -name paper # the paper's recipe on all visible GPUs
# Edit the paths below for your machine. The container already ships CUDA, cuDNN and PyTorch; the
# remaining Python packages come from requirements.txt (its torch pin is skipped inside the container,
# and so is the container's pip constraint file, which pins numpy and scipy to other versions).
# requirements.txt needs Python >= 3.11 (numpy 2.4, scipy 1.17): NGC PyTorch 25.12 has Python 3.12
# (CUDA 13.1; releases up to 24.12 have Python 3.10). Another IMAGE with an older Python is refused.
set -euo pipefail

IMAGE="${IMAGE:-nvcr.io/nvidia/pytorch:25.12-py3}"
REPO_DIR="${REPO_DIR:-$(cd "$(dirname "$0")" && pwd)}"
DB_DIR="${DB_DIR:-$REPO_DIR/DB}"              # holds VoxCeleb1/ and VoxCeleb2/ (see DB/README.md)
EXP_DIR="${EXP_DIR:-$REPO_DIR/DNNs}"          # experiment outputs (-save_dir)
GPUS="${GPUS:-all}"                           # e.g. '"device=0,1"' for two GPUs, as in the paper

mkdir -p "$EXP_DIR"
if [ "$#" -eq 0 ]; then set -- bash; fi
exec docker run --rm -it --gpus "$GPUS" --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
  -v "$REPO_DIR":/workspace/RawNet -v "$DB_DIR":/workspace/RawNet/DB -v "$EXP_DIR":/workspace/RawNet/DNNs \
  -w /workspace/RawNet "$IMAGE" \
  bash -c 'python -c "import sys; sys.exit(sys.version_info < (3, 11) and \"error: this image has Python \" + sys.version.split()[0] + \", requirements.txt needs >= 3.11: choose another IMAGE\")" &&
           grep -v "^torch" requirements.txt > /tmp/req.txt && PIP_CONSTRAINT= pip install -q -r /tmp/req.txt &&
           exec "$@"' _ "$@"

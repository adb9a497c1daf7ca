#!/usr/bin/env bash
# The GPU proof in one command: synthetic full-size data, the cache, step speed / MFU per precision, syncs per
# step, data wait per loader, full-resolution evaluation, a short run whose mIoU rises -> one JSON + a table.
#   bash bench/gpu_proof.sh                      # one CUDA GPU, 16 cores, no network: under 8 minutes
#   bash bench/gpu_proof.sh --quick              # tiny sizes on the CPU (what the test suite runs)
#   bash bench/gpu_proof.sh --work DIR --json F  # scratch folder and report path
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" -m cityseg.gpu_proof "$@"

#!/usr/bin/env bash
# The GPU proof in one command: synthetic data and its cache, then measure and diagnose -> one JSON + a table.
#   bash bench/gpu_proof.sh                      # one CUDA GPU, 16 cores, no network: 8 minutes at most
#   bash bench/gpu_proof.sh --quick              # tiny sizes on the CPU (what the test suite runs)
#   bash bench/gpu_proof.sh --work DIR --json F  # scratch folder and report path
#   bash bench/gpu_proof.sh --precisions         # also fp32, bf16 without channels_last, fp16 (~35 s each)
# Sections in order, seconds on one H100 (from the 2026-11-27 run where measured; ~ estimated, not yet run):
#   data: 160 + 32 full-size PNGs ~25 | cache 14 | epoch trees (64 + 16 pairs at 256x512, linked to 2,975 + 500
#   and to 352 + 63) and their caches ~15 | step bf16 + channels_last, syncs per step 51 | diagnosis ~60: torch
#   profiler over 5 steady steps, step time at batch 16/32/64/128 x 3 repeats, the configured loss against smp's
#   Dice | syncs over a whole 10-step logging window of the engine's loop body 33 | train.py over 2,975 samples x
#   2 epochs, log_every=10 ~40, and at 11 steps per epoch ~25 | loaders: 3 short train.py runs 85 | full-size
#   evaluation 17 | = ~365 s; then the compile variants (model + loss; max-autotune-no-cudagraphs; CUDA graphs),
#   each limited to what is left of 480 s, and reported as not reached when the budget is spent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" -m cityseg.bench.gpu_proof "$@"

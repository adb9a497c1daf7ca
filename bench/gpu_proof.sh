#!/usr/bin/env bash
# The GPU proof in one command, on one lent GPU, under one deadline -> one JSON (outside --work) + a table.
#   bash bench/gpu_proof.sh --json ~/gpu_proof.json         # one CUDA GPU, no network: 8 minutes at most
#   bash bench/gpu_proof.sh --deadline 600 --json F          # another overall limit (seconds)
#   bash bench/gpu_proof.sh --quick --json F                 # tiny sizes on the CPU (what the tests run)
#   bash bench/gpu_proof.sh --only steps,compile --json F    # some sections (names or groups) only
#   bash bench/gpu_proof.sh --precisions                     # also fp32, bf16 without channels_last, fp16
# Without a working CUDA the full proof stops before anything else, in one line (exit 2). Sections, in order, each a
# child process with its own log in <work>/logs, capped by its own limit and by what is left of the deadline; the
# JSON is replaced whole after each; a crashed or timed-out section is recorded and the next one runs:
#   cuda (a kernel, the GPU, cuDNN) | steps.bf16_channels_last (eager step: img/s, MFU, syncs, memory) | profile
#   (torch.profiler top kernels, host vs device time) | compile.default | compile.reduce_overhead (CUDA graphs: were
#   they captured?) | compile.max_autotune_no_cudagraphs | sweep.batch (16..128) | sweep.pad_classes_24 / _32 /
#   _32_compile | [--precisions] | loss | data, cache, epoch_data, epoch_cache.* | loop_syncs | runs.epoch,
#   runs.gpu_share | loaders.* (three train.py runs) | full_resolution_eval
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" -m cityseg.bench.gpu_proof "$@"

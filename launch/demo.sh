#!/usr/bin/env bash
# The demo on a fresh machine: set up .venv, write a small synthetic Cityscapes-layout dataset, train on CPU,
# print the validation mIoU. About 2 minutes on 2 cores (plus ~2 minutes for .venv the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/venv.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ ! -d data/synth/leftImg8bit ]; then
  .venv/bin/cityseg synth --out data/synth --train 64 --val 8 --height 64 --width 128 --seed 0
fi
rm -rf runs/demo   # the demo always starts fresh; real runs resume from their checkpoints instead
.venv/bin/python train.py --config configs/demo.yaml "$@"
.venv/bin/cityseg evaluate --config configs/demo.yaml --checkpoint runs/demo/model.safetensors --json runs/demo/eval.json
.venv/bin/python - <<'PY'
import json
print(f"demo done: validation mIoU {json.load(open('runs/demo/eval.json'))['mIoU']:.3f} (runs/demo)")
PY

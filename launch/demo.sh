#!/usr/bin/env bash
# The demo on a fresh machine: set up .venv, write a small synthetic Cityscapes-layout dataset, train on CPU,
# print the validation mIoU. It trains in its own run directory, runs/demo-sh, never in the quick start's runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/venv.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ ! -d data/synth/leftImg8bit ]; then
  .venv/bin/cityseg synth --out data/synth --train 64 --val 8 --height 64 --width 128 --seed 0
fi
out=runs/demo-sh
if [ -e "$out" ]; then  # the demo always starts fresh; real runs resume from their checkpoints instead
  echo "launch/demo.sh: replacing the previous demo run in $out"
  rm -rf "$out"
fi
.venv/bin/python train.py --config configs/demo.yaml output_dir="$out" "$@"
.venv/bin/cityseg evaluate --config configs/demo.yaml --checkpoint "$out/model.safetensors" --json "$out/eval.json" \
  output_dir="$out"
.venv/bin/python - "$out" <<'PY'
import json, sys
print(f"demo done: validation mIoU {json.load(open(f'{sys.argv[1]}/eval.json'))['mIoU']:.3f} ({sys.argv[1]})")
PY

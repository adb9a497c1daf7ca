#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up .venv if needed, then pytest. Extra args go to pytest; when one
# of them names a test file or folder (tests/config/test_config.py, tests/evaluation::...), only those run, else all of tests/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/venv.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for arg in "$@"; do
  if [ -e "${arg%%::*}" ]; then
    exec .venv/bin/python -m pytest "$@"
  fi
done
exec .venv/bin/python -m pytest tests "$@"

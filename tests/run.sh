#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up .venv if needed, then pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/venv.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec .venv/bin/python -m pytest tests "$@"

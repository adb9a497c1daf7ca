#!/usr/bin/env bash
# Create or refresh .venv with plain pip (uv/poetry would download ~3 GB of CUDA wheels on this kind of machine).
# Idempotent: a stamp records the hash of pyproject.toml + constraints.txt; nothing is done when it matches.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.cityseg-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
echo "setting up .venv (pip, about 2 minutes the first time)..."
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
log=.venv/pip-install.log
if ! .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]" >"$log" 2>&1; then
  grep -v "is ignored: it is neither" "$log" | tail -30 >&2
  echo "pip install failed; full log: $log" >&2
  exit 1
fi
echo "$want" > "$stamp"

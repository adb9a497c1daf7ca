#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv if needed, then pytest. Extra args go to pytest.
#   bash tests/run.sh            everything (what CI runs), in three pytest processes side by side: tests/cluster
#                                (mostly waiting on SLURM's timers), the multi-process folders (tests/checkpoint,
#                                tests/distributed, tests/faults) and the rest; each prints its own summary, and the
#                                run fails if any of them does (docs/development.md#tests: the times per folder)
#   bash tests/run.sh --quick    the quick tier: the unit tests of every folder (-m "not slow"), one process
#   bash tests/run.sh PATH...    only the tests named (tests/config/test_config.py, tests/evaluation::...), one process
# A -m or -k expression also runs in one process (a stream it selects nothing from would report "no tests ran").
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/venv.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
pytest=(.venv/bin/python -m pytest)
one_process=0
if [ "${1:-}" = --quick ]; then
  shift
  pytest+=(-m "not slow")
  one_process=1
fi
for arg in "$@"; do
  if [ -e "${arg%%::*}" ]; then
    exec "${pytest[@]}" "$@"
  fi
  case $arg in -m|-m*|-k|-k*) one_process=1 ;; esac
done
if (( one_process )); then
  exec "${pytest[@]}" tests "$@"
fi

# Side by side: each stream is a pytest process of its own, and every stream but the last writes to a log printed
# at the end. SIGINT at the time limit: pytest then tears its fixtures down (the cluster's namespaces and daemons).
# tests/bench rides with tests/cluster, whose tests mostly wait: the three streams then take about as long each
streams=("tests/cluster tests/bench" "tests/checkpoint tests/distributed tests/faults")
# one thread per pytest process: three processes (and their children, one thread each) share 2 cores, and idle
# OpenMP threads spinning beside them cost more CPU than the second thread gives back
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
limit=2400
logs=() pids=() ignored=()
for stream in "${streams[@]}"; do
  log=$(mktemp -t cityseg-tests.XXXXXX)
  # shellcheck disable=SC2086  # a stream is a list of folders
  timeout -s INT -k 60 "$limit" "${pytest[@]}" $stream "$@" >"$log" 2>&1 &
  pids+=($!) logs+=("$log")
  for folder in $stream; do ignored+=("--ignore=$folder"); done
  echo "tests/run.sh: $stream runs beside the rest (output at the end; meanwhile in $log)"
done
trap 'kill -INT "${pids[@]}" 2>/dev/null || true' EXIT
statuses=()
status=0
timeout -s INT -k 60 "$limit" "${pytest[@]}" tests "${ignored[@]}" "$@" || status=$?
statuses+=("the rest: exit $status")
failed=$status
for i in "${!streams[@]}"; do
  status=0
  wait "${pids[$i]}" || status=$?
  echo
  echo "=================== ${streams[$i]} (ran beside the rest): exit $status ==================="
  cat "${logs[$i]}"
  rm -f "${logs[$i]}"
  statuses+=("${streams[$i]}: exit $status")
  (( failed )) || failed=$status
done
trap - EXIT
echo "tests/run.sh: ${statuses[*]}"
exit "$failed"

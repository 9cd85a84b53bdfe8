#!/usr/bin/env bash
# The benchmarks' code paths at tiny sizes (FASTCSE_BENCH_QUICK=1: timings here mean nothing;
# `pytest bench/` measures), in two halves at once on the 2 cores: the trainer cases (a fresh
# process each, mostly single-threaded imports) beside the rest with one torch thread. Not
# pytest-xdist: it disables pytest-benchmark, whose statistics some cases read.
set -uo pipefail
cd "$(dirname "$0")/.."
export FASTCSE_BENCH_QUICK=1
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
.venv/bin/python -m pytest bench/test_bench_trainer.py -q > "$LOG" 2>&1 &
trainer=$!
rc=0
OMP_NUM_THREADS=1 .venv/bin/python -m pytest bench/ -q --ignore=bench/test_bench_trainer.py || rc=1
wait "$trainer" || rc=1
echo "--- bench/test_bench_trainer.py:"
tail -n 40 "$LOG"
exit $rc

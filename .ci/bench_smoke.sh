#!/usr/bin/env bash
# The benchmarks' code paths at tiny sizes (FASTCSE_BENCH_QUICK=1: timings here mean nothing;
# `pytest bench/` measures), in two halves at once on the 2 cores. The trainer cases start a fresh
# process each (mostly single-threaded imports, 10-45 s): its batch-8 groups run beside the rest,
# which takes the trainer's gradient-caching group (the two -k expressions are complements, so
# every case runs once). Not pytest-xdist: it disables pytest-benchmark, whose statistics some
# cases read.
set -uo pipefail
cd "$(dirname "$0")/.."
export FASTCSE_BENCH_QUICK=1 OMP_NUM_THREADS=1
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
.venv/bin/python -m pytest bench/test_bench_trainer.py -q -k "not caching" > "$LOG" 2>&1 &
trainer=$!
rc=0
.venv/bin/python -m pytest bench/ -q -k "not test_trainer_step or caching" || rc=1
wait "$trainer" || rc=1
echo "--- bench/test_bench_trainer.py -k 'not caching':"
tail -n 40 "$LOG"
exit $rc

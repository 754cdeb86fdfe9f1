#!/usr/bin/env bash
# tests/bench/run.sh: billing-worker's benchmark, one command (docs/performance.md).
#
#   bash tests/bench/run.sh                       # ~3-5 minutes on 2 cores
#   BW_BENCH_REQUESTS=20000 bash tests/bench/run.sh
#   BW_BENCH_PROFILE=gdb BW_BENCH_PHASES=one bash tests/bench/run.sh   # profile
#
# Builds the worker (RelWithDebInfo, in build-bench/) and the wallet load tool,
# then runs tests/bench/bench.py: a local stack (deploy/stack.sh via
# tests/e2e/bwtest.py), a generated input topic, and the measurements. Prints
# one table; writes tests/bench/results.json (BW_BENCH_RESULTS). Settings: the
# BW_BENCH_* variables documented at the top of bench.py.
#
# BW_BENCH_BIN=path uses that worker binary instead of building one.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD=${BW_BENCH_BUILD_DIR:-$ROOT/build-bench}

for tool in kcat cmake cc python3 java redis-server; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool not found (bash deploy/setup.sh)" >&2; exit 2; }
done

if [[ -z ${BW_BENCH_BIN:-} ]]; then
  cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$BUILD.cmake.log" 2>&1 ||
    { cat "$BUILD.cmake.log" >&2; exit 1; }
  make -C "$BUILD" -j2 billing-worker >"$BUILD.make.log" 2>&1 ||
    { tail -40 "$BUILD.make.log" >&2; exit 1; }
  export BW_BENCH_BIN=$BUILD/billing-worker
fi
mkdir -p "$BUILD"
cc -O2 -Wall -pthread "$ROOT/tests/bench/wallet_load.c" -lcurl -o "$BUILD/wallet_load"
export BW_BENCH_LOAD_BIN=${BW_BENCH_LOAD_BIN:-$BUILD/wallet_load}
export BW_BENCH_PROFILE_DIR=${BW_BENCH_PROFILE_DIR:-$BUILD/profile}

exec python3 "$ROOT/tests/bench/bench.py" "$@"

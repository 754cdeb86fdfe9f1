#!/usr/bin/env bash
# tests/run.sh: the whole test suite, as CI runs it.
#   1. deploy/setup.sh --deps-only: packages and Kafka jars (fast when present)
#   2. build in build/ and run every ctest test: unit (cmocka) and e2e (each e2e
#      script starts its own Kafka/Redis/reference-services stack on free ports)
#   3. deploy checks (tests/ops) and a bounded libFuzzer run of the event parser
#   4. an ASan+UBSan build in build-asan/ running the unit and integration tests
# Usage: bash tests/run.sh [--no-asan]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ASAN=1
for arg in "$@"; do
  case $arg in
    --no-asan) ASAN=0 ;;
    *) echo "usage: bash tests/run.sh [--no-asan]" >&2; exit 2 ;;
  esac
done

bash deploy/setup.sh --deps-only

echo "==== build (build/)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build build -j2

echo "==== unit + e2e tests"
ctest --test-dir build --output-on-failure -j2

echo "==== deploy checks (manifests, unit, dashboard, alerts)"
bash tests/ops/check_deploy.sh build/billing-worker

echo "==== fuzz the event parser (${BW_FUZZ_SECONDS:=60} s)"
BW_FUZZ_SECONDS=$BW_FUZZ_SECONDS bash tests/fuzz/run.sh

if ((ASAN)); then
  echo "==== ASan+UBSan build (build-asan/), unit tests"
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DBW_SANITIZE=ON
  cmake --build build-asan -j2
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build-asan -L 'unit|integration' --output-on-failure -j2
fi

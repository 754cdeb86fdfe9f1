#!/usr/bin/env bash
# tests/e2e/soak.sh: the fault-injection test (0030-fault-injection.py), long.
#
# Same traffic shapes, schedule and checks as the CI run, scaled up: by default
# 5000 requests of 200 users under 15 minutes of faults (worker SIGKILLs,
# wallet and user-service bursts, one Redis SIGKILL, one Kafka restart).
# Runs on demand, never in CI. Exit code: the test's (0 = every check passed).
#
#   bash tests/e2e/soak.sh [--bin build/billing-worker] [--keep] [--seeds "1 2 3"]
#
# Knobs (environment, defaults in brackets):
#   BW_FAULT_REQUESTS [5000]   BW_FAULT_USERS [200]   BW_FAULT_SECONDS [900]
#   BW_FAULT_KILL_EVERY [6]    BW_FAULT_PARTITIONS [6]  BW_FAULT_SEED [30030]
# --seeds runs the test once per seed, in turn, and stops at the first failure.
# Logs: one file per run in ${BW_SOAK_LOGS:-var/soak}/ (the failing run's stack
# directory, with every worker's log and the Redis/Kafka/refsvc logs, is kept
# and named at the end of its log).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

BIN=build/billing-worker
KEEP=()
SEEDS=${BW_FAULT_SEED:-30030}
while (($#)); do
  case $1 in
    --bin) BIN=$2; shift 2 ;;
    --bin=*) BIN=${1#--bin=}; shift ;;
    --keep) KEEP=(--keep); shift ;;
    --seeds) SEEDS=$2; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "usage: bash tests/e2e/soak.sh [--bin PATH] [--keep] [--seeds \"1 2\"]" >&2; exit 2 ;;
  esac
done
[[ -x $BIN ]] || { echo "soak: $BIN is not built (cmake -S . -B build && make -C build)" >&2; exit 2; }

export BW_FAULT_REQUESTS=${BW_FAULT_REQUESTS:-5000}
export BW_FAULT_USERS=${BW_FAULT_USERS:-200}
export BW_FAULT_SECONDS=${BW_FAULT_SECONDS:-900}
export BW_FAULT_KILL_EVERY=${BW_FAULT_KILL_EVERY:-6}
export BW_FAULT_PARTITIONS=${BW_FAULT_PARTITIONS:-6}
LOGS=${BW_SOAK_LOGS:-var/soak}
mkdir -p "$LOGS"

for seed in $SEEDS; do
  log=$LOGS/soak-seed$seed-$(date +%Y%m%dT%H%M%S).log
  echo "soak: seed $seed, $BW_FAULT_REQUESTS requests, $BW_FAULT_USERS users," \
    "${BW_FAULT_SECONDS}s of faults -> $log"
  set +e
  BW_FAULT_SEED=$seed python3 tests/e2e/0030-fault-injection.py --bin "$BIN" "${KEEP[@]}" \
    2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  if ((rc != 0)); then
    echo "soak: seed $seed FAILED (exit $rc), log $log" >&2
    exit "$rc"
  fi
done
echo "soak: all seeds passed ($SEEDS)"

#!/usr/bin/env bash
# deploy/quickstart.sh: from a fresh checkout to settled charges in one command.
#
#   bash deploy/quickstart.sh [--requests N] [--users M] [--timeout SECONDS]
#
# 1. deploy/setup.sh: Debian packages, Kafka jars, build (fast when done before)
# 2. deploy/stack.sh start --dir var/quickstart: Kafka on 127.0.0.1:9092, Redis
#    on 16379 (not 6379: the machine's own Redis may be there), the reference
#    wallet on 8208, user service on 8202, their control API on 8209
#    (BW_KAFKA_PORT, BW_REDIS_PORT, ... move them)
# 3. deploy/quickstart.py: reset the reference services, write
#    var/quickstart/billing-worker.cfg, run build/billing-worker, publish ~200
#    requests of agent traffic from ~25 users, wait until each has a settlement
#    record, stop the worker with SIGTERM and print a summary.
# The stack keeps running afterwards: bash deploy/stack.sh stop --dir var/quickstart
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

bash deploy/setup.sh
bash deploy/stack.sh start --dir var/quickstart
rc=0
python3 deploy/quickstart.py --dir var/quickstart "$@" || rc=$?
echo
echo "The stack is still running (status: bash deploy/stack.sh status --dir var/quickstart)."
echo "Stop it with: bash deploy/stack.sh stop --dir var/quickstart"
exit $rc

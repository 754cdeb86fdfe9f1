#!/usr/bin/env bash
# tests/ops/check_deploy.sh: check deploy/ as far as this machine can, without a
# Docker engine, a Kubernetes cluster or systemd as PID 1.
#
#   bash tests/ops/check_deploy.sh [BILLING_WORKER_BINARY]     [build/billing-worker]
#
# Checks (one line each: "ok", "FAIL" or "skip" with the reason):
#   - every YAML file under deploy/ (and tests/ops/) parses (PyYAML);
#   - Kubernetes manifests: objects complete, the Deployment's probes,
#     terminationGracePeriodSeconds above the ConfigMap's shutdown_timeout,
#     non-root read-only pods, every referenced ConfigMap/Secret key exists,
#     the files the config names are mounted, Service/PDB selectors, the KEDA
#     trigger's group/topic/brokers equal the config's;
#   - compose.yaml: KRaft apache/kafka:3.9.1, Redis with AOF + appendfsync
#     always, three workers built from the Dockerfile, refsvc, mounts exist;
#   - the Dockerfile: FROM lines are debian:12 images, runtime libraries,
#     non-root USER, EXPOSE 9464, HEALTHCHECK on /healthz, the ENTRYPOINT;
#   - the systemd unit's settings and `systemd-analyze verify` (skipped, and
#     said so, where verify cannot run);
#   - `billing-worker check-config` on every deploy/**/*.cfg and on the
#     ConfigMap's embedded config;
#   - the Grafana dashboard parses, and every metric its queries and the alert
#     rules name is one the metrics renderer (src/metrics.c) exposes; the
#     renderer's output is taken by compiling a small program against
#     src/metrics.c (grep of src/metrics.c when that cannot build), plus the
#     histogram suffixes and billing_worker_consumer_lag;
#   - promtool: the alert rules and the dashboard's queries parse, and the
#     alert unit tests (tests/ops/alerts-test.yaml) pass.
#
# Missing tools are installed with apt-get when running as root (python3-yaml,
# systemd, prometheus for promtool); BW_OPS_NO_INSTALL=1 turns that off and the
# checks that need them are skipped. Exit status 0 when nothing failed. The
# last line is "N passed, M failed, K skipped".
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${1:-$ROOT/build/billing-worker}
[[ $BIN == /* ]] || BIN=$PWD/$BIN
TMP=$(mktemp -d "${TMPDIR:-/tmp}/bw-check-deploy.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

log() { echo "check_deploy: $*" >&2; }

# ---- tools -------------------------------------------------------------------
APT_UPDATED=0
apt_install() {
  [[ ${BW_OPS_NO_INSTALL:-0} == 1 ]] && return 1
  [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null || return 1
  export DEBIAN_FRONTEND=noninteractive
  log "installing $*"
  if ! apt-get install -y --no-install-recommends "$@" >"$TMP/apt.log" 2>&1; then
    if ((APT_UPDATED == 0)); then
      APT_UPDATED=1
      apt-get update >/dev/null 2>&1
      apt-get install -y --no-install-recommends "$@" >"$TMP/apt.log" 2>&1 || return 1
    else
      return 1
    fi
  fi
}

# Python with PyYAML: python3 on PATH, else Debian's own python3 with python3-yaml.
PY=
for cand in python3 /usr/bin/python3; do
  if command -v "$cand" >/dev/null && "$cand" -c 'import yaml' 2>/dev/null; then PY=$cand; break; fi
done
if [[ -z $PY ]]; then
  apt_install python3-yaml && /usr/bin/python3 -c 'import yaml' 2>/dev/null && PY=/usr/bin/python3
fi
if [[ -z $PY ]]; then
  PY=$(command -v python3 || true)
  [[ -n $PY ]] || { log "python3 is required"; echo "0 passed, 1 failed"; exit 1; }
  log "PyYAML unavailable: YAML files get a minimal check only"
fi
command -v systemd-analyze >/dev/null || apt_install systemd || true
command -v promtool >/dev/null || apt_install prometheus || true

# ---- the metric names the renderer exposes -----------------------------------
METRICS=$TMP/metrics.txt
cat >"$TMP/render.c" <<'EOF'
#include <stdio.h>
#include <stdlib.h>
#include "bw_metrics.h"
int main(void)
{
    char *s = bw_metrics_render();
    if (!s)
        return 1;
    fputs(s, stdout);
    free(s);
    return 0;
}
EOF
CC=${CC:-cc}
# shellcheck disable=SC2046
if "$CC" -std=gnu11 -DBW_VERSION='"check"' -I "$ROOT/include" "$TMP/render.c" \
     "$ROOT/src/metrics.c" "$ROOT/src/event.c" "$ROOT/src/util.c" "$ROOT/src/log.c" \
     $(pkg-config --cflags --libs jansson libcrypto 2>/dev/null) -lpthread -o "$TMP/render" \
     2>"$TMP/render.log" && "$TMP/render" >"$TMP/render.out"; then
  # names from "# TYPE name kind" and from the samples; histograms get their series
  awk '$1 == "#" && $2 == "TYPE" { print $3; if ($4 == "histogram") { print $3 "_bucket"; print $3 "_sum"; print $3 "_count" } }
       $1 !~ /^#/ && NF { n = $1; sub(/\{.*/, "", n); print n }' "$TMP/render.out" >"$METRICS"
  log "metric names from the renderer's output ($(sort -u "$METRICS" | wc -l) names)"
else
  log "cannot build the metrics renderer ($(head -c 300 "$TMP/render.log")); using grep on src/metrics.c"
  { grep -o 'billing_worker_[a-z0-9_]*' "$ROOT/src/metrics.c"
    grep -o 'counter(&b, "[a-z0-9_]*"' "$ROOT/src/metrics.c" | sed 's/.*"\(.*\)"/billing_worker_\1/'
  } | sed 's/_$//' >"$METRICS"
  grep -q 'histogram' "$ROOT/src/metrics.c" &&
    for h in $(grep -o 'billing_worker_[a-z0-9_]* histogram' "$ROOT/src/metrics.c" | awk '{print $1}'); do
      printf '%s_bucket\n%s_sum\n%s_count\n' "$h" "$h" "$h" >>"$METRICS"
    done
fi
# Exposed per partition from librdkafka statistics (issue 7); always allowed.
echo billing_worker_consumer_lag >>"$METRICS"
sort -u -o "$METRICS" "$METRICS"

# ---- the checks ----------------------------------------------------------------
"$PY" "$ROOT/tests/ops/check_deploy.py" --root "$ROOT" --bin "$BIN" --metrics "$METRICS" \
  --tmp "$TMP" | tee "$TMP/results.txt"

# The Docker image and compose file are only checked statically here.
if docker info >/dev/null 2>&1; then
  echo "skip - docker build: an engine is reachable, but building is left to: docker build -f deploy/docker/Dockerfile ." |
    tee -a "$TMP/results.txt"
else
  echo "skip - docker build / docker compose config: no Docker engine or compose plugin on this machine" |
    tee -a "$TMP/results.txt"
fi

passed=$(grep -c '^ok ' "$TMP/results.txt")
failed=$(grep -c '^FAIL ' "$TMP/results.txt")
skipped=$(grep -c '^skip ' "$TMP/results.txt")
if ((passed + failed == 0)); then failed=1; fi
echo "$passed passed, $failed failed, $skipped skipped"
((failed == 0))

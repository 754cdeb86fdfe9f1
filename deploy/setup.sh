#!/usr/bin/env bash
# deploy/setup.sh: install everything billing-worker needs to build, test and
# run its local stack, then build it. Idempotent and fast when nothing is
# missing (no apt-get at all then, no Maven).
#
#   bash deploy/setup.sh [--deps-only]
#
#   --deps-only   install packages and the Kafka jars, do not build
#
# Environment:
#   BW_CACHE        cache root [$HOME/.cache/billing-worker]; the Kafka broker
#                   jars go to $BW_CACHE/kafka-3.9.1/libs
#   BW_KAFKA_LIBS   use this directory for the Kafka jars instead
#   BW_BUILD_DIR    build directory [build]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KAFKA_VERSION=3.9.1
BW_CACHE=${BW_CACHE:-${HOME:-/root}/.cache/billing-worker}
KAFKA_LIBS=${BW_KAFKA_LIBS:-$BW_CACHE/kafka-$KAFKA_VERSION/libs}
BUILD_DIR=${BW_BUILD_DIR:-build}
DO_BUILD=1

for arg in "$@"; do
  case $arg in
    --deps-only) DO_BUILD=0 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { echo "setup: $*" >&2; }

# --- 1. Debian packages ------------------------------------------------------
PACKAGES=(
  build-essential cmake pkg-config
  librdkafka-dev libjansson-dev libcurl4-openssl-dev libhiredis-dev libconfig-dev
  libssl-dev libmicrohttpd-dev libcmocka-dev
  kcat redis-server clang-format python3
  openjdk-17-jre-headless maven curl
  clang libclang-rt-14-dev prometheus python3-yaml systemd
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  [[ $status == "install ok installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]})); then
  SUDO=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { log "need root (or sudo) to install: ${missing[*]}"; exit 1; }
    SUDO=(sudo)
  fi
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update
  "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
  # The Debian redis-server package starts a system Redis on 6379. The local
  # stack never uses it (deploy/stack.sh runs its own Redis on 16379 by default).
else
  log "all ${#PACKAGES[@]} packages already installed"
fi

# --- 2. Kafka broker jars from Maven Central ---------------------------------
# A marker file is written only after a complete copy, so an interrupted
# download is redone instead of leaving a half-filled libs directory.
if [[ -f $KAFKA_LIBS/.complete ]]; then
  log "Kafka $KAFKA_VERSION jars present in $KAFKA_LIBS"
else
  log "fetching Kafka $KAFKA_VERSION jars into $KAFKA_LIBS"
  tmp="$KAFKA_LIBS.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  # Maven's output is kept for failures only (even -q prints colour resets).
  if ! mvn -q -B -Dstyle.color=never -f "$ROOT/deploy/kafka/pom.xml" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" \
    >"$tmp.log" 2>&1; then
    cat "$tmp.log" >&2
    log "mvn failed: is Maven Central reachable?"
    exit 1
  fi
  rm -f "$tmp.log"
  ls "$tmp"/kafka_2.13-"$KAFKA_VERSION".jar "$tmp"/kafka-tools-"$KAFKA_VERSION".jar >/dev/null
  touch "$tmp/.complete"
  rm -rf "$KAFKA_LIBS"
  mkdir -p "$(dirname "$KAFKA_LIBS")"
  mv "$tmp" "$KAFKA_LIBS"
  log "$(find "$KAFKA_LIBS" -name "*.jar" | wc -l) jars installed"
fi

# --- 3. Build -------------------------------------------------------------------
if ((DO_BUILD)); then
  cd "$ROOT"
  log "building in $BUILD_DIR"
  cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build "$BUILD_DIR" -j2
fi
log "done"

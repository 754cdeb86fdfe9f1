#!/usr/bin/env bash
# tests/fuzz/run.sh: build the libFuzzer target for the event parser and run it
# for a bounded time over a copy of the seed corpus.
#
#   bash tests/fuzz/run.sh
#
# Environment:
#   BW_FUZZ_SECONDS  how long to fuzz [60]
#   BW_FUZZ_JOBS     parallel fuzzing processes (-fork=N) [1]
#   BW_FUZZ_OUT      keep the build, the corpus and any crash-* input here
#                    [a temporary directory, removed on success]
#   CC               the compiler [clang]; installed with apt-get when missing
#
# Nothing is written into the repository: the corpus is a temporary copy of
# tests/fuzz/seed, new inputs the fuzzer finds stay in that copy. Exit status
# 0 when the run finished without a crash, 1 on a crash, leak, sanitizer
# report or violated invariant (the reproducer input is kept and printed),
# 2 when the target cannot be built. The last line is "N passed, M failed".
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SECONDS_BUDGET=${BW_FUZZ_SECONDS:-60}
JOBS=${BW_FUZZ_JOBS:-1}
CC=${CC:-clang}
[[ $SECONDS_BUDGET =~ ^[0-9]+$ && $SECONDS_BUDGET -ge 1 ]] || {
  echo "fuzz: BW_FUZZ_SECONDS must be a positive integer" >&2; exit 2; }

log() { echo "fuzz: $*" >&2; }
result() { echo "$1 passed, $2 failed"; }

# --- 1. clang with libFuzzer --------------------------------------------------
if ! command -v "$CC" >/dev/null 2>&1; then
  if [[ $CC != clang ]]; then log "$CC not found"; result 0 1; exit 2; fi
  log "installing clang"
  SUDO=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { log "need root (or sudo) to install clang"; result 0 1; exit 2; }
    SUDO=(sudo)
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! "${SUDO[@]}" apt-get install -y clang >/dev/null 2>&1; then
    "${SUDO[@]}" apt-get update >/dev/null 2>&1
    "${SUDO[@]}" apt-get install -y clang >/dev/null || { log "cannot install clang"; result 0 1; exit 2; }
  fi
fi

if [[ -n ${BW_FUZZ_OUT:-} ]]; then
  WORK=$BW_FUZZ_OUT
  mkdir -p "$WORK"
  KEEP=1
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/bw-fuzz.XXXXXX")
  KEEP=0
fi
WORK=$(cd "$WORK" && pwd)
cleanup() { ((KEEP)) || rm -rf "$WORK"; }
trap cleanup EXIT

# --- 2. build -----------------------------------------------------------------
BIN=$WORK/fuzz_event
# shellcheck disable=SC2046
if ! "$CC" -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined \
      -fno-sanitize-recover=undefined -DBW_VERSION='"fuzz"' -I "$ROOT/include" \
      "$ROOT/tests/fuzz/fuzz_event.c" "$ROOT/src/event.c" "$ROOT/src/util.c" "$ROOT/src/log.c" \
      $(pkg-config --cflags --libs jansson libcrypto) -o "$BIN" 2>"$WORK/build.log"; then
  cat "$WORK/build.log" >&2
  log "build failed"
  result 0 1
  exit 2
fi

# --- 3. fuzz ------------------------------------------------------------------
CORPUS=$WORK/corpus
ARTIFACTS=$WORK/artifacts
mkdir -p "$CORPUS" "$ARTIFACTS"
cp "$ROOT"/tests/fuzz/seed/* "$CORPUS"/
log "$(ls "$CORPUS" | wc -l) seed inputs, ${SECONDS_BUDGET}s, $JOBS job(s), work dir $WORK"

ARGS=(-max_total_time="$SECONDS_BUDGET" -max_len=70000 -timeout=10 -rss_limit_mb=2048
      -dict="$ROOT/tests/fuzz/event.dict" -artifact_prefix="$ARTIFACTS/" -print_final_stats=1)
if ((JOBS > 1)); then ARGS+=(-fork="$JOBS" -ignore_crashes=0); fi

# UBSan: any report is fatal (-fno-sanitize-recover); ASan: leaks count too.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

( cd "$WORK" && "$BIN" "${ARGS[@]}" "$CORPUS" ) >"$WORK/fuzz.log" 2>&1
rc=$?

# The numbers operators (and CI logs) care about.
grep -E '^#[0-9]+ +(INITED|DONE)' "$WORK/fuzz.log" | tail -2 >&2
grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' \
  "$WORK/fuzz.log" >&2
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$WORK/fuzz.log" | tail -1)
eps=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$WORK/fuzz.log" | tail -1)
if [[ -z $eps ]]; then  # -fork mode prints no stat:: lines: take the last status line
  last=$(grep -E '^#[0-9]+ ' "$WORK/fuzz.log" | tail -1)
  execs=$(sed -E 's/^#([0-9]+).*/\1/' <<<"$last")
  eps=$(sed -nE 's/.*exec\/s: ([0-9]+).*/\1/p' <<<"$last")
fi
crashes=$(find "$ARTIFACTS" -type f | wc -l)

if ((rc == 0 && crashes == 0)); then
  log "ok: ${execs:-?} executions, ${eps:-?} exec/s, corpus $(ls "$CORPUS" | wc -l) inputs"
  result 1 0
  exit 0
fi

KEEP=1
tail -60 "$WORK/fuzz.log" >&2
log "FAILED (fuzzer exit $rc); log: $WORK/fuzz.log"
for f in "$ARTIFACTS"/*; do
  [[ -f $f ]] || continue
  log "reproducer: $f ($(wc -c <"$f") bytes)"
  log "  replay with: $BIN $f"
  head -c 300 "$f" | od -c | head -8 >&2
done
result 0 1
exit 1

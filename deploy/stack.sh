#!/usr/bin/env bash
# deploy/stack.sh: the local stack billing-worker runs against, every process
# bound to 127.0.0.1 and every file under one directory:
#
#   kafka   single-node KRaft Kafka 3.9.1 (broker+controller) from the jars that
#           deploy/setup.sh cached; topics created on start
#   redis   redis-server with AOF and appendfsync always (the durability the
#           product documents: see G3), no RDB snapshots
#   refsvc  the reference wallet + user services (deploy/refsvc.py), with a
#           control API for ledgers, call logs and failure injection
#
# Usage:
#   bash deploy/stack.sh start  [--dir DIR]   start what is not running, wait, create topics
#   bash deploy/stack.sh stop   [--dir DIR]   stop everything (TERM, then KILL after a timeout)
#   bash deploy/stack.sh status [--dir DIR]   exit 0 when all three run, 3 otherwise
#   bash deploy/stack.sh kill NAME [SIGNAL] [--dir DIR]
#                                             signal one component (kafka|redis|refsvc,
#                                             default TERM) and wait until it exited;
#                                             `start` brings it back (crash tests)
#   bash deploy/stack.sh signal NAME SIGNAL [--dir DIR]
#                                             send a signal and return (STOP/CONT to
#                                             freeze a component)
#   bash deploy/stack.sh env    [--dir DIR]   print the stack's settings (shell syntax)
#
# DIR defaults to ./var/stack under the repository. Pids are DIR/NAME.pid, logs
# DIR/NAME.log, data DIR/kafka/ and DIR/redis/. Settings come from the
# environment, else from DIR/stack.env written by an earlier start, else:
#
#   BW_KAFKA_PORT 9092   BW_KAFKA_CONTROLLER_PORT BW_KAFKA_PORT+1
#   BW_REDIS_PORT 16379  (not 6379: a system Redis often runs there)
#   BW_WALLET_PORT 8208  BW_USER_PORT 8202  BW_CONTROL_PORT 8209 (refsvc control API)
#   BW_EVENTS_TOPIC agent.billing.events   BW_EVENTS_PARTITIONS 4
#   BW_SETTLEMENTS_TOPIC agent.billing.settlements   BW_DLQ_TOPIC agent.billing.dlq
#   BW_REFSVC_ARGS ""    extra refsvc.py arguments, e.g. "--token-secret s3cret"
#   BW_KAFKA_HEAP 512m   BW_KAFKA_LIBS $BW_CACHE/kafka-3.9.1/libs
#   BW_KAFKA_CDS 1       0: no JVM class-data-sharing archives (see cds_flags)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KAFKA_VERSION=3.9.1

usage() { sed -n '2,36p' "$0" >&2; exit 2; }

CMD=${1:-}
[[ -n $CMD ]] || usage
shift
DIR=$ROOT/var/stack
ARGS=()
while (($#)); do
  case $1 in
    --dir) [[ $# -ge 2 ]] || usage; DIR=$2; shift 2 ;;
    --dir=*) DIR=${1#--dir=}; shift ;;
    -h|--help) usage ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

log() { echo "stack: $*" >&2; }

# ---- settings: environment > DIR/stack.env > defaults ------------------------
SETTINGS=(BW_KAFKA_PORT BW_KAFKA_CONTROLLER_PORT BW_REDIS_PORT BW_WALLET_PORT BW_USER_PORT
          BW_CONTROL_PORT BW_EVENTS_TOPIC BW_EVENTS_PARTITIONS BW_SETTLEMENTS_TOPIC
          BW_DLQ_TOPIC BW_REFSVC_ARGS BW_KAFKA_HEAP BW_KAFKA_LIBS)
declare -A FROM_ENV=()
for v in "${SETTINGS[@]}"; do
  if [[ -n ${!v+x} ]]; then FROM_ENV[$v]=${!v}; fi
done
if [[ -f $DIR/stack.env ]]; then
  # shellcheck disable=SC1091
  source "$DIR/stack.env"
fi
for v in "${!FROM_ENV[@]}"; do printf -v "$v" '%s' "${FROM_ENV[$v]}"; done

BW_CACHE=${BW_CACHE:-${HOME:-/root}/.cache/billing-worker}
: "${BW_KAFKA_PORT:=9092}"
: "${BW_KAFKA_CONTROLLER_PORT:=$((BW_KAFKA_PORT + 1))}"
: "${BW_REDIS_PORT:=16379}"
: "${BW_WALLET_PORT:=8208}"
: "${BW_USER_PORT:=8202}"
: "${BW_CONTROL_PORT:=8209}"
: "${BW_EVENTS_TOPIC:=agent.billing.events}"
: "${BW_EVENTS_PARTITIONS:=4}"
: "${BW_SETTLEMENTS_TOPIC:=agent.billing.settlements}"
: "${BW_DLQ_TOPIC:=agent.billing.dlq}"
: "${BW_REFSVC_ARGS:=}"
: "${BW_KAFKA_HEAP:=512m}"
: "${BW_KAFKA_LIBS:=$BW_CACHE/kafka-$KAFKA_VERSION/libs}"

write_env() {
  local v
  {
    echo "# written by deploy/stack.sh start; read back by stop/status/kill"
    for v in "${SETTINGS[@]}"; do printf '%s=%q\n' "$v" "${!v}"; done
    printf 'BW_STACK_DIR=%q\n' "$DIR"
  } >"$DIR/stack.env.tmp"
  mv "$DIR/stack.env.tmp" "$DIR/stack.env"
}

# ---- process helpers -----------------------------------------------------------
# What a component's /proc/PID/cmdline must contain: guards against a stale pid
# file whose pid was reused by another process.
signature() {
  case $1 in
    kafka) echo "kafka.Kafka" ;;
    redis) echo "redis-server" ;;
    refsvc) echo "refsvc.py" ;;
  esac
}

pid_of() { # prints the pid if the component runs
  local f=$DIR/$1.pid pid
  [[ -f $f ]] || return 1
  pid=$(<"$f")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' </proc/"$pid"/cmdline | grep -qF -- "$(signature "$1")" || return 1
  # A zombie is not running.
  [[ $(awk '{print $3}' /proc/"$pid"/stat 2>/dev/null) != Z ]] || return 1
  echo "$pid"
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

log_tail() {
  local f=$DIR/$1.log
  if [[ -f $f ]]; then
    echo "---- last lines of $f ----" >&2
    tail -n 40 "$f" >&2
    echo "----" >&2
  fi
}

fail() { # fail NAME MESSAGE
  log "ERROR: $2"
  log_tail "$1"
  log "the stack may be partly up: bash deploy/stack.sh stop --dir $DIR"
  exit 1
}

# Start a detached process (own session: a Ctrl-C aimed at the caller does not
# reach it); $! is the program itself because nohup and setsid exec it.
spawn() { # spawn NAME CMD...
  local name=$1
  shift
  echo "==== $(date -u +%FT%TZ) starting: $*" >>"$DIR/$name.log"
  nohup setsid "$@" >>"$DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/$name.pid"
}

check_ports_free() { # check_ports_free NAME PORT...
  local name=$1 p
  shift
  for p in "$@"; do
    if port_busy "$p"; then
      local var
      case $name:$p in
        kafka:"$BW_KAFKA_PORT") var=BW_KAFKA_PORT ;;
        kafka:*) var=BW_KAFKA_CONTROLLER_PORT ;;
        redis:*) var=BW_REDIS_PORT ;;
        *:"$BW_WALLET_PORT") var=BW_WALLET_PORT ;;
        *:"$BW_USER_PORT") var=BW_USER_PORT ;;
        *) var=BW_CONTROL_PORT ;;
      esac
      fail "$name" "port $p is already in use by another process (set $var to move it)"
    fi
  done
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

# ---- redis ----------------------------------------------------------------------
start_redis() {
  if pid=$(pid_of redis); then log "redis already running (pid $pid)"; return; fi
  command -v redis-server >/dev/null || fail redis "redis-server not installed: bash deploy/setup.sh"
  check_ports_free redis "$BW_REDIS_PORT"
  mkdir -p "$DIR/redis"
  local sock=()
  # A unix socket too (for redis unix:// URLs), when the path fits sun_path.
  if ((${#DIR} < 90)); then sock=(--unixsocket "$DIR/redis/redis.sock" --unixsocketperm 700); fi
  spawn redis redis-server --bind 127.0.0.1 --port "$BW_REDIS_PORT" --protected-mode yes \
    --dir "$DIR/redis" --appendonly yes --appendfsync always --save '' \
    --daemonize no --logfile '' "${sock[@]}"
}

wait_redis() {
  local i
  for ((i = 0; i < 100; i++)); do
    pid_of redis >/dev/null || fail redis "redis-server exited during startup"
    if [[ $(redis-cli -h 127.0.0.1 -p "$BW_REDIS_PORT" ping 2>/dev/null) == PONG ]]; then return; fi
    sleep 0.1
  done
  fail redis "redis did not answer PING within 10 s"
}

# ---- reference services -----------------------------------------------------------
start_refsvc() {
  if pid=$(pid_of refsvc); then log "refsvc already running (pid $pid)"; return; fi
  check_ports_free refsvc "$BW_WALLET_PORT" "$BW_USER_PORT" "$BW_CONTROL_PORT"
  local extra=()
  # shellcheck disable=SC2206
  [[ -z $BW_REFSVC_ARGS ]] || extra=($BW_REFSVC_ARGS)
  spawn refsvc python3 -u "$ROOT/deploy/refsvc.py" --host 127.0.0.1 \
    --wallet-port "$BW_WALLET_PORT" --user-port "$BW_USER_PORT" \
    --control-port "$BW_CONTROL_PORT" "${extra[@]}"
}

wait_refsvc() {
  local i
  for ((i = 0; i < 100; i++)); do
    pid_of refsvc >/dev/null || fail refsvc "refsvc.py exited during startup"
    if curl -sf -m 2 "http://127.0.0.1:$BW_CONTROL_PORT/_control/health" >/dev/null 2>&1; then return; fi
    sleep 0.1
  done
  fail refsvc "refsvc did not answer within 10 s"
}

# ---- kafka ------------------------------------------------------------------------
# Class-data sharing: the JVMs start about twice as fast from an archive of
# the classes they loaded last time (Kafka: ~3.3 s -> ~2 s to answer; a
# TopicCommand: ~1.5 s -> ~0.7 s). The first run of each kind writes the archive
# when it exits (-XX:ArchiveClassesAtExit) to a .part file that is then renamed;
# later runs use it. The key names the JVM and the jar directory, so a new JDK
# or new jars get a new archive. BW_KAFKA_CDS=0 turns this off.
CDS_DIR=${BW_KAFKA_CDS_DIR:-$(dirname "$BW_KAFKA_LIBS")/cds}
cds_key() {
  local j
  j=$(readlink -f "$(command -v java)")
  printf '%s %s %s' "$j" "$(stat -c %Y "$j" 2>/dev/null)" "$BW_KAFKA_LIBS" | md5sum | cut -c1-12
}
CDS_FLAGS=()
CDS_PART=
cds_flags() { # cds_flags NAME: sets CDS_FLAGS (and CDS_PART when writing one)
  CDS_FLAGS=()
  CDS_PART=
  [[ ${BW_KAFKA_CDS:-1} != 0 ]] || return 0
  mkdir -p "$CDS_DIR" 2>/dev/null && [[ -w $CDS_DIR ]] || return 0
  local final
  final=$CDS_DIR/$1-$(cds_key).jsa
  if [[ -s $final ]]; then
    CDS_FLAGS=("-XX:SharedArchiveFile=$final")
  else
    CDS_PART=$final.part-$BASHPID-$RANDOM
    CDS_FLAGS=("-XX:ArchiveClassesAtExit=$CDS_PART")
  fi
}
cds_keep() { # cds_keep PART: a finished JVM wrote PART: make it the archive
  local part=$1
  [[ -n $part ]] || return 0
  if [[ -s $part ]]; then mv -f "$part" "${part%.part-*}"; else rm -f "$part"; fi
}

java_run() { # java_run HEAP MAIN ARGS...: a short-lived JVM with the broker's classpath
  local heap=$1 part rc=0
  shift
  cds_flags tool
  part=$CDS_PART
  java "-Xmx$heap" -XX:+UseG1GC -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    "${CDS_FLAGS[@]}" -Dlog4j.configuration="file:$ROOT/deploy/kafka/log4j.properties" \
    -cp "$BW_KAFKA_LIBS/*" "$@" || rc=$?
  cds_keep "$part"
  return $rc
}

start_kafka() {
  if pid=$(pid_of kafka); then log "kafka already running (pid $pid)"; return; fi
  if [[ -f $DIR/kafka.cds-part ]]; then cds_keep "$(<"$DIR/kafka.cds-part")"; rm -f "$DIR/kafka.cds-part"; fi
  if [[ ! -f $BW_KAFKA_LIBS/.complete ]]; then
    fail kafka "Kafka jars missing in $BW_KAFKA_LIBS: run bash deploy/setup.sh"
  fi
  command -v java >/dev/null || fail kafka "java not installed: bash deploy/setup.sh"
  check_ports_free kafka "$BW_KAFKA_PORT" "$BW_KAFKA_CONTROLLER_PORT"
  local kdir=$DIR/kafka
  mkdir -p "$kdir/data"
  [[ -s $kdir/cluster.id ]] ||
    python3 -c '
import base64, uuid
while True:  # like Kafka Uuid.randomUuid(): never a leading "-" (read as an option)
    s = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not s.startswith("-"):
        print(s)
        break' >"$kdir/cluster.id"
  # Rewritten on every start: ports may have changed since the last one.
  cat >"$kdir/server.properties" <<EOF
# generated by deploy/stack.sh: single-node KRaft broker+controller for local use
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$BW_KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$BW_KAFKA_PORT,CONTROLLER://127.0.0.1:$BW_KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$BW_KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$kdir/data
num.partitions=4
default.replication.factor=1
offsets.topic.replication.factor=1
# Few offsets partitions: the first consumer group join creates them all.
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
# After a kill -9 the restarted broker waits until its previous registration
# expired (default 9 s): keep that short for crash tests.
broker.session.timeout.ms=2000
broker.heartbeat.interval.ms=500
# Let tests use short consumer session timeouts (rebalance tests).
group.min.session.timeout.ms=1000
# Must exceed 1 MiB per cleaner thread; the default (128 MiB) is far too big here.
log.cleaner.dedupe.buffer.size=2097152
log.cleaner.threads=1
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
auto.create.topics.enable=true
EOF
  if [[ ! -f $kdir/data/meta.properties ]]; then
    local t0
    t0=$(now)
    java_run 256m kafka.tools.StorageTool format -t "$(<"$kdir/cluster.id")" \
      -c "$kdir/server.properties" --ignore-formatted >>"$DIR/kafka.log" 2>&1 ||
      fail kafka "kafka storage format failed"
    log "kafka storage formatted in $(elapsed "$t0") s"
  fi
  cds_flags broker
  # The broker writes its archive only when it exits; `stop` renames it.
  echo "$CDS_PART" >"$DIR/kafka.cds-part"
  spawn kafka java "-Xms128m" "-Xmx$BW_KAFKA_HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true "${CDS_FLAGS[@]}" \
    -Dlog4j.configuration="file:$ROOT/deploy/kafka/log4j.properties" \
    -cp "$BW_KAFKA_LIBS/*" kafka.Kafka "$kdir/server.properties"
}

kcat_meta() { kcat -L -b "127.0.0.1:$BW_KAFKA_PORT" -m 3 -q 2>/dev/null; }

wait_kafka() {
  local i
  for ((i = 0; i < 600; i++)); do
    pid_of kafka >/dev/null || fail kafka "kafka exited during startup"
    # kcat waits for its whole timeout while the port is closed: probe TCP first.
    if port_busy "$BW_KAFKA_PORT" && kcat -L -b "127.0.0.1:$BW_KAFKA_PORT" -m 1 -q 2>/dev/null |
      grep -q '1 brokers'; then
      return
    fi
    sleep 0.1
  done
  fail kafka "kafka did not answer metadata requests within 60 s"
}

topic_cmd() { java_run 128m org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$BW_KAFKA_PORT" "$@"; }

topics_ready() { # all three topics known, every partition with a leader
  local meta t
  meta=$(kcat_meta) || return 1
  for t in "$BW_EVENTS_TOPIC" "$BW_SETTLEMENTS_TOPIC" "$BW_DLQ_TOPIC"; do
    grep -qF "topic \"$t\"" <<<"$meta" || return 1
  done
  ! grep -qE 'leader -1|Err|error' <<<"$meta"
}

# Create the missing topics. The events topic needs its own config
# (message.timestamp.type=LogAppendTime), so it is created with TopicCommand
# (a JVM: ~1.2 s even with its CDS archive); the other two get the broker's
# defaults (4 partitions, replication 1) and are created by a metadata request
# that allows auto-creation (kcat, ~0.1 s). --if-not-exists: a race with another
# creator is harmless.
create_topics() {
  local meta t i round job=
  for ((round = 0; round < 2; round++)); do
    meta=$(kcat_meta) || true
    job=
    if ! grep -qF "topic \"$BW_EVENTS_TOPIC\"" <<<"$meta"; then
      topic_cmd --create --if-not-exists --topic "$BW_EVENTS_TOPIC" --replication-factor 1 \
        --partitions "$BW_EVENTS_PARTITIONS" --config message.timestamp.type=LogAppendTime \
        >>"$DIR/kafka.log" 2>&1 &
      job=$!
    fi
    for t in "$BW_SETTLEMENTS_TOPIC" "$BW_DLQ_TOPIC"; do
      grep -qF "topic \"$t\"" <<<"$meta" ||
        kcat -L -b "127.0.0.1:$BW_KAFKA_PORT" -t "$t" -X allow.auto.create.topics=true \
          -m 3 -q >/dev/null 2>&1 || true
    done
    if [[ -z $job ]] || wait "$job"; then break; fi
    log "creating topic $BW_EVENTS_TOPIC failed, retrying (see $DIR/kafka.log)"
    sleep 1
  done
  # Metadata reaches the broker's cache a moment after the create returned.
  for ((i = 0; i < 150; i++)); do
    topics_ready && return 0
    sleep 0.1
  done
  fail kafka "topics $BW_EVENTS_TOPIC, $BW_SETTLEMENTS_TOPIC, $BW_DLQ_TOPIC not ready after 15 s"
}

# ---- commands ------------------------------------------------------------------------
cmd_start() {
  local t0 tk
  t0=$(now)
  write_env
  start_redis
  start_refsvc
  tk=$(now)
  start_kafka
  wait_redis
  wait_refsvc
  wait_kafka
  log "kafka answering after $(elapsed "$tk") s"
  tk=$(now)
  create_topics
  log "topics ready after $(elapsed "$tk") s"
  log "up in $(elapsed "$t0") s: kafka 127.0.0.1:$BW_KAFKA_PORT, redis 127.0.0.1:$BW_REDIS_PORT," \
    "wallet 127.0.0.1:$BW_WALLET_PORT, user service 127.0.0.1:$BW_USER_PORT," \
    "control 127.0.0.1:$BW_CONTROL_PORT (dir $DIR)"
}

stop_timeout() { case $1 in kafka) echo 60 ;; *) echo 15 ;; esac; }

# Send SIG to NAME and wait for it to exit; KILL after the timeout.
stop_one() { # stop_one NAME SIG
  local name=$1 sig=$2 pid i limit
  pid=$(pid_of "$name") || { rm -f "$DIR/$name.pid"; return 0; }
  kill -s "$sig" "$pid" 2>/dev/null || true
  limit=$(($(stop_timeout "$name") * 10))
  for ((i = 0; i < limit; i++)); do
    pid_of "$name" >/dev/null || break
    sleep 0.1
  done
  if pid_of "$name" >/dev/null; then
    log "$name (pid $pid) still running after $((limit / 10)) s: KILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do pid_of "$name" >/dev/null || break; sleep 0.1; done
  fi
  rm -f "$DIR/$name.pid"
  if [[ $name == kafka && -f $DIR/kafka.cds-part ]]; then
    cds_keep "$(<"$DIR/kafka.cds-part")"
    rm -f "$DIR/kafka.cds-part"
  fi
}

cmd_stop() {
  local name pids=()
  # In parallel: Kafka's controlled shutdown takes a few seconds.
  for name in refsvc kafka redis; do
    stop_one "$name" TERM &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
  log "stopped (dir $DIR)"
}

cmd_status() {
  local name pid all=0 port
  for name in kafka redis refsvc; do
    case $name in
      kafka) port="$BW_KAFKA_PORT (controller $BW_KAFKA_CONTROLLER_PORT)" ;;
      redis) port=$BW_REDIS_PORT ;;
      refsvc) port="wallet $BW_WALLET_PORT, user $BW_USER_PORT, control $BW_CONTROL_PORT" ;;
    esac
    if pid=$(pid_of "$name"); then
      printf '%-7s running  pid %-8s 127.0.0.1:%s\n' "$name" "$pid" "$port"
    else
      printf '%-7s stopped\n' "$name"
      all=3
    fi
  done
  echo "dir: $DIR"
  return $all
}

cmd_kill() {
  local name=${ARGS[0]:-} sig=${ARGS[1]:-TERM}
  case $name in kafka|redis|refsvc) ;; *) usage ;; esac
  stop_one "$name" "$sig"
  log "$name stopped with SIG${sig#SIG}"
}

cmd_signal() {
  local name=${ARGS[0]:-} sig=${ARGS[1]:-} pid
  case $name in kafka|redis|refsvc) ;; *) usage ;; esac
  [[ -n $sig ]] || usage
  pid=$(pid_of "$name") || { log "$name is not running"; exit 1; }
  kill -s "$sig" "$pid"
}

case $CMD in
  start) cmd_start ;;
  signal) cmd_signal ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  kill) cmd_kill ;;
  env) [[ -f $DIR/stack.env ]] || write_env; cat "$DIR/stack.env" ;;
  *) usage ;;
esac

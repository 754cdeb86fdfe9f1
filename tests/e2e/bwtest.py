"""bwtest: the library billing-worker's end-to-end tests import (stdlib only).

A test script, as ctest runs it (`python3 tests/e2e/0001-x.py --bin build/billing-worker`):

    import bwtest
    from bwtest import Stack, Worker, Checks, wait_until

    args = bwtest.parse_args()                 # --bin, --keep, -v
    t = Checks()
    with Stack() as stack:                     # Kafka + Redis + reference services
        cfg = stack.write_config()             # a worker config for this stack
        w = stack.worker(args.bin, cfg).start()
        stack.produce(bwtest.example_request("r1", "u1"))
        recs = wait_until(lambda: stack.settlements(), timeout=60, what="a settlement")
        t.eq(recs[0]["amount_credits"], "5.0000", "old pricing: 5 credits")
        t.eq(w.stop(), 0, "SIGTERM exits 0")
    sys.exit(t.summary())                      # prints "N passed, M failed"

Stack (one per test, own ports and temp dir, started through deploy/stack.sh):
    Stack(dir=None, keep=False, refsvc_args="", events_partitions=4)
    Stack.attach(dir)             a stack already running there (e.g. var/quickstart)
    .start() / .stop()            also a context manager: stops in `finally`; the
                                  temp dir is removed unless an exception or a
                                  failed Checks check happened (or keep=True)
    .brokers .redis_url .wallet_url .user_url .control_url .dir
    .events_topic .settlements_topic .dlq_topic
    .produce(events, topic=None, key=AUTO, partition=None) -> int
        events: dicts (JSON-encoded, key = request_id) or raw bytes/str (sent
        byte for byte: tabs, newlines, invalid UTF-8 are fine; key = the
        request_id if the bytes parse as JSON with one, else none)
    .consume(topic=None, timeout=30) -> [Message(key, value, partition, offset)]
        everything in the topic, from the beginning; m.timestamp, m.json()
    .consume_json(topic=None) -> [dict]       values parsed, numbers as Decimal
    .settlements() -> [dict]     settlement records, deduplicated by idempotency_key
    .dlq() -> [dict]             dead-letter records
    .wait_messages(topic, n, timeout=60) -> [Message]
    .describe_topic(topic) -> str             TopicCommand --describe output
    .redis(*args) -> str                      redis-cli against the stack's Redis
    .redis_config(name) -> str                CONFIG GET name
    .kill(name, sig="KILL") / .signal(name, sig) / .restart(name)
        name: "kafka" | "redis" | "refsvc"; after kill, .start() brings it back
  reference services (deploy/refsvc.py control API):
    .ledger() .calls() .records() .stats() .balances()
    .set_balance(user_id, amount) .set_default_balance(amount)
    .fault(target="wallet", mode="status", **kw)   e.g. status=503, count=2,
        retry_after=1, delay_ms=5000, path="consume", duration_ms=..., append=True
    .faults([{...}, ...]) .clear_faults(target=None) .refsvc_config(**kw) .reset()
    .wallet_post(user_id, amount, key=None, body=None, service="wallet") -> (status, dict)
  workers:
    .write_config(path=None, pricing=None, extra="", **groups) -> WorkerConfig
        groups override the defaults group by group, e.g.
        settle={"finalize_grace": "1s"}, kafka={"group_id": "g2"}, auth=None
        (None removes a group or key); pricing is libconfig text
    .worker(bin, config=None, args=(), env=None, name=None) -> Worker (not started)

Worker (billing-worker run -c CFG; stdout+stderr to a log file):
    .start() -> self   .stop(sig=SIGTERM, timeout=30) -> exit code or None if it
    had to be killed   .kill9()   .alive()   .wait(timeout) -> exit code
    .log() -> str   .log_json() -> [dict]   .http(path) -> (status, text)
    .ready() -> bool   .wait_ready(timeout=60)   .metrics() -> {name{labels}: float}

Other helpers:
    wait_until(predicate, timeout=30, interval=0.2, what="") -> the truthy value
    run_cli(bin, *args, input=None, timeout=60) -> CompletedProcess (bytes)
    model_call(...), tool_call(...), finalize(...), example_request(r, u): events
    extract_group(text, name) -> the libconfig text of one top-level group
    Checks: .check(cond, what, detail="") .eq(got, want, what) .run(name, fn)
            .summary() -> exit code (prints "N passed, M failed")
"""

import argparse
import http.client
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
import uuid
from collections import namedtuple
from decimal import Decimal
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STACK_SH = REPO / "deploy" / "stack.sh"
DEFAULT_BIN = REPO / "build" / "billing-worker"

EVENTS_TOPIC = "agent.billing.events"
SETTLEMENTS_TOPIC = "agent.billing.settlements"
DLQ_TOPIC = "agent.billing.dlq"

AUTO = object()  # produce(): key taken from each event's request_id

# The old system's flat pricing (1 credit per model call, 2 per tool call,
# 1 credit minimum): section 3's example request costs 5 credits.
DEFAULT_PRICING = """pricing = {
  version = "e2e-flat-1";
  credit_usd = 0.002;
  minimum_credits = 1.0;
  precision = 4;
  rounding = "half_up";
  bill_failed_calls = true;
  models = ( { match = "*"; credits_per_call = 1.0; } );
  tools = ( { match = "*"; credits_per_call = 2.0; } );
};"""


def log(msg):
    """Progress output of a test (stdout, flushed, timestamped)."""
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def parse_args(argv=None):
    """The arguments every e2e script takes (ctest passes --bin)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(DEFAULT_BIN), help="billing-worker binary")
    ap.add_argument("--keep", action="store_true", help="keep the stack's directory")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def wait_until(predicate, timeout=30, interval=0.2, what=""):
    """Call predicate() until it returns a truthy value, and return that value.

    Raises TimeoutError after `timeout` seconds. Exceptions raised by the
    predicate count as "not yet" and the last one is named in the error.
    """
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - "not yet"
            last_exc = e
        if time.monotonic() >= deadline:
            msg = "timed out after %ss waiting for %s" % (timeout, what or predicate)
            if last_exc is not None:
                msg += " (last error: %r)" % (last_exc,)
            raise TimeoutError(msg)
        time.sleep(interval)


# ---- ports -------------------------------------------------------------------
_taken = set()


def _port_free(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def free_port(consecutive=1):
    """A free 127.0.0.1 port (the first of `consecutive` free ones), picked at
    random in 20000-32000: below Linux's ephemeral range, so clients' own
    ports never take it between the pick and the bind."""
    rng = random.SystemRandom()
    for _ in range(1000):
        p = rng.randrange(20000, 32000 - consecutive)
        ports = range(p, p + consecutive)
        if any(q in _taken for q in ports):
            continue
        if all(_port_free(q) for q in ports):
            _taken.update(ports)
            return p
    raise RuntimeError("no free port found")


# ---- HTTP ----------------------------------------------------------------------
def http_request(method, url, body=None, headers=None, timeout=10):
    """One HTTP request; the path is sent exactly as given (no normalisation).

    Returns (status, headers dict with lower-case names, body bytes). Connection
    errors raise OSError / http.client exceptions.
    """
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        path = u.path + ("?" + u.query if u.query else "")
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        hdrs.update(headers or {})
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def loads(data):
    """JSON with numbers kept exact (floats as Decimal)."""
    if isinstance(data, bytes):
        data = data.decode("utf-8")
    return json.loads(data, parse_float=Decimal)


# ---- Kafka messages ----------------------------------------------------------------
class Message(namedtuple("Message", "key value partition offset")):
    """A consumed record: key and value are bytes (or None for NULL);
    .timestamp is the record's timestamp in epoch milliseconds."""

    def json(self):
        return loads(self.value)


_CONSUME_FMT = r"%p %o %K %S %T\n%k%s\n"  # kcat expands the \n


def _parse_kcat_output(out):
    msgs = []
    pos = 0
    n = len(out)
    while pos < n:
        nl = out.index(b"\n", pos)
        part, off, klen, vlen, ts = out[pos:nl].split(b" ")
        pos = nl + 1
        klen, vlen = int(klen), int(vlen)
        key = out[pos:pos + klen] if klen >= 0 else None
        pos += max(klen, 0)
        value = out[pos:pos + vlen] if vlen >= 0 else None
        pos += max(vlen, 0)
        if out[pos:pos + 1] != b"\n":
            raise ValueError("unexpected kcat output at byte %d" % pos)
        pos += 1
        m = Message(key, value, int(part), int(off))
        m.timestamp = int(ts)
        msgs.append(m)
    return msgs


def charge_key(request_id, adjustment=0):
    """The idempotency key of a request's charge (PRODUCT.md): bw: + the
    percent-encoded request id; of its n-th adjustment: ...:adj:<n>."""
    key = "bw:" + urllib.parse.quote(request_id, safe="")
    return key + (":adj:%d" % adjustment if adjustment else "")


def _event_key(ev):
    """request_id of an event (plain or CloudEvents), as the producers key it."""
    if not isinstance(ev, dict):
        return None
    rid = ev.get("request_id")
    if rid is None and isinstance(ev.get("data"), dict):
        rid = ev["data"].get("request_id")
    return rid if isinstance(rid, str) else None


# ---- libconfig rendering ------------------------------------------------------------
class Raw(str):
    """A libconfig value written as-is (e.g. Raw('( { match = "*"; } )'))."""


def _lc_value(v, indent="  "):
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v) + ("L" if not -2**31 <= v < 2**31 else "")
    if isinstance(v, (float, Decimal)):
        s = str(v)
        return s if any(c in s for c in ".eE") else s + ".0"
    if isinstance(v, str):
        out = []
        for ch in v:
            if ch == "\\":
                out.append("\\\\")
            elif ch == '"':
                out.append('\\"')
            elif ch == "\n":
                out.append("\\n")
            elif ch == "\t":
                out.append("\\t")
            elif ord(ch) < 0x20:
                out.append("\\x%02x" % ord(ch))
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    if isinstance(v, list):  # array of scalars
        return "[ " + ", ".join(_lc_value(x) for x in v) + " ]"
    if isinstance(v, tuple):  # list (of groups or mixed values)
        return "( " + ", ".join(_lc_value(x, indent) for x in v) + " )"
    if isinstance(v, dict):  # group
        inner = "".join("%s  %s = %s;\n" % (indent, k, _lc_value(x, indent + "  "))
                        for k, x in v.items() if x is not None)
        return "{\n" + inner + indent + "}"
    raise TypeError("cannot write %r as libconfig" % (v,))


def render_config(settings):
    """libconfig text of an ordered dict of top-level settings and groups."""
    return "".join("%s = %s;\n" % (k, _lc_value(v, "")) for k, v in settings.items()
                   if v is not None)


def extract_group(text, name):
    """The text `name = { ... };` of a top-level libconfig setting, found by
    matching braces outside strings and comments; None if absent."""
    i, n, depth, start = 0, len(text), 0, None
    head = re.compile(r"%s\s*[=:]\s*\{" % re.escape(name))
    while i < n:
        c = text[i]
        if c == '"':  # string: skip, honouring backslash escapes
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif c == "#" or text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 1
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0 and start is not None:
                return text[start:i + 1] + ";"
        elif depth == 0 and start is None:
            m = head.match(text, i)
            if m and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] in "_-")):
                start = i
                i = m.end() - 1  # at the "{": counted on the next turn
                continue
        i += 1
    return None


class WorkerConfig:
    """A written worker config: str(cfg) is its path."""

    def __init__(self, path, http_port, settings, text):
        self.path = Path(path)
        self.http_port = http_port
        self.settings = settings
        self.text = text

    def __str__(self):
        return str(self.path)

    __fspath__ = __str__


# ---- the stack ----------------------------------------------------------------------
class Stack:
    """Kafka + Redis + reference services on random free ports, in a temp dir,
    started and stopped with deploy/stack.sh."""

    def __init__(self, dir=None, keep=False, refsvc_args="", events_partitions=4):
        self.own_dir = dir is None
        self.dir = Path(dir) if dir else Path(tempfile.mkdtemp(prefix="bw-e2e-"))
        self.keep = keep or os.environ.get("BW_E2E_KEEP") == "1"
        self._pick_ports()
        self.refsvc_args = refsvc_args
        self.events_partitions = events_partitions
        self.events_topic = EVENTS_TOPIC
        self.settlements_topic = SETTLEMENTS_TOPIC
        self.dlq_topic = DLQ_TOPIC
        self.workers = []
        self._ncfg = 0
        self.started = False

    @classmethod
    def attach(cls, dir):
        """A Stack object for a stack already started by deploy/stack.sh in
        `dir` (ports read from dir/stack.env). stop() leaves it running."""
        import shlex
        settings = {}
        for line in (Path(dir) / "stack.env").read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                settings[k] = (shlex.split(v) or [""])[0]
        st = cls.__new__(cls)
        st.own_dir, st.dir, st.keep = False, Path(dir).resolve(), True
        st.kafka_port = int(settings["BW_KAFKA_PORT"])
        st.kafka_controller_port = int(settings["BW_KAFKA_CONTROLLER_PORT"])
        st.redis_port = int(settings["BW_REDIS_PORT"])
        st.wallet_port = int(settings["BW_WALLET_PORT"])
        st.user_port = int(settings["BW_USER_PORT"])
        st.control_port = int(settings["BW_CONTROL_PORT"])
        st.refsvc_args = settings.get("BW_REFSVC_ARGS", "")
        st.events_partitions = int(settings.get("BW_EVENTS_PARTITIONS", 4))
        st.events_topic = settings.get("BW_EVENTS_TOPIC", EVENTS_TOPIC)
        st.settlements_topic = settings.get("BW_SETTLEMENTS_TOPIC", SETTLEMENTS_TOPIC)
        st.dlq_topic = settings.get("BW_DLQ_TOPIC", DLQ_TOPIC)
        st.workers, st._ncfg, st.started = [], 0, False
        return st

    # -- lifecycle --
    def env(self):
        env = dict(os.environ)
        env.update({
            "BW_KAFKA_PORT": str(self.kafka_port),
            "BW_KAFKA_CONTROLLER_PORT": str(self.kafka_controller_port),
            "BW_REDIS_PORT": str(self.redis_port),
            "BW_WALLET_PORT": str(self.wallet_port),
            "BW_USER_PORT": str(self.user_port),
            "BW_CONTROL_PORT": str(self.control_port),
            "BW_EVENTS_TOPIC": self.events_topic,
            "BW_SETTLEMENTS_TOPIC": self.settlements_topic,
            "BW_DLQ_TOPIC": self.dlq_topic,
            "BW_EVENTS_PARTITIONS": str(self.events_partitions),
            "BW_REFSVC_ARGS": self.refsvc_args,
        })
        return env

    def _stack_sh(self, *args, timeout=300, check=True):
        p = subprocess.run(["bash", str(STACK_SH), *args, "--dir", str(self.dir)],
                           env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=timeout)
        out = p.stdout.decode("utf-8", "replace")
        if check and p.returncode != 0:
            raise RuntimeError("stack.sh %s failed (exit %d):\n%s"
                               % (" ".join(args), p.returncode, out))
        return p.returncode, out

    def _pick_ports(self):
        self.kafka_port = free_port(consecutive=2)
        self.kafka_controller_port = self.kafka_port + 1
        self.redis_port = free_port()
        self.wallet_port = free_port()
        self.user_port = free_port()
        self.control_port = free_port()

    def start(self):
        t0 = time.monotonic()
        first = not self.started
        self.started = True
        for attempt in range(3):
            try:
                self._stack_sh("start")
                break
            except RuntimeError as e:
                # Another test process may have taken a port between our pick
                # and the bind: new ports, fresh start (first start only).
                if not first or "already in use" not in str(e) or attempt == 2:
                    raise
                log("port collision, picking new ports: %s" % str(e).splitlines()[1:2])
                self._stack_sh("stop", check=False)
                (self.dir / "stack.env").unlink(missing_ok=True)
                self._pick_ports()
        log("stack up in %.1fs (dir %s, kafka %s)" % (time.monotonic() - t0, self.dir,
                                                       self.brokers))
        return self

    def stop(self):
        for w in list(self.workers):
            if w.alive():
                log("killing leftover worker %s" % w.name)
                w.kill9()
        if self.started:
            self._stack_sh("stop", check=False)
            self.started = False

    def status(self):
        return self._stack_sh("status", check=False)[0] == 0

    def kill(self, name, sig="KILL"):
        """Signal one component and wait until it exited (start() restarts it)."""
        self._stack_sh("kill", name, sig)

    def signal(self, name, sig):
        """Send a signal without waiting (STOP / CONT)."""
        self._stack_sh("signal", name, sig)

    def restart(self, name, sig="TERM"):
        self.kill(name, sig)
        self.start()

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise

    def __exit__(self, exc_type, exc, tb):
        try:
            self.stop()
        finally:
            # Keep the logs and data of a failed test for a post-mortem.
            if exc_type is not None or self.keep or Checks.total_failed:
                log("stack directory kept: %s" % self.dir)
            elif self.own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
        return False

    # -- addresses --
    @property
    def brokers(self):
        return "127.0.0.1:%d" % self.kafka_port

    @property
    def redis_url(self):
        return "redis://127.0.0.1:%d/0" % self.redis_port

    @property
    def redis_socket(self):
        return self.dir / "redis" / "redis.sock"

    @property
    def wallet_url(self):
        return "http://127.0.0.1:%d" % self.wallet_port

    @property
    def user_url(self):
        return "http://127.0.0.1:%d" % self.user_port

    @property
    def control_url(self):
        return "http://127.0.0.1:%d" % self.control_port

    # -- Kafka --
    def produce(self, events, topic=None, key=AUTO, partition=None):
        """Publish events in order; returns how many. See the module doc."""
        topic = topic or self.events_topic
        msgs = []  # (key bytes or None, value bytes)
        for ev in events:
            if isinstance(ev, dict):
                value = json.dumps(ev, separators=(",", ":"), ensure_ascii=False).encode()
                k = _event_key(ev)
            else:
                value = ev.encode() if isinstance(ev, str) else bytes(ev)
                try:
                    k = _event_key(json.loads(value))
                except ValueError:
                    k = None
            if key is not AUTO:
                k = key
            if isinstance(k, str):
                k = k.encode()
            msgs.append((k, value))
        # Consecutive runs of keyed / unkeyed messages, one kcat call each, so
        # the order is kept.
        i = 0
        while i < len(msgs):
            j = i
            keyed = msgs[i][0] is not None
            while j < len(msgs) and (msgs[j][0] is not None) == keyed:
                j += 1
            self._kcat_produce(topic, msgs[i:j], keyed, partition)
            i = j
        return len(msgs)

    def _kcat_produce(self, topic, msgs, keyed, partition):
        blob_parts = [m[1] for m in msgs] + [m[0] for m in msgs if m[0] is not None]
        while True:  # delimiters that occur in no key and no value
            tag = secrets.token_hex(8)
            mdelim, kdelim = ("<<BWM%s>>" % tag).encode(), ("<<BWK%s>>" % tag).encode()
            if not any(mdelim in b or kdelim in b for b in blob_parts):
                break
        data = b"".join(((m[0] + kdelim) if keyed else b"") + m[1] + mdelim for m in msgs)
        cmd = ["kcat", "-P", "-b", self.brokers, "-t", topic, "-D", mdelim.decode(),
               "-X", "partitioner=murmur2_random", "-X", "acks=all"]
        if keyed:
            cmd += ["-K", kdelim.decode()]
        if partition is not None:
            cmd += ["-p", str(partition)]
        p = subprocess.run(cmd, input=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=60)
        err = p.stderr.decode("utf-8", "replace")
        if p.returncode != 0 or "failed" in err.lower() or "error" in err.lower():
            raise RuntimeError("kcat produce to %s failed (exit %d): %s"
                               % (topic, p.returncode, err))

    def consume(self, topic=None, timeout=30):
        """Every record in `topic`, from the beginning of each partition, in
        partition order then offset order."""
        topic = topic or self.events_topic
        cmd = ["kcat", "-C", "-b", self.brokers, "-t", topic, "-o", "beginning", "-e", "-q",
               "-f", _CONSUME_FMT]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError("kcat consume %s failed (exit %d): %s"
                               % (topic, p.returncode, p.stderr.decode("utf-8", "replace")))
        msgs = _parse_kcat_output(p.stdout)
        msgs.sort(key=lambda m: (m.partition, m.offset))
        return msgs

    def consume_json(self, topic=None):
        return [m.json() for m in self.consume(topic)]

    def wait_messages(self, topic, n, timeout=60):
        """Wait until `topic` holds at least n records; returns them all."""
        return wait_until(lambda: (lambda ms: ms if len(ms) >= n else None)(self.consume(topic)),
                          timeout=timeout, interval=0.5,
                          what="%d records in %s" % (n, topic))

    def settlements(self):
        """Settlement records, one per idempotency_key (the last published)."""
        by_key = {}
        for rec in self.consume_json(self.settlements_topic):
            by_key[rec.get("idempotency_key")] = rec
        return list(by_key.values())

    def dlq(self):
        return self.consume_json(self.dlq_topic)

    def describe_topic(self, topic=None):
        topic = topic or self.events_topic
        libs = os.environ.get("BW_KAFKA_LIBS") or str(
            Path(os.environ.get("BW_CACHE") or Path.home() / ".cache" / "billing-worker")
            / "kafka-3.9.1" / "libs")
        p = subprocess.run(
            ["java", "-Xmx128m", "-Dlog4j.configuration=file:%s"
             % (REPO / "deploy" / "kafka" / "log4j.properties"),
             "-cp", libs + "/*", "org.apache.kafka.tools.TopicCommand",
             "--bootstrap-server", self.brokers, "--describe", "--topic", topic],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        return p.stdout.decode("utf-8", "replace")

    # -- Redis --
    def redis(self, *args):
        p = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.redis_port), "--raw",
                            *[str(a) for a in args]],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        if p.returncode != 0:
            raise RuntimeError("redis-cli failed: %s" % p.stderr.decode())
        return p.stdout.decode("utf-8", "replace").rstrip("\n")

    def redis_config(self, name):
        """CONFIG GET name -> the value ("" when empty)."""
        lines = self.redis("CONFIG", "GET", name).split("\n")
        return lines[1] if len(lines) > 1 else ""

    # -- reference services --
    def control(self, method, name, body=None):
        status, _, data = http_request(method, "%s/_control/%s" % (self.control_url, name),
                                       body=body)
        if status != 200:
            raise RuntimeError("control %s %s: HTTP %d %s" % (method, name, status, data))
        return loads(data)

    def ledger(self):
        """Applied charges: key, user_id, amount (exact text), via, request_id,
        transaction_id, balance_after, body (raw text), body_json, time."""
        entries = self.control("GET", "ledger")
        for e in entries:
            try:
                e["body_json"] = loads(e.get("body") or "null")
            except ValueError:
                e["body_json"] = None
        return entries

    def calls(self):
        return self.control("GET", "calls")

    def records(self):
        return self.control("GET", "records")

    def stats(self):
        return self.control("GET", "stats")

    def balances(self):
        return self.control("GET", "balances")

    def set_balance(self, user_id, amount):
        return self.control("POST", "balances", {"users": {user_id: str(amount)}})

    def set_default_balance(self, amount):
        return self.control("POST", "balances", {"default": str(amount)})

    def fault(self, target="wallet", mode="status", **kw):
        spec = {"target": target, "mode": mode}
        spec.update(kw)
        return self.control("POST", "faults", spec)

    def faults(self, specs):
        return self.control("POST", "faults", list(specs))

    def clear_faults(self, target=None):
        for t in ([target] if target else ["wallet", "user"]):
            self.control("POST", "faults", {"target": t, "mode": "ok"})

    def refsvc_config(self, **kw):
        return self.control("POST", "config", kw)

    def reset(self):
        return self.control("POST", "reset")

    def wallet_post(self, user_id, amount, key=None, body=None, service="wallet",
                    headers=None, timeout=10):
        """POST a consume request as the worker would: (status, parsed body or None)."""
        base = self.wallet_url if service == "wallet" else self.user_url
        path = "/api/v1/users/%s/credits/consume" % urllib.parse.quote(user_id, safe="")
        if body is None:
            body = '{"amount": %s, "service": "bwtest"}' % amount
        hdrs = dict(headers or {})
        if key is not None:
            hdrs["Idempotency-Key"] = key
        status, _, data = http_request("POST", base + path, body=body, headers=hdrs,
                                       timeout=timeout)
        try:
            return status, loads(data)
        except ValueError:
            return status, None

    # -- workers --
    def write_config(self, path=None, pricing=None, extra="", **groups):
        """Write a billing-worker config (PRODUCT.md section 10) for this stack.

        Each keyword overrides one top-level setting: a dict is merged into the
        default group key by key (a None value removes the key), None removes
        the group, anything else replaces it. `pricing` is libconfig text
        (a whole `pricing = {...};` group, or just its contents); `extra` is
        appended as-is.
        """
        self._ncfg += 1
        path = Path(path) if path else self.dir / ("worker-%d.cfg" % self._ncfg)
        http_port = free_port()
        settings = {
            "kafka": {"brokers": self.brokers, "group_id": "billing-worker-e2e",
                      "topic": self.events_topic,
                      "settlements_topic": self.settlements_topic,
                      "dlq_topic": self.dlq_topic},
            "redis": {"url": self.redis_url},
            "dedup": {"retention": "7d"},
            "wallet": {"url": self.wallet_url, "timeout": "3s"},
            "user_service": {"url": self.user_url, "timeout": "3s"},
            "settle": {"service_name": "billing-worker"},
            "http": {"listen": "127.0.0.1:%d" % http_port},
            "limits": {"max_event_bytes": 65536},
            "log": {"level": "info", "format": "json"},
            "shutdown_timeout": "10s",
        }
        for name, value in groups.items():
            if isinstance(value, dict) and isinstance(settings.get(name), dict):
                merged = dict(settings[name])
                for k, v in value.items():
                    if v is None:
                        merged.pop(k, None)
                    else:
                        merged[k] = v
                settings[name] = merged
            else:
                settings[name] = value
        listen = (settings.get("http") or {}).get("listen", "")
        if isinstance(listen, str) and ":" in listen:
            http_port = int(listen.rsplit(":", 1)[1])
        pricing = DEFAULT_PRICING if pricing is None else pricing.strip()
        if not re.match(r"pricing\s*[=:]", pricing):
            pricing = "pricing = {\n%s\n};" % pricing
        text = ("# written by tests/e2e/bwtest.py for the stack in %s\n" % self.dir
                + render_config(settings) + pricing + "\n" + (extra + "\n" if extra else ""))
        path.write_text(text)
        return WorkerConfig(path, http_port, settings, text)

    def worker(self, bin=None, config=None, args=(), env=None, name=None):
        config = config if config is not None else self.write_config()
        name = name or "worker-%d" % (len(self.workers) + 1)
        w = Worker(bin or DEFAULT_BIN, config, args=args, env=env,
                   log_path=self.dir / ("%s.log" % name), name=name)
        self.workers.append(w)
        return w


# ---- the worker process -----------------------------------------------------------------
class Worker:
    """One `billing-worker run -c CONFIG` process."""

    def __init__(self, bin, config, args=(), env=None, log_path=None, name="worker",
                 command="run"):
        self.bin = str(bin)
        self.config = config
        self.args = list(args)
        self.env = dict(os.environ, **(env or {}))
        self.name = name
        self.command = command
        self.log_path = Path(log_path) if log_path else Path(tempfile.mktemp(suffix=".log"))
        self.http_port = getattr(config, "http_port", None)
        self.proc = None

    def start(self):
        cmd = [self.bin, self.command, "-c", str(self.config), *self.args]
        logf = open(self.log_path, "ab")
        logf.write(("==== %s %s\n" % (time.strftime("%H:%M:%S"), " ".join(cmd))).encode())
        logf.flush()
        # Own session: a signal meant for the test never reaches the worker.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                     stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        logf.close()
        log("%s started (pid %d)" % (self.name, self.proc.pid))
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def wait(self, timeout=30):
        """Exit code, or None if still running after `timeout`."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Send `sig` and wait; exit code, or None if it had to be killed."""
        if not self.alive():
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        rc = self.wait(timeout)
        if rc is None:
            log("%s did not exit within %ss of signal %s: SIGKILL" % (self.name, timeout, sig))
            self.kill9()
        else:
            log("%s exited with %d" % (self.name, rc))
        return rc

    def kill9(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_json(self):
        """The log lines that are JSON objects, parsed."""
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def http(self, path, timeout=5):
        status, _, data = http_request("GET", "http://127.0.0.1:%d%s" % (self.http_port, path),
                                       timeout=timeout)
        return status, data.decode("utf-8", "replace")

    def ready(self):
        try:
            return self.http("/readyz")[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout=60):
        def ok():
            if not self.alive():
                raise RuntimeError("%s exited with %s; log:\n%s"
                                   % (self.name, self.proc.returncode, self.log()[-3000:]))
            return self.ready()
        deadline = time.monotonic() + timeout
        while not ok():
            if time.monotonic() > deadline:
                raise TimeoutError("%s not ready after %ss" % (self.name, timeout))
            time.sleep(0.2)
        return self

    def metrics(self):
        """Prometheus text format -> {"name{labels}": value}."""
        _, text = self.http("/metrics")
        out = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
        return out


def run_cli(bin, *args, input=None, timeout=60, env=None):
    """Run `billing-worker ARGS...` to completion; CompletedProcess with bytes."""
    return subprocess.run([str(bin), *[str(a) for a in args]], input=input,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


# ---- events ------------------------------------------------------------------------------
def new_id():
    return str(uuid.uuid4())


def model_call(request_id, user_id, model="gpt-4o", usage=None, **extra):
    ev = {"type": "custom_model_call", "event_id": new_id(), "request_id": request_id,
          "user_id": user_id, "model": model}
    if usage is not None:
        ev["usage"] = usage
    ev.update(extra)
    return ev


def tool_call(request_id, user_id, tool_name="web_search", **extra):
    ev = {"type": "custom_tool_call", "event_id": new_id(), "request_id": request_id,
          "user_id": user_id, "tool_name": tool_name}
    ev.update(extra)
    return ev


def finalize(request_id, user_id, expected=None, status="completed", **extra):
    """expected: (model_calls, tool_calls) or None."""
    ev = {"type": "request_finalize", "event_id": new_id(), "request_id": request_id,
          "user_id": user_id, "status": status}
    if expected is not None:
        ev["expected"] = {"model_calls": expected[0], "tool_calls": expected[1]}
    ev.update(extra)
    return ev


def example_request(request_id="r1", user_id="u1"):
    """PRODUCT.md section 3's example: 3 gpt-4o calls + 1 web_search, 5 credits
    under DEFAULT_PRICING."""
    return [
        model_call(request_id, user_id, node_name="ReasonNode"),
        tool_call(request_id, user_id),
        model_call(request_id, user_id, node_name="ReasonNode"),
        model_call(request_id, user_id, node_name="ResponseNode"),
        finalize(request_id, user_id, expected=(3, 1)),
    ]


# ---- results --------------------------------------------------------------------------------
class Checks:
    """Counts checks; summary() prints the closing line ctest logs show."""

    total_failed = 0  # over all instances: a Stack keeps its directory if > 0

    def __init__(self):
        self.passed = 0
        self.failed = 0
        self.failures = []

    def check(self, cond, what, detail=""):
        if cond:
            self.passed += 1
            print("ok   - %s" % what, flush=True)
        else:
            self.failed += 1
            Checks.total_failed += 1
            self.failures.append(what)
            print("FAIL - %s%s" % (what, (": " + str(detail)) if detail != "" else ""),
                  flush=True)
        return bool(cond)

    def eq(self, got, want, what):
        return self.check(got == want, what, "got %r, want %r" % (got, want))

    def run(self, name, fn, *args, **kw):
        """Run one sub-test; an exception counts as one failure."""
        log("--- %s" % name)
        try:
            return fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - reported as a failure
            traceback.print_exc()
            self.check(False, name, "raised %r" % (e,))
            return None

    def summary(self):
        if self.failures:
            print("failed: " + "; ".join(self.failures), flush=True)
        print("%d passed, %d failed" % (self.passed, self.failed), flush=True)
        return 0 if self.failed == 0 and self.passed > 0 else 1


def main(name, test):
    """The whole run of a one-stack test script: parse the arguments, start a
    Stack, run test(t, stack, args) as check group `name`, stop the stack,
    print the summary. @returns the exit code (sys.exit(bwtest.main(...)))."""
    args = parse_args()
    t = Checks()
    t0 = time.monotonic()
    try:
        with Stack(keep=args.keep) as stack:
            t.run(name, test, t, stack, args)
    except Exception as e:  # noqa: BLE001
        t.check(False, "stack start/stop", repr(e))
    log("run time %.1fs" % (time.monotonic() - t0))
    return t.summary()

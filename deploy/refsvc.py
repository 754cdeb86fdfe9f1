#!/usr/bin/env python3
"""Reference wallet and user services for billing-worker (PRODUCT.md section 7).

One process serves both services, each on its own port, over one shared credit
ledger, plus a control port for tests:

  wallet   POST {consume_path}                 /api/v1/users/{user_id}/credits/consume
  user     POST {record_path}                  /api/v1/usage/records
           POST {consume_path}                 same ledger as the wallet, via="user_service"
  control  GET  /_control/health               {"ok": true}
           GET  /_control/ledger               every applied charge, in order
           GET  /_control/calls                every HTTP call received by wallet and user
           GET  /_control/records              usage records of the user service
           GET  /_control/balances             {"default": "1000", "users": {"u1": "995.0000"}}
           POST /_control/balances             {"users": {"u1": 5}} and/or {"default": 1000}
           GET  /_control/faults               the active faults
           POST /_control/faults               a fault object, or a list of them (below)
           GET  /_control/stats                counters (applied, replays, key_conflicts, ...)
           POST /_control/config               {"wallet_format": "standard"|"legacy",
                                                "token_secret": "..."|null}
           POST /_control/reset                clear ledger, calls, records, faults,
                                               balances, idempotency keys, counters, config
  The control endpoints are also answered on the wallet and user ports (while
  those listen).

Semantics:
  * user_id is percent-decoded from the raw path segment (UTF-8); the path is
    never normalised, so "..", "%2F" etc. reach the ledger as sent.
  * Idempotency-Key: the first outcome of a key (200 or 402) is stored and a
    repeated key gets exactly that answer (same transaction_id) and applies
    nothing, also when the repeat goes to the other service: wallet and user
    service share one key namespace. A repeat with a different amount or user
    is logged as a warning and counted (stats.key_conflicts). A request without
    the header is applied every time.
  * Amounts are decimal.Decimal parsed from the JSON text (exact); the ledger
    keeps the amount exactly as written ("5.0000"). Balances start at
    --initial-balance (1000) per user; 402 {"detail": "Insufficient credits"}
    when the balance is below the amount (the key's recorded outcome).
  * --token-secret: every service call needs "Authorization: Bearer <HS256 JWT>"
    with a "sub" and an unexpired "exp", else 401.
  * --tls-cert FILE --tls-key FILE: the wallet and user ports speak HTTPS (the
    control port stays plain HTTP); --tls-client-ca FILE also requires a client
    certificate signed by that CA. The TLS handshake runs in the connection's
    thread; a failed one is logged ("TLS handshake failed") and counted
    (stats.tls_failures). With TLS, each call log entry has "client_cert": the
    subject CN of the client's certificate (null without one).

Fault injection, POST /_control/faults with one object (replaces the target's
faults; "append": true adds to them) or a list (applied in order per target):
  {"target": "wallet"|"user", "mode": MODE, "count": N (requests; -1 forever,
   default -1), "path": "substring of the path to match" (optional),
   "status": 503, "retry_after": seconds, "body": {...}, "delay_ms": 5000,
   "duration_ms": ms (optional: the fault ends after this time)}
  MODE:
    ok               clear the target's faults (and listen again after refuse)
    status           answer `status` without applying (402: the insufficient
                     credits body; other statuses: `body` if given, else a
                     {"detail": ...}); Retry-After when retry_after is given
    delay            sleep delay_ms, then answer normally; while it sleeps the key
                     is reserved, and a concurrent request with the same key gets
                     409 {"detail": "...in progress"} (no transaction_id)
    refuse           close the listening socket and open connections: connects
                     are refused until the fault is cleared ("ok", reset, or
                     duration_ms), then the port is listened on again
    drop_before      read the request, close the connection without answering,
                     apply nothing
    apply_then_drop  apply the charge, then close without answering
Stdlib only; Python 3.9+.
"""

import argparse
import base64
import hashlib
import hmac
import json
import re
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from decimal import Decimal, InvalidOperation, getcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

getcontext().prec = 60  # balances and amounts stay exact at any realistic size

MODES = ("ok", "status", "delay", "refuse", "drop_before", "apply_then_drop")
TARGETS = ("wallet", "user")


def log(msg):
    sys.stderr.write("%s refsvc: %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S"), msg))
    sys.stderr.flush()


def now_iso():
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (int(t * 1000) % 1000)


def jdump(obj):
    """JSON text with Decimal written as an exact JSON number."""
    if isinstance(obj, Decimal):
        return str(obj)
    if isinstance(obj, dict):
        return "{" + ",".join(json.dumps(str(k)) + ":" + jdump(v) for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(jdump(v) for v in obj) + "]"
    return json.dumps(obj)


class BadRequest(Exception):
    def __init__(self, status, detail):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def b64url_decode(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def verify_jwt(token, secret):
    """Return None when `token` is a valid HS256 JWT with sub and exp, else why not."""
    parts = token.split(".")
    if len(parts) != 3:
        return "not a JWT"
    try:
        header = json.loads(b64url_decode(parts[0]))
        payload = json.loads(b64url_decode(parts[1]))
        sig = b64url_decode(parts[2])
    except (ValueError, UnicodeDecodeError):
        return "undecodable JWT"
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        return "alg must be HS256"
    want = hmac.new(secret.encode(), (parts[0] + "." + parts[1]).encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(want, sig):
        return "bad signature"
    if not isinstance(payload, dict) or not isinstance(payload.get("sub"), str):
        return "no sub"
    exp = payload.get("exp")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool) or exp <= time.time():
        return "expired or no exp"
    return None


class Fault:
    def __init__(self, spec):
        if not isinstance(spec, dict):
            raise BadRequest(422, "a fault is a JSON object")
        self.target = spec.get("target", "wallet")
        self.mode = spec.get("mode", "ok")
        if self.target not in TARGETS:
            raise BadRequest(422, "target must be one of %s" % (TARGETS,))
        if self.mode not in MODES:
            raise BadRequest(422, "mode must be one of %s" % (MODES,))
        self.status = int(spec.get("status", 503))
        self.delay_ms = int(spec.get("delay_ms", 0))
        self.count = int(spec.get("count", -1))
        self.retry_after = spec.get("retry_after")
        self.body = spec.get("body")
        self.path = spec.get("path")
        self.duration_ms = float(spec["duration_ms"]) if spec.get("duration_ms") else None
        self.expires = time.time() + self.duration_ms / 1000.0 if self.duration_ms else None
        self.spec = spec

    def describe(self):
        d = dict(self.spec)
        d["remaining"] = self.count
        return d


class Service:
    """One listening HTTP server (wallet, user or control) that can stop and
    resume listening on its port (the `refuse` fault)."""

    def __init__(self, name, host, port, handler):
        self.name = name
        self.host = host
        self.port = port
        self.handler = handler
        self.server = None
        self.conns = set()
        self.conns_lock = threading.Lock()
        self.listen_lock = threading.Lock()

    def listen(self):
        with self.listen_lock:
            if self.server is not None:
                return
            srv = Server((self.host, self.port), self.handler)
            srv.service = self
            srv.ssl_context = TLS_CONTEXT if self.name in TARGETS else None
            self.server = srv
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                             name="serve-%s" % self.name, daemon=True).start()
            log("%s listening on %s:%d" % (self.name, self.host, self.port))

    def unlisten(self):
        """Close the listening socket and every open connection."""
        with self.listen_lock:
            srv, self.server = self.server, None
            if srv is None:
                return
            srv.shutdown()
            srv.server_close()
            with self.conns_lock:
                conns = list(self.conns)
            for c in conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            log("%s stopped listening on %s:%d (refuse)" % (self.name, self.host, self.port))

    @property
    def listening(self):
        return self.server is not None


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128
    allow_reuse_address = True
    ssl_context = None  # set per service: HTTPS on the wallet and user ports

    def get_request(self):
        sock, addr = super().get_request()
        if self.ssl_context is not None:
            # The handshake happens in the connection's thread (Handler.setup),
            # so a slow or failing client never holds up the accept loop.
            sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, ssl.SSLError) or getattr(exc, "tls_handshake", False):
            if STATE is not None:
                with STATE.lock:
                    STATE.stats["tls_failures"] = STATE.stats.get("tls_failures", 0) + 1
            log("%s: TLS handshake failed with %s:%s: %s"
                % (getattr(self.service, "name", "?"), client_address[0],
                   client_address[1], exc))
            return
        super().handle_error(request, client_address)


TLS_CONTEXT = None  # ssl.SSLContext for the wallet and user ports (--tls-cert)


class State:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.services = {}
        self.txn_seq = 0  # never reset: transaction ids stay unique per process
        self.record_seq = 0
        self.reset_locked()

    def reset_locked(self):
        self.default_balance = Decimal(self.args.initial_balance)
        self.balances = {}
        self.outcomes = {}  # idempotency key -> dict(status, body, user_id, amount, via)
        self.inflight = set()
        self.records = []
        self.record_keys = {}  # idempotency key -> record id
        self.ledger = []
        self.calls = []
        self.faults = {t: [] for t in TARGETS}
        self.wallet_format = self.args.wallet_format
        self.token_secret = self.args.token_secret
        self.stats = dict.fromkeys(
            ("calls", "applied", "replays", "key_conflicts", "insufficient", "in_flight",
             "faults_injected", "unauthorized", "records", "record_replays", "invalid",
             "tls_failures"), 0)

    # -- faults ---------------------------------------------------------------
    def set_faults(self, specs):
        faults = [Fault(s) for s in specs]
        relisten, unlisten = set(), set()
        with self.lock:
            for f in faults:
                lst = self.faults[f.target]
                if not f.spec.get("append"):
                    if any(x.mode == "refuse" for x in lst):
                        relisten.add(f.target)
                    lst.clear()
                if f.mode == "ok":
                    continue
                lst.append(f)
                if f.mode == "refuse":
                    unlisten.add(f.target)
                    relisten.discard(f.target)
                    if f.duration_ms:
                        threading.Timer(f.duration_ms / 1000.0, self.end_refuse, (f,)).start()
        for t in relisten:
            self.services[t].listen()
        for t in unlisten:
            self.services[t].unlisten()
        log("faults now: %s" % json.dumps(self.fault_list()))

    def end_refuse(self, fault):
        with self.lock:
            lst = self.faults[fault.target]
            if fault not in lst:
                return
            lst.remove(fault)
            still = any(x.mode == "refuse" for x in lst)
        if not still:
            self.services[fault.target].listen()

    def take_fault(self, target, path):
        """The fault that applies to this request (its count consumed), or None."""
        with self.lock:
            lst = self.faults[target]
            t = time.time()
            lst[:] = [f for f in lst if f.expires is None or f.expires > t]
            for f in lst:
                if f.path and f.path not in path:
                    continue
                if f.count == 0:
                    continue
                if f.count > 0:
                    f.count -= 1
                    if f.count == 0 and f.mode != "refuse":
                        lst.remove(f)
                self.stats["faults_injected"] += 1
                return f
        return None

    def fault_list(self):
        return {t: [f.describe() for f in self.faults[t]] for t in TARGETS}

    def clear_all(self):
        with self.lock:
            refused = [t for t in TARGETS if any(f.mode == "refuse" for f in self.faults[t])]
            self.reset_locked()
        for t in TARGETS:
            self.services[t].listen()
        if refused:
            log("reset: listening again on %s" % ", ".join(refused))


STATE = None  # set in main()


def client_cn(conn):
    """Subject CN of the TLS peer's (verified) certificate, or None."""
    try:
        cert = conn.getpeercert()
    except (ValueError, OSError):
        return None
    for rdn in (cert or {}).get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return v
    return None


def parse_path_template(template):
    """'/api/v1/users/{user_id}/credits/consume' -> compiled regex on the raw path."""
    parts = template.split("{user_id}")
    if len(parts) != 2:
        raise SystemExit("path template needs exactly one {user_id}: %r" % template)
    return re.compile("^" + re.escape(parts[0]) + "([^/]+)" + re.escape(parts[1]) + "$")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    # Headers and body leave in two send() calls: with Nagle's algorithm on,
    # the body waits for the client's delayed ACK (~40 ms per keep-alive call).
    disable_nagle_algorithm = True
    server_version = "bw-refsvc/1"
    service_name = None  # "wallet", "user" or None (control port)

    # -- connection bookkeeping (for `refuse`) ----------------------------------
    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError) as e:
                e.tls_handshake = True
                raise
            self.request.settimeout(None)
        super().setup()
        svc = getattr(self.server, "service", None)
        if svc is not None:
            with svc.conns_lock:
                svc.conns.add(self.connection)

    def finish(self):
        svc = getattr(self.server, "service", None)
        if svc is not None:
            with svc.conns_lock:
                svc.conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, fmt, *args):  # the call log replaces the default access log
        pass

    # -- plumbing ---------------------------------------------------------------
    def read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(3)
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def respond(self, status, obj, headers=None):
        data = (jdump(obj) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def drop(self):
        """Close the connection without an answer."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def dispatch(self, method):
        raw_path = self.path.split("?", 1)[0]
        try:
            if raw_path.startswith("/_control/"):
                self.control(method, raw_path)
            elif self.service_name is None:
                self.respond(404, {"detail": "control port: only /_control/*"})
            else:
                self.service_call(method, raw_path)
        except BadRequest as e:
            self.respond(e.status, {"detail": e.detail})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # -- control API --------------------------------------------------------------
    def control_body(self):
        body = self.read_body()
        if not body.strip():
            return {}
        try:
            return json.loads(body, parse_float=Decimal)
        except ValueError:
            raise BadRequest(400, "control body is not JSON")

    def control(self, method, path):
        st = STATE
        name = path[len("/_control/"):].rstrip("/")
        if method == "GET":
            with st.lock:
                if name == "health":
                    out = {"ok": True}
                elif name == "ledger":
                    out = list(st.ledger)
                elif name == "calls":
                    out = list(st.calls)
                elif name == "records":
                    out = list(st.records)
                elif name == "balances":
                    out = {"default": str(st.default_balance),
                           "users": {u: str(b) for u, b in st.balances.items()}}
                elif name == "faults":
                    out = st.fault_list()
                elif name == "stats":
                    out = dict(st.stats)
                else:
                    raise BadRequest(404, "unknown control endpoint")
            return self.respond(200, out)
        if method != "POST":
            raise BadRequest(405, "GET or POST")
        body = self.control_body()
        if name == "reset":
            st.clear_all()
            log("reset")
            return self.respond(200, {"ok": True})
        if name == "faults":
            specs = body if isinstance(body, list) else [body]
            try:
                st.set_faults(specs)
            except (TypeError, ValueError) as e:
                raise BadRequest(422, "bad fault: %s" % e)
            return self.respond(200, st.fault_list())
        if name == "balances":
            if not isinstance(body, dict):
                raise BadRequest(422, "balances body is an object")
            with st.lock:
                try:
                    if "default" in body:
                        st.default_balance = Decimal(str(body["default"]))
                    users = dict(body.get("users") or {})
                    if "user_id" in body:
                        users[body["user_id"]] = body.get("balance", 0)
                    for u, b in users.items():
                        st.balances[str(u)] = Decimal(str(b))
                except InvalidOperation:
                    raise BadRequest(422, "balances must be numbers")
                out = {"default": str(st.default_balance),
                       "users": {u: str(b) for u, b in st.balances.items()}}
            return self.respond(200, out)
        if name == "config":
            if not isinstance(body, dict):
                raise BadRequest(422, "config body is an object")
            with st.lock:
                if "wallet_format" in body:
                    if body["wallet_format"] not in ("standard", "legacy"):
                        raise BadRequest(422, "wallet_format: standard or legacy")
                    st.wallet_format = body["wallet_format"]
                if "token_secret" in body:
                    st.token_secret = body["token_secret"] or None
                out = {"wallet_format": st.wallet_format,
                       "auth": st.token_secret is not None}
            return self.respond(200, out)
        raise BadRequest(404, "unknown control endpoint")

    # -- wallet / user service ---------------------------------------------------------
    def service_call(self, method, path):
        st = STATE
        svc = self.service_name
        body = self.read_body()
        key = self.headers.get("Idempotency-Key")
        call = {"service": svc, "method": method, "path": self.path, "key": key,
                "status": None, "outcome": None, "time": now_iso(),
                "authorization": self.headers.get("Authorization") is not None}
        if isinstance(self.connection, ssl.SSLSocket):
            call["client_cert"] = client_cn(self.connection)
        with st.lock:
            st.calls.append(call)
            st.stats["calls"] += 1
        status, outcome = None, None
        try:
            status, outcome = self.serve(method, path, svc, key, body)
        finally:
            call["status"], call["outcome"] = status, outcome
            log("%s %s %s key=%s -> %s %s" % (svc, method, self.path, key,
                                               status if status is not None else "(dropped)",
                                               outcome))

    def serve(self, method, path, svc, key, body):
        """Handle one service request; returns (status answered or None, outcome)."""
        st = STATE
        fault = st.take_fault(svc, path)
        delay_ms = 0
        drop_after = False
        if fault is not None:
            if fault.mode == "status":
                if fault.status == 402:
                    obj = {"detail": "Insufficient credits"}
                elif fault.body is not None:
                    obj = fault.body
                else:
                    obj = {"detail": "injected fault: HTTP %d" % fault.status}
                hdrs = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
                self.respond(fault.status, obj, hdrs)
                return fault.status, "fault:status"
            if fault.mode in ("drop_before", "refuse"):
                self.drop()
                return None, "fault:" + fault.mode
            if fault.mode == "delay":
                delay_ms = fault.delay_ms
            if fault.mode == "apply_then_drop":
                drop_after = True

        if method != "POST":
            self.respond(405, {"detail": "Method Not Allowed"})
            return 405, "method"

        secret = st.token_secret
        if secret:
            auth = self.headers.get("Authorization") or ""
            why = "no bearer token"
            if auth.startswith("Bearer "):
                why = verify_jwt(auth[len("Bearer "):].strip(), secret)
            if why is not None:
                with st.lock:
                    st.stats["unauthorized"] += 1
                if delay_ms:
                    time.sleep(delay_ms / 1000.0)
                self.respond(401, {"detail": "Unauthorized: %s" % why})
                return 401, "unauthorized"

        m = CONSUME_RE.match(path)
        if m:
            via = "wallet" if svc == "wallet" else "user_service"
            status, obj, outcome = self.consume(m.group(1), key, body, via, delay_ms)
        elif svc == "user" and path == ARGS.record_path:
            if delay_ms:
                time.sleep(delay_ms / 1000.0)
            status, obj, outcome = self.record(key, body)
        else:
            if delay_ms:
                time.sleep(delay_ms / 1000.0)
            status, obj, outcome = 404, {"detail": "Not Found"}, "not_found"
        if drop_after:
            self.drop()
            return None, outcome + "+fault:apply_then_drop"
        self.respond(status, obj)
        return status, outcome

    def consume(self, raw_user, key, body, via, delay_ms):
        """Apply one consume request; returns (status, body object, outcome)."""
        st = STATE
        try:
            user_id = urllib.parse.unquote_to_bytes(raw_user).decode("utf-8")
        except UnicodeDecodeError:
            return 400, {"detail": "user_id is not UTF-8"}, "invalid"
        try:
            req = json.loads(body, parse_float=Decimal)
        except ValueError:
            req = None
        amount = req.get("amount") if isinstance(req, dict) else None
        if isinstance(amount, bool) or not isinstance(amount, (int, Decimal)):
            with st.lock:
                st.stats["invalid"] += 1
            return 422, {"detail": "amount must be a JSON number"}, "invalid"
        amount = Decimal(amount)
        if not amount.is_finite() or amount <= 0:
            with st.lock:
                st.stats["invalid"] += 1
            return 422, {"detail": "amount must be positive"}, "invalid"

        reserved = False
        if delay_ms:
            with st.lock:
                if key and key not in st.outcomes and key not in st.inflight:
                    st.inflight.add(key)
                    reserved = True
            time.sleep(delay_ms / 1000.0)

        with st.lock:
            if reserved:
                st.inflight.discard(key)
            if key and key in st.outcomes:
                first = st.outcomes[key]
                st.stats["replays"] += 1
                if first["amount"] != amount or first["user_id"] != user_id:
                    st.stats["key_conflicts"] += 1
                    log("WARNING: key %s repeated with user %r amount %s; first was user %r "
                        "amount %s (answering the first outcome)"
                        % (key, user_id, amount, first["user_id"], first["amount"]))
                return first["status"], first["body"], "replay"
            if key and key in st.inflight:
                st.stats["in_flight"] += 1
                return 409, {"detail": "A request with this Idempotency-Key is in progress"}, \
                    "in_flight"
            balance = st.balances.get(user_id, st.default_balance)
            if balance < amount:
                status, obj, outcome = 402, {"detail": "Insufficient credits"}, "insufficient"
                st.stats["insufficient"] += 1
            else:
                balance -= amount
                st.balances[user_id] = balance
                st.txn_seq += 1
                txn = "t-%d" % st.txn_seq
                if st.wallet_format == "legacy":
                    obj = {"data": {"remaining_balance": balance}, "transaction_id": txn}
                else:
                    obj = {"success": True, "balance": balance, "transaction_id": txn}
                status, outcome = 200, "applied"
                st.stats["applied"] += 1
                st.ledger.append({
                    "key": key, "user_id": user_id, "amount": str(amount), "via": via,
                    "request_id": req.get("request_id"), "transaction_id": txn,
                    "balance_after": str(balance), "body": body.decode("utf-8", "replace"),
                    "time": now_iso()})
            if key:
                st.outcomes[key] = {"status": status, "body": obj, "user_id": user_id,
                                    "amount": amount, "via": via}
            return status, obj, outcome

    def record(self, key, body):
        st = STATE
        try:
            req = json.loads(body, parse_float=Decimal)
        except ValueError:
            req = None
        if not isinstance(req, dict):
            with st.lock:
                st.stats["invalid"] += 1
            return 422, {"detail": "body must be a JSON object"}, "invalid"
        with st.lock:
            if key and key in st.record_keys:
                st.stats["record_replays"] += 1
                return 200, {"success": True, "data": {"id": st.record_keys[key]}}, "replay"
            st.record_seq += 1
            rid = st.record_seq
            if key:
                st.record_keys[key] = rid
            st.stats["records"] += 1
            st.records.append({"id": rid, "key": key, "user_id": req.get("user_id"),
                               "request_id": req.get("request_id"),
                               "body": body.decode("utf-8", "replace"), "time": now_iso()})
        return 200, {"success": True, "data": {"id": rid}}, "recorded"


def main():
    global STATE, ARGS, CONSUME_RE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--wallet-port", type=int, default=8208)
    ap.add_argument("--user-port", type=int, default=8202)
    ap.add_argument("--control-port", type=int, default=0,
                    help="a port for the control API alone (it stays reachable while a "
                         "`refuse` fault closes a service port); 0: none. The control "
                         "API is always served on the service ports too")
    ap.add_argument("--initial-balance", default="1000", help="balance of a new user")
    ap.add_argument("--consume-path", default="/api/v1/users/{user_id}/credits/consume")
    ap.add_argument("--record-path", default="/api/v1/usage/records")
    ap.add_argument("--wallet-format", choices=("standard", "legacy"), default="standard",
                    help='legacy: {"data": {"remaining_balance": ...}, "transaction_id": ...}')
    ap.add_argument("--token-secret", help="require an HS256 JWT signed with this secret")
    ap.add_argument("--token-secret-file", help="the same, read from a file")
    ap.add_argument("--tls-cert", help="HTTPS on the wallet and user ports: the server "
                                       "certificate (PEM, chain after it)")
    ap.add_argument("--tls-key", help="the private key of --tls-cert (PEM)")
    ap.add_argument("--tls-client-ca", help="require a client certificate signed by this CA "
                                            "(PEM) on the wallet and user ports")
    args = ap.parse_args()
    global TLS_CONTEXT
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        if not (args.tls_cert and args.tls_key):
            ap.error("--tls-cert and --tls-key go together (and --tls-client-ca needs them)")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_client_ca:
            ctx.load_verify_locations(cafile=args.tls_client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        TLS_CONTEXT = ctx
    if args.token_secret_file:
        with open(args.token_secret_file) as f:
            args.token_secret = f.read().strip()
    Decimal(args.initial_balance)
    ARGS = args
    CONSUME_RE = parse_path_template(args.consume_path)
    STATE = State(args)

    def handler(name):
        return type("Handler_%s" % (name or "control"), (Handler,), {"service_name": name})

    STATE.services["wallet"] = Service("wallet", args.host, args.wallet_port, handler("wallet"))
    STATE.services["user"] = Service("user", args.host, args.user_port, handler("user"))
    services = list(STATE.services.values())
    if args.control_port:
        services.append(Service("control", args.host, args.control_port, handler(None)))
    for s in services:
        s.listen()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    log("exiting")


ARGS = None
CONSUME_RE = None

if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""0042-ops-security: secrets never logged, hostile input handled, environment
overrides (PRODUCT.md sections 7, 9 and 10; docs/operations.md section 8).

The reference services verify an HS256 JWT on every call (refsvc.py
--token-secret-file). The worker's wallet URL is a capturing proxy in this
test that forwards to the reference wallet and records each Authorization
header, so the test knows every token the worker sent.

(a) Secret grep. worker-jwt: auth.jwt_secret_file with a distinctive secret,
    log.level debug and -v. Requests settle; the JWT is HS256 with sub =
    settle.service_name and a short exp. Then the secret is rotated (the
    services switch first, the file is replaced atomically): the worker's
    call gets 401, it re-reads the file and settles. worker-token:
    auth.token_file with a static token. Neither log holds a secret, a token
    sent, a JWT part (no "eyJ"), or "Bearer ".
(b) Hostile user id: user_id "../../admin?x=1#y" (and a request_id with "/",
    "?", "#", "%") reaches the wallet as that exact id: ledger user_id
    "../../admin?x=1#y", call path /api/v1/users/..%2F..%2Fadmin%3Fx%3D1%23y/
    credits/consume, Idempotency-Key bw:<percent-encoded request_id>.
(c) Environment overrides: wallet.url in the file points at a closed port,
    BW_WALLET_URL at the reference wallet: requests settle via the wallet (the
    user service never called). BW_SETTLE_MAX_ATTEMPTS=abc: exit 2 with
    "env BW_SETTLE_MAX_ATTEMPTS" on stderr.
(d) Hostile events on one partition: an oversize event, 40-deep nested JSON,
    invalid UTF-8 (a bad byte, an overlong encoding, an encoded surrogate) go
    to the dead-letter topic with reasons too_large / invalid_json /
    invalid_json (original bytes kept), metrics count them; a request with
    20-deep nesting in an unknown field and the requests after the bad ones
    on that partition settle (the partition is not blocked).
"""

import base64
import hashlib
import hmac
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bwtest  # noqa: E402
import pricing_model as pm  # noqa: E402
from bwtest import Checks, Stack, log, wait_until  # noqa: E402

PRICING = pm.Pricing(pm.example_spec("e2e-security-1"))
SERVICE_NAME = "billing-worker-e2e-sec"
PART = 1
MAX_EVENT_BYTES = 65536


class Quiet(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class CaptureProxy:
    """Forwards POSTs to the reference wallet; records (path, headers)."""

    def __init__(self, target_port):
        self.calls = []
        self.lock = threading.Lock()
        me = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                with me.lock:
                    me.calls.append((self.path, dict(self.headers.items())))
                hdrs = {k: v for k, v in self.headers.items()
                        if k.lower() in ("content-type", "idempotency-key", "authorization")}
                c = http.client.HTTPConnection("127.0.0.1", target_port, timeout=10)
                try:
                    c.request("POST", self.path, body=body, headers=hdrs)
                    r = c.getresponse()
                    data, status = r.read(), r.status
                finally:
                    c.close()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.port = bwtest.free_port()
        self.srv = Quiet(("127.0.0.1", self.port), H)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def tokens(self):
        with self.lock:
            return [h.get("Authorization") for _, h in self.calls]

    def stop(self):
        self.srv.shutdown()
        self.srv.server_close()


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def b64url_decode(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def mint_jwt(secret, sub, ttl):
    now = int(time.time())
    h = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    p = b64url(json.dumps({"sub": sub, "iat": now, "exp": now + ttl},
                          separators=(",", ":")).encode())
    sig = hmac.new(secret.encode(), ("%s.%s" % (h, p)).encode(), hashlib.sha256).digest()
    return "%s.%s.%s" % (h, p, b64url(sig))


def write_atomic(path, text):
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def request(rid, uid, i=0):
    return [
        bwtest.model_call(rid, uid, model="gpt-4o-mini", usage={
            "prompt_tokens": 2000 + i, "completion_tokens": 150}),
        bwtest.tool_call(rid, uid, tool_name="web_search", units=1),
        bwtest.finalize(rid, uid, expected=(1, 1)),
    ]


def settled(stack, keys, timeout=40):
    def f():
        recs = {r["idempotency_key"]: r for r in stack.settlements()}
        return recs if all(k in recs for k in keys) else None
    return wait_until(f, timeout=timeout, interval=0.3, what="settlements %s" % sorted(keys))


def grep_log(t, w, who, needles):
    text = w.log()
    t.check(len(text) > 500, "%s: the debug log is not empty (%d bytes)" % (who, len(text)))
    debug = sum(1 for x in w.log_json() if x.get("level") == "debug")
    t.check(debug > 0, "%s: the log has debug lines (%d)" % (who, debug))
    for what, needle in needles:
        if not needle:
            continue
        at = text.find(needle)
        t.check(at < 0, "%s: the log does not contain %s" % (who, what),
                "found at byte %d: ...%s..." % (at, text[max(0, at - 80):at + 80]))


def part_a(t, stack, args, secret_file, secret1, proxy):
    cfg = stack.write_config(pricing=PRICING.libconfig(),
                             wallet={"url": proxy.url, "timeout": "2s"},
                             auth={"jwt_secret_file": str(secret_file)},
                             settle={"service_name": SERVICE_NAME, "finalize_grace": "1s",
                                     "max_attempts": 2, "retry_max_interval": "1s"},
                             log={"level": "debug", "format": "json"})
    w = stack.worker(args.bin, cfg, args=["-v"], name="worker-jwt").start()
    w.wait_ready(60)
    reqs = {"r-sec-%d" % i: request("r-sec-%d" % i, "u-sec", i) for i in range(3)}
    stack.produce([e for evs in reqs.values() for e in evs])
    recs = settled(stack, ["bw:" + r for r in reqs])
    t.eq(sorted(recs["bw:" + r]["settled_via"] for r in reqs), ["wallet"] * 3,
         "JWT auth: 3 requests settled via the wallet (the services verify the token)")
    toks = [x for x in proxy.tokens() if x]
    t.check(toks and all(x.startswith("Bearer ") for x in toks),
            "every wallet call carried Authorization: Bearer <token>", toks[:2])
    jwt1 = toks[0][len("Bearer "):] if toks else ""
    parts = jwt1.split(".")
    try:
        hdr, claims = json.loads(b64url_decode(parts[0])), json.loads(b64url_decode(parts[1]))
    except (ValueError, IndexError):
        hdr, claims = {}, {}
    t.eq(hdr.get("alg"), "HS256", "JWT header alg HS256")
    t.eq(claims.get("sub"), SERVICE_NAME, "JWT sub == settle.service_name")
    iat, exp = claims.get("iat"), claims.get("exp")
    t.check(isinstance(iat, int) and isinstance(exp, int) and 0 < exp - iat <= 3600 and
            exp > time.time(), "JWT has iat and a short, future exp (exp-iat = %s s)"
            % ((exp - iat) if isinstance(exp, int) and isinstance(iat, int) else None))
    want_sig = b64url(hmac.new(secret1.encode(), ("%s.%s" % (parts[0], parts[1])).encode()
                               if len(parts) == 3 else b"", hashlib.sha256).digest())
    t.check(len(parts) == 3 and parts[2] == want_sig, "JWT signed with the secret of the file")

    # Rotation: the services switch first, then the file is replaced atomically.
    secret2 = "bw-e2e-ROTATED-" + os.urandom(12).hex()
    stack.refsvc_config(token_secret=secret2)
    write_atomic(secret_file, secret2 + "\n")
    n401 = stack.stats().get("unauthorized", 0)
    reqs2 = {"r-sec-rot-%d" % i: request("r-sec-rot-%d" % i, "u-sec", i) for i in range(2)}
    stack.produce([e for evs in reqs2.values() for e in evs])
    recs = settled(stack, ["bw:" + r for r in reqs2])
    t.eq(sorted(recs["bw:" + r]["settled_via"] for r in reqs2), ["wallet"] * 2,
         "after the rotation: settled via the wallet")
    t.check(stack.stats().get("unauthorized", 0) > n401,
            "the first call after the rotation was refused (401)")
    t.check(any(x.get("msg") == "service token refreshed" for x in w.log_json()),
            "the worker logged 'service token refreshed' (it re-read the file)")
    toks = [x for x in proxy.tokens() if x]
    jwts = sorted({x[len("Bearer "):] for x in toks})
    t.eq(w.stop(), 0, "worker-jwt: SIGTERM exits 0")

    needles = [("the first secret", secret1), ("the rotated secret", secret2),
               ("'Bearer '", "Bearer "), ("a base64url JSON segment ('eyJ')", "eyJ")]
    for i, j in enumerate(jwts):
        needles.append(("JWT #%d sent (whole)" % (i + 1), j))
        needles.append(("JWT #%d's signature" % (i + 1), j.rsplit(".", 1)[-1]))
    log("worker-jwt sent %d distinct JWTs" % len(jwts))
    t.check(len(jwts) >= 2, "a new JWT was minted after the rotation (%d distinct)" % len(jwts))
    grep_log(t, w, "worker-jwt", needles)
    return secret2


def part_a_token(t, stack, args, secret2, proxy):
    token = mint_jwt(secret2, SERVICE_NAME, 3600)  # the services accept it as a static token
    tf = stack.dir / "bw-static-token"
    tf.write_text(token + "\n")
    os.chmod(tf, 0o600)
    cfg = stack.write_config(pricing=PRICING.libconfig(),
                             wallet={"url": proxy.url, "timeout": "2s"},
                             auth={"token_file": str(tf)},
                             settle={"service_name": SERVICE_NAME, "finalize_grace": "1s",
                                     "max_attempts": 2},
                             log={"level": "debug", "format": "json"})
    n_calls = len(proxy.calls)
    w = stack.worker(args.bin, cfg, args=["-v"], name="worker-token").start()
    w.wait_ready(60)
    reqs = {"r-sec-tok-%d" % i: request("r-sec-tok-%d" % i, "u-sec", i) for i in range(2)}
    stack.produce([e for evs in reqs.values() for e in evs])
    recs = settled(stack, ["bw:" + r for r in reqs])
    t.eq(sorted(recs["bw:" + r]["settled_via"] for r in reqs), ["wallet"] * 2,
         "static token: settled via the wallet")
    sent = proxy.tokens()[n_calls:]
    t.check(sent and all(x == "Bearer " + token for x in sent),
            "every call carried Authorization: Bearer <the token file's content>",
            sent[:2])
    t.eq(w.stop(), 0, "worker-token: SIGTERM exits 0")
    grep_log(t, w, "worker-token", [("the static token", token),
                                    ("the static token's last part", token.rsplit(".", 1)[-1]),
                                    ("'Bearer '", "Bearer "), ("'eyJ'", "eyJ"),
                                    ("the secret", secret2)])


def dlq_headers(stack):
    p = subprocess.run(["kcat", "-C", "-b", stack.brokers, "-t", stack.dlq_topic, "-o",
                        "beginning", "-e", "-q", "-J"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    out = {}
    for line in p.stdout.decode("utf-8", "replace").splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            h = rec.get("headers") or []
            out[(rec["partition"], rec["offset"])] = dict(zip(h[0::2], h[1::2]))
    return out


def nested(depth):
    """A JSON value nested `depth` levels deep: [[...[1]...]] (alternating)."""
    s = "1"
    for i in range(depth):
        s = ("[%s]" if i % 2 == 0 else '{"k":%s}') % s
    return s


def part_bcd(t, stack, args, secret_file):
    closed = bwtest.free_port()
    # (c) invalid env value
    cfg_bad = stack.write_config(pricing=PRICING.libconfig(),
                                 auth={"jwt_secret_file": str(secret_file)})
    p = bwtest.run_cli(args.bin, "run", "-c", cfg_bad, timeout=30,
                       env={"BW_SETTLE_MAX_ATTEMPTS": "abc"})
    err = p.stderr.decode("utf-8", "replace")
    t.eq(p.returncode, 2, "BW_SETTLE_MAX_ATTEMPTS=abc: exit 2")
    t.check("env BW_SETTLE_MAX_ATTEMPTS" in err, "... stderr names env BW_SETTLE_MAX_ATTEMPTS",
            err[-500:])

    # (c) BW_WALLET_URL overrides the file's wallet.url
    cfg = stack.write_config(pricing=PRICING.libconfig(),
                             wallet={"url": "http://127.0.0.1:%d" % closed, "timeout": "2s"},
                             auth={"jwt_secret_file": str(secret_file)},
                             settle={"finalize_grace": "1s", "max_attempts": 2},
                             limits={"max_event_bytes": MAX_EVENT_BYTES})
    w = stack.worker(args.bin, cfg, env={"BW_WALLET_URL": stack.wallet_url},
                     name="worker-env").start()
    w.wait_ready(60)
    n_user = len([c for c in stack.calls() if c["service"] == "user"])

    # (b) hostile ids, (d) hostile events, all on one partition, then valid ones.
    huid, hrid = "../../admin?x=1#y", "r-sec/../x?y=1#z%2F"
    hostile = request(hrid, huid, 5)
    deep_ok = request("r-sec-deep20", "u-sec-2", 6)
    deep_ok[0] = dict(deep_ok[0], extra=json.loads(nested(20)))
    base = {"type": "custom_model_call", "request_id": "r-sec-bad", "user_id": "u-sec-bad",
            "model": "gpt-4o"}
    big = json.dumps(dict(base, event_id="e-big", padding="x" * (MAX_EVENT_BYTES + 10)),
                     separators=(",", ":")).encode()
    deep = ('{"type":"custom_model_call","event_id":"e-deep","request_id":"r-sec-bad",'
            '"user_id":"u-sec-bad","model":"gpt-4o","extra":%s}' % nested(40)).encode()

    def with_model(eid, raw_model):
        return (b'{"type":"custom_model_call","event_id":"' + eid.encode() +
                b'","request_id":"r-sec-bad","user_id":"u-sec-bad","model":"gpt-' +
                raw_model + b'"}')
    bad = [("oversize event", big, "too_large"),
           ("40-deep nested JSON", deep, "invalid_json"),
           ("invalid UTF-8 byte", with_model("e-utf1", b"4o\xff\xfe"), "invalid_json"),
           ("overlong UTF-8", with_model("e-utf2", b"4o\xc0\xaf"), "invalid_json"),
           ("UTF-8-encoded surrogate", with_model("e-utf3", b"4o\xed\xa0\x80"), "invalid_json")]
    after = [request("r-sec-after-%d" % i, "u-sec-2", i) for i in range(2)]
    stack.produce(hostile, partition=PART)
    stack.produce(deep_ok, partition=PART)
    for _, value, _ in bad:
        stack.produce([value], partition=PART, key="r-sec-bad")
    stack.produce([e for evs in after for e in evs], partition=PART)

    want = {"bw:" + urllib.parse.quote(hrid, safe=""): PRICING.price(hostile),
            "bw:r-sec-deep20": PRICING.price(deep_ok)}
    for evs in after:
        want["bw:" + evs[0]["request_id"]] = PRICING.price(evs)
    recs = settled(stack, list(want), timeout=40)
    t.eq({k: (recs[k]["status"], recs[k]["settled_via"], recs[k]["amount_credits"])
          for k in want},
         {k: ("settled", "wallet", ch.amount_credits) for k, ch in want.items()},
         "BW_WALLET_URL (file: a closed port): every request settled via the wallet, exact "
         "amounts; the 20-deep request and those after the bad events too")
    t.eq(len([c for c in stack.calls() if c["service"] == "user"]), n_user,
         "the user service was never called (the env URL was used, not the file's)")

    hkey = "bw:" + urllib.parse.quote(hrid, safe="")
    t.eq(hkey, "bw:r-sec%2F..%2Fx%3Fy%3D1%23z%252F", "(the expected key, computed by hand)")
    hl = [e for e in stack.ledger() if e["key"] == hkey]
    t.eq([(e["user_id"], e["request_id"], e["via"]) for e in hl], [(huid, hrid, "wallet")],
         "hostile ids: the ledger shows user_id %r and request_id %r, charged once" % (huid,
                                                                                      hrid))
    hc = [c for c in stack.calls() if c["key"] == hkey]
    t.eq([c["path"] for c in hc],
         ["/api/v1/users/..%2F..%2Fadmin%3Fx%3D1%23y/credits/consume"],
         "hostile user id: the wallet saw the path with every segment percent-encoded")
    t.eq(recs[hkey].get("user_id"), huid, "the record keeps the exact user_id")
    t.eq(recs[hkey].get("request_id"), hrid, "the record keeps the exact request_id")
    bal = stack.balances()["users"]
    t.check("admin" not in bal and all(not u.startswith("/") for u in bal),
            "no other wallet account touched", sorted(bal))

    # (d) dead letters
    dl = stack.wait_messages(stack.dlq_topic, len(bad), timeout=30)
    heads = dlq_headers(stack)
    got = []
    for m in dl:
        h = heads.get((m.partition, m.offset), {})
        got.append((m.value, h.get("bw-reason"), h.get("bw-partition")))
    for name, value, reason in bad:
        hit = [g for g in got if g[0] == value]
        t.check(len(hit) == 1 and hit[0][1] == reason and hit[0][2] == str(PART),
                "%s -> dead letter %s, original bytes, source partition %d" % (name, reason,
                                                                              PART),
                [(g[1], g[2]) for g in hit])
    t.eq(len(dl), len(bad), "exactly %d dead letters" % len(bad))
    m = w.metrics()
    t.eq((int(m.get('billing_worker_dead_letters_total{reason="too_large"}', -1)),
          int(m.get('billing_worker_dead_letters_total{reason="invalid_json"}', -1))), (1, 4),
         "dead_letters_total: too_large 1, invalid_json 4")
    t.check(w.alive(), "the worker survived the hostile input")
    t.eq(w.stop(), 0, "worker-env: SIGTERM exits 0")


def test(t, stack, args, secret_file, secret1):
    proxy = CaptureProxy(stack.wallet_port)
    try:
        secret2 = t.run("(a) secret grep: JWT", part_a, t, stack, args, secret_file, secret1,
                        proxy)
        if secret2:
            t.run("(a) secret grep: static token", part_a_token, t, stack, args, secret2, proxy)
        t.run("(b)(c)(d) hostile ids, env overrides, hostile events", part_bcd, t, stack, args,
              secret_file)
    finally:
        proxy.stop()


def main():
    args = bwtest.parse_args()
    t = Checks()
    t0 = time.monotonic()
    try:
        stack = Stack(keep=args.keep)
        secret1 = "bw-e2e-SECRET-" + os.urandom(12).hex()
        secret_file = stack.dir / "bw-jwt-secret"
        secret_file.write_text(secret1 + "\n")
        os.chmod(secret_file, 0o600)
        stack.refsvc_args = "--token-secret-file %s" % secret_file
        with stack:
            t.run("security", test, t, stack, args, secret_file, secret1)
    except Exception as e:  # noqa: BLE001
        t.check(False, "stack start/stop", repr(e))
    log("run time %.1fs" % (time.monotonic() - t0))
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())

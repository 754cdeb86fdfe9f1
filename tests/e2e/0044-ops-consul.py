#!/usr/bin/env python3
"""0044-ops-consul: service discovery through the Consul HTTP health API
(PRODUCT.md section 7: `consul://<name>`, passing instances only, cached,
refreshed; section 10: consul.url, consul.refresh).

A Consul stand-in (http.server in this test) answers
GET /v1/health/service/<name>[?passing=true] in Consul's JSON format
([{"Node": {...}, "Service": {...}, "Checks": [...]}]) and, like Consul, leaves
out instances with a failing check only when `passing` is asked for. The worker
has wallet.url = "consul://wallet" (user_service a plain URL), consul.refresh 2s.

1. Consul lists the reference wallet (passing) and an instance on a closed port
   (critical): requests settle via the wallet; every health query was
   GET /v1/health/service/wallet with passing=true; the lookups are cached
   (far fewer queries than wallet calls).
2. Consul now lists only a second instance (a forwarding proxy in this test, with
   an empty Service.Address: Consul's rule is to use Node.Address then): after a
   refresh, new requests go through it, with the exact percent-encoded path.
3. Consul answers that no instance is passing (both checks critical): the
   instances it reported earlier must not be used any more ("passing
   instances only"); the wallet is "not delivered" and the request settles via
   the user-service fallback (G7).
Every key is charged exactly once.
"""

import http.client
import json
import os
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bwtest  # noqa: E402
from bwtest import Checks, Stack, log, wait_until  # noqa: E402

REFRESH_S = 2


class Quiet(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def entry(node, node_addr, svc_id, addr, port, status):
    """One element of Consul's /v1/health/service answer."""
    checks = [
        {"Node": node, "CheckID": "serfHealth", "Name": "Serf Health Status",
         "Status": "passing", "Notes": "", "Output": "Agent alive and reachable",
         "ServiceID": "", "ServiceName": "", "ServiceTags": [], "Type": "",
         "CreateIndex": 10, "ModifyIndex": 10},
        {"Node": node, "CheckID": "service:" + svc_id, "Name": "Service 'wallet' check",
         "Status": status, "Notes": "", "Output": "HTTP GET ...: 200 OK",
         "ServiceID": svc_id, "ServiceName": "wallet", "ServiceTags": ["v1"], "Type": "http",
         "CreateIndex": 12, "ModifyIndex": 40},
    ]
    return {
        "Node": {"ID": "0b2c7c4e-0000-4000-8000-%012d" % port, "Node": node,
                 "Address": node_addr, "Datacenter": "dc1",
                 "TaggedAddresses": {"lan": node_addr, "wan": node_addr},
                 "Meta": {"consul-network-segment": ""}, "CreateIndex": 5, "ModifyIndex": 5},
        "Service": {"ID": svc_id, "Service": "wallet", "Tags": ["v1"], "Address": addr,
                    "TaggedAddresses": {}, "Meta": {"version": "1"}, "Port": port,
                    "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": False,
                    "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
                    "Connect": {}, "CreateIndex": 12, "ModifyIndex": 12},
        "Checks": checks,
    }


class ConsulStandIn:
    def __init__(self):
        self.lock = threading.Lock()
        self.services = {}  # name -> [entry]
        self.queries = []  # (raw path, query dict, time)
        me = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                u = urllib.parse.urlsplit(self.path)
                q = urllib.parse.parse_qs(u.query, keep_blank_values=True)
                with me.lock:
                    me.queries.append((u.path, q, time.monotonic()))
                    prefix = "/v1/health/service/"
                    if not u.path.startswith(prefix):
                        body, status = b"Not Found", 404
                    else:
                        name = urllib.parse.unquote(u.path[len(prefix):])
                        ents = list(me.services.get(name, []))
                        passing = q.get("passing", ["false"])[0].lower() in ("", "1", "true")
                        if passing:
                            ents = [e for e in ents
                                    if all(c["Status"] == "passing" for c in e["Checks"])]
                        body, status = json.dumps(ents, indent=2).encode(), 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Consul-Index", "42")
                self.send_header("X-Consul-Knownleader", "true")
                self.send_header("X-Consul-Lastcontact", "0")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.port = bwtest.free_port()
        self.srv = Quiet(("127.0.0.1", self.port), H)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def set(self, name, entries):
        with self.lock:
            self.services[name] = entries

    def stop(self):
        self.srv.shutdown()
        self.srv.server_close()


class Proxy:
    """A second 'wallet instance': forwards every request to the real wallet and
    records (method, raw path, Idempotency-Key)."""

    def __init__(self, target_port):
        self.calls = []
        me = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                me.calls.append(("POST", self.path, self.headers.get("Idempotency-Key")))
                hdrs = {k: v for k, v in self.headers.items()
                        if k.lower() in ("content-type", "idempotency-key", "authorization")}
                c = http.client.HTTPConnection("127.0.0.1", target_port, timeout=10)
                try:
                    c.request("POST", self.path, body=body, headers=hdrs)
                    r = c.getresponse()
                    data = r.read()
                    status = r.status
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

    def stop(self):
        self.srv.shutdown()
        self.srv.server_close()


def requests(prefix, n, uid):
    out = {}
    for i in range(n):
        rid = "%s-%d" % (prefix, i)
        out[rid] = bwtest.example_request(rid, uid)  # 5 credits each (DEFAULT_PRICING)
    return out


def test(t, stack, args, consul, proxy):
    closed = bwtest.free_port()  # nothing listens there
    consul.set("wallet", [
        entry("node-a", "127.0.0.1", "wallet-a", "127.0.0.1", stack.wallet_port, "passing"),
        entry("node-x", "127.0.0.1", "wallet-x", "127.0.0.1", closed, "critical"),
    ])
    cfg = stack.write_config(wallet={"url": "consul://wallet", "timeout": "2s"},
                             consul={"url": consul.url, "refresh": "%ds" % REFRESH_S},
                             settle={"max_attempts": 2, "retry_max_interval": "1s",
                                     "breaker_failures": 100})
    w = stack.worker(args.bin, cfg).start()
    w.wait_ready(60)

    def settled(keys):
        def f():
            recs = {r["idempotency_key"]: r for r in stack.settlements()}
            return recs if all(k in recs for k in keys) else None
        return f

    # -- 1. a passing and a critical instance --
    p1 = requests("r-consul-a", 5, "u-consul")
    t0 = time.monotonic()
    stack.produce([e for evs in p1.values() for e in evs])
    keys1 = ["bw:" + r for r in p1]
    recs = wait_until(settled(keys1), timeout=40, what="phase 1 settlements")
    t.eq(sorted((recs[k]["status"], recs[k]["settled_via"], recs[k]["amount_credits"])
                for k in keys1), [("settled", "wallet", "5.0000")] * 5,
         "consul://wallet: 5 requests settled via the wallet")
    led = stack.ledger()
    t.eq(sorted((e["key"], e["via"]) for e in led), sorted((k, "wallet") for k in keys1),
         "the reference wallet (the passing instance) charged each once")
    with consul.lock:
        qs = list(consul.queries)
    t.check(len(qs) >= 1, "the worker asked the Consul stand-in", len(qs))
    t.eq(sorted({p for p, _, _ in qs}), ["/v1/health/service/wallet"],
         "every query is the health API for service 'wallet'")
    t.check(all(q.get("passing") in (["true"], ["1"], [""]) for _, q, _ in qs),
            "every query asks for passing instances only", [q for _, q, _ in qs])
    elapsed = time.monotonic() - t0
    n_wallet_calls = len([c for c in stack.calls() if c["service"] == "wallet"])
    t.check(len(qs) <= elapsed / REFRESH_S + 3 and len(qs) < n_wallet_calls + 1,
            "lookups are cached: %d queries for %d wallet calls in %.1fs (refresh %ds)"
            % (len(qs), n_wallet_calls, elapsed, REFRESH_S))

    # -- 2. another instance (Service.Address empty: Node.Address is used) --
    consul.set("wallet", [
        entry("node-a", "127.0.0.1", "wallet-a", "127.0.0.1", stack.wallet_port, "critical"),
        entry("node-b", "127.0.0.1", "wallet-b", "", proxy.port, "passing"),
    ])
    nq = len(consul.queries)
    time.sleep(REFRESH_S + 0.5)
    hostile = "u/consul ?#%"
    p2 = requests("r-consul-b", 4, "u-consul")
    p2.update(requests("r-consul-h", 1, hostile))
    stack.produce([e for evs in p2.values() for e in evs])
    keys2 = ["bw:" + r for r in p2]
    recs = wait_until(settled(keys2), timeout=40, what="phase 2 settlements")
    t.eq(sorted((recs[k]["status"], recs[k]["settled_via"]) for k in keys2),
         [("settled", "wallet")] * 5, "after the change: 5 more settled via the wallet")
    t.check(len(consul.queries) > nq, "the worker refreshed its lookup")
    via_proxy = sorted(k for _, _, k in proxy.calls)
    t.eq(via_proxy, sorted(keys2), "every phase-2 call went to the new instance (node-b)")
    hp = [p for _, p, k in proxy.calls if k == "bw:r-consul-h-0"]
    t.eq(hp, ["/api/v1/users/%s/credits/consume" % urllib.parse.quote(hostile, safe="")],
         "the user id is percent-encoded in the path sent to the discovered instance")

    # -- 3. no passing instance: the fallback --
    consul.set("wallet", [
        entry("node-a", "127.0.0.1", "wallet-a", "127.0.0.1", stack.wallet_port, "critical"),
        entry("node-b", "127.0.0.1", "wallet-b", "", proxy.port, "critical"),
    ])
    n_proxy = len(proxy.calls)
    time.sleep(REFRESH_S + 0.5)
    p3 = requests("r-consul-c", 2, "u-consul")
    stack.produce([e for evs in p3.values() for e in evs])
    keys3 = ["bw:" + r for r in p3]
    recs = wait_until(settled(keys3), timeout=40, what="phase 3 settlements")
    t.eq(sorted((recs[k]["status"], recs[k]["settled_via"]) for k in keys3),
         [("settled", "user_service")] * 2,
         "no passing wallet instance: settled via the user-service fallback")
    t.eq(len(proxy.calls), n_proxy,
         "no call to an instance Consul reports critical (a cached instance is dropped "
         "once Consul says it is not passing)")
    led = stack.ledger()
    keys = [e["key"] for e in led]
    t.check(sorted(keys) == sorted(keys1 + keys2 + keys3),
            "ledger: every key charged exactly once (12 charges)", keys)
    bad = [x for x in w.log_json() if x.get("msg") == "consul lookup failed"]
    t.eq(bad, [], "no failed Consul lookup (the stand-in's JSON was understood)")
    t.eq(w.stop(), 0, "SIGTERM exits 0")


def main():
    args = bwtest.parse_args()
    t = Checks()
    t0 = time.monotonic()
    consul = proxy = None
    try:
        with Stack(keep=args.keep) as stack:
            consul = ConsulStandIn()
            proxy = Proxy(stack.wallet_port)
            t.run("consul", test, t, stack, args, consul, proxy)
    except Exception as e:  # noqa: BLE001
        t.check(False, "stack start/stop", repr(e))
    finally:
        for s in (consul, proxy):
            if s is not None:
                s.stop()
    log("run time %.1fs" % (time.monotonic() - t0))
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""0043-ops-tls: HTTPS to the wallet and the user service (PRODUCT.md sections 7
and 10: tls.ca_file / cert_file / key_file for https:// service URLs).

A throw-away PKI is made with the openssl CLI in the stack's directory: a CA, a
server certificate for 127.0.0.1 (IP SAN), a client certificate (CN
billing-worker) and an unrelated "wrong" CA. The reference services
(deploy/refsvc.py --tls-cert/--tls-key/--tls-client-ca) serve HTTPS on the
wallet and user ports and require a client certificate from the CA.

1. Right CA + client certificate: requests settle via the wallet with the exact
   amount, the wallet saw the worker's client certificate (CN billing-worker).
2. A worker whose tls.ca_file is the wrong CA: the TLS failure is "not
   delivered" (G7), so after the wallet attempts the user service (also https,
   same wrong CA) is tried, fails the same way, and the settlement stays
   pending: nothing charged, no settlement record published, no HTTP request
   reached either service (handshakes failed), settlements_deferred_total > 0.
3. The right CA but no client certificate: still pending (the services demand
   one), nothing charged. (With TLS 1.3 the server rejects the missing
   certificate after the client has sent its request, so the worker may judge
   the outcome unknown and keep to the wallet; either way nothing settles.)
4. Back to the good config: the parked settlement completes, charged exactly
   once.
"""

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bwtest  # noqa: E402
import pricing_model as pm  # noqa: E402
from bwtest import Checks, Stack, log, wait_until  # noqa: E402

PRICING = pm.Pricing(pm.example_spec("e2e-tls-1"))


def openssl(*args, cwd):
    p = subprocess.run(["openssl", *args], cwd=cwd, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    if p.returncode != 0:
        raise RuntimeError("openssl %s failed: %s" % (" ".join(args), p.stderr.decode()))


def make_pki(d):
    """CA, wrong CA, server cert (IP SAN 127.0.0.1), client cert: PEM files in d."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "wrongca"):
        openssl("req", "-x509", *ec, "-keyout", ca + ".key", "-out", ca + ".pem", "-days", "2",
                "-subj", "/CN=bw-e2e-" + ca, "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    leaves = {
        "server": ("127.0.0.1", ["subjectAltName=IP:127.0.0.1",
                                 "extendedKeyUsage=serverAuth"]),
        "client": ("billing-worker", ["extendedKeyUsage=clientAuth"]),
    }
    for name, (cn, ext) in leaves.items():
        openssl("req", *ec, "-keyout", name + ".key", "-out", name + ".csr", "-subj", "/CN=" + cn,
                cwd=d)
        (d / (name + ".ext")).write_text("\n".join(
            ["basicConstraints=critical,CA:FALSE", "subjectKeyIdentifier=hash",
             "authorityKeyIdentifier=keyid", "keyUsage=critical,digitalSignature"] + ext) + "\n")
        openssl("x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", name + ".pem", "-days", "2", "-extfile",
                name + ".ext", cwd=d)
    return {k: str(d / k) for k in ("ca.pem", "wrongca.pem", "server.pem", "server.key",
                                    "client.pem", "client.key")}


def request(rid, uid, i):
    return [
        bwtest.model_call(rid, uid, model="gpt-4o", usage={
            "prompt_tokens": 4000 + i, "completion_tokens": 300,
            "prompt_tokens_details": {"cached_tokens": 1024}}),
        bwtest.tool_call(rid, uid, tool_name="web_search", units=1 + i % 2),
        bwtest.finalize(rid, uid, expected=(1, 1)),
    ]


def settled_keys(stack):
    return {r["idempotency_key"]: r for r in stack.settlements()}


def test(t, stack, args, pki):
    https_wallet = "https://127.0.0.1:%d" % stack.wallet_port
    https_user = "https://127.0.0.1:%d" % stack.user_port
    common = dict(pricing=PRICING.libconfig(),
                  settle={"finalize_grace": "1s", "max_attempts": 2,
                          "retry_max_interval": "1s", "breaker_failures": 100},
                  wallet={"url": https_wallet, "timeout": "2s"},
                  user_service={"url": https_user, "timeout": "2s"})
    good = stack.write_config(tls={"ca_file": pki["ca.pem"], "cert_file": pki["client.pem"],
                                   "key_file": pki["client.key"]}, **common)

    # The services really are HTTPS-only with a client certificate.
    try:
        bwtest.http_request("GET", "http://127.0.0.1:%d/_control/health" % stack.wallet_port,
                            timeout=3)
        plain_ok = True
    except Exception:  # noqa: BLE001 - the TLS server drops a plain HTTP request
        plain_ok = False
    t.check(not plain_ok, "the wallet port does not answer plain HTTP")
    probe_failures = wait_until(lambda: stack.stats().get("tls_failures"), timeout=5,
                                what="the plain HTTP probe counted as a failed handshake")

    # -- 1. the good config --
    reqs = {"r-tls-%d" % i: ("u-tls-%d" % (i % 3), request("r-tls-%d" % i, "u-tls-%d" % (i % 3), i))
            for i in range(6)}
    want = {"bw:" + rid: PRICING.price(evs).amount_credits for rid, (_, evs) in reqs.items()}
    w1 = stack.worker(args.bin, good, name="worker-good").start()
    w1.wait_ready(60)
    stack.produce([e for _, evs in reqs.values() for e in evs])
    recs = wait_until(lambda: (lambda r: r if set(want) <= set(r) else None)(settled_keys(stack)),
                      timeout=45, what="6 settlements over HTTPS")
    t.eq({k: (recs[k].get("status"), recs[k].get("settled_via"), recs[k].get("amount_credits"))
          for k in want},
         {k: ("settled", "wallet", a) for k, a in want.items()},
         "over HTTPS: all 6 settled via the wallet with the exact amount")
    led = stack.ledger()
    t.eq(sorted((e["key"], e["amount"], e["via"]) for e in led),
         sorted((k, a, "wallet") for k, a in want.items()), "ledger: 6 wallet charges, once each")
    calls = stack.calls()
    t.check(calls and all(c.get("client_cert") == "billing-worker" for c in calls),
            "every call presented the client certificate (CN billing-worker)",
            [(c.get("service"), c.get("client_cert")) for c in calls])
    t.eq(stack.stats().get("tls_failures", 0) - probe_failures, 0,
         "no failed TLS handshake with the right CA")
    t.eq(w1.stop(), 0, "worker with the good config: SIGTERM exits 0")

    # -- 2. the wrong CA --
    def pending_phase(name, cfg, rid, uid, what, fallback):
        n_calls = len(stack.calls())
        fails0 = stack.stats().get("tls_failures", 0)
        w = stack.worker(args.bin, cfg, name=name).start()
        w.wait_ready(60)
        stack.produce(request(rid, uid, 7))

        def pending_logged():
            return [x for x in w.log_json()
                    if x.get("msg") == "settlement pending" and x.get("request_id") == rid]
        pend = wait_until(pending_logged, timeout=30, what="'settlement pending' for " + rid)
        # Let it retry a few times (retry_max_interval 1s).
        time.sleep(3)
        pend = pending_logged()
        log("%s: %d pending lines; first reason: %s" % (name, len(pend), pend[0].get("reason")))
        t.check(len(pend) >= 2, "%s: the settlement stays pending and is retried" % what,
                len(pend))
        tried = {(x.get("service"), x.get("class")) for x in w.log_json()
                 if x.get("msg") == "settle call" and x.get("request_id") == rid}
        log("%s: calls seen (service, class): %s" % (name, sorted(tried)))
        if fallback:
            t.check(("wallet", "not_delivered") in tried,
                    "%s: wallet call classified not delivered" % what, tried)
            t.check(any(s == "user_service" for s, _ in tried),
                    "%s: the user service fallback (https, same TLS settings) was tried too"
                    % what, tried)
        else:
            # TLS 1.3: the server checks the client certificate after the
            # client considers the handshake done and has sent the request, so
            # the worker may judge the outcome unknown (wallet only, G7):
            # either way it must not settle.
            t.check(tried and all(s in ("wallet", "user_service") and
                                  c in ("not_delivered", "unknown") for s, c in tried),
                    "%s: calls fail as not delivered or unknown" % what, tried)
        t.eq([e for e in stack.ledger() if e["key"] == "bw:" + rid], [],
             "%s: nothing charged" % what)
        t.eq(len(stack.calls()), n_calls,
             "%s: no HTTP request reached the wallet or user service" % what)
        t.check(stack.stats().get("tls_failures", 0) > fails0,
                "%s: the services saw failed TLS handshakes" % what)
        t.check("bw:" + rid not in settled_keys(stack),
                "%s: no settlement record published (pending is not published)" % what)
        m = w.metrics()
        t.check(m.get("billing_worker_settlements_deferred_total", 0) >= 1,
                "%s: settlements_deferred_total counts it" % what, m.get(
                    "billing_worker_settlements_deferred_total"))
        t.eq(m.get('billing_worker_settlements_total{status="settled",via="wallet"}'), 0.0,
             "%s: nothing settled" % what)
        t.eq(w.stop(), 0, "%s: SIGTERM exits 0 with a pending settlement" % what)

    wrong = stack.write_config(tls={"ca_file": pki["wrongca.pem"],
                                    "cert_file": pki["client.pem"],
                                    "key_file": pki["client.key"]}, **common)
    pending_phase("worker-wrong-ca", wrong, "r-tls-wrongca", "u-tls-w", "wrong CA", True)

    # -- 3. no client certificate --
    nocert = stack.write_config(tls={"ca_file": pki["ca.pem"]}, **common)
    pending_phase("worker-no-cert", nocert, "r-tls-nocert", "u-tls-n", "no client certificate",
                  False)

    # -- 4. the good config again: the parked settlements complete, once each --
    later = {"bw:r-tls-wrongca": PRICING.price(request("r-tls-wrongca", "u-tls-w", 7)),
             "bw:r-tls-nocert": PRICING.price(request("r-tls-nocert", "u-tls-n", 7))}
    w4 = stack.worker(args.bin, good, name="worker-good-2").start()
    w4.wait_ready(60)
    recs = wait_until(lambda: (lambda r: r if set(later) <= set(r) else None)(
        settled_keys(stack)), timeout=40, what="the parked settlements")
    t.eq({k: (recs[k].get("status"), recs[k].get("settled_via"), recs[k].get("amount_credits"))
          for k in later},
         {k: ("settled", "wallet", ch.amount_credits) for k, ch in later.items()},
         "with the right CA again: the parked settlements complete via the wallet")
    time.sleep(1)
    keys = [e["key"] for e in stack.ledger()]
    t.check(all(keys.count(k) == 1 for k in list(want) + list(later)) and len(keys) == 8,
            "ledger: 8 charges, every key once", keys)
    t.eq(w4.stop(), 0, "SIGTERM exits 0")


def main():
    args = bwtest.parse_args()
    t = Checks()
    t0 = time.monotonic()
    try:
        stack = Stack(keep=args.keep)
        pki = make_pki(stack.dir / "pki")
        stack.refsvc_args = "--tls-cert %s --tls-key %s --tls-client-ca %s" % (
            pki["server.pem"], pki["server.key"], pki["ca.pem"])
        with stack:
            t.run("tls", test, t, stack, args, pki)
    except Exception as e:  # noqa: BLE001
        t.check(False, "stack start/stop", repr(e))
    log("run time %.1fs" % (time.monotonic() - t0))
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())

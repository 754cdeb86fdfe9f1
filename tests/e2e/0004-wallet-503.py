#!/usr/bin/env python3
"""0004-wallet-503: the wallet answers 503 to every call (not delivered, G7):
every request is settled through the user service fallback, which records the
usage and consumes the credits from the same ledger; the ledger holds exactly
one charge per request, of the exact amount (pricing_model.py), via
user_service; records say settled_via "user_service".
"""

import os
import sys
import time
from collections import Counter
from decimal import Decimal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bwtest  # noqa: E402
import pricing_model as pm  # noqa: E402
from bwtest import log, wait_until  # noqa: E402

PRICING = pm.Pricing(pm.example_spec("e2e-503-1"))
MAX_ATTEMPTS = 2


def requests():
    """8 requests of 3 users: token usage in the three shapes, tools with units."""
    out = []
    for i in range(8):
        rid, uid = "r503-%d" % i, "u503-%d" % (i % 3)
        evs = [
            bwtest.model_call(rid, uid, model="gpt-4o", usage={
                "prompt_tokens": 1200 + 37 * i, "completion_tokens": 300 + i,
                "prompt_tokens_details": {"cached_tokens": 256},
                "completion_tokens_details": {"reasoning_tokens": 0}}),
            bwtest.tool_call(rid, uid, tool_name="web_search", units=1 + i % 3),
            bwtest.model_call(rid, uid, model="claude-sonnet-4-20250514", usage={
                "input_tokens": 90 + i, "cache_read_input_tokens": 4000 + 11 * i,
                "cache_creation_input_tokens": 700, "output_tokens": 410}),
        ]
        if i % 2:
            evs.append(bwtest.model_call(rid, uid, model="o3-mini", usage={
                "input_tokens": 2000, "output_tokens": 900 + i,
                "input_tokens_details": {"cached_tokens": 1024},
                "output_tokens_details": {"reasoning_tokens": 640}}))
            evs.append(bwtest.tool_call(rid, uid, tool_name="code_exec"))
        n_model = sum(e["type"] == "custom_model_call" for e in evs)
        evs.append(bwtest.finalize(rid, uid, expected=(n_model, len(evs) - n_model)))
        out.append((rid, uid, evs))
    return out


def test(t, stack, args):
    stack.fault("wallet", "status", status=503)  # every call, forever
    cfg = stack.write_config(pricing=PRICING.libconfig(),
                             settle={"finalize_grace": "1s", "max_attempts": MAX_ATTEMPTS,
                                     "retry_max_interval": "2s"},
                             wallet={"timeout": "1s"}, user_service={"timeout": "1s"})
    w = stack.worker(args.bin, cfg).start()
    w.wait_ready(60)
    reqs = requests()
    want = {"bw:" + rid: (rid, uid, PRICING.price(evs)) for rid, uid, evs in reqs}
    stack.produce([e for _, _, evs in reqs for e in evs])

    t0 = time.monotonic()
    recs = wait_until(lambda: (lambda r: r if all(k in r for k in want) else None)(
        {x["idempotency_key"]: x for x in stack.settlements()}),
        timeout=60, interval=0.5, what="8 settlements")
    log("8 records after %.1fs" % (time.monotonic() - t0))

    led = stack.ledger()
    calls = stack.calls()
    urecs = stack.records()
    bad = []
    for key, (rid, uid, ch) in want.items():
        p = []
        r = recs[key]
        got = (r.get("status"), r.get("settled_via"), r.get("amount_credits"),
               r.get("amount_micro"), r.get("cost_usd"))
        exp = ("settled", "user_service", ch.amount_credits, ch.amount_micro, ch.cost_usd)
        if got != exp:
            p.append("record %r, want %r" % (got, exp))
        entries = [e for e in led if e["key"] == key]
        if [(e["amount"], e["via"], e["user_id"]) for e in entries] != \
                [(ch.amount_credits, "user_service", uid)]:
            p.append("ledger %r" % [(e["amount"], e["via"], e["user_id"]) for e in entries])
        elif r.get("transaction_id") != entries[0]["transaction_id"]:
            p.append("transaction_id %r != ledger %r" % (r.get("transaction_id"),
                                                           entries[0]["transaction_id"]))
        ur = [u for u in urecs if u["key"] == key]
        if len(ur) != 1:
            p.append("%d usage records" % len(ur))
        else:
            body = bwtest.loads(ur[0]["body"])
            gotb = (body.get("user_id"), body.get("request_id"),
                    Decimal(str(body.get("credits_charged"))),
                    Decimal(str(body.get("cost_usd"))),
                    body.get("model_calls"), body.get("tool_calls"))
            expb = (uid, rid, ch.amount, Decimal(ch.cost_usd), ch.model_calls, ch.tool_calls)
            if gotb != expb:
                p.append("usage record body %r, want %r" % (gotb, expb))
            if entries:
                cbody = bwtest.loads(entries[0]["body"])
                if cbody.get("usage_record_id") != ur[0]["id"]:
                    p.append("user-service consume usage_record_id %r, want the record id %r"
                             % (cbody.get("usage_record_id"), ur[0]["id"]))
        kc = [c for c in calls if c["key"] == key]
        wc = [c["status"] for c in kc if c["service"] == "wallet"]
        uc = [(c["path"].split("/")[-1], c["status"]) for c in kc if c["service"] == "user"]
        if any(s != 503 for s in wc) or len(wc) > MAX_ATTEMPTS:
            p.append("wallet calls %r (want at most %d, all 503)" % (wc, MAX_ATTEMPTS))
        if sorted(uc) != [("consume", 200), ("records", 200)]:
            p.append("user-service calls %r (want one record and one consume)" % uc)
        if p:
            bad.append("%s: %s" % (key, "; ".join(p)))
    log("wallet calls per key: %s" % sorted(
        Counter(c["key"] for c in calls if c["service"] == "wallet").values()))
    t.check(not bad, "every request: settled via user_service, one usage record, one "
            "user-service charge of the exact amount", "\n  " + "\n  ".join(bad))
    t.eq(len(led), len(want), "the shared ledger holds exactly one charge per request")
    t.eq([e["key"] for e in led if e["via"] == "wallet"], [], "nothing applied by the wallet")
    t.check(any(c["service"] == "wallet" for c in calls), "the wallet was tried (and said 503)")
    t.eq(stack.stats().get("key_conflicts"), 0, "no key sent twice with different amounts")
    m = w.metrics()
    t.eq(int(m.get('billing_worker_settlements_total{status="settled",via="user_service"}', -1)),
         len(want), "metric: settled via user_service = 8")
    t.eq(int(m.get('billing_worker_settlements_total{status="settled",via="wallet"}', -1)), 0,
         "metric: settled via wallet = 0")
    t.eq(w.stop(), 0, "SIGTERM: exit 0")


if __name__ == "__main__":
    sys.exit(bwtest.main("wallet 503", test))

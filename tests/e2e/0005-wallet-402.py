#!/usr/bin/env python3
"""0005-wallet-402: a user whose balance is below the charge. The wallet's 402
is a final rejection (G7): record status "rejected" with the reason, exactly
one wallet call for that key, no retry, no user-service fallback, nothing
charged. Another user's request in the same run settles normally.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bwtest  # noqa: E402
import pricing_model as pm  # noqa: E402
from bwtest import wait_until  # noqa: E402

PRICING = pm.Pricing(pm.example_spec("e2e-402-1"))


def request(rid, uid):
    return [
        # gpt-4o, chat shape: 10000 prompt (2048 cached), 1000 completion:
        # (7952*2.5 + 2048*1.25 + 1000*10) / 1e6 = (19880 + 2560 + 10000)/1e6
        # = 0.03244 USD = 16.22 credits
        bwtest.model_call(rid, uid, model="gpt-4o", usage={
            "prompt_tokens": 10000, "completion_tokens": 1000,
            "prompt_tokens_details": {"cached_tokens": 2048}}),
        # web_search, 2 units: 2 * (1 + 0.01/0.002) = 12 credits
        bwtest.tool_call(rid, uid, tool_name="web_search", units=2),
        bwtest.finalize(rid, uid, expected=(1, 1)),
    ]  # total 28.22 credits


def test(t, stack, args):
    stack.set_balance("u-poor", "3")
    cfg = stack.write_config(pricing=PRICING.libconfig(),
                             settle={"finalize_grace": "1s", "max_attempts": 3,
                                     "retry_max_interval": "1s"},
                             wallet={"timeout": "1s"}, user_service={"timeout": "1s"})
    w = stack.worker(args.bin, cfg).start()
    w.wait_ready(60)
    poor, rich = request("r-poor", "u-poor"), request("r-rich", "u-rich")
    want_poor, want_rich = PRICING.price(poor), PRICING.price(rich)
    t.eq((want_poor.amount_credits, want_rich.amount_credits), ("28.2200", "28.2200"),
         "pricing_model agrees with the hand computation (28.22 credits)")
    stack.produce(poor + rich)

    recs = wait_until(lambda: (lambda r: r if {"bw:r-poor", "bw:r-rich"} <= set(r) else None)(
        {x["idempotency_key"]: x for x in stack.settlements()}),
        timeout=60, what="2 settlements")
    time.sleep(3)  # a (wrong) retry or fallback would happen within max_attempts' backoff

    r = recs["bw:r-poor"]
    t.eq(r.get("status"), "rejected", "poor user's request: status rejected")
    t.check("Insufficient credits" in str(r.get("reason")), "reason says Insufficient credits",
            r.get("reason"))
    t.eq(r.get("amount_credits"), want_poor.amount_credits,
         "the rejected record carries the amount asked (28.2200)")
    t.eq(r.get("transaction_id"), None, "rejected: no transaction_id")
    calls = [c for c in stack.calls() if c["key"] == "bw:r-poor"]
    t.eq([(c["service"], c["status"]) for c in calls], [("wallet", 402)],
         "exactly one wallet call (402) for bw:r-poor, no retry, no user-service call")
    t.eq([c for c in stack.calls() if c["service"] == "user"], [],
         "the user service was never called")
    t.eq([e for e in stack.ledger() if e["key"] == "bw:r-poor"], [], "nothing charged to u-poor")
    t.eq(stack.balances()["users"].get("u-poor"), "3", "u-poor's balance unchanged")

    r2 = recs["bw:r-rich"]
    t.eq((r2.get("status"), r2.get("settled_via"), r2.get("amount_credits"), r2.get("cost_usd")),
         ("settled", "wallet", want_rich.amount_credits, want_rich.cost_usd),
         "the other user's request settles normally (28.2200 credits, $0.056440)")
    t.eq([(e["key"], e["amount"]) for e in stack.ledger()], [("bw:r-rich", "28.2200")],
         "ledger: only the other user's charge")
    m = w.metrics()
    t.eq(int(m.get('billing_worker_settlements_total{status="rejected",via="wallet"}', -1)), 1,
         "metric: 1 rejected")
    all_recs = [x for x in stack.consume_json(stack.settlements_topic)
                if x.get("idempotency_key") == "bw:r-poor"]
    t.check(all(x.get("status") == "rejected" for x in all_recs),
            "every published record of bw:r-poor says rejected (no pending, no settled)",
            [x.get("status") for x in all_recs])
    t.eq(w.stop(), 0, "SIGTERM: exit 0")


if __name__ == "__main__":
    sys.exit(bwtest.main("wallet 402", test))

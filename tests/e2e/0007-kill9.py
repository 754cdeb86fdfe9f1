#!/usr/bin/env python3
"""0007-kill9: the worker SIGKILLed in the middle of 100 requests and started
again (same consumer group): every request charged exactly once, with the
exact amount (G2, G3, G8).

Traffic: tests/e2e/gen_traffic.py, 100 requests of 20 users (mixed sizes,
four models with token usage in the three shapes, tools with units, a few
duplicates, failed calls, finalize markers without `expected`). Expected
amounts from pricing_model.py. The wallet answers each call after 40 ms so the
kill lands while settlements are in flight; kill -9 when ~30 charges are in the
ledger, then a second worker finishes the job.
"""

import argparse
import os
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bwtest  # noqa: E402
import gen_traffic  # noqa: E402
import pricing_model as pm  # noqa: E402
from bwtest import log, wait_until  # noqa: E402

PRICING = pm.Pricing(pm.example_spec("e2e-kill9-1"))
N_REQUESTS = 100
KILL_AT = 30


def traffic():
    a = argparse.Namespace(requests=N_REQUESTS, users=20, seed=7007, dup_rate=0.05,
                           idempotency_rate=0.3, error_rate=0.03, no_expected_rate=0.1,
                           cloudevents_rate=0.0, malformed=0, concurrency=8,
                           id_prefix="k9-", user_prefix="k9", start_time="2026-12-01T09:00:00Z")
    stream, summaries = gen_traffic.Gen(a).run()
    return stream, summaries


def test(t, stack, args):
    stream, summaries = traffic()
    groups = pm.group_requests(stream)
    t.eq(len(groups), N_REQUESTS, "traffic: 100 requests")
    by_sum = {s["request_id"]: s for s in summaries}
    want = {}
    for rid, evs in groups:
        ch = PRICING.price(evs)
        s = by_sum[rid]
        if (ch.model_calls, ch.tool_calls) != (s["model_calls"], s["tool_calls"]):
            raise AssertionError("pricing_model and gen_traffic disagree on %s" % rid)
        want["bw:" + rid] = (rid, evs[0]["user_id"], ch)
    log("%d messages, %d requests, %s credits in all"
        % (len(stream), len(want), sum(ch.amount for _, _, ch in want.values())))

    stack.fault("wallet", "delay", delay_ms=40)
    cfg = stack.write_config(pricing=PRICING.libconfig(),
                             kafka={"properties": ["session.timeout.ms=6000",
                                                   "heartbeat.interval.ms=1000"]},
                             settle={"finalize_grace": "1s", "max_attempts": 2},
                             wallet={"timeout": "1s"}, user_service={"timeout": "1s"})
    stack.produce(stream)
    w1 = stack.worker(args.bin, cfg, name="worker-1").start()

    def enough():
        n = len(stack.ledger())
        return n if n >= KILL_AT else None
    wait_until(enough, timeout=60, interval=0.02, what="%d charges in the ledger" % KILL_AT)
    w1.kill9()
    t_kill = time.monotonic()
    before = len(stack.ledger())
    recs_before = len(stack.settlements())
    log("SIGKILL: %d charges in the ledger, %d records published" % (before, recs_before))
    t.check(0 < before < N_REQUESTS, "the kill landed in the middle (%d of %d charged)"
            % (before, N_REQUESTS))

    w2 = stack.worker(args.bin, cfg, name="worker-2").start()

    wait_until(lambda: len(stack.ledger()) >= N_REQUESTS, timeout=60, interval=0.2,
               what="100 charges in the ledger")
    log("all 100 charged %.1fs after the kill" % (time.monotonic() - t_kill))

    def done():
        recs = {r["idempotency_key"]: r for r in stack.settlements()}
        return recs if all(k in recs for k in want) else None
    # A record completed but not yet acknowledged by Kafka at the kill stays in
    # the Redis outbox and is republished when it is old enough (the worker's
    # OUTBOX_MIN_AGE_MS, 30 s): allow for that.
    recs = wait_until(done, timeout=60, interval=0.5, what="100 settlement records")
    log("all %d settled %.1fs after the kill; %d charged before the kill, %d after"
        % (len(want), time.monotonic() - t_kill, before, len(stack.ledger()) - before))
    time.sleep(2)  # a (wrong) second charge would show up now

    led = stack.ledger()
    keys = Counter(e["key"] for e in led)
    t.eq(sorted(k for k, n in keys.items() if n > 1), [], "no key charged twice")
    t.eq(sorted(keys), sorted(want), "the ledger holds exactly the 100 request keys")
    t.eq(len(led), N_REQUESTS, "exactly 100 charges")
    bad = []
    for e in led:
        rid, uid, ch = want.get(e["key"], (None, None, None))
        if ch is None:
            continue
        if (e["amount"], e["user_id"], e["via"]) != (ch.amount_credits, uid, "wallet"):
            bad.append("%s: ledger %s %s %s, want %s %s" % (e["key"], e["amount"], e["user_id"],
                                                           e["via"], ch.amount_credits, uid))
        r = recs.get(e["key"])
        if r is None or (r.get("status"), r.get("amount_credits"), r.get("amount_micro"),
                         r.get("cost_usd"), r.get("transaction_id")) != \
                ("settled", ch.amount_credits, ch.amount_micro, ch.cost_usd,
                 e["transaction_id"]):
            bad.append("%s: record %r" % (e["key"], r and (
                r.get("status"), r.get("amount_credits"), r.get("amount_micro"),
                r.get("cost_usd"), r.get("transaction_id"))))
    t.check(not bad, "every charge and record has the exact amount (pricing_model.py) and "
            "the wallet's transaction_id", "\n  " + "\n  ".join(bad))
    t.eq(stack.stats().get("key_conflicts"), 0,
         "no key ever re-sent with another amount or user (amount decided once)")
    statuses = Counter(r.get("status") for r in stack.consume_json(stack.settlements_topic))
    t.eq(set(statuses), {"settled"}, "every published record says settled")
    m = w2.metrics()
    log("worker-2: events consumed %s, duplicates %s (redelivered after the kill)"
        % (m.get("billing_worker_events_consumed_total"),
           m.get("billing_worker_duplicates_total")))
    t.eq(w2.stop(), 0, "worker-2: SIGTERM exits 0")
    return before


if __name__ == "__main__":
    sys.exit(bwtest.main("kill -9 in the middle of 100 requests", test))

#!/usr/bin/env python3
"""0041-ops-sigterm: SIGTERM in the middle of traffic loses nothing and exits 0
(PRODUCT.md section 9, G2, G3); a second signal during the drain exits at once.

1. 400 requests of tests/e2e/gen_traffic.py (token usage in the three shapes,
   tools with units, duplicates, idempotency keys, failed calls, finalize with
   and without `expected`) are produced by a background thread in chunks while
   worker-1 consumes; the wallet answers after 30 ms so settlements are in
   flight. When worker-1 has consumed about a third of the messages: SIGTERM.
   It must exit 0 within shutdown_timeout (10 s), with hundreds of messages
   not consumed yet. During the drain /readyz says "draining".
2. worker-2 (same group) finishes: every request charged exactly once, with
   the exact amount from pricing_model.py, one settled record each, no key
   re-sent with another amount; the events applied by worker-1 and worker-2
   together are exactly the distinct events (nothing lost, nothing counted
   twice) when worker-1's final counters could be read during its drain.
3. worker-3 with a settlement held 3 s in the wallet: SIGTERM (drain starts,
   waits for it), then SIGINT: exits at once (well under a second; any exit
   code). worker-4 later completes that settlement with the same key and
   amount: charged once.
"""

import argparse
import os
import signal
import sys
import threading
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bwtest  # noqa: E402
import gen_traffic  # noqa: E402
import pricing_model as pm  # noqa: E402
from bwtest import log, wait_until  # noqa: E402

PRICING = pm.Pricing(pm.example_spec("e2e-sigterm-1"))
N_REQUESTS = 400
SHUTDOWN_S = 10
CHUNK = 60


def traffic():
    a = argparse.Namespace(requests=N_REQUESTS, users=40, seed=4141, dup_rate=0.05,
                           idempotency_rate=0.3, error_rate=0.03, no_expected_rate=0.1,
                           cloudevents_rate=0.0, malformed=0, concurrency=12,
                           id_prefix="st-", user_prefix="st", start_time="2026-12-01T09:00:00Z")
    return gen_traffic.Gen(a).run()


def consumed(w):
    try:
        return int(w.metrics().get("billing_worker_events_consumed_total", 0))
    except OSError:
        return -1


def test(t, stack, args):
    stream, summaries = traffic()
    groups = pm.group_requests(stream)
    t.eq(len(groups), N_REQUESTS, "traffic: %d requests" % N_REQUESTS)
    by_sum = {s["request_id"]: s for s in summaries}
    want = {}
    n_distinct = 0
    for rid, evs in groups:
        distinct = pm.dedup(evs)
        ch = PRICING.price(distinct)
        s = by_sum[rid]
        if (ch.model_calls, ch.tool_calls) != (s["model_calls"], s["tool_calls"]):
            raise AssertionError("pricing_model and gen_traffic disagree on %s" % rid)
        n_distinct += len(distinct)
        want["bw:" + rid] = (rid, evs[0]["user_id"], ch)
    log("%d messages (%d distinct events), %d requests, %s credits"
        % (len(stream), n_distinct, len(want), sum(ch.amount for _, _, ch in want.values())))

    stack.set_default_balance(1000000)  # some users spend more than the default 1000
    stack.fault("wallet", "delay", delay_ms=30)
    cfg = stack.write_config(pricing=PRICING.libconfig(),
                             shutdown_timeout="%ds" % SHUTDOWN_S,
                             kafka={"properties": ["session.timeout.ms=6000",
                                                   "heartbeat.interval.ms=1000"]},
                             settle={"finalize_grace": "1s", "max_attempts": 2,
                                     "retry_max_interval": "1s"},
                             wallet={"timeout": "2s"}, user_service={"timeout": "2s"})
    w1 = stack.worker(args.bin, cfg, name="worker-1").start()
    w1.wait_ready(60)

    # -- 1. produce in the background, SIGTERM a third of the way --
    produced = [0]
    prod_err = []

    def producer():
        try:
            for i in range(0, len(stream), CHUNK):
                produced[0] += stack.produce(stream[i:i + CHUNK])
        except Exception as e:  # noqa: BLE001
            prod_err.append(e)
    th = threading.Thread(target=producer, daemon=True)
    th.start()
    target = len(stream) // 3
    wait_until(lambda: consumed(w1) >= target, timeout=60, interval=0.02,
               what="worker-1 consumed %d messages" % target)
    at_term = consumed(w1)
    t0 = time.monotonic()
    w1.proc.send_signal(signal.SIGTERM)
    ledger_at_term = len(stack.ledger())
    last_final = None  # metrics read while /readyz said draining: final counters
    drain_seen = False
    while w1.alive() and time.monotonic() - t0 < SHUTDOWN_S + 5:
        try:
            st = w1.http("/readyz", timeout=1)
            m = w1.metrics()
            if st == (503, "draining\n"):
                drain_seen = True
                last_final = m
        except OSError:
            pass
        time.sleep(0.002)
    rc = w1.wait(SHUTDOWN_S + 10)
    dt = time.monotonic() - t0
    log("SIGTERM at %d of %d messages consumed (%d produced so far, %d charges in the ledger); "
        "exit %s after %.2fs" % (at_term, len(stream), produced[0], ledger_at_term, rc, dt))
    t.check(at_term < len(stream) - 200,
            "SIGTERM landed mid-traffic: %d of %d messages consumed" % (at_term, len(stream)))
    t.check(0 < ledger_at_term < N_REQUESTS,
            "settlements were under way at SIGTERM (%d of %d charged)"
            % (ledger_at_term, N_REQUESTS))
    t.eq(rc, 0, "worker-1: SIGTERM mid-traffic exits 0")
    t.check(dt <= SHUTDOWN_S + 1, "worker-1 exited within shutdown_timeout (%ds): %.2fs"
            % (SHUTDOWN_S, dt))
    t.check(drain_seen or dt < 0.1, "/readyz answered 503 draining during the drain")
    logj = w1.log_json()
    t.check(any(x.get("msg") == "draining" for x in logj) and
            any(x.get("msg") == "stopped" for x in logj), "worker-1 logged draining and stopped")
    th.join(60)
    t.eq(prod_err, [], "the producer thread finished")
    t.eq(produced[0], len(stream), "all %d messages produced" % len(stream))

    # -- 2. worker-2 finishes --
    stack.clear_faults()
    w2 = stack.worker(args.bin, cfg, name="worker-2").start()
    t_w2 = time.monotonic()

    def done():
        recs = {r["idempotency_key"]: r for r in stack.settlements()}
        return recs if all(k in recs for k in want) else None
    recs = wait_until(done, timeout=60, interval=0.5, what="%d settlement records" % N_REQUESTS)
    log("all settled %.1fs after worker-2 started" % (time.monotonic() - t_w2))
    time.sleep(1.5)  # a (wrong) second charge would show up now
    led = stack.ledger()
    keys = Counter(e["key"] for e in led)
    t.eq(sorted(k for k, n in keys.items() if n > 1), [], "no key charged twice")
    t.check(set(keys) == set(want), "the ledger holds exactly the %d request keys" % N_REQUESTS,
            "missing %s, unexpected %s" % (sorted(set(want) - set(keys))[:10],
                                           sorted(set(keys) - set(want))[:10]))
    t.eq(sorted(k for k, r in recs.items() if k in want and r.get("status") != "settled"), [],
         "every request's record says settled")
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
                         r.get("model_calls"), r.get("tool_calls"), r.get("transaction_id")) != \
                ("settled", ch.amount_credits, ch.amount_micro, ch.model_calls, ch.tool_calls,
                 e["transaction_id"]):
            bad.append("%s: record %r" % (e["key"], r and (
                r.get("status"), r.get("amount_credits"), r.get("model_calls"),
                r.get("tool_calls"), r.get("transaction_id"))))
    t.check(not bad, "every charge and record has the exact amount and counts "
            "(pricing_model.py)", "\n  " + "\n  ".join(bad[:20]))
    t.eq(stack.stats().get("key_conflicts"), 0, "no key re-sent with another amount or user")
    fins = Counter(r.get("finalize") for r in recs.values())
    t.check(not fins.get("incomplete") and not fins.get("timeout"),
            "no request settled incomplete or by timeout (no event lost)", dict(fins))
    m2 = w2.metrics()
    if last_final is not None:
        a1 = int(last_final.get("billing_worker_events_applied_total", 0))
        a2 = int(m2.get("billing_worker_events_applied_total", 0))
        t.eq(a1 + a2, n_distinct, "events applied by worker-1 (%d) + worker-2 (%d) == %d "
                                  "distinct events" % (a1, a2, n_distinct))
        c1 = int(last_final.get("billing_worker_events_consumed_total", 0))
        c2 = int(m2.get("billing_worker_events_consumed_total", 0))
        t.check(c1 + c2 >= len(stream), "every message consumed (%d + %d >= %d)"
                % (c1, c2, len(stream)))
    else:
        log("worker-1's final counters were not read during its drain: skipping the sum check")
    t.eq(w2.stop(), 0, "worker-2: SIGTERM exits 0")

    # -- 3. a second signal during the drain --
    cfg3 = stack.write_config(pricing=PRICING.libconfig(), shutdown_timeout="20s",
                              settle={"max_attempts": 1, "retry_max_interval": "1s"},
                              wallet={"timeout": "4s"}, user_service={"timeout": "1s"})
    w3 = stack.worker(args.bin, cfg3, name="worker-3").start()
    w3.wait_ready(60)
    stack.fault("wallet", "delay", delay_ms=3000, count=1)
    hold = bwtest.example_request("r-st-hold", "u-st-hold")
    hold_amount = PRICING.price(hold).amount_credits
    stack.produce(hold)
    wait_until(lambda: any(c["key"] == "bw:r-st-hold" for c in stack.calls()), timeout=30,
               interval=0.02, what="the held settlement at the wallet")
    w3.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: w3.http("/readyz", timeout=1) == (503, "draining\n"), timeout=5,
               interval=0.005, what="worker-3 draining")
    time.sleep(0.3)
    t.check(w3.alive(), "worker-3 is draining (waiting for the held settlement)")
    t0 = time.monotonic()
    w3.proc.send_signal(signal.SIGINT)
    rc3 = w3.wait(10)
    dt3 = time.monotonic() - t0
    log("worker-3: second signal -> exit %s after %.3fs" % (rc3, dt3))
    t.check(rc3 is not None and dt3 < 1.0,
            "a second signal during the drain exits at once (%.3fs, exit %s)" % (dt3, rc3))
    stack.clear_faults()
    w4 = stack.worker(args.bin, cfg, name="worker-4").start()
    rec = wait_until(lambda: next((r for r in stack.settlements()
                                   if r.get("idempotency_key") == "bw:r-st-hold"), None),
                     timeout=40, interval=0.5, what="the held settlement completed")
    t.eq((rec.get("status"), rec.get("amount_credits")), ("settled", hold_amount),
         "worker-4 completed the interrupted settlement (%s credits)" % hold_amount)
    time.sleep(0.5)
    hl = [(e["key"], e["amount"]) for e in stack.ledger() if e["key"] == "bw:r-st-hold"]
    t.eq(hl, [("bw:r-st-hold", hold_amount)], "the interrupted settlement was charged once")
    t.eq(stack.stats().get("key_conflicts"), 0, "still no key conflict")
    t.eq(w4.stop(), 0, "worker-4: SIGTERM exits 0")


if __name__ == "__main__":
    sys.exit(bwtest.main("sigterm mid-traffic", test))

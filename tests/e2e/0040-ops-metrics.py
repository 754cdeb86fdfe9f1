#!/usr/bin/env python3
"""0040-ops-metrics: /metrics, /healthz and /readyz (PRODUCT.md section 9,
docs/operations.md section 6) checked against what was really processed.

1. Before the group is joined: a worker whose brokers (BW_KAFKA_BROKERS env
   override) point at a closed port: /healthz 200, /metrics answers, /readyz 503
   for the whole observation window; SIGTERM still exits 0 within
   shutdown_timeout.
2. End-to-end run, produced in 5 chunks, metrics scraped after each chunk (and
   by a background scraper every 50 ms): 50 requests (token-priced, exact
   amounts from pricing_model.py), known duplicates (same event_id re-sent, and
   tool calls re-sent under a new event_id with the same idempotency_key), 2
   malformed messages, one user whose balance is too low (402). During the run
   events_consumed_total equals what was produced so far; counters never go
   down; at the end: events_consumed_total == messages produced,
   events_applied_total == distinct events, duplicates_total == duplicates
   sent, dead_letters_total{reason="invalid_json"} == 2 (other reasons 0),
   settlements_total{settled,wallet} == 49, {rejected,wallet} == 1,
   credits_settled_total == the exact sum of the 49 amounts,
   settlement_seconds_count == settled + rejected (histogram consistent),
   pending_settlements 0, wallet_circuit_open 0, every family with HELP/TYPE;
   consumer_lag{topic,partition} present for each of the 4 partitions, 0 at
   the end.
3. Drain: a settlement held 2.5 s in the wallet when SIGTERM arrives: /readyz
   503 "draining" at once (polled every 5 ms; within 0.5 s) and from then on,
   while /healthz stays 200; the in-flight settlement completes (charged
   once); exit 0 within shutdown_timeout.
4. A second worker with kafka.properties statistics.interval.ms: consumer_lag
   per partition, 0 once everything is committed (isolates the lag metric from
   the default-config check of step 2).
"""

import os
import signal
import sys
import threading
import time
from decimal import Decimal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bwtest  # noqa: E402
import pricing_model as pm  # noqa: E402
from bwtest import Checks, Stack, log, wait_until  # noqa: E402

PRICING = pm.Pricing(pm.example_spec("e2e-metrics-1"))
N_REQ = 50
CHUNKS = 5
PARTITIONS = 4
DRAIN_READY_S = 0.5  # SIGTERM -> /readyz draining (one consumer poll is 100 ms)

COUNTERS = ["billing_worker_events_consumed_total", "billing_worker_events_applied_total",
            "billing_worker_duplicates_total", "billing_worker_credits_settled_total",
            "billing_worker_settlement_seconds_count",
            'billing_worker_settlements_total{status="settled",via="wallet"}',
            'billing_worker_settlements_total{status="rejected",via="wallet"}',
            'billing_worker_dead_letters_total{reason="invalid_json"}']
FAMILIES = {
    "billing_worker_events_consumed_total": "counter",
    "billing_worker_events_applied_total": "counter",
    "billing_worker_duplicates_total": "counter",
    "billing_worker_dead_letters_total": "counter",
    "billing_worker_settlements_total": "counter",
    "billing_worker_credits_settled_total": "counter",
    "billing_worker_settlement_seconds": "histogram",
    "billing_worker_pending_settlements": "gauge",
    "billing_worker_wallet_circuit_open": "gauge",
    "billing_worker_consumer_lag": "gauge",
    "billing_worker_pricing_reloads_total": "counter",
}


def scrape(w):
    """(samples {name{labels}: Decimal}, raw text); values kept exact."""
    status, text = w.http("/metrics")
    if status != 200:
        raise RuntimeError("/metrics: HTTP %d" % status)
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        out[name] = Decimal(value) if value not in ("+Inf", "-Inf", "NaN") else value
    return out, text


def lag_series(m):
    return {k: v for k, v in m.items() if k.startswith("billing_worker_consumer_lag{")}


def request(i, uid):
    """One request; returns (events as produced incl. duplicates, distinct events,
    number of duplicates)."""
    rid = "r-met-%03d" % i
    model = ("gpt-4o-mini", "gpt-4o", "claude-sonnet-4-20250514")[i % 3]
    if i % 3 != 2:  # OpenAI Chat shape
        usage = {"prompt_tokens": 1000 + 37 * i, "completion_tokens": 100 + 11 * i,
                 "prompt_tokens_details": {"cached_tokens": 128 * (i % 4)}}
    else:  # Anthropic native shape
        usage = {"input_tokens": 300 + i, "cache_read_input_tokens": 50 * i,
                 "output_tokens": 200 + 3 * i}
    mc = bwtest.model_call(rid, uid, model=model, usage=usage)
    tc = bwtest.tool_call(rid, uid, tool_name=("web_search", "code_exec")[i % 2],
                          units=1 + i % 3)
    fin = bwtest.finalize(rid, uid, expected=(1, 1))
    produced, dups = [mc], 0
    if i % 4 == 0:  # a client retry: the same event again
        produced.append(dict(mc))
        dups += 1
    if i % 7 == 0:  # the same provider tool-call id under a new event_id
        tc["idempotency_key"] = "call_%03d" % i
        produced += [tc, dict(tc, event_id=bwtest.new_id())]
        dups += 1
    else:
        produced.append(tc)
    produced.append(fin)
    return produced, [mc, tc, fin], dups


class Scraper(threading.Thread):
    """Scrapes every 50 ms; records violations of counter monotonicity."""

    def __init__(self, w):
        super().__init__(daemon=True)
        self.w = w
        self.stop_ev = threading.Event()
        self.n = 0
        self.errors = 0
        self.decreases = []
        self.last = {}

    def run(self):
        while not self.stop_ev.wait(0.05):
            try:
                m, _ = scrape(self.w)
            except Exception:  # noqa: BLE001
                self.errors += 1
                continue
            self.n += 1
            for k in COUNTERS:
                v = m.get(k)
                if v is None:
                    continue
                if k in self.last and v < self.last[k]:
                    self.decreases.append((k, self.last[k], v))
                self.last[k] = v


def before_join(t, stack, args):
    closed = bwtest.free_port()
    cfg = stack.write_config(shutdown_timeout="5s")
    w = stack.worker(args.bin, cfg, env={"BW_KAFKA_BROKERS": "127.0.0.1:%d" % closed},
                     name="worker-nokafka").start()
    wait_until(lambda: w.http("/healthz")[0] == 200, timeout=20, what="/healthz")
    t.eq(w.http("/healthz"), (200, "ok\n"), "Kafka unreachable: /healthz 200 ok")
    seen = set()
    t_end = time.monotonic() + 3
    while time.monotonic() < t_end:
        seen.add(w.http("/readyz"))
        time.sleep(0.1)
    t.eq(seen, {(503, "not ready\n")}, "Kafka unreachable (not in the group): /readyz 503 "
                                       "not ready for 3 s")
    t.eq(w.http("/metrics")[0], 200, "Kafka unreachable: /metrics answers")
    t.check(w.alive(), "the worker keeps running without Kafka")
    t0 = time.monotonic()
    rc = w.stop(timeout=15)
    dt = time.monotonic() - t0
    t.eq(rc, 0, "SIGTERM without Kafka: exit 0")
    t.check(dt < 5 + 2, "... within shutdown_timeout (5 s): %.1fs" % dt)


def main_run(t, stack, args):
    stack.set_balance("u-met-poor", "1")
    cfg = stack.write_config(pricing=PRICING.libconfig(),
                             settle={"finalize_grace": "1s", "max_attempts": 2,
                                     "retry_max_interval": "1s"})
    w = stack.worker(args.bin, cfg, name="worker-main").start()
    wait_until(lambda: w.http("/healthz")[0] == 200, timeout=20, what="/healthz")
    w.wait_ready(60)
    t.eq(w.http("/readyz"), (200, "ready\n"), "joined the group: /readyz 200 ready")

    reqs = []
    for i in range(N_REQ):
        uid = "u-met-poor" if i == 17 else "u-met-%d" % (i % 6)
        reqs.append((i, uid) + request(i, uid))
    malformed = [b'{"type":"custom_model_call","event_id":"bad-1"', b"not json at all"]
    want_settled, want_rejected = {}, {}
    for i, uid, _, distinct, _ in reqs:
        ch = PRICING.price(distinct)
        (want_rejected if uid == "u-met-poor" else want_settled)["bw:r-met-%03d" % i] = ch
    total_credits = sum(ch.amount for ch in want_settled.values())
    log("%d settled requests for %s credits, 1 rejected" % (len(want_settled), total_credits))

    sc = Scraper(w)
    sc.start()
    produced = dups = distinct_n = 0
    per = N_REQ // CHUNKS
    during_ok = []
    for c in range(CHUNKS):
        msgs = []
        for i, uid, evs, distinct, d in reqs[c * per:(c + 1) * per]:
            msgs += evs
            dups += d
            distinct_n += len(distinct)
        if c in (1, 3):
            msgs.insert(len(msgs) // 2, malformed[c // 2])
        produced += stack.produce(msgs)
        # Scraped during the run: consumption is counted as it happens.
        try:
            wait_until(lambda: scrape(w)[0].get("billing_worker_events_consumed_total")
                       == produced, timeout=20, interval=0.05,
                       what="events_consumed_total == %d" % produced)
            during_ok.append(c)
        except TimeoutError as e:
            log(str(e))
        m, _ = scrape(w)
        log("chunk %d: produced %d so far; consumed %s, applied %s, duplicates %s, settled %s"
            % (c + 1, produced, m.get("billing_worker_events_consumed_total"),
               m.get("billing_worker_events_applied_total"),
               m.get("billing_worker_duplicates_total"),
               m.get('billing_worker_settlements_total{status="settled",via="wallet"}')))
    t.eq(during_ok, list(range(CHUNKS)),
         "during the run: after each chunk events_consumed_total == messages produced so far")

    def all_done():
        m, _ = scrape(w)
        return m if (m.get('billing_worker_settlements_total{status="settled",via="wallet"}')
                     == len(want_settled) and
                     m.get('billing_worker_settlements_total{status="rejected",via="wallet"}')
                     == 1) else None
    try:
        wait_until(all_done, timeout=40, interval=0.2, what="49 settled + 1 rejected")
    except TimeoutError as e:
        t.check(False, "all settlements done", str(e))
    # pending_settlements and lag are refreshed by housekeeping / statistics.
    try:
        wait_until(lambda: scrape(w)[0].get("billing_worker_pending_settlements") == 0,
                   timeout=15, what="pending_settlements 0")
    except TimeoutError:
        pass
    time.sleep(1.5)
    sc.stop_ev.set()
    sc.join(5)
    m, text = scrape(w)

    t.check(sc.n >= 20 and sc.errors == 0,
            "background scraper: %d scrapes during the run, %d errors" % (sc.n, sc.errors))
    t.eq(sc.decreases, [], "no counter ever went down during the run")
    t.eq(m.get("billing_worker_events_consumed_total"), produced,
         "events_consumed_total == %d messages produced" % produced)
    t.eq(m.get("billing_worker_events_applied_total"), distinct_n,
         "events_applied_total == %d distinct events" % distinct_n)
    t.eq(m.get("billing_worker_duplicates_total"), dups,
         "duplicates_total == %d duplicates sent" % dups)
    t.eq(m.get("billing_worker_duplicates_conflicting_total"), 0,
         "duplicates_conflicting_total 0 (the duplicates were identical)")
    dl = {k: v for k, v in m.items() if k.startswith("billing_worker_dead_letters_total{")}
    t.eq(dl.get('billing_worker_dead_letters_total{reason="invalid_json"}'), 2,
         "dead_letters_total{reason=\"invalid_json\"} == 2")
    t.eq(sorted(k for k, v in dl.items() if v and "invalid_json" not in k), [],
         "no dead letter of another reason")
    t.eq(m.get('billing_worker_settlements_total{status="settled",via="wallet"}'),
         len(want_settled), "settlements_total{settled,wallet} == %d" % len(want_settled))
    t.eq(m.get('billing_worker_settlements_total{status="rejected",via="wallet"}'), 1,
         "settlements_total{rejected,wallet} == 1 (the 402)")
    t.eq(m.get('billing_worker_settlements_total{status="settled",via="user_service"}'), 0,
         "settlements_total{settled,user_service} == 0")
    t.eq(m.get("billing_worker_credits_settled_total"), total_credits,
         "credits_settled_total == the exact sum of the settled amounts (%s)" % total_credits)
    led = stack.ledger()
    t.eq(sum(Decimal(e["amount"]) for e in led), total_credits,
         "... which is also what the wallet ledger holds")
    cnt = m.get("billing_worker_settlement_seconds_count")
    t.eq(cnt, len(want_settled) + 1, "settlement_seconds_count == settled + rejected (50)")
    buckets = [(k, v) for k, v in m.items()
               if k.startswith("billing_worker_settlement_seconds_bucket{")]
    vals = [v for _, v in buckets]
    t.check(len(buckets) >= 2 and vals == sorted(vals) and
            m.get('billing_worker_settlement_seconds_bucket{le="+Inf"}') == cnt,
            "histogram buckets cumulative, +Inf == count", buckets)
    t.check(isinstance(m.get("billing_worker_settlement_seconds_sum"), Decimal) and
            0 < m["billing_worker_settlement_seconds_sum"] < cnt * 5,
            "settlement_seconds_sum plausible", m.get("billing_worker_settlement_seconds_sum"))
    t.eq(m.get("billing_worker_pending_settlements"), 0, "pending_settlements 0 at the end")
    t.eq(m.get("billing_worker_wallet_circuit_open"), 0, "wallet_circuit_open 0")
    t.eq((m.get('billing_worker_pricing_reloads_total{result="ok"}'),
          m.get('billing_worker_pricing_reloads_total{result="refused"}')), (0, 0),
         "pricing_reloads_total{result} present, 0")
    for fam, typ in FAMILIES.items():
        t.check("# HELP %s " % fam in text and "# TYPE %s %s\n" % (fam, typ) in text,
                "HELP and TYPE %s for %s" % (typ, fam))
    want_lag0 = {'billing_worker_consumer_lag{topic="%s",partition="%d"}'
                 % (stack.events_topic, p) for p in range(PARTITIONS)}
    try:  # statistics arrive every statistics.interval.ms (5 s by default)
        wait_until(lambda: set(lag_series(scrape(w)[0])) == want_lag0, timeout=20,
                   what="consumer_lag series")
    except TimeoutError:
        pass
    lag = lag_series(scrape(w)[0])
    want_lag = {'billing_worker_consumer_lag{topic="%s",partition="%d"}'
                % (stack.events_topic, p) for p in range(PARTITIONS)}
    t.check(set(lag) == want_lag,
            "default config: consumer_lag present for each of the %d partitions" % PARTITIONS,
            "got %r (librdkafka statistics need statistics.interval.ms > 0; the worker does "
            "not set it)" % sorted(lag))
    if set(lag) == want_lag:
        try:
            wait_until(lambda: all(v == 0 for v in lag_series(scrape(w)[0]).values()),
                       timeout=20, what="consumer_lag 0")
            t.check(True, "default config: consumer_lag 0 at the end")
        except TimeoutError:
            t.check(False, "default config: consumer_lag 0 at the end",
                    lag_series(scrape(w)[0]))

    # -- drain: a settlement held in the wallet when SIGTERM arrives --
    stack.fault("wallet", "delay", delay_ms=2500, count=1)  # below wallet.timeout (3s)
    drain_req = bwtest.example_request("r-met-drain", "u-met-drain")
    drain_amount = PRICING.price(drain_req).amount_credits
    stack.produce(drain_req)
    wait_until(lambda: any(c["key"] == "bw:r-met-drain" for c in stack.calls()), timeout=30,
               interval=0.05, what="the drain request at the wallet")
    t0 = time.monotonic()
    w.proc.send_signal(signal.SIGTERM)
    states = []
    while w.alive() and time.monotonic() - t0 < 15:
        try:
            states.append((round(time.monotonic() - t0, 3), w.http("/readyz", timeout=1),
                           w.http("/healthz", timeout=1)[0]))
        except OSError:
            break
        time.sleep(0.005)
    rc = w.wait(15)
    dt = time.monotonic() - t0
    first = next((i for i, s in enumerate(states) if s[1][0] != 200), None)
    log("drain: %d polls, first %s, first not ready %s, last %s"
        % (len(states), states[:1], first is not None and states[first], states[-1:]))
    t.check(first is not None and states[first][0] <= DRAIN_READY_S and
            states[first][1] == (503, "draining\n"),
            "right after SIGTERM (within %.1fs): /readyz 503 draining" % DRAIN_READY_S,
            states[:2] + states[first:first + 1] if first is not None else states[:3])
    t.check(first is not None and all(s[1] == (503, "draining\n") for s in states[first:]) and
            all(s[2] == 200 for s in states),
            "while draining: /readyz stays 503 draining, /healthz 200", states[-3:])
    t.check(len(states) >= 10 and states[-1][0] >= 1.5,
            "the drain waited for the in-flight settlement (%d polls over %.1fs)"
            % (len(states), states[-1][0] if states else 0))
    t.eq(rc, 0, "SIGTERM: exit 0 after the drain")
    t.check(dt < 10 + 2, "drain within shutdown_timeout (10 s): %.1fs" % dt)
    t.eq([(e["key"], e["amount"]) for e in stack.ledger() if e["key"] == "bw:r-met-drain"],
         [("bw:r-met-drain", drain_amount)],
         "the in-flight settlement was completed during the drain, charged once")
    return m


def lag_worker(t, stack, args):
    """consumer_lag with statistics enabled explicitly."""
    stack.produce(bwtest.example_request("r-met-lag", "u-met-lag"))
    cfg = stack.write_config(pricing=PRICING.libconfig(),
                             kafka={"properties": ["statistics.interval.ms=500",
                                                   "auto.commit.interval.ms=500"]})
    w = stack.worker(args.bin, cfg, name="worker-lag").start()
    w.wait_ready(60)
    want_lag = {'billing_worker_consumer_lag{topic="%s",partition="%d"}'
                % (stack.events_topic, p) for p in range(PARTITIONS)}
    try:
        lag = wait_until(lambda: (lambda l: l if set(l) == want_lag and
                                  all(v == 0 for v in l.values()) else None)(
            lag_series(scrape(w)[0])), timeout=25, what="4 lag series at 0")
        t.eq(len(lag), PARTITIONS, "statistics.interval.ms set: consumer_lag for each of the "
                                   "4 partitions, 0 once everything is committed")
    except TimeoutError:
        t.check(False, "statistics.interval.ms set: consumer_lag for each partition, 0 at the end",
                lag_series(scrape(w)[0]))
    t.eq(w.stop(), 0, "SIGTERM exits 0")


def main():
    args = bwtest.parse_args()
    t = Checks()
    t0 = time.monotonic()
    try:
        with Stack(keep=args.keep, events_partitions=PARTITIONS) as stack:
            t.run("before the group is joined", before_join, t, stack, args)
            t.run("metrics of an end-to-end run", main_run, t, stack, args)
            t.run("consumer lag with statistics", lag_worker, t, stack, args)
    except Exception as e:  # noqa: BLE001
        t.check(False, "stack start/stop", repr(e))
    log("run time %.1fs" % (time.monotonic() - t0))
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())

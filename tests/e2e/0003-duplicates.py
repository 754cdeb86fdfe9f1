#!/usr/bin/env python3
"""0003-duplicates: every event and every finalize marker delivered twice; one
charge per request, of the right amount (G1, G2).

30 requests of 5 users, token usage in the three usage shapes of PRODUCT.md
section 3 (OpenAI Chat with cached + reasoning tokens and cache writes, OpenAI
Responses, native/Anthropic with cache read and write), tools with units and
USD prices. Every message is sent twice, in three patterns:
  * "adjacent":  each event immediately followed by its copy;
  * "scattered": copies re-sent later in the request, before the finalize;
  * "after":     copies of every event AND the finalize re-sent after the
                 request was settled (a replay).
Tool calls with an idempotency_key are also re-sent under a new event_id (a
client retry); one of them with a different `units` (the first must win). Two
requests share an idempotency_key and an event_id: keys are scoped to the
request, so both count.

Expected amounts come from pricing_model.py (an independent implementation
of section 6). Checks: exactly one ledger entry per request key with that
amount, the records' counts and tokens equal the distinct events, no
adjustment, billing_worker_duplicates_total = the copies sent.
"""

import os
import random
import sys
import time
from decimal import Decimal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bwtest  # noqa: E402
import pricing_model as pm  # noqa: E402
from bwtest import log, wait_until  # noqa: E402

SEED = 3003
N_REQUESTS = 30
USERS = ["u-%d" % i for i in range(1, 6)]

PRICING = pm.Pricing(pm.example_spec("e2e-dups-1"))

MODELS = ["gpt-4o", "gpt-4o-mini", "o3-mini", "claude-sonnet-4-20250514", "llama-3-local"]
TOOLS = ["web_search", "code_exec", "mcp_fetch"]


def chat_usage(rng):
    prompt = rng.randint(300, 20000)
    cached = rng.randint(0, prompt // 2) // 128 * 128
    comp = rng.randint(20, 3000)
    u = {"prompt_tokens": prompt, "completion_tokens": comp, "total_tokens": prompt + comp,
         "prompt_tokens_details": {"cached_tokens": cached},
         "completion_tokens_details": {"reasoning_tokens": rng.randint(0, comp)}}
    if rng.random() < 0.4:  # cache writes, included in prompt_tokens
        u["cache_creation_input_tokens"] = rng.randint(0, prompt - cached)
    return u


def responses_usage(rng):
    inp = rng.randint(300, 20000)
    out = rng.randint(20, 3000)
    return {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out,
            "input_tokens_details": {"cached_tokens": rng.randint(0, inp)},
            "output_tokens_details": {"reasoning_tokens": rng.randint(0, out)}}


def native_usage(rng):
    out = rng.randint(20, 3000)
    u = {"input_tokens": rng.randint(10, 5000),
         "cache_read_input_tokens": rng.randint(0, 30000),
         "cache_creation_input_tokens": rng.randint(0, 8000),
         "output_tokens": out}
    if rng.random() < 0.5:
        u["reasoning_tokens"] = rng.randint(0, out)
    return u


SHAPES = [chat_usage, responses_usage, native_usage]


def make_request(rng, i):
    """(request_id, user_id, distinct events in order, finalize, retries):
    retries are tool calls re-sent with a new event_id and the same
    idempotency_key."""
    rid = "dup-req-%02d" % i
    uid = USERS[i % len(USERS)]
    events, retries = [], []
    n_model = rng.randint(1, 4)
    n_tool = rng.randint(0, 3)
    kinds = ["m"] * n_model + ["t"] * n_tool
    rng.shuffle(kinds)
    for j, kind in enumerate(kinds):
        if kind == "m":
            model = MODELS[(i + j) % len(MODELS)]
            shape = SHAPES[(i + j) % 3]
            ev = bwtest.model_call(rid, uid, model=model, usage=shape(rng), provider="openai",
                                   node_name="ReasonNode")
            if rng.random() < 0.1:
                ev["status"] = "error"
        else:
            ev = bwtest.tool_call(rid, uid, tool_name=TOOLS[(i + j) % len(TOOLS)],
                                  units=rng.randint(1, 3), duration_ms=rng.randint(5, 900))
            if rng.random() < 0.6:
                ev["idempotency_key"] = "call_%s_%d" % (rid, j)
                retry = dict(ev, event_id=bwtest.new_id())
                retries.append(retry)
        events.append(ev)
    fin = bwtest.finalize(rid, uid, expected=(n_model, n_tool))
    for ev in events + retries + [fin]:  # every event carries the session
        ev["session_id"] = "s-%d" % i
    return rid, uid, events, fin, retries


def test(t, stack, args):
    rng = random.Random(SEED)
    reqs = [make_request(rng, i) for i in range(N_REQUESTS)]
    # Dedup keys are scoped to the request (G1): two other requests use the same
    # idempotency_key and the same event_id for one tool call each; both count.
    for idx in (1, 2):
        rid, uid, events, fin, retries = reqs[idx]
        ev = bwtest.tool_call(rid, uid, tool_name="web_search", units=1,
                              idempotency_key="call_shared_by_two_requests",
                              event_id="00000000-0000-4000-8000-000000000001",
                              session_id=fin["session_id"])
        events.append(ev)
        exp = fin["expected"]
        exp["tool_calls"] += 1
    # One retry changes `units`: a conflicting duplicate; the first must win.
    conflict = next(r for req in reqs for r in req[4])
    conflict["units"] = conflict["units"] + 5

    patterns = {}
    seqs = []  # per request: the messages of phase 1, in order
    phase2 = []  # re-sent after settlement
    n_sent = 0
    for i, (rid, uid, events, fin, retries) in enumerate(reqs):
        pat = ["adjacent", "scattered", "after"][i % 3]
        patterns[rid] = pat
        seq = []
        if pat == "adjacent":
            for ev in events:
                seq += [ev, ev]
            seq += retries + [fin, fin]
        elif pat == "scattered":
            copies = list(events) + retries
            rng.shuffle(copies)
            for ev in events:
                seq.append(ev)
                # some copies go out as soon as their original was sent
                while copies and copies[0] in seq:
                    seq.append(copies.pop(0))
            seq += copies + [fin, fin]
        else:  # after
            seq = list(events) + [fin]
            phase2 += list(events) + retries + [fin]
        seqs.append(seq)
        n_sent += len(seq)
    n_sent += len(phase2)
    all_msgs = [m for s in seqs for m in s] + phase2
    n_distinct = len(pm.dedup(all_msgs))
    n_dups = len(all_msgs) - n_distinct
    log("%d requests, %d messages, %d distinct, %d duplicates (%d re-sent after settlement)"
        % (len(reqs), len(all_msgs), n_distinct, n_dups, len(phase2)))

    # Interleave requests (each request's own order kept), like a fleet of agents.
    order = []
    cursors = [0] * len(seqs)
    live = [k for k in range(len(seqs))]
    while live:
        k = rng.choice(live)
        order.append(seqs[k][cursors[k]])
        cursors[k] += 1
        if cursors[k] == len(seqs[k]):
            live.remove(k)

    cfg = stack.write_config(pricing=PRICING.libconfig(),
                             settle={"finalize_grace": "1s", "max_attempts": 2},
                             wallet={"timeout": "1s"}, user_service={"timeout": "1s"})
    w = stack.worker(args.bin, cfg).start()
    w.wait_ready(60)
    stack.produce(order)

    want = {}
    for rid, uid, events, fin, retries in reqs:
        distinct = pm.dedup(events + retries)
        want["bw:" + rid] = (rid, uid, PRICING.price(distinct), fin)

    def all_settled():
        recs = {r["idempotency_key"]: r for r in stack.settlements()}
        return recs if all(k in recs for k in want) else None

    t0 = time.monotonic()
    wait_until(all_settled, timeout=60, interval=0.5, what="30 settlements")
    log("all settled after %.1fs; re-sending %d messages" % (time.monotonic() - t0, len(phase2)))
    stack.produce(phase2)
    wait_until(lambda: w.metrics().get("billing_worker_events_consumed_total", 0) >= n_sent,
               timeout=30, what="the worker consumed all %d messages" % n_sent)
    time.sleep(3)  # > finalize_grace: an (erroneous) adjustment would be due by now
    all_recs = stack.consume_json(stack.settlements_topic)
    recs = {r["idempotency_key"]: r for r in all_recs}

    # -- per request --
    led = stack.ledger()
    led_by_key = {}
    for e in led:
        led_by_key.setdefault(e["key"], []).append(e)
    calls_by_key = {}
    for c in stack.calls():
        calls_by_key.setdefault(c["key"], []).append(c)
    bad = []
    for key, (rid, uid, ch, fin) in want.items():
        r = recs.get(key)
        problems = []
        if r is None:
            bad.append("%s: no record" % key)
            continue
        got = (r.get("status"), r.get("amount_credits"), r.get("amount_micro"), r.get("cost_usd"),
               r.get("model_calls"), r.get("tool_calls"), r.get("tokens"), r.get("finalize"),
               r.get("user_id"), r.get("session_id"), r.get("minimum_applied"))
        exp = ("settled", ch.amount_credits, ch.amount_micro, ch.cost_usd, ch.model_calls,
               ch.tool_calls, ch.tokens, "expected_met", uid, fin["session_id"],
               ch.minimum_applied)
        if got != exp:
            problems.append("record %r != expected %r" % (got, exp))
        lines = {(ln.get("kind"), ln.get("name")): ln for ln in r.get("lines") or []}
        if set(lines) != set(ch.lines):
            problems.append("lines %s != %s" % (sorted(lines), sorted(ch.lines)))
        for lk, eln in ch.lines.items():
            gln = lines.get(lk)
            if gln is None:
                continue
            if gln.get("calls") != eln.calls or Decimal(gln.get("credits", "NaN")) != eln.credits:
                problems.append("line %s: calls %s credits %s, want %d %s"
                                % (lk, gln.get("calls"), gln.get("credits"), eln.calls,
                                   pm.fmt_plain(eln.credits)))
            if lk[0] == "tool" and gln.get("units") != eln.units:
                problems.append("line %s: units %s, want %d" % (lk, gln.get("units"), eln.units))
        entries = led_by_key.get(key, [])
        if [(e["amount"], e["user_id"]) for e in entries] != [(ch.amount_credits, uid)]:
            problems.append("ledger %r, want one entry %s for %s"
                            % ([(e["amount"], e["user_id"], e["via"]) for e in entries],
                               ch.amount_credits, uid))
        ncalls = len(calls_by_key.get(key, []))
        if ncalls != 1:
            problems.append("%d settlement HTTP calls (want 1)" % ncalls)
        if problems:
            bad.append("%s (%s): %s" % (key, patterns[rid], "; ".join(problems)))
    t.check(not bad, "every request: one ledger entry, exact amount, counts and tokens of the "
            "distinct events", "\n  " + "\n  ".join(bad))

    t.eq(sorted(e["key"] for e in led), sorted(want), "the ledger holds exactly the 30 request keys")
    t.eq(stack.stats().get("key_conflicts"), 0, "no key sent twice with different amounts")
    extra = [r.get("idempotency_key") for r in all_recs if r.get("idempotency_key") not in want]
    t.eq(extra, [], "no other record (no adjustment from duplicates after settlement)")

    # The conflicting retry: the first `units` was priced.
    crid = conflict["request_id"]
    cr = recs.get("bw:" + crid)
    first_units = conflict["units"] - 5
    if cr:
        ln = next((x for x in cr.get("lines") or []
                   if x.get("kind") == "tool" and x.get("name") == conflict["tool_name"]), None)
        want_units = want["bw:" + crid][2].line("tool", conflict["tool_name"]).units
        t.eq(ln and ln.get("units"), want_units,
             "same idempotency_key with other units: the first (units %d) wins" % first_units)

    m = w.metrics()
    t.eq(int(m.get("billing_worker_duplicates_total", -1)), n_dups,
         "billing_worker_duplicates_total = the %d copies sent" % n_dups)
    t.eq(int(m.get("billing_worker_events_applied_total", -1)), n_distinct,
         "billing_worker_events_applied_total = the %d distinct events" % n_distinct)
    t.eq(int(m.get("billing_worker_late_events_total", -1)), 0, "no late events")
    log("duplicates_conflicting_total = %s"
        % m.get("billing_worker_duplicates_conflicting_total"))
    t.check(m.get("billing_worker_duplicates_conflicting_total", 0) >= 1,
            "the retry with other units is counted as a conflicting duplicate")
    t.eq(w.stop(), 0, "SIGTERM: exit 0")


if __name__ == "__main__":
    sys.exit(bwtest.main("duplicates", test))

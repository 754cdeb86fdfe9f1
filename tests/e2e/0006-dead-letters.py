#!/usr/bin/env python3
"""0006-dead-letters: bad input never blocks a partition and is never silently
dropped (G9, G1 user_mismatch).

One partition of the input topic receives, in this order: a valid request,
then malformed JSON (with a tab and invalid UTF-8), a missing required field,
a wrong type, a negative token count, a JSON array, an unknown type, an
identifier with a control character, a duplicated field name, an event over
limits.max_event_bytes, a user_mismatch inside an otherwise valid request, and
then more valid requests. Each bad message lands in the dead-letter topic with
its reason code (header bw-reason), the original bytes and key byte for byte,
and its source topic/partition/offset (headers, read with kcat -J); the
valid requests produced after them are settled with the right amounts
(pricing_model.py); billing_worker_dead_letters_total{reason=...} match.
Reason codes are the ones docs/design.md lists.
"""

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bwtest  # noqa: E402
import pricing_model as pm  # noqa: E402
from bwtest import wait_until  # noqa: E402

PRICING = pm.Pricing(pm.example_spec("e2e-dlq-1"))
PART = 2  # every message of this test goes to this partition of the input topic
MAX_EVENT_BYTES = 65536
HUGE_BYTES = 1040000  # under the broker's 1 MiB limit; its dead letter with headers is not


def valid_request(rid, uid, i):
    evs = [
        bwtest.model_call(rid, uid, model="gpt-4o-mini", usage={
            "prompt_tokens": 3000 + i, "completion_tokens": 250,
            "prompt_tokens_details": {"cached_tokens": 1024}}),
        bwtest.tool_call(rid, uid, tool_name="web_search", units=1 + i % 3),
        bwtest.model_call(rid, uid, model="claude-sonnet-4-20250514", usage={
            "input_tokens": 120, "cache_read_input_tokens": 9000,
            "cache_creation_input_tokens": 300 + i, "output_tokens": 700}),
    ]
    return evs + [bwtest.finalize(rid, uid, expected=(2, 1))]


def j(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


def bad_messages():
    """[(name, key bytes or None, value bytes, expected bw-reason)]."""
    ev = {"type": "custom_model_call", "event_id": "bad-ev", "request_id": "r-bad",
          "user_id": "u-bad", "model": "gpt-4o"}
    big = dict(ev, event_id="bad-big", request_id="r-big",
               padding="x" * (MAX_EVENT_BYTES + 100))
    return [
        ("malformed JSON", b"r-json",
         b'{"type":"custom_model_call",\t"event_id":"e\xff\xfe", "request_id": "r-json"',
         "invalid_json"),
        ("missing user_id", b"r-missing",
         j({"type": "custom_tool_call", "event_id": "bad-miss", "request_id": "r-missing",
            "tool_name": "web_search"}), "missing_field"),
        ("model is a number", b"r-type",
         j(dict(ev, event_id="bad-type", request_id="r-type", model=42)), "wrong_type"),
        ("negative token count", b"r-neg",
         j(dict(ev, event_id="bad-neg", request_id="r-neg",
                usage={"input_tokens": -5, "output_tokens": 10})), "invalid_value"),
        ("JSON array", None, b'[{"type":"custom_model_call"}]', "not_object"),
        ("unknown type", b"r-unk",
         j(dict(ev, type="custom_chain_call", event_id="bad-unk", request_id="r-unk")),
         "unknown_type"),
        ("control character in request_id", b"r-ctl",
         j(dict(ev, event_id="bad-ctl", request_id="r-\u0001ctl")), "invalid_id"),
        ("duplicated field name", b"r-dupfield",
         b'{"type":"custom_tool_call","event_id":"bad-df","request_id":"r-dupfield",'
         b'"user_id":"u-bad","tool_name":"a","tool_name":"b"}', "invalid_json"),
        ("over max_event_bytes", b"r-big", j(big), "too_large"),
    ]


def dlq_headers(stack):
    """{(partition, offset): {header: value}} of the dead-letter topic (kcat -J;
    bwtest.dlq() does not expose headers)."""
    p = subprocess.run(["kcat", "-C", "-b", stack.brokers, "-t", stack.dlq_topic, "-o",
                        "beginning", "-e", "-q", "-J"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    out = {}
    for line in p.stdout.decode("utf-8", "replace").splitlines():
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        h = rec.get("headers") or []
        out[(rec["partition"], rec["offset"])] = dict(zip(h[0::2], h[1::2]))
    return out


def test(t, stack, args):
    cfg = stack.write_config(pricing=PRICING.libconfig(),
                             settle={"finalize_grace": "1s", "max_attempts": 2},
                             wallet={"timeout": "1s"}, user_service={"timeout": "1s"},
                             limits={"max_event_bytes": MAX_EVENT_BYTES})
    w = stack.worker(args.bin, cfg).start()
    w.wait_ready(60)

    before = valid_request("r-before", "u-1", 0)
    bad = bad_messages()
    # user_mismatch: r-mm belongs to u-1 (its first event); an event claiming u-2
    # is dead-lettered, the rest of r-mm settles without it.
    mm_first = bwtest.model_call("r-mm", "u-1", model="gpt-4o", usage={
        "prompt_tokens": 500, "completion_tokens": 100})
    mm_intruder = bwtest.tool_call("r-mm", "u-2", tool_name="web_search", units=3)
    mm_fin = bwtest.finalize("r-mm", "u-1")
    after = [valid_request("r-after-%d" % i, "u-%d" % (i % 2 + 1), i + 1) for i in range(3)]

    stack.produce(before, partition=PART)
    for name, key, value, _ in bad:
        stack.produce([value], partition=PART, key=key)
    # Close to Kafka's message size limit: with the bw-* headers its dead letter
    # would not fit; it must be cut (BW_DLQ_VALUE_MAX, 512 KiB), not stop the
    # partition.
    huge = b'{"type":"custom_tool_call","pad":"' + b"x" * (HUGE_BYTES - 36) + b'"}'
    assert len(huge) == HUGE_BYTES
    p = subprocess.run(["kcat", "-P", "-b", stack.brokers, "-t", stack.events_topic,
                        "-p", str(PART), "-k", "r-huge", "-X", "message.max.bytes=1048576",
                        "-X", "acks=all"],
                       input=huge, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    t.check(p.returncode == 0, "a %d-byte message produced" % HUGE_BYTES, p.stderr[-300:])
    stack.produce([mm_first, mm_intruder, mm_fin], partition=PART)
    stack.produce([e for evs in after for e in evs], partition=PART)

    want = {"bw:r-before": PRICING.price(before), "bw:r-mm": PRICING.price([mm_first])}
    for evs in after:
        want["bw:" + evs[0]["request_id"]] = PRICING.price(evs)

    recs = wait_until(lambda: (lambda r: r if all(k in r for k in want) else None)(
        {x["idempotency_key"]: x for x in stack.settlements()}),
        timeout=60, interval=0.5, what="%d settlements" % len(want))
    n_bad = len(bad) + 2  # + user_mismatch + the huge one
    dl = stack.wait_messages(stack.dlq_topic, n_bad, timeout=30)
    heads = dlq_headers(stack)

    # Source offsets of the bad messages in the input partition.
    src = {}
    for m in stack.consume(stack.events_topic):
        if m.partition == PART:
            src.setdefault(m.value, []).append(m.offset)
    expected = [(name, key, value, reason) for name, key, value, reason in bad]
    expected.append(("user_mismatch", b"r-mm", j(mm_intruder), "user_mismatch"))

    t.eq(len(dl), n_bad, "exactly %d dead letters" % n_bad)
    cut = [m for m in dl if m.key == b"r-huge"]
    if t.eq(len(cut), 1, "huge message: one dead letter"):
        m = cut[0]
        h = heads.get((m.partition, m.offset), {})
        t.eq(m.value, huge[:512 * 1024], "huge message: its first 512 KiB as the value")
        t.eq((h.get("bw-reason"), h.get("bw-truncated"), h.get("bw-sha256")),
             ("too_large", str(HUGE_BYTES), hashlib.sha256(huge).hexdigest()),
             "huge message: bw-truncated (original length) and bw-sha256 (of the original)")
        offs = src.get(huge, [])
        t.eq(h.get("bw-offset"), str(offs[0]) if offs else "?", "huge message: source offset")
    got_by_value = {}
    for m in dl:
        got_by_value.setdefault(m.value, []).append(m)
    for name, key, value, reason in expected:
        ms = got_by_value.get(value, [])
        if not t.eq(len(ms), 1, "%s: one dead letter with the original bytes" % name):
            continue
        m = ms[0]
        h = heads.get((m.partition, m.offset), {})
        t.eq(h.get("bw-reason"), reason, "%s: bw-reason %s" % (name, reason))
        offs = src.get(value, [])
        t.eq((h.get("bw-topic"), h.get("bw-partition"), h.get("bw-offset")),
             (stack.events_topic, str(PART), str(offs[0]) if offs else "?"),
             "%s: source topic, partition, offset headers" % name)
        t.eq(m.key, key, "%s: original key kept" % name)
        t.check(h.get("bw-detail"), "%s: a bw-detail" % name, h)

    for key, ch in want.items():
        r = recs[key]
        t.eq((r.get("status"), r.get("amount_credits"), r.get("amount_micro"), r.get("cost_usd"),
              r.get("model_calls"), r.get("tool_calls")),
             ("settled", ch.amount_credits, ch.amount_micro, ch.cost_usd, ch.model_calls,
              ch.tool_calls),
             "%s settled with the exact amount %s" % (key, ch.amount_credits))
    led = {e["key"]: e["amount"] for e in stack.ledger()}
    t.eq(led, {k: ch.amount_credits for k, ch in want.items()},
         "ledger: exactly the valid requests, exact amounts (nothing for the bad events)")
    t.eq(recs["bw:r-mm"].get("user_id"), "u-1", "r-mm charged to its first user")

    m = w.metrics()
    counts = Counter(reason for _, _, _, reason in expected)
    counts["too_large"] += 1  # the huge one
    for reason in ("invalid_json", "missing_field", "wrong_type", "invalid_value",
                   "not_object", "unknown_type", "invalid_id", "too_large", "user_mismatch"):
        t.eq(int(m.get('billing_worker_dead_letters_total{reason="%s"}' % reason, -1)),
             counts.get(reason, 0), "metric dead_letters_total{reason=%s} = %d"
             % (reason, counts.get(reason, 0)))
    t.check(w.alive(), "the worker is still running")
    t.eq(w.stop(), 0, "SIGTERM: exit 0")


if __name__ == "__main__":
    sys.exit(bwtest.main("dead letters", test))

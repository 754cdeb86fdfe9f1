#!/usr/bin/env python3
"""0002-legacy-example: PRODUCT.md section 3's example request under the old
system's flat prices settles as exactly 5 credits ($0.01 at $0.002/credit).

Also: a request id with reserved characters gets a percent-encoded idempotency
key (G2), and an empty request (finalize only, no `expected`) is raised to the
1-credit minimum with `finalize: marker` (G4, G6).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bwtest  # noqa: E402
from bwtest import log, wait_until  # noqa: E402

# The old system's prices (1 credit per model call, 2 per tool call, 1 minimum)
# with the one credit_usd rate.
LEGACY = """pricing = {
  version = "legacy-e2e-1";
  credit_usd = 0.002;
  minimum_credits = 1.0;
  precision = 4;
  rounding = "half_up";
  models = ( { match = "*"; credits_per_call = 1.0; } );
  tools = ( { match = "*"; credits_per_call = 2.0; } );
};"""

ODD_RID = "req/1 x:y"
ODD_KEY = "bw:req%2F1%20x%3Ay"  # '/' %2F, ' ' %20, ':' %3A (RFC 3986 unreserved kept)


def by_key(recs):
    return {r.get("idempotency_key"): r for r in recs}


def line(rec, kind, name):
    for ln in rec.get("lines") or []:
        if ln.get("kind") == kind and ln.get("name") == name:
            return ln
    return None


def test(t, stack, args):
    cfg = stack.write_config(pricing=LEGACY,
                             settle={"finalize_grace": "1s", "max_attempts": 2},
                             wallet={"timeout": "1s"}, user_service={"timeout": "1s"})
    w = stack.worker(args.bin, cfg).start()
    w.wait_ready(60)

    # Section 3's example, verbatim (fixed event ids).
    example = [
        {"type": "custom_model_call", "event_id": "e1", "request_id": "r1", "user_id": "u1",
         "model": "gpt-4o", "node_name": "ReasonNode"},
        {"type": "custom_tool_call", "event_id": "e2", "request_id": "r1", "user_id": "u1",
         "tool_name": "web_search"},
        {"type": "custom_model_call", "event_id": "e3", "request_id": "r1", "user_id": "u1",
         "model": "gpt-4o", "node_name": "ReasonNode"},
        {"type": "custom_model_call", "event_id": "e4", "request_id": "r1", "user_id": "u1",
         "model": "gpt-4o", "node_name": "ResponseNode"},
        {"type": "request_finalize", "event_id": "e5", "request_id": "r1", "user_id": "u1",
         "expected": {"model_calls": 3, "tool_calls": 1}},
    ]
    stack.produce(example)
    stack.produce(bwtest.example_request(ODD_RID, "u2"))
    stack.produce([bwtest.finalize("r-empty", "u3")])  # no calls, no `expected`

    t0 = time.monotonic()
    recs = wait_until(lambda: (lambda r: r if len(r) >= 3 else None)(by_key(stack.settlements())),
                      timeout=60, what="3 settlement records")
    log("3 records after %.1fs" % (time.monotonic() - t0))

    r = recs.get("bw:r1")
    t.check(r is not None, "a record with idempotency_key bw:r1", sorted(recs))
    if r:
        # 3 gpt-4o calls x 1 credit + 1 web_search x 2 credits = 5 credits;
        # 5 x 0.002 = 0.010000 USD; 5.0000 credits = 5000000 micro-credits.
        t.eq(r.get("amount_credits"), "5.0000", "example: amount_credits 5.0000")
        t.eq(r.get("amount_micro"), 5000000, "example: amount_micro 5000000")
        t.eq(r.get("cost_usd"), "0.010000", "example: cost_usd 0.010000")
        t.eq(r.get("finalize"), "expected_met", "example: finalize expected_met")
        t.eq(r.get("status"), "settled", "example: status settled")
        t.eq(r.get("kind"), "charge", "example: kind charge")
        t.eq(r.get("schema"), 1, "example: schema 1")
        t.eq((r.get("request_id"), r.get("user_id")), ("r1", "u1"), "example: request and user")
        t.eq((r.get("model_calls"), r.get("tool_calls")), (3, 1), "example: 3 model, 1 tool calls")
        t.eq(r.get("minimum_applied"), False, "example: minimum not applied")
        t.eq(r.get("pricing_version"), "legacy-e2e-1", "example: pricing_version")
        t.check(isinstance(r.get("pricing_sha256"), str) and len(r["pricing_sha256"]) == 64,
                "example: pricing_sha256 is a SHA-256 hex", r.get("pricing_sha256"))
        t.eq(r.get("settled_via"), "wallet", "example: settled via wallet")
        # 1000 initial balance - 5 = 995
        t.eq(r.get("balance_after"), "995.0000", "example: balance_after \"995.0000\" (1000 - 5)")
        t.check(r.get("settled_at"), "example: settled_at set", r.get("settled_at"))
        lm, lt = line(r, "model", "gpt-4o"), line(r, "tool", "web_search")
        t.check(lm is not None and lt is not None and len(r.get("lines") or []) == 2,
                "example: exactly the lines gpt-4o and web_search", r.get("lines"))
        if lm:
            t.eq((lm.get("calls"), lm.get("credits")), (3, "3"), "line gpt-4o: 3 calls, '3'")
        if lt:
            t.eq((lt.get("calls"), lt.get("units"), lt.get("credits")), (1, 1, "2"),
                 "line web_search: 1 call, 1 unit, '2'")

    led = stack.ledger()
    mine = [e for e in led if e["key"] == "bw:r1"]
    t.eq(len(mine), 1, "wallet ledger: one entry with key bw:r1")
    if mine:
        t.eq((mine[0]["amount"], mine[0]["user_id"], mine[0]["via"]), ("5.0000", "u1", "wallet"),
             "ledger entry: amount 5.0000 (written with 4 decimals), u1, via wallet")
        if r:
            t.eq(r.get("transaction_id"), mine[0]["transaction_id"],
                 "record's transaction_id is the wallet's")
        body = bwtest.loads(mine[0]["body"])
        t.eq((body.get("usage_record_id"), body.get("request_id"), body.get("service")),
             ("bw:r1", "r1", "billing-worker"), "wallet body: usage_record_id, request_id, service")
    wcalls = [c for c in stack.calls() if c["key"] == "bw:r1"]
    t.eq([(c["service"], c["status"]) for c in wcalls], [("wallet", 200)],
         "exactly one wallet call for bw:r1 (200), no user-service call")

    # Reserved characters in request_id: percent-encoded key.
    r2 = recs.get(ODD_KEY)
    t.check(r2 is not None, "request %r gets key %s" % (ODD_RID, ODD_KEY), sorted(recs))
    if r2:
        t.eq(r2.get("request_id"), ODD_RID, "odd request: request_id kept as-is")
        t.eq(r2.get("amount_credits"), "5.0000", "odd request: 5.0000 credits")
    odd = [e for e in stack.ledger() if e["key"] == ODD_KEY]
    t.eq([(e["amount"], e["user_id"]) for e in odd], [("5.0000", "u2")],
         "ledger: one entry with the encoded key for u2")
    t.check(all(":" not in e["key"][3:] for e in stack.ledger()),
            "no ':' inside any encoded request id")

    # The empty request: 0 credits, raised to the minimum 1.0000 after rounding.
    r3 = recs.get("bw:r-empty")
    t.check(r3 is not None, "empty request settled", sorted(recs))
    if r3:
        t.eq((r3.get("amount_credits"), r3.get("amount_micro"), r3.get("cost_usd")),
             ("1.0000", 1000000, "0.002000"), "empty request: minimum 1.0000 = $0.002")
        t.eq(r3.get("minimum_applied"), True, "empty request: minimum_applied")
        t.eq(r3.get("finalize"), "marker", "finalize without expected: marker")
        t.eq((r3.get("model_calls"), r3.get("tool_calls"), r3.get("lines")), (0, 0, []),
             "empty request: no calls, no lines")

    t.eq(len(stack.ledger()), 3, "ledger: 3 charges in all")
    t.eq(stack.stats().get("key_conflicts"), 0, "no idempotency key reused with another amount")
    t.eq(w.stop(), 0, "SIGTERM: exit 0")


if __name__ == "__main__":
    sys.exit(bwtest.main("legacy example", test))

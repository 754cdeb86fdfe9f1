#!/usr/bin/env python3
"""0021-replay: disaster recovery after the Redis state was lost.

The worker settles some requests, stops, and Redis is flushed (FLUSHALL).
More requests arrive while no worker runs. `billing-worker replay --settle`
over the window must charge every request without a final outcome exactly
once, with the exact amounts (computed here independently with
decimal.Decimal from the pricing this test writes), never charge a settled
request again, keep the wallet's first outcome for a key the wallet had
already applied (a charge whose record was lost), publish the records, leave
Redis untouched, settle at the wallet only (never the fallback: after a loss
of state an earlier attempt's unknown outcome cannot be ruled out), leave a
settlement the wallet does not accept pending and unpublished (exit 1), finish
it on the next run, and charge nothing on a run after that. An audit of the window
afterwards finds everything matched.
"""
import json
import os
import sys
import time
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bwtest  # noqa: E402
from bwtest import (Checks, Stack, example_request, finalize, log, model_call,  # noqa: E402
                    run_cli, tool_call, wait_until)

PRICING = """pricing = {
  version = "e2e-tokens-1";
  credit_usd = 0.002;
  minimum_credits = 1.0;
  precision = 4;
  rounding = "half_up";
  bill_failed_calls = true;
  models = (
    { match = "gpt-4o-mini*"; input_usd_per_mtok = 0.15; output_usd_per_mtok = 0.60;
      cache_read_usd_per_mtok = 0.075; },
    { match = "*"; credits_per_call = 1.0; }
  );
  tools = (
    { match = "web_search"; credits_per_call = 2.5; },
    { match = "*"; credits_per_call = 2.0; }
  );
};"""

# The same prices, for the independent computation.
CREDIT_USD = Decimal("0.002")
MINI = {"input": Decimal("0.15"), "output": Decimal("0.60"), "cache_read": Decimal("0.075")}
TOOLS = {"web_search": Decimal("2.5")}
MINIMUM = Decimal("1.0")


def expected_amount(events):
    """What one charge of these (deduplicated) events costs, as the contract says."""
    total = Decimal(0)
    seen = set()
    for ev in events:
        key = ev.get("idempotency_key") or ev["event_id"]
        if key in seen:
            continue
        seen.add(key)
        if ev["type"] == "custom_model_call":
            u = ev.get("usage")
            if ev["model"].startswith("gpt-4o-mini") and u is not None:
                usd = (Decimal(u.get("input_tokens", 0)) * MINI["input"]
                       + Decimal(u.get("cache_read_input_tokens", 0)) * MINI["cache_read"]
                       + Decimal(u.get("output_tokens", 0)) * MINI["output"]) / Decimal(10**6)
                total += usd / CREDIT_USD
            else:
                total += Decimal(1)
        elif ev["type"] == "custom_tool_call":
            total += TOOLS.get(ev["tool_name"], Decimal(2)) * ev.get("units", 1)
    amount = total.quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP)
    return max(amount, MINIMUM.quantize(Decimal("0.0001")))


def mini(rid, user, i, o, c=0, **kw):
    return model_call(rid, user, model="gpt-4o-mini-2024-07-18",
                      usage={"input_tokens": i, "output_tokens": o,
                             "cache_read_input_tokens": c}, **kw)


def now_ms():
    return int(time.time() * 1000)


def main():
    args = bwtest.parse_args()
    t = Checks()
    with Stack(keep=args.keep) as stack:
        cfg = stack.write_config(pricing=PRICING,
                                 settle={"finalize_grace": "1s", "request_timeout": "1h",
                                         "max_attempts": 2})
        t_from = now_ms() - 2000

        # ---- phase 1: the worker settles r1..r3 ---------------------------------------
        before = {
            "r1": example_request("r1", "u1"),
            "r2": [mini("r2", "u2", 1000, 500), finalize("r2", "u2")],
            "r3": [mini("r3", "u1", 123457, 45678, 20000), tool_call("r3", "u1", "code_exec",
                                                                     units=2),
                   finalize("r3", "u1", expected=(1, 1))],
        }
        w = stack.worker(args.bin, cfg).start()
        w.wait_ready(60)
        for evs in before.values():
            stack.produce(evs)
        want = {"bw:" + r for r in before}
        wait_until(lambda: want <= {r.get("idempotency_key") for r in stack.settlements()},
                   timeout=90, what="r1..r3 settled")
        t.eq(w.stop(), 0, "worker stops with 0")
        ledger1 = stack.ledger()
        t.eq(sorted(e["key"] for e in ledger1), sorted(want), "the worker charged r1..r3")

        # ---- the Redis state is lost; more requests arrive, nobody settles them --------
        stack.redis("FLUSHALL")
        t.eq(stack.redis("DBSIZE"), "0", "Redis flushed")
        r5_call = mini("r5", "u3", 987654, 123456, 111111)
        after = {
            "r4": [mini("r4", "u1", 1234567, 234567, 34567),
                   tool_call("r4", "u1", "web_search", units=3), finalize("r4", "u1")],
            "r5": [r5_call, dict(r5_call), mini("r5", "u3", 7, 3),  # a duplicate delivery
                   finalize("r5", "u3", expected=(2, 0))],
            "r6": [model_call("r6", "u2", model="claude-x"), finalize("r6", "u2")],
            "r7": [model_call("r7", "u3")],  # no finalize: replay settles it too
            "r8": [model_call("r8", "u4"), finalize("r8", "u4")],  # u4 cannot pay
            "r9": [tool_call("r9", "u5"), finalize("r9", "u5")],  # wallet down for u5
        }
        for evs in after.values():
            stack.produce(evs)
        # r7 was charged by a worker whose record was lost with Redis: the
        # wallet knows the key already and must answer with its first outcome.
        amt7 = expected_amount(after["r7"])
        st, body = stack.wallet_post("u3", amt7, key="bw:r7")
        t.eq(st, 200, "r7 applied at the wallet before the replay")
        stack.set_balance("u4", "0.5")
        stack.fault("wallet", "status", status=503, path="/users/u5/")
        time.sleep(1.2)
        t_to = now_ms() + 500
        ledger2, calls2 = stack.ledger(), stack.calls()

        # ---- replay --------------------------------------------------------------------------
        p = run_cli(args.bin, "replay", "-c", cfg, "--from", t_from, "--to", t_to, "--settle",
                    timeout=180)
        out = p.stdout.decode("utf-8", "replace")
        err = p.stderr.decode("utf-8", "replace")
        log("replay output:\n" + out)
        t.eq(p.returncode, 1, "replay exits 1: a settlement is still pending")
        ledger3 = stack.ledger()
        keys = Counter(e["key"] for e in ledger3)
        t.eq({k: n for k, n in keys.items() if n != 1}, {}, "no key charged twice")
        t.eq(sorted(keys), sorted("bw:" + r for r in ["r1", "r2", "r3", "r4", "r5", "r6", "r7"]),
             "every request that can pay is charged (r8 is rejected)")
        t.eq(ledger3[:len(ledger2)], ledger2, "earlier charges untouched")
        for rid in ["r4", "r5", "r6"]:
            got = [Decimal(e["amount"]) for e in ledger3 if e["key"] == "bw:" + rid]
            t.eq(got, [expected_amount(after[rid])], "%s charged once, exactly" % rid)
        new_calls = [c for c in stack.calls()[len(calls2):]]
        t.eq(sorted(c["key"] for c in new_calls if c["key"] != "bw:r9"),
             sorted("bw:" + r for r in ["r4", "r5", "r6", "r7", "r8"]),
             "one wallet call per request without a final outcome, none for r1..r3")
        t.eq([c["service"] for c in new_calls if c["key"] == "bw:r9"], ["wallet", "wallet"],
             "r9: wallet attempts only, never the user-service fallback")
        t.check(any(line.startswith("r9 ") and "pending" in line for line in out.splitlines()),
                "r9 reported as pending")
        t.eq(stack.stats().get("key_conflicts"), 0, "no key sent with another amount")
        for rid in ["r1", "r2", "r3"]:
            t.check(rid + " " not in out, "%s (already settled) is not replayed" % rid)
        for rid in ["r4", "r5", "r6", "r7"]:
            t.check(any(line.startswith(rid + " ") and "settled" in line
                        for line in out.splitlines()), "%s reported as settled" % rid)
        t.check(any(line.startswith("r8 ") and "rejected" in line for line in out.splitlines()),
                "r8 reported as rejected")
        t.eq(stack.redis("DBSIZE"), "0", "replay wrote nothing to Redis")

        recs = {r["idempotency_key"]: r for r in stack.settlements()}
        for rid in ["r4", "r5", "r6", "r7"]:
            rec = recs.get("bw:" + rid, {})
            t.eq((rec.get("status"), Decimal(str(rec.get("amount_credits", "-1")))),
                 ("settled", expected_amount(after[rid])), "%s record published" % rid)
        t.eq(recs.get("bw:r8", {}).get("status"), "rejected", "r8 record published as rejected")
        t.check("bw:r9" not in recs, "a pending settlement is not published")
        t.eq(recs.get("bw:r5", {}).get("model_calls"), 2, "r5's duplicate was dropped")
        tx7 = [e["transaction_id"] for e in ledger3 if e["key"] == "bw:r7"]
        t.eq(recs.get("bw:r7", {}).get("transaction_id"), tx7[0] if tx7 else None,
             "r7's record carries the wallet's first transaction")

        # ---- the wallet is back: a second run settles r9 only -------------------------------
        stack.clear_faults()
        calls3 = stack.calls()
        p = run_cli(args.bin, "replay", "-c", cfg, "--from", t_from, "--to", t_to, "--settle",
                    timeout=180)
        out2 = p.stdout.decode("utf-8", "replace")
        log("second replay output:\n" + out2)
        t.eq(p.returncode, 0, "second replay exits 0")
        t.eq([c["key"] for c in stack.calls()[len(calls3):]], ["bw:r9"],
             "second replay calls the wallet for r9 only")
        ledger4 = stack.ledger()
        t.eq(ledger4[:len(ledger3)], ledger3, "second replay: earlier charges untouched")
        t.eq([(e["key"], Decimal(e["amount"])) for e in ledger4[len(ledger3):]],
             [("bw:r9", expected_amount(after["r9"]))], "r9 charged once, exactly")
        ledger3 = ledger4

        # ---- a third run charges nothing ---------------------------------------------------
        calls3 = stack.calls()
        p = run_cli(args.bin, "replay", "-c", cfg, "--from", t_from, "--to", t_to, "--settle",
                    timeout=180)
        out3 = p.stdout.decode("utf-8", "replace")
        t.eq(p.returncode, 0, "third replay exits 0")
        t.eq(stack.ledger(), ledger3, "third replay: ledger unchanged")
        t.eq(stack.calls(), calls3, "third replay: no wallet call")
        t.check("0 settled" in out3 and "9 had a final outcome" in out3,
                "third replay reports nothing to do", out3[-400:])

        # ---- the audit agrees ----------------------------------------------------------------
        p = run_cli(args.bin, "audit", "-c", cfg, "--from", t_from, "--to", t_to, "--format",
                    "json", timeout=180)
        lines = [json.loads(x) for x in p.stdout.decode().splitlines() if x.strip()]
        summary = lines[0] if lines else {}
        log("audit: %s" % json.dumps(summary))
        t.eq((p.returncode, summary.get("requests"), summary.get("matched"),
              summary.get("rejected")), (0, 9, 9, 1), "audit after replay: all matched")
        total = sum((expected_amount(evs) for evs in list(before.values()) + list(after.values())),
                    Decimal(0))
        t.eq(Decimal(summary.get("expected_credits", "-1")), total, "audit: expected credits")
        t.eq(Decimal(summary.get("settled_credits", "-1")),
             total - expected_amount(after["r8"]), "audit: settled credits (r8 rejected)")
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())

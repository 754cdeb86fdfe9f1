#!/usr/bin/env python3
"""0008-sighup: SIGHUP reloads pricing (issue 3, PRODUCT.md section 9).

The worker starts with pricing "v1" (flat, 4 decimals); a request settles
with v1. The config file's pricing is rewritten to "v2" (token prices, 3
decimals, ceil) and SIGHUP sent: the next request carries pricing_version
"v2" and the v2 amount. Then an invalid pricing (a models list without a "*"
rule) is written and SIGHUP sent: refused (logged,
billing_worker_pricing_reloads_total{result="refused"} 1), the worker keeps
running and the next request is still priced with v2; a file with a syntax
error is refused the same way. A request whose events straddle a reload is
priced with one version only.
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bwtest  # noqa: E402
import pricing_model as pm  # noqa: E402
from bwtest import log, wait_until  # noqa: E402

V1 = pm.Pricing({
    "version": "v1", "credit_usd": "0.002", "minimum_credits": "1.0", "precision": 4,
    "rounding": "half_up",
    "models": [{"match": "*", "credits_per_call": "1.0"}],
    "tools": [{"match": "*", "credits_per_call": "2.0"}],
})
V2 = pm.Pricing({
    "version": "v2", "credit_usd": "0.002", "minimum_credits": "2", "precision": 3,
    "rounding": "ceil",
    "models": [{"match": "gpt-4o*", "input_usd_per_mtok": "2.5", "output_usd_per_mtok": "10",
                "credits_per_call": "0.25"},
               {"match": "*", "credits_per_call": "3"}],
    "tools": [{"match": "web_search", "credits_per_call": "4"},
              {"match": "*", "credits_per_call": "5"}],
})
# Invalid: the models list has no "*" rule.
INVALID = """pricing = {
  version = "v3-invalid";
  credit_usd = 0.002;
  minimum_credits = 1.0;
  models = ( { match = "gpt-4o*"; credits_per_call = 100.0; } );
  tools = ( { match = "*"; credits_per_call = 100.0; } );
};"""
SYNTAX_ERROR = """pricing = {
  version = "v4-broken";
  credit_usd = = 0.002;
  models = ( { match = "*"; credits_per_call = 100.0; } );
  tools = ( { match = "*"; credits_per_call = 100.0; } );
};"""


def mixed_request(rid, uid):
    return [
        bwtest.model_call(rid, uid, model="gpt-4o", usage={
            "prompt_tokens": 4001, "completion_tokens": 500}),
        bwtest.model_call(rid, uid, model="mystery-model"),
        bwtest.tool_call(rid, uid, tool_name="web_search", units=2),
        bwtest.finalize(rid, uid, expected=(2, 1)),
    ]
# v1: 2 model calls x 1 + web_search 2 units x 2 = 6.0000 credits
# v2: gpt-4o (4001*2.5 + 500*10)/1e6 = 0.0150025 USD = 7.50125 credits, + 0.25 = 7.75125;
#     mystery-model 3; web_search 2 units x 4 = 8; total 18.75125 -> ceil, 3 decimals
#     = 18.752 credits; cost 18.752 * 0.002 = 0.037504 USD


def replace_pricing(cfg, text):
    body = cfg.path.read_text()
    old = bwtest.extract_group(body, "pricing")
    assert old is not None, "no pricing group in %s" % cfg.path
    cfg.path.write_text(body.replace(old, text.strip()))


def settle(stack, rid, timeout=30):
    def got():
        for r in stack.settlements():
            if r.get("request_id") == rid:
                return r
        return None
    return wait_until(got, timeout=timeout, what="the record of %s" % rid)


def reloads(w, result):
    return int(w.metrics().get('billing_worker_pricing_reloads_total{result="%s"}' % result, -1))


def test(t, stack, args):
    cfg = stack.write_config(pricing=V1.libconfig(),
                             settle={"finalize_grace": "1s", "max_attempts": 2},
                             wallet={"timeout": "1s"}, user_service={"timeout": "1s"})
    w = stack.worker(args.bin, cfg).start()
    w.wait_ready(60)

    # v1
    want = V1.price(mixed_request("x", "x"))
    t.eq((want.amount_credits, V2.price(mixed_request("x", "x")).amount_credits),
         ("6.0000", "18.752"), "pricing_model agrees with the hand computation (v1 6, v2 18.752)")
    stack.produce(mixed_request("r-v1", "u1"))
    r1 = settle(stack, "r-v1")
    t.eq((r1.get("pricing_version"), r1.get("amount_credits"), r1.get("cost_usd")),
         ("v1", "6.0000", "0.012000"), "r-v1 priced with v1: 6.0000 credits, $0.012000")
    # A request open across the reload: two calls now, the rest after SIGHUP.
    straddle = mixed_request("r-straddle", "u3")
    stack.produce(straddle[:2])

    # v2
    replace_pricing(cfg, V2.libconfig())
    w.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: reloads(w, "ok") == 1, timeout=15, what="reload ok = 1")
    t.eq(reloads(w, "refused"), 0, "valid v2: reloads{refused} 0")
    stack.produce(straddle[2:])
    stack.produce(mixed_request("r-v2", "u2"))
    r2 = settle(stack, "r-v2")
    t.eq((r2.get("pricing_version"), r2.get("amount_credits"), r2.get("amount_micro"),
          r2.get("cost_usd")), ("v2", "18.752", 18752000, "0.037504"),
         "after SIGHUP r-v2 priced with v2: 18.752 credits, $0.037504")
    t.check(r2.get("pricing_sha256") and r2.get("pricing_sha256") != r1.get("pricing_sha256"),
            "v2 records carry another pricing_sha256",
            (r1.get("pricing_sha256"), r2.get("pricing_sha256")))
    rs = settle(stack, "r-straddle")
    per_version = {"v1": V1.price(straddle), "v2": V2.price(straddle)}
    pv = rs.get("pricing_version")
    t.check(pv in per_version and rs.get("amount_credits") == per_version[pv].amount_credits,
            "a request straddling the reload is priced with one version only",
            (pv, rs.get("amount_credits"),
             {k: v.amount_credits for k, v in per_version.items()}))

    # invalid: refused, v2 kept
    replace_pricing(cfg, INVALID)
    w.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: reloads(w, "refused") == 1, timeout=15, what="reload refused = 1")
    t.eq(reloads(w, "ok"), 1, "invalid pricing: reloads{ok} still 1")
    time.sleep(0.5)
    t.check(w.alive(), "the worker keeps running after a refused reload")
    refusals = [x for x in w.log_json() if "refused" in str(x.get("msg", x.get("message", "")))]
    t.check(refusals, "the refusal is logged", w.log()[-2000:])
    if refusals:
        log("refusal log line: %s" % refusals[-1])
        t.check("*" in str(refusals[-1]) or "models" in str(refusals[-1]),
                "the refusal names the problem (the missing '*' rule)", refusals[-1])
    stack.produce(mixed_request("r-v2b", "u1"))
    r3 = settle(stack, "r-v2b")
    t.eq((r3.get("pricing_version"), r3.get("amount_credits"),
          r3.get("pricing_sha256") == r2.get("pricing_sha256")), ("v2", "18.752", True),
         "after the refused reload r-v2b is still priced with v2")

    # a syntax error: refused too
    replace_pricing(cfg, SYNTAX_ERROR)
    w.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: reloads(w, "refused") == 2, timeout=15, what="reload refused = 2")
    stack.produce(mixed_request("r-v2c", "u2"))
    r4 = settle(stack, "r-v2c")
    t.eq((r4.get("pricing_version"), r4.get("amount_credits")), ("v2", "18.752"),
         "a file with a syntax error is refused as well; v2 kept")

    led = {e["key"]: e["amount"] for e in stack.ledger()}
    t.eq({k: led.get(k) for k in ("bw:r-v1", "bw:r-v2", "bw:r-v2b", "bw:r-v2c")},
         {"bw:r-v1": "6.0000", "bw:r-v2": "18.752", "bw:r-v2b": "18.752",
          "bw:r-v2c": "18.752"}, "the wallet charged exactly those amounts")
    t.eq(w.stop(), 0, "SIGTERM: exit 0")


if __name__ == "__main__":
    sys.exit(bwtest.main("SIGHUP pricing reload", test))

#!/usr/bin/env python3
"""0009-price-cli: `billing-worker price` and `check-config` (issue 3,
PRODUCT.md section 8). No Kafka, Redis or wallet needed.

`price -c pricing-only.cfg --format json events.jsonl` on realistic traffic
(tests/e2e/gen_traffic.py: four models, the three usage shapes, tools with
units, failed calls, finalize markers without `expected`, one event in five
as a CloudEvents envelope) with duplicates
inside the input (same event_id re-sent, tool calls retried under a new
event_id with the same idempotency_key, a whole request sent twice),
malformed lines, a user_mismatch line and a request without a finalize marker:
one record per request in order of first appearance, status dry_run, amounts,
counts, tokens and lines per pricing_model.py (duplicates not counted);
malformed lines reported on stderr with their line numbers; `-` reads stdin.
`--format table` prints every line with its credits. `check-config` on broken
files prints "FILE:LINE: ..." and exits 2.
"""

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bwtest  # noqa: E402
import gen_traffic  # noqa: E402
import pricing_model as pm  # noqa: E402
from bwtest import Checks, log, run_cli  # noqa: E402

PRICING = pm.Pricing(pm.example_spec("e2e-price-cli-1"))


def build_input():
    """(lines of the JSONL file, bad line numbers (1-based), valid events in
    file order, requests without a finalize marker)."""
    a = argparse.Namespace(requests=20, users=6, seed=9009, dup_rate=0.3, idempotency_rate=0.6,
                           error_rate=0.05, no_expected_rate=0.2, cloudevents_rate=0.2,
                           malformed=0, concurrency=5, id_prefix="pc-", user_prefix="pc",
                           start_time="2026-12-01T09:00:00Z")
    stream, _ = gen_traffic.Gen(a).run()
    stream = list(stream)
    # A tool call retried under a new event_id with the same idempotency_key.
    tool = next(e for e in stream if e.get("type") == "custom_tool_call"
                and "idempotency_key" in e)
    stream.append(dict(tool, event_id=bwtest.new_id()))
    # A whole request sent twice (a replayed batch).
    rid0 = pm.unwrap(stream[0])["request_id"]
    stream += [dict(e) for e in stream if pm.unwrap(e)["request_id"] == rid0]
    # A request without a finalize marker.
    nofin = [bwtest.model_call("pc-nofin", "pc-u-x", model="gpt-4o-mini", usage={
                 "input_tokens": 800, "cache_read_input_tokens": 100, "output_tokens": 90}),
             bwtest.tool_call("pc-nofin", "pc-u-x", tool_name="mcp_fetch", units=4)]
    stream[5:5] = nofin
    valid_rid = pm.unwrap(stream[10])["request_id"]
    valid_uid = pm.unwrap(stream[10])["user_id"]
    bad = [
        (3, '{"type":"custom_model_call","event_id":"b1","request_id":"pc-bad-1"'),  # JSON
        (8, json.dumps({"type": "custom_tool_call", "event_id": "b2",
                        "request_id": "pc-bad-2", "tool_name": "web_search"})),  # no user_id
        (15, json.dumps({"type": "custom_model_call", "event_id": "b3", "request_id": "pc-bad-3",
                         "user_id": "pc-u-x", "model": "gpt-4o",
                         "usage": {"prompt_tokens": 1000.0, "completion_tokens": 1}})),  # 1000.0
        (21, json.dumps({"type": "custom_model_call", "event_id": "b4", "request_id": "pc-bad-4",
                         "user_id": "pc-u-x", "model": "gpt-4o",
                         "usage": {"input_tokens": -1}})),  # negative count
        (30, "[]"),
    ]
    lines = [json.dumps(e, separators=(",", ":")) for e in stream]
    valid = list(stream)
    # user_mismatch: an event of an existing request with another user; after
    # the request's first event (line > 11), so it is the intruder.
    mm = bwtest.tool_call(valid_rid, valid_uid + "-other", tool_name="web_search", units=9)
    bad.append((40, json.dumps(mm)))
    for ln, text in sorted(bad):
        lines.insert(ln - 1, text)
    bad_lines = sorted(ln for ln, _ in bad)
    for ln, text in bad:
        assert lines[ln - 1] == text
    return lines, bad_lines, valid, {"pc-nofin"}


def finalize_reason(evs):
    fins = [e for e in evs if e["type"] == "request_finalize"]
    if not fins:
        return "timeout"
    exp = fins[0].get("expected")
    if exp is None:
        return "marker"
    n_model = sum(e["type"] == "custom_model_call" for e in evs)
    n_tool = sum(e["type"] == "custom_tool_call" for e in evs)
    ok = n_model >= exp["model_calls"] and n_tool >= exp["tool_calls"]
    return "expected_met" if ok else "incomplete"


def check_json(t, out, groups):
    recs = [bwtest.loads(x) for x in out.decode().splitlines() if x.strip()]
    t.eq([r.get("request_id") for r in recs], [rid for rid, _ in groups],
         "one record per request, in order of first appearance (%d)" % len(groups))
    bad = []
    for r, (rid, evs) in zip(recs, groups):
        ch = PRICING.price(evs)
        got = (r.get("status"), r.get("kind"), r.get("idempotency_key"), r.get("user_id"),
               r.get("amount_credits"), r.get("amount_micro"), r.get("cost_usd"),
               r.get("model_calls"), r.get("tool_calls"), r.get("tokens"),
               r.get("minimum_applied"), r.get("pricing_version"), r.get("finalize"))
        exp = ("dry_run", "charge", "bw:" + rid, evs[0]["user_id"], ch.amount_credits,
               ch.amount_micro, ch.cost_usd, ch.model_calls, ch.tool_calls, ch.tokens,
               ch.minimum_applied, "e2e-price-cli-1", finalize_reason(evs))
        p = []
        if got != exp:
            p.append("record %r, want %r" % (got, exp))
        lines = {(x.get("kind"), x.get("name")): x for x in r.get("lines") or []}
        if set(lines) != set(ch.lines):
            p.append("lines %s, want %s" % (sorted(lines), sorted(ch.lines)))
        for k, eln in ch.lines.items():
            g = lines.get(k)
            if g is None:
                continue
            if g.get("calls") != eln.calls or Decimal(g.get("credits", "NaN")) != eln.credits:
                p.append("line %s: %s calls %s credits, want %d %s"
                         % (k, g.get("calls"), g.get("credits"), eln.calls,
                            pm.fmt_plain(eln.credits)))
            if k[0] == "tool" and g.get("units") != eln.units:
                p.append("line %s: units %s, want %d" % (k, g.get("units"), eln.units))
            if k[0] == "model" and g.get("tokens") != eln.tokens:
                p.append("line %s: tokens %s, want %s" % (k, g.get("tokens"), eln.tokens))
        if p:
            bad.append("%s: %s" % (rid, "; ".join(p)))
    t.check(not bad, "every record: dry_run, amount, counts, tokens and lines per "
            "pricing_model.py (duplicates not counted)", "\n  " + "\n  ".join(bad))
    return recs


def check_table(t, out, groups):
    text = out.decode("utf-8", "replace")
    rows = text.splitlines()
    missing = []
    for rid, evs in groups:
        ch = PRICING.price(evs)
        start = next((i for i, row in enumerate(rows) if rid in row), None)
        if start is None:
            missing.append("%s: not in the table" % rid)
            continue
        end = next((i for i in range(start + 1, len(rows))
                    if any(r2 in rows[i] for r2, _ in groups if r2 != rid)), len(rows))
        block = rows[start:end]
        for (kind, name), ln in ch.lines.items():
            credits = pm.fmt_plain(ln.credits)
            if not any(re.search(r"(^|\s)%s(\s|$)" % re.escape(name), row)
                       and re.search(r"(^|\s)%s(\s|$)" % re.escape(credits), row)
                       for row in block):
                missing.append("%s: no row with %s and its credits %s" % (rid, name, credits))
        if not any(ch.amount_credits in row for row in block):
            missing.append("%s: the charged amount %s" % (rid, ch.amount_credits))
    t.check(not missing, "table: every request, every line with its exact credits, the "
            "charged amount", "\n  " + "\n  ".join(missing) + "\n" + text[:3000])


def test(t, bin, d):
    cfg = d / "pricing-only.cfg"
    cfg.write_text(PRICING.libconfig())
    lines, bad_lines, valid, _ = build_input()
    events = d / "events.jsonl"
    events.write_text("\n".join(lines) + "\n")
    # The valid events as the worker sees them: the user_mismatch event is
    # dropped by validation, so it is not in `valid`.
    groups = pm.group_requests(valid)
    n_dups = len(valid) - len(pm.dedup(valid))
    log("%d lines, %d requests, %d malformed/mismatch lines %s, %d duplicates"
        % (len(lines), len(groups), len(bad_lines), bad_lines, n_dups))

    p = run_cli(bin, "price", "-c", cfg, "--format", "json", events)
    t.eq(p.returncode, 0, "price --format json exits 0 (malformed lines do not change it)")
    err = p.stderr.decode("utf-8", "replace")
    log("price stderr:\n" + err)
    check_json(t, p.stdout, groups)

    reported = set()
    for row in err.splitlines():  # "line 7: ..." or "events.jsonl:7: ..."
        m = re.search(r"\bline[ :#]*(\d+)\b|events\.jsonl:(\d+)", row, re.I)
        if m:
            reported.add(int(m.group(1) or m.group(2)))
    t.eq(sorted(reported), bad_lines,
         "stderr reports exactly the malformed and user_mismatch lines, by line number")
    t.check(str(n_dups) in (err.strip().splitlines() or [""])[-1],
            "the summary line counts the %d duplicates dropped" % n_dups, err[-300:])

    p2 = run_cli(bin, "price", "-c", cfg, "--format", "json", "-", input=events.read_bytes())
    t.eq((p2.returncode, p2.stdout), (0, p.stdout), "'-' reads stdin: the same records")

    p3 = run_cli(bin, "price", "-c", cfg, "--format", "table", events)
    t.eq(p3.returncode, 0, "price --format table exits 0")
    check_table(t, p3.stdout, groups)

    # A small request, by hand: 3 x gpt-4o-mini chat calls, nothing else.
    # each: prompt 1000 incl. 512 cached, completion 100:
    # (488*0.15 + 512*0.075 + 100*0.60)/1e6 = (73.2 + 38.4 + 60)/1e6 = 0.0001716 USD
    # = 0.0858 credits; x3 = 0.2574 -> below the minimum: 1.0000, minimum_applied
    small = [bwtest.model_call("pc-small", "u", model="gpt-4o-mini", usage={
        "prompt_tokens": 1000, "completion_tokens": 100,
        "prompt_tokens_details": {"cached_tokens": 512}}) for _ in range(3)]
    small.append(small[0])  # a duplicate
    p4 = run_cli(bin, "price", "-c", cfg, "--format", "json", "-",
                 input="".join(json.dumps(e) + "\n" for e in small).encode())
    recs = [json.loads(x) for x in p4.stdout.decode().splitlines() if x.strip()]
    t.eq([(r["amount_credits"], r["minimum_applied"], r["model_calls"], r["lines"][0]["credits"])
          for r in recs], [("1.0000", True, 3, "0.2574")],
         "by hand: 3 x 0.0858 = 0.2574 credits, raised to the 1.0000 minimum")

    # check-config
    p = run_cli(bin, "check-config", "-c", cfg)
    t.eq(p.returncode, 0, "check-config on the valid pricing-only file exits 0")
    broken = {
        "syntax": ('pricing = {\n  version = "x";\n  credit_usd = = 0.002;\n'
                   '  models = ( { match = "*"; credits_per_call = 1.0; } );\n'
                   '  tools = ( { match = "*"; credits_per_call = 1.0; } );\n};\n', 3),
        "no-star": ('pricing = {\n  version = "x";\n  credit_usd = 0.002;\n'
                    '  models = ( { match = "gpt-*"; credits_per_call = 1.0; } );\n'
                    '  tools = ( { match = "*"; credits_per_call = 1.0; } );\n};\n', 4),
        "precision": ('pricing = {\n  version = "x";\n  credit_usd = 0.002;\n'
                      '  models = ( { match = "*"; credits_per_call = 1.0; } );\n'
                      '  tools = ( { match = "*"; credits_per_call = 1.0; } );\n'
                      '  precision = 9;\n};\n', 6),
    }
    for name, (text, line) in broken.items():
        f = d / ("broken-%s.cfg" % name)
        f.write_text(text)
        p = run_cli(bin, "check-config", "-c", f)
        err = p.stderr.decode("utf-8", "replace")
        t.eq(p.returncode, 2, "check-config on %s exits 2" % f.name)
        t.check(re.search(r"(^|\n)%s:%d: \S" % (re.escape(str(f)), line), err),
                "check-config on %s prints '%s:%d: ...'" % (f.name, f, line), err)
    f = d / "broken-no-star.cfg"
    p = run_cli(bin, "price", "-c", f, events)
    t.check(p.returncode == 2 and ("%s:4: " % f) in p.stderr.decode(),
            "price with a broken config: FILE:LINE and exit 2",
            (p.returncode, p.stderr.decode()[:300]))

# ---- differential: random pricings and traffic vs pricing_model.py ---------------------
def _rprice(rng):
    """A price with up to 12 significant digits, 0 .. < 100."""
    digits = rng.randint(1, 12)
    d = Decimal(rng.randint(0, 10 ** digits - 1)).scaleb(-rng.randint(0, 12))
    if rng.random() < 0.2:
        d = Decimal(rng.randint(0, 50))
    while d >= 100:
        d = d.scaleb(-3)
    return pm.fmt_plain(d)


def _rspec(rng, i):
    models = []
    for m in ["gpt-4o-mini*", "gpt-4o*", "o3*", "claude*"]:
        if rng.random() < 0.7:
            r = {"match": m}
            for f in pm.MODEL_FIELDS:
                if rng.random() < 0.5:
                    r[f] = _rprice(rng)
            models.append(r)
    star = {"match": "*", "credits_per_call": _rprice(rng)}
    if rng.random() < 0.3:
        star["input_usd_per_mtok"] = _rprice(rng)
    models.append(star)
    tools = []
    for name in ["web_search", "code_*"]:
        if rng.random() < 0.7:
            r = {"match": name}
            for f in pm.TOOL_FIELDS:
                if rng.random() < 0.6:
                    r[f] = _rprice(rng)
            tools.append(r)
    tools.append({"match": "*", "credits_per_call": _rprice(rng)})
    return {"version": "fuzz-%d" % i,
            "credit_usd": rng.choice(["0.01", "0.002", "0.0025", "0.001", "0.005", "0.02", "1"]),
            "minimum_credits": rng.choice(["0", "1.0", "3", "0.5", "0.25", "0.125"]),
            "precision": rng.randint(3, 6), "rounding": rng.choice(sorted(pm.ROUNDING)),
            "bill_failed_calls": rng.random() < 0.7, "models": models, "tools": tools}


def _rusage(rng):
    big = rng.random() < 0.1  # token counts near 2^40

    def n(hi=20000):
        return rng.randint(2 ** 39, 2 ** 40 - 1) if big and rng.random() < 0.5 \
            else rng.randint(0, hi)
    k = rng.randint(0, 3)
    if k == 0:
        return None
    if k == 1:
        p, o = n(), n()
        c = rng.randint(0, p)
        u = {"prompt_tokens": p, "completion_tokens": o,
             "prompt_tokens_details": {"cached_tokens": c},
             "completion_tokens_details": {"reasoning_tokens": rng.randint(0, o)}}
        if rng.random() < 0.5:
            u["cache_creation_input_tokens"] = rng.randint(0, p - c)
        return u
    if k == 2:
        i, o = n(), n()
        return {"input_tokens": i, "output_tokens": o,
                "input_tokens_details": {"cached_tokens": rng.randint(0, i)},
                "output_tokens_details": {"reasoning_tokens": rng.randint(0, o)}}
    o = n()
    u = {"input_tokens": n(), "cache_read_input_tokens": n(),
         "cache_creation_input_tokens": n(), "output_tokens": o}
    if rng.random() < 0.5:
        u["reasoning_tokens"] = rng.randint(0, o)
    return u


def _revents(rng, rid):
    evs = []
    for j in range(rng.randint(0, 5)):
        e = {"event_id": "%s-%d" % (rid, j), "request_id": rid, "user_id": "u"}
        if rng.random() < 0.6:
            e.update(type="custom_model_call",
                     model=rng.choice(["gpt-4o-mini", "gpt-4o", "o3-mini", "claude-x", "other"]))
            u = _rusage(rng)
            if u is not None:
                e["usage"] = u
        else:
            e.update(type="custom_tool_call", tool_name=rng.choice(["web_search", "code_exec", "x"]))
            if rng.random() < 0.7:
                e["units"] = rng.choice([1, 2, 3, 999999, 1000000])
        if rng.random() < 0.15:
            e["status"] = "error"
        evs.append(e)
        if rng.random() < 0.2:
            evs.append(dict(e))  # a duplicate
    return evs + [{"type": "request_finalize", "event_id": rid + "-f", "request_id": rid,
                   "user_id": "u"}]


def differential(t, bin, d, cases=120, seed=90090):
    """Random pricings (prices with up to 12 significant digits, every rounding
    mode, precision 3..6, five credit_usd rates, bill_failed_calls on/off) and
    random requests (three usage shapes, tokens up to 2^40-1, units up to 10^6,
    failed calls, calls without usage, duplicates), priced by `price` and by
    pricing_model.py: amounts and the per-name sums of line credits must agree
    exactly."""
    bad = []
    for i in range(seed, seed + cases):
        rng = random.Random(i)
        p = pm.Pricing(_rspec(rng, i))
        cfg = d / "fuzz.cfg"
        cfg.write_text(p.libconfig())
        evs = [e for r in range(6) for e in _revents(rng, "r%d" % r)]
        cp = run_cli(bin, "price", "-c", cfg, "--format", "json", "-",
                     input="".join(json.dumps(e) + "\n" for e in evs).encode())
        if cp.returncode != 0:
            bad.append("case %d: exit %d: %s" % (i, cp.returncode, cp.stderr.decode()[:300]))
            continue
        recs = [json.loads(x) for x in cp.stdout.decode().splitlines() if x.strip()]
        groups = pm.group_requests(evs)
        if [r["request_id"] for r in recs] != [rid for rid, _ in groups]:
            bad.append("case %d: requests %r" % (i, [r["request_id"] for r in recs]))
            continue
        for rec, (rid, g) in zip(recs, groups):
            ch = p.price(g)
            got = (rec["amount_credits"], rec["amount_micro"], rec["cost_usd"],
                   rec["minimum_applied"], rec["model_calls"], rec["tool_calls"], rec["tokens"])
            exp = (ch.amount_credits, ch.amount_micro, ch.cost_usd, ch.minimum_applied,
                   ch.model_calls, ch.tool_calls, ch.tokens)
            sums = {}
            for ln in rec["lines"]:  # a name may have several lines (by basis)
                k = (ln["kind"], ln["name"])
                sums[k] = sums.get(k, 0) + Decimal(ln["credits"])
            want_sums = {k: v.credits for k, v in ch.lines.items()}
            if got != exp or sums != want_sums:
                bad.append("case %d %s: got %r lines %r, want %r lines %r"
                           % (i, rid, got, sums, exp, want_sums))
                break
    t.check(not bad, "differential: %d random pricings x 6 requests, `price` == "
            "pricing_model.py exactly" % cases, "\n  " + "\n  ".join(bad[:10]))


def main():
    args = bwtest.parse_args()
    t = Checks()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bw-e2e-price-") as d:
        t.run("price and check-config", test, t, args.bin, Path(d))
        t.run("differential pricing", differential, t, args.bin, Path(d))
    log("run time %.1fs" % (time.monotonic() - t0))
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())

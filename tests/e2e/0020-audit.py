#!/usr/bin/env python3
"""0020-audit: `billing-worker audit` reconciles a window of the input topic
with the settlements topic, against a real broker, without touching the
wallet, the user service, Redis or the live consumer group.

The window holds: settled requests (one of them with duplicate deliveries,
one with a late adjustment), requests still open (no finalize, long
request_timeout), a malformed message, a user mismatch, one request whose
settlement record was altered afterwards (a second record with the same
idempotency_key and a wrong amount, written by this test) and one record
for a request without events. The JSON summary must count each class
exactly and name the altered request; the exit code is 3. Earlier pricing
versions are found beside the config (pricing-*.cfg) by their sha256.
"""
import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bwtest  # noqa: E402
from bwtest import (Checks, Stack, example_request, finalize, log, model_call,  # noqa: E402
                    run_cli, tool_call, wait_until)

PRICING_V2 = """pricing = {
  version = "e2e-flat-2";
  credit_usd = 0.002;
  minimum_credits = 1.0;
  precision = 4;
  rounding = "half_up";
  bill_failed_calls = true;
  models = ( { match = "*"; credits_per_call = 3.0; } );
  tools = ( { match = "*"; credits_per_call = 2.0; } );
};"""

SETTLED = ["r-s1", "r-s2", "r-s3", "r-s4", "r-alt", "r-late"]
OPEN = ["r-o1", "r-o2"]


def now_ms():
    return int(time.time() * 1000)


def rfc3339(ms):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def audit(args, cfg, t_from, t_to, *extra, fmt="json"):
    p = run_cli(args.bin, "audit", "-c", cfg, "--from", t_from, "--to", t_to, "--format", fmt,
                *extra, timeout=180)
    return p, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def parse_json_report(out):
    lines = [json.loads(x) for x in out.splitlines() if x.strip()]
    return (lines[0] if lines else {}), lines[1:]


def redis_snapshot(stack):
    keys = sorted(k for k in stack.redis("KEYS", "*").splitlines() if k)
    return stack.redis("DBSIZE"), keys


def redis_connections(stack):
    for line in stack.redis("INFO", "stats").splitlines():
        if line.startswith("total_connections_received:"):
            return int(line.split(":", 1)[1])
    return -1


def consumer_groups(stack):
    libs = os.environ.get("BW_KAFKA_LIBS") or str(
        Path(os.environ.get("BW_CACHE") or Path.home() / ".cache" / "billing-worker")
        / "kafka-3.9.1" / "libs")
    p = subprocess.run(
        ["java", "-Xmx128m", "-Dlog4j.configuration=file:%s"
         % (bwtest.REPO / "deploy" / "kafka" / "log4j.properties"),
         "-cp", libs + "/*", "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
         "--bootstrap-server", stack.brokers, "--list"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    return p.returncode, p.stdout.decode("utf-8", "replace")


def main():
    args = bwtest.parse_args()
    t = Checks()
    with Stack(keep=args.keep) as stack:
        cfg = stack.write_config(settle={"finalize_grace": "1s", "request_timeout": "1h"})
        t_from = now_ms() - 2000
        w = stack.worker(args.bin, cfg).start()
        w.wait_ready(60)

        # ---- traffic ------------------------------------------------------------
        s1 = example_request("r-s1", "u1")
        s1.insert(2, model_call("r-s1", "u-other"))  # user mismatch: dead letter
        stack.produce(s1)
        stack.produce([model_call("r-s2", "u1"), model_call("r-s2", "u1"),
                       finalize("r-s2", "u1")])
        stack.produce([tool_call("r-s3", "u2", units=3), finalize("r-s3", "u2", expected=(0, 1))])
        s4 = example_request("r-s4", "u2")
        stack.produce([ev for ev in s4 for _ in (0, 1)])  # every event delivered twice
        stack.produce([dict(s4[0], model="gpt-4o-other")])  # same key, other payload: first wins
        stack.produce(example_request("r-alt", "u3"))
        stack.produce([model_call("r-late", "u3"), finalize("r-late", "u3")])
        stack.produce(["this is not JSON"])
        stack.produce([model_call("r-o1", "u1")])
        stack.produce([model_call("r-o2", "u2"), model_call("r-o2", "u2"),
                       tool_call("r-o2", "u2")])

        def keys():
            return {r.get("idempotency_key") for r in stack.settlements()}

        wait_until(lambda: "bw:r-late" in keys(), timeout=60, what="r-late's charge")
        time.sleep(0.2)
        t_mid = now_ms()  # only r-late's late event is after this
        stack.produce([model_call("r-late", "u3")])  # late: adjustment 1
        want = {"bw:" + r for r in SETTLED} | {"bw:r-late:adj:1"}
        wait_until(lambda: want <= keys(), timeout=90, what="all settlements")
        t.eq(w.stop(), 0, "worker stops with 0")

        # ---- an altered record and a record without events ------------------------
        raw = {}
        for m in stack.consume(stack.settlements_topic):
            rec = json.loads(m.value)
            raw.setdefault(rec["idempotency_key"], rec)
        altered = dict(raw["bw:r-alt"])
        t.eq(altered["amount_credits"], "5.0000", "r-alt was settled with 5 credits")
        altered.update(amount_credits="9.0000", amount_micro=9000000, cost_usd="0.018000")
        ghost = dict(raw["bw:r-s1"])
        ghost.update(request_id="r-ghost", user_id="u9", idempotency_key="bw:r-ghost",
                     amount_credits="3.0000", amount_micro=3000000, cost_usd="0.006000",
                     settled_at=rfc3339(now_ms()))
        stack.produce([altered, ghost], topic=stack.settlements_topic)
        time.sleep(1.2)
        t_to = now_ms() + 1000

        # ---- the audit ------------------------------------------------------------------
        calls_before, ledger_before = stack.calls(), stack.ledger()
        redis_before = redis_snapshot(stack)
        conns_before = redis_connections(stack)
        p, out, err = audit(args, cfg, t_from, t_to)
        conns_after = redis_connections(stack)
        t.eq(p.returncode, 3, "audit exits 3 (mismatched and unsettled requests)")
        summary, exceptions = parse_json_report(out)
        log("summary: %s" % json.dumps(summary))
        if args.verbose:
            print(out)
        for k, v in [("requests", 8), ("matched", 5), ("mismatched", 1), ("unsettled", 2),
                     ("settled_without_events", 1), ("duplicates", 6),
                     ("duplicates_conflicting", 1), ("rejected", 0),
                     ("malformed", 1), ("user_mismatch", 1), ("pricing_unavailable", 0)]:
            t.eq(summary.get(k), v, "summary %s" % k)
        t.eq(summary.get("expected_credits"), "30.0000", "expected credits: 5+2+6+5+5+2+1+4")
        t.eq(summary.get("settled_credits"), "28.0000", "settled credits: 25 settled + 3 ghost")
        users = summary.get("users", {})
        t.eq(users.get("u1"), {"requests": 3, "expected_credits": "8.0000",
                               "settled_credits": "7.0000"}, "user u1 totals")
        t.eq(users.get("u2", {}).get("expected_credits"), "15.0000", "user u2 expected")
        t.eq(users.get("u2", {}).get("settled_credits"), "11.0000", "user u2 settled")
        t.eq(users.get("u9", {}).get("settled_credits"), "3.0000", "ghost user settled")
        by_class = {}
        for e in exceptions:
            by_class.setdefault(e.get("class"), []).append(e)
        mism = by_class.get("mismatched", [])
        t.eq([e.get("request_id") for e in mism], ["r-alt"], "the altered request is named")
        if mism:
            t.eq(mism[0].get("idempotency_key"), "bw:r-alt", "mismatch names the key")
            t.eq(mism[0].get("record_credits"), "9.0000", "mismatch: the record's amount")
            t.eq(mism[0].get("recomputed_credits"), "5.0000", "mismatch: the recomputed amount")
            t.check("different records" in (mism[0].get("detail") or ""),
                    "mismatch detail mentions the conflicting records", mism[0].get("detail"))
        t.eq(sorted(e.get("request_id") for e in by_class.get("unsettled", [])), OPEN,
             "the open requests are unsettled")
        t.eq([e.get("request_id") for e in by_class.get("settled_without_events", [])],
             ["r-ghost"], "the record without events is reported")

        t.eq(stack.calls(), calls_before, "no wallet or user-service call during the audit")
        t.eq(stack.ledger(), ledger_before, "wallet ledger unchanged")
        t.eq(redis_snapshot(stack), redis_before, "Redis keys unchanged by the audit")
        t.eq(conns_after - conns_before, 1,
             "the audit never connected to Redis (only the INFO call itself)")
        t.check("\r" not in err and "messages," not in err,
                "no progress line when stderr is not a terminal", err[-300:])

        # ---- other formats and filters ---------------------------------------------------------
        csv_path = stack.dir / "audit.csv"
        p, _, _ = audit(args, cfg, t_from, t_to, "-o", csv_path, fmt="csv")
        t.eq(p.returncode, 3, "csv audit exits 3")
        rows = csv_path.read_text().splitlines() if csv_path.exists() else []
        t.eq(len(rows), 1 + 8 + 1, "csv: a header, one row per request, the ghost record")
        t.check(rows and rows[0].startswith("request_id,user_id,class,"), "csv header")
        t.check(any(r.startswith("r-alt,u3,mismatched,") for r in rows), "csv row of r-alt")

        p, out, _ = audit(args, cfg, t_from, t_to, fmt="table")
        if args.verbose:
            print(out)
            print((stack.dir / "audit.csv").read_text())
        t.eq(p.returncode, 3, "table audit exits 3")
        t.check("mismatched" in out and "r-alt" in out and "r-ghost" in out
                and "30.0000" in out, "table: summary and exceptions", out[-800:])

        p, out, _ = audit(args, cfg, t_from, t_to, "--request", "r-alt")
        summary, _ = parse_json_report(out)
        t.eq((summary.get("requests"), summary.get("mismatched"),
              summary.get("settled_without_events")), (1, 1, 0), "--request filter")
        p, out, _ = audit(args, cfg, t_from, t_to, "--user", "u1")
        summary, _ = parse_json_report(out)
        t.eq((summary.get("requests"), summary.get("matched"), summary.get("unsettled")),
             (3, 2, 1), "--user filter")
        p, out, _ = audit(args, cfg, t_from, t_to, "--request", "r-late")
        summary, _ = parse_json_report(out)
        t.eq((p.returncode, summary.get("matched"), summary.get("settled_credits")),
             (0, 1, "2.0000"), "a charge plus an adjustment matches; exit 0")

        # ---- progress on a terminal ---------------------------------------------------------
        master, slave = pty.openpty()
        p = subprocess.run([args.bin, "audit", "-c", str(cfg), "--from", str(t_from), "--to",
                            str(t_to), "--format", "json", "-o", str(stack.dir / "tty.json")],
                           stdout=subprocess.DEVNULL, stderr=slave, timeout=180)
        os.close(slave)
        tty = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            tty += chunk
        os.close(master)
        t.check(b"messages" in tty, "a progress line on a terminal",
                tty[-300:])

        # ---- earlier pricing versions, found by sha256 ------------------------------------------
        d2 = stack.dir / "v2"
        d2.mkdir()
        (d2 / "pricing-e2e-flat-1.cfg").write_text(bwtest.DEFAULT_PRICING + "\n")
        cfg2 = stack.write_config(path=d2 / "billing-worker.cfg", pricing=PRICING_V2,
                                  settle={"finalize_grace": "1s", "request_timeout": "1h"})
        p, out, _ = audit(args, cfg2, t_from, t_to)
        summary, _ = parse_json_report(out)
        t.eq((summary.get("matched"), summary.get("mismatched"), summary.get("unsettled"),
              summary.get("pricing_unavailable")), (5, 1, 2, 0),
             "new pricing, old version beside the config: same verdicts")
        t.eq(summary.get("expected_credits"), "36.0000",
             "open requests are priced with the current pricing (3 + 8)")
        d3 = stack.dir / "v3"
        d3.mkdir()
        cfg3 = stack.write_config(path=d3 / "billing-worker.cfg", pricing=PRICING_V2,
                                  settle={"finalize_grace": "1s", "request_timeout": "1h"})
        p, out, _ = audit(args, cfg3, t_from, t_to)
        summary, exc = parse_json_report(out)
        t.eq((summary.get("pricing_unavailable"), summary.get("matched"),
              summary.get("mismatched")), (6, 1, 5),
             "old version missing: compared with the current pricing and flagged")
        t.check(any("not available" in (e.get("detail") or "") for e in exc),
                "the exception says the pricing version is not available")

        # ---- --pricing-dir, --margin, --shadow --------------------------------------------------
        p, out, _ = audit(args, cfg3, t_from, t_to, "--pricing-dir", d2)
        summary, _ = parse_json_report(out)
        t.eq((summary.get("pricing_unavailable"), summary.get("matched"),
              summary.get("mismatched")), (0, 5, 1), "--pricing-dir: earlier versions found")
        p, out, _ = audit(args, cfg, t_mid, t_to, "--request", "r-late")
        summary, _ = parse_json_report(out)
        t.eq((p.returncode, summary.get("requests"), summary.get("matched")), (0, 1, 1),
             "window on r-late's late event: the margin completes the request")
        p, out, _ = audit(args, cfg, t_mid, t_to, "--request", "r-late", "--margin", "0s")
        summary, _ = parse_json_report(out)
        t.eq((p.returncode, summary.get("requests"), summary.get("mismatched")), (3, 1, 1),
             "--margin 0s: the request is cut at the window's edge")

        # A shadow worker (its own group and Redis database) writes dry_run
        # records for the same traffic; `audit --shadow` audits those.
        scfg = stack.write_config(kafka={"group_id": "billing-worker-shadow"},
                                  redis={"url": stack.redis_url[:-2] + "/1"},
                                  settle={"finalize_grace": "1s", "request_timeout": "1h"})
        sw = stack.worker(args.bin, scfg, args=["--shadow"], name="shadow").start()

        def dry_keys():
            return {r["idempotency_key"] for r in
                    (json.loads(m.value) for m in stack.consume(stack.settlements_topic))
                    if r.get("status") == "dry_run"}
        wait_until(lambda: {"bw:" + r for r in SETTLED} <= dry_keys(), timeout=90,
                   what="dry_run records")
        t.eq(sw.stop(), 0, "shadow worker stops with 0")
        p, out, _ = audit(args, cfg, t_from, t_to, "--shadow")
        summary, _ = parse_json_report(out)
        t.eq((p.returncode, summary.get("matched"), summary.get("mismatched"),
              summary.get("unsettled"), summary.get("settled_without_events")), (3, 6, 0, 2, 0),
             "--shadow: the dry_run records match, the open requests are unsettled")
        t.eq(stack.ledger(), ledger_before, "the shadow worker charged nothing")

        # ---- the live group was never joined ------------------------------------------------
        rc, groups = consumer_groups(stack)
        t.check(rc == 0 and "bw-audit" not in groups, "no audit consumer group exists",
                groups[-500:])
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())

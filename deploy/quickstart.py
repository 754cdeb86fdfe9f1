#!/usr/bin/env python3
"""The quick start after the stack is up (deploy/quickstart.sh runs it).

  1. reset the reference services (balances back to 1000 credits; one user is
     given 5 credits, so that a rejection shows up)
  2. generate agent traffic (tests/e2e/gen_traffic.py) with request ids unique
     to this run, plus a few malformed events
  3. write var/quickstart/billing-worker.cfg from deploy/quickstart.cfg.in with
     the pricing group of examples/pricing-tokens.cfg
  4. start build/billing-worker, publish the traffic once it is ready, wait
     until the settlements topic holds a record for every generated request
     (or the timeout), then SIGTERM it
  5. print a summary read back from the settlements and dead-letter topics
"""

import argparse
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
import bwtest  # noqa: E402


def say(msg):
    print("quickstart: " + msg, flush=True)


def port_free(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def pricing_text(path):
    """The pricing group of `path`, with litellm_prices made absolute (it is
    relative to the file it is written in, and the copy lives elsewhere)."""
    text = Path(path).read_text()
    group = bwtest.extract_group(text, "pricing")
    if group is None:
        raise SystemExit("quickstart: no pricing group in %s" % path)
    lines = []
    for line in group.splitlines():
        s = line.strip()
        if s.startswith("litellm_prices"):
            value = s.split("=", 1)[1].split(";", 1)[0].strip().strip('"')
            if value and not value.startswith("/"):
                value = str((Path(path).parent / value).resolve())
            indent = line[:len(line) - len(line.lstrip())]
            line = '%slitellm_prices = "%s";' % (indent, value)
        lines.append(line)
    return "# pricing copied from %s\n%s" % (path, "\n".join(lines))


def write_config(stack, path, pricing_file, http_port):
    template = (ROOT / "deploy" / "quickstart.cfg.in").read_text()
    values = {
        "KAFKA_PORT": stack.kafka_port, "REDIS_PORT": stack.redis_port,
        "WALLET_PORT": stack.wallet_port, "USER_PORT": stack.user_port,
        "EVENTS_TOPIC": stack.events_topic, "SETTLEMENTS_TOPIC": stack.settlements_topic,
        "DLQ_TOPIC": stack.dlq_topic, "HTTP_PORT": http_port,
        "PRICING": pricing_text(pricing_file),
    }
    for k, v in values.items():
        template = template.replace("@%s@" % k, str(v))
    path.write_text(template)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=str(ROOT / "var" / "quickstart"))
    ap.add_argument("--bin", default=os.environ.get("BW_BIN", str(ROOT / "build" / "billing-worker")))
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--users", type=int, default=25)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--malformed", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--pricing", default=str(ROOT / "examples" / "pricing-tokens.cfg"))
    args = ap.parse_args()

    d = Path(args.dir).resolve()
    stack = bwtest.Stack.attach(d)
    run_id = time.strftime("qs%Y%m%dT%H%M%S-")

    # 1. reference services
    stack.reset()
    poor = "u-%04d" % args.users
    stack.set_balance(poor, 5)
    say("reference services reset: every user starts with 1000 credits, %s with 5" % poor)

    # 2. traffic
    traffic = d / "traffic.jsonl"
    summary_file = d / "traffic-requests.jsonl"
    gen = [sys.executable, str(ROOT / "tests" / "e2e" / "gen_traffic.py"),
           "--requests", str(args.requests), "--users", str(args.users),
           "--seed", str(args.seed), "--malformed", str(args.malformed),
           "--id-prefix", run_id, "--summary", str(summary_file)]
    with open(traffic, "wb") as f:
        subprocess.run(gen, stdout=f, check=True)
    requests = [json.loads(line) for line in summary_file.read_text().splitlines()]
    wanted = {r["request_id"]: r for r in requests}
    lines = traffic.read_bytes().splitlines()
    dlq_before = len(stack.consume(stack.dlq_topic))

    # 3. config
    cfg = d / "billing-worker.cfg"
    http_port = int(os.environ.get("BW_HTTP_PORT", "9464"))
    if not port_free(http_port):
        http_port = bwtest.free_port()
        say("port 9464 is busy: the worker's /metrics will be on %d" % http_port)
    write_config(stack, cfg, args.pricing, http_port)
    say("config written: %s" % cfg)

    # 4. the worker, then the traffic (published once the worker is in the
    # consumer group, whatever its auto.offset.reset)
    binary = Path(args.bin)
    if not os.access(binary, os.X_OK):
        raise SystemExit("quickstart: %s not built (bash deploy/setup.sh builds it)" % binary)
    worker = bwtest.Worker(binary, cfg, log_path=d / "worker.log", name="billing-worker")
    worker.http_port = http_port
    say("starting: %s run -c %s  (log: %s)" % (binary, cfg, worker.log_path))
    worker.start()
    records = {}
    t0 = time.monotonic()
    last_print = 0
    ok = False
    try:
        try:
            worker.wait_ready(timeout=30)
            say("worker ready (/readyz) after %.1f s" % (time.monotonic() - t0))
        except TimeoutError:
            say("worker not ready after 30 s: publishing anyway")
        published_ms = int(time.time() * 1000)
        stack.produce(lines)
        say("published %d events (%d requests of %d users, %d malformed, some duplicates) to %s"
            % (len(lines), len(requests), len({r["user_id"] for r in requests}),
               args.malformed, stack.events_topic))
        while time.monotonic() - t0 < args.timeout:
            for rec in stack.consume_json(stack.settlements_topic):
                rid = rec.get("request_id")
                if rid in wanted:
                    records.setdefault(rid, {})[rec.get("idempotency_key")] = rec
            if len(records) == len(wanted):
                ok = True
                break
            if not worker.alive():
                break
            if time.monotonic() - last_print >= 5:
                say("%d/%d requests have a settlement record" % (len(records), len(wanted)))
                last_print = time.monotonic()
            time.sleep(1)
    finally:
        if worker.alive():
            rc = worker.stop(signal.SIGTERM, timeout=30)
            say("worker stopped with SIGTERM (exit code %s)" % rc)
        else:
            say("worker exited by itself (exit code %s)" % worker.proc.returncode)
    if not ok:
        tail = "\n".join(worker.log().splitlines()[-25:])
        say("only %d/%d requests got a settlement record within %ds; last worker log lines:\n%s"
            % (len(records), len(wanted), args.timeout, tail))

    # 5. summary
    dlq_new = len(stack.consume(stack.dlq_topic)) - dlq_before
    print_summary(records, wanted, dlq_new, args.malformed, time.monotonic() - t0, stack, d)

    # 6. an audit of this run: recompute every charge from the input topic
    # and reconcile it with the settlements topic (never charges)
    if ok:
        frm, to = published_ms - 1000, int(time.time() * 1000) + 1000
        print()
        print("== audit of this run: billing-worker audit -c %s --from %d --to %d ==" % (cfg, frm, to))
        audit = subprocess.run([str(binary), "audit", "-c", str(cfg), "--from", str(frm),
                                "--to", str(to), "--margin", "0s", "--format", "table"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        print(audit.stdout.rstrip())
        print("(audit exit code %d: 0 = every charge matched)" % audit.returncode)
    return 0 if ok else 1


def print_summary(records, wanted, dlq_new, malformed, seconds, stack, d):
    status = collections.Counter()
    via = collections.Counter()
    per_user = collections.defaultdict(Decimal)
    per_user_n = collections.Counter()
    total = Decimal(0)
    cost = Decimal(0)
    reasons = collections.Counter()
    for rid, by_key in records.items():
        for rec in by_key.values():
            st = rec.get("status")
            status[(rec.get("kind"), st)] += 1
            if st == "settled":
                amount = Decimal(str(rec.get("amount_credits", "0")))
                total += amount
                cost += Decimal(str(rec.get("cost_usd", "0")))
                per_user[rec.get("user_id")] += amount
                per_user_n[rec.get("user_id")] += 1
                via[rec.get("settled_via")] += 1
            elif st == "rejected":
                reasons[rec.get("reason")] += 1
    charges = {k[1]: n for k, n in status.items() if k[0] == "charge"}
    adjustments = sum(n for k, n in status.items() if k[0] == "adjustment")
    print()
    print("== quick start summary ==")
    print("requests published          %d (+%d malformed events)" % (len(wanted), malformed))
    print("requests with a record      %d / %d  (%.0f s)" % (len(records), len(wanted), seconds))
    for st in ("settled", "rejected", "pending", "recorded", "dry_run"):
        if charges.get(st) or st in ("settled", "rejected"):
            extra = ""
            if st == "rejected" and reasons:
                extra = "  (" + ", ".join("%s: %d" % (r, n) for r, n in reasons.items()) + ")"
            print("  %-26s%d%s" % (st, charges.get(st, 0), extra))
    if adjustments:
        print("  adjustments               %d" % adjustments)
    print("credits charged             %s  (= %s USD)" % (total, cost))
    print("settled via                 wallet %d, user_service %d"
          % (via.get("wallet", 0), via.get("user_service", 0)))
    print("dead-letter records         %d (this run)" % dlq_new)
    if per_user:
        print("top users by credits:")
        for user, amount in sorted(per_user.items(), key=lambda kv: -kv[1])[:10]:
            print("  %-12s %12s  (%d charges)" % (user, amount, per_user_n[user]))
    ledger = stack.ledger()
    print("wallet ledger               %d charges applied" % len(ledger))
    print()
    print("Records: kcat -C -b %s -t %s -e -q" % (stack.brokers, stack.settlements_topic))
    print("Ledger:  curl -s %s/_control/ledger" % stack.control_url)
    print("Worker log: %s/worker.log" % d)


if __name__ == "__main__":
    sys.exit(main())

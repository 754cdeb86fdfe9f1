#!/usr/bin/env python3
"""redis_memory: Redis bytes per event and per request, settled and open.

Starts a local stack (tests/e2e/bwtest.py: Kafka, Redis, reference services)
and one worker, then for each events-per-request count M (--events, default
1,5,15) sends --requests N (default 200) requests of M usage events:

  settled  with a finalize marker (`expected` met): charged at once; what
           stays in Redis for `dedup.retention` afterwards;
  open     without a finalize marker (settle.request_timeout = 1h): what an
           in-progress request costs.

Each group is measured twice:
  * MEMORY USAGE (SAMPLES 0) of every request key bw:{enc}:m / :e / :s,
    summed per kind and divided by N: the request's own keys;
  * INFO memory used_memory before and after the group (after the worker is
    done with it), divided by N: everything, including the bw:due entry of an
    open request, the TTLs of settled ones and allocator overhead.
Bytes per event: the :e hash (dedup entries) divided by M, and the marginal
cost of one more event, (bytes at the largest M - bytes at the smallest M) /
(difference in M), from used_memory.

Events are realistic: UUID event_ids, 40-character request ids, model calls
with OpenAI Chat usage and tool calls with units, alternately.

    python3 tests/bench/redis_memory.py --bin build/billing-worker [--requests 200]
        [--events 1,5,15] [--json FILE] [--keep]

Prints a table (Markdown) on stdout; docs/faults.md and the README quote it.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time
import urllib.parse
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "e2e"))

import bwtest  # noqa: E402
from bwtest import Stack, log, wait_until  # noqa: E402


def redis_pipe(stack, commands):
    """Run many redis-cli commands (lists of args) in one process; one output line each."""
    text = "".join(" ".join('"%s"' % a.replace('"', '\\"') for a in c) + "\n" for c in commands)
    p = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(stack.redis_port), "--raw"],
                       input=text.encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=120)
    if p.returncode != 0:
        raise RuntimeError("redis-cli: %s" % p.stderr.decode())
    return p.stdout.decode().splitlines()


def used_memory(stack):
    for line in stack.redis("INFO", "memory").splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":")[1])
    raise RuntimeError("no used_memory in INFO memory")


def settle_redis(stack):
    """Let lazy frees and the allocator settle a moment before reading used_memory."""
    time.sleep(0.5)
    stack.redis("MEMORY", "PURGE")
    time.sleep(0.2)


def make_request(rng, rid, uid, m, finalize):
    evs = []
    for i in range(m):
        ev = {"event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
              "request_id": rid, "user_id": uid, "session_id": "sess-" + uid,
              "timestamp": "2026-12-01T10:00:%02d.%03dZ" % (i % 60, rng.randint(0, 999))}
        if i % 2 == 0:
            prompt = rng.randint(500, 9000)
            comp = rng.randint(20, 1500)
            ev.update({"type": "custom_model_call", "model": "gpt-4o-mini", "provider": "openai",
                       "node_name": "ReasonNode",
                       "usage": {"prompt_tokens": prompt, "completion_tokens": comp,
                                 "total_tokens": prompt + comp,
                                 "prompt_tokens_details": {"cached_tokens": 128 * rng.randint(0, 3)},
                                 "completion_tokens_details": {"reasoning_tokens": 0}}})
        else:
            ev.update({"type": "custom_tool_call", "tool_name": "web_search",
                       "units": rng.randint(1, 3), "duration_ms": rng.randint(100, 3000),
                       "idempotency_key": "call_" + uuid.UUID(int=rng.getrandbits(128)).hex[:24]})
        evs.append(ev)
    if finalize:
        nm = sum(e["type"] == "custom_model_call" for e in evs)
        evs.append(bwtest.finalize(rid, uid, expected=(nm, m - nm)))
    return evs


def key_usage(stack, rids):
    """Summed MEMORY USAGE of the :m, :e and :s keys of these requests."""
    kinds = ("m", "e", "s")
    cmds = []
    for rid in rids:
        enc = urllib.parse.quote(rid, safe="")
        for k in kinds:
            cmds.append(["MEMORY", "USAGE", "bw:{%s}:%s" % (enc, k), "SAMPLES", "0"])
    out = redis_pipe(stack, cmds)
    if len(out) != len(cmds):
        raise RuntimeError("redis-cli answered %d lines for %d commands" % (len(out), len(cmds)))
    tot = dict.fromkeys(kinds, 0)
    present = dict.fromkeys(kinds, 0)
    for i, line in enumerate(out):
        k = kinds[i % 3]
        if line.strip():
            tot[k] += int(line)
            present[k] += 1
    return tot, present


def run(args):
    rng = random.Random(4242)
    ms = [int(x) for x in args.events.split(",")]
    n = args.requests
    rows = []
    with Stack(keep=args.keep) as stack:
        stack.set_default_balance("1000000000")
        cfg = stack.write_config(settle={"finalize_grace": "1s", "request_timeout": "1h"},
                                 log={"level": "warn"})
        w = stack.worker(args.bin, cfg).start()
        w.wait_ready(90)
        charged = 0
        # warm-up: scripts loaded, consumer offsets, outbox structures
        stack.produce(make_request(rng, "mem-warmup-0", "mem-u", 2, True))
        charged += 1
        wait_until(lambda: len(stack.ledger()) >= charged, timeout=60, what="warm-up charge")
        settle_redis(stack)
        for m in ms:
            for state in ("settled", "open"):
                rids = ["mem-%s-%02d-%05d-%s" % (state[0], m, i, uuid.UUID(
                    int=rng.getrandbits(128)).hex[:16]) for i in range(n)]
                msgs = []
                for i, rid in enumerate(rids):
                    msgs += make_request(rng, rid, "mem-u%03d" % (i % 50), m, state == "settled")
                settle_redis(stack)
                before = used_memory(stack)
                consumed0 = w.metrics().get("billing_worker_events_applied_total", 0)
                stack.produce(msgs)
                if state == "settled":
                    charged += n
                    wait_until(lambda: len(stack.ledger()) >= charged, timeout=300,
                               interval=0.5, what="%d charges" % charged)
                    wait_until(lambda: stack.redis("HLEN", "bw:outbox") == "0", timeout=120,
                               interval=0.5, what="outbox published")
                else:
                    wait_until(lambda: w.metrics().get("billing_worker_events_applied_total", 0)
                               >= consumed0 + len(msgs), timeout=300, interval=0.5,
                               what="%d events applied" % len(msgs))
                    time.sleep(1.0)
                settle_redis(stack)
                after = used_memory(stack)
                tot, present = key_usage(stack, rids)
                row = {"events": m, "state": state, "requests": n,
                       "keys_m": present["m"], "keys_e": present["e"], "keys_s": present["s"],
                       "m_bytes": tot["m"] / n, "e_bytes": tot["e"] / n, "s_bytes": tot["s"] / n,
                       "keys_bytes": sum(tot.values()) / n,
                       "used_memory_bytes": (after - before) / n}
                row["e_bytes_per_event"] = row["e_bytes"] / m
                rows.append(row)
                log("%-7s M=%-2d  keys %6.0f B/request (m %.0f, e %.0f, s %.0f)  "
                    "used_memory %+.0f B/request"
                    % (state, m, row["keys_bytes"], row["m_bytes"], row["e_bytes"],
                       row["s_bytes"], row["used_memory_bytes"]))
        redis_version = stack.redis("INFO", "server")
        ver = [ln.split(":")[1] for ln in redis_version.splitlines()
               if ln.startswith("redis_version:")]
        w.stop()
    return rows, (ver[0] if ver else "?")


def table(rows, ver):
    out = ["Redis %s, %d requests per row; bytes per request unless noted." % (
        ver, rows[0]["requests"]), "",
        "| events/request | state | :m | :e (dedup) | :s (intent+record) | request keys | "
        "used_memory Δ | :e per event |",
        "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append("| %d | %s | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f |" % (
            r["events"], r["state"], r["m_bytes"], r["e_bytes"], r["s_bytes"],
            r["keys_bytes"], r["used_memory_bytes"], r["e_bytes_per_event"]))
    for state in ("settled", "open"):
        rs = sorted((r for r in rows if r["state"] == state), key=lambda r: r["events"])
        if len(rs) >= 2 and rs[-1]["events"] > rs[0]["events"]:
            dm = rs[-1]["events"] - rs[0]["events"]
            out.append("")
            out.append("Marginal cost of one more event (%s, %d -> %d events): "
                       "%.0f B (used_memory), %.0f B (request keys)."
                       % (state, rs[0]["events"], rs[-1]["events"],
                          (rs[-1]["used_memory_bytes"] - rs[0]["used_memory_bytes"]) / dm,
                          (rs[-1]["keys_bytes"] - rs[0]["keys_bytes"]) / dm))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=str(bwtest.DEFAULT_BIN))
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--events", default="1,5,15", help="events per request, comma-separated")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    t0 = time.monotonic()
    rows, ver = run(args)
    print(table(rows, ver), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    log("run time %.1fs" % (time.monotonic() - t0))


if __name__ == "__main__":
    main()

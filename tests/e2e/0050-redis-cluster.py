#!/usr/bin/env python3
"""0050-redis-cluster: the main job with a real 3-master Redis Cluster as the
store, while slots move between masters (MOVED, ASK, TRYAGAIN).

The test creates the cluster itself (three `redis-server --cluster-enabled yes`
and `redis-cli --cluster create`), and runs two workers in one group with
`redis.url = "redis+cluster://..."`. 160 requests of 8 users (token usage in
the three usage shapes, tools with units, ~1 in 4 events sent twice, a client
retry under a new event_id with the same idempotency_key) are produced in two
halves; between them, and while the first half settles, `redis-cli --cluster
reshard` moves 4000 slots (and their keys) from one master to another.

Expected amounts come from pricing_model.py (independent of the C code).
Checks: exactly one ledger entry per request key with the exact amount and
user, a `settled` record per request, no dead letter, request state on every
master, nothing left due or in the outbox on any master, duplicates counted.
"""

import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bwtest  # noqa: E402
import pricing_model as pm  # noqa: E402
from bwtest import free_port, log, wait_until  # noqa: E402

SEED = 5050
N_REQUESTS = 160
USERS = ["cu-%d" % i for i in range(1, 9)]
MODELS = ["gpt-4o", "gpt-4o-mini", "o3-mini", "claude-sonnet-4-20250514", "llama-3-local"]
TOOLS = ["web_search", "code_exec", "mcp_fetch"]
PRICING = pm.Pricing(pm.example_spec("e2e-cluster-1"))


class Cluster:
    """Three masters on loopback, no replicas, in DIR/cluster/<port>."""

    def __init__(self, dir):
        self.dir = dir / "cluster"
        self.ports = [free_port() for _ in range(3)]
        self.procs = []

    def cli(self, port, *args, check=True):
        p = subprocess.run(["redis-cli", "-p", str(port), *map(str, args)],
                           capture_output=True, timeout=120)
        if check and p.returncode != 0:
            raise RuntimeError("redis-cli %s: %s" % (args, p.stderr.decode()))
        return p.stdout.decode().strip()

    def start(self):
        for port in self.ports:
            d = self.dir / str(port)
            d.mkdir(parents=True)
            logf = open(d / "redis.log", "ab")
            self.procs.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", "5000", "--appendonly", "yes",
                 "--appendfsync", "always", "--save", ""],
                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True))
        for port in self.ports:
            wait_until(lambda: self.cli(port, "ping", check=False) == "PONG", timeout=20,
                       what="redis %d up" % port)
        out = subprocess.run(["redis-cli", "--cluster", "create",
                              *["127.0.0.1:%d" % p for p in self.ports],
                              "--cluster-replicas", "0", "--cluster-yes"],
                             capture_output=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError("cluster create: %s" % out.stdout.decode()[-2000:])
        for port in self.ports:
            wait_until(lambda: "cluster_state:ok" in self.cli(port, "cluster", "info"),
                       timeout=30, what="cluster state ok on %d" % port)
        log("redis cluster up: masters %s" % self.ports)
        return self

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    def url(self):
        return "redis+cluster://" + ",".join("127.0.0.1:%d" % p for p in self.ports)

    def node_id(self, port):
        return self.cli(port, "cluster", "myid")

    def keys(self, port, pattern):
        out = self.cli(port, "--scan", "--pattern", pattern)
        return [k for k in out.split("\n") if k]

    def reshard(self, src, dst, slots):
        return subprocess.Popen(
            ["redis-cli", "--cluster", "reshard", "127.0.0.1:%d" % src,
             "--cluster-from", self.node_id(src), "--cluster-to", self.node_id(dst),
             "--cluster-slots", str(slots), "--cluster-yes", "--cluster-pipeline", "10"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def usage(rng, shape):
    if shape == 0:  # OpenAI Chat: cached and reasoning inside prompt/completion
        prompt = rng.randint(300, 20000)
        comp = rng.randint(20, 3000)
        return {"prompt_tokens": prompt, "completion_tokens": comp,
                "total_tokens": prompt + comp,
                "prompt_tokens_details": {"cached_tokens": rng.randint(0, prompt // 2)},
                "completion_tokens_details": {"reasoning_tokens": rng.randint(0, comp)}}
    if shape == 1:  # OpenAI Responses
        inp = rng.randint(300, 20000)
        out = rng.randint(20, 3000)
        return {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out,
                "input_tokens_details": {"cached_tokens": rng.randint(0, inp)},
                "output_tokens_details": {"reasoning_tokens": rng.randint(0, out)}}
    return {"input_tokens": rng.randint(10, 5000),  # native / Anthropic
            "cache_read_input_tokens": rng.randint(0, 30000),
            "cache_creation_input_tokens": rng.randint(0, 8000),
            "output_tokens": rng.randint(20, 3000)}


def make_request(rng, i):
    """(request_id, user_id, messages in order incl. copies, distinct events)."""
    rid = "cl-req-%03d-%s" % (i, "x/y" if i % 17 == 0 else "z")
    uid = USERS[i % len(USERS)]
    events = []
    n_model, n_tool = rng.randint(1, 6), rng.randint(0, 4)
    kinds = ["m"] * n_model + ["t"] * n_tool
    rng.shuffle(kinds)
    for j, kind in enumerate(kinds):
        if kind == "m":
            ev = bwtest.model_call(rid, uid, model=MODELS[(i + j) % len(MODELS)],
                                   usage=usage(rng, (i + j) % 3), provider="openai")
        else:
            ev = bwtest.tool_call(rid, uid, tool_name=TOOLS[(i + j) % len(TOOLS)],
                                  units=rng.randint(1, 3))
            if rng.random() < 0.3:
                ev["idempotency_key"] = "call_%s_%d" % (rid, j)
        events.append(ev)
    msgs = []
    for ev in events:
        msgs.append(ev)
        if rng.random() < 0.25:
            msgs.append(ev)  # the same message again
        if ev.get("idempotency_key") and rng.random() < 0.5:
            msgs.append(dict(ev, event_id=bwtest.new_id()))  # a client retry
    msgs.append(bwtest.finalize(rid, uid, expected=(n_model, n_tool)))
    return rid, uid, msgs, events


def interleave(rng, seqs):
    out, cur = [], [0] * len(seqs)
    live = list(range(len(seqs)))
    while live:
        k = rng.choice(live)
        out.append(seqs[k][cur[k]])
        cur[k] += 1
        if cur[k] == len(seqs[k]):
            live.remove(k)
    return out


def test(t, stack, args):
    rng = random.Random(SEED)
    cluster = Cluster(stack.dir).start()
    try:
        run(t, stack, args, rng, cluster)
    finally:
        cluster.stop()


def run(t, stack, args, rng, cluster):
    reqs = [make_request(rng, i) for i in range(N_REQUESTS)]
    want = {}
    for rid, uid, msgs, events in reqs:
        want[bwtest.charge_key(rid)] = (uid, PRICING.price(pm.dedup(events)).amount_credits)
    n_msgs = sum(len(m) for _, _, m, _ in reqs)
    n_distinct = sum(len(pm.dedup(m)) for _, _, m, _ in reqs)

    # 20 requests of up to ~120 credits per user: no charge may be refused
    # for want of credits (a refusal is a rejection, not a ledger entry).
    stack.set_default_balance("1000000000")
    workers = []
    for i in (1, 2):  # one config each: each has its own HTTP port
        cfg = stack.write_config(pricing=PRICING.libconfig(), redis={"url": cluster.url()},
                                 settle={"finalize_grace": "1s"})
        workers.append(stack.worker(args.bin, cfg, name="worker-%d" % i).start())
    for w in workers:
        w.wait_ready(60)
    half = N_REQUESTS // 2
    stack.produce(interleave(rng, [m for _, _, m, _ in reqs[:half]]))
    # Move 4000 slots (and every key in them) from the first master to the
    # second while the first half settles and the second half arrives.
    t_rs = time.monotonic()
    rs = cluster.reshard(cluster.ports[0], cluster.ports[1], 4000)
    time.sleep(0.5)
    stack.produce(interleave(rng, [m for _, _, m, _ in reqs[half:]]))
    out, _ = rs.communicate(timeout=300)
    t.eq(rs.returncode, 0, "redis-cli --cluster reshard of 4000 slots succeeded",)
    if rs.returncode != 0:
        log(out.decode()[-3000:])
    log("reshard took %.1fs" % (time.monotonic() - t_rs))

    def settled():
        keys = {e["key"] for e in stack.ledger()}
        return keys >= set(want)
    wait_until(settled, timeout=120, interval=0.5, what="%d charges" % N_REQUESTS)
    time.sleep(2)  # > finalize_grace: an (erroneous) second charge would be due now

    led = stack.ledger()
    got = {}
    for e in led:
        got.setdefault(e["key"], []).append((e["amount"], e["user_id"]))
    bad = ["%s: %r, want [(%s, %s)]" % (k, got.get(k), amt, uid)
           for k, (uid, amt) in want.items() if got.get(k) != [(amt, uid)]]
    t.check(not bad, "every request charged exactly once with its exact amount",
            "\n  " + "\n  ".join(bad[:20]))
    t.eq(sorted(got), sorted(want), "no other key in the ledger")
    recs = stack.settlements()
    t.eq(sorted(r["idempotency_key"] for r in recs if r.get("status") == "settled"),
         sorted(want), "one settled record per request")
    t.eq(len(stack.dlq()), 0, "no dead letters")

    per_node = [len(cluster.keys(p, "bw:*")) for p in cluster.ports]
    log("bw:* keys per master after the reshard: %s" % per_node)
    t.check(all(n > 0 for n in per_node), "request state on every master (%s)" % per_node)
    left = 0
    for p in cluster.ports:
        for k in cluster.keys(p, "bw:*:due") + cluster.keys(p, "bw:*:outbox*"):
            typ = cluster.cli(p, "type", k)
            left += int(cluster.cli(p, "zcard" if typ == "zset" else "hlen", k))
    t.eq(left, 0, "nothing left due or in the outbox on any master")

    total = {}
    for w in workers:
        for k, v in w.metrics().items():
            if k in ("billing_worker_events_consumed_total", "billing_worker_duplicates_total",
                     "billing_worker_events_applied_total"):
                total[k] = total.get(k, 0) + int(v)
    t.eq(total.get("billing_worker_events_applied_total"), n_distinct,
         "events applied = the %d distinct events" % n_distinct)
    t.eq(total.get("billing_worker_duplicates_total"), n_msgs - n_distinct,
         "duplicates counted = the %d copies" % (n_msgs - n_distinct))

    # A third worker configured with another bucket count would look for a
    # request's state under other keys: it must refuse (bw:layout), stop with
    # exit 2 and leave its partitions to the others, which charge everything.
    cfg = stack.write_config(pricing=PRICING.libconfig(),
                             redis={"url": cluster.url() + "?buckets=7"},
                             settle={"finalize_grace": "1s"})
    odd = stack.worker(args.bin, cfg, name="worker-buckets-7").start()
    time.sleep(8)  # joins the group and gets partitions
    more = [make_request(rng, N_REQUESTS + i) for i in range(20)]
    want_more = {bwtest.charge_key(rid): (uid, PRICING.price(pm.dedup(events)).amount_credits)
                 for rid, uid, _, events in more}
    stack.produce(interleave(rng, [m for _, _, m, _ in more]))
    t.eq(odd.wait(60), 2, "a worker with ?buckets=7 stops with exit 2")
    t.check("redis cluster holds another layout" in odd.log(),
            "... and logs why ('redis cluster holds another layout')")
    wait_until(lambda: {e["key"] for e in stack.ledger()} >= set(want_more), timeout=120,
               interval=0.5, what="the 20 later charges")
    time.sleep(2)
    got = {}
    for e in stack.ledger():
        got.setdefault(e["key"], []).append((e["amount"], e["user_id"]))
    t.eq({k: got.get(k) for k in want_more}, {k: [(a, u)] for k, (u, a) in want_more.items()},
         "the 20 later requests charged exactly once, exact amounts, by the other workers")
    t.eq(len(got), len(want) + len(want_more), "no other key in the ledger")
    t.eq([w.stop() for w in workers], [0, 0], "SIGTERM: both workers exit 0")


if __name__ == "__main__":
    sys.exit(bwtest.main("redis cluster", test))

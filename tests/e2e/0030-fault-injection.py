#!/usr/bin/env python3
"""0030-fault-injection: exactly one charge per request, and every late event
adjusted, while workers crash, the wallet misbehaves and Redis and Kafka restart
(PRODUCT.md section 4: G1 G2 G3 G4 G5 G7 G8).

Traffic (deterministic for a seed): BW_FAULT_REQUESTS requests (400) of
BW_FAULT_USERS users (40), 1-15 usage events each: model calls with token
usage in the three shapes of section 3 (OpenAI Chat with cached, reasoning and
cache-write tokens, OpenAI Responses, native/Anthropic), calls without usage,
failed calls, tool calls with units; request ids that need percent-encoding.
Finalize kinds: `expected` met, marker without `expected`, `expected` never met
(settled after finalize_grace as `incomplete`), and no finalize marker at all
(settled after settle.request_timeout = 5s as `timeout`). Producer resends:
the same event again (same event_id) and client retries under a new event_id
with the same idempotency_key (some with another payload: the first wins),
scattered after the original, after the finalize marker, and after the
settlement. Late usage (after the request's charge is in the ledger) for ~12%
of the requests: charged as adjustments `bw:<enc>:adj:<n>` (late_policy adjust,
no minimum); a late finalize marker alone must cause nothing.

Faults, on a seeded schedule during BW_FAULT_SECONDS (100) seconds, three
workers in one consumer group:
  * SIGKILL a random worker and start a replacement every ~BW_FAULT_KILL_EVERY (6) s;
  * wallet bursts of a few seconds, cycling: 503 (not delivered: fallback
    allowed), 500 (outcome unknown: never the fallback), hang past the 1 s
    timeout (delay 1.5 s: unknown), drop_before (request read, connection
    closed: unknown for the worker), apply_then_drop (applied, no answer: a
    fallback would charge twice), refuse (connections refused: not delivered);
  * Redis SIGKILLed once (AOF appendfsync always) while wallet calls hang
    (outcome unknown), down 3 s, then a long wallet 503 burst: the charges
    whose outcome was unknown must never go to the fallback;
  * the Kafka broker restarted once;
  * twice, a worker SIGSTOPped for 10 s (past its session timeout and its
    claim lease: a zombie that wakes up holding stale work), then SIGCONT.
Then every fault is cleared and the test waits until everything settled.

Expected amounts are computed by the test from the events IT produced, with
pricing_model.py (independent of the C code):
  * every request's charge key `bw:<enc>` exactly once in the wallet and
    user-service ledgers together, with the exact amount of its distinct
    events; every adjustment key exactly once, with the exact amount of the
    late usage alone (no minimum). A request's distinct events, in partition
    order, must be exactly covered by its charge and adjustments in order:
    the charge holds every event before the finalize marker; a request
    without a marker may have been cut by its 5 s timeout (e.g. while its
    partition moved after a kill) and its tail charged as an adjustment, which
    the test accepts and counts;
  * no unexpected key, no key sent twice with another amount (refsvc
    key_conflicts), no fallback after an unknown wallet outcome (from the
    reference services' call log), a settlement record for every charge with
    the ledger's amount and transaction_id, empty dead-letter topic, nothing
    left due or in the outbox in Redis, SIGTERM exits 0.

Knobs (environment): BW_FAULT_REQUESTS, BW_FAULT_USERS, BW_FAULT_SECONDS,
BW_FAULT_SEED, BW_FAULT_KILL_EVERY, BW_FAULT_PARTITIONS. tests/e2e/soak.sh runs
a long variant.
"""

import os
import random
import signal
import sys
import time
import urllib.parse
from collections import Counter, defaultdict
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bwtest  # noqa: E402
from bwtest import charge_key  # noqa: E402
import pricing_model as pm  # noqa: E402
from bwtest import Checks, Stack, log, wait_until  # noqa: E402


def env_num(name, default, conv=int):
    v = os.environ.get(name)
    return conv(v) if v not in (None, "") else default


SEED = env_num("BW_FAULT_SEED", 30030)
N_REQUESTS = env_num("BW_FAULT_REQUESTS", 400)
N_USERS = env_num("BW_FAULT_USERS", 40)
FAULT_SECONDS = env_num("BW_FAULT_SECONDS", 100.0, float)
KILL_EVERY = env_num("BW_FAULT_KILL_EVERY", 6.0, float)
PARTITIONS = env_num("BW_FAULT_PARTITIONS", 6)
N_WORKERS = 3

WALLET_TIMEOUT_S = 1.0
HANG_MS = 1500  # > the wallet timeout: the worker gives up, the wallet applies later
FREEZE_S = 10.0  # > session.timeout.ms (4 s) and the claim lease (8 s)

PRICING = pm.Pricing(pm.example_spec("e2e-faults-1"))

MODELS = [("gpt-4o", 30), ("gpt-4o-mini", 30), ("claude-sonnet-4-20250514", 22),
          ("o3-mini", 12), ("llama-3-local", 6)]
TOOLS = [("web_search", 50), ("code_exec", 30), ("mcp_fs_read", 20)]
BURST_KINDS = ["503", "500", "hang", "drop_before", "apply_then_drop", "refuse", "429",
               "503+user_503", "503+user_drop"]
BURST_SPECS = {  # lists of refsvc fault objects (target wallet unless said)
    "503": [{"mode": "status", "status": 503}],
    "500": [{"mode": "status", "status": 500}],
    "hang": [{"mode": "delay", "delay_ms": HANG_MS}],
    "drop_before": [{"mode": "drop_before"}],
    "apply_then_drop": [{"mode": "apply_then_drop"}],
    "refuse": [{"mode": "refuse"}],
    "429": [{"mode": "status", "status": 429, "retry_after": 1}],
    # the fallback fails too: pending, retried until a service accepts it
    "503+user_503": [{"mode": "status", "status": 503},
                     {"target": "user", "mode": "status", "status": 503}],
    # the fallback applies the charge and drops the answer: from then on the
    # charge may only go to the wallet (which answers the key's first outcome)
    "503+user_drop": [{"mode": "status", "status": 503},
                      {"target": "user", "mode": "apply_then_drop", "path": "/consume"}],
}


def adj_key(rid, n):
    return charge_key(rid, n)


# ---- traffic --------------------------------------------------------------------------------
class Req:
    """One request: its messages for the main phase and for the late phase."""

    def __init__(self, rid, uid, kind):
        self.rid, self.uid, self.kind = rid, uid, kind
        self.main = []       # messages of the main phase, in order (with resends)
        self.late = []       # messages sent after the charge is in the ledger
        self.late_usage = 0  # distinct new usage events among them
        self.sent_late = False


class Traffic:
    def __init__(self, seed, n_requests, n_users):
        self.rng = random.Random(seed)
        self.n_ids = 0
        self.counts = Counter()
        users = ["ft-u%02d" % i for i in range(1, n_users + 1)]
        weights = [1.0 / (i + 1) ** 0.7 for i in range(n_users)]
        self.reqs = []
        for i in range(n_requests):
            uid = self.rng.choices(users, weights)[0]
            self.reqs.append(self.request(i, uid))

    def uuid(self):
        return "%032x" % self.rng.getrandbits(128)

    def pick(self, table):
        return self.rng.choices([t[0] for t in table], [t[1] for t in table])[0]

    # -- usage in the three shapes --
    def usage(self, model):
        r = self.rng
        if model.startswith("claude"):
            return {"input_tokens": r.randint(20, 3000),
                    "cache_read_input_tokens": r.choice([0, r.randint(1000, 12000)]),
                    "cache_creation_input_tokens": r.choice([0, 0, r.randint(100, 5000)]),
                    "output_tokens": r.randint(10, 1500)}
        prompt = r.randint(300, 12000)
        cached = r.randint(0, prompt // 2) // 128 * 128 if r.random() < 0.6 else 0
        if model.startswith("o3") and r.random() < 0.5:  # OpenAI Responses
            out = r.randint(50, 4000)
            return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                    "output_tokens": out,
                    "output_tokens_details": {"reasoning_tokens": r.randint(0, out)},
                    "total_tokens": prompt + out}
        comp = r.randint(10, 2000)
        u = {"prompt_tokens": prompt, "completion_tokens": comp, "total_tokens": prompt + comp,
             "prompt_tokens_details": {"cached_tokens": cached},
             "completion_tokens_details": {
                 "reasoning_tokens": r.randint(0, comp) if model.startswith("o3") else 0}}
        if model.startswith("gpt-4o") and r.random() < 0.25:  # cache writes (in prompt)
            u["cache_creation_input_tokens"] = r.randint(0, prompt - cached)
        return u

    def usage_event(self, rid, uid, common):
        r = self.rng
        ev = {"event_id": self.uuid(), "request_id": rid, "user_id": uid, **common}
        if r.random() < 0.6:
            model = self.pick(MODELS)
            ev.update({"type": "custom_model_call", "model": model, "provider": "p",
                       "node_name": r.choice(["ReasonNode", "ResponseNode"])})
            if r.random() < 0.05:
                ev["status"] = "error"
            if r.random() < 0.93:
                ev["usage"] = self.usage(model)
            if r.random() < 0.15:
                ev["idempotency_key"] = "gen_" + self.uuid()[:20]
        else:
            tool = self.pick(TOOLS)
            ev.update({"type": "custom_tool_call", "tool_name": tool,
                       "units": r.choice([1, 1, 1, 2, 3, 5]) if tool != "code_exec" else 1,
                       "duration_ms": r.randint(100, 9000)})
            if r.random() < 0.04:
                ev["status"] = "error"
            if r.random() < 0.4:
                ev["idempotency_key"] = "call_" + self.uuid()[:24]
        return ev

    def resend(self, ev):
        """A producer resend of ev: same event again, or a client retry under a
        new event_id with the same idempotency_key (rarely another payload:
        the first must win)."""
        dup = dict(ev)
        if "idempotency_key" in ev and self.rng.random() < 0.6:
            dup["event_id"] = self.uuid()
            self.counts["resends_new_event_id"] += 1
            if ev["type"] == "custom_tool_call" and self.rng.random() < 0.15:
                dup["units"] = ev.get("units", 1) + 7
                self.counts["resends_conflicting"] += 1
        else:
            self.counts["resends_same_event_id"] += 1
        return dup

    def request(self, i, uid):
        r = self.rng
        if r.random() < 0.05:  # needs percent-encoding in the key
            rid = "ft/%04d é:%s?x=1" % (i, self.uuid()[:6])
        else:
            rid = "ft-%04d-%s" % (i, self.uuid()[:8])
        kind = r.choices(["expected", "marker", "incomplete", "timeout"], [55, 18, 12, 15])[0]
        q = Req(rid, uid, kind)
        common = {"session_id": "s-" + uid}
        if r.random() < 0.5:
            common["org_id"] = "org-%d" % (int(uid[-2:]) % 3)
        n = r.choice([1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 10, 12, 15])
        usage = [self.usage_event(rid, uid, common) for _ in range(n)]
        msgs = list(usage)
        nm = sum(e["type"] == "custom_model_call" for e in usage)
        nt = n - nm
        fin = None
        straggler = None
        if kind != "timeout":
            fin = {"type": "request_finalize", "event_id": self.uuid(), "request_id": rid,
                   "user_id": uid, **common,
                   "status": r.choices(["completed", "error", "cancelled"], [90, 6, 4])[0]}
            if kind == "expected":
                fin["expected"] = {"model_calls": nm, "tool_calls": nt}
            elif kind == "incomplete":
                # one model call announced but not (yet) sent
                fin["expected"] = {"model_calls": nm + 1, "tool_calls": nt}
                straggler = self.usage_event(rid, uid, common)
                straggler.update({"type": "custom_model_call", "model": "gpt-4o-mini",
                                  "usage": self.usage("gpt-4o-mini")})
                straggler.pop("tool_name", None)
                straggler.pop("units", None)
                straggler.pop("duration_ms", None)
            msgs.append(fin)
        # producer resends in the main phase: after the original, maybe after the finalize
        for ev in list(msgs):
            if r.random() < 0.10:
                pos = msgs.index(ev) + 1 + r.randint(0, 4)
                msgs.insert(min(pos, len(msgs)), self.resend(ev))
        q.main = msgs
        # the late phase (after the charge is in the ledger)
        late = []
        if straggler is not None and r.random() < 0.5:
            late.append(straggler)
        if r.random() < 0.12:
            late += [self.usage_event(rid, uid, common) for _ in range(r.randint(1, 3))]
        q.late_usage = len(late)
        if late:
            for ev in list(late):
                if r.random() < 0.2:
                    late.insert(late.index(ev) + 1, self.resend(ev))
        if r.random() < 0.08:  # settled events resent after the settlement: count zero
            late.insert(r.randint(0, len(late)), self.resend(r.choice(usage)))
            self.counts["resends_after_settlement"] += 1
        if r.random() < 0.04:  # a second finalize marker, after the settlement: nothing
            late.append({"type": "request_finalize", "event_id": self.uuid(), "request_id": rid,
                         "user_id": uid, "status": "completed"})
            self.counts["late_finalize_markers"] += 1
        q.late = late
        return q


def interleave(rng, reqs):
    """The messages of several requests interleaved, each request's in order."""
    active = [list(q.main) for q in reqs]
    out = []
    while active:
        cur = rng.choice(active)
        out.append(cur.pop(0))
        if not cur:
            active.remove(cur)
    return out


# ---- the expected charges -------------------------------------------------------------------
def distinct_usage(q):
    """(distinct usage events in partition order, how many belong to the main phase)."""
    main = [e for e in pm.dedup(q.main) if e["type"] != "request_finalize"]
    allv = [e for e in pm.dedup(q.main + q.late) if e["type"] != "request_finalize"]
    return allv, len(main)


def explain(q, charge_amount, adj_amounts):
    """Cut the request's distinct events into the charge and its adjustments, in
    order, so that every piece has the ledger's amount. Returns the cuts
    [(start, end), ...] or None. The charge must hold every main-phase event
    when the request had a finalize marker; without one, a prefix."""
    seq, npre = distinct_usage(q)
    memo = {}

    def price(a, b, adjustment):
        k = (a, b, adjustment)
        if k not in memo:
            memo[k] = PRICING.price(seq[a:b], adjustment=adjustment)
        return memo[k]

    def rest(start, amounts):
        if not amounts:
            return [] if start == len(seq) else None
        for end in range(start + 1, len(seq) + 1):
            if price(start, end, True).amount_credits == amounts[0]:
                tail = rest(end, amounts[1:])
                if tail is not None:
                    return [(start, end)] + tail
        return None

    ends = [npre] if q.kind != "timeout" else range(npre, 0, -1)
    for e0 in ends:
        if price(0, e0, False).amount_credits == charge_amount:
            tail = rest(e0, adj_amounts)
            if tail is not None:
                return [(0, e0)] + tail
    return None


# ---- helpers --------------------------------------------------------------------------------
def iso_epoch(s):
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


class Chaos:
    """The seeded schedule and what it did."""

    def __init__(self, stack, args, cfg_kw):
        self.stack, self.args, self.cfg_kw = stack, args, cfg_kw
        self.rng = random.Random(SEED + 1)
        self.workers = []
        self.kills = []          # (time, worker name)
        self.bursts = []         # (kind, t_start, t_end, injected)
        self.injected = Counter()
        self.n_started = 0
        self.restarts = {}
        self.frozen = None
        self.freezes = 0
        self.freeze_windows = []  # [t_stop, t_cont]

    def new_worker(self):
        self.n_started += 1
        cfg = self.stack.write_config(**self.cfg_kw)
        return self.stack.worker(self.args.bin, cfg, name="worker-%d" % self.n_started).start()

    def start_workers(self):
        self.workers = [self.new_worker() for _ in range(N_WORKERS)]

    def kill_one(self):
        i = self.rng.randrange(len(self.workers))
        if self.workers[i] is self.frozen:  # the frozen one must wake up
            i = (i + 1) % len(self.workers)
        w = self.workers[i]
        if w.alive():
            w.kill9()
            log("SIGKILL %s" % w.name)
        self.kills.append((time.time(), w.name))
        self.workers[i] = self.new_worker()

    def freeze(self):
        """SIGSTOP a worker (a long GC-like pause): its partitions move on, its
        claims expire and are taken over; SIGCONT later (thaw) and it must
        neither double-charge nor lose what it held."""
        w = self.workers[self.rng.randrange(len(self.workers))]
        if w.alive():
            os.kill(w.pid, signal.SIGSTOP)
            self.frozen = w
            self.freezes += 1
            self.freeze_windows.append([time.time(), None])
            log("SIGSTOP %s for %.0fs" % (w.name, FREEZE_S))

    def thaw(self):
        w, self.frozen = self.frozen, None
        if self.freeze_windows and self.freeze_windows[-1][1] is None:
            self.freeze_windows[-1][1] = time.time()
        if w is not None and w.alive():
            os.kill(w.pid, signal.SIGCONT)
            log("SIGCONT %s" % w.name)

    def burst_start(self, kind):
        self.cur = (kind, time.time(), self.stack.stats().get("faults_injected", 0))
        self.stack.faults([dict({"target": "wallet"}, **f) for f in BURST_SPECS[kind]])
        log("wallet fault burst: %s" % kind)

    def burst_end(self):
        kind, t0, before = self.cur
        self.stack.clear_faults()
        t1 = time.time()
        n = self.stack.stats().get("faults_injected", 0) - before
        self.injected[kind] += n
        self.bursts.append((kind, t0, t1, n))
        log("wallet fault burst %s over: %d calls faulted" % (kind, n))


# ---- the test -------------------------------------------------------------------------------
def test(t, stack, args, stats_out):
    t_begin = time.monotonic()
    tr = Traffic(SEED, N_REQUESTS, N_USERS)
    reqs = tr.reqs
    by_rid = {q.rid: q for q in reqs}
    assert len(by_rid) == len(reqs), "request ids collide"
    stack.set_default_balance("1000000000")

    cfg_kw = dict(
        pricing=PRICING.libconfig(),
        kafka={"properties": ["session.timeout.ms=4000", "heartbeat.interval.ms=800"]},
        settle={"finalize_grace": "1s", "request_timeout": "5s", "late_policy": "adjust",
                "max_attempts": 2, "retry_max_interval": "2s", "breaker_failures": 3,
                "breaker_cooldown": "2s"},
        wallet={"timeout": "1s"}, user_service={"timeout": "1s"},
        log={"level": "info", "format": "json"})
    chaos = Chaos(stack, args, cfg_kw)
    chaos.start_workers()
    for w in chaos.workers:
        w.wait_ready(90)
    log("%d workers ready" % N_WORKERS)

    # -- the schedule (seeded) --
    rng = random.Random(SEED + 2)
    F = FAULT_SECONDS
    prod_window = 0.9 * F
    n_waves = max(8, int(prod_window / 1.5))
    waves = [reqs[i * len(reqs) // n_waves:(i + 1) * len(reqs) // n_waves]
             for i in range(n_waves)]
    sched = []  # (t, order, action, arg)
    for i in range(n_waves):
        sched.append((i * prod_window / n_waves, 0, "wave", i))
    # The Redis scene, at R: the wallet hangs (calls time out: outcome unknown),
    # Redis is SIGKILLed while those calls are in flight and stays down 3 s
    # (the settlers record their unknown outcomes then), then the wallet
    # answers 503 (not delivered) while the claims expire and other attempts
    # follow: they must stay at the wallet (G7). No kill near it, so no excuse.
    R = 0.3 * F
    scene = (R - 4.0, R + 16.0)
    sched += [(R - 2.5, 2, "burst", "hang"), (R, 3, "restart_redis", None),
              (R + 3.1, 2, "burst_end", None), (R + 3.2, 2, "burst", "503"),
              (R + 15.0, 2, "burst_end", None)]
    at = KILL_EVERY * 0.7
    while at < F:
        if not scene[0] - 1.0 <= at <= scene[1]:
            sched.append((at, 1, "kill", None))
        at += KILL_EVERY * rng.uniform(0.75, 1.25)
    at = 2.0
    kinds = []
    while at < F - 2:
        if not kinds:
            kinds = list(BURST_KINDS)
            rng.shuffle(kinds)
        d = rng.uniform(2.5, 4.0)
        if at + d + 1.0 >= scene[0] and at <= scene[1]:
            at = scene[1] + 1.5
            continue
        sched.append((at, 2, "burst", kinds.pop()))
        sched.append((at + d, 2, "burst_end", None))
        at += d + rng.uniform(2.0, 3.5)
    for frac in (0.12, 0.7):  # a worker frozen past its session timeout and its claim lease
        sched.append((frac * F, 4, "freeze", None))
        sched.append((frac * F + FREEZE_S, 4, "thaw", None))
    sched.append((0.55 * F, 3, "restart_kafka", None))
    sched.sort(key=lambda x: (x[0], x[1]))

    produced = Counter()
    ledger_keys = set()

    def send(msgs, what):
        stack.produce(msgs)
        produced[what] += len(msgs)

    def send_due_late():
        pending = [q for q in reqs if q.late and not q.sent_late]
        if not pending:
            return 0
        ledger_keys.update(e["key"] for e in stack.ledger())
        ready = [q for q in pending if charge_key(q.rid) in ledger_keys]
        if ready:
            send([m for q in ready for m in q.late], "late")
            for q in ready:
                q.sent_late = True
        return len(ready)

    # -- run it --
    t0 = time.monotonic()
    in_burst = False
    next_late_check = 0.0
    for at, _, action, arg in sched:
        while True:
            now = time.monotonic() - t0
            if now >= at:
                break
            if now >= next_late_check:
                send_due_late()
                next_late_check = now + 1.0 + N_REQUESTS / 2000.0
            time.sleep(min(0.1, at - now))
        if action == "wave":
            send(interleave(rng, waves[arg]), "main")
        elif action == "kill":
            chaos.kill_one()
        elif action == "burst":
            chaos.burst_start(arg)
            in_burst = True
        elif action == "burst_end":
            chaos.burst_end()
            in_burst = False
        elif action == "freeze":
            chaos.freeze()
        elif action == "thaw":
            chaos.thaw()
        elif action == "restart_redis":
            t1 = time.monotonic()
            stack.kill("redis", "KILL")
            time.sleep(3.0)  # down while the settlers finish their hanging wallet calls
            stack.start()
            chaos.restarts["redis"] = time.monotonic() - t1
            log("redis SIGKILLed and restarted (%.1fs)" % chaos.restarts["redis"])
        elif action == "restart_kafka":
            t1 = time.monotonic()
            stack.restart("kafka")
            chaos.restarts["kafka"] = time.monotonic() - t1
            log("kafka restarted (%.1fs)" % chaos.restarts["kafka"])
    if in_burst:
        chaos.burst_end()
    chaos.thaw()
    stack.clear_faults()
    t_faults_over = time.monotonic()
    log("fault phase over after %.1fs: %d kills, bursts %s; settling"
        % (t_faults_over - t0, len(chaos.kills), dict(chaos.injected)))

    # -- let everything settle --
    # One deadline for both waits: after the faults end, everything normally
    # settles within seconds (pending retries back off to retry_max_interval 2s).
    deadline = time.monotonic() + 90 + N_REQUESTS * 0.05

    def budget():
        return max(1.0, deadline - time.monotonic())

    def late_all_sent():
        send_due_late()
        return all(q.sent_late for q in reqs if q.late)
    try:
        wait_until(late_all_sent, timeout=budget(), interval=1.0, what="every late event sent")
    except TimeoutError as e:
        unsent = [q.rid for q in reqs if q.late and not q.sent_late]
        t.check(False, "every request charged in time to send its late events",
                "%s: %d not charged: %r" % (e, len(unsent), unsent[:10]))
        for q in reqs:  # what was not sent is not expected
            if not q.sent_late:
                q.late, q.late_usage = [], 0

    want_charges = {charge_key(q.rid): q for q in reqs}

    def settled():
        led = stack.ledger()
        keys = {e["key"] for e in led}
        missing = [k for k in want_charges if k not in keys]
        if missing:
            return None
        unadjusted = [q.rid for q in reqs if q.late_usage and adj_key(q.rid, 1) not in keys]
        if unadjusted:
            return None
        if stack.redis("ZCARD", "bw:due") != "0":
            return None
        return led
    try:
        wait_until(settled, timeout=budget(), interval=1.0, what="every charge and adjustment")
    except TimeoutError as e:
        keys = {e["key"] for e in stack.ledger()}
        missing = [k for k in want_charges if k not in keys]
        unadj = [q.rid for q in reqs if q.late_usage and adj_key(q.rid, 1) not in keys]
        due = stack.redis("ZRANGE", "bw:due", "0", "-1", "WITHSCORES")
        t.check(False, "everything settled after the faults",
                "%s; %d charges missing %r; %d late requests without adjustment %r; due: %s"
                % (e, len(missing), missing[:10], len(unadj), unadj[:10], due[:2000]))
        # go on: the checks below tell what is wrong
    t_settled = time.monotonic()
    log("everything charged %.1fs after the faults ended" % (t_settled - t_faults_over))
    time.sleep(3)  # a wrong extra charge would show up now

    def outbox_empty():
        return stack.redis("HLEN", "bw:outbox") == "0" and \
            stack.redis("ZCARD", "bw:due") == "0"
    try:
        wait_until(outbox_empty, timeout=90 if t.failed == 0 else 5, interval=1.0,
                   what="the outbox published and nothing due")
    except TimeoutError as e:
        t.check(False, "outbox empty", str(e))

    led = stack.ledger()
    calls = stack.calls()
    st = stack.stats()
    recs = {r["idempotency_key"]: r for r in stack.consume_json(stack.settlements_topic)}

    # -- checks --
    by_key = defaultdict(list)
    for e in led:
        by_key[e["key"]].append(e)
    twice = {k: len(v) for k, v in by_key.items() if len(v) > 1}
    t.eq(twice, {}, "no key charged twice in the ledgers")
    t.eq(st.get("key_conflicts"), 0, "no key sent again with another amount or user")

    want_keys = set(want_charges)
    adj_by_rid = defaultdict(dict)
    unexpected = []
    for k in by_key:
        if k in want_keys:
            continue
        base, sep, n = k.rpartition(":adj:")
        rid = urllib.parse.unquote(base[3:]) if sep and base.startswith("bw:") else None
        if rid in by_rid and n.isdigit():
            adj_by_rid[rid][int(n)] = by_key[k][0]
        else:
            unexpected.append(k)
    t.eq(unexpected, [], "no unexpected key in the ledgers")
    t.eq(sorted(k for k in want_keys if k not in by_key), [],
         "every request charged (its key in the wallet or user-service ledger)")

    bad, split_timeouts, pieces_adj, small_adj = [], 0, 0, 0
    for q in reqs:
        ck = charge_key(q.rid)
        if ck not in by_key:
            continue
        ce = by_key[ck][0]
        adjs = adj_by_rid.get(q.rid, {})
        ns = sorted(adjs)
        if ns != list(range(1, len(ns) + 1)):
            bad.append("%s: adjustment numbers %r" % (q.rid, ns))
            continue
        if q.late_usage == 0 and ns and q.kind != "timeout":
            bad.append("%s: adjustments %r without late usage" % (q.rid, ns))
        if q.late_usage and not ns:
            bad.append("%s: %d late events never adjusted" % (q.rid, q.late_usage))
        for e in [ce] + [adjs[n] for n in ns]:
            if e["user_id"] != q.uid:
                bad.append("%s: %s charged to %r, not %r" % (q.rid, e["key"], e["user_id"], q.uid))
        cuts = explain(q, ce["amount"], [adjs[n]["amount"] for n in ns])
        if cuts is None:
            seq, npre = distinct_usage(q)
            bad.append("%s (%s): ledger charge %s adjustments %r do not fit its %d+%d distinct "
                       "events (charge alone would be %s, late alone %s)"
                       % (q.rid, q.kind, ce["amount"], [adjs[n]["amount"] for n in ns], npre,
                          len(seq) - npre, PRICING.price(seq[:npre]).amount_credits,
                          PRICING.price(seq[npre:], adjustment=True).amount_credits))
            continue
        seq, npre = distinct_usage(q)
        if cuts[0][1] != npre:
            split_timeouts += 1
        pieces_adj += len(cuts) - 1
        small_adj += sum(1 for n in ns if pm.D(adjs[n]["amount"]) < PRICING.minimum)
        # the settlement records (G8)
        for i, (a, b) in enumerate(cuts):
            key = ck if i == 0 else adj_key(q.rid, i)
            r = recs.get(key)
            e = by_key[key][0]
            ch = PRICING.price(seq[a:b], adjustment=i > 0)
            want_fin = {"expected": "expected_met", "marker": "marker",
                        "incomplete": "incomplete", "timeout": "timeout"}[q.kind]
            got = None if r is None else (
                r.get("status"), r.get("kind"), r.get("amount_credits"),
                r.get("transaction_id"), r.get("model_calls"), r.get("tool_calls"),
                r.get("finalize"), r.get("adjustment") if i else None)
            exp = ("settled", "adjustment" if i else "charge", e["amount"], e["transaction_id"],
                   ch.model_calls, ch.tool_calls, want_fin, i if i else None)
            if got != exp:
                bad.append("%s: record %r, want %r" % (key, got, exp))
    t.check(not bad, "every charge and adjustment has the exact amount of its events "
            "(pricing_model.py), the right user and a matching settlement record",
            "\n  " + "\n  ".join(bad[:40]) + ("\n  ... %d more" % (len(bad) - 40)
                                               if len(bad) > 40 else ""))
    statuses = Counter(r.get("status") for r in recs.values())
    t.eq(set(statuses), {"settled"}, "every published record says settled")
    t.eq(len(recs), len(led), "one settlement record per ledger key (%d)" % len(led))

    # G7: never the fallback after an unknown outcome. A consume call whose
    # outcome the worker could not know (no answer: dropped, refused
    # mid-request, the worker killed; 500; a hang past the timeout) must not be
    # followed by a new fallback attempt for the same key (every fallback
    # starts with a user-service `records` call). This holds across SIGKILL and
    # freezes too: an attempt is marked in Redis before the wallet is called,
    # and the fallback is used only by the latest attempt.
    hang_windows = [(t0b + 0.1, t1b - 0.1) for kind, t0b, t1b, _ in chaos.bursts
                    if kind == "hang"]
    unknown_at = {}
    for c in calls:
        if not c.get("key") or not c["path"].endswith("/consume"):
            continue
        ts = iso_epoch(c["time"])
        unk = c["status"] is None or c["status"] == 500 or (
            c["service"] == "wallet" and any(a <= ts <= b for a, b in hang_windows))
        if unk and c["key"] not in unknown_at:
            unknown_at[c["key"]] = (ts, c["service"], c["status"], c["outcome"])
    fb_after = []
    kill_times = [k for k, _ in chaos.kills]
    for c in calls:
        if c["service"] != "user" or not c.get("key") or c["path"].endswith("/consume"):
            continue
        u = unknown_at.get(c["key"])
        ts = iso_epoch(c["time"])
        if u is not None and ts > u[0]:
            ctx = []
            if any(u[0] <= k <= ts for k in kill_times):
                ctx.append("a worker was SIGKILLed in between")
            if any(a <= ts and b >= u[0] for a, b in chaos.freeze_windows):
                ctx.append("a worker was frozen in between")
            fb_after.append((c["key"], "unknown %s %s %s at %s" % (
                u[1], u[2], u[3], datetime.fromtimestamp(u[0], timezone.utc)
                .strftime("%H:%M:%S.%f")[:-3]), "fallback at " + c["time"], ", ".join(ctx)))
    t.eq(fb_after, [], "no fallback attempt after an unknown consume outcome of the same key")

    dlq = stack.consume(stack.dlq_topic)
    t.eq(len(dlq), 0, "no dead letters")

    # -- the counts --
    via = Counter(e["via"] for e in led)
    n_events = sum(len(distinct_usage(q)[0]) for q in reqs)
    n_adj = sum(len(v) for v in adj_by_rid.values())
    kinds = Counter(q.kind for q in reqs)
    stats_out.update({
        "requests": len(reqs), "users": len({q.uid for q in reqs}),
        "messages": sum(produced.values()), "distinct_usage_events": n_events,
        "duplicates": sum(produced.values()) - n_events - sum(
            1 for q in reqs for e in pm.dedup(q.main + q.late)
            if e["type"] == "request_finalize"),
        "resends": dict(tr.counts),
        "finalize_kinds": dict(kinds),
        "late_requests": sum(1 for q in reqs if q.late_usage),
        "late_events": sum(q.late_usage for q in reqs),
        "kills": len(chaos.kills), "workers_started": chaos.n_started,
        "freezes": chaos.freezes,
        "bursts": Counter(k for k, *_ in chaos.bursts),
        "faulted_wallet_calls": dict(chaos.injected),
        "restarts_s": {k: round(v, 1) for k, v in chaos.restarts.items()},
        "ledger_entries": len(led), "settled_via": dict(via), "adjustments": n_adj,
        "adjustments_below_minimum": small_adj, "timeout_requests_cut": split_timeouts,
        "wallet_calls": sum(1 for c in calls if c["service"] == "wallet"),
        "user_service_calls": sum(1 for c in calls if c["service"] == "user"),
        "refsvc_replays": st.get("replays"), "refsvc_in_flight_409": st.get("in_flight"),
        "settle_after_faults_s": round(t_settled - t_faults_over, 1),
        "fault_phase_s": round(t_faults_over - t0, 1),
    })
    t.check(via.get("user_service", 0) > 0, "some requests settled through the fallback "
            "(%d)" % via.get("user_service", 0))
    t.check(n_adj > 0, "adjustments were charged (%d)" % n_adj)
    t.check(sum(chaos.injected.values()) > 0, "wallet faults were injected")

    # what the workers logged (warnings and errors, by message)
    logged = Counter()
    for w in stack.workers:
        for rec in w.log_json():
            if rec.get("level") in ("warn", "warning", "error", "fatal"):
                logged["%s: %s" % (rec.get("level"), rec.get("msg"))] += 1
    stats_out["worker_log_warnings_errors"] = dict(logged.most_common())

    # graceful stop after the chaos
    rcs = [w.stop() for w in chaos.workers]
    t.eq(rcs, [0] * N_WORKERS, "SIGTERM: every worker exits 0")
    log("test body %.1fs" % (time.monotonic() - t_begin))


def main():
    args = bwtest.parse_args()
    t = Checks()
    t0 = time.monotonic()
    counts = {}
    log("seed %d, %d requests, %d users, %.0fs of faults, a kill every ~%.1fs"
        % (SEED, N_REQUESTS, N_USERS, FAULT_SECONDS, KILL_EVERY))
    try:
        with Stack(keep=args.keep, events_partitions=PARTITIONS) as stack:
            t.run("fault injection", test, t, stack, args, counts)
    except Exception as e:  # noqa: BLE001
        t.check(False, "stack start/stop", repr(e))
    if counts:
        log("counts:")
        for k, v in counts.items():
            print("    %-40s %s" % (k, dict(v) if isinstance(v, Counter) else v), flush=True)
    log("run time %.1fs" % (time.monotonic() - t0))
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())

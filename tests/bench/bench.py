#!/usr/bin/env python3
"""bench.py: billing-worker's throughput, latency and memory benchmark (issue 6).

Run it through tests/bench/run.sh (which builds the worker and the wallet load
tool first). One local stack (Kafka 3.9.1, Redis, the reference services, via
tests/e2e/bwtest.py) serves every phase:

  topic     a realistic input topic is generated (requests of tens of events:
            model calls with token usage in the three usage shapes, tool calls,
            finalize markers with and without expected counts, ~2% duplicates)
            and produced to the real broker with kcat
  ceiling   `kcat -C -e -q -o beginning` reads the whole topic to /dev/null,
            3 runs, the median: the events/s librdkafka can merely read
  wallet    the reference wallet's own capacity: wallet_load (C, libcurl,
            keep-alive) POSTs charges with 4 and 16 concurrent connections
  one       one worker, a fresh consumer group, empty Redis and wallet: events/s
            from its first consumed message to the wallet ledger holding one
            charge per request; the ratio to the ceiling; the worker's peak RSS
            (VmHWM); Redis used_memory per event and per request; CPU seconds of
            every process of the stack during the phase
  two       the same with two workers in one group
  live      settlement latency at about half of the one-worker rate: new
            requests are produced at a controlled rate while one worker consumes
            live; latency = wallet receipt time of the charge (the reference
            wallet's call log) - Kafka timestamp of the finalize marker (the
            input topic uses LogAppendTime: the broker's append time)

Prints one table and writes the results as JSON. No pass/fail on timings: the
targets of issue 6 are shown next to the numbers.

Settings (environment):
  BW_BENCH_BIN          worker binary [build-bench/billing-worker]
  BW_BENCH_LOAD_BIN     wallet load tool [build-bench/wallet_load]
  BW_BENCH_RESULTS      JSON output [tests/bench/results.json]
  BW_BENCH_REQUESTS     requests in the topic [20000]
  BW_BENCH_USERS        distinct users [2000]
  BW_BENCH_SEED         generator seed [1]
  BW_BENCH_PARTITIONS   partitions of the input topic [4]
  BW_BENCH_CONCURRENCY  settle.concurrency of the workers [16, the default]
  BW_BENCH_PHASES       comma list of ceiling,wallet,one,two,live [all]
  BW_BENCH_LIVE_SECONDS duration of the live (latency) phase [40]
  BW_BENCH_LIVE_RATE    events/s of the live phase [half the one-worker rate]
  BW_BENCH_PRICING      pricing file [examples/pricing-tokens.cfg]
  BW_BENCH_PROFILE      perf: record the one-worker phase with perf (cpu-clock,
                        DWARF call graphs) and sample the worker's threads with
                        gdb; reports go to BW_BENCH_PROFILE_DIR
                        [build-bench/profile]. The numbers of a profiled run are
                        distorted: use it for the profile only.
  BW_BENCH_KEEP=1       keep the stack directory (logs) after the run
Diagnostics (change the stack, not the worker; say so in any number you quote):
  BW_BENCH_REDIS_FSYNC  Redis appendfsync for the run (the stack uses "always",
                        the durability PRODUCT.md promises): e.g. everysec
  BW_BENCH_GDB_SAMPLES  stack samples of the gdb profiler [50]
  BW_BENCH_KAFKA_PROPS  librdkafka properties added to the workers' kafka.properties,
                        comma-separated, e.g. queued.max.messages.kbytes=4096
"""

import argparse
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import bwtest  # noqa: E402
import gen_traffic  # noqa: E402
from bwtest import Stack, log  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def env(name, default):
    v = os.environ.get(name)
    return default if v is None or v == "" else v


# ---- traffic --------------------------------------------------------------------
class Traffic:
    """Requests of tens of events (agent turns with many model and tool calls),
    interleaved as a fleet of agents publishes them. Reuses gen_traffic.py's
    usage shapes and timestamps."""

    def __init__(self, seed, users, prefix, dup_rate=0.02, error_rate=0.02,
                 no_expected_rate=0.1, idempotency_rate=0.3, concurrency=100):
        ns = argparse.Namespace(seed=seed, start_time="2026-12-01T09:00:00Z", error_rate=error_rate,
                                dup_rate=dup_rate, idempotency_rate=idempotency_rate,
                                no_expected_rate=no_expected_rate, cloudevents_rate=0.0,
                                id_prefix=prefix, concurrency=concurrency)
        self.g = gen_traffic.Gen(ns)
        self.r = self.g.rng
        self.a = ns
        self.prefix = prefix
        self.users = ["%su-%05d" % (prefix, i + 1) for i in range(users)]
        self.weights = [1.0 / (i + 1) ** 0.8 for i in range(users)]
        self.sessions = {u: "s-" + self.g.uuid()[:12] for u in self.users}
        self.orgs = {u: ("org-%02d" % (i % 7 + 1) if i % 3 else None)
                     for i, u in enumerate(self.users)}
        self.n = 0

    def request(self):
        """(request_id, [event dict, ...], distinct event count)."""
        g, r, a = self.g, self.r, self.a
        self.n += 1
        user = r.choices(self.users, self.weights)[0]
        rid = "%sreq-%06d-%s" % (self.prefix, self.n, g.uuid()[:8])
        common = {"request_id": rid, "user_id": user, "session_id": self.sessions[user]}
        if self.orgs[user]:
            common["org_id"] = self.orgs[user]
        model, provider = g.pick(gen_traffic.MODELS)
        n_model = min(60, 3 + int(r.expovariate(1 / 11.0)))
        n_tool = int(round(n_model * r.uniform(0.0, 0.8)))
        steps = ["model"] * n_model
        for _ in range(n_tool):
            steps.insert(r.randint(1, max(1, len(steps) - 1)), "tool")
        ms = self.n * 700 + r.randint(0, 900)
        events, turn = [], 0
        n_m = n_t = 0
        for step in steps:
            ms += r.randint(200, 4000)
            ev = {"event_id": g.uuid(), **common, "timestamp": g.ts(ms)}
            failed = r.random() < a.error_rate
            if step == "model":
                ev.update({"type": "custom_model_call", "model": model, "provider": provider,
                           "node_name": gen_traffic.NODES[min(turn, 3)]})
                ev["status"] = "error" if failed else "completed"
                if not failed or r.random() < 0.5:
                    ev["usage"] = g.usage(model, turn)
                n_m += 1
                turn += 1
            else:
                tool = g.pick(gen_traffic.TOOLS)[0]
                ev.update({"type": "custom_tool_call", "tool_name": tool,
                           "status": "error" if failed else "completed"})
                ev["units"] = r.choice([1, 1, 1, 2, 3]) if tool == "web_search" else 1
                ev["duration_ms"] = r.randint(300, 20000)
                if r.random() < a.idempotency_rate:
                    ev["idempotency_key"] = "call_" + g.uuid().replace("-", "")[:24]
                n_t += 1
            events.append(ev)
        fin = {"type": "request_finalize", "event_id": g.uuid(), **common,
               "timestamp": g.ts(ms + r.randint(50, 500)),
               "status": r.choices(["completed", "error", "cancelled"], [94, 4, 2])[0]}
        if r.random() >= a.no_expected_rate:
            fin["expected"] = {"model_calls": n_m, "tool_calls": n_t}
        events.append(fin)
        distinct = len(events)
        return rid, g.add_duplicates(events), distinct

    def stream(self, n_requests=None, n_events=None):
        """Interleaved (key, value bytes) lines; stops after n_requests, or
        once n_events messages were generated. Returns (lines, stats)."""
        per_request, msgs, distinct = [], 0, 0
        while (n_requests is not None and len(per_request) < n_requests) or \
                (n_events is not None and msgs < n_events):
            rid, evs, d = self.request()
            per_request.append([(rid, json.dumps(e, separators=(",", ":"))) for e in evs])
            msgs += len(evs)
            distinct += d
        out, active, queue = [], [], per_request[::-1]
        while queue or active:
            while queue and len(active) < self.a.concurrency:
                active.append(queue.pop())
            i = self.r.randrange(len(active))
            cur = active[i]
            out.append(cur.pop(0))
            if not cur:
                active[i] = active[-1]
                active.pop()
        lines = [("%s\t%s\n" % kv).encode() for kv in out]
        return lines, {"requests": len(per_request), "messages": msgs, "distinct_events": distinct,
                       "duplicates": msgs - distinct, "bytes": sum(len(v) for _, v in out)}


# ---- process accounting ---------------------------------------------------------------
def proc_cpu(pid):
    """utime + stime of a process (all threads), seconds; None if gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


def system_cpu():
    """(busy, total) jiffies of the whole machine, in seconds."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    total = sum(v[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def vm_status(pid, field):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])  # kB
    except OSError:
        pass
    return None


class CpuMeter:
    """CPU seconds of named processes over a phase, and of everything else."""

    def __init__(self, pids):
        self.pids = dict(pids)

    def start(self):
        self.t0 = time.monotonic()
        self.c0 = {n: proc_cpu(p) or 0.0 for n, p in self.pids.items()}
        self.s0 = system_cpu()

    def stop(self):
        wall = time.monotonic() - self.t0
        out = {}
        mine = 0.0
        for n, p in self.pids.items():
            c = proc_cpu(p)
            used = (c - self.c0[n]) if c is not None else None
            if used is not None:
                mine += used
                out[n] = {"cpu_s": round(used, 2), "cpu_pct": round(100 * used / wall, 1)}
        s1 = system_cpu()
        busy = s1[0] - self.s0[0]
        out["machine_busy_pct"] = round(100 * busy / wall, 1)  # out of 100 x cores
        out["other_processes_pct"] = round(100 * max(0.0, busy - mine) / wall, 1)
        out["wall_s"] = round(wall, 2)
        return out


# ---- the benchmark ------------------------------------------------------------------------
def pctl(sorted_vals, p):
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(round(p * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


def iso_ms(s):
    """'2026-12-01T09:00:00.123Z' -> epoch ms."""
    dt = datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return int(round(dt.timestamp() * 1000))


class Bench:
    def __init__(self):
        self.bin = Path(env("BW_BENCH_BIN", REPO / "build-bench" / "billing-worker"))
        self.load_bin = Path(env("BW_BENCH_LOAD_BIN", REPO / "build-bench" / "wallet_load"))
        self.results_path = Path(env("BW_BENCH_RESULTS", HERE / "results.json"))
        self.n_requests = None  # size_topic()
        self.n_users = int(env("BW_BENCH_USERS", 2000))
        self.seed = int(env("BW_BENCH_SEED", 1))
        self.partitions = int(env("BW_BENCH_PARTITIONS", 4))
        self.concurrency = int(env("BW_BENCH_CONCURRENCY", 16))
        self.phases = set(env("BW_BENCH_PHASES", "ceiling,wallet,one,two,live").split(","))
        self.live_seconds = float(env("BW_BENCH_LIVE_SECONDS", 40))
        self.live_rate = float(env("BW_BENCH_LIVE_RATE", 0)) or None
        self.pricing_file = Path(env("BW_BENCH_PRICING", REPO / "examples" / "pricing-tokens.cfg"))
        self.profile = env("BW_BENCH_PROFILE", "")
        self.profile_dir = Path(env("BW_BENCH_PROFILE_DIR", REPO / "build-bench" / "profile"))
        self.keep = env("BW_BENCH_KEEP", "0") == "1"
        self.res = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.run_id = uuid.uuid4().hex[:6]

    # -- helpers --
    def pricing_text(self):
        text = bwtest.extract_group(self.pricing_file.read_text(), "pricing")
        # The LiteLLM map path is relative to the pricing file: make it absolute.
        return re.sub(r'litellm_prices\s*=\s*"([^"]+)"',
                      lambda m: 'litellm_prices = "%s"' % (
                          m.group(1) if m.group(1).startswith("/") or not m.group(1)
                          else str(self.pricing_file.parent / m.group(1))), text)

    def config(self, group, extra_props=()):
        props = ["client.id=bench-" + group] + list(extra_props) + [
            x for x in env("BW_BENCH_KAFKA_PROPS", "").split(",") if x]
        return self.stack.write_config(
            pricing=self.pricing_text(),
            kafka={"group_id": group, "properties": props},
            settle={"concurrency": self.concurrency},
            log={"level": "info", "format": "json"})

    def component_pids(self):
        pids = {}
        for n in ("kafka", "redis", "refsvc"):
            try:
                pids[n] = int((self.stack.dir / ("%s.pid" % n)).read_text().strip())
            except (OSError, ValueError):
                pass
        return pids

    def kcat_produce(self, lines, topic=None):
        cmd = ["kcat", "-P", "-b", self.stack.brokers, "-t", topic or self.stack.events_topic,
               "-K", "\t", "-X", "partitioner=murmur2_random", "-X", "linger.ms=20",
               "-X", "batch.num.messages=10000", "-X", "queue.buffering.max.messages=1000000"]
        p = subprocess.run(cmd, input=b"".join(lines), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=600)
        if p.returncode != 0:
            raise RuntimeError("kcat produce failed: %s" % p.stderr.decode(errors="replace"))

    def redis_info(self):
        info = {}
        for line in self.stack.redis("INFO", "memory").splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                info[k] = v.strip()
        return info

    def redis_section(self, section):
        out = {}
        for line in self.stack.redis("INFO", section).splitlines():
            if ":" in line and not line.startswith("#"):
                k, v = line.split(":", 1)
                out[k] = v.strip()
        return out

    def redis_commandstats(self):
        """{command: {calls, usec}} since the last CONFIG RESETSTAT (commands run
        by scripts are counted too)."""
        out = {}
        for k, v in self.redis_section("commandstats").items():
            f = dict(x.split("=", 1) for x in v.split(","))
            out[k.replace("cmdstat_", "")] = {"calls": int(f["calls"]), "usec": int(f["usec"])}
        return out

    def redis_used(self):
        return int(self.redis_info()["used_memory"])

    def fresh_state(self):
        """Empty Redis and wallet, huge balances (no 402s)."""
        self.stack.redis("FLUSHALL")
        self.stack.reset()
        self.stack.set_default_balance("1000000000")

    def settlements_count(self):
        p = subprocess.run(["kcat", "-C", "-b", self.stack.brokers, "-t",
                            self.stack.settlements_topic, "-o", "beginning", "-e", "-q",
                            "-f", "x"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=120)
        return len(p.stdout)

    # -- phases --
    def phase_topic(self):
        log("generating %d requests (%d users, seed %d)" % (self.n_requests, self.n_users,
                                                            self.seed))
        t0 = time.monotonic()
        tr = Traffic(self.seed, self.n_users, "b%s-" % self.run_id)
        lines, st = tr.stream(n_requests=self.n_requests)
        st["generate_s"] = round(time.monotonic() - t0, 1)
        st["events_per_request"] = round(st["messages"] / st["requests"], 1)
        st["avg_event_bytes"] = round(st["bytes"] / st["messages"])
        st["partitions"] = self.partitions
        log("topic: %(messages)d messages (%(distinct_events)d distinct, %(duplicates)d "
            "duplicates) of %(requests)d requests, %(bytes)d bytes" % st)
        t0 = time.monotonic()
        self.kcat_produce(lines)
        st["produce_s"] = round(time.monotonic() - t0, 2)
        log("produced in %.1fs" % st["produce_s"])
        self.topic = st
        self.res["topic"] = st

    def phase_ceiling(self):
        runs = []
        meter = CpuMeter(self.component_pids())
        meter.start()
        for i in range(3):
            t0 = time.monotonic()
            with open(os.devnull, "wb") as dn:
                subprocess.run(["kcat", "-C", "-b", self.stack.brokers, "-t",
                                self.stack.events_topic, "-o", "beginning", "-e", "-q"],
                               stdout=dn, stderr=subprocess.PIPE, timeout=600, check=True)
            runs.append(time.monotonic() - t0)
            log("kcat read %d messages in %.2fs" % (self.topic["messages"], runs[-1]))
        med = statistics.median(runs)
        # kcat's fixed cost (connect, metadata, offsets): the time to read the
        # first 1,000 messages; the slope excludes it.
        heads = []
        for i in range(3):
            t0 = time.monotonic()
            subprocess.run(["kcat", "-C", "-b", self.stack.brokers, "-t", self.stack.events_topic,
                            "-o", "beginning", "-c", "1000", "-q"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60)
            heads.append(time.monotonic() - t0)
        startup = statistics.median(heads)
        self.res["ceiling_startup_s"] = round(startup, 3)
        self.res["ceiling_events_per_s_without_startup"] = round(
            (self.topic["messages"] - 1000) / max(0.001, med - startup))
        self.res["ceiling"] = {"runs_s": [round(r, 3) for r in runs], "median_s": round(med, 3),
                               "cpu": meter.stop(),
                               "events_per_s": round(self.topic["messages"] / med),
                               "mib_per_s": round(self.topic["bytes"] / med / 2**20, 1)}

    def sample_body(self):
        """A consume body like the worker's (from a real one when we have it)."""
        return ('{"amount":12.3456,"usage_record_id":null,"breakdown":{"lines":[{"kind":"model",'
                '"name":"gpt-4o","calls":9,"credits":"10.1000"},{"kind":"tool","name":"web_search",'
                '"calls":3,"credits":"2.2456"}]},"service":"billing-worker","reason":"agent usage",'
                '"request_id":"req-000001-abcdef12","session_id":"s-0123456789ab"}')

    def phase_wallet(self):
        if not self.load_bin.exists():
            log("no %s: wallet capacity skipped" % self.load_bin)
            return
        body = self.sample_body()
        bf = self.stack.dir / "wallet-body.json"
        bf.write_text(body)
        out = []
        meter = CpuMeter(self.component_pids())
        for conc in sorted({4, 16, self.concurrency}):
            meter.start()
            p = subprocess.run([str(self.load_bin), self.stack.wallet_url, str(conc), "5", str(bf),
                                "wl%s-%d" % (self.run_id, conc)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
            r = json.loads(p.stdout)
            r["cpu"] = meter.stop()
            out.append(r)
            log("wallet: %d connections: %.0f calls/s (p50 %.1f ms, p99 %.1f ms, %d errors)"
                % (conc, r["rps"], r["p50_ms"], r["p99_ms"], r["errors"]))
        self.res["wallet_capacity"] = out
        self.res["wallet_body_bytes"] = len(body)
        self.stack.reset()
        self.stack.set_default_balance("1000000000")

    def run_workers(self, n_workers, name):
        """Run n workers on the whole topic from the beginning; measure."""
        self.fresh_state()
        mem0 = self.redis_used()
        settled0 = self.settlements_count()
        self.stack.redis("CONFIG", "RESETSTAT")
        rcpu0 = self.redis_section("cpu")
        group = "bench-%s-%s" % (name, self.run_id)
        workers = [self.stack.worker(self.bin, self.config(group), name="%s-%d" % (name, i + 1))
                   for i in range(n_workers)]
        pids = self.component_pids()
        meter = None
        N, R = self.topic["messages"], self.topic["requests"]
        t_first = t_consumed = t_settled = None
        cmeter = cpu_consume = None
        rss_start = {}
        samples = []
        profiler = None
        t_start = time.monotonic()
        for w in workers:
            w.start()
        for i, w in enumerate(workers):
            pids["worker-%d" % (i + 1) if n_workers > 1 else "worker"] = w.pid
        meter = CpuMeter(pids)
        meter.start()
        if self.profile and n_workers == 1:
            profiler = Profiler(self, workers[0].pid)
        deadline = time.monotonic() + max(600, N / 200.0)
        last_consumed = 0
        while time.monotonic() < deadline:
            now = time.monotonic()
            consumed = 0
            for w in workers:
                try:
                    m = w.metrics()
                    consumed += int(m.get("billing_worker_events_consumed_total", 0))
                except OSError:
                    pass
            try:
                applied = int(self.stack.stats()["applied"])
            except (OSError, RuntimeError):
                applied = 0
            if consumed > 0 and t_first is None:
                # between the previous poll and this one
                t_first = now - 0.025
                cmeter = CpuMeter(pids)
                cmeter.start()
                rss_start = {w.name: vm_status(w.pid, "VmRSS") for w in workers}
                if profiler:
                    profiler.start()
            if t_consumed is None and consumed >= N:
                t_consumed = now
                cpu_consume = cmeter.stop()
            samples.append((round(now - t_start, 2), consumed, applied))
            if consumed != last_consumed and len(samples) % 20 == 0:
                log("%s: consumed %d/%d, settled %d/%d" % (name, consumed, N, applied, R))
            last_consumed = consumed
            if applied >= R:
                t_settled = now
                break
            for w in workers:
                if not w.alive():
                    raise RuntimeError("%s exited: %s" % (w.name, w.log()[-2000:]))
            time.sleep(0.05)
        cpu = meter.stop()
        if profiler:
            profiler.stop()
        rss = {w.name: {"vm_hwm_kib": vm_status(w.pid, "VmHWM"),
                        "vm_rss_kib": vm_status(w.pid, "VmRSS"),
                        "vm_rss_at_first_consume_kib": rss_start.get(w.name)} for w in workers}
        # Redis after settlement, once the outbox is drained (records acknowledged).
        try:
            bwtest.wait_until(lambda: self.stack.redis("HLEN", "bw:outbox") == "0", timeout=30)
        except TimeoutError:
            pass
        mem1 = self.redis_used()
        info = self.redis_info()
        cstats = self.redis_commandstats()
        rcpu1 = self.redis_section("cpu")
        rcpu = {k: round(float(rcpu1[k]) - float(rcpu0[k]), 2)
                for k in ("used_cpu_sys", "used_cpu_user", "used_cpu_sys_main_thread",
                          "used_cpu_user_main_thread") if k in rcpu1}
        keys = int(self.stack.redis("DBSIZE"))
        metrics = {}
        for w in workers:
            for k, v in w.metrics().items():
                if k.startswith("billing_worker_") and not k.startswith(
                        "billing_worker_settlement_seconds_bucket"):
                    metrics[k] = metrics.get(k, 0) + v
        try:
            self.res["wallet_body_example"] = self.stack.ledger()[0]["body"]
        except (IndexError, KeyError, OSError, RuntimeError):
            pass
        for w in workers:
            w.stop()
        settled_records = self.settlements_count() - settled0
        r = {"workers": n_workers, "timed_out": t_settled is None}
        if t_first is not None:
            end = t_settled or time.monotonic()
            r["first_consume_after_start_s"] = round(t_first - t_start, 2)
            r["consume_s"] = round((t_consumed or end) - t_first, 2)
            r["settle_s"] = round(end - t_first, 2)
            r["events_per_s"] = round(N / (end - t_first))
            r["consume_events_per_s"] = round(N / ((t_consumed or end) - t_first))
            r["requests_per_s"] = round(R / (end - t_first))
            ceil = self.res.get("ceiling", {}).get("events_per_s")
            if ceil:
                r["ratio_to_ceiling"] = round(r["events_per_s"] / ceil, 3)
                r["consume_ratio_to_ceiling"] = round(r["consume_events_per_s"] / ceil, 3)
        r["settlement_records"] = settled_records
        r["rss"] = rss
        r["cpu"] = cpu
        r["cpu_while_consuming"] = cpu_consume
        r["redis"] = {"used_memory_before": mem0, "used_memory_after": mem1,
                      "used_memory_peak": int(info.get("used_memory_peak", 0)),
                      "keys": keys,
                      "bytes_per_event": round((mem1 - mem0) / self.topic["distinct_events"], 1),
                      "bytes_per_request": round((mem1 - mem0) / R),
                      "cpu_s": rcpu,
                      "commandstats": cstats}
        ev = cstats.get("evalsha", {})
        if ev:
            # every script: apply (per batch) and the per-settlement ones
            r["redis"]["evalsha_usec_per_event"] = round(ev["usec"] / N, 1)
            r["redis"]["evalsha_calls"] = ev["calls"]
        r["worker_metrics"] = {k: v for k, v in metrics.items() if not k.endswith("_info")}
        r["progress"] = samples[:: max(1, len(samples) // 200)]
        if profiler:
            r["profile"] = profiler.report()
        log("%s: %s events/s (consumed in %ss, settled in %ss), RSS %s" % (
            name, r.get("events_per_s"), r.get("consume_s"), r.get("settle_s"),
            [v["vm_hwm_kib"] for v in rss.values()]))
        return r

    def phase_live(self):
        base = self.res.get("one", {}).get("events_per_s")
        rate = self.live_rate or (base / 2.0 if base else 2000.0)
        n_events = int(rate * self.live_seconds)
        tr = Traffic(self.seed + 1000, self.n_users, "l%s-" % self.run_id)
        lines, st = tr.stream(n_events=n_events)
        self.fresh_state()
        group = "bench-live-%s" % self.run_id
        w = self.stack.worker(self.bin, self.config(group, ["auto.offset.reset=latest"]),
                              name="live")
        w.start()
        w.wait_ready(60)
        time.sleep(3)  # the assignment's "latest" offsets resolved
        pids = self.component_pids()
        pids["worker"] = w.pid
        meter = CpuMeter(pids)
        # linger.ms=50: ~20 produce requests/s. With 5 ms the broker alone burns
        # ~0.8 core at 2,000 events/s on this machine (measured), CPU the worker
        # then lacks. Latency is measured from the broker's append time, so the
        # producer's linger is not part of it.
        log("live: producing %d events of %d requests at %.0f events/s"
            % (st["messages"], st["requests"], rate))
        t_ms0 = int(time.time() * 1000) - 1000
        kc = subprocess.Popen(["kcat", "-P", "-b", self.stack.brokers, "-t",
                               self.stack.events_topic, "-K", "\t",
                               "-X", "partitioner=murmur2_random", "-X", "linger.ms=50"],
                              stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        meter.start()
        t0 = time.monotonic()
        i, n = 0, len(lines)
        while i < n:
            due = int((time.monotonic() - t0) * rate) + 1
            if due > i:
                j = min(n, due)
                kc.stdin.write(b"".join(lines[i:j]))
                kc.stdin.flush()
                i = j
            time.sleep(0.002)
        produce_s = time.monotonic() - t0
        kc.stdin.close()
        kc.wait(60)
        R = st["requests"]
        try:
            bwtest.wait_until(lambda: int(self.stack.stats()["applied"]) >= R, timeout=120,
                              interval=0.2, what="live settlements")
        except TimeoutError as e:
            log(str(e))
        cpu = meter.stop()
        rss = vm_status(w.pid, "VmHWM")
        w.stop()
        # finalize markers' append times
        p = subprocess.run(["kcat", "-C", "-b", self.stack.brokers, "-t",
                            self.stack.events_topic, "-o", "s@%d" % t_ms0, "-e", "-q",
                            "-f", "%T\t%k\t%s\n"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=300)
        fin = {}
        for line in p.stdout.split(b"\n"):
            if b'"request_finalize"' not in line:
                continue
            ts, key, _ = line.split(b"\t", 2)
            k = key.decode()
            fin[k] = min(fin.get(k, 1 << 62), int(ts))
        ledger = self.stack.ledger()
        key_rid = {e["key"]: e["request_id"] for e in ledger}
        recv = {}
        for c in self.stack.calls():
            rid = key_rid.get(c.get("key"))
            if rid and c.get("service") == "wallet" and rid not in recv:
                recv[rid] = iso_ms(c["time"])
        applied = self.redis_fin_times([r for r in recv if r in fin])
        split_a = sorted(applied[r] - fin[r] for r in applied)   # Kafka -> applied in Redis
        split_b = sorted(recv[r] - applied[r] for r in applied)  # applied -> wallet receipt
        pairs = sorted((fin[r], recv[r] - fin[r]) for r in recv if r in fin)
        lat = sorted(v for _, v in pairs)
        windows = []  # p50 / p99 per 5 s of finalize time: a backlog shows as a trend
        if pairs:
            t_base = pairs[0][0]
            buckets = {}
            for t, v in pairs:
                buckets.setdefault(int((t - t_base) / 5000), []).append(v)
            for b in sorted(buckets):
                vs = sorted(buckets[b])
                windows.append({"from_s": b * 5, "n": len(vs), "p50_ms": pctl(vs, 0.5),
                                "p99_ms": pctl(vs, 0.99), "max_ms": vs[-1]})
        out = {"rate_events_per_s": round(rate), "produced_events": st["messages"],
               "requests": R, "produce_s": round(produce_s, 1),
               "achieved_rate_events_per_s": round(st["messages"] / produce_s),
               "settled": len(recv), "measured": len(lat),
               "p50_ms": pctl(lat, 0.5), "p90_ms": pctl(lat, 0.9), "p99_ms": pctl(lat, 0.99),
               "p999_ms": pctl(lat, 0.999), "max_ms": lat[-1] if lat else None,
               "min_ms": lat[0] if lat else None,
               "rss_kib": rss, "cpu": cpu, "windows": windows,
               "split": {
                   "finalize_to_applied_ms": {"p50": pctl(split_a, 0.5), "p90": pctl(split_a, 0.9),
                                              "p99": pctl(split_a, 0.99)},
                   "applied_to_wallet_ms": {"p50": pctl(split_b, 0.5), "p90": pctl(split_b, 0.9),
                                            "p99": pctl(split_b, 0.99)},
                   "n": len(split_a),
                   "note": "applied = the finalize marker's 'fin' time in the request's Redis "
                           "hash (Redis TIME when the apply script ran)"},
               "fraction_of_one_worker_rate": round(rate / base, 2) if base else None}
        log("live: p50 %s ms, p99 %s ms, p99.9 %s ms over %d settlements"
            % (out["p50_ms"], out["p99_ms"], out["p999_ms"], len(lat)))
        self.res["live"] = out

    def redis_fin_times(self, rids):
        """{request_id: epoch ms} of the 'fin' field of each request's meta hash:
        when the apply script saw its finalize marker."""
        script = ("local r = {} for i, k in ipairs(KEYS) do "
                  "r[i] = redis.call('HGET', k, 'fin') or '' end return r")
        out = {}
        for i in range(0, len(rids), 500):
            chunk = rids[i:i + 500]
            keys = ["bw:{%s}:m" % re.sub(r"[^A-Za-z0-9._~-]",
                                         lambda m: "".join("%%%02X" % b for b in
                                                           m.group(0).encode()), r)
                    for r in chunk]
            vals = self.stack.redis("EVAL", script, len(keys), *keys).split("\n")
            for r, v in zip(chunk, vals):
                if v.strip().isdigit():
                    out[r] = int(v)
        return out

    # -- output --
    def machine(self):
        m = {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    m["cpu_model"] = line.split(":", 1)[1].strip()
                    break
            for line in open("/proc/meminfo"):
                if line.startswith("MemTotal"):
                    m["mem_total_mib"] = int(line.split()[1]) // 1024
        except OSError:
            pass
        m["load_avg_at_start"] = os.getloadavg()
        for tool, args in (("kcat", ["-V"]), ("redis-server", ["--version"])):
            try:
                out = subprocess.run([tool, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, timeout=10).stdout.decode()
                m[tool] = out.strip().splitlines()[0][:100]
            except (OSError, IndexError):
                pass
        return m

    def table(self):
        res = self.res
        rows = []

        def row(what, value, target="", note=""):
            rows.append((what, value, target, note))

        idle = res.get("idle_cpu")
        if idle:
            row("idle stack: CPU %", ", ".join("%s %s" % (n, v["cpu_pct"]) for n, v in idle.items()
                                               if isinstance(v, dict)),
                "", "other processes %s%% (of %d00%%): machine noise" % (
                    idle.get("other_processes_pct"), os.cpu_count()))
        t = res.get("topic", {})
        row("input topic", "%s msgs / %s req / %s B/msg" % (t.get("messages"), t.get("requests"),
                                                          t.get("avg_event_bytes")),
            "", "%s partitions, %s duplicates" % (t.get("partitions"), t.get("duplicates")))
        c = res.get("ceiling")
        if c:
            row("ceiling: kcat read (events/s)", c["events_per_s"], "",
                "median of %s s; broker CPU %s%%" % (
                    c["runs_s"], c.get("cpu", {}).get("kafka", {}).get("cpu_pct")))
            if res.get("ceiling_events_per_s_without_startup"):
                row("ceiling without kcat start-up", res["ceiling_events_per_s_without_startup"],
                    "", "slope: minus the time to read the first 1,000 (%s s)"
                    % res["ceiling_startup_s"])
        for wc in res.get("wallet_capacity", []):
            row("wallet capacity, %d conns (calls/s)" % wc["concurrency"], round(wc["rps"]), "",
                "p50 %.1f ms, p99 %.1f ms" % (wc["p50_ms"], wc["p99_ms"]))
        ceil = c["events_per_s"] if c else None
        for key, label in (("one", "1 worker"), ("two", "2 workers")):
            r = res.get(key)
            if not r:
                continue
            row("%s: events/s to full settlement" % label, r.get("events_per_s"),
                ">= %d (0.5x)" % (ceil / 2) if ceil and key == "one" else "",
                "ratio %s%s" % (r.get("ratio_to_ceiling"),
                                " TIMED OUT" if r.get("timed_out") else ""))
            row("%s: events/s consumed+applied" % label, r.get("consume_events_per_s"), "",
                "ratio %s, consumed in %s s" % (r.get("consume_ratio_to_ceiling"),
                                                r.get("consume_s")))
            row("%s: settlements/s" % label, r.get("requests_per_s"), "",
                "%s records" % r.get("settlement_records"))
            hwm = [v["vm_hwm_kib"] for v in r["rss"].values()]
            st = [v.get("vm_rss_at_first_consume_kib") for v in r["rss"].values()]
            row("%s: peak RSS (MiB)" % label, ", ".join("%.1f" % (h / 1024) for h in hwm if h),
                "< 64" if key == "one" else "", "VmHWM; %s MiB at the first consume" % ", ".join(
                    "%.1f" % (x / 1024) for x in st if x))
            if key == "one":
                rd = r["redis"]
                row("Redis bytes per event", rd["bytes_per_event"], "", "used_memory delta")
                row("Redis bytes per request", rd["bytes_per_request"], "",
                    "%d keys after settlement" % rd["keys"])
                rc = rd.get("cpu_s", {})
                if rd.get("evalsha_usec_per_event") is not None and rc:
                    row("Redis time per event (us)", rd["evalsha_usec_per_event"], "",
                        "in scripts (EVALSHA); Redis CPU %.1f us/event" % (
                            1e6 * (rc.get("used_cpu_sys", 0) + rc.get("used_cpu_user", 0))
                            / t.get("messages", 1)))
            for ck, what in (("cpu_while_consuming", "CPU %% while consuming"),
                             ("cpu", "CPU %% whole phase")):
                cpu = r.get(ck)
                if not cpu:
                    continue
                row("%s: %s" % (label, what % ()), ", ".join(
                    "%s %s" % (n, v["cpu_pct"]) for n, v in cpu.items() if isinstance(v, dict)),
                    "", "other processes %s%% (of %d00%%)" % (cpu.get("other_processes_pct"),
                                                            os.cpu_count()))
        lv = res.get("live")
        if lv:
            row("latency finalize->wallet p50 (ms)", lv["p50_ms"], "",
                "at %s events/s (%sx of 1 worker)" % (lv["rate_events_per_s"],
                                                      lv["fraction_of_one_worker_rate"]))
            row("latency p90 (ms)", lv["p90_ms"])
            sp = lv.get("split", {})
            if sp.get("n"):
                a, b = sp["finalize_to_applied_ms"], sp["applied_to_wallet_ms"]
                row("  finalize -> applied in Redis p50/p99", "%s / %s" % (a["p50"], a["p99"]),
                    "", "consume + parse + apply script")
                row("  applied -> wallet receipt p50/p99", "%s / %s" % (b["p50"], b["p99"]),
                    "", "settler pick-up, claim, load, pricing, intent, HTTP")
            row("latency p99 (ms)", lv["p99_ms"], "< 25")
            row("latency p99.9 (ms)", lv["p999_ms"], "", "max %s ms, n=%s" % (lv["max_ms"],
                                                                             lv["measured"]))
            cpu = lv.get("cpu", {})
            row("live: CPU %", ", ".join("%s %s" % (n, v["cpu_pct"]) for n, v in cpu.items()
                                        if isinstance(v, dict)),
                "", "other processes %s%% (incl. the paced producer)" % cpu.get(
                    "other_processes_pct"))
        w = [max(len(str(x[i])) for x in rows + [("metric", "value", "target", "note")])
             for i in range(4)]
        fmt = "%%-%ds  %%%ds  %%-%ds  %%s" % (w[0], w[1], w[2])
        lines = [fmt % ("metric", "value", "target", "note"),
                 fmt % ("-" * w[0], "-" * w[1], "-" * w[2], "-" * 4)]
        lines += [fmt % tuple(str(x) for x in r) for r in rows]
        return "\n".join(lines)

    def size_topic(self):
        """Requests in the topic: BW_BENCH_REQUESTS, else what the wallet settles
        in about a minute with one worker's settle.concurrency connections
        (2,000 to 20,000), so that the whole run takes about 5 minutes."""
        if os.environ.get("BW_BENCH_REQUESTS"):
            return int(os.environ["BW_BENCH_REQUESTS"]), "BW_BENCH_REQUESTS"
        caps = {w["concurrency"]: w["rps"] for w in self.res.get("wallet_capacity", [])}
        rps = caps.get(self.concurrency) or caps.get(4)
        if not rps:
            return 20000, "default"
        n = int(min(20000, max(2000, round(rps * 60, -3))))
        return n, "wallet capacity %.0f calls/s x 60 s (clamped to 2,000..20,000)" % rps

    def run(self):
        if not self.bin.exists():
            sys.exit("no worker binary %s (build it: see docs/performance.md)" % self.bin)
        self.res["machine"] = self.machine()
        self.res["params"] = {"users": self.n_users, "seed": self.seed,
                              "partitions": self.partitions,
                              "settle_concurrency": self.concurrency,
                              "kafka_props": env("BW_BENCH_KAFKA_PROPS", ""),
                              "pricing": str(self.pricing_file), "bin": str(self.bin),
                              "phases": sorted(self.phases)}
        self.stack = Stack(keep=self.keep, events_partitions=self.partitions)
        with self.stack:
            self.stack.set_default_balance("1000000000")
            self.res["params"]["redis_appendfsync"] = self.stack.redis_config("appendfsync")
            fsync = env("BW_BENCH_REDIS_FSYNC", "")
            if fsync:  # diagnostic: what the AOF fsync policy costs
                self.stack.redis("CONFIG", "SET", "appendfsync", fsync)
                self.res["params"]["redis_appendfsync"] = fsync + " (BW_BENCH_REDIS_FSYNC)"
            meter = CpuMeter(self.component_pids())
            meter.start()
            time.sleep(5)
            self.res["idle_cpu"] = meter.stop()  # the stack doing nothing: the noise floor
            if "wallet" in self.phases:
                self.phase_wallet()
            self.n_requests, why = self.size_topic()
            self.res["params"]["requests"] = self.n_requests
            self.res["params"]["requests_from"] = why
            self.phase_topic()
            if "ceiling" in self.phases:
                self.phase_ceiling()
            if "one" in self.phases:
                self.res["one"] = self.run_workers(1, "one")
            if "two" in self.phases:
                self.res["two"] = self.run_workers(2, "two")
            if "live" in self.phases:
                self.phase_live()
            self.res["stack_dir"] = str(self.stack.dir)
        self.res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        table = self.table()
        self.res["table"] = table.splitlines()
        self.results_path.parent.mkdir(parents=True, exist_ok=True)
        self.results_path.write_text(json.dumps(self.res, indent=1, default=str) + "\n")
        print()
        print(table)
        print("\nresults: %s" % self.results_path)


# ---- profiling -------------------------------------------------------------------------------
class Profiler:
    """Profiles of the worker while it works through the backlog (one-worker
    phase), by BW_BENCH_PROFILE, a comma list of:

      perf    perf record -e cpu-clock with DWARF call graphs of the worker
              process: where its CPU time goes
      gdb     'poor man's profiler': gdb stack samples of every worker thread
              (wall clock: shows where the threads wait, which perf does not)
      system  perf record -a (every process, no call graphs): the CPU split
              between broker, Redis (and its Lua), wallet and worker
    """

    def __init__(self, bench, pid):
        self.b = bench
        self.pid = pid
        self.modes = set(bench.profile.split(","))
        self.dir = bench.profile_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs = []
        self.gdb_thread = None
        self.stop_flag = threading.Event()
        self.gdb_samples = []
        self.n_gdb = int(env("BW_BENCH_GDB_SAMPLES", 50))

    def start(self):
        if "perf" in self.modes:
            self.procs.append(subprocess.Popen(
                ["perf", "record", "-e", "cpu-clock", "-F", "499", "--call-graph", "dwarf,16384",
                 "-p", str(self.pid), "-o", str(self.dir / "perf.data")],
                stdout=subprocess.DEVNULL, stderr=open(self.dir / "perf-record.log", "wb")))
        if "system" in self.modes:
            self.procs.append(subprocess.Popen(
                ["perf", "record", "-e", "cpu-clock", "-F", "999", "-a",
                 "-o", str(self.dir / "perf-system.data")],
                stdout=subprocess.DEVNULL, stderr=open(self.dir / "perf-system.log", "wb")))
        if "gdb" in self.modes:
            self.gdb_thread = threading.Thread(target=self.gdb_loop, daemon=True)
            self.gdb_thread.start()

    def gdb_loop(self):
        time.sleep(0.5)
        for _ in range(self.n_gdb):
            if self.stop_flag.is_set():
                break
            p = subprocess.run(["gdb", "-p", str(self.pid), "-batch", "-nx",
                                "-ex", "set pagination off", "-ex", "thread apply all bt 30"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=60)
            self.gdb_samples.append(p.stdout.decode(errors="replace"))
            time.sleep(0.1)

    def stop(self):
        self.stop_flag.set()
        for p in self.procs:
            p.send_signal(signal.SIGINT)
            p.wait(300)
        if self.gdb_thread:
            self.gdb_thread.join(300)

    def perf_report(self, data, name, args):
        p = subprocess.run(["perf", "report", "-i", str(data), "--stdio"] + args,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=1800)
        (self.dir / name).write_bytes(p.stdout)
        return str(self.dir / name)

    def report(self):
        out = {}
        d = self.dir
        if "perf" in self.modes:
            data = d / "perf.data"
            for name, args in (
                    ("perf-dso.txt", ["--sort", "dso", "--no-children", "-g", "none"]),
                    ("perf-thread.txt", ["--sort", "pid", "--no-children", "-g", "none"]),
                    ("perf-symbol.txt", ["--sort", "dso,symbol", "--no-children", "-g", "none"]),
                    ("perf-children.txt", ["--sort", "symbol", "--children", "-g", "none"]),
                    ("perf-callers.txt", ["--sort", "symbol", "--no-children", "-g",
                                          "caller,0.5,callee,function,percent",
                                          "--percent-limit", "1.5"])):
                out[name] = self.perf_report(data, name, args)
        if "system" in self.modes:
            data = d / "perf-system.data"
            for name, args in (
                    ("system-comm.txt", ["--sort", "comm", "-g", "none"]),
                    ("system-dso.txt", ["--sort", "comm,dso", "-g", "none"]),
                    ("system-symbol.txt", ["--sort", "comm,dso,symbol", "-g", "none",
                                           "--percent-limit", "0.3"])):
                out[name] = self.perf_report(data, name, args)
        if "gdb" in self.modes:
            (d / "gdb-samples.txt").write_text("\n\n==== SAMPLE ====\n".join(self.gdb_samples))
            out["gdb_samples"] = len(self.gdb_samples)
            out["gdb_summary"] = summarize_gdb(self.gdb_samples)
            (d / "gdb-summary.json").write_text(json.dumps(out["gdb_summary"], indent=1))
        return out


def summarize_gdb(samples):
    """Per thread role, how many samples found it in each state."""
    roles = {}
    for s in samples:
        for th in re.split(r"\n(?=Thread \d+ )", s):
            m = re.match(r'Thread \d+ \(Thread 0x[0-9a-f]+ \(LWP \d+\) "([^"]*)"\)', th)
            if not m:
                continue
            tname = m.group(1)
            frames = re.findall(r"#\d+\s+(?:0x[0-9a-f]+ in )?([\w.@]+) \(", th)
            names = " ".join(frames)
            if tname.startswith("rdk:"):
                role = "librdkafka " + tname.split(":")[1].rstrip("-0123456789")
            elif tname.startswith("MHD"):
                role = "http server"
            elif "bw_worker_run" in names:
                role = "consumer"
            elif "settler_main" in names:
                role = "settler"
            else:
                role = "other"
            state = classify_frames(frames)
            roles.setdefault(role, {}).setdefault(state, 0)
            roles[role][state] += 1
    return {r: dict(sorted(v.items(), key=lambda kv: -kv[1])) for r, v in sorted(roles.items())}


def classify_frames(frames):
    f = " ".join(frames)
    for pat, name in (("bw_store_apply", "redis apply (EVALSHA)"),
                      ("bw_store_claim_due", "redis claim"),
                      ("bw_store_load", "redis load"),
                      ("bw_store_put_intent", "redis intent"),
                      ("bw_store_complete", "redis complete"),
                      ("bw_store_outbox_done", "redis outbox delete (delivery callback)"),
                      ("bw_store_outbox_due", "redis outbox scan"),
                      ("bw_store_due_count", "redis gauges"),
                      ("bw_store_overdue_count", "redis gauges"),
                      ("bw_settle_charge", "wallet HTTP"),
                      ("bw_event_parse", "parse events"),
                      ("bw_pricing_price", "pricing"),
                      ("bw_record", "record JSON"),
                      ("json_", "JSON (jansson)"),
                      ("bw_publish", "kafka produce"),
                      ("bw_log", "logging"),
                      ("rd_kafka_consumer_poll", "kafka poll"),
                      ("rd_kafka_message_destroy", "kafka message destroy"),
                      ("store_offsets", "offsets store"),
                      ("sleep_ms", "idle sleep"),
                      ("nanosleep", "idle sleep")):
        if pat in f:
            if name.startswith("redis"):
                if "redisBufferRead" in f or "redisGetReply" in f and "read" in f:
                    name += ": waiting for the reply"
                elif "redisBufferWrite" in f:
                    name += ": sending"
                else:
                    name += ": client CPU"
            elif name == "wallet HTTP":
                if "poll" in f or "Curl_poll" in f:
                    name += ": waiting"
            return name
    if frames and ("futex" in frames[0] or "cond" in f):
        return "waiting on a condition"
    if frames and frames[0] in ("__GI___poll", "__GI___select", "__poll", "epoll_wait"):
        return "waiting in poll"
    return frames[0] if frames else "?"


if __name__ == "__main__":
    Bench().run()

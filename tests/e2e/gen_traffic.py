#!/usr/bin/env python3
"""Generate realistic agent billing traffic as JSON lines (event schema v1).

Each request (one chat turn) is a few model calls and tool calls followed by a
request_finalize marker with the expected counts; requests of many users are
interleaved the way a fleet of agents would publish them, each request's own
events staying in order. Deterministic for a given --seed.

  python3 tests/e2e/gen_traffic.py --requests 200 --users 25 --seed 7 > traffic.jsonl

Models and usage shapes (PRODUCT.md section 3):
  gpt-4o, gpt-4o-mini       OpenAI Chat usage: prompt_tokens INCLUDES
                            prompt_tokens_details.cached_tokens (multiples of 128)
  o3-mini                   OpenAI Chat with completion_tokens_details.reasoning_tokens,
                            or (one call in three) the OpenAI Responses shape
  claude-sonnet-4-20250514  Anthropic native usage: input_tokens EXCLUDES
                            cache_read_input_tokens / cache_creation_input_tokens
Tools: web_search (units = queries, 1-3), code_exec (1 unit, longer duration).

Options add the untidy parts of real traffic: --dup-rate re-sends events
(client retries, same event_id), --idempotency-rate gives tool calls a stable
idempotency_key (the provider's tool-call id) and re-sends some of those under
a new event_id, --error-rate marks calls failed, --no-expected-rate sends
finalize markers without `expected`, --cloudevents-rate wraps events as
CloudEvents 1.0, --malformed N adds N invalid events (for the dead-letter
topic) that belong to no request. --summary FILE writes one JSON line per
request (request_id, user_id, distinct model and tool calls, tokens).
"""

import argparse
import json
import random
import sys
import uuid
from datetime import datetime, timedelta, timezone

MODELS = [
    # (model, provider, weight)
    ("gpt-4o", "openai", 30),
    ("gpt-4o-mini", "openai", 35),
    ("claude-sonnet-4-20250514", "anthropic", 25),
    ("o3-mini", "openai", 10),
]
TOOLS = [("web_search", 70), ("code_exec", 30)]
NODES = ["PlannerNode", "ReasonNode", "ToolNode", "ResponseNode"]


class Gen:
    def __init__(self, args):
        self.a = args
        self.rng = random.Random(args.seed)
        self.t0 = datetime.fromisoformat(args.start_time.replace("Z", "+00:00"))

    def uuid(self):
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def pick(self, table):
        return self.rng.choices([t[:-1] for t in table], weights=[t[-1] for t in table])[0]

    def ts(self, ms):
        """Alternate the two accepted timestamp forms."""
        t = self.t0 + timedelta(milliseconds=ms)
        if self.rng.random() < 0.5:
            return int(t.timestamp() * 1000)
        return t.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (t.microsecond // 1000)

    # -- usage shapes --
    def usage(self, model, turn):
        r = self.rng
        if model.startswith("claude"):
            # Anthropic: a long cached system prompt read on later turns; the first
            # turn writes it to the cache.
            cache_read = r.randint(2000, 12000) if turn > 0 else 0
            cache_write = r.randint(1500, 6000) if turn == 0 else r.choice([0, 0, r.randint(200, 900)])
            return {"input_tokens": r.randint(50, 2500),
                    "cache_read_input_tokens": cache_read,
                    "cache_creation_input_tokens": cache_write,
                    "output_tokens": r.randint(40, 1200)}
        prompt = r.randint(300, 9000)
        cached = 0
        if prompt > 1024 and r.random() < 0.6:
            cached = min(prompt - prompt % 128, 128 * r.randint(8, prompt // 128))
        if model == "o3-mini":
            reasoning = r.randint(64, 4000)
            output = reasoning + r.randint(20, 800)
            if r.random() < 1 / 3:  # OpenAI Responses shape
                return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                        "output_tokens": output,
                        "output_tokens_details": {"reasoning_tokens": reasoning},
                        "total_tokens": prompt + output}
        else:
            reasoning = 0
            output = r.randint(20, 1500) if model == "gpt-4o" else r.randint(10, 700)
        return {"prompt_tokens": prompt, "completion_tokens": output,
                "total_tokens": prompt + output,
                "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0}}

    # -- one request --
    def request(self, idx, user, session, org):
        r = self.rng
        a = self.a
        rid = "%sreq-%05d-%s" % (a.id_prefix, idx, self.uuid()[:8])
        common = {"request_id": rid, "user_id": user, "session_id": session}
        if org:
            common["org_id"] = org
        model, provider = self.pick(MODELS)
        n_model = r.choice([1, 1, 2, 2, 3, 3, 4, 5, 6])
        n_tool = r.choice([0, 0, 1, 1, 2, 3]) if n_model > 1 else r.choice([0, 0, 1])
        # Tools run between model calls: a plan/act/respond shape.
        steps = ["model"] * n_model
        for _ in range(n_tool):
            steps.insert(r.randint(1, max(1, len(steps) - 1)), "tool")
        events, ms, turn = [], idx * 1500 + r.randint(0, 900), 0
        summary = {"request_id": rid, "user_id": user, "model_calls": 0, "tool_calls": 0,
                   "model": model, "tokens": {}}
        for step in steps:
            ms += r.randint(200, 6000)
            ev = {"event_id": self.uuid(), **common, "timestamp": self.ts(ms)}
            failed = r.random() < a.error_rate
            if step == "model":
                ev.update({"type": "custom_model_call", "model": model, "provider": provider,
                           "node_name": NODES[min(turn, len(NODES) - 1)] if turn < len(steps) - 1
                           else "ResponseNode"})
                if failed:
                    ev["status"] = "error"
                    if r.random() < 0.5:  # a failed call may still report prompt usage
                        ev["usage"] = self.usage(model, turn)
                else:
                    ev["status"] = "completed"
                    ev["usage"] = self.usage(model, turn)
                    for k, v in ev["usage"].items():
                        if isinstance(v, int):
                            summary["tokens"][k] = summary["tokens"].get(k, 0) + v
                summary["model_calls"] += 1
                turn += 1
            else:
                tool = self.pick(TOOLS)[0]
                ev.update({"type": "custom_tool_call", "tool_name": tool,
                           "status": "error" if failed else "completed"})
                if tool == "web_search":
                    ev["units"] = r.choice([1, 1, 1, 2, 3])
                    ev["duration_ms"] = r.randint(300, 2500)
                else:
                    ev["units"] = 1
                    ev["duration_ms"] = r.randint(800, 20000)
                if r.random() < a.idempotency_rate:
                    ev["idempotency_key"] = "call_" + self.uuid().replace("-", "")[:24]
                summary["tool_calls"] += 1
            events.append(ev)
        ms += r.randint(50, 500)
        fin = {"type": "request_finalize", "event_id": self.uuid(), **common,
               "timestamp": self.ts(ms),
               "status": r.choices(["completed", "error", "cancelled"], [94, 4, 2])[0]}
        if r.random() >= a.no_expected_rate:
            fin["expected"] = {"model_calls": summary["model_calls"],
                               "tool_calls": summary["tool_calls"]}
        events.append(fin)
        events = self.add_duplicates(events)
        return [self.maybe_cloudevent(e) for e in events], summary

    def add_duplicates(self, events):
        """Client retries: the same event again (same event_id), or a tool call
        re-sent under a new event_id with the same idempotency_key. Both must
        count once. Inserted after the original, possibly after the finalize."""
        r = self.rng
        out = list(events)
        for ev in events:
            if r.random() >= self.a.dup_rate:
                continue
            dup = dict(ev)
            if "idempotency_key" in ev and r.random() < 0.5:
                dup["event_id"] = self.uuid()
            pos = out.index(ev) + 1 + r.randint(0, 2)
            out.insert(min(pos, len(out)), dup)
        return out

    def maybe_cloudevent(self, ev):
        if self.rng.random() >= self.a.cloudevents_rate:
            return ev
        data = {k: v for k, v in ev.items() if k not in ("type", "event_id")}
        return {"specversion": "1.0", "id": ev["event_id"],
                "type": "com.example.agent.billing." + ev["type"],
                "source": "/agents/%s" % self.rng.choice(["chat", "research", "coder"]),
                "datacontenttype": "application/json", "data": data}

    def malformed(self, n):
        """Invalid events, each in its own request, for the dead-letter topic."""
        r = self.rng
        out = []
        for i in range(n):
            rid = "%sbad-%03d" % (self.a.id_prefix, i)
            kind = i % 5
            if kind == 0:  # a count written as a real
                out.append({"type": "custom_model_call", "event_id": self.uuid(),
                            "request_id": rid, "user_id": "u-bad", "model": "gpt-4o",
                            "usage": {"prompt_tokens": 1000.0, "completion_tokens": 10}})
            elif kind == 1:  # no user_id
                out.append({"type": "custom_tool_call", "event_id": self.uuid(),
                            "request_id": rid, "tool_name": "web_search"})
            elif kind == 2:  # unknown type
                out.append({"type": "custom_chain_call", "event_id": self.uuid(),
                            "request_id": rid, "user_id": "u-bad"})
            elif kind == 3:  # not JSON at all
                out.append('{"type": "custom_model_call", "event_id": "%s", "request_id": "%s"'
                           % (self.uuid(), rid))
            else:  # cached tokens above the prompt
                out.append({"type": "custom_model_call", "event_id": self.uuid(),
                            "request_id": rid, "user_id": "u-bad", "model": "gpt-4o-mini",
                            "usage": {"prompt_tokens": 100, "completion_tokens": 5,
                                      "prompt_tokens_details": {"cached_tokens": 512}}})
        r.shuffle(out)
        return out

    def run(self):
        a, r = self.a, self.rng
        users = ["%su-%04d" % (a.user_prefix, i + 1) for i in range(a.users)]
        # A few heavy users, many light ones (Zipf-like).
        weights = [1.0 / (i + 1) ** 0.8 for i in range(a.users)]
        sessions = {u: "s-" + self.uuid()[:12] for u in users}
        orgs = {u: ("org-%02d" % (i % 5 + 1) if i % 3 else None) for i, u in enumerate(users)}
        per_request, summaries = [], []
        for i in range(a.requests):
            u = r.choices(users, weights)[0]
            evs, summ = self.request(i + 1, u, sessions[u], orgs[u])
            per_request.append(evs)
            summaries.append(summ)
        # Interleave: up to --concurrency requests in flight at a time, each
        # emitting its events in order.
        stream, active, queue = [], [], list(per_request)
        while queue or active:
            while queue and len(active) < a.concurrency:
                active.append(list(queue.pop(0)))
            cur = r.choice(active)
            stream.append(cur.pop(0))
            if not cur:
                active.remove(cur)
        bad = self.malformed(a.malformed)
        for ev in bad:
            stream.insert(r.randint(0, len(stream)), ev)
        return stream, summaries


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dup-rate", type=float, default=0.05,
                    help="share of events sent twice [0.05]")
    ap.add_argument("--idempotency-rate", type=float, default=0.3,
                    help="share of tool calls with an idempotency_key [0.3]")
    ap.add_argument("--error-rate", type=float, default=0.03, help="failed calls [0.03]")
    ap.add_argument("--no-expected-rate", type=float, default=0.1,
                    help="finalize markers without expected counts [0.1]")
    ap.add_argument("--cloudevents-rate", type=float, default=0.0,
                    help="events wrapped as CloudEvents [0]")
    ap.add_argument("--malformed", type=int, default=0, help="invalid events to add [0]")
    ap.add_argument("--concurrency", type=int, default=8,
                    help="requests interleaved at a time [8]")
    ap.add_argument("--id-prefix", default="", help="prefix of request ids (unique runs)")
    ap.add_argument("--user-prefix", default="", help="prefix of user ids")
    ap.add_argument("--start-time", default="2026-12-01T09:00:00Z")
    ap.add_argument("--summary", help="write one JSON line per request to this file")
    args = ap.parse_args()
    stream, summaries = Gen(args).run()
    out = sys.stdout
    for ev in stream:
        out.write(ev if isinstance(ev, str) else json.dumps(ev, separators=(",", ":")))
        out.write("\n")
    if args.summary:
        with open(args.summary, "w") as f:
            for s in summaries:
                f.write(json.dumps(s, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()

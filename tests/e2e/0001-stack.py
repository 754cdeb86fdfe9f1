#!/usr/bin/env python3
"""0001-stack: the local stack itself, without billing-worker.

Kafka (topics, produce/consume round trip, keys and partitioner), Redis (AOF
durability settings, restart keeps data) and the reference wallet and user
services (idempotency, faults, 402, shared ledger, path handling). Every later
e2e test relies on these. --bin is accepted (ctest passes it) and ignored.
"""

import http.client
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bwtest  # noqa: E402
from bwtest import Checks, Stack, http_request  # noqa: E402


def kafka_round_trip(t, stack):
    events = [bwtest.model_call("r-0001", "u1", node_name="ReasonNode"),
              bwtest.tool_call("r-0001", "u1", units=2),
              bwtest.finalize("r-0001", "u1", expected=(1, 1))]
    t.eq(stack.produce(events), 3, "produced 3 events")
    msgs = stack.wait_messages(stack.events_topic, 3, timeout=30)
    t.eq(len(msgs), 3, "consumed 3 events back")
    t.eq([m.key for m in msgs], [b"r-0001"] * 3, "keys are the request_id")
    t.eq(len({m.partition for m in msgs}), 1, "one request's events share a partition")
    t.eq([m.json()["event_id"] for m in msgs], [e["event_id"] for e in events],
         "events in produce order")
    t.check(all(m.timestamp > 0 for m in msgs), "records carry a timestamp")
    desc = stack.describe_topic(stack.events_topic)
    t.check("message.timestamp.type=LogAppendTime" in desc,
            "events topic uses LogAppendTime", desc)
    t.check("PartitionCount: 4" in desc, "events topic has 4 partitions", desc)

    # Raw payloads are sent byte for byte: tabs, newlines, invalid UTF-8, no key.
    raw = [b'{"type":"custom_model_call",\n"x":"a\tb"}', b"not json\x00\xff\xfe", b"\t\n"]
    stack.produce(raw, topic=stack.dlq_topic)
    got = stack.wait_messages(stack.dlq_topic, 3, timeout=30)
    t.eq(sorted(m.value for m in got), sorted(raw), "raw payloads round-trip exactly")
    t.check(all(m.key is None for m in got), "raw payloads without request_id have no key")
    stack.produce([b"x1"], topic=stack.dlq_topic, key="k\twith tab")
    got = stack.wait_messages(stack.dlq_topic, 4, timeout=30)
    t.check(any(m.key == b"k\twith tab" and m.value == b"x1" for m in got),
            "explicit keys with tabs round-trip")

    # murmur2_random: the partition of a key is the Java client's murmur2 one,
    # so keys spread over partitions and stay put.
    many = [bwtest.model_call("req-%03d" % i, "u2") for i in range(40)]
    stack.produce(many)
    msgs = stack.wait_messages(stack.events_topic, 43, timeout=30)
    parts = {}
    for m in msgs:
        parts.setdefault(m.key, set()).add(m.partition)
    t.check(len({p for ps in parts.values() for p in ps}) == 4, "40 keys use all 4 partitions")
    t.eq(murmur2_partition(b"req-007", 4), next(iter(parts[b"req-007"])),
         "partition matches the Java client's murmur2")


def murmur2_partition(key, n):
    """Kafka's Java default partitioner for a keyed record."""
    data = bytearray(key)
    length = len(data)
    seed, m, r = 0x9747B28C, 0x5BD1E995, 24
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(length // 4):
        k = int.from_bytes(data[i * 4:i * 4 + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    rest = length % 4
    tail = length & ~3
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return (h & 0x7FFFFFFF) % n


def redis_checks(t, stack):
    t.eq(stack.redis("PING"), "PONG", "redis answers")
    t.eq(stack.redis_config("appendonly"), "yes", "redis AOF on")
    t.eq(stack.redis_config("appendfsync"), "always", "redis appendfsync always")
    t.eq(stack.redis_config("save"), "", "redis RDB snapshots off")
    t.eq(stack.redis_config("bind"), "127.0.0.1", "redis bound to 127.0.0.1")
    stack.redis("SET", "bwtest:k", "v1")
    stack.kill("redis", "KILL")  # a crash: only the AOF can keep the write
    t.check(not stack.status(), "status reports the killed redis")
    stack.start()
    t.eq(stack.redis("GET", "bwtest:k"), "v1", "a write survives kill -9 of redis (AOF)")
    t.check(stack.status(), "status: all running after restart")


def wallet_checks(t, stack):
    stack.reset()
    # Idempotency: the same key twice -> one ledger entry, the same answer.
    s1, b1 = stack.wallet_post("u1", "5.0000", key="bw:r1")
    s2, b2 = stack.wallet_post("u1", "5.0000", key="bw:r1")
    t.eq((s1, s2), (200, 200), "consume answers 200 twice")
    t.check(b1 == b2 and b1["transaction_id"].startswith("t-"),
            "repeat returns the first outcome (same transaction_id)", (b1, b2))
    t.eq(b1["balance"], bwtest.Decimal("995.0000"), "balance 1000 - 5.0000, exact")
    led = stack.ledger()
    t.eq(len(led), 1, "one ledger entry for one key")
    t.eq((led[0]["key"], led[0]["amount"], led[0]["via"], led[0]["user_id"]),
         ("bw:r1", "5.0000", "wallet", "u1"), "ledger entry: key, exact amount, via, user")
    s3, b3 = stack.wallet_post("u1", "7.0000", key="bw:r1")
    t.check(s3 == 200 and b3 == b1 and len(stack.ledger()) == 1,
            "same key, different amount: first outcome, nothing applied")
    t.eq(stack.stats()["key_conflicts"], 1, "the conflicting repeat is counted")

    # 503 fault with Retry-After, then normal again.
    stack.fault("wallet", "status", status=503, count=1, retry_after=2)
    status, hdrs, _ = http_request("POST", stack.wallet_url + "/api/v1/users/u1/credits/consume",
                                   body={"amount": 1}, headers={"Idempotency-Key": "bw:r2"})
    t.eq((status, hdrs.get("retry-after")), (503, "2"), "fault: 503 with Retry-After")
    t.eq(len(stack.ledger()), 1, "the 503 applied nothing")
    s, b = stack.wallet_post("u1", "1.0000", key="bw:r2")
    t.check(s == 200 and len(stack.ledger()) == 2, "after count=1 the key applies normally",
            (s, b))

    # 402: balance below the amount; recorded as the key's outcome.
    stack.set_balance("poor", "3")
    s, b = stack.wallet_post("poor", "5.0000", key="bw:r3")
    t.eq((s, b), (402, {"detail": "Insufficient credits"}), "402 Insufficient credits")
    stack.set_balance("poor", "100")
    s, b = stack.wallet_post("poor", "5.0000", key="bw:r3")
    t.eq(s, 402, "a repeated key keeps its first outcome (402)")
    s, b = stack.wallet_post("poor", "5.0000", key="bw:r3b")
    t.eq(s, 200, "a new key is charged once the balance suffices")
    stack.fault("wallet", "status", status=402, count=1)
    s, b = stack.wallet_post("poor", "1", key="bw:r3c")
    t.eq((s, b), (402, {"detail": "Insufficient credits"}), "injected 402 has the real body")

    # User service: records, consume on the same ledger, shared key namespace.
    status, _, data = http_request("POST", stack.user_url + "/api/v1/usage/records",
                                   body={"user_id": "u2", "request_id": "r4",
                                         "credits_charged": 2},
                                   headers={"Idempotency-Key": "bw:r4"})
    rec = bwtest.loads(data)
    t.check(status == 200 and rec["success"] and isinstance(rec["data"]["id"], int),
            "usage record created", rec)
    status, _, data2 = http_request("POST", stack.user_url + "/api/v1/usage/records",
                                    body={"user_id": "u2"}, headers={"Idempotency-Key": "bw:r4"})
    t.eq(bwtest.loads(data2), rec, "usage records are idempotent by key")
    s, b = stack.wallet_post("u2", "2.0000", key="bw:r4", service="user",
                             body='{"amount": 2.0000, "usage_record_id": %d}'
                                  % rec["data"]["id"])
    led = stack.ledger()
    t.check(s == 200 and led[-1]["via"] == "user_service" and led[-1]["user_id"] == "u2",
            "user service consume charges the shared ledger via user_service", (s, b))
    s2, b2 = stack.wallet_post("u2", "2.0000", key="bw:r4")
    t.check(s2 == 200 and b2 == b and len(stack.ledger()) == len(led),
            "the wallet answers a key applied by the user service with its first outcome")
    s3, b3 = stack.wallet_post("u1", "1.0000", key="bw:r2", service="user")
    t.check(s3 == 200 and len(stack.ledger()) == len(led),
            "the user service never re-applies a wallet key")
    t.eq(stack.balances()["users"]["u2"], "998.0000", "u2 charged exactly once")

    # Paths: user_id percent-decoded, '..' never collapsed.
    s, _ = stack.wallet_post("a/b c..%", "1", key="bw:r5")
    t.check(s == 200 and stack.ledger()[-1]["user_id"] == "a/b c..%",
            "percent-encoded user_id decoded exactly")
    status, _, _ = http_request("POST", stack.wallet_url + "/api/v1/users/../credits/consume",
                                body={"amount": 1}, headers={"Idempotency-Key": "bw:r6"})
    t.check(status == 200 and stack.ledger()[-1]["user_id"] == "..",
            "'..' as a user_id reaches the wallet as-is")

    # Connection faults.
    stack.fault("wallet", "refuse")
    try:
        http_request("POST", stack.wallet_url + "/api/v1/users/u1/credits/consume",
                     body={"amount": 1}, timeout=3)
        refused = False
    except ConnectionRefusedError:
        refused = True
    t.check(refused, "refuse: connections refused")
    stack.clear_faults("wallet")
    s, _ = stack.wallet_post("u1", "1", key="bw:r7")
    t.eq(s, 200, "after clearing refuse the wallet listens again")

    n = len(stack.ledger())
    stack.fault("wallet", "drop_before", count=1)
    try:
        stack.wallet_post("u1", "1", key="bw:r8")
        dropped = False
    except (OSError, http.client.HTTPException):
        dropped = True
    t.check(dropped and len(stack.ledger()) == n, "drop_before: no answer, nothing applied")
    stack.fault("wallet", "apply_then_drop", count=1)
    try:
        stack.wallet_post("u1", "1", key="bw:r9")
        dropped = False
    except (OSError, http.client.HTTPException):
        dropped = True
    t.check(dropped and len(stack.ledger()) == n + 1,
            "apply_then_drop: no answer, but applied")
    s, b = stack.wallet_post("u1", "1", key="bw:r9")
    t.check(s == 200 and len(stack.ledger()) == n + 1,
            "retrying the dropped key gets the applied outcome", (s, b))

    calls = stack.calls()
    t.check(len(calls) >= 15 and all("path" in c and "status" in c for c in calls),
            "calls log records every call", len(calls))
    stack.reset()
    t.check(stack.ledger() == [] and stack.calls() == [], "reset clears ledger and calls")


def main():
    args = bwtest.parse_args()
    t = Checks()
    try:
        with Stack(keep=args.keep) as stack:
            t.check(stack.status(), "stack.sh status: all running")
            t.run("kafka round trip", kafka_round_trip, t, stack)
            t.run("redis", redis_checks, t, stack)
            t.run("reference services", wallet_checks, t, stack)
    except Exception as e:  # noqa: BLE001
        t.check(False, "stack start/stop", repr(e))
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())

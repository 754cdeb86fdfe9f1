/*
 * test_store.c - the Redis store against a real redis-server that the test
 * starts on its own port (never the machine's 6379).
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "bw_store.h"

/* BW_TEST_REDIS_CLUSTER=1: the same tests against a 3-master Redis Cluster. */
#define N_CLUSTER 3

static int cluster_mode;
static pid_t redis_pids[N_CLUSTER];
static int redis_ports[N_CLUSTER];
static int n_servers;
static int redis_port;
static char redis_dir[64];
static int db_counter;

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Run a shell command, return its first output line (static buffer). */
static const char *sh(const char *fmt, ...)
{
    static char line[4096];
    char cmd[1024];
    va_list ap;
    FILE *f;

    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    line[0] = '\0';
    f = popen(cmd, "r");
    if (!f)
        return line;
    if (!fgets(line, sizeof(line), f))
        line[0] = '\0';
    while (fgetc(f) != EOF)
        ;
    pclose(f);
    line[strcspn(line, "\r\n")] = '\0';
    return line;
}

static int start_server(int i, int port)
{
    char p[16], dir[96], conf[64];

    snprintf(p, sizeof(p), "%d", port);
    snprintf(dir, sizeof(dir), "%s/%d", redis_dir, port);
    snprintf(conf, sizeof(conf), "nodes-%d.conf", port);
    if (mkdir(dir, 0700) < 0)
        return -1;
    redis_ports[i] = port;
    redis_pids[i] = fork();
    if (redis_pids[i] == 0) {
        if (cluster_mode)
            execlp("redis-server", "redis-server", "--port", p, "--bind", "127.0.0.1", "--dir", dir,
                   "--save", "", "--appendonly", "no", "--loglevel", "warning", "--cluster-enabled",
                   "yes", "--cluster-config-file", conf, "--cluster-node-timeout", "5000",
                   (char *)NULL);
        else
            execlp("redis-server", "redis-server", "--port", p, "--bind", "127.0.0.1", "--dir", dir,
                   "--save", "", "--appendonly", "no", "--loglevel", "warning", (char *)NULL);
        _exit(127);
    }
    for (int k = 0; k < 100; k++) {
        if (strcmp(sh("redis-cli -p %d ping 2>/dev/null", port), "PONG") == 0)
            return 0;
        sleep_ms(50);
    }
    return -1;
}

static int start_redis(void **state)
{
    const char *env = getenv("BW_TEST_REDIS_CLUSTER");

    cluster_mode = env && strcmp(env, "1") == 0;
    n_servers = cluster_mode ? N_CLUSTER : 1;
    snprintf(redis_dir, sizeof(redis_dir), "/tmp/bw-test-store-XXXXXX");
    if (!mkdtemp(redis_dir))
        return -1;
    /* A cluster node's bus port is its port + 10000, so cluster ports stay
     * at or below 55535; the two ranges do not overlap. */
    redis_port = cluster_mode ? 41000 + (getpid() % 4800) * 3 : 20000 + (getpid() % 20000);
    for (int i = 0; i < n_servers; i++)
        if (start_server(i, redis_port + i) < 0)
            return -1;
    if (cluster_mode) {
        int ok = 0;
        sh("redis-cli --cluster create 127.0.0.1:%d 127.0.0.1:%d 127.0.0.1:%d "
           "--cluster-replicas 0 --cluster-yes >/dev/null 2>&1; echo done",
           redis_ports[0], redis_ports[1], redis_ports[2]);
        for (int k = 0; k < 200 && ok < N_CLUSTER; k++) {
            ok = 0;
            for (int i = 0; i < N_CLUSTER; i++)
                ok += strcmp(sh("redis-cli -p %d cluster info | grep -c 'cluster_state:ok'",
                                redis_ports[i]),
                             "1") == 0;
            sleep_ms(50);
        }
        if (ok < N_CLUSTER)
            return -1;
    }
    return 0;
}

static int stop_redis(void **state)
{
    char cmd[128];
    for (int i = 0; i < n_servers; i++) {
        if (redis_pids[i] <= 0) /* never started: kill(0) would hit our group */
            continue;
        kill(redis_pids[i], SIGTERM);
        waitpid(redis_pids[i], NULL, 0);
    }
    snprintf(cmd, sizeof(cmd), "rm -rf %s", redis_dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* Each test gets its own database (a cluster has only db 0: it is emptied),
 * so the tests cannot see each other. */
static bw_store *new_store(int64_t rto, int64_t grace)
{
    char url[128], err[256];
    bw_store_timers t = {rto, grace, 60000, 2000};
    bw_store *st;

    if (cluster_mode) {
        for (int i = 0; i < N_CLUSTER; i++)
            sh("redis-cli -p %d flushall", redis_ports[i]);
        snprintf(url, sizeof(url), "redis+cluster://127.0.0.1:%d", redis_port);
    } else {
        snprintf(url, sizeof(url), "redis://127.0.0.1:%d/%d", redis_port, ++db_counter);
    }
    st = bw_store_new(url, &t, err, sizeof(err));
    assert_non_null(st);
    assert_int_equal(bw_store_is_cluster(st), cluster_mode);
    assert_int_equal(bw_store_ping(st), 0);
    return st;
}

static bw_event model(const char *rid, const char *user, const char *eid, const char *name,
                      uint64_t in, uint64_t out)
{
    bw_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.type = BW_EV_MODEL;
    snprintf(ev.event_id, sizeof(ev.event_id), "%s", eid);
    snprintf(ev.request_id, sizeof(ev.request_id), "%s", rid);
    snprintf(ev.user_id, sizeof(ev.user_id), "%s", user);
    snprintf(ev.name, sizeof(ev.name), "%s", name);
    ev.usage_shape = BW_USAGE_NATIVE;
    ev.usage.input = in;
    ev.usage.output = out;
    return ev;
}

static bw_event tool(const char *rid, const char *user, const char *eid, const char *name)
{
    bw_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.type = BW_EV_TOOL;
    snprintf(ev.event_id, sizeof(ev.event_id), "%s", eid);
    snprintf(ev.request_id, sizeof(ev.request_id), "%s", rid);
    snprintf(ev.user_id, sizeof(ev.user_id), "%s", user);
    snprintf(ev.name, sizeof(ev.name), "%s", name);
    ev.units = 1;
    return ev;
}

static bw_event finalize(const char *rid, const char *user, const char *eid, int has_expected,
                         uint64_t xm, uint64_t xt)
{
    bw_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.type = BW_EV_FINALIZE;
    snprintf(ev.event_id, sizeof(ev.event_id), "%s", eid);
    snprintf(ev.request_id, sizeof(ev.request_id), "%s", rid);
    snprintf(ev.user_id, sizeof(ev.user_id), "%s", user);
    snprintf(ev.final_status, sizeof(ev.final_status), "completed");
    ev.has_expected = has_expected;
    ev.expected_model_calls = xm;
    ev.expected_tool_calls = xt;
    return ev;
}

static void apply(bw_store *st, bw_event *evs, size_t n, int *results)
{
    bw_event *ptrs[32];
    char err[256];
    for (size_t i = 0; i < n; i++)
        ptrs[i] = &evs[i];
    assert_int_equal(bw_store_apply(st, ptrs, n, results, err, sizeof(err)), 0);
}

static int claim(bw_store *st, char ***rids)
{
    return bw_store_claim_due(st, 10, rids);
}

/* Duplicates within one batch and across batches count once; the first payload wins. */
static void test_dedup_and_user_mismatch(void **state)
{
    bw_store *st = new_store(60000, 5000);
    bw_event evs[6];
    int res[6];
    bw_claim c;
    char **rids;

    evs[0] = model("r1", "u1", "e1", "gpt-4o", 10, 5);
    evs[1] = model("r1", "u1", "e1", "gpt-4o", 10, 5);    /* same key, same payload */
    evs[2] = model("r1", "u1", "e1", "gpt-4o", 999, 999); /* same key, other payload */
    evs[3] = tool("r1", "u2", "e2", "web_search");        /* another user */
    evs[4] = tool("r1", "u1", "e3", "web_search");
    evs[5] = finalize("r1", "u1", "e4", 1, 1, 1);
    apply(st, evs, 6, res);
    assert_int_equal(res[0], BW_APPLY_NEW);
    assert_int_equal(res[1], BW_APPLY_DUP);
    assert_int_equal(res[2], BW_APPLY_DUP_CONFLICT);
    assert_int_equal(res[3], BW_APPLY_USER_MISMATCH);
    assert_int_equal(res[4], BW_APPLY_NEW);
    assert_int_equal(res[5], BW_APPLY_NEW);

    /* A redelivery of the whole batch changes nothing. */
    apply(st, evs, 6, res);
    assert_int_equal(res[0], BW_APPLY_DUP);
    assert_int_equal(res[4], BW_APPLY_DUP);
    assert_int_equal(res[5], BW_APPLY_DUP);

    /* expected {1 model, 1 tool} met: due at once. */
    assert_int_equal(claim(st, &rids), 1);
    assert_string_equal(rids[0], "r1");
    assert_int_equal(bw_store_load(st, rids[0], &c), 1);
    assert_int_equal(c.gen, 0);
    assert_string_equal(c.finalize, "expected_met");
    assert_string_equal(c.user_id, "u1");
    assert_int_equal(c.n_calls, 2);
    /* The first payload of e1 is the one kept: 10 in, 5 out. */
    for (size_t i = 0; i < c.n_calls; i++) {
        if (c.calls[i].type == BW_EV_MODEL) {
            assert_string_equal(c.calls[i].name, "gpt-4o");
            assert_int_equal(c.calls[i].usage.input, 10);
            assert_int_equal(c.calls[i].usage.output, 5);
            assert_true(c.calls[i].has_usage);
        } else {
            assert_string_equal(c.calls[i].name, "web_search");
            assert_int_equal(c.calls[i].units, 1);
        }
    }
    assert_null(c.intent);
    bw_claim_free(&c);
    bw_store_free_strings(rids, 1);
    bw_store_destroy(st);
}

/* The idempotency key is the dedup key when present. */
static void test_idempotency_key_dedup(void **state)
{
    bw_store *st = new_store(60000, 5000);
    bw_event evs[2];
    int res[2];

    evs[0] = tool("r1", "u1", "e1", "web_search");
    evs[1] = tool("r1", "u1", "e2", "web_search"); /* a resend with a new event_id */
    snprintf(evs[0].idempotency_key, sizeof(evs[0].idempotency_key), "call_abc");
    snprintf(evs[1].idempotency_key, sizeof(evs[1].idempotency_key), "call_abc");
    apply(st, evs, 2, res);
    assert_int_equal(res[0], BW_APPLY_NEW);
    assert_int_equal(res[1], BW_APPLY_DUP);
    bw_store_destroy(st);
}

/* Finalize timers: marker -> at once; expected unmet -> after the grace; none -> timeout. */
static void test_finalize_timers(void **state)
{
    bw_store *st = new_store(1000, 300); /* request_timeout 1 s, finalize_grace 300 ms */
    bw_event evs[5];
    int res[5];
    char **rids;
    bw_claim c;

    evs[0] = model("marker", "u1", "a1", "m", 1, 1);
    evs[1] = finalize("marker", "u1", "a2", 0, 0, 0);
    evs[2] = model("incomplete", "u1", "b1", "m", 1, 1);
    evs[3] = finalize("incomplete", "u1", "b2", 1, 2, 0); /* expects 2 model calls, has 1 */
    evs[4] = model("nofinal", "u1", "c1", "m", 1, 1);
    apply(st, evs, 5, res);

    assert_int_equal(claim(st, &rids), 1);
    assert_string_equal(rids[0], "marker");
    assert_int_equal(bw_store_load(st, rids[0], &c), 1);
    assert_string_equal(c.finalize, "marker");
    bw_claim_free(&c);
    bw_store_free_strings(rids, 1);

    sleep_ms(500); /* past the grace, well before the timeout */
    assert_int_equal(claim(st, &rids), 1);
    assert_string_equal(rids[0], "incomplete");
    assert_int_equal(bw_store_load(st, rids[0], &c), 1);
    assert_string_equal(c.finalize, "incomplete");
    bw_claim_free(&c);
    bw_store_free_strings(rids, 1);

    sleep_ms(700); /* past the request timeout */
    assert_int_equal(claim(st, &rids), 1);
    assert_string_equal(rids[0], "nofinal");
    assert_int_equal(bw_store_load(st, rids[0], &c), 1);
    assert_string_equal(c.finalize, "timeout");
    bw_claim_free(&c);
    bw_store_free_strings(rids, 1);
    bw_store_destroy(st);
}

/* A straggler that meets `expected` makes the request due at once. */
static void test_expected_met_by_straggler(void **state)
{
    bw_store *st = new_store(60000, 60000);
    bw_event evs[3];
    int res[3];
    char **rids;
    bw_claim c;

    evs[0] = model("r1", "u1", "e1", "m", 1, 1);
    evs[1] = finalize("r1", "u1", "e3", 1, 2, 0);
    evs[2] = model("r1", "u1", "e2", "m", 1, 1);
    apply(st, evs, 2, res);
    assert_int_equal(claim(st, &rids), 0);
    bw_store_free_strings(rids, 0);
    apply(st, evs + 2, 1, res);
    assert_int_equal(claim(st, &rids), 1);
    assert_int_equal(bw_store_load(st, rids[0], &c), 1);
    assert_string_equal(c.finalize, "expected_met");
    assert_int_equal(c.n_calls, 2);
    bw_claim_free(&c);
    bw_store_free_strings(rids, 1);
    bw_store_destroy(st);
}

/* The intent is decided once; completing twice is a no-op; late events make an adjustment. */
static void test_intent_complete_and_late(void **state)
{
    bw_store *st = new_store(60000, 200);
    bw_event evs[3];
    int res[3];
    char **rids, *stored;
    bw_claim c;
    char **fields, **records;
    int n;

    evs[0] = model("r/1 x", "u1", "e1", "m", 1, 1);
    evs[1] = finalize("r/1 x", "u1", "e2", 0, 0, 0);
    apply(st, evs, 2, res);
    assert_int_equal(claim(st, &rids), 1);
    assert_int_equal(bw_store_load(st, "r/1 x", &c), 1);
    bw_claim_free(&c);

    assert_int_equal(bw_store_put_intent(st, "r/1 x", 0, "{\"amount\":\"1\"}", &stored), 0);
    assert_string_equal(stored, "{\"amount\":\"1\"}");
    free(stored);
    /* A second decision (another worker, other pricing) never replaces the first. */
    assert_int_equal(bw_store_put_intent(st, "r/1 x", 0, "{\"amount\":\"2\"}", &stored), 0);
    assert_string_equal(stored, "{\"amount\":\"1\"}");
    free(stored);

    /* An event arriving now (the charge is closed) is late. */
    evs[2] = model("r/1 x", "u1", "e3", "m", 7, 7);
    apply(st, evs + 2, 1, res);
    assert_int_equal(res[0], BW_APPLY_LATE);

    /* A reload of the claim sees the stored intent and only generation 0's event. */
    assert_int_equal(bw_store_load(st, "r/1 x", &c), 1);
    assert_int_equal(c.gen, 0);
    assert_string_equal(c.intent, "{\"amount\":\"1\"}");
    assert_int_equal(c.n_calls, 1);
    assert_int_equal(c.calls[0].usage.input, 1);
    bw_claim_free(&c);

    assert_int_equal(bw_store_complete(st, "r/1 x", 0, "{\"rec\":0}"), 1);
    assert_int_equal(bw_store_complete(st, "r/1 x", 0, "{\"rec\":0}"), 0);
    bw_store_free_strings(rids, 1);

    /* The adjustment becomes due after the grace and holds only the late event. */
    sleep_ms(300);
    assert_int_equal(claim(st, &rids), 1);
    assert_int_equal(bw_store_load(st, "r/1 x", &c), 1);
    assert_int_equal(c.gen, 1);
    assert_int_equal(c.n_calls, 1);
    assert_int_equal(c.calls[0].usage.input, 7);
    bw_claim_free(&c);
    assert_int_equal(bw_store_complete(st, "r/1 x", 1, "{\"rec\":1}"), 1);
    bw_store_free_strings(rids, 1);

    /* Nothing more is due. */
    assert_int_equal(claim(st, &rids), 0);
    bw_store_free_strings(rids, 0);

    /* Both records wait in the outbox until acknowledged (min age 0). */
    n = bw_store_outbox_due(st, 0, 10, &fields, &records);
    assert_int_equal(n, 2);
    for (int i = 0; i < n; i++)
        assert_true(strcmp(fields[i], "r%2F1%20x:0") == 0 || strcmp(fields[i], "r%2F1%20x:1") == 0);
    assert_int_equal(bw_store_outbox_done(st, fields, (size_t)n), 0); /* both, one round trip */
    bw_store_free_strings(fields, (size_t)n);
    bw_store_free_strings(records, (size_t)n);
    n = bw_store_outbox_due(st, 0, 10, &fields, &records);
    assert_int_equal(n, 0);
    free(fields);
    free(records);
    bw_store_destroy(st);
}

/* A deferred settlement comes back after its delay with the wallet-only flag. */
static void test_defer(void **state)
{
    bw_store *st = new_store(60000, 5000);
    bw_event evs[2];
    int res[2];
    char **rids;
    bw_claim c;

    evs[0] = tool("r1", "u1", "e1", "web_search");
    evs[1] = finalize("r1", "u1", "e2", 0, 0, 0);
    apply(st, evs, 2, res);
    assert_int_equal(claim(st, &rids), 1);
    bw_store_free_strings(rids, 1);
    assert_int_equal(bw_store_load(st, "r1", &c), 1);
    bw_claim_free(&c);
    assert_int_equal(bw_store_defer(st, "r1", 0, 200, 1), 0);
    assert_int_equal(claim(st, &rids), 0);
    bw_store_free_strings(rids, 0);
    sleep_ms(300);
    assert_int_equal(claim(st, &rids), 1);
    bw_store_free_strings(rids, 1);
    assert_int_equal(bw_store_load(st, "r1", &c), 1);
    assert_int_equal(c.wallet_only, 1);
    assert_int_equal(c.attempts, 1);
    bw_claim_free(&c);
    bw_store_destroy(st);
}

/* An attempt whose outcome was never recorded (a crash, a lost write) makes
 * the next attempt wallet-only: the wallet may have applied it (G7). */
static void test_unrecorded_attempt_is_wallet_only(void **state)
{
    bw_store *st = new_store(60000, 5000);
    bw_event evs[2];
    int res[2];
    char **rids;
    bw_claim c;

    evs[0] = tool("r1", "u1", "e1", "web_search");
    evs[1] = finalize("r1", "u1", "e2", 0, 0, 0);
    apply(st, evs, 2, res);
    assert_int_equal(claim(st, &rids), 1);
    bw_store_free_strings(rids, 1);
    assert_int_equal(bw_store_load(st, "r1", &c), 1);
    assert_int_equal(c.wallet_only, 0);
    bw_claim_free(&c);

    assert_int_equal(bw_store_begin_attempt(st, "r1", 0), 1);
    /* the worker dies here: no defer, no complete */
    assert_int_equal(bw_store_load(st, "r1", &c), 1);
    assert_int_equal(c.wallet_only, 1);
    bw_claim_free(&c);

    /* A recorded outcome replaces the in-progress mark (the worker passes
     * wallet_only = 1 on when it knew it; here the attempt was not delivered). */
    assert_int_equal(bw_store_defer(st, "r1", 0, 0, 0), 0);
    assert_int_equal(bw_store_load(st, "r1", &c), 1);
    assert_int_equal(c.wallet_only, 0);
    bw_claim_free(&c);

    /* Completed: no further attempt may begin. */
    assert_int_equal(bw_store_complete(st, "r1", 0, "{}"), 1);
    assert_int_equal(bw_store_begin_attempt(st, "r1", 0), 0);
    bw_store_destroy(st);
}

/* The fallback is allowed only to the latest attempt, and never once any
 * attempt recorded an unknown wallet outcome (G7). */
static void test_fallback_only_for_latest_attempt(void **state)
{
    bw_store *st = new_store(60000, 5000);
    bw_event evs[2];
    int res[2];
    char **rids;
    bw_claim c;

    evs[0] = tool("r1", "u1", "e1", "web_search");
    evs[1] = finalize("r1", "u1", "e2", 0, 0, 0);
    apply(st, evs, 2, res);
    assert_int_equal(claim(st, &rids), 1);
    bw_store_free_strings(rids, 1);
    assert_int_equal(bw_store_load(st, "r1", &c), 1);
    bw_claim_free(&c);

    assert_int_equal(bw_store_begin_attempt(st, "r1", 0), 1);
    assert_int_equal(bw_store_fallback_ok(st, "r1", 0, 1), 1);
    /* a second worker took over (the first one stalled past its lease) */
    assert_int_equal(bw_store_begin_attempt(st, "r1", 0), 2);
    assert_int_equal(bw_store_fallback_ok(st, "r1", 0, 1), 0);
    assert_int_equal(bw_store_fallback_ok(st, "r1", 0, 2), 1);
    /* an unknown outcome was recorded: no attempt may use the fallback */
    assert_int_equal(bw_store_defer(st, "r1", 0, 0, 1), 0);
    assert_int_equal(bw_store_begin_attempt(st, "r1", 0), 3);
    assert_int_equal(bw_store_fallback_ok(st, "r1", 0, 3), 0);
    /* a generation that does not exist */
    assert_int_equal(bw_store_fallback_ok(st, "r1", 7, 1), 0);
    bw_store_destroy(st);
}

/* After a Redis restart the scripts are loaded again (NOSCRIPT) transparently. */
static void test_script_reload(void **state)
{
    bw_store *st = new_store(60000, 5000);
    bw_event ev = tool("r1", "u1", "e1", "web_search");
    int res[1];
    char cmd[128];

    apply(st, &ev, 1, res);
    for (int i = 0; i < n_servers; i++) {
        snprintf(cmd, sizeof(cmd), "redis-cli -p %d script flush >/dev/null", redis_ports[i]);
        assert_int_equal(system(cmd), 0);
    }
    apply(st, &ev, 1, res);
    assert_int_equal(res[0], BW_APPLY_DUP);
    bw_store_destroy(st);
}

/* ---- cluster only -------------------------------------------------------- */

/* The node (index) that holds @p key, found by asking every node. */
static int node_of_key(const char *pattern, char *key, size_t keysize)
{
    for (int i = 0; i < N_CLUSTER; i++) {
        const char *k =
            sh("redis-cli -p %d --scan --pattern '%s' | head -1", redis_ports[i], pattern);
        if (k[0]) {
            snprintf(key, keysize, "%s", k);
            return i;
        }
    }
    return -1;
}

/* Start moving @p slot from node @p from to node @p to, and move its keys. */
static void migrate_slot_begin(int slot, int from, int to)
{
    char src_id[64], dst_id[64];

    snprintf(src_id, sizeof(src_id), "%s", sh("redis-cli -p %d cluster myid", redis_ports[from]));
    snprintf(dst_id, sizeof(dst_id), "%s", sh("redis-cli -p %d cluster myid", redis_ports[to]));
    assert_string_equal(
        sh("redis-cli -p %d cluster setslot %d importing %s", redis_ports[to], slot, src_id), "OK");
    assert_string_equal(
        sh("redis-cli -p %d cluster setslot %d migrating %s", redis_ports[from], slot, dst_id),
        "OK");
    /* every key of the slot */
    sh("redis-cli -p %d cluster getkeysinslot %d 1000 | xargs -r redis-cli -p %d migrate "
       "127.0.0.1 %d '' 0 5000 keys",
       redis_ports[from], slot, redis_ports[from], redis_ports[to]);
    assert_string_equal(sh("redis-cli -p %d cluster countkeysinslot %d", redis_ports[from], slot),
                        "0");
}

static void migrate_slot_end(int slot, int to)
{
    char dst_id[64];

    snprintf(dst_id, sizeof(dst_id), "%s", sh("redis-cli -p %d cluster myid", redis_ports[to]));
    for (int i = 0; i < N_CLUSTER; i++)
        assert_string_equal(
            sh("redis-cli -p %d cluster setslot %d node %s", redis_ports[i], slot, dst_id), "OK");
}

/* Requests spread over every master; claims and counts see all of them. */
static void test_cluster_spread(void **state)
{
    bw_store *st;
    bw_event evs[2];
    int res[2], total = 0;
    char **rids;

    if (!cluster_mode)
        skip();
    st = new_store(60000, 5000);
    for (int r = 0; r < 120; r++) {
        char rid[32];
        snprintf(rid, sizeof(rid), "spread-%03d", r);
        evs[0] = tool(rid, "u1", "e1", "web_search");
        evs[1] = finalize(rid, "u1", "e2", 1, 0, 1);
        apply(st, evs, 2, res);
        assert_int_equal(res[0], BW_APPLY_NEW);
        assert_int_equal(res[1], BW_APPLY_NEW);
    }
    for (int i = 0; i < N_CLUSTER; i++)
        assert_true(atoi(sh("redis-cli -p %d dbsize", redis_ports[i])) > 0);
    assert_int_equal(bw_store_due_count(st), 120);
    assert_int_equal(bw_store_overdue_count(st), 120);
    for (int k = 0; k < 20 && total < 120; k++) {
        int n = bw_store_claim_due(st, 50, &rids);
        assert_true(n >= 0);
        total += n;
        bw_store_free_strings(rids, (size_t)n);
    }
    assert_int_equal(total, 120);
    bw_store_destroy(st);
}

/* A slot moves while the store runs: ASK during the migration, MOVED after. */
static void test_cluster_redirects(void **state)
{
    bw_store *st;
    bw_event evs[3];
    int res[3], from, to, slot;
    char key[256], **rids;
    bw_claim c;

    if (!cluster_mode)
        skip();
    st = new_store(60000, 5000);
    evs[0] = tool("mover", "u1", "e1", "web_search");
    apply(st, evs, 1, res);
    from = node_of_key("bw:*:mover:m", key, sizeof(key));
    assert_true(from >= 0);
    slot = atoi(sh("redis-cli -p %d cluster keyslot '%s'", redis_ports[0], key));
    to = (from + 1) % N_CLUSTER;

    /* migrating: the keys are at the target already, the map says the source */
    migrate_slot_begin(slot, from, to);
    evs[0] = tool("mover", "u1", "e2", "web_search");
    apply(st, evs, 1, res); /* meta, events and due all exist at the target: ASK */
    assert_int_equal(res[0], BW_APPLY_NEW);
    assert_int_equal(node_of_key("bw:*:mover:m", key, sizeof(key)), to);

    /* migrated: the store's map is stale, MOVED sends it to the new owner */
    migrate_slot_end(slot, to);
    evs[0] = tool("mover", "u1", "e2", "web_search");
    evs[1] = model("mover", "u1", "e3", "gpt-4o", 10, 5);
    evs[2] = finalize("mover", "u1", "e4", 1, 1, 2);
    apply(st, evs, 3, res);
    assert_int_equal(res[0], BW_APPLY_DUP);
    assert_int_equal(res[1], BW_APPLY_NEW);
    assert_int_equal(res[2], BW_APPLY_NEW);
    assert_int_equal(claim(st, &rids), 1);
    assert_string_equal(rids[0], "mover");
    bw_store_free_strings(rids, 1);
    assert_int_equal(bw_store_load(st, "mover", &c), 1);
    assert_int_equal(c.n_calls, 3);
    bw_claim_free(&c);
    assert_int_equal(bw_store_complete(st, "mover", 0, "{}"), 1);
    assert_int_equal(bw_store_due_count(st), 0);
    bw_store_destroy(st);
}

/* A --shadow worker on the same Redis keeps its state apart: the real
 * worker still sees every event as new and every request as its own. */
static void test_shadow_keys_apart(void **state)
{
    bw_store *real = new_store(60000, 5000), *shadow;
    bw_store_timers t = {60000, 5000, 60000, 2000};
    bw_event evs[2];
    int res[2];
    char url[128], err[256], **rids;

    if (cluster_mode)
        snprintf(url, sizeof(url), "redis+cluster://127.0.0.1:%d", redis_port);
    else
        snprintf(url, sizeof(url), "redis://127.0.0.1:%d/%d", redis_port, db_counter);
    shadow = bw_store_new(url, &t, err, sizeof(err)); /* the same database as real */
    assert_non_null(shadow);
    bw_store_shadow(shadow);

    evs[0] = tool("sh-1", "u1", "e1", "web_search");
    evs[1] = finalize("sh-1", "u1", "e2", 1, 0, 1);
    apply(shadow, evs, 2, res);
    assert_int_equal(res[0], BW_APPLY_NEW);
    assert_int_equal(res[1], BW_APPLY_NEW);
    assert_int_equal(claim(real, &rids), 0); /* the shadow's due request is not real's */
    bw_store_free_strings(rids, 0);

    apply(real, evs, 2, res);
    assert_int_equal(res[0], BW_APPLY_NEW); /* not a duplicate of the shadow's copy */
    assert_int_equal(res[1], BW_APPLY_NEW);
    assert_int_equal(claim(real, &rids), 1);
    assert_string_equal(rids[0], "sh-1");
    bw_store_free_strings(rids, 1);
    assert_int_equal(claim(shadow, &rids), 1);
    assert_string_equal(rids[0], "sh-1");
    bw_store_free_strings(rids, 1);
    bw_store_destroy(shadow);
    bw_store_destroy(real);
}

static int cluster_keys(void)
{
    int n = 0;
    for (int i = 0; i < N_CLUSTER; i++)
        n += atoi(sh("redis-cli -p %d dbsize", redis_ports[i]));
    return n;
}

/* Workers configured with another bucket count would look for a request's
 * state under other keys: such a store refuses to touch the cluster. */
static void test_cluster_layout_guard(void **state)
{
    bw_store *st, *other, *same;
    bw_store_timers t = {60000, 5000, 60000, 2000};
    bw_event evs[1], *ptr = evs;
    int res[1], keys_before;
    char url[128], err[256], **rids, **fields, **records;

    if (!cluster_mode)
        skip();
    st = new_store(60000, 5000); /* default: 64 buckets */
    evs[0] = tool("guarded", "u1", "e1", "web_search");
    apply(st, evs, 1, res);
    assert_int_equal(res[0], BW_APPLY_NEW);
    keys_before = cluster_keys();
    assert_true(keys_before > 0);

    snprintf(url, sizeof(url), "redis+cluster://127.0.0.1:%d?buckets=8", redis_port);
    other = bw_store_new(url, &t, err, sizeof(err));
    assert_non_null(other);
    evs[0] = tool("guarded", "u1", "e2", "web_search");
    assert_int_equal(bw_store_apply(other, &ptr, 1, res, err, sizeof(err)), -1);
    assert_int_equal(bw_store_claim_due(other, 10, &rids), -1);
    assert_int_equal(bw_store_outbox_due(other, 0, 10, &fields, &records), -1);
    assert_int_equal(cluster_keys(), keys_before); /* it wrote nothing */
    bw_store_destroy(other);

    /* the same count, spelled out, is the same layout: the event is new there */
    snprintf(url, sizeof(url), "redis+cluster://127.0.0.1:%d?buckets=64", redis_port);
    same = bw_store_new(url, &t, err, sizeof(err));
    assert_non_null(same);
    assert_int_equal(bw_store_apply(same, &ptr, 1, res, err, sizeof(err)), 0);
    assert_int_equal(res[0], BW_APPLY_NEW);
    evs[0] = tool("guarded", "u1", "e1", "web_search");
    assert_int_equal(bw_store_apply(same, &ptr, 1, res, err, sizeof(err)), 0);
    assert_int_equal(res[0], BW_APPLY_DUP);
    bw_store_destroy(same);
    bw_store_destroy(st);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dedup_and_user_mismatch),
        cmocka_unit_test(test_idempotency_key_dedup),
        cmocka_unit_test(test_finalize_timers),
        cmocka_unit_test(test_expected_met_by_straggler),
        cmocka_unit_test(test_intent_complete_and_late),
        cmocka_unit_test(test_defer),
        cmocka_unit_test(test_unrecorded_attempt_is_wallet_only),
        cmocka_unit_test(test_fallback_only_for_latest_attempt),
        cmocka_unit_test(test_script_reload),
        cmocka_unit_test(test_shadow_keys_apart),
        cmocka_unit_test(test_cluster_spread),
        cmocka_unit_test(test_cluster_redirects),
        cmocka_unit_test(test_cluster_layout_guard),
    };
    return cmocka_run_group_tests(tests, start_redis, stop_redis);
}

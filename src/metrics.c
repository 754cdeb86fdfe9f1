/*
 * metrics.c - process counters and their Prometheus text rendering.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pthread.h>

#include <jansson.h>

#include "bw_metrics.h"

bw_metrics bw_stats;

#define LAG_MAX 256

/* Consumer lag per assigned partition; written by the consumer thread (stats
 * callback), read by the HTTP thread. */
static struct lag_entry {
    char topic[128];
    int partition;
    long long lag;
} lag_table[LAG_MAX];
static int lag_count;
static pthread_mutex_t lag_lock = PTHREAD_MUTEX_INITIALIZER;

void bw_metrics_set_lag_from_stats(const char *json, size_t len)
{
    json_t *root = json_loadb(json, len, 0, NULL), *topics, *t, *parts, *p;
    const char *tname, *pname;
    struct lag_entry tmp[LAG_MAX];
    int n = 0;

    if (!root)
        return;
    topics = json_object_get(root, "topics");
    json_object_foreach(topics, tname, t)
    {
        parts = json_object_get(t, "partitions");
        json_object_foreach(parts, pname, p)
        {
            json_int_t part = json_integer_value(json_object_get(p, "partition"));
            json_int_t lag = json_integer_value(json_object_get(p, "consumer_lag"));
            /* -1 is librdkafka's internal UA partition and unknown lags */
            if (part < 0 || lag < 0 || n == LAG_MAX)
                continue;
            snprintf(tmp[n].topic, sizeof(tmp[n].topic), "%s", tname);
            tmp[n].partition = (int)part;
            tmp[n].lag = lag;
            n++;
        }
    }
    json_decref(root);
    pthread_mutex_lock(&lag_lock);
    memcpy(lag_table, tmp, sizeof(tmp[0]) * (size_t)n);
    lag_count = n;
    pthread_mutex_unlock(&lag_lock);
}

/* Upper bounds (seconds) of the settlement latency histogram buckets. */
static const double settle_le[8] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5};
static const int64_t settle_le_us[8] = {5000,   10000,  25000,   50000,
                                        100000, 500000, 1000000, 5000000};

void bw_metrics_observe_settle(int64_t us)
{
    for (int i = 0; i < 8; i++)
        if (us <= settle_le_us[i])
            atomic_fetch_add(&bw_stats.settle_bucket[i], 1);
    atomic_fetch_add(&bw_stats.settle_count, 1);
    atomic_fetch_add(&bw_stats.settle_sum_us, (unsigned long long)us);
}

typedef struct sbuf {
    char *p;
    size_t len, cap;
} sbuf;

static void put(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(sbuf *b, const char *fmt, ...)
{
    va_list ap;
    int n;

    for (;;) {
        va_start(ap, fmt);
        n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0)
            return;
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        b->cap = b->cap * 2 + (size_t)n;
        b->p = realloc(b->p, b->cap);
        if (!b->p)
            return;
    }
}

static void counter(sbuf *b, const char *name, const char *help, unsigned long long v)
{
    put(b,
        "# HELP billing_worker_%s %s\n# TYPE billing_worker_%s counter\nbilling_worker_%s %llu\n",
        name, help, name, name, v);
}

char *bw_metrics_render(void)
{
    sbuf b = {malloc(4096), 0, 4096};
    unsigned long long micro;

    if (!b.p)
        return NULL;
    counter(&b, "events_consumed_total", "Kafka messages consumed from the input topics.",
            atomic_load(&bw_stats.events_consumed));
    counter(&b, "events_applied_total", "Events counted into a request (first delivery).",
            atomic_load(&bw_stats.events_applied));
    counter(&b, "duplicates_total", "Events whose dedup key was already applied.",
            atomic_load(&bw_stats.duplicates));
    counter(&b, "duplicates_conflicting_total",
            "Duplicates whose payload differed from the first (the first wins).",
            atomic_load(&bw_stats.duplicates_conflicting));
    counter(&b, "late_events_total", "Events applied after their request was charged.",
            atomic_load(&bw_stats.late_events));
    put(&b, "# HELP billing_worker_dead_letters_total Events sent to the dead-letter topic.\n"
            "# TYPE billing_worker_dead_letters_total counter\n");
    for (int r = 1; r < BW_METRICS_REASONS; r++)
        put(&b, "billing_worker_dead_letters_total{reason=\"%s\"} %llu\n",
            bw_event_reason_str((bw_event_reason)r), atomic_load(&bw_stats.dead_letters[r]));
    put(&b, "# HELP billing_worker_settlements_total Settlement outcomes.\n"
            "# TYPE billing_worker_settlements_total counter\n");
    put(&b, "billing_worker_settlements_total{status=\"settled\",via=\"wallet\"} %llu\n",
        atomic_load(&bw_stats.settled_wallet));
    put(&b, "billing_worker_settlements_total{status=\"settled\",via=\"user_service\"} %llu\n",
        atomic_load(&bw_stats.settled_fallback));
    put(&b, "billing_worker_settlements_total{status=\"rejected\",via=\"wallet\"} %llu\n",
        atomic_load(&bw_stats.rejected));
    put(&b, "billing_worker_settlements_total{status=\"recorded\",via=\"none\"} %llu\n",
        atomic_load(&bw_stats.recorded));
    put(&b, "billing_worker_settlements_total{status=\"dry_run\",via=\"none\"} %llu\n",
        atomic_load(&bw_stats.dry_run));
    counter(&b, "settlements_deferred_total", "Settlement attempts left pending for a retry.",
            atomic_load(&bw_stats.deferred));
    micro = atomic_load(&bw_stats.credits_settled_micro);
    put(&b,
        "# HELP billing_worker_credits_settled_total Credits charged (settled).\n"
        "# TYPE billing_worker_credits_settled_total counter\n"
        "billing_worker_credits_settled_total %llu.%06llu\n",
        micro / 1000000ULL, micro % 1000000ULL);
    put(&b,
        "# HELP billing_worker_pending_settlements Requests open, due or pending in Redis.\n"
        "# TYPE billing_worker_pending_settlements gauge\n"
        "billing_worker_pending_settlements %lld\n",
        (long long)atomic_load(&bw_stats.pending_settlements));
    put(&b,
        "# HELP billing_worker_wallet_circuit_open 1 while the wallet circuit breaker is open.\n"
        "# TYPE billing_worker_wallet_circuit_open gauge\n"
        "billing_worker_wallet_circuit_open %d\n",
        atomic_load(&bw_stats.wallet_circuit_open));
    put(&b, "# HELP billing_worker_pricing_reloads_total Pricing reloads (SIGHUP).\n"
            "# TYPE billing_worker_pricing_reloads_total counter\n");
    put(&b, "billing_worker_pricing_reloads_total{result=\"ok\"} %llu\n",
        atomic_load(&bw_stats.pricing_reload_ok));
    put(&b, "billing_worker_pricing_reloads_total{result=\"refused\"} %llu\n",
        atomic_load(&bw_stats.pricing_reload_failed));
    put(&b, "# HELP billing_worker_consumer_lag Messages behind the partition's end.\n"
            "# TYPE billing_worker_consumer_lag gauge\n");
    pthread_mutex_lock(&lag_lock);
    for (int i = 0; i < lag_count; i++)
        put(&b, "billing_worker_consumer_lag{topic=\"%s\",partition=\"%d\"} %lld\n",
            lag_table[i].topic, lag_table[i].partition, lag_table[i].lag);
    pthread_mutex_unlock(&lag_lock);
    put(&b, "# HELP billing_worker_settlement_seconds Time to settle one charge.\n"
            "# TYPE billing_worker_settlement_seconds histogram\n");
    for (int i = 0; i < 8; i++)
        put(&b, "billing_worker_settlement_seconds_bucket{le=\"%g\"} %llu\n", settle_le[i],
            atomic_load(&bw_stats.settle_bucket[i]));
    put(&b, "billing_worker_settlement_seconds_bucket{le=\"+Inf\"} %llu\n",
        atomic_load(&bw_stats.settle_count));
    {
        unsigned long long us = atomic_load(&bw_stats.settle_sum_us);
        put(&b, "billing_worker_settlement_seconds_sum %llu.%06llu\n", us / 1000000ULL,
            us % 1000000ULL);
    }
    put(&b, "billing_worker_settlement_seconds_count %llu\n", atomic_load(&bw_stats.settle_count));
    return b.p;
}

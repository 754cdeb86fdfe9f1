/*
 * bw_metrics.h - process counters, served by the http module in the
 * Prometheus text format. Written by the worker thread, read by the HTTP
 * thread: relaxed atomics are enough for monotonic counters.
 */
#ifndef BW_METRICS_H
#define BW_METRICS_H

#include <stdatomic.h>
#include <stdint.h>

#include "bw_event.h"

#define BW_METRICS_REASONS 10 /* bw_event_reason values */

typedef struct bw_metrics {
    atomic_ullong events_consumed;
    atomic_ullong events_applied;
    atomic_ullong duplicates;
    atomic_ullong duplicates_conflicting;
    atomic_ullong late_events;
    atomic_ullong dead_letters[BW_METRICS_REASONS];
    atomic_ullong settled_wallet, settled_fallback, rejected, recorded, dry_run;
    atomic_ullong deferred;
    atomic_ullong credits_settled_micro;
    atomic_ullong pricing_reload_ok, pricing_reload_failed;
    atomic_llong pending_settlements;
    atomic_int wallet_circuit_open;
    atomic_int ready;    /* member of the group and Redis reachable */
    atomic_int draining; /* shutting down */
    /* settlement latency histogram (seconds) */
    atomic_ullong settle_bucket[8];
    atomic_ullong settle_count;
    atomic_ullong settle_sum_us;
} bw_metrics;

extern bw_metrics bw_stats;

/**
 * @brief Replace the per-partition consumer lag table from librdkafka's
 *        statistics JSON (statistics.interval.ms).
 */
void bw_metrics_set_lag_from_stats(const char *json, size_t len);

/** Record one settlement's duration. */
void bw_metrics_observe_settle(int64_t us);

/** Render the Prometheus text exposition into a malloc'ed string. */
char *bw_metrics_render(void);

#endif

/*
 * bw_audit.h - `billing-worker audit` and `billing-worker replay`:
 * recompute charges from the input topic and reconcile them with the
 * settlements topic (PRODUCT.md sections 5 and 8).
 */
#ifndef BW_AUDIT_H
#define BW_AUDIT_H

#include <stddef.h>
#include <stdint.h>

#include "bw_config.h"

typedef struct bw_audit_opts {
    int64_t from_ms, to_ms; /* the window, epoch milliseconds, [from, to) */
    const char *format;     /* audit: "table" (default), "json", "csv" */
    const char *output;     /* -o FILE, NULL: stdout */
    const char *user;       /* --user filter, NULL: all */
    const char *request;    /* --request filter, NULL: all */
    char *const *xprops;    /* -X librdkafka properties */
    size_t n_xprops;
    const char *pricing_dir; /* --pricing-dir DIR: earlier pricing versions (*.cfg), NULL: none */
    int has_margin;          /* --margin DURATION given; else request_timeout + finalize_grace */
    int64_t margin_ms;       /* input read before and after the window to complete requests */
    int shadow;              /* --shadow: only dry_run records count as the outcome */
} bw_audit_opts;

/**
 * @brief Reconcile the window. Never charges, never writes to Redis, never
 *        joins or commits for the live consumer group.
 * @returns 0 when everything matched, 3 when mismatched or unsettled requests
 *          were found, 1 on a runtime failure.
 */
int bw_audit_main(const bw_config *cfg, const bw_audit_opts *o);

/**
 * @brief Disaster recovery (`replay --settle`): settle every request of the
 *        window that has no final outcome in the settlements topic, with the
 *        same idempotency keys, and publish the records.
 * @returns 0, or 1 on a runtime failure.
 */
int bw_replay_main(const bw_config *cfg, const bw_audit_opts *o);

#endif

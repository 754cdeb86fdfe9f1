/*
 * bw_config.h - the configuration file (PRODUCT.md section 10).
 */
#ifndef BW_CONFIG_H
#define BW_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "bw_pricing.h"

#define BW_CONFIG_MAX_TOPICS 16
#define BW_CONFIG_MAX_PROPS  64

typedef struct bw_service_config {
    char *url;          /* "http://..", "https://..", or "consul://name" */
    char *consume_path; /* with {user_id} */
    char *record_path;  /* user service only */
    int64_t timeout_ms;
} bw_service_config;

typedef struct bw_config {
    char *path; /* the file this came from */

    /* kafka */
    char *brokers;
    char *group_id;
    char *topics[BW_CONFIG_MAX_TOPICS];
    size_t n_topics;
    char *settlements_topic;
    char *dlq_topic;
    char *properties[BW_CONFIG_MAX_PROPS]; /* "key=value" librdkafka passthrough */
    size_t n_properties;

    /* redis */
    char *redis_url;

    /* dedup */
    int64_t dedup_retention_ms;

    bw_service_config wallet;
    bw_service_config user_service;

    /* tls */
    char *tls_ca_file, *tls_cert_file, *tls_key_file;

    /* consul */
    char *consul_url;
    int64_t consul_refresh_ms;

    /* auth */
    char *jwt_secret_file;
    char *token_file;

    /* settle */
    char *service_name;
    int64_t finalize_grace_ms;
    int64_t request_timeout_ms;
    int late_policy_adjust; /* 1 = "adjust", 0 = "record" */
    int max_attempts;
    int64_t retry_max_interval_ms;
    int breaker_failures;
    int settle_concurrency; /* settler threads per process (extension) [4] */
    int64_t breaker_cooldown_ms;

    /* http */
    char *http_listen;

    /* limits */
    int64_t max_event_bytes;

    /* log */
    char *log_level;
    char *log_format;

    int64_t shutdown_timeout_ms;

    bw_pricing *pricing; /* owned */
    int has_kafka;       /* the file had a kafka group (else pricing-only) */
} bw_config;

/**
 * @brief Load and validate a configuration file, apply BW_<GROUP>_<KEY>
 *        environment overrides, fill defaults, build the pricing.
 * @param pricing_only 1 for `price` and `check-config`: a file holding only
 *        the `pricing` group is accepted.
 * @returns 0 and *out (free with bw_config_free), or -1 with
 *          "file:line: message" in @p err (the caller exits 2).
 */
int bw_config_load(const char *path, int pricing_only, bw_config **out, char *err, size_t errsize);

void bw_config_free(bw_config *cfg);

#endif

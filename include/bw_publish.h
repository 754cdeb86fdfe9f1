/*
 * bw_publish.h - the Kafka producer: settlement records and dead letters.
 */
#ifndef BW_PUBLISH_H
#define BW_PUBLISH_H

#include <librdkafka/rdkafka.h>

#include "bw_config.h"

typedef struct bw_publish bw_publish;

/** Called from bw_publish_poll() when a settlement record was acknowledged (ok=1) or failed. */
typedef void(bw_publish_delivered_cb)(void *ctx, const char *outbox_field, int ok);

/**
 * @brief Create the producer (acks=all, idempotence, murmur2_random), applying
 *        kafka.properties then the command line's -X properties.
 */
bw_publish *bw_publish_new(const bw_config *cfg, char *const *xprops, size_t n_xprops,
                           bw_publish_delivered_cb *cb, void *ctx, char *err, size_t errsize);
void bw_publish_destroy(bw_publish *pb);

/** Dead-letter values above this are cut to it: a message close to Kafka's
 *  size limit must still fit with the bw-* headers, or its partition would
 *  stop. The whole original stays at its offset in the input topic. */
#define BW_DLQ_VALUE_MAX (512 * 1024)

/**
 * @brief Produce a dead letter: the original key and bytes as the message,
 *        and the reason, detail, source topic, partition and offset as headers
 *        (bw-reason, bw-detail, bw-topic, bw-partition, bw-offset). A value
 *        above BW_DLQ_VALUE_MAX keeps its first BW_DLQ_VALUE_MAX bytes, with
 *        bw-truncated (the original length) and bw-sha256 (of the original).
 */
int bw_publish_dlq(bw_publish *pb, const rd_kafka_message_t *src, const char *reason,
                   const char *detail);

/**
 * @brief Wait until every dead letter produced so far is acknowledged.
 * @returns 0 if all were, -1 if one failed or @p timeout_ms passed
 *          (the caller produces them again: dead letters are at least once).
 */
int bw_publish_dlq_wait(bw_publish *pb, int timeout_ms);

/** Produce a settlement record (key = request id); @p outbox_field comes back in the callback. */
int bw_publish_record(bw_publish *pb, const char *request_id, const char *record,
                      const char *outbox_field);

/** Serve delivery reports. */
void bw_publish_poll(bw_publish *pb, int timeout_ms);

/** Wait for everything in flight. @returns 0 if nothing is left. */
int bw_publish_flush(bw_publish *pb, int timeout_ms);

/** Apply "key=value" properties to a librdkafka conf (shared with the consumer). */
int bw_kafka_conf_apply(rd_kafka_conf_t *conf, char *const *props, size_t n, char *err,
                        size_t errsize);

/** librdkafka log callback writing through bw_log (set on every client). */
void bw_kafka_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf);

#endif

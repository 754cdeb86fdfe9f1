/*
 * publish.c - the Kafka producer for settlement records and dead letters.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "bw_log.h"
#include "bw_publish.h"
#include "bw_util.h"

struct bw_publish {
    rd_kafka_t *rk;
    rd_kafka_topic_t *rkt_settle, *rkt_dlq;
    bw_publish_delivered_cb *cb;
    void *ctx;
    int dlq_outstanding;
    int dlq_failed;
};

/* Marks a dead letter in the delivery report (its opaque). */
static char dlq_marker;

int bw_kafka_conf_apply(rd_kafka_conf_t *conf, char *const *props, size_t n, char *err,
                        size_t errsize)
{
    for (size_t i = 0; i < n; i++) {
        char kv[1024], rkerr[256];
        char *eq;

        snprintf(kv, sizeof(kv), "%s", props[i]);
        eq = strchr(kv, '=');
        if (!eq) {
            bw_seterr(err, errsize, "kafka property \"%s\": expected key=value", props[i]);
            return -1;
        }
        *eq = '\0';
        if (rd_kafka_conf_set(conf, kv, eq + 1, rkerr, sizeof(rkerr)) != RD_KAFKA_CONF_OK) {
            bw_seterr(err, errsize, "kafka property %s: %s", kv, rkerr);
            return -1;
        }
    }
    return 0;
}

void bw_kafka_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    bw_log_level lvl = level <= 3   ? BW_LOG_ERROR
                       : level == 4 ? BW_LOG_WARN
                       : level <= 6 ? BW_LOG_INFO
                                    : BW_LOG_DEBUG;
    bw_log(lvl, "kafka", "client", rd_kafka_name(rk), "facility", fac, "detail", buf, NULL);
}

static void dr_msg_cb(rd_kafka_t *rk, const rd_kafka_message_t *rkm, void *opaque)
{
    bw_publish *pb = opaque;

    if (rkm->_private == &dlq_marker) {
        pb->dlq_outstanding--;
        if (rkm->err) {
            pb->dlq_failed++;
            bw_log(BW_LOG_ERROR, "dead letter not delivered", "error", rd_kafka_err2str(rkm->err),
                   NULL);
        }
        return;
    }
    /* A settlement record: _private is the strdup'ed outbox field. */
    if (rkm->err)
        bw_log(BW_LOG_WARN, "settlement record not delivered (kept in the outbox)", "error",
               rd_kafka_err2str(rkm->err), NULL);
    if (pb->cb)
        pb->cb(pb->ctx, rkm->_private, rkm->err == RD_KAFKA_RESP_ERR_NO_ERROR);
    free(rkm->_private);
}

bw_publish *bw_publish_new(const bw_config *cfg, char *const *xprops, size_t n_xprops,
                           bw_publish_delivered_cb *cb, void *ctx, char *err, size_t errsize)
{
    bw_publish *pb = calloc(1, sizeof(*pb));
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    char rkerr[512];
    static const char *defaults[] = {"acks=all", "enable.idempotence=true",
                                     "partitioner=murmur2_random", "linger.ms=5",
                                     "message.timeout.ms=60000"};

    if (!pb)
        goto err;
    pb->cb = cb;
    pb->ctx = ctx;
    if (rd_kafka_conf_set(conf, "bootstrap.servers", cfg->brokers, rkerr, sizeof(rkerr)) !=
        RD_KAFKA_CONF_OK) {
        bw_seterr(err, errsize, "kafka: %s", rkerr);
        goto err;
    }
    if (bw_kafka_conf_apply(conf, (char *const *)defaults, sizeof(defaults) / sizeof(*defaults),
                            err, errsize) < 0 ||
        bw_kafka_conf_apply(conf, cfg->properties, cfg->n_properties, err, errsize) < 0 ||
        bw_kafka_conf_apply(conf, xprops, n_xprops, err, errsize) < 0)
        goto err;
    /* Consumer-only properties passed through to both clients are harmless. */
    rd_kafka_conf_set_dr_msg_cb(conf, dr_msg_cb);
    rd_kafka_conf_set_log_cb(conf, bw_kafka_log_cb);
    rd_kafka_conf_set_opaque(conf, pb);
    pb->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, rkerr, sizeof(rkerr));
    if (!pb->rk) {
        bw_seterr(err, errsize, "kafka producer: %s", rkerr);
        goto err;
    }
    conf = NULL; /* rd_kafka_new() took it */
    pb->rkt_settle = rd_kafka_topic_new(pb->rk, cfg->settlements_topic, NULL);
    pb->rkt_dlq = rd_kafka_topic_new(pb->rk, cfg->dlq_topic, NULL);
    return pb;
err:
    if (conf)
        rd_kafka_conf_destroy(conf);
    if (pb)
        free(pb);
    return NULL;
}

void bw_publish_destroy(bw_publish *pb)
{
    if (!pb)
        return;
    if (pb->rkt_settle)
        rd_kafka_topic_destroy(pb->rkt_settle);
    if (pb->rkt_dlq)
        rd_kafka_topic_destroy(pb->rkt_dlq);
    if (pb->rk)
        rd_kafka_destroy(pb->rk);
    free(pb);
}

int bw_publish_dlq(bw_publish *pb, const rd_kafka_message_t *src, const char *reason,
                   const char *detail)
{
    char part[16], off[24], orig_len[24] = "", sha[2 * EVP_MAX_MD_SIZE + 1] = "";
    const char *topic = src->rkt ? rd_kafka_topic_name(src->rkt) : "";
    size_t len = src->len;
    rd_kafka_resp_err_t e;

    snprintf(part, sizeof(part), "%d", (int)src->partition);
    snprintf(off, sizeof(off), "%lld", (long long)src->offset);
    if (len > BW_DLQ_VALUE_MAX) {
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned int mdlen = 0;
        EVP_Digest(src->payload, src->len, md, &mdlen, EVP_sha256(), NULL);
        for (unsigned int k = 0; k < mdlen; k++)
            snprintf(sha + 2 * k, 3, "%02x", md[k]);
        snprintf(orig_len, sizeof(orig_len), "%zu", src->len);
        len = BW_DLQ_VALUE_MAX;
    }
    for (;;) {
        rd_kafka_headers_t *h = rd_kafka_headers_new(8);
        rd_kafka_header_add(h, "bw-reason", -1, reason, -1);
        rd_kafka_header_add(h, "bw-detail", -1, detail ? detail : "", -1);
        rd_kafka_header_add(h, "bw-topic", -1, topic, -1);
        rd_kafka_header_add(h, "bw-partition", -1, part, -1);
        rd_kafka_header_add(h, "bw-offset", -1, off, -1);
        if (orig_len[0]) {
            rd_kafka_header_add(h, "bw-truncated", -1, orig_len, -1);
            rd_kafka_header_add(h, "bw-sha256", -1, sha, -1);
        }
        e = rd_kafka_producev(
            pb->rk, RD_KAFKA_V_RKT(pb->rkt_dlq), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
            RD_KAFKA_V_KEY(src->key, src->key_len), RD_KAFKA_V_VALUE(src->payload, len),
            RD_KAFKA_V_HEADERS(h), RD_KAFKA_V_OPAQUE(&dlq_marker), RD_KAFKA_V_END);
        if (e)
            rd_kafka_headers_destroy(h); /* not taken over on failure */
        if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL)
            break;
        rd_kafka_poll(pb->rk, 100);
    }
    if (e) {
        bw_log(BW_LOG_ERROR, "dead letter produce failed", "error", rd_kafka_err2str(e), NULL);
        pb->dlq_failed++;
        return -1;
    }
    pb->dlq_outstanding++;
    return 0;
}

int bw_publish_dlq_wait(bw_publish *pb, int timeout_ms)
{
    int64_t deadline = bw_mono_ms() + timeout_ms;
    int failed;

    while (pb->dlq_outstanding > 0 && bw_mono_ms() < deadline)
        rd_kafka_poll(pb->rk, 50);
    failed = pb->dlq_failed || pb->dlq_outstanding > 0;
    pb->dlq_failed = 0;
    return failed ? -1 : 0;
}

int bw_publish_record(bw_publish *pb, const char *request_id, const char *record,
                      const char *outbox_field)
{
    char *field = strdup(outbox_field);
    rd_kafka_resp_err_t e;

    if (!field)
        return -1;
    /* Called from settler threads too: never poll here (delivery reports
     * are served by the consumer thread). A full queue is not a loss: the
     * record is in the Redis outbox and the sweep publishes it again. */
    e = rd_kafka_producev(
        pb->rk, RD_KAFKA_V_RKT(pb->rkt_settle), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
        RD_KAFKA_V_KEY(request_id, strlen(request_id)),
        RD_KAFKA_V_VALUE((void *)record, strlen(record)), RD_KAFKA_V_OPAQUE(field), RD_KAFKA_V_END);
    if (e) {
        /* Stays in the outbox; the periodic sweep publishes it again. */
        bw_log(BW_LOG_WARN, "settlement record produce failed", "request_id", request_id, "error",
               rd_kafka_err2str(e), NULL);
        free(field);
        return -1;
    }
    return 0;
}

void bw_publish_poll(bw_publish *pb, int timeout_ms)
{
    rd_kafka_poll(pb->rk, timeout_ms);
}

int bw_publish_flush(bw_publish *pb, int timeout_ms)
{
    return rd_kafka_flush(pb->rk, timeout_ms) == RD_KAFKA_RESP_ERR_NO_ERROR ? 0 : -1;
}

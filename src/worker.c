/*
 * worker.c - `billing-worker run`.
 *
 * One thread does everything, in this order, so that every step's effect is
 * durable before the next depends on it:
 *
 *   1. poll a batch of messages (rd_kafka_consumer_poll, never the batch
 *      APIs: see PITFALLS.md);
 *   2. parse and validate each; malformed ones become dead letters;
 *   3. apply the valid ones in Redis in one round trip (dedup + aggregate +
 *      settlement timers, atomically per event);
 *   4. wait until Kafka acknowledged the batch's dead letters;
 *   5. only then store the batch's offsets (enable.auto.offset.store=false;
 *      the auto-commit thread commits what was stored);
 *   6. settle the requests that are due (claimed in Redis with a lease, so a
 *      crashed worker's settlements are completed by any other worker);
 *   7. publish settlement records from the Redis outbox.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <librdkafka/rdkafka.h>

#include "bw_http.h"
#include "bw_log.h"
#include "bw_metrics.h"
#include "bw_publish.h"
#include "bw_record.h"
#include "bw_settle.h"
#include "bw_store.h"
#include "bw_util.h"
#include "bw_worker.h"

#define BATCH_MAX         1000
#define CLAIM_MAX         2
#define OUTBOX_MIN_AGE_MS 10000
#define HOUSEKEEPING_MS   1000
#define DETAIL_MAX        200
#define IDLE_MS           10   /* settler sleep when nothing is due */
#define PAUSE_ABOVE       5000 /* overdue settlements: pause consumption above */
#define RESUME_BELOW      1000 /* and resume below */

static volatile sig_atomic_t stop_requested;
static volatile sig_atomic_t reload_requested;

static void on_signal(int sig)
{
    if (sig == SIGHUP) {
        reload_requested = 1;
        return;
    }
    if (stop_requested)
        _exit(1); /* a second signal: exit at once */
    stop_requested = 1;
}

struct settler;

typedef struct worker {
    bw_config *cfg;
    const bw_worker_opts *opts;
    rd_kafka_t *rk;
    bw_publish *pb;
    bw_store *st; /* the consumer thread's connection */
    bw_http *http;
    bw_pricing *pricing; /* guarded by pricing_lock (SIGHUP swaps it) */
    pthread_rwlock_t pricing_lock;
    bw_store_timers timers;
    struct settler *settlers;
    int n_settlers;
    int joined;
    int paused;
    int settlers_abandoned; /* still in a wallet call at the shutdown deadline */
    atomic_int fatal;       /* stopped on a configuration conflict: exit 2 */
    int close_abandoned;    /* the consumer close timed out */

    /* batch buffers, allocated once */
    rd_kafka_message_t **msgs;
    bw_event *events;
    bw_event **valid;
    int *valid_idx;
    int *results;
    int *dead; /* bw_event_reason per message, 0 = none */
    char (*detail)[DETAIL_MAX];

    /* outbox fields of records Kafka acknowledged, deleted once per loop */
    char **delivered;
    size_t n_delivered, cap_delivered;
} worker;

static void rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                         rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    worker *w = opaque;
    int coop = strcmp(rd_kafka_rebalance_protocol(rk), "COOPERATIVE") == 0;
    char n[16];

    snprintf(n, sizeof(n), "%d", parts->cnt);
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        bw_log(BW_LOG_INFO, "partitions assigned", "count", n, NULL);
        if (coop)
            rd_kafka_incremental_assign(rk, parts);
        else
            rd_kafka_assign(rk, parts);
        w->joined = 1;
    } else if (err == RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS) {
        bw_log(BW_LOG_INFO, "partitions revoked", "count", n, NULL);
        /* Offsets stored so far are committed by the auto-commit on revoke;
         * whatever is not stored is redelivered and deduplicated. */
        if (coop)
            rd_kafka_incremental_unassign(rk, parts);
        else
            rd_kafka_assign(rk, NULL);
    } else {
        bw_log(BW_LOG_ERROR, "rebalance error", "error", rd_kafka_err2str(err), NULL);
        rd_kafka_assign(rk, NULL);
    }
}

static int stats_cb(rd_kafka_t *rk, char *json, size_t len, void *opaque)
{
    bw_metrics_set_lag_from_stats(json, len);
    return 0; /* librdkafka frees json */
}

/*
 * A settler thread claims due settlements and settles them, with its own
 * Redis connection and HTTP handles, so that slow wallet calls never hold up
 * consumption and several settlements are in flight at once.
 */
typedef struct settler {
    worker *w;
    bw_store *st;
    bw_settle *se;
    pthread_t th;
    int started;
} settler;

/* Delivery reports are served on the consumer thread: collect them, so that
 * their outbox entries go in one round trip (flush_delivered) instead of one
 * synchronous Redis call per record. */
static void on_delivered(void *ctx, const char *field, int ok)
{
    worker *w = ctx;
    char *f;

    if (!ok)
        return; /* stays in the outbox: the sweep publishes it again */
    if (w->n_delivered == w->cap_delivered) {
        size_t cap = w->cap_delivered ? 2 * w->cap_delivered : 256;
        char **v = realloc(w->delivered, cap * sizeof(*v));
        if (!v)
            return; /* republished by the sweep: a duplicate record, never a loss */
        w->delivered = v;
        w->cap_delivered = cap;
    }
    if ((f = strdup(field)))
        w->delivered[w->n_delivered++] = f;
}

static void flush_delivered(worker *w)
{
    if (w->n_delivered == 0)
        return;
    if (w->st)
        bw_store_outbox_done(w->st, w->delivered, w->n_delivered);
    for (size_t i = 0; i < w->n_delivered; i++)
        free(w->delivered[i]);
    w->n_delivered = 0;
}

static int consumer_new(worker *w, char *err, size_t errsize)
{
    bw_config *cfg = w->cfg;
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_topic_partition_list_t *topics;
    char rkerr[512];
    static const char *defaults[] = {
        "enable.auto.offset.store=false",   "enable.auto.commit=true",
        "auto.offset.reset=earliest",       "partition.assignment.strategy=cooperative-sticky",
        "queued.max.messages.kbytes=16384", "enable.partition.eof=false",
        "statistics.interval.ms=5000" /* consumer lag for /metrics */};

    if (rd_kafka_conf_set(conf, "bootstrap.servers", cfg->brokers, rkerr, sizeof(rkerr)) ||
        rd_kafka_conf_set(conf, "group.id", cfg->group_id, rkerr, sizeof(rkerr))) {
        bw_seterr(err, errsize, "kafka: %s", rkerr);
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    if (bw_kafka_conf_apply(conf, (char *const *)defaults, sizeof(defaults) / sizeof(*defaults),
                            err, errsize) < 0 ||
        bw_kafka_conf_apply(conf, cfg->properties, cfg->n_properties, err, errsize) < 0 ||
        bw_kafka_conf_apply(conf, w->opts->xprops, w->opts->n_xprops, err, errsize) < 0) {
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    /* The at-least-once contract depends on this one: refuse an override. */
    if (rd_kafka_conf_set(conf, "enable.auto.offset.store", "false", rkerr, sizeof(rkerr))) {
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    rd_kafka_conf_set_rebalance_cb(conf, rebalance_cb);
    rd_kafka_conf_set_log_cb(conf, bw_kafka_log_cb);
    rd_kafka_conf_set_stats_cb(conf, stats_cb);
    rd_kafka_conf_set_opaque(conf, w);
    w->rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, rkerr, sizeof(rkerr));
    if (!w->rk) {
        bw_seterr(err, errsize, "kafka consumer: %s", rkerr);
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    conf = NULL; /* rd_kafka_new() took it */
    rd_kafka_poll_set_consumer(w->rk);
    topics = rd_kafka_topic_partition_list_new((int)cfg->n_topics);
    for (size_t i = 0; i < cfg->n_topics; i++)
        rd_kafka_topic_partition_list_add(topics, cfg->topics[i], RD_KAFKA_PARTITION_UA);
    if (rd_kafka_subscribe(w->rk, topics)) {
        bw_seterr(err, errsize, "kafka subscribe failed");
        rd_kafka_topic_partition_list_destroy(topics);
        return -1;
    }
    rd_kafka_topic_partition_list_destroy(topics);
    return 0;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Read a record field as a string ("" when absent or null). */
static const char *rec_str(const json_t *rec, const char *key)
{
    const char *s = json_string_value(json_object_get(rec, key));
    return s ? s : "";
}

/* What the settle module asks right before it would use the fallback. */
typedef struct fallback_check {
    settler *s;
    const char *rid;
    int gen;
    long long attempt;
} fallback_check;

static int fallback_allowed(void *ctx)
{
    fallback_check *fb = ctx;
    return bw_store_fallback_ok(fb->s->st, fb->rid, fb->gen, fb->attempt);
}

/* Exponential backoff for pending settlements: 1 s, 2 s, 4 s ... capped. */
static int64_t pending_delay(const bw_config *cfg, int attempts)
{
    int64_t d = 1000;
    for (int i = 0; i < attempts && d < cfg->retry_max_interval_ms; i++)
        d *= 2;
    return d < cfg->retry_max_interval_ms ? d : cfg->retry_max_interval_ms;
}

/* Price a claimed generation and store the result as its intent. */
static char *decide_intent(settler *s, const bw_claim *c)
{
    worker *w = s->w;
    bw_charge ch;
    bw_record_meta meta = {c->request_id, c->user_id, c->session_id,
                           c->org_id,     c->gen,     c->finalize};
    char err[256], *txt, *stored = NULL;
    json_t *rec;

    /* One pricing version per request: the intent is priced under the read
     * lock and stored once; later attempts reuse it. */
    pthread_rwlock_rdlock(&w->pricing_lock);
    if (bw_pricing_price(w->pricing, c->calls, c->n_calls, c->gen == 0, &ch, err, sizeof(err)) <
        0) {
        pthread_rwlock_unlock(&w->pricing_lock);
        bw_log(BW_LOG_ERROR, "pricing failed", "request_id", c->request_id, "error", err, NULL);
        return NULL;
    }
    rec = bw_record_new(&meta, &ch, w->pricing, "pending");
    pthread_rwlock_unlock(&w->pricing_lock);
    bw_charge_free(&ch);
    if (!rec)
        return NULL;
    txt = bw_record_dump(rec);
    json_decref(rec);
    if (txt && bw_store_put_intent(s->st, c->request_id, c->gen, txt, &stored) < 0)
        stored = NULL;
    free(txt);
    return stored;
}

/* Settle one claimed request. */
static void process_claim(settler *s, const char *rid)
{
    worker *w = s->w;
    bw_claim c;
    char *intent = NULL, *out = NULL, reason_text[128], enc[BW_ENC_ID_MAX + 1];
    char field[BW_ENC_ID_MAX + 24], gen[16];
    json_t *rec = NULL;
    int64_t t0 = bw_mono_ms() * 1000;
    int rc = bw_store_load(s->st, rid, &c);

    if (rc <= 0)
        return;
    intent = c.intent ? strdup(c.intent) : decide_intent(s, &c);
    if (!intent || !(rec = json_loads(intent, 0, NULL))) {
        bw_store_defer(s->st, rid, c.gen, 60000, c.wallet_only);
        goto out;
    }
    snprintf(gen, sizeof(gen), "%d", c.gen);
    if (c.gen > 0 && !w->cfg->late_policy_adjust) {
        bw_record_set_outcome(rec, "recorded", NULL, NULL, NULL, NULL, bw_now_ms());
        atomic_fetch_add(&bw_stats.recorded, 1);
    } else if (w->opts->shadow) {
        bw_record_set_outcome(rec, "dry_run", NULL, NULL, NULL, NULL, bw_now_ms());
        atomic_fetch_add(&bw_stats.dry_run, 1);
    } else if (json_integer_value(json_object_get(rec, "amount_micro")) == 0) {
        /* Nothing to charge (a zero adjustment, or no minimum): no wallet call. */
        bw_record_set_outcome(rec, "settled", NULL, NULL, NULL, NULL, bw_now_ms());
    } else {
        bw_settle_req req;
        bw_settle_result res;
        char *breakdown = NULL;
        fallback_check fb;

        if (bw_record_settle_req(rec, &req, reason_text, sizeof(reason_text), &breakdown) < 0) {
            bw_store_defer(s->st, rid, c.gen, 60000, c.wallet_only);
            goto out;
        }
        req.wallet_only = c.wallet_only;
        /* No service is called unless Redis recorded that an attempt began. */
        fb.s = s;
        fb.rid = rid;
        fb.gen = c.gen;
        fb.attempt = bw_store_begin_attempt(s->st, rid, c.gen);
        if (fb.attempt < 1) {
            free(breakdown);
            goto out;
        }
        req.fallback_allowed = fallback_allowed;
        req.fallback_ctx = &fb;
        req.lease_ms = w->timers.lease_ms; /* renewed by the load above */
        rc = bw_settle_charge(s->se, &req, &res);
        free(breakdown);
        atomic_store(&bw_stats.wallet_circuit_open, bw_settle_breaker_open(s->se));
        if (rc < 0 || res.status == BW_SETTLE_PENDING) {
            int64_t delay = pending_delay(w->cfg, c.attempts);
            char d[24];
            if (rc == 0 && res.retry_after_ms > delay)
                delay = res.retry_after_ms;
            snprintf(d, sizeof(d), "%" PRId64, delay);
            bw_log(BW_LOG_WARN, "settlement pending", "request_id", rid, "generation", gen,
                   "reason", rc < 0 ? "internal error" : res.reason, "retry_in_ms", d,
                   "outcome_unknown", (rc == 0 && res.outcome_unknown) ? "true" : "false", NULL);
            bw_store_defer(s->st, rid, c.gen, delay,
                           c.wallet_only || (rc == 0 && res.outcome_unknown));
            atomic_fetch_add(&bw_stats.deferred, 1);
            goto out;
        }
        if (res.status == BW_SETTLE_SETTLED) {
            bw_record_set_outcome(rec, "settled", res.via, res.transaction_id, res.balance_after,
                                  NULL, bw_now_ms());
            if (strcmp(res.via, "wallet") == 0)
                atomic_fetch_add(&bw_stats.settled_wallet, 1);
            else
                atomic_fetch_add(&bw_stats.settled_fallback, 1);
            atomic_fetch_add(
                &bw_stats.credits_settled_micro,
                (unsigned long long)json_integer_value(json_object_get(rec, "amount_micro")));
        } else {
            bw_record_set_outcome(rec, "rejected", res.via, NULL, NULL, res.reason, bw_now_ms());
            atomic_fetch_add(&bw_stats.rejected, 1);
        }
    }
    out = bw_record_dump(rec);
    if (!out)
        goto out;
    rc = bw_store_complete(s->st, rid, c.gen, out);
    if (rc == 1) {
        bw_pct_encode(rid, strlen(rid), enc, sizeof(enc));
        snprintf(field, sizeof(field), "%s:%d", enc, c.gen);
        bw_publish_record(w->pb, rid, out, field);
        bw_metrics_observe_settle(bw_mono_ms() * 1000 - t0);
        bw_log(BW_LOG_INFO, "request settled", "request_id", rid, "generation", gen, "status",
               rec_str(rec, "status"), "amount_credits", rec_str(rec, "amount_credits"), "via",
               rec_str(rec, "settled_via"), "finalize", rec_str(rec, "finalize"), NULL);
    }
out:
    if (rec)
        json_decref(rec);
    free(out);
    free(intent);
    bw_claim_free(&c);
}

static void *settler_main(void *arg)
{
    settler *s = arg;
    char **rids;
    int n;

    while (!stop_requested) {
        n = bw_store_claim_due(s->st, CLAIM_MAX, &rids);
        if (n < 0 && bw_store_layout_conflict(s->st)) {
            bw_log(BW_LOG_ERROR,
                   "stopping: the redis cluster holds another bucket count than redis.url", NULL);
            atomic_store(&s->w->fatal, 1);
            stop_requested = 1;
        }
        if (n <= 0) {
            free(rids);
            sleep_ms(n < 0 ? 500 : IDLE_MS);
            continue;
        }
        for (int i = 0; i < n; i++) {
            /* Draining: hand what was claimed but not started back at once. */
            if (stop_requested)
                bw_store_release(s->st, rids[i]);
            else
                process_claim(s, rids[i]);
        }
        bw_store_free_strings(rids, (size_t)n);
    }
    return NULL;
}

static int settlers_start(worker *w, char *err, size_t errsize)
{
    w->n_settlers = w->cfg->settle_concurrency > 0 ? w->cfg->settle_concurrency : 1;
    w->settlers = calloc((size_t)w->n_settlers, sizeof(*w->settlers));
    if (!w->settlers)
        return -1;
    /* Create every handle before any thread starts (curl_global_init). */
    for (int i = 0; i < w->n_settlers; i++) {
        settler *s = &w->settlers[i];
        s->w = w;
        if (!(s->st = bw_store_new(w->cfg->redis_url, &w->timers, err, errsize)) ||
            !(s->se = bw_settle_new(w->cfg, err, errsize)))
            return -1;
        if (w->opts->shadow)
            bw_store_shadow(s->st);
    }
    for (int i = 0; i < w->n_settlers; i++) {
        if (pthread_create(&w->settlers[i].th, NULL, settler_main, &w->settlers[i]) != 0) {
            bw_seterr(err, errsize, "cannot start settler threads");
            return -1;
        }
        w->settlers[i].started = 1;
    }
    return 0;
}

static void settlers_stop(worker *w)
{
    for (int i = 0; w->settlers && i < w->n_settlers; i++) {
        settler *s = &w->settlers[i];
        if (s->started)
            pthread_join(s->th, NULL);
        bw_settle_destroy(s->se);
        bw_store_destroy(s->st);
    }
    free(w->settlers);
    w->settlers = NULL;
}

static void publish_outbox(worker *w)
{
    char **fields, **records;
    int n = bw_store_outbox_due(w->st, OUTBOX_MIN_AGE_MS, 500, &fields, &records);

    for (int i = 0; i < n; i++) {
        const char *colon = strrchr(fields[i], ':');
        json_t *rec = json_loads(records[i], 0, NULL);
        const char *rid = rec ? rec_str(rec, "request_id") : "";
        (void)colon;
        bw_publish_record(w->pb, rid, records[i], fields[i]);
        if (rec)
            json_decref(rec);
    }
    if (n > 0) {
        bw_store_free_strings(fields, (size_t)n);
        bw_store_free_strings(records, (size_t)n);
    } else {
        free(fields);
        free(records);
    }
}

static void reload_pricing(worker *w)
{
    bw_pricing *p = NULL;
    char err[512];

    if (bw_pricing_load_file(w->opts->config_path, &p, err, sizeof(err)) < 0) {
        bw_log(BW_LOG_ERROR, "pricing reload refused; keeping the current pricing", "error", err,
               "version", w->pricing->version, NULL);
        atomic_fetch_add(&bw_stats.pricing_reload_failed, 1);
        return;
    }
    bw_log(BW_LOG_INFO, "pricing reloaded", "old_version", w->pricing->version, "new_version",
           p->version, "sha256", p->sha256, NULL);
    pthread_rwlock_wrlock(&w->pricing_lock);
    bw_pricing_free(w->pricing);
    w->pricing = p;
    w->cfg->pricing = p;
    pthread_rwlock_unlock(&w->pricing_lock);
    atomic_fetch_add(&bw_stats.pricing_reload_ok, 1);
}

/* Produce the batch's dead letters and wait for Kafka's acknowledgement. */
static int flush_dead_letters(worker *w, int n)
{
    int any = 0;

    for (int attempt = 0; !stop_requested || attempt == 0; attempt++) {
        any = 0;
        for (int i = 0; i < n; i++) {
            if (!w->dead[i])
                continue;
            any = 1;
            bw_publish_dlq(w->pb, w->msgs[i], bw_event_reason_str((bw_event_reason)w->dead[i]),
                           w->detail[i]);
        }
        if (!any || bw_publish_dlq_wait(w->pb, 30000) == 0)
            return 0;
        bw_log(BW_LOG_WARN, "dead letters not acknowledged; producing them again", NULL);
        sleep_ms(500);
    }
    return -1;
}

static void store_offsets(worker *w, int n)
{
    rd_kafka_topic_partition_list_t *offs = rd_kafka_topic_partition_list_new(n);
    rd_kafka_resp_err_t e;

    for (int i = 0; i < n; i++) {
        rd_kafka_message_t *m = w->msgs[i];
        rd_kafka_topic_partition_t *tp =
            rd_kafka_topic_partition_list_find(offs, rd_kafka_topic_name(m->rkt), m->partition);
        if (!tp)
            tp = rd_kafka_topic_partition_list_add(offs, rd_kafka_topic_name(m->rkt), m->partition);
        if (m->offset + 1 > tp->offset)
            tp->offset = m->offset + 1;
    }
    e = rd_kafka_offsets_store(w->rk, offs);
    if (e)
        bw_log(BW_LOG_DEBUG, "offsets store (partitions revoked meanwhile?)", "error",
               rd_kafka_err2str(e), NULL);
    rd_kafka_topic_partition_list_destroy(offs);
}

/* Steps 2-5 for one batch. @returns 0, or -1 if stopped before it was durable. */
static int process_batch(worker *w, int n)
{
    int nv = 0;
    char err[256];

    for (int i = 0; i < n; i++) {
        rd_kafka_message_t *m = w->msgs[i];
        bw_event_reason r =
            bw_event_parse(m->payload ? m->payload : "", m->len, (size_t)w->cfg->max_event_bytes,
                           &w->events[i], w->detail[i], DETAIL_MAX);
        atomic_fetch_add(&bw_stats.events_consumed, 1);
        w->dead[i] = (int)r;
        if (r == BW_EVR_OK) {
            w->valid[nv] = &w->events[i];
            w->valid_idx[nv++] = i;
        }
    }
    while (nv > 0 &&
           bw_store_apply(w->st, w->valid, (size_t)nv, w->results, err, sizeof(err)) < 0) {
        atomic_store(&bw_stats.ready, 0);
        if (bw_store_layout_conflict(w->st)) {
            bw_log(BW_LOG_ERROR,
                   "stopping: the redis cluster holds another bucket count than redis.url", NULL);
            atomic_store(&w->fatal, 1);
            stop_requested = 1;
            return -1;
        }
        bw_log(BW_LOG_WARN, "redis unavailable; retrying the batch", "error", err, NULL);
        if (stop_requested)
            return -1;
        sleep_ms(500);
    }
    for (int k = 0; k < nv; k++) {
        int i = w->valid_idx[k];
        switch (w->results[k]) {
        case BW_APPLY_NEW:
            atomic_fetch_add(&bw_stats.events_applied, 1);
            break;
        case BW_APPLY_LATE:
            atomic_fetch_add(&bw_stats.events_applied, 1);
            atomic_fetch_add(&bw_stats.late_events, 1);
            break;
        case BW_APPLY_DUP:
            atomic_fetch_add(&bw_stats.duplicates, 1);
            break;
        case BW_APPLY_DUP_CONFLICT:
            atomic_fetch_add(&bw_stats.duplicates, 1);
            atomic_fetch_add(&bw_stats.duplicates_conflicting, 1);
            bw_log(BW_LOG_WARN, "duplicate with a different payload; the first wins", "request_id",
                   w->events[i].request_id, "dedup_key", bw_event_dedup_key(&w->events[i]), NULL);
            break;
        case BW_APPLY_USER_MISMATCH:
            w->dead[i] = BW_EVR_USER_MISMATCH;
            snprintf(w->detail[i], DETAIL_MAX, "user_id differs from the request's first event");
            break;
        }
    }
    for (int i = 0; i < n; i++) {
        if (w->dead[i]) {
            char part[16], off[24];
            snprintf(part, sizeof(part), "%d", (int)w->msgs[i]->partition);
            snprintf(off, sizeof(off), "%lld", (long long)w->msgs[i]->offset);
            atomic_fetch_add(&bw_stats.dead_letters[w->dead[i]], 1);
            bw_log(BW_LOG_WARN, "dead letter", "reason",
                   bw_event_reason_str((bw_event_reason)w->dead[i]), "detail", w->detail[i],
                   "partition", part, "offset", off, NULL);
        }
    }
    if (flush_dead_letters(w, n) < 0)
        return -1;
    store_offsets(w, n);
    return 0;
}

static int poll_batch(worker *w)
{
    int n = 0;

    while (n < BATCH_MAX) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(w->rk, n == 0 ? 100 : 0);
        if (!m)
            break;
        if (m->err) {
            if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
                bw_log(BW_LOG_WARN, "consumer error", "error", rd_kafka_message_errstr(m), NULL);
            rd_kafka_message_destroy(m);
            continue;
        }
        w->msgs[n++] = m;
    }
    return n;
}

typedef struct close_arg {
    rd_kafka_t *rk;
} close_arg;

static void *close_thread(void *arg)
{
    rd_kafka_consumer_close(((close_arg *)arg)->rk);
    return NULL;
}

/* Leave the group, bounded: the cooperative protocol can hang in close. */
static int close_consumer(rd_kafka_t *rk, int64_t timeout_ms)
{
    pthread_t th;
    close_arg a = {rk};
    struct timespec ts;

    if (pthread_create(&th, NULL, close_thread, &a) != 0)
        return -1;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += timeout_ms / 1000;
    ts.tv_nsec += (timeout_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    if (pthread_timedjoin_np(th, NULL, &ts) != 0) {
        bw_log(BW_LOG_WARN, "consumer close timed out; exiting without waiting", NULL);
        pthread_detach(th);
        return -1;
    }
    return 0;
}

/* Pause every assigned partition, or resume them (backpressure). */
static void set_paused(worker *w, int pause, long long overdue)
{
    rd_kafka_topic_partition_list_t *parts = NULL;
    char n[24];

    if (rd_kafka_assignment(w->rk, &parts) || !parts)
        return;
    snprintf(n, sizeof(n), "%lld", overdue);
    if (pause)
        rd_kafka_pause_partitions(w->rk, parts);
    else
        rd_kafka_resume_partitions(w->rk, parts);
    rd_kafka_topic_partition_list_destroy(parts);
    w->paused = pause;
    bw_log(BW_LOG_WARN, pause ? "settlements behind: consumption paused" : "consumption resumed",
           "overdue_settlements", n, NULL);
}

static void housekeeping(worker *w)
{
    long long due = bw_store_due_count(w->st);
    long long overdue = bw_store_overdue_count(w->st);

    publish_outbox(w);
    if (due >= 0)
        atomic_store(&bw_stats.pending_settlements, due);
    atomic_store(&bw_stats.ready, due >= 0 && w->joined);
    if (!w->paused && overdue > PAUSE_ABOVE)
        set_paused(w, 1, overdue);
    else if (w->paused && overdue >= 0 && overdue < RESUME_BELOW)
        set_paused(w, 0, overdue);
}

/* Wait for the settlers until @p deadline; past it, leave them: their
 * settlement intents are stored, so another worker resends the same key. */
static void join_settlers(worker *w, int64_t deadline)
{
    for (int i = 0; i < w->n_settlers; i++) {
        settler *s = &w->settlers[i];
        int64_t left = deadline - bw_mono_ms();
        struct timespec ts;

        if (!s->started)
            continue;
        if (left < 100)
            left = 100;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += left / 1000;
        ts.tv_nsec += (left % 1000) * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        if (pthread_timedjoin_np(s->th, NULL, &ts) != 0) {
            bw_log(BW_LOG_WARN,
                   "a settlement is still in flight at the shutdown deadline; "
                   "it will be completed by a worker later",
                   NULL);
            w->settlers_abandoned = 1;
            return;
        }
        s->started = 0;
    }
}

int bw_worker_run(bw_config *cfg, const bw_worker_opts *opts)
{
    worker w;
    char err[512];
    int rc = 1;
    int64_t next_housekeeping = 0;
    bw_store_timers *timers = &w.timers;
    struct sigaction sa;

    memset(&w, 0, sizeof(w));
    w.cfg = cfg;
    w.opts = opts;
    w.pricing = cfg->pricing;
    pthread_rwlock_init(&w.pricing_lock, NULL);

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    w.msgs = calloc(BATCH_MAX, sizeof(*w.msgs));
    w.events = calloc(BATCH_MAX, sizeof(*w.events));
    w.valid = calloc(BATCH_MAX, sizeof(*w.valid));
    w.valid_idx = calloc(BATCH_MAX, sizeof(*w.valid_idx));
    w.results = calloc(BATCH_MAX, sizeof(*w.results));
    w.dead = calloc(BATCH_MAX, sizeof(*w.dead));
    w.detail = calloc(BATCH_MAX, sizeof(*w.detail));
    if (!w.msgs || !w.events || !w.valid || !w.valid_idx || !w.results || !w.dead || !w.detail) {
        bw_log(BW_LOG_ERROR, "out of memory", NULL);
        goto out;
    }

    timers->request_timeout_ms = cfg->request_timeout_ms;
    timers->finalize_grace_ms = cfg->finalize_grace_ms;
    timers->retention_ms = cfg->dedup_retention_ms;
    /* A claim outlives the longest settlement attempt (every try at both
     * services), so two workers rarely settle one request at once; if they
     * do, both send the same key and amount and the wallet applies it once. */
    timers->lease_ms =
        2 * cfg->max_attempts * (cfg->wallet.timeout_ms + cfg->user_service.timeout_ms);
    if (timers->lease_ms < 5000)
        timers->lease_ms = 5000;
    if (timers->lease_ms > 5 * 60 * 1000)
        timers->lease_ms = 5 * 60 * 1000;
    if ((w.st = bw_store_new(cfg->redis_url, timers, err, sizeof(err))) && opts->shadow)
        bw_store_shadow(w.st);
    if (w.st && bw_store_check_layout(w.st) == -2) {
        /* before joining the group: no partition waits for this worker */
        bw_log(BW_LOG_ERROR, "start-up failed: the redis cluster holds another bucket count", NULL);
        rc = 2;
        goto out;
    }
    if (!w.st ||
        !(w.pb = bw_publish_new(cfg, opts->xprops, opts->n_xprops, on_delivered, &w, err,
                                sizeof(err))) ||
        settlers_start(&w, err, sizeof(err)) < 0 || consumer_new(&w, err, sizeof(err)) < 0) {
        bw_log(BW_LOG_ERROR, "start-up failed", "error", err, NULL);
        goto out;
    }
    if (cfg->http_listen && *cfg->http_listen &&
        !(w.http = bw_http_start(cfg->http_listen, err, sizeof(err)))) {
        bw_log(BW_LOG_ERROR, "start-up failed", "error", err, NULL);
        goto out;
    }
    bw_log(BW_LOG_INFO, "billing-worker started", "version", BW_VERSION, "group", cfg->group_id,
           "pricing_version", w.pricing->version, "shadow", opts->shadow ? "true" : "false", NULL);

    while (!stop_requested) {
        int n = poll_batch(&w);

        if (n > 0) {
            int ok = process_batch(&w, n);
            for (int i = 0; i < n; i++)
                rd_kafka_message_destroy(w.msgs[i]);
            if (ok < 0)
                break;
        }
        if (reload_requested) {
            reload_requested = 0;
            reload_pricing(&w);
        }
        bw_publish_poll(w.pb, 0);
        flush_delivered(&w);
        if (bw_mono_ms() >= next_housekeeping) {
            next_housekeeping = bw_mono_ms() + HOUSEKEEPING_MS;
            housekeeping(&w);
        }
    }

    bw_log(BW_LOG_INFO, "draining", NULL);
    atomic_store(&bw_stats.draining, 1);
    {
        int64_t deadline = bw_mono_ms() + cfg->shutdown_timeout_ms;
        rd_kafka_resp_err_t e;

        join_settlers(&w, deadline);
        e = rd_kafka_commit(w.rk, NULL, 0);
        if (e && e != RD_KAFKA_RESP_ERR__NO_OFFSET)
            bw_log(BW_LOG_WARN, "final offset commit failed", "error", rd_kafka_err2str(e), NULL);
        w.close_abandoned =
            close_consumer(w.rk, deadline - bw_mono_ms() > 1000 ? deadline - bw_mono_ms() : 1000) <
            0;
        if (bw_publish_flush(
                w.pb, (int)(deadline - bw_mono_ms() > 500 ? deadline - bw_mono_ms() : 500)) < 0)
            bw_log(BW_LOG_WARN, "records still in flight at exit stay in the outbox", NULL);
        flush_delivered(&w);
    }
    rc = 0;
    bw_log(BW_LOG_INFO, "stopped", NULL);
out:
    if (w.http)
        bw_http_stop(w.http);
    if (w.rk && rc != 0)
        rd_kafka_consumer_close(w.rk);
    /* after a timed-out close its thread still runs in librdkafka: destroying
     * the handle would wait for it (librdkafka #4527); the exit frees it */
    if (w.rk && !w.close_abandoned)
        rd_kafka_destroy(w.rk);
    if (!w.settlers_abandoned) {
        stop_requested = 1;
        settlers_stop(&w);
    }
    bw_publish_destroy(w.pb);
    flush_delivered(&w); /* reports served by the destroy */
    free(w.delivered);
    bw_store_destroy(w.st);
    pthread_rwlock_destroy(&w.pricing_lock);
    cfg->pricing = w.pricing;
    free(w.msgs);
    free(w.events);
    free(w.valid);
    free(w.valid_idx);
    free(w.results);
    free(w.dead);
    free(w.detail);
    return rc == 0 && atomic_load(&w.fatal) ? 2 : rc;
}

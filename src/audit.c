/*
 * audit.c - `billing-worker audit` and `billing-worker replay`
 * (PRODUCT.md sections 5 and 8; docs/audit.md is the operator's view).
 *
 * Both rebuild the requests of a time window from the input topic exactly as
 * the worker does (bw_event_parse, the user check against the request's first
 * event, dedup by idempotency_key else event_id, first wins) without ever
 * touching the live consumer group: a throw-away group.id that never joins
 * (assign() with explicit offsets found by offsets-for-times) and never
 * commits. `audit` then only reads and prints: it never calls the wallet or
 * the user service and does not even connect to Redis. `replay --settle`
 * settles the requests that have no final outcome in the settlements topic,
 * with the worker's idempotency keys, and publishes their records.
 *
 * Reconciliation of one request. The worker splits a request into the charge
 * (generation 0) and adjustments 1..n by arrival time: the events applied
 * before a generation was closed belong to it. All events of a request are in
 * one partition, in order, and dedup keeps the first occurrence, so
 * generation g holds a contiguous run of the request's deduplicated usage
 * events, in offset order, of exactly model_calls + tool_calls of its record.
 * The audit walks the records in generation order, reprices each run with the
 * pricing the record names (pricing_sha256; a charge with the minimum, an
 * adjustment without), and compares amount, counts, tokens and lines. The
 * totals therefore also agree: the sum of the records equals the sum of the
 * recomputed runs, and the summed line calls/tokens equal the events'.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <glob.h>
#include <inttypes.h>
#include <libgen.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>
#include <librdkafka/rdkafka.h>

#include "bw_audit.h"
#include "bw_event.h"
#include "bw_log.h"
#include "bw_pricing.h"
#include "bw_publish.h"
#include "bw_record.h"
#include "bw_settle.h"
#include "bw_util.h"

#define POLL_MS         100
#define STALL_MS        60000 /* no message and no end of partition for this long: fail */
#define META_TIMEOUT_MS 15000
#define PROGRESS_MS     250
/* The settlements topic is read from (from - margin - this): records are
 * produced after their events, this covers clock skew of CreateTime topics. */
#define SETTLEMENTS_SKEW_MS (60LL * 60 * 1000)
#define MAX_VARIANTS        4      /* distinct records kept per idempotency key */
#define MAX_ADJUSTMENT      100000 /* a record claiming more is not the worker's */
#define TEXT_MAX            1024
#define KEY_MAX             (BW_ENC_ID_MAX + 32)
#define MICRO               INT64_C(1000000)

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    if (stop_requested)
        _exit(1); /* a second signal: exit at once */
    stop_requested = 1;
}

static void install_signals(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

/* ---- a string-keyed hash map (open addressing) ---------------------------- */

typedef struct hmap {
    char **keys;
    void **vals;
    size_t cap, n;
} hmap;

static uint64_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h ^ (h >> 29);
}

static int hmap_grow(hmap *h)
{
    size_t ncap = h->cap ? h->cap * 2 : 1024;
    char **nk = calloc(ncap, sizeof(*nk));
    void **nv = calloc(ncap, sizeof(*nv));

    if (!nk || !nv) {
        free(nk);
        free(nv);
        return -1;
    }
    for (size_t i = 0; i < h->cap; i++) {
        size_t j;
        if (!h->keys[i])
            continue;
        j = hash_str(h->keys[i]) & (ncap - 1);
        while (nk[j])
            j = (j + 1) & (ncap - 1);
        nk[j] = h->keys[i];
        nv[j] = h->vals[i];
    }
    free(h->keys);
    free(h->vals);
    h->keys = nk;
    h->vals = nv;
    h->cap = ncap;
    return 0;
}

/**
 * The value slot of @p key. Absent: NULL, or with @p create a new slot
 * holding NULL (*created = 1). NULL with @p create means out of memory.
 */
static void **hmap_slot(hmap *h, const char *key, int create, int *created)
{
    size_t j;

    if (created)
        *created = 0;
    if (h->cap) {
        for (j = hash_str(key) & (h->cap - 1); h->keys[j]; j = (j + 1) & (h->cap - 1))
            if (strcmp(h->keys[j], key) == 0)
                return &h->vals[j];
    }
    if (!create)
        return NULL;
    if ((h->n + 1) * 10 > h->cap * 7 && hmap_grow(h) < 0)
        return NULL;
    j = hash_str(key) & (h->cap - 1);
    while (h->keys[j])
        j = (j + 1) & (h->cap - 1);
    if (!(h->keys[j] = strdup(key)))
        return NULL;
    h->vals[j] = NULL;
    h->n++;
    if (created)
        *created = 1;
    return &h->vals[j];
}

static void *hmap_get(const hmap *h, const char *key)
{
    void **v = hmap_slot((hmap *)h, key, 0, NULL);
    return v ? *v : NULL;
}

static void hmap_free(hmap *h, void (*free_val)(void *))
{
    for (size_t i = 0; i < h->cap; i++) {
        if (!h->keys[i])
            continue;
        if (free_val && h->vals[i])
            free_val(h->vals[i]);
        free(h->keys[i]);
    }
    free(h->keys);
    free(h->vals);
    memset(h, 0, sizeof(*h));
}

/* ---- money text --------------------------------------------------------- */

/* Millionths as decimal text with @p decimals decimals (0..6); exact. */
static void fmt_micro(int64_t micro, int decimals, char *buf, size_t size)
{
    uint64_t a = micro < 0 ? (uint64_t)0 - (uint64_t)micro : (uint64_t)micro;
    uint64_t frac = a % (uint64_t)MICRO;
    char f[8];

    snprintf(f, sizeof(f), "%06" PRIu64, frac);
    f[decimals] = '\0';
    if (decimals > 0)
        snprintf(buf, size, "%s%" PRIu64 ".%s", micro < 0 ? "-" : "", a / (uint64_t)MICRO, f);
    else
        snprintf(buf, size, "%s%" PRIu64, micro < 0 ? "-" : "", a / (uint64_t)MICRO);
}

/* Decimals an amount of millionths needs. */
static int micro_decimals(int64_t micro)
{
    int64_t frac = (micro < 0 ? -micro : micro) % MICRO;
    int d = 6;

    if (frac == 0)
        return 0;
    while (frac % 10 == 0) {
        frac /= 10;
        d--;
    }
    return d;
}

/* "9.000000" -> "9", "5.250000" -> "5.25" (for messages). */
static void trim_zeros(char *s)
{
    char *dot = strchr(s, '.'), *end;
    if (!dot)
        return;
    end = s + strlen(s) - 1;
    while (end > dot && *end == '0')
        *end-- = '\0';
    if (end == dot)
        *end = '\0';
}

/* ---- pricing versions ---------------------------------------------------- */

/* The current pricing plus earlier versions found on disk, by sha256. */
typedef struct pricings {
    const bw_pricing *current;
    bw_pricing **v;
    size_t n, cap;
} pricings;

static const bw_pricing *pricings_find(const pricings *ps, const char *sha)
{
    if (!sha)
        return NULL;
    if (strcmp(ps->current->sha256, sha) == 0)
        return ps->current;
    for (size_t i = 0; i < ps->n; i++)
        if (strcmp(ps->v[i]->sha256, sha) == 0)
            return ps->v[i];
    return NULL;
}

static void pricings_load_glob(pricings *ps, const char *pattern)
{
    glob_t g;

    if (glob(pattern, 0, NULL, &g) != 0)
        return;
    for (size_t i = 0; i < g.gl_pathc; i++) {
        bw_pricing *p = NULL;
        char err[512];

        if (bw_pricing_load_file(g.gl_pathv[i], &p, err, sizeof(err)) < 0) {
            bw_log(BW_LOG_WARN, "pricing file skipped", "file", g.gl_pathv[i], "error", err, NULL);
            continue;
        }
        if (pricings_find(ps, p->sha256)) {
            bw_pricing_free(p);
            continue;
        }
        if (ps->n == ps->cap) {
            size_t ncap = ps->cap ? ps->cap * 2 : 8;
            bw_pricing **nv = realloc(ps->v, ncap * sizeof(*nv));
            if (!nv) {
                bw_pricing_free(p);
                break;
            }
            ps->v = nv;
            ps->cap = ncap;
        }
        ps->v[ps->n++] = p;
        bw_log(BW_LOG_DEBUG, "pricing version available", "file", g.gl_pathv[i], "version",
               p->version, "sha256", p->sha256, NULL);
    }
    globfree(&g);
}

/* Earlier versions: pricing-*.cfg beside the config file, and *.cfg in
 * --pricing-dir. Unreadable or invalid files are logged and skipped. */
static void pricings_load(pricings *ps, const bw_config *cfg, const char *pricing_dir)
{
    char pattern[4096];

    memset(ps, 0, sizeof(*ps));
    ps->current = cfg->pricing;
    if (cfg->path) {
        char *copy = strdup(cfg->path);
        if (copy) {
            snprintf(pattern, sizeof(pattern), "%s/pricing-*.cfg", dirname(copy));
            pricings_load_glob(ps, pattern);
            free(copy);
        }
    }
    if (pricing_dir && *pricing_dir) {
        snprintf(pattern, sizeof(pattern), "%s/*.cfg", pricing_dir);
        pricings_load_glob(ps, pattern);
    }
}

static void pricings_free(pricings *ps)
{
    for (size_t i = 0; i < ps->n; i++)
        bw_pricing_free(ps->v[i]);
    free(ps->v);
}

/* ---- reading partitions by time ------------------------------------------ */

/* One partition to read: [start, end); the window itself is [win_start, win_end). */
typedef struct span {
    char topic[256];
    int32_t partition;
    int64_t start, end, win_start, win_end;
    int64_t pos; /* next offset expected */
    int done;
} span;

typedef struct spans {
    span *v;
    size_t n, cap;
} spans;

typedef struct reader {
    rd_kafka_t *rk;
    int progress; /* stderr is a terminal */
    const char *phase;
    int64_t total, done, t0, last_print;
} reader;

typedef int(msg_cb)(void *ctx, const rd_kafka_message_t *m, const span *sp);

static rd_kafka_t *reader_client(const bw_config *cfg, const bw_audit_opts *o, char *err,
                                 size_t errsize)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_t *rk;
    char rkerr[512], gid[96];
    static const char *defaults[] = {"queued.max.messages.kbytes=16384",
                                     "client.id=billing-worker-audit"};
    /* Applied after the operator's properties: never commit, never join. */
    static const char *forced[] = {"enable.auto.commit=false", "enable.auto.offset.store=false",
                                   "enable.partition.eof=true", "auto.offset.reset=error",
                                   "allow.auto.create.topics=false"};

    snprintf(gid, sizeof(gid), "bw-audit-%ld-%lld", (long)getpid(), (long long)bw_now_ms());
    if (rd_kafka_conf_set(conf, "bootstrap.servers", cfg->brokers, rkerr, sizeof(rkerr))) {
        bw_seterr(err, errsize, "kafka: %s", rkerr);
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    if (bw_kafka_conf_apply(conf, (char *const *)defaults, sizeof(defaults) / sizeof(*defaults),
                            err, errsize) < 0 ||
        bw_kafka_conf_apply(conf, cfg->properties, cfg->n_properties, err, errsize) < 0 ||
        bw_kafka_conf_apply(conf, o->xprops, o->n_xprops, err, errsize) < 0 ||
        bw_kafka_conf_apply(conf, (char *const *)forced, sizeof(forced) / sizeof(*forced), err,
                            errsize) < 0 ||
        rd_kafka_conf_set(conf, "group.id", gid, rkerr, sizeof(rkerr))) {
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    rd_kafka_conf_set_log_cb(conf, bw_kafka_log_cb);
    rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, rkerr, sizeof(rkerr));
    if (!rk) {
        bw_seterr(err, errsize, "kafka consumer: %s", rkerr);
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    /* rd_kafka_new() took conf */
    rd_kafka_poll_set_consumer(rk);
    return rk;
}

static void reader_close(reader *r)
{
    if (!r->rk)
        return;
    rd_kafka_assign(r->rk, NULL);
    rd_kafka_consumer_close(r->rk); /* assign() only: no group to leave, nothing to commit */
    rd_kafka_destroy(r->rk);
    r->rk = NULL;
}

static span *spans_add(spans *ss)
{
    if (ss->n == ss->cap) {
        size_t ncap = ss->cap ? ss->cap * 2 : 16;
        span *nv = realloc(ss->v, ncap * sizeof(*nv));
        if (!nv)
            return NULL;
        ss->v = nv;
        ss->cap = ncap;
    }
    memset(&ss->v[ss->n], 0, sizeof(span));
    return &ss->v[ss->n++];
}

/* For each partition in @p list: the first offset at or after @p ts_ms
 * (offsets-for-times), the high watermark when there is none. */
static int offsets_at(reader *r, const char *topic, int n, const int64_t *hi, int64_t ts_ms,
                      int64_t *out, char *err, size_t errsize)
{
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(n);
    rd_kafka_resp_err_t e;
    int rc = -1;

    if (ts_ms < 0)
        ts_ms = 0;
    for (int p = 0; p < n; p++)
        rd_kafka_topic_partition_list_add(list, topic, p)->offset = ts_ms;
    e = rd_kafka_offsets_for_times(r->rk, list, META_TIMEOUT_MS);
    if (e) {
        bw_seterr(err, errsize, "offsets for times on %s: %s", topic, rd_kafka_err2str(e));
        goto out;
    }
    for (int i = 0; i < list->cnt; i++) {
        const rd_kafka_topic_partition_t *tp = &list->elems[i];
        if (tp->err) {
            bw_seterr(err, errsize, "offsets for times on %s [%d]: %s", topic, (int)tp->partition,
                      rd_kafka_err2str(tp->err));
            goto out;
        }
        out[tp->partition] = tp->offset < 0 ? hi[tp->partition] : tp->offset;
        if (out[tp->partition] > hi[tp->partition])
            out[tp->partition] = hi[tp->partition];
    }
    rc = 0;
out:
    rd_kafka_topic_partition_list_destroy(list);
    return rc;
}

/* offsets_at(), with INT64_MIN / INT64_MAX for the low / high watermarks. */
static int offsets_for(reader *r, const char *topic, int n, const int64_t *low, const int64_t *high,
                       int64_t ts_ms, int64_t *out, char *err, size_t errsize)
{
    if (ts_ms == INT64_MIN || ts_ms == INT64_MAX) {
        memcpy(out, ts_ms == INT64_MIN ? low : high, (size_t)n * sizeof(int64_t));
        return 0;
    }
    return offsets_at(r, topic, n, high, ts_ms, out, err, errsize);
}

/**
 * Plan the reading of every partition of @p topic: [lo_ms, hi_ms) with the
 * window [from_ms, to_ms) inside it. INT64_MIN / INT64_MAX stand for the
 * low / high watermark.
 */
static int plan_topic(reader *r, const char *topic, int64_t lo_ms, int64_t from_ms, int64_t to_ms,
                      int64_t hi_ms, spans *ss, char *err, size_t errsize)
{
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(r->rk, topic, NULL);
    const struct rd_kafka_metadata *md = NULL;
    int64_t *low = NULL, *high = NULL, *a = NULL, *b = NULL, *c = NULL, *d = NULL;
    rd_kafka_resp_err_t e;
    int n = 0, rc = -1;

    if (!rkt) {
        bw_seterr(err, errsize, "kafka topic %s: %s", topic,
                  rd_kafka_err2str(rd_kafka_last_error()));
        return -1;
    }
    e = rd_kafka_metadata(r->rk, 0, rkt, &md, META_TIMEOUT_MS);
    if (e || md->topic_cnt != 1 || md->topics[0].err) {
        bw_seterr(err, errsize, "kafka metadata of %s: %s", topic,
                  rd_kafka_err2str(e               ? e
                                   : md->topic_cnt ? md->topics[0].err
                                                   : e));
        goto out;
    }
    n = md->topics[0].partition_cnt;
    low = calloc((size_t)n + 1, sizeof(int64_t));
    high = calloc((size_t)n + 1, sizeof(int64_t));
    a = calloc((size_t)n + 1, sizeof(int64_t));
    b = calloc((size_t)n + 1, sizeof(int64_t));
    c = calloc((size_t)n + 1, sizeof(int64_t));
    d = calloc((size_t)n + 1, sizeof(int64_t));
    if (!low || !high || !a || !b || !c || !d) {
        bw_seterr(err, errsize, "out of memory");
        goto out;
    }
    for (int p = 0; p < n; p++) {
        e = rd_kafka_query_watermark_offsets(r->rk, topic, p, &low[p], &high[p], META_TIMEOUT_MS);
        if (e) {
            bw_seterr(err, errsize, "watermarks of %s [%d]: %s", topic, p, rd_kafka_err2str(e));
            goto out;
        }
    }
    if (offsets_for(r, topic, n, low, high, lo_ms, a, err, errsize) < 0 ||
        offsets_for(r, topic, n, low, high, from_ms, b, err, errsize) < 0 ||
        offsets_for(r, topic, n, low, high, to_ms, c, err, errsize) < 0 ||
        offsets_for(r, topic, n, low, high, hi_ms, d, err, errsize) < 0)
        goto out;
    for (int p = 0; p < n; p++) {
        span *sp = spans_add(ss);
        if (!sp) {
            bw_seterr(err, errsize, "out of memory");
            goto out;
        }
        snprintf(sp->topic, sizeof(sp->topic), "%s", topic);
        sp->partition = p;
        /* Offsets before the low watermark are gone (retention): start there. */
        sp->start = a[p] < low[p] ? low[p] : a[p];
        sp->end = d[p];
        sp->win_start = b[p];
        sp->win_end = c[p];
        if (sp->end < sp->start)
            sp->end = sp->start;
        /* The oldest message kept is already in the window and older ones
         * were deleted: the window may have lost its beginning. */
        if (from_ms != INT64_MIN && b[p] == low[p] && low[p] > 0 && b[p] < c[p]) {
            char part[16];
            snprintf(part, sizeof(part), "%d", p);
            bw_log(BW_LOG_WARN,
                   "the window may start before the oldest message kept (retention): "
                   "requests at its beginning may be incomplete",
                   "topic", topic, "partition", part, NULL);
        }
    }
    rc = 0;
out:
    if (md)
        rd_kafka_metadata_destroy(md);
    rd_kafka_topic_destroy(rkt);
    free(low);
    free(high);
    free(a);
    free(b);
    free(c);
    free(d);
    return rc;
}

static void progress(reader *r, int final)
{
    int64_t now = bw_mono_ms();
    double secs, rate, left;

    if (!r->progress || (!final && now - r->last_print < PROGRESS_MS))
        return;
    r->last_print = now;
    if (final) {
        fputs("\r\033[K", stderr);
        fflush(stderr);
        return;
    }
    /* Display only: binary floating point is fine here. */
    secs = (double)(now - r->t0) / 1000.0;
    rate = secs > 0 ? (double)r->done / secs : 0;
    left = rate > 0 ? (double)(r->total - r->done) / rate : 0;
    fprintf(stderr, "\r%s: %" PRId64 " of %" PRId64 " messages, %.0f msg/s, %.0f s left\033[K",
            r->phase, r->done, r->total, rate, left);
    fflush(stderr);
}

static span *find_span(spans *ss, const char *topic, int32_t partition)
{
    for (size_t i = 0; i < ss->n; i++)
        if (ss->v[i].partition == partition && strcmp(ss->v[i].topic, topic) == 0)
            return &ss->v[i];
    return NULL;
}

static void finish_span(reader *r, span *sp, size_t *left)
{
    rd_kafka_topic_partition_list_t *one = rd_kafka_topic_partition_list_new(1);

    r->done += sp->end > sp->pos ? sp->end - sp->pos : 0;
    sp->pos = sp->end;
    sp->done = 1;
    (*left)--;
    rd_kafka_topic_partition_list_add(one, sp->topic, sp->partition);
    rd_kafka_pause_partitions(r->rk, one); /* nothing more is needed from it */
    rd_kafka_topic_partition_list_destroy(one);
}

static int fatal_consumer_error(rd_kafka_resp_err_t e)
{
    return e == RD_KAFKA_RESP_ERR__AUTO_OFFSET_RESET ||
           e == RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE ||
           e == RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED ||
           e == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART ||
           e == RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION;
}

/* Read every span once, in offset order per partition, calling @p cb. */
static int read_spans(reader *r, spans *ss, msg_cb *cb, void *ctx, const char *phase, char *err,
                      size_t errsize)
{
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new((int)ss->n + 1);
    size_t left = 0;
    int64_t idle_since = bw_mono_ms();
    rd_kafka_resp_err_t e;
    int rc = -1;

    r->phase = phase;
    r->total = 0;
    r->done = 0;
    r->t0 = bw_mono_ms();
    r->last_print = 0; /* the first message shows the line at once */
    for (size_t i = 0; i < ss->n; i++) {
        span *sp = &ss->v[i];
        sp->pos = sp->start;
        sp->done = sp->start >= sp->end;
        if (sp->done)
            continue;
        rd_kafka_topic_partition_list_add(list, sp->topic, sp->partition)->offset = sp->start;
        left++;
        r->total += sp->end - sp->start;
    }
    bw_log(BW_LOG_DEBUG, "reading", "phase", phase, NULL);
    if (left == 0) {
        rc = 0;
        goto out;
    }
    if ((e = rd_kafka_assign(r->rk, list))) {
        bw_seterr(err, errsize, "kafka assign: %s", rd_kafka_err2str(e));
        goto out;
    }
    while (left > 0) {
        rd_kafka_message_t *m;
        span *sp;

        if (stop_requested) {
            bw_seterr(err, errsize, "interrupted");
            goto out;
        }
        m = rd_kafka_consumer_poll(r->rk, POLL_MS);
        progress(r, 0);
        if (!m) {
            if (bw_mono_ms() - idle_since > STALL_MS) {
                for (size_t i = 0; i < ss->n; i++)
                    if (!ss->v[i].done) {
                        bw_seterr(err, errsize,
                                  "%s: no message for %d s from %s [%d] at offset %" PRId64
                                  " (reading up to %" PRId64 ")",
                                  phase, STALL_MS / 1000, ss->v[i].topic, (int)ss->v[i].partition,
                                  ss->v[i].pos, ss->v[i].end);
                        break;
                    }
                goto out;
            }
            continue;
        }
        idle_since = bw_mono_ms();
        sp = m->rkt ? find_span(ss, rd_kafka_topic_name(m->rkt), m->partition) : NULL;
        if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF) {
            if (sp && !sp->done)
                finish_span(r, sp, &left);
        } else if (m->err) {
            if (fatal_consumer_error(m->err)) {
                bw_seterr(err, errsize, "%s: %s%s", phase, rd_kafka_message_errstr(m),
                          m->err == RD_KAFKA_RESP_ERR__AUTO_OFFSET_RESET ||
                                  m->err == RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE
                              ? " (deleted by retention while reading?)"
                              : "");
                rd_kafka_message_destroy(m);
                goto out;
            }
            bw_log(BW_LOG_WARN, "consumer error", "error", rd_kafka_message_errstr(m), NULL);
        } else if (sp && !sp->done) {
            if (m->offset >= sp->end) {
                finish_span(r, sp, &left);
            } else if (m->offset >= sp->pos) {
                if (cb(ctx, m, sp) < 0) {
                    bw_seterr(err, errsize, "out of memory");
                    rd_kafka_message_destroy(m);
                    goto out;
                }
                r->done += m->offset + 1 - sp->pos;
                sp->pos = m->offset + 1;
                if (sp->pos >= sp->end)
                    finish_span(r, sp, &left);
            }
        }
        rd_kafka_message_destroy(m);
    }
    rc = 0;
out:
    rd_kafka_assign(r->rk, NULL);
    progress(r, 1);
    rd_kafka_topic_partition_list_destroy(list);
    return rc;
}

/* ---- requests from the input topic ------------------------------------------ */

enum { CLS_MATCHED = 0, CLS_MISMATCHED, CLS_UNSETTLED };
static const char *const cls_names[] = {"matched", "mismatched", "unsettled"};

struct recset;

typedef struct areq {
    char *rid;
    char user[BW_ID_MAX + 1], sess[BW_ID_MAX + 1], org[BW_ID_MAX + 1];
    bw_call *calls; /* deduplicated usage events, in offset order */
    size_t n_calls, cap_calls;
    uint64_t n_model, n_tool, duplicates, conflicting;
    int in_window;
    int finalized, has_expected;
    uint64_t xm, xt;
    int64_t first_ms, last_ms; /* broker time of the first and last event */
    struct recset *recs;

    /* the verdict */
    int cls, rejected, pricing_missing;
    size_t n_records;
    int64_t expected_micro, settled_micro;
    int has_rec_amounts; /* mismatched: the record concerned */
    int64_t rec_micro, calc_micro;
    char key[KEY_MAX];
    char *line, *detail; /* malloc'ed, or NULL */
    const char *pricing_version;
} areq;

typedef struct collector {
    const bw_config *cfg;
    hmap reqs;    /* request id -> areq */
    areq **order; /* first-seen order */
    size_t n_order, cap_order;
    hmap seen;  /* "request id \x1f dedup key" -> content hash */
    hmap names; /* interned model and tool names */
    uint64_t messages, in_window, malformed, user_mismatch;
    int warned_create_time;
} collector;

static void areq_free(void *v)
{
    areq *q = v;
    free(q->calls);
    free(q->line);
    free(q->detail);
    free(q);
}

/* A hash of what the worker's store compares for a duplicate ("first wins"). */
static uint64_t content_hash(const bw_event *ev)
{
    char buf[BW_NAME_MAX + 200];

    snprintf(buf, sizeof(buf),
             "%d|%d|%d|%" PRIu64 "|%" PRIu64 "|%" PRIu64 "|%" PRIu64 "|%" PRIu64 "|%" PRIu64
             "|%s|%s|%d|%" PRIu64 "|%" PRIu64,
             (int)ev->type, ev->failed, (int)ev->usage_shape, ev->usage.input, ev->usage.cache_read,
             ev->usage.cache_write, ev->usage.output, ev->usage.reasoning, ev->units, ev->name,
             ev->final_status, ev->has_expected, ev->expected_model_calls, ev->expected_tool_calls);
    return hash_str(buf) | 1; /* never 0: the map's values are pointers */
}

/* One copy of each model and tool name: the map's key is the string. */
static const char *intern(collector *c, const char *name)
{
    void **slot = hmap_slot(&c->names, name, 1, NULL);

    if (!slot)
        return NULL;
    if (!*slot)
        *slot = c->names.keys[slot - c->names.vals];
    return *slot;
}

static int collect_input(void *ctx, const rd_kafka_message_t *m, const span *sp)
{
    collector *c = ctx;
    int in_win = m->offset >= sp->win_start && m->offset < sp->win_end;
    char err[256], dkey[2 * BW_ID_MAX + 4];
    rd_kafka_timestamp_type_t tstype;
    int64_t ts = rd_kafka_message_timestamp(m, &tstype);
    bw_event ev;
    areq *q;
    void **slot;
    int created;
    uint64_t h;

    c->messages++;
    if (in_win)
        c->in_window++;
    if (tstype == RD_KAFKA_TIMESTAMP_CREATE_TIME && !c->warned_create_time) {
        c->warned_create_time = 1;
        bw_log(BW_LOG_WARN,
               "the input topic uses CreateTime: the window follows the producers' clocks "
               "(set message.timestamp.type=LogAppendTime)",
               "topic", sp->topic, NULL);
    }
    if (bw_event_parse(m->payload ? m->payload : "", m->len,
                       c->cfg->max_event_bytes > 0 ? (size_t)c->cfg->max_event_bytes : 65536, &ev,
                       err, sizeof(err)) != BW_EVR_OK) {
        if (in_win)
            c->malformed++;
        return 0;
    }
    slot = hmap_slot(&c->reqs, ev.request_id, 1, &created);
    if (!slot)
        return -1;
    if (created) {
        q = calloc(1, sizeof(*q));
        if (!q)
            return -1;
        *slot = q;
        q->rid = strdup(ev.request_id);
        snprintf(q->user, sizeof(q->user), "%s", ev.user_id);
        snprintf(q->sess, sizeof(q->sess), "%s", ev.session_id);
        snprintf(q->org, sizeof(q->org), "%s", ev.org_id);
        q->first_ms = ts;
        if (c->n_order == c->cap_order) {
            size_t ncap = c->cap_order ? c->cap_order * 2 : 256;
            areq **nv = realloc(c->order, ncap * sizeof(*nv));
            if (!nv)
                return -1;
            c->order = nv;
            c->cap_order = ncap;
        }
        c->order[c->n_order++] = q;
        if (!q->rid)
            return -1;
    }
    q = *slot;
    if (in_win)
        q->in_window = 1;
    /* The worker's order: user check first (dead letter), then dedup. */
    if (strcmp(q->user, ev.user_id) != 0) {
        if (in_win)
            c->user_mismatch++;
        return 0;
    }
    snprintf(dkey, sizeof(dkey), "%s\x1f%s", ev.request_id, bw_event_dedup_key(&ev));
    h = content_hash(&ev);
    slot = hmap_slot(&c->seen, dkey, 1, &created);
    if (!slot)
        return -1;
    if (!created) {
        q->duplicates++;
        if ((uint64_t)(uintptr_t)*slot != (h & UINTPTR_MAX))
            q->conflicting++;
        return 0;
    }
    *slot = (void *)(uintptr_t)h;
    q->last_ms = ts;
    if (ev.type == BW_EV_FINALIZE) {
        if (!q->finalized) {
            q->finalized = 1;
            q->has_expected = ev.has_expected;
            q->xm = ev.expected_model_calls;
            q->xt = ev.expected_tool_calls;
        }
        return 0;
    }
    if (q->n_calls == q->cap_calls) {
        size_t ncap = q->cap_calls ? q->cap_calls * 2 : 8;
        bw_call *nv = realloc(q->calls, ncap * sizeof(*nv));
        if (!nv)
            return -1;
        q->calls = nv;
        q->cap_calls = ncap;
    }
    {
        bw_call *call = &q->calls[q->n_calls];
        memset(call, 0, sizeof(*call));
        call->type = ev.type;
        call->name = intern(c, ev.name);
        call->failed = ev.failed;
        call->has_usage = ev.usage_shape != BW_USAGE_NONE;
        call->usage = ev.usage;
        call->units = ev.units;
        if (!call->name)
            return -1;
    }
    q->n_calls++;
    if (ev.type == BW_EV_MODEL)
        q->n_model++;
    else
        q->n_tool++;
    return 0;
}

static void collector_free(collector *c)
{
    hmap_free(&c->reqs, NULL);
    for (size_t i = 0; i < c->n_order; i++) {
        free(c->order[i]->rid);
        areq_free(c->order[i]);
    }
    free(c->order);
    hmap_free(&c->seen, NULL);
    hmap_free(&c->names, NULL);
}

/* The worker's finalize reason for a request settled with all its events. */
static const char *finalize_reason(const areq *q)
{
    if (!q->finalized)
        return "timeout";
    if (!q->has_expected)
        return "marker";
    return (q->n_model >= q->xm && q->n_tool >= q->xt) ? "expected_met" : "incomplete";
}

static int selected(const bw_audit_opts *o, const char *rid, const char *user)
{
    return (!o->request || strcmp(o->request, rid) == 0) &&
           (!o->user || strcmp(o->user, user) == 0);
}

/* Read the input topics: [from - margin, to + margin), the window marked. */
static int read_input(reader *r, const bw_config *cfg, const bw_audit_opts *o, collector *c,
                      char *err, size_t errsize)
{
    spans ss = {0};
    int64_t margin =
        o->has_margin ? o->margin_ms : cfg->request_timeout_ms + cfg->finalize_grace_ms;
    int rc = -1;

    for (size_t i = 0; i < cfg->n_topics; i++)
        if (plan_topic(r, cfg->topics[i], o->from_ms - margin, o->from_ms, o->to_ms,
                       o->to_ms + margin, &ss, err, errsize) < 0)
            goto out;
    rc = read_spans(r, &ss, collect_input, c, "input", err, errsize);
out:
    free(ss.v);
    return rc;
}

/* ---- records from the settlements topic --------------------------------------- */

typedef struct arec {
    int adjustment;
    char key[KEY_MAX];
    json_t *v[MAX_VARIANTS]; /* distinct records for this key, first first */
    char *canon[MAX_VARIANTS];
    size_t nvar, copies;
} arec;

typedef struct recset {
    arec *v;
    size_t n, cap;
} recset;

/* A record settled in the window for a request without events. */
typedef struct orphan {
    char *rid, *user, *key, *status;
    int64_t micro;
} orphan;

typedef struct auditor {
    const bw_config *cfg;
    const bw_audit_opts *o;
    collector col;
    pricings ps;
    hmap orphans; /* idempotency key -> orphan */
    orphan **orphan_order;
    size_t n_orphans, cap_orphans;
    uint64_t records_read, bad_records;
    int decimals; /* of the credits printed */
} auditor;

static void recset_free(recset *rs)
{
    if (!rs)
        return;
    for (size_t i = 0; i < rs->n; i++)
        for (size_t k = 0; k < rs->v[i].nvar; k++) {
            json_decref(rs->v[i].v[k]);
            free(rs->v[i].canon[k]);
        }
    free(rs->v);
    free(rs);
}

static void orphan_free(void *v)
{
    orphan *x = v;
    free(x->rid);
    free(x->user);
    free(x->key);
    free(x->status);
    free(x);
}

/*
 * The statuses that count as an outcome: settled, rejected, recorded. With
 * --shadow only dry_run: the records of a `run --shadow` worker are audited
 * as if they were the settlements (the real charges are the old system's).
 */
static int counted_status(const char *status, int shadow)
{
    if (!status)
        return 0;
    if (shadow)
        return strcmp(status, "dry_run") == 0;
    return strcmp(status, "settled") == 0 || strcmp(status, "rejected") == 0 ||
           strcmp(status, "recorded") == 0;
}

/* What two records of one key must agree on. */
static char *record_canon(const json_t *rec)
{
    json_t *o = json_object();
    const char *fields[] = {"status",          "user_id",       "amount_credits", "amount_micro",
                            "model_calls",     "tool_calls",    "tokens",         "lines",
                            "minimum_applied", "pricing_sha256"};
    char *s;

    if (!o)
        return NULL;
    for (size_t i = 0; i < sizeof(fields) / sizeof(*fields); i++) {
        json_t *v = json_object_get(rec, fields[i]);
        json_object_set(o, fields[i], v ? v : json_null());
    }
    s = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(o);
    return s;
}

static int settled_in_window(const json_t *rec, const bw_audit_opts *o)
{
    int64_t at;
    const char *s = json_string_value(json_object_get(rec, "settled_at"));
    return s && bw_parse_rfc3339(s, &at) == 0 && at >= o->from_ms && at < o->to_ms;
}

static int collect_record(void *ctx, const rd_kafka_message_t *m, const span *sp)
{
    auditor *a = ctx;
    json_t *rec = m->payload ? json_loadb(m->payload, m->len, 0, NULL) : NULL;
    const char *rid, *key, *status;
    char want[KEY_MAX];
    int adj = 0, rc = 0;
    areq *q;

    (void)sp;
    a->records_read++;
    rid = json_string_value(json_object_get(rec, "request_id"));
    key = json_string_value(json_object_get(rec, "idempotency_key"));
    status = json_string_value(json_object_get(rec, "status"));
    if (json_is_integer(json_object_get(rec, "adjustment")))
        adj = (int)json_integer_value(json_object_get(rec, "adjustment"));
    if (!json_is_object(rec) || !rid || !key || !status || adj < 0 || adj > MAX_ADJUSTMENT ||
        bw_record_idempotency_key(rid, adj, want, sizeof(want)) < 0 || strcmp(want, key) != 0 ||
        !json_is_integer(json_object_get(rec, "amount_micro"))) {
        a->bad_records++;
        goto out;
    }
    if (!counted_status(status, a->o->shadow))
        goto out; /* pending, or dry_run without --shadow: not an outcome */
    q = hmap_get(&a->col.reqs, rid);
    if (q) {
        recset *rs = q->recs;
        arec *ar = NULL;
        char *canon;

        if (!rs && !(rs = q->recs = calloc(1, sizeof(*rs)))) {
            rc = -1;
            goto out;
        }
        for (size_t i = 0; i < rs->n; i++)
            if (strcmp(rs->v[i].key, key) == 0)
                ar = &rs->v[i];
        if (!ar) {
            if (rs->n == rs->cap) {
                size_t ncap = rs->cap ? rs->cap * 2 : 2;
                arec *nv = realloc(rs->v, ncap * sizeof(*nv));
                if (!nv) {
                    rc = -1;
                    goto out;
                }
                rs->v = nv;
                rs->cap = ncap;
            }
            ar = &rs->v[rs->n++];
            memset(ar, 0, sizeof(*ar));
            ar->adjustment = adj;
            snprintf(ar->key, sizeof(ar->key), "%s", key);
        }
        ar->copies++;
        if (!(canon = record_canon(rec))) {
            rc = -1;
            goto out;
        }
        for (size_t k = 0; k < ar->nvar; k++)
            if (strcmp(ar->canon[k], canon) == 0) {
                free(canon);
                goto out; /* the same record again (at-least-once publication) */
            }
        if (ar->nvar == MAX_VARIANTS) {
            free(canon);
            goto out;
        }
        ar->canon[ar->nvar] = canon;
        ar->v[ar->nvar++] = rec;
        rec = NULL; /* kept */
    } else if (settled_in_window(rec, a->o)) {
        int created;
        void **slot = hmap_slot(&a->orphans, key, 1, &created);
        orphan *x;
        if (!slot) {
            rc = -1;
            goto out;
        }
        if (!created)
            goto out; /* first wins */
        if (!(x = calloc(1, sizeof(*x)))) {
            rc = -1;
            goto out;
        }
        *slot = x;
        x->rid = strdup(rid);
        x->key = strdup(key);
        x->status = strdup(status);
        x->user = strdup(json_string_value(json_object_get(rec, "user_id"))
                             ? json_string_value(json_object_get(rec, "user_id"))
                             : "");
        x->micro = json_integer_value(json_object_get(rec, "amount_micro"));
        if (a->n_orphans == a->cap_orphans) {
            size_t ncap = a->cap_orphans ? a->cap_orphans * 2 : 16;
            orphan **nv = realloc(a->orphan_order, ncap * sizeof(*nv));
            if (!nv) {
                rc = -1;
                goto out;
            }
            a->orphan_order = nv;
            a->cap_orphans = ncap;
        }
        a->orphan_order[a->n_orphans++] = x;
        if (!x->rid || !x->key || !x->status || !x->user)
            rc = -1;
    }
out:
    json_decref(rec);
    return rc;
}

/* ---- reconciliation ------------------------------------------------------------ */

static const char *jstr(const json_t *o, const char *key)
{
    const char *s = json_string_value(json_object_get(o, key));
    return s ? s : "";
}

static int dec_text_eq(const json_t *x, const json_t *y)
{
    bw_dec a, b;
    const char *s = json_string_value(x), *t = json_string_value(y);
    return s && t && bw_dec_from_str(&a, s) == 0 && bw_dec_from_str(&b, t) == 0 &&
           bw_dec_cmp(&a, &b) == 0;
}

static void describe_line(const json_t *ln, char *buf, size_t size)
{
    const json_t *t = json_object_get(ln, "tokens");
    int n;

    n = snprintf(buf, size, "%s %s (%s): %" JSON_INTEGER_FORMAT " calls", jstr(ln, "kind"),
                 jstr(ln, "name"), jstr(ln, "basis"),
                 json_integer_value(json_object_get(ln, "calls")));
    if (n < 0 || (size_t)n >= size)
        return;
    if (t)
        n += snprintf(buf + n, size - (size_t)n,
                      ", tokens in %" JSON_INTEGER_FORMAT " out %" JSON_INTEGER_FORMAT
                      " cache_read %" JSON_INTEGER_FORMAT " cache_write %" JSON_INTEGER_FORMAT
                      " reasoning %" JSON_INTEGER_FORMAT,
                      json_integer_value(json_object_get(t, "input")),
                      json_integer_value(json_object_get(t, "output")),
                      json_integer_value(json_object_get(t, "cache_read")),
                      json_integer_value(json_object_get(t, "cache_write")),
                      json_integer_value(json_object_get(t, "reasoning")));
    else
        n += snprintf(buf + n, size - (size_t)n, ", %" JSON_INTEGER_FORMAT " units",
                      json_integer_value(json_object_get(ln, "units")));
    if (n > 0 && (size_t)n < size)
        snprintf(buf + n, size - (size_t)n, ", %s credits", jstr(ln, "credits"));
}

static const json_t *find_line(const json_t *lines, const json_t *like)
{
    const json_t *ln;
    size_t i;

    json_array_foreach(lines, i, ln)
    {
        if (strcmp(jstr(ln, "kind"), jstr(like, "kind")) == 0 &&
            strcmp(jstr(ln, "name"), jstr(like, "name")) == 0 &&
            strcmp(jstr(ln, "basis"), jstr(like, "basis")) == 0)
            return ln;
    }
    return NULL;
}

/* json_equal() with "both absent" as equal. */
static int field_eq(const json_t *x, const json_t *y, const char *key)
{
    const json_t *a = json_object_get(x, key), *b = json_object_get(y, key);
    return (!a && !b) || (a && b && json_equal((json_t *)a, (json_t *)b));
}

static int line_eq(const json_t *x, const json_t *y)
{
    return field_eq(x, y, "calls") && field_eq(x, y, "units") && field_eq(x, y, "tokens") &&
           dec_text_eq(json_object_get(x, "credits"), json_object_get(y, "credits"));
}

/*
 * Compare a published record with the recomputed one. Lines are matched by
 * (kind, name, basis): their order in a record follows the worker's storage,
 * not the events'. @returns 1 if they differ, with the first differing line
 * (or "") in @p line and the first differing field (or "") in @p field.
 */
static int compare_record(const json_t *rec, const json_t *calc, char *line, size_t lsize,
                          char *field, size_t fsize)
{
    const json_t *rl = json_object_get(rec, "lines"), *cl = json_object_get(calc, "lines"), *ln;
    char a[400], b[400];
    size_t i;

    line[0] = field[0] = '\0';
    if (json_object_get(rec, "lines_omitted"))
        cl = rl = NULL; /* a record too big for Kafka went without its lines: amounts only */
    json_array_foreach(cl, i, ln)
    {
        const json_t *other = find_line(rl, ln);
        if (!other) {
            describe_line(ln, a, sizeof(a));
            snprintf(line, lsize, "recomputed %s; the record has no such line", a);
            break;
        }
        if (!line_eq(other, ln)) {
            describe_line(other, a, sizeof(a));
            describe_line(ln, b, sizeof(b));
            snprintf(line, lsize, "record %s; recomputed %s", a, b);
            break;
        }
    }
    if (!line[0] && json_array_size(rl) != json_array_size(cl)) {
        json_array_foreach(rl, i, ln)
        {
            if (!find_line(cl, ln)) {
                describe_line(ln, a, sizeof(a));
                snprintf(line, lsize, "record %s; not in the recomputation", a);
                break;
            }
        }
        if (!line[0])
            snprintf(line, lsize, "the record has %zu lines, the recomputation %zu",
                     json_array_size(rl), json_array_size(cl));
    }
    if (strcmp(jstr(rec, "user_id"), jstr(calc, "user_id")) != 0)
        snprintf(field, fsize, "user_id: record %s, events %s", jstr(rec, "user_id"),
                 jstr(calc, "user_id"));
    else if (!field_eq(rec, calc, "amount_micro") ||
             !dec_text_eq(json_object_get(rec, "amount_credits"),
                          json_object_get(calc, "amount_credits")))
        snprintf(field, fsize, "amount: record %s (%" JSON_INTEGER_FORMAT " micro), recomputed %s",
                 jstr(rec, "amount_credits"),
                 json_integer_value(json_object_get(rec, "amount_micro")),
                 jstr(calc, "amount_credits"));
    else if (!field_eq(rec, calc, "model_calls") || !field_eq(rec, calc, "tool_calls"))
        snprintf(field, fsize,
                 "calls: record %" JSON_INTEGER_FORMAT " model, %" JSON_INTEGER_FORMAT
                 " tool; recomputed %" JSON_INTEGER_FORMAT " model, %" JSON_INTEGER_FORMAT " tool",
                 json_integer_value(json_object_get(rec, "model_calls")),
                 json_integer_value(json_object_get(rec, "tool_calls")),
                 json_integer_value(json_object_get(calc, "model_calls")),
                 json_integer_value(json_object_get(calc, "tool_calls")));
    else if (!field_eq(rec, calc, "tokens"))
        snprintf(field, fsize, "tokens differ");
    else if (!field_eq(rec, calc, "minimum_applied"))
        snprintf(field, fsize, "minimum_applied differs");
    return line[0] || field[0];
}

/* Append "; text" to a malloc'ed note. */
static void note(char **dst, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(char **dst, const char *fmt, ...)
{
    char buf[TEXT_MAX], *s;
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (*dst) {
        if (asprintf(&s, "%s; %s", *dst, buf) < 0)
            return;
        free(*dst);
        *dst = s;
    } else {
        *dst = strdup(buf);
    }
}

static void note_decimals(auditor *a, int64_t micro)
{
    int d = micro_decimals(micro);
    if (d > a->decimals)
        a->decimals = d;
}

/* Price @p n calls into a record (status "calc"); NULL and @p err on failure. */
static json_t *recompute(const areq *q, const bw_call *calls, size_t n, int gen,
                         const bw_pricing *p, const char *finalize, char *err, size_t errsize)
{
    bw_record_meta meta = {q->rid, q->user, q->sess, q->org, gen, finalize};
    bw_charge ch;
    json_t *rec;

    if (bw_pricing_price(p, calls, n, gen == 0, &ch, err, errsize) < 0)
        return NULL;
    rec = bw_record_new(&meta, &ch, p, "calc");
    bw_charge_free(&ch);
    if (!rec)
        bw_seterr(err, errsize, "out of memory");
    return rec;
}

static size_t record_calls(const json_t *rec)
{
    json_int_t m = json_integer_value(json_object_get(rec, "model_calls"));
    json_int_t t = json_integer_value(json_object_get(rec, "tool_calls"));
    return (size_t)(m > 0 ? m : 0) + (size_t)(t > 0 ? t : 0);
}

static void mark_mismatch(auditor *a, areq *q, const char *key, int64_t rec_micro,
                          int64_t calc_micro, const char *line, const char *field)
{
    if (q->cls == CLS_MISMATCHED)
        return; /* the first difference is the one reported */
    q->cls = CLS_MISMATCHED;
    snprintf(q->key, sizeof(q->key), "%s", key);
    q->has_rec_amounts = 1;
    q->rec_micro = rec_micro;
    q->calc_micro = calc_micro;
    note_decimals(a, rec_micro);
    note_decimals(a, calc_micro);
    if (line && *line)
        q->line = strdup(line);
    if (field && *field)
        note(&q->detail, "%s", field);
}

/* The price of calls [from, to) that no final record covers (still to settle). */
static int64_t price_rest(auditor *a, areq *q, size_t from, size_t to, int as_charge)
{
    char err[256];
    json_t *calc;
    int64_t micro;

    if (!as_charge && !a->cfg->late_policy_adjust)
        return 0; /* late_policy "record": late usage is never charged */
    calc = recompute(q, q->calls + from, to - from, as_charge ? 0 : 1, a->ps.current, NULL, err,
                     sizeof(err));
    if (!calc) {
        note(&q->detail, "pricing failed: %s", err);
        return 0;
    }
    micro = json_integer_value(json_object_get(calc, "amount_micro"));
    json_decref(calc);
    return micro;
}

static void reconcile(auditor *a, areq *q)
{
    recset *rs = q->recs;
    arec **gens = NULL;
    int maxgen = -1, unknown = 0;
    size_t cursor = 0, total = q->n_calls;
    char err[256], line[TEXT_MAX], field[TEXT_MAX];

    q->cls = CLS_MATCHED;
    q->pricing_version = a->ps.current->version;
    for (size_t i = 0; rs && i < rs->n; i++)
        if (rs->v[i].adjustment > maxgen)
            maxgen = rs->v[i].adjustment;
    if (maxgen >= 0) {
        gens = calloc((size_t)maxgen + 1, sizeof(*gens));
        if (!gens) {
            note(&q->detail, "out of memory");
            q->cls = CLS_UNSETTLED;
            return;
        }
        for (size_t i = 0; i < rs->n; i++)
            gens[rs->v[i].adjustment] = &rs->v[i];
        q->n_records = rs->n;
    }
    for (int g = 0; g <= maxgen && !unknown; g++) {
        arec *ar = gens[g];
        const json_t *first;
        const bw_pricing *p;
        json_t *calc;
        size_t k;
        int64_t calc_micro;
        const char *status;

        if (!ar) {
            /* No final record for this generation (still pending?). It can
             * be placed only when it is the one gap: it holds what the later
             * records do not. */
            size_t later = 0;
            for (int h = g + 1; h <= maxgen; h++) {
                if (!gens[h])
                    unknown = 1;
                else
                    later += record_calls(gens[h]->v[0]);
            }
            if (unknown || cursor + later > total) {
                unknown = 1;
                break;
            }
            k = total - cursor - later;
            if (q->cls == CLS_MATCHED)
                q->cls = CLS_UNSETTLED;
            note(&q->detail, "%s has no final record (calls: %zu)",
                 g == 0 ? "the charge" : "an adjustment", k);
            q->expected_micro += price_rest(a, q, cursor, cursor + k, g == 0);
            cursor += k;
            continue;
        }
        first = ar->v[0];
        status = jstr(first, "status");
        k = record_calls(first);
        if (k > total - cursor) {
            char msg[TEXT_MAX];
            snprintf(msg, sizeof(msg), "record %s counts %zu calls; the events leave %zu", ar->key,
                     k, total - cursor);
            mark_mismatch(a, q, ar->key, json_integer_value(json_object_get(first, "amount_micro")),
                          0, "", msg);
            k = total - cursor;
        }
        p = pricings_find(&a->ps, json_string_value(json_object_get(first, "pricing_sha256")));
        if (!p) {
            const char *sha = jstr(first, "pricing_sha256");
            p = a->ps.current;
            if (!q->pricing_missing)
                note(&q->detail,
                     "pricing version %s (sha256 %.12s) not available; compared with the current "
                     "pricing %s",
                     jstr(first, "pricing_version"), sha, p->version);
            q->pricing_missing = 1;
        } else {
            q->pricing_version = p->version;
        }
        calc = recompute(q, q->calls + cursor, k, g, p, NULL, err, sizeof(err));
        if (!calc) {
            mark_mismatch(a, q, ar->key, json_integer_value(json_object_get(first, "amount_micro")),
                          0, "", err);
            cursor += k;
            continue;
        }
        calc_micro = json_integer_value(json_object_get(calc, "amount_micro"));
        for (size_t v = 0; v < ar->nvar; v++) {
            if (compare_record(ar->v[v], calc, line, sizeof(line), field, sizeof(field)))
                mark_mismatch(a, q, ar->key,
                              json_integer_value(json_object_get(ar->v[v], "amount_micro")),
                              calc_micro, line, field);
        }
        if (ar->nvar > 1) {
            char x[32], y[32];
            fmt_micro(json_integer_value(json_object_get(ar->v[0], "amount_micro")), 6, x,
                      sizeof(x));
            fmt_micro(json_integer_value(json_object_get(ar->v[1], "amount_micro")), 6, y,
                      sizeof(y));
            trim_zeros(x);
            trim_zeros(y);
            mark_mismatch(a, q, ar->key,
                          json_integer_value(json_object_get(ar->v[1], "amount_micro")), calc_micro,
                          "", "");
            note(&q->detail, "%zu different records for %s (%s %s, then %s %s)", ar->nvar, ar->key,
                 jstr(ar->v[0], "status"), x, jstr(ar->v[1], "status"), y);
        }
        json_decref(calc);
        if (strcmp(status, "settled") == 0 || strcmp(status, "dry_run") == 0)
            q->settled_micro += json_integer_value(json_object_get(first, "amount_micro"));
        else if (strcmp(status, "rejected") == 0)
            q->rejected = 1;
        if (strcmp(status, "recorded") != 0)
            q->expected_micro += calc_micro;
        cursor += k;
    }
    if (unknown) {
        if (q->cls == CLS_MATCHED)
            q->cls = CLS_UNSETTLED;
        note(&q->detail, "records missing for several generations; %zu calls not placed",
             total - cursor);
        q->expected_micro += price_rest(a, q, cursor, total, maxgen < 0 || !gens[0]);
    } else if (maxgen < 0) {
        if (q->cls == CLS_MATCHED)
            q->cls = CLS_UNSETTLED;
        note(&q->detail, "no final record (calls: %zu, finalize: %s)", total, finalize_reason(q));
        q->expected_micro += price_rest(a, q, 0, total, 1);
    } else if (cursor < total) {
        if (q->cls == CLS_MATCHED)
            q->cls = CLS_UNSETTLED;
        note(&q->detail, "late calls not settled yet: %zu", total - cursor);
        q->expected_micro += price_rest(a, q, cursor, total, 0);
    }
    note_decimals(a, q->expected_micro);
    note_decimals(a, q->settled_micro);
    free(gens);
}

/* ---- output ---------------------------------------------------------------------- */

typedef struct totals {
    uint64_t requests, cls[3], rejected, duplicates, conflicting, orphans, pricing_missing;
    int64_t expected, settled;
} totals;

typedef struct utot {
    uint64_t requests;
    int64_t expected, settled;
} utot;

static utot *user_tot(hmap *users, const char *user)
{
    void **slot = hmap_slot(users, user, 1, NULL);
    if (!slot)
        return NULL;
    if (!*slot)
        *slot = calloc(1, sizeof(utot));
    return *slot;
}

/* Reports list requests by the broker time of their first event. */
static int cmp_req(const void *x, const void *y)
{
    const areq *a = *(areq *const *)x, *b = *(areq *const *)y;
    if (a->first_ms != b->first_ms)
        return a->first_ms < b->first_ms ? -1 : 1;
    return strcmp(a->rid, b->rid);
}

static int cmp_str(const void *x, const void *y)
{
    return strcmp(*(char *const *)x, *(char *const *)y);
}

/* The user ids of @p users, sorted (caller frees the array, not the strings). */
static char **sorted_users(const hmap *users)
{
    char **v = calloc(users->n + 1, sizeof(*v));
    size_t k = 0;

    if (!v)
        return NULL;
    for (size_t i = 0; i < users->cap; i++)
        if (users->keys[i])
            v[k++] = users->keys[i];
    qsort(v, k, sizeof(*v), cmp_str);
    return v;
}

static void csv_field(FILE *out, const char *s, int last)
{
    if (strpbrk(s, ",\"\r\n")) {
        fputc('"', out);
        for (; *s; s++) {
            if (*s == '"')
                fputc('"', out);
            fputc(*s, out);
        }
        fputc('"', out);
    } else {
        fputs(s, out);
    }
    fputc(last ? '\n' : ',', out);
}

static json_t *exception_json(const auditor *a, const areq *q)
{
    char e[32], s[32], r[32], c[32];
    json_t *o = json_object();

    fmt_micro(q->expected_micro, a->decimals, e, sizeof(e));
    fmt_micro(q->settled_micro, a->decimals, s, sizeof(s));
    json_object_set_new(o, "class",
                        json_string(q->cls == CLS_MATCHED ? "rejected" : cls_names[q->cls]));
    json_object_set_new(o, "request_id", json_string(q->rid));
    json_object_set_new(o, "user_id", json_string(q->user));
    json_object_set_new(o, "expected_credits", json_string(e));
    json_object_set_new(o, "settled_credits", json_string(s));
    if (q->has_rec_amounts) {
        fmt_micro(q->rec_micro, a->decimals, r, sizeof(r));
        fmt_micro(q->calc_micro, a->decimals, c, sizeof(c));
        json_object_set_new(o, "idempotency_key", json_string(q->key));
        json_object_set_new(o, "record_credits", json_string(r));
        json_object_set_new(o, "recomputed_credits", json_string(c));
        json_object_set_new(o, "line", q->line ? json_string(q->line) : json_null());
    }
    json_object_set_new(o, "model_calls", json_integer((json_int_t)q->n_model));
    json_object_set_new(o, "tool_calls", json_integer((json_int_t)q->n_tool));
    json_object_set_new(o, "records", json_integer((json_int_t)q->n_records));
    json_object_set_new(o, "pricing_version", json_string(q->pricing_version));
    json_object_set_new(o, "detail", q->detail ? json_string(q->detail) : json_null());
    return o;
}

static const char orphan_detail[] =
    "a record settled in the window for a request without events in the input topic";

static json_t *orphan_json(const auditor *a, const orphan *x)
{
    char s[32], z[32];
    json_t *o = json_object();

    fmt_micro(0, a->decimals, z, sizeof(z));
    fmt_micro(strcmp(x->status, "settled") == 0 || strcmp(x->status, "dry_run") == 0 ? x->micro : 0,
              a->decimals, s, sizeof(s));
    json_object_set_new(o, "class", json_string("settled_without_events"));
    json_object_set_new(o, "request_id", json_string(x->rid));
    json_object_set_new(o, "user_id", json_string(x->user));
    json_object_set_new(o, "expected_credits", json_string(z));
    json_object_set_new(o, "settled_credits", json_string(s));
    json_object_set_new(o, "idempotency_key", json_string(x->key));
    json_object_set_new(o, "status", json_string(x->status));
    json_object_set_new(o, "detail",
                        json_string("a record settled in the window for a request "
                                    "without events in the input topic"));
    return o;
}

static int is_exception(const areq *q)
{
    return q->cls != CLS_MATCHED || q->rejected;
}

static void print_json(FILE *out, const auditor *a, const totals *t, const hmap *users, areq **list,
                       size_t n, orphan **ol, size_t no)
{
    char e[32], s[32], from[40], to[40];
    json_t *sum = json_object(), *ju = json_object();
    char **names = sorted_users(users);
    char *txt;

    fmt_micro(t->expected, a->decimals, e, sizeof(e));
    fmt_micro(t->settled, a->decimals, s, sizeof(s));
    bw_format_rfc3339(a->o->from_ms, from, sizeof(from));
    bw_format_rfc3339(a->o->to_ms, to, sizeof(to));
    json_object_set_new(sum, "requests", json_integer((json_int_t)t->requests));
    json_object_set_new(sum, "matched", json_integer((json_int_t)t->cls[CLS_MATCHED]));
    json_object_set_new(sum, "mismatched", json_integer((json_int_t)t->cls[CLS_MISMATCHED]));
    json_object_set_new(sum, "unsettled", json_integer((json_int_t)t->cls[CLS_UNSETTLED]));
    json_object_set_new(sum, "settled_without_events", json_integer((json_int_t)t->orphans));
    json_object_set_new(sum, "duplicates", json_integer((json_int_t)t->duplicates));
    json_object_set_new(sum, "expected_credits", json_string(e));
    json_object_set_new(sum, "settled_credits", json_string(s));
    json_object_set_new(sum, "duplicates_conflicting", json_integer((json_int_t)t->conflicting));
    json_object_set_new(sum, "rejected", json_integer((json_int_t)t->rejected));
    json_object_set_new(sum, "malformed", json_integer((json_int_t)a->col.malformed));
    json_object_set_new(sum, "user_mismatch", json_integer((json_int_t)a->col.user_mismatch));
    json_object_set_new(sum, "pricing_unavailable", json_integer((json_int_t)t->pricing_missing));
    json_object_set_new(sum, "messages_in_window", json_integer((json_int_t)a->col.in_window));
    json_object_set_new(sum, "records_read", json_integer((json_int_t)a->records_read));
    json_object_set_new(sum, "records_invalid", json_integer((json_int_t)a->bad_records));
    json_object_set_new(sum, "from", json_string(from));
    json_object_set_new(sum, "to", json_string(to));
    json_object_set_new(sum, "pricing_version", json_string(a->ps.current->version));
    for (size_t i = 0; names && names[i]; i++) {
        const utot *u = hmap_get(users, names[i]);
        fmt_micro(u->expected, a->decimals, e, sizeof(e));
        fmt_micro(u->settled, a->decimals, s, sizeof(s));
        json_object_set_new(ju, names[i],
                            json_pack("{sI ss ss}", "requests", (json_int_t)u->requests,
                                      "expected_credits", e, "settled_credits", s));
    }
    free(names);
    json_object_set_new(sum, "users", ju);
    txt = json_dumps(sum, JSON_COMPACT | JSON_PRESERVE_ORDER);
    fprintf(out, "%s\n", txt ? txt : "{}");
    free(txt);
    json_decref(sum);
    for (size_t i = 0; i < n; i++) {
        json_t *o;
        if (!is_exception(list[i]))
            continue;
        o = exception_json(a, list[i]);
        txt = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
        fprintf(out, "%s\n", txt ? txt : "{}");
        free(txt);
        json_decref(o);
    }
    for (size_t i = 0; i < no; i++) {
        json_t *o = orphan_json(a, ol[i]);
        txt = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
        fprintf(out, "%s\n", txt ? txt : "{}");
        free(txt);
        json_decref(o);
    }
}

static void print_csv(FILE *out, const auditor *a, areq **list, size_t n, orphan **ol, size_t no)
{
    char e[32], s[32], num[32];

    fputs("request_id,user_id,class,expected_credits,settled_credits,model_calls,tool_calls,"
          "duplicates,records,idempotency_key,record_credits,recomputed_credits,pricing_version,"
          "line,detail\n",
          out);
    for (size_t i = 0; i < n; i++) {
        const areq *q = list[i];
        fmt_micro(q->expected_micro, a->decimals, e, sizeof(e));
        fmt_micro(q->settled_micro, a->decimals, s, sizeof(s));
        csv_field(out, q->rid, 0);
        csv_field(out, q->user, 0);
        csv_field(out, q->cls == CLS_MATCHED && q->rejected ? "rejected" : cls_names[q->cls], 0);
        csv_field(out, e, 0);
        csv_field(out, s, 0);
        snprintf(num, sizeof(num), "%" PRIu64, q->n_model);
        csv_field(out, num, 0);
        snprintf(num, sizeof(num), "%" PRIu64, q->n_tool);
        csv_field(out, num, 0);
        snprintf(num, sizeof(num), "%" PRIu64, q->duplicates);
        csv_field(out, num, 0);
        snprintf(num, sizeof(num), "%zu", q->n_records);
        csv_field(out, num, 0);
        csv_field(out, q->has_rec_amounts ? q->key : "", 0);
        fmt_micro(q->rec_micro, a->decimals, e, sizeof(e));
        fmt_micro(q->calc_micro, a->decimals, s, sizeof(s));
        csv_field(out, q->has_rec_amounts ? e : "", 0);
        csv_field(out, q->has_rec_amounts ? s : "", 0);
        csv_field(out, q->pricing_version ? q->pricing_version : "", 0);
        csv_field(out, q->line ? q->line : "", 0);
        csv_field(out, q->detail ? q->detail : "", 1);
    }
    for (size_t i = 0; i < no; i++) {
        const orphan *x = ol[i];
        fmt_micro(strcmp(x->status, "settled") == 0 || strcmp(x->status, "dry_run") == 0 ? x->micro
                                                                                         : 0,
                  a->decimals, s, sizeof(s));
        csv_field(out, x->rid, 0);
        csv_field(out, x->user, 0);
        csv_field(out, "settled_without_events", 0);
        fmt_micro(0, a->decimals, e, sizeof(e));
        csv_field(out, e, 0);
        csv_field(out, s, 0);
        for (int k = 0; k < 4; k++)
            csv_field(out, "0", 0);
        csv_field(out, x->key, 0);
        fmt_micro(x->micro, a->decimals, e, sizeof(e));
        csv_field(out, e, 0); /* record_credits */
        csv_field(out, "", 0);
        csv_field(out, "", 0);
        csv_field(out, "", 0);
        csv_field(out, orphan_detail, 1);
    }
}

static void print_table(FILE *out, const auditor *a, const totals *t, const hmap *users,
                        areq **list, size_t n, orphan **ol, size_t no)
{
    char e[32], s[32], from[40], to[40];
    char **names = sorted_users(users);
    size_t nexc = 0;
    int w = 10;

    fmt_micro(t->expected, a->decimals, e, sizeof(e));
    fmt_micro(t->settled, a->decimals, s, sizeof(s));
    bw_format_rfc3339(a->o->from_ms, from, sizeof(from));
    bw_format_rfc3339(a->o->to_ms, to, sizeof(to));
    fprintf(out, "audit %s .. %s (current pricing %s)\n", from, to, a->ps.current->version);
    fprintf(out,
            "input: %" PRIu64 " messages in the window, %" PRIu64 " malformed, %" PRIu64
            " user mismatches; %" PRIu64 " settlement records read (%" PRIu64 " invalid)\n\n",
            a->col.in_window, a->col.malformed, a->col.user_mismatch, a->records_read,
            a->bad_records);
    fprintf(out, "  requests                %10" PRIu64 "\n", t->requests);
    fprintf(out, "    matched               %10" PRIu64 "\n", t->cls[CLS_MATCHED]);
    if (t->rejected)
        fprintf(out, "      of which rejected   %10" PRIu64 "\n", t->rejected);
    fprintf(out, "    mismatched            %10" PRIu64 "\n", t->cls[CLS_MISMATCHED]);
    fprintf(out, "    unsettled             %10" PRIu64 "\n", t->cls[CLS_UNSETTLED]);
    fprintf(out, "  settled without events  %10" PRIu64 "\n", t->orphans);
    fprintf(out, "  duplicates dropped      %10" PRIu64 "\n", t->duplicates);
    if (t->conflicting)
        fprintf(out, "    with another payload  %10" PRIu64 " (the first wins, as in the worker)\n",
                t->conflicting);
    if (t->pricing_missing)
        fprintf(out, "  pricing not available   %10" PRIu64 " (compared with the current)\n",
                t->pricing_missing);
    fprintf(out, "  expected credits        %10s\n", e);
    fprintf(out, "  settled credits         %10s\n\n", s);

    for (size_t i = 0; names && names[i]; i++)
        if ((int)strlen(names[i]) > w)
            w = (int)strlen(names[i]) > 40 ? 40 : (int)strlen(names[i]);
    fprintf(out, "  %-*s %8s %16s %16s\n", w, "user", "requests", "expected", "settled");
    for (size_t i = 0; names && names[i]; i++) {
        const utot *u = hmap_get(users, names[i]);
        fmt_micro(u->expected, a->decimals, e, sizeof(e));
        fmt_micro(u->settled, a->decimals, s, sizeof(s));
        fprintf(out, "  %-*s %8" PRIu64 " %16s %16s\n", w, names[i], u->requests, e, s);
    }
    free(names);

    for (size_t i = 0; i < n; i++)
        nexc += is_exception(list[i]);
    nexc += no;
    if (nexc == 0) {
        fprintf(out, "\nno exceptions\n");
        return;
    }
    fprintf(out, "\nexceptions (%zu):\n", nexc);
    for (size_t i = 0; i < n; i++) {
        const areq *q = list[i];
        if (!is_exception(q))
            continue;
        fmt_micro(q->expected_micro, a->decimals, e, sizeof(e));
        fmt_micro(q->settled_micro, a->decimals, s, sizeof(s));
        fprintf(out, "  %-22s request %s  user %s  expected %s  settled %s\n",
                q->cls == CLS_MATCHED ? "rejected" : cls_names[q->cls], q->rid, q->user, e, s);
        if (q->has_rec_amounts) {
            fmt_micro(q->rec_micro, a->decimals, e, sizeof(e));
            fmt_micro(q->calc_micro, a->decimals, s, sizeof(s));
            fprintf(out, "      record %s: %s credits, recomputed %s\n", q->key, e, s);
        }
        if (q->line)
            fprintf(out, "      line: %s\n", q->line);
        if (q->detail)
            fprintf(out, "      %s\n", q->detail);
    }
    for (size_t i = 0; i < no; i++) {
        const orphan *x = ol[i];
        fmt_micro(x->micro, a->decimals, s, sizeof(s));
        fprintf(out, "  %-22s request %s  user %s  record %s %s %s credits\n",
                "settled_without_events", x->rid, x->user, x->key, x->status, s);
    }
}

/* ---- audit ---------------------------------------------------------------------------- */

int bw_audit_main(const bw_config *cfg, const bw_audit_opts *o)
{
    auditor a;
    reader r;
    spans ss = {0};
    hmap users = {0};
    totals t;
    areq **list = NULL;
    orphan **ol = NULL;
    size_t n = 0, no = 0;
    FILE *out = NULL;
    const char *format = o->format ? o->format : "table";
    char err[1024];
    int rc = 1;

    memset(&a, 0, sizeof(a));
    memset(&r, 0, sizeof(r));
    memset(&t, 0, sizeof(t));
    install_signals();
    a.cfg = cfg;
    a.o = o;
    a.col.cfg = cfg;
    pricings_load(&a.ps, cfg, o->pricing_dir);
    a.decimals = cfg->pricing->precision;
    for (size_t i = 0; i < a.ps.n; i++)
        if (a.ps.v[i]->precision > a.decimals)
            a.decimals = a.ps.v[i]->precision;
    r.progress = isatty(STDERR_FILENO);
    if (!(r.rk = reader_client(cfg, o, err, sizeof(err))))
        goto fail;

    /* 1. The input window, with the margins that complete its requests. */
    if (read_input(&r, cfg, o, &a.col, err, sizeof(err)) < 0)
        goto fail;
    /* 2. The settlements of those requests (records come after events). */
    if (plan_topic(
            &r, cfg->settlements_topic,
            o->from_ms -
                (o->has_margin ? o->margin_ms : cfg->request_timeout_ms + cfg->finalize_grace_ms) -
                SETTLEMENTS_SKEW_MS,
            INT64_MIN, INT64_MAX, INT64_MAX, &ss, err, sizeof(err)) < 0 ||
        read_spans(&r, &ss, collect_record, &a, "settlements", err, sizeof(err)) < 0)
        goto fail;
    reader_close(&r);

    /* 3. Reconcile the requests seen in the window. */
    list = calloc(a.col.n_order + 1, sizeof(*list));
    ol = calloc(a.n_orphans + 1, sizeof(*ol));
    if (!list || !ol) {
        bw_seterr(err, sizeof(err), "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < a.col.n_order; i++) {
        areq *q = a.col.order[i];
        utot *u;
        if (!q->in_window || !selected(o, q->rid, q->user))
            continue;
        reconcile(&a, q);
        list[n++] = q;
        t.requests++;
        t.cls[q->cls]++;
        t.rejected += q->cls == CLS_MATCHED && q->rejected;
        t.duplicates += q->duplicates;
        t.conflicting += q->conflicting;
        t.pricing_missing += q->pricing_missing;
        t.expected += q->expected_micro;
        t.settled += q->settled_micro;
        if ((u = user_tot(&users, q->user))) {
            u->requests++;
            u->expected += q->expected_micro;
            u->settled += q->settled_micro;
        }
    }
    qsort(list, n, sizeof(*list), cmp_req);
    for (size_t i = 0; i < a.n_orphans; i++) {
        orphan *x = a.orphan_order[i];
        utot *u;
        int64_t settled =
            strcmp(x->status, "settled") == 0 || strcmp(x->status, "dry_run") == 0 ? x->micro : 0;
        if (!selected(o, x->rid, x->user))
            continue;
        ol[no++] = x;
        t.orphans++;
        t.settled += settled;
        note_decimals(&a, x->micro);
        if ((u = user_tot(&users, x->user)))
            u->settled += settled;
    }
    note_decimals(&a, t.expected);
    note_decimals(&a, t.settled);

    out = o->output ? fopen(o->output, "w") : stdout;
    if (!out) {
        bw_seterr(err, sizeof(err), "%s: %s", o->output, strerror(errno));
        goto fail;
    }
    if (strcmp(format, "json") == 0)
        print_json(out, &a, &t, &users, list, n, ol, no);
    else if (strcmp(format, "csv") == 0)
        print_csv(out, &a, list, n, ol, no);
    else
        print_table(out, &a, &t, &users, list, n, ol, no);
    if (fflush(out) != 0 || ferror(out)) {
        bw_seterr(err, sizeof(err), "writing the report: %s", strerror(errno));
        goto fail;
    }
    rc = (t.cls[CLS_MISMATCHED] || t.cls[CLS_UNSETTLED] || t.orphans) ? 3 : 0;
    {
        char nreq[24], nm[24], nu[24], no_[24];
        snprintf(nreq, sizeof(nreq), "%" PRIu64, t.requests);
        snprintf(nm, sizeof(nm), "%" PRIu64, t.cls[CLS_MISMATCHED]);
        snprintf(nu, sizeof(nu), "%" PRIu64, t.cls[CLS_UNSETTLED]);
        snprintf(no_, sizeof(no_), "%" PRIu64, t.orphans);
        bw_log(BW_LOG_INFO, "audit done", "requests", nreq, "mismatched", nm, "unsettled", nu,
               "settled_without_events", no_, NULL);
    }
    goto out;
fail:
    bw_log(BW_LOG_ERROR, "audit failed", "error", err, NULL);
    rc = 1;
out:
    if (out && out != stdout)
        fclose(out);
    reader_close(&r);
    free(ss.v);
    free(list);
    free(ol);
    hmap_free(&users, free);
    for (size_t i = 0; i < a.col.n_order; i++)
        recset_free(a.col.order[i]->recs);
    collector_free(&a.col);
    hmap_free(&a.orphans, orphan_free);
    free(a.orphan_order);
    pricings_free(&a.ps);
    return rc;
}

/* ---- replay ------------------------------------------------------------------------------ */

typedef struct replayer {
    const bw_audit_opts *o;
    hmap finals; /* idempotency key -> final status (static string) */
    uint64_t records_read;
    int delivered, failed;
} replayer;

static int collect_final(void *ctx, const rd_kafka_message_t *m, const span *sp)
{
    replayer *rp = ctx;
    json_t *rec = m->payload ? json_loadb(m->payload, m->len, 0, NULL) : NULL;
    const char *key = json_string_value(json_object_get(rec, "idempotency_key"));
    const char *status = json_string_value(json_object_get(rec, "status"));
    static const char *const finals[] = {"settled", "rejected", "recorded"};
    int rc = 0;

    (void)sp;
    rp->records_read++;
    for (size_t i = 0; key && status && i < sizeof(finals) / sizeof(*finals); i++) {
        if (strcmp(status, finals[i]) == 0) {
            void **slot = hmap_slot(&rp->finals, key, 1, NULL);
            if (!slot)
                rc = -1;
            else if (!*slot)
                *slot = (void *)finals[i];
            break;
        }
    }
    json_decref(rec);
    return rc;
}

static void on_delivered(void *ctx, const char *field, int ok)
{
    replayer *rp = ctx;
    (void)field;
    if (ok)
        rp->delivered++;
    else
        rp->failed++;
}

int bw_replay_main(const bw_config *cfg, const bw_audit_opts *o)
{
    replayer rp;
    collector col;
    reader r;
    spans ss = {0};
    bw_settle *se = NULL;
    bw_publish *pb = NULL;
    FILE *out = NULL;
    int json_out = o->format && strcmp(o->format, "json") == 0;
    uint64_t in_window = 0, already = 0, n_settled = 0, n_rejected = 0, n_pending = 0;
    int64_t charged = 0;
    int published = 0, rc = 1;
    char err[1024];

    memset(&rp, 0, sizeof(rp));
    memset(&col, 0, sizeof(col));
    memset(&r, 0, sizeof(r));
    install_signals();
    rp.o = o;
    col.cfg = cfg;
    r.progress = isatty(STDERR_FILENO);
    if (!(r.rk = reader_client(cfg, o, err, sizeof(err))))
        goto fail;

    /* 1. Every final outcome ever published, by idempotency key: the whole
     *    settlements topic (money moves: no shortcut here). */
    if (plan_topic(&r, cfg->settlements_topic, INT64_MIN, INT64_MIN, INT64_MAX, INT64_MAX, &ss, err,
                   sizeof(err)) < 0 ||
        read_spans(&r, &ss, collect_final, &rp, "settlements", err, sizeof(err)) < 0)
        goto fail;
    /* 2. The requests of the window. */
    if (read_input(&r, cfg, o, &col, err, sizeof(err)) < 0)
        goto fail;
    reader_close(&r);

    if (!(se = bw_settle_new(cfg, err, sizeof(err))) ||
        !(pb = bw_publish_new(cfg, o->xprops, o->n_xprops, on_delivered, &rp, err, sizeof(err))))
        goto fail;
    out = o->output ? fopen(o->output, "w") : stdout;
    if (!out) {
        bw_seterr(err, sizeof(err), "%s: %s", o->output, strerror(errno));
        goto fail;
    }
    if (!json_out)
        fprintf(out, "%-36s %-20s %14s %-13s %s\n", "request", "user", "amount", "via", "status");

    /* 3. Settle what has no final outcome, with the worker's keys, in the
     *    order the requests began. */
    qsort(col.order, col.n_order, sizeof(*col.order), cmp_req);
    for (size_t i = 0; i < col.n_order && !stop_requested; i++) {
        areq *q = col.order[i];
        char key[KEY_MAX], reason[160], perr[256], *breakdown = NULL, *txt = NULL;
        bw_record_meta meta = {q->rid, q->user, q->sess, q->org, 0, finalize_reason(q)};
        bw_charge ch;
        bw_settle_req req;
        bw_settle_result res;
        json_t *rec;
        const char *status;

        if (!q->in_window || !selected(o, q->rid, q->user))
            continue;
        in_window++;
        if (bw_record_idempotency_key(q->rid, 0, key, sizeof(key)) < 0)
            continue;
        if (hmap_get(&rp.finals, key)) {
            already++;
            continue;
        }
        if (bw_pricing_price(cfg->pricing, q->calls, q->n_calls, 1, &ch, perr, sizeof(perr)) < 0) {
            bw_log(BW_LOG_ERROR, "pricing failed", "request_id", q->rid, "error", perr, NULL);
            n_pending++;
            continue;
        }
        rec = bw_record_new(&meta, &ch, cfg->pricing, "pending");
        bw_charge_free(&ch);
        if (!rec) {
            n_pending++;
            continue;
        }
        memset(&res, 0, sizeof(res));
        if (json_integer_value(json_object_get(rec, "amount_micro")) == 0) {
            /* Nothing to charge (minimum_credits = 0): no wallet call, as the worker. */
            bw_record_set_outcome(rec, "settled", NULL, NULL, NULL, NULL, bw_now_ms());
        } else {
            int ok = bw_record_settle_req(rec, &req, reason, sizeof(reason), &breakdown) == 0;
            /* Wallet only: the state that remembered an earlier attempt with
             * an unknown outcome is lost, so the fallback is never safe (G7). */
            req.wallet_only = 1;
            if (!ok || bw_settle_charge(se, &req, &res) < 0 || res.status == BW_SETTLE_PENDING) {
                bw_log(BW_LOG_WARN, "settlement pending; run replay again", "request_id", q->rid,
                       "reason", res.reason[0] ? res.reason : "internal error", NULL);
                bw_record_set_outcome(rec, "pending", NULL, NULL, NULL,
                                      res.reason[0] ? res.reason : "internal error", bw_now_ms());
            } else if (res.status == BW_SETTLE_SETTLED) {
                bw_record_set_outcome(rec, "settled", res.via, res.transaction_id,
                                      res.balance_after, NULL, bw_now_ms());
            } else {
                bw_record_set_outcome(rec, "rejected", res.via, NULL, NULL, res.reason,
                                      bw_now_ms());
            }
        }
        free(breakdown);
        status = jstr(rec, "status");
        txt = bw_record_dump(rec);
        if (strcmp(status, "pending") == 0) {
            n_pending++;
        } else if (txt) {
            /* Final outcomes only, as the worker (pending is never published). */
            if (bw_publish_record(pb, q->rid, txt, "replay") == 0)
                published++;
            else
                rp.failed++;
            if (strcmp(status, "settled") == 0) {
                n_settled++;
                charged += json_integer_value(json_object_get(rec, "amount_micro"));
            } else {
                n_rejected++;
            }
        }
        if (json_out)
            fprintf(out, "%s\n", txt ? txt : "{}");
        else
            fprintf(out, "%-36s %-20s %14s %-13s %s%s%s\n", q->rid, q->user,
                    jstr(rec, "amount_credits"),
                    jstr(rec, "settled_via")[0] ? jstr(rec, "settled_via") : "-", status,
                    jstr(rec, "reason")[0] ? ": " : "", jstr(rec, "reason"));
        fflush(out);
        free(txt);
        json_decref(rec);
        bw_publish_poll(pb, 0);
    }
    if (bw_publish_flush(pb, 30000) < 0 || rp.failed > 0 || rp.delivered < published) {
        bw_seterr(err, sizeof(err),
                  "%d of %d records not acknowledged by Kafka: run replay again (the same keys: "
                  "nothing is charged twice)",
                  published - rp.delivered, published);
        goto fail;
    }
    {
        char c[32];
        fmt_micro(charged, cfg->pricing->precision, c, sizeof(c));
        fprintf(json_out ? stderr : out,
                "replay: %" PRIu64 " requests in the window, %" PRIu64
                " had a final outcome already; %" PRIu64 " settled (%s credits), %" PRIu64
                " rejected, %" PRIu64 " pending\n",
                in_window, already, n_settled, c, n_rejected, n_pending);
    }
    if (stop_requested) {
        bw_seterr(err, sizeof(err), "interrupted: run replay again to finish");
        goto fail;
    }
    rc = n_pending ? 1 : 0;
    if (n_pending)
        bw_log(BW_LOG_WARN, "settlements still pending: run replay again", NULL);
    goto out;
fail:
    bw_log(BW_LOG_ERROR, "replay failed", "error", err, NULL);
    rc = 1;
out:
    if (out && out != stdout)
        fclose(out);
    else if (out)
        fflush(out);
    reader_close(&r);
    bw_publish_destroy(pb);
    bw_settle_destroy(se);
    free(ss.v);
    for (size_t i = 0; i < col.n_order; i++)
        recset_free(col.order[i]->recs);
    collector_free(&col);
    hmap_free(&rp.finals, NULL);
    return rc;
}

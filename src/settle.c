/*
 * settle.c - settle one charge over HTTP: the wallet service first, the user
 * service as fallback only when the wallet call was NOT DELIVERED
 * (PRODUCT.md sections 4 G7 and 7).
 *
 * Decisions (documented for operators in the docs as well):
 *
 * - Money never passes through a double. The amount and cost_usd arrive as
 *   decimal text, are validated as plain JSON numbers and spliced into the
 *   body; jansson only writes the strings and the structure. Integers
 *   (token and call counts) are written with PRIu64.
 * - balance_after is the number's raw text as the service wrote it, found by
 *   a small scanner over the (jansson-validated) body. Only when that fails
 *   (a key written with \u escapes) is the double jansson parsed turned back
 *   into the shortest text that round-trips (%.{1..17}g).
 * - "Sent": libcurl reports request bytes written (CURLINFO_REQUEST_SIZE,
 *   CURLINFO_SIZE_UPLOAD_T) or the transfer reached its pretransfer stage
 *   (CURLINFO_PRETRANSFER_TIME_T > 0, i.e. connected, TLS done). A transport
 *   error before that point (refused, DNS, TLS, connect timeout) is "not
 *   delivered"; after it (timeout, reset, empty reply) the outcome is unknown.
 *   When in doubt the call counts as sent: the safe side is PENDING, never a
 *   second charge through the fallback.
 * - 409 without transaction_id (in flight) counts like an unknown outcome:
 *   retried at the wallet only, and PENDING with outcome_unknown = 1.
 * - Redirects are not followed; 3xx and any status not named in G7 is an
 *   unknown outcome (retried at the same service, never the fallback).
 * - Fallback outcome unknown (the user service's consume timed out or
 *   answered 500): retried at the user service within this call with the
 *   same key (it keeps keys, PRODUCT.md section 7), then PENDING with
 *   outcome_unknown = 1. Later attempts are wallet-only: the user service
 *   consumes from the same wallet ledger passing the key through, so the
 *   wallet answers a repeated key with the first outcome. A charge is never
 *   sent to the fallback after an unknown outcome at the wallet.
 * - The user service's record call moves no money: its unknown outcome is
 *   retried like "not delivered" and ends PENDING with outcome_unknown = 0.
 * - Breaker: counts consecutive not-delivered wallet attempts (including a
 *   401/403 that survived a token refresh); any other HTTP answer closes it;
 *   timeouts and broken connections neither count nor close. Open: wallet
 *   skipped (straight to the fallback, or PENDING for wallet_only charges).
 *   After the cooldown the next wallet attempt is the half-open probe.
 * - A bw_settle is not thread-safe: one per thread (each owns its curl
 *   handles and connections).
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "bw_log.h"
#include "bw_settle.h"
#include "bw_util.h"

#define SETTLE_BACKOFF_BASE_MS    100
#define SETTLE_LEASE_MARGIN_MS    1000
#define SETTLE_DEFAULT_TIMEOUT_MS 3000
#define SETTLE_JWT_TTL_S          300
#define SETTLE_JWT_RENEW_S        60
#define SETTLE_BODY_MAX           (1024 * 1024) /* response bytes kept; more is discarded */
#define SETTLE_FILE_MAX           (64 * 1024)   /* secret and token files */
#define SETTLE_CONSUL_MAX_INST    64
#define SETTLE_NUM_MAX            64 /* longest number text accepted from a caller */

typedef enum call_class {
    CALL_OK,            /* 2xx, or 409 with the proof of a previous success */
    CALL_REJECTED,      /* 400 402 404 422: final */
    CALL_AUTH,          /* 401 403: refresh the token once */
    CALL_INFLIGHT,      /* 409 without proof: the same key is being processed */
    CALL_NOT_DELIVERED, /* nothing reached the service, or it said so (429 502 503 504) */
    CALL_UNKNOWN        /* it may have been applied */
} call_class;

static const char *class_names[] = {"ok",        "rejected",      "auth",
                                    "in_flight", "not_delivered", "unknown"};

typedef enum call_kind {
    KIND_CONSUME, /* proof of success on 409: transaction_id */
    KIND_RECORD   /* proof of success on 409: data.id */
} call_kind;

typedef enum breaker_state { BREAKER_CLOSED = 0, BREAKER_OPEN, BREAKER_HALF_OPEN } breaker_state;

typedef enum auth_mode { AUTH_NONE = 0, AUTH_JWT, AUTH_TOKEN } auth_mode;

typedef struct settle_service {
    const char *name;  /* "wallet" or "user_service": logs and result.via */
    char *url;         /* base URL without a trailing '/', NULL for consul */
    char *consul_name; /* consul://<name>, else NULL */
    char *consume_path;
    char *record_path;
    long timeout_ms;
    CURL *curl; /* kept for keep-alive */
    /* consul: cached base URLs of passing instances */
    char *instances[SETTLE_CONSUL_MAX_INST];
    size_t n_instances, next_instance;
    int64_t resolved_at_ms;
} settle_service;

typedef struct http_reply {
    CURLcode cc;
    long status;
    int sent;           /* some of the request may have reached the service */
    const char *upload; /* the body, handed to libcurl by on_upload */
    size_t upload_len, upload_off;
    char phrase[96];
    int64_t retry_after_ms; /* -1: none */
    char *body;
    size_t len, cap;
    int truncated;
    char errbuf[CURL_ERROR_SIZE];
} http_reply;

struct bw_settle {
    settle_service wallet, user;

    char *consul_url;
    int64_t consul_refresh_ms;
    CURL *consul_curl;

    char *tls_ca, *tls_cert, *tls_key;

    auth_mode auth;
    char *secret_file;
    unsigned char *secret;
    size_t secret_len;
    char *token_file;
    char *token;         /* current bearer token (JWT or file), never logged */
    int64_t token_exp_s; /* JWT expiry, epoch seconds */
    char *service_name;

    int max_attempts;
    int64_t retry_max_ms;
    int breaker_failures;
    int64_t breaker_cooldown_ms;

    breaker_state br_state;
    int br_count;
    int64_t br_open_until_ms;

    uint64_t rng;
};

/* ------------------------------------------------------------------------ */
/* small helpers                                                             */

typedef struct sbuf {
    char *p;
    size_t len, cap;
    int oom;
} sbuf;

static void sb_addn(sbuf *b, const char *str, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        char *p;
        while (cap < b->len + n + 1)
            cap *= 2;
        p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, str, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_add(sbuf *b, const char *str)
{
    sb_addn(b, str, strlen(str));
}

/** @returns the built string (caller frees), NULL on allocation failure. */
static char *sb_take(sbuf *b)
{
    if (b->oom) {
        free(b->p);
        return NULL;
    }
    return b->p ? b->p : strdup("");
}

/** strdup of a configured string; NULL and "" both mean "not set". */
static char *dup_opt(const char *str)
{
    return (str && *str) ? strdup(str) : NULL;
}

static void free_secret(char **p)
{
    if (*p) {
        OPENSSL_cleanse(*p, strlen(*p));
        free(*p);
        *p = NULL;
    }
}

static void sleep_ms(int64_t ms)
{
    struct timespec ts, rem;

    if (ms <= 0)
        return;
    ts.tv_sec = (time_t)(ms / 1000);
    ts.tv_nsec = (long)(ms % 1000) * 1000000L;
    while (nanosleep(&ts, &rem) == -1 && errno == EINTR)
        ts = rem;
}

static uint64_t rng_next(bw_settle *s)
{
    /* xorshift64*: jitter only, not security */
    uint64_t x = s->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    s->rng = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/** A plain non-negative JSON number: (0|[1-9][0-9]*)(.[0-9]+)? */
static int is_decimal_text(const char *t)
{
    const char *p = t;

    if (!t || strlen(t) > SETTLE_NUM_MAX)
        return 0;
    if (*p == '0')
        p++;
    else if (*p >= '1' && *p <= '9')
        while (isdigit((unsigned char)*p))
            p++;
    else
        return 0;
    if (*p == '.') {
        p++;
        if (!isdigit((unsigned char)*p))
            return 0;
        while (isdigit((unsigned char)*p))
            p++;
    }
    return *p == '\0';
}

/** Header values: visible ASCII only (no CR/LF injection, no lost trailing spaces). */
static int is_header_safe(const char *t)
{
    if (!t || !*t || strlen(t) > 1024)
        return 0;
    for (const unsigned char *p = (const unsigned char *)t; *p; p++)
        if (*p < 0x21 || *p > 0x7e)
            return 0;
    return 1;
}

static void copy_trunc(char *dst, size_t size, const char *src, size_t n)
{
    if (n >= size)
        n = size - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

/* ------------------------------------------------------------------------ */
/* raw JSON scanning: the exact text of a member's value                     */

/*
 * These walk text jansson has already accepted, so they only need to find
 * boundaries, not validate. Each returns the position after the construct, or
 * NULL at the end of the input.
 */
static const char *js_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

static const char *js_string(const char *p, const char *end)
{
    p++; /* opening quote */
    while (p < end) {
        if (*p == '\\')
            p += 2;
        else if (*p == '"')
            return p + 1;
        else
            p++;
    }
    return NULL;
}

static const char *js_value(const char *p, const char *end)
{
    int depth = 0;

    p = js_ws(p, end);
    if (p >= end)
        return NULL;
    if (*p == '"')
        return js_string(p, end);
    if (*p != '{' && *p != '[') {
        while (p < end && !strchr(",}] \t\r\n", *p))
            p++;
        return p;
    }
    while (p < end) {
        if (*p == '"') {
            p = js_string(p, end);
            if (!p)
                return NULL;
            continue;
        }
        if (*p == '{' || *p == '[')
            depth++;
        else if (*p == '}' || *p == ']') {
            if (--depth == 0)
                return p + 1;
        }
        p++;
    }
    return NULL;
}

/** Find member @p key of the object starting at @p p; the value's text in [*vs, *ve). */
static int js_member(const char *p, const char *end, const char *key, const char **vs,
                     const char **ve)
{
    size_t klen = strlen(key);

    p = js_ws(p, end);
    if (p >= end || *p != '{')
        return -1;
    p++;
    for (;;) {
        const char *ks, *ke;
        p = js_ws(p, end);
        if (p >= end || *p != '"')
            return -1;
        ks = p + 1;
        p = js_string(p, end);
        if (!p)
            return -1;
        ke = p - 1;
        p = js_ws(p, end);
        if (p >= end || *p != ':')
            return -1;
        p = js_ws(p + 1, end);
        *vs = p;
        p = js_value(p, end);
        if (!p)
            return -1;
        if ((size_t)(ke - ks) == klen && memcmp(ks, key, klen) == 0) {
            *ve = p;
            return 0;
        }
        p = js_ws(p, end);
        if (p >= end || *p != ',')
            return -1;
        p++;
    }
}

/** The raw text of body[path[0]][path[1]]..., NULL-terminated path. */
static int js_path(const char *body, size_t len, const char *const *path, const char **vs,
                   const char **ve)
{
    const char *p = body, *end = body + len;

    for (; *path; path++) {
        if (js_member(p, end, *path, vs, ve) != 0)
            return -1;
        p = *vs;
        end = *ve;
    }
    return 0;
}

/** Text of a JSON number: the raw text if it can be found, else the shortest round trip. */
static void number_text(const json_t *v, const char *body, size_t len, const char *const *path,
                        char *out, size_t size)
{
    const char *vs, *ve;

    out[0] = '\0';
    if (body && js_path(body, len, path, &vs, &ve) == 0 && ve > vs &&
        (*vs == '-' || isdigit((unsigned char)*vs)) && (size_t)(ve - vs) < size) {
        copy_trunc(out, size, vs, (size_t)(ve - vs));
        return;
    }
    if (json_is_integer(v)) {
        snprintf(out, size, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
    } else if (json_is_real(v)) {
        double d = json_real_value(v);
        for (int prec = 1; prec <= 17; prec++) {
            snprintf(out, size, "%.*g", prec, d);
            if (strtod(out, NULL) == d)
                break;
        }
    }
}

/* ------------------------------------------------------------------------ */
/* auth: HS256 JWT or a static token                                         */

static char *b64url(const unsigned char *in, size_t n)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    char *out = malloc((n + 2) / 3 * 4 + 1), *o = out;

    if (!out)
        return NULL;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        *o++ = tab[(v >> 18) & 63];
        *o++ = tab[(v >> 12) & 63];
        if (i + 1 < n)
            *o++ = tab[(v >> 6) & 63];
        if (i + 2 < n)
            *o++ = tab[v & 63];
    }
    *o = '\0';
    return out;
}

/** Read a whole small file, trailing CR/LF stripped. @returns malloc'd, NUL-terminated. */
static char *read_small_file(const char *path, size_t *lenp, char *err, size_t errsize)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    size_t n;

    if (!f) {
        bw_seterr(err, errsize, "%s: %s", path, strerror(errno));
        return NULL;
    }
    buf = malloc(SETTLE_FILE_MAX + 1);
    if (!buf) {
        fclose(f);
        bw_seterr(err, errsize, "%s: out of memory", path);
        return NULL;
    }
    n = fread(buf, 1, SETTLE_FILE_MAX + 1, f);
    if (ferror(f) || n > SETTLE_FILE_MAX) {
        bw_seterr(err, errsize, "%s: %s", path, ferror(f) ? "read error" : "file too large");
        goto fail;
    }
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
        n--;
    buf[n] = '\0';
    if (n == 0) {
        bw_seterr(err, errsize, "%s: empty", path);
        goto fail;
    }
    fclose(f);
    *lenp = n;
    return buf;
fail:
    OPENSSL_cleanse(buf, SETTLE_FILE_MAX + 1);
    free(buf);
    fclose(f);
    return NULL;
}

static int mint_jwt(bw_settle *s, char *err, size_t errsize)
{
    static const char header[] = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
    int64_t now = bw_now_ms() / 1000;
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int maclen = 0;
    char *h64 = NULL, *p64 = NULL, *s64 = NULL, *payload = NULL;
    json_t *claims;
    sbuf b = {0};
    int rc = -1;

    claims = json_pack("{s:s, s:I, s:I}", "sub", s->service_name, "iat", (json_int_t)now, "exp",
                       (json_int_t)(now + SETTLE_JWT_TTL_S));
    if (!claims)
        goto out;
    payload = json_dumps(claims, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(claims);
    if (!payload)
        goto out;
    h64 = b64url((const unsigned char *)header, strlen(header));
    p64 = b64url((const unsigned char *)payload, strlen(payload));
    if (!h64 || !p64)
        goto out;
    sb_add(&b, h64);
    sb_add(&b, ".");
    sb_add(&b, p64);
    if (b.oom)
        goto out;
    if (!HMAC(EVP_sha256(), s->secret, (int)s->secret_len, (const unsigned char *)b.p, b.len, mac,
              &maclen))
        goto out;
    s64 = b64url(mac, maclen);
    if (!s64)
        goto out;
    sb_add(&b, ".");
    sb_add(&b, s64);
    if (b.oom)
        goto out;
    free_secret(&s->token);
    s->token = b.p;
    b.p = NULL;
    s->token_exp_s = now + SETTLE_JWT_TTL_S;
    rc = 0;
out:
    if (rc != 0)
        bw_seterr(err, errsize, "cannot mint the service JWT");
    OPENSSL_cleanse(mac, sizeof(mac));
    free(h64);
    free(p64);
    free(s64);
    free(payload);
    if (b.p) {
        OPENSSL_cleanse(b.p, b.len);
        free(b.p);
    }
    return rc;
}

static int load_secret(bw_settle *s, char *err, size_t errsize)
{
    size_t n;
    char *buf = read_small_file(s->secret_file, &n, err, errsize);

    if (!buf)
        return -1;
    if (s->secret) {
        OPENSSL_cleanse(s->secret, s->secret_len);
        free(s->secret);
    }
    s->secret = (unsigned char *)buf;
    s->secret_len = n;
    return 0;
}

static int load_token(bw_settle *s, char *err, size_t errsize)
{
    size_t n;
    char *buf = read_small_file(s->token_file, &n, err, errsize);

    if (!buf)
        return -1;
    if (!is_header_safe(buf)) {
        bw_seterr(err, errsize, "%s: the token must be one line of visible ASCII", s->token_file);
        free_secret(&buf);
        return -1;
    }
    free_secret(&s->token);
    s->token = buf;
    return 0;
}

/** Before a request: re-mint a JWT that is within SETTLE_JWT_RENEW_S of its expiry. */
static void auth_fresh(bw_settle *s, const char *request_id)
{
    char err[256];

    if (s->auth != AUTH_JWT || bw_now_ms() / 1000 + SETTLE_JWT_RENEW_S < s->token_exp_s)
        return;
    if (mint_jwt(s, err, sizeof(err)) != 0)
        bw_log(BW_LOG_ERROR, "service token renewal failed", "request_id", request_id, "error", err,
               NULL);
}

/** After a 401/403: re-read the secret and re-mint, or re-read the token file. */
static int auth_refresh(bw_settle *s, const char *request_id)
{
    char err[256] = "";
    int rc = -1;

    if (s->auth == AUTH_JWT) {
        if (load_secret(s, err, sizeof(err)) != 0)
            bw_log(BW_LOG_WARN, "cannot re-read the JWT secret, keeping the old one", "request_id",
                   request_id, "error", err, NULL);
        rc = mint_jwt(s, err, sizeof(err));
    } else if (s->auth == AUTH_TOKEN) {
        rc = load_token(s, err, sizeof(err));
    } else {
        bw_seterr(err, sizeof(err), "no auth configured");
    }
    if (rc == 0)
        bw_log(BW_LOG_INFO, "service token refreshed", "request_id", request_id, NULL);
    else
        bw_log(BW_LOG_ERROR, "service token refresh failed", "request_id", request_id, "error", err,
               NULL);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* HTTP                                                                      */

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *ud)
{
    http_reply *r = ud;
    size_t n = size * nmemb, keep = n;

    if (r->len + keep > SETTLE_BODY_MAX) {
        keep = SETTLE_BODY_MAX - r->len;
        r->truncated = 1;
    }
    if (keep > 0) {
        if (r->len + keep + 1 > r->cap) {
            size_t cap = r->cap ? r->cap : 1024;
            char *p;
            while (cap < r->len + keep + 1)
                cap *= 2;
            p = realloc(r->body, cap);
            if (!p)
                return 0; /* CURLE_WRITE_ERROR */
            r->body = p;
            r->cap = cap;
        }
        memcpy(r->body + r->len, ptr, keep);
        r->len += keep;
        r->body[r->len] = '\0';
    }
    return n;
}

static void parse_retry_after(http_reply *r, const char *v, size_t n)
{
    char buf[64];
    size_t i = 0;

    while (n > 0 && (*v == ' ' || *v == '\t')) {
        v++;
        n--;
    }
    while (n > 0 && isspace((unsigned char)v[n - 1]))
        n--;
    if (n == 0 || n >= sizeof(buf))
        return;
    memcpy(buf, v, n);
    buf[n] = '\0';
    while (isdigit((unsigned char)buf[i]))
        i++;
    if (buf[i] == '\0') {
        long long secs = n > 7 ? 9999999 : strtoll(buf, NULL, 10);
        r->retry_after_ms = (int64_t)secs * 1000;
    } else {
        time_t t = curl_getdate(buf, NULL);
        if (t != (time_t)-1) {
            int64_t d = ((int64_t)t - (int64_t)time(NULL)) * 1000;
            r->retry_after_ms = d > 0 ? d : 0;
        }
    }
}

static size_t on_header(char *buf, size_t size, size_t nmemb, void *ud)
{
    http_reply *r = ud;
    size_t n = size * nmemb;

    if (n >= 5 && memcmp(buf, "HTTP/", 5) == 0) {
        /* a new response (also after 1xx): "HTTP/1.1 402 Payment Required" */
        const char *p = memchr(buf, ' ', n), *e = buf + n;
        r->retry_after_ms = -1;
        r->phrase[0] = '\0';
        if (p && (p = memchr(p + 1, ' ', (size_t)(e - p - 1))) != NULL) {
            p++;
            while (e > p && (e[-1] == '\r' || e[-1] == '\n'))
                e--;
            copy_trunc(r->phrase, sizeof(r->phrase), p, (size_t)(e - p));
        }
    } else if (n > 12 && strncasecmp(buf, "Retry-After:", 12) == 0) {
        parse_retry_after(r, buf + 12, n - 12);
    }
    return n;
}

static void reply_reset(http_reply *r)
{
    char *body = r->body;
    size_t cap = r->cap;

    memset(r, 0, sizeof(*r));
    r->body = body;
    r->cap = cap;
    if (r->body)
        r->body[0] = '\0';
    r->retry_after_ms = -1;
}

/*
 * The body goes through a read callback, not CURLOPT_POSTFIELDS: when a kept-
 * alive connection dies after the request was written, libcurl resends it on
 * a new connection by itself, and the answer to that copy (a 503, say) would
 * hide that the first one may have been applied. Resending needs a rewind
 * (on_rewind): refused once any of the body left, so the call ends in a
 * transport error counted as sent (G7: outcome unknown, wallet only).
 */
static size_t on_upload(char *buf, size_t size, size_t n, void *arg)
{
    http_reply *r = arg;
    size_t left = r->upload_len - r->upload_off, k = size * n < left ? size * n : left;

    memcpy(buf, r->upload + r->upload_off, k);
    r->upload_off += k;
    return k;
}

static int on_rewind(void *arg, curl_off_t offset, int origin)
{
    http_reply *r = arg;

    if (origin != SEEK_SET || offset != 0 || r->upload_off > 0) {
        r->sent = 1;
        return CURL_SEEKFUNC_CANTSEEK;
    }
    return CURL_SEEKFUNC_OK; /* nothing of the body left yet */
}

static CURL *curl_handle_new(const bw_settle *s, long timeout_ms)
{
    CURL *curl = curl_easy_init();

    if (!curl)
        return NULL;
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_PATH_AS_IS, 1L);
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(curl, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(curl, CURLOPT_USERAGENT, "billing-worker/" BW_VERSION);
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, on_header);
    if (s->tls_ca)
        curl_easy_setopt(curl, CURLOPT_CAINFO, s->tls_ca);
    if (s->tls_cert)
        curl_easy_setopt(curl, CURLOPT_SSLCERT, s->tls_cert);
    if (s->tls_key)
        curl_easy_setopt(curl, CURLOPT_SSLKEY, s->tls_key);
    return curl;
}

/** One request. @p body NULL: GET. Fills @p r; never fails otherwise. */
static void http_do(bw_settle *s, CURL *curl, const char *url, const char *body, const char *key,
                    int with_auth, http_reply *r)
{
    struct curl_slist *hdrs = NULL, *tmp;
    char line[1200];
    long reqsize = 0;
    curl_off_t pre = 0, up = 0;
    int oom = 0;

    reply_reset(r);
#define ADD_HEADER(h)                                                                              \
    do {                                                                                           \
        if (!oom && (tmp = curl_slist_append(hdrs, (h))) != NULL)                                  \
            hdrs = tmp;                                                                            \
        else                                                                                       \
            oom = 1;                                                                               \
    } while (0)
    ADD_HEADER("Accept: application/json");
    if (body) {
        ADD_HEADER("Content-Type: application/json");
        ADD_HEADER("Expect:"); /* no 100-continue round trip */
    }
    if (key) {
        snprintf(line, sizeof(line), "Idempotency-Key: %s", key);
        ADD_HEADER(line);
    }
    if (with_auth && s->token) {
        sbuf b = {0};
        sb_add(&b, "Authorization: Bearer ");
        sb_add(&b, s->token);
        if (b.oom)
            oom = 1;
        else
            ADD_HEADER(b.p);
        if (b.p) {
            OPENSSL_cleanse(b.p, b.len);
            free(b.p);
        }
    }
#undef ADD_HEADER
    if (oom) {
        curl_slist_free_all(hdrs);
        r->cc = CURLE_OUT_OF_MEMORY;
        snprintf(r->errbuf, sizeof(r->errbuf), "out of memory");
        return;
    }
    curl_easy_setopt(curl, CURLOPT_URL, url);
    if (body) {
        r->upload = body;
        r->upload_len = strlen(body);
        curl_easy_setopt(curl, CURLOPT_POST, 1L);
        curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)r->upload_len);
        curl_easy_setopt(curl, CURLOPT_READFUNCTION, on_upload);
        curl_easy_setopt(curl, CURLOPT_READDATA, r);
        curl_easy_setopt(curl, CURLOPT_SEEKFUNCTION, on_rewind);
        curl_easy_setopt(curl, CURLOPT_SEEKDATA, r);
    } else {
        curl_easy_setopt(curl, CURLOPT_HTTPGET, 1L);
    }
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(curl, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, r->errbuf);

    r->cc = curl_easy_perform(curl);

    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &r->status);
    curl_easy_getinfo(curl, CURLINFO_REQUEST_SIZE, &reqsize);
    curl_easy_getinfo(curl, CURLINFO_PRETRANSFER_TIME_T, &pre);
    curl_easy_getinfo(curl, CURLINFO_SIZE_UPLOAD_T, &up);
    r->sent = r->sent || reqsize > 0 || pre > 0 || up > 0;
    if (r->errbuf[0] == '\0')
        snprintf(r->errbuf, sizeof(r->errbuf), "%s", curl_easy_strerror(r->cc));

    /* the list dies here: the handle must not keep a dangling pointer */
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, NULL);
    curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, NULL);
    curl_slist_free_all(hdrs);
}

/** Does the answer prove a previous success of the same key (409)? */
static int has_proof(const json_t *answer, call_kind kind)
{
    const json_t *v;

    if (!json_is_object(answer))
        return 0;
    if (kind == KIND_RECORD) {
        v = json_object_get(json_object_get(answer, "data"), "id");
        return json_is_string(v) || json_is_number(v);
    }
    v = json_object_get(answer, "transaction_id");
    if (!v)
        v = json_object_get(json_object_get(answer, "data"), "transaction_id");
    return (json_is_string(v) && json_string_length(v) > 0) || json_is_number(v);
}

static call_class classify(const http_reply *r, const json_t *answer, call_kind kind)
{
    /*
     * Transport errors are judged by one rule: did any of the request leave?
     * Refused, DNS, TLS handshake and connect timeouts never get that far. No
     * list of "pre-send" codes: curl 7.88 answers an HTTP/0.9 reply with
     * CURLE_UNSUPPORTED_PROTOCOL, and its transparent reconnect after a dead
     * reused connection can end in CURLE_COULDNT_CONNECT after the first copy
     * was written; both must stay "unknown".
     */
    if (r->cc != CURLE_OK)
        return r->sent ? CALL_UNKNOWN : CALL_NOT_DELIVERED;
    if (r->status >= 200 && r->status <= 299) {
        /* a 2xx that says it failed charged nothing: a refusal, never "settled" */
        if (json_is_false(json_object_get(answer, "success")))
            return CALL_REJECTED;
        return CALL_OK;
    }
    switch (r->status) {
    case 409:
        return has_proof(answer, kind) ? CALL_OK : CALL_INFLIGHT;
    case 400:
    case 402:
    case 404:
    case 422:
        return CALL_REJECTED;
    case 401:
    case 403:
        return CALL_AUTH;
    case 429:
    case 502:
    case 503:
    case 504:
        return CALL_NOT_DELIVERED;
    default:
        return CALL_UNKNOWN; /* 500, 3xx, anything unexpected */
    }
}

/** "HTTP 402 Payment Required" or "Couldn't connect to server: ...". */
static void describe(const http_reply *r, char *out, size_t size)
{
    if (r->cc != CURLE_OK)
        snprintf(out, size, "%s", r->errbuf);
    else if (r->phrase[0])
        snprintf(out, size, "HTTP %ld %s", r->status, r->phrase);
    else
        snprintf(out, size, "HTTP %ld", r->status);
}

/* ------------------------------------------------------------------------ */
/* breaker                                                                   */

static int64_t breaker_remaining_ms(const bw_settle *s)
{
    int64_t left = s->br_open_until_ms - bw_mono_ms();
    return (s->br_state == BREAKER_OPEN && left > 0) ? left : 0;
}

/** May a wallet call go out now? Moves OPEN to HALF_OPEN after the cooldown. */
static int breaker_allow(bw_settle *s)
{
    if (s->br_state != BREAKER_OPEN)
        return 1;
    if (bw_mono_ms() < s->br_open_until_ms)
        return 0;
    s->br_state = BREAKER_HALF_OPEN; /* this call is the probe */
    return 1;
}

static void breaker_record(bw_settle *s, call_class cls, const char *request_id)
{
    char nbuf[24];

    if (s->breaker_failures <= 0)
        return;
    if (cls == CALL_NOT_DELIVERED) {
        s->br_count++;
        if (s->br_state == BREAKER_HALF_OPEN || s->br_count >= s->breaker_failures) {
            s->br_state = BREAKER_OPEN;
            s->br_open_until_ms = bw_mono_ms() + s->breaker_cooldown_ms;
            snprintf(nbuf, sizeof(nbuf), "%d", s->br_count);
            bw_log(BW_LOG_WARN, "wallet circuit breaker open", "request_id", request_id,
                   "consecutive_failures", nbuf, NULL);
        }
    } else if (cls == CALL_OK || cls == CALL_REJECTED || cls == CALL_INFLIGHT || cls == CALL_AUTH) {
        /* the wallet answered */
        if (s->br_state != BREAKER_CLOSED)
            bw_log(BW_LOG_INFO, "wallet circuit breaker closed", "request_id", request_id, NULL);
        s->br_state = BREAKER_CLOSED;
        s->br_count = 0;
    }
    /* CALL_UNKNOWN: neither proof of life nor of death */
}

int bw_settle_breaker_open(const bw_settle *s)
{
    return s && breaker_remaining_ms(s) > 0;
}

/* ------------------------------------------------------------------------ */
/* service addresses (URL or consul://)                                      */

static void consul_clear(settle_service *svc)
{
    for (size_t i = 0; i < svc->n_instances; i++)
        free(svc->instances[i]);
    svc->n_instances = 0;
}

/** Ask Consul for passing instances of svc; on failure the cache stays as it was. */
static int consul_refresh(bw_settle *s, settle_service *svc, const char *request_id)
{
    char enc[BW_ENC_ID_MAX + 1];
    char *found[SETTLE_CONSUL_MAX_INST];
    size_t nfound = 0, i;
    http_reply r = {0};
    json_t *arr = NULL, *ent;
    sbuf url = {0};
    int rc = -1;

    if (bw_pct_encode(svc->consul_name, strlen(svc->consul_name), enc, sizeof(enc)) < 0)
        goto out;
    sb_add(&url, s->consul_url);
    sb_add(&url, "/v1/health/service/");
    sb_add(&url, enc);
    sb_add(&url, "?passing=true");
    if (url.oom)
        goto out;
    http_do(s, s->consul_curl, url.p, NULL, NULL, 0, &r);
    if (r.cc != CURLE_OK || r.status != 200 || !r.body) {
        char why[256];
        describe(&r, why, sizeof(why));
        bw_log(BW_LOG_WARN, "consul lookup failed", "request_id", request_id, "service",
               svc->consul_name, "error", why, NULL);
        goto out;
    }
    arr = json_loadb(r.body, r.len, JSON_REJECT_DUPLICATES, NULL);
    json_array_foreach(arr, i, ent)
    {
        const json_t *sv = json_object_get(ent, "Service");
        const char *addr = json_string_value(json_object_get(sv, "Address"));
        const char *scheme =
            json_string_value(json_object_get(json_object_get(sv, "Meta"), "scheme"));
        json_int_t port = json_integer_value(json_object_get(sv, "Port"));
        char base[512];

        if (!addr || !*addr)
            addr = json_string_value(json_object_get(json_object_get(ent, "Node"), "Address"));
        if (!addr || !*addr || port < 1 || port > 65535 || nfound == SETTLE_CONSUL_MAX_INST)
            continue;
        if (!scheme || strcmp(scheme, "https") != 0)
            scheme = "http";
        snprintf(base, sizeof(base),
                 strchr(addr, ':') ? "%s://[%s]:%" JSON_INTEGER_FORMAT
                                   : "%s://%s:%" JSON_INTEGER_FORMAT,
                 scheme, addr, port);
        if ((found[nfound] = strdup(base)) != NULL)
            nfound++;
    }
    if (!json_is_array(arr)) {
        bw_log(BW_LOG_WARN, "consul answer is not a list", "request_id", request_id, "service",
               svc->consul_name, NULL);
        goto out;
    }
    if (nfound == 0) {
        /* Consul answered: nothing passes. Forget the cached instances, so
         * the service counts as not delivered rather than called anyway. */
        bw_log(BW_LOG_WARN, "consul lists no passing instance", "request_id", request_id, "service",
               svc->consul_name, NULL);
        consul_clear(svc);
        goto out;
    }
    consul_clear(svc);
    memcpy(svc->instances, found, nfound * sizeof(found[0]));
    svc->n_instances = nfound;
    svc->next_instance %= nfound;
    rc = 0;
out:
    /* refreshed or not, wait a full period before asking again */
    svc->resolved_at_ms = bw_mono_ms();
    json_decref(arr);
    free(r.body);
    free(url.p);
    return rc;
}

/** The base URL to use now, NULL when a consul service has no known instance. */
static const char *service_base(bw_settle *s, settle_service *svc, const char *request_id)
{
    if (svc->url)
        return svc->url;
    if (svc->n_instances == 0 || svc->resolved_at_ms == 0 ||
        bw_mono_ms() - svc->resolved_at_ms >= s->consul_refresh_ms)
        consul_refresh(s, svc, request_id);
    if (svc->n_instances == 0)
        return NULL;
    return svc->instances[svc->next_instance % svc->n_instances];
}

/** base + path with every "{user_id}" replaced by the percent-encoded user id. */
static char *build_url(const char *base, const char *path, const char *user_id)
{
    size_t ulen = strlen(user_id);
    char *enc = malloc(3 * ulen + 1);
    const char *p = path, *hit;
    sbuf b = {0};

    if (!enc || bw_pct_encode(user_id, ulen, enc, 3 * ulen + 1) < 0) {
        free(enc);
        return NULL;
    }
    sb_add(&b, base);
    while ((hit = strstr(p, "{user_id}")) != NULL) {
        sb_addn(&b, p, (size_t)(hit - p));
        sb_add(&b, enc);
        p = hit + strlen("{user_id}");
    }
    sb_add(&b, p);
    free(enc);
    return sb_take(&b);
}

/* ------------------------------------------------------------------------ */
/* request bodies                                                            */

/* "{" + raw members + jansson members + "}"; the raw values are trusted JSON text */
static char *splice_body(sbuf *raw, json_t *obj)
{
    char *dump = json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER);
    size_t n;

    json_decref(obj);
    if (!dump) {
        free(raw->p);
        return NULL;
    }
    n = strlen(dump);
    if (n > 2) {
        sb_add(raw, ",");
        sb_addn(raw, dump + 1, n - 2);
    }
    sb_add(raw, "}");
    free(dump);
    return sb_take(raw);
}

/** Like json_string(), but NULL gives JSON null (and invalid UTF-8 gives NULL). */
static json_t *str_or_null(const char *v)
{
    return v ? json_string(v) : json_null();
}

static char *consume_body(const bw_settle *s, const bw_settle_req *req, const char *record_id_json)
{
    sbuf raw = {0};
    json_t *obj = json_object();
    json_t *service = json_string(s->service_name),
           *reason = json_string(req->reason ? req->reason : "");
    json_t *rid = json_string(req->request_id), *sid = str_or_null(req->session_id);
    int bad = !obj || !service || !reason || !rid || !sid;

    if (!bad)
        bad = json_object_set_new(obj, "service", service) |
              json_object_set_new(obj, "reason", reason) |
              json_object_set_new(obj, "request_id", rid) |
              json_object_set_new(obj, "session_id", sid);
    else {
        json_decref(service);
        json_decref(reason);
        json_decref(rid);
        json_decref(sid);
    }
    if (bad) {
        json_decref(obj);
        return NULL;
    }
    sb_add(&raw, "{\"amount\":");
    sb_add(&raw, req->amount);
    sb_add(&raw, ",\"usage_record_id\":");
    sb_add(&raw, record_id_json);
    sb_add(&raw, ",\"breakdown\":");
    sb_add(&raw, req->breakdown_json ? req->breakdown_json : "{}");
    return splice_body(&raw, obj);
}

static char *record_body(const bw_settle_req *req)
{
    sbuf raw = {0};
    char num[32];
    json_t *obj = json_object();
    json_t *uid = json_string(req->user_id), *sid = str_or_null(req->session_id);
    json_t *rid = json_string(req->request_id), *model = str_or_null(req->model_name);
    int bad = !obj || !uid || !sid || !rid || !model;

    if (!bad)
        bad = json_object_set_new(obj, "user_id", uid) |
              json_object_set_new(obj, "session_id", sid) |
              json_object_set_new(obj, "request_id", rid) |
              json_object_set_new(obj, "model_name", model);
    else {
        json_decref(uid);
        json_decref(sid);
        json_decref(rid);
        json_decref(model);
    }
    if (bad) {
        json_decref(obj);
        return NULL;
    }
    sb_add(&raw, "{\"credits_charged\":");
    sb_add(&raw, req->amount);
    sb_add(&raw, ",\"cost_usd\":");
    sb_add(&raw, req->cost_usd);
#define ADD_U64(name, v)                                                                           \
    do {                                                                                           \
        snprintf(num, sizeof(num), "%" PRIu64, (uint64_t)(v));                                     \
        sb_add(&raw, ",\"" name "\":");                                                            \
        sb_add(&raw, num);                                                                         \
    } while (0)
    ADD_U64("tokens_used", req->tokens_used);
    ADD_U64("prompt_tokens", req->prompt_tokens);
    ADD_U64("completion_tokens", req->completion_tokens);
    ADD_U64("tool_calls", req->tool_calls);
    ADD_U64("model_calls", req->model_calls);
#undef ADD_U64
    sb_add(&raw, ",\"breakdown\":");
    sb_add(&raw, req->breakdown_json ? req->breakdown_json : "{}");
    return splice_body(&raw, obj);
}

/* ------------------------------------------------------------------------ */
/* the attempt loop                                                          */

typedef struct call_ctx {
    settle_service *svc;
    call_kind kind;
    const char *path;
    const char *body;
    int use_breaker;  /* the wallet */
    int64_t deadline; /* bw_mono_ms() by which the last attempt must end; 0: none */
    http_reply reply; /* the last answer (body owned) */
    json_t *answer;   /* its parsed body, or NULL */
} call_ctx;

static void call_ctx_free(call_ctx *c)
{
    free(c->reply.body);
    json_decref(c->answer);
}

static int64_t backoff_ms(bw_settle *s, int attempt, int64_t retry_after_ms)
{
    int shift = attempt - 1 > 30 ? 30 : attempt - 1;
    int64_t cap = (int64_t)SETTLE_BACKOFF_BASE_MS << shift, ms;

    if (cap > s->retry_max_ms)
        cap = s->retry_max_ms;
    ms = cap > 0 ? (int64_t)(rng_next(s) % (uint64_t)(cap + 1)) : 0; /* full jitter */
    if (retry_after_ms > ms)
        ms = retry_after_ms < s->retry_max_ms ? retry_after_ms : s->retry_max_ms;
    return ms;
}

/* The end of a lease that begins now, with a second of margin for the
 * Redis writes around the calls. */
static int64_t claim_deadline(const bw_settle_req *req)
{
    return req->lease_ms > 0 ? bw_mono_ms() + req->lease_ms - SETTLE_LEASE_MARGIN_MS : 0;
}

static void note_pending(bw_settle_result *res, const settle_service *svc, const char *what,
                         const char *why)
{
    /* svc->name and what are short constants: the detail is cut to fit */
    snprintf(res->reason, sizeof(res->reason), "%.16s%s%.8s: %.200s", svc->name, what ? " " : "",
             what ? what : "", why);
}

/**
 * Up to max_attempts calls of one endpoint. Stops at CALL_OK or CALL_REJECTED;
 * otherwise returns CALL_UNKNOWN when any attempt may have been applied
 * (unknown or in flight), else CALL_NOT_DELIVERED. res->reason,
 * res->http_status and res->retry_after_ms describe the last failure.
 */
static call_class run_call(bw_settle *s, call_ctx *c, const bw_settle_req *req,
                           bw_settle_result *res)
{
    const char *what = c->kind == KIND_RECORD ? "record" : "consume";
    int unknown_seen = 0, refreshed = 0;
    call_class cls = CALL_NOT_DELIVERED;

    for (int attempt = 1;; attempt++) {
        const char *base;
        char why[256], nbuf[16], stbuf[16];
        char *url;

        if (c->use_breaker && !breaker_allow(s)) {
            note_pending(res, c->svc, NULL, "circuit breaker open");
            if (breaker_remaining_ms(s) > res->retry_after_ms)
                res->retry_after_ms = breaker_remaining_ms(s);
            break;
        }
        base = service_base(s, c->svc, req->request_id);
        json_decref(c->answer);
        c->answer = NULL;
        if (!base) {
            reply_reset(&c->reply);
            c->reply.cc = CURLE_COULDNT_RESOLVE_HOST;
            snprintf(c->reply.errbuf, sizeof(c->reply.errbuf), "consul: no passing instance of %s",
                     c->svc->consul_name);
            cls = CALL_NOT_DELIVERED;
        } else {
            url = build_url(base, c->path, req->user_id);
            if (!url) {
                note_pending(res, c->svc, NULL, "out of memory");
                break; /* nothing sent */
            }
            auth_fresh(s, req->request_id);
            http_do(s, c->svc->curl, url, c->body, req->idempotency_key, 1, &c->reply);
            free(url);
            if (c->reply.body && c->reply.len > 0 && !c->reply.truncated)
                c->answer = json_loadb(c->reply.body, c->reply.len, JSON_REJECT_DUPLICATES, NULL);
            cls = classify(&c->reply, c->answer, c->kind);
        }
        if (c->reply.status > 0)
            res->http_status = (int)c->reply.status;
        describe(&c->reply, why, sizeof(why));
        snprintf(nbuf, sizeof(nbuf), "%d", attempt);
        snprintf(stbuf, sizeof(stbuf), "%ld", c->reply.status);
        bw_log(cls == CALL_OK ? BW_LOG_DEBUG : BW_LOG_INFO, "settle call", "request_id",
               req->request_id, "service", c->svc->name, "call", what, "attempt", nbuf,
               "http_status", stbuf, "class", class_names[cls], "detail", why, NULL);

        if (cls == CALL_OK || cls == CALL_REJECTED) {
            if (c->use_breaker)
                breaker_record(s, cls, req->request_id);
            return cls;
        }
        if (cls == CALL_AUTH) {
            if (!refreshed) {
                refreshed = 1;
                if (auth_refresh(s, req->request_id) == 0) {
                    attempt--; /* the retry after a refresh is not an attempt of its own */
                    continue;
                }
            }
            cls = CALL_NOT_DELIVERED;
        }
        if (cls == CALL_NOT_DELIVERED) {
            if (c->use_breaker)
                breaker_record(s, cls, req->request_id);
            c->svc->next_instance++; /* consul: try another instance */
        } else {
            unknown_seen = 1; /* CALL_UNKNOWN or CALL_INFLIGHT */
            if (c->use_breaker)
                breaker_record(s, cls, req->request_id);
        }
        note_pending(res, c->svc, c->kind == KIND_RECORD ? what : NULL, why);
        if (c->reply.retry_after_ms >= 0) {
            int64_t ra = c->reply.retry_after_ms < s->retry_max_ms ? c->reply.retry_after_ms
                                                                   : s->retry_max_ms;
            if (ra > res->retry_after_ms)
                res->retry_after_ms = ra;
        }
        if (attempt >= s->max_attempts || (c->use_breaker && bw_settle_breaker_open(s)))
            break;
        {
            int64_t pause = backoff_ms(s, attempt, c->reply.retry_after_ms);
            if (c->deadline > 0 && bw_mono_ms() + pause + c->svc->timeout_ms > c->deadline) {
                bw_log(BW_LOG_INFO, "settle: no time left in the claim for another attempt",
                       "request_id", req->request_id, "service", c->svc->name, "attempt", nbuf,
                       NULL);
                break;
            }
            sleep_ms(pause);
        }
    }
    return unknown_seen ? CALL_UNKNOWN : CALL_NOT_DELIVERED;
}

/** Fill a SETTLED or REJECTED result from the last answer of @p c. */
static void fill_final(bw_settle_result *res, const call_ctx *c, call_class cls)
{
    static const char *const bal_top[] = {"balance", NULL};
    static const char *const bal_data[] = {"data", "remaining_balance", NULL};
    static const char *const tx_top[] = {"transaction_id", NULL};
    static const char *const tx_data[] = {"data", "transaction_id", NULL};
    const json_t *a = c->answer, *v;

    snprintf(res->via, sizeof(res->via), "%s", c->svc->name);
    res->http_status = (int)c->reply.status;
    res->outcome_unknown = 0;
    res->retry_after_ms = 0;
    res->reason[0] = '\0';
    if (cls == CALL_REJECTED) {
        res->status = BW_SETTLE_REJECTED;
        v = json_object_get(a, "detail");
        if (json_is_string(v)) {
            snprintf(res->reason, sizeof(res->reason), "%s", json_string_value(v));
        } else if (v && !json_is_null(v)) {
            char *d = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY); /* 422: a list */
            snprintf(res->reason, sizeof(res->reason), "%s", d ? d : "");
            free(d);
        }
        if (!res->reason[0])
            describe(&c->reply, res->reason, sizeof(res->reason));
        return;
    }
    res->status = BW_SETTLE_SETTLED;
    v = json_object_get(a, "transaction_id");
    if (!v)
        v = json_object_get(json_object_get(a, "data"), "transaction_id");
    if (json_is_string(v))
        snprintf(res->transaction_id, sizeof(res->transaction_id), "%s", json_string_value(v));
    else if (json_is_number(v))
        number_text(v, c->reply.body, c->reply.len,
                    json_object_get(a, "transaction_id") ? tx_top : tx_data, res->transaction_id,
                    sizeof(res->transaction_id));
    v = json_object_get(a, "balance");
    if (v && !json_is_null(v)) {
        if (json_is_string(v))
            snprintf(res->balance_after, sizeof(res->balance_after), "%s", json_string_value(v));
        else if (json_is_number(v))
            number_text(v, c->reply.body, c->reply.len, bal_top, res->balance_after,
                        sizeof(res->balance_after));
    } else {
        v = json_object_get(json_object_get(a, "data"), "remaining_balance");
        if (json_is_string(v))
            snprintf(res->balance_after, sizeof(res->balance_after), "%s", json_string_value(v));
        else if (json_is_number(v))
            number_text(v, c->reply.body, c->reply.len, bal_data, res->balance_after,
                        sizeof(res->balance_after));
    }
}

static void log_outcome(const bw_settle_req *req, const bw_settle_result *res)
{
    static const char *names[] = {"settled", "rejected", "pending"};
    char st[16];

    snprintf(st, sizeof(st), "%d", res->http_status);
    bw_log(res->status == BW_SETTLE_SETTLED ? BW_LOG_INFO : BW_LOG_WARN, "settle outcome",
           "request_id", req->request_id, "idempotency_key", req->idempotency_key, "status",
           names[res->status], "via", res->via, "amount", req->amount, "http_status", st,
           "transaction_id", res->transaction_id, "outcome_unknown",
           res->outcome_unknown ? "true" : "false", "reason", res->reason, NULL);
}

static int check_req(const bw_settle_req *req, char *why, size_t size)
{
    json_t *b;

    if (!req->user_id || !*req->user_id || !req->request_id || !*req->request_id) {
        snprintf(why, size, "user_id and request_id are required");
        return -1;
    }
    if (!is_header_safe(req->idempotency_key)) {
        snprintf(why, size, "idempotency_key must be visible ASCII (percent-encoded)");
        return -1;
    }
    if (!is_decimal_text(req->amount) || !is_decimal_text(req->cost_usd)) {
        snprintf(why, size, "amount and cost_usd must be plain decimal text");
        return -1;
    }
    if (req->breakdown_json) {
        b = json_loads(req->breakdown_json, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, NULL);
        if (!b) {
            snprintf(why, size, "breakdown_json is not valid JSON");
            return -1;
        }
        json_decref(b);
    }
    return 0;
}

int bw_settle_charge(bw_settle *s, const bw_settle_req *req, bw_settle_result *res)
{
    call_ctx wallet = {0}, rec = {0}, ucons = {0};
    char *key_json = NULL, *wbody = NULL, *rbody = NULL, *ubody = NULL, *id_text = NULL;
    call_class cls;
    int rc = -1;

    memset(res, 0, sizeof(*res));
    res->status = BW_SETTLE_PENDING;
    snprintf(res->via, sizeof(res->via), "wallet");
    if (check_req(req, res->reason, sizeof(res->reason)) != 0) {
        bw_log(BW_LOG_ERROR, "settle: invalid charge", "request_id", req->request_id, "error",
               res->reason, NULL);
        return -1;
    }
    {
        json_t *k = json_string(req->idempotency_key);
        key_json = k ? json_dumps(k, JSON_ENCODE_ANY) : NULL;
        json_decref(k);
    }
    wbody = key_json ? consume_body(s, req, key_json) : NULL;
    if (!wbody) {
        snprintf(res->reason, sizeof(res->reason), "cannot build the request (UTF-8 or memory)");
        goto out;
    }

    /* 1. the wallet */
    wallet = (call_ctx){.svc = &s->wallet,
                        .kind = KIND_CONSUME,
                        .path = s->wallet.consume_path,
                        .body = wbody,
                        .use_breaker = 1,
                        .deadline = claim_deadline(req)};
    wallet.reply.retry_after_ms = -1;
    cls = run_call(s, &wallet, req, res);
    if (cls == CALL_OK || cls == CALL_REJECTED) {
        fill_final(res, &wallet, cls);
        rc = 0;
        goto out;
    }
    if (cls == CALL_UNKNOWN || req->wallet_only) {
        res->outcome_unknown = 1; /* the wallet may hold it: wallet only from now on */
        rc = 0;
        goto out;
    }
    if (!s->user.url && !s->user.consul_name) {
        rc = 0; /* no fallback configured: pending, retried later at the wallet */
        goto out;
    }
    if (req->fallback_allowed && !req->fallback_allowed(req->fallback_ctx)) {
        /* Another attempt at this charge began meanwhile, or one recorded an
         * unknown wallet outcome: the wallet may hold it. */
        snprintf(res->reason, sizeof(res->reason),
                 "fallback withheld: another attempt at this charge may have reached the wallet");
        res->outcome_unknown = 1;
        rc = 0;
        goto out;
    }

    /* 2. the fallback: record the usage, then consume with its id and the same key */
    snprintf(res->via, sizeof(res->via), "user_service");
    bw_log(BW_LOG_WARN, "wallet not delivered, using the user service", "request_id",
           req->request_id, "reason", res->reason, NULL);
    rbody = record_body(req);
    if (!rbody) {
        snprintf(res->reason, sizeof(res->reason), "cannot build the request (UTF-8 or memory)");
        goto out;
    }
    rec = (call_ctx){.svc = &s->user,
                     .kind = KIND_RECORD,
                     .path = s->user.record_path,
                     .body = rbody,
                     .deadline = claim_deadline(req)};
    cls = run_call(s, &rec, req, res);
    if (cls == CALL_REJECTED) {
        fill_final(res, &rec, cls);
        rc = 0;
        goto out;
    }
    if (cls != CALL_OK) {
        rc = 0; /* the record moves no money: outcome_unknown stays 0 */
        goto out;
    }
    {
        static const char *const id_path[] = {"data", "id", NULL};
        const json_t *id = json_object_get(json_object_get(rec.answer, "data"), "id");
        const char *vs, *ve;
        if ((json_is_string(id) || json_is_number(id)) && rec.reply.body &&
            js_path(rec.reply.body, rec.reply.len, id_path, &vs, &ve) == 0)
            id_text = strndup(vs, (size_t)(ve - vs)); /* exactly as the service wrote it */
        else if (json_is_string(id) || json_is_integer(id))
            id_text = json_dumps(id, JSON_ENCODE_ANY);
        if (!id_text) {
            snprintf(res->reason, sizeof(res->reason),
                     "user_service record: answer without data.id");
            res->http_status = (int)rec.reply.status;
            rc = 0;
            goto out;
        }
    }
    ubody = consume_body(s, req, id_text);
    if (!ubody) {
        snprintf(res->reason, sizeof(res->reason), "cannot build the request (memory)");
        goto out;
    }
    ucons = (call_ctx){.svc = &s->user,
                       .kind = KIND_CONSUME,
                       .path = s->user.consume_path,
                       .body = ubody,
                       .deadline = rec.deadline};
    ucons.reply.retry_after_ms = -1;
    cls = run_call(s, &ucons, req, res);
    if (cls == CALL_OK || cls == CALL_REJECTED)
        fill_final(res, &ucons, cls);
    else if (cls == CALL_UNKNOWN)
        res->outcome_unknown = 1; /* the ledger may hold it: wallet only from now on */
    rc = 0;
out:
    if (rc == 0)
        log_outcome(req, res);
    call_ctx_free(&wallet);
    call_ctx_free(&rec);
    call_ctx_free(&ucons);
    free(key_json);
    free(wbody);
    free(rbody);
    free(ubody);
    free(id_text);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* lifecycle                                                                 */

static int service_init(bw_settle *s, settle_service *svc, const char *name,
                        const bw_service_config *sc, int required, char *err, size_t errsize)
{
    size_t n;

    svc->name = name;
    svc->timeout_ms = sc->timeout_ms > 0 ? (long)sc->timeout_ms : SETTLE_DEFAULT_TIMEOUT_MS;
    if (!sc->url || !*sc->url) {
        if (required) {
            bw_seterr(err, errsize, "%s.url is not set", name);
            return -1;
        }
        return 0; /* no fallback */
    }
    if (strncmp(sc->url, "consul://", 9) == 0) {
        if (!sc->url[9] || !s->consul_url) {
            bw_seterr(err, errsize, "%s.url: %s needs a service name and consul.url", name,
                      sc->url);
            return -1;
        }
        svc->consul_name = strdup(sc->url + 9);
    } else if (strncmp(sc->url, "http://", 7) == 0 || strncmp(sc->url, "https://", 8) == 0) {
        svc->url = strdup(sc->url);
        if (svc->url)
            for (n = strlen(svc->url); n > 0 && svc->url[n - 1] == '/'; n--)
                svc->url[n - 1] = '\0';
    } else {
        bw_seterr(err, errsize, "%s.url: \"%s\" is not http://, https:// or consul://", name,
                  sc->url);
        return -1;
    }
    svc->consume_path =
        strdup(sc->consume_path && *sc->consume_path ? sc->consume_path
                                                     : "/api/v1/users/{user_id}/credits/consume");
    svc->record_path =
        strdup(sc->record_path && *sc->record_path ? sc->record_path : "/api/v1/usage/records");
    if ((!svc->url && !svc->consul_name) || !svc->consume_path || !svc->record_path) {
        bw_seterr(err, errsize, "out of memory");
        return -1;
    }
    if (svc->consume_path[0] != '/' || svc->record_path[0] != '/') {
        bw_seterr(err, errsize, "%s: paths must start with '/'", name);
        return -1;
    }
    svc->curl = curl_handle_new(s, svc->timeout_ms);
    if (!svc->curl) {
        bw_seterr(err, errsize, "%s: curl_easy_init failed", name);
        return -1;
    }
    return 0;
}

static void service_free(settle_service *svc)
{
    if (svc->curl)
        curl_easy_cleanup(svc->curl);
    consul_clear(svc);
    free(svc->url);
    free(svc->consul_name);
    free(svc->consume_path);
    free(svc->record_path);
}

bw_settle *bw_settle_new(const bw_config *cfg, char *err, size_t errsize)
{
    bw_settle *s;
    size_t n;

    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        bw_seterr(err, errsize, "curl_global_init failed");
        return NULL;
    }
    s = calloc(1, sizeof(*s));
    if (!s) {
        bw_seterr(err, errsize, "out of memory");
        curl_global_cleanup();
        return NULL;
    }
    s->service_name =
        strdup(cfg->service_name && *cfg->service_name ? cfg->service_name : "billing-worker");
    s->tls_ca = dup_opt(cfg->tls_ca_file);
    s->tls_cert = dup_opt(cfg->tls_cert_file);
    s->tls_key = dup_opt(cfg->tls_key_file);
    s->consul_url = dup_opt(cfg->consul_url);
    if (s->consul_url)
        for (n = strlen(s->consul_url); n > 0 && s->consul_url[n - 1] == '/'; n--)
            s->consul_url[n - 1] = '\0';
    s->consul_refresh_ms = cfg->consul_refresh_ms > 0 ? cfg->consul_refresh_ms : 10000;
    s->max_attempts = cfg->max_attempts > 0 ? cfg->max_attempts : 1;
    s->retry_max_ms = cfg->retry_max_interval_ms > 0 ? cfg->retry_max_interval_ms : 0;
    s->breaker_failures = cfg->breaker_failures; /* <= 0: no breaker */
    s->breaker_cooldown_ms = cfg->breaker_cooldown_ms > 0 ? cfg->breaker_cooldown_ms : 0;
    if (getrandom(&s->rng, sizeof(s->rng), GRND_NONBLOCK) != (ssize_t)sizeof(s->rng))
        s->rng = (uint64_t)bw_now_ms() ^ ((uint64_t)getpid() << 32);
    s->rng |= 1; /* xorshift must not start at 0 */
    if (!s->service_name)
        goto nomem;

    if (service_init(s, &s->wallet, "wallet", &cfg->wallet, 1, err, errsize) != 0 ||
        service_init(s, &s->user, "user_service", &cfg->user_service, 0, err, errsize) != 0)
        goto fail;
    if (s->consul_url) {
        long t = s->wallet.timeout_ms;
        s->consul_curl = curl_handle_new(s, t);
        if (!s->consul_curl)
            goto nomem;
    }

    if (cfg->jwt_secret_file && *cfg->jwt_secret_file) {
        s->auth = AUTH_JWT;
        s->secret_file = strdup(cfg->jwt_secret_file);
        if (!s->secret_file)
            goto nomem;
        if (load_secret(s, err, errsize) != 0 || mint_jwt(s, err, errsize) != 0)
            goto fail;
    } else if (cfg->token_file && *cfg->token_file) {
        s->auth = AUTH_TOKEN;
        s->token_file = strdup(cfg->token_file);
        if (!s->token_file)
            goto nomem;
        if (load_token(s, err, errsize) != 0)
            goto fail;
    }
    return s;
nomem:
    bw_seterr(err, errsize, "out of memory");
fail:
    bw_settle_destroy(s);
    return NULL;
}

void bw_settle_destroy(bw_settle *s)
{
    if (!s)
        return;
    service_free(&s->wallet);
    service_free(&s->user);
    if (s->consul_curl)
        curl_easy_cleanup(s->consul_curl);
    free(s->consul_url);
    free(s->tls_ca);
    free(s->tls_cert);
    free(s->tls_key);
    if (s->secret) {
        OPENSSL_cleanse(s->secret, s->secret_len);
        free(s->secret);
    }
    free_secret(&s->token);
    free(s->secret_file);
    free(s->token_file);
    free(s->service_name);
    free(s);
    curl_global_cleanup();
}

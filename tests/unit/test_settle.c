/*
 * test_settle.c - settle.c against scripted in-process HTTP servers.
 *
 * The server is a small HTTP/1.1 server on plain sockets (one thread per
 * connection, keep-alive): test_settle links bw_settle and cmocka only, and
 * sockets give exact control over "close without answering" and delays. Each
 * server answers from a queue of scripted responses and records every request
 * (method, path, raw headers, body) and the number of connections accepted.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "bw_config.h"
#include "bw_log.h"
#include "bw_settle.h"

/* ------------------------------------------------------------------------ */
/* scripted HTTP server                                                      */

#define SRV_MAX_SCRIPT 32
#define SRV_MAX_REQS   64
#define SRV_MAX_CONNS  64

typedef struct resp {
    int status;              /* 0: close the connection without answering */
    const char *body;        /* NULL: empty */
    const char *headers;     /* extra header lines, each ending in "\r\n" */
    int delay_ms;            /* wait before answering */
    void (*hook)(void *arg); /* run when the request arrived, before answering */
    void *hook_arg;
    const char *raw; /* sent as is instead of a response, then the connection is closed */
} resp;

typedef struct reqrec {
    char method[16];
    char path[2048];
    char headers[8192];
    char *body;
    size_t body_len;
} reqrec;

typedef struct srv {
    int lfd, port;
    pthread_t accept_th;
    pthread_mutex_t mu;
    resp script[SRV_MAX_SCRIPT];
    size_t n_script, next;
    reqrec reqs[SRV_MAX_REQS];
    size_t n_reqs;
    int n_conns;
    atomic_int stop;
    pthread_t conn_th[SRV_MAX_CONNS];
    int conn_fd[SRV_MAX_CONNS];
    size_t n_conn_th;
    int running;
} srv;

typedef struct conn_arg {
    srv *sv;
    int fd;
} conn_arg;

static const char *phrase(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 402:
        return "Payment Required";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 409:
        return "Conflict";
    case 422:
        return "Unprocessable Entity";
    case 429:
        return "Too Many Requests";
    case 500:
        return "Internal Server Error";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    default:
        return "Whatever";
    }
}

static void msleep(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/** Read more bytes into buf; 0 on data, -1 on EOF, error or stop. */
static int srv_fill(srv *sv, int fd, char **buf, size_t *len, size_t *cap)
{
    for (;;) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        ssize_t n;
        if (atomic_load(&sv->stop))
            return -1;
        if (poll(&pfd, 1, 50) <= 0)
            continue;
        if (*len + 4096 + 1 > *cap) {
            *cap = (*cap ? *cap * 2 : 8192) + 4096;
            *buf = realloc(*buf, *cap);
            assert_non_null(*buf);
        }
        n = recv(fd, *buf + *len, 4096, 0);
        if (n <= 0)
            return -1;
        *len += (size_t)n;
        (*buf)[*len] = '\0';
        return 0;
    }
}

static void *srv_conn(void *p)
{
    conn_arg *ca = p;
    srv *sv = ca->sv;
    int fd = ca->fd;
    char *buf = NULL;
    size_t len = 0, cap = 0;

    free(ca);
    for (;;) {
        char *hend, *cl, out[65536];
        size_t hlen, blen = 0;
        reqrec *rq = NULL;
        resp r = {.status = 418, .body = "{\"detail\":\"unscripted\"}"};
        int n;

        while (!(buf && (hend = strstr(buf, "\r\n\r\n")) != NULL))
            if (srv_fill(sv, fd, &buf, &len, &cap) != 0)
                goto done;
        hlen = (size_t)(hend - buf) + 4;
        cl = strcasestr(buf, "\r\nContent-Length:");
        if (cl && cl < hend)
            blen = strtoul(cl + 17, NULL, 10);
        if (strcasestr(buf, "\r\nExpect: 100-continue") &&
            send(fd, "HTTP/1.1 100 Continue\r\n\r\n", 25, MSG_NOSIGNAL) < 0)
            goto done;
        while (len < hlen + blen)
            if (srv_fill(sv, fd, &buf, &len, &cap) != 0)
                goto done;

        pthread_mutex_lock(&sv->mu);
        if (sv->n_reqs < SRV_MAX_REQS) {
            char *sp1 = strchr(buf, ' '), *sp2 = sp1 ? strchr(sp1 + 1, ' ') : NULL;
            rq = &sv->reqs[sv->n_reqs++];
            if (sp1 && sp2) {
                snprintf(rq->method, sizeof(rq->method), "%.*s", (int)(sp1 - buf), buf);
                snprintf(rq->path, sizeof(rq->path), "%.*s", (int)(sp2 - sp1 - 1), sp1 + 1);
            }
            snprintf(rq->headers, sizeof(rq->headers), "%.*s", (int)hlen, buf);
            rq->body = malloc(blen + 1);
            memcpy(rq->body, buf + hlen, blen);
            rq->body[blen] = '\0';
            rq->body_len = blen;
        }
        if (sv->next < sv->n_script)
            r = sv->script[sv->next++];
        pthread_mutex_unlock(&sv->mu);

        /* keep what follows this request (pipelining never happens here, but be exact) */
        memmove(buf, buf + hlen + blen, len - hlen - blen);
        len -= hlen + blen;
        buf[len] = '\0';

        if (r.hook)
            r.hook(r.hook_arg);
        if (r.delay_ms)
            msleep(r.delay_ms);
        if (r.raw) {
            if (send(fd, r.raw, strlen(r.raw), MSG_NOSIGNAL) < 0)
                goto done;
            shutdown(fd, SHUT_RDWR);
            goto done;
        }
        if (r.status == 0) {
            shutdown(fd, SHUT_RDWR); /* the peer sees the connection close, no answer */
            goto done;
        }
        n = snprintf(out, sizeof(out),
                     "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\n%s\r\n%s",
                     r.status, phrase(r.status), r.body ? strlen(r.body) : 0,
                     r.headers ? r.headers : "", r.body ? r.body : "");
        if (send(fd, out, (size_t)n, MSG_NOSIGNAL) < 0)
            goto done;
    }
done:
    free(buf);
    return NULL;
}

static void *srv_accept(void *p)
{
    srv *sv = p;

    while (!atomic_load(&sv->stop)) {
        struct pollfd pfd = {.fd = sv->lfd, .events = POLLIN};
        conn_arg *ca;
        int fd;

        if (poll(&pfd, 1, 50) <= 0)
            continue;
        fd = accept(sv->lfd, NULL, NULL);
        if (fd < 0)
            continue;
        pthread_mutex_lock(&sv->mu);
        if (sv->n_conn_th == SRV_MAX_CONNS) {
            pthread_mutex_unlock(&sv->mu);
            close(fd);
            continue;
        }
        ca = malloc(sizeof(*ca));
        ca->sv = sv;
        ca->fd = fd;
        sv->conn_fd[sv->n_conn_th] = fd;
        pthread_create(&sv->conn_th[sv->n_conn_th], NULL, srv_conn, ca);
        sv->n_conn_th++;
        sv->n_conns++;
        pthread_mutex_unlock(&sv->mu);
    }
    return NULL;
}

/** A listening socket on 127.0.0.1, port chosen by the kernel. */
static int listen_any(int backlog, int *port)
{
    struct sockaddr_in a = {.sin_family = AF_INET};
    socklen_t alen = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;

    assert_true(fd >= 0);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(listen(fd, backlog), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &alen), 0);
    *port = ntohs(a.sin_port);
    return fd;
}

static void srv_start(srv *sv)
{
    memset(sv, 0, sizeof(*sv));
    pthread_mutex_init(&sv->mu, NULL);
    sv->lfd = listen_any(64, &sv->port);
    atomic_store(&sv->stop, 0);
    assert_int_equal(pthread_create(&sv->accept_th, NULL, srv_accept, sv), 0);
    sv->running = 1;
}

static void srv_stop(srv *sv)
{
    if (!sv->running)
        return;
    atomic_store(&sv->stop, 1);
    pthread_join(sv->accept_th, NULL);
    close(sv->lfd);
    for (size_t i = 0; i < sv->n_conn_th; i++) {
        shutdown(sv->conn_fd[i], SHUT_RDWR);
        pthread_join(sv->conn_th[i], NULL);
        close(sv->conn_fd[i]);
    }
    for (size_t i = 0; i < sv->n_reqs; i++)
        free(sv->reqs[i].body);
    pthread_mutex_destroy(&sv->mu);
    sv->running = 0;
}

static void srv_push(srv *sv, resp r)
{
    pthread_mutex_lock(&sv->mu);
    assert_true(sv->n_script < SRV_MAX_SCRIPT);
    sv->script[sv->n_script++] = r;
    pthread_mutex_unlock(&sv->mu);
}

static void srv_push_n(srv *sv, int times, resp r)
{
    for (int i = 0; i < times; i++)
        srv_push(sv, r);
}

static size_t srv_nreqs(srv *sv)
{
    size_t n;
    pthread_mutex_lock(&sv->mu);
    n = sv->n_reqs;
    pthread_mutex_unlock(&sv->mu);
    return n;
}

static const reqrec *srv_req(srv *sv, size_t i)
{
    assert_true(i < srv_nreqs(sv));
    return &sv->reqs[i]; /* never moves once written */
}

/** The value of header @p name in a recorded request ("" if absent). */
static const char *req_header(const reqrec *rq, const char *name, char *out, size_t size)
{
    char pat[128];
    const char *p, *e;

    snprintf(pat, sizeof(pat), "\r\n%s:", name);
    out[0] = '\0';
    p = strcasestr(rq->headers, pat);
    if (!p)
        return out;
    p += strlen(pat);
    while (*p == ' ')
        p++;
    e = strstr(p, "\r\n");
    snprintf(out, size, "%.*s", (int)(e - p), p);
    return out;
}

/* ------------------------------------------------------------------------ */
/* fixtures                                                                  */

typedef struct fixture {
    srv wallet, user, consul;
    bw_config *cfg;
    char dir[64];
    char secret_path[128], token_path[128];
} fixture;

static fixture *F;

static char *xasprintf(const char *fmt, ...)
{
    va_list ap;
    char *s = NULL;
    va_start(ap, fmt);
    assert_true(vasprintf(&s, fmt, ap) >= 0);
    va_end(ap);
    return s;
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void cfg_free(bw_config *cfg)
{
    free(cfg->wallet.url);
    free(cfg->wallet.consume_path);
    free(cfg->user_service.url);
    free(cfg->user_service.consume_path);
    free(cfg->user_service.record_path);
    free(cfg->consul_url);
    free(cfg->jwt_secret_file);
    free(cfg->token_file);
    free(cfg->service_name);
    free(cfg);
}

static int setup(void **state)
{
    F = calloc(1, sizeof(*F));
    srv_start(&F->wallet);
    srv_start(&F->user);
    snprintf(F->dir, sizeof(F->dir), "/tmp/test_settle.XXXXXX");
    assert_non_null(mkdtemp(F->dir));
    snprintf(F->secret_path, sizeof(F->secret_path), "%s/jwt-secret", F->dir);
    snprintf(F->token_path, sizeof(F->token_path), "%s/token", F->dir);

    F->cfg = calloc(1, sizeof(bw_config));
    F->cfg->wallet.url = xasprintf("http://127.0.0.1:%d", F->wallet.port);
    F->cfg->wallet.consume_path = strdup("/api/v1/users/{user_id}/credits/consume");
    F->cfg->wallet.timeout_ms = 400;
    F->cfg->user_service.url = xasprintf("http://127.0.0.1:%d/", F->user.port);
    F->cfg->user_service.consume_path = strdup("/api/v1/users/{user_id}/credits/consume");
    F->cfg->user_service.record_path = strdup("/api/v1/usage/records");
    F->cfg->user_service.timeout_ms = 400;
    F->cfg->service_name = strdup("billing-worker");
    F->cfg->max_attempts = 3;
    F->cfg->retry_max_interval_ms = 2000;
    F->cfg->breaker_failures = 0; /* off unless a test wants it */
    F->cfg->breaker_cooldown_ms = 400;
    bw_log_set_level(getenv("BW_TEST_DEBUG") ? BW_LOG_DEBUG : BW_LOG_ERROR);
    *state = F;
    return 0;
}

static int teardown(void **state)
{
    char cmd[128];
    srv_stop(&F->wallet);
    srv_stop(&F->user);
    srv_stop(&F->consul);
    cfg_free(F->cfg);
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", F->dir);
    assert_int_equal(system(cmd), 0);
    free(F);
    F = NULL;
    (void)state;
    return 0;
}

static bw_settle_req base_req(void)
{
    bw_settle_req r = {
        .user_id = "u1",
        .request_id = "r1",
        .session_id = NULL,
        .idempotency_key = "bw:r1",
        .amount = "5.0000",
        .cost_usd = "0.010000",
        .reason = "AI chat: 3 model calls, 1 tool call",
        .breakdown_json = "{\"lines\":[{\"kind\":\"model\",\"name\":\"gpt-4o\",\"calls\":3,"
                          "\"credits\":\"3\"}],\"minimum_applied\":false}",
        .model_name = "gpt-4o",
        .model_calls = 3,
        .tool_calls = 1,
        .prompt_tokens = 1000,
        .completion_tokens = 234,
        .tokens_used = 1234,
    };
    return r;
}

static bw_settle *new_settle(void)
{
    char err[256] = "";
    bw_settle *s = bw_settle_new(F->cfg, err, sizeof(err));
    if (!s)
        fail_msg("bw_settle_new: %s", err);
    return s;
}

static const resp OK_T123 = {.status = 200,
                             .body =
                                 "{\"success\": true, \"balance\": 95.0000, \"transaction_id\": "
                                 "\"t-123\"}"};
static const resp R503 = {.status = 503, .body = "{\"detail\":\"down\"}"};
static const resp R500 = {.status = 500, .body = "{\"detail\":\"boom\"}"};
static const resp USER_RECORD_42 = {.status = 200,
                                    .body = "{\"success\": true, \"data\": {\"id\": 42}}"};
static const resp USER_CONSUME_OK = {.status = 200,
                                     .body = "{\"success\":true,\"balance\":\"90.0000\","
                                             "\"transaction_id\":\"u-7\"}"};

/* ------------------------------------------------------------------------ */
/* JWT check, independent of settle.c                                        */

static void b64url_enc(const unsigned char *in, size_t n, char *out)
{
    int len = EVP_EncodeBlock((unsigned char *)out, in, (int)n);
    for (int i = 0; i < len; i++) {
        if (out[i] == '+')
            out[i] = '-';
        else if (out[i] == '/')
            out[i] = '_';
        else if (out[i] == '=') {
            out[i] = '\0';
            break;
        }
    }
}

static json_t *b64url_json(const char *in, size_t n)
{
    char tmp[1024];
    unsigned char dec[1024];
    size_t m = 0;
    int len;

    assert_true(n + 4 < sizeof(tmp));
    for (size_t i = 0; i < n; i++)
        tmp[m++] = in[i] == '-' ? '+' : in[i] == '_' ? '/' : in[i];
    while (m % 4)
        tmp[m++] = '=';
    len = EVP_DecodeBlock(dec, (unsigned char *)tmp, (int)m);
    assert_true(len > 0);
    while (len > 0 && dec[len - 1] == '\0') /* EVP_DecodeBlock keeps padding zeros */
        len--;
    return json_loadb((const char *)dec, (size_t)len, 0, NULL);
}

/** Assert the request carries a valid HS256 JWT signed with @p secret. */
static void assert_jwt(const reqrec *rq, const char *secret)
{
    char auth[1024], sig[128];
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int maclen = 0;
    const char *tok, *dot1, *dot2;
    json_t *hdr, *claims;
    json_int_t iat, exp, now = (json_int_t)time(NULL);

    req_header(rq, "Authorization", auth, sizeof(auth));
    assert_true(strncmp(auth, "Bearer ", 7) == 0);
    tok = auth + 7;
    dot1 = strchr(tok, '.');
    assert_non_null(dot1);
    dot2 = strchr(dot1 + 1, '.');
    assert_non_null(dot2);
    assert_non_null(HMAC(EVP_sha256(), secret, (int)strlen(secret), (const unsigned char *)tok,
                         (size_t)(dot2 - tok), mac, &maclen));
    b64url_enc(mac, maclen, sig);
    assert_string_equal(dot2 + 1, sig);

    hdr = b64url_json(tok, (size_t)(dot1 - tok));
    assert_non_null(hdr);
    assert_string_equal(json_string_value(json_object_get(hdr, "alg")), "HS256");
    json_decref(hdr);
    claims = b64url_json(dot1 + 1, (size_t)(dot2 - dot1 - 1));
    assert_non_null(claims);
    assert_string_equal(json_string_value(json_object_get(claims, "sub")), "billing-worker");
    iat = json_integer_value(json_object_get(claims, "iat"));
    exp = json_integer_value(json_object_get(claims, "exp"));
    assert_true(iat >= now - 5 && iat <= now + 1);
    assert_int_equal(exp - iat, 300);
    json_decref(claims);
}

/* ------------------------------------------------------------------------ */
/* tests                                                                     */

static void test_wallet_settles_and_request_is_exact(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    char h[512];
    const reqrec *rq;
    json_t *body, *bd, *want;
    bw_settle *s;

    write_file(F->secret_path, "s3cret-for-tests\n");
    F->cfg->jwt_secret_file = strdup(F->secret_path);
    s = new_settle();
    req.user_id = "u/1 x";
    srv_push(&F->wallet, OK_T123);

    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_string_equal(res.via, "wallet");
    assert_int_equal(res.http_status, 200);
    assert_string_equal(res.transaction_id, "t-123");
    assert_string_equal(res.balance_after, "95.0000"); /* the text, not 95.0 */
    assert_int_equal(res.outcome_unknown, 0);

    assert_int_equal(srv_nreqs(&F->wallet), 1);
    assert_int_equal(srv_nreqs(&F->user), 0);
    rq = srv_req(&F->wallet, 0);
    assert_string_equal(rq->method, "POST");
    assert_string_equal(rq->path, "/api/v1/users/u%2F1%20x/credits/consume");
    assert_string_equal(req_header(rq, "Idempotency-Key", h, sizeof(h)), "bw:r1");
    assert_string_equal(req_header(rq, "Content-Type", h, sizeof(h)), "application/json");
    assert_string_equal(req_header(rq, "Expect", h, sizeof(h)), "");
    assert_jwt(rq, "s3cret-for-tests"); /* the trailing newline of the file is not the secret */

    /* the amount is the caller's text, as a JSON number */
    assert_non_null(strstr(rq->body, "\"amount\":5.0000"));
    body = json_loads(rq->body, JSON_REJECT_DUPLICATES, NULL);
    assert_non_null(body);
    assert_true(json_is_real(json_object_get(body, "amount")));
    assert_string_equal(json_string_value(json_object_get(body, "service")), "billing-worker");
    assert_string_equal(json_string_value(json_object_get(body, "reason")),
                        "AI chat: 3 model calls, 1 tool call");
    assert_string_equal(json_string_value(json_object_get(body, "usage_record_id")), "bw:r1");
    assert_string_equal(json_string_value(json_object_get(body, "request_id")), "r1");
    assert_true(json_is_null(json_object_get(body, "session_id")));
    bd = json_object_get(body, "breakdown");
    want = json_loads(req.breakdown_json, 0, NULL);
    assert_true(json_equal(bd, want));
    assert_int_equal(json_object_size(body), 7);
    json_decref(want);
    json_decref(body);
    bw_settle_destroy(s);
    (void)state;
}

static void test_path_never_collapsed_and_keepalive(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s = new_settle();
    char h[64];

    srv_push_n(&F->wallet, 2, OK_T123);
    req.user_id = "../../admin?x=1#y";
    req.session_id = "s-9";
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    req.user_id = "..";
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_SETTLED);

    assert_int_equal(srv_nreqs(&F->wallet), 2);
    assert_string_equal(srv_req(&F->wallet, 0)->path,
                        "/api/v1/users/..%2F..%2Fadmin%3Fx%3D1%23y/credits/consume");
    assert_string_equal(srv_req(&F->wallet, 1)->path, "/api/v1/users/../credits/consume");
    assert_non_null(strstr(srv_req(&F->wallet, 0)->body, "\"session_id\":\"s-9\""));
    /* no auth configured: no header */
    assert_string_equal(req_header(srv_req(&F->wallet, 0), "Authorization", h, sizeof(h)), "");
    /* one handle per service, kept alive */
    assert_int_equal(F->wallet.n_conns, 1);
    bw_settle_destroy(s);
    (void)state;
}

static void test_older_wallet_answer_and_raw_numbers(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s = new_settle();

    srv_push(&F->wallet, (resp){.status = 200,
                                .body = "{\"data\": {\"remaining_balance\": 12.50}, "
                                        "\"transaction_id\": 987}"});
    srv_push(&F->wallet, (resp){.status = 200,
                                .body = "{\"balance\": 0.1000000000000000055511151231257827, "
                                        "\"transaction_id\": \"t\"}"});
    /* a key written with an escape: raw text not found, shortest round trip instead */
    srv_push(&F->wallet,
             (resp){.status = 200, .body = "{\"bal\\u0061nce\": 95.5, \"transaction_id\": \"t\"}"});
    /* 2xx without a body is still settled */
    srv_push(&F->wallet, (resp){.status = 204, .body = NULL});

    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_string_equal(res.transaction_id, "987");
    assert_string_equal(res.balance_after, "12.50");
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_string_equal(res.balance_after, "0.1000000000000000055511151231257827");
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_string_equal(res.balance_after, "95.5");
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_int_equal(res.http_status, 204);
    assert_string_equal(res.transaction_id, "");
    assert_string_equal(res.balance_after, "");
    bw_settle_destroy(s);
    (void)state;
}

/* 200 {"success": false}: the wallet took nothing; recording "settled" would
 * lose the charge without a trace. It is a refusal, with the wallet's detail. */
static void test_200_success_false_is_rejected(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s = new_settle();

    srv_push(&F->wallet, (resp){.status = 200, .body = "{\"success\":false,\"detail\":\"nope\"}"});
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_REJECTED);
    assert_string_equal(res.reason, "nope");
    assert_int_equal(srv_nreqs(&F->wallet), 1); /* no retry */
    assert_int_equal(srv_nreqs(&F->user), 0);   /* no fallback */
    bw_settle_destroy(s);
    (void)state;
}

static void test_402_rejected_no_retry_no_fallback(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s = new_settle();

    srv_push(&F->wallet, (resp){.status = 402, .body = "{\"detail\": \"Insufficient credits\"}"});
    srv_push(&F->wallet, (resp){.status = 404, .body = NULL});
    srv_push(&F->wallet,
             (resp){.status = 422, .body = "{\"detail\":[{\"loc\":[\"body\",\"amount\"]}]}"});
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_REJECTED);
    assert_string_equal(res.reason, "Insufficient credits");
    assert_string_equal(res.via, "wallet");
    assert_int_equal(res.http_status, 402);
    assert_int_equal(srv_nreqs(&F->wallet), 1);
    assert_int_equal(srv_nreqs(&F->user), 0);

    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_REJECTED);
    assert_string_equal(res.reason, "HTTP 404 Not Found");
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_REJECTED);
    assert_string_equal(res.reason, "[{\"loc\":[\"body\",\"amount\"]}]");
    assert_int_equal(srv_nreqs(&F->wallet), 3);
    assert_int_equal(srv_nreqs(&F->user), 0);
    bw_settle_destroy(s);
    (void)state;
}

static void test_503_exhausted_goes_to_fallback(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s = new_settle();
    const reqrec *rec, *cons;
    json_t *body;
    char h[64];

    srv_push_n(&F->wallet, 3, R503);
    srv_push(&F->user, USER_RECORD_42);
    srv_push(&F->user, USER_CONSUME_OK);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_string_equal(res.via, "user_service");
    assert_string_equal(res.transaction_id, "u-7");
    assert_string_equal(res.balance_after, "90.0000");
    assert_int_equal(srv_nreqs(&F->wallet), 3);
    assert_int_equal(srv_nreqs(&F->user), 2);

    rec = srv_req(&F->user, 0);
    assert_string_equal(rec->path, "/api/v1/usage/records");
    assert_string_equal(req_header(rec, "Idempotency-Key", h, sizeof(h)), "bw:r1");
    assert_non_null(strstr(rec->body, "\"credits_charged\":5.0000"));
    assert_non_null(strstr(rec->body, "\"cost_usd\":0.010000"));
    body = json_loads(rec->body, JSON_REJECT_DUPLICATES, NULL);
    assert_non_null(body);
    assert_string_equal(json_string_value(json_object_get(body, "user_id")), "u1");
    assert_string_equal(json_string_value(json_object_get(body, "request_id")), "r1");
    assert_string_equal(json_string_value(json_object_get(body, "model_name")), "gpt-4o");
    assert_true(json_is_null(json_object_get(body, "session_id")));
    assert_int_equal(json_integer_value(json_object_get(body, "tokens_used")), 1234);
    assert_int_equal(json_integer_value(json_object_get(body, "prompt_tokens")), 1000);
    assert_int_equal(json_integer_value(json_object_get(body, "completion_tokens")), 234);
    assert_int_equal(json_integer_value(json_object_get(body, "tool_calls")), 1);
    assert_int_equal(json_integer_value(json_object_get(body, "model_calls")), 3);
    assert_true(json_is_object(json_object_get(body, "breakdown")));
    assert_int_equal(json_object_size(body), 12);
    json_decref(body);

    cons = srv_req(&F->user, 1);
    assert_string_equal(cons->path, "/api/v1/users/u1/credits/consume");
    assert_string_equal(req_header(cons, "Idempotency-Key", h, sizeof(h)), "bw:r1");
    assert_non_null(strstr(cons->body, "\"amount\":5.0000"));
    assert_non_null(strstr(cons->body, "\"usage_record_id\":42"));
    body = json_loads(cons->body, JSON_REJECT_DUPLICATES, NULL);
    assert_non_null(body);
    assert_int_equal(json_integer_value(json_object_get(body, "usage_record_id")), 42);
    assert_string_equal(json_string_value(json_object_get(body, "service")), "billing-worker");
    json_decref(body);
    bw_settle_destroy(s);
    (void)state;
}

static void test_500_is_unknown_wallet_only(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s = new_settle();

    srv_push_n(&F->wallet, 3, R500);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_PENDING);
    assert_int_equal(res.outcome_unknown, 1);
    assert_int_equal(res.http_status, 500);
    assert_non_null(strstr(res.reason, "500"));
    assert_int_equal(srv_nreqs(&F->wallet), 3);
    assert_int_equal(srv_nreqs(&F->user), 0);
    bw_settle_destroy(s);
    (void)state;
}

static void test_unknown_then_not_delivered_still_no_fallback(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s = new_settle();

    srv_push(&F->wallet, R500);
    srv_push_n(&F->wallet, 2, R503);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_PENDING);
    assert_int_equal(res.outcome_unknown, 1);
    assert_int_equal(srv_nreqs(&F->wallet), 3);
    assert_int_equal(srv_nreqs(&F->user), 0);
    bw_settle_destroy(s);
    (void)state;
}

/*
 * A kept-alive connection that the wallet closes after reading (and maybe
 * applying) a charge: libcurl resends on a new connection by itself, and that
 * copy's 503 must not make the charge look "not delivered" (G7).
 */
static void test_drop_on_reused_connection_is_unknown(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s = new_settle();

    srv_push(&F->wallet, OK_T123);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0); /* opens the connection */
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_int_equal(F->wallet.n_conns, 1);

    req.request_id = "r2";
    req.idempotency_key = "bw:r2";
    srv_push(&F->wallet, (resp){.status = 0}); /* read, then closed unanswered */
    srv_push_n(&F->wallet, 4, R503);
    srv_push(&F->user, USER_RECORD_42);
    srv_push(&F->user, USER_CONSUME_OK);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_PENDING);
    assert_int_equal(res.outcome_unknown, 1);
    assert_int_equal(srv_nreqs(&F->user), 0); /* never the fallback */
    assert_true(srv_nreqs(&F->wallet) >= 2);
    bw_settle_destroy(s);
    (void)state;
}

static void test_connection_dropped_after_request_is_unknown(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s = new_settle();

    srv_push_n(&F->wallet, 3, (resp){.status = 0});
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_PENDING);
    assert_int_equal(res.outcome_unknown, 1);
    assert_int_equal(res.http_status, 0);
    assert_int_equal(srv_nreqs(&F->wallet), 3);
    assert_int_equal(srv_nreqs(&F->user), 0);
    bw_settle_destroy(s);
    (void)state;
}

static void test_garbage_reply_is_unknown(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s;

    F->cfg->max_attempts = 2;
    s = new_settle();
    /* an HTTP/0.9-looking answer (curl: CURLE_UNSUPPORTED_PROTOCOL) and a broken status line */
    srv_push(&F->wallet, (resp){.raw = "OK done\r\n"});
    srv_push(&F->wallet, (resp){.raw = "HTTP/1.1 2x0 Fine\r\n\r\n"});
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_PENDING);
    assert_int_equal(res.outcome_unknown, 1);
    assert_int_equal(srv_nreqs(&F->wallet), 2);
    assert_int_equal(srv_nreqs(&F->user), 0);
    bw_settle_destroy(s);
    (void)state;
}

static void test_connection_refused_goes_to_fallback(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s;

    /* first a success on a kept-alive connection, then the wallet goes away */
    srv_push(&F->wallet, OK_T123);
    s = new_settle();
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    srv_stop(&F->wallet);

    srv_push(&F->user, USER_RECORD_42);
    srv_push(&F->user, USER_CONSUME_OK);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_string_equal(res.via, "user_service");
    assert_int_equal(res.outcome_unknown, 0);
    assert_int_equal(srv_nreqs(&F->user), 2);
    bw_settle_destroy(s);
    (void)state;
}

static void test_timeout_after_send_is_unknown(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s;
    int64_t t0;

    F->cfg->wallet.timeout_ms = 250;
    F->cfg->max_attempts = 2;
    s = new_settle();
    srv_push_n(&F->wallet, 2, (resp){.status = 200, .body = "{}", .delay_ms = 600});
    t0 = mono_ms();
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_true(mono_ms() - t0 < 1500);
    assert_int_equal(res.status, BW_SETTLE_PENDING);
    assert_int_equal(res.outcome_unknown, 1);
    assert_int_equal(srv_nreqs(&F->wallet), 2);
    assert_int_equal(srv_nreqs(&F->user), 0);
    bw_settle_destroy(s);
    (void)state;
}

static void test_connect_timeout_is_not_delivered(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s;
    int port, lfd, fillers[8], nfill = 0;

    /* a listener that never accepts, its backlog filled: new SYNs go unanswered */
    lfd = listen_any(0, &port);
    for (int i = 0; i < 8; i++) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        connect(fd, (struct sockaddr *)&a, sizeof(a));
        fillers[nfill++] = fd;
    }
    msleep(50);
    free(F->cfg->wallet.url);
    F->cfg->wallet.url = xasprintf("http://127.0.0.1:%d", port);
    F->cfg->wallet.timeout_ms = 200;
    F->cfg->max_attempts = 2;
    s = new_settle();
    srv_push(&F->user, USER_RECORD_42);
    srv_push(&F->user, USER_CONSUME_OK);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_string_equal(res.via, "user_service");
    bw_settle_destroy(s);
    for (int i = 0; i < nfill; i++)
        close(fillers[i]);
    close(lfd);
    (void)state;
}

static void test_409_with_transaction_id_is_settled(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s = new_settle();

    srv_push(&F->wallet, (resp){.status = 409,
                                .body = "{\"detail\":\"duplicate\",\"transaction_id\":\"t-1\"}"});
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_string_equal(res.transaction_id, "t-1");
    assert_int_equal(res.http_status, 409);
    assert_int_equal(srv_nreqs(&F->wallet), 1);
    bw_settle_destroy(s);
    (void)state;
}

static void test_409_in_flight_retried_at_wallet(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s = new_settle();

    srv_push(&F->wallet, (resp){.status = 409, .body = "{\"detail\":\"in progress\"}"});
    srv_push(&F->wallet, OK_T123);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_string_equal(res.via, "wallet");
    assert_int_equal(srv_nreqs(&F->wallet), 2);
    assert_int_equal(srv_nreqs(&F->user), 0);

    /* in flight every time: pending, never the fallback */
    srv_push_n(&F->wallet, 3, (resp){.status = 409, .body = NULL});
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_PENDING);
    assert_int_equal(res.outcome_unknown, 1);
    assert_int_equal(srv_nreqs(&F->wallet), 5);
    assert_int_equal(srv_nreqs(&F->user), 0);
    bw_settle_destroy(s);
    (void)state;
}

static void test_429_retry_after_honoured(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s = new_settle();
    int64_t t0, dt;

    srv_push(&F->wallet, (resp){.status = 429, .body = "{}", .headers = "Retry-After: 1\r\n"});
    srv_push(&F->wallet, OK_T123);
    t0 = mono_ms();
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    dt = mono_ms() - t0;
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_true(dt >= 900);
    assert_true(dt < 1900);
    assert_int_equal(srv_nreqs(&F->wallet), 2);
    bw_settle_destroy(s);
    (void)state;
}

/* A Retry-After longer than the claim's lease is not waited for: the wallet
 * said it did not take the charge, so the fallback takes it within the lease
 * (else another settler would claim it mid-call, and then neither falls back). */
static void test_retry_after_beyond_lease_goes_to_fallback(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s;
    int64_t t0, dt;

    F->cfg->retry_max_interval_ms = 60000;
    s = new_settle();
    req.lease_ms = 3000;
    srv_push_n(&F->wallet, 5,
               (resp){.status = 429, .body = "{}", .headers = "Retry-After: 20\r\n"});
    srv_push(&F->user, USER_RECORD_42);
    srv_push(&F->user, USER_CONSUME_OK);
    t0 = mono_ms();
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    dt = mono_ms() - t0;
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_string_equal(res.via, "user_service");
    assert_int_equal(srv_nreqs(&F->wallet), 1); /* 20 s would not fit in 3 s */
    assert_int_equal(srv_nreqs(&F->user), 2);
    assert_true(dt < 2000);
    bw_settle_destroy(s);
    (void)state;
}

static void test_retry_after_capped_and_reported(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s;
    int64_t t0;

    F->cfg->retry_max_interval_ms = 150;
    F->cfg->max_attempts = 2;
    s = new_settle();
    srv_push_n(&F->wallet, 2,
               (resp){.status = 429, .body = "{}", .headers = "Retry-After: 30\r\n"});
    srv_push(&F->user, (resp){.status = 503, .body = NULL, .headers = "Retry-After: 30\r\n"});
    srv_push(&F->user, (resp){.status = 503, .body = NULL});
    t0 = mono_ms();
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_true(mono_ms() - t0 < 1000);
    assert_int_equal(res.status, BW_SETTLE_PENDING);
    assert_int_equal(res.outcome_unknown, 0);
    assert_string_equal(res.via, "user_service");
    assert_int_equal(res.retry_after_ms, 150);
    assert_non_null(strstr(res.reason, "user_service record"));
    assert_int_equal(srv_nreqs(&F->user), 2);
    bw_settle_destroy(s);
    (void)state;
}

static void test_breaker_opens_and_probes(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s;

    F->cfg->breaker_failures = 2;
    F->cfg->max_attempts = 2;
    s = new_settle();
    assert_int_equal(bw_settle_breaker_open(s), 0);

    srv_push_n(&F->wallet, 2, R503);
    srv_push(&F->user, USER_RECORD_42);
    srv_push(&F->user, USER_CONSUME_OK);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_string_equal(res.via, "user_service");
    assert_int_equal(bw_settle_breaker_open(s), 1);
    assert_int_equal(srv_nreqs(&F->wallet), 2);

    /* open: the next charge goes straight to the fallback */
    req.request_id = "r2";
    req.idempotency_key = "bw:r2";
    srv_push(&F->user, USER_RECORD_42);
    srv_push(&F->user, USER_CONSUME_OK);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_string_equal(res.via, "user_service");
    assert_int_equal(srv_nreqs(&F->wallet), 2);
    assert_int_equal(srv_nreqs(&F->user), 4);

    /* open and wallet-only: pending, nothing sent anywhere */
    req.wallet_only = 1;
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_PENDING);
    assert_int_equal(res.outcome_unknown, 1);
    assert_true(res.retry_after_ms > 0 && res.retry_after_ms <= 400);
    assert_non_null(strstr(res.reason, "circuit breaker open"));
    assert_int_equal(srv_nreqs(&F->wallet), 2);
    assert_int_equal(srv_nreqs(&F->user), 4);

    /* after the cooldown one probe; its success closes the breaker */
    msleep(450);
    assert_int_equal(bw_settle_breaker_open(s), 0);
    srv_push(&F->wallet, OK_T123);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_string_equal(res.via, "wallet");
    assert_int_equal(srv_nreqs(&F->wallet), 3);
    assert_int_equal(bw_settle_breaker_open(s), 0);
    bw_settle_destroy(s);
    (void)state;
}

static void test_breaker_half_open_probe_failure_reopens(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s;

    F->cfg->breaker_failures = 2;
    F->cfg->max_attempts = 2;
    F->cfg->breaker_cooldown_ms = 200;
    s = new_settle();
    srv_push_n(&F->wallet, 3, R503);
    srv_push_n(&F->user, 2, (resp){.status = 402, .body = "{\"detail\":\"Insufficient credits\"}"});
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_REJECTED);
    assert_string_equal(res.via, "user_service");
    assert_int_equal(bw_settle_breaker_open(s), 1);
    msleep(250);
    /* the probe fails: open again at once, the rest of the charge goes to the fallback */
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(srv_nreqs(&F->wallet), 3);
    assert_int_equal(bw_settle_breaker_open(s), 1);
    assert_int_equal(res.status, BW_SETTLE_REJECTED);
    bw_settle_destroy(s);
    (void)state;
}

typedef struct rotate {
    const char *path, *text;
} rotate;

static void rotate_file(void *arg)
{
    rotate *r = arg;
    write_file(r->path, r->text);
}

static void test_401_token_file_reread_and_never_logged(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s;
    char h[256], logpath[160], logbuf[65536];
    rotate rot = {F->token_path, "tok-new-abc\n"};
    int saved, lfd;
    ssize_t n;

    write_file(F->token_path, "tok-old-xyz\n");
    F->cfg->token_file = strdup(F->token_path);
    s = new_settle();
    srv_push(&F->wallet, (resp){.status = 401,
                                .body = "{\"detail\":\"expired\"}",
                                .hook = rotate_file,
                                .hook_arg = &rot});
    srv_push(&F->wallet, OK_T123);

    /* capture the logs at debug level: the token must never appear */
    snprintf(logpath, sizeof(logpath), "%s/log", F->dir);
    fflush(stderr);
    saved = dup(2);
    lfd = open(logpath, O_CREAT | O_TRUNC | O_WRONLY, 0600);
    dup2(lfd, 2);
    bw_log_set_level(BW_LOG_DEBUG);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    bw_log_set_level(getenv("BW_TEST_DEBUG") ? BW_LOG_DEBUG : BW_LOG_ERROR);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    close(lfd);

    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_int_equal(srv_nreqs(&F->wallet), 2);
    assert_int_equal(srv_nreqs(&F->user), 0);
    assert_string_equal(req_header(srv_req(&F->wallet, 0), "Authorization", h, sizeof(h)),
                        "Bearer tok-old-xyz");
    assert_string_equal(req_header(srv_req(&F->wallet, 1), "Authorization", h, sizeof(h)),
                        "Bearer tok-new-abc");

    lfd = open(logpath, O_RDONLY);
    n = read(lfd, logbuf, sizeof(logbuf) - 1);
    close(lfd);
    assert_true(n > 0);
    logbuf[n] = '\0';
    assert_non_null(strstr(logbuf, "\"request_id\":\"r1\""));
    assert_null(strstr(logbuf, "tok-old"));
    assert_null(strstr(logbuf, "tok-new"));
    assert_null(strstr(logbuf, "Bearer"));
    bw_settle_destroy(s);
    (void)state;
}

static void test_401_jwt_reminted_with_rotated_secret(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s;
    rotate rot = {F->secret_path, "second-secret"};

    write_file(F->secret_path, "first-secret\n");
    F->cfg->jwt_secret_file = strdup(F->secret_path);
    s = new_settle();
    srv_push(&F->wallet, (resp){.status = 403, .hook = rotate_file, .hook_arg = &rot});
    srv_push(&F->wallet, OK_T123);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_int_equal(srv_nreqs(&F->wallet), 2);
    assert_jwt(srv_req(&F->wallet, 0), "first-secret");
    assert_jwt(srv_req(&F->wallet, 1), "second-secret");
    bw_settle_destroy(s);
    (void)state;
}

static void test_401_after_refresh_is_not_delivered(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s;

    write_file(F->token_path, "tok");
    F->cfg->token_file = strdup(F->token_path);
    F->cfg->max_attempts = 2;
    s = new_settle();
    /* attempt 1: 401, refresh, 401 again; attempt 2: 401: then the fallback */
    srv_push_n(&F->wallet, 3, (resp){.status = 401, .body = NULL});
    srv_push(&F->user, USER_RECORD_42);
    srv_push(&F->user, USER_CONSUME_OK);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_string_equal(res.via, "user_service");
    assert_int_equal(srv_nreqs(&F->wallet), 3);
    bw_settle_destroy(s);
    (void)state;
}

static void test_wallet_only_never_falls_back(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s = new_settle();

    req.wallet_only = 1;
    srv_push_n(&F->wallet, 3, R503);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_PENDING);
    assert_int_equal(res.outcome_unknown, 1);
    assert_int_equal(res.http_status, 503);
    assert_int_equal(srv_nreqs(&F->wallet), 3);
    assert_int_equal(srv_nreqs(&F->user), 0);
    bw_settle_destroy(s);
    (void)state;
}

static void test_fallback_outcomes(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s;

    F->cfg->max_attempts = 2;
    s = new_settle();

    /* consume unknown at the user service: pending, outcome unknown */
    srv_push_n(&F->wallet, 2, R503);
    srv_push(&F->user, USER_RECORD_42);
    srv_push_n(&F->user, 2, R500);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_PENDING);
    assert_int_equal(res.outcome_unknown, 1);
    assert_string_equal(res.via, "user_service");
    assert_int_equal(srv_nreqs(&F->user), 3);

    /* consume rejected at the user service */
    srv_push_n(&F->wallet, 2, R503);
    srv_push(&F->user, (resp){.status = 200, .body = "{\"data\":{\"id\":\"rec-\\\"9\"}}"});
    srv_push(&F->user, (resp){.status = 402, .body = "{\"detail\":\"Insufficient credits\"}"});
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_REJECTED);
    assert_string_equal(res.via, "user_service");
    assert_string_equal(res.reason, "Insufficient credits");
    /* a string id is passed through as the service wrote it */
    assert_non_null(strstr(srv_req(&F->user, 4)->body, "\"usage_record_id\":\"rec-\\\"9\""));

    /* record answered without data.id: pending, nothing consumed */
    srv_push_n(&F->wallet, 2, R503);
    srv_push(&F->user, (resp){.status = 200, .body = "{\"success\":true}"});
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_PENDING);
    assert_int_equal(res.outcome_unknown, 0);
    assert_int_equal(srv_nreqs(&F->user), 6);
    bw_settle_destroy(s);
    (void)state;
}

static void test_no_fallback_configured(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s;

    free(F->cfg->user_service.url);
    F->cfg->user_service.url = NULL;
    F->cfg->max_attempts = 1;
    s = new_settle();
    srv_push(&F->wallet, R503);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_PENDING);
    assert_int_equal(res.outcome_unknown, 0);
    assert_string_equal(res.via, "wallet");
    bw_settle_destroy(s);
    (void)state;
}

static void test_invalid_requests_send_nothing(void **state)
{
    bw_settle_req req;
    bw_settle_result res;
    bw_settle *s = new_settle();
    const char *bad_amounts[] = {"5.0e1", "1,5", "-1.00", "05.0", "5.", ".5", "", "NaN"};

    for (size_t i = 0; i < sizeof(bad_amounts) / sizeof(bad_amounts[0]); i++) {
        req = base_req();
        req.amount = bad_amounts[i];
        assert_int_equal(bw_settle_charge(s, &req, &res), -1);
    }
    req = base_req();
    req.idempotency_key = "bw:r 1";
    assert_int_equal(bw_settle_charge(s, &req, &res), -1);
    req = base_req();
    req.idempotency_key = "bw:r1\r\nX-Evil: 1";
    assert_int_equal(bw_settle_charge(s, &req, &res), -1);
    req = base_req();
    req.breakdown_json = "{\"a\":1,";
    assert_int_equal(bw_settle_charge(s, &req, &res), -1);
    req = base_req();
    req.reason = "\xff\xfe not utf-8";
    assert_int_equal(bw_settle_charge(s, &req, &res), -1);
    assert_int_equal(srv_nreqs(&F->wallet), 0);
    bw_settle_destroy(s);
    (void)state;
}

static void test_new_errors(void **state)
{
    char err[256] = "";

    free(F->cfg->wallet.url);
    F->cfg->wallet.url = strdup("ftp://wallet");
    assert_null(bw_settle_new(F->cfg, err, sizeof(err)));
    assert_non_null(strstr(err, "wallet.url"));

    free(F->cfg->wallet.url);
    F->cfg->wallet.url = xasprintf("http://127.0.0.1:%d", F->wallet.port);
    F->cfg->jwt_secret_file = strdup("/nonexistent/secret");
    err[0] = '\0';
    assert_null(bw_settle_new(F->cfg, err, sizeof(err)));
    assert_non_null(strstr(err, "/nonexistent/secret"));

    free(F->cfg->jwt_secret_file);
    F->cfg->jwt_secret_file = NULL;
    free(F->cfg->wallet.url);
    F->cfg->wallet.url = strdup("consul://wallet"); /* but no consul.url */
    assert_null(bw_settle_new(F->cfg, err, sizeof(err)));
    (void)state;
}

static void test_consul_resolution(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s;
    char *answer;

    srv_start(&F->consul);
    F->cfg->consul_url = xasprintf("http://127.0.0.1:%d/", F->consul.port);
    F->cfg->consul_refresh_ms = 60000;
    free(F->cfg->wallet.url);
    F->cfg->wallet.url = strdup("consul://wallet");
    answer = xasprintf("[{\"Node\":{\"Address\":\"10.9.9.9\"},"
                       "\"Service\":{\"Address\":\"127.0.0.1\",\"Port\":%d}}]",
                       F->wallet.port);
    srv_push(&F->consul, (resp){.status = 200, .body = answer});
    s = new_settle();
    srv_push_n(&F->wallet, 2, OK_T123);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_int_equal(srv_nreqs(&F->consul), 1); /* cached */
    assert_string_equal(srv_req(&F->consul, 0)->method, "GET");
    assert_string_equal(srv_req(&F->consul, 0)->path, "/v1/health/service/wallet?passing=true");
    assert_int_equal(srv_nreqs(&F->wallet), 2);
    bw_settle_destroy(s);
    srv_stop(&F->consul); /* before the answer it serves is freed */
    free(answer);
    (void)state;
}

static void test_consul_without_instances_is_not_delivered(void **state)
{
    bw_settle_req req = base_req();
    bw_settle_result res;
    bw_settle *s;

    srv_start(&F->consul);
    F->cfg->consul_url = xasprintf("http://127.0.0.1:%d", F->consul.port);
    F->cfg->max_attempts = 2;
    free(F->cfg->wallet.url);
    F->cfg->wallet.url = strdup("consul://wallet");
    srv_push_n(&F->consul, 2, (resp){.status = 200, .body = "[]"});
    s = new_settle();
    srv_push(&F->user, USER_RECORD_42);
    srv_push(&F->user, USER_CONSUME_OK);
    assert_int_equal(bw_settle_charge(s, &req, &res), 0);
    assert_int_equal(res.status, BW_SETTLE_SETTLED);
    assert_string_equal(res.via, "user_service");
    bw_settle_destroy(s);
    (void)state;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)
        T(test_wallet_settles_and_request_is_exact),
        T(test_path_never_collapsed_and_keepalive),
        T(test_older_wallet_answer_and_raw_numbers),
        T(test_402_rejected_no_retry_no_fallback),
        T(test_200_success_false_is_rejected),
        T(test_503_exhausted_goes_to_fallback),
        T(test_500_is_unknown_wallet_only),
        T(test_unknown_then_not_delivered_still_no_fallback),
        T(test_drop_on_reused_connection_is_unknown),
        T(test_connection_dropped_after_request_is_unknown),
        T(test_garbage_reply_is_unknown),
        T(test_connection_refused_goes_to_fallback),
        T(test_timeout_after_send_is_unknown),
        T(test_connect_timeout_is_not_delivered),
        T(test_409_with_transaction_id_is_settled),
        T(test_409_in_flight_retried_at_wallet),
        T(test_429_retry_after_honoured),
        T(test_retry_after_capped_and_reported),
        T(test_retry_after_beyond_lease_goes_to_fallback),
        T(test_breaker_opens_and_probes),
        T(test_breaker_half_open_probe_failure_reopens),
        T(test_401_token_file_reread_and_never_logged),
        T(test_401_jwt_reminted_with_rotated_secret),
        T(test_401_after_refresh_is_not_delivered),
        T(test_wallet_only_never_falls_back),
        T(test_fallback_outcomes),
        T(test_no_fallback_configured),
        T(test_invalid_requests_send_nothing),
        T(test_new_errors),
        T(test_consul_resolution),
        T(test_consul_without_instances_is_not_delivered),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

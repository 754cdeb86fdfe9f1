/*
 * http.c - /metrics, /healthz and /readyz on http.listen (libmicrohttpd,
 * its own thread; it only reads the atomic counters of bw_metrics).
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <microhttpd.h>

#include "bw_http.h"
#include "bw_metrics.h"
#include "bw_util.h"

struct bw_http {
    struct MHD_Daemon *d;
};

static enum MHD_Result reply(struct MHD_Connection *conn, unsigned int status, const char *type,
                             char *body, int must_free)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(
        strlen(body), body, must_free ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
    enum MHD_Result ret;

    MHD_add_response_header(r, "Content-Type", type);
    ret = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *conn, const char *url,
                               const char *method, const char *version, const char *upload,
                               size_t *upload_size, void **con_cls)
{
    if (strcmp(method, "GET") != 0)
        return reply(conn, 405, "text/plain", "method not allowed\n", 0);
    if (strcmp(url, "/metrics") == 0) {
        char *body = bw_metrics_render();
        if (!body)
            return reply(conn, 500, "text/plain", "out of memory\n", 0);
        return reply(conn, 200, "text/plain; version=0.0.4", body, 1);
    }
    if (strcmp(url, "/healthz") == 0)
        return reply(conn, 200, "text/plain", "ok\n", 0);
    if (strcmp(url, "/readyz") == 0) {
        if (atomic_load(&bw_stats.draining))
            return reply(conn, 503, "text/plain", "draining\n", 0);
        if (!atomic_load(&bw_stats.ready))
            return reply(conn, 503, "text/plain", "not ready\n", 0);
        return reply(conn, 200, "text/plain", "ready\n", 0);
    }
    return reply(conn, 404, "text/plain", "not found\n", 0);
}

bw_http *bw_http_start(const char *listen, char *err, size_t errsize)
{
    struct sockaddr_in sa;
    char host[256];
    const char *colon = strrchr(listen, ':');
    int port;
    bw_http *h;

    if (!colon || (size_t)(colon - listen) >= sizeof(host)) {
        bw_seterr(err, errsize, "http.listen %s: expected host:port", listen);
        return NULL;
    }
    snprintf(host, sizeof(host), "%.*s", (int)(colon - listen), listen);
    port = atoi(colon + 1);
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, strcmp(host, "localhost") == 0 ? "127.0.0.1" : host, &sa.sin_addr) !=
        1) {
        bw_seterr(err, errsize, "http.listen %s: expected an IPv4 address", listen);
        return NULL;
    }
    h = calloc(1, sizeof(*h));
    if (!h)
        return NULL;
    h->d = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG, (uint16_t)port,
                            NULL, NULL, handler, NULL, MHD_OPTION_SOCK_ADDR, &sa,
                            MHD_OPTION_CONNECTION_TIMEOUT, 10u, MHD_OPTION_END);
    if (!h->d) {
        bw_seterr(err, errsize, "http.listen %s: cannot listen", listen);
        free(h);
        return NULL;
    }
    return h;
}

void bw_http_stop(bw_http *h)
{
    if (!h)
        return;
    MHD_stop_daemon(h->d);
    free(h);
}

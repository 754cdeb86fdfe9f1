/*
 * bw_http.h - the metrics and health endpoint (libmicrohttpd, own thread):
 * GET /metrics, /healthz, /readyz.
 */
#ifndef BW_HTTP_H
#define BW_HTTP_H

#include <stddef.h>

typedef struct bw_http bw_http;

/** Listen on "host:port". @returns NULL and @p err on failure. */
bw_http *bw_http_start(const char *listen, char *err, size_t errsize);
void bw_http_stop(bw_http *h);

#endif

/*
 * log.c - structured logs on stderr: one JSON object or logfmt line each.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <sys/time.h>

#include "bw_log.h"

static bw_log_level log_level = BW_LOG_INFO;
static int log_json = 1;

static const char *level_names[] = {"debug", "info", "warn", "error"};

int bw_log_setup(const char *level, const char *format)
{
    int found = 0;
    if (level) {
        for (int i = 0; i < 4; i++) {
            if (strcmp(level, level_names[i]) == 0) {
                log_level = (bw_log_level)i;
                found = 1;
            }
        }
        if (!found)
            return -1;
    }
    if (format) {
        if (strcmp(format, "json") == 0)
            log_json = 1;
        else if (strcmp(format, "logfmt") == 0)
            log_json = 0;
        else
            return -1;
    }
    return 0;
}

void bw_log_set_level(bw_log_level lvl)
{
    log_level = lvl;
}

/* Append @p s to @p buf escaped for JSON (or for a quoted logfmt value). */
static size_t put_escaped(char *buf, size_t off, size_t size, const char *s)
{
    for (; *s && off + 8 < size; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            buf[off++] = '\\';
            buf[off++] = (char)c;
        } else if (c < 0x20) {
            off += (size_t)snprintf(buf + off, size - off, "\\u%04x", c);
        } else {
            buf[off++] = (char)c;
        }
    }
    return off;
}

static size_t put_raw(char *buf, size_t off, size_t size, const char *s)
{
    size_t n = strlen(s);
    if (off + n + 1 >= size)
        n = size - off - 1;
    memcpy(buf + off, s, n);
    return off + n;
}

void bw_log(bw_log_level lvl, const char *msg, ...)
{
    char line[4096], ts[64];
    size_t off = 0, size = sizeof(line) - 2;
    struct timeval tv;
    struct tm tm;
    va_list ap;
    const char *k, *v;

    if (lvl < log_level)
        return;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    snprintf(ts, sizeof(ts), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(tv.tv_usec / 1000));
    if (log_json) {
        off = put_raw(line, off, size, "{\"ts\":\"");
        off = put_raw(line, off, size, ts);
        off = put_raw(line, off, size, "\",\"level\":\"");
        off = put_raw(line, off, size, level_names[lvl]);
        off = put_raw(line, off, size, "\",\"msg\":\"");
        off = put_escaped(line, off, size, msg);
        off = put_raw(line, off, size, "\"");
    } else {
        off = put_raw(line, off, size, "ts=");
        off = put_raw(line, off, size, ts);
        off = put_raw(line, off, size, " level=");
        off = put_raw(line, off, size, level_names[lvl]);
        off = put_raw(line, off, size, " msg=\"");
        off = put_escaped(line, off, size, msg);
        off = put_raw(line, off, size, "\"");
    }
    va_start(ap, msg);
    while ((k = va_arg(ap, const char *)) != NULL) {
        v = va_arg(ap, const char *);
        if (!v)
            v = "";
        if (log_json) {
            off = put_raw(line, off, size, ",\"");
            off = put_escaped(line, off, size, k);
            off = put_raw(line, off, size, "\":\"");
            off = put_escaped(line, off, size, v);
            off = put_raw(line, off, size, "\"");
        } else {
            off = put_raw(line, off, size, " ");
            off = put_raw(line, off, size, k);
            off = put_raw(line, off, size, "=\"");
            off = put_escaped(line, off, size, v);
            off = put_raw(line, off, size, "\"");
        }
    }
    va_end(ap);
    if (log_json)
        line[off++] = '}';
    line[off++] = '\n';
    fwrite(line, 1, off, stderr);
}

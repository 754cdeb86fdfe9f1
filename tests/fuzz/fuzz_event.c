/*
 * fuzz_event.c - libFuzzer target for the event parser (src/event.c).
 *
 * Build and run with tests/fuzz/run.sh (clang -fsanitize=fuzzer,address,undefined).
 * Beyond "no crash, no leak, no undefined behaviour", every input is checked
 * against the parser's contract (PRODUCT.md section 3, include/bw_event.h):
 *
 *   - the reason is one the parser may return (never user_mismatch, which only
 *     the store sets) and bw_event_reason_str() names it;
 *   - the error detail is NUL-terminated inside its buffer and printable ASCII
 *     (it goes into dead-letter headers and logs), empty exactly on success;
 *   - on BW_EVR_OK: a known type; event_id, request_id and user_id non-empty;
 *     every identifier NUL-terminated, at most 128 bytes, valid UTF-8 without
 *     control characters (C0, DEL, C1); names NUL-terminated within 256 bytes;
 *     token counts below 2^40, reasoning <= output; a tool call's units in
 *     1..10^6; bw_event_dedup_key() is idempotency_key when present, else
 *     event_id (never NULL, never empty); timestamps not before 1970,
 *     durations not negative;
 *   - the parser is deterministic: a second parse of the same bytes gives the
 *     same reason and the same event;
 *   - a payload one byte over max_bytes is too_large, before any parsing.
 *
 * A violated invariant calls abort(), which libFuzzer reports as a crash and
 * saves the input as crash-<sha1>.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bw_event.h"

#define FUZZ_MAX_BYTES 65536
#define ERR_SIZE       256

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_event: invariant violated at %s:%d: %s\n", __FILE__, __LINE__,   \
                    #cond);                                                                        \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* Length of a NUL-terminated string inside a buffer of @p cap bytes, or cap when unterminated. */
static size_t bounded_len(const char *s, size_t cap)
{
    const char *z = memchr(s, '\0', cap);
    return z ? (size_t)(z - s) : cap;
}

/* Strict UTF-8 (no overlongs, no surrogates, <= U+10FFFF) and no control characters. */
static int valid_id_text(const unsigned char *s, size_t n)
{
    size_t i = 0;

    while (i < n) {
        unsigned c = s[i];
        uint32_t cp;
        size_t k;

        if (c < 0x80) {
            if (c < 0x20 || c == 0x7f)
                return 0;
            i++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf) {
            k = 1;
            cp = c & 0x1f;
        } else if (c >= 0xe0 && c <= 0xef) {
            k = 2;
            cp = c & 0x0f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            k = 3;
            cp = c & 0x07;
        } else {
            return 0;
        }
        if (n - i <= k) /* truncated sequence */
            return 0;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xc0) != 0x80)
                return 0;
            cp = (cp << 6) | (s[i + j] & 0x3f);
        }
        if ((k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) || cp > 0x10ffff ||
            (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        if (cp >= 0x80 && cp <= 0x9f) /* C1 controls */
            return 0;
        i += k + 1;
    }
    return 1;
}

static void check_id(const char *id, int required)
{
    size_t n = bounded_len(id, BW_ID_MAX + 1);

    CHECK(n <= BW_ID_MAX); /* NUL-terminated within 129 bytes: at most 128 bytes of text */
    if (required)
        CHECK(n >= 1);
    CHECK(valid_id_text((const unsigned char *)id, n));
}

static void check_name(const char *name, int required)
{
    size_t n = bounded_len(name, BW_NAME_MAX + 1);

    CHECK(n <= BW_NAME_MAX);
    if (required)
        CHECK(n >= 1);
}

static void check_err(const char *err, bw_event_reason r)
{
    size_t n = bounded_len(err, ERR_SIZE);

    CHECK(n < ERR_SIZE);
    for (size_t i = 0; i < n; i++)
        CHECK((unsigned char)err[i] >= 0x20 && (unsigned char)err[i] < 0x7f);
    if (r == BW_EVR_OK)
        CHECK(n == 0);
    else
        CHECK(n > 0);
}

static void check_ok(const bw_event *ev)
{
    const char *key;

    CHECK(ev->type == BW_EV_MODEL || ev->type == BW_EV_TOOL || ev->type == BW_EV_FINALIZE);
    CHECK(strcmp(bw_event_type_str(ev->type), "none") != 0);

    check_id(ev->event_id, 1);
    check_id(ev->request_id, 1);
    check_id(ev->user_id, 1);
    check_id(ev->idempotency_key, 0);
    check_id(ev->session_id, 0);
    check_id(ev->org_id, 0);

    key = bw_event_dedup_key(ev);
    CHECK(key != NULL);
    CHECK(key[0] != '\0');
    CHECK(key == (ev->idempotency_key[0] ? ev->idempotency_key : ev->event_id));

    CHECK(ev->has_timestamp == 0 || ev->has_timestamp == 1);
    if (ev->has_timestamp)
        CHECK(ev->timestamp_ms >= 0); /* before 1970 is invalid_value */
    check_name(ev->provider, 0);
    check_name(ev->node_name, 0);
    CHECK(bounded_len(ev->final_status, sizeof(ev->final_status)) < sizeof(ev->final_status));

    switch (ev->type) {
    case BW_EV_MODEL:
        check_name(ev->name, 1);
        CHECK(ev->usage_shape >= BW_USAGE_NONE && ev->usage_shape <= BW_USAGE_NATIVE);
        CHECK(ev->usage.input < BW_TOKENS_LIMIT);
        CHECK(ev->usage.cache_read < BW_TOKENS_LIMIT);
        CHECK(ev->usage.cache_write < BW_TOKENS_LIMIT);
        CHECK(ev->usage.output < BW_TOKENS_LIMIT);
        CHECK(ev->usage.reasoning < BW_TOKENS_LIMIT);
        CHECK(ev->usage.reasoning <= ev->usage.output);
        if (ev->usage_shape == BW_USAGE_NONE)
            CHECK(ev->usage.input == 0 && ev->usage.cache_read == 0 && ev->usage.cache_write == 0 &&
                  ev->usage.output == 0 && ev->usage.reasoning == 0);
        break;
    case BW_EV_TOOL:
        check_name(ev->name, 1);
        CHECK(ev->units >= 1 && ev->units <= BW_UNITS_MAX);
        CHECK(ev->duration_ms >= 0);
        break;
    default:
        CHECK(strcmp(ev->final_status, "completed") == 0 ||
              strcmp(ev->final_status, "error") == 0 || strcmp(ev->final_status, "cancelled") == 0);
        break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static bw_event ev, ev2; /* ~2.5 KiB each: keep them off the fuzzer's stack */
    char err[ERR_SIZE], err2[ERR_SIZE];
    const char *buf = (const char *)data;
    bw_event_reason r, r2;

    /* Poison the outputs so that a field the parser forgets to set is visible. */
    memset(&ev, 0xA5, sizeof(ev));
    memset(err, 'X', sizeof(err));
    r = bw_event_parse(buf, size, FUZZ_MAX_BYTES, &ev, err, sizeof(err));

    CHECK(r >= BW_EVR_OK && r <= BW_EVR_UNKNOWN_TYPE);
    CHECK(r != BW_EVR_USER_MISMATCH);
    CHECK(bw_event_reason_str(r) != NULL);
    CHECK(strcmp(bw_event_reason_str(r), "unknown") != 0);
    check_err(err, r);
    if (size > FUZZ_MAX_BYTES)
        CHECK(r == BW_EVR_TOO_LARGE);
    else
        CHECK(r != BW_EVR_TOO_LARGE);
    if (r == BW_EVR_OK)
        check_ok(&ev);

    /* Deterministic: the same bytes parse to the same outcome. */
    memset(&ev2, 0x5A, sizeof(ev2));
    r2 = bw_event_parse(buf, size, FUZZ_MAX_BYTES, &ev2, err2, sizeof(err2));
    CHECK(r2 == r);
    CHECK(strcmp(err, err2) == 0);
    if (r == BW_EVR_OK) {
        CHECK(ev2.type == ev.type);
        CHECK(strcmp(ev2.event_id, ev.event_id) == 0);
        CHECK(strcmp(ev2.request_id, ev.request_id) == 0);
        CHECK(strcmp(ev2.user_id, ev.user_id) == 0);
        CHECK(strcmp(bw_event_dedup_key(&ev2), bw_event_dedup_key(&ev)) == 0);
        CHECK(memcmp(&ev2.usage, &ev.usage, sizeof(ev.usage)) == 0);
        CHECK(ev2.units == ev.units);
    }

    /* The size limit is checked before anything else: one byte less allowed is too_large. */
    if (size > 0) {
        r2 = bw_event_parse(buf, size, size - 1, &ev2, err2, sizeof(err2));
        CHECK(r2 == BW_EVR_TOO_LARGE);
        check_err(err2, r2);
    }
    return 0;
}

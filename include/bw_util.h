/*
 * bw_util.h - small helpers shared by every module: error buffers,
 * percent-encoding, durations, time.
 */
#ifndef BW_UTIL_H
#define BW_UTIL_H

#include <stddef.h>
#include <stdint.h>

#define BW_OK  0
#define BW_ERR -1

/** Longest identifier (event_id, request_id, user_id, ...) in bytes. */
#define BW_ID_MAX 128
/** Longest model or tool name in bytes. */
#define BW_NAME_MAX 256
/** An RFC 3986 percent-encoded identifier is at most 3x as long. */
#define BW_ENC_ID_MAX (3 * BW_ID_MAX)

/**
 * @brief snprintf into an error buffer; tolerates errbuf == NULL.
 */
void bw_seterr(char *errbuf, size_t errsize, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/**
 * @brief Percent-encode @p in (RFC 3986): everything but the unreserved
 *        characters A-Z a-z 0-9 - . _ ~ becomes %XX (upper case hex).
 * @returns the length written (excluding NUL), or -1 if @p outsize is too small.
 */
int bw_pct_encode(const char *in, size_t inlen, char *out, size_t outsize);

/**
 * @brief Parse a duration string with a unit ("250ms", "5s", "15m", "2h", "7d").
 * @returns 0 and sets *ms, or -1 on a malformed string.
 */
int bw_parse_duration(const char *s, int64_t *ms);

/** Wall clock in milliseconds since the epoch. */
int64_t bw_now_ms(void);
/** Monotonic clock in milliseconds. */
int64_t bw_mono_ms(void);

/** Format epoch milliseconds as RFC 3339 UTC ("2026-12-03T10:00:00Z"). */
void bw_format_rfc3339(int64_t ms, char *buf, size_t size);

/**
 * @brief Parse an RFC 3339 timestamp ("2026-12-03T10:00:00Z",
 *        "2026-12-03T10:00:00.123+01:00") into epoch milliseconds.
 * @returns 0 on success, -1 if malformed.
 */
int bw_parse_rfc3339(const char *s, int64_t *ms);

/** Lower-case hex SHA-256 of @p len bytes (out must hold 65 bytes). */
void bw_sha256_hex(const void *data, size_t len, char out[65]);

#endif

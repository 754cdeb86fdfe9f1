/*
 * bw_log.h - structured logs on stderr, one JSON object (or logfmt line) each.
 * Never log a token, a secret or a JWT.
 */
#ifndef BW_LOG_H
#define BW_LOG_H

typedef enum bw_log_level { BW_LOG_DEBUG = 0, BW_LOG_INFO, BW_LOG_WARN, BW_LOG_ERROR } bw_log_level;

/** Set level and format ("json" or "logfmt"). @returns 0, -1 on unknown names. */
int bw_log_setup(const char *level, const char *format);
void bw_log_set_level(bw_log_level lvl);

/**
 * @brief Log a message with key/value string pairs, NULL-terminated:
 *        bw_log(BW_LOG_INFO, "settled", "request_id", rid, "amount", amt, NULL);
 */
void bw_log(bw_log_level lvl, const char *msg, ...) __attribute__((sentinel));

#endif

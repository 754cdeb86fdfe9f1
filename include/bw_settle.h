/*
 * bw_settle.h - settle one charge with the wallet service, falling back to
 * the user service only when the wallet call was NOT DELIVERED
 * (PRODUCT.md sections 4 G7 and 7).
 *
 * The caller (the worker) owns the decision of *what* to charge and stores it
 * in Redis before calling; this module only talks HTTP and classifies.
 */
#ifndef BW_SETTLE_H
#define BW_SETTLE_H

#include <stdint.h>

#include "bw_config.h"

typedef struct bw_settle bw_settle;

typedef enum bw_settle_status {
    BW_SETTLE_SETTLED = 0, /* 2xx, or 409 with a transaction_id (already applied) */
    BW_SETTLE_REJECTED,    /* 400, 402, 404, 422: final, no retry, no fallback */
    BW_SETTLE_PENDING      /* nobody accepted it yet: retry later, same key, same amount */
} bw_settle_status;

/** What is charged. All strings are borrowed for the duration of the call. */
typedef struct bw_settle_req {
    const char *user_id;
    const char *request_id;
    const char *session_id;      /* NULL: JSON null */
    const char *idempotency_key; /* "bw:<pct-encoded request_id>[:adj:<n>]" */
    const char *amount;          /* decimal text with exactly `precision` decimals: "5.0000" */
    const char *cost_usd;        /* "0.010000" */
    const char *reason;          /* "AI chat: 3 model calls, 1 tool call" */
    const char *breakdown_json;  /* a JSON value (text) sent as "breakdown" */
    const char *model_name;      /* most used model, or NULL */
    uint64_t model_calls, tool_calls;
    uint64_t prompt_tokens, completion_tokens, tokens_used;
    /* 1: the previous attempt of this very charge may have reached the wallet
     * (outcome unknown): the fallback must never be used for it. */
    int wallet_only;
    /* Optional: asked right before the fallback is used; 0 withholds it
     * (the charge stays PENDING, outcome_unknown = 1). The worker checks in
     * Redis that no other attempt began and none saw an unknown outcome. */
    int (*fallback_allowed)(void *ctx);
    void *fallback_ctx;
    /* The claim's lease (0: none). The wallet's retries stop in time to end
     * within it (a longer Retry-After is not waited for: the fallback comes
     * next); fallback_allowed renews it, and the fallback's retries fit the
     * new one. Past the lease another settler would take the charge over. */
    int64_t lease_ms;
} bw_settle_req;

typedef struct bw_settle_result {
    bw_settle_status status;
    char via[16];             /* "wallet" or "user_service" */
    int http_status;          /* last HTTP status seen, 0 if none */
    char transaction_id[129]; /* "" if none */
    char balance_after[64];   /* decimal text as the service wrote it, "" if none */
    char reason[256];         /* rejected: the service's detail; pending: why */
    int outcome_unknown;      /* pending because the wallet may have applied it */
    int64_t retry_after_ms;   /* pending: the earliest sensible retry (Retry-After) */
} bw_settle_result;

/**
 * @brief Create a settler from the config (wallet, user_service, tls, auth,
 *        settle groups). Owns its curl handles (keep-alive).
 * @returns NULL and @p err on failure (unreadable secret file, bad URL).
 */
bw_settle *bw_settle_new(const bw_config *cfg, char *err, size_t errsize);
void bw_settle_destroy(bw_settle *s);

/**
 * @brief Settle one charge, blocking:
 *   - wallet, up to settle.max_attempts with exponential backoff + jitter
 *     (Retry-After honoured, capped by settle.retry_max_interval);
 *   - 2xx / 409 with transaction_id: SETTLED via wallet;
 *   - 400/402/404/422: REJECTED (reason = the service's "detail" text);
 *   - 409 without transaction_id: in flight, retried like "not delivered"
 *     but never sent to the fallback;
 *   - not delivered (connect refused, DNS/TLS failure, 429, 502, 503, 504,
 *     breaker open) after the attempts: the user service (record, then
 *     consume with the same key); its outcome is classified the same way;
 *   - outcome unknown (timeout or broken connection after sending, 500):
 *     retried at the wallet only; if still unknown: PENDING with
 *     outcome_unknown = 1 (the caller must then pass wallet_only = 1 forever).
 *   - 401/403: refresh the service token once and retry, then "not delivered".
 * @returns 0 with @p res filled (any status), -1 only on internal errors.
 */
int bw_settle_charge(bw_settle *s, const bw_settle_req *req, bw_settle_result *res);

/** 1 while the wallet circuit breaker is open. */
int bw_settle_breaker_open(const bw_settle *s);

#endif

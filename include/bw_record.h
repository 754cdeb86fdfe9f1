/*
 * bw_record.h - the settlement record (PRODUCT.md section 5), shared by the
 * worker, `price` and (later) `audit`, so every path writes the same JSON.
 */
#ifndef BW_RECORD_H
#define BW_RECORD_H

#include <jansson.h>

#include "bw_pricing.h"
#include "bw_settle.h"

/** What a record says about its request, besides the priced charge. */
typedef struct bw_record_meta {
    const char *request_id;
    const char *user_id;
    const char *session_id; /* NULL or "": JSON null */
    const char *org_id;     /* NULL or "": omitted */
    int adjustment;         /* 0: the charge; n >= 1: the n-th adjustment */
    const char *finalize;   /* expected_met | marker | incomplete | timeout */
} bw_record_meta;

/**
 * @brief The idempotency key of a charge: "bw:" + pct-encoded request id,
 *        plus ":adj:<n>" for the n-th adjustment.
 * @returns length, or -1 if @p size is too small.
 */
int bw_record_idempotency_key(const char *request_id, int adjustment, char *buf, size_t size);

/**
 * @brief Build a record with status @p status ("pending", "dry_run", ...).
 *        Money is written as decimal strings (amount_credits with exactly
 *        `precision` decimals, line credits exact) and amount_micro as an
 *        integer: jansson never prints a money value.
 * @returns a new reference, or NULL on allocation failure.
 */
json_t *bw_record_new(const bw_record_meta *meta, const bw_charge *ch, const bw_pricing *p,
                      const char *status);

/**
 * @brief Fill in the outcome: status, settled_via, transaction_id,
 *        balance_after, reason (NULL/"" fields are written as null or omitted),
 *        settled_at (epoch ms).
 */
void bw_record_set_outcome(json_t *rec, const char *status, const char *via, const char *txid,
                           const char *balance_after, const char *reason, int64_t at_ms);

/** "AI chat: 3 model calls, 1 tool call" */
void bw_record_reason_text(const bw_charge *ch, char *buf, size_t size);

/**
 * @brief The wallet request for a priced record: what the worker and
 *        `replay` send for it (user, request, session, key, amount, cost,
 *        reason text, breakdown = the record's lines, most used model,
 *        counts and tokens). wallet_only is left 0 for the caller to set.
 * @param reason receives "AI chat: 3 model calls, 1 tool call".
 * @param breakdown receives the lines as compact JSON text (malloc'ed, the
 *        caller frees it); req->breakdown_json points to it.
 * @returns 0, or -1 if the record lacks a field or on allocation failure.
 * @remark The strings of @p req borrow from @p rec, @p reason and *breakdown:
 *         keep them alive while @p req is used.
 */
int bw_record_settle_req(const json_t *rec, bw_settle_req *req, char *reason, size_t reason_size,
                         char **breakdown);

/** Records are Kafka messages: one above this would never be published. */
#define BW_RECORD_MAX (512 * 1024)

/** Serialise compactly with keys in insertion order. Caller frees. A record
 *  above BW_RECORD_MAX (thousands of distinct models or tools in one request)
 *  goes without its lines: "lines" is [] and "lines_omitted" counts them;
 *  every amount and total stays. */
char *bw_record_dump(const json_t *rec);

#endif

/*
 * bw_store.h - request state in Redis: dedup, per-request aggregate,
 * settlement timers, settlement intents and the settlements outbox.
 *
 * Keys of one request share the hash tag of its percent-encoded id
 * ("bw:{r1}:m" meta, "bw:{r1}:e" events by dedup key, "bw:{r1}:s"
 * settlements). Global keys: "bw:due" (zset: request id -> when to settle,
 * Redis server time in ms; doubles as the claim lease), "bw:outbox" (hash)
 * and "bw:outbox:z" (zset) for records not yet acknowledged by Kafka.
 *
 * Every mutation is one Lua script, so each event's dedup and its effect on
 * the aggregate happen atomically; a batch of events is one round trip.
 */
#ifndef BW_STORE_H
#define BW_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "bw_event.h"
#include "bw_pricing.h"

typedef struct bw_store bw_store;

/** Per-event outcome of bw_store_apply(). */
typedef enum bw_apply_result {
    BW_APPLY_NEW = 0,           /* counted into the open charge */
    BW_APPLY_DUP = 1,           /* dedup key already applied, same payload */
    BW_APPLY_DUP_CONFLICT = 2,  /* dedup key already applied, other payload: first wins */
    BW_APPLY_USER_MISMATCH = 3, /* user_id differs from the request's first event: dead letter */
    BW_APPLY_LATE = 4           /* applied after the charge was closed: goes to an adjustment */
} bw_apply_result;

/** Timers, from the settle group. */
typedef struct bw_store_timers {
    int64_t request_timeout_ms;
    int64_t finalize_grace_ms;
    int64_t retention_ms;
    int64_t lease_ms; /* how long a claimed settlement stays with its worker */
} bw_store_timers;

/**
 * @brief Connect to "redis://[:password@]host[:port][/db]" or
 *        "unix:///path/to/redis.sock[?db=N]".
 * @returns NULL and @p err on a bad URL; a failed connection is retried lazily.
 */
bw_store *bw_store_new(const char *url, const bw_store_timers *timers, char *err, size_t errsize);
void bw_store_destroy(bw_store *st);

/** Use the keys of a --shadow worker ("bws:..." instead of "bw:..."): a shadow
 *  deployment sharing Redis with the real one never touches its state. Call
 *  before the first operation. */
void bw_store_shadow(bw_store *st);

/** 1 once the cluster was found to hold another bucket count (bw:layout):
 *  every operation then fails; the worker stops rather than hold partitions. */
int bw_store_layout_conflict(const bw_store *st);

/** Check the cluster layout now (start-up). @returns 0 (also on a single
 *  server), -1 if Redis could not be asked (checked again by every
 *  operation), -2 if the cluster holds another bucket count. */
int bw_store_check_layout(bw_store *st);

/** 1 for a redis+cluster:// store. */
int bw_store_is_cluster(const bw_store *st);

/** PING. @returns 0 if Redis answers (a cluster: every master holding a bucket). */
int bw_store_ping(bw_store *st);

/**
 * @brief Apply @p n valid events in one round trip. On success results[i]
 *        holds a bw_apply_result per event. On failure (-1) nothing is known
 *        to be applied and the caller retries the whole batch (re-applying is
 *        safe: dedup).
 */
int bw_store_apply(bw_store *st, bw_event *const *evs, size_t n, int *results, char *err,
                   size_t errsize);

/**
 * @brief Claim up to @p max requests whose settlement is due, leasing each
 *        for timers.lease_ms. *rids is an array of strdup'ed request ids.
 * @returns the number claimed (>= 0) or -1.
 */
int bw_store_claim_due(bw_store *st, size_t max, char ***rids);
void bw_store_free_strings(char **v, size_t n);

/** A claimed settlement: what to charge, and what was decided already. */
typedef struct bw_claim {
    char request_id[BW_ID_MAX + 1];
    int gen; /* 0: the charge; n >= 1: the n-th adjustment */
    char user_id[BW_ID_MAX + 1];
    char session_id[BW_ID_MAX + 1];
    char org_id[BW_ID_MAX + 1];
    char finalize[16];
    char *intent;    /* the stored record (status pending) if already priced, else NULL */
    int wallet_only; /* an earlier wallet attempt had an unknown outcome */
    int attempts;    /* earlier deferred attempts */
    bw_call *calls;  /* the deduplicated usage events of this generation */
    size_t n_calls;
    char **names; /* storage of the calls' names */
} bw_claim;

/**
 * @brief Load a claimed request. Closes the open generation (later events
 *        become the next adjustment).
 * @returns 1 with @p c filled (free with bw_claim_free), 0 if there is
 *          nothing to settle (already done), -1 on error.
 */
int bw_store_load(bw_store *st, const char *request_id, bw_claim *c);
void bw_claim_free(bw_claim *c);

/**
 * @brief Store the priced record of generation @p gen unless one is stored
 *        already; *stored gets the one that is (malloc'ed): a charge is
 *        always sent with the amount first decided.
 */
int bw_store_put_intent(bw_store *st, const char *request_id, int gen, const char *intent,
                        char **stored);

/**
 * @brief Record the final outcome: save @p record, put it in the outbox,
 *        schedule the next adjustment if late events wait, set the retention.
 * @returns 1 if completed now, 0 if it was completed already, -1 on error.
 */
int bw_store_complete(bw_store *st, const char *request_id, int gen, const char *record);

/**
 * @brief Record that an attempt to settle generation @p gen starts. Must
 *        succeed before any service is called: until bw_store_defer() or
 *        bw_store_complete() records the attempt's outcome, a later load
 *        reports wallet_only (the wallet may have applied it).
 * @returns the attempt's number (>= 1) to go ahead, 0 if the generation is
 *          settled already, -1 on error.
 */
long long bw_store_begin_attempt(bw_store *st, const char *request_id, int gen);

/**
 * @brief 1 when attempt @p attempt is still the latest attempt of the
 *        generation and no attempt recorded an unknown wallet outcome: only
 *        then may the fallback be used. 0 otherwise, and when Redis does not
 *        answer (the safe side).
 */
int bw_store_fallback_ok(bw_store *st, const char *request_id, int gen, long long attempt);

/** Keep the settlement pending: retry in @p delay_ms, remember wallet_only. */
int bw_store_defer(bw_store *st, const char *request_id, int gen, int64_t delay_ms,
                   int wallet_only);

/**
 * @brief Outbox records older than @p min_age_ms (their publisher may have
 *        died), re-leased for another @p min_age_ms, at most @p max (a
 *        cluster: at most @p max per bucket). Fields and records are
 *        parallel arrays of strdup'ed strings.
 */
int bw_store_outbox_due(bw_store *st, int64_t min_age_ms, size_t max, char ***fields,
                        char ***records);
/** Kafka acknowledged these @p n records: drop them from the outbox (one
 *  pipelined round trip). @returns 0, or -1 if any deletion failed (the record
 *  is then published again by the sweep: harmless, records are idempotent). */
int bw_store_outbox_done(bw_store *st, char *const *fields, size_t n);

/** Number of requests waiting in bw:due (open, due or pending). */
long long bw_store_due_count(bw_store *st);

/** Requests whose settlement is overdue (backpressure signal). */
long long bw_store_overdue_count(bw_store *st);

/** Give a claimed, unstarted settlement back: due again at once. */
int bw_store_release(bw_store *st, const char *request_id);

#endif

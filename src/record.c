/*
 * record.c - build settlement records (PRODUCT.md section 5).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bw_record.h"
#include "bw_util.h"

int bw_record_idempotency_key(const char *request_id, int adjustment, char *buf, size_t size)
{
    char enc[BW_ENC_ID_MAX + 1];
    int n;

    if (bw_pct_encode(request_id, strlen(request_id), enc, sizeof(enc)) < 0)
        return -1;
    if (adjustment > 0)
        n = snprintf(buf, size, "bw:%s:adj:%d", enc, adjustment);
    else
        n = snprintf(buf, size, "bw:%s", enc);
    return (n < 0 || (size_t)n >= size) ? -1 : n;
}

static json_t *dec_string(const bw_dec *d)
{
    char buf[BW_DEC_STRMAX];
    if (bw_dec_to_str(d, buf, sizeof(buf)) < 0)
        return json_null();
    return json_string(buf);
}

static json_t *tokens_object(const bw_usage *u)
{
    return json_pack("{sI sI sI sI sI}", "input", (json_int_t)u->input, "output",
                     (json_int_t)u->output, "cache_read", (json_int_t)u->cache_read, "cache_write",
                     (json_int_t)u->cache_write, "reasoning", (json_int_t)u->reasoning);
}

static json_t *nullable_string(const char *s)
{
    return (s && *s) ? json_string(s) : json_null();
}

json_t *bw_record_new(const bw_record_meta *meta, const bw_charge *ch, const bw_pricing *p,
                      const char *status)
{
    char key[BW_ENC_ID_MAX + 32], amount[BW_DEC_STRMAX], cost[BW_DEC_STRMAX];
    json_t *rec, *lines;

    if (bw_record_idempotency_key(meta->request_id, meta->adjustment, key, sizeof(key)) < 0)
        return NULL;
    if (bw_dec_to_str_fixed(&ch->amount, p->precision, amount, sizeof(amount)) < 0 ||
        bw_dec_to_str_fixed(&ch->cost_usd, 6, cost, sizeof(cost)) < 0)
        return NULL;

    rec = json_object();
    if (!rec)
        return NULL;
    json_object_set_new(rec, "schema", json_integer(1));
    json_object_set_new(rec, "request_id", json_string(meta->request_id));
    json_object_set_new(rec, "user_id", json_string(meta->user_id));
    json_object_set_new(rec, "session_id", nullable_string(meta->session_id));
    if (meta->org_id && *meta->org_id)
        json_object_set_new(rec, "org_id", json_string(meta->org_id));
    json_object_set_new(rec, "status", json_string(status));
    json_object_set_new(rec, "kind", json_string(meta->adjustment > 0 ? "adjustment" : "charge"));
    if (meta->adjustment > 0)
        json_object_set_new(rec, "adjustment", json_integer(meta->adjustment));
    json_object_set_new(rec, "idempotency_key", json_string(key));
    json_object_set_new(rec, "amount_credits", json_string(amount));
    json_object_set_new(rec, "amount_micro", json_integer(ch->amount_micro));
    json_object_set_new(rec, "cost_usd", json_string(cost));
    json_object_set_new(rec, "model_calls", json_integer((json_int_t)ch->model_calls));
    json_object_set_new(rec, "tool_calls", json_integer((json_int_t)ch->tool_calls));
    json_object_set_new(rec, "tokens", tokens_object(&ch->tokens));

    lines = json_array();
    for (size_t i = 0; i < ch->n_lines; i++) {
        const bw_line *ln = &ch->lines[i];
        json_t *jl = json_object();
        int is_model = ln->kind == BW_EV_MODEL;

        json_object_set_new(jl, "kind", json_string(is_model ? "model" : "tool"));
        json_object_set_new(jl, "name", json_string(ln->name));
        json_object_set_new(jl, "calls", json_integer((json_int_t)ln->calls));
        if (is_model)
            json_object_set_new(jl, "tokens", tokens_object(&ln->tokens));
        else
            json_object_set_new(jl, "units", json_integer((json_int_t)ln->units));
        json_object_set_new(jl, "credits", dec_string(&ln->credits));
        json_object_set_new(jl, "basis", json_string(bw_basis_name(ln->basis)));
        json_array_append_new(lines, jl);
    }
    json_object_set_new(rec, "lines", lines);
    json_object_set_new(rec, "minimum_applied", json_boolean(ch->minimum_applied));
    json_object_set_new(rec, "pricing_version", json_string(p->version));
    json_object_set_new(rec, "pricing_sha256", json_string(p->sha256));
    json_object_set_new(rec, "settled_via", json_null());
    json_object_set_new(rec, "transaction_id", json_null());
    json_object_set_new(rec, "balance_after", json_null());
    json_object_set_new(rec, "finalize", nullable_string(meta->finalize));
    json_object_set_new(rec, "settled_at", json_null());
    return rec;
}

void bw_record_set_outcome(json_t *rec, const char *status, const char *via, const char *txid,
                           const char *balance_after, const char *reason, int64_t at_ms)
{
    char ts[40];

    json_object_set_new(rec, "status", json_string(status));
    json_object_set_new(rec, "settled_via", nullable_string(via));
    json_object_set_new(rec, "transaction_id", nullable_string(txid));
    json_object_set_new(rec, "balance_after", nullable_string(balance_after));
    if (reason && *reason)
        json_object_set_new(rec, "reason", json_string(reason));
    else
        json_object_del(rec, "reason");
    bw_format_rfc3339(at_ms, ts, sizeof(ts));
    json_object_set_new(rec, "settled_at", json_string(ts));
}

static void reason_text(uint64_t model_calls, uint64_t tool_calls, char *buf, size_t size)
{
    snprintf(buf, size, "AI chat: %" PRIu64 " model call%s, %" PRIu64 " tool call%s", model_calls,
             model_calls == 1 ? "" : "s", tool_calls, tool_calls == 1 ? "" : "s");
}

void bw_record_reason_text(const bw_charge *ch, char *buf, size_t size)
{
    reason_text(ch->model_calls, ch->tool_calls, buf, size);
}

static const char *rec_str(const json_t *rec, const char *key)
{
    return json_string_value(json_object_get(rec, key));
}

static uint64_t rec_u64(const json_t *rec, const char *key)
{
    json_int_t v = json_integer_value(json_object_get(rec, key));
    return v > 0 ? (uint64_t)v : 0;
}

/* The model with the most calls (the first of equals), for model_name. */
static const char *main_model(const json_t *rec)
{
    const json_t *ln;
    const char *best = NULL;
    json_int_t best_calls = -1;
    size_t i;

    json_array_foreach(json_object_get(rec, "lines"), i, ln)
    {
        const char *kind = rec_str(ln, "kind");
        json_int_t calls = json_integer_value(json_object_get(ln, "calls"));
        if (kind && strcmp(kind, "model") == 0 && calls > best_calls && rec_str(ln, "name")) {
            best = rec_str(ln, "name");
            best_calls = calls;
        }
    }
    return best;
}

int bw_record_settle_req(const json_t *rec, bw_settle_req *req, char *reason, size_t reason_size,
                         char **breakdown)
{
    const json_t *tok = json_object_get(rec, "tokens");
    uint64_t in;

    memset(req, 0, sizeof(*req));
    *breakdown = NULL;
    req->user_id = rec_str(rec, "user_id");
    req->request_id = rec_str(rec, "request_id");
    req->idempotency_key = rec_str(rec, "idempotency_key");
    req->amount = rec_str(rec, "amount_credits");
    req->cost_usd = rec_str(rec, "cost_usd");
    if (!req->user_id || !req->request_id || !req->idempotency_key || !req->amount ||
        !req->cost_usd)
        return -1;
    req->session_id = rec_str(rec, "session_id"); /* NULL when null */
    if (req->session_id && !*req->session_id)
        req->session_id = NULL;
    req->model_calls = rec_u64(rec, "model_calls");
    req->tool_calls = rec_u64(rec, "tool_calls");
    reason_text(req->model_calls, req->tool_calls, reason, reason_size);
    req->reason = reason;
    *breakdown = json_dumps(json_object_get(rec, "lines"), JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!*breakdown)
        return -1;
    req->breakdown_json = *breakdown;
    req->model_name = main_model(rec);
    in = rec_u64(tok, "input") + rec_u64(tok, "cache_read") + rec_u64(tok, "cache_write");
    req->prompt_tokens = in;
    req->completion_tokens = rec_u64(tok, "output");
    req->tokens_used = in + req->completion_tokens;
    return 0;
}

char *bw_record_dump(const json_t *rec)
{
    const size_t flags = JSON_COMPACT | JSON_PRESERVE_ORDER;
    char *txt = json_dumps(rec, flags);
    json_t *cut;

    if (!txt || strlen(txt) <= BW_RECORD_MAX)
        return txt;
    free(txt);
    if (!(cut = json_copy((json_t *)rec))) /* shallow: only the top level changes */
        return NULL;
    json_object_set_new(cut, "lines_omitted",
                        json_integer((json_int_t)json_array_size(json_object_get(rec, "lines"))));
    json_object_set_new(cut, "lines", json_array());
    txt = json_dumps(cut, flags);
    json_decref(cut);
    return txt;
}

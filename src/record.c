/*
 * record.c - build settlement records (PRODUCT.md section 5).
 */
#include <stdio.h>
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

void bw_record_reason_text(const bw_charge *ch, char *buf, size_t size)
{
    snprintf(buf, size, "AI chat: %llu model call%s, %llu tool call%s",
             (unsigned long long)ch->model_calls, ch->model_calls == 1 ? "" : "s",
             (unsigned long long)ch->tool_calls, ch->tool_calls == 1 ? "" : "s");
}

char *bw_record_dump(const json_t *rec)
{
    return json_dumps(rec, JSON_COMPACT | JSON_PRESERVE_ORDER);
}

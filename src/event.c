/*
 * event.c - parse, validate and normalise one agent event (PRODUCT.md section 3).
 *
 * Every rejection carries a reason code (the dead-letter record's "reason") and a
 * message naming the offending field. Messages never echo field values (and
 * jansson's quotes of the input are made ASCII): they end up in logs and DLQ
 * records, and event data is untrusted.
 */
#define _GNU_SOURCE /* memrchr */
#include <inttypes.h>
#include <string.h>

#include <jansson.h>

#include "bw_event.h"

/** Deepest accepted nesting of arrays and objects (the top-level object is 1). */
#define EV_MAX_DEPTH 32

/* Where the payload fields live and how to name them in messages. */
typedef struct ev_ctx {
    const json_t *body; /* the root object, or the CloudEvents "data" object */
    const char *pfx;    /* "" or "data.": prefixed to every body field name */
    char *err;
    size_t errsize;
} ev_ctx;

static const char *const type_names[] = {
    [BW_EV_MODEL] = "custom_model_call",
    [BW_EV_TOOL] = "custom_tool_call",
    [BW_EV_FINALIZE] = "request_finalize",
};

static const char *const reason_names[] = {
    [BW_EVR_OK] = "ok",
    [BW_EVR_TOO_LARGE] = "too_large",
    [BW_EVR_INVALID_JSON] = "invalid_json",
    [BW_EVR_NOT_OBJECT] = "not_object",
    [BW_EVR_MISSING_FIELD] = "missing_field",
    [BW_EVR_WRONG_TYPE] = "wrong_type",
    [BW_EVR_INVALID_VALUE] = "invalid_value",
    [BW_EVR_INVALID_ID] = "invalid_id",
    [BW_EVR_UNKNOWN_TYPE] = "unknown_type",
    [BW_EVR_USER_MISMATCH] = "user_mismatch",
};

/*
 * jansson's own limit is 2048 levels, deep enough to make a hostile payload cost
 * stack and allocations; refuse deep input before building any tree. Only brackets
 * outside strings count; unbalanced input is left for json_loadb to reject.
 */
static int too_deep(const char *buf, size_t len)
{
    int depth = 0, in_str = 0;

    for (size_t i = 0; i < len; i++) {
        char c = buf[i];
        if (in_str) {
            if (c == '\\')
                i++; /* the escaped byte cannot end the string */
            else if (c == '"')
                in_str = 0;
        } else if (c == '"') {
            in_str = 1;
        } else if (c == '{' || c == '[') {
            if (++depth > EV_MAX_DEPTH)
                return 1;
        } else if ((c == '}' || c == ']') && depth > 0) {
            depth--;
        }
    }
    return 0;
}

/*
 * jansson quotes the offending input in its messages ("near '...'"): keep the
 * message printable ASCII so untrusted bytes never reach logs or DLQ headers raw.
 */
static void ascii_only(char *s)
{
    for (; *s; s++) {
        if ((unsigned char)*s < 0x20 || (unsigned char)*s >= 0x7f)
            *s = '?';
    }
}

/* A member, with JSON null meaning absent (PRODUCT.md: null = absent for optional fields). */
static json_t *field(const json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);
    return json_is_null(v) ? NULL : v;
}

/*
 * Index of the first control character: C0 (< 0x20), DEL, or C1 (U+0080..U+009F,
 * which UTF-8 encodes as 0xC2 0x80..0x9F), or @p n when there is none. jansson has
 * already checked the UTF-8, so a 0xC2 here is always a lead byte.
 */
static size_t find_ctrl(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (s[i] < 0x20 || s[i] == 0x7f)
            return i;
        if (s[i] == 0xc2 && i + 1 < n && s[i + 1] >= 0x80 && s[i + 1] <= 0x9f)
            return i;
    }
    return n;
}

/* How get_text() treats a missing or empty value. */
enum {
    TXT_REQUIRED = 1, /* absent (or null) is BW_EVR_MISSING_FIELD */
    TXT_EMPTY_OK = 2, /* "" is accepted and means absent */
};

/**
 * @brief Copy the string member @p key of @p obj into @p out (capacity max + 1).
 * @param path the field's name in messages, without the context prefix.
 * @param bad the reason for a string that breaks the rules (BW_EVR_INVALID_ID for
 *        identifiers, BW_EVR_INVALID_VALUE for names).
 * @returns BW_EVR_OK with @p out set ("" when absent and optional), or the reason.
 */
static bw_event_reason get_text(const ev_ctx *cx, const json_t *obj, const char *key,
                                const char *path, char *out, size_t max, int flags,
                                bw_event_reason bad)
{
    const json_t *v = field(obj, key);
    const char *s;
    size_t n, at;

    if (!v) {
        out[0] = '\0';
        if (!(flags & TXT_REQUIRED))
            return BW_EVR_OK;
        bw_seterr(cx->err, cx->errsize, "%s%s: required", cx->pfx, path);
        return BW_EVR_MISSING_FIELD;
    }
    if (!json_is_string(v)) {
        bw_seterr(cx->err, cx->errsize, "%s%s: must be a string", cx->pfx, path);
        return BW_EVR_WRONG_TYPE;
    }
    s = json_string_value(v);
    n = json_string_length(v);
    if (n == 0 && !(flags & TXT_EMPTY_OK)) {
        bw_seterr(cx->err, cx->errsize, "%s%s: must not be empty", cx->pfx, path);
        return bad;
    }
    if (n > max) {
        bw_seterr(cx->err, cx->errsize, "%s%s: longer than %zu bytes (%zu)", cx->pfx, path, max, n);
        return bad;
    }
    at = find_ctrl((const unsigned char *)s, n);
    if (at < n) {
        bw_seterr(cx->err, cx->errsize, "%s%s: control character at byte %zu", cx->pfx, path, at);
        return bad;
    }
    memcpy(out, s, n);
    out[n] = '\0';
    return BW_EVR_OK;
}

static bw_event_reason get_id(const ev_ctx *cx, const json_t *obj, const char *key,
                              const char *path, char *out, int required)
{
    return get_text(cx, obj, key, path, out, BW_ID_MAX, required ? TXT_REQUIRED : 0,
                    BW_EVR_INVALID_ID);
}

/**
 * @brief Read an optional integer member into @p out: @p dflt when absent, else
 *        it must be a JSON integer in [lo, hi].
 */
static bw_event_reason get_uint(const ev_ctx *cx, const json_t *obj, const char *key,
                                const char *path, uint64_t lo, uint64_t hi, uint64_t dflt,
                                uint64_t *out)
{
    const json_t *v = field(obj, key);
    json_int_t n;

    if (!v) {
        *out = dflt;
        return BW_EVR_OK;
    }
    if (!json_is_integer(v)) {
        /* 1000.0 is a real to jansson: the contract makes it malformed, never 1000 */
        bw_seterr(cx->err, cx->errsize, "%s%s: must be an integer%s", cx->pfx, path,
                  json_is_real(v) ? ", not a real" : "");
        return BW_EVR_WRONG_TYPE;
    }
    n = json_integer_value(v);
    if (n < 0 || (uint64_t)n < lo || (uint64_t)n > hi) {
        bw_seterr(cx->err, cx->errsize,
                  "%s%s: %" JSON_INTEGER_FORMAT " out of range %" PRIu64 "..%" PRIu64, cx->pfx,
                  path, n, lo, hi);
        return BW_EVR_INVALID_VALUE;
    }
    *out = (uint64_t)n;
    return BW_EVR_OK;
}

static bw_event_reason get_tokens(const ev_ctx *cx, const json_t *obj, const char *key,
                                  const char *path, uint64_t *out)
{
    return get_uint(cx, obj, key, path, 0, BW_TOKENS_LIMIT - 1, 0, out);
}

/* An optional object member: *out is NULL when absent. */
static bw_event_reason get_object(const ev_ctx *cx, const json_t *obj, const char *key,
                                  const char *path, const json_t **out)
{
    const json_t *v = field(obj, key);

    *out = v;
    if (v && !json_is_object(v)) {
        bw_seterr(cx->err, cx->errsize, "%s%s: must be an object", cx->pfx, path);
        return BW_EVR_WRONG_TYPE;
    }
    return BW_EVR_OK;
}

/* A timestamp: an RFC 3339 string or integer epoch milliseconds, never before 1970. */
static bw_event_reason get_time(const ev_ctx *cx, const json_t *v, const char *pfx,
                                const char *path, bw_event *ev)
{
    int64_t ms;

    if (json_is_integer(v)) {
        ms = json_integer_value(v);
    } else if (json_is_string(v)) {
        /* jansson refuses \u0000 without JSON_ALLOW_NUL, so the C string is the whole value */
        if (bw_parse_rfc3339(json_string_value(v), &ms) != 0) {
            bw_seterr(cx->err, cx->errsize, "%s%s: not an RFC 3339 timestamp", pfx, path);
            return BW_EVR_INVALID_VALUE;
        }
    } else {
        bw_seterr(cx->err, cx->errsize,
                  "%s%s: must be an RFC 3339 string or integer epoch milliseconds", pfx, path);
        return BW_EVR_WRONG_TYPE;
    }
    if (ms < 0) {
        bw_seterr(cx->err, cx->errsize, "%s%s: before 1970-01-01", pfx, path);
        return BW_EVR_INVALID_VALUE;
    }
    ev->has_timestamp = 1;
    ev->timestamp_ms = ms;
    return BW_EVR_OK;
}

/**
 * @brief Read "status" and match it against @p allowed (NULL-terminated).
 * @param expect the allowed values as the message lists them.
 * @returns BW_EVR_OK with *idx set (0, the first, when absent), or the reason.
 */
static bw_event_reason get_status(const ev_ctx *cx, const char *const *allowed, const char *expect,
                                  int *idx)
{
    const json_t *v = field(cx->body, "status");
    const char *s;

    *idx = 0;
    if (!v)
        return BW_EVR_OK;
    if (!json_is_string(v)) {
        bw_seterr(cx->err, cx->errsize, "%sstatus: must be a string", cx->pfx);
        return BW_EVR_WRONG_TYPE;
    }
    s = json_string_value(v);
    for (int i = 0; allowed[i]; i++) {
        if (strcmp(s, allowed[i]) == 0) {
            *idx = i;
            return BW_EVR_OK;
        }
    }
    bw_seterr(cx->err, cx->errsize, "%sstatus: must be %s", cx->pfx, expect);
    return BW_EVR_INVALID_VALUE;
}

/* OpenAI Chat: prompt_tokens includes cache reads and writes, completion includes reasoning. */
static bw_event_reason usage_chat(const ev_ctx *cx, const json_t *u, bw_usage *us)
{
    const json_t *pd, *cd;
    uint64_t prompt, cached = 0;
    bw_event_reason r;

    if ((r = get_tokens(cx, u, "prompt_tokens", "usage.prompt_tokens", &prompt)) ||
        (r = get_tokens(cx, u, "completion_tokens", "usage.completion_tokens", &us->output)) ||
        (r = get_tokens(cx, u, "cache_creation_input_tokens", "usage.cache_creation_input_tokens",
                        &us->cache_write)) ||
        (r = get_object(cx, u, "prompt_tokens_details", "usage.prompt_tokens_details", &pd)) ||
        (r = get_object(cx, u, "completion_tokens_details", "usage.completion_tokens_details",
                        &cd)))
        return r;
    if (pd && (r = get_tokens(cx, pd, "cached_tokens", "usage.prompt_tokens_details.cached_tokens",
                              &cached)))
        return r;
    if (cd && (r = get_tokens(cx, cd, "reasoning_tokens",
                              "usage.completion_tokens_details.reasoning_tokens", &us->reasoning)))
        return r;
    /* each term is below 2^40: the sum cannot wrap */
    if (cached + us->cache_write > prompt) {
        bw_seterr(cx->err, cx->errsize,
                  "%susage: cached_tokens + cache_creation_input_tokens exceed prompt_tokens",
                  cx->pfx);
        return BW_EVR_INVALID_VALUE;
    }
    us->input = prompt - cached - us->cache_write;
    us->cache_read = cached;
    return BW_EVR_OK;
}

/* OpenAI Responses: input_tokens includes cache reads, output_tokens includes reasoning. */
static bw_event_reason usage_responses(const ev_ctx *cx, const json_t *u, bw_usage *us)
{
    const json_t *id, *od;
    uint64_t input, cached = 0;
    bw_event_reason r;

    if ((r = get_tokens(cx, u, "input_tokens", "usage.input_tokens", &input)) ||
        (r = get_tokens(cx, u, "output_tokens", "usage.output_tokens", &us->output)) ||
        (r = get_object(cx, u, "input_tokens_details", "usage.input_tokens_details", &id)) ||
        (r = get_object(cx, u, "output_tokens_details", "usage.output_tokens_details", &od)))
        return r;
    if (id && (r = get_tokens(cx, id, "cached_tokens", "usage.input_tokens_details.cached_tokens",
                              &cached)))
        return r;
    if (od && (r = get_tokens(cx, od, "reasoning_tokens",
                              "usage.output_tokens_details.reasoning_tokens", &us->reasoning)))
        return r;
    if (cached > input) {
        bw_seterr(cx->err, cx->errsize, "%susage: cached_tokens exceed input_tokens", cx->pfx);
        return BW_EVR_INVALID_VALUE;
    }
    us->input = input - cached;
    us->cache_read = cached;
    return BW_EVR_OK;
}

/* Native / Anthropic: the classes are already disjoint (input excludes the cache). */
static bw_event_reason usage_native(const ev_ctx *cx, const json_t *u, bw_usage *us)
{
    static const char *const known[] = {"input_tokens", "output_tokens", "cache_read_input_tokens",
                                        "cache_creation_input_tokens", "reasoning_tokens"};
    bw_event_reason r;
    int any = 0;

    for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
        any |= field(u, known[i]) != NULL;
    if (!any) {
        /* an empty or foreign usage object would otherwise bill zero tokens silently */
        bw_seterr(cx->err, cx->errsize, "%susage: none of the known token fields", cx->pfx);
        return BW_EVR_INVALID_VALUE;
    }
    if ((r = get_tokens(cx, u, "input_tokens", "usage.input_tokens", &us->input)) ||
        (r = get_tokens(cx, u, "cache_read_input_tokens", "usage.cache_read_input_tokens",
                        &us->cache_read)) ||
        (r = get_tokens(cx, u, "cache_creation_input_tokens", "usage.cache_creation_input_tokens",
                        &us->cache_write)) ||
        (r = get_tokens(cx, u, "output_tokens", "usage.output_tokens", &us->output)) ||
        (r = get_tokens(cx, u, "reasoning_tokens", "usage.reasoning_tokens", &us->reasoning)))
        return r;
    return BW_EVR_OK;
}

static bw_event_reason parse_usage(const ev_ctx *cx, bw_event *ev)
{
    const json_t *u;
    bw_event_reason r;

    if ((r = get_object(cx, cx->body, "usage", "usage", &u)) || !u)
        return r;
    /* shape detection order is part of the contract: Chat, then Responses, then native */
    if (field(u, "prompt_tokens") || field(u, "completion_tokens")) {
        ev->usage_shape = BW_USAGE_OPENAI_CHAT;
        r = usage_chat(cx, u, &ev->usage);
    } else if (field(u, "input_tokens_details") || field(u, "output_tokens_details")) {
        ev->usage_shape = BW_USAGE_OPENAI_RESPONSES;
        r = usage_responses(cx, u, &ev->usage);
    } else {
        ev->usage_shape = BW_USAGE_NATIVE;
        r = usage_native(cx, u, &ev->usage);
    }
    if (r)
        return r;
    if (ev->usage.reasoning > ev->usage.output) {
        bw_seterr(cx->err, cx->errsize, "%susage: reasoning tokens exceed output tokens", cx->pfx);
        return BW_EVR_INVALID_VALUE;
    }
    return BW_EVR_OK;
}

static bw_event_reason parse_model(const ev_ctx *cx, bw_event *ev)
{
    static const char *const st[] = {"completed", "error", NULL};
    bw_event_reason r;
    int idx;

    if ((r = get_text(cx, cx->body, "model", "model", ev->name, BW_NAME_MAX, TXT_REQUIRED,
                      BW_EVR_INVALID_VALUE)) ||
        (r = get_text(cx, cx->body, "provider", "provider", ev->provider, BW_NAME_MAX, TXT_EMPTY_OK,
                      BW_EVR_INVALID_VALUE)) ||
        (r = get_text(cx, cx->body, "node_name", "node_name", ev->node_name, BW_NAME_MAX,
                      TXT_EMPTY_OK, BW_EVR_INVALID_VALUE)) ||
        (r = get_status(cx, st, "completed or error", &idx)))
        return r;
    ev->failed = idx == 1;
    return parse_usage(cx, ev);
}

static bw_event_reason parse_tool(const ev_ctx *cx, bw_event *ev)
{
    static const char *const st[] = {"completed", "error", NULL};
    bw_event_reason r;
    uint64_t dur;
    int idx;

    if ((r = get_text(cx, cx->body, "tool_name", "tool_name", ev->name, BW_NAME_MAX, TXT_REQUIRED,
                      BW_EVR_INVALID_VALUE)) ||
        (r = get_status(cx, st, "completed or error", &idx)) ||
        (r = get_uint(cx, cx->body, "units", "units", 1, BW_UNITS_MAX, 1, &ev->units)) ||
        (r = get_uint(cx, cx->body, "duration_ms", "duration_ms", 0, INT64_MAX, 0, &dur)))
        return r;
    ev->failed = idx == 1;
    ev->duration_ms = (int64_t)dur;
    return BW_EVR_OK;
}

static bw_event_reason parse_finalize(const ev_ctx *cx, bw_event *ev)
{
    static const char *const st[] = {"completed", "error", "cancelled", NULL};
    const json_t *x;
    bw_event_reason r;
    int idx;

    if ((r = get_status(cx, st, "completed, error or cancelled", &idx)) ||
        (r = get_object(cx, cx->body, "expected", "expected", &x)))
        return r;
    strcpy(ev->final_status, st[idx]); /* the longest, "cancelled", fits in 16 */
    if (!x)
        return BW_EVR_OK;
    if ((r = get_uint(cx, x, "model_calls", "expected.model_calls", 0, INT64_MAX, 0,
                      &ev->expected_model_calls)) ||
        (r = get_uint(cx, x, "tool_calls", "expected.tool_calls", 0, INT64_MAX, 0,
                      &ev->expected_tool_calls)))
        return r;
    ev->has_expected = 1;
    return BW_EVR_OK;
}

static bw_event_type type_from_name(const char *s, size_t n)
{
    for (int t = BW_EV_MODEL; t <= BW_EV_FINALIZE; t++) {
        if (strlen(type_names[t]) == n && memcmp(s, type_names[t], n) == 0)
            return (bw_event_type)t;
    }
    return BW_EV_NONE;
}

/**
 * @brief Read the event type from @p root ("type"); for CloudEvents only the last
 *        dot-separated segment of the type names the event ("com.acme.custom_tool_call").
 */
static bw_event_reason get_type(const ev_ctx *cx, const json_t *root, int cloudevent, bw_event *ev)
{
    const json_t *v = field(root, "type");
    const char *s, *dot;
    size_t n;

    if (!v) {
        bw_seterr(cx->err, cx->errsize, "type: required");
        return BW_EVR_MISSING_FIELD;
    }
    if (!json_is_string(v)) {
        bw_seterr(cx->err, cx->errsize, "type: must be a string");
        return BW_EVR_WRONG_TYPE;
    }
    s = json_string_value(v);
    n = json_string_length(v);
    if (cloudevent && (dot = memrchr(s, '.', n)) != NULL) {
        n -= (size_t)(dot + 1 - s);
        s = dot + 1;
    }
    ev->type = type_from_name(s, n);
    if (ev->type == BW_EV_NONE) {
        bw_seterr(cx->err, cx->errsize,
                  "type: not custom_model_call, custom_tool_call or request_finalize");
        return BW_EVR_UNKNOWN_TYPE;
    }
    return BW_EVR_OK;
}

/**
 * @brief Envelope checks: the native envelope is the event itself; a CloudEvent
 *        (specversion present) carries event_id in "id" and the fields in "data".
 *        Leaves cx->body pointing at the object holding the payload fields.
 */
static bw_event_reason parse_envelope(ev_ctx *cx, const json_t *root, bw_event *ev)
{
    const json_t *sv = field(root, "specversion"), *data;
    bw_event_reason r;

    if (!sv) {
        if ((r = get_type(cx, root, 0, ev)))
            return r;
        return get_id(cx, root, "event_id", "event_id", ev->event_id, 1);
    }
    if (!json_is_string(sv)) {
        bw_seterr(cx->err, cx->errsize, "specversion: must be a string");
        return BW_EVR_WRONG_TYPE;
    }
    if (strcmp(json_string_value(sv), "1.0") != 0) {
        bw_seterr(cx->err, cx->errsize, "specversion: must be \"1.0\"");
        return BW_EVR_INVALID_VALUE;
    }
    if ((r = get_type(cx, root, 1, ev)) || (r = get_id(cx, root, "id", "id", ev->event_id, 1)))
        return r;
    data = field(root, "data");
    if (!data) {
        /* data_base64 or another content type carries nothing this worker can bill */
        bw_seterr(cx->err, cx->errsize, "data: required (a JSON object)");
        return BW_EVR_MISSING_FIELD;
    }
    if (!json_is_object(data)) {
        bw_seterr(cx->err, cx->errsize, "data: must be an object");
        return BW_EVR_WRONG_TYPE;
    }
    cx->body = data;
    cx->pfx = "data.";
    return BW_EVR_OK;
}

bw_event_reason bw_event_parse(const char *buf, size_t len, size_t max_bytes, bw_event *ev,
                               char *err, size_t errsize)
{
    ev_ctx cx = {.body = NULL, .pfx = "", .err = err, .errsize = errsize};
    json_t *root = NULL;
    const json_t *ts;
    json_error_t jerr;
    bw_event_reason r;

    bw_seterr(err, errsize, "%s", "");
    if (len > max_bytes) {
        bw_seterr(err, errsize, "event of %zu bytes exceeds the limit of %zu", len, max_bytes);
        r = BW_EVR_TOO_LARGE;
        goto out;
    }
    if (!buf || len == 0) {
        bw_seterr(err, errsize, "empty payload");
        r = BW_EVR_INVALID_JSON;
        goto out;
    }
    if (too_deep(buf, len)) {
        bw_seterr(err, errsize, "nesting deeper than %d", EV_MAX_DEPTH);
        r = BW_EVR_INVALID_JSON;
        goto out;
    }
    /* JSON_DECODE_ANY: a bare scalar is valid JSON and must be reported as not_object */
    root = json_loadb(buf, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
    if (!root) {
        bw_seterr(err, errsize, "invalid JSON at line %d column %d: %s", jerr.line, jerr.column,
                  jerr.text);
        if (err && errsize > 0)
            ascii_only(err);
        r = BW_EVR_INVALID_JSON;
        goto out;
    }
    if (!json_is_object(root)) {
        bw_seterr(err, errsize, "top-level value is not an object");
        r = BW_EVR_NOT_OBJECT;
        goto out;
    }

    memset(ev, 0, sizeof(*ev));
    ev->units = 1;
    strcpy(ev->final_status, "completed");
    cx.body = root;
    if ((r = parse_envelope(&cx, root, ev)) ||
        (r = get_id(&cx, cx.body, "request_id", "request_id", ev->request_id, 1)) ||
        (r = get_id(&cx, cx.body, "user_id", "user_id", ev->user_id, 1)) ||
        (r = get_id(&cx, cx.body, "idempotency_key", "idempotency_key", ev->idempotency_key, 0)) ||
        (r = get_id(&cx, cx.body, "session_id", "session_id", ev->session_id, 0)) ||
        (r = get_id(&cx, cx.body, "org_id", "org_id", ev->org_id, 0)))
        goto out;

    /* a CloudEvent's own "time" stands in when its data has no timestamp */
    if ((ts = field(cx.body, "timestamp")) != NULL)
        r = get_time(&cx, ts, cx.pfx, "timestamp", ev);
    else if (cx.body != root && (ts = field(root, "time")) != NULL)
        r = get_time(&cx, ts, "", "time", ev);
    if (r)
        goto out;

    switch (ev->type) {
    case BW_EV_MODEL:
        r = parse_model(&cx, ev);
        break;
    case BW_EV_TOOL:
        r = parse_tool(&cx, ev);
        break;
    default:
        r = parse_finalize(&cx, ev);
        break;
    }

out:
    json_decref(root);
    return r;
}

const char *bw_event_dedup_key(const bw_event *ev)
{
    return ev->idempotency_key[0] ? ev->idempotency_key : ev->event_id;
}

const char *bw_event_reason_str(bw_event_reason r)
{
    if ((unsigned)r >= sizeof(reason_names) / sizeof(reason_names[0]))
        return "unknown";
    return reason_names[r];
}

const char *bw_event_type_str(bw_event_type t)
{
    if (t <= BW_EV_NONE || t > BW_EV_FINALIZE)
        return "none";
    return type_names[t];
}

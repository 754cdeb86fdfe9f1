/*
 * bw_event.h - parse, validate and normalise one agent event
 * (PRODUCT.md section 3: native schema v1 and CloudEvents 1.0 structured JSON).
 *
 * bw_event_parse() never allocates on success paths that the caller must
 * free: everything lands in the fixed-size bw_event.
 */
#ifndef BW_EVENT_H
#define BW_EVENT_H

#include <stddef.h>
#include <stdint.h>

#include "bw_util.h"

/** Token counts must be below 2^40. */
#define BW_TOKENS_LIMIT (1ULL << 40)
/** Tool units are 1..10^6. */
#define BW_UNITS_MAX 1000000ULL

typedef enum bw_event_type {
    BW_EV_NONE = 0,
    BW_EV_MODEL,   /* custom_model_call */
    BW_EV_TOOL,    /* custom_tool_call */
    BW_EV_FINALIZE /* request_finalize */
} bw_event_type;

/** Which usage shape a model call's usage object had. */
typedef enum bw_usage_shape {
    BW_USAGE_NONE = 0,
    BW_USAGE_OPENAI_CHAT,
    BW_USAGE_OPENAI_RESPONSES,
    BW_USAGE_NATIVE
} bw_usage_shape;

/**
 * Normalised usage. Disjoint classes except reasoning:
 *   input       uncached input tokens (excludes cache_read and cache_write)
 *   cache_read  input tokens served from the cache
 *   cache_write input tokens written to the cache
 *   output      all output tokens, INCLUDING reasoning
 *   reasoning   the reasoning part of output (reasoning <= output)
 */
typedef struct bw_usage {
    uint64_t input, cache_read, cache_write, output, reasoning;
} bw_usage;

/** Reason codes carried in dead-letter records. */
typedef enum bw_event_reason {
    BW_EVR_OK = 0,
    BW_EVR_TOO_LARGE,     /* "too_large": above limits.max_event_bytes */
    BW_EVR_INVALID_JSON,  /* "invalid_json": not JSON, bad UTF-8, duplicated key, too deep */
    BW_EVR_NOT_OBJECT,    /* "not_object": JSON but not an object */
    BW_EVR_MISSING_FIELD, /* "missing_field": a required field is absent */
    BW_EVR_WRONG_TYPE,    /* "wrong_type": a field has the wrong JSON type */
    BW_EVR_INVALID_VALUE, /* "invalid_value": right type, value out of range/inconsistent */
    BW_EVR_INVALID_ID,    /* "invalid_id": identifier empty, too long, bad UTF-8, control chars */
    BW_EVR_UNKNOWN_TYPE,  /* "unknown_type": type is not one of the three */
    BW_EVR_USER_MISMATCH  /* "user_mismatch": set by the store, never by the parser */
} bw_event_reason;

typedef struct bw_event {
    bw_event_type type;
    char event_id[BW_ID_MAX + 1];
    char idempotency_key[BW_ID_MAX + 1]; /* "" when absent */
    char request_id[BW_ID_MAX + 1];
    char user_id[BW_ID_MAX + 1];
    char session_id[BW_ID_MAX + 1]; /* "" when absent */
    char org_id[BW_ID_MAX + 1];     /* "" when absent */
    int has_timestamp;
    int64_t timestamp_ms;

    /* custom_model_call: model; custom_tool_call: tool_name */
    char name[BW_NAME_MAX + 1];
    char provider[BW_NAME_MAX + 1]; /* "" when absent */
    char node_name[BW_NAME_MAX + 1];
    int failed; /* status == "error" (model and tool calls) */

    /* custom_model_call */
    bw_usage_shape usage_shape; /* BW_USAGE_NONE: no usage object */
    bw_usage usage;

    /* custom_tool_call */
    uint64_t units; /* default 1 */
    int64_t duration_ms;

    /* request_finalize */
    char final_status[16]; /* completed | error | cancelled ("completed" default) */
    int has_expected;
    uint64_t expected_model_calls, expected_tool_calls;
} bw_event;

/**
 * @brief Parse and validate one Kafka message payload.
 * @param max_bytes limits.max_event_bytes; a longer payload is BW_EVR_TOO_LARGE.
 * @param err human-readable detail ("usage.prompt_tokens: must be an integer").
 * @returns BW_EVR_OK and a filled @p ev, or the reason code; on error @p ev
 *          is undefined but safe to reuse.
 * @remark Thread-safe; does not keep references to @p buf.
 */
bw_event_reason bw_event_parse(const char *buf, size_t len, size_t max_bytes, bw_event *ev,
                               char *err, size_t errsize);

/** The dedup key of an event: idempotency_key when present, else event_id. */
const char *bw_event_dedup_key(const bw_event *ev);

/** Stable reason-code string ("invalid_json", ...). */
const char *bw_event_reason_str(bw_event_reason r);

/** "custom_model_call", "custom_tool_call", "request_finalize". */
const char *bw_event_type_str(bw_event_type t);

#endif

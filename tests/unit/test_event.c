/*
 * test_event.c - bw_event_parse() against PRODUCT.md section 3.
 *
 * Event JSON in the tables is written with single quotes for readability; sq()
 * turns them into double quotes (no test needs a literal single quote). Every
 * payload is copied into a heap buffer of exactly its length, without a NUL, so
 * ASan catches any read past the message.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bw_event.h"

#define MAX_BYTES 65536

/* Common headers of native events (single-quoted JSON). */
#define HDR(type)    "'type':'" type "','event_id':'e1','request_id':'r1','user_id':'u1'"
#define MODEL(extra) "{" HDR("custom_model_call") ",'model':'m'" extra "}"
#define TOOL(extra)  "{" HDR("custom_tool_call") ",'tool_name':'t'" extra "}"
#define FIN(extra)   "{" HDR("request_finalize") extra "}"
#define USAGE(u)     MODEL(",'usage':" u)

static char jbuf[4 * MAX_BYTES];

/* Single-quoted JSON to real JSON, in a static buffer. */
static const char *sq(const char *in)
{
    size_t i = 0;
    for (; in[i] && i + 1 < sizeof(jbuf); i++)
        jbuf[i] = in[i] == '\'' ? '"' : in[i];
    jbuf[i] = '\0';
    return jbuf;
}

static bw_event_reason parse_n(const char *json, size_t len, size_t max, bw_event *ev, char *err,
                               size_t errsize)
{
    char *copy = malloc(len ? len : 1);
    bw_event_reason r;

    assert_non_null(copy);
    memcpy(copy, json, len);
    r = bw_event_parse(copy, len, max, ev, err, errsize);
    free(copy);
    return r;
}

/* Parse real JSON that must be accepted. */
static void parse_ok_raw(const char *json, bw_event *ev)
{
    char err[256];
    bw_event_reason r = parse_n(json, strlen(json), MAX_BYTES, ev, err, sizeof(err));
    if (r != BW_EVR_OK)
        fail_msg("rejected (%s: %s): %s", bw_event_reason_str(r), err, json);
    assert_string_equal(err, "");
}

static void parse_ok(const char *sqjson, bw_event *ev)
{
    parse_ok_raw(sq(sqjson), ev);
}

static void expect_reject_raw(const char *name, const char *json, size_t len, size_t max,
                              bw_event_reason want, const char *msg)
{
    char err[256];
    bw_event ev;
    bw_event_reason r = parse_n(json, len, max, &ev, err, sizeof(err));

    if (r != want)
        fail_msg("%s: got %s (%s), want %s", name, bw_event_reason_str(r), err,
                 bw_event_reason_str(want));
    if (msg && !strstr(err, msg))
        fail_msg("%s: message \"%s\" lacks \"%s\"", name, err, msg);
    /* messages go to logs and DLQ records: never raw input bytes */
    for (const char *p = err; *p; p++) {
        if ((unsigned char)*p < 0x20 || (unsigned char)*p >= 0x7f)
            fail_msg("%s: message \"%s\" has a non-printable byte", name, err);
    }
}

/* ---- section 3 examples ---------------------------------------------------- */

static void test_section3_examples(void **state)
{
    bw_event ev;

    /* e1: a model call without usage: no shape, zero tokens, status completed */
    parse_ok("{'type':'custom_model_call','event_id':'e1','request_id':'r1','user_id':'u1',"
             "'model':'gpt-4o','node_name':'ReasonNode'}",
             &ev);
    assert_int_equal(ev.type, BW_EV_MODEL);
    assert_string_equal(ev.event_id, "e1");
    assert_string_equal(ev.request_id, "r1");
    assert_string_equal(ev.user_id, "u1");
    assert_string_equal(ev.idempotency_key, "");
    assert_string_equal(ev.session_id, "");
    assert_string_equal(ev.org_id, "");
    assert_string_equal(ev.name, "gpt-4o");
    assert_string_equal(ev.node_name, "ReasonNode");
    assert_string_equal(ev.provider, "");
    assert_int_equal(ev.failed, 0);
    assert_int_equal(ev.has_timestamp, 0);
    assert_int_equal(ev.usage_shape, BW_USAGE_NONE);
    assert_int_equal(ev.usage.input + ev.usage.cache_read + ev.usage.cache_write + ev.usage.output +
                         ev.usage.reasoning,
                     0);
    assert_string_equal(bw_event_dedup_key(&ev), "e1");

    /* e2: a tool call: units defaults to 1, duration to 0 */
    parse_ok("{'type':'custom_tool_call','event_id':'e2','request_id':'r1','user_id':'u1',"
             "'tool_name':'web_search'}",
             &ev);
    assert_int_equal(ev.type, BW_EV_TOOL);
    assert_string_equal(ev.event_id, "e2");
    assert_string_equal(ev.name, "web_search");
    assert_int_equal(ev.units, 1);
    assert_int_equal(ev.duration_ms, 0);
    assert_int_equal(ev.failed, 0);

    /* e3, e4: same model, other node names */
    parse_ok("{'type':'custom_model_call','event_id':'e3','request_id':'r1','user_id':'u1',"
             "'model':'gpt-4o','node_name':'ReasonNode'}",
             &ev);
    assert_string_equal(ev.event_id, "e3");
    assert_string_equal(ev.node_name, "ReasonNode");
    parse_ok("{'type':'custom_model_call','event_id':'e4','request_id':'r1','user_id':'u1',"
             "'model':'gpt-4o','node_name':'ResponseNode'}",
             &ev);
    assert_string_equal(ev.event_id, "e4");
    assert_string_equal(ev.node_name, "ResponseNode");

    /* e5: finalize with expected 3 model calls and 1 tool call; status defaults */
    parse_ok("{'type':'request_finalize','event_id':'e5','request_id':'r1','user_id':'u1',"
             "'expected':{'model_calls':3,'tool_calls':1}}",
             &ev);
    assert_int_equal(ev.type, BW_EV_FINALIZE);
    assert_string_equal(ev.event_id, "e5");
    assert_int_equal(ev.has_expected, 1);
    assert_int_equal(ev.expected_model_calls, 3);
    assert_int_equal(ev.expected_tool_calls, 1);
    assert_string_equal(ev.final_status, "completed");
}

/* ---- usage shapes ------------------------------------------------------------ */

typedef struct usage_case {
    const char *name;
    const char *usage; /* single-quoted JSON object */
    bw_usage_shape shape;
    uint64_t input, cache_read, cache_write, output, reasoning;
} usage_case;

static const usage_case usage_cases[] = {
    /* chat: 1000 prompt - 200 cached - 100 written = 700 uncached; 300 of 500 out reasoning */
    {"chat full",
     "{'prompt_tokens':1000,'completion_tokens':500,'total_tokens':1500,"
     "'prompt_tokens_details':{'cached_tokens':200},"
     "'completion_tokens_details':{'reasoning_tokens':300},'cache_creation_input_tokens':100}",
     BW_USAGE_OPENAI_CHAT, 700, 200, 100, 500, 300},
    /* chat without details: everything is uncached input / plain output */
    {"chat plain", "{'prompt_tokens':10,'completion_tokens':5}", BW_USAGE_OPENAI_CHAT, 10, 0, 0, 5,
     0},
    /* chat detected by completion_tokens alone; prompt defaults to 0 */
    {"chat completion only", "{'completion_tokens':7}", BW_USAGE_OPENAI_CHAT, 0, 0, 0, 7, 0},
    /* cached + written == prompt is allowed: 300 - 200 - 100 = 0 uncached */
    {"chat cache equals prompt",
     "{'prompt_tokens':300,'prompt_tokens_details':{'cached_tokens':200},"
     "'cache_creation_input_tokens':100}",
     BW_USAGE_OPENAI_CHAT, 0, 200, 100, 0, 0},
    /* null details count as absent */
    {"chat null details",
     "{'prompt_tokens':4,'completion_tokens':2,'prompt_tokens_details':null,"
     "'completion_tokens_details':null}",
     BW_USAGE_OPENAI_CHAT, 4, 0, 0, 2, 0},
    /* chat wins over responses when both markers are present: details ignored, 10 input */
    {"chat before responses", "{'prompt_tokens':10,'input_tokens_details':{'cached_tokens':5}}",
     BW_USAGE_OPENAI_CHAT, 10, 0, 0, 0, 0},
    /* responses: 800 input - 300 cached = 500; 250 of 400 output reasoning; no cache writes */
    {"responses full",
     "{'input_tokens':800,'input_tokens_details':{'cached_tokens':300},'output_tokens':400,"
     "'output_tokens_details':{'reasoning_tokens':250},'total_tokens':1200}",
     BW_USAGE_OPENAI_RESPONSES, 500, 300, 0, 400, 250},
    /* responses detected by output details alone; reasoning == output is allowed */
    {"responses output details",
     "{'input_tokens':100,'output_tokens':50,'output_tokens_details':{'reasoning_tokens':50}}",
     BW_USAGE_OPENAI_RESPONSES, 100, 0, 0, 50, 50},
    /* native/anthropic: classes copied as they are (input excludes the cache) */
    {"native anthropic",
     "{'input_tokens':50,'cache_read_input_tokens':1000,'cache_creation_input_tokens':200,"
     "'output_tokens':80}",
     BW_USAGE_NATIVE, 50, 1000, 200, 80, 0},
    /* native with reasoning inside output */
    {"native reasoning", "{'input_tokens':10,'output_tokens':100,'reasoning_tokens':60}",
     BW_USAGE_NATIVE, 10, 0, 0, 100, 60},
    /* native detected by one known field; the rest default to 0 */
    {"native output only", "{'output_tokens':5}", BW_USAGE_NATIVE, 0, 0, 0, 5, 0},
    /* 2^40 - 1 is the largest accepted count */
    {"native max tokens", "{'input_tokens':1099511627775}", BW_USAGE_NATIVE, 1099511627775ULL, 0, 0,
     0, 0},
    /* unknown members beside known ones are ignored */
    {"native with extras", "{'input_tokens':3,'service_tier':'default','total_tokens':3}",
     BW_USAGE_NATIVE, 3, 0, 0, 0, 0},
};

static void test_usage_shapes(void **state)
{
    char sqjson[1024];
    bw_event ev;

    for (size_t i = 0; i < sizeof(usage_cases) / sizeof(usage_cases[0]); i++) {
        const usage_case *c = &usage_cases[i];
        snprintf(sqjson, sizeof(sqjson), "{" HDR("custom_model_call") ",'model':'m','usage':%s}",
                 c->usage);
        parse_ok(sqjson, &ev);
        if (ev.usage_shape != c->shape || ev.usage.input != c->input ||
            ev.usage.cache_read != c->cache_read || ev.usage.cache_write != c->cache_write ||
            ev.usage.output != c->output || ev.usage.reasoning != c->reasoning)
            fail_msg("%s: shape %d in %llu cr %llu cw %llu out %llu reas %llu", c->name,
                     ev.usage_shape, (unsigned long long)ev.usage.input,
                     (unsigned long long)ev.usage.cache_read,
                     (unsigned long long)ev.usage.cache_write, (unsigned long long)ev.usage.output,
                     (unsigned long long)ev.usage.reasoning);
    }
}

/* ---- CloudEvents ------------------------------------------------------------- */

static void test_cloudevents(void **state)
{
    const char *json;
    bw_event ev;

    /* id is the event_id (data.event_id ignored); last type segment; time as timestamp */
    parse_ok("{'specversion':'1.0','id':'ce-1','source':'/agents/a1',"
             "'type':'com.example.billing.custom_model_call','time':'2026-12-03T10:00:00Z',"
             "'datacontenttype':'application/json','data':{'event_id':'ignored',"
             "'request_id':'r1','user_id':'u1','idempotency_key':'k1','model':'gpt-4o',"
             "'usage':{'prompt_tokens':10,'completion_tokens':5}}}",
             &ev);
    assert_int_equal(ev.type, BW_EV_MODEL);
    assert_string_equal(ev.event_id, "ce-1");
    assert_string_equal(ev.request_id, "r1");
    assert_string_equal(ev.user_id, "u1");
    assert_string_equal(ev.name, "gpt-4o");
    assert_string_equal(bw_event_dedup_key(&ev), "k1");
    assert_int_equal(ev.usage_shape, BW_USAGE_OPENAI_CHAT);
    assert_int_equal(ev.usage.input, 10);
    assert_int_equal(ev.usage.output, 5);
    assert_int_equal(ev.has_timestamp, 1);
    assert_int_equal(ev.timestamp_ms, 1796292000000LL); /* 2026-12-03T10:00:00Z */

    /* data.timestamp wins over the envelope's time, even a malformed time */
    parse_ok("{'specversion':'1.0','id':'ce-2','source':'/a','type':'x.custom_tool_call',"
             "'time':'garbage','data':{'request_id':'r1','user_id':'u1','tool_name':'search',"
             "'units':2,'timestamp':1000}}",
             &ev);
    assert_int_equal(ev.type, BW_EV_TOOL);
    assert_int_equal(ev.units, 2);
    assert_int_equal(ev.timestamp_ms, 1000);

    /* a type without dots is its own last segment; no time, no timestamp */
    parse_ok("{'specversion':'1.0','id':'ce-3','source':'/a','type':'request_finalize',"
             "'data':{'request_id':'r1','user_id':'u1','status':'cancelled'}}",
             &ev);
    assert_int_equal(ev.type, BW_EV_FINALIZE);
    assert_string_equal(ev.final_status, "cancelled");
    assert_int_equal(ev.has_timestamp, 0);

    /* fields outside data are not read: top-level request_id does not count */
    json = sq("{'specversion':'1.0','id':'c','type':'custom_tool_call','request_id':'r1',"
              "'data':{'user_id':'u1','tool_name':'t'}}");
    expect_reject_raw("ce top-level fields", json, strlen(json), MAX_BYTES, BW_EVR_MISSING_FIELD,
                      "data.request_id: required");
}

/* ---- rejections: every reason code ---------------------------------------- */

typedef struct reject_case {
    const char *name;
    const char *json; /* single-quoted */
    bw_event_reason reason;
    const char *msg; /* substring of the error message, or NULL */
} reject_case;

static const reject_case reject_cases[] = {
    /* invalid_json */
    {"truncated", "{'type':'custom_model_call','event_id':", BW_EVR_INVALID_JSON, "invalid JSON"},
    {"not json", "hello", BW_EVR_INVALID_JSON, "invalid JSON"},
    {"trailing garbage", MODEL("") " x", BW_EVR_INVALID_JSON, "invalid JSON"},
    {"duplicated key", TOOL(",'units':1,'units':2"), BW_EVR_INVALID_JSON, "duplicate"},
    {"duplicated key nested", USAGE("{'input_tokens':1,'input_tokens':1}"), BW_EVR_INVALID_JSON,
     "duplicate"},
    {"bad utf-8", TOOL(",'x':'\xff'"), BW_EVR_INVALID_JSON, "invalid JSON"},
    {"overlong utf-8", TOOL(",'x':'\xc0\xaf'"), BW_EVR_INVALID_JSON, "invalid JSON"},
    {"nul escape", TOOL(",'session_id':'a\\u0000b'"), BW_EVR_INVALID_JSON, "invalid JSON"},
    /* jansson cannot hold integers from 2^63 up: malformed, never zero */
    {"2^64 tokens", USAGE("{'input_tokens':18446744073709551616}"), BW_EVR_INVALID_JSON,
     "invalid JSON"},
    {"2^63 tokens", USAGE("{'input_tokens':9223372036854775808}"), BW_EVR_INVALID_JSON, NULL},
    {"2^64 in unknown field", TOOL(",'x':18446744073709551616"), BW_EVR_INVALID_JSON, NULL},
    {"real overflow", TOOL(",'x':1e999"), BW_EVR_INVALID_JSON, NULL},
    /* not_object */
    {"array", "[" TOOL("") "]", BW_EVR_NOT_OBJECT, "not an object"},
    {"string", "'x'", BW_EVR_NOT_OBJECT, NULL},
    {"number", "42", BW_EVR_NOT_OBJECT, NULL},
    {"null", "null", BW_EVR_NOT_OBJECT, NULL},
    /* missing_field */
    {"missing type", "{'event_id':'e1','request_id':'r1','user_id':'u1'}", BW_EVR_MISSING_FIELD,
     "type: required"},
    {"missing event_id",
     "{'type':'custom_tool_call','request_id':'r1','user_id':'u1',"
     "'tool_name':'t'}",
     BW_EVR_MISSING_FIELD, "event_id: required"},
    {"null event_id",
     "{'type':'custom_tool_call','event_id':null,'request_id':'r1',"
     "'user_id':'u1','tool_name':'t'}",
     BW_EVR_MISSING_FIELD, "event_id: required"},
    {"missing request_id",
     "{'type':'custom_tool_call','event_id':'e1','user_id':'u1',"
     "'tool_name':'t'}",
     BW_EVR_MISSING_FIELD, "request_id: required"},
    {"missing user_id",
     "{'type':'custom_tool_call','event_id':'e1','request_id':'r1',"
     "'tool_name':'t'}",
     BW_EVR_MISSING_FIELD, "user_id: required"},
    {"missing model", "{" HDR("custom_model_call") "}", BW_EVR_MISSING_FIELD, "model: required"},
    {"missing tool_name", "{" HDR("custom_tool_call") "}", BW_EVR_MISSING_FIELD,
     "tool_name: required"},
    {"ce missing id", "{'specversion':'1.0','type':'custom_tool_call','data':{}}",
     BW_EVR_MISSING_FIELD, "id: required"},
    {"ce missing data", "{'specversion':'1.0','id':'c','type':'custom_tool_call'}",
     BW_EVR_MISSING_FIELD, "data: required"},
    {"ce data_base64",
     "{'specversion':'1.0','id':'c','type':'custom_tool_call',"
     "'data_base64':'e30='}",
     BW_EVR_MISSING_FIELD, "data: required"},
    {"ce missing user_id",
     "{'specversion':'1.0','id':'c','type':'custom_tool_call',"
     "'data':{'request_id':'r1','tool_name':'t'}}",
     BW_EVR_MISSING_FIELD, "data.user_id: required"},
    /* wrong_type */
    {"user_id number",
     "{'type':'custom_tool_call','event_id':'e1','request_id':'r1',"
     "'user_id':42,'tool_name':'t'}",
     BW_EVR_WRONG_TYPE, "user_id: must be a string"},
    {"type number", "{'type':1,'event_id':'e1','request_id':'r1','user_id':'u1'}",
     BW_EVR_WRONG_TYPE, "type: must be a string"},
    {"model array", "{" HDR("custom_model_call") ",'model':['m']}", BW_EVR_WRONG_TYPE,
     "model: must be a string"},
    {"tokens 1000.0", USAGE("{'prompt_tokens':1000.0}"), BW_EVR_WRONG_TYPE,
     "usage.prompt_tokens: must be an integer, not a real"},
    {"tokens 1e3", USAGE("{'input_tokens':1e3}"), BW_EVR_WRONG_TYPE,
     "usage.input_tokens: must be an integer"},
    {"tokens string", USAGE("{'output_tokens':'5'}"), BW_EVR_WRONG_TYPE,
     "usage.output_tokens: must be an integer"},
    {"tokens bool", USAGE("{'output_tokens':true}"), BW_EVR_WRONG_TYPE, NULL},
    {"cached real", USAGE("{'prompt_tokens':10,'prompt_tokens_details':{'cached_tokens':2.5}}"),
     BW_EVR_WRONG_TYPE, "usage.prompt_tokens_details.cached_tokens: must be an integer"},
    {"usage array", USAGE("[]"), BW_EVR_WRONG_TYPE, "usage: must be an object"},
    {"details number", USAGE("{'prompt_tokens':10,'prompt_tokens_details':3}"), BW_EVR_WRONG_TYPE,
     "usage.prompt_tokens_details: must be an object"},
    {"status number", TOOL(",'status':0"), BW_EVR_WRONG_TYPE, "status: must be a string"},
    {"units string", TOOL(",'units':'3'"), BW_EVR_WRONG_TYPE, "units: must be an integer"},
    {"units real", TOOL(",'units':1.0"), BW_EVR_WRONG_TYPE, "units: must be an integer"},
    {"expected array", FIN(",'expected':[3,1]"), BW_EVR_WRONG_TYPE, "expected: must be an object"},
    {"expected real", FIN(",'expected':{'model_calls':3.0}"), BW_EVR_WRONG_TYPE,
     "expected.model_calls: must be an integer"},
    {"timestamp bool", TOOL(",'timestamp':true"), BW_EVR_WRONG_TYPE, "timestamp: must be"},
    {"timestamp real", TOOL(",'timestamp':1.5e12"), BW_EVR_WRONG_TYPE, "timestamp: must be"},
    {"ce specversion number", "{'specversion':1.0,'id':'c','type':'custom_tool_call','data':{}}",
     BW_EVR_WRONG_TYPE, "specversion: must be a string"},
    {"ce data string", "{'specversion':'1.0','id':'c','type':'custom_tool_call','data':'{}'}",
     BW_EVR_WRONG_TYPE, "data: must be an object"},
    {"ce data field",
     "{'specversion':'1.0','id':'c','type':'custom_tool_call',"
     "'data':{'request_id':'r1','user_id':'u1','tool_name':'t','units':'2'}}",
     BW_EVR_WRONG_TYPE, "data.units: must be an integer"},
    /* invalid_value: tokens */
    {"negative tokens", USAGE("{'input_tokens':-5}"), BW_EVR_INVALID_VALUE,
     "usage.input_tokens: -5 out of range"},
    {"2^40 tokens", USAGE("{'output_tokens':1099511627776}"), BW_EVR_INVALID_VALUE,
     "usage.output_tokens: 1099511627776 out of range"},
    {"2^40 cached",
     USAGE("{'prompt_tokens':5,'prompt_tokens_details':"
           "{'cached_tokens':1099511627776}}"),
     BW_EVR_INVALID_VALUE, "usage.prompt_tokens_details.cached_tokens"},
    {"2^63-1 tokens", USAGE("{'input_tokens':9223372036854775807}"), BW_EVR_INVALID_VALUE, NULL},
    /* native: 6 reasoning of 5 output */
    {"reasoning > output native",
     USAGE("{'input_tokens':10,'output_tokens':5,'reasoning_tokens':6}"), BW_EVR_INVALID_VALUE,
     "usage: reasoning tokens exceed output tokens"},
    {"reasoning > output chat",
     USAGE("{'completion_tokens':5,'completion_tokens_details':"
           "{'reasoning_tokens':6}}"),
     BW_EVR_INVALID_VALUE, "reasoning tokens exceed"},
    {"reasoning > output responses",
     USAGE("{'output_tokens':5,'output_tokens_details':"
           "{'reasoning_tokens':6}}"),
     BW_EVR_INVALID_VALUE, "reasoning tokens exceed"},
    /* reasoning alone: 1 > 0 output */
    {"reasoning only", USAGE("{'reasoning_tokens':1}"), BW_EVR_INVALID_VALUE,
     "reasoning tokens exceed"},
    /* chat: 101 cached of 100 prompt */
    {"cached > prompt",
     USAGE("{'prompt_tokens':100,'prompt_tokens_details':{'cached_tokens':101}}"),
     BW_EVR_INVALID_VALUE, "exceed prompt_tokens"},
    /* chat: 90 cached + 20 written = 110 > 100 prompt */
    {"cached + written > prompt",
     USAGE("{'prompt_tokens':100,'prompt_tokens_details':"
           "{'cached_tokens':90},'cache_creation_input_tokens':20}"),
     BW_EVR_INVALID_VALUE, "exceed prompt_tokens"},
    /* responses: 301 cached of 300 input */
    {"cached > input responses",
     USAGE("{'input_tokens':300,'input_tokens_details':"
           "{'cached_tokens':301}}"),
     BW_EVR_INVALID_VALUE, "cached_tokens exceed input_tokens"},
    {"usage {}", USAGE("{}"), BW_EVR_INVALID_VALUE, "usage: none of the known token fields"},
    {"usage only total", USAGE("{'total_tokens':5}"), BW_EVR_INVALID_VALUE, "none of the known"},
    {"usage known null", USAGE("{'input_tokens':null}"), BW_EVR_INVALID_VALUE, "none of the known"},
    /* invalid_value: tool and finalize */
    {"units 0", TOOL(",'units':0"), BW_EVR_INVALID_VALUE, "units: 0 out of range 1..1000000"},
    {"units 1000001", TOOL(",'units':1000001"), BW_EVR_INVALID_VALUE,
     "units: 1000001 out of range"},
    {"units negative", TOOL(",'units':-1"), BW_EVR_INVALID_VALUE, "units: -1 out of range"},
    {"duration negative", TOOL(",'duration_ms':-1"), BW_EVR_INVALID_VALUE, "duration_ms"},
    {"expected negative", FIN(",'expected':{'model_calls':-1}"), BW_EVR_INVALID_VALUE,
     "expected.model_calls: -1 out of range"},
    {"model status", MODEL(",'status':'failed'"), BW_EVR_INVALID_VALUE,
     "status: must be completed or error"},
    {"tool status cancelled", TOOL(",'status':'cancelled'"), BW_EVR_INVALID_VALUE,
     "status: must be completed or error"},
    {"finalize status", FIN(",'status':'timeout'"), BW_EVR_INVALID_VALUE,
     "status: must be completed, error or cancelled"},
    {"status case", FIN(",'status':'Completed'"), BW_EVR_INVALID_VALUE, NULL},
    {"model empty", "{" HDR("custom_model_call") ",'model':''}", BW_EVR_INVALID_VALUE,
     "model: must not be empty"},
    {"model control", "{" HDR("custom_model_call") ",'model':'gpt\\u0007'}", BW_EVR_INVALID_VALUE,
     "model: control character at byte 3"},
    {"node_name newline", MODEL(",'node_name':'a\\nb'"), BW_EVR_INVALID_VALUE,
     "node_name: control character"},
    {"provider c1", MODEL(",'provider':'\\u0085'"), BW_EVR_INVALID_VALUE,
     "provider: control character at byte 0"},
    {"ce specversion 0.3", "{'specversion':'0.3','id':'c','type':'custom_tool_call','data':{}}",
     BW_EVR_INVALID_VALUE, "specversion: must be \"1.0\""},
    /* invalid_value: timestamps */
    {"timestamp words", TOOL(",'timestamp':'yesterday'"), BW_EVR_INVALID_VALUE,
     "timestamp: not an RFC 3339 timestamp"},
    {"timestamp month 13", TOOL(",'timestamp':'2026-13-01T00:00:00Z'"), BW_EVR_INVALID_VALUE,
     "timestamp"},
    {"timestamp no offset", TOOL(",'timestamp':'2026-12-03T10:00:00'"), BW_EVR_INVALID_VALUE,
     "timestamp"},
    {"timestamp date only", TOOL(",'timestamp':'2026-12-03'"), BW_EVR_INVALID_VALUE, "timestamp"},
    {"timestamp empty", TOOL(",'timestamp':''"), BW_EVR_INVALID_VALUE, "timestamp"},
    {"timestamp negative", TOOL(",'timestamp':-1"), BW_EVR_INVALID_VALUE, "timestamp: before 1970"},
    {"timestamp 1969", TOOL(",'timestamp':'1969-12-31T23:59:59Z'"), BW_EVR_INVALID_VALUE,
     "before 1970"},
    {"ce bad time",
     "{'specversion':'1.0','id':'c','type':'custom_tool_call','time':'soon',"
     "'data':{'request_id':'r1','user_id':'u1','tool_name':'t'}}",
     BW_EVR_INVALID_VALUE, "time: not an RFC 3339"},
    /* invalid_id */
    {"empty event_id",
     "{'type':'custom_tool_call','event_id':'','request_id':'r1',"
     "'user_id':'u1','tool_name':'t'}",
     BW_EVR_INVALID_ID, "event_id: must not be empty"},
    {"empty idempotency_key", TOOL(",'idempotency_key':''"), BW_EVR_INVALID_ID,
     "idempotency_key: must not be empty"},
    {"id with \\u0001",
     "{'type':'custom_tool_call','event_id':'e\\u0001','request_id':'r1',"
     "'user_id':'u1','tool_name':'t'}",
     BW_EVR_INVALID_ID, "event_id: control character at byte 1"},
    {"id with raw tab",
     "{'type':'custom_tool_call','event_id':'e1','request_id':'r\t1',"
     "'user_id':'u1','tool_name':'t'}",
     BW_EVR_INVALID_JSON, NULL}, /* raw control bytes in strings are not JSON at all */
    {"id with DEL", TOOL(",'session_id':'s\\u007f'"), BW_EVR_INVALID_ID,
     "session_id: control character"},
    {"id with DEL raw", TOOL(",'session_id':'s\x7f'"), BW_EVR_INVALID_ID,
     "session_id: control character"},
    {"id with C1 U+0080", TOOL(",'org_id':'o\\u0080'"), BW_EVR_INVALID_ID,
     "org_id: control character at byte 1"},
    {"id with C1 U+009F raw", TOOL(",'org_id':'o\xc2\x9f'"), BW_EVR_INVALID_ID,
     "org_id: control character"},
    {"id number", TOOL(",'idempotency_key':7"), BW_EVR_WRONG_TYPE,
     "idempotency_key: must be a string"},
    {"ce empty id", "{'specversion':'1.0','id':'','type':'custom_tool_call','data':{}}",
     BW_EVR_INVALID_ID, "id: must not be empty"},
    /* unknown_type */
    {"unknown type", "{'type':'custom_foo','event_id':'e1','request_id':'r1','user_id':'u1'}",
     BW_EVR_UNKNOWN_TYPE, "type: not custom_model_call"},
    {"empty type", "{'type':'','event_id':'e1','request_id':'r1','user_id':'u1'}",
     BW_EVR_UNKNOWN_TYPE, NULL},
    {"type case", "{'type':'Custom_Model_Call','event_id':'e1','request_id':'r1','user_id':'u1'}",
     BW_EVR_UNKNOWN_TYPE, NULL},
    {"type prefix",
     "{'type':'custom_model_call_v2','event_id':'e1','request_id':'r1',"
     "'user_id':'u1'}",
     BW_EVR_UNKNOWN_TYPE, NULL},
    /* dotted types are only a CloudEvents convention */
    {"native dotted type",
     "{'type':'com.x.custom_model_call','event_id':'e1','request_id':'r1',"
     "'user_id':'u1','model':'m'}",
     BW_EVR_UNKNOWN_TYPE, NULL},
    {"ce unknown segment", "{'specversion':'1.0','id':'c','type':'com.x.custom_foo','data':{}}",
     BW_EVR_UNKNOWN_TYPE, NULL},
    {"ce trailing dot",
     "{'specversion':'1.0','id':'c','type':'com.x.custom_tool_call.',"
     "'data':{}}",
     BW_EVR_UNKNOWN_TYPE, NULL},
};

static void test_rejections(void **state)
{
    for (size_t i = 0; i < sizeof(reject_cases) / sizeof(reject_cases[0]); i++) {
        const reject_case *c = &reject_cases[i];
        const char *json = sq(c->json);
        expect_reject_raw(c->name, json, strlen(json), MAX_BYTES, c->reason, c->msg);
    }
}

/* ---- size and nesting limits ------------------------------------------------ */

static void test_too_large(void **state)
{
    const char *json = sq(TOOL(""));
    size_t len = strlen(json);
    bw_event ev;

    /* a payload of exactly max_bytes is accepted, one byte more is not */
    assert_int_equal(parse_n(json, len, len, &ev, NULL, 0), BW_EVR_OK);
    expect_reject_raw("max - 1", json, len, len - 1, BW_EVR_TOO_LARGE, "exceeds the limit");
    /* checked before parsing: garbage over the limit is too_large, not invalid_json */
    expect_reject_raw("garbage", "\xff\xff\xff\xff", 4, 3, BW_EVR_TOO_LARGE, NULL);
    expect_reject_raw("empty", "", 0, MAX_BYTES, BW_EVR_INVALID_JSON, "empty");
}

/* A tool call whose unknown field "x" holds @p depth - 1 nested arrays (depth counts the root). */
static const char *nested(int depth)
{
    static char buf[512];
    int n = snprintf(buf, sizeof(buf), "%s", sq(TOOL(",'x':")));

    n--; /* drop the closing brace of TOOL() */
    for (int i = 1; i < depth; i++)
        buf[n++] = '[';
    for (int i = 1; i < depth; i++)
        buf[n++] = ']';
    buf[n++] = '}';
    buf[n] = '\0';
    return buf;
}

static void test_nesting(void **state)
{
    const char *json;
    bw_event ev;

    parse_ok_raw(nested(32), &ev); /* 32 levels are allowed */
    json = nested(33);
    expect_reject_raw("33 deep", json, strlen(json), MAX_BYTES, BW_EVR_INVALID_JSON,
                      "nesting deeper than 32");
    json = nested(40);
    expect_reject_raw("40 deep", json, strlen(json), MAX_BYTES, BW_EVR_INVALID_JSON,
                      "nesting deeper than 32");
    /* brackets inside strings, also after an escaped quote, do not count */
    parse_ok(TOOL(",'x':'[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[','y':'\\\\','z':'\\'"
                  "{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{'"),
             &ev);
    /* 40 unclosed openers with nothing else: refused by the scan, cheaply */
    expect_reject_raw("40 openers", "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", 40, MAX_BYTES,
                      BW_EVR_INVALID_JSON, "nesting");
}

/* ---- identifiers and names at their limits ------------------------------------ */

static void test_length_limits(void **state)
{
    char id[BW_ID_MAX + 2], name[BW_NAME_MAX + 2], json[1024];
    bw_event ev;

    memset(id, 'i', sizeof(id) - 1);
    id[sizeof(id) - 1] = '\0';
    memset(name, 'n', sizeof(name) - 1);
    name[sizeof(name) - 1] = '\0';

    /* 128-byte id and 256-byte model name are the largest accepted */
    snprintf(json, sizeof(json),
             "{\"type\":\"custom_model_call\",\"event_id\":\"%.128s\",\"request_id\":\"r\","
             "\"user_id\":\"u\",\"model\":\"%.256s\",\"provider\":\"%.256s\"}",
             id, name, name);
    parse_ok_raw(json, &ev);
    assert_int_equal(strlen(ev.event_id), BW_ID_MAX);
    assert_int_equal(strlen(ev.name), BW_NAME_MAX);
    assert_int_equal(strlen(ev.provider), BW_NAME_MAX);

    /* 129 bytes: invalid_id */
    snprintf(json, sizeof(json),
             "{\"type\":\"custom_tool_call\",\"event_id\":\"e\",\"request_id\":\"%s\","
             "\"user_id\":\"u\",\"tool_name\":\"t\"}",
             id);
    expect_reject_raw("129-byte id", json, strlen(json), MAX_BYTES, BW_EVR_INVALID_ID,
                      "request_id: longer than 128 bytes (129)");

    /* 127 x 'i' + U+00E9 (2 bytes) = 129 bytes although 128 characters */
    snprintf(json, sizeof(json),
             "{\"type\":\"custom_tool_call\",\"event_id\":\"e\",\"request_id\":\"r\","
             "\"user_id\":\"%.127s\\u00e9\",\"tool_name\":\"t\"}",
             id);
    expect_reject_raw("129 bytes in 128 chars", json, strlen(json), MAX_BYTES, BW_EVR_INVALID_ID,
                      "user_id: longer than 128 bytes");

    /* 257-byte names: invalid_value, never truncated */
    snprintf(json, sizeof(json),
             "{\"type\":\"custom_tool_call\",\"event_id\":\"e\",\"request_id\":\"r\","
             "\"user_id\":\"u\",\"tool_name\":\"%s\"}",
             name);
    expect_reject_raw("257-byte tool_name", json, strlen(json), MAX_BYTES, BW_EVR_INVALID_VALUE,
                      "tool_name: longer than 256 bytes (257)");
    snprintf(json, sizeof(json),
             "{\"type\":\"custom_model_call\",\"event_id\":\"e\",\"request_id\":\"r\","
             "\"user_id\":\"u\",\"model\":\"m\",\"node_name\":\"%s\"}",
             name);
    expect_reject_raw("257-byte node_name", json, strlen(json), MAX_BYTES, BW_EVR_INVALID_VALUE,
                      "node_name: longer than 256 bytes");
}

static void test_identifier_characters(void **state)
{
    bw_event ev;

    /* non-ASCII is fine: U+00A0 is the first code point after C1, U+1F600 is 4 bytes */
    parse_ok(TOOL(",'session_id':'\\u00a0','org_id':'\xf0\x9f\x98\x80','idempotency_key':"
                  "'call_{abc}:1/2 x'"),
             &ev);
    assert_string_equal(ev.session_id, "\xc2\xa0");
    assert_string_equal(ev.org_id, "\xf0\x9f\x98\x80");
    assert_string_equal(ev.idempotency_key, "call_{abc}:1/2 x");
    /* an escaped slash and quote decode to the bytes they stand for */
    parse_ok(TOOL(",'session_id':'a\\/b\\'c'"), &ev);
    assert_string_equal(ev.session_id, "a/b\"c");
}

/* ---- optional fields, defaults, dedup key ------------------------------------ */

static void test_null_optionals(void **state)
{
    bw_event ev;

    /* null counts as absent for every optional field */
    parse_ok(MODEL(",'idempotency_key':null,'session_id':null,'org_id':null,'provider':null,"
                   "'node_name':null,'status':null,'usage':null,'timestamp':null,"
                   "'specversion':null"),
             &ev);
    assert_string_equal(ev.idempotency_key, "");
    assert_string_equal(ev.session_id, "");
    assert_string_equal(ev.org_id, "");
    assert_string_equal(ev.provider, "");
    assert_string_equal(ev.node_name, "");
    assert_int_equal(ev.failed, 0);
    assert_int_equal(ev.usage_shape, BW_USAGE_NONE);
    assert_int_equal(ev.has_timestamp, 0);
    assert_string_equal(bw_event_dedup_key(&ev), "e1");

    parse_ok(TOOL(",'units':null,'duration_ms':null"), &ev);
    assert_int_equal(ev.units, 1);
    assert_int_equal(ev.duration_ms, 0);

    /* expected: null is absent; an empty object is present with zero counts */
    parse_ok(FIN(",'expected':null,'status':null"), &ev);
    assert_int_equal(ev.has_expected, 0);
    assert_string_equal(ev.final_status, "completed");
    parse_ok(FIN(",'expected':{'tool_calls':2,'model_calls':null}"), &ev);
    assert_int_equal(ev.has_expected, 1);
    assert_int_equal(ev.expected_model_calls, 0);
    assert_int_equal(ev.expected_tool_calls, 2);

    /* an empty provider is the same as none */
    parse_ok(MODEL(",'provider':''"), &ev);
    assert_string_equal(ev.provider, "");
}

static void test_dedup_key(void **state)
{
    bw_event ev;

    parse_ok(TOOL(",'idempotency_key':'call_1'"), &ev);
    assert_string_equal(ev.event_id, "e1");
    assert_string_equal(bw_event_dedup_key(&ev), "call_1"); /* idempotency_key wins */
    parse_ok(TOOL(""), &ev);
    assert_string_equal(bw_event_dedup_key(&ev), "e1"); /* else event_id */
}

static void test_fields(void **state)
{
    bw_event ev;

    /* model call: status error sets failed, all common ids carried */
    parse_ok(MODEL(",'status':'error','provider':'openai','session_id':'s1','org_id':'o1',"
                   "'unknown':{'deep':[1,{'x':null}]}"),
             &ev);
    assert_int_equal(ev.failed, 1);
    assert_string_equal(ev.provider, "openai");
    assert_string_equal(ev.session_id, "s1");
    assert_string_equal(ev.org_id, "o1");

    /* tool call: units at both limits, duration, failed */
    parse_ok(TOOL(",'units':1000000,'duration_ms':1250,'status':'error'"), &ev);
    assert_int_equal(ev.units, 1000000);
    assert_int_equal(ev.duration_ms, 1250);
    assert_int_equal(ev.failed, 1);
    parse_ok(TOOL(",'units':1,'status':'completed'"), &ev);
    assert_int_equal(ev.units, 1);
    assert_int_equal(ev.failed, 0);

    /* finalize statuses; failed stays 0 (it is for usage events) */
    parse_ok(FIN(",'status':'error'"), &ev);
    assert_string_equal(ev.final_status, "error");
    assert_int_equal(ev.failed, 0);
    parse_ok(FIN(",'status':'cancelled','expected':{'model_calls':0,'tool_calls':0}"), &ev);
    assert_string_equal(ev.final_status, "cancelled");
    assert_int_equal(ev.has_expected, 1);

    /* finalize ignores model-call fields it does not define */
    parse_ok(FIN(",'usage':'not checked','model':5"), &ev);
    assert_int_equal(ev.usage_shape, BW_USAGE_NONE);
}

static void test_timestamps(void **state)
{
    bw_event ev;

    parse_ok(TOOL(",'timestamp':'2026-12-03T10:00:00Z'"), &ev);
    assert_int_equal(ev.has_timestamp, 1);
    assert_int_equal(ev.timestamp_ms, 1796292000000LL);
    /* 10:00:00.123+01:00 is 09:00:00.123Z: one hour less, plus 123 ms */
    parse_ok(TOOL(",'timestamp':'2026-12-03T10:00:00.123+01:00'"), &ev);
    assert_int_equal(ev.timestamp_ms, 1796288400123LL);
    parse_ok(TOOL(",'timestamp':1796292000000"), &ev);
    assert_int_equal(ev.timestamp_ms, 1796292000000LL);
    parse_ok(TOOL(",'timestamp':0"), &ev); /* the epoch itself */
    assert_int_equal(ev.has_timestamp, 1);
    assert_int_equal(ev.timestamp_ms, 0);
}

/* ---- reuse and strings ------------------------------------------------------- */

static void test_reuse_after_error(void **state)
{
    char err[256];
    bw_event ev;
    const char *json;

    /* a failed parse leaves ev reusable and the next success clears err */
    json = sq(USAGE("{'input_tokens':-1}"));
    assert_int_equal(parse_n(json, strlen(json), MAX_BYTES, &ev, err, sizeof(err)),
                     BW_EVR_INVALID_VALUE);
    assert_true(err[0] != '\0');
    json = sq(TOOL(""));
    assert_int_equal(parse_n(json, strlen(json), MAX_BYTES, &ev, err, sizeof(err)), BW_EVR_OK);
    assert_string_equal(err, "");
    assert_int_equal(ev.usage_shape, BW_USAGE_NONE);
    assert_int_equal(ev.usage.input, 0);

    /* a tiny error buffer truncates, a NULL one is allowed */
    json = sq("{}");
    assert_int_equal(parse_n(json, strlen(json), MAX_BYTES, &ev, err, 5), BW_EVR_MISSING_FIELD);
    assert_string_equal(err, "type");
    assert_int_equal(parse_n(json, strlen(json), MAX_BYTES, &ev, NULL, 0), BW_EVR_MISSING_FIELD);
}

static void test_strings(void **state)
{
    static const char *const want[] = {
        "ok",         "too_large",     "invalid_json", "not_object",   "missing_field",
        "wrong_type", "invalid_value", "invalid_id",   "unknown_type", "user_mismatch"};
    for (int r = BW_EVR_OK; r <= BW_EVR_USER_MISMATCH; r++)
        assert_string_equal(bw_event_reason_str((bw_event_reason)r), want[r]);
    assert_string_equal(bw_event_reason_str((bw_event_reason)99), "unknown");
    assert_string_equal(bw_event_type_str(BW_EV_MODEL), "custom_model_call");
    assert_string_equal(bw_event_type_str(BW_EV_TOOL), "custom_tool_call");
    assert_string_equal(bw_event_type_str(BW_EV_FINALIZE), "request_finalize");
    assert_string_equal(bw_event_type_str(BW_EV_NONE), "none");
}

/* ---- the fuzz seed corpus: "<reason>--<what>.json" must parse to <reason> ------ */

static void test_seed_corpus(void **state)
{
    static char buf[2 * MAX_BYTES];
    const char *dir = BW_SOURCE_DIR "/tests/fuzz/seed";
    char path[1024], err[256];
    struct dirent *de;
    int seen = 0;
    DIR *d = opendir(dir);

    assert_non_null(d);
    while ((de = readdir(d)) != NULL) {
        const char *sep = strstr(de->d_name, "--");
        bw_event ev;
        bw_event_reason r;
        size_t len;
        FILE *f;

        if (de->d_name[0] == '.')
            continue;
        if (!sep)
            fail_msg("seed %s: name is not <reason>--<what>.json", de->d_name);
        snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
        f = fopen(path, "rb");
        assert_non_null(f);
        len = fread(buf, 1, sizeof(buf), f);
        fclose(f);
        r = parse_n(buf, len, MAX_BYTES, &ev, err, sizeof(err));
        if (strncmp(bw_event_reason_str(r), de->d_name, (size_t)(sep - de->d_name)) != 0 ||
            strlen(bw_event_reason_str(r)) != (size_t)(sep - de->d_name))
            fail_msg("seed %s: got %s (%s)", de->d_name, bw_event_reason_str(r), err);
        seen++;
    }
    closedir(d);
    assert_true(seen >= 20);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_section3_examples),
        cmocka_unit_test(test_usage_shapes),
        cmocka_unit_test(test_cloudevents),
        cmocka_unit_test(test_rejections),
        cmocka_unit_test(test_too_large),
        cmocka_unit_test(test_nesting),
        cmocka_unit_test(test_length_limits),
        cmocka_unit_test(test_identifier_characters),
        cmocka_unit_test(test_null_optionals),
        cmocka_unit_test(test_dedup_key),
        cmocka_unit_test(test_fields),
        cmocka_unit_test(test_timestamps),
        cmocka_unit_test(test_reuse_after_error),
        cmocka_unit_test(test_strings),
        cmocka_unit_test(test_seed_corpus),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

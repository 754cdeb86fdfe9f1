/*
 * test_config.c - the configuration file (PRODUCT.md section 10): values,
 * defaults, "file:line: message" errors, BW_<GROUP>_<KEY> overrides.
 *
 * Each test writes its own file with mkstemp. Line numbers expected in
 * errors are counted in the literal: one "\n" per line, noted at the end
 * of each line in a comment.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "bw_config.h"

extern char **environ;

/* A valid pricing group, appended after the lines under test so it never
 * shifts their line numbers. */
#define PRICING                                                                                    \
    "pricing = {\n"                                                                                \
    "  version = \"test-1\";\n"                                                                    \
    "  credit_usd = 0.002;\n"                                                                      \
    "  models = ( { match = \"*\"; credits_per_call = 1; } );\n"                                   \
    "  tools = ( { match = \"*\"; credits_per_call = 2.0; } );\n"                                  \
    "};\n"

/* Write @p text to a new temporary file; its name goes to @p path. */
static void write_cfg(const char *text, char *path, size_t size)
{
    int fd;
    size_t len = strlen(text);

    snprintf(path, size, "/tmp/bw-test-config-XXXXXX");
    fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, len), (ssize_t)len);
    close(fd);
}

/* Load @p text as a config file; the temporary file is removed again. */
static int load_text(const char *text, int pricing_only, bw_config **cfg, char *path,
                     size_t pathsize, char *err, size_t errsize)
{
    int rc;

    write_cfg(text, path, pathsize);
    err[0] = '\0';
    rc = bw_config_load(path, pricing_only, cfg, err, errsize);
    unlink(path);
    return rc;
}

/* Loading @p text fails with exactly "<file>:<line>: <msg>". */
static void expect_error(const char *text, int line, const char *msg)
{
    char path[64], err[512], want[600];
    bw_config *cfg = (bw_config *)1;

    assert_int_equal(load_text(text, 0, &cfg, path, sizeof(path), err, sizeof(err)), -1);
    assert_null(cfg);
    snprintf(want, sizeof(want), "%s:%d: %s", path, line, msg);
    assert_string_equal(err, want);
}

/* Loading @p text (with the environment as set) fails with exactly @p msg. */
static void expect_env_error(const char *text, const char *msg)
{
    char path[64], err[512];
    bw_config *cfg = (bw_config *)1;

    assert_int_equal(load_text(text, 0, &cfg, path, sizeof(path), err, sizeof(err)), -1);
    assert_null(cfg);
    assert_string_equal(err, msg);
}

/* No BW_* variable of the environment running the tests may leak in. */
static int clear_bw_env(void **state)
{
    (void)state;
    for (;;) {
        char name[256];
        char **e;
        for (e = environ; *e; e++)
            if (strncmp(*e, "BW_", 3) == 0)
                break;
        if (!*e)
            return 0;
        snprintf(name, sizeof(name), "%.*s", (int)strcspn(*e, "="), *e);
        unsetenv(name);
    }
}

static const char full_cfg[] =
    "# every key, none at its default\n"                                                /* 1 */
    "kafka = {\n"                                                                       /* 2 */
    "  brokers = \"k1:9092,k2:9092\";\n"                                                /* 3 */
    "  group_id = \"bw-test\";\n"                                                       /* 4 */
    "  topics = [ \"t.a\", \"t.b\" ];\n"                                                /* 5 */
    "  settlements_topic = \"t.settle\";\n"                                             /* 6 */
    "  dlq_topic = \"t.dlq\";\n"                                                        /* 7 */
    "  properties = [ \"security.protocol=SASL_SSL\", \"sasl.mechanisms=PLAIN\" ];\n"   /* 8 */
    "};\n"                                                                              /* 9 */
    "redis = { url = \"unix:///run/redis.sock\"; };\n"                                  /* 10 */
    "dedup = { retention = \"3d\"; };\n"                                                /* 11 */
    "wallet = { url = \"https://wallet.example:8443\";\n"                               /* 12 */
    "  consume_path = \"/w/{user_id}/consume\"; timeout = \"250ms\"; };\n"              /* 13 */
    "user_service = { url = \"consul://user-service\"; record_path = \"/u/records\";\n" /* 14 */
    "  consume_path = \"/u/{user_id}/consume\"; timeout = \"2s\"; };\n"                 /* 15 */
    "tls = { ca_file = \"/etc/ca.pem\"; cert_file = \"/etc/c.pem\"; key_file = \"/etc/k.pem\"; "
    "};\n"                                                             /* 16 */
    "consul = { url = \"http://consul:8500\"; refresh = \"20s\"; };\n" /* 17 */
    "auth = { token_file = \"/run/secrets/token\"; };\n"               /* 18 */
    "settle = { service_name = \"bw-x\"; finalize_grace = \"0ms\"; request_timeout = \"2h\";\n"
    "  late_policy = \"record\"; max_attempts = 9; retry_max_interval = \"2m\";\n" /* 20 */
    "  breaker_failures = 3; breaker_cooldown = \"45s\"; };\n"                     /* 21 */
    "http = { listen = \"0.0.0.0:9999\"; };\n"                                     /* 22 */
    "limits = { max_event_bytes = 1048576; };\n"                                   /* 23 */
    "log = { level = \"debug\"; format = \"logfmt\"; };\n"                         /* 24 */
    "shutdown_timeout = \"20s\";\n"                                                /* 25 */
    PRICING;

static void test_full_file(void **state)
{
    char path[64], err[512];
    bw_config *cfg = NULL;

    (void)state;
    assert_int_equal(load_text(full_cfg, 0, &cfg, path, sizeof(path), err, sizeof(err)), 0);
    assert_non_null(cfg);
    assert_string_equal(cfg->path, path);
    assert_int_equal(cfg->has_kafka, 1);
    assert_string_equal(cfg->brokers, "k1:9092,k2:9092");
    assert_string_equal(cfg->group_id, "bw-test");
    assert_int_equal(cfg->n_topics, 2);
    assert_string_equal(cfg->topics[0], "t.a");
    assert_string_equal(cfg->topics[1], "t.b");
    assert_string_equal(cfg->settlements_topic, "t.settle");
    assert_string_equal(cfg->dlq_topic, "t.dlq");
    assert_int_equal(cfg->n_properties, 2);
    assert_string_equal(cfg->properties[0], "security.protocol=SASL_SSL");
    assert_string_equal(cfg->properties[1], "sasl.mechanisms=PLAIN");
    assert_string_equal(cfg->redis_url, "unix:///run/redis.sock");
    assert_int_equal(cfg->dedup_retention_ms, 3LL * 86400 * 1000);
    assert_string_equal(cfg->wallet.url, "https://wallet.example:8443");
    assert_string_equal(cfg->wallet.consume_path, "/w/{user_id}/consume");
    assert_null(cfg->wallet.record_path);
    assert_int_equal(cfg->wallet.timeout_ms, 250);
    assert_string_equal(cfg->user_service.url, "consul://user-service");
    assert_string_equal(cfg->user_service.record_path, "/u/records");
    assert_string_equal(cfg->user_service.consume_path, "/u/{user_id}/consume");
    assert_int_equal(cfg->user_service.timeout_ms, 2000);
    assert_string_equal(cfg->tls_ca_file, "/etc/ca.pem");
    assert_string_equal(cfg->tls_cert_file, "/etc/c.pem");
    assert_string_equal(cfg->tls_key_file, "/etc/k.pem");
    assert_string_equal(cfg->consul_url, "http://consul:8500");
    assert_int_equal(cfg->consul_refresh_ms, 20000);
    assert_null(cfg->jwt_secret_file);
    assert_string_equal(cfg->token_file, "/run/secrets/token");
    assert_string_equal(cfg->service_name, "bw-x");
    assert_int_equal(cfg->finalize_grace_ms, 0);
    assert_int_equal(cfg->request_timeout_ms, 2LL * 3600 * 1000);
    assert_int_equal(cfg->late_policy_adjust, 0);
    assert_int_equal(cfg->max_attempts, 9);
    assert_int_equal(cfg->retry_max_interval_ms, 120000);
    assert_int_equal(cfg->breaker_failures, 3);
    assert_int_equal(cfg->breaker_cooldown_ms, 45000);
    assert_string_equal(cfg->http_listen, "0.0.0.0:9999");
    assert_int_equal(cfg->max_event_bytes, 1048576);
    assert_string_equal(cfg->log_level, "debug");
    assert_string_equal(cfg->log_format, "logfmt");
    assert_int_equal(cfg->shutdown_timeout_ms, 20000);
    assert_non_null(cfg->pricing);
    assert_string_equal(cfg->pricing->version, "test-1");
    bw_config_free(cfg);
}

static void check_defaults(const bw_config *cfg)
{
    assert_string_equal(cfg->brokers, "127.0.0.1:9092");
    assert_string_equal(cfg->group_id, "billing-worker");
    assert_int_equal(cfg->n_topics, 1);
    assert_string_equal(cfg->topics[0], "agent.billing.events");
    assert_string_equal(cfg->settlements_topic, "agent.billing.settlements");
    assert_string_equal(cfg->dlq_topic, "agent.billing.dlq");
    assert_int_equal(cfg->n_properties, 0);
    assert_string_equal(cfg->redis_url, "redis://127.0.0.1:6379/0");
    assert_int_equal(cfg->dedup_retention_ms, 7LL * 86400 * 1000);
    assert_string_equal(cfg->wallet.url, "http://127.0.0.1:8208");
    assert_string_equal(cfg->wallet.consume_path, "/api/v1/users/{user_id}/credits/consume");
    assert_int_equal(cfg->wallet.timeout_ms, 3000);
    assert_string_equal(cfg->user_service.url, "http://127.0.0.1:8202");
    assert_string_equal(cfg->user_service.record_path, "/api/v1/usage/records");
    assert_string_equal(cfg->user_service.consume_path, "/api/v1/users/{user_id}/credits/consume");
    assert_int_equal(cfg->user_service.timeout_ms, 3000);
    assert_null(cfg->tls_ca_file);
    assert_null(cfg->tls_cert_file);
    assert_null(cfg->tls_key_file);
    assert_string_equal(cfg->consul_url, "http://127.0.0.1:8500");
    assert_int_equal(cfg->consul_refresh_ms, 10000);
    assert_null(cfg->jwt_secret_file);
    assert_null(cfg->token_file);
    assert_string_equal(cfg->service_name, "billing-worker");
    assert_int_equal(cfg->finalize_grace_ms, 5000);
    assert_int_equal(cfg->request_timeout_ms, 15 * 60 * 1000);
    assert_int_equal(cfg->late_policy_adjust, 1);
    assert_int_equal(cfg->max_attempts, 5);
    assert_int_equal(cfg->retry_max_interval_ms, 60000);
    assert_int_equal(cfg->breaker_failures, 5);
    assert_int_equal(cfg->breaker_cooldown_ms, 30000);
    assert_string_equal(cfg->http_listen, "127.0.0.1:9464");
    assert_int_equal(cfg->max_event_bytes, 65536);
    assert_string_equal(cfg->log_level, "info");
    assert_string_equal(cfg->log_format, "json");
    assert_int_equal(cfg->shutdown_timeout_ms, 10000);
    assert_non_null(cfg->pricing);
}

static void test_defaults(void **state)
{
    char path[64], err[512];
    bw_config *cfg = NULL;

    (void)state;
    /* Empty groups count as present but set nothing. */
    assert_int_equal(load_text("kafka = { };\nsettle = { };\n" PRICING, 0, &cfg, path, sizeof(path),
                               err, sizeof(err)),
                     0);
    assert_int_equal(cfg->has_kafka, 1);
    check_defaults(cfg);
    bw_config_free(cfg);
}

static void test_pricing_only(void **state)
{
    char path[64], err[512];
    bw_config *cfg = NULL;

    (void)state;
    assert_int_equal(load_text(PRICING, 1, &cfg, path, sizeof(path), err, sizeof(err)), 0);
    assert_int_equal(cfg->has_kafka, 0);
    check_defaults(cfg);
    bw_config_free(cfg);

    /* `run` takes such a file too (all defaults), has_kafka says so. */
    cfg = NULL;
    assert_int_equal(load_text(PRICING, 0, &cfg, path, sizeof(path), err, sizeof(err)), 0);
    assert_int_equal(cfg->has_kafka, 0);
    bw_config_free(cfg);
}

static void test_single_topic_and_unset_strings(void **state)
{
    char path[64], err[512];
    bw_config *cfg = NULL;

    (void)state;
    assert_int_equal(load_text("kafka = { topic = \"only.one\"; properties = ( ); };\n"
                               "tls = { ca_file = \"\"; };\n"
                               "auth = { jwt_secret_file = \"/run/secrets/bw-jwt\"; };\n"
                               "user_service = { url = \"https://users\"; };\n" PRICING,
                               0, &cfg, path, sizeof(path), err, sizeof(err)),
                     0);
    assert_int_equal(cfg->n_topics, 1);
    assert_string_equal(cfg->topics[0], "only.one");
    assert_int_equal(cfg->n_properties, 0);
    assert_null(cfg->tls_ca_file); /* "" means unset */
    assert_string_equal(cfg->jwt_secret_file, "/run/secrets/bw-jwt");
    assert_null(cfg->token_file);
    assert_string_equal(cfg->user_service.url, "https://users");
    bw_config_free(cfg);
}

static void test_err_syntax(void **state)
{
    char path[64], err[512], want[128];
    bw_config *cfg = (bw_config *)1;

    (void)state;
    assert_int_equal(load_text("# comment\n"     /* 1 */
                               "kafka = {\n"     /* 2 */
                               "  brokers = ;\n" /* 3 */
                               "};\n" PRICING,
                               0, &cfg, path, sizeof(path), err, sizeof(err)),
                     -1);
    assert_null(cfg);
    snprintf(want, sizeof(want), "%s:3: ", path);
    assert_memory_equal(err, want, strlen(want));
    assert_non_null(strstr(err, "syntax error"));
}

static void test_err_missing_file(void **state)
{
    char err[512];
    bw_config *cfg = (bw_config *)1;

    (void)state;
    assert_int_equal(bw_config_load("/nonexistent/bw.cfg", 0, &cfg, err, sizeof(err)), -1);
    assert_null(cfg);
    assert_string_equal(err, "/nonexistent/bw.cfg: cannot read: No such file or directory");
}

static void test_err_unknown(void **state)
{
    (void)state;
    expect_error("kafka = {\n"                  /* 1 */
                 "  brokers = \"b:9092\";\n"    /* 2 */
                 "  brokerz = \"typo:9092\";\n" /* 3 */
                 "};\n" PRICING,
                 3, "kafka.brokerz: unknown setting");
    expect_error("kafka = { };\n" /* 1 */
                 "\n"             /* 2 */
                 "kafak = { brokers = \"b\"; };\n" PRICING,
                 3, "kafak: unknown setting");
    expect_error("shutdown_timeout = \"1s\";\n" /* 1 */
                 "shutdown_timeuot = \"1s\";\n" PRICING,
                 2, "shutdown_timeuot: unknown setting");
    expect_error("log = \"debug\";\n" PRICING, 1, "log: must be a group { ... }");
    expect_error(PRICING "pricing2 = { };\n", 7, "pricing2: unknown setting");
}

static void test_err_wrong_type(void **state)
{
    (void)state;
    expect_error("\n"                   /* 1 */
                 "kafka = {\n"          /* 2 */
                 "  group_id = \"\";\n" /* 3 */
                 "};\n" PRICING,
                 3, "kafka.group_id: must be a non-empty string");
    expect_error("kafka = { group_id = 5; };\n" PRICING, 1, "kafka.group_id: must be a string");
    expect_error("settle = {\n"                 /* 1 */
                 "  max_attempts = \"five\";\n" /* 2 */
                 "};\n" PRICING,
                 2, "settle.max_attempts: must be an integer");
    expect_error("settle = { service_name = \"x\";\n"  /* 1 */
                 "  max_attempts = 2.5; };\n" PRICING, /* 2 */
                 2, "settle.max_attempts: must be an integer");
    expect_error("settle = { max_attempts = 0; };\n" PRICING, 1,
                 "settle.max_attempts: must be an integer >= 1");
    expect_error("kafka = { topics = \"t\"; };\n" PRICING, 1,
                 "kafka.topics: must be a list of strings");
    expect_error("kafka = { topics = [ ]; };\n" PRICING, 1,
                 "kafka.topics: must hold 1 to 16 entries");
    expect_error("kafka = {\n"             /* 1 */
                 "  topic = \"a\";\n"      /* 2 */
                 "  topics = [ \"b\" ];\n" /* 3 */
                 "};\n" PRICING,
                 3, "kafka.topics: give either topic or topics, not both");
}

static void test_err_duration(void **state)
{
    (void)state;
    expect_error("wallet = {\n"            /* 1 */
                 "  url = \"http://w\";\n" /* 2 */
                 "  timeout = 3;\n"        /* 3 */
                 "};\n" PRICING,
                 3,
                 "wallet.timeout: must be a duration string with a unit (ms, s, m, h, d), "
                 "like \"5s\"");
    expect_error("dedup = { retention = \"7 days\"; };\n" PRICING, 1,
                 "dedup.retention: must be a duration with a unit (ms, s, m, h, d), like \"5s\"");
    expect_error("\n\nshutdown_timeout = \"0s\";\n" PRICING, 3,
                 "shutdown_timeout: must be a duration greater than 0");
}

static void test_err_late_policy(void **state)
{
    (void)state;
    expect_error("settle = {\n"                  /* 1 */
                 "  service_name = \"bw\";\n"    /* 2 */
                 "  late_policy = \"ignore\";\n" /* 3 */
                 "};\n" PRICING,
                 3, "settle.late_policy: must be adjust or record");
}

static void test_err_missing_pricing(void **state)
{
    (void)state;
    expect_error("kafka = { brokers = \"b:9092\"; };\n", 1, "pricing: missing");
    expect_error("kafka = { };\npricing = 5;\n", 2, "pricing: must be a group { ... }");
}

static void test_err_properties(void **state)
{
    (void)state;
    /* libconfig records an element's line once it has read the token after
     * it: the "," here, so the bad entry is followed by one on its line. */
    expect_error("kafka = {\n"                      /* 1 */
                 "  properties = [\n"               /* 2 */
                 "    \"security.protocol=SSL\",\n" /* 3 */
                 "    \"sasl.mechanisms\",\n"       /* 4 */
                 "    \"sasl.username=u\"\n"        /* 5 */
                 "  ];\n"                           /* 6 */
                 "};\n" PRICING,
                 4, "kafka.properties[1]: must be \"key=value\"");
    expect_error("kafka = { properties = ( \"=x\" ); };\n" PRICING, 1,
                 "kafka.properties[0]: must be \"key=value\"");
    /* librdkafka's own verdict, so that check-config catches what run would */
    expect_error("kafka = {\n"                     /* 1 */
                 "  properties = [\n"              /* 2 */
                 "    \"fetch.wait.max.ms=10\",\n" /* 3 */
                 "    \"no.such.property=1\",\n"   /* 4 */
                 "    \"client.id=x\"\n"           /* 5 */
                 "  ];\n"                          /* 6 */
                 "};\n" PRICING,
                 4, "kafka.properties[1]: No such configuration property: \"no.such.property\"");
    expect_error(
        "kafka = { properties = ( \"fetch.wait.max.ms=soon\", \"client.id=x\" ); };\n" PRICING, 1,
        "kafka.properties[0]: Invalid value for configuration property \"fetch.wait.max.ms\"");
}

static void test_err_max_event_bytes(void **state)
{
    (void)state;
    expect_error("log = { level = \"info\"; };\n" /* 1 */
                 "limits = {\n"                   /* 2 */
                 "  max_event_bytes = 0;\n"       /* 3 */
                 "};\n" PRICING,
                 3, "limits.max_event_bytes: must be an integer in 1..1048576");
    expect_error("limits = { max_event_bytes = 1048577; };\n" PRICING, 1,
                 "limits.max_event_bytes: must be an integer in 1..1048576");
}

static void test_err_values(void **state)
{
    (void)state;
    expect_error("redis = { url = \"http://127.0.0.1:6379\"; };\n" PRICING, 1,
                 "redis.url: must start with redis://, redis+cluster:// or unix://");
    expect_error("redis = { url = \"redis+cluster://10.0.0.1:7000?buckets=0\"; };\n" PRICING, 1,
                 "redis.url: redis+cluster:// takes only ?buckets=1..1024");
    expect_error("redis = { url = \"redis+cluster://10.0.0.1:7000?buckets=12abc\"; };\n" PRICING, 1,
                 "redis.url: redis+cluster:// takes only ?buckets=1..1024");
    expect_error("redis = { url = \"redis+cluster://10.0.0.1:7000?bucket=8\"; };\n" PRICING, 1,
                 "redis.url: redis+cluster:// takes only ?buckets=1..1024");
    expect_error("wallet = { consume_path = \"/api/v1/consume\"; };\n" PRICING, 1,
                 "wallet.consume_path: must be a path starting with '/' that contains {user_id}");
    expect_error("user_service = {\n"                 /* 1 */
                 "  record_path = \"api/records\";\n" /* 2 */
                 "};\n" PRICING,
                 2, "user_service.record_path: must be a path starting with '/'");
    expect_error("wallet = { url = \"127.0.0.1:8208\"; };\n" PRICING, 1,
                 "wallet.url: must be an http:// or https:// URL, or consul://service-name");
    expect_error("consul = { url = \"consul://x\"; };\n" PRICING, 1,
                 "consul.url: must be an http:// or https:// URL");
    expect_error("http = { listen = \"9464\"; };\n" PRICING, 1,
                 "http.listen: must be \"host:port\"");
    expect_error("http = { listen = \"127.0.0.1:70000\"; };\n" PRICING, 1,
                 "http.listen: must be \"host:port\" with a port in 1..65535");
    expect_error("log = { level = \"trace\"; };\n" PRICING, 1,
                 "log.level: must be debug, info, warn or error");
    expect_error("log = { format = \"text\"; };\n" PRICING, 1,
                 "log.format: must be json or logfmt");
    expect_error("auth = {\n"                        /* 1 */
                 "  jwt_secret_file = \"/run/a\";\n" /* 2 */
                 "  token_file = \"/run/b\";\n"      /* 3 */
                 "};\n" PRICING,
                 3, "auth.token_file: give either jwt_secret_file or token_file, not both");
}

static void test_err_pricing_propagates(void **state)
{
    char path[64], err[512], want[80];
    bw_config *cfg = (bw_config *)1;

    (void)state;
    /* pricing's own rule: `models` must end with a "*" rule. */
    assert_int_equal(load_text("pricing = {\n"
                               "  version = \"v\"; credit_usd = 0.002;\n"
                               "  models = ( { match = \"gpt-*\"; credits_per_call = 1; } );\n"
                               "  tools = ( { match = \"*\"; credits_per_call = 1; } );\n"
                               "};\n",
                               0, &cfg, path, sizeof(path), err, sizeof(err)),
                     -1);
    assert_null(cfg);
    snprintf(want, sizeof(want), "%s:", path);
    assert_memory_equal(err, want, strlen(want));
}

static void test_env_overrides(void **state)
{
    char path[64], err[512];
    bw_config *cfg = NULL;

    (void)state;
    setenv("BW_KAFKA_BROKERS", "env-broker:9092", 1);   /* string, over the file */
    setenv("BW_WALLET_TIMEOUT", "750ms", 1);            /* duration */
    setenv("BW_SETTLE_MAX_ATTEMPTS", "12", 1);          /* int */
    setenv("BW_USER_SERVICE_URL", "consul://users", 1); /* two-word group */
    setenv("BW_SHUTDOWN_TIMEOUT", "1m", 1);             /* top-level key */
    setenv("BW_SETTLE_LATE_POLICY", "record", 1);
    setenv("BW_KAFKA_TOPIC", "env.topic", 1); /* replaces the file's list */
    setenv("BW_LIMITS_MAX_EVENT_BYTES", "1024", 1);
    setenv("BW_TLS_CA_FILE", "/etc/env-ca.pem", 1);
    setenv("BW_AUTH_TOKEN_FILE", "", 1); /* "" unsets the file's value */
    assert_int_equal(load_text(full_cfg, 0, &cfg, path, sizeof(path), err, sizeof(err)), 0);
    assert_string_equal(cfg->brokers, "env-broker:9092");
    assert_int_equal(cfg->wallet.timeout_ms, 750);
    assert_int_equal(cfg->max_attempts, 12);
    assert_string_equal(cfg->user_service.url, "consul://users");
    assert_int_equal(cfg->shutdown_timeout_ms, 60000);
    assert_int_equal(cfg->late_policy_adjust, 0);
    assert_int_equal(cfg->n_topics, 1);
    assert_string_equal(cfg->topics[0], "env.topic");
    assert_int_equal(cfg->max_event_bytes, 1024);
    assert_string_equal(cfg->tls_ca_file, "/etc/env-ca.pem");
    assert_null(cfg->token_file);
    /* untouched keys keep the file's values */
    assert_string_equal(cfg->group_id, "bw-test");
    assert_int_equal(cfg->user_service.timeout_ms, 2000);
    bw_config_free(cfg);

    /* overrides apply over defaults too, in a file without the group */
    cfg = NULL;
    assert_int_equal(load_text(PRICING, 1, &cfg, path, sizeof(path), err, sizeof(err)), 0);
    assert_string_equal(cfg->brokers, "env-broker:9092");
    assert_int_equal(cfg->has_kafka, 0);
    bw_config_free(cfg);
    clear_bw_env(NULL);
}

static void test_env_invalid(void **state)
{
    (void)state;
    setenv("BW_SETTLE_MAX_ATTEMPTS", "0", 1);
    expect_env_error(PRICING, "env BW_SETTLE_MAX_ATTEMPTS: must be an integer >= 1");
    setenv("BW_SETTLE_MAX_ATTEMPTS", "5x", 1);
    expect_env_error(PRICING, "env BW_SETTLE_MAX_ATTEMPTS: must be an integer");
    unsetenv("BW_SETTLE_MAX_ATTEMPTS");

    setenv("BW_SHUTDOWN_TIMEOUT", "10", 1);
    expect_env_error(PRICING, "env BW_SHUTDOWN_TIMEOUT: must be a duration with a unit "
                              "(ms, s, m, h, d), like \"5s\"");
    unsetenv("BW_SHUTDOWN_TIMEOUT");

    setenv("BW_REDIS_URL", "rediss://secure:6380", 1);
    expect_env_error(PRICING,
                     "env BW_REDIS_URL: must start with redis://, redis+cluster:// or unix://");
    unsetenv("BW_REDIS_URL");

    setenv("BW_KAFKA_GROUP_ID", "", 1);
    expect_env_error(PRICING, "env BW_KAFKA_GROUP_ID: must be a non-empty string");
    unsetenv("BW_KAFKA_GROUP_ID");

    /* the file names a JWT secret, the environment a static token */
    setenv("BW_AUTH_TOKEN_FILE", "/run/t", 1);
    expect_env_error("auth = { jwt_secret_file = \"/run/s\"; };\n" PRICING,
                     "env BW_AUTH_TOKEN_FILE: auth: give either jwt_secret_file or token_file, "
                     "not both");
    clear_bw_env(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full_file),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_pricing_only),
        cmocka_unit_test(test_single_topic_and_unset_strings),
        cmocka_unit_test(test_err_syntax),
        cmocka_unit_test(test_err_missing_file),
        cmocka_unit_test(test_err_unknown),
        cmocka_unit_test(test_err_wrong_type),
        cmocka_unit_test(test_err_duration),
        cmocka_unit_test(test_err_late_policy),
        cmocka_unit_test(test_err_missing_pricing),
        cmocka_unit_test(test_err_properties),
        cmocka_unit_test(test_err_max_event_bytes),
        cmocka_unit_test(test_err_values),
        cmocka_unit_test(test_err_pricing_propagates),
        cmocka_unit_test(test_env_overrides),
        cmocka_unit_test(test_env_invalid),
    };

    return cmocka_run_group_tests(tests, clear_bw_env, NULL);
}

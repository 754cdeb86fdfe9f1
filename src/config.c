/*
 * config.c - the configuration file (PRODUCT.md section 10).
 *
 * Every non-pricing key is described once, in the table below: its group,
 * name, kind, field, extra validation and default. The same table drives the
 * defaults, the file, the BW_<GROUP>_<KEY> environment overrides and the
 * "unknown setting" check, so a key cannot be accepted in one place and
 * forgotten in another.
 *
 * Order of precedence: default < file < environment.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libconfig.h>
#include <librdkafka/rdkafka.h>

#include "bw_config.h"
#include "bw_util.h"

typedef enum key_kind {
    K_STR,    /* non-empty string */
    K_OPTSTR, /* string; "" means unset (the field stays NULL) */
    K_DUR,    /* duration string with a unit, >= 0 */
    K_DURPOS, /* duration string with a unit, > 0 */
    K_INT,    /* integer stored in an int */
    K_INT64,  /* integer stored in an int64_t */
    K_POLICY, /* settle.late_policy: "adjust" | "record" */
    K_TOPIC,  /* kafka.topic: one topic, replaces the list */
    K_TOPICS, /* kafka.topics: list of topics (file only) */
    K_PROPS   /* kafka.properties: list of "key=value" (file only) */
} key_kind;

/* Extra validation of a string value: NULL when fine, else the message. */
typedef const char *(*str_check)(const char *s);

typedef struct key_spec {
    const char *group; /* NULL: a top-level setting */
    const char *key;
    key_kind kind;
    size_t off; /* of the field in bw_config */
    str_check check;
    int64_t min, max; /* K_INT, K_INT64 */
    const char *def;  /* default, as the file would write it; NULL: none */
} key_spec;

static const char *check_redis_url(const char *s)
{
    /* hiredis 0.14 has no TLS: rediss:// is refused rather than silently
     * sent in clear text. */
    if (strncmp(s, "redis+cluster://", 16) == 0 && s[16]) {
        const char *q = strchr(s, '?');
        char *end;
        long b;
        if (!q)
            return NULL;
        if (strncmp(q, "?buckets=", 9) != 0 || !isdigit((unsigned char)q[9]) ||
            (b = strtol(q + 9, &end, 10)) < 1 || b > 1024 || *end)
            return "redis+cluster:// takes only ?buckets=1..1024";
        return NULL;
    }
    if ((strncmp(s, "redis://", 8) == 0 && s[8]) || (strncmp(s, "unix://", 7) == 0 && s[7]))
        return NULL;
    return "must start with redis://, redis+cluster:// or unix://";
}

static const char *check_service_url(const char *s)
{
    if ((strncmp(s, "http://", 7) == 0 && s[7]) || (strncmp(s, "https://", 8) == 0 && s[8]) ||
        (strncmp(s, "consul://", 9) == 0 && s[9]))
        return NULL;
    return "must be an http:// or https:// URL, or consul://service-name";
}

static const char *check_http_url(const char *s)
{
    if ((strncmp(s, "http://", 7) == 0 && s[7]) || (strncmp(s, "https://", 8) == 0 && s[8]))
        return NULL;
    return "must be an http:// or https:// URL";
}

static const char *check_path(const char *s)
{
    return s[0] == '/' ? NULL : "must be a path starting with '/'";
}

static const char *check_consume_path(const char *s)
{
    /* Without {user_id} every user's charge would land on one URL. */
    if (s[0] != '/' || !strstr(s, "{user_id}"))
        return "must be a path starting with '/' that contains {user_id}";
    return NULL;
}

static const char *check_listen(const char *s)
{
    const char *colon = strrchr(s, ':');
    char *end;
    long port;

    if (!colon || colon == s || !isdigit((unsigned char)colon[1]))
        return "must be \"host:port\"";
    errno = 0;
    port = strtol(colon + 1, &end, 10);
    if (errno || *end || port < 1 || port > 65535)
        return "must be \"host:port\" with a port in 1..65535";
    return NULL;
}

static const char *check_log_level(const char *s)
{
    if (!strcmp(s, "debug") || !strcmp(s, "info") || !strcmp(s, "warn") || !strcmp(s, "error"))
        return NULL;
    return "must be debug, info, warn or error";
}

static const char *check_log_format(const char *s)
{
    if (!strcmp(s, "json") || !strcmp(s, "logfmt"))
        return NULL;
    return "must be json or logfmt";
}

#define CONSUME_PATH "/api/v1/users/{user_id}/credits/consume"
#define F(member)    offsetof(bw_config, member)

static const key_spec specs[] = {
    {"kafka", "brokers", K_STR, F(brokers), NULL, 0, 0, "127.0.0.1:9092"},
    {"kafka", "group_id", K_STR, F(group_id), NULL, 0, 0, "billing-worker"},
    {"kafka", "topic", K_TOPIC, F(topics), NULL, 0, 0, "agent.billing.events"},
    {"kafka", "topics", K_TOPICS, F(topics), NULL, 0, 0, NULL},
    {"kafka", "settlements_topic", K_STR, F(settlements_topic), NULL, 0, 0,
     "agent.billing.settlements"},
    {"kafka", "dlq_topic", K_STR, F(dlq_topic), NULL, 0, 0, "agent.billing.dlq"},
    {"kafka", "properties", K_PROPS, F(properties), NULL, 0, 0, NULL},

    {"redis", "url", K_STR, F(redis_url), check_redis_url, 0, 0, "redis://127.0.0.1:6379/0"},

    {"dedup", "retention", K_DURPOS, F(dedup_retention_ms), NULL, 0, 0, "7d"},

    {"wallet", "url", K_STR, F(wallet.url), check_service_url, 0, 0, "http://127.0.0.1:8208"},
    {"wallet", "consume_path", K_STR, F(wallet.consume_path), check_consume_path, 0, 0,
     CONSUME_PATH},
    {"wallet", "timeout", K_DURPOS, F(wallet.timeout_ms), NULL, 0, 0, "3s"},

    {"user_service", "url", K_STR, F(user_service.url), check_service_url, 0, 0,
     "http://127.0.0.1:8202"},
    {"user_service", "record_path", K_STR, F(user_service.record_path), check_path, 0, 0,
     "/api/v1/usage/records"},
    {"user_service", "consume_path", K_STR, F(user_service.consume_path), check_consume_path, 0, 0,
     CONSUME_PATH},
    {"user_service", "timeout", K_DURPOS, F(user_service.timeout_ms), NULL, 0, 0, "3s"},

    {"tls", "ca_file", K_OPTSTR, F(tls_ca_file), NULL, 0, 0, NULL},
    {"tls", "cert_file", K_OPTSTR, F(tls_cert_file), NULL, 0, 0, NULL},
    {"tls", "key_file", K_OPTSTR, F(tls_key_file), NULL, 0, 0, NULL},

    {"consul", "url", K_STR, F(consul_url), check_http_url, 0, 0, "http://127.0.0.1:8500"},
    {"consul", "refresh", K_DURPOS, F(consul_refresh_ms), NULL, 0, 0, "10s"},

    {"auth", "jwt_secret_file", K_OPTSTR, F(jwt_secret_file), NULL, 0, 0, NULL},
    {"auth", "token_file", K_OPTSTR, F(token_file), NULL, 0, 0, NULL},

    {"settle", "service_name", K_STR, F(service_name), NULL, 0, 0, "billing-worker"},
    {"settle", "finalize_grace", K_DUR, F(finalize_grace_ms), NULL, 0, 0, "5s"},
    {"settle", "request_timeout", K_DURPOS, F(request_timeout_ms), NULL, 0, 0, "15m"},
    {"settle", "late_policy", K_POLICY, F(late_policy_adjust), NULL, 0, 0, "adjust"},
    {"settle", "max_attempts", K_INT, F(max_attempts), NULL, 1, INT_MAX, "5"},
    {"settle", "retry_max_interval", K_DURPOS, F(retry_max_interval_ms), NULL, 0, 0, "1m"},
    {"settle", "breaker_failures", K_INT, F(breaker_failures), NULL, 1, INT_MAX, "5"},
    {"settle", "breaker_cooldown", K_DURPOS, F(breaker_cooldown_ms), NULL, 0, 0, "30s"},
    /* Extension of the contract: settlements in flight at once per process. */
    {"settle", "concurrency", K_INT, F(settle_concurrency), NULL, 1, 64, "16"},

    {"http", "listen", K_STR, F(http_listen), check_listen, 0, 0, "127.0.0.1:9464"},

    {"limits", "max_event_bytes", K_INT64, F(max_event_bytes), NULL, 1, 1048576, "65536"},

    {"log", "level", K_STR, F(log_level), check_log_level, 0, 0, "info"},
    {"log", "format", K_STR, F(log_format), check_log_format, 0, 0, "json"},

    {NULL, "shutdown_timeout", K_DURPOS, F(shutdown_timeout_ms), NULL, 0, 0, "10s"},
};

#define N_SPECS (sizeof(specs) / sizeof(specs[0]))

/* Where each value came from: 0 default, > 0 the file's line, -1 the environment. */
#define SRC_ENV -1

static void *field(bw_config *cfg, const key_spec *ks)
{
    return (char *)cfg + ks->off;
}

static void free_topics(bw_config *cfg)
{
    for (size_t i = 0; i < cfg->n_topics; i++)
        free(cfg->topics[i]);
    cfg->n_topics = 0;
}

/* "group.key" for messages. */
static void key_name(const key_spec *ks, char *buf, size_t size)
{
    if (ks->group)
        snprintf(buf, size, "%s.%s", ks->group, ks->key);
    else
        snprintf(buf, size, "%s", ks->key);
}

/* "BW_GROUP_KEY", upper-cased. */
static void env_name(const key_spec *ks, char *buf, size_t size)
{
    size_t i;

    if (ks->group)
        snprintf(buf, size, "BW_%s_%s", ks->group, ks->key);
    else
        snprintf(buf, size, "BW_%s", ks->key);
    for (i = 0; buf[i]; i++)
        buf[i] = (char)toupper((unsigned char)buf[i]);
}

static int line_of(const config_setting_t *s)
{
    return (int)config_setting_source_line(s);
}

/* The file a setting came from: the config file itself unless @include'd. */
static const char *setting_file(const config_setting_t *s, const char *path)
{
    const char *f = config_setting_source_file(s);
    return f ? f : path;
}

/*
 * Store an integer after its range check.
 * @returns 0, or -1 with the message in @p msg (the field is unchanged).
 */
static int apply_int(bw_config *cfg, const key_spec *ks, int64_t v, char *msg, size_t msgsize)
{
    if (v < ks->min || v > ks->max) {
        if (ks->max == INT_MAX)
            bw_seterr(msg, msgsize, "must be an integer >= %lld", (long long)ks->min);
        else
            bw_seterr(msg, msgsize, "must be an integer in %lld..%lld", (long long)ks->min,
                      (long long)ks->max);
        return -1;
    }
    if (ks->kind == K_INT)
        *(int *)field(cfg, ks) = (int)v;
    else
        *(int64_t *)field(cfg, ks) = v;
    return 0;
}

/*
 * Validate and store a value given as text (a string setting of the file,
 * an environment variable, or a default). Not for the list kinds.
 * @returns 0, or -1 with the message in @p msg (the field is unchanged).
 */
static int apply_str(bw_config *cfg, const key_spec *ks, const char *s, char *msg, size_t msgsize)
{
    const char *why;
    char *copy, *end;
    int64_t ms;
    long long v;

    switch (ks->kind) {
    case K_DUR:
    case K_DURPOS:
        if (bw_parse_duration(s, &ms) != 0) {
            bw_seterr(msg, msgsize, "must be a duration with a unit (ms, s, m, h, d), like \"5s\"");
            return -1;
        }
        if (ks->kind == K_DURPOS && ms == 0) {
            bw_seterr(msg, msgsize, "must be a duration greater than 0");
            return -1;
        }
        *(int64_t *)field(cfg, ks) = ms;
        return 0;
    case K_INT:
    case K_INT64:
        /* Only the environment and defaults arrive here: strictly digits,
         * so "5s" or " 5" is an error rather than a silent 5. */
        errno = 0;
        v = strtoll(s, &end, 10);
        if ((*s != '-' && !isdigit((unsigned char)*s)) || end == s || errno || *end) {
            bw_seterr(msg, msgsize, "must be an integer");
            return -1;
        }
        return apply_int(cfg, ks, (int64_t)v, msg, msgsize);
    case K_POLICY:
        if (strcmp(s, "adjust") && strcmp(s, "record")) {
            bw_seterr(msg, msgsize, "must be adjust or record");
            return -1;
        }
        cfg->late_policy_adjust = strcmp(s, "adjust") == 0;
        return 0;
    case K_STR:
    case K_TOPIC:
        if (!*s) {
            bw_seterr(msg, msgsize, "must be a non-empty string");
            return -1;
        }
        break;
    case K_OPTSTR:
        break;
    case K_TOPICS:
    case K_PROPS:
        bw_seterr(msg, msgsize, "must be a list of strings");
        return -1;
    }
    if (*s && ks->check && (why = ks->check(s)) != NULL) {
        bw_seterr(msg, msgsize, "%s", why);
        return -1;
    }
    copy = NULL;
    if (*s && !(copy = strdup(s))) {
        bw_seterr(msg, msgsize, "out of memory");
        return -1;
    }
    if (ks->kind == K_TOPIC) {
        free_topics(cfg);
        cfg->topics[0] = copy;
        cfg->n_topics = 1;
    } else {
        char **slot = field(cfg, ks);
        free(*slot);
        *slot = copy; /* NULL for an empty K_OPTSTR: unset */
    }
    return 0;
}

/* librdkafka's verdict on one "key=value", here so that check-config and a
 * bad file give file:line and exit 2 rather than a failure at run time.
 * @returns NULL, or why (in @p buf). */
static const char *check_kafka_property(const char *kv, const char *eq, char *buf, size_t size)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    char key[256];
    rd_kafka_conf_res_t res;

    if ((size_t)(eq - kv) >= sizeof(key)) {
        rd_kafka_conf_destroy(conf);
        return "property name too long";
    }
    memcpy(key, kv, (size_t)(eq - kv));
    key[eq - kv] = '\0';
    res = rd_kafka_conf_set(conf, key, eq + 1, buf, size);
    rd_kafka_conf_destroy(conf);
    return res == RD_KAFKA_CONF_OK ? NULL : buf;
}

/*
 * Read kafka.topics or kafka.properties: a list ( ) or array [ ] of strings.
 * @returns 0, or -1 with a complete "file:line: ..." error.
 */
static int apply_list(bw_config *cfg, const key_spec *ks, const config_setting_t *s,
                      const char *path, char *err, size_t errsize)
{
    int topics = ks->kind == K_TOPICS;
    size_t max = topics ? BW_CONFIG_MAX_TOPICS : BW_CONFIG_MAX_PROPS;
    char **out = topics ? cfg->topics : cfg->properties;
    size_t *n = topics ? &cfg->n_topics : &cfg->n_properties;
    int type = config_setting_type(s);
    int len, i;
    char rkerr[256];

    if (type != CONFIG_TYPE_LIST && type != CONFIG_TYPE_ARRAY) {
        bw_seterr(err, errsize, "%s:%d: kafka.%s: must be a list of strings", setting_file(s, path),
                  line_of(s), ks->key);
        return -1;
    }
    len = config_setting_length(s);
    if ((size_t)len > max || (topics && len == 0)) {
        bw_seterr(err, errsize, "%s:%d: kafka.%s: must hold %s%zu entries", setting_file(s, path),
                  line_of(s), ks->key, topics ? "1 to " : "at most ", max);
        return -1;
    }
    /* The list replaces whatever was there (the default topic). */
    if (topics)
        free_topics(cfg);
    for (i = 0; i < len; i++) {
        const config_setting_t *e = config_setting_get_elem(s, (unsigned int)i);
        const char *v = config_setting_get_string(e);
        const char *eq = v ? strchr(v, '=') : NULL;
        const char *why = NULL;

        if (!v)
            why = "must be a string";
        else if (topics && !*v)
            why = "must be a non-empty string";
        else if (!topics && (!eq || eq == v))
            why = "must be \"key=value\"";
        else if (!topics)
            why = check_kafka_property(v, eq, rkerr, sizeof(rkerr));
        if (why) {
            bw_seterr(err, errsize, "%s:%d: kafka.%s[%d]: %s", setting_file(e, path), line_of(e),
                      ks->key, i, why);
            return -1;
        }
        if (!(out[*n] = strdup(v))) {
            bw_seterr(err, errsize, "out of memory");
            return -1;
        }
        (*n)++;
    }
    return 0;
}

/*
 * Apply one setting of the file to its key.
 * @returns 0, or -1 with a complete "file:line: group.key: ..." error.
 */
static int apply_setting(bw_config *cfg, const key_spec *ks, const config_setting_t *s,
                         const char *path, char *err, size_t errsize)
{
    char msg[256], name[64];
    int type = config_setting_type(s);
    int rc;

    if (ks->kind == K_TOPICS || ks->kind == K_PROPS)
        return apply_list(cfg, ks, s, path, err, errsize);
    if (ks->kind == K_INT || ks->kind == K_INT64) {
        /* Reals are refused, not truncated: 2.5 attempts is a typo. */
        if (type != CONFIG_TYPE_INT && type != CONFIG_TYPE_INT64) {
            bw_seterr(msg, sizeof(msg), "must be an integer");
            rc = -1;
        } else {
            rc = apply_int(cfg, ks, (int64_t)config_setting_get_int64(s), msg, sizeof(msg));
        }
    } else if (type != CONFIG_TYPE_STRING) {
        /* A bare number as a duration is ambiguous (seconds? ms?): refused. */
        bw_seterr(msg, sizeof(msg), "%s",
                  (ks->kind == K_DUR || ks->kind == K_DURPOS)
                      ? "must be a duration string with a unit (ms, s, m, h, d), like \"5s\""
                      : "must be a string");
        rc = -1;
    } else {
        rc = apply_str(cfg, ks, config_setting_get_string(s), msg, sizeof(msg));
    }
    if (rc != 0) {
        key_name(ks, name, sizeof(name));
        bw_seterr(err, errsize, "%s:%d: %s: %s", setting_file(s, path), line_of(s), name, msg);
    }
    return rc;
}

static const key_spec *find_spec(const char *group, const char *key)
{
    for (size_t i = 0; i < N_SPECS; i++) {
        int same_group = group ? specs[i].group && !strcmp(specs[i].group, group) : !specs[i].group;
        if (same_group && !strcmp(specs[i].key, key))
            return &specs[i];
    }
    return NULL;
}

static int is_group_name(const char *name)
{
    for (size_t i = 0; i < N_SPECS; i++)
        if (specs[i].group && !strcmp(specs[i].group, name))
            return 1;
    return 0;
}

/* Apply the settings of one group of the file (NULL group: one top-level setting). */
static int apply_group(bw_config *cfg, const char *group, const config_setting_t *g,
                       const char *path, int *src, char *err, size_t errsize)
{
    int len = config_setting_length(g);
    int topic_line = 0;

    if (config_setting_type(g) != CONFIG_TYPE_GROUP) {
        bw_seterr(err, errsize, "%s:%d: %s: must be a group { ... }", setting_file(g, path),
                  line_of(g), group);
        return -1;
    }
    for (int i = 0; i < len; i++) {
        const config_setting_t *s = config_setting_get_elem(g, (unsigned int)i);
        const char *key = config_setting_name(s);
        const key_spec *ks = find_spec(group, key);

        if (!ks) {
            bw_seterr(err, errsize, "%s:%d: %s.%s: unknown setting", setting_file(s, path),
                      line_of(s), group, key);
            return -1;
        }
        /* topic and topics fill the same list: one of them only. */
        if (ks->kind == K_TOPIC || ks->kind == K_TOPICS) {
            if (topic_line) {
                bw_seterr(err, errsize, "%s:%d: kafka.%s: give either topic or topics, not both",
                          setting_file(s, path), line_of(s), key);
                return -1;
            }
            topic_line = line_of(s);
        }
        if (apply_setting(cfg, ks, s, path, err, errsize) != 0)
            return -1;
        src[ks - specs] = line_of(s);
    }
    return 0;
}

/* Every root setting: a known group, a known top-level key, or `pricing`. */
static int apply_file(bw_config *cfg, const config_setting_t *root, const char *path, int *src,
                      const config_setting_t **pricing, char *err, size_t errsize)
{
    int len = config_setting_length(root);

    for (int i = 0; i < len; i++) {
        const config_setting_t *s = config_setting_get_elem(root, (unsigned int)i);
        const char *name = config_setting_name(s);
        const key_spec *ks;

        if (!strcmp(name, "pricing")) {
            /* Validated by bw_pricing_from_setting(), after everything else. */
            *pricing = s;
        } else if (is_group_name(name)) {
            if (!strcmp(name, "kafka"))
                cfg->has_kafka = 1;
            if (apply_group(cfg, name, s, path, src, err, errsize) != 0)
                return -1;
        } else if ((ks = find_spec(NULL, name)) != NULL) {
            if (apply_setting(cfg, ks, s, path, err, errsize) != 0)
                return -1;
            src[ks - specs] = line_of(s);
        } else {
            bw_seterr(err, errsize, "%s:%d: %s: unknown setting", setting_file(s, path), line_of(s),
                      name);
            return -1;
        }
    }
    return 0;
}

static int apply_defaults(bw_config *cfg, char *err, size_t errsize)
{
    char msg[256];

    for (size_t i = 0; i < N_SPECS; i++) {
        if (specs[i].def && apply_str(cfg, &specs[i], specs[i].def, msg, sizeof(msg)) != 0) {
            bw_seterr(err, errsize, "default of %s: %s", specs[i].key, msg);
            return -1;
        }
    }
    return 0;
}

/*
 * BW_<GROUP>_<KEY> for every scalar setting. Lists (kafka.topics,
 * kafka.properties) have none: BW_KAFKA_TOPIC gives one topic, and -X on
 * the command line adds librdkafka properties.
 *
 * Deliberately no override for anything inside `pricing`: prices come from
 * the file only, so the pricing hash recorded in every settlement names a
 * file an auditor can read, and a SIGHUP reload (which re-reads the file,
 * not the environment of a long-running process) gives the same result as
 * a restart.
 */
static int apply_env(bw_config *cfg, int *src, char *err, size_t errsize)
{
    char name[64], msg[256];
    const char *v;

    for (size_t i = 0; i < N_SPECS; i++) {
        if (specs[i].kind == K_TOPICS || specs[i].kind == K_PROPS)
            continue;
        env_name(&specs[i], name, sizeof(name));
        if (!(v = getenv(name)))
            continue;
        if (apply_str(cfg, &specs[i], v, msg, sizeof(msg)) != 0) {
            bw_seterr(err, errsize, "env %s: %s", name, msg);
            return -1;
        }
        src[i] = SRC_ENV;
    }
    return 0;
}

/* Checks across keys, once every source has been applied. */
static int check_all(const bw_config *cfg, const char *path, const int *src, char *err,
                     size_t errsize)
{
    const key_spec *js = find_spec("auth", "jwt_secret_file");
    const key_spec *ts = find_spec("auth", "token_file");
    const key_spec *blame;
    char name[64];

    /* Two kinds of service token at once would leave the choice to code
     * order. Blame the environment if it is involved, else the later line. */
    if (cfg->jwt_secret_file && cfg->token_file) {
        if (src[ts - specs] == SRC_ENV)
            blame = ts;
        else if (src[js - specs] == SRC_ENV)
            blame = js;
        else
            blame = src[ts - specs] > src[js - specs] ? ts : js;
        if (src[blame - specs] == SRC_ENV) {
            env_name(blame, name, sizeof(name));
            bw_seterr(err, errsize,
                      "env %s: auth: give either jwt_secret_file or token_file, "
                      "not both",
                      name);
        } else {
            bw_seterr(err, errsize,
                      "%s:%d: auth.%s: give either jwt_secret_file or token_file, "
                      "not both",
                      path, src[blame - specs], blame->key);
        }
        return -1;
    }
    return 0;
}

int bw_config_load(const char *path, int pricing_only, bw_config **out, char *err, size_t errsize)
{
    config_t cf;
    bw_config *cfg = NULL;
    const config_setting_t *pricing = NULL;
    int src[N_SPECS] = {0};
    int rc = -1;

    /* pricing_only (price, check-config) and run accept the same files: a
     * file without a kafka group runs with the defaults, and has_kafka tells
     * the caller which it was. */
    (void)pricing_only;
    *out = NULL;
    config_init(&cf);
    config_set_options(&cf, config_get_options(&cf) | CONFIG_OPTION_AUTOCONVERT);

    if (config_read_file(&cf, path) != CONFIG_TRUE) {
        int saved = errno;
        if (config_error_type(&cf) == CONFIG_ERR_FILE_IO)
            bw_seterr(err, errsize, "%s: cannot read: %s", path, strerror(saved));
        else
            bw_seterr(err, errsize, "%s:%d: %s",
                      config_error_file(&cf) ? config_error_file(&cf) : path,
                      config_error_line(&cf), config_error_text(&cf));
        goto done;
    }
    if (!(cfg = calloc(1, sizeof(*cfg))) || !(cfg->path = strdup(path))) {
        bw_seterr(err, errsize, "%s: out of memory", path);
        goto done;
    }
    if (apply_defaults(cfg, err, errsize) != 0 ||
        apply_file(cfg, config_root_setting(&cf), path, src, &pricing, err, errsize) != 0 ||
        apply_env(cfg, src, err, errsize) != 0 || check_all(cfg, path, src, err, errsize) != 0)
        goto done;
    if (!pricing) {
        bw_seterr(err, errsize, "%s:1: pricing: missing", path);
        goto done;
    }
    if (config_setting_type(pricing) != CONFIG_TYPE_GROUP) {
        bw_seterr(err, errsize, "%s:%d: pricing: must be a group { ... }",
                  setting_file(pricing, path), line_of(pricing));
        goto done;
    }
    if (bw_pricing_from_setting(pricing, path, &cfg->pricing, err, errsize) != 0)
        goto done;

    *out = cfg;
    cfg = NULL;
    rc = 0;
done:
    bw_config_free(cfg);
    config_destroy(&cf);
    return rc;
}

void bw_config_free(bw_config *cfg)
{
    if (!cfg)
        return;
    free_topics(cfg);
    for (size_t i = 0; i < cfg->n_properties; i++)
        free(cfg->properties[i]);
    for (size_t i = 0; i < N_SPECS; i++) {
        key_kind k = specs[i].kind;
        if (k == K_STR || k == K_OPTSTR)
            free(*(char **)field(cfg, &specs[i]));
    }
    if (cfg->pricing)
        bw_pricing_free(cfg->pricing);
    free(cfg->path);
    free(cfg);
}

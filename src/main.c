/*
 * main.c - the command line (PRODUCT.md section 8). It only wires modules
 * together: parse arguments, load the config, run a command.
 *
 * Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>

#include "bw_audit.h"
#include "bw_config.h"
#include "bw_util.h"
#include "bw_log.h"
#include "bw_worker.h"

#define MAX_XPROPS 64

/* RFC 3339 or epoch milliseconds. */
static int parse_time(const char *s, int64_t *ms)
{
    char *end;
    long long v;

    if (bw_parse_rfc3339(s, ms) == 0)
        return 0;
    v = strtoll(s, &end, 10);
    if (*s && *end == '\0' && v >= 0) {
        *ms = v;
        return 0;
    }
    return -1;
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage:\n"
            "  billing-worker [run] -c FILE [-X librdkafka.prop=value ...] [--shadow] [-v|-q]\n"
            "  billing-worker price -c FILE [--format json|table] [EVENTS.jsonl | -]\n"
            "  billing-worker audit -c FILE --from TIME --to TIME [--format table|json|csv]\n"
            "                 [-o FILE] [--user ID] [--request ID] [--pricing-dir DIR]\n"
            "                 [--margin DURATION] [--shadow]\n"
            "  billing-worker replay -c FILE --from TIME --to TIME --settle [--margin DURATION]\n"
            "  billing-worker check-config -c FILE\n"
            "  billing-worker --version | --help\n");
}

int main(int argc, char **argv)
{
    const char *cmd = "run", *cfg_path = NULL, *format = NULL, *input = NULL;
    const char *from = NULL, *to = NULL;
    bw_audit_opts ao;
    char *xprops[MAX_XPROPS];
    size_t n_xprops = 0;
    int shadow = 0, settle = 0, verbosity = 0, i = 1, rc;
    bw_config *cfg = NULL;
    char err[1024];

    memset(&ao, 0, sizeof(ao));

    if (argc > 1 && argv[1][0] != '-') {
        cmd = argv[1];
        i = 2;
    }
    for (; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--version") == 0) {
            printf("billing-worker %s\n", BW_VERSION);
            return 0;
        } else if (strcmp(a, "-c") == 0 && i + 1 < argc) {
            cfg_path = argv[++i];
        } else if (strcmp(a, "-X") == 0 && i + 1 < argc) {
            if (n_xprops == MAX_XPROPS || !strchr(argv[i + 1], '=')) {
                fprintf(stderr, "billing-worker: -X expects key=value (at most %d)\n", MAX_XPROPS);
                return 2;
            }
            xprops[n_xprops++] = argv[++i];
        } else if (strcmp(a, "--format") == 0 && i + 1 < argc) {
            format = argv[++i];
        } else if (strcmp(a, "--from") == 0 && i + 1 < argc) {
            from = argv[++i];
        } else if (strcmp(a, "--to") == 0 && i + 1 < argc) {
            to = argv[++i];
        } else if (strcmp(a, "-o") == 0 && i + 1 < argc) {
            ao.output = argv[++i];
        } else if (strcmp(a, "--user") == 0 && i + 1 < argc) {
            ao.user = argv[++i];
        } else if (strcmp(a, "--request") == 0 && i + 1 < argc) {
            ao.request = argv[++i];
        } else if (strcmp(a, "--pricing-dir") == 0 && i + 1 < argc) {
            ao.pricing_dir = argv[++i];
        } else if (strcmp(a, "--margin") == 0 && i + 1 < argc) {
            if (bw_parse_duration(argv[++i], &ao.margin_ms) < 0) {
                fprintf(stderr, "billing-worker: --margin expects a duration (\"15m\", \"0s\")\n");
                return 2;
            }
            ao.has_margin = 1;
        } else if (strcmp(a, "--settle") == 0) {
            settle = 1;
        } else if (strcmp(a, "--shadow") == 0) {
            shadow = 1;
        } else if (strcmp(a, "-v") == 0) {
            verbosity = 1;
        } else if (strcmp(a, "-q") == 0) {
            verbosity = -1;
        } else if ((a[0] != '-' || strcmp(a, "-") == 0) && !input && strcmp(cmd, "price") == 0) {
            input = a;
        } else {
            fprintf(stderr, "billing-worker: unexpected argument \"%s\"\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (strcmp(cmd, "run") != 0 && strcmp(cmd, "price") != 0 && strcmp(cmd, "check-config") != 0 &&
        strcmp(cmd, "audit") != 0 && strcmp(cmd, "replay") != 0) {
        fprintf(stderr, "billing-worker: unknown command \"%s\"\n", cmd);
        usage(stderr);
        return 2;
    }
    if (!cfg_path) {
        fprintf(stderr, "billing-worker %s: -c FILE is required\n", cmd);
        return 2;
    }
    if (strcmp(cmd, "audit") == 0 || strcmp(cmd, "replay") == 0) {
        if (!from || !to || parse_time(from, &ao.from_ms) < 0 || parse_time(to, &ao.to_ms) < 0 ||
            ao.to_ms <= ao.from_ms) {
            fprintf(stderr,
                    "billing-worker %s: --from and --to must be RFC 3339 times or epoch "
                    "milliseconds, from before to\n",
                    cmd);
            return 2;
        }
        if (strcmp(cmd, "replay") == 0 && !settle) {
            fprintf(stderr, "billing-worker replay: --settle is required (it charges)\n");
            return 2;
        }
        if (!format)
            format = "table";
        if (strcmp(format, "table") != 0 && strcmp(format, "json") != 0 &&
            strcmp(format, "csv") != 0) {
            fprintf(stderr, "billing-worker audit: --format must be table, json or csv\n");
            return 2;
        }
        ao.format = format;
        ao.shadow = shadow;
        ao.xprops = xprops;
        ao.n_xprops = n_xprops;
    } else {
        if (!format)
            format = "json";
        if (strcmp(format, "json") != 0 && strcmp(format, "table") != 0) {
            fprintf(stderr, "billing-worker: --format must be json or table\n");
            return 2;
        }
    }
    if (bw_config_load(cfg_path, strcmp(cmd, "price") == 0 || strcmp(cmd, "check-config") == 0,
                       &cfg, err, sizeof(err)) < 0) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    if (bw_log_setup(cfg->log_level, cfg->log_format) < 0) {
        fprintf(stderr, "%s: bad log settings\n", cfg_path);
        bw_config_free(cfg);
        return 2;
    }
    if (verbosity > 0)
        bw_log_set_level(BW_LOG_DEBUG);
    else if (verbosity < 0)
        bw_log_set_level(BW_LOG_WARN);

    if (strcmp(cmd, "check-config") == 0) {
        printf("%s: ok (pricing version %s, sha256 %s)\n", cfg_path, cfg->pricing->version,
               cfg->pricing->sha256);
        rc = 0;
    } else if (strcmp(cmd, "audit") == 0) {
        rc = bw_audit_main(cfg, &ao);
    } else if (strcmp(cmd, "replay") == 0) {
        curl_global_init(CURL_GLOBAL_DEFAULT);
        rc = bw_replay_main(cfg, &ao);
        curl_global_cleanup();
    } else if (strcmp(cmd, "price") == 0) {
        rc = bw_price_main(cfg, input, strcmp(format, "table") == 0);
    } else {
        bw_worker_opts opts = {cfg_path, xprops, n_xprops, shadow};
        curl_global_init(CURL_GLOBAL_DEFAULT);
        rc = bw_worker_run(cfg, &opts);
        curl_global_cleanup();
    }
    bw_config_free(cfg);
    return rc;
}

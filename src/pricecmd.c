/*
 * pricecmd.c - `billing-worker price`: what each request in a JSON-lines
 * file would be charged, with the worker's validation, dedup and pricing,
 * and nothing else (no Kafka, no Redis, no wallet).
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "bw_record.h"
#include "bw_worker.h"

/* One request as `price` accumulates it. */
typedef struct preq {
    char request_id[BW_ID_MAX + 1];
    char user_id[BW_ID_MAX + 1];
    char session_id[BW_ID_MAX + 1];
    char org_id[BW_ID_MAX + 1];
    bw_call *calls;
    char **names;
    size_t n_calls, cap_calls;
    uint64_t n_model, n_tool; /* distinct usage events */
    int finalized, has_expected;
    uint64_t xm, xt;
} preq;

/* A chained hash set of strings: request ids, and "request\x1fdedup key". */
typedef struct sset {
    struct snode {
        struct snode *next;
        size_t idx; /* request index for the request table */
        char key[];
    } * *b;
    size_t nb;
} sset;

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

static struct snode *sset_find(sset *s, const char *key)
{
    struct snode *n = s->b[fnv1a(key) % s->nb];
    for (; n; n = n->next)
        if (strcmp(n->key, key) == 0)
            return n;
    return NULL;
}

static struct snode *sset_add(sset *s, const char *key, size_t idx)
{
    size_t len = strlen(key), h = fnv1a(key) % s->nb;
    struct snode *n = malloc(sizeof(*n) + len + 1);
    if (!n)
        return NULL;
    memcpy(n->key, key, len + 1);
    n->idx = idx;
    n->next = s->b[h];
    s->b[h] = n;
    return n;
}

static void sset_free(sset *s)
{
    for (size_t i = 0; i < s->nb; i++) {
        struct snode *n = s->b[i];
        while (n) {
            struct snode *next = n->next;
            free(n);
            n = next;
        }
    }
    free(s->b);
}

/* One row of a line's explanation: count x price = USD = credits. */
static void print_token_row(const bw_pricing *p, const char *what, uint64_t tokens,
                            const bw_dec *usd_per_mtok)
{
    char price[BW_DEC_STRMAX], usd_s[BW_DEC_STRMAX], cr_s[BW_DEC_STRMAX];
    bw_dec usd, credits;

    if (tokens == 0)
        return;
    if (bw_dec_mul_u64(&usd, usd_per_mtok, tokens) < 0 || bw_dec_div_pow10(&usd, 6) < 0 ||
        bw_dec_mul(&credits, &usd, &p->credits_per_usd) < 0)
        return;
    bw_dec_normalize(&usd);
    bw_dec_normalize(&credits);
    bw_dec_to_str(usd_per_mtok, price, sizeof(price));
    bw_dec_to_str(&usd, usd_s, sizeof(usd_s));
    bw_dec_to_str(&credits, cr_s, sizeof(cr_s));
    printf("      %-12s %12" PRIu64 " tokens x %s USD/Mtok = %s USD = %s credits\n", what, tokens,
           price, usd_s, cr_s);
}

static void print_line(const bw_pricing *p, const bw_line *ln)
{
    char credits[BW_DEC_STRMAX], a[BW_DEC_STRMAX], b[BW_DEC_STRMAX];
    int is_model = ln->kind == BW_EV_MODEL;

    bw_dec_to_str(&ln->credits, credits, sizeof(credits));
    printf("  %-5s %-30s %5" PRIu64 " call%s  %-15s %s credits\n", is_model ? "model" : "tool",
           ln->name, ln->calls, ln->calls == 1 ? " " : "s", bw_basis_name(ln->basis), credits);
    if (ln->basis == BW_BASIS_UNBILLED)
        return;
    if (is_model) {
        if (!bw_dec_is_zero(&ln->credits_per_call)) {
            bw_dec_to_str(&ln->credits_per_call, a, sizeof(a));
            printf("      %-12s %12" PRIu64 " calls x %s credits\n", "per call", ln->calls, a);
        }
        print_token_row(p, "input", ln->tokens.input, &ln->in);
        print_token_row(p, "cache_read", ln->tokens.cache_read, &ln->cache_read);
        print_token_row(p, "cache_write", ln->tokens.cache_write, &ln->cache_write);
        print_token_row(p, "output", ln->tokens.output - ln->tokens.reasoning, &ln->out);
        print_token_row(p, "reasoning", ln->tokens.reasoning, &ln->reasoning);
    } else {
        bw_dec_to_str(&ln->credits_per_call, a, sizeof(a));
        bw_dec_to_str(&ln->usd_per_call, b, sizeof(b));
        printf("      %-12s %12" PRIu64 " unit%s x (%s credits + %s USD)\n", "units", ln->units,
               ln->units == 1 ? "" : "s", a, b);
    }
}

static void print_table(const preq *r, const bw_charge *ch, const bw_pricing *p,
                        const char *finalize)
{
    char amount[BW_DEC_STRMAX], exact[BW_DEC_STRMAX], cost[BW_DEC_STRMAX], rate[BW_DEC_STRMAX];
    char cpu[BW_DEC_STRMAX];

    bw_dec_to_str_fixed(&ch->amount, p->precision, amount, sizeof(amount));
    bw_dec_to_str(&ch->exact, exact, sizeof(exact));
    bw_dec_to_str_fixed(&ch->cost_usd, 6, cost, sizeof(cost));
    bw_dec_to_str(&p->credit_usd, rate, sizeof(rate));
    bw_dec_to_str(&p->credits_per_usd, cpu, sizeof(cpu));
    printf("request %s  user %s  finalize %s  pricing %s\n", r->request_id, r->user_id, finalize,
           p->version);
    for (size_t i = 0; i < ch->n_lines; i++)
        print_line(p, &ch->lines[i]);
    printf("  total %s credits (exact) -> charged %s credits (%s, %d decimals%s)\n", exact, amount,
           bw_rounding_name(p->rounding), p->precision,
           ch->minimum_applied ? ", minimum applied" : "");
    printf("  cost %s USD at %s USD/credit (1 USD = %s credits)\n\n", cost, rate, cpu);
}

int bw_price_main(const bw_config *cfg, const char *path, int table)
{
    FILE *in = (!path || strcmp(path, "-") == 0) ? stdin : fopen(path, "r");
    char *line = NULL, err[256], key[2 * BW_ID_MAX + 8];
    size_t cap = 0, lineno = 0, n_req = 0, cap_req = 0, malformed = 0, duplicates = 0;
    ssize_t len;
    preq *reqs = NULL;
    sset ids = {calloc(4096, sizeof(struct snode *)), 4096};
    sset keys = {calloc(65536, sizeof(struct snode *)), 65536};
    bw_event ev;
    int rc = 0;
    size_t max_bytes = cfg->max_event_bytes > 0 ? (size_t)cfg->max_event_bytes : 65536;

    if (!in) {
        fprintf(stderr, "%s: cannot open\n", path);
        return 1;
    }
    if (!ids.b || !keys.b) {
        rc = 1;
        goto out;
    }
    while ((len = getline(&line, &cap, in)) >= 0) {
        bw_event_reason r;
        struct snode *node;
        preq *q;

        lineno++;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        if (len == 0)
            continue;
        r = bw_event_parse(line, (size_t)len, max_bytes, &ev, err, sizeof(err));
        if (r != BW_EVR_OK) {
            fprintf(stderr, "line %zu: %s: %s\n", lineno, bw_event_reason_str(r), err);
            malformed++;
            continue;
        }
        node = sset_find(&ids, ev.request_id);
        if (!node) {
            if (n_req == cap_req) {
                cap_req = cap_req ? cap_req * 2 : 64;
                reqs = realloc(reqs, cap_req * sizeof(*reqs));
                if (!reqs) {
                    rc = 1;
                    goto out;
                }
            }
            q = &reqs[n_req];
            memset(q, 0, sizeof(*q));
            snprintf(q->request_id, sizeof(q->request_id), "%s", ev.request_id);
            snprintf(q->user_id, sizeof(q->user_id), "%s", ev.user_id);
            snprintf(q->session_id, sizeof(q->session_id), "%s", ev.session_id);
            snprintf(q->org_id, sizeof(q->org_id), "%s", ev.org_id);
            if (!sset_add(&ids, ev.request_id, n_req)) {
                rc = 1;
                goto out;
            }
            n_req++;
        } else {
            q = &reqs[node->idx];
        }
        if (strcmp(q->user_id, ev.user_id) != 0) {
            fprintf(stderr, "line %zu: user_mismatch: user_id %s differs from the request's %s\n",
                    lineno, ev.user_id, q->user_id);
            malformed++;
            continue;
        }
        snprintf(key, sizeof(key), "%s\x1f%s", ev.request_id, bw_event_dedup_key(&ev));
        if (sset_find(&keys, key)) {
            duplicates++;
            continue;
        }
        sset_add(&keys, key, 0);
        if (ev.type == BW_EV_FINALIZE) {
            if (!q->finalized) {
                q->finalized = 1;
                q->has_expected = ev.has_expected;
                q->xm = ev.expected_model_calls;
                q->xt = ev.expected_tool_calls;
            }
            continue;
        }
        if (q->n_calls == q->cap_calls) {
            q->cap_calls = q->cap_calls ? q->cap_calls * 2 : 8;
            q->calls = realloc(q->calls, q->cap_calls * sizeof(*q->calls));
            q->names = realloc(q->names, q->cap_calls * sizeof(*q->names));
            if (!q->calls || !q->names) {
                rc = 1;
                goto out;
            }
        }
        {
            bw_call *c = &q->calls[q->n_calls];
            q->names[q->n_calls] = strdup(ev.name);
            c->type = ev.type;
            c->name = q->names[q->n_calls];
            c->failed = ev.failed;
            c->has_usage = ev.usage_shape != BW_USAGE_NONE;
            c->usage = ev.usage;
            c->units = ev.units;
            q->n_calls++;
            if (ev.type == BW_EV_MODEL)
                q->n_model++;
            else
                q->n_tool++;
        }
    }

    for (size_t i = 0; i < n_req; i++) {
        preq *q = &reqs[i];
        bw_charge ch;
        const char *fin = !q->finalized                                 ? "timeout"
                          : !q->has_expected                            ? "marker"
                          : (q->n_model >= q->xm && q->n_tool >= q->xt) ? "expected_met"
                                                                        : "incomplete";
        bw_record_meta meta = {q->request_id, q->user_id, q->session_id, q->org_id, 0, fin};

        if (bw_pricing_price(cfg->pricing, q->calls, q->n_calls, 1, &ch, err, sizeof(err)) < 0) {
            fprintf(stderr, "request %s: %s\n", q->request_id, err);
            rc = 1;
            continue;
        }
        if (table) {
            print_table(q, &ch, cfg->pricing, fin);
        } else {
            json_t *rec = bw_record_new(&meta, &ch, cfg->pricing, "dry_run");
            char *txt = rec ? bw_record_dump(rec) : NULL;
            if (txt)
                printf("%s\n", txt);
            free(txt);
            json_decref(rec);
        }
        bw_charge_free(&ch);
    }
    if (malformed || duplicates)
        fprintf(stderr, "%zu request(s), %zu malformed line(s), %zu duplicate(s) dropped\n", n_req,
                malformed, duplicates);
out:
    for (size_t i = 0; i < n_req; i++) {
        for (size_t j = 0; j < reqs[i].n_calls; j++)
            free(reqs[i].names[j]);
        free(reqs[i].calls);
        free(reqs[i].names);
    }
    free(reqs);
    free(line);
    sset_free(&ids);
    sset_free(&keys);
    if (in != stdin)
        fclose(in);
    return rc;
}

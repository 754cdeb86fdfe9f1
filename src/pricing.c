/*
 * pricing.c - the pricing engine (PRODUCT.md section 6).
 *
 * Loading turns the operator's libconfig `pricing` group (and an optional
 * LiteLLM price map) into exact bw_dec prices; pricing a request is then
 * pure decimal arithmetic. Doubles appear only where a parser hands one
 * out, and go straight through bw_dec_from_double().
 */
#include <ctype.h>
#include <errno.h>
#include <fnmatch.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "bw_pricing.h"
#include "bw_util.h"

/* LiteLLM prices are doubles written by Python's repr(): 17 significant
 * digits always recover the literal in the file. */
#define LITELLM_MAXSIG 17

typedef struct bw_litellm_entry {
    char *key;
    bw_dec input, output, cache_read, cache_write, reasoning; /* USD per Mtok */
} bw_litellm_entry;

/* Only usable entries are kept, sorted by key (bsearch, canonical hash). */
struct bw_litellm {
    bw_litellm_entry *entries;
    size_t n;
};

/* ---------------------------------------------------------------- errors */

/* "file:line: message" for a setting; the setting's own source file wins
 * so that errors inside an @include name the included file. */
static void cfg_err(char *err, size_t errsize, const config_setting_t *s, const char *file,
                    const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static void cfg_err(char *err, size_t errsize, const config_setting_t *s, const char *file,
                    const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    const char *src = config_setting_source_file(s) ? config_setting_source_file(s) : file;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    bw_seterr(err, errsize, "%s:%u: %s", src ? src : "pricing",
              (unsigned)config_setting_source_line(s), msg);
}

/* ------------------------------------------------------- config reading */

/*
 * libconfig 1.5 converts an integer literal without an L suffix with
 * atoi(): 5000000000 silently becomes 705032704 (the low 32 bits) and no
 * error is raised. The literal is gone from the parsed tree, so look for
 * it on the setting's line in the file: "name = <integer>" (or ':'), as a
 * whole word. @returns 1 if such a literal is outside the int range and
 * wraps to exactly @p v, else 0 (also when the line cannot be read, or the
 * value was set by other means than this literal).
 */
static int int_literal_wrapped(const config_setting_t *s, const char *file, long long v)
{
    const char *src = config_setting_source_file(s) ? config_setting_source_file(s) : file;
    const char *name = config_setting_name(s);
    unsigned line = config_setting_source_line(s), n = 0;
    char *buf = NULL;
    size_t cap = 0, namelen;
    int wrapped = 0;
    FILE *f;

    if (!src || !name || !line || !(f = fopen(src, "r")))
        return 0;
    while (getline(&buf, &cap, f) >= 0 && ++n < line)
        ;
    fclose(f);
    namelen = strlen(name);
    for (const char *p = n == line && buf ? strstr(buf, name) : NULL; p && !wrapped;
         p = strstr(p + 1, name)) {
        const char *q = p + namelen;
        unsigned long long mag;
        long long sv;
        int neg = 0, out_of_range;

        if (p > buf && (p[-1] == '_' || p[-1] == '-' || isalnum((unsigned char)p[-1])))
            continue;
        while (*q == ' ' || *q == '\t')
            q++;
        if (*q != '=' && *q != ':')
            continue;
        q++;
        while (*q == ' ' || *q == '\t')
            q++;
        if (q[0] == '0' && (q[1] == 'x' || q[1] == 'X') && isxdigit((unsigned char)q[2])) {
            /* strtoul(): saturates at ULONG_MAX, then keeps the low 32 bits */
            mag = strtoull(q + 2, NULL, 16);
            out_of_range = mag > UINT32_MAX;
            sv = (long long)mag;
        } else {
            if (*q == '-' || *q == '+')
                neg = *q++ == '-';
            if (!isdigit((unsigned char)*q))
                continue;
            /* strtol(): saturates at LONG_MIN/LONG_MAX, then (int) */
            errno = 0;
            mag = strtoull(q, NULL, 10);
            if (errno == ERANGE || mag > (unsigned long long)LLONG_MAX)
                sv = neg ? LLONG_MIN : LLONG_MAX;
            else
                sv = neg ? -(long long)mag : (long long)mag;
            out_of_range = sv < INT_MIN || sv > INT_MAX;
        }
        wrapped = out_of_range && (long long)(int32_t)(uint32_t)(unsigned long long)sv == v;
    }
    free(buf);
    return wrapped;
}

/*
 * Read a non-negative number setting exactly. libconfig hands out ints,
 * int64s or doubles depending on how the literal was written; all three
 * are accepted, a double only if at most BW_PRICE_MAXSIG significant
 * digits reproduce it (the operator's literal).
 */
static int read_number(const config_setting_t *s, const char *file, const char *what, bw_dec *out,
                       char *err, size_t errsize)
{
    switch (config_setting_type(s)) {
    case CONFIG_TYPE_INT:
    case CONFIG_TYPE_INT64: {
        long long v = config_setting_get_int64(s);
        if (config_setting_type(s) == CONFIG_TYPE_INT && int_literal_wrapped(s, file, v)) {
            cfg_err(err, errsize, s, file,
                    "%s: integer too large for libconfig; write it with an L suffix "
                    "(5000000000L) or as a real (5e9)",
                    what);
            return -1;
        }
        if (v < 0) {
            cfg_err(err, errsize, s, file, "%s: must not be negative", what);
            return -1;
        }
        bw_dec_from_u64(out, (uint64_t)v);
        return 0;
    }
    case CONFIG_TYPE_FLOAT: {
        double v = config_setting_get_float(s);
        bw_dec probe;
        if (v < 0) {
            cfg_err(err, errsize, s, file, "%s: must not be negative", what);
            return -1;
        }
        if (bw_dec_from_double(out, v, BW_PRICE_MAXSIG) == 0)
            return 0;
        if (bw_dec_from_double(&probe, v, 17) == 0)
            cfg_err(err, errsize, s, file,
                    "%s: more than %d significant digits; write the price with at most %d", what,
                    BW_PRICE_MAXSIG, BW_PRICE_MAXSIG);
        else
            cfg_err(err, errsize, s, file, "%s: out of range", what);
        return -1;
    }
    default:
        cfg_err(err, errsize, s, file, "%s: must be a number", what);
        return -1;
    }
}

static int read_string(const config_setting_t *s, const char *file, const char *what,
                       const char **out, char *err, size_t errsize)
{
    if (config_setting_type(s) != CONFIG_TYPE_STRING) {
        cfg_err(err, errsize, s, file, "%s: must be a string", what);
        return -1;
    }
    *out = config_setting_get_string(s);
    return 0;
}

static int is_one_of(const char *name, const char *const *keys)
{
    for (; *keys; keys++)
        if (strcmp(name, *keys) == 0)
            return 1;
    return 0;
}

static const char *const model_keys[] = {"match",
                                         "credits_per_call",
                                         "input_usd_per_mtok",
                                         "output_usd_per_mtok",
                                         "cache_read_usd_per_mtok",
                                         "cache_write_usd_per_mtok",
                                         "reasoning_usd_per_mtok",
                                         NULL};
static const char *const tool_keys[] = {"match", "credits_per_call", "usd_per_call", NULL};
static const char *const pricing_keys[] = {
    "version",           "credit_usd", "minimum_credits", "precision",      "rounding",
    "bill_failed_calls", "models",     "tools",           "litellm_prices", NULL};

/* Every member of a group must be a known key: a typo must not silently
 * leave a price at its default. */
static int check_keys(const config_setting_t *g, const char *file, const char *what,
                      const char *const *keys, char *err, size_t errsize)
{
    int n = config_setting_length(g);

    for (int i = 0; i < n; i++) {
        const config_setting_t *m = config_setting_get_elem(g, (unsigned)i);
        const char *name = config_setting_name(m);
        if (!name || !is_one_of(name, keys)) {
            cfg_err(err, errsize, m, file, "%s: unknown key \"%s\"", what, name ? name : "?");
            return -1;
        }
    }
    return 0;
}

/* "models[2] (match \"gpt-4o\")": names a rule in messages. */
static void rule_label(const config_setting_t *g, const char *list, size_t idx, char *what,
                       size_t whatsize)
{
    const config_setting_t *m =
        config_setting_is_group(g) ? config_setting_get_member(g, "match") : NULL;

    if (m && config_setting_type(m) == CONFIG_TYPE_STRING)
        snprintf(what, whatsize, "%s[%zu] (match \"%.64s\")", list, idx,
                 config_setting_get_string(m));
    else
        snprintf(what, whatsize, "%s[%zu]", list, idx);
}

/* The rule's match: a non-empty string (a glob). */
static int read_match(const config_setting_t *g, const char *file, const char *what, char **match,
                      char *err, size_t errsize)
{
    const config_setting_t *m = config_setting_get_member(g, "match");
    char label[200];
    const char *s;

    if (!m) {
        cfg_err(err, errsize, g, file, "%s: match is missing", what);
        return -1;
    }
    snprintf(label, sizeof(label), "%s: match", what);
    if (read_string(m, file, label, &s, err, errsize) != 0)
        return -1;
    if (*s == '\0') {
        cfg_err(err, errsize, m, file, "%s: must not be empty", label);
        return -1;
    }
    *match = strdup(s);
    if (!*match) {
        cfg_err(err, errsize, m, file, "%s: out of memory", label);
        return -1;
    }
    return 0;
}

/* An optional price member. @returns 1 present, 0 absent, -1 error. */
static int opt_number(const config_setting_t *g, const char *name, const char *file,
                      const char *what, bw_dec *out, char *err, size_t errsize)
{
    const config_setting_t *m = config_setting_get_member(g, name);
    char label[320];

    if (!m)
        return 0;
    snprintf(label, sizeof(label), "%s: %s", what, name);
    return read_number(m, file, label, out, err, errsize) == 0 ? 1 : -1;
}

static int parse_model_rule(const config_setting_t *g, size_t idx, const char *file,
                            bw_model_rule *r, char *err, size_t errsize)
{
    char what[160];
    int has_in, has_out, has_cr, has_cw, has_re;

    rule_label(g, "models", idx, what, sizeof(what));
    if (!config_setting_is_group(g)) {
        cfg_err(err, errsize, g, file, "%s: must be a group { match = \"...\"; ... }", what);
        return -1;
    }
    /* Keys first: a misspelt "match" is reported as the typo it is. */
    if (check_keys(g, file, what, model_keys, err, errsize) != 0 ||
        read_match(g, file, what, &r->match, err, errsize) != 0)
        return -1;
    if ((r->has_credits_per_call = opt_number(g, "credits_per_call", file, what,
                                              &r->credits_per_call, err, errsize)) < 0 ||
        (has_in = opt_number(g, "input_usd_per_mtok", file, what, &r->input, err, errsize)) < 0 ||
        (has_out = opt_number(g, "output_usd_per_mtok", file, what, &r->output, err, errsize)) <
            0 ||
        (has_cr = opt_number(g, "cache_read_usd_per_mtok", file, what, &r->cache_read, err,
                             errsize)) < 0 ||
        (has_cw = opt_number(g, "cache_write_usd_per_mtok", file, what, &r->cache_write, err,
                             errsize)) < 0 ||
        (has_re =
             opt_number(g, "reasoning_usd_per_mtok", file, what, &r->reasoning, err, errsize)) < 0)
        return -1;
    r->has_token_prices = has_in || has_out || has_cr || has_cw || has_re;
    /* Cache tokens are input tokens, reasoning tokens are output tokens:
     * without their own price they cost what their class costs. */
    if (!has_cr)
        r->cache_read = r->input;
    if (!has_cw)
        r->cache_write = r->input;
    if (!has_re)
        r->reasoning = r->output;
    return 0;
}

static int parse_tool_rule(const config_setting_t *g, size_t idx, const char *file, bw_tool_rule *r,
                           char *err, size_t errsize)
{
    char what[160];

    rule_label(g, "tools", idx, what, sizeof(what));
    if (!config_setting_is_group(g)) {
        cfg_err(err, errsize, g, file, "%s: must be a group { match = \"...\"; ... }", what);
        return -1;
    }
    /* Keys first: a misspelt "match" is reported as the typo it is. */
    if (check_keys(g, file, what, tool_keys, err, errsize) != 0 ||
        read_match(g, file, what, &r->match, err, errsize) != 0)
        return -1;
    if (opt_number(g, "credits_per_call", file, what, &r->credits_per_call, err, errsize) < 0 ||
        opt_number(g, "usd_per_call", file, what, &r->usd_per_call, err, errsize) < 0)
        return -1;
    return 0;
}

/*
 * Shared checks of a rule list: present, a list, and ending with "*" (so
 * nothing is ever unpriced) with no "*" before the end (rules after it
 * would never be used).
 */
static int check_rule_list(const config_setting_t *group, const config_setting_t *list,
                           const char *name, const char *file, char *err, size_t errsize)
{
    int n;

    if (!list) {
        cfg_err(err, errsize, group, file,
                "%s: missing; it must end with a { match = \"*\"; ... } rule", name);
        return -1;
    }
    if (!config_setting_is_list(list)) {
        cfg_err(err, errsize, list, file, "%s: must be a list ( { match = ...; }, ... )", name);
        return -1;
    }
    n = config_setting_length(list);
    if (n == 0) {
        cfg_err(err, errsize, list, file,
                "%s: empty; it must end with a { match = \"*\"; ... } rule", name);
        return -1;
    }
    return 0;
}

static int check_star(const config_setting_t *list, const char *name, const char *file,
                      const char *const *matches, size_t n, char *err, size_t errsize)
{
    for (size_t i = 0; i + 1 < n; i++) {
        if (strcmp(matches[i], "*") == 0) {
            cfg_err(err, errsize, config_setting_get_elem(list, (unsigned)i), file,
                    "%s[%zu]: match = \"*\" must be the last rule (the rules after it are never "
                    "used)",
                    name, i);
            return -1;
        }
    }
    if (strcmp(matches[n - 1], "*") != 0) {
        cfg_err(err, errsize, config_setting_get_elem(list, (unsigned)(n - 1)), file,
                "%s: the last rule must be match = \"*\" (so that every %s is priced)", name,
                strcmp(name, "models") == 0 ? "model" : "tool");
        return -1;
    }
    return 0;
}

/* --------------------------------------------------------- LiteLLM map */

static void litellm_free(struct bw_litellm *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < m->n; i++)
        free(m->entries[i].key);
    free(m->entries);
    free(m);
}

static int entry_cmp(const void *a, const void *b)
{
    return strcmp(((const bw_litellm_entry *)a)->key, ((const bw_litellm_entry *)b)->key);
}

/*
 * One per-token USD price, as USD per million tokens.
 * @returns 1 present and valid, 0 absent (or null), -1 present but unusable.
 */
static int json_price(const json_t *obj, const char *key, bw_dec *out)
{
    const json_t *v = json_object_get(obj, key);

    if (!v || json_is_null(v))
        return 0;
    if (json_is_integer(v)) {
        json_int_t i = json_integer_value(v);
        if (i < 0)
            return -1;
        bw_dec_from_u64(out, (uint64_t)i);
    } else if (json_is_real(v)) {
        if (bw_dec_from_double(out, json_real_value(v), LITELLM_MAXSIG) != 0)
            return -1;
    } else {
        return -1;
    }
    /* x 10^6, exactly */
    if (bw_dec_mul_u64(out, out, 1000000) != 0)
        return -1;
    bw_dec_normalize(out);
    return 1;
}

/* @returns 1 usable (prices filled), 0 not usable. */
static int litellm_entry(const json_t *obj, bw_litellm_entry *e)
{
    int in, out, cr, cw, re;

    if (!json_is_object(obj))
        return 0;
    in = json_price(obj, "input_cost_per_token", &e->input);
    out = json_price(obj, "output_cost_per_token", &e->output);
    cr = json_price(obj, "cache_read_input_token_cost", &e->cache_read);
    cw = json_price(obj, "cache_creation_input_token_cost", &e->cache_write);
    re = json_price(obj, "output_cost_per_reasoning_token", &e->reasoning);
    /* A price we cannot read makes the whole entry unusable: pricing it with
     * a default instead would silently misprice. */
    if (in != 1 || out != 1 || cr < 0 || cw < 0 || re < 0)
        return 0;
    if (!cr)
        e->cache_read = e->input;
    if (!cw)
        e->cache_write = e->input;
    if (!re)
        e->reasoning = e->output;
    return 1;
}

static int litellm_load(const char *path, struct bw_litellm **out, char *msg, size_t msgsize)
{
    json_error_t jerr;
    json_t *root = NULL, *val;
    const char *key;
    struct bw_litellm *m = NULL;

    root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        bw_seterr(msg, msgsize, "cannot load %s: %s (line %d)", path, jerr.text, jerr.line);
        goto err;
    }
    if (!json_is_object(root)) {
        bw_seterr(msg, msgsize, "cannot load %s: not a JSON object of models", path);
        goto err;
    }
    m = calloc(1, sizeof(*m));
    if (!m || (json_object_size(root) &&
               !(m->entries = calloc(json_object_size(root), sizeof(*m->entries))))) {
        bw_seterr(msg, msgsize, "cannot load %s: out of memory", path);
        goto err;
    }
    json_object_foreach(root, key, val)
    {
        bw_litellm_entry *e = &m->entries[m->n];

        if (!litellm_entry(val, e))
            continue;
        e->key = strdup(key);
        if (!e->key) {
            bw_seterr(msg, msgsize, "cannot load %s: out of memory", path);
            goto err;
        }
        m->n++;
    }
    if (m->n)
        qsort(m->entries, m->n, sizeof(*m->entries), entry_cmp);
    json_decref(root);
    *out = m;
    return 0;
err:
    json_decref(root);
    litellm_free(m);
    return -1;
}

static const bw_litellm_entry *litellm_get(const struct bw_litellm *m, const char *key)
{
    bw_litellm_entry k;

    if (!m || !m->n)
        return NULL;
    k.key = (char *)key;
    return bsearch(&k, m->entries, m->n, sizeof(*m->entries), entry_cmp);
}

/* Exact key first, then without the "provider/" prefix. */
static const bw_litellm_entry *litellm_find(const struct bw_litellm *m, const char *model)
{
    const bw_litellm_entry *e = litellm_get(m, model);
    const char *slash;

    if (e)
        return e;
    slash = strchr(model, '/');
    if (slash && slash[1])
        return litellm_get(m, slash + 1);
    return NULL;
}

/* "dir/of/file" + "/" + rel, or rel when it is absolute or file has no dir. */
static char *resolve_path(const char *file, const char *rel)
{
    const char *slash = file ? strrchr(file, '/') : NULL;
    size_t dirlen, len;
    char *p;

    if (rel[0] == '/' || !slash)
        return strdup(rel);
    dirlen = (size_t)(slash - file);
    len = dirlen + 1 + strlen(rel) + 1;
    p = malloc(len);
    if (p)
        snprintf(p, len, "%.*s/%s", (int)dirlen, file, rel);
    return p;
}

/* ------------------------------------------------------ canonical hash */

typedef struct sbuf {
    char *p;
    size_t len, cap;
    int oom;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void sb_printf(sbuf *b, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (b->oom)
        return;
    for (;;) {
        size_t room = b->cap - b->len;
        va_start(ap, fmt);
        n = vsnprintf(b->p ? b->p + b->len : NULL, room, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = 1;
            return;
        }
        if ((size_t)n < room) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap ? b->cap * 2 : 4096;
        while (cap < b->len + (size_t)n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
}

/* Strings are length-prefixed so that no match text can fake a field. */
static void sb_str(sbuf *b, const char *label, const char *s)
{
    sb_printf(b, " %s=%zu:%s", label, strlen(s), s);
}

static void sb_dec(sbuf *b, const char *label, const bw_dec *d)
{
    char buf[BW_DEC_STRMAX];

    if (bw_dec_to_str(d, buf, sizeof(buf)) < 0) {
        b->oom = 1;
        return;
    }
    sb_printf(b, " %s=%s", label, buf);
}

static void sb_prices(sbuf *b, const bw_dec *in, const bw_dec *out, const bw_dec *cr,
                      const bw_dec *cw, const bw_dec *re)
{
    sb_dec(b, "input", in);
    sb_dec(b, "output", out);
    sb_dec(b, "cache_read", cr);
    sb_dec(b, "cache_write", cw);
    sb_dec(b, "reasoning", re);
}

/*
 * SHA-256 of a canonical text of everything that decides a price, in a
 * fixed order, decimals normalised: reformatting the file (spacing, 1 vs
 * 1.0, comments, key order) keeps the hash, any price change alters it.
 * The LiteLLM map enters through its usable entries, not its path.
 */
static int pricing_hash(bw_pricing *p)
{
    sbuf b = {0};

    sb_printf(&b, "bw-pricing-canonical 1\n");
    sb_str(&b, "version", p->version);
    sb_dec(&b, "credit_usd", &p->credit_usd);
    sb_dec(&b, "minimum_credits", &p->minimum_credits);
    sb_printf(&b, " precision=%d rounding=%s bill_failed_calls=%d\n", p->precision,
              bw_rounding_name(p->rounding), p->bill_failed_calls);
    sb_printf(&b, "models=%zu\n", p->n_models);
    for (size_t i = 0; i < p->n_models; i++) {
        const bw_model_rule *r = &p->models[i];
        sb_str(&b, "model", r->match);
        if (r->has_credits_per_call)
            sb_dec(&b, "credits_per_call", &r->credits_per_call);
        else
            sb_printf(&b, " credits_per_call=none");
        sb_printf(&b, " token_prices=%d", r->has_token_prices);
        sb_prices(&b, &r->input, &r->output, &r->cache_read, &r->cache_write, &r->reasoning);
        sb_printf(&b, "\n");
    }
    sb_printf(&b, "tools=%zu\n", p->n_tools);
    for (size_t i = 0; i < p->n_tools; i++) {
        sb_str(&b, "tool", p->tools[i].match);
        sb_dec(&b, "credits_per_call", &p->tools[i].credits_per_call);
        sb_dec(&b, "usd_per_call", &p->tools[i].usd_per_call);
        sb_printf(&b, "\n");
    }
    if (p->litellm) {
        sb_printf(&b, "litellm=%zu\n", p->litellm->n);
        for (size_t i = 0; i < p->litellm->n; i++) {
            const bw_litellm_entry *e = &p->litellm->entries[i];
            sb_str(&b, "entry", e->key);
            sb_prices(&b, &e->input, &e->output, &e->cache_read, &e->cache_write, &e->reasoning);
            sb_printf(&b, "\n");
        }
    } else {
        sb_printf(&b, "litellm=none\n");
    }
    if (b.oom) {
        free(b.p);
        return -1;
    }
    bw_sha256_hex(b.p, b.len, p->sha256);
    free(b.p);
    return 0;
}

/* ----------------------------------------------------------- building */

void bw_pricing_free(bw_pricing *p)
{
    if (!p)
        return;
    for (size_t i = 0; i < p->n_models; i++)
        free(p->models[i].match);
    free(p->models);
    for (size_t i = 0; i < p->n_tools; i++)
        free(p->tools[i].match);
    free(p->tools);
    free(p->litellm_path);
    litellm_free(p->litellm);
    free(p);
}

static int parse_models(bw_pricing *p, const config_setting_t *group, const char *file, char *err,
                        size_t errsize)
{
    const config_setting_t *list = config_setting_get_member(group, "models");
    const char **matches = NULL;
    int n, rc = -1;

    if (check_rule_list(group, list, "models", file, err, errsize) != 0)
        return -1;
    n = config_setting_length(list);
    p->models = calloc((size_t)n, sizeof(*p->models));
    matches = calloc((size_t)n, sizeof(*matches));
    if (!p->models || !matches) {
        cfg_err(err, errsize, list, file, "models: out of memory");
        goto err;
    }
    for (int i = 0; i < n; i++) {
        bw_model_rule *r = &p->models[i];
        if (parse_model_rule(config_setting_get_elem(list, (unsigned)i), (size_t)i, file, r, err,
                             errsize) != 0) {
            p->n_models = (size_t)i + 1; /* so that bw_pricing_free frees r->match */
            goto err;
        }
        p->n_models = (size_t)i + 1;
        matches[i] = r->match;
    }
    if (check_star(list, "models", file, matches, (size_t)n, err, errsize) != 0)
        goto err;
    {
        const bw_model_rule *star = &p->models[n - 1];
        /* The "*" rule prices calls without usage (flat_fallback): with token
         * prices and no credits_per_call such a call would be free. */
        if (star->has_token_prices && !star->has_credits_per_call) {
            cfg_err(err, errsize, config_setting_get_elem(list, (unsigned)(n - 1)), file,
                    "models: the \"*\" rule has token prices but no credits_per_call; calls "
                    "without usage would be free (add credits_per_call)");
            goto err;
        }
    }
    rc = 0;
err:
    free(matches);
    return rc;
}

static int parse_tools(bw_pricing *p, const config_setting_t *group, const char *file, char *err,
                       size_t errsize)
{
    const config_setting_t *list = config_setting_get_member(group, "tools");
    const char **matches = NULL;
    int n, rc = -1;

    if (check_rule_list(group, list, "tools", file, err, errsize) != 0)
        return -1;
    n = config_setting_length(list);
    p->tools = calloc((size_t)n, sizeof(*p->tools));
    matches = calloc((size_t)n, sizeof(*matches));
    if (!p->tools || !matches) {
        cfg_err(err, errsize, list, file, "tools: out of memory");
        goto err;
    }
    for (int i = 0; i < n; i++) {
        bw_tool_rule *r = &p->tools[i];
        p->n_tools = (size_t)i + 1;
        if (parse_tool_rule(config_setting_get_elem(list, (unsigned)i), (size_t)i, file, r, err,
                            errsize) != 0)
            goto err;
        matches[i] = r->match;
    }
    if (check_star(list, "tools", file, matches, (size_t)n, err, errsize) != 0)
        goto err;
    rc = 0;
err:
    free(matches);
    return rc;
}

int bw_pricing_from_setting(const config_setting_t *group, const char *file, bw_pricing **out,
                            char *err, size_t errsize)
{
    bw_pricing *p = NULL;
    const config_setting_t *s;
    const char *str;

    *out = NULL;
    if (!group) {
        bw_seterr(err, errsize, "%s: pricing: group is missing", file ? file : "pricing");
        return -1;
    }
    if (!config_setting_is_group(group)) {
        cfg_err(err, errsize, group, file, "pricing: must be a group { ... }");
        return -1;
    }
    if (check_keys(group, file, "pricing", pricing_keys, err, errsize) != 0)
        return -1;
    p = calloc(1, sizeof(*p));
    if (!p) {
        cfg_err(err, errsize, group, file, "pricing: out of memory");
        return -1;
    }

    strcpy(p->version, "unversioned");
    if ((s = config_setting_get_member(group, "version"))) {
        if (read_string(s, file, "version", &str, err, errsize) != 0)
            goto err;
        if (*str == '\0' || strlen(str) >= sizeof(p->version)) {
            cfg_err(err, errsize, s, file, "version: must be 1 to %zu bytes",
                    sizeof(p->version) - 1);
            goto err;
        }
        strcpy(p->version, str);
    }

    if (!(s = config_setting_get_member(group, "credit_usd"))) {
        cfg_err(err, errsize, group, file, "credit_usd: missing (the USD value of one credit)");
        goto err;
    }
    if (read_number(s, file, "credit_usd", &p->credit_usd, err, errsize) != 0)
        goto err;
    if (bw_dec_is_zero(&p->credit_usd)) {
        cfg_err(err, errsize, s, file, "credit_usd: must be greater than 0");
        goto err;
    }
    if (bw_dec_inverse(&p->credits_per_usd, &p->credit_usd) != 0) {
        cfg_err(err, errsize, s, file,
                "credit_usd: 1/credit_usd must be a terminating decimal (e.g. 0.01, 0.002, "
                "0.0025)");
        goto err;
    }

    p->precision = 4;
    if ((s = config_setting_get_member(group, "precision"))) {
        bw_dec d, six;
        if (read_number(s, file, "precision", &d, err, errsize) != 0)
            goto err;
        bw_dec_normalize(&d);
        bw_dec_from_u64(&six, 6);
        if (d.scale != 0 || bw_dec_cmp(&d, &six) > 0) {
            cfg_err(err, errsize, s, file, "precision: must be a whole number from 0 to 6");
            goto err;
        }
        p->precision = (int)d.limb[0];
    }

    bw_dec_zero(&p->minimum_credits);
    if ((s = config_setting_get_member(group, "minimum_credits"))) {
        bw_dec d;
        if (read_number(s, file, "minimum_credits", &p->minimum_credits, err, errsize) != 0)
            goto err;
        /* The minimum is charged as is: it must be writable at `precision`. */
        d = p->minimum_credits;
        bw_dec_normalize(&d);
        if (d.scale > p->precision) {
            cfg_err(err, errsize, s, file,
                    "minimum_credits: has more decimals than precision (%d) allows", p->precision);
            goto err;
        }
    }

    p->rounding = BW_ROUND_HALF_UP;
    if ((s = config_setting_get_member(group, "rounding"))) {
        if (read_string(s, file, "rounding", &str, err, errsize) != 0)
            goto err;
        if (bw_rounding_parse(str, &p->rounding) != 0) {
            cfg_err(err, errsize, s, file,
                    "rounding: \"%.64s\" is not one of half_up, half_even, ceil, floor", str);
            goto err;
        }
    }

    p->bill_failed_calls = 1;
    if ((s = config_setting_get_member(group, "bill_failed_calls"))) {
        if (config_setting_type(s) != CONFIG_TYPE_BOOL) {
            cfg_err(err, errsize, s, file, "bill_failed_calls: must be true or false");
            goto err;
        }
        p->bill_failed_calls = config_setting_get_bool(s) ? 1 : 0;
    }

    if (parse_models(p, group, file, err, errsize) != 0 ||
        parse_tools(p, group, file, err, errsize) != 0)
        goto err;

    if ((s = config_setting_get_member(group, "litellm_prices"))) {
        char msg[512];
        const char *src = config_setting_source_file(s) ? config_setting_source_file(s) : file;
        if (read_string(s, file, "litellm_prices", &str, err, errsize) != 0)
            goto err;
        if (*str) {
            p->litellm_path = resolve_path(src, str);
            if (!p->litellm_path) {
                cfg_err(err, errsize, s, file, "litellm_prices: out of memory");
                goto err;
            }
            if (litellm_load(p->litellm_path, &p->litellm, msg, sizeof(msg)) != 0) {
                cfg_err(err, errsize, s, file, "litellm_prices: %s", msg);
                goto err;
            }
        }
    }

    if (pricing_hash(p) != 0) {
        cfg_err(err, errsize, group, file, "pricing: out of memory");
        goto err;
    }
    *out = p;
    return 0;
err:
    bw_pricing_free(p);
    return -1;
}

int bw_pricing_load_file(const char *path, bw_pricing **out, char *err, size_t errsize)
{
    config_t cfg;
    char *dir = NULL;
    const char *slash = strrchr(path, '/');
    int rc = -1;

    *out = NULL;
    config_init(&cfg);
    errno = 0;
    /* @include paths are relative to the including file, like litellm_prices. */
    if (slash) {
        dir = strndup(path, (size_t)(slash - path));
        if (!dir) {
            bw_seterr(err, errsize, "%s: out of memory", path);
            goto err;
        }
        config_set_include_dir(&cfg, dir);
    }
    if (config_read_file(&cfg, path) != CONFIG_TRUE) {
        if (config_error_type(&cfg) == CONFIG_ERR_FILE_IO)
            bw_seterr(err, errsize, "%s: cannot read: %s", path, strerror(errno));
        else
            bw_seterr(err, errsize, "%s:%d: %s",
                      config_error_file(&cfg) ? config_error_file(&cfg) : path,
                      config_error_line(&cfg), config_error_text(&cfg));
        goto err;
    }
    rc = bw_pricing_from_setting(config_lookup(&cfg, "pricing"), path, out, err, errsize);
err:
    config_destroy(&cfg);
    free(dir);
    return rc;
}

/* ------------------------------------------------------------ pricing */

const char *bw_basis_name(bw_basis b)
{
    switch (b) {
    case BW_BASIS_PER_CALL:
        return "per_call";
    case BW_BASIS_TOKENS:
        return "tokens";
    case BW_BASIS_FLAT_FALLBACK:
        return "flat_fallback";
    case BW_BASIS_LITELLM:
        return "litellm";
    case BW_BASIS_UNBILLED:
        return "failed_unbilled";
    }
    return "unknown";
}

static size_t model_rule_index(const bw_pricing *p, const char *model)
{
    for (size_t i = 0; i < p->n_models; i++)
        if (fnmatch(p->models[i].match, model, 0) == 0)
            return i;
    return p->n_models - 1; /* unreachable: the last rule is "*" */
}

const bw_model_rule *bw_pricing_model_rule(const bw_pricing *p, const char *model)
{
    if (!p || !p->n_models)
        return NULL;
    return &p->models[model_rule_index(p, model)];
}

const bw_tool_rule *bw_pricing_tool_rule(const bw_pricing *p, const char *tool)
{
    if (!p || !p->n_tools)
        return NULL;
    for (size_t i = 0; i < p->n_tools; i++)
        if (fnmatch(p->tools[i].match, tool, 0) == 0)
            return &p->tools[i];
    return &p->tools[p->n_tools - 1];
}

/* acc += count * price. */
static int add_term(bw_dec *acc, uint64_t count, const bw_dec *price)
{
    bw_dec t;

    if (count == 0)
        return 0;
    if (bw_dec_mul_u64(&t, price, count) != 0)
        return -1;
    return bw_dec_add(acc, acc, &t);
}

/*
 * credits = credits_per_call + usd * credits_per_usd, where usd is the
 * token cost (prices per Mtok). Exact; -1 only on overflow.
 */
static int model_cost(const bw_pricing *p, const bw_model_rule *r, const bw_call *c, bw_dec *cost)
{
    bw_dec usd;

    bw_dec_zero(&usd);
    if (c->has_usage && r->has_token_prices) {
        const bw_usage *u = &c->usage;
        if (add_term(&usd, u->input, &r->input) != 0 ||
            add_term(&usd, u->cache_read, &r->cache_read) != 0 ||
            add_term(&usd, u->cache_write, &r->cache_write) != 0 ||
            add_term(&usd, u->output - u->reasoning, &r->output) != 0 ||
            add_term(&usd, u->reasoning, &r->reasoning) != 0 || bw_dec_div_pow10(&usd, 6) != 0 ||
            bw_dec_mul(&usd, &usd, &p->credits_per_usd) != 0)
            return -1;
    }
    if (r->has_credits_per_call)
        return bw_dec_add(cost, &r->credits_per_call, &usd);
    *cost = usd;
    return 0;
}

/* units * (credits_per_call + usd_per_call * credits_per_usd) */
static int tool_cost(const bw_pricing *p, const bw_tool_rule *r, uint64_t units, bw_dec *cost)
{
    bw_dec one;

    if (bw_dec_mul(&one, &r->usd_per_call, &p->credits_per_usd) != 0 ||
        bw_dec_add(&one, &one, &r->credits_per_call) != 0)
        return -1;
    return bw_dec_mul_u64(cost, &one, units);
}

static int add_u64(uint64_t *acc, uint64_t v)
{
    if (*acc > UINT64_MAX - v)
        return -1;
    *acc += v;
    return 0;
}

static int add_usage(bw_usage *acc, const bw_usage *u)
{
    return add_u64(&acc->input, u->input) || add_u64(&acc->cache_read, u->cache_read) ||
                   add_u64(&acc->cache_write, u->cache_write) || add_u64(&acc->output, u->output) ||
                   add_u64(&acc->reasoning, u->reasoning)
               ? -1
               : 0;
}

/* The line for (kind, name, basis), appended on first appearance. */
static bw_line *line_for(bw_charge *c, size_t *cap, bw_event_type kind, const char *name,
                         bw_basis basis)
{
    bw_line *l;

    for (size_t i = 0; i < c->n_lines; i++) {
        l = &c->lines[i];
        if (l->kind == kind && l->basis == basis && strcmp(l->name, name) == 0)
            return l;
    }
    if (c->n_lines == *cap) {
        size_t ncap = *cap ? *cap * 2 : 8;
        bw_line *nl = realloc(c->lines, ncap * sizeof(*nl));
        if (!nl)
            return NULL;
        c->lines = nl;
        *cap = ncap;
    }
    l = &c->lines[c->n_lines++];
    memset(l, 0, sizeof(*l));
    l->kind = kind;
    l->basis = basis;
    strcpy(l->name, name); /* length checked by the caller */
    bw_dec_zero(&l->credits);
    bw_dec_zero(&l->credits_per_call);
    bw_dec_zero(&l->usd_per_call);
    bw_dec_zero(&l->in);
    bw_dec_zero(&l->out);
    bw_dec_zero(&l->cache_read);
    bw_dec_zero(&l->cache_write);
    bw_dec_zero(&l->reasoning);
    return l;
}

int bw_pricing_price(const bw_pricing *p, const bw_call *calls, size_t n, int apply_minimum,
                     bw_charge *out, char *err, size_t errsize)
{
    size_t cap = 0;

    memset(out, 0, sizeof(*out));
    bw_dec_zero(&out->exact);
    for (size_t i = 0; i < n; i++) {
        const bw_call *c = &calls[i];
        bw_dec cost;
        bw_basis basis;
        bw_line *l;
        const bw_model_rule *mrule = NULL;
        bw_model_rule lr; /* LiteLLM prices as a rule: mrule may point here */
        const bw_tool_rule *trule = NULL;
        static const bw_usage no_usage;
        const bw_usage *u = &no_usage;

        if (!c->name || strlen(c->name) > BW_NAME_MAX) {
            bw_seterr(err, errsize, "call %zu: name missing or longer than %d bytes", i,
                      BW_NAME_MAX);
            goto err;
        }
        if (c->type == BW_EV_MODEL) {
            size_t idx = model_rule_index(p, c->name);
            const bw_model_rule *r = &p->models[idx];
            const bw_litellm_entry *e = NULL;

            if (c->has_usage) {
                u = &c->usage;
                if (u->reasoning > u->output) {
                    bw_seterr(err, errsize, "call %zu (%s): reasoning tokens exceed output", i,
                              c->name);
                    goto err;
                }
            }
            /* LiteLLM fills in for models that only the "*" rule matches. */
            if (idx == p->n_models - 1 && (e = litellm_find(p->litellm, c->name))) {
                memset(&lr, 0, sizeof(lr));
                lr.match = r->match;
                lr.has_token_prices = 1;
                lr.input = e->input;
                lr.output = e->output;
                lr.cache_read = e->cache_read;
                lr.cache_write = e->cache_write;
                lr.reasoning = e->reasoning;
                r = &lr;
            }
            if (c->failed && !p->bill_failed_calls) {
                basis = BW_BASIS_UNBILLED;
                bw_dec_zero(&cost);
            } else {
                if (!c->has_usage && r->has_token_prices && !r->has_credits_per_call) {
                    /* Never free because usage is missing. */
                    r = &p->models[p->n_models - 1];
                    basis = BW_BASIS_FLAT_FALLBACK;
                } else if (e) {
                    basis = BW_BASIS_LITELLM;
                } else {
                    basis = r->has_token_prices ? BW_BASIS_TOKENS : BW_BASIS_PER_CALL;
                }
                mrule = r;
                if (model_cost(p, r, c, &cost) != 0) {
                    bw_seterr(err, errsize, "call %zu (%s): credits overflow", i, c->name);
                    goto err;
                }
            }
            if (add_u64(&out->model_calls, 1) != 0 || add_usage(&out->tokens, u) != 0)
                goto overflow;
        } else if (c->type == BW_EV_TOOL) {
            const bw_tool_rule *r = bw_pricing_tool_rule(p, c->name);
            trule = r;

            if (c->units < 1 || c->units > BW_UNITS_MAX) {
                bw_seterr(err, errsize, "call %zu (%s): units must be 1..%llu", i, c->name,
                          (unsigned long long)BW_UNITS_MAX);
                goto err;
            }
            if (c->failed && !p->bill_failed_calls) {
                basis = BW_BASIS_UNBILLED;
                bw_dec_zero(&cost);
            } else {
                basis = BW_BASIS_PER_CALL;
                if (tool_cost(p, r, c->units, &cost) != 0) {
                    bw_seterr(err, errsize, "call %zu (%s): credits overflow", i, c->name);
                    goto err;
                }
            }
            if (add_u64(&out->tool_calls, 1) != 0)
                goto overflow;
        } else {
            bw_seterr(err, errsize, "call %zu (%s): not a model or tool call", i, c->name);
            goto err;
        }

        l = line_for(out, &cap, c->type, c->name, basis);
        if (!l) {
            bw_seterr(err, errsize, "out of memory");
            goto err;
        }
        /* One line = one name priced one way: its first call's rule says it. */
        if (l->calls == 0 && mrule) {
            if (mrule->has_credits_per_call)
                l->credits_per_call = mrule->credits_per_call;
            if (mrule->has_token_prices && basis != BW_BASIS_FLAT_FALLBACK) {
                l->in = mrule->input;
                l->out = mrule->output;
                l->cache_read = mrule->cache_read;
                l->cache_write = mrule->cache_write;
                l->reasoning = mrule->reasoning;
            }
        } else if (l->calls == 0 && trule) {
            l->credits_per_call = trule->credits_per_call;
            l->usd_per_call = trule->usd_per_call;
        }
        if (add_u64(&l->calls, 1) != 0 ||
            (c->type == BW_EV_TOOL && add_u64(&l->units, c->units) != 0) ||
            add_usage(&l->tokens, u) != 0 || bw_dec_add(&l->credits, &l->credits, &cost) != 0)
            goto overflow;
    }

    for (size_t i = 0; i < out->n_lines; i++)
        if (bw_dec_add(&out->exact, &out->exact, &out->lines[i].credits) != 0)
            goto overflow;
    if (bw_dec_round(&out->amount, &out->exact, p->precision, p->rounding) != 0)
        goto overflow;
    if (apply_minimum) {
        bw_dec min;
        /* Exact: minimum_credits has at most `precision` decimals (checked
         * at load), so this only sets the scale. */
        if (bw_dec_round(&min, &p->minimum_credits, p->precision, p->rounding) != 0)
            goto overflow;
        if (bw_dec_cmp(&out->amount, &min) < 0) {
            out->amount = min;
            out->minimum_applied = 1;
        }
    }
    if (bw_dec_to_micro(&out->amount, &out->amount_micro) != 0) {
        bw_seterr(err, errsize, "amount does not fit in int64 millionths");
        goto err;
    }
    if (bw_dec_mul(&out->cost_usd, &out->amount, &p->credit_usd) != 0 ||
        bw_dec_round(&out->cost_usd, &out->cost_usd, 6, BW_ROUND_HALF_UP) != 0)
        goto overflow;
    return 0;
overflow:
    bw_seterr(err, errsize, "overflow while pricing %zu calls", n);
err:
    bw_charge_free(out);
    return -1;
}

void bw_charge_free(bw_charge *c)
{
    if (!c)
        return;
    free(c->lines);
    memset(c, 0, sizeof(*c));
}

/*
 * test_pricing.c - the pricing engine (bw_pricing.h, PRODUCT.md section 6).
 *
 * Every expected amount was computed by hand; the arithmetic is in the
 * comment next to it. Prices are USD per million tokens (Mtok); with
 * credit_usd = 0.002 one USD is 1 / 0.002 = 500 credits.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "bw_pricing.h"

#define N(a) (sizeof(a) / sizeof((a)[0]))
#define T40  1099511627775ULL /* 2^40 - 1, the largest token count an event may carry */

static char tmpdir[256];

/* ---------------------------------------------------------------- helpers */

static const char *tmp_path(const char *name)
{
    static char path[512];

    snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
    return path;
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");

    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
}

/* Load a pricing from config text; fails the test on error. */
static bw_pricing *load_text(const char *text)
{
    char err[512] = "";
    char path[512];
    bw_pricing *p = NULL;

    snprintf(path, sizeof(path), "%s", tmp_path("pricing.cfg"));
    write_file(path, text);
    if (bw_pricing_load_file(path, &p, err, sizeof(err)) != 0)
        fail_msg("load failed: %s\n---\n%s", err, text);
    unlink(path);
    return p;
}

/* Load config text that must fail; returns the error message. */
static const char *load_error(const char *text)
{
    static char err[512];
    char path[512];
    bw_pricing *p = NULL;

    err[0] = '\0';
    snprintf(path, sizeof(path), "%s", tmp_path("pricing.cfg"));
    write_file(path, text);
    if (bw_pricing_load_file(path, &p, err, sizeof(err)) == 0) {
        bw_pricing_free(p);
        fail_msg("load should fail:\n%s", text);
    }
    assert_null(p);
    unlink(path);
    return err;
}

static bw_call model(const char *name, uint64_t in, uint64_t cr, uint64_t cw, uint64_t out,
                     uint64_t re)
{
    bw_call c;

    memset(&c, 0, sizeof(c));
    c.type = BW_EV_MODEL;
    c.name = name;
    c.has_usage = 1;
    c.usage.input = in;
    c.usage.cache_read = cr;
    c.usage.cache_write = cw;
    c.usage.output = out;
    c.usage.reasoning = re;
    return c;
}

static bw_call model_nousage(const char *name)
{
    bw_call c;

    memset(&c, 0, sizeof(c));
    c.type = BW_EV_MODEL;
    c.name = name;
    return c;
}

static bw_call tool(const char *name, uint64_t units)
{
    bw_call c;

    memset(&c, 0, sizeof(c));
    c.type = BW_EV_TOOL;
    c.name = name;
    c.units = units;
    return c;
}

static const char *dstr(const bw_dec *d)
{
    static char buf[4][BW_DEC_STRMAX];
    static int i;

    i = (i + 1) % 4;
    if (bw_dec_to_str(d, buf[i], sizeof(buf[i])) < 0)
        return "<to_str failed>";
    return buf[i];
}

static const char *dfixed(const bw_dec *d, int decimals)
{
    static char buf[BW_DEC_STRMAX];

    if (bw_dec_to_str_fixed(d, decimals, buf, sizeof(buf)) < 0)
        return "<to_str_fixed failed>";
    return buf;
}

static void price(const bw_pricing *p, const bw_call *calls, size_t n, int apply_minimum,
                  bw_charge *c)
{
    char err[256] = "";

    if (bw_pricing_price(p, calls, n, apply_minimum, c, err, sizeof(err)) != 0)
        fail_msg("price failed: %s", err);
    assert_int_equal(c->amount.scale, p->precision);
}

static void check_line(const bw_charge *c, size_t i, bw_event_type kind, const char *name,
                       bw_basis basis, uint64_t calls, const char *credits)
{
    assert_true(i < c->n_lines);
    assert_int_equal(c->lines[i].kind, kind);
    assert_string_equal(c->lines[i].name, name);
    assert_string_equal(bw_basis_name(c->lines[i].basis), bw_basis_name(basis));
    assert_int_equal(c->lines[i].calls, calls);
    assert_string_equal(dstr(&c->lines[i].credits), credits);
}

/* A one-line config: the models and tools lists given, credit_usd 0.002. */
#define CFG(extra, models, tools)                                                                  \
    "pricing = {\n  credit_usd = 0.002;\n" extra "  models = ( " models " );\n"                    \
    "  tools = ( " tools " );\n};\n"
#define STAR_MODEL "{ match = \"*\"; credits_per_call = 1; }"
#define STAR_TOOL  "{ match = \"*\"; credits_per_call = 2; }"

static int setup(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/bw-test-pricing-XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    return rmdir(tmpdir);
}

/* ------------------------------------------------- the old system's bill */

static void test_legacy_example(void **state)
{
    bw_pricing *p = NULL;
    char err[256];
    bw_charge c;
    /* PRODUCT.md section 3: 3 gpt-4o calls and one web_search. */
    bw_call calls[] = {model_nousage("gpt-4o"), tool("web_search", 1), model_nousage("gpt-4o"),
                       model_nousage("gpt-4o")};

    (void)state;
    assert_int_equal(
        bw_pricing_load_file(BW_SOURCE_DIR "/examples/pricing-legacy.cfg", &p, err, sizeof(err)),
        0);
    assert_string_equal(p->version, "legacy-1");
    assert_string_equal(dstr(&p->credit_usd), "0.002");
    assert_string_equal(dstr(&p->credits_per_usd), "500"); /* 1 / 0.002 */
    assert_int_equal(strlen(p->sha256), 64);

    price(p, calls, N(calls), 1, &c);
    assert_int_equal(c.n_lines, 2);
    check_line(&c, 0, BW_EV_MODEL, "gpt-4o", BW_BASIS_PER_CALL, 3, "3");    /* 3 x 1 */
    check_line(&c, 1, BW_EV_TOOL, "web_search", BW_BASIS_PER_CALL, 1, "2"); /* 1 x 2 */
    assert_int_equal(c.lines[1].units, 1);
    assert_string_equal(dstr(&c.exact), "5");
    assert_string_equal(dfixed(&c.amount, 4), "5.0000");
    assert_true(c.amount_micro == 5000000);
    assert_string_equal(dfixed(&c.cost_usd, 6), "0.010000"); /* 5 x 0.002 */
    assert_int_equal(c.minimum_applied, 0);
    assert_int_equal(c.model_calls, 3);
    assert_int_equal(c.tool_calls, 1);
    bw_charge_free(&c);
    bw_pricing_free(p);
}

static void test_tokens_example(void **state)
{
    bw_pricing *p = NULL;
    char err[256];
    bw_charge c;
    bw_call calls[] = {
        /* gpt-4o: (1000 x 2.50 + 500 x 10.00) / 10^6 = 0.0075 USD x 500 = 3.75 */
        model("gpt-4o", 1000, 0, 0, 500, 0),
        /* claude-sonnet-4-20250514 via "claude-sonnet-4*":
         * (1000 x 3 + 2000 x 0.30 + 1000 x 3.75 + 100 x 15) / 10^6
         * = (3000 + 600 + 3750 + 1500) / 10^6 = 0.00885 USD x 500 = 4.425 */
        model("claude-sonnet-4-20250514", 1000, 2000, 1000, 100, 0),
        /* o3-mini: (1000 x 1.10 + (800 - 600) x 4.40 + 600 x 4.40) / 10^6
         * = (1100 + 880 + 2640) / 10^6 = 0.00462 USD x 500 = 2.31 */
        model("o3-mini", 1000, 0, 0, 800, 600),
        /* web_search: 2 units x 0.01 USD x 500 = 10 */
        tool("web_search", 2),
        /* gpt-4.1 is in no rule: LiteLLM 2e-06 / 8e-06 per token = 2 / 8 per Mtok:
         * (1000 x 2 + 1000 x 8) / 10^6 = 0.01 USD x 500 = 5 */
        model("gpt-4.1", 1000, 0, 0, 1000, 0),
    };

    (void)state;
    assert_int_equal(
        bw_pricing_load_file(BW_SOURCE_DIR "/examples/pricing-tokens.cfg", &p, err, sizeof(err)),
        0);
    assert_string_equal(p->version, "2026-12-01");
    assert_non_null(p->litellm);
    assert_string_equal(p->litellm_path, BW_SOURCE_DIR "/examples/litellm_model_prices.json");

    price(p, calls, N(calls), 1, &c);
    assert_int_equal(c.n_lines, 5);
    check_line(&c, 0, BW_EV_MODEL, "gpt-4o", BW_BASIS_TOKENS, 1, "3.75");
    check_line(&c, 1, BW_EV_MODEL, "claude-sonnet-4-20250514", BW_BASIS_TOKENS, 1, "4.425");
    check_line(&c, 2, BW_EV_MODEL, "o3-mini", BW_BASIS_TOKENS, 1, "2.31");
    check_line(&c, 3, BW_EV_TOOL, "web_search", BW_BASIS_PER_CALL, 1, "10");
    check_line(&c, 4, BW_EV_MODEL, "gpt-4.1", BW_BASIS_LITELLM, 1, "5");
    /* 3.75 + 4.425 + 2.31 + 10 + 5 = 25.485 */
    assert_string_equal(dfixed(&c.amount, 4), "25.4850");
    assert_string_equal(dfixed(&c.cost_usd, 6), "0.050970"); /* 25.485 x 0.002 */
    bw_charge_free(&c);
    bw_pricing_free(p);
}

/* ------------------------------------------------------- token pricing */

static void test_usage_classes(void **state)
{
    static const struct {
        uint64_t in, cr, cw, out, re;
        const char *credits, *amount;
    } cases[] = {
        /* 1000 x 2.5 / 10^6 = 0.0025 USD x 500 */
        {1000, 0, 0, 0, 0, "1.25", "1.2500"},
        /* 1000 x 10 / 10^6 = 0.01 USD x 500 */
        {0, 0, 0, 1000, 0, "5", "5.0000"},
        /* 1000 x 1.25 / 10^6 = 0.00125 USD x 500 */
        {0, 1000, 0, 0, 0, "0.625", "0.6250"},
        /* 1000 x 3.75 / 10^6 = 0.00375 USD x 500 */
        {0, 0, 1000, 0, 0, "1.875", "1.8750"},
        /* (600 x 10 + 400 x 20) / 10^6 = 0.014 USD x 500 */
        {0, 0, 0, 1000, 400, "7", "7.0000"},
        /* all output is reasoning: 400 x 20 / 10^6 = 0.008 USD x 500 */
        {0, 0, 0, 400, 400, "4", "4.0000"},
        /* 2500 + 1250 + 3750 + 6000 + 8000 = 21500 / 10^6 = 0.0215 USD x 500 */
        {1000, 1000, 1000, 1000, 400, "10.75", "10.7500"},
        /* 1 x 2.5 / 10^6 = 0.0000025 USD x 500 = 0.00125; 4 decimals half up:
         * 0.0012|5 -> 0.0013 */
        {1, 0, 0, 0, 0, "0.00125", "0.0013"},
        /* a usage object with zero tokens costs nothing */
        {0, 0, 0, 0, 0, "0", "0.0000"},
    };
    bw_pricing *p =
        load_text(CFG("",
                      "{ match = \"m\"; input_usd_per_mtok = 2.5; output_usd_per_mtok = 10;"
                      " cache_read_usd_per_mtok = 1.25; cache_write_usd_per_mtok = 3.75;"
                      " reasoning_usd_per_mtok = 20; }, " STAR_MODEL,
                      STAR_TOOL));

    (void)state;
    for (size_t i = 0; i < N(cases); i++) {
        bw_call call = model("m", cases[i].in, cases[i].cr, cases[i].cw, cases[i].out, cases[i].re);
        bw_charge c;
        price(p, &call, 1, 1, &c);
        assert_int_equal(c.n_lines, 1);
        check_line(&c, 0, BW_EV_MODEL, "m", BW_BASIS_TOKENS, 1, cases[i].credits);
        assert_string_equal(dfixed(&c.amount, 4), cases[i].amount);
        assert_int_equal(c.tokens.input, cases[i].in);
        assert_int_equal(c.tokens.cache_read, cases[i].cr);
        assert_int_equal(c.tokens.cache_write, cases[i].cw);
        assert_int_equal(c.tokens.output, cases[i].out);
        assert_int_equal(c.tokens.reasoning, cases[i].re);
        assert_int_equal(c.lines[0].tokens.output, cases[i].out);
        bw_charge_free(&c);
    }
    bw_pricing_free(p);
}

static void test_price_defaults(void **state)
{
    static const struct {
        uint64_t in, cr, cw, out, re;
        const char *credits;
    } cases[] = {
        /* cache_read defaults to input (3): 10^6 x 3 / 10^6 = 3 USD x 500 */
        {0, 1000000, 0, 0, 0, "1500"},
        /* cache_write defaults to input (3): 1000 x 3 / 10^6 = 0.003 USD x 500 */
        {0, 0, 1000, 0, 0, "1.5"},
        /* reasoning defaults to output (15): 1000 x 15 / 10^6 = 0.015 USD x 500 */
        {0, 0, 0, 1000, 1000, "7.5"},
    };
    bw_pricing *p = load_text(
        CFG("", "{ match = \"d\"; input_usd_per_mtok = 3; output_usd_per_mtok = 15; }, " STAR_MODEL,
            STAR_TOOL));
    const bw_model_rule *r = bw_pricing_model_rule(p, "d");

    (void)state;
    assert_int_equal(r->has_token_prices, 1);
    assert_int_equal(r->has_credits_per_call, 0);
    assert_string_equal(dstr(&r->cache_read), "3");
    assert_string_equal(dstr(&r->cache_write), "3");
    assert_string_equal(dstr(&r->reasoning), "15");
    r = bw_pricing_model_rule(p, "other");
    assert_int_equal(r->has_token_prices, 0);
    assert_int_equal(r->has_credits_per_call, 1);
    for (size_t i = 0; i < N(cases); i++) {
        bw_call call = model("d", cases[i].in, cases[i].cr, cases[i].cw, cases[i].out, cases[i].re);
        bw_charge c;
        price(p, &call, 1, 1, &c);
        check_line(&c, 0, BW_EV_MODEL, "d", BW_BASIS_TOKENS, 1, cases[i].credits);
        bw_charge_free(&c);
    }
    bw_pricing_free(p);
}

static void test_mixed_model_prices(void **state)
{
    bw_pricing *p = load_text(CFG("",
                                  "{ match = \"s\"; credits_per_call = 5; input_usd_per_mtok = 2.5;"
                                  " output_usd_per_mtok = 10; }, " STAR_MODEL,
                                  STAR_TOOL));
    bw_call calls[] = {
        /* 5 + (1000 x 2.5 + 500 x 10) / 10^6 x 500 = 5 + 0.0075 x 500 = 8.75 */
        model("s", 1000, 0, 0, 500, 0),
        /* no usage, but credits_per_call: the rule's own 5 credits, basis tokens */
        model_nousage("s"),
    };
    bw_charge c;

    (void)state;
    price(p, calls, N(calls), 1, &c);
    assert_int_equal(c.n_lines, 1);
    check_line(&c, 0, BW_EV_MODEL, "s", BW_BASIS_TOKENS, 2, "13.75"); /* 8.75 + 5 */
    bw_charge_free(&c);
    bw_pricing_free(p);
}

static void test_small_price(void **state)
{
    /* 0.075 USD/Mtok at 0.002 USD/credit */
    static const struct {
        const char *rounding;
        uint64_t tokens;
        const char *credits, *amount, *cost;
        int64_t micro;
    } cases[] = {
        /* 1 x 0.075 / 10^6 = 0.000000075 USD x 500 = 0.0000375;
         * half_up at 4 decimals: 0.0000|375 -> 0.0000 */
        {"half_up", 1, "0.0000375", "0.0000", "0.000000", 0},
        /* ceil: any dropped digit rounds up */
        {"ceil", 1, "0.0000375", "0.0001", "0.000000", 100}, /* 0.0001 x 0.002 = 0.0000002 */
        /* 1000 x 0.075 / 10^6 = 0.000075 USD x 500 = 0.0375; 0.0375 x 0.002 = 0.000075 */
        {"half_up", 1000, "0.0375", "0.0375", "0.000075", 37500},
    };

    (void)state;
    for (size_t i = 0; i < N(cases); i++) {
        char text[1024];
        snprintf(text, sizeof(text),
                 CFG("  rounding = \"%s\";\n",
                     "{ match = \"c\"; input_usd_per_mtok = 0.075; }, " STAR_MODEL, STAR_TOOL),
                 cases[i].rounding);
        bw_pricing *p = load_text(text);
        bw_call call = model("c", cases[i].tokens, 0, 0, 0, 0);
        bw_charge c;

        price(p, &call, 1, 1, &c);
        check_line(&c, 0, BW_EV_MODEL, "c", BW_BASIS_TOKENS, 1, cases[i].credits);
        assert_string_equal(dfixed(&c.amount, 4), cases[i].amount);
        assert_string_equal(dfixed(&c.cost_usd, 6), cases[i].cost);
        assert_true(c.amount_micro == cases[i].micro);
        bw_charge_free(&c);
        bw_pricing_free(p);
    }
}

static void test_token_limits(void **state)
{
    bw_pricing *p = load_text(CFG("",
                                  "{ match = \"g\"; input_usd_per_mtok = 2.5;"
                                  " output_usd_per_mtok = 10; cache_read_usd_per_mtok = 1.25; }, "
                                  "" STAR_MODEL,
                                  STAR_TOOL));
    /* T = 2^40 - 1 of every class, all output is reasoning:
     * T x (2.5 + 1.25 + 2.5 [cache write = input] + 10 [reasoning = output]) = T x 16.25
     * T x 16 = 17592186044400, T / 4 = 274877906943.75, sum 17867063951343.75
     * / 10^6 = 17867063.95134375 USD x 500 = 8933531975.671875 credits */
    bw_call one = model("g", T40, T40, T40, T40, T40);
    bw_call two[] = {one, one};
    bw_charge c;
    char err[256];

    (void)state;
    price(p, &one, 1, 1, &c);
    check_line(&c, 0, BW_EV_MODEL, "g", BW_BASIS_TOKENS, 1, "8933531975.671875");
    /* half up at 4 decimals: 8933531975.6718|75 -> .6719 */
    assert_string_equal(dfixed(&c.amount, 4), "8933531975.6719");
    assert_true(c.amount_micro == 8933531975671900LL);
    /* 8933531975.6719 x 0.002 = 17867063.9513438 -> 6 decimals half up */
    assert_string_equal(dfixed(&c.cost_usd, 6), "17867063.951344");
    bw_charge_free(&c);

    price(p, two, N(two), 1, &c);
    /* 2 x 8933531975.671875 = 17867063951.34375; .3437|5 -> .3438 */
    check_line(&c, 0, BW_EV_MODEL, "g", BW_BASIS_TOKENS, 2, "17867063951.34375");
    assert_string_equal(dfixed(&c.amount, 4), "17867063951.3438");
    assert_true(c.amount_micro == 17867063951343800LL);
    /* 17867063951.3438 x 0.002 = 35734127.9026876 -> 35734127.902688 */
    assert_string_equal(dfixed(&c.cost_usd, 6), "35734127.902688");
    assert_true(c.tokens.input == 2 * T40); /* 2199023255550 */
    assert_true(c.tokens.reasoning == 2 * T40);
    assert_true(c.lines[0].tokens.cache_write == 2 * T40);
    bw_charge_free(&c);

    /* Token totals are uint64 sums: 2^63 + 2^63 overflows and is refused. */
    two[0] = model("g", 1ULL << 63, 0, 0, 0, 0);
    two[1] = two[0];
    assert_int_equal(bw_pricing_price(p, two, 2, 1, &c, err, sizeof(err)), -1);
    assert_null(c.lines);
    assert_int_equal(c.n_lines, 0);
    bw_pricing_free(p);
}

/* ----------------------------------------------------------------- tools */

static void test_tools(void **state)
{
    static const struct {
        const char *name;
        uint64_t units;
        const char *credits;
    } cases[] = {
        {"web_search", 3, "6"},             /* 3 x 2 */
        {"search_api", 3, "15"},            /* 3 x (0.01 USD x 500) = 3 x 5 */
        {"mixed", 4, "6"},                  /* 4 x (1 + 0.001 x 500) = 4 x 1.5 */
        {"other", 1, "2.5"},                /* the "*" rule */
        {"web_search", 1000000, "2000000"}, /* 10^6 units x 2 */
        {"search_api", 1000000, "5000000"}, /* 10^6 x 5 */
    };
    bw_pricing *p =
        load_text(CFG("", STAR_MODEL,
                      "{ match = \"web_search\"; credits_per_call = 2; },"
                      " { match = \"search_api\"; usd_per_call = 0.01; },"
                      " { match = \"mixed\"; credits_per_call = 1; usd_per_call = 0.001; },"
                      " { match = \"*\"; credits_per_call = 2.5; }"));

    (void)state;
    for (size_t i = 0; i < N(cases); i++) {
        bw_call call = tool(cases[i].name, cases[i].units);
        bw_charge c;
        price(p, &call, 1, 0, &c);
        check_line(&c, 0, BW_EV_TOOL, cases[i].name, BW_BASIS_PER_CALL, 1, cases[i].credits);
        assert_int_equal(c.lines[0].units, cases[i].units);
        assert_int_equal(c.tool_calls, 1);
        assert_int_equal(c.model_calls, 0);
        bw_charge_free(&c);
    }
    bw_pricing_free(p);
}

/* -------------------------------------------------------- minimum, lines */

static void test_minimum(void **state)
{
    static const struct {
        const char *cpc, *rounding;
        int ncalls, apply;
        const char *amount;
        int applied;
    } cases[] = {
        {"0.25", "half_up", 0, 1, "1.0000", 1}, /* empty request: the minimum */
        {"0.25", "half_up", 0, 0, "0.0000", 0}, /* empty adjustment: nothing */
        {"0.25", "half_up", 1, 1, "1.0000", 1}, /* 0.25 < 1 */
        {"0.25", "half_up", 1, 0, "0.2500", 0}, /* adjustments are never raised */
        {"0.25", "half_up", 4, 1, "1.0000", 0}, /* 4 x 0.25 = 1: not below */
        {"0.25", "half_up", 5, 1, "1.2500", 0}, /* 5 x 0.25 = 1.25 */
        /* the minimum applies after rounding: 0.99995 -> 1.0000 half up ... */
        {"0.99995", "half_up", 1, 1, "1.0000", 0},
        /* ... but 0.9999 with floor, which is below 1 */
        {"0.99995", "floor", 1, 1, "1.0000", 1},
        {"0.99995", "floor", 1, 0, "0.9999", 0},
    };

    (void)state;
    for (size_t i = 0; i < N(cases); i++) {
        char text[1024];
        bw_call calls[5];
        bw_charge c;

        snprintf(text, sizeof(text),
                 "pricing = { credit_usd = 0.002; minimum_credits = 1; rounding = \"%s\";\n"
                 "  models = ( { match = \"*\"; credits_per_call = %s; } );\n"
                 "  tools = ( " STAR_TOOL " ); };\n",
                 cases[i].rounding, cases[i].cpc);
        bw_pricing *p = load_text(text);
        for (int k = 0; k < cases[i].ncalls; k++)
            calls[k] = model_nousage("x");
        price(p, calls, (size_t)cases[i].ncalls, cases[i].apply, &c);
        if (strcmp(dfixed(&c.amount, 4), cases[i].amount) != 0)
            fail_msg("case %zu: amount %s, want %s", i, dfixed(&c.amount, 4), cases[i].amount);
        assert_int_equal(c.minimum_applied, cases[i].applied);
        assert_int_equal(c.n_lines, (size_t)(cases[i].ncalls ? 1 : 0));
        bw_charge_free(&c);
        bw_pricing_free(p);
    }
}

static void test_lines_grouping(void **state)
{
    bw_pricing *p = load_text(CFG("", STAR_MODEL, STAR_TOOL));
    bw_call calls[] = {model_nousage("a"), tool("t", 1), model_nousage("b"), model_nousage("a"),
                       tool("t", 2)};
    bw_charge c;

    (void)state;
    price(p, calls, N(calls), 1, &c);
    /* order of first appearance: a, t, b */
    assert_int_equal(c.n_lines, 3);
    check_line(&c, 0, BW_EV_MODEL, "a", BW_BASIS_PER_CALL, 2, "2");
    check_line(&c, 1, BW_EV_TOOL, "t", BW_BASIS_PER_CALL, 2, "6"); /* (1 + 2) x 2 */
    assert_int_equal(c.lines[1].units, 3);
    check_line(&c, 2, BW_EV_MODEL, "b", BW_BASIS_PER_CALL, 1, "1");
    assert_string_equal(dfixed(&c.amount, 4), "9.0000");
    bw_charge_free(&c);
    bw_pricing_free(p);
}

static void test_failed_calls(void **state)
{
    bw_call calls[] = {model_nousage("gpt-4o"), model("gpt-4o", 100, 0, 0, 0, 0), tool("ws", 3),
                       tool("ws", 1)};
    bw_pricing *p;
    bw_charge c;

    (void)state;
    calls[1].failed = 1;
    calls[2].failed = 1;

    /* bill_failed_calls = false: counted, 0 credits, their own lines */
    p = load_text(CFG("  bill_failed_calls = false;\n", STAR_MODEL, STAR_TOOL));
    assert_int_equal(p->bill_failed_calls, 0);
    price(p, calls, N(calls), 0, &c);
    assert_int_equal(c.n_lines, 4);
    check_line(&c, 0, BW_EV_MODEL, "gpt-4o", BW_BASIS_PER_CALL, 1, "1");
    check_line(&c, 1, BW_EV_MODEL, "gpt-4o", BW_BASIS_UNBILLED, 1, "0");
    assert_int_equal(c.lines[1].tokens.input, 100); /* tokens are still reported */
    check_line(&c, 2, BW_EV_TOOL, "ws", BW_BASIS_UNBILLED, 1, "0");
    assert_int_equal(c.lines[2].units, 3);
    check_line(&c, 3, BW_EV_TOOL, "ws", BW_BASIS_PER_CALL, 1, "2");
    assert_string_equal(bw_basis_name(BW_BASIS_UNBILLED), "failed_unbilled");
    assert_int_equal(c.model_calls, 2);
    assert_int_equal(c.tool_calls, 2);
    assert_int_equal(c.tokens.input, 100);
    assert_string_equal(dstr(&c.exact), "3"); /* 1 + 2 */
    bw_charge_free(&c);
    bw_pricing_free(p);

    /* default (true): failed calls are billed like the others */
    p = load_text(CFG("", STAR_MODEL, STAR_TOOL));
    assert_int_equal(p->bill_failed_calls, 1);
    price(p, calls, N(calls), 0, &c);
    assert_int_equal(c.n_lines, 2);
    check_line(&c, 0, BW_EV_MODEL, "gpt-4o", BW_BASIS_PER_CALL, 2, "2");
    check_line(&c, 1, BW_EV_TOOL, "ws", BW_BASIS_PER_CALL, 2, "8"); /* (3 + 1) x 2 */
    bw_charge_free(&c);
    bw_pricing_free(p);
}

static void test_flat_fallback(void **state)
{
    bw_pricing *p =
        load_text(CFG("",
                      "{ match = \"tok\"; input_usd_per_mtok = 2.5; output_usd_per_mtok = 10; },"
                      " { match = \"both\"; credits_per_call = 3; input_usd_per_mtok = 1; },"
                      " { match = \"*\"; credits_per_call = 1.5; }",
                      STAR_TOOL));
    bw_call calls[] = {
        model_nousage("tok"),           /* token prices, no credits_per_call: "*" rule */
        model("tok", 1000, 0, 0, 0, 0), /* 1000 x 2.5 / 10^6 x 500 = 1.25 */
        model_nousage("both"),          /* its own credits_per_call */
        model_nousage("other"),         /* "*" rule, per call */
        model_nousage("tok"),
    };
    bw_charge c;

    (void)state;
    price(p, calls, N(calls), 1, &c);
    assert_int_equal(c.n_lines, 4);
    check_line(&c, 0, BW_EV_MODEL, "tok", BW_BASIS_FLAT_FALLBACK, 2, "3"); /* 2 x 1.5 */
    check_line(&c, 1, BW_EV_MODEL, "tok", BW_BASIS_TOKENS, 1, "1.25");
    check_line(&c, 2, BW_EV_MODEL, "both", BW_BASIS_TOKENS, 1, "3");
    check_line(&c, 3, BW_EV_MODEL, "other", BW_BASIS_PER_CALL, 1, "1.5");
    assert_string_equal(bw_basis_name(BW_BASIS_FLAT_FALLBACK), "flat_fallback");
    assert_string_equal(dstr(&c.exact), "8.75"); /* 3 + 1.25 + 3 + 1.5 */
    bw_charge_free(&c);
    bw_pricing_free(p);
}

static void test_glob_first_match(void **state)
{
    static const struct {
        const char *name;
        size_t rule;
    } models[] =
        {
            {"gpt-4o-mini-2024-07-18", 0},
            {"gpt-4o-mini", 0},
            {"gpt-4o", 1},
            {"gpt-4o-2024-08-06", 1},
            {"claude-3-opus", 2},
            {"claude-sonnet-4", 4},
            {"bert", 3},
            {"openai/gpt-4o", 4}, /* globs are anchored */
            {"", 4},
        },
      tools[] = {
          {"mcp_github", 0},
          {"web_search", 1},
          {"web_search_v2", 2},
          {"mcp", 2},
      };
    bw_pricing *p = load_text(CFG("",
                                  "{ match = \"gpt-4o-mini*\"; credits_per_call = 1; },"
                                  " { match = \"gpt-4o*\"; credits_per_call = 2; },"
                                  " { match = \"claude-?-*\"; credits_per_call = 3; },"
                                  " { match = \"[ab]*\"; credits_per_call = 4; },"
                                  " { match = \"*\"; credits_per_call = 5; }",
                                  "{ match = \"mcp_*\"; credits_per_call = 1; },"
                                  " { match = \"web_search\"; credits_per_call = 2; },"
                                  " { match = \"*\"; credits_per_call = 3; }"));

    (void)state;
    assert_int_equal(p->n_models, 5);
    assert_int_equal(p->n_tools, 3);
    for (size_t i = 0; i < N(models); i++) {
        if (bw_pricing_model_rule(p, models[i].name) != &p->models[models[i].rule])
            fail_msg("model \"%s\": want rule %zu", models[i].name, models[i].rule);
    }
    for (size_t i = 0; i < N(tools); i++) {
        if (bw_pricing_tool_rule(p, tools[i].name) != &p->tools[tools[i].rule])
            fail_msg("tool \"%s\": want rule %zu", tools[i].name, tools[i].rule);
    }
    /* and the price follows the rule */
    bw_call call = model_nousage("gpt-4o-mini");
    bw_charge c;
    price(p, &call, 1, 0, &c);
    check_line(&c, 0, BW_EV_MODEL, "gpt-4o-mini", BW_BASIS_PER_CALL, 1, "1");
    bw_charge_free(&c);
    bw_pricing_free(p);
}

static void test_price_errors(void **state)
{
    bw_pricing *p = load_text(CFG("", STAR_MODEL, STAR_TOOL));
    char longname[BW_NAME_MAX + 2];
    bw_call bad[4];
    bw_charge c;
    char err[256];

    (void)state;
    memset(longname, 'x', sizeof(longname) - 1);
    longname[sizeof(longname) - 1] = '\0';
    bad[0] = tool("t", 0);                /* units are 1..10^6 */
    bad[1] = model("m", 0, 0, 0, 10, 11); /* reasoning > output */
    bad[2] = model_nousage(longname);     /* 257 bytes */
    bad[3] = model_nousage("m");
    bad[3].type = BW_EV_FINALIZE; /* not a usage event */
    for (size_t i = 0; i < N(bad); i++) {
        bw_call calls[2] = {model_nousage("ok"), bad[i]};
        err[0] = '\0';
        assert_int_equal(bw_pricing_price(p, calls, 2, 1, &c, err, sizeof(err)), -1);
        assert_true(err[0] != '\0');
        assert_null(c.lines);
    }
    bw_pricing_free(p);
}

/* --------------------------------------------------------- configuration */

#define HDR   "pricing = {\n  credit_usd = 0.002;\n" /* lines 1-2 */
#define MODS  "  models = ( " STAR_MODEL " );\n"
#define TOOLS "  tools = ( " STAR_TOOL " );\n"
#define END   "};\n"

static void test_config_errors(void **state)
{
    static const struct {
        const char *text;
        int line; /* 0: no line in the message */
        const char *msg;
    } cases[] = {
        /* no "*" rule at the end of models: the last rule's line */
        {HDR "  models = ( { match = \"m\"; credits_per_call = 1; } );\n" TOOLS END, 3,
         "models: the last rule must be match = \"*\""},
        {HDR MODS "  tools = ( { match = \"web_search\"; credits_per_call = 2; } );\n" END, 4,
         "tools: the last rule must be match = \"*\""},
        {HDR "  models = ( " STAR_MODEL
             ",\n  { match = \"m\"; credits_per_call = 2; } );\n" TOOLS END,
         3, "models[0]: match = \"*\" must be the last rule"},
        {HDR "  rounding = \"bankers\";\n" MODS TOOLS END, 3,
         "rounding: \"bankers\" is not one of half_up, half_even, ceil, floor"},
        {HDR "  precision = 7;\n" MODS TOOLS END, 3,
         "precision: must be a whole number from 0 to 6"},
        {HDR "  precision = 2.5;\n" MODS TOOLS END, 3,
         "precision: must be a whole number from 0 to 6"},
        /* 13 significant digits */
        {HDR "  models = ( { match = \"*\"; credits_per_call = 0.1234567890123; } );\n" TOOLS END,
         3, "credits_per_call: more than 12 significant digits"},
        {HDR "  models = ( { match = \"m\";\n    input_usd_per_mtok = -2.5; }, " STAR_MODEL
             " );\n" TOOLS END,
         4, "input_usd_per_mtok: must not be negative"},
        {HDR MODS "  tools = ( { match = \"*\"; credits_per_call = -2; } );\n" END, 4,
         "credits_per_call: must not be negative"},
        {"pricing = {\n  credit_usd = 0.003;\n" MODS TOOLS END, 2,
         "credit_usd: 1/credit_usd must be a terminating decimal (e.g. 0.01, 0.002, 0.0025)"},
        {"pricing = {\n  credit_usd = 0;\n" MODS TOOLS END, 2,
         "credit_usd: must be greater than 0"},
        /* a missing key is reported at the group's line */
        {"pricing = {\n  version = \"x\";\n" MODS TOOLS END, 1, "credit_usd: missing"},
        {HDR MODS END, 1, "tools: missing"},
        /* typos */
        {HDR "  models = ( { match = \"m\"; input_usd_per_mtk = 1; }, " STAR_MODEL
             " );\n" TOOLS END,
         3, "models[0] (match \"m\"): unknown key \"input_usd_per_mtk\""},
        {HDR "  minimum_credit = 1;\n" MODS TOOLS END, 3,
         "pricing: unknown key \"minimum_credit\""},
        /* a "*" rule with token prices only would make calls without usage free */
        {HDR "  models = ( { match = \"*\"; input_usd_per_mtok = 1; } );\n" TOOLS END, 3,
         "token prices but no credits_per_call"},
        {HDR "  minimum_credits = 0.00005;\n" MODS TOOLS END, 3,
         "minimum_credits: has more decimals than precision (4) allows"},
        {HDR "  bill_failed_calls = 1;\n" MODS TOOLS END, 3,
         "bill_failed_calls: must be true or false"},
        {HDR "  version = 5;\n" MODS TOOLS END, 3, "version: must be a string"},
        {HDR "  version = \"\";\n" MODS TOOLS END, 3, "version: must be 1 to 128 bytes"},
        {HDR "  models = ( { match = \"*\"; credits_per_call = \"1\"; } );\n" TOOLS END, 3,
         "credits_per_call: must be a number"},
        {HDR "  models = ( { credits_per_call = 1; } );\n" TOOLS END, 3,
         "models[0]: match is missing"},
        {HDR "  models = { match = \"*\"; };\n" TOOLS END, 3, "models: must be a list"},
        {HDR "  models = ( { mtach = \"*\"; credits_per_call = 1; } );\n" TOOLS END, 3,
         "models[0]: unknown key \"mtach\""},
        {HDR MODS "  tools = ( { match = 5; } );\n" END, 4, "tools[0]: match: must be a string"},
        {HDR "  models = ( );\n" TOOLS END, 3, "models: empty"},
        {HDR "  models = ( { match = \"*\"; credits_per_call = 1e-80; } );\n" TOOLS END, 3,
         "credits_per_call: out of range"},
        /* libconfig 1.5 wraps 5000000000 (no L suffix) to 705032704 */
        {HDR "  models = ( { match = \"m\";\n    credits_per_call = 5000000000; }, " STAR_MODEL
             " );\n" TOOLS END,
         4, "credits_per_call: integer too large for libconfig"},
        {HDR "  litellm_prices = \"no-such-map.json\";\n" MODS TOOLS END, 3,
         "litellm_prices: cannot load "},
        /* syntax errors come from libconfig, with their line */
        {HDR "  precision = ;\n" MODS TOOLS END, 3, "syntax error"},
        {"other = 1;\n", 0, "pricing: group is missing"},
    };
    char prefix[600];

    (void)state;
    for (size_t i = 0; i < N(cases); i++) {
        const char *err = load_error(cases[i].text);
        if (cases[i].line)
            snprintf(prefix, sizeof(prefix), "%s:%d: ", tmp_path("pricing.cfg"), cases[i].line);
        else
            snprintf(prefix, sizeof(prefix), "%s: ", tmp_path("pricing.cfg"));
        if (strncmp(err, prefix, strlen(prefix)) != 0 || !strstr(err, cases[i].msg))
            fail_msg("case %zu: got \"%s\", want \"%s...%s\"", i, err, prefix, cases[i].msg);
    }
    /* The missing map's path is in the message, resolved against the file. */
    const char *err = load_error(HDR "  litellm_prices = \"no-such-map.json\";\n" MODS TOOLS END);
    assert_non_null(strstr(err, tmp_path("no-such-map.json")));
    /* A missing file. */
    bw_pricing *p = NULL;
    char buf[512];
    assert_int_equal(bw_pricing_load_file(tmp_path("absent.cfg"), &p, buf, sizeof(buf)), -1);
    assert_non_null(strstr(buf, "absent.cfg"));
    assert_null(p);
}

static void test_config_numbers(void **state)
{
    /* ints, int64 (L suffix) and reals, in every numeric field */
    bw_pricing *p =
        load_text("pricing = {\n"
                  "  version = \"n-1\";\n"
                  "  credit_usd = 2.5e-3;\n" /* 0.0025: 400 credits per USD */
                  "  minimum_credits = 2;\n"
                  "  precision = 2.0;\n"
                  "  models = ( { match = \"big\"; credits_per_call = 5000000000L; },\n"
                  "    { match = \"*\"; credits_per_call = 1.5; input_usd_per_mtok = 3; } );\n"
                  "  tools = ( { match = \"*\"; usd_per_call = 1e-3; } );\n"
                  "};\n");
    bw_call calls[] = {model_nousage("big"), tool("t", 1)};
    bw_charge c;

    (void)state;
    assert_string_equal(p->version, "n-1");
    assert_string_equal(dstr(&p->credit_usd), "0.0025");
    assert_string_equal(dstr(&p->credits_per_usd), "400"); /* 1 / 0.0025 */
    assert_string_equal(dstr(&p->minimum_credits), "2");
    assert_int_equal(p->precision, 2);
    assert_string_equal(dstr(&p->models[0].credits_per_call), "5000000000");
    assert_string_equal(dstr(&p->tools[0].usd_per_call), "0.001");
    assert_string_equal(bw_rounding_name(p->rounding), "half_up");
    assert_null(p->litellm);
    assert_null(p->litellm_path);
    price(p, calls, N(calls), 1, &c);
    /* 5000000000 + 0.001 x 400 = 5000000000.4 */
    assert_string_equal(dfixed(&c.amount, 2), "5000000000.40");
    /* 5000000000.40 x 0.0025 = 12500000.001 */
    assert_string_equal(dfixed(&c.cost_usd, 6), "12500000.001000");
    bw_charge_free(&c);
    bw_pricing_free(p);

    /* defaults */
    p = load_text(CFG("", STAR_MODEL, STAR_TOOL));
    assert_string_equal(p->version, "unversioned");
    assert_int_equal(p->precision, 4);
    assert_int_equal(p->rounding, BW_ROUND_HALF_UP);
    assert_int_equal(p->bill_failed_calls, 1);
    assert_true(bw_dec_is_zero(&p->minimum_credits));
    bw_pricing_free(p);
}

static void test_from_setting_inline(void **state)
{
    /* config.c hands over the group of an already parsed file. */
    config_t cfg;
    bw_pricing *p = NULL;
    char err[256];

    (void)state;
    config_init(&cfg);
    assert_int_equal(config_read_string(&cfg, CFG("", STAR_MODEL, STAR_TOOL)), CONFIG_TRUE);
    assert_int_equal(
        bw_pricing_from_setting(config_lookup(&cfg, "pricing"), "inline.cfg", &p, err, sizeof(err)),
        0);
    assert_int_equal(p->n_models, 1);
    bw_pricing_free(p);
    config_destroy(&cfg);

    config_init(&cfg);
    assert_int_equal(config_read_string(&cfg, HDR "  precision = 9;\n" MODS TOOLS END),
                     CONFIG_TRUE);
    assert_int_equal(
        bw_pricing_from_setting(config_lookup(&cfg, "pricing"), "inline.cfg", &p, err, sizeof(err)),
        -1);
    assert_string_equal(err, "inline.cfg:3: precision: must be a whole number from 0 to 6");
    assert_null(p);
    config_destroy(&cfg);
}

static void test_sha256(void **state)
{
    /* The same prices, written differently. */
    static const char *const same[] = {
        CFG("",
            "{ match = \"m\"; input_usd_per_mtok = 0.6; output_usd_per_mtok = 2; }, " STAR_MODEL,
            STAR_TOOL),
        "# a comment\n"
        "pricing:\n{\n"
        "  tools = ( { credits_per_call = 2.0; match = \"*\"; } );\n"
        "  precision = 4; rounding = \"half_up\"; minimum_credits = 0; bill_failed_calls = true;\n"
        "  models = (\n"
        "    { output_usd_per_mtok = 2.00; input_usd_per_mtok = 0.60; match = \"m\";\n"
        "      cache_read_usd_per_mtok = 6e-1;   # = the input price, the default\n"
        "      reasoning_usd_per_mtok = 2; },\n"
        "    { match = \"*\"; credits_per_call = 1.0; }\n"
        "  );\n"
        "  credit_usd = 2e-3;\n"
        "};\n",
    };
    /* Each differs from same[0] in one thing. */
    static const char *const differ[] = {
        CFG("",
            "{ match = \"m\"; input_usd_per_mtok = 0.61; output_usd_per_mtok = 2; }, " STAR_MODEL,
            STAR_TOOL),
        CFG("  version = \"v2\";\n",
            "{ match = \"m\"; input_usd_per_mtok = 0.6; output_usd_per_mtok = 2; }, " STAR_MODEL,
            STAR_TOOL),
        CFG("  minimum_credits = 1;\n",
            "{ match = \"m\"; input_usd_per_mtok = 0.6; output_usd_per_mtok = 2; }, " STAR_MODEL,
            STAR_TOOL),
        CFG("",
            "{ match = \"m\"; input_usd_per_mtok = 0.6; output_usd_per_mtok = 2; }, " STAR_MODEL,
            "{ match = \"*\"; credits_per_call = 2; usd_per_call = 0.001; }"),
        CFG("",
            "{ match = \"n\"; input_usd_per_mtok = 0.6; output_usd_per_mtok = 2; }, " STAR_MODEL,
            STAR_TOOL),
    };
    char ref[65];
    bw_pricing *p;

    (void)state;
    p = load_text(same[0]);
    memcpy(ref, p->sha256, sizeof(ref));
    bw_pricing_free(p);
    for (size_t i = 0; i < 64; i++)
        assert_non_null(strchr("0123456789abcdef", ref[i]));
    for (size_t i = 1; i < N(same); i++) {
        p = load_text(same[i]);
        assert_string_equal(p->sha256, ref);
        bw_pricing_free(p);
    }
    for (size_t i = 0; i < N(differ); i++) {
        p = load_text(differ[i]);
        if (strcmp(p->sha256, ref) == 0)
            fail_msg("differ[%zu] has the same hash", i);
        bw_pricing_free(p);
    }
}

/* --------------------------------------------------------------- LiteLLM */

static void test_litellm_shared(void **state)
{
    /* Per-token prices read by hand from litellm_model_prices.json (jq), x 10^6:
     *   gpt-4o: input 2.5e-06 -> 2.5, output 1e-05 -> 10, cache_read 1.25e-06 -> 1.25,
     *           no cache_creation (-> input 2.5), no reasoning (-> output 10)
     *   claude-sonnet-4-20250514: input 3e-06 -> 3, output 1.5e-05 -> 15,
     *           cache_read 3e-07 -> 0.3, cache_creation 3.75e-06 -> 3.75
     *           (its *_above_200k_tokens prices, e.g. input 6e-06, are ignored)
     *   gemini-2.5-flash: input 3e-07 -> 0.3, output 2.5e-06 -> 2.5,
     *           cache_read 3e-08 -> 0.03, output_cost_per_reasoning_token 2.5e-06 -> 2.5
     *   o3-mini: input 1.1e-06 -> 1.1, output 4.4e-06 -> 4.4, cache_read 5.5e-07 -> 0.55
     *   deepseek-v3-2-251201: input 0, output 0 (JSON integers)
     *   gpt-image-1: input 5e-06 but no output_cost_per_token: unusable
     *   gpt-realtime-whisper: input_cost_per_second only: unusable
     */
    static const struct {
        const char *name;
        uint64_t in, cr, cw, out, re;
        int has_usage;
        bw_basis basis;
        const char *credits;
    } cases[] = {
        /* (1000 x 2.5 + 1000 x 1.25 + 1000 x 10) / 10^6 = 0.01375 USD x 500 = 6.875 */
        {"gpt-4o", 1000, 1000, 0, 1000, 0, 1, BW_BASIS_LITELLM, "6.875"},
        /* the "openai/" prefix is removed */
        {"openai/gpt-4o", 1000, 1000, 0, 1000, 0, 1, BW_BASIS_LITELLM, "6.875"},
        /* cache write defaults to input: 1000 x 2.5 / 10^6 x 500 = 1.25 */
        {"gpt-4o", 0, 0, 1000, 0, 0, 1, BW_BASIS_LITELLM, "1.25"},
        /* 1000 x 3.75 / 10^6 = 0.00375 USD x 500 = 1.875 */
        {"claude-sonnet-4-20250514", 0, 0, 1000, 0, 0, 1, BW_BASIS_LITELLM, "1.875"},
        /* 300000 x 3 / 10^6 = 0.9 USD x 500 = 450 (not the tiered 6 -> 900) */
        {"anthropic/claude-sonnet-4-20250514", 300000, 0, 0, 0, 0, 1, BW_BASIS_LITELLM, "450"},
        /* (400 x 2.5 + 600 x 2.5 + 1000 x 0.03) / 10^6 = 0.00253 USD x 500 = 1.265 */
        {"gemini-2.5-flash", 0, 1000, 0, 1000, 600, 1, BW_BASIS_LITELLM, "1.265"},
        /* (1000 x 1.1 + 500 x 4.4 + 500 x 4.4) / 10^6 = 0.0055 USD x 500 = 2.75 */
        {"o3-mini", 1000, 0, 0, 1000, 500, 1, BW_BASIS_LITELLM, "2.75"},
        {"deepseek-v3-2-251201", 1000, 0, 0, 1000, 0, 1, BW_BASIS_LITELLM, "0"},
        /* unusable entries and unknown models: the "*" rule, 1 credit */
        {"gpt-image-1", 1000, 0, 0, 0, 0, 1, BW_BASIS_PER_CALL, "1"},
        {"gpt-realtime-whisper", 1000, 0, 0, 0, 0, 1, BW_BASIS_PER_CALL, "1"},
        {"azure/unknown-model", 1000, 0, 0, 0, 0, 1, BW_BASIS_PER_CALL, "1"},
        /* only the text up to the first '/' is a provider */
        {"a/openai/gpt-4o", 1000, 0, 0, 0, 0, 1, BW_BASIS_PER_CALL, "1"},
        /* a rule before "*" wins over the map */
        {"gpt-4o-mini", 1000, 0, 0, 1000, 0, 1, BW_BASIS_PER_CALL, "7"},
        /* a map price without usage: the "*" rule */
        {"gpt-4o", 0, 0, 0, 0, 0, 0, BW_BASIS_FLAT_FALLBACK, "1"},
    };
    bw_pricing *p = load_text(
        CFG("  litellm_prices = \"" BW_SHARED_DATA_DIR "/litellm_model_prices.json\";\n",
            "{ match = \"gpt-4o-mini\"; credits_per_call = 7; }, " STAR_MODEL, STAR_TOOL));

    (void)state;
    assert_non_null(p->litellm);
    assert_string_equal(p->litellm_path, BW_SHARED_DATA_DIR "/litellm_model_prices.json");
    for (size_t i = 0; i < N(cases); i++) {
        bw_call call =
            model(cases[i].name, cases[i].in, cases[i].cr, cases[i].cw, cases[i].out, cases[i].re);
        bw_charge c;
        call.has_usage = cases[i].has_usage;
        price(p, &call, 1, 0, &c);
        if (strcmp(bw_basis_name(c.lines[0].basis), bw_basis_name(cases[i].basis)) != 0 ||
            strcmp(dstr(&c.lines[0].credits), cases[i].credits) != 0)
            fail_msg("case %zu (%s): %s %s, want %s %s", i, cases[i].name,
                     bw_basis_name(c.lines[0].basis), dstr(&c.lines[0].credits),
                     bw_basis_name(cases[i].basis), cases[i].credits);
        assert_string_equal(c.lines[0].name, cases[i].name);
        bw_charge_free(&c);
    }
    assert_string_equal(bw_basis_name(BW_BASIS_LITELLM), "litellm");
    bw_pricing_free(p);
}

static void test_litellm_own_map(void **state)
{
    static const char map[] =
        "{\n"
        "  \"int-model\": {\"input_cost_per_token\": 1, \"output_cost_per_token\": 2},\n"
        "  \"str-model\": {\"input_cost_per_token\": \"0.000001\", \"output_cost_per_token\": "
        "2e-06},\n"
        "  \"neg-model\": {\"input_cost_per_token\": -1e-06, \"output_cost_per_token\": 2e-06},\n"
        "  \"null-cache\": {\"input_cost_per_token\": 1e-06, \"output_cost_per_token\": 2e-06,\n"
        "                  \"cache_read_input_token_cost\": null},\n"
        "  \"tiered\": {\"input_cost_per_token\": 1e-06, \"output_cost_per_token\": 2e-06,\n"
        "              \"input_cost_per_token_above_200k_tokens\": 5e-06,\n"
        "              \"input_cost_per_token_batches\": 5e-07,\n"
        "              \"input_cost_per_token_priority\": 9e-06},\n"
        "  \"third\": {\"input_cost_per_token\": 3.3333333333333335e-05, "
        "\"output_cost_per_token\": 0},\n"
        "  \"not-an-object\": 5\n"
        "}\n";
    static const struct {
        const char *name;
        uint64_t in, cr, out;
        bw_basis basis;
        const char *credits;
    } cases[] = {
        /* 1 USD/token = 10^6 per Mtok: (1 x 10^6 + 1 x 2 x 10^6) / 10^6 = 3 USD x 500 */
        {"int-model", 1, 0, 1, BW_BASIS_LITELLM, "1500"},
        {"str-model", 1, 0, 1, BW_BASIS_PER_CALL, "1"}, /* a string price: unusable */
        {"neg-model", 1, 0, 1, BW_BASIS_PER_CALL, "1"}, /* a negative price: unusable */
        /* null cache price: the input price 1: 1000 x 1 / 10^6 x 500 = 0.5 */
        {"null-cache", 0, 1000, 0, BW_BASIS_LITELLM, "0.5"},
        /* only the base price: 300000 x 1 / 10^6 = 0.3 USD x 500 = 150 */
        {"tiered", 300000, 0, 0, BW_BASIS_LITELLM, "150"},
        /* 3.3333333333333335e-05 x 10^6 = 33.333333333333335 per Mtok;
         * 3 x 33.333333333333335 / 10^6 = 0.000100000000000000005 USD
         * x 500 = 0.0500000000000000025 credits (exact) */
        {"third", 3, 0, 0, BW_BASIS_LITELLM, "0.0500000000000000025"},
        {"not-an-object", 1, 0, 0, BW_BASIS_PER_CALL, "1"},
    };
    char mapdir_cfg[512];
    char err[512];
    bw_pricing *p = NULL;

    (void)state;
    write_file(tmp_path("map.json"), map);
    /* litellm_prices is relative to the config file's directory */
    snprintf(mapdir_cfg, sizeof(mapdir_cfg), "%s", tmp_path("own.cfg"));
    write_file(mapdir_cfg, CFG("  litellm_prices = \"map.json\";\n", STAR_MODEL, STAR_TOOL));
    assert_int_equal(chdir("/"), 0);
    if (bw_pricing_load_file(mapdir_cfg, &p, err, sizeof(err)) != 0)
        fail_msg("%s", err);
    assert_string_equal(p->litellm_path, tmp_path("map.json"));
    for (size_t i = 0; i < N(cases); i++) {
        bw_call call = model(cases[i].name, cases[i].in, cases[i].cr, 0, cases[i].out, 0);
        bw_charge c;
        price(p, &call, 1, 0, &c);
        if (strcmp(bw_basis_name(c.lines[0].basis), bw_basis_name(cases[i].basis)) != 0 ||
            strcmp(dstr(&c.lines[0].credits), cases[i].credits) != 0)
            fail_msg("case %zu (%s): %s %s, want %s %s", i, cases[i].name,
                     bw_basis_name(c.lines[0].basis), dstr(&c.lines[0].credits),
                     bw_basis_name(cases[i].basis), cases[i].credits);
        bw_charge_free(&c);
    }
    /* The map's prices are part of the pricing hash. */
    char with_map[65];
    memcpy(with_map, p->sha256, sizeof(with_map));
    bw_pricing_free(p);
    write_file(tmp_path("map.json"),
               "{\"int-model\": {\"input_cost_per_token\": 1, \"output_cost_per_token\": 3}}");
    assert_int_equal(bw_pricing_load_file(mapdir_cfg, &p, err, sizeof(err)), 0);
    assert_string_not_equal(p->sha256, with_map);
    bw_pricing_free(p);

    /* Broken maps are configuration errors naming the file. */
    static const char *const broken[] = {
        "{\"a\": {\"input_cost_per_token\": 1}, \"a\": {}}",         /* duplicated key */
        "{\"a\": ",                                                  /* truncated */
        "[1, 2]",                                                    /* not an object of models */
        "{\"a\": {\"input_cost_per_token\": 99999999999999999999}}", /* integer above 2^63 */
    };
    for (size_t i = 0; i < N(broken); i++) {
        write_file(tmp_path("map.json"), broken[i]);
        assert_int_equal(bw_pricing_load_file(mapdir_cfg, &p, err, sizeof(err)), -1);
        char prefix[1200];
        snprintf(prefix, sizeof(prefix), "%s:3: litellm_prices: cannot load %s", mapdir_cfg,
                 tmp_path("map.json"));
        if (strncmp(err, prefix, strlen(prefix)) != 0)
            fail_msg("broken[%zu]: %s", i, err);
    }
    unlink(tmp_path("map.json"));
    unlink(mapdir_cfg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_legacy_example),
        cmocka_unit_test(test_tokens_example),
        cmocka_unit_test(test_usage_classes),
        cmocka_unit_test(test_price_defaults),
        cmocka_unit_test(test_mixed_model_prices),
        cmocka_unit_test(test_small_price),
        cmocka_unit_test(test_token_limits),
        cmocka_unit_test(test_tools),
        cmocka_unit_test(test_minimum),
        cmocka_unit_test(test_lines_grouping),
        cmocka_unit_test(test_failed_calls),
        cmocka_unit_test(test_flat_fallback),
        cmocka_unit_test(test_glob_first_match),
        cmocka_unit_test(test_price_errors),
        cmocka_unit_test(test_config_errors),
        cmocka_unit_test(test_config_numbers),
        cmocka_unit_test(test_from_setting_inline),
        cmocka_unit_test(test_sha256),
        cmocka_unit_test(test_litellm_shared),
        cmocka_unit_test(test_litellm_own_map),
    };

    return cmocka_run_group_tests(tests, setup, teardown);
}

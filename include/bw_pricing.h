/*
 * bw_pricing.h - the pricing engine (PRODUCT.md section 6).
 *
 * A bw_pricing is immutable once built: the worker swaps the pointer on
 * SIGHUP and every request is priced with exactly one version.
 */
#ifndef BW_PRICING_H
#define BW_PRICING_H

#include <stddef.h>
#include <stdint.h>
#include <libconfig.h>

#include "bw_dec.h"
#include "bw_event.h"

/** Significant digits an operator may write in a price. */
#define BW_PRICE_MAXSIG 12

typedef struct bw_model_rule {
    char *match; /* glob (fnmatch) on the model name */
    int has_credits_per_call;
    bw_dec credits_per_call;
    int has_token_prices; /* any *_usd_per_mtok given */
    /* USD per million tokens; defaults applied at load time */
    bw_dec input, output, cache_read, cache_write, reasoning;
} bw_model_rule;

typedef struct bw_tool_rule {
    char *match;
    bw_dec credits_per_call;
    bw_dec usd_per_call;
} bw_tool_rule;

struct bw_litellm; /* a loaded LiteLLM price map (opaque) */

typedef struct bw_pricing {
    char version[129];
    char sha256[65]; /* of the canonical rules, see bw_pricing_build() */
    bw_dec credit_usd;
    bw_dec credits_per_usd; /* exactly 1 / credit_usd */
    bw_dec minimum_credits;
    int precision; /* 0..6 */
    bw_rounding rounding;
    int bill_failed_calls;
    bw_model_rule *models;
    size_t n_models;
    bw_tool_rule *tools;
    size_t n_tools;
    char *litellm_path;         /* NULL when unset */
    struct bw_litellm *litellm; /* NULL when unset */
} bw_pricing;

/**
 * @brief Build pricing from the `pricing` group of a libconfig file.
 * @param file the file name, for "file:line: message" errors.
 * @returns 0 and *out (free with bw_pricing_free), or -1 and @p err.
 */
int bw_pricing_from_setting(const config_setting_t *group, const char *file, bw_pricing **out,
                            char *err, size_t errsize);

/**
 * @brief Read @p path (a full config file or one holding only `pricing`)
 *        and build its pricing. Used at start and on SIGHUP.
 */
int bw_pricing_load_file(const char *path, bw_pricing **out, char *err, size_t errsize);

void bw_pricing_free(bw_pricing *p);

/** One deduplicated usage event of a request, as the pricing engine sees it. */
typedef struct bw_call {
    bw_event_type type; /* BW_EV_MODEL or BW_EV_TOOL */
    const char *name;   /* model or tool name */
    int failed;         /* status "error" */
    int has_usage;      /* model call carried a usage object */
    bw_usage usage;
    uint64_t units; /* tool calls: 1..10^6 */
} bw_call;

typedef enum bw_basis {
    BW_BASIS_PER_CALL = 0,  /* "per_call": credits_per_call only */
    BW_BASIS_TOKENS,        /* "tokens": token prices (plus credits_per_call if any) */
    BW_BASIS_FLAT_FALLBACK, /* "flat_fallback": no usage, priced by the * rule */
    BW_BASIS_LITELLM,       /* "litellm": token prices from the LiteLLM map */
    BW_BASIS_UNBILLED       /* "failed_unbilled": failed calls, bill_failed_calls=false */
} bw_basis;

typedef struct bw_line {
    bw_event_type kind; /* BW_EV_MODEL or BW_EV_TOOL */
    char name[BW_NAME_MAX + 1];
    bw_basis basis;
    uint64_t calls;
    uint64_t units;  /* tools */
    bw_usage tokens; /* models */
    bw_dec credits;  /* exact, unrounded */
    /* The prices this line was charged at, so it can be explained by hand:
     * credits = calls * credits_per_call + usd * credits_per_usd. */
    bw_dec credits_per_call;
    bw_dec usd_per_call;                                /* tools */
    bw_dec in, out, cache_read, cache_write, reasoning; /* models, USD per Mtok */
} bw_line;

typedef struct bw_charge {
    bw_line *lines; /* owned; in order of first appearance */
    size_t n_lines;
    uint64_t model_calls, tool_calls;
    bw_usage tokens;
    bw_dec exact;  /* exact sum of line credits */
    bw_dec amount; /* rounded to precision, minimum applied; scale == precision */
    int minimum_applied;
    int64_t amount_micro;
    bw_dec cost_usd; /* amount * credit_usd, rounded half up to 6 decimals */
} bw_charge;

/**
 * @brief Price a set of deduplicated calls.
 * @param apply_minimum 1 for a charge, 0 for an adjustment (never raised to the minimum).
 * @returns 0 and @p out (free with bw_charge_free), or -1 (overflow) with @p err.
 */
int bw_pricing_price(const bw_pricing *p, const bw_call *calls, size_t n, int apply_minimum,
                     bw_charge *out, char *err, size_t errsize);

void bw_charge_free(bw_charge *c);

const char *bw_basis_name(bw_basis b);

/** The first model rule matching @p model (never NULL: the last rule is "*"). */
const bw_model_rule *bw_pricing_model_rule(const bw_pricing *p, const char *model);
const bw_tool_rule *bw_pricing_tool_rule(const bw_pricing *p, const char *tool);

#endif

/*
 * bw_dec.h - exact non-negative decimal numbers for the money path.
 *
 * A bw_dec is mantissa * 10^-scale, the mantissa an unsigned integer of up
 * to 72 decimal digits held in base-10^9 limbs. Every operation is exact or
 * fails (returns -1) on overflow; nothing here ever touches binary floating
 * point except bw_dec_from_double(), which recovers the decimal literal an
 * operator wrote from the double a parser handed us.
 */
#ifndef BW_DEC_H
#define BW_DEC_H

#include <stddef.h>
#include <stdint.h>

#define BW_DEC_LIMBS  8 /* 8 x 9 = 72 decimal digits of mantissa */
#define BW_DEC_BASE   1000000000u
#define BW_DEC_STRMAX 96 /* enough for any bw_dec in plain notation */

typedef struct bw_dec {
    uint32_t limb[BW_DEC_LIMBS]; /* little-endian, base 10^9 */
    int scale;                   /* number of decimals, >= 0 */
} bw_dec;

typedef enum bw_rounding {
    BW_ROUND_HALF_UP = 0, /* ties away from zero */
    BW_ROUND_HALF_EVEN,   /* ties to even (banker's) */
    BW_ROUND_CEIL,        /* towards +infinity */
    BW_ROUND_FLOOR        /* towards zero (values are never negative) */
} bw_rounding;

/** Set to zero. */
void bw_dec_zero(bw_dec *d);
/** Set from an unsigned integer. */
void bw_dec_from_u64(bw_dec *d, uint64_t v);

/**
 * @brief Parse a plain decimal ("12", "0.075", "1.5e-7", "2.5E+3").
 *        No sign other than an optional leading '+'; negative numbers fail.
 * @returns 0, or -1 if malformed or out of range.
 */
int bw_dec_from_str(bw_dec *d, const char *s);

/**
 * @brief Recover the shortest decimal literal that round-trips to @p v,
 *        trying 1..maxsig significant digits.
 * @remark libconfig and jansson hand out doubles; this gets back exactly what
 *         the operator wrote as long as it had at most @p maxsig significant
 *         digits. Negative, NaN or infinite values fail.
 * @returns 0, or -1 if no literal of at most @p maxsig digits round-trips.
 */
int bw_dec_from_double(bw_dec *d, double v, int maxsig);

/** @returns 1 if @p d is zero. */
int bw_dec_is_zero(const bw_dec *d);
/** @returns <0, 0, >0 like strcmp. */
int bw_dec_cmp(const bw_dec *a, const bw_dec *b);

/** r = a + b. r may alias a or b. @returns 0, or -1 on overflow. */
int bw_dec_add(bw_dec *r, const bw_dec *a, const bw_dec *b);
/** r = a - b, requires a >= b. @returns 0, or -1 if a < b or overflow. */
int bw_dec_sub(bw_dec *r, const bw_dec *a, const bw_dec *b);
/** r = a * b. r may alias a or b. @returns 0, or -1 on overflow. */
int bw_dec_mul(bw_dec *r, const bw_dec *a, const bw_dec *b);
/** r = a * v. @returns 0, or -1 on overflow. */
int bw_dec_mul_u64(bw_dec *r, const bw_dec *a, uint64_t v);
/** d = d / 10^k (exact: only the scale changes). @returns 0, -1 if scale too large. */
int bw_dec_div_pow10(bw_dec *d, int k);

/**
 * @brief r = 1 / a, when that is a terminating decimal (a = m * 10^-s with
 *        m = 2^i * 5^j). Used for credits-per-USD from credit_usd.
 * @returns 0, or -1 if a is zero or 1/a does not terminate.
 */
int bw_dec_inverse(bw_dec *r, const bw_dec *a);

/**
 * @brief r = a rounded to @p decimals decimals with @p mode. The result's
 *        scale is exactly @p decimals.
 */
int bw_dec_round(bw_dec *r, const bw_dec *a, int decimals, bw_rounding mode);

/** Remove trailing zero decimals (does not change the value). */
void bw_dec_normalize(bw_dec *d);

/**
 * @brief Plain decimal text with trailing zero decimals removed ("3", "0.075").
 * @returns length written, or -1 if @p size is too small.
 */
int bw_dec_to_str(const bw_dec *d, char *buf, size_t size);

/**
 * @brief Decimal text with exactly @p decimals decimals ("5.0000"); the value
 *        must need no more than @p decimals decimals (round first).
 * @returns length written, or -1 if it would lose digits or @p size is too small.
 */
int bw_dec_to_str_fixed(const bw_dec *d, int decimals, char *buf, size_t size);

/**
 * @brief The value in millionths as an integer (5.0000 -> 5000000).
 * @returns 0, or -1 if not a whole number of millionths or above INT64_MAX.
 */
int bw_dec_to_micro(const bw_dec *d, int64_t *micro);

/** Parse a rounding mode name ("half_up", ...). @returns 0 or -1. */
int bw_rounding_parse(const char *s, bw_rounding *mode);
const char *bw_rounding_name(bw_rounding mode);

#endif

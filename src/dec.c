/*
 * dec.c - exact non-negative decimal numbers (see bw_dec.h).
 *
 * Every operation works on a "wide" mantissa with room for a full product
 * or a full alignment shift, then fit() squeezes the result back into a
 * bw_dec: trailing zero decimals are dropped only when the result would not
 * fit otherwise, so nothing is ever rounded or truncated behind the
 * caller's back. The only binary floating point in this file is in
 * bw_dec_from_double(), which inspects a double but never computes with it.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bw_dec.h"

/* Digits per limb and the largest scale a bw_dec may carry. 72 keeps any
 * value printable in BW_DEC_STRMAX ("0." + 72 digits + NUL). */
#define DIGITS     9
#define MAXDIGITS  (BW_DEC_LIMBS * DIGITS)
#define MAXSCALE   MAXDIGITS
#define WIDE_LIMBS (2 * BW_DEC_LIMBS + 2)

/* Enough for a product of two mantissas or a mantissa shifted by MAXSCALE
 * digits, plus a carry limb. */
typedef struct wide {
    uint32_t l[WIDE_LIMBS];
} wide;

static const uint32_t pow10_u32[DIGITS + 1] = {
    1u, 10u, 100u, 1000u, 10000u, 100000u, 1000000u, 10000000u, 100000000u, 1000000000u};

static int dec_valid(const bw_dec *d)
{
    if (d->scale < 0 || d->scale > MAXSCALE)
        return 0;
    for (int i = 0; i < BW_DEC_LIMBS; i++)
        if (d->limb[i] >= BW_DEC_BASE)
            return 0;
    return 1;
}

static void w_from_dec(wide *w, const bw_dec *d)
{
    memset(w, 0, sizeof(*w));
    memcpy(w->l, d->limb, sizeof(d->limb));
}

static int w_is_zero(const wide *w)
{
    for (int i = 0; i < WIDE_LIMBS; i++)
        if (w->l[i])
            return 0;
    return 1;
}

static int w_cmp(const wide *a, const wide *b)
{
    for (int i = WIDE_LIMBS - 1; i >= 0; i--) {
        if (a->l[i] != b->l[i])
            return a->l[i] < b->l[i] ? -1 : 1;
    }
    return 0;
}

/* w *= v (v < BW_DEC_BASE). @returns -1 if the wide mantissa overflows. */
static int w_mul_small(wide *w, uint32_t v)
{
    uint64_t carry = 0;

    for (int i = 0; i < WIDE_LIMBS; i++) {
        uint64_t t = (uint64_t)w->l[i] * v + carry;
        w->l[i] = (uint32_t)(t % BW_DEC_BASE);
        carry = t / BW_DEC_BASE;
    }
    return carry ? -1 : 0;
}

/* w *= 10^k. @returns -1 on overflow. */
static int w_mul_pow10(wide *w, int k)
{
    int limbs = k / DIGITS;

    if (k < 0)
        return -1;
    if (limbs > 0) {
        if (limbs >= WIDE_LIMBS)
            return w_is_zero(w) ? 0 : -1;
        for (int i = WIDE_LIMBS - limbs; i < WIDE_LIMBS; i++)
            if (w->l[i])
                return -1;
        memmove(w->l + limbs, w->l, (size_t)(WIDE_LIMBS - limbs) * sizeof(uint32_t));
        memset(w->l, 0, (size_t)limbs * sizeof(uint32_t));
    }
    return w_mul_small(w, pow10_u32[k % DIGITS]);
}

/* w /= v (0 < v < BW_DEC_BASE). @returns the remainder. */
static uint32_t w_divmod_small(wide *w, uint32_t v)
{
    uint64_t rem = 0;

    for (int i = WIDE_LIMBS - 1; i >= 0; i--) {
        uint64_t t = rem * BW_DEC_BASE + w->l[i];
        w->l[i] = (uint32_t)(t / v);
        rem = t % v;
    }
    return (uint32_t)rem;
}

/* a += b. @returns -1 on overflow. */
static int w_add(wide *a, const wide *b)
{
    uint32_t carry = 0;

    for (int i = 0; i < WIDE_LIMBS; i++) {
        uint32_t t = a->l[i] + b->l[i] + carry; /* < 2 * 10^9 + 1 < 2^32 */
        carry = t >= BW_DEC_BASE;
        a->l[i] = carry ? t - BW_DEC_BASE : t;
    }
    return carry ? -1 : 0;
}

/* a -= b, requires a >= b. */
static void w_sub(wide *a, const wide *b)
{
    uint32_t borrow = 0;

    for (int i = 0; i < WIDE_LIMBS; i++) {
        uint32_t sub = b->l[i] + borrow;
        borrow = a->l[i] < sub;
        a->l[i] = borrow ? a->l[i] + BW_DEC_BASE - sub : a->l[i] - sub;
    }
}

/*
 * Store w * 10^-scale into *d. Trailing zero decimals are dropped only when
 * needed to fit (too many digits or scale above MAXSCALE); the value never
 * changes. @returns -1 (and leaves *d alone) if it cannot be represented.
 */
static int fit(wide *w, int scale, bw_dec *d)
{
    for (;;) {
        int high = 0;

        for (int i = BW_DEC_LIMBS; i < WIDE_LIMBS; i++)
            high |= w->l[i] != 0;
        if (!high && scale <= MAXSCALE)
            break;
        if (w_is_zero(w)) {
            scale = 0;
            break;
        }
        if (scale <= 0 || w->l[0] % 10 != 0)
            return -1;
        w_divmod_small(w, 10);
        scale--;
    }
    if (scale < 0) {
        if (w_mul_pow10(w, -scale) != 0)
            return -1;
        scale = 0;
        for (int i = BW_DEC_LIMBS; i < WIDE_LIMBS; i++)
            if (w->l[i])
                return -1;
    }
    memcpy(d->limb, w->l, sizeof(d->limb));
    d->scale = scale;
    return 0;
}

/* Bring a and b to the common scale max(a.scale, b.scale) in wide form. */
static int align(const bw_dec *a, const bw_dec *b, wide *wa, wide *wb, int *scale)
{
    int s = a->scale > b->scale ? a->scale : b->scale;

    w_from_dec(wa, a);
    w_from_dec(wb, b);
    /* Cannot fail: shifts are at most MAXSCALE digits and the wide type has
     * room for MAXDIGITS + MAXSCALE digits. */
    if (w_mul_pow10(wa, s - a->scale) != 0 || w_mul_pow10(wb, s - b->scale) != 0)
        return -1;
    *scale = s;
    return 0;
}

void bw_dec_zero(bw_dec *d)
{
    memset(d, 0, sizeof(*d));
}

void bw_dec_from_u64(bw_dec *d, uint64_t v)
{
    bw_dec_zero(d);
    for (int i = 0; v; i++) {
        d->limb[i] = (uint32_t)(v % BW_DEC_BASE);
        v /= BW_DEC_BASE;
    }
}

int bw_dec_from_str(bw_dec *d, const char *s)
{
    char digits[MAXDIGITS];
    int ndig = 0, seen_int = 0, seen_frac = 0;
    long frac = 0, exp10 = 0, pending = 0, scale;
    wide w;

    if (!s)
        return -1;
    if (*s == '+')
        s++;
    /*
     * Significant digits go to digits[]; leading zeros are skipped and a run
     * of zeros is held in `pending` until a non-zero digit follows, so that
     * "1000000" or "2.50000" never need more room than their real digits.
     */
    for (int part = 0; part < 2; part++) {
        for (; *s >= '0' && *s <= '9'; s++) {
            if (part == 0)
                seen_int = 1;
            else if (++frac > 100000)
                return -1;
            seen_frac |= part;
            if (*s == '0') {
                if (ndig > 0)
                    pending++;
                continue;
            }
            if (ndig + pending + 1 > MAXDIGITS)
                return -1;
            for (; pending > 0; pending--)
                digits[ndig++] = '0';
            digits[ndig++] = *s;
        }
        if (part == 0) {
            if (*s != '.')
                break;
            s++;
        } else if (!seen_frac) {
            return -1; /* "1." */
        }
    }
    if (!seen_int)
        return -1; /* "", ".5", "e3" */
    if (*s == 'e' || *s == 'E') {
        int neg = 0, seen_exp = 0;
        long e = 0;

        s++;
        if (*s == '+' || *s == '-')
            neg = *s++ == '-';
        for (; *s >= '0' && *s <= '9'; s++) {
            seen_exp = 1;
            if (e < 100000)
                e = e * 10 + (*s - '0');
        }
        if (!seen_exp)
            return -1;
        exp10 = neg ? -e : e;
    }
    if (*s != '\0')
        return -1;

    bw_dec_zero(d);
    if (ndig == 0)
        return 0; /* zero, whatever the exponent */
    /* value = digits * 10^pending * 10^-frac * 10^exp10 */
    scale = frac - exp10 - pending;
    if (scale > MAXSCALE || scale < -MAXDIGITS)
        return -1;

    memset(&w, 0, sizeof(w));
    for (int i = 0; i < ndig; i++) {
        if (w_mul_small(&w, 10) != 0)
            return -1;
        w.l[0] += (uint32_t)(digits[i] - '0'); /* l[0] is a multiple of 10 here */
    }
    return fit(&w, (int)scale, d);
}

int bw_dec_from_double(bw_dec *d, double v, int maxsig)
{
    char buf[64];

    if (isnan(v) || isinf(v) || v < 0)
        return -1;
    if (v == 0) {
        bw_dec_zero(d);
        return 0;
    }
    if (maxsig > 17)
        maxsig = 17; /* 17 significant digits always round-trip a double */
    for (int sig = 1; sig <= maxsig; sig++) {
        char *end;

        snprintf(buf, sizeof(buf), "%.*g", sig, v);
        if (strtod(buf, &end) != v || *end != '\0')
            continue;
        /* A locale may print a decimal comma; bw_dec_from_str wants '.'. */
        for (char *p = buf; *p; p++)
            if (!((*p >= '0' && *p <= '9') || *p == 'e' || *p == 'E' || *p == '+' || *p == '-'))
                *p = '.';
        return bw_dec_from_str(d, buf);
    }
    return -1;
}

int bw_dec_is_zero(const bw_dec *d)
{
    for (int i = 0; i < BW_DEC_LIMBS; i++)
        if (d->limb[i])
            return 0;
    return 1;
}

int bw_dec_cmp(const bw_dec *a, const bw_dec *b)
{
    wide wa, wb;
    int scale;

    if (align(a, b, &wa, &wb, &scale) != 0)
        return 0; /* unreachable for valid values */
    return w_cmp(&wa, &wb);
}

int bw_dec_add(bw_dec *r, const bw_dec *a, const bw_dec *b)
{
    wide wa, wb;
    int scale;

    if (!dec_valid(a) || !dec_valid(b) || align(a, b, &wa, &wb, &scale) != 0)
        return -1;
    if (w_add(&wa, &wb) != 0)
        return -1;
    return fit(&wa, scale, r);
}

int bw_dec_sub(bw_dec *r, const bw_dec *a, const bw_dec *b)
{
    wide wa, wb;
    int scale;

    if (!dec_valid(a) || !dec_valid(b) || align(a, b, &wa, &wb, &scale) != 0)
        return -1;
    if (w_cmp(&wa, &wb) < 0)
        return -1;
    w_sub(&wa, &wb);
    return fit(&wa, scale, r);
}

int bw_dec_mul(bw_dec *r, const bw_dec *a, const bw_dec *b)
{
    wide w;

    if (!dec_valid(a) || !dec_valid(b))
        return -1;
    memset(&w, 0, sizeof(w));
    for (int i = 0; i < BW_DEC_LIMBS; i++) {
        uint64_t carry = 0;

        if (!a->limb[i])
            continue;
        for (int j = 0; j < BW_DEC_LIMBS; j++) {
            /* < 10^18 + 2 * 10^9: fits in 64 bits */
            uint64_t t = (uint64_t)a->limb[i] * b->limb[j] + w.l[i + j] + carry;
            w.l[i + j] = (uint32_t)(t % BW_DEC_BASE);
            carry = t / BW_DEC_BASE;
        }
        for (int k = i + BW_DEC_LIMBS; carry; k++) {
            uint64_t t = (uint64_t)w.l[k] + carry;
            w.l[k] = (uint32_t)(t % BW_DEC_BASE);
            carry = t / BW_DEC_BASE;
        }
    }
    return fit(&w, a->scale + b->scale, r);
}

int bw_dec_mul_u64(bw_dec *r, const bw_dec *a, uint64_t v)
{
    bw_dec b;

    bw_dec_from_u64(&b, v);
    return bw_dec_mul(r, a, &b);
}

int bw_dec_div_pow10(bw_dec *d, int k)
{
    wide w;

    if (!dec_valid(d) || k < 0 || k > MAXSCALE)
        return -1;
    w_from_dec(&w, d);
    return fit(&w, d->scale + k, d);
}

int bw_dec_inverse(bw_dec *r, const bw_dec *a)
{
    wide w, q;
    int twos = 0, fives = 0, scale;

    if (!dec_valid(a) || bw_dec_is_zero(a))
        return -1;
    /* a = 2^twos * 5^fives * rest * 10^-scale; 1/a terminates iff rest == 1. */
    w_from_dec(&w, a);
    for (;;) {
        q = w;
        if (w_divmod_small(&q, 2) != 0)
            break;
        w = q;
        twos++;
    }
    for (;;) {
        q = w;
        if (w_divmod_small(&q, 5) != 0)
            break;
        w = q;
        fives++;
    }
    memset(&q, 0, sizeof(q));
    q.l[0] = 1;
    if (w_cmp(&w, &q) != 0)
        return -1;
    /* 1 / (2^i * 5^j * 10^-s) = 5^i * 2^j * 10^-(i + j - s) */
    w = q;
    for (int i = 0; i < twos; i++)
        if (w_mul_small(&w, 5) != 0)
            return -1;
    for (int j = 0; j < fives; j++)
        if (w_mul_small(&w, 2) != 0)
            return -1;
    scale = twos + fives - a->scale;
    return fit(&w, scale, r);
}

int bw_dec_round(bw_dec *r, const bw_dec *a, int decimals, bw_rounding mode)
{
    wide w;
    int drop;
    uint32_t first = 0; /* the most significant dropped digit */
    int sticky = 0;     /* any non-zero digit below it */
    int up = 0;

    if (!dec_valid(a) || decimals < 0 || decimals > MAXSCALE)
        return -1;
    w_from_dec(&w, a);
    if (decimals >= a->scale) {
        if (w_mul_pow10(&w, decimals - a->scale) != 0)
            return -1;
        for (int i = BW_DEC_LIMBS; i < WIDE_LIMBS; i++)
            if (w.l[i])
                return -1;
        memcpy(r->limb, w.l, sizeof(r->limb));
        r->scale = decimals;
        return 0;
    }
    drop = a->scale - decimals;
    for (int i = 0; i < drop; i++) {
        sticky |= first != 0;
        first = w_divmod_small(&w, 10);
    }
    switch (mode) {
    case BW_ROUND_HALF_UP:
        up = first >= 5;
        break;
    case BW_ROUND_HALF_EVEN:
        up = first > 5 || (first == 5 && (sticky || (w.l[0] & 1)));
        break;
    case BW_ROUND_CEIL:
        up = first != 0 || sticky;
        break;
    case BW_ROUND_FLOOR:
        up = 0;
        break;
    default:
        return -1;
    }
    if (up) {
        wide one;

        memset(&one, 0, sizeof(one));
        one.l[0] = 1;
        /* Cannot overflow: w < a / 10 after dropping at least one digit. */
        if (w_add(&w, &one) != 0)
            return -1;
    }
    memcpy(r->limb, w.l, sizeof(r->limb));
    r->scale = decimals;
    return 0;
}

void bw_dec_normalize(bw_dec *d)
{
    wide w;

    w_from_dec(&w, d);
    while (d->scale > 0 && w.l[0] % 10 == 0) {
        w_divmod_small(&w, 10);
        d->scale--;
    }
    if (w_is_zero(&w))
        d->scale = 0;
    memcpy(d->limb, w.l, sizeof(d->limb));
}

/* The mantissa's decimal digits, most significant first ("0" for zero). */
static int mantissa_digits(const bw_dec *d, char *buf)
{
    int top = BW_DEC_LIMBS - 1, n;

    while (top > 0 && d->limb[top] == 0)
        top--;
    n = sprintf(buf, "%u", (unsigned)d->limb[top]);
    for (int i = top - 1; i >= 0; i--)
        n += sprintf(buf + n, "%09u", (unsigned)d->limb[i]);
    return n;
}

/* Plain text of d with exactly max(d->scale, decimals) decimals. */
static int format(const bw_dec *d, int decimals, char *buf, size_t size)
{
    char dig[MAXDIGITS + 1];
    char out[BW_DEC_STRMAX + MAXSCALE];
    int n = mantissa_digits(d, dig), o = 0, s = d->scale;

    if (n <= s) {
        out[o++] = '0';
        out[o++] = '.';
        for (int i = n; i < s; i++)
            out[o++] = '0';
        memcpy(out + o, dig, (size_t)n);
        o += n;
    } else {
        memcpy(out + o, dig, (size_t)(n - s));
        o += n - s;
        if (s > 0) {
            out[o++] = '.';
            memcpy(out + o, dig + n - s, (size_t)s);
            o += s;
        }
    }
    if (decimals > s) {
        if (s == 0)
            out[o++] = '.';
        for (int i = s; i < decimals; i++)
            out[o++] = '0';
    }
    if ((size_t)o + 1 > size)
        return -1;
    memcpy(buf, out, (size_t)o);
    buf[o] = '\0';
    return o;
}

int bw_dec_to_str(const bw_dec *d, char *buf, size_t size)
{
    bw_dec n = *d;

    if (!dec_valid(d))
        return -1;
    bw_dec_normalize(&n);
    return format(&n, 0, buf, size);
}

int bw_dec_to_str_fixed(const bw_dec *d, int decimals, char *buf, size_t size)
{
    bw_dec n = *d;

    if (!dec_valid(d) || decimals < 0 || decimals > MAXSCALE)
        return -1;
    bw_dec_normalize(&n);
    if (n.scale > decimals)
        return -1;
    return format(&n, decimals, buf, size);
}

int bw_dec_to_micro(const bw_dec *d, int64_t *micro)
{
    bw_dec n = *d;
    wide w;
    uint64_t v = 0;

    if (!dec_valid(d))
        return -1;
    bw_dec_normalize(&n);
    if (n.scale > 6)
        return -1;
    w_from_dec(&w, &n);
    if (w_mul_pow10(&w, 6 - n.scale) != 0)
        return -1;
    for (int i = 3; i < WIDE_LIMBS; i++)
        if (w.l[i])
            return -1;
    /* At most 27 digits here; check each step against INT64_MAX. */
    for (int i = 2; i >= 0; i--) {
        if (v > (uint64_t)INT64_MAX / BW_DEC_BASE)
            return -1;
        v = v * BW_DEC_BASE;
        if (v > (uint64_t)INT64_MAX - w.l[i])
            return -1;
        v += w.l[i];
    }
    *micro = (int64_t)v;
    return 0;
}

static const char *const rounding_names[] = {"half_up", "half_even", "ceil", "floor"};

int bw_rounding_parse(const char *s, bw_rounding *mode)
{
    if (!s)
        return -1;
    for (size_t i = 0; i < sizeof(rounding_names) / sizeof(rounding_names[0]); i++) {
        if (strcmp(s, rounding_names[i]) == 0) {
            *mode = (bw_rounding)i;
            return 0;
        }
    }
    return -1;
}

const char *bw_rounding_name(bw_rounding mode)
{
    if ((unsigned)mode < sizeof(rounding_names) / sizeof(rounding_names[0]))
        return rounding_names[mode];
    return "unknown";
}

/*
 * test_dec.c - exact decimals (bw_dec.h).
 *
 * Every expected value below was worked out by hand; the arithmetic is in
 * the comment next to it.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "bw_dec.h"

#define N(a) (sizeof(a) / sizeof((a)[0]))

/* 72 nines: the largest mantissa. */
#define NINES72 "999999999999999999999999999999999999999999999999999999999999999999999999"
/* 1 followed by 71 zeros: 10^71, 72 digits. */
#define E71 "100000000000000000000000000000000000000000000000000000000000000000000000"
/* 0. followed by 71 zeros and a 1: 10^-72, the smallest positive value. */
#define EM72 "0.000000000000000000000000000000000000000000000000000000000000000000000001"

static bw_dec dec(const char *s)
{
    bw_dec d;

    if (bw_dec_from_str(&d, s) != 0)
        fail_msg("cannot parse \"%s\"", s);
    return d;
}

static const char *str(const bw_dec *d)
{
    static char buf[BW_DEC_STRMAX];

    if (bw_dec_to_str(d, buf, sizeof(buf)) < 0)
        return "<to_str failed>";
    return buf;
}

/* ------------------------------------------------------------------ parse */

static void test_parse_print(void **state)
{
    static const struct {
        const char *in;
        const char *out; /* NULL: must fail */
    } cases[] = {
        {"12", "12"},
        {"0.075", "0.075"},
        {"1.5e-7", "0.00000015"}, /* 1.5 / 10^7: seven places left of "1.5" */
        {"2.5E+3", "2500"},       /* 2.5 * 1000 */
        {"+3.10", "3.1"},         /* '+' allowed, trailing zero decimal dropped */
        {"0", "0"},
        {"0.000", "0"},
        {"007", "7"},
        {"100.5", "100.5"},
        {"1000000000", "1000000000"}, /* 10^9: exactly one limb boundary */
        {"123456789012345678901234567890.123456789", "123456789012345678901234567890.123456789"},
        {"0e-99999", "0"},   /* zero whatever the exponent */
        {"1000e-75", EM72},  /* 10^3 * 10^-75 = 10^-72 */
        {"1e-72", EM72},     /* smallest scale allowed */
        {"1e71", E71},       /* 72 digits */
        {NINES72, NINES72},  /* largest mantissa */
        {"1e-73", NULL},     /* scale 73: out of range */
        {"1e72", NULL},      /* 73 digits */
        {"1" NINES72, NULL}, /* 73 digits */
        {"", NULL},
        {"-1", NULL},
        {"+", NULL},
        {".5", NULL},
        {"1.", NULL},
        {"1e", NULL},
        {"1e+", NULL},
        {"abc", NULL},
        {"1 ", NULL},
        {" 1", NULL},
        {"1.2.3", NULL},
        {"0x10", NULL},
        {"1,5", NULL},
        {"nan", NULL},
        {"inf", NULL},
    };

    (void)state;
    for (size_t i = 0; i < N(cases); i++) {
        bw_dec d;
        int rc = bw_dec_from_str(&d, cases[i].in);
        if (!cases[i].out) {
            if (rc != -1)
                fail_msg("\"%s\" should fail, gave %s", cases[i].in, str(&d));
            continue;
        }
        if (rc != 0)
            fail_msg("\"%s\" should parse", cases[i].in);
        assert_string_equal(str(&d), cases[i].out);
    }
}

static void test_from_u64(void **state)
{
    bw_dec d;

    (void)state;
    bw_dec_from_u64(&d, UINT64_MAX); /* 2^64 - 1 */
    assert_string_equal(str(&d), "18446744073709551615");
    bw_dec_from_u64(&d, 0);
    assert_true(bw_dec_is_zero(&d));
    assert_string_equal(str(&d), "0");
}

static void test_to_str_fixed(void **state)
{
    static const struct {
        const char *in;
        int decimals;
        const char *out; /* NULL: must fail (would lose digits) */
    } cases[] = {
        {"5", 4, "5.0000"},   {"1.25", 2, "1.25"},   {"0.001", 4, "0.0010"},
        {"0", 2, "0.00"},     {"7", 0, "7"},         {"0.5", 0, NULL},
        {"1.23456", 4, NULL}, {"1.20000", 1, "1.2"}, /* trailing zeros are not digits lost */
    };
    char buf[BW_DEC_STRMAX];
    bw_dec d;

    (void)state;
    for (size_t i = 0; i < N(cases); i++) {
        d = dec(cases[i].in);
        int n = bw_dec_to_str_fixed(&d, cases[i].decimals, buf, sizeof(buf));
        if (!cases[i].out) {
            assert_int_equal(n, -1);
            continue;
        }
        assert_string_equal(buf, cases[i].out);
        assert_int_equal(n, (int)strlen(cases[i].out));
    }
    /* Too small a buffer fails instead of truncating. */
    d = dec("5");
    assert_int_equal(bw_dec_to_str_fixed(&d, 4, buf, 6), -1); /* "5.0000" needs 7 bytes */
    assert_int_equal(bw_dec_to_str_fixed(&d, 4, buf, 7), 6);
    d = dec("12.5");
    assert_int_equal(bw_dec_to_str(&d, buf, 4), -1); /* "12.5" needs 5 bytes */
    /* The widest values fit in BW_DEC_STRMAX. */
    d = dec(EM72);
    assert_int_equal(bw_dec_to_str(&d, buf, sizeof(buf)), 74); /* "0." + 72 digits */
}

/* ------------------------------------------------------------ arithmetic */

static void test_add_sub(void **state)
{
    static const struct {
        char op;
        const char *a, *b;
        const char *r; /* NULL: must fail */
    } cases[] = {
        {'+', "0.1", "0.2", "0.3"},
        {'+', "1.5", "2.25", "3.75"},
        {'+', "999999999", "1", "1000000000"}, /* carry into the second limb */
        {'+', "0.999999999", "0.000000001", "1"},
        {'+', NINES72, "0", NINES72},
        {'+', NINES72, "1", NULL}, /* 10^72: 73 digits */
        {'+', E71, "0.1", NULL},   /* 10^71 + 0.1 needs 73 digits */
        {'+', "0", EM72, EM72},
        {'-', "1", "0.001", "0.999"},
        {'-', "1000000000", "1", "999999999"}, /* borrow across a limb */
        {'-', "2.5", "2.5", "0"},
        {'-', "1", "2", NULL}, /* negative results fail */
    };

    (void)state;
    for (size_t i = 0; i < N(cases); i++) {
        bw_dec a = dec(cases[i].a), b = dec(cases[i].b), r;
        int rc = cases[i].op == '+' ? bw_dec_add(&r, &a, &b) : bw_dec_sub(&r, &a, &b);
        if (!cases[i].r) {
            if (rc != -1)
                fail_msg("%s %c %s should fail", cases[i].a, cases[i].op, cases[i].b);
            continue;
        }
        assert_int_equal(rc, 0);
        assert_string_equal(str(&r), cases[i].r);
    }
    /* r may alias a. */
    bw_dec a = dec("1.25"), b = dec("0.75");
    assert_int_equal(bw_dec_add(&a, &a, &b), 0);
    assert_string_equal(str(&a), "2");
}

static void test_mul(void **state)
{
    static const struct {
        const char *a, *b;
        const char *r; /* NULL: must fail */
    } cases[] = {
        {"0.075", "0.002", "0.00015"}, /* 75 * 2 = 150, 3 + 3 = 6 decimals */
        {"2.5", "400", "1000"},
        {"0.1", "0.1", "0.01"},
        /* 123456789 * 987654321 = 121932631112635269 (the classic product) */
        {"123456789", "987654321", "121932631112635269"},
        /* 999999999 * 999999999 = 10^18 - 2*10^9 + 1 */
        {"999999999", "999999999", "999999998000000001"},
        {"1e35", "1e36", E71},    /* 10^71: 72 digits */
        {"1e36", "1e36", NULL},   /* 10^72: 73 digits */
        {"1e-40", "1e-40", NULL}, /* 10^-80: scale 80 */
        {"1e-36", "1e-36", EM72}, /* 10^-72 */
        {NINES72, "0", "0"},
    };

    (void)state;
    for (size_t i = 0; i < N(cases); i++) {
        bw_dec a = dec(cases[i].a), b = dec(cases[i].b), r;
        int rc = bw_dec_mul(&r, &a, &b);
        if (!cases[i].r) {
            if (rc != -1)
                fail_msg("%s * %s should fail", cases[i].a, cases[i].b);
            continue;
        }
        assert_int_equal(rc, 0);
        assert_string_equal(str(&r), cases[i].r);
    }
}

static void test_mul_trailing_zeros(void **state)
{
    /* mantissa 10^9 at scale 45 (= 10^-36) squared: mantissa 10^18 at
     * scale 90; 18 trailing zeros can go, giving 1 at scale 72 = 10^-72. */
    bw_dec a, r;

    (void)state;
    bw_dec_zero(&a);
    a.limb[1] = 1;
    a.scale = 45;
    assert_int_equal(bw_dec_mul(&r, &a, &a), 0);
    assert_string_equal(str(&r), EM72);
}

static void test_mul_u64(void **state)
{
    static const struct {
        const char *a;
        uint64_t v;
        const char *r;
    } cases[] = {
        /* (2^40 - 1) * 0.15: 1099511627775 * 15 = 16492674416625, / 100 */
        {"0.15", 1099511627775ULL, "164926744166.25"},
        {"1", UINT64_MAX, "18446744073709551615"},
        /* 18446744073709551615 * 1.5 = 27670116110564327422.5 */
        {"1.5", UINT64_MAX, "27670116110564327422.5"},
        {"0.001", 1000, "1"},
        {"7", 0, "0"},
    };

    (void)state;
    for (size_t i = 0; i < N(cases); i++) {
        bw_dec a = dec(cases[i].a), r;
        assert_int_equal(bw_dec_mul_u64(&r, &a, cases[i].v), 0);
        assert_string_equal(str(&r), cases[i].r);
    }
    /* 10^60 * (2^64 - 1) has 80 digits. */
    bw_dec big = dec("1e60"), r;
    assert_int_equal(bw_dec_mul_u64(&r, &big, UINT64_MAX), -1);
}

static void test_div_pow10_cmp(void **state)
{
    bw_dec d = dec("1.5");
    bw_dec a, b;

    (void)state;
    assert_int_equal(bw_dec_div_pow10(&d, 6), 0); /* 1.5 / 10^6 */
    assert_string_equal(str(&d), "0.0000015");
    d = dec("1e-70");
    assert_int_equal(bw_dec_div_pow10(&d, 3), -1); /* scale 73 */
    a = dec("1e-70");
    assert_int_equal(bw_dec_cmp(&d, &a), 0); /* unchanged on failure */

    a = dec("1.50");
    b = dec("1.5");
    assert_int_equal(bw_dec_cmp(&a, &b), 0);
    a = dec("0.1");
    b = dec("0.11");
    assert_true(bw_dec_cmp(&a, &b) < 0);
    a = dec("10");
    b = dec("9.999");
    assert_true(bw_dec_cmp(&a, &b) > 0);
    a = dec(NINES72);
    b = dec(EM72); /* alignment needs 144 digits */
    assert_true(bw_dec_cmp(&a, &b) > 0);
    assert_true(bw_dec_cmp(&b, &a) < 0);
}

/* -------------------------------------------------------------- rounding */

static void test_round(void **state)
{
    static const struct {
        const char *in;
        int decimals;
        const char *half_up, *half_even, *ceil, *floor;
    } cases[] = {
        /* exact ties */
        {"2.5", 0, "3", "2", "3", "2"},                         /* 2 is even */
        {"3.5", 0, "4", "4", "4", "3"},                         /* 4 is even */
        {"0.5", 0, "1", "0", "1", "0"},                         /* 0 is even */
        {"1.00005", 4, "1.0001", "1.0000", "1.0001", "1.0000"}, /* last kept 0: even */
        {"1.00015", 4, "1.0002", "1.0002", "1.0002", "1.0001"}, /* last kept 1: odd */
        /* not ties: the digits below the first dropped one decide */
        {"2.5000001", 0, "3", "3", "3", "2"},
        {"2.4999999", 0, "2", "2", "3", "2"},
        {"0.00004", 4, "0.0000", "0.0000", "0.0001", "0.0000"},
        /* a carry through every kept digit */
        {"999.99995", 4, "1000.0000", "1000.0000", "1000.0000", "999.9999"},
        /* fewer decimals than asked: only the scale grows */
        {"5", 4, "5.0000", "5.0000", "5.0000", "5.0000"},
        {"0.0375", 6, "0.037500", "0.037500", "0.037500", "0.037500"},
        /* 8933531975.671875 (the 2^40-1 tokens case of test_pricing) */
        {"8933531975.671875", 4, "8933531975.6719", "8933531975.6719", "8933531975.6719",
         "8933531975.6718"},
        /* 0.0000375 at 4 decimals: first dropped digit 3 */
        {"0.0000375", 4, "0.0000", "0.0000", "0.0001", "0.0000"},
    };
    static const bw_rounding modes[] = {BW_ROUND_HALF_UP, BW_ROUND_HALF_EVEN, BW_ROUND_CEIL,
                                        BW_ROUND_FLOOR};
    char buf[BW_DEC_STRMAX];

    (void)state;
    for (size_t i = 0; i < N(cases); i++) {
        const char *want[] = {cases[i].half_up, cases[i].half_even, cases[i].ceil, cases[i].floor};
        for (size_t m = 0; m < N(modes); m++) {
            bw_dec a = dec(cases[i].in), r;
            assert_int_equal(bw_dec_round(&r, &a, cases[i].decimals, modes[m]), 0);
            assert_int_equal(r.scale, cases[i].decimals);
            assert_true(bw_dec_to_str_fixed(&r, cases[i].decimals, buf, sizeof(buf)) > 0);
            if (strcmp(buf, want[m]) != 0)
                fail_msg("round(%s, %d, %s) = %s, want %s", cases[i].in, cases[i].decimals,
                         bw_rounding_name(modes[m]), buf, want[m]);
        }
    }
    /* Rounding in place. */
    bw_dec d = dec("2.5");
    assert_int_equal(bw_dec_round(&d, &d, 0, BW_ROUND_HALF_EVEN), 0);
    assert_string_equal(str(&d), "2");
    /* Growing the scale of a 72-digit mantissa overflows. */
    d = dec(NINES72);
    assert_int_equal(bw_dec_round(&d, &d, 1, BW_ROUND_HALF_UP), -1);
}

static void test_rounding_names(void **state)
{
    static const struct {
        const char *name;
        bw_rounding mode;
    } cases[] = {{"half_up", BW_ROUND_HALF_UP},
                 {"half_even", BW_ROUND_HALF_EVEN},
                 {"ceil", BW_ROUND_CEIL},
                 {"floor", BW_ROUND_FLOOR}};
    bw_rounding m;

    (void)state;
    for (size_t i = 0; i < N(cases); i++) {
        assert_int_equal(bw_rounding_parse(cases[i].name, &m), 0);
        assert_int_equal(m, cases[i].mode);
        assert_string_equal(bw_rounding_name(cases[i].mode), cases[i].name);
    }
    assert_int_equal(bw_rounding_parse("HALF_UP", &m), -1);
    assert_int_equal(bw_rounding_parse("bankers", &m), -1);
    assert_int_equal(bw_rounding_parse("", &m), -1);
}

/* ------------------------------------------------------------ from_double */

static void test_from_double(void **state)
{
    static const struct {
        double v;
        int maxsig;
        const char *out; /* NULL: must fail */
    } cases[] = {
        {0.1, 12, "0.1"},
        {0.075, 12, "0.075"},
        {0.002, 12, "0.002"},
        {1e-7, 12, "0.0000001"},
        {2.5e-06, 12, "0.0000025"},
        {0.60, 12, "0.6"},
        {10.0, 12, "10"},
        {3.75, 12, "3.75"},
        {0.0, 12, "0"},
        {0.1234567890123, 12, NULL}, /* 13 significant digits */
        {0.1234567890123, 13, "0.1234567890123"},
        {123456789012.0, 12, "123456789012"},
        /* LiteLLM's repr() of 1/30000: 17 significant digits */
        {3.3333333333333335e-05, 17, "0.000033333333333333335"},
        {3.3333333333333335e-05, 12, NULL},
        {-1.0, 12, NULL},
        {1e300, 12, NULL}, /* 301 digits */
        {1e-300, 12, NULL},
        {NAN, 12, NULL},
        {INFINITY, 12, NULL},
    };

    (void)state;
    for (size_t i = 0; i < N(cases); i++) {
        bw_dec d;
        int rc = bw_dec_from_double(&d, cases[i].v, cases[i].maxsig);
        if (!cases[i].out) {
            if (rc != -1)
                fail_msg("case %zu (%.17g) should fail, gave %s", i, cases[i].v, str(&d));
            continue;
        }
        if (rc != 0)
            fail_msg("case %zu (%.17g) should convert", i, cases[i].v);
        assert_string_equal(str(&d), cases[i].out);
    }
}

/* -------------------------------------------------------------- inverse */

static void test_inverse(void **state)
{
    static const struct {
        const char *in;
        const char *out; /* NULL: 1/x does not terminate (or x = 0) */
    } cases[] = {
        {"0.002", "500"},                       /* 2 * 10^-3: 1/2 = 0.5, * 10^3 */
        {"0.0025", "400"},                      /* 25 * 10^-4: 1/25 = 0.04, * 10^4 */
        {"0.01", "100"},     {"0.0016", "625"}, /* 16 = 2^4: 1/16 = 0.0625, * 10^4 */
        {"1.28", "0.78125"},                    /* 128 = 2^7: 1/128 = 0.0078125, * 100 */
        {"4", "0.25"},       {"1", "1"},        {"0.003", NULL}, /* 1/3 */
        {"0.0021", NULL},                                        /* 21 = 3 * 7 */
        {"0", NULL},
    };

    (void)state;
    for (size_t i = 0; i < N(cases); i++) {
        bw_dec a = dec(cases[i].in), r;
        int rc = bw_dec_inverse(&r, &a);
        if (!cases[i].out) {
            if (rc != -1)
                fail_msg("1/%s should fail", cases[i].in);
            continue;
        }
        assert_int_equal(rc, 0);
        assert_string_equal(str(&r), cases[i].out);
    }
    /* Trailing zeros in the mantissa: 20 * 10^-4 is still 0.002. */
    bw_dec a, r;
    bw_dec_zero(&a);
    a.limb[0] = 20;
    a.scale = 4;
    assert_int_equal(bw_dec_inverse(&r, &a), 0);
    assert_string_equal(str(&r), "500");
}

/* ---------------------------------------------------------------- micro */

static void test_to_micro(void **state)
{
    static const struct {
        const char *in;
        int ok;
        int64_t micro;
    } cases[] = {
        {"5.0000", 1, 5000000},
        {"0.000001", 1, 1},
        {"0", 1, 0},
        {"0.0375", 1, 37500},
        {"9223372036854.775807", 1, INT64_MAX}, /* (2^63 - 1) / 10^6 */
        {"9223372036854.775808", 0, 0},         /* one millionth more */
        {"0.0000001", 0, 0},                    /* not a whole millionth */
        {NINES72, 0, 0},
    };

    (void)state;
    for (size_t i = 0; i < N(cases); i++) {
        bw_dec d = dec(cases[i].in);
        int64_t m = -7;
        int rc = bw_dec_to_micro(&d, &m);
        if (!cases[i].ok) {
            assert_int_equal(rc, -1);
            continue;
        }
        assert_int_equal(rc, 0);
        assert_true(m == cases[i].micro);
    }
}

static void test_normalize(void **state)
{
    bw_dec d = dec("5");
    bw_dec r;

    (void)state;
    assert_int_equal(bw_dec_round(&r, &d, 4, BW_ROUND_HALF_UP), 0);
    assert_int_equal(r.scale, 4);
    bw_dec_normalize(&r);
    assert_int_equal(r.scale, 0);
    assert_string_equal(str(&r), "5");
    bw_dec_zero(&r);
    r.scale = 5;
    bw_dec_normalize(&r);
    assert_int_equal(r.scale, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_print),  cmocka_unit_test(test_from_u64),
        cmocka_unit_test(test_to_str_fixed), cmocka_unit_test(test_add_sub),
        cmocka_unit_test(test_mul),          cmocka_unit_test(test_mul_trailing_zeros),
        cmocka_unit_test(test_mul_u64),      cmocka_unit_test(test_div_pow10_cmp),
        cmocka_unit_test(test_round),        cmocka_unit_test(test_rounding_names),
        cmocka_unit_test(test_from_double),  cmocka_unit_test(test_inverse),
        cmocka_unit_test(test_to_micro),     cmocka_unit_test(test_normalize),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}

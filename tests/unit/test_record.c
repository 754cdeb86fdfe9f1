/*
 * test_record.c - settlement record serialisation limits.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "bw_record.h"

static json_t *record_with_lines(size_t n_lines)
{
    json_t *rec = json_object(), *lines = json_array();
    char name[256];

    json_object_set_new(rec, "request_id", json_string("r1"));
    json_object_set_new(rec, "amount_credits", json_string("8000.0000"));
    json_object_set_new(rec, "amount_micro", json_integer(8000000000));
    for (size_t i = 0; i < n_lines; i++) {
        json_t *ln = json_object();
        /* a distinct 200-character model name per line */
        snprintf(name, sizeof(name), "model-%05zu-%0193d", i, 0);
        json_object_set_new(ln, "kind", json_string("model"));
        json_object_set_new(ln, "name", json_string(name));
        json_object_set_new(ln, "credits", json_string("1"));
        json_array_append_new(lines, ln);
    }
    json_object_set_new(rec, "lines", lines);
    json_object_set_new(rec, "status", json_string("settled"));
    return rec;
}

/* A record of ordinary size is serialised as it is, lines included. */
static void test_small_record_unchanged(void **state)
{
    json_t *rec = record_with_lines(3), *back;
    char *txt = bw_record_dump(rec), *plain = json_dumps(rec, JSON_COMPACT | JSON_PRESERVE_ORDER);

    assert_string_equal(txt, plain);
    back = json_loads(txt, 0, NULL);
    assert_int_equal(json_array_size(json_object_get(back, "lines")), 3);
    assert_null(json_object_get(back, "lines_omitted"));
    json_decref(back);
    free(txt);
    free(plain);
    json_decref(rec);
    (void)state;
}

/* 8000 lines of ~260 bytes each (~2 MB) would never fit in a Kafka message:
 * the lines go, their count and every amount stay. */
static void test_huge_record_loses_lines_only(void **state)
{
    json_t *rec = record_with_lines(8000), *back;
    char *txt = bw_record_dump(rec);

    assert_non_null(txt);
    assert_true(strlen(txt) <= BW_RECORD_MAX);
    back = json_loads(txt, 0, NULL);
    assert_non_null(back);
    assert_int_equal(json_array_size(json_object_get(back, "lines")), 0);
    assert_int_equal(json_integer_value(json_object_get(back, "lines_omitted")), 8000);
    assert_string_equal(json_string_value(json_object_get(back, "amount_credits")), "8000.0000");
    assert_int_equal(json_integer_value(json_object_get(back, "amount_micro")), 8000000000);
    assert_string_equal(json_string_value(json_object_get(back, "status")), "settled");
    /* the caller's record is not changed */
    assert_int_equal(json_array_size(json_object_get(rec, "lines")), 8000);
    json_decref(back);
    free(txt);
    json_decref(rec);
    (void)state;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_small_record_unchanged),
        cmocka_unit_test(test_huge_record_loses_lines_only),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

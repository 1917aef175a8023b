/* Unicode tables and UTF-8 helpers used by the tokenizer. */
#include "worker/unicode.h"

#include <check.h>
#include <stdlib.h>
#include <string.h>

START_TEST(flags_of_known_code_points)
{
    ck_assert_uint_eq(kvs_unicode_flags('a'), KVS_UNICODE_LETTER);
    ck_assert_uint_eq(kvs_unicode_flags('Z'), KVS_UNICODE_LETTER);
    ck_assert_uint_eq(kvs_unicode_flags('7'), KVS_UNICODE_NUMBER);
    ck_assert_uint_eq(kvs_unicode_flags(' '), KVS_UNICODE_SEPARATOR | KVS_UNICODE_SPACE);
    ck_assert_uint_eq(kvs_unicode_flags('\n'), KVS_UNICODE_CONTROL | KVS_UNICODE_SPACE);
    ck_assert_uint_eq(kvs_unicode_flags('\t'), KVS_UNICODE_CONTROL | KVS_UNICODE_SPACE);
    ck_assert_uint_eq(kvs_unicode_flags('$'), KVS_UNICODE_SYMBOL);
    ck_assert_uint_eq(kvs_unicode_flags('+'), KVS_UNICODE_SYMBOL);
    ck_assert_uint_eq(kvs_unicode_flags('`'), KVS_UNICODE_SYMBOL);
    ck_assert_uint_eq(kvs_unicode_flags('!'), KVS_UNICODE_PUNCT);
    ck_assert_uint_eq(kvs_unicode_flags('_'), KVS_UNICODE_PUNCT);
    ck_assert_uint_eq(kvs_unicode_flags(0x00A0), KVS_UNICODE_SEPARATOR | KVS_UNICODE_SPACE);
    ck_assert_uint_eq(kvs_unicode_flags(0x0085), KVS_UNICODE_CONTROL | KVS_UNICODE_SPACE);
    ck_assert_uint_eq(kvs_unicode_flags(0x3000), KVS_UNICODE_SEPARATOR | KVS_UNICODE_SPACE);
    ck_assert_uint_eq(kvs_unicode_flags(0x200B), KVS_UNICODE_CONTROL); /* ZWSP is Cf, not \s */
    ck_assert_uint_eq(kvs_unicode_flags(0x0301), KVS_UNICODE_MARK);
    ck_assert_uint_eq(kvs_unicode_flags(0x4E2D), KVS_UNICODE_LETTER);    /* 中 */
    ck_assert_uint_eq(kvs_unicode_flags(0x0663), KVS_UNICODE_NUMBER);    /* Arabic-Indic 3 */
    ck_assert_uint_eq(kvs_unicode_flags(0x2460), KVS_UNICODE_NUMBER);    /* ① */
    ck_assert_uint_eq(kvs_unicode_flags(0x1F600), KVS_UNICODE_SYMBOL);   /* 😀 */
    ck_assert_uint_eq(kvs_unicode_flags(0xFE0F), KVS_UNICODE_MARK);      /* VS16 */
    ck_assert_uint_eq(kvs_unicode_flags(0xD800), KVS_UNICODE_CONTROL);   /* surrogate: Cs */
    ck_assert_uint_eq(kvs_unicode_flags(0xE000), KVS_UNICODE_CONTROL);   /* private use: Co */
    ck_assert_uint_eq(kvs_unicode_flags(0x0378), KVS_UNICODE_UNDEFINED); /* unassigned */
    ck_assert_uint_eq(kvs_unicode_flags(0x10FFFF), KVS_UNICODE_UNDEFINED);
    ck_assert_uint_eq(kvs_unicode_flags(0x110000), 0);
    ck_assert_uint_eq(kvs_unicode_flags(0xFFFFFFFF), 0);
    /* Unicode 15.1 (what llama.cpp uses): U+2FFC (new in 15.1) assigned, U+0897 (16.0) not */
    ck_assert_uint_eq(kvs_unicode_flags(0x2FFC), KVS_UNICODE_SYMBOL);
    ck_assert_uint_eq(kvs_unicode_flags(0x0CF3), KVS_UNICODE_MARK); /* 15.0 */
    ck_assert_uint_eq(kvs_unicode_flags(0x0897), KVS_UNICODE_UNDEFINED);
}
END_TEST

START_TEST(table_is_well_formed)
{
    ck_assert_uint_gt(kvs_unicode_n_ranges, 1000);
    ck_assert_uint_eq(kvs_unicode_ranges[0].first, 0);
    for (size_t i = 1; i < kvs_unicode_n_ranges; i++) {
        ck_assert_uint_lt(kvs_unicode_ranges[i - 1].first, kvs_unicode_ranges[i].first);
        ck_assert_uint_ne(kvs_unicode_ranges[i - 1].flags, kvs_unicode_ranges[i].flags);
        uint16_t cls = kvs_unicode_ranges[i].flags & 0xFF;
        ck_assert_msg(cls != 0 && (cls & (cls - 1)) == 0, "one class per range");
    }
    for (size_t i = 1; i < kvs_unicode_n_lower; i++) {
        ck_assert_uint_lt(kvs_unicode_lower[i - 1].from, kvs_unicode_lower[i].from);
    }
}
END_TEST

START_TEST(lowercase)
{
    ck_assert_uint_eq(kvs_unicode_tolower('A'), 'a');
    ck_assert_uint_eq(kvs_unicode_tolower('a'), 'a');
    ck_assert_uint_eq(kvs_unicode_tolower('1'), '1');
    ck_assert_uint_eq(kvs_unicode_tolower(0x00C9), 0x00E9); /* É */
    ck_assert_uint_eq(kvs_unicode_tolower(0x0130), 0x0069); /* İ: simple mapping */
    ck_assert_uint_eq(kvs_unicode_tolower(0x212A), 'k');    /* Kelvin sign */
    ck_assert_uint_eq(kvs_unicode_tolower(0x0410), 0x0430); /* А */
    ck_assert_uint_eq(kvs_unicode_tolower(0x4E2D), 0x4E2D);
}
END_TEST

static uint32_t dec1(const char *s, size_t n, size_t *pos)
{
    *pos = 0;
    return kvs_unicode_decode(s, n, pos);
}

START_TEST(decode_is_lenient_like_llama_cpp)
{
    size_t pos;
    ck_assert_uint_eq(dec1("A", 1, &pos), 'A');
    ck_assert_uint_eq(pos, 1);
    ck_assert_uint_eq(dec1("\xc3\xa9", 2, &pos), 0xE9);
    ck_assert_uint_eq(pos, 2);
    ck_assert_uint_eq(dec1("\xe2\x82\xac", 3, &pos), 0x20AC);
    ck_assert_uint_eq(pos, 3);
    ck_assert_uint_eq(dec1("\xf0\x9f\x98\x80", 4, &pos), 0x1F600);
    ck_assert_uint_eq(pos, 4);
    /* invalid: one U+FFFD per byte */
    ck_assert_uint_eq(dec1("\xff", 1, &pos), KVS_UNICODE_REPLACEMENT);
    ck_assert_uint_eq(pos, 1);
    ck_assert_uint_eq(dec1("\x80", 1, &pos), KVS_UNICODE_REPLACEMENT);
    ck_assert_uint_eq(pos, 1);
    ck_assert_uint_eq(dec1("\xc3", 1, &pos), KVS_UNICODE_REPLACEMENT); /* truncated */
    ck_assert_uint_eq(pos, 1);
    ck_assert_uint_eq(dec1("\xe2\x82", 2, &pos), KVS_UNICODE_REPLACEMENT);
    ck_assert_uint_eq(pos, 1);
    ck_assert_uint_eq(dec1("\xc3(", 2, &pos), KVS_UNICODE_REPLACEMENT);
    ck_assert_uint_eq(pos, 1);
    ck_assert_uint_eq(dec1("\xf8\x88\x80\x80\x80", 5, &pos), KVS_UNICODE_REPLACEMENT);
    ck_assert_uint_eq(pos, 1);
    /* accepted by value: overlong, surrogate */
    ck_assert_uint_eq(dec1("\xc0\x80", 2, &pos), 0);
    ck_assert_uint_eq(pos, 2);
    ck_assert_uint_eq(dec1("\xed\xa0\x80", 3, &pos), 0xD800);
    ck_assert_uint_eq(pos, 3);
    /* above U+10FFFF: one U+FFFD for the 4-byte form */
    ck_assert_uint_eq(dec1("\xf4\x90\x80\x80", 4, &pos), KVS_UNICODE_REPLACEMENT);
    ck_assert_uint_eq(pos, 4);
    /* never reads past len */
    ck_assert_uint_eq(dec1("\xf0\x9f\x98\x80", 3, &pos), KVS_UNICODE_REPLACEMENT);
    ck_assert_uint_eq(pos, 1);
}
END_TEST

START_TEST(encode_round_trips)
{
    for (uint32_t c = 0; c < KVS_UNICODE_MAX; c += (c < 0x3000 ? 1 : 97)) {
        char buf[4];
        size_t n = kvs_unicode_encode(c, buf);
        size_t pos = 0;
        ck_assert_uint_eq(kvs_unicode_decode(buf, n, &pos), c);
        ck_assert_uint_eq(pos, n);
        bool surrogate = c >= 0xD800 && c <= 0xDFFF;
        ck_assert_int_eq(kvs_unicode_valid_utf8(buf, n), !surrogate);
    }
}
END_TEST

START_TEST(byte_map_is_gpt2s)
{
    bool seen[512] = {false};
    for (int b = 0; b < 256; b++) {
        uint32_t c = kvs_unicode_byte_to_cpt((uint8_t)b);
        ck_assert_uint_lt(c, 0x100 + 68);
        ck_assert(!seen[c]);
        seen[c] = true;
        ck_assert_int_eq(kvs_unicode_cpt_to_byte(c), b);
    }
    ck_assert_uint_eq(kvs_unicode_byte_to_cpt(' '), 0x120); /* Ġ */
    ck_assert_uint_eq(kvs_unicode_byte_to_cpt('\n'), 0x10A); /* Ċ */
    ck_assert_uint_eq(kvs_unicode_byte_to_cpt('a'), 'a');
    ck_assert_uint_eq(kvs_unicode_byte_to_cpt(0xAD), 0x143);
    ck_assert_int_eq(kvs_unicode_cpt_to_byte(0x144), -1);
    ck_assert_int_eq(kvs_unicode_cpt_to_byte(0x20), -1);
    ck_assert_int_eq(kvs_unicode_cpt_to_byte(0x4E2D), -1);
}
END_TEST

START_TEST(validity_and_tails)
{
    ck_assert(kvs_unicode_valid_utf8("", 0));
    ck_assert(kvs_unicode_valid_utf8("h\xc3\xa9", 3));
    ck_assert(!kvs_unicode_valid_utf8("\xc0\x80", 2));
    ck_assert(!kvs_unicode_valid_utf8("\xe0\x80\x80", 3));
    ck_assert(!kvs_unicode_valid_utf8("\xed\xa0\x80", 3));
    ck_assert(!kvs_unicode_valid_utf8("\xf4\x90\x80\x80", 4));
    ck_assert(!kvs_unicode_valid_utf8("\xc3", 1));
    ck_assert(!kvs_unicode_valid_utf8("\xff", 1));
    ck_assert_uint_eq(kvs_unicode_incomplete_tail("abc", 3), 0);
    ck_assert_uint_eq(kvs_unicode_incomplete_tail("a\xc3", 2), 1);
    ck_assert_uint_eq(kvs_unicode_incomplete_tail("a\xe2\x82", 3), 2);
    ck_assert_uint_eq(kvs_unicode_incomplete_tail("\xf0\x9f\x98", 3), 3);
    ck_assert_uint_eq(kvs_unicode_incomplete_tail("\xf0\x9f\x98\x80", 4), 0);
    ck_assert_uint_eq(kvs_unicode_incomplete_tail("a\xff", 2), 0);  /* can never finish */
    ck_assert_uint_eq(kvs_unicode_incomplete_tail("a\xed\xa0", 3), 0); /* surrogate start */
    ck_assert_uint_eq(kvs_unicode_incomplete_tail("\x80\x80", 2), 0);
    ck_assert_uint_eq(kvs_unicode_len_utf8('a'), 1);
    ck_assert_uint_eq(kvs_unicode_len_utf8(0x80), 1);
    ck_assert_uint_eq(kvs_unicode_len_utf8(0xC3), 2);
    ck_assert_uint_eq(kvs_unicode_len_utf8(0xE2), 3);
    ck_assert_uint_eq(kvs_unicode_len_utf8(0xFF), 4);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("unicode");
    TCase *tc = tcase_create("unicode");
    tcase_add_test(tc, flags_of_known_code_points);
    tcase_add_test(tc, table_is_well_formed);
    tcase_add_test(tc, lowercase);
    tcase_add_test(tc, decode_is_lenient_like_llama_cpp);
    tcase_add_test(tc, encode_round_trips);
    tcase_add_test(tc, byte_map_is_gpt2s);
    tcase_add_test(tc, validity_and_tails);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}

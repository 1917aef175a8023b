/* kernels/dtype.c: block geometry, fp16/bf16 conversions (exhaustive round trips and edge
 * cases), and dequantization of every type against hand-computed values. */
#include "kernels/dtype.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint32_t bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

START_TEST(test_geometry)
{
    ck_assert(kvs_dtype_is_supported(KVS_DTYPE_F32));
    ck_assert(kvs_dtype_is_supported(KVS_DTYPE_BF16));
    ck_assert(!kvs_dtype_is_supported(12)); /* Q4_K */
    ck_assert(!kvs_dtype_is_supported(UINT32_MAX));
    ck_assert_str_eq(kvs_dtype_name(KVS_DTYPE_Q4_1), "Q4_1");
    ck_assert_str_eq(kvs_dtype_name(99), "unknown");
    ck_assert_uint_eq(kvs_dtype_block_elems(KVS_DTYPE_Q8_0), 32);
    ck_assert_uint_eq(kvs_dtype_block_bytes(KVS_DTYPE_Q8_0), 34);
    ck_assert_uint_eq(kvs_dtype_block_bytes(KVS_DTYPE_Q4_0), 18);
    ck_assert_uint_eq(kvs_dtype_block_bytes(KVS_DTYPE_Q4_1), 20);
    ck_assert_uint_eq(kvs_dtype_block_elems(KVS_DTYPE_F16), 1);
    ck_assert_uint_eq(kvs_dtype_block_elems(7), 0);

    uint64_t n = 12345;
    ck_assert(kvs_dtype_row_bytes(KVS_DTYPE_Q4_1, 64, &n));
    ck_assert_uint_eq(n, 40);
    ck_assert(kvs_dtype_row_bytes(KVS_DTYPE_F16, 3, &n));
    ck_assert_uint_eq(n, 6);
    n = 777;
    ck_assert(!kvs_dtype_row_bytes(KVS_DTYPE_Q4_0, 33, &n));
    ck_assert(!kvs_dtype_row_bytes(KVS_DTYPE_F32, UINT64_MAX / 2, &n));
    ck_assert(!kvs_dtype_row_bytes(42, 32, &n));
    ck_assert_uint_eq(n, 777); /* left alone on failure */
}
END_TEST

START_TEST(test_fp16_known_values)
{
    ck_assert(kvs_fp16_to_fp32(0x3c00) == 1.0f);
    ck_assert(kvs_fp16_to_fp32(0xc000) == -2.0f);
    ck_assert(kvs_fp16_to_fp32(0x7bff) == 65504.0f);
    ck_assert(kvs_fp16_to_fp32(0x0001) == ldexpf(1.0f, -24)); /* smallest subnormal */
    ck_assert(kvs_fp16_to_fp32(0x03ff) == ldexpf(1023.0f, -24));
    ck_assert(kvs_fp16_to_fp32(0x0400) == ldexpf(1.0f, -14)); /* smallest normal */
    ck_assert_uint_eq(bits(kvs_fp16_to_fp32(0x8000)), 0x80000000u);
    ck_assert(isinf(kvs_fp16_to_fp32(0x7c00)) && kvs_fp16_to_fp32(0x7c00) > 0);
    ck_assert(isinf(kvs_fp16_to_fp32(0xfc00)) && kvs_fp16_to_fp32(0xfc00) < 0);
    ck_assert(isnan(kvs_fp16_to_fp32(0x7e00)));
    ck_assert(isnan(kvs_fp16_to_fp32(0x7c01))); /* signalling NaN stays NaN */

    ck_assert_uint_eq(kvs_fp32_to_fp16(1.0f), 0x3c00);
    ck_assert_uint_eq(kvs_fp32_to_fp16(-2.0f), 0xc000);
    ck_assert_uint_eq(kvs_fp32_to_fp16(0.5f), 0x3800);
    ck_assert_uint_eq(kvs_fp32_to_fp16(-0.0f), 0x8000);
    ck_assert_uint_eq(kvs_fp32_to_fp16(65504.0f), 0x7bff);
    ck_assert_uint_eq(kvs_fp32_to_fp16(65519.0f), 0x7bff); /* below the halfway point */
    ck_assert_uint_eq(kvs_fp32_to_fp16(65520.0f), 0x7c00); /* halfway rounds to even: Inf */
    ck_assert_uint_eq(kvs_fp32_to_fp16(1e10f), 0x7c00);
    ck_assert_uint_eq(kvs_fp32_to_fp16(-INFINITY), 0xfc00);
    /* ties to even in the normal range: 1 + 2^-11 is halfway between 1 and 1 + 2^-10 */
    ck_assert_uint_eq(kvs_fp32_to_fp16(1.0f + ldexpf(1.0f, -11)), 0x3c00);
    ck_assert_uint_eq(kvs_fp32_to_fp16(1.0f + 3 * ldexpf(1.0f, -11)), 0x3c02);
    ck_assert_uint_eq(kvs_fp32_to_fp16(1.0f + ldexpf(1.0f, -11) + ldexpf(1.0f, -20)), 0x3c01);
    /* subnormals */
    ck_assert_uint_eq(kvs_fp32_to_fp16(ldexpf(1.0f, -24)), 0x0001);
    ck_assert_uint_eq(kvs_fp32_to_fp16(ldexpf(1.0f, -25)), 0x0000); /* tie to even: 0 */
    ck_assert_uint_eq(kvs_fp32_to_fp16(ldexpf(1.0001f, -25)), 0x0001);
    ck_assert_uint_eq(kvs_fp32_to_fp16(ldexpf(3.0f, -25)), 0x0002);    /* 1.5 ulp: tie to 2 */
    ck_assert_uint_eq(kvs_fp32_to_fp16(ldexpf(1023.5f, -24)), 0x0400); /* carries to normal */
    ck_assert_uint_eq(kvs_fp32_to_fp16(1e-10f), 0x0000);
    ck_assert_uint_eq(kvs_fp32_to_fp16(-1e-10f), 0x8000);
    ck_assert_uint_eq(kvs_fp32_to_fp16(ldexpf(1.0f, -14)), 0x0400);
    /* NaN stays NaN with its sign */
    uint16_t h = kvs_fp32_to_fp16(NAN);
    ck_assert((h & 0x7c00) == 0x7c00 && (h & 0x03ff) != 0);
    h = kvs_fp32_to_fp16(from_bits(0xff800001u)); /* payload only in the low bits */
    ck_assert((h & 0x7c00) == 0x7c00 && (h & 0x03ff) != 0 && (h & 0x8000));
}
END_TEST

/* Every non-NaN half survives f16 -> f32 -> f16 exactly; every NaN stays NaN. */
START_TEST(test_fp16_round_trip_exhaustive)
{
    for (uint32_t i = 0; i < 65536; i++) {
        uint16_t h = (uint16_t)i;
        float f = kvs_fp16_to_fp32(h);
        uint16_t back = kvs_fp32_to_fp16(f);
        if ((h & 0x7c00) == 0x7c00 && (h & 0x03ff) != 0) {
            ck_assert(isnan(f));
            ck_assert((back & 0x7c00) == 0x7c00 && (back & 0x03ff) != 0);
        } else {
            ck_assert_msg(back == h, "0x%04x -> %a -> 0x%04x", h, (double)f, back);
        }
    }
}
END_TEST

/* Random floats round to the nearest half (ties to even), checked against the neighbours. */
START_TEST(test_fp16_nearest)
{
    srand(7);
    for (int i = 0; i < 200000; i++) {
        float f = ldexpf((float)rand() / (float)RAND_MAX, (rand() % 44) - 28);
        if (rand() & 1) {
            f = -f;
        }
        uint16_t h = kvs_fp32_to_fp16(f);
        double err = fabs((double)f - (double)kvs_fp16_to_fp32(h));
        if ((h & 0x7fff) >= 0x7c00) {
            ck_assert(fabs((double)f) >= 65520.0);
            continue;
        }
        uint16_t up = (uint16_t)(h + 1), down = (uint16_t)(h - 1);
        if ((up & 0x7fff) < 0x7c00) {
            double e = fabs((double)f - (double)kvs_fp16_to_fp32(up));
            ck_assert(err < e || (err == e && (h & 1) == 0));
        }
        if ((h & 0x7fff) != 0) {
            double e = fabs((double)f - (double)kvs_fp16_to_fp32(down));
            ck_assert(err < e || (err == e && (h & 1) == 0));
        }
    }
}
END_TEST

START_TEST(test_bf16)
{
    ck_assert_uint_eq(kvs_fp32_to_bf16(1.0f), 0x3f80);
    ck_assert(kvs_bf16_to_fp32(0x3f80) == 1.0f);
    ck_assert(kvs_bf16_to_fp32(0xc040) == -3.0f);
    ck_assert_uint_eq(kvs_fp32_to_bf16(from_bits(0x3f808000u)), 0x3f80); /* tie: even */
    ck_assert_uint_eq(kvs_fp32_to_bf16(from_bits(0x3f818000u)), 0x3f82); /* tie: even */
    ck_assert_uint_eq(kvs_fp32_to_bf16(from_bits(0x3f808001u)), 0x3f81);
    ck_assert_uint_eq(kvs_fp32_to_bf16(from_bits(0x3f807fffu)), 0x3f80);
    ck_assert_uint_eq(kvs_fp32_to_bf16(INFINITY), 0x7f80);
    ck_assert_uint_eq(kvs_fp32_to_bf16(-INFINITY), 0xff80);
    ck_assert_uint_eq(kvs_fp32_to_bf16(from_bits(0x7f7fffffu)), 0x7f80); /* FLT_MAX -> Inf */
    ck_assert_uint_eq(kvs_fp32_to_bf16(-0.0f), 0x8000);
    ck_assert_uint_eq(kvs_fp32_to_bf16(from_bits(0x00000001u)), 0x0000); /* tiny subnormal */
    uint16_t h = kvs_fp32_to_bf16(from_bits(0x7f800001u)); /* NaN whose payload is low */
    ck_assert((h & 0x7f80) == 0x7f80 && (h & 0x7f) != 0);
    ck_assert(isnan(kvs_bf16_to_fp32(0x7fc0)));
    for (uint32_t i = 0; i < 65536; i++) {
        uint16_t v = (uint16_t)i;
        float f = kvs_bf16_to_fp32(v);
        if (isnan(f)) {
            ck_assert(isnan(kvs_bf16_to_fp32(kvs_fp32_to_bf16(f))));
        } else {
            ck_assert_uint_eq(kvs_fp32_to_bf16(f), v);
        }
    }
}
END_TEST

START_TEST(test_dequant_float_types)
{
    float f32[3] = {1.5f, -2.25f, 1e-3f};
    float out[4];
    kvs_dequantize(KVS_DTYPE_F32, f32, out, 3);
    ck_assert(memcmp(out, f32, sizeof f32) == 0);

    const uint8_t f16[] = {0x00, 0x3c, 0x00, 0xc0, 0x00, 0x7c, 0x01, 0x00}; /* 1, -2, inf, 2^-24 */
    kvs_dequantize(KVS_DTYPE_F16, f16, out, 4);
    ck_assert(out[0] == 1.0f && out[1] == -2.0f && isinf(out[2]) && out[3] == ldexpf(1.0f, -24));

    const uint8_t bf16[] = {0x80, 0x3f, 0x40, 0xc0, 0x49, 0x40}; /* 1, -3, 3.140625 */
    kvs_dequantize(KVS_DTYPE_BF16, bf16, out, 3);
    ck_assert(out[0] == 1.0f && out[1] == -3.0f && out[2] == 3.140625f);
}
END_TEST

START_TEST(test_dequant_q8_0)
{
    uint8_t blk[2 * 34];
    float out[64];
    /* block 0: d = 0.5 (0x3800), q[j] = j - 16; block 1: d = -2 (0xc000), q = 127, -128 ... */
    blk[0] = 0x00;
    blk[1] = 0x38;
    for (int j = 0; j < 32; j++) {
        blk[2 + j] = (uint8_t)(int8_t)(j - 16);
    }
    blk[34] = 0x00;
    blk[35] = 0xc0;
    for (int j = 0; j < 32; j++) {
        blk[36 + j] = (uint8_t)(int8_t)(j % 2 ? -128 : 127);
    }
    kvs_dequantize(KVS_DTYPE_Q8_0, blk, out, 64);
    for (int j = 0; j < 32; j++) {
        ck_assert(out[j] == 0.5f * (float)(j - 16));
        ck_assert(out[32 + j] == (j % 2 ? 256.0f : -254.0f));
    }
}
END_TEST

START_TEST(test_dequant_q4_0)
{
    uint8_t blk[18];
    float out[32];
    blk[0] = 0x00; /* d = 2.0 */
    blk[1] = 0x40;
    for (int j = 0; j < 16; j++) {
        blk[2 + j] = (uint8_t)(j | ((15 - j) << 4));
    }
    kvs_dequantize(KVS_DTYPE_Q4_0, blk, out, 32);
    for (int j = 0; j < 16; j++) {
        ck_assert(out[j] == 2.0f * (float)(j - 8));      /* low nibbles: elements 0..15 */
        ck_assert(out[16 + j] == 2.0f * (float)(7 - j)); /* high nibbles: 16..31 */
    }
    ck_assert(out[0] == -16.0f && out[15] == 14.0f && out[16] == 14.0f && out[31] == -16.0f);
}
END_TEST

START_TEST(test_dequant_q4_1)
{
    uint8_t blk[40];
    float out[64];
    blk[0] = 0x00; /* d = 0.25 (0x3400) */
    blk[1] = 0x34;
    blk[2] = 0x00; /* m = -1.0 (0xbc00) */
    blk[3] = 0xbc;
    for (int j = 0; j < 16; j++) {
        blk[4 + j] = (uint8_t)(j | ((15 - j) << 4));
    }
    /* second block: d = 0 and m = 3.5 (0x4300): every element is 3.5 */
    memset(blk + 20, 0xff, 20);
    blk[20] = 0x00;
    blk[21] = 0x00;
    blk[22] = 0x00;
    blk[23] = 0x43;
    kvs_dequantize(KVS_DTYPE_Q4_1, blk, out, 64);
    for (int j = 0; j < 16; j++) {
        ck_assert(out[j] == 0.25f * (float)j - 1.0f);
        ck_assert(out[16 + j] == 0.25f * (float)(15 - j) - 1.0f);
    }
    for (int j = 32; j < 64; j++) {
        ck_assert(out[j] == 3.5f);
    }
}
END_TEST

int main(void)
{
    Suite *s = suite_create("dtype");
    TCase *tc = tcase_create("dtype");
    tcase_add_test(tc, test_geometry);
    tcase_add_test(tc, test_fp16_known_values);
    tcase_add_test(tc, test_fp16_round_trip_exhaustive);
    tcase_add_test(tc, test_fp16_nearest);
    tcase_add_test(tc, test_bf16);
    tcase_add_test(tc, test_dequant_float_types);
    tcase_add_test(tc, test_dequant_q8_0);
    tcase_add_test(tc, test_dequant_q4_0);
    tcase_add_test(tc, test_dequant_q4_1);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

/* worker/gguf.c: the real default model loads; a small valid file reads back exactly; every
 * malformed variant (each truncation, bad header, hostile counts and lengths, bad tensors)
 * is refused with a message naming the problem; fuzz regressions stay clean. */
#include "common/status.h"
#include "gguf_build.h"
#include "kernels/dtype.h"
#include "testutil.h"
#include "worker/gguf.h"
#include "worker/hparams.h"

#include <check.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- a small valid file ----
 * kv: general.architecture = "llama", general.alignment = 32, test.neg = -5 (i32),
 *     test.big = 2^40 (u64), test.f = 0.5 (f32), test.flag = true, test.names = ["ab", "", "c"],
 *     test.nums = [1, -2, 3] (i16)
 * tensors: "a" F32 [4, 2] at 0 (values 0..7), "b" Q8_0 [32] at 32 (d = 1, q = j) */
static void build_valid(struct gb *b)
{
    gb_header(b, 3, 2, 8);
    gb_kv_str(b, "general.architecture", "llama");
    gb_kv_u32(b, "general.alignment", 32);
    gb_kv_i32(b, "test.neg", -5);
    gb_str(b, "test.big");
    gb_u32(b, KVS_GGUF_UINT64);
    gb_u64(b, 1ull << 40);
    gb_kv_f32(b, "test.f", 0.5f);
    gb_str(b, "test.flag");
    gb_u32(b, KVS_GGUF_BOOL);
    gb_u8(b, 1);
    gb_kv_arr(b, "test.names", KVS_GGUF_STRING, 3);
    gb_str(b, "ab");
    gb_str(b, "");
    gb_str(b, "c");
    gb_kv_arr(b, "test.nums", KVS_GGUF_INT16, 3);
    uint16_t nums[3] = {1, (uint16_t)-2, 3};
    gb_raw(b, nums, sizeof nums);
    gb_tensor(b, "a", 2, (uint64_t[]){4, 2}, KVS_DTYPE_F32, 0);
    gb_tensor(b, "b", 1, (uint64_t[]){32}, KVS_DTYPE_Q8_0, 32);
    gb_pad(b, 32);
    for (int i = 0; i < 8; i++) {
        gb_f32(b, (float)i);
    }
    gb_u8(b, 0x00); /* d = 1.0 */
    gb_u8(b, 0x3c);
    for (int j = 0; j < 32; j++) {
        gb_u8(b, (uint8_t)j);
    }
}

START_TEST(test_valid_reads_back)
{
    struct gb b = {0};
    build_valid(&b);
    kvs_gguf *g = NULL;
    char err[256] = "";
    ck_assert_msg(kvs_gguf_open_memory(b.p, b.n, &g, err, sizeof err) == 0, "%s", err);
    ck_assert_uint_eq(kvs_gguf_version(g), 3);
    ck_assert_uint_eq(kvs_gguf_file_size(g), b.n);
    ck_assert_uint_eq(kvs_gguf_alignment(g), 32);
    ck_assert_uint_eq(kvs_gguf_data_offset(g) % 32, 0);
    ck_assert_uint_eq(kvs_gguf_n_kv(g), 8);
    ck_assert_str_eq(kvs_gguf_key(g, 0), "general.architecture");
    ck_assert_int_eq(kvs_gguf_kv_type(g, 6), KVS_GGUF_ARRAY);
    ck_assert_int_eq(kvs_gguf_find_key(g, "test.f"), 4);
    ck_assert_int_eq(kvs_gguf_find_key(g, "test"), -1);
    ck_assert_int_eq(kvs_gguf_find_key(g, "test.ff"), -1);

    kvs_gguf_str s;
    ck_assert_int_eq(kvs_gguf_get_str(g, "general.architecture", &s), 0);
    ck_assert(s.len == 5 && memcmp(s.ptr, "llama", 5) == 0);
    ck_assert_int_eq(kvs_gguf_get_str(g, "test.f", &s), KVS_TYPE_MISMATCH);
    ck_assert_int_eq(kvs_gguf_get_str(g, "nope", &s), KVS_NOT_FOUND);

    uint32_t u32 = 0;
    uint64_t u64 = 0;
    int64_t i64 = 0;
    float f = 0;
    bool flag = false;
    ck_assert_int_eq(kvs_gguf_get_u32(g, "general.alignment", &u32), 0);
    ck_assert_uint_eq(u32, 32);
    ck_assert_int_eq(kvs_gguf_get_u32(g, "test.neg", &u32), KVS_TYPE_MISMATCH);
    ck_assert_int_eq(kvs_gguf_get_u64(g, "test.neg", &u64), KVS_TYPE_MISMATCH);
    ck_assert_int_eq(kvs_gguf_get_i64(g, "test.neg", &i64), 0);
    ck_assert_int_eq(i64, -5);
    ck_assert_int_eq(kvs_gguf_get_u32(g, "test.big", &u32), KVS_TYPE_MISMATCH);
    ck_assert_int_eq(kvs_gguf_get_u64(g, "test.big", &u64), 0);
    ck_assert_uint_eq(u64, 1ull << 40);
    ck_assert_int_eq(kvs_gguf_get_f32(g, "test.f", &f), 0);
    ck_assert(f == 0.5f);
    ck_assert_int_eq(kvs_gguf_get_f32(g, "test.neg", &f), 0); /* any numeric type */
    ck_assert(f == -5.0f);
    ck_assert_int_eq(kvs_gguf_get_u32(g, "test.f", &u32), KVS_TYPE_MISMATCH);
    ck_assert_int_eq(kvs_gguf_get_bool(g, "test.flag", &flag), 0);
    ck_assert(flag);
    ck_assert_int_eq(kvs_gguf_get_bool(g, "test.neg", &flag), KVS_TYPE_MISMATCH);

    kvs_gguf_arr a;
    ck_assert_int_eq(kvs_gguf_get_arr(g, "test.names", &a), 0);
    ck_assert_int_eq(a.type, KVS_GGUF_STRING);
    ck_assert_uint_eq(a.n, 3);
    s = kvs_gguf_arr_str(&a, 0);
    ck_assert(s.len == 2 && memcmp(s.ptr, "ab", 2) == 0);
    ck_assert_uint_eq(kvs_gguf_arr_str(&a, 1).len, 0);
    s = kvs_gguf_arr_str(&a, 2);
    ck_assert(s.len == 1 && s.ptr[0] == 'c');
    ck_assert_int_eq(kvs_gguf_get_arr(g, "test.nums", &a), 0);
    ck_assert_int_eq(a.type, KVS_GGUF_INT16);
    ck_assert_int_eq(kvs_gguf_arr_i64(&a, 1), -2);
    ck_assert(kvs_gguf_arr_f64(&a, 2) == 3.0);
    ck_assert_int_eq(kvs_gguf_get_arr(g, "test.f", &a), KVS_TYPE_MISMATCH);

    ck_assert_uint_eq(kvs_gguf_n_tensors(g), 2);
    const kvs_gguf_tensor *t = kvs_gguf_find_tensor(g, "a");
    ck_assert_ptr_eq(t, kvs_gguf_tensor_at(g, 0));
    ck_assert_str_eq(t->name, "a");
    ck_assert_uint_eq(t->n_dims, 2);
    ck_assert(t->ne[0] == 4 && t->ne[1] == 2 && t->ne[2] == 1 && t->ne[3] == 1);
    ck_assert_uint_eq(t->n_elem, 8);
    ck_assert_uint_eq(t->nbytes, 32);
    float out[32];
    kvs_dequantize(t->type, t->data, out, t->n_elem);
    for (int i = 0; i < 8; i++) {
        ck_assert(out[i] == (float)i);
    }
    t = kvs_gguf_find_tensor(g, "b");
    ck_assert_uint_eq(t->nbytes, 34);
    ck_assert_ptr_eq((const uint8_t *)t->data, (const uint8_t *)b.p + kvs_gguf_data_offset(g) + 32);
    kvs_dequantize(t->type, t->data, out, 32);
    for (int j = 0; j < 32; j++) {
        ck_assert(out[j] == (float)j);
    }
    ck_assert_ptr_null(kvs_gguf_find_tensor(g, "c"));
    kvs_gguf_destroy(&g);
    ck_assert_ptr_null(g);
    kvs_gguf_destroy(&g); /* NULL is fine */
    kvs_gguf_destroy(NULL);
    gb_free(&b);
}
END_TEST

/* Every proper prefix of a valid file is refused with a reason; none crashes. */
START_TEST(test_every_truncation_refused)
{
    struct gb b = {0};
    build_valid(&b);
    for (size_t n = 0; n < b.n; n++) {
        uint8_t *copy = malloc(n > 0 ? n : 1); /* exact-size copy so ASan sees overreads */
        memcpy(copy, b.p, n);
        kvs_gguf *g = (kvs_gguf *)1;
        char err[256] = "";
        int rc = kvs_gguf_open_memory(copy, n, &g, err, sizeof err);
        ck_assert_msg(rc < 0, "prefix of %zu bytes accepted", n);
        ck_assert_ptr_null(g);
        ck_assert_msg(err[0] != '\0', "prefix of %zu bytes: empty reason", n);
        ck_assert_msg(strchr(err, '\n') == NULL, "multi-line reason: %s", err);
        free(copy);
    }
    gb_free(&b);
}
END_TEST

/* Open b and expect failure status rc with a message containing want. */
static void expect_refused(struct gb *b, int rc_want, const char *want)
{
    uint8_t *copy = malloc(b->n);
    memcpy(copy, b->p, b->n);
    kvs_gguf *g = NULL;
    char err[256] = "";
    int rc = kvs_gguf_open_memory(copy, b->n, &g, err, sizeof err);
    ck_assert_msg(rc == rc_want, "expected %s, got %s (%s)", kvs_status_name(rc_want),
                  kvs_status_name(rc), err);
    ck_assert_ptr_null(g);
    ck_assert_msg(strstr(err, want) != NULL, "message '%s' lacks '%s'", err, want);
    free(copy);
    gb_free(b);
}

/* A file with one tensor `name` [ne] of type at offset, and `data_bytes` of data. */
static void one_tensor(struct gb *b, uint32_t n_dims, const uint64_t *ne, uint32_t type,
                       uint64_t offset, size_t data_bytes)
{
    gb_header(b, 3, 1, 0);
    gb_tensor(b, "blk.0.attn_q.weight", n_dims, ne, type, offset);
    gb_pad(b, 32);
    gb_fill(b, data_bytes, 0);
}

START_TEST(test_bad_header)
{
    struct gb b = {0};
    gb_raw(&b, "GGML", 4);
    gb_u32(&b, 3);
    gb_u64(&b, 0);
    gb_u64(&b, 0);
    expect_refused(&b, KVS_BAD_FORMAT, "not a GGUF file");

    gb_header(&b, 1, 0, 0);
    expect_refused(&b, KVS_UNSUPPORTED, "version 1 is not supported");
    gb_header(&b, 4, 0, 0);
    expect_refused(&b, KVS_UNSUPPORTED, "version 4");
    gb_header(&b, 0x03000000u, 0, 0);
    expect_refused(&b, KVS_UNSUPPORTED, "big-endian");

    gb_header(&b, 3, 0, 1ull << 62);
    expect_refused(&b, KVS_BAD_FORMAT, "metadata count 4611686018427387904 cannot fit");
    gb_header(&b, 3, UINT64_MAX, 0);
    gb_fill(&b, 100, 0);
    expect_refused(&b, KVS_BAD_FORMAT, "tensor count 18446744073709551615 cannot fit");
    gb_header(&b, 3, 3, 0); /* 3 tensors need at least 96 bytes */
    gb_fill(&b, 95, 0);
    expect_refused(&b, KVS_BAD_FORMAT, "tensor count 3 cannot fit");
}
END_TEST

START_TEST(test_bad_metadata)
{
    struct gb b = {0};
    /* key length that would wrap the offset */
    gb_header(&b, 3, 0, 1);
    gb_u64(&b, UINT64_MAX - 3);
    gb_fill(&b, 16, 'k');
    expect_refused(&b, KVS_BAD_FORMAT, "string length 18446744073709551612 exceeds");

    /* string value longer than the file */
    gb_header(&b, 3, 0, 1);
    gb_str(&b, "general.name");
    gb_u32(&b, KVS_GGUF_STRING);
    gb_u64(&b, 1000);
    gb_fill(&b, 10, 'x');
    expect_refused(&b, KVS_BAD_FORMAT, "value of key 'general.name'");

    gb_header(&b, 3, 0, 2);
    gb_kv_u32(&b, "k", 1);
    gb_kv_u32(&b, "k", 2);
    expect_refused(&b, KVS_BAD_FORMAT, "duplicate key 'k'");

    gb_header(&b, 3, 0, 1);
    gb_strn(&b, "a\0b", 3);
    gb_u32(&b, KVS_GGUF_UINT8);
    gb_u8(&b, 0);
    expect_refused(&b, KVS_BAD_FORMAT, "contains a NUL byte");

    gb_header(&b, 3, 0, 1);
    gb_str(&b, "k");
    gb_u32(&b, 13);
    gb_fill(&b, 8, 0);
    expect_refused(&b, KVS_BAD_FORMAT, "key 'k' has unknown value type 13");

    gb_header(&b, 3, 0, 1);
    gb_str(&b, "k");
    gb_u32(&b, KVS_GGUF_BOOL);
    gb_u8(&b, 2);
    expect_refused(&b, KVS_BAD_FORMAT, "bool value 2");

    gb_header(&b, 3, 0, 1);
    gb_kv_arr(&b, "nested", KVS_GGUF_ARRAY, 1);
    gb_u32(&b, KVS_GGUF_UINT8);
    gb_u64(&b, 0);
    expect_refused(&b, KVS_UNSUPPORTED, "key 'nested': arrays of arrays");

    gb_header(&b, 3, 0, 1);
    gb_kv_arr(&b, "tokens", KVS_GGUF_STRING, 1ull << 60);
    gb_fill(&b, 64, 0);
    expect_refused(&b, KVS_BAD_FORMAT, "array of 1152921504606846976 strings cannot fit");

    gb_header(&b, 3, 0, 1);
    gb_kv_arr(&b, "ids", KVS_GGUF_UINT64, (1ull << 61) + 1); /* count * 8 wraps to 8 */
    gb_fill(&b, 64, 0);
    expect_refused(&b, KVS_BAD_FORMAT, "key 'ids': array of 2305843009213693953 uint64");

    gb_header(&b, 3, 0, 1);
    gb_kv_arr(&b, "tokens", KVS_GGUF_STRING, 2);
    gb_str(&b, "ok");
    gb_u64(&b, UINT64_MAX); /* second string's length wraps */
    gb_fill(&b, 8, 'x');
    expect_refused(&b, KVS_BAD_FORMAT, "string 1 of key 'tokens'");

    gb_header(&b, 3, 0, 1);
    gb_kv_arr(&b, "weird", 42, 1);
    gb_fill(&b, 8, 0);
    expect_refused(&b, KVS_BAD_FORMAT, "unknown element type 42");

    gb_header(&b, 3, 0, 1);
    gb_kv_u32(&b, "general.alignment", 24);
    expect_refused(&b, KVS_BAD_FORMAT, "general.alignment 24 is not a power of two");
    gb_header(&b, 3, 0, 1);
    gb_kv_u32(&b, "general.alignment", 0);
    expect_refused(&b, KVS_BAD_FORMAT, "general.alignment 0 is not a power of two");
    gb_header(&b, 3, 0, 1);
    gb_kv_i32(&b, "general.alignment", 32);
    expect_refused(&b, KVS_BAD_FORMAT, "general.alignment has type int32");
}
END_TEST

START_TEST(test_bad_tensors)
{
    struct gb b = {0};
    one_tensor(&b, 2, (uint64_t[]){4, 0}, KVS_DTYPE_F32, 0, 32);
    expect_refused(&b, KVS_BAD_FORMAT, "tensor 'blk.0.attn_q.weight' has a zero-sized dimension");

    one_tensor(&b, 0, NULL, KVS_DTYPE_F32, 0, 32);
    expect_refused(&b, KVS_BAD_FORMAT, "has 0 dimensions");
    one_tensor(&b, 5, (uint64_t[]){1, 1, 1, 1, 1}, KVS_DTYPE_F32, 0, 32);
    expect_refused(&b, KVS_BAD_FORMAT, "has 5 dimensions (allowed 1..4)");

    one_tensor(&b, 2, (uint64_t[]){1ull << 32, 1ull << 32}, KVS_DTYPE_F32, 0, 32);
    expect_refused(&b, KVS_BAD_FORMAT, "element count overflows");
    one_tensor(&b, 4, (uint64_t[]){1ull << 16, 1ull << 16, 1ull << 16, 1ull << 16}, KVS_DTYPE_F32,
               0, 32);
    expect_refused(&b, KVS_BAD_FORMAT, "element count overflows");
    one_tensor(&b, 1, (uint64_t[]){UINT64_MAX}, KVS_DTYPE_F32, 0, 32);
    expect_refused(&b, KVS_BAD_FORMAT, "overflows");
    one_tensor(&b, 2, (uint64_t[]){1ull << 31, 1ull << 31}, KVS_DTYPE_F32, 0, 32);
    expect_refused(&b, KVS_BAD_FORMAT, "byte size overflows");

    one_tensor(&b, 2, (uint64_t[]){32, 2}, 12, 0, 400);
    expect_refused(&b, KVS_UNSUPPORTED, "unsupported type 12 (Q4_K)");
    one_tensor(&b, 1, (uint64_t[]){16}, KVS_DTYPE_Q8_0, 0, 64);
    expect_refused(&b, KVS_BAD_FORMAT, "row length 16 is not a multiple of the Q8_0 block size 32");

    one_tensor(&b, 1, (uint64_t[]){8}, KVS_DTYPE_F32, 4, 64);
    expect_refused(&b, KVS_BAD_FORMAT, "data offset 4 is not a multiple of the alignment 32");
    one_tensor(&b, 2, (uint64_t[]){32, 16}, KVS_DTYPE_F32, 0, 2000);
    expect_refused(&b, KVS_BAD_FORMAT,
                   "tensor 'blk.0.attn_q.weight': data [offset 96, 2048 bytes] lies outside the "
                   "file (size 2096)");
    one_tensor(&b, 1, (uint64_t[]){8}, KVS_DTYPE_F32, UINT64_MAX - 31, 64);
    expect_refused(&b, KVS_BAD_FORMAT, "lies outside the file");

    gb_header(&b, 3, 2, 0);
    gb_tensor(&b, "x", 1, (uint64_t[]){8}, KVS_DTYPE_F32, 0);
    gb_tensor(&b, "x", 1, (uint64_t[]){8}, KVS_DTYPE_F32, 32);
    gb_pad(&b, 32);
    gb_fill(&b, 64, 0);
    expect_refused(&b, KVS_BAD_FORMAT, "duplicate tensor name 'x'");

    gb_header(&b, 3, 1, 0);
    gb_strn(&b, "x\0y", 3);
    gb_u32(&b, 1);
    gb_u64(&b, 8);
    gb_u32(&b, KVS_DTYPE_F32);
    gb_u64(&b, 0);
    gb_pad(&b, 32);
    gb_fill(&b, 32, 0);
    expect_refused(&b, KVS_BAD_FORMAT, "contains a NUL byte");

    /* data section start pushed past the end by a large alignment */
    gb_header(&b, 3, 1, 1);
    gb_kv_u32(&b, "general.alignment", 1u << 31);
    gb_tensor(&b, "x", 1, (uint64_t[]){8}, KVS_DTYPE_F32, 0);
    gb_fill(&b, 64, 0);
    expect_refused(&b, KVS_BAD_FORMAT, "starts past the end of the file");
}
END_TEST

START_TEST(test_metadata_only_and_custom_alignment)
{
    struct gb b = {0};
    gb_header(&b, 2, 0, 1); /* v2, no tensors, no padding after the header */
    gb_kv_str(&b, "general.architecture", "llama");
    kvs_gguf *g = NULL;
    char err[256];
    ck_assert_msg(kvs_gguf_open_memory(b.p, b.n, &g, err, sizeof err) == 0, "%s", err);
    ck_assert_uint_eq(kvs_gguf_version(g), 2);
    ck_assert_uint_eq(kvs_gguf_n_tensors(g), 0);
    kvs_gguf_destroy(&g);
    gb_free(&b);

    gb_header(&b, 3, 1, 1);
    gb_kv_u32(&b, "general.alignment", 64);
    gb_tensor(&b, "t", 1, (uint64_t[]){2}, KVS_DTYPE_BF16, 64);
    gb_pad(&b, 64);
    gb_fill(&b, 64, 0);
    gb_u8(&b, 0x80); /* 1.0 */
    gb_u8(&b, 0x3f);
    gb_u8(&b, 0x00); /* -2.0 */
    gb_u8(&b, 0xc0);
    ck_assert_msg(kvs_gguf_open_memory(b.p, b.n, &g, err, sizeof err) == 0, "%s", err);
    ck_assert_uint_eq(kvs_gguf_alignment(g), 64);
    ck_assert_uint_eq(kvs_gguf_data_offset(g) % 64, 0);
    const kvs_gguf_tensor *t = kvs_gguf_find_tensor(g, "t");
    float out[2];
    kvs_dequantize(t->type, t->data, out, 2);
    ck_assert(out[0] == 1.0f && out[1] == -2.0f);
    kvs_gguf_destroy(&g);
    gb_free(&b);
}
END_TEST

START_TEST(test_open_file_errors)
{
    kvs_gguf *g = (kvs_gguf *)1;
    char err[256] = "";
    ck_assert_int_eq(kvs_gguf_open("/nonexistent/x.gguf", &g, err, sizeof err), KVS_NOT_FOUND);
    ck_assert_ptr_null(g);
    ck_assert(strstr(err, "No such file") != NULL);
    ck_assert_int_eq(kvs_gguf_open("/tmp", &g, err, sizeof err), KVS_IO);
    ck_assert(strstr(err, "not a regular file") != NULL);

    char path[] = "/tmp/kvs_test_gguf_XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    close(fd);
    ck_assert_int_eq(kvs_gguf_open(path, &g, err, sizeof err), KVS_BAD_FORMAT);
    ck_assert(strstr(err, "too small") != NULL);

    /* the valid file through the mmap path */
    struct gb b = {0};
    build_valid(&b);
    FILE *f = fopen(path, "wb");
    ck_assert(fwrite(b.p, 1, b.n, f) == b.n);
    fclose(f);
    ck_assert_msg(kvs_gguf_open(path, &g, err, sizeof err) == 0, "%s", err);
    ck_assert_uint_eq(kvs_gguf_n_tensors(g), 2);
    kvs_gguf_destroy(&g);
    unlink(path);
    gb_free(&b);
}
END_TEST

START_TEST(test_default_model)
{
    const char *path = kvs_test_default_model();
    kvs_gguf *g = NULL;
    char err[256] = "";
    ck_assert_msg(kvs_gguf_open(path, &g, err, sizeof err) == 0, "%s: %s", path, err);
    ck_assert_uint_eq(kvs_gguf_version(g), 3);
    ck_assert_uint_eq(kvs_gguf_n_tensors(g), 272);
    kvs_gguf_arr tokens;
    ck_assert_int_eq(kvs_gguf_get_arr(g, "tokenizer.ggml.tokens", &tokens), 0);
    ck_assert_uint_eq(tokens.n, 49152);
    kvs_gguf_str s = kvs_gguf_arr_str(&tokens, tokens.n - 1);
    ck_assert(s.len > 0);
    const kvs_gguf_tensor *t = kvs_gguf_find_tensor(g, "token_embd.weight");
    ck_assert_ptr_nonnull(t);
    ck_assert_uint_eq(t->type, KVS_DTYPE_Q8_0);
    ck_assert(t->ne[0] == 576 && t->ne[1] == 49152);
    t = kvs_gguf_find_tensor(g, "blk.29.ffn_down.weight");
    ck_assert_ptr_nonnull(t);
    ck_assert_uint_eq(t->type, KVS_DTYPE_Q4_1);
    /* a dequantized row of a real Q4_1 weight is finite and small */
    float row[1536];
    kvs_dequantize(t->type, t->data, row, t->ne[0]);
    for (int i = 0; i < 1536; i++) {
        ck_assert(row[i] == row[i] && row[i] > -10.0f && row[i] < 10.0f);
    }
    kvs_gguf_destroy(&g);
}
END_TEST

/* Open one file and, if it opens, do what the fuzzer does; return the status. */
static int exercise_file(const char *path, char *err, size_t errlen)
{
    size_t len = 0;
    char *data = kvs_test_read_file(path, &len);
    ck_assert_msg(data != NULL, "cannot read %s", path);
    kvs_gguf *g = NULL;
    int rc = kvs_gguf_open_memory(data, len, &g, err, errlen);
    if (rc == 0) {
        struct kvs_hparams hp;
        if (kvs_hparams_from_gguf(g, &hp, err, errlen) == 0) {
            (void)kvs_hparams_check_tensors(g, &hp, err, errlen);
        }
        for (uint64_t i = 0; i < kvs_gguf_n_tensors(g); i++) {
            const kvs_gguf_tensor *t = kvs_gguf_tensor_at(g, i);
            uint64_t n = t->n_elem <= (1u << 20) ? t->n_elem : t->ne[0];
            if (n > (1u << 20)) {
                continue;
            }
            float *buf = malloc((size_t)n * sizeof *buf);
            kvs_dequantize(t->type, t->data, buf, n);
            free(buf);
        }
        kvs_gguf_destroy(&g);
    } else {
        ck_assert_ptr_null(g);
        ck_assert_msg(err[0] != '\0', "%s: refused without a reason", path);
    }
    free(data);
    return rc;
}

/* Every committed fuzz regression input (and seed) gets a clean error or success. */
START_TEST(test_fuzz_regressions)
{
    const char *subdirs[] = {"tests/fuzz/regressions/gguf", "tests/fuzz/seeds/gguf"};
    int n_files = 0;
    for (size_t k = 0; k < 2; k++) {
        char dir[1024];
        snprintf(dir, sizeof dir, "%s/%s", kvs_test_source_dir(), subdirs[k]);
        DIR *d = opendir(dir);
        if (d == NULL) {
            continue; /* git keeps no empty directories */
        }
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (e->d_name[0] == '.') {
                continue;
            }
            char path[2048], err[256] = "";
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            int rc = exercise_file(path, err, sizeof err);
            ck_assert_msg(rc == 0 || rc == KVS_BAD_FORMAT || rc == KVS_UNSUPPORTED,
                          "%s: status %s (%s)", path, kvs_status_name(rc), err);
            n_files++;
        }
        closedir(d);
    }
    ck_assert_int_gt(n_files, 0);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("gguf");
    TCase *tc = tcase_create("gguf");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_valid_reads_back);
    tcase_add_test(tc, test_every_truncation_refused);
    tcase_add_test(tc, test_bad_header);
    tcase_add_test(tc, test_bad_metadata);
    tcase_add_test(tc, test_bad_tensors);
    tcase_add_test(tc, test_metadata_only_and_custom_alignment);
    tcase_add_test(tc, test_open_file_errors);
    tcase_add_test(tc, test_default_model);
    tcase_add_test(tc, test_fuzz_regressions);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

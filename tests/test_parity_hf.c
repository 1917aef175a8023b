/* Parity with HF transformers: random-weight F32 llama (Llama-3 rope scaling) and qwen2
 * (q/k/v biases) models, logits of every position of several prompts, max |diff| <= 1e-4.
 * Goldens: tests/data/parity, made by tests/tools/gen_hf_parity.py. */
#include <check.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "common/status.h"
#include "rig.h"
#include "testutil.h"

#define TOL 1e-4f

static void check_arch(const char *arch, int32_t chunk)
{
    char path[1024], meta[1024], bin[1024];
    snprintf(path, sizeof path, "%s/tests/data/parity/%s.gguf", kvs_test_source_dir(), arch);
    snprintf(meta, sizeof meta, "%s/tests/data/parity/%s.json", kvs_test_source_dir(), arch);
    snprintf(bin, sizeof bin, "%s/tests/data/parity/%s.logits.bin", kvs_test_source_dir(), arch);
    json_error_t jerr;
    json_t *j = json_load_file(meta, 0, &jerr);
    ck_assert_msg(j != NULL, "%s: %s", meta, jerr.text);
    size_t ref_len = 0;
    float *ref = (float *)kvs_test_read_file(bin, &ref_len);
    ck_assert_ptr_nonnull(ref);

    struct rig r;
    ck_assert_int_eq(rig_open(&r, path, 2, KVS_DTYPE_F32, 64, 64), 0);
    ck_assert_int_eq(r.n_vocab, (int)json_integer_value(json_object_get(j, "n_vocab")));
    json_t *prompts = json_object_get(j, "prompts");
    size_t off = 0, pi;
    json_t *pr;
    float worst = 0;
    json_array_foreach(prompts, pi, pr)
    {
        int32_t n = (int32_t)json_array_size(pr);
        int32_t *toks = malloc((size_t)n * sizeof *toks);
        float *out = malloc((size_t)n * r.n_vocab * sizeof *out);
        for (int32_t i = 0; i < n; i++) {
            toks[i] = (int32_t)json_integer_value(json_array_get(pr, (size_t)i));
        }
        kvs_seq *seq = kvs_pool_seq_new(r.pool);
        ck_assert_int_eq(rig_feed(&r, seq, toks, n, chunk, out), 0);
        ck_assert_uint_le((off + (size_t)n * r.n_vocab) * sizeof(float), ref_len);
        for (int32_t i = 0; i < n; i++) {
            for (int32_t v = 0; v < r.n_vocab; v++) {
                float d = fabsf(out[(size_t)i * r.n_vocab + v] - ref[off + (size_t)i * r.n_vocab + v]);
                if (!(d <= worst)) {
                    worst = d;
                }
                ck_assert_msg(d <= TOL, "%s prompt %zu pos %d token %d: ours %g, HF %g", arch, pi,
                              i, v, out[(size_t)i * r.n_vocab + v],
                              ref[off + (size_t)i * r.n_vocab + v]);
            }
        }
        off += (size_t)n * r.n_vocab;
        kvs_pool_seq_release(r.pool, &seq);
        free(toks);
        free(out);
    }
    ck_assert_uint_eq(off * sizeof(float), ref_len);
    printf("parity %s (chunk %d): max |logit diff| = %.3g over %zu logits (tolerance %g)\n", arch,
           chunk, worst, off, TOL);
    rig_close(&r);
    free(ref);
    json_decref(j);
}

START_TEST(test_llama_whole)
{
    check_arch("llama", 64);
}
END_TEST

START_TEST(test_llama_chunked)
{
    check_arch("llama", 5);
}
END_TEST

START_TEST(test_qwen2_whole)
{
    check_arch("qwen2", 64);
}
END_TEST

START_TEST(test_qwen2_tokenwise)
{
    check_arch("qwen2", 1);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("parity_hf");
    TCase *tc = tcase_create("logits");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_llama_whole);
    tcase_add_test(tc, test_llama_chunked);
    tcase_add_test(tc, test_qwen2_whole);
    tcase_add_test(tc, test_qwen2_tokenwise);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}

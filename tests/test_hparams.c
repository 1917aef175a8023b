/* worker/hparams.c: the default model's hyperparameters, tiny models written by
 * tests/tools/make_tiny_gguf.py, and refusals of bad metadata and missing/misshapen tensors. */
#include "common/status.h"
#include "gguf_build.h"
#include "kernels/dtype.h"
#include "testutil.h"
#include "worker/gguf.h"
#include "worker/hparams.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

START_TEST(test_default_model)
{
    kvs_gguf *g = NULL;
    char err[256] = "";
    ck_assert_msg(kvs_gguf_open(kvs_test_default_model(), &g, err, sizeof err) == 0, "%s", err);
    struct kvs_hparams hp;
    ck_assert_msg(kvs_hparams_from_gguf(g, &hp, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(hp.arch, KVS_ARCH_LLAMA);
    ck_assert_str_eq(hp.arch_name, "llama");
    ck_assert_uint_eq(hp.n_layer, 30);
    ck_assert_uint_eq(hp.n_embd, 576);
    ck_assert_uint_eq(hp.n_head, 9);
    ck_assert_uint_eq(hp.n_head_kv, 3);
    ck_assert_uint_eq(hp.head_dim, 64);
    ck_assert_uint_eq(hp.n_ff, 1536);
    ck_assert_uint_eq(hp.n_vocab, 49152);
    ck_assert_uint_eq(hp.n_ctx_train, 8192);
    ck_assert_uint_eq(hp.rope_dim, 64);
    ck_assert(hp.rope_freq_base == 100000.0f);
    ck_assert(fabsf(hp.norm_eps - 1e-5f) < 1e-10f);
    ck_assert_int_eq(hp.rope_style, KVS_HP_ROPE_NORM);
    ck_assert_int_eq(hp.rope_scaling, KVS_ROPE_SCALING_NONE);
    ck_assert(!hp.has_rope_freqs);
    ck_assert(hp.tied_embeddings);
    ck_assert(!hp.has_qkv_bias);
    ck_assert_int_eq(hp.file_type, 3);
    ck_assert(strlen(hp.name) > 0);
    ck_assert_msg(kvs_hparams_check_tensors(g, &hp, err, sizeof err) == 0, "%s", err);
    kvs_gguf_destroy(&g);
}
END_TEST

/* Run make_tiny_gguf.py with args into a temp file, open it and read hparams. */
static kvs_gguf *make_tiny(const char *args, struct kvs_hparams *hp)
{
    char path[] = "/tmp/kvs_tiny_XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    close(fd);
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "python3 '%s/tests/tools/make_tiny_gguf.py' -o '%s' %s",
             kvs_test_source_dir(), path, args);
    ck_assert_msg(system(cmd) == 0, "failed: %s", cmd);
    kvs_gguf *g = NULL;
    char err[256] = "";
    int rc = kvs_gguf_open(path, &g, err, sizeof err);
    unlink(path); /* the mapping stays valid */
    ck_assert_msg(rc == 0, "%s: %s", cmd, err);
    ck_assert_msg(kvs_hparams_from_gguf(g, hp, err, sizeof err) == 0, "%s: %s", cmd, err);
    ck_assert_msg(kvs_hparams_check_tensors(g, hp, err, sizeof err) == 0, "%s: %s", cmd, err);
    return g;
}

START_TEST(test_tiny_llama_default_vocab)
{
    struct kvs_hparams hp;
    char vocab[1200];
    snprintf(vocab, sizeof vocab, "--vocab '%s'", kvs_test_default_model());
    kvs_gguf *g = make_tiny(vocab, &hp);
    ck_assert_int_eq(hp.arch, KVS_ARCH_LLAMA);
    ck_assert_uint_eq(hp.n_layer, 2);
    ck_assert_uint_eq(hp.n_embd, 64);
    ck_assert_uint_eq(hp.n_head, 4);
    ck_assert_uint_eq(hp.n_head_kv, 2);
    ck_assert_uint_eq(hp.head_dim, 16);
    ck_assert_uint_eq(hp.n_ff, 128);
    ck_assert_uint_eq(hp.n_vocab, 49152); /* the copied tokenizer's size */
    ck_assert(hp.tied_embeddings);
    ck_assert(!hp.has_qkv_bias);
    kvs_gguf_str s;
    ck_assert_int_eq(kvs_gguf_get_str(g, "tokenizer.ggml.pre", &s), 0);
    ck_assert(s.len == 6 && memcmp(s.ptr, "smollm", 6) == 0);
    ck_assert_int_eq(kvs_gguf_get_str(g, "tokenizer.chat_template", &s), 0);
    ck_assert_uint_eq(kvs_gguf_find_tensor(g, "blk.1.attn_q.weight")->type, KVS_DTYPE_F32);
    kvs_gguf_destroy(&g);
}
END_TEST

START_TEST(test_tiny_qwen2_and_types)
{
    struct kvs_hparams hp;
    kvs_gguf *g = make_tiny("--arch qwen2 --type q8_0 --tiny-vocab --layers 3 --seed 5", &hp);
    ck_assert_int_eq(hp.arch, KVS_ARCH_QWEN2);
    ck_assert_int_eq(hp.rope_style, KVS_HP_ROPE_NEOX);
    ck_assert(hp.has_qkv_bias);
    ck_assert_uint_eq(hp.n_layer, 3);
    ck_assert_uint_eq(hp.n_vocab, 16);
    ck_assert(hp.rope_freq_base == 1e6f);
    ck_assert_uint_eq(kvs_gguf_find_tensor(g, "blk.2.ffn_up.weight")->type, KVS_DTYPE_Q8_0);
    kvs_gguf_destroy(&g);

    g = make_tiny("--type q4_1 --tiny-vocab --untied", &hp);
    ck_assert(!hp.tied_embeddings);
    const kvs_gguf_tensor *t = kvs_gguf_find_tensor(g, "blk.0.attn_k.weight");
    ck_assert_uint_eq(t->type, KVS_DTYPE_Q4_1);
    float w[64 * 32];
    kvs_dequantize(t->type, t->data, w, t->n_elem);
    for (uint64_t i = 0; i < t->n_elem; i++) {
        ck_assert(fabsf(w[i]) < 0.05f); /* uniform in [-0.035, 0.035] plus rounding */
    }
    kvs_gguf_destroy(&g);

    g = make_tiny("--type f16 --tiny-vocab --rope-scaling llama3 --rope-freqs --ctx 4096", &hp);
    ck_assert_int_eq(hp.rope_scaling, KVS_ROPE_SCALING_LLAMA3);
    ck_assert(hp.has_rope_freqs);
    ck_assert(hp.rope_scaling_factor == 8.0f);
    ck_assert_uint_eq(hp.rope_scaling_orig_ctx, 1024);
    ck_assert_uint_eq(kvs_gguf_find_tensor(g, "rope_freqs.weight")->ne[0], hp.rope_dim / 2);
    ck_assert_uint_eq(kvs_gguf_find_tensor(g, "token_embd.weight")->type, KVS_DTYPE_F16);
    kvs_gguf_destroy(&g);
}
END_TEST

/* ---- in-memory models ----
 * A 1-layer F32 llama: n_embd 32, 2 heads of 16, 1 kv head, n_ff 64, 4 tokens.
 * `extra` keys are appended (each a (key, u32 value) pair or a string pair); the tensor
 * named `bad` is given a wrong shape, and the one named `skip` is left out. */
struct model_opts {
    const char *arch;       /* default "llama" */
    const char *skip;       /* tensor to omit */
    const char *bad;        /* tensor to misshape */
    const char *u32_key[4]; /* extra / overriding u32 keys (suffix after "<arch>.") */
    uint32_t u32_val[4];
    const char *str_key; /* one extra string key (full name) */
    const char *str_val;
    const char *f32_key; /* one extra f32 key (suffix) */
    float f32_val;
};

struct tdesc {
    const char *name;
    uint64_t ne0, ne1;
};

static void build_model(struct gb *b, const struct model_opts *o)
{
    const char *arch = o->arch ? o->arch : "llama";
    struct tdesc ts[] = {
        {"token_embd.weight", 32, 4},         {"output_norm.weight", 32, 1},
        {"blk.0.attn_norm.weight", 32, 1},    {"blk.0.attn_q.weight", 32, 32},
        {"blk.0.attn_k.weight", 32, 16},      {"blk.0.attn_v.weight", 32, 16},
        {"blk.0.attn_output.weight", 32, 32}, {"blk.0.ffn_norm.weight", 32, 1},
        {"blk.0.ffn_gate.weight", 32, 64},    {"blk.0.ffn_up.weight", 32, 64},
        {"blk.0.ffn_down.weight", 64, 32},
    };
    size_t n_t = 0;
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) {
        n_t += !(o->skip && strcmp(o->skip, ts[i].name) == 0);
    }
    struct {
        const char *suffix;
        uint32_t v;
    } base[] = {
        {"block_count", 1},      {"embedding_length", 32},    {"feed_forward_length", 64},
        {"context_length", 256}, {"attention.head_count", 2}, {"attention.head_count_kv", 1},
        {"vocab_size", 4}};
    size_t n_base = sizeof base / sizeof base[0];
    size_t n_extra_u32 = 0;
    for (size_t i = 0; i < 4 && o->u32_key[i]; i++) {
        bool overrides = false;
        for (size_t j = 0; j < n_base; j++) {
            if (strcmp(base[j].suffix, o->u32_key[i]) == 0) {
                base[j].v = o->u32_val[i];
                overrides = true;
            }
        }
        n_extra_u32 += !overrides;
    }
    bool eps_override = o->f32_key && strcmp(o->f32_key, "attention.layer_norm_rms_epsilon") == 0;
    uint64_t n_kv =
        2 - eps_override + n_base + n_extra_u32 + (o->str_key != NULL) + (o->f32_key != NULL);
    gb_header(b, 3, n_t, n_kv);
    gb_kv_str(b, "general.architecture", arch);
    char key[128];
    snprintf(key, sizeof key, "%s.attention.layer_norm_rms_epsilon", arch);
    if (!eps_override) {
        gb_kv_f32(b, key, 1e-5f);
    }
    for (size_t j = 0; j < n_base; j++) {
        snprintf(key, sizeof key, "%s.%s", arch, base[j].suffix);
        gb_kv_u32(b, key, base[j].v);
    }
    for (size_t i = 0; i < 4 && o->u32_key[i]; i++) {
        bool overrides = false;
        for (size_t j = 0; j < n_base; j++) {
            overrides |= strcmp(base[j].suffix, o->u32_key[i]) == 0;
        }
        if (!overrides) {
            snprintf(key, sizeof key, "%s.%s", arch, o->u32_key[i]);
            gb_kv_u32(b, key, o->u32_val[i]);
        }
    }
    if (o->str_key) {
        gb_kv_str(b, o->str_key, o->str_val);
    }
    if (o->f32_key) {
        snprintf(key, sizeof key, "%s.%s", arch, o->f32_key);
        gb_kv_f32(b, key, o->f32_val);
    }
    uint64_t off = 0;
    uint64_t sizes[16];
    size_t k = 0;
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) {
        if (o->skip && strcmp(o->skip, ts[i].name) == 0) {
            continue;
        }
        uint64_t ne1 = ts[i].ne1 + (o->bad && strcmp(o->bad, ts[i].name) == 0 ? 1 : 0);
        uint64_t ne[2] = {ts[i].ne0, ne1};
        gb_tensor(b, ts[i].name, ne1 == 1 ? 1 : 2, ne, KVS_DTYPE_F32, off);
        sizes[k++] = ts[i].ne0 * ne1 * 4;
        off += (ts[i].ne0 * ne1 * 4 + 31) / 32 * 32;
    }
    gb_pad(b, 32);
    for (size_t i = 0; i < k; i++) {
        gb_fill(b, (size_t)((sizes[i] + 31) / 32 * 32), 0);
    }
}

/* Build, open, read hparams (+ check tensors when hp_ok); return the failing status. */
static int model_status(const struct model_opts *o, char *err, size_t errlen,
                        struct kvs_hparams *hp)
{
    struct gb b = {0};
    build_model(&b, o);
    kvs_gguf *g = NULL;
    int rc = kvs_gguf_open_memory(b.p, b.n, &g, err, errlen);
    ck_assert_msg(rc == 0, "%s", err);
    rc = kvs_hparams_from_gguf(g, hp, err, errlen);
    if (rc == 0) {
        rc = kvs_hparams_check_tensors(g, hp, err, errlen);
    }
    kvs_gguf_destroy(&g);
    gb_free(&b);
    return rc;
}

static void expect_model(const struct model_opts *o, int want, const char *msg)
{
    char err[256] = "";
    struct kvs_hparams hp;
    int rc = model_status(o, err, sizeof err, &hp);
    ck_assert_msg(rc == want, "expected %s, got %s (%s)", kvs_status_name(want),
                  kvs_status_name(rc), err);
    if (msg != NULL) {
        ck_assert_msg(strstr(err, msg) != NULL, "'%s' lacks '%s'", err, msg);
    }
}

START_TEST(test_in_memory_model_ok)
{
    char err[256] = "";
    struct kvs_hparams hp;
    struct model_opts o = {0};
    ck_assert_msg(model_status(&o, err, sizeof err, &hp) == 0, "%s", err);
    ck_assert_uint_eq(hp.head_dim, 16);
    ck_assert_uint_eq(hp.n_vocab, 4); /* from llama.vocab_size: no tokenizer here */
    ck_assert(hp.rope_freq_base == 10000.0f);
    ck_assert_int_eq(hp.file_type, -1);
    ck_assert_str_eq(hp.name, "");

    struct model_opts lin = {.str_key = "llama.rope.scaling.type",
                             .str_val = "linear",
                             .f32_key = "rope.scaling.factor",
                             .f32_val = 4.0f};
    ck_assert_msg(model_status(&lin, err, sizeof err, &hp) == 0, "%s", err);
    ck_assert_int_eq(hp.rope_scaling, KVS_ROPE_SCALING_LINEAR);
    ck_assert(hp.rope_scaling_factor == 4.0f);

    struct model_opts l3 = {.str_key = "llama.rope.scaling.type",
                            .str_val = "llama3",
                            .u32_key = {"rope.scaling.original_context_length"},
                            .u32_val = {8192}};
    ck_assert_msg(model_status(&l3, err, sizeof err, &hp) == 0, "%s", err);
    ck_assert_int_eq(hp.rope_scaling, KVS_ROPE_SCALING_LLAMA3);
    ck_assert_uint_eq(hp.rope_scaling_orig_ctx, 8192);
    ck_assert(hp.rope_scaling_low_freq == 1.0f && hp.rope_scaling_high_freq == 4.0f);

    struct model_opts kl = {.u32_key = {"attention.key_length", "rope.dimension_count"},
                            .u32_val = {16, 8}};
    ck_assert_msg(model_status(&kl, err, sizeof err, &hp) == 0, "%s", err);
    ck_assert_uint_eq(hp.rope_dim, 8);
}
END_TEST

START_TEST(test_in_memory_model_refused)
{
    expect_model(&(struct model_opts){.arch = "gpt2"}, KVS_UNSUPPORTED,
                 "unsupported architecture 'gpt2' (supported: llama, qwen2)");
    expect_model(&(struct model_opts){.u32_key = {"block_count"}, .u32_val = {0}}, KVS_BAD_FORMAT,
                 "llama.block_count 0 out of range (1..1024)");
    expect_model(&(struct model_opts){.u32_key = {"block_count"}, .u32_val = {5000}},
                 KVS_BAD_FORMAT, "llama.block_count 5000 out of range");
    expect_model(
        &(struct model_opts){.u32_key = {"attention.head_count", "attention.head_count_kv"},
                             .u32_val = {4, 3}},
        KVS_BAD_FORMAT, "not a multiple of head_count_kv 3");
    expect_model(&(struct model_opts){.u32_key = {"attention.head_count"}, .u32_val = {3}},
                 KVS_BAD_FORMAT, "embedding_length 32 is not a multiple of head_count 3");
    expect_model(&(struct model_opts){.u32_key = {"attention.key_length"}, .u32_val = {15}},
                 KVS_BAD_FORMAT, "head dimension 15 must be even");
    expect_model(&(struct model_opts){.u32_key = {"vocab_size"}, .u32_val = {1u << 23}},
                 KVS_BAD_FORMAT, "llama.vocab_size 8388608 out of range");
    expect_model(&(struct model_opts){.str_key = "llama.rope.scaling.type", .str_val = "yarn"},
                 KVS_UNSUPPORTED, "rope scaling type 'yarn' is not supported");
    expect_model(&(struct model_opts){.f32_key = "rope.freq_base", .f32_val = -1.0f},
                 KVS_BAD_FORMAT, "llama.rope.freq_base -1 out of range");
    expect_model(
        &(struct model_opts){.f32_key = "attention.layer_norm_rms_epsilon", .f32_val = NAN},
        KVS_BAD_FORMAT, "layer_norm_rms_epsilon");
    /* wrong value type for a u32 key */
    expect_model(&(struct model_opts){.str_key = "llama.attention.key_length", .str_val = "16"},
                 KVS_BAD_FORMAT, "key 'llama.attention.key_length' is not an unsigned 32-bit");

    expect_model(&(struct model_opts){.skip = "blk.0.ffn_down.weight"}, KVS_BAD_FORMAT,
                 "missing tensor 'blk.0.ffn_down.weight'");
    expect_model(&(struct model_opts){.skip = "output_norm.weight"}, KVS_BAD_FORMAT,
                 "missing tensor 'output_norm.weight'");
    expect_model(&(struct model_opts){.bad = "blk.0.attn_k.weight"}, KVS_BAD_FORMAT,
                 "tensor 'blk.0.attn_k.weight' has shape [32, 17, 1, 1], expected [32, 16]");
    expect_model(&(struct model_opts){.bad = "token_embd.weight"}, KVS_BAD_FORMAT,
                 "tensor 'token_embd.weight' has shape [32, 5, 1, 1], expected [32, 4]");
    expect_model(&(struct model_opts){.bad = "blk.0.ffn_norm.weight"}, KVS_BAD_FORMAT,
                 "expected [32]");
    /* qwen2 needs the q/k/v biases */
    expect_model(&(struct model_opts){.arch = "qwen2"}, KVS_BAD_FORMAT,
                 "missing tensor 'blk.0.attn_q.bias'");
}
END_TEST

START_TEST(test_names)
{
    ck_assert_str_eq(kvs_arch_name(KVS_ARCH_QWEN2), "qwen2");
    ck_assert_str_eq(kvs_hp_rope_style_name(KVS_HP_ROPE_NEOX), "neox");
    ck_assert_str_eq(kvs_rope_scaling_name(KVS_ROPE_SCALING_LLAMA3), "llama3");
    ck_assert_str_eq(kvs_rope_scaling_name((enum kvs_rope_scaling)9), "unknown");
}
END_TEST

int main(void)
{
    Suite *s = suite_create("hparams");
    TCase *tc = tcase_create("hparams");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_default_model);
    tcase_add_test(tc, test_tiny_llama_default_vocab);
    tcase_add_test(tc, test_tiny_qwen2_and_types);
    tcase_add_test(tc, test_in_memory_model_ok);
    tcase_add_test(tc, test_in_memory_model_refused);
    tcase_add_test(tc, test_names);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

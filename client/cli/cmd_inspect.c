/* kvstream inspect: open a model file the way the loader does and print what it holds
 * (architecture, hyperparameters, tensors by type, tokenizer, chat template family), or the
 * one-line reason it is refused. */
#include "client/cli/cmd.h"
#include "common/status.h"
#include "kernels/dtype.h"
#include "worker/gguf.h"
#include "worker/hparams.h"

#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CMD "inspect"

static void usage(FILE *f)
{
    fprintf(f, "usage: kvstream inspect [-m MODEL] [-o text|json]\n"
               "\n"
               "Validate a GGUF model file and print its architecture, hyperparameters,\n"
               "tensor types, tokenizer and chat template family; or why it is refused.\n"
               "\n"
               "  -m, --model PATH   GGUF model (default: the SmolLM2-135M-Instruct cache copy)\n"
               "  -o, --output FMT   text (default) or json (one JSON object)\n"
               "  -h, --help         this help\n");
}

/* What inspect reports beyond the hyperparameters. */
struct inspect_info {
    const char *path;
    uint64_t file_size; /* bytes */
    uint32_t version;   /* GGUF version */
    uint64_t n_tensors;
    uint64_t tensor_bytes;     /* sum of tensor data sizes */
    uint64_t n_by_type[32];    /* tensors per enum kvs_dtype (ids < 32) */
    kvs_gguf_str tok_model;    /* tokenizer.ggml.model (len 0 if absent) */
    kvs_gguf_str tok_pre;      /* tokenizer.ggml.pre (len 0 if absent) */
    const char *chat_template; /* chatml | llama3 | llama2 | unknown | none */
};

static bool contains(kvs_gguf_str s, const char *needle)
{
    return memmem(s.ptr, (size_t)s.len, needle, strlen(needle)) != NULL;
}

static const char *chat_template_family(const kvs_gguf *g)
{
    kvs_gguf_str t;
    if (kvs_gguf_get_str(g, "tokenizer.chat_template", &t) != 0) {
        return "none";
    }
    if (contains(t, "<|im_start|>")) {
        return "chatml";
    }
    if (contains(t, "<|start_header_id|>")) {
        return "llama3";
    }
    if (contains(t, "[INST]")) {
        return "llama2";
    }
    return "unknown";
}

/* llama_ftype names for the file types whose tensors we can load. */
static const char *file_type_name(int32_t ft)
{
    switch (ft) {
    case 0:
        return "F32";
    case 1:
        return "F16";
    case 2:
        return "Q4_0";
    case 3:
        return "Q4_1";
    case 7:
        return "Q8_0";
    case 32:
        return "BF16";
    case -1:
        return "unset";
    default:
        return "other";
    }
}

static void gather(const kvs_gguf *g, const char *path, struct inspect_info *in)
{
    memset(in, 0, sizeof *in);
    in->path = path;
    in->file_size = kvs_gguf_file_size(g);
    in->version = kvs_gguf_version(g);
    in->n_tensors = kvs_gguf_n_tensors(g);
    for (uint64_t i = 0; i < in->n_tensors; i++) {
        const kvs_gguf_tensor *t = kvs_gguf_tensor_at(g, i);
        in->tensor_bytes += t->nbytes;
        if (t->type < 32) {
            in->n_by_type[t->type]++;
        }
    }
    if (kvs_gguf_get_str(g, "tokenizer.ggml.model", &in->tok_model) != 0) {
        in->tok_model.len = 0;
    }
    if (kvs_gguf_get_str(g, "tokenizer.ggml.pre", &in->tok_pre) != 0) {
        in->tok_pre.len = 0;
    }
    in->chat_template = chat_template_family(g);
}

/* A metadata string as printable text (control and non-ASCII bytes shown as '?'). */
static void printable(char *dst, size_t n, kvs_gguf_str s)
{
    size_t k = 0;
    for (uint64_t i = 0; i < s.len && k + 1 < n; i++) {
        unsigned char c = (unsigned char)s.ptr[i];
        dst[k++] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
    }
    dst[k] = '\0';
}

static void print_text(const struct inspect_info *in, const struct kvs_hparams *hp)
{
    char tok[64], pre[64];
    printable(tok, sizeof tok, in->tok_model);
    printable(pre, sizeof pre, in->tok_pre);
    printf("file:            %s\n", in->path);
    printf("file size:       %llu bytes (GGUF v%u)\n", (unsigned long long)in->file_size,
           in->version);
    printf("architecture:    %s\n", hp->arch_name);
    printf("name:            %s\n", hp->name[0] ? hp->name : "(none)");
    printf("file type:       %s\n", file_type_name(hp->file_type));
    printf("layers:          %u\n", hp->n_layer);
    printf("embedding:       %u\n", hp->n_embd);
    printf("heads:           %u (kv heads %u, head dim %u)\n", hp->n_head, hp->n_head_kv,
           hp->head_dim);
    printf("feed forward:    %u\n", hp->n_ff);
    printf("vocabulary:      %u\n", hp->n_vocab);
    printf("context (train): %u\n", hp->n_ctx_train);
    printf("rope:            %s, %u dims, base %g, scaling %s",
           kvs_hp_rope_style_name(hp->rope_style), hp->rope_dim, (double)hp->rope_freq_base,
           kvs_rope_scaling_name(hp->rope_scaling));
    if (hp->rope_scaling != KVS_ROPE_SCALING_NONE) {
        printf(" (factor %g)", (double)hp->rope_scaling_factor);
    }
    printf("%s\n", hp->has_rope_freqs ? ", rope_freqs tensor" : "");
    printf("norm eps:        %g\n", (double)hp->norm_eps);
    printf("tied embeddings: %s\n", hp->tied_embeddings ? "yes" : "no");
    printf("qkv bias:        %s\n", hp->has_qkv_bias ? "yes" : "no");
    printf("tensors:         %llu (", (unsigned long long)in->n_tensors);
    const char *sep = "";
    for (uint32_t t = 0; t < 32; t++) {
        if (in->n_by_type[t] > 0) {
            printf("%s%s %llu", sep, kvs_dtype_name(t), (unsigned long long)in->n_by_type[t]);
            sep = ", ";
        }
    }
    printf("), %llu bytes of data\n", (unsigned long long)in->tensor_bytes);
    printf("tokenizer:       %s (pre-tokenizer %s)\n", tok[0] ? tok : "none",
           pre[0] ? pre : "none");
    printf("chat template:   %s\n", in->chat_template);
}

/* The shortest decimal that reads back as f, as a double (so 1e-5f prints as 1e-05, not
 * 9.99999975e-06). */
static double short_double(float f)
{
    char buf[32];
    for (int prec = 6; prec < 9; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, (double)f);
        if (strtof(buf, NULL) == f) {
            return strtod(buf, NULL);
        }
    }
    return (double)f;
}

/* A JSON string from metadata bytes; invalid UTF-8 is shown with '?' instead. */
static json_t *json_meta_str(kvs_gguf_str s)
{
    if (s.len == 0) {
        return json_null();
    }
    json_t *j = json_stringn(s.ptr, (size_t)s.len);
    if (j == NULL) {
        char buf[256];
        printable(buf, sizeof buf, s);
        j = json_string(buf);
    }
    return j;
}

static int print_json(const struct inspect_info *in, const struct kvs_hparams *hp)
{
    json_t *by_type = json_object();
    for (uint32_t t = 0; t < 32; t++) {
        if (in->n_by_type[t] > 0) {
            json_object_set_new(by_type, kvs_dtype_name(t),
                                json_integer((json_int_t)in->n_by_type[t]));
        }
    }
    json_t *rope = json_pack(
        "{s:s, s:i, s:f, s:s, s:f, s:f, s:f, s:i, s:b}", "style",
        kvs_hp_rope_style_name(hp->rope_style), "dim", (int)hp->rope_dim, "freq_base",
        short_double(hp->rope_freq_base), "scaling", kvs_rope_scaling_name(hp->rope_scaling),
        "scaling_factor", short_double(hp->rope_scaling_factor), "low_freq_factor",
        short_double(hp->rope_scaling_low_freq), "high_freq_factor",
        short_double(hp->rope_scaling_high_freq), "original_context_length",
        (int)hp->rope_scaling_orig_ctx, "has_rope_freqs", (int)hp->has_rope_freqs);
    json_t *root = json_pack(
        "{s:s, s:I, s:i, s:s, s:s, s:i, s:s, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:o, s:f,"
        " s:b, s:b, s:{s:I, s:I, s:o}, s:{s:o, s:o}, s:s}",
        "path", in->path, "file_size", (json_int_t)in->file_size, "gguf_version", (int)in->version,
        "architecture", hp->arch_name, "name", hp->name, "file_type", (int)hp->file_type,
        "file_type_name", file_type_name(hp->file_type), "n_layer", (int)hp->n_layer, "n_embd",
        (int)hp->n_embd, "n_head", (int)hp->n_head, "n_head_kv", (int)hp->n_head_kv, "head_dim",
        (int)hp->head_dim, "n_ff", (int)hp->n_ff, "n_vocab", (int)hp->n_vocab, "n_ctx_train",
        (int)hp->n_ctx_train, "rope", rope, "norm_eps", short_double(hp->norm_eps),
        "tied_embeddings", (int)hp->tied_embeddings, "has_qkv_bias", (int)hp->has_qkv_bias,
        "tensors", "count", (json_int_t)in->n_tensors, "data_bytes", (json_int_t)in->tensor_bytes,
        "by_type", by_type, "tokenizer", "model", json_meta_str(in->tok_model), "pre",
        json_meta_str(in->tok_pre), "chat_template", in->chat_template);
    if (root == NULL) {
        kvs_cli_error(CMD, "cannot build the JSON output");
        return 1;
    }
    char *text = json_dumps(root, JSON_COMPACT | JSON_REAL_PRECISION(15));
    json_decref(root);
    if (text == NULL) {
        kvs_cli_error(CMD, "cannot serialize the JSON output");
        return 1;
    }
    puts(text);
    free(text);
    return 0;
}

int kvs_cmd_inspect(int argc, char **argv)
{
    static const struct option opts[] = {
        {"model", required_argument, NULL, 'm'},
        {"output", required_argument, NULL, 'o'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *path = NULL;
    bool json = false;
    optind = 1;
    opterr = 0;
    for (;;) {
        int c = getopt_long(argc, argv, ":m:o:h", opts, NULL);
        if (c == -1) {
            break;
        }
        switch (c) {
        case 'm':
            path = optarg;
            break;
        case 'o':
            if (strcmp(optarg, "json") == 0) {
                json = true;
            } else if (strcmp(optarg, "text") == 0) {
                json = false;
            } else {
                kvs_cli_error(CMD, "unknown output format '%s' (use text or json)", optarg);
                return 2;
            }
            break;
        case 'h':
            usage(stdout);
            return 0;
        case ':':
            kvs_cli_error(CMD, "option '%s' needs an argument (try --help)", argv[optind - 1]);
            return 2;
        default:
            kvs_cli_error(CMD, "unknown option '%s' (try --help)", argv[optind - 1]);
            return 2;
        }
    }
    if (optind < argc) {
        kvs_cli_error(CMD, "unexpected argument '%s' (try --help)", argv[optind]);
        return 2;
    }
    if (path == NULL) {
        path = kvs_cli_default_model();
    }

    kvs_gguf *g = NULL;
    struct kvs_hparams hp;
    struct inspect_info info;
    char err[512];
    int rc = kvs_gguf_open(path, &g, err, sizeof err);
    if (rc == 0) {
        rc = kvs_hparams_from_gguf(g, &hp, err, sizeof err);
    }
    if (rc == 0) {
        rc = kvs_hparams_check_tensors(g, &hp, err, sizeof err);
    }
    if (rc < 0) {
        kvs_cli_error(CMD, "%s: %s", path, err);
        kvs_gguf_destroy(&g);
        return 1;
    }
    gather(g, path, &info);
    int code = 0;
    if (json) {
        code = print_json(&info, &hp);
    } else {
        print_text(&info, &hp);
    }
    kvs_gguf_destroy(&g);
    return code;
}

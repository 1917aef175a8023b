/* kvstream generate: one-shot generation from a prompt (stateless: a fresh seq per run). */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "client/cli/cmd.h"
#include "common/status.h"
#include "worker/chat.h"
#include "worker/engine.h"

#define CMD "generate"
#define MAX_STOPS 16

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvstream generate [-m MODEL] -p TEXT [options]\n"
            "\n"
            "Generate text from a prompt and stream it to standard output.\n"
            "\n"
            "  -m, --model PATH        GGUF model (default: the SmolLM2-135M-Instruct cache copy)\n"
            "  -p, --prompt TEXT       the prompt (required; '-' reads standard input)\n"
            "  -n, --n-predict N       tokens to generate, >= 1 (default 128)\n"
            "      --chat              wrap the prompt in the model's chat template as a user turn\n"
            "      --system TEXT       system message for --chat\n"
            "      --temp T            temperature; 0 = greedy (default 0)\n"
            "      --top-k K           keep the K most likely tokens (0 = off, default 40)\n"
            "      --top-p P           nucleus sampling (default 0.95)\n"
            "      --min-p P           min-p filter (default 0.05)\n"
            "      --repeat-penalty R  repetition penalty (default 1 = off)\n"
            "      --repeat-last-n N   tokens the penalty looks back over (default 64)\n"
            "      --seed S            random seed (default 0)\n"
            "      --stop TEXT         stop when TEXT is generated (repeatable, up to 16)\n"
            "      --special           parse special-token text in the prompt\n"
            "      --ignore-eos        do not stop at end-of-generation tokens (benchmarks)\n"
            "  -t, --threads N         CPU threads (default: all)\n"
            "  -c, --ctx N             KV capacity in cells (default: prompt + n)\n"
            "      --kv-f32            keep KV in f32 instead of f16\n"
            "      --device DEV        cpu (default)\n"
            "  -o, --output FMT        text (default) or json: JSON object on the last line\n"
            "  -h, --help              this help\n");
}

struct out_state {
    bool json;
};

static bool on_token(int32_t token, const char *text, size_t len, void *user)
{
    (void)token;
    struct out_state *st = user;
    if (!st->json && len > 0) {
        fwrite(text, 1, len, stdout);
        fflush(stdout);
    }
    return true;
}

static void on_progress(uint64_t done, uint64_t total, void *user)
{
    int *last = user;
    int pct = total > 0 ? (int)(done * 100 / total) : 100;
    if (pct / 10 != *last / 10) {
        fprintf(stderr, "\rkvstream generate: loading model %3d%%", pct);
        if (pct >= 100) {
            fprintf(stderr, "\n");
        }
        *last = pct;
    }
}

static int parse_int(const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi) {
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_float(const char *s, float *out)
{
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno != 0 || end == s || *end != '\0' || !isfinite(v)) {
        return -1;
    }
    *out = v;
    return 0;
}

static char *read_stdin(void)
{
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    while (buf != NULL) {
        size_t n = fread(buf + len, 1, cap - len - 1, stdin);
        len += n;
        if (n == 0) {
            break;
        }
        if (len + 1 == cap) {
            char *b = realloc(buf, cap * 2);
            if (b == NULL) {
                free(buf);
                return NULL;
            }
            buf = b;
            cap *= 2;
        }
    }
    if (buf != NULL) {
        buf[len] = '\0';
    }
    return buf;
}

enum { OPT_CHAT = 256, OPT_SYSTEM, OPT_TEMP, OPT_TOPK, OPT_TOPP, OPT_MINP, OPT_RP, OPT_RLN,
       OPT_SEED, OPT_STOP, OPT_SPECIAL, OPT_KVF32, OPT_DEVICE, OPT_IGNORE_EOS };

int kvs_cmd_generate(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"model", required_argument, NULL, 'm'},   {"prompt", required_argument, NULL, 'p'},
        {"n-predict", required_argument, NULL, 'n'}, {"chat", no_argument, NULL, OPT_CHAT},
        {"system", required_argument, NULL, OPT_SYSTEM}, {"temp", required_argument, NULL, OPT_TEMP},
        {"top-k", required_argument, NULL, OPT_TOPK}, {"top-p", required_argument, NULL, OPT_TOPP},
        {"min-p", required_argument, NULL, OPT_MINP},
        {"repeat-penalty", required_argument, NULL, OPT_RP},
        {"repeat-last-n", required_argument, NULL, OPT_RLN},
        {"seed", required_argument, NULL, OPT_SEED}, {"stop", required_argument, NULL, OPT_STOP},
        {"special", no_argument, NULL, OPT_SPECIAL}, {"threads", required_argument, NULL, 't'},
        {"ctx", required_argument, NULL, 'c'},       {"kv-f32", no_argument, NULL, OPT_KVF32},
        {"device", required_argument, NULL, OPT_DEVICE},
        {"ignore-eos", no_argument, NULL, OPT_IGNORE_EOS},
        {"output", required_argument, NULL, 'o'},    {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *model = NULL, *prompt = NULL, *system = NULL, *device = "cpu";
    const char *stops[MAX_STOPS];
    int n_stops = 0;
    long n_predict = 128, threads = 0, ctx = 0;
    bool chat = false, special = false, kv_f32 = false, json = false, ignore_eos = false;
    struct kvs_sampling sp = kvs_sampling_default();
    /* sampling defaults for temp > 0, as llama.cpp's */
    sp.top_k = 40;
    sp.top_p = 0.95f;
    sp.min_p = 0.05f;
    long v;
    int c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":m:p:n:t:c:o:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'm': model = optarg; break;
        case 'p': prompt = optarg; break;
        case 'n':
            if (parse_int(optarg, 1, 1 << 20, &n_predict) < 0) {
                kvs_cli_error(CMD, "-n must be an integer in [1, 1048576], got '%s'", optarg);
                return 2;
            }
            break;
        case OPT_CHAT: chat = true; break;
        case OPT_SYSTEM: system = optarg; break;
        case OPT_TEMP:
            if (parse_float(optarg, &sp.temperature) < 0) {
                kvs_cli_error(CMD, "--temp must be a number, got '%s'", optarg);
                return 2;
            }
            break;
        case OPT_TOPK:
            if (parse_int(optarg, -1000000000L, 1000000000L, &v) < 0) {
                kvs_cli_error(CMD, "--top-k must be an integer, got '%s'", optarg);
                return 2;
            }
            sp.top_k = (int32_t)v;
            break;
        case OPT_TOPP:
            if (parse_float(optarg, &sp.top_p) < 0) {
                kvs_cli_error(CMD, "--top-p must be a number, got '%s'", optarg);
                return 2;
            }
            break;
        case OPT_MINP:
            if (parse_float(optarg, &sp.min_p) < 0) {
                kvs_cli_error(CMD, "--min-p must be a number, got '%s'", optarg);
                return 2;
            }
            break;
        case OPT_RP:
            if (parse_float(optarg, &sp.repeat_penalty) < 0) {
                kvs_cli_error(CMD, "--repeat-penalty must be a number, got '%s'", optarg);
                return 2;
            }
            break;
        case OPT_RLN:
            if (parse_int(optarg, -1000000000L, 1000000000L, &v) < 0) {
                kvs_cli_error(CMD, "--repeat-last-n must be an integer, got '%s'", optarg);
                return 2;
            }
            sp.repeat_last_n = (int32_t)v;
            break;
        case OPT_SEED:
            if (parse_int(optarg, 0, 0x7fffffffL, &v) < 0) {
                kvs_cli_error(CMD, "--seed must be an integer in [0, 2147483647], got '%s'",
                              optarg);
                return 2;
            }
            sp.seed = (uint64_t)v;
            break;
        case OPT_STOP:
            if (n_stops == MAX_STOPS) {
                kvs_cli_error(CMD, "at most %d --stop strings", MAX_STOPS);
                return 2;
            }
            stops[n_stops++] = optarg;
            break;
        case OPT_SPECIAL: special = true; break;
        case 't':
            if (parse_int(optarg, 1, 1024, &threads) < 0) {
                kvs_cli_error(CMD, "-t must be an integer in [1, 1024], got '%s'", optarg);
                return 2;
            }
            break;
        case 'c':
            if (parse_int(optarg, 1, 1L << 27, &ctx) < 0) {
                kvs_cli_error(CMD, "-c must be a positive integer, got '%s'", optarg);
                return 2;
            }
            break;
        case OPT_KVF32: kv_f32 = true; break;
        case OPT_DEVICE: device = optarg; break;
        case OPT_IGNORE_EOS: ignore_eos = true; break;
        case 'o':
            if (strcmp(optarg, "json") == 0) {
                json = true;
            } else if (strcmp(optarg, "text") != 0) {
                kvs_cli_error(CMD, "-o must be text or json, got '%s'", optarg);
                return 2;
            }
            break;
        case 'h': usage(stdout); return 0;
        case ':':
            kvs_cli_error(CMD, "option '%s' needs a value", argv[optind - 1]);
            return 2;
        default:
            kvs_cli_error(CMD, "unknown option '%s' (try --help)", argv[optind - 1]);
            return 2;
        }
    }
    if (optind < argc) {
        kvs_cli_error(CMD, "unexpected argument '%s' (the prompt goes after -p)", argv[optind]);
        return 2;
    }
    if (prompt == NULL) {
        kvs_cli_error(CMD, "a prompt is required (-p TEXT)");
        return 2;
    }
    char err[512] = "";
    if (kvs_sampling_validate(&sp, err, sizeof err) < 0) {
        kvs_cli_error(CMD, "%s", err);
        return 2;
    }
    if (n_stops > 0 && kvs_stop_validate(stops, n_stops, err, sizeof err) < 0) {
        kvs_cli_error(CMD, "%s", err);
        return 2;
    }
    if (model == NULL) {
        model = kvs_cli_default_model();
    }
    char *stdin_prompt = NULL;
    if (strcmp(prompt, "-") == 0) {
        stdin_prompt = read_stdin();
        if (stdin_prompt == NULL) {
            kvs_cli_error(CMD, "cannot read the prompt from standard input");
            return 1;
        }
        prompt = stdin_prompt;
    }

    int rc = 1;
    kvs_engine *e = NULL;
    char *text = NULL;
    int32_t *ids = NULL;
    struct kvs_gen_result res = {0};
    int progress_last = -10;
    struct kvs_engine_opts eo = {
        .model_path = model,
        .device = device,
        .n_threads = (int32_t)threads,
        .n_cells = ctx,
        .kv_f32 = kv_f32,
        .progress = json ? NULL : on_progress,
        .progress_user = &progress_last,
    };
    if (!isatty(2)) {
        eo.progress = NULL; /* progress only for a person watching a terminal */
    }
    int st = kvs_engine_open(&eo, &e, err, sizeof err);
    if (st < 0) {
        kvs_cli_error(CMD, "%s: %s", model, err);
        goto out;
    }
    /* Build the prompt text. */
    const char *ptext = prompt;
    size_t plen = strlen(prompt);
    bool parse_special = special;
    if (chat) {
        struct kvs_chat_template t;
        const char *tmpl = kvs_tokenizer_chat_template(e->tok);
        kvs_chat_template_init(&t, tmpl, tmpl != NULL ? strlen(tmpl) : 0);
        struct kvs_chat_msg msgs[2];
        size_t n_msgs = 0;
        if (system != NULL) {
            msgs[n_msgs++] = (struct kvs_chat_msg){KVS_CHAT_SYSTEM, system, strlen(system)};
        }
        msgs[n_msgs++] = (struct kvs_chat_msg){KVS_CHAT_USER, prompt, plen};
        size_t need = 0;
        st = kvs_chat_format(&t, msgs, n_msgs, true, NULL, 0, &need);
        if (st == KVS_UNSUPPORTED) {
            kvs_cli_error(CMD, "%s has no known chat template; run without --chat", model);
            goto out;
        }
        text = malloc(need + 1);
        if (text == NULL || kvs_chat_format(&t, msgs, n_msgs, true, text, need + 1, &need) < 0) {
            kvs_cli_error(CMD, "cannot format the chat prompt");
            goto out;
        }
        ptext = text;
        plen = need;
        parse_special = true; /* the template's markers are special tokens */
    }
    size_t n_ids = 0, cap = plen + 8;
    ids = malloc(cap * sizeof *ids);
    if (ids == NULL) {
        kvs_cli_error(CMD, "out of memory");
        goto out;
    }
    st = kvs_tokenizer_encode(e->tok, ptext, plen, true, parse_special, ids, cap, &n_ids);
    if (st < 0) {
        kvs_cli_error(CMD, "cannot tokenize the prompt: %s", kvs_status_message(st));
        goto out;
    }
    if (n_ids == 0) {
        kvs_cli_error(CMD, "the prompt is empty");
        rc = 2;
        goto out;
    }
    if ((int64_t)n_ids + n_predict > e->n_ctx) {
        kvs_cli_error(CMD, "prompt of %zu tokens + %ld to generate exceeds the context of %lld",
                      n_ids, n_predict, (long long)e->n_ctx);
        goto out;
    }
    struct out_state ost = {.json = json};
    struct kvs_gen_opts go = {.sampling = sp, .max_tokens = (int32_t)n_predict,
                              .stops = stops, .n_stops = n_stops, .ignore_eog = ignore_eos};
    st = kvs_engine_generate(e, ids, (int32_t)n_ids, &go, on_token, &ost, &res);
    if (st < 0) {
        kvs_cli_error(CMD, "generation failed: %s", kvs_status_message(st));
        goto out;
    }
    if (!json) {
        printf("\n");
        fprintf(stderr, "kvstream generate: prompt %zu tokens, %.1f tok/s; generated %d tokens, "
                        "%.1f tok/s\n",
                n_ids, res.prefill_s > 0 ? (double)n_ids / res.prefill_s : 0.0, res.n_tokens,
                res.decode_s > 0 && res.n_tokens > 1 ? (res.n_tokens - 1) / res.decode_s : 0.0);
    } else {
        json_t *o = json_object();
        json_t *pa = json_array(), *ta = json_array();
        for (size_t i = 0; i < n_ids; i++) {
            json_array_append_new(pa, json_integer(ids[i]));
        }
        for (int32_t i = 0; i < res.n_tokens; i++) {
            json_array_append_new(ta, json_integer(res.tokens[i]));
        }
        size_t tl = 0;
        kvs_tokenizer_decode(e->tok, res.tokens, (size_t)res.n_tokens, false, NULL, 0, &tl);
        char *gen = malloc(tl + 1);
        if (gen != NULL &&
            kvs_tokenizer_decode(e->tok, res.tokens, (size_t)res.n_tokens, false, gen, tl + 1,
                                 &tl) == 0) {
            json_object_set_new(o, "text", json_stringn_nocheck(gen, tl));
        }
        free(gen);
        json_object_set_new(o, "prompt_ids", pa);
        json_object_set_new(o, "token_ids", ta);
        json_object_set_new(o, "prefill_tps",
                            json_real(res.prefill_s > 0 ? (double)n_ids / res.prefill_s : 0.0));
        json_object_set_new(o, "decode_tps",
                            json_real(res.decode_s > 0 && res.n_tokens > 1
                                          ? (res.n_tokens - 1) / res.decode_s
                                          : 0.0));
        json_object_set_new(o, "stop", json_string(res.stopped_eog      ? "eog"
                                                   : res.stopped_string ? "stop_string"
                                                                        : "length"));
        char *s = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII);
        if (s != NULL) {
            printf("%s\n", s);
            free(s);
        }
        json_decref(o);
    }
    rc = 0;
out:
    free(res.tokens);
    free(res.text);
    free(ids);
    free(text);
    free(stdin_prompt);
    kvs_engine_destroy(&e);
    return rc;
}

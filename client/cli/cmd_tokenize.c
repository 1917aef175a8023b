/* kvstream tokenize: read one JSON string per line from standard input, print one JSON
 * array of token ids per line, using the model's own tokenizer. */
#include "client/cli/cmd.h"
#include "common/status.h"
#include "worker/gguf.h"
#include "worker/tokenizer.h"

#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CMD "tokenize"

static void usage(FILE *f)
{
    fprintf(f, "usage: kvstream tokenize [-m MODEL] [--special] [--add-special]\n"
               "\n"
               "Read one JSON string per line from standard input and print the token ids of\n"
               "each as one JSON array per line.\n"
               "\n"
               "  -m, --model PATH   GGUF model (default: the SmolLM2-135M-Instruct cache copy)\n"
               "  --special          turn special-token text (<|im_start|>, <s>, ...) into its id\n"
               "  --add-special      add BOS/EOS as the model's metadata says\n"
               "  -h, --help         this help\n");
}

/* Print ids as a JSON array on one line. */
static void print_ids(const int32_t *ids, size_t n)
{
    putchar('[');
    for (size_t i = 0; i < n; i++) {
        printf(i ? ",%d" : "%d", ids[i]);
    }
    fputs("]\n", stdout);
}

int kvs_cmd_tokenize(int argc, char **argv)
{
    enum { OPT_SPECIAL = 256, OPT_ADD_SPECIAL };
    static const struct option opts[] = {
        {"model", required_argument, NULL, 'm'},
        {"special", no_argument, NULL, OPT_SPECIAL},
        {"add-special", no_argument, NULL, OPT_ADD_SPECIAL},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *model = kvs_cli_default_model();
    bool parse_special = false, add_special = false;
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "m:h", opts, NULL)) != -1) {
        switch (c) {
        case 'm':
            model = optarg;
            break;
        case OPT_SPECIAL:
            parse_special = true;
            break;
        case OPT_ADD_SPECIAL:
            add_special = true;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            kvs_cli_error(CMD, "unknown or incomplete option '%s' (try --help)",
                          argv[optind - 1]);
            return 2;
        }
    }
    if (optind < argc) {
        kvs_cli_error(CMD, "unexpected argument '%s' (try --help)", argv[optind]);
        return 2;
    }

    int ret = 1;
    char err[512];
    kvs_gguf *g = NULL;
    kvs_tokenizer *tok = NULL;
    char *line = NULL;
    size_t line_cap = 0, ids_cap = 0;
    int32_t *ids = NULL;

    int rc = kvs_gguf_open(model, &g, err, sizeof err);
    if (rc < 0) {
        kvs_cli_error(CMD, "%s: %s", model, err);
        goto done;
    }
    rc = kvs_tokenizer_new_from_gguf(g, &tok, err, sizeof err);
    if (rc < 0) {
        kvs_cli_error(CMD, "%s: %s", model, err);
        goto done;
    }
    kvs_gguf_destroy(&g); /* the tokenizer keeps its own copy */

    ssize_t len;
    for (size_t lineno = 1; (len = getline(&line, &line_cap, stdin)) >= 0; lineno++) {
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) {
            len--;
        }
        json_error_t jerr;
        json_t *j = json_loadb(line, (size_t)len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
        if (j == NULL || !json_is_string(j)) {
            kvs_cli_error(CMD, "line %zu: not a JSON string%s%s", lineno, j ? "" : ": ",
                          j ? "" : jerr.text);
            json_decref(j);
            goto done;
        }
        const char *text = json_string_value(j);
        size_t tlen = json_string_length(j);
        size_t n = 0;
        for (;;) {
            rc = kvs_tokenizer_encode(tok, text, tlen, add_special, parse_special, ids, ids_cap,
                                      &n);
            if (rc != KVS_TOO_LARGE) {
                break;
            }
            int32_t *p = realloc(ids, n * sizeof *ids);
            if (p == NULL) {
                rc = KVS_NO_MEMORY;
                break;
            }
            ids = p;
            ids_cap = n;
        }
        json_decref(j);
        if (rc < 0) {
            kvs_cli_error(CMD, "line %zu: %s", lineno, kvs_status_message(rc));
            goto done;
        }
        print_ids(ids, n);
    }
    if (ferror(stdin)) {
        kvs_cli_error(CMD, "reading standard input failed");
        goto done;
    }
    ret = fflush(stdout) == 0 ? 0 : 1;
done:
    free(ids);
    free(line);
    kvs_tokenizer_destroy(&tok);
    kvs_gguf_destroy(&g);
    return ret;
}

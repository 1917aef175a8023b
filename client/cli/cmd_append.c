/* kvstream append: append records to a session, from the command line or line by line from
 * standard input (so that `tail -f feed | kvstream append s1 -` streams a feed). */
#include "client/cli/cmd.h"
#include "client/cli/remote.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CMD "append"

enum { OPT_CLIENT_ID = KVS_CLI_OPT_FIRST_LOCAL, OPT_AFTER_SEQ };

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvstream append NAME TEXT [options]\n"
            "       kvstream append NAME - [options]     (one append per line of standard input)\n"
            "\n"
            "Append a record to session NAME. With '-' each line read from standard input is\n"
            "appended as it arrives (empty lines are skipped), so 'tail -f feed | kvstream\n"
            "append s1 -' streams a feed. Every append carries this process's client id and a\n"
            "sequence number: one that times out is sent again with the same number, and the\n"
            "worker applies it once.\n"
            "\n"
            "      --client-id ID      client id of the appends (default: a fresh random one\n"
            "                          per process, so concurrent appenders never collide)\n"
            "      --after-seq N       with --client-id: continue the numbering of an earlier\n"
            "                          process after its last acknowledged sequence number N\n"
            KVS_CLI_REMOTE_HELP
            "\n"
            "Text output: one line per append ('NAME version V +N tokens, C cells'; with '-'\n"
            "only a summary on standard error). -o json: one object per append {session,\n"
            "version, n_tokens, cells, evicted, duplicate, client_id, client_seq}.\n"
            "Exit codes: see 'kvstream --help'.\n");
}

static int append_one(const struct kvs_cli_remote *r, kvs_client *c, const char *name,
                      const char *text, size_t len, uint64_t seq, bool quiet)
{
    struct kvs_client_append_result ar;
    int st = kvs_client_append(c, name, text, len, &ar);
    if (st < 0) {
        return st;
    }
    if (r->json) {
        json_t *o = json_object();
        json_object_set_new(o, "session", json_string(name));
        json_object_set_new(o, "version", json_integer((json_int_t)ar.version));
        json_object_set_new(o, "n_tokens", json_integer(ar.n_tokens));
        json_object_set_new(o, "cells", json_integer(ar.cells));
        json_object_set_new(o, "evicted", json_integer(ar.evicted));
        json_object_set_new(o, "duplicate", json_boolean(ar.duplicate));
        /* random ids are below 2^63; a larger --client-id prints as a string */
        uint64_t id = kvs_client_id(c);
        if (id <= (uint64_t)INT64_MAX) {
            json_object_set_new(o, "client_id", json_integer((json_int_t)id));
        } else {
            char s[24];
            snprintf(s, sizeof s, "%llu", (unsigned long long)id);
            json_object_set_new(o, "client_id", json_string(s));
        }
        json_object_set_new(o, "client_seq", json_integer((json_int_t)seq));
        kvs_cli_print_json(o);
    } else if (!quiet) {
        printf("%s version %llu +%d tokens, %lld cells%s\n", name,
               (unsigned long long)ar.version, ar.n_tokens, (long long)ar.cells,
               ar.duplicate ? " (duplicate: applied before)" : "");
    }
    return 0;
}

int kvs_cmd_append(int argc, char **argv)
{
    static const struct option longopts[] = {
        KVS_CLI_REMOTE_LONGOPTS,
        {"client-id", required_argument, NULL, OPT_CLIENT_ID},
        {"after-seq", required_argument, NULL, OPT_AFTER_SEQ},
        {NULL, 0, NULL, 0},
    };
    struct kvs_cli_remote r;
    kvs_cli_remote_init(&r, CMD);
    uint64_t after_seq = 0;
    bool has_after_seq = false;
    optind = 0;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":" KVS_CLI_REMOTE_SHORTOPTS, longopts, NULL)) != -1) {
        int h = kvs_cli_remote_opt(&r, c, optarg);
        if (h < 0) {
            return KVS_EXIT_USAGE;
        }
        if (h > 0) {
            continue;
        }
        switch (c) {
        case OPT_CLIENT_ID:
            if (kvs_cli_parse_u64(optarg, &r.client_id) < 0 || r.client_id == 0) {
                kvs_cli_error(CMD, "--client-id must be an integer in [1, 2^64), got '%s'",
                              optarg);
                return KVS_EXIT_USAGE;
            }
            break;
        case OPT_AFTER_SEQ:
            if (kvs_cli_parse_u64(optarg, &after_seq) < 0) {
                kvs_cli_error(CMD, "--after-seq must be a non-negative integer, got '%s'",
                              optarg);
                return KVS_EXIT_USAGE;
            }
            has_after_seq = true;
            break;
        case 'h': usage(stdout); return KVS_EXIT_OK;
        default: return kvs_cli_bad_option(&r, c, argv);
        }
    }
    if (argc - optind != 2) {
        kvs_cli_error(CMD, "needs a session NAME and a TEXT (or '-' for standard input)");
        return KVS_EXIT_USAGE;
    }
    if (has_after_seq && r.client_id == 0) {
        kvs_cli_error(CMD, "--after-seq needs --client-id");
        return KVS_EXIT_USAGE;
    }
    const char *name = argv[optind], *text = argv[optind + 1];
    bool from_stdin = strcmp(text, "-") == 0;
    if (!from_stdin && text[0] == '\0') {
        kvs_cli_error(CMD, "the TEXT is empty");
        return KVS_EXIT_USAGE;
    }
    kvs_client *cl = NULL;
    int rc = kvs_cli_connect(&r, &cl);
    if (rc != KVS_EXIT_OK) {
        return rc;
    }
    int st = 0;
    uint64_t seq = after_seq;
    if (has_after_seq) {
        st = kvs_client_set_append_seq(cl, name, after_seq);
    }
    if (st == 0 && !from_stdin) {
        st = append_one(&r, cl, name, text, strlen(text), ++seq, false);
    } else if (st == 0) {
        char *line = NULL;
        size_t cap = 0;
        ssize_t n;
        long lineno = 0, appended = 0;
        while ((n = getline(&line, &cap, stdin)) >= 0) {
            lineno++;
            while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) {
                line[--n] = '\0';
            }
            if (n == 0) {
                continue;
            }
            st = append_one(&r, cl, name, line, (size_t)n, ++seq, true);
            if (st < 0) {
                char msg[600];
                snprintf(msg, sizeof msg, "line %ld: %s", lineno, kvs_client_error(cl));
                kvs_cli_error(CMD, "%s", msg);
                break;
            }
            appended++;
        }
        free(line);
        if (st == 0 && !r.json) {
            fprintf(stderr, "kvstream append: %ld records appended to %s\n", appended, name);
        }
        if (st < 0) {
            kvs_client_destroy(&cl);
            return kvs_cli_exit_code(st);
        }
    }
    rc = st < 0 ? kvs_cli_fail(&r, cl, st) : KVS_EXIT_OK;
    kvs_client_destroy(&cl);
    return rc;
}

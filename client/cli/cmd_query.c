/* kvstream query: ask a question about a session's context and stream the answer. */
#include "client/cli/cmd.h"
#include "client/cli/remote.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>

#define CMD "query"

enum { OPT_STATELESS = KVS_CLI_OPT_FIRST_LOCAL };

static kvs_client *g_client; /* for SIGINT: cancel the query in progress */

static void on_sigint(int sig)
{
    (void)sig;
    if (g_client != NULL) {
        kvs_client_cancel(g_client); /* an atomic store: async-signal-safe */
    }
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvstream query NAME QUESTION [--stateless] [options]\n"
            "\n"
            "Ask QUESTION about session NAME's context and stream the answer to standard\n"
            "output (the session is not modified). Greedy unless --temp is given.\n"
            "\n"
            "      --stateless         baseline: re-prefill the whole recorded context instead\n"
            "                          of using the session's KV (same greedy answer, slower)\n"
            KVS_CLI_SAMPLING_HELP KVS_CLI_REMOTE_HELP
            "\n"
            "Text output: the answer, then 'version V, C context tokens, ttft T ms, total T ms'\n"
            "on standard error. -o json: {answer, token_ids, version, context_tokens,\n"
            "question_tokens, ttft_ms, total_ms}. Ctrl-C cancels the query on the worker.\n"
            "Exit codes: see 'kvstream --help'.\n");
}

static bool on_token(int32_t token, const char *text, size_t len, void *user)
{
    (void)token;
    bool *printed = user;
    if (len > 0) {
        fwrite(text, 1, len, stdout);
        fflush(stdout);
        *printed = true;
    }
    return true;
}

int kvs_cmd_query(int argc, char **argv)
{
    static const struct option longopts[] = {
        KVS_CLI_REMOTE_LONGOPTS,
        KVS_CLI_SAMPLING_LONGOPTS,
        {"stateless", no_argument, NULL, OPT_STATELESS},
        {NULL, 0, NULL, 0},
    };
    struct kvs_cli_remote r;
    kvs_cli_remote_init(&r, CMD);
    struct kvs_cli_sampling s;
    kvs_cli_sampling_init(&s);
    optind = 0;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":" KVS_CLI_REMOTE_SHORTOPTS KVS_CLI_SAMPLING_SHORTOPTS,
                            longopts, NULL)) != -1) {
        int h = kvs_cli_remote_opt(&r, c, optarg);
        if (h == 0) {
            h = kvs_cli_sampling_opt(&s, CMD, c, optarg);
        }
        if (h < 0) {
            return KVS_EXIT_USAGE;
        }
        if (h > 0) {
            continue;
        }
        switch (c) {
        case OPT_STATELESS: s.q.stateless = true; break;
        case 'h': usage(stdout); return KVS_EXIT_OK;
        default: return kvs_cli_bad_option(&r, c, argv);
        }
    }
    if (argc - optind != 2) {
        kvs_cli_error(CMD, "needs a session NAME and a QUESTION (try --help)");
        return KVS_EXIT_USAGE;
    }
    const char *name = argv[optind], *question = argv[optind + 1];
    if (question[0] == '\0') {
        kvs_cli_error(CMD, "the QUESTION is empty");
        return KVS_EXIT_USAGE;
    }
    kvs_client *cl = NULL;
    int rc = kvs_cli_connect(&r, &cl);
    if (rc != KVS_EXIT_OK) {
        return rc;
    }
    g_client = cl;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);

    struct kvs_client_answer a = {0};
    bool printed = false;
    int st = kvs_client_query(cl, name, question, &s.q, r.json ? NULL : on_token, &printed, &a);
    if (st == 0 && r.json) {
        kvs_cli_print_json(kvs_cli_answer_json(&a, false));
    } else if (st == 0) {
        printf("\n");
        fprintf(stderr, "kvstream query: version %llu, %lld context tokens, ttft %.1f ms, "
                        "total %.1f ms\n",
                (unsigned long long)a.version, (long long)a.context_tokens, a.ttft_ms,
                a.total_ms);
    } else if (printed) {
        printf("\n"); /* end the partial answer's line */
    }
    rc = st < 0 ? kvs_cli_fail(&r, cl, st) : KVS_EXIT_OK;
    signal(SIGINT, SIG_DFL);
    g_client = NULL;
    kvs_client_answer_free(&a);
    kvs_client_destroy(&cl);
    return rc;
}

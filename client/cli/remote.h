/* What the `kvstream` subcommands that talk to a worker share: the common options
 * (--endpoint, -o, --timeout), connecting, sampling flags, error reporting with the
 * documented exit codes, and JSON output. */
#ifndef KVS_CLI_REMOTE_H
#define KVS_CLI_REMOTE_H

#include <getopt.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "client/include/kvstream.h"

/* Exit codes of every client subcommand (also in `kvstream --help` and README.md). */
enum kvs_cli_exit {
    KVS_EXIT_OK = 0,
    KVS_EXIT_FAILED = 1,       /* the worker refused the request, or a local failure */
    KVS_EXIT_USAGE = 2,        /* bad command line */
    KVS_EXIT_UNREACHABLE = 3,  /* no answer from the endpoint in time (TIMEOUT) */
    KVS_EXIT_NOT_FOUND = 4,    /* no such session or flash query */
    KVS_EXIT_EXISTS = 5,       /* the session or flash query already exists */
};

enum {
    KVS_CLI_OPT_TIMEOUT = 300,
    KVS_CLI_OPT_TEMP,
    KVS_CLI_OPT_TOPK,
    KVS_CLI_OPT_TOPP,
    KVS_CLI_OPT_MINP,
    KVS_CLI_OPT_RP,
    KVS_CLI_OPT_SEED,
    KVS_CLI_OPT_STOP,
    KVS_CLI_OPT_SERVER_KEY,
    KVS_CLI_OPT_FIRST_LOCAL = 400, /* subcommands number their own options from here */
};

struct kvs_cli_remote {
    const char *cmd;           /* "session create", for messages */
    const char *endpoint;      /* --endpoint, else $KVSTREAM_ENDPOINT, else the default */
    bool json;                 /* -o json */
    int32_t timeout_ms;        /* --timeout, per attempt */
    uint64_t client_id;        /* --client-id (0 = random) */
    const char *server_key;    /* --server-key, else $KVSTREAM_SERVER_KEY: CURVE (NULL = off) */
};

/* The common options' getopt entries and short letters. */
#define KVS_CLI_REMOTE_LONGOPTS                                                            \
    {"endpoint", required_argument, NULL, 'e'}, {"output", required_argument, NULL, 'o'},  \
        {"timeout", required_argument, NULL, KVS_CLI_OPT_TIMEOUT},                         \
        {"server-key", required_argument, NULL, KVS_CLI_OPT_SERVER_KEY},                   \
        {"help", no_argument, NULL, 'h'}
#define KVS_CLI_REMOTE_SHORTOPTS "e:o:h"

/* The common options' help lines. */
#define KVS_CLI_REMOTE_HELP                                                                \
    "  -e, --endpoint EP       worker or cluster endpoint (default: $KVSTREAM_ENDPOINT, else\n" \
    "                          " KVS_CLIENT_DEFAULT_ENDPOINT ")\n"                             \
    "  -o, --output FMT        text (default) or json (one JSON object per line)\n"           \
    "      --timeout MS        wait at most MS per attempt (default 60000)\n"                  \
    "      --server-key KEY    CURVE: the server's public key, Z85 or a file (default:\n"     \
    "                          $KVSTREAM_SERVER_KEY; none = no encryption)\n"               \
    "  -h, --help              this help\n"

void kvs_cli_remote_init(struct kvs_cli_remote *r, const char *cmd);

/* Handle a common option: 1 handled, 0 not a common one, -1 bad value (message printed). */
int kvs_cli_remote_opt(struct kvs_cli_remote *r, int opt, const char *arg);

/* Report getopt's '?' / ':' for argv[optind - 1]; returns KVS_EXIT_USAGE. */
int kvs_cli_bad_option(const struct kvs_cli_remote *r, int opt, char **argv);

/* Connect and say hello. KVS_EXIT_OK and *c, or an exit code with the reason printed. */
int kvs_cli_connect(const struct kvs_cli_remote *r, kvs_client **c);

/* The exit code of a failed status. */
int kvs_cli_exit_code(int status);

/* Print "kvstream <cmd>: <message of the failed call>" and return its exit code. */
int kvs_cli_fail(const struct kvs_cli_remote *r, kvs_client *c, int status);

/* Print o compactly on one line (ASCII-only) and release it. */
void kvs_cli_print_json(json_t *o);

/* {answer, token_ids, version, context_tokens, question_tokens, ttft_ms, total_ms
 *  [, fresh, name]} of an answer. */
json_t *kvs_cli_answer_json(const struct kvs_client_answer *a, bool flash);

/* Numbers from the command line: 0, or -1 when s is not one in [lo, hi]. */
int kvs_cli_parse_long(const char *s, long lo, long hi, long *out);
int kvs_cli_parse_u64(const char *s, uint64_t *out);
int kvs_cli_parse_float(const char *s, float *out);

/* ---- sampling flags of query and flash register (those of `generate`) ---- */

struct kvs_cli_sampling {
    struct kvs_client_query_opts q;             /* q.stops points at stops */
    const char *stops[8];
};

#define KVS_CLI_SAMPLING_LONGOPTS                                                          \
    {"max-tokens", required_argument, NULL, 'n'},                                          \
        {"temp", required_argument, NULL, KVS_CLI_OPT_TEMP},                               \
        {"top-k", required_argument, NULL, KVS_CLI_OPT_TOPK},                              \
        {"top-p", required_argument, NULL, KVS_CLI_OPT_TOPP},                              \
        {"min-p", required_argument, NULL, KVS_CLI_OPT_MINP},                              \
        {"repeat-penalty", required_argument, NULL, KVS_CLI_OPT_RP},                       \
        {"seed", required_argument, NULL, KVS_CLI_OPT_SEED},                               \
        {"stop", required_argument, NULL, KVS_CLI_OPT_STOP}
#define KVS_CLI_SAMPLING_SHORTOPTS "n:"

#define KVS_CLI_SAMPLING_HELP                                                              \
    "  -n, --max-tokens N      answer tokens at most, 1..4096 (default 64)\n"                  \
    "      --temp T            temperature; 0 = greedy (default 0)\n"                          \
    "      --top-k K           keep the K most likely tokens (0 = off, default 40)\n"          \
    "      --top-p P           nucleus sampling (default 0.95)\n"                              \
    "      --min-p P           min-p filter (default 0.05)\n"                                  \
    "      --repeat-penalty R  repetition penalty (default 1 = off)\n"                         \
    "      --seed S            random seed (default 0)\n"                                      \
    "      --stop TEXT         stop when TEXT is generated (repeatable, up to 8)\n"

/* Greedy, 64 tokens; top-k 40, top-p 0.95, min-p 0.05 for temp > 0 (as `generate`). */
void kvs_cli_sampling_init(struct kvs_cli_sampling *s);

/* Handle a sampling option: 1 handled, 0 not one, -1 bad value (message printed). */
int kvs_cli_sampling_opt(struct kvs_cli_sampling *s, const char *cmd, int opt, const char *arg);

#endif

/* kvstream: the command-line entry point. Dispatches to one cmd_<name>.c per subcommand. */
#include "cmd.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
};

static const struct command commands[] = {
    {"up", kvs_cmd_up, "run a single-node cluster (one kvs-worker) in the foreground"},
    {"session", kvs_cmd_session, "create, info, close or list sessions"},
    {"append", kvs_cmd_append, "append records to a session (TEXT, or '-' for stdin lines)"},
    {"query", kvs_cmd_query, "ask a question about a session and stream the answer"},
    {"flash", kvs_cmd_flash, "register, get, unregister, list or watch flash queries"},
    {"admin", kvs_cmd_admin, "a cluster's workers and sessions: list, describe, cordon, top"},
    {"demo", kvs_cmd_demo, "stream a synthetic market feed into sessions, with flash queries"},
    {"generate", kvs_cmd_generate, "generate text from a prompt (stateless, one shot)"},
    {"tokenize", kvs_cmd_tokenize, "tokenize JSON strings read one per line from stdin"},
    {"inspect", kvs_cmd_inspect, "print a model file's metadata, or why it is refused"},
    {"keygen", kvs_cmd_keygen, "make a CURVE key pair (PREFIX.key, PREFIX.pub) for servers"},
};

void kvs_cli_error(const char *cmd, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "kvstream %s: %s\n", cmd, msg);
}

const char *kvs_cli_default_model(void)
{
    static char path[1024];
    const char *env = getenv("KVSTREAM_MODEL");
    if (env != NULL && env[0] != '\0') {
        snprintf(path, sizeof path, "%s", env);
        return path;
    }
    const char *dir = getenv("KVS_MODEL_DIR");
    const char *home = getenv("HOME");
    if (dir != NULL) {
        snprintf(path, sizeof path, "%s/SmolLM2-135M-Instruct.Q4_1.gguf", dir);
    } else {
        snprintf(path, sizeof path, "%s/.cache/kvstream/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                 home != NULL ? home : "/root");
    }
    return path;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: kvstream <command> [options]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].summary);
    }
    fprintf(f, "\n'kvstream <command> --help' describes a command's options.\n"
               "\nThe client commands (session, append, query, flash) talk to --endpoint EP, else\n"
               "$KVSTREAM_ENDPOINT, else tcp://127.0.0.1:7700 (where 'kvstream up' listens), and\n"
               "print JSON with -o json.\n"
               "\nexit codes:\n"
               "  0  success\n"
               "  1  failure: the worker refused the request (the message names its code),\n"
               "     or a local error\n"
               "  2  bad command line\n"
               "  3  no answer from the endpoint in time (is 'kvstream up' running?)\n"
               "  4  no such session or flash query (NOT_FOUND)\n"
               "  5  the session or flash query already exists (ALREADY_EXISTS)\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("kvstream 0.1.0\n");
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        if (strcmp(argv[1], commands[i].name) == 0) {
            return commands[i].run(argc - 1, argv + 1);
        }
    }
    fprintf(stderr, "kvstream: unknown command '%s' (try 'kvstream --help')\n", argv[1]);
    return 2;
}

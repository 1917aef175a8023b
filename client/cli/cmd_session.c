/* kvstream session create|info|close|list: manage a worker's sessions over libkvstream. */
#include "client/cli/cmd.h"
#include "client/cli/remote.h"

#include <stdio.h>
#include <string.h>

enum { OPT_PREFIX = KVS_CLI_OPT_FIRST_LOCAL, OPT_CELLS, OPT_CHAT, OPT_POLICY };

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvstream session create NAME [--prefix TEXT] [--cells N] [--chat]\n"
            "                                    [--policy reject|slide]\n"
            "       kvstream session info NAME\n"
            "       kvstream session close NAME\n"
            "       kvstream session list\n"
            "\n"
            "Create a session (a named, growing context kept in KV on a worker), show its\n"
            "counters, close it (its KV, log and snapshot are removed), or list them all.\n"
            "\n"
            "  --prefix TEXT           fixed text before the data (instructions, a header)\n"
            "  --cells N               KV budget in cells (default: the worker's context minus\n"
            "                          the query reserve)\n"
            "  --chat                  records are chat turns (format chat) instead of raw text\n"
            "  --policy P              when the budget is full: reject (default) refuses the\n"
            "                          append, slide evicts the oldest data\n" KVS_CLI_REMOTE_HELP
            "\n"
            "-o json prints: create {session, version, cells_used, cells_budget}; info {session,\n"
            "version, appends, prefix_tokens, data_tokens, cells_used, cells_budget,\n"
            "evicted_tokens, flash_queries, format, policy}; close {session, closed}; list\n"
            "{sessions}. Exit codes: see 'kvstream --help'.\n");
}

/* Parse the common options and expect exactly n_pos positional arguments into pos. */
static int parse(struct kvs_cli_remote *r, int argc, char **argv, const char **pos, int n_pos,
                 struct kvs_client_session_opts *so)
{
    static const struct option longopts[] = {
        KVS_CLI_REMOTE_LONGOPTS,
        {"prefix", required_argument, NULL, OPT_PREFIX},
        {"cells", required_argument, NULL, OPT_CELLS},
        {"chat", no_argument, NULL, OPT_CHAT},
        {"policy", required_argument, NULL, OPT_POLICY},
        {NULL, 0, NULL, 0},
    };
    optind = 0;
    opterr = 0;
    int c;
    long v;
    while ((c = getopt_long(argc, argv, ":" KVS_CLI_REMOTE_SHORTOPTS, longopts, NULL)) != -1) {
        int h = kvs_cli_remote_opt(r, c, optarg);
        if (h < 0) {
            return KVS_EXIT_USAGE;
        }
        if (h > 0) {
            continue;
        }
        bool create_opt = c == OPT_PREFIX || c == OPT_CELLS || c == OPT_CHAT || c == OPT_POLICY;
        if (create_opt && so == NULL) {
            kvs_cli_error(r->cmd, "option '%s' is for 'session create' only", argv[optind - 1]);
            return KVS_EXIT_USAGE;
        }
        switch (c) {
        case OPT_PREFIX: so->prefix = optarg; break;
        case OPT_CELLS:
            if (kvs_cli_parse_long(optarg, 1, 1L << 40, &v) < 0) {
                kvs_cli_error(r->cmd, "--cells must be a positive integer, got '%s'", optarg);
                return KVS_EXIT_USAGE;
            }
            so->cells = v;
            break;
        case OPT_CHAT: so->chat = true; break;
        case OPT_POLICY:
            if (strcmp(optarg, "slide") == 0) {
                so->slide = true;
            } else if (strcmp(optarg, "reject") == 0) {
                so->slide = false;
            } else {
                kvs_cli_error(r->cmd, "--policy must be reject or slide, got '%s'", optarg);
                return KVS_EXIT_USAGE;
            }
            break;
        case 'h': usage(stdout); return -1;
        default: return kvs_cli_bad_option(r, c, argv);
        }
    }
    if (argc - optind != n_pos) {
        kvs_cli_error(r->cmd, n_pos == 0 ? "takes no arguments (try --help)"
                                         : "needs a session NAME (try --help)");
        return KVS_EXIT_USAGE;
    }
    for (int i = 0; i < n_pos; i++) {
        pos[i] = argv[optind + i];
    }
    return KVS_EXIT_OK;
}

static void print_info(const struct kvs_cli_remote *r, const char *name,
                       const struct kvs_client_session_info *in)
{
    if (!r->json) {
        printf("session         %s\n"
               "version         %llu\n"
               "appends         %llu\n"
               "prefix_tokens   %lld\n"
               "data_tokens     %lld\n"
               "cells_used      %lld\n"
               "cells_budget    %lld\n"
               "evicted_tokens  %lld\n"
               "flash_queries   %d\n"
               "format          %s\n"
               "policy          %s\n",
               name, (unsigned long long)in->version, (unsigned long long)in->appends,
               (long long)in->prefix_tokens, (long long)in->data_tokens,
               (long long)in->cells_used, (long long)in->cells_budget,
               (long long)in->evicted_tokens, in->flash_queries, in->format, in->policy);
        return;
    }
    json_t *o = json_object();
    json_object_set_new(o, "session", json_string(name));
    json_object_set_new(o, "version", json_integer((json_int_t)in->version));
    json_object_set_new(o, "appends", json_integer((json_int_t)in->appends));
    json_object_set_new(o, "prefix_tokens", json_integer(in->prefix_tokens));
    json_object_set_new(o, "data_tokens", json_integer(in->data_tokens));
    json_object_set_new(o, "cells_used", json_integer(in->cells_used));
    json_object_set_new(o, "cells_budget", json_integer(in->cells_budget));
    json_object_set_new(o, "evicted_tokens", json_integer(in->evicted_tokens));
    json_object_set_new(o, "flash_queries", json_integer(in->flash_queries));
    json_object_set_new(o, "format", json_string(in->format));
    json_object_set_new(o, "policy", json_string(in->policy));
    kvs_cli_print_json(o);
}

int kvs_cmd_session(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? KVS_EXIT_USAGE : KVS_EXIT_OK;
    }
    const char *sub = argv[1];
    char cmd[32];
    snprintf(cmd, sizeof cmd, "session %s", sub);
    struct kvs_cli_remote r;
    kvs_cli_remote_init(&r, cmd);
    struct kvs_client_session_opts so = {0};
    const char *name = NULL;
    bool create = strcmp(sub, "create") == 0, list = strcmp(sub, "list") == 0;
    if (!create && !list && strcmp(sub, "info") != 0 && strcmp(sub, "close") != 0) {
        kvs_cli_error("session", "unknown subcommand '%s' (create, info, close, list)", sub);
        return KVS_EXIT_USAGE;
    }
    int rc = parse(&r, argc - 1, argv + 1, &name, list ? 0 : 1, create ? &so : NULL);
    if (rc != KVS_EXIT_OK) {
        return rc < 0 ? KVS_EXIT_OK : rc;
    }
    kvs_client *c = NULL;
    rc = kvs_cli_connect(&r, &c);
    if (rc != KVS_EXIT_OK) {
        return rc;
    }
    int st;
    struct kvs_client_session_info in;
    if (create) {
        st = kvs_client_session_create(c, name, &so, &in);
        if (st == 0 && r.json) {
            json_t *o = json_object();
            json_object_set_new(o, "session", json_string(name));
            json_object_set_new(o, "version", json_integer((json_int_t)in.version));
            json_object_set_new(o, "cells_used", json_integer(in.cells_used));
            json_object_set_new(o, "cells_budget", json_integer(in.cells_budget));
            kvs_cli_print_json(o);
        } else if (st == 0) {
            printf("created %s (%lld cells used of %lld)\n", name, (long long)in.cells_used,
                   (long long)in.cells_budget);
        }
    } else if (list) {
        char **names = NULL;
        int32_t n = 0;
        st = kvs_client_session_list(c, &names, &n);
        if (st == 0 && r.json) {
            json_t *a = json_array();
            for (int32_t i = 0; i < n; i++) {
                json_array_append_new(a, json_string(names[i]));
            }
            json_t *o = json_object();
            json_object_set_new(o, "sessions", a);
            kvs_cli_print_json(o);
        } else if (st == 0) {
            for (int32_t i = 0; i < n; i++) {
                printf("%s\n", names[i]);
            }
        }
        kvs_client_names_free(&names, n);
    } else if (strcmp(sub, "info") == 0) {
        st = kvs_client_session_info(c, name, &in);
        if (st == 0) {
            print_info(&r, name, &in);
        }
    } else {
        st = kvs_client_session_close(c, name);
        if (st == 0 && r.json) {
            json_t *o = json_object();
            json_object_set_new(o, "session", json_string(name));
            json_object_set_new(o, "closed", json_true());
            kvs_cli_print_json(o);
        } else if (st == 0) {
            printf("closed %s\n", name);
        }
    }
    rc = st < 0 ? kvs_cli_fail(&r, c, st) : KVS_EXIT_OK;
    kvs_client_destroy(&c);
    return rc;
}

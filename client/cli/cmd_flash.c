/* kvstream flash register|get|unregister|list|watch: standing questions that a worker keeps
 * answered as a session's data arrives. */
#include "client/cli/cmd.h"
#include "client/cli/remote.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>

enum {
    OPT_EVERY = KVS_CLI_OPT_FIRST_LOCAL,
    OPT_INTERVAL,
    OPT_STALE,
    OPT_NAME,
    OPT_AFTER,
    OPT_COUNT,
};

static kvs_client *g_client; /* for SIGINT / SIGTERM: stop a watch */

static void on_stop_signal(int sig)
{
    (void)sig;
    if (g_client != NULL) {
        kvs_client_cancel(g_client); /* an atomic store: async-signal-safe */
    }
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvstream flash register NAME QNAME QUESTION [--every-tokens N]\n"
            "                               [--min-interval-ms T] [sampling options]\n"
            "       kvstream flash get NAME QNAME [--allow-stale]\n"
            "       kvstream flash unregister NAME QNAME\n"
            "       kvstream flash list NAME\n"
            "       kvstream flash watch NAME [--name QNAME] [--after-version V] [--count N]\n"
            "\n"
            "A flash query is a standing QUESTION on session NAME, answered at once and again\n"
            "as data arrives, so that 'flash get' usually returns a fresh answer without\n"
            "computing. 'watch' prints each new answer as the worker pushes it, until Ctrl-C\n"
            "(or N answers); it resumes by itself after a reconnect.\n"
            "\n"
            "      --every-tokens N    re-answer after N new tokens (default 0: every append)\n"
            "      --min-interval-ms T at most one re-answer per T ms (default 0: no limit)\n"
            "      --allow-stale       get: return the last answer even if data arrived since\n"
            "                          (otherwise the worker brings it up to date first)\n"
            "      --name QNAME        watch: only this flash query\n"
            "      --after-version V   watch: first replay the latest answers newer than\n"
            "                          version V (0 = every current answer)\n"
            "      --count N           watch: exit after N answers\n" KVS_CLI_SAMPLING_HELP
                KVS_CLI_REMOTE_HELP
            "\n"
            "-o json prints: get and each watched answer {name, answer, token_ids, version,\n"
            "context_tokens, question_tokens, ttft_ms, total_ms, fresh}; list {session,\n"
            "names}; register {session, name, registered}; unregister {session, name,\n"
            "unregistered}. Exit codes: see 'kvstream --help'.\n");
}

struct watch_state {
    bool json;
    long count;          /* answers to print before stopping; 0 = no limit */
    long seen;
};

static bool on_answer(const struct kvs_client_answer *a, void *user)
{
    struct watch_state *w = user;
    if (w->json) {
        kvs_cli_print_json(kvs_cli_answer_json(a, true));
    } else {
        printf("%s\tversion %llu\t%s%s\n", a->name, (unsigned long long)a->version, a->text,
               a->fresh ? "" : "\t(stale)");
        fflush(stdout);
    }
    w->seen++;
    return w->count == 0 || w->seen < w->count;
}

static void print_done(const struct kvs_cli_remote *r, const char *session, const char *qname,
                       const char *key, const char *verb)
{
    if (r->json) {
        json_t *o = json_object();
        json_object_set_new(o, "session", json_string(session));
        json_object_set_new(o, "name", json_string(qname));
        json_object_set_new(o, key, json_true());
        kvs_cli_print_json(o);
    } else {
        printf("%s %s/%s\n", verb, session, qname);
    }
}

int kvs_cmd_flash(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? KVS_EXIT_USAGE : KVS_EXIT_OK;
    }
    const char *sub = argv[1];
    static const char *const subs[] = {"register", "get", "unregister", "list", "watch"};
    static const int n_pos[] = {3, 2, 2, 1, 1};
    int which = -1;
    for (int i = 0; i < 5; i++) {
        if (strcmp(sub, subs[i]) == 0) {
            which = i;
        }
    }
    if (which < 0) {
        kvs_cli_error("flash", "unknown subcommand '%s' (register, get, unregister, list, watch)",
                      sub);
        return KVS_EXIT_USAGE;
    }
    char cmd[32];
    snprintf(cmd, sizeof cmd, "flash %s", sub);
    static const struct option longopts[] = {
        KVS_CLI_REMOTE_LONGOPTS,
        KVS_CLI_SAMPLING_LONGOPTS,
        {"every-tokens", required_argument, NULL, OPT_EVERY},
        {"min-interval-ms", required_argument, NULL, OPT_INTERVAL},
        {"allow-stale", no_argument, NULL, OPT_STALE},
        {"name", required_argument, NULL, OPT_NAME},
        {"after-version", required_argument, NULL, OPT_AFTER},
        {"count", required_argument, NULL, OPT_COUNT},
        {NULL, 0, NULL, 0},
    };
    struct kvs_cli_remote r;
    kvs_cli_remote_init(&r, cmd);
    struct kvs_client_flash_opts fo = {0};
    struct kvs_cli_sampling s;
    kvs_cli_sampling_init(&s);
    bool allow_stale = false;
    const char *only = NULL;
    int64_t after = KVS_CLIENT_WATCH_NEW;
    struct watch_state w = {0};
    argc--;
    argv++;
    optind = 0;
    opterr = 0;
    int c;
    long v;
    uint64_t u;
    while ((c = getopt_long(argc, argv, ":" KVS_CLI_REMOTE_SHORTOPTS KVS_CLI_SAMPLING_SHORTOPTS,
                            longopts, NULL)) != -1) {
        int h = kvs_cli_remote_opt(&r, c, optarg);
        if (h == 0 && which == 0) {
            h = kvs_cli_sampling_opt(&s, cmd, c, optarg);
        }
        if (h < 0) {
            return KVS_EXIT_USAGE;
        }
        if (h > 0) {
            continue;
        }
        bool ok = c == 'h' || c == '?' || c == ':' ||
                  (which == 0 && (c == OPT_EVERY || c == OPT_INTERVAL)) ||
                  (which == 1 && c == OPT_STALE) ||
                  (which == 4 && (c == OPT_NAME || c == OPT_AFTER || c == OPT_COUNT));
        if (!ok) {
            kvs_cli_error(cmd, "option '%s' does not apply to 'flash %s' (try --help)",
                          argv[optind - 1], sub);
            return KVS_EXIT_USAGE;
        }
        switch (c) {
        case OPT_EVERY:
            if (kvs_cli_parse_long(optarg, 0, 1L << 30, &v) < 0) {
                kvs_cli_error(cmd, "--every-tokens must be an integer >= 0, got '%s'", optarg);
                return KVS_EXIT_USAGE;
            }
            fo.every_tokens = (int32_t)v;
            break;
        case OPT_INTERVAL:
            if (kvs_cli_parse_long(optarg, 0, 1L << 30, &v) < 0) {
                kvs_cli_error(cmd, "--min-interval-ms must be an integer >= 0, got '%s'",
                              optarg);
                return KVS_EXIT_USAGE;
            }
            fo.min_interval_ms = (int32_t)v;
            break;
        case OPT_STALE: allow_stale = true; break;
        case OPT_NAME: only = optarg; break;
        case OPT_AFTER:
            if (kvs_cli_parse_u64(optarg, &u) < 0 || u > (uint64_t)INT64_MAX) {
                kvs_cli_error(cmd, "--after-version must be a non-negative integer, got '%s'",
                              optarg);
                return KVS_EXIT_USAGE;
            }
            after = (int64_t)u;
            break;
        case OPT_COUNT:
            if (kvs_cli_parse_long(optarg, 1, 1L << 30, &w.count) < 0) {
                kvs_cli_error(cmd, "--count must be a positive integer, got '%s'", optarg);
                return KVS_EXIT_USAGE;
            }
            break;
        case 'h': usage(stdout); return KVS_EXIT_OK;
        default: return kvs_cli_bad_option(&r, c, argv);
        }
    }
    if (argc - optind != n_pos[which]) {
        kvs_cli_error(cmd, "expects %d argument%s (try --help)", n_pos[which],
                      n_pos[which] == 1 ? "" : "s");
        return KVS_EXIT_USAGE;
    }
    const char *session = argv[optind];
    const char *qname = n_pos[which] >= 2 ? argv[optind + 1] : NULL;
    kvs_client *cl = NULL;
    int rc = kvs_cli_connect(&r, &cl);
    if (rc != KVS_EXIT_OK) {
        return rc;
    }
    int st = 0;
    switch (which) {
    case 0:
        fo.query = s.q;
        st = kvs_client_flash_register(cl, session, qname, argv[optind + 2], &fo);
        if (st == 0) {
            print_done(&r, session, qname, "registered", "registered");
        }
        break;
    case 1: {
        struct kvs_client_answer a = {0};
        st = kvs_client_flash_get(cl, session, qname, allow_stale, &a);
        if (st == 0 && r.json) {
            kvs_cli_print_json(kvs_cli_answer_json(&a, true));
        } else if (st == 0) {
            printf("%s\n", a.text);
            fprintf(stderr, "kvstream flash get: %s, version %llu, %lld context tokens, "
                            "computed in %.1f ms\n",
                    a.fresh ? "fresh" : "stale", (unsigned long long)a.version,
                    (long long)a.context_tokens, a.total_ms);
        }
        kvs_client_answer_free(&a);
        break;
    }
    case 2:
        st = kvs_client_flash_unregister(cl, session, qname);
        if (st == 0) {
            print_done(&r, session, qname, "unregistered", "unregistered");
        }
        break;
    case 3: {
        char **names = NULL;
        int32_t n = 0;
        st = kvs_client_flash_list(cl, session, &names, &n);
        if (st == 0 && r.json) {
            json_t *a = json_array();
            for (int32_t i = 0; i < n; i++) {
                json_array_append_new(a, json_string(names[i]));
            }
            json_t *o = json_object();
            json_object_set_new(o, "session", json_string(session));
            json_object_set_new(o, "names", a);
            kvs_cli_print_json(o);
        } else if (st == 0) {
            for (int32_t i = 0; i < n; i++) {
                printf("%s\n", names[i]);
            }
        }
        kvs_client_names_free(&names, n);
        break;
    }
    default: {
        w.json = r.json;
        g_client = cl;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_stop_signal;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGTERM, &sa, NULL);
        st = kvs_client_flash_watch(cl, session, only, after, on_answer, &w);
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        g_client = NULL;
        break;
    }
    }
    rc = st < 0 ? kvs_cli_fail(&r, cl, st) : KVS_EXIT_OK;
    kvs_client_destroy(&cl);
    return rc;
}

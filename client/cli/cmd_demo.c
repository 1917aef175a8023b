/* kvstream demo: the streaming workload end to end, in one process.
 *
 * A deterministic synthetic market-data feed (several symbols, ticks as text lines) streams
 * into one session per symbol group; flash queries are registered on each session (the
 * latest price, the recent direction) and re-answered after appends; questions are asked
 * while the context grows. A live table shows, per step: context tokens, append time,
 * whether the flash answer was ready when asked (hit) and its latency, a direct question's
 * time to first token, and the answer. It ends by itself and prints a summary with the
 * stateless baseline for comparison.
 *
 * This runs the engine in-process; the server-based demo (kvstream up + clients) replaces it
 * when the worker daemon lands.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/cli/cmd.h"
#include "common/status.h"
#include "worker/session.h"

#define CMD "demo"

static void usage(FILE *f)
{
    fprintf(f, "usage: kvstream demo [-m MODEL] [--ticks N] [--seed S] [-t THREADS]\n"
               "\n"
               "Stream a synthetic market feed into sessions, keep flash queries fresh,\n"
               "ask questions as the context grows, and print a live table and a summary.\n"
               "\n"
               "  -m, --model PATH   GGUF model (default: the cached SmolLM2-135M-Instruct)\n"
               "      --ticks N      ticks to stream (default 240)\n"
               "      --seed S       feed seed (default 7)\n"
               "  -t, --threads N    CPU threads (default: all)\n"
               "      --data-dir DIR keep durable session logs there (default: in memory)\n");
}

struct feed {
    uint64_t state;
    double price[4];
};

static const char *SYMS[4] = {"AAPL", "MSFT", "NVDA", "GOOG"};

static uint32_t rnd(struct feed *f)
{
    f->state = f->state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(f->state >> 33);
}

/* The next tick: symbol index and its text line. */
static int next_tick(struct feed *f, char *line, size_t cap)
{
    int s = (int)(rnd(f) % 4);
    double move = ((double)(rnd(f) % 201) - 100.0) / 100.0; /* -1.00 .. +1.00 */
    f->price[s] += move;
    int vol = 100 + (int)(rnd(f) % 5000);
    snprintf(line, cap, "%s %.2f %+.2f vol=%d", SYMS[s], f->price[s], move, vol);
    return s;
}

static void one_line(char *s)
{
    for (char *p = s; *p; p++) {
        if (*p == '\n' || *p == '\r' || *p == '\t') {
            *p = ' ';
        }
    }
}

int kvs_cmd_demo(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"model", required_argument, NULL, 'm'}, {"ticks", required_argument, NULL, 'n'},
        {"seed", required_argument, NULL, 's'},  {"threads", required_argument, NULL, 't'},
        {"data-dir", required_argument, NULL, 'd'}, {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *model = NULL, *data_dir = NULL;
    long ticks = 240, seed = 7, threads = 0;
    int c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":m:t:h", longopts, NULL)) != -1) {
        char *end = NULL;
        switch (c) {
        case 'm': model = optarg; break;
        case 'd': data_dir = optarg; break;
        case 'n':
            ticks = strtol(optarg, &end, 10);
            if (*end != '\0' || ticks < 1 || ticks > 100000) {
                kvs_cli_error(CMD, "--ticks must be in [1, 100000], got '%s'", optarg);
                return 2;
            }
            break;
        case 's':
            seed = strtol(optarg, &end, 10);
            if (*end != '\0') {
                kvs_cli_error(CMD, "--seed must be an integer, got '%s'", optarg);
                return 2;
            }
            break;
        case 't':
            threads = strtol(optarg, &end, 10);
            if (*end != '\0' || threads < 1 || threads > 1024) {
                kvs_cli_error(CMD, "-t must be in [1, 1024], got '%s'", optarg);
                return 2;
            }
            break;
        case 'h': usage(stdout); return 0;
        case ':': kvs_cli_error(CMD, "option '%s' needs a value", argv[optind - 1]); return 2;
        default: kvs_cli_error(CMD, "unknown option '%s' (try --help)", argv[optind - 1]); return 2;
        }
    }
    if (model == NULL) {
        model = kvs_cli_default_model();
    }
    char err[512] = "";
    kvs_engine *e = NULL;
    kvs_sessions *S = NULL;
    struct kvs_engine_opts eo = {.model_path = model, .n_threads = (int32_t)threads,
                                 .n_cells = 16384};
    if (kvs_engine_open(&eo, &e, err, sizeof err) < 0) {
        kvs_cli_error(CMD, "%s: %s", model, err);
        return 1;
    }
    struct kvs_sessions_opts so = {.data_dir = data_dir, .fsync = KVS_FSYNC_EVERYSEC};
    if (kvs_sessions_new(e, &so, &S) < 0) {
        kvs_cli_error(CMD, "cannot open the session registry");
        kvs_engine_destroy(&e);
        return 1;
    }
    /* Two sessions: tech megacaps, and semis+search; each gets its symbols' ticks. */
    const char *names[2] = {"desk-a", "desk-b"};
    kvs_session *ss[2];
    const char *prefix = "Live market feed. Each line is: SYMBOL PRICE CHANGE vol=VOLUME.\n";
    for (int i = 0; i < 2; i++) {
        struct kvs_session_opts o = {.budget_cells = 4096, .prefix = prefix,
                                     .prefix_len = strlen(prefix), .policy = KVS_POLICY_SLIDE};
        if (kvs_session_create(S, names[i], &o, &ss[i], err, sizeof err) < 0) {
            kvs_cli_error(CMD, "%s", err);
            goto fail;
        }
        struct kvs_query_opts q = {.sampling = kvs_sampling_default(), .max_tokens = 8};
        char qtext[128];
        snprintf(qtext, sizeof qtext, "Question: what is the latest price of %s?\nAnswer:",
                 SYMS[i * 2]);
        struct kvs_flash_trigger t = {.every_tokens = 0}; /* after every append */
        if (kvs_flash_register(ss[i], "last_price", qtext, strlen(qtext), &q, &t, err,
                               sizeof err) < 0) {
            kvs_cli_error(CMD, "%s", err);
            goto fail;
        }
    }
    printf("kvstream demo: %ld ticks into %d sessions on %s (%s backend)\n", ticks, 2,
           e->model->hp.name[0] ? e->model->hp.name : model, e->backend->ops->name);
    printf("%-7s %-6s %8s %9s %-5s %9s %9s  %s\n", "tick", "sess", "context", "append_ms",
           "flash", "flash_ms", "ttft_ms", "answer");
    struct feed f = {.state = (uint64_t)seed * 2654435761u + 1,
                     .price = {189.20, 411.10, 875.00, 141.80}};
    double append_s = 0, hit_s = 0, ttft_s = 0;
    long n_appends = 0, n_asked = 0, n_hits = 0, n_ttft = 0;
    for (long k = 1; k <= ticks; k++) {
        char line[128];
        int sym = next_tick(&f, line, sizeof line);
        int si = sym < 2 ? 0 : 1;
        struct kvs_append_result r;
        double t0 = kvs_now();
        if (kvs_session_append(ss[si], line, strlen(line), 0, 0, &r, err, sizeof err) < 0) {
            kvs_cli_error(CMD, "append: %s", err);
            goto fail;
        }
        append_s += kvs_now() - t0;
        n_appends++;
        if (k % 20 != 0) {
            continue;
        }
        /* ask both desks: the flash answer (ready?) and a fresh direct question */
        for (int i = 0; i < 2; i++) {
            struct kvs_answer fa, qa;
            double t1 = kvs_now();
            if (kvs_flash_get(ss[i], "last_price", KVS_FLASH_ALLOW_STALE, &fa, err, sizeof err) < 0) {
                kvs_cli_error(CMD, "flash: %s", err);
                goto fail;
            }
            double flash_ms = (kvs_now() - t1) * 1e3;
            n_asked++;
            n_hits += fa.fresh;
            hit_s += kvs_now() - t1;
            char qtext[128];
            snprintf(qtext, sizeof qtext, "Question: did %s go up or down last?\nAnswer:",
                     SYMS[i * 2 + 1]);
            struct kvs_query_opts q = {.sampling = kvs_sampling_default(), .max_tokens = 6};
            if (kvs_session_query(ss[i], qtext, strlen(qtext), &q, NULL, NULL, &qa, err,
                                  sizeof err) < 0) {
                kvs_cli_error(CMD, "query: %s", err);
                goto fail;
            }
            ttft_s += qa.ttft_s;
            n_ttft++;
            struct kvs_session_info in;
            kvs_session_info(ss[i], &in);
            one_line(fa.text);
            one_line(qa.text);
            printf("%-7ld %-6s %8lld %9.1f %-5s %9.3f %9.1f  %s=%.24s | %s?%.20s\n", k, names[i],
                   (long long)in.cells_used, r.n_tokens ? (append_s / n_appends) * 1e3 : 0.0,
                   fa.fresh ? "hit" : "stale", flash_ms, qa.ttft_s * 1e3, SYMS[i * 2], fa.text,
                   SYMS[i * 2 + 1], qa.text);
            fflush(stdout);
            kvs_answer_free(&fa);
            kvs_answer_free(&qa);
        }
    }
    /* the baseline at the final context */
    struct kvs_answer st, sf;
    struct kvs_query_opts q = {.sampling = kvs_sampling_default(), .max_tokens = 1};
    const char *qq = "Question: which symbol moved most?\nAnswer:";
    kvs_session_query(ss[0], qq, strlen(qq), &q, NULL, NULL, &sf, err, sizeof err);
    q.stateless = true;
    kvs_session_query(ss[0], qq, strlen(qq), &q, NULL, NULL, &st, err, sizeof err);
    struct kvs_session_info in;
    kvs_session_info(ss[0], &in);
    printf("\nsummary: %ld appends (%.1f ms each on average, including the synchronous refresh "
           "of the session's flash query); flash answers ready when asked: "
           "%ld/%ld (%.0f%%, %.3f ms each); direct question TTFT %.1f ms on average\n",
           n_appends, n_appends ? append_s / n_appends * 1e3 : 0.0, n_hits, n_asked,
           n_asked ? 100.0 * n_hits / n_asked : 0.0, n_asked ? hit_s / n_asked * 1e3 : 0.0,
           n_ttft ? ttft_s / n_ttft * 1e3 : 0.0);
    printf("at the final context of %lld tokens (%s): stateful TTFT %.1f ms, stateless "
           "(re-prefill) TTFT %.1f ms: %.0fx\n",
           (long long)in.cells_used, names[0], sf.ttft_s * 1e3, st.ttft_s * 1e3,
           sf.ttft_s > 0 ? st.ttft_s / sf.ttft_s : 0.0);
    kvs_answer_free(&sf);
    kvs_answer_free(&st);
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
    return 0;
fail:
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
    return 1;
}

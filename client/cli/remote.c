/* Common options, connection, errors and JSON output of the client subcommands. */
#include "client/cli/remote.h"

#include "client/cli/cmd.h"
#include "common/curve.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_TIMEOUT_MS 60000
#define CONNECT_TIMEOUT_MS 5000

void kvs_cli_remote_init(struct kvs_cli_remote *r, const char *cmd)
{
    memset(r, 0, sizeof *r);
    r->cmd = cmd;
    r->timeout_ms = DEFAULT_TIMEOUT_MS;
    const char *env = getenv("KVSTREAM_ENDPOINT");
    r->endpoint = env != NULL && env[0] != '\0' ? env : KVS_CLIENT_DEFAULT_ENDPOINT;
    env = getenv("KVSTREAM_SERVER_KEY");
    r->server_key = env != NULL && env[0] != '\0' ? env : NULL;
}

int kvs_cli_parse_long(const char *s, long lo, long hi, long *out)
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

int kvs_cli_parse_u64(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    if (s[0] == '-' || s[0] == '\0') {
        return -1;
    }
    unsigned long long v = strtoull(s, &end, 0);
    if (errno != 0 || end == s || *end != '\0') {
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

int kvs_cli_parse_float(const char *s, float *out)
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

int kvs_cli_remote_opt(struct kvs_cli_remote *r, int opt, const char *arg)
{
    long v;
    switch (opt) {
    case 'e':
        if (arg[0] == '\0') {
            kvs_cli_error(r->cmd, "--endpoint must not be empty");
            return -1;
        }
        r->endpoint = arg;
        return 1;
    case 'o':
        if (strcmp(arg, "json") == 0) {
            r->json = true;
        } else if (strcmp(arg, "text") == 0) {
            r->json = false;
        } else {
            kvs_cli_error(r->cmd, "-o must be text or json, got '%s'", arg);
            return -1;
        }
        return 1;
    case KVS_CLI_OPT_TIMEOUT:
        if (kvs_cli_parse_long(arg, 1, 3600000, &v) < 0) {
            kvs_cli_error(r->cmd, "--timeout must be milliseconds in [1, 3600000], got '%s'",
                          arg);
            return -1;
        }
        r->timeout_ms = (int32_t)v;
        return 1;
    case KVS_CLI_OPT_SERVER_KEY:
        r->server_key = arg;
        return 1;
    default:
        return 0;
    }
}

int kvs_cli_bad_option(const struct kvs_cli_remote *r, int opt, char **argv)
{
    if (opt == ':') {
        kvs_cli_error(r->cmd, "option '%s' needs a value", argv[optind - 1]);
    } else {
        kvs_cli_error(r->cmd, "unknown option '%s' (try --help)", argv[optind - 1]);
    }
    return KVS_EXIT_USAGE;
}

int kvs_cli_exit_code(int status)
{
    switch (status) {
    case KVS_OK: return KVS_EXIT_OK;
    case KVS_TIMEOUT: return KVS_EXIT_UNREACHABLE;
    case KVS_NOT_FOUND: return KVS_EXIT_NOT_FOUND;
    case KVS_ALREADY_EXISTS: return KVS_EXIT_EXISTS;
    default: return KVS_EXIT_FAILED;
    }
}

int kvs_cli_connect(const struct kvs_cli_remote *r, kvs_client **c)
{
    struct kvs_client_opts o = {
        .timeout_ms = r->timeout_ms,
        .connect_timeout_ms = r->timeout_ms < CONNECT_TIMEOUT_MS ? r->timeout_ms
                                                                 : CONNECT_TIMEOUT_MS,
        .client_id = r->client_id,
        .name = "kvstream-cli",
    };
    char err[512] = "", server_key[KVS_CURVE_KEY_Z85 + 1];
    if (r->server_key != NULL) {
        int krc = kvs_curve_key_load(r->server_key, server_key, err, sizeof err);
        if (krc < 0) {
            kvs_cli_error(r->cmd, "--server-key: %s", err);
            return krc == KVS_UNSUPPORTED ? kvs_cli_exit_code(krc) : KVS_EXIT_USAGE;
        }
        o.curve_server_key = server_key;
    }
    int rc = kvs_client_connect(r->endpoint, &o, c, err, sizeof err);
    if (rc == KVS_TIMEOUT && r->server_key != NULL) { /* a CURVE mismatch is silence too */
        kvs_cli_error(r->cmd, "%s (or the server does not have the key given by --server-key "
                              "or $KVSTREAM_SERVER_KEY)", err);
    } else if (rc == KVS_TIMEOUT) {
        kvs_cli_error(r->cmd, "%s (start one with 'kvstream up', or set --endpoint)", err);
    } else if (rc < 0) {
        kvs_cli_error(r->cmd, "%s", err);
    }
    return rc < 0 ? (rc == KVS_INVALID_ARGUMENT ? KVS_EXIT_USAGE : kvs_cli_exit_code(rc))
                  : KVS_EXIT_OK;
}

int kvs_cli_fail(const struct kvs_cli_remote *r, kvs_client *c, int status)
{
    const char *msg = c != NULL ? kvs_client_error(c) : "";
    if (msg[0] != '\0') {
        kvs_cli_error(r->cmd, "%s", msg);
    } else {
        kvs_cli_error(r->cmd, "%s: %s", kvs_status_name(status), kvs_status_message(status));
    }
    return kvs_cli_exit_code(status);
}

void kvs_cli_print_json(json_t *o)
{
    char *s = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII);
    if (s != NULL) {
        printf("%s\n", s);
        fflush(stdout);
        free(s);
    }
    json_decref(o);
}

json_t *kvs_cli_answer_json(const struct kvs_client_answer *a, bool flash)
{
    json_t *o = json_object();
    json_t *ids = json_array();
    for (int32_t i = 0; i < a->n_tokens; i++) {
        json_array_append_new(ids, json_integer(a->tokens[i]));
    }
    if (flash) {
        json_object_set_new(o, "name", json_string(a->name));
    }
    json_object_set_new(o, "answer", json_stringn(a->text, a->len));
    json_object_set_new(o, "token_ids", ids);
    json_object_set_new(o, "version", json_integer((json_int_t)a->version));
    json_object_set_new(o, "context_tokens", json_integer(a->context_tokens));
    json_object_set_new(o, "question_tokens", json_integer(a->question_tokens));
    json_object_set_new(o, "ttft_ms", json_real(a->ttft_ms));
    json_object_set_new(o, "total_ms", json_real(a->total_ms));
    if (flash) {
        json_object_set_new(o, "fresh", json_boolean(a->fresh));
    }
    return o;
}

/* ---- sampling ------------------------------------------------------------------------------ */

void kvs_cli_sampling_init(struct kvs_cli_sampling *s)
{
    memset(s, 0, sizeof *s);
    s->q.max_tokens = 64;
    s->q.top_k = 40;
    s->q.top_p = 0.95f;
    s->q.min_p = 0.05f;
    s->q.repeat_penalty = 1.0f;
    s->q.stops = s->stops;
}

int kvs_cli_sampling_opt(struct kvs_cli_sampling *s, const char *cmd, int opt, const char *arg)
{
    long v;
    uint64_t u;
    float f;
    switch (opt) {
    case 'n':
        if (kvs_cli_parse_long(arg, 1, 4096, &v) < 0) {
            kvs_cli_error(cmd, "--max-tokens must be an integer in [1, 4096], got '%s'", arg);
            return -1;
        }
        s->q.max_tokens = (int32_t)v;
        return 1;
    case KVS_CLI_OPT_TEMP:
        if (kvs_cli_parse_float(arg, &f) < 0 || f < 0) {
            kvs_cli_error(cmd, "--temp must be a number >= 0, got '%s'", arg);
            return -1;
        }
        s->q.temperature = f;
        return 1;
    case KVS_CLI_OPT_TOPK:
        if (kvs_cli_parse_long(arg, 0, 1000000000L, &v) < 0) {
            kvs_cli_error(cmd, "--top-k must be an integer >= 0, got '%s'", arg);
            return -1;
        }
        s->q.top_k = (int32_t)v;
        return 1;
    case KVS_CLI_OPT_TOPP:
        if (kvs_cli_parse_float(arg, &f) < 0 || f <= 0 || f > 1) {
            kvs_cli_error(cmd, "--top-p must be a number in (0, 1], got '%s'", arg);
            return -1;
        }
        s->q.top_p = f;
        return 1;
    case KVS_CLI_OPT_MINP:
        if (kvs_cli_parse_float(arg, &f) < 0 || f < 0 || f >= 1) {
            kvs_cli_error(cmd, "--min-p must be a number in [0, 1), got '%s'", arg);
            return -1;
        }
        s->q.min_p = f;
        return 1;
    case KVS_CLI_OPT_RP:
        if (kvs_cli_parse_float(arg, &f) < 0 || f <= 0) {
            kvs_cli_error(cmd, "--repeat-penalty must be a number > 0, got '%s'", arg);
            return -1;
        }
        s->q.repeat_penalty = f;
        return 1;
    case KVS_CLI_OPT_SEED:
        if (kvs_cli_parse_u64(arg, &u) < 0) {
            kvs_cli_error(cmd, "--seed must be a non-negative integer, got '%s'", arg);
            return -1;
        }
        s->q.seed = u;
        return 1;
    case KVS_CLI_OPT_STOP:
        if (s->q.n_stops == 8) {
            kvs_cli_error(cmd, "at most 8 --stop strings");
            return -1;
        }
        if (arg[0] == '\0' || strlen(arg) > 64) {
            kvs_cli_error(cmd, "a --stop string must be 1..64 bytes");
            return -1;
        }
        s->stops[s->q.n_stops++] = arg;
        return 1;
    default:
        return 0;
    }
}

#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_level = -1; /* -1 = not read from the environment yet */

static int level_from_env(void)
{
    const char *s = getenv("KVS_LOG_LEVEL");
    if (s == NULL) {
        return KVS_LOG_WARN;
    }
    if (strcmp(s, "error") == 0) {
        return KVS_LOG_ERROR;
    }
    if (strcmp(s, "info") == 0) {
        return KVS_LOG_INFO;
    }
    if (strcmp(s, "debug") == 0) {
        return KVS_LOG_DEBUG;
    }
    return KVS_LOG_WARN;
}

void kvs_log_set_level(enum kvs_log_level level)
{
    g_level = (int)level;
}

enum kvs_log_level kvs_log_get_level(void)
{
    if (g_level < 0) {
        g_level = level_from_env();
    }
    return (enum kvs_log_level)g_level;
}

void kvs_log(enum kvs_log_level level, const char *fmt, ...)
{
    static const char *names[] = {"error", "warn", "info", "debug"};
    if ((int)level > (int)kvs_log_get_level()) {
        return;
    }
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "kvstream %s: %s\n", names[level], line);
}

#include "testutil.h"

#include <stdio.h>
#include <stdlib.h>

#ifndef KVS_SOURCE_DIR
#define KVS_SOURCE_DIR "."
#endif

const char *kvs_test_source_dir(void)
{
    const char *s = getenv("KVS_SOURCE_DIR");
    return s != NULL ? s : KVS_SOURCE_DIR;
}

static const char *cache_dir(const char *env, const char *sub, char *buf, size_t n)
{
    const char *d = getenv(env);
    if (d != NULL) {
        snprintf(buf, n, "%s", d);
    } else {
        const char *home = getenv("HOME");
        snprintf(buf, n, "%s/.cache/kvstream/%s", home != NULL ? home : "/root", sub);
    }
    return buf;
}

const char *kvs_test_default_model(void)
{
    static char dir[512], path[600];
    cache_dir("KVS_MODEL_DIR", "models", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/SmolLM2-135M-Instruct.Q4_1.gguf", dir);
    return path;
}

const char *kvs_test_vocab(const char *name)
{
    static char dir[512], path[600];
    cache_dir("KVS_VOCAB_DIR", "vocab", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/ggml-vocab-%s.gguf", dir, name);
    return path;
}

char *kvs_test_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return NULL;
    }
    if (fseek(f, 0, SEEK_END) != 0) {
        fclose(f);
        return NULL;
    }
    long sz = ftell(f);
    if (sz < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return NULL;
    }
    char *buf = malloc((size_t)sz + 1);
    if (buf == NULL || fread(buf, 1, (size_t)sz, f) != (size_t)sz) {
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    buf[sz] = '\0';
    if (len != NULL) {
        *len = (size_t)sz;
    }
    return buf;
}

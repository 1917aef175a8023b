/* libFuzzer target for the GGUF reader: open arbitrary bytes, then touch everything a loader
 * would (every metadata value and array element, hyperparameters, tensor shapes, and the
 * tensor data through dequantization). Any crash, sanitizer report, leak or hang is a bug. */
#include "kernels/dtype.h"
#include "worker/gguf.h"
#include "worker/hparams.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_FULL_ELEMS (1u << 20) /* dequantize whole tensors up to this many elements */

static volatile uint64_t sink; /* keeps the reads from being optimized away */

static void touch_bytes(const char *p, uint64_t len)
{
    uint64_t h = 0;
    for (uint64_t i = 0; i < len; i++) {
        h = h * 31 + (unsigned char)p[i];
    }
    sink += h;
}

static void touch_metadata(const kvs_gguf *g)
{
    for (uint64_t i = 0; i < kvs_gguf_n_kv(g); i++) {
        const char *key = kvs_gguf_key(g, i);
        touch_bytes(key, strlen(key));
        uint64_t u64;
        int64_t i64;
        uint32_t u32;
        float f;
        bool b;
        kvs_gguf_str s;
        kvs_gguf_arr a;
        if (kvs_gguf_get_u64(g, key, &u64) == 0) {
            sink += u64;
        }
        if (kvs_gguf_get_i64(g, key, &i64) == 0) {
            sink += (uint64_t)i64;
        }
        if (kvs_gguf_get_u32(g, key, &u32) == 0) {
            sink += u32;
        }
        if (kvs_gguf_get_f32(g, key, &f) == 0) {
            sink += (uint64_t)(f == f);
        }
        if (kvs_gguf_get_bool(g, key, &b) == 0) {
            sink += b;
        }
        if (kvs_gguf_get_str(g, key, &s) == 0) {
            touch_bytes(s.ptr, s.len);
        }
        if (kvs_gguf_get_arr(g, key, &a) == 0) {
            for (uint64_t j = 0; j < a.n; j++) {
                if (a.type == KVS_GGUF_STRING) {
                    kvs_gguf_str e = kvs_gguf_arr_str(&a, j);
                    touch_bytes(e.ptr, e.len);
                } else {
                    sink += (uint64_t)kvs_gguf_arr_i64(&a, j);
                    double d = kvs_gguf_arr_f64(&a, j);
                    sink += (uint64_t)(d == d);
                }
            }
        }
    }
}

static void touch_tensors(const kvs_gguf *g)
{
    for (uint64_t i = 0; i < kvs_gguf_n_tensors(g); i++) {
        const kvs_gguf_tensor *t = kvs_gguf_tensor_at(g, i);
        if (kvs_gguf_find_tensor(g, t->name) != t) {
            abort(); /* names are unique, so lookup must find this very tensor */
        }
        uint64_t n = t->n_elem <= MAX_FULL_ELEMS ? t->n_elem : t->ne[0];
        if (n > MAX_FULL_ELEMS) {
            n = MAX_FULL_ELEMS / kvs_dtype_block_elems(t->type) * kvs_dtype_block_elems(t->type);
        }
        float *buf = malloc((size_t)n * sizeof *buf);
        if (buf == NULL) {
            continue;
        }
        kvs_dequantize(t->type, t->data, buf, n);
        sink += (uint64_t)(buf[n - 1] == buf[n - 1]);
        free(buf);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kvs_gguf *g = NULL;
    char err[256];
    if (kvs_gguf_open_memory(data, size, &g, err, sizeof err) != 0) {
        if (g != NULL || err[0] == '\0') {
            abort(); /* a refusal must name its reason and return no handle */
        }
        return 0;
    }
    touch_metadata(g);
    struct kvs_hparams hp;
    if (kvs_hparams_from_gguf(g, &hp, err, sizeof err) == 0) {
        (void)kvs_hparams_check_tensors(g, &hp, err, sizeof err);
    }
    touch_tensors(g);
    kvs_gguf_destroy(&g);
    return 0;
}

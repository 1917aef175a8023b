/* Test helper: assemble GGUF files byte by byte in memory, including malformed ones.
 * Header-only (static functions) so each test program that includes it gets its own copy.
 *
 *   struct gb b = {0};
 *   gb_header(&b, 3, n_tensors, n_kv);
 *   gb_kv_str(&b, "general.architecture", "llama");
 *   gb_tensor(&b, "a", 2, (uint64_t[]){4, 2}, KVS_DTYPE_F32, 0);
 *   gb_pad(&b, 32);
 *   gb_fill(&b, 32, 0);
 *   ... kvs_gguf_open_memory(b.p, b.n, ...); gb_free(&b);
 *
 * Allocation failure aborts (tests only).
 */
#ifndef KVS_TESTS_GGUF_BUILD_H
#define KVS_TESTS_GGUF_BUILD_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct gb {
    uint8_t *p; /* bytes */
    size_t n;   /* bytes used */
    size_t cap; /* bytes allocated */
};

static inline void gb_raw(struct gb *b, const void *src, size_t n)
{
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n) {
            cap *= 2;
        }
        b->p = realloc(b->p, cap);
        if (b->p == NULL) {
            abort();
        }
        b->cap = cap;
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}

static inline void gb_u8(struct gb *b, uint8_t v)
{
    gb_raw(b, &v, 1);
}

static inline void gb_u32(struct gb *b, uint32_t v)
{
    uint8_t x[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    gb_raw(b, x, 4);
}

static inline void gb_u64(struct gb *b, uint64_t v)
{
    gb_u32(b, (uint32_t)v);
    gb_u32(b, (uint32_t)(v >> 32));
}

static inline void gb_f32(struct gb *b, float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    gb_u32(b, u);
}

/* A GGUF string: u64 length + bytes (len may contain NULs). */
static inline void gb_strn(struct gb *b, const char *s, size_t len)
{
    gb_u64(b, len);
    gb_raw(b, s, len);
}

static inline void gb_str(struct gb *b, const char *s)
{
    gb_strn(b, s, strlen(s));
}

static inline void gb_header(struct gb *b, uint32_t version, uint64_t n_tensors, uint64_t n_kv)
{
    gb_raw(b, "GGUF", 4);
    gb_u32(b, version);
    gb_u64(b, n_tensors);
    gb_u64(b, n_kv);
}

static inline void gb_kv_u32(struct gb *b, const char *key, uint32_t v)
{
    gb_str(b, key);
    gb_u32(b, 4); /* KVS_GGUF_UINT32 */
    gb_u32(b, v);
}

static inline void gb_kv_i32(struct gb *b, const char *key, int32_t v)
{
    gb_str(b, key);
    gb_u32(b, 5); /* KVS_GGUF_INT32 */
    gb_u32(b, (uint32_t)v);
}

static inline void gb_kv_f32(struct gb *b, const char *key, float v)
{
    gb_str(b, key);
    gb_u32(b, 6); /* KVS_GGUF_FLOAT32 */
    gb_f32(b, v);
}

static inline void gb_kv_str(struct gb *b, const char *key, const char *v)
{
    gb_str(b, key);
    gb_u32(b, 8); /* KVS_GGUF_STRING */
    gb_str(b, v);
}

/* Key + ARRAY type + element type + count; the caller appends the elements. */
static inline void gb_kv_arr(struct gb *b, const char *key, uint32_t elem_type, uint64_t n)
{
    gb_str(b, key);
    gb_u32(b, 9); /* KVS_GGUF_ARRAY */
    gb_u32(b, elem_type);
    gb_u64(b, n);
}

/* A tensor info record. */
static inline void gb_tensor(struct gb *b, const char *name, uint32_t n_dims, const uint64_t *ne,
                             uint32_t type, uint64_t offset)
{
    gb_str(b, name);
    gb_u32(b, n_dims);
    for (uint32_t i = 0; i < n_dims; i++) {
        gb_u64(b, ne[i]);
    }
    gb_u32(b, type);
    gb_u64(b, offset);
}

/* Zero bytes up to a multiple of align. */
static inline void gb_pad(struct gb *b, size_t align)
{
    while (b->n % align != 0) {
        gb_u8(b, 0);
    }
}

static inline void gb_fill(struct gb *b, size_t n, uint8_t v)
{
    for (size_t i = 0; i < n; i++) {
        gb_u8(b, v);
    }
}

static inline void gb_free(struct gb *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

#endif

/* GGUF reader: a memory-mapped, fully validated view of a GGUF v2/v3 file.
 *
 * File layout (all integers little-endian):
 *   u32 magic "GGUF" | u32 version (2 or 3) | u64 n_tensors | u64 n_kv
 *   n_kv x { string key | u32 value_type | value }
 *   n_tensors x { string name | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset }
 *   padding to `general.alignment` (default 32) | tensor data
 *   string = u64 length + bytes (no NUL); array value = u32 elem_type + u64 count + elems
 *
 * kvs_gguf_open validates everything before returning: magic, version, counts against the
 * bytes that could hold them, string and array lengths, nesting (arrays of arrays are
 * refused), key uniqueness, tensor names unique, dims nonzero and their product without
 * overflow, tensor types supported, row sizes a whole number of blocks, offsets aligned and
 * data inside the file, alignment a power of two. After a successful open no accessor can
 * read outside the mapping. Strings are views into the mapping: not NUL-terminated, and
 * not UTF-8 validated (callers that need text validate it).
 *
 * Thread-safety: a kvs_gguf is immutable after open; any thread may read it.
 */
#ifndef KVS_GGUF_H
#define KVS_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KVS_GGUF_MAX_DIMS 4

enum kvs_gguf_type {
    KVS_GGUF_UINT8 = 0,
    KVS_GGUF_INT8 = 1,
    KVS_GGUF_UINT16 = 2,
    KVS_GGUF_INT16 = 3,
    KVS_GGUF_UINT32 = 4,
    KVS_GGUF_INT32 = 5,
    KVS_GGUF_FLOAT32 = 6,
    KVS_GGUF_BOOL = 7,
    KVS_GGUF_STRING = 8,
    KVS_GGUF_ARRAY = 9,
    KVS_GGUF_UINT64 = 10,
    KVS_GGUF_INT64 = 11,
    KVS_GGUF_FLOAT64 = 12,
};

typedef struct kvs_gguf kvs_gguf;

typedef struct kvs_gguf_str {
    const char *ptr; /* borrowed from the mapping; not NUL-terminated */
    uint64_t len;    /* bytes */
} kvs_gguf_str;

typedef struct kvs_gguf_arr {
    enum kvs_gguf_type type; /* element type (never ARRAY) */
    uint64_t n;              /* elements */
    const void *data;        /* first element in the mapping (may be unaligned) */
    const uint64_t *str_off; /* STRING arrays only: byte offset of element i from data */
} kvs_gguf_arr;

typedef struct kvs_gguf_tensor {
    const char *name;               /* NUL-terminated copy owned by the kvs_gguf */
    uint32_t type;                  /* enum kvs_dtype */
    uint32_t n_dims;                /* 1..KVS_GGUF_MAX_DIMS */
    uint64_t ne[KVS_GGUF_MAX_DIMS]; /* elements per dim, ne[0] innermost; unused dims = 1 */
    uint64_t n_elem;                /* product of ne */
    uint64_t nbytes;                /* bytes of data */
    const void *data;               /* borrowed from the mapping, aligned as the file says */
} kvs_gguf_tensor;

/* Open and validate a file. On success returns 0 and *out (caller frees with
 * kvs_gguf_destroy). On failure returns a negative kvs_status (KVS_IO, KVS_BAD_FORMAT,
 * KVS_UNSUPPORTED, KVS_NO_MEMORY), writes a one-line reason naming what is wrong into
 * err (if errlen > 0), and sets *out to NULL. */
int kvs_gguf_open(const char *path, kvs_gguf **out, char *err, size_t errlen);

/* Same, over a caller-owned buffer that must outlive the kvs_gguf (used by the fuzzer). */
int kvs_gguf_open_memory(const void *data, size_t size, kvs_gguf **out, char *err, size_t errlen);

/* Unmap and free; accepts NULL and *g == NULL; sets *g to NULL. */
void kvs_gguf_destroy(kvs_gguf **g);

uint32_t kvs_gguf_version(const kvs_gguf *g);
uint64_t kvs_gguf_file_size(const kvs_gguf *g);
/* general.alignment (default 32), bytes. */
uint32_t kvs_gguf_alignment(const kvs_gguf *g);
/* Offset of the tensor data section from the start of the file, bytes. */
uint64_t kvs_gguf_data_offset(const kvs_gguf *g);

/* ---- metadata ---- */

uint64_t kvs_gguf_n_kv(const kvs_gguf *g);
/* Index of key, or -1 if absent. */
int64_t kvs_gguf_find_key(const kvs_gguf *g, const char *key);
/* Key name of entry i (NUL-terminated, owned by g). i < n_kv asserted. */
const char *kvs_gguf_key(const kvs_gguf *g, uint64_t i);
enum kvs_gguf_type kvs_gguf_kv_type(const kvs_gguf *g, uint64_t i);

/* Typed getters by key. Return 0, KVS_NOT_FOUND (absent) or KVS_TYPE_MISMATCH (present
 * with a type that cannot represent the request exactly: e.g. a negative int for u32). */
int kvs_gguf_get_u32(const kvs_gguf *g, const char *key, uint32_t *out);
int kvs_gguf_get_u64(const kvs_gguf *g, const char *key, uint64_t *out);
int kvs_gguf_get_i64(const kvs_gguf *g, const char *key, int64_t *out);
int kvs_gguf_get_f32(const kvs_gguf *g, const char *key, float *out); /* any numeric type */
int kvs_gguf_get_bool(const kvs_gguf *g, const char *key, bool *out);
int kvs_gguf_get_str(const kvs_gguf *g, const char *key, kvs_gguf_str *out);
int kvs_gguf_get_arr(const kvs_gguf *g, const char *key, kvs_gguf_arr *out);

/* Array element accessors; i < a->n asserted, element type checked by the caller. */
kvs_gguf_str kvs_gguf_arr_str(const kvs_gguf_arr *a, uint64_t i);
/* Numeric element as f64 / i64 (any numeric element type; bool reads 0/1). */
double kvs_gguf_arr_f64(const kvs_gguf_arr *a, uint64_t i);
int64_t kvs_gguf_arr_i64(const kvs_gguf_arr *a, uint64_t i);

/* ---- tensors ---- */

uint64_t kvs_gguf_n_tensors(const kvs_gguf *g);
/* The tensor named name, or NULL. Borrowed until kvs_gguf_destroy. */
const kvs_gguf_tensor *kvs_gguf_find_tensor(const kvs_gguf *g, const char *name);
/* Tensor i (i < n_tensors asserted). Borrowed until kvs_gguf_destroy. */
const kvs_gguf_tensor *kvs_gguf_tensor_at(const kvs_gguf *g, uint64_t i);

const char *kvs_gguf_type_name(enum kvs_gguf_type t);

#endif

/* Session snapshots: a buffered, hashing writer into `<id>.snap.tmp` that is fsynced and
 * renamed into place, and a two-pass reader that proves the whole file before it hands out
 * a byte. The byte layout is in snapshot.h. */
#include "worker/snapshot.h"
#include "common/endian.h"
#include "common/fileio.h"

#include "common/status.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sodium.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SNAP_MAGIC "KVSSNAP1"
#define SNAP_END_MAGIC "KVSSEND1"
#define HASH_BYTES 32u
#define HDR_CRC_OFF 240u
#define IO_CHUNK (1u << 20) /* bytes per read/write call */

static int snap_paths(const char *dir, const char *id, const struct kvs_log_identity *ident,
                      char *path, char *tmp, char *err, size_t errlen)
{
    if (dir == NULL || dir[0] == '\0' || kvs_sesslog_check_id(id) != 0) {
        kvs_errf(err, errlen, "invalid data directory or session id");
        return KVS_INVALID_ARGUMENT;
    }
    if (ident != NULL && kvs_log_identity_check(ident) != 0) {
        kvs_errf(err, errlen, "invalid model sha256 (need 64 lowercase hex characters)");
        return KVS_INVALID_ARGUMENT;
    }
    int n = snprintf(path, PATH_MAX, "%s/%s.snap", dir, id);
    int m = snprintf(tmp, PATH_MAX, "%s/%s.snap.tmp", dir, id);
    if (n < 0 || n >= PATH_MAX || m < 0 || m >= PATH_MAX) {
        kvs_errf(err, errlen, "snapshot path of '%s' is longer than %d bytes", id, PATH_MAX - 1);
        return KVS_INVALID_ARGUMENT;
    }
    return KVS_OK;
}

/* ---- writer ---- */

struct writer {
    int fd;
    uint64_t off;               /* bytes written to fd */
    unsigned char *buf;         /* IO_CHUNK bytes of pending output */
    size_t n;                   /* pending bytes in buf */
    crypto_generichash_state h; /* over everything written */
};

static int w_flush(struct writer *w)
{
    size_t done = 0;
    while (done < w->n) {
        ssize_t k = pwrite(w->fd, w->buf + done, w->n - done, (off_t)(w->off + done));
        if (k < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        if (k == 0) {
            errno = EIO;
            return -1;
        }
        done += (size_t)k;
    }
    w->off += w->n;
    w->n = 0;
    return 0;
}

static int w_put(struct writer *w, const void *data, size_t len)
{
    const unsigned char *p = data;
    crypto_generichash_update(&w->h, p, len);
    while (len > 0) {
        size_t k = IO_CHUNK - w->n < len ? IO_CHUNK - w->n : len;
        memcpy(w->buf + w->n, p, k);
        w->n += k;
        p += k;
        len -= k;
        if (w->n == IO_CHUNK && w_flush(w) != 0) {
            return -1;
        }
    }
    return 0;
}

static void header_encode(unsigned char h[KVS_SNAPSHOT_HEADER_BYTES], const char *id,
                          const struct kvs_log_identity *ident, uint32_t n_blocks,
                          uint64_t block_bytes, uint64_t meta_len)
{
    memset(h, 0, KVS_SNAPSHOT_HEADER_BYTES);
    memcpy(h, SNAP_MAGIC, 8);
    kvs_put_u32(h + 8, KVS_SNAPSHOT_VERSION);
    memcpy(h + 16, ident->model_sha256, 64);
    kvs_put_u32(h + 80, ident->kv_dtype);
    kvs_put_u32(h + 84, ident->block_size);
    size_t n = strlen(id);
    kvs_put_u32(h + 88, (uint32_t)n);
    memcpy(h + 92, id, n);
    kvs_put_u32(h + 220, n_blocks);
    kvs_put_u64(h + 224, block_bytes);
    kvs_put_u64(h + 232, meta_len);
    kvs_put_u32(h + HDR_CRC_OFF, kvs_crc32c(0, h, HDR_CRC_OFF));
}

int kvs_snapshot_write(const char *dir, const char *session_id,
                       const struct kvs_log_identity *ident, const void *meta, size_t meta_len,
                       uint32_t n_blocks, size_t block_bytes, kvs_snapshot_read_fn read_block,
                       void *user, char *err, size_t errlen)
{
    char path[PATH_MAX], tmp[PATH_MAX];
    struct writer w = {.fd = -1};
    unsigned char *block = NULL;
    int rc = KVS_OK;
    if (ident == NULL) {
        kvs_errf(err, errlen, "no model identity");
        return KVS_INVALID_ARGUMENT;
    }
    KVS_TRY(snap_paths(dir, session_id, ident, path, tmp, err, errlen));
    if ((meta == NULL && meta_len > 0) ||
        (n_blocks > 0 && (block_bytes == 0 || read_block == NULL))) {
        kvs_errf(err, errlen, "metadata or block arguments missing");
        return KVS_INVALID_ARGUMENT;
    }
    if ((uint64_t)meta_len > KVS_SNAPSHOT_MAX_META ||
        (uint64_t)block_bytes > KVS_SNAPSHOT_MAX_BLOCK_BYTES) {
        kvs_errf(err, errlen, "snapshot metadata %zu bytes (max %llu) or block %zu bytes (max %llu)",
               meta_len, KVS_SNAPSHOT_MAX_META, block_bytes, KVS_SNAPSHOT_MAX_BLOCK_BYTES);
        return KVS_TOO_LARGE;
    }
    if (sodium_init() < 0) {
        kvs_errf(err, errlen, "libsodium failed to initialize");
        return KVS_INTERNAL;
    }
    w.buf = malloc(IO_CHUNK);
    block = malloc(n_blocks > 0 ? block_bytes : 1);
    if (w.buf == NULL || block == NULL) {
        rc = KVS_NO_MEMORY;
        goto fail;
    }
    w.fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (w.fd < 0) {
        kvs_errf(err, errlen, "%s: %s", tmp, strerror(errno));
        rc = KVS_IO; /* a missing data directory included */
        goto fail;
    }
    crypto_generichash_init(&w.h, NULL, 0, HASH_BYTES);
    unsigned char h[KVS_SNAPSHOT_HEADER_BYTES];
    header_encode(h, session_id, ident, n_blocks, block_bytes, meta_len);
    if (w_put(&w, h, sizeof h) != 0 || (meta_len > 0 && w_put(&w, meta, meta_len) != 0)) {
        goto io_fail;
    }
    for (uint32_t i = 0; i < n_blocks; i++) {
        rc = read_block(i, block, user);
        if (rc < 0) {
            kvs_errf(err, errlen, "snapshot of '%s' abandoned at block %u (%s)", session_id, i,
                   kvs_status_name(rc));
            goto fail;
        }
        if (w_put(&w, block, block_bytes) != 0) {
            goto io_fail;
        }
    }
    unsigned char trailer[KVS_SNAPSHOT_TRAILER_BYTES];
    memcpy(trailer, SNAP_END_MAGIC, 8);
    crypto_generichash_update(&w.h, trailer, 8);
    crypto_generichash_final(&w.h, trailer + 8, HASH_BYTES);
    if (w.n + sizeof trailer > IO_CHUNK && w_flush(&w) != 0) {
        goto io_fail;
    }
    memcpy(w.buf + w.n, trailer, sizeof trailer);
    w.n += sizeof trailer;
    if (w_flush(&w) != 0 || fsync(w.fd) != 0) {
        goto io_fail;
    }
    if (close(w.fd) != 0) {
        w.fd = -1;
        goto io_fail;
    }
    w.fd = -1;
    if (rename(tmp, path) != 0) {
        goto io_fail;
    }
    free(w.buf);
    free(block);
    if (kvs_fsync_dir(dir) != 0) {
        /* The rename happened; whether it survives a crash is unknown: say so. The old
         * snapshot or the new one is in place either way. */
        kvs_errf(err, errlen, "%s: directory fsync: %s", dir, strerror(errno));
        return KVS_IO;
    }
    return KVS_OK;
io_fail:
    kvs_errf(err, errlen, "writing %s: %s", tmp, strerror(errno));
    rc = KVS_IO;
fail:
    if (w.fd >= 0) {
        close(w.fd);
    }
    unlink(tmp);
    free(w.buf);
    free(block);
    return rc;
}

/* ---- reader ---- */

/* Hash file bytes [from, to) into st, reading through buf (IO_CHUNK bytes). */
static int hash_range(int fd, uint64_t from, uint64_t to, unsigned char *buf,
                      crypto_generichash_state *st)
{
    while (from < to) {
        size_t k = to - from > IO_CHUNK ? IO_CHUNK : (size_t)(to - from);
        if (kvs_pread_all(fd, buf, k, from) != 0) {
            return -1;
        }
        crypto_generichash_update(st, buf, k);
        from += k;
    }
    return 0;
}

int kvs_snapshot_read(const char *dir, const char *session_id, const struct kvs_log_identity *ident,
                      kvs_snapshot_meta_fn on_meta, kvs_snapshot_block_fn write_block, void *user,
                      char *err, size_t errlen)
{
    char path[PATH_MAX], tmp[PATH_MAX];
    unsigned char *chunk = NULL, *meta = NULL, *block = NULL;
    int fd = -1, rc = KVS_OK;
    if (ident == NULL || on_meta == NULL || write_block == NULL) {
        kvs_errf(err, errlen, "identity and callbacks are required");
        return KVS_INVALID_ARGUMENT;
    }
    KVS_TRY(snap_paths(dir, session_id, ident, path, tmp, err, errlen));
    if (sodium_init() < 0) {
        kvs_errf(err, errlen, "libsodium failed to initialize");
        return KVS_INTERNAL;
    }
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        kvs_errf(err, errlen, "%s: %s", path, strerror(e));
        return e == ENOENT ? KVS_NOT_FOUND : KVS_IO;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        goto io_fail;
    }
    uint64_t size = (uint64_t)sb.st_size;
    unsigned char h[KVS_SNAPSHOT_HEADER_BYTES];
    if (size < KVS_SNAPSHOT_HEADER_BYTES + KVS_SNAPSHOT_TRAILER_BYTES) {
        kvs_errf(err, errlen, "%s: %llu bytes, shorter than an empty snapshot (%u)", path,
               (unsigned long long)size, KVS_SNAPSHOT_HEADER_BYTES + KVS_SNAPSHOT_TRAILER_BYTES);
        rc = KVS_BAD_FORMAT;
        goto fail;
    }
    if (kvs_pread_all(fd, h, sizeof h, 0) != 0) {
        goto io_fail;
    }
    if (memcmp(h, SNAP_MAGIC, 8) != 0) {
        kvs_errf(err, errlen, "%s: not a snapshot (bad magic)", path);
        rc = KVS_BAD_FORMAT;
        goto fail;
    }
    if (kvs_get_u32(h + 8) != KVS_SNAPSHOT_VERSION) {
        kvs_errf(err, errlen, "%s: snapshot version %u is not supported (need %u)", path,
               kvs_get_u32(h + 8), KVS_SNAPSHOT_VERSION);
        rc = KVS_UNSUPPORTED;
        goto fail;
    }
    if (kvs_crc32c(0, h, HDR_CRC_OFF) != kvs_get_u32(h + HDR_CRC_OFF) || kvs_get_u32(h + 244) != 0) {
        kvs_errf(err, errlen, "%s: snapshot header fails its CRC", path);
        rc = KVS_BAD_FORMAT;
        goto fail;
    }
    if (kvs_get_u32(h + 12) != 0) {
        kvs_errf(err, errlen, "%s: snapshot flags 0x%x are not supported", path, kvs_get_u32(h + 12));
        rc = KVS_UNSUPPORTED;
        goto fail;
    }
    uint32_t id_len = kvs_get_u32(h + 88);
    if (id_len != strlen(session_id) || memcmp(h + 92, session_id, id_len) != 0) {
        kvs_errf(err, errlen, "%s: the snapshot belongs to another session", path);
        rc = KVS_BAD_FORMAT;
        goto fail;
    }
    char sha[65];
    memcpy(sha, h + 16, 64);
    sha[64] = '\0';
    for (int i = 0; i < 64; i++) {
        if (sha[i] < 0x20 || sha[i] > 0x7e) {
            sha[i] = '?';
        }
    }
    uint32_t dtype = kvs_get_u32(h + 80), bs = kvs_get_u32(h + 84);
    if (memcmp(sha, ident->model_sha256, 64) != 0 || dtype != ident->kv_dtype ||
        bs != ident->block_size) {
        kvs_errf(err, errlen,
               "snapshot of '%s' is for model sha256 %s (kv dtype %u, block size %u), "
               "this worker runs %s (kv dtype %u, block size %u)",
               session_id, sha, dtype, bs, ident->model_sha256, ident->kv_dtype, ident->block_size);
        rc = KVS_MODEL_MISMATCH;
        goto fail;
    }
    uint32_t n_blocks = kvs_get_u32(h + 220);
    uint64_t block_bytes = kvs_get_u64(h + 224), meta_len = kvs_get_u64(h + 232);
    uint64_t blocks_total = 0, expect = 0;
    if (meta_len > KVS_SNAPSHOT_MAX_META || block_bytes > KVS_SNAPSHOT_MAX_BLOCK_BYTES ||
        (n_blocks > 0 && block_bytes == 0) ||
        __builtin_mul_overflow((uint64_t)n_blocks, block_bytes, &blocks_total) ||
        __builtin_add_overflow(blocks_total, meta_len, &expect) ||
        __builtin_add_overflow(
            expect, (uint64_t)KVS_SNAPSHOT_HEADER_BYTES + KVS_SNAPSHOT_TRAILER_BYTES, &expect) ||
        expect != size) {
        kvs_errf(err, errlen,
               "%s: %llu bytes, but the header says %llu bytes of metadata and %u blocks of "
               "%llu bytes (truncated or over-long)",
               path, (unsigned long long)size, (unsigned long long)meta_len, n_blocks,
               (unsigned long long)block_bytes);
        rc = KVS_BAD_FORMAT;
        goto fail;
    }

    /* Pass 1: the whole file against the trailer. */
    unsigned char trailer[KVS_SNAPSHOT_TRAILER_BYTES], digest[HASH_BYTES];
    crypto_generichash_state hs;
    chunk = malloc(IO_CHUNK);
    if (chunk == NULL) {
        rc = KVS_NO_MEMORY;
        goto fail;
    }
    uint64_t tpos = size - KVS_SNAPSHOT_TRAILER_BYTES;
    if (kvs_pread_all(fd, trailer, sizeof trailer, tpos) != 0) {
        goto io_fail;
    }
    crypto_generichash_init(&hs, NULL, 0, HASH_BYTES);
    if (hash_range(fd, 0, tpos + 8, chunk, &hs) != 0) {
        goto io_fail;
    }
    crypto_generichash_final(&hs, digest, HASH_BYTES);
    if (memcmp(trailer, SNAP_END_MAGIC, 8) != 0 ||
        sodium_memcmp(digest, trailer + 8, HASH_BYTES) != 0) {
        kvs_errf(err, errlen, "%s: checksum mismatch (the snapshot is corrupt)", path);
        rc = KVS_BAD_FORMAT;
        goto fail;
    }

    /* Pass 2: deliver, hashing again what is delivered. */
    meta = malloc(meta_len > 0 ? (size_t)meta_len : 1);
    block = malloc(n_blocks > 0 ? (size_t)block_bytes : 1);
    if (meta == NULL || block == NULL) {
        rc = KVS_NO_MEMORY;
        goto fail;
    }
    crypto_generichash_init(&hs, NULL, 0, HASH_BYTES);
    crypto_generichash_update(&hs, h, sizeof h);
    if (kvs_pread_all(fd, meta, (size_t)meta_len, KVS_SNAPSHOT_HEADER_BYTES) != 0) {
        goto io_fail;
    }
    crypto_generichash_update(&hs, meta, (size_t)meta_len);
    rc = on_meta(meta, (size_t)meta_len, n_blocks, (size_t)block_bytes, user);
    if (rc < 0) {
        kvs_errf(err, errlen, "snapshot of '%s': metadata refused (%s)", session_id,
               kvs_status_name(rc));
        goto fail;
    }
    uint64_t off = KVS_SNAPSHOT_HEADER_BYTES + meta_len;
    for (uint32_t i = 0; i < n_blocks; i++, off += block_bytes) {
        if (kvs_pread_all(fd, block, (size_t)block_bytes, off) != 0) {
            goto io_fail;
        }
        crypto_generichash_update(&hs, block, (size_t)block_bytes);
        rc = write_block(i, block, user);
        if (rc < 0) {
            kvs_errf(err, errlen, "snapshot of '%s': block %u refused (%s)", session_id, i,
                   kvs_status_name(rc));
            goto fail;
        }
    }
    crypto_generichash_update(&hs, trailer, 8);
    crypto_generichash_final(&hs, digest, HASH_BYTES);
    if (sodium_memcmp(digest, trailer + 8, HASH_BYTES) != 0) {
        kvs_errf(err, errlen, "%s: the snapshot changed while it was read", path);
        rc = KVS_IO;
        goto fail;
    }
    rc = KVS_OK;
    goto done;
io_fail:
    kvs_errf(err, errlen, "reading %s: %s", path, strerror(errno));
    rc = KVS_IO;
fail:
done:
    free(chunk);
    free(meta);
    free(block);
    close(fd);
    return rc;
}

int kvs_snapshot_remove(const char *dir, const char *session_id)
{
    char path[PATH_MAX], tmp[PATH_MAX];
    KVS_TRY(snap_paths(dir, session_id, NULL, path, tmp, NULL, 0));
    unlink(tmp);
    if (unlink(path) != 0) {
        return errno == ENOENT ? KVS_NOT_FOUND : KVS_IO;
    }
    return kvs_fsync_dir(dir) == 0 ? KVS_OK : KVS_IO;
}

/* Session snapshots: `<dir>/<session_id>.snap` holds a session's metadata (opaque bytes from
 * the session layer) and its KV blocks (opaque bytes), checksummed as a whole.
 *
 * Byte layout (all integers little-endian):
 *
 *   header, 248 bytes:
 *     0    8   magic "KVSSNAP1"
 *     8    4   u32 format version (KVS_SNAPSHOT_VERSION = 1)
 *     12   4   u32 flags (0; a reader refuses other values: KVS_UNSUPPORTED)
 *     16   64  model SHA-256, 64 lowercase hex characters (no NUL)
 *     80   4   u32 KV dtype
 *     84   4   u32 block size (cells per block)
 *     88   4   u32 session id length n (1..128)
 *     92   128 session id, n bytes then zeros
 *     220  4   u32 n_blocks
 *     224  8   u64 block_bytes (bytes per KV block, <= KVS_SNAPSHOT_MAX_BLOCK_BYTES)
 *     232  8   u64 meta_len (bytes, <= KVS_SNAPSHOT_MAX_META)
 *     240  4   u32 CRC-32C of bytes [0, 240) (the header alone, so that sizes and identity
 *              can be trusted before the whole file is hashed)
 *     244  4   u32 0
 *   248              meta_len bytes of metadata
 *   248 + meta_len   n_blocks * block_bytes bytes of KV blocks, block 0 first
 *   then the trailer, 40 bytes:
 *     0    8   magic "KVSSEND1"
 *     8    32  BLAKE2b-256 (libsodium crypto_generichash, no key) of every byte of the
 *              file before these 32
 *   The file size must be exactly 248 + meta_len + n_blocks * block_bytes + 40.
 *
 * Checksum: BLAKE2b-256 through libsodium (already linked into the engine); it is fast
 * enough (~1 GB/s per core) for snapshots and, unlike a CRC, does not weaken with size.
 *
 * Crash behaviour: a snapshot is written to `<id>.snap.tmp`, fsynced, renamed over
 * `<id>.snap`, and the directory is fsynced: a crash leaves the previous snapshot or the
 * new one, whole. Readers never look at `<id>.snap.tmp` (a leftover is overwritten by the
 * next write and deleted by kvs_snapshot_remove).
 *
 * Thread-safety: functions may run concurrently on different sessions; for one session the
 * caller serializes writes (a reader concurrent with a writer sees the old or new file).
 * Every function returns 0 or a negative status and writes a one-line reason to err
 * (may be NULL) on error.
 */
#ifndef KVS_SNAPSHOT_H
#define KVS_SNAPSHOT_H

#include <stddef.h>
#include <stdint.h>

#include "worker/sesslog.h"

#define KVS_SNAPSHOT_VERSION 1u
#define KVS_SNAPSHOT_HEADER_BYTES 248u
#define KVS_SNAPSHOT_TRAILER_BYTES 40u
#define KVS_SNAPSHOT_MAX_META (1ull << 30)        /* bytes of metadata (1 GiB) */
#define KVS_SNAPSHOT_MAX_BLOCK_BYTES (1ull << 30) /* bytes per block (1 GiB) */

/* Fill buf (block_bytes) with block i, for i = 0..n_blocks-1 in order. Return 0, or < 0 to
 * abandon the snapshot with that status. */
typedef int (*kvs_snapshot_read_fn)(uint32_t i, void *buf, void *user);

/* Write `<dir>/<session_id>.snap`: the header for ident, meta (meta_len bytes, borrowed;
 * may be NULL when meta_len is 0), then n_blocks blocks pulled through read_block. The
 * function returns only after the file and the directory are fsynced.
 * Errors: KVS_INVALID_ARGUMENT (bad id, identity, block_bytes 0 with blocks, read_block
 * NULL with blocks, a path over PATH_MAX), KVS_TOO_LARGE (meta or block over the caps),
 * KVS_IO (errno text in err), KVS_NO_MEMORY, or read_block's status. On any error the
 * previous snapshot (if any) is untouched and the temp file is removed. */
int kvs_snapshot_write(const char *dir, const char *session_id,
                       const struct kvs_log_identity *ident, const void *meta, size_t meta_len,
                       uint32_t n_blocks, size_t block_bytes, kvs_snapshot_read_fn read_block,
                       void *user, char *err, size_t errlen);

/* Called once, before any block, with the metadata (borrowed until it returns). Return 0,
 * or < 0 to stop the read with that status (e.g. the blocks do not fit the pool). */
typedef int (*kvs_snapshot_meta_fn)(const void *meta, size_t len, uint32_t n_blocks,
                                    size_t block_bytes, void *user);
/* Called for blocks i = 0..n_blocks-1 in order; buf (block_bytes) is borrowed until it
 * returns. Return 0 or < 0 to stop. */
typedef int (*kvs_snapshot_block_fn)(uint32_t i, const void *buf, void *user);

/* Read `<dir>/<session_id>.snap`. Before any callback, the header, every size (against the
 * file's size; no allocation larger than the file) and the checksum of the whole file are
 * verified; then on_meta and write_block run (a second pass that re-hashes what it
 * delivers). Memory: meta_len + block_bytes + 1 MiB.
 * Errors, none of which calls a callback: KVS_NOT_FOUND (no snapshot), KVS_BAD_FORMAT
 * (bad magic, truncated or over-long file, sizes that do not add up, a header or checksum
 * mismatch, another session's id), KVS_UNSUPPORTED (another version or flags),
 * KVS_MODEL_MISMATCH (another model, dtype or block size: err names both), KVS_IO,
 * KVS_NO_MEMORY, KVS_INVALID_ARGUMENT. After the callbacks started: a callback's negative
 * status, KVS_IO (a read error, or the file changed between the passes: the caller must
 * drop what it received). */
int kvs_snapshot_read(const char *dir, const char *session_id, const struct kvs_log_identity *ident,
                      kvs_snapshot_meta_fn on_meta, kvs_snapshot_block_fn write_block, void *user,
                      char *err, size_t errlen);

/* Delete `<id>.snap` and a leftover `<id>.snap.tmp`, then fsync the directory.
 * KVS_NOT_FOUND if there was no snapshot, KVS_INVALID_ARGUMENT, KVS_IO. */
int kvs_snapshot_remove(const char *dir, const char *session_id);

#endif

/* Session append log: one file per session, `<dir>/<session_id>.log`, of length-prefixed,
 * checksummed records, written with an fsync policy and replayed after a restart.
 *
 * Byte layout (all integers little-endian):
 *
 *   header, 224 bytes:
 *     0    8   magic "KVSLOG1\n"
 *     8    4   u32 format version (KVS_SESSLOG_VERSION = 1)
 *     12   4   u32 flags (0; a reader refuses other values: KVS_UNSUPPORTED)
 *     16   64  model SHA-256, 64 lowercase hex characters (no NUL)
 *     80   4   u32 KV dtype (enum kvs_dtype)
 *     84   4   u32 block size (cells per block)
 *     88   4   u32 session id length n (1..128)
 *     92   128 session id, n bytes then zeros
 *     220  4   u32 CRC-32C of bytes [0, 220)
 *   then records, back to back up to the end of the file:
 *     0    4   u32 payload length L (0..KVS_SESSLOG_MAX_PAYLOAD)
 *     4    4   u32 type (1..KVS_SESSLOG_MAX_TYPE; 0 and larger values are never written)
 *     8    L   payload
 *     8+L  4   u32 CRC-32C (Castagnoli, as in iSCSI/ext4) of bytes [0, 8+L)
 *
 * Checksum: CRC-32C, computed in software (slice-by-8) in sesslog.c, so the log needs no
 * extra library. A record is "good" when its length fits the cap and the file, its type is
 * in range and its CRC matches. Types are capped at 255 so that a reader can tell garbage
 * from a record cheaply when it looks for good records after a bad one (see replay).
 *
 * Crash behaviour. A log is created by writing the header to `<id>.log.tmp`, fsyncing it
 * and hard-linking it to `<id>.log` (so a log never exists with a torn header). A record
 * is one pwrite at the end of the last good record; a failed write is truncated away at
 * once. A torn or corrupt tail (a last record cut short, failing its CRC, or garbage after
 * the last good record, with no good record after it) is cut off by replay/open and
 * reported; a bad record FOLLOWED by a good one is corruption in the middle: the reader
 * stops there, reports it and changes nothing (KVS_BAD_FORMAT). Rewrites (compaction) go
 * to `<id>.log.tmp`, are fsynced and renamed over the log, then the directory is fsynced:
 * a crash at any point leaves either the whole old or the whole new log.
 *
 * Acknowledgement: under KVS_FSYNC_ALWAYS, kvs_sesslog_append returns 0 only after
 * fdatasync, so a record it acknowledged survives a crash (process or machine). Under
 * EVERYSEC up to about one second of acknowledged records can be lost with the machine
 * (never with the process alone); under NO whatever the kernel had not written back.
 *
 * Ownership and locking: an open kvs_sesslog holds an exclusive flock(2) on its file;
 * replay, open and rewrite take it too, so a second opener (another worker on the same
 * directory, or an open handle in this one) gets KVS_BUSY. One data directory belongs to
 * one worker process. Thread-safety: a kvs_sesslog is used by one thread at a time (the
 * caller serializes); functions on different sessions may run concurrently.
 *
 * Errors: every function returns 0 or a negative status (common/status.h). Those taking
 * `err, errlen` also write a one-line reason there (err may be NULL); they never log
 * except where said (a truncated tail is logged with KVS_WARN).
 */
#ifndef KVS_SESSLOG_H
#define KVS_SESSLOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KVS_SESSLOG_VERSION 1u
#define KVS_SESSLOG_HEADER_BYTES 224u
#define KVS_SESSLOG_RECORD_OVERHEAD 12u     /* length + type + CRC, bytes */
#define KVS_SESSLOG_MAX_PAYLOAD (16u << 20) /* bytes per record payload (16 MiB) */
#define KVS_SESSLOG_MAX_TYPE 255u           /* record types are 1..this */
#define KVS_SESSION_ID_MAX 128u             /* bytes */

/* Record types the session layer writes. The log itself treats types as opaque. */
enum kvs_log_type {
    KVS_LOG_CREATE = 1,           /* opaque: the session's creation parameters */
    KVS_LOG_APPEND = 2,           /* struct kvs_log_append (encode/decode below) */
    KVS_LOG_EVICT = 3,            /* struct kvs_log_evict */
    KVS_LOG_FLASH_REGISTER = 4,   /* opaque */
    KVS_LOG_FLASH_UNREGISTER = 5, /* opaque */
    KVS_LOG_SNAPSHOT = 6,         /* a snapshot covering everything before it exists */
};

enum kvs_fsync_policy {
    KVS_FSYNC_ALWAYS = 0,   /* fdatasync before every append returns */
    KVS_FSYNC_EVERYSEC = 1, /* fdatasync at most once a second (append path or tick) */
    KVS_FSYNC_NO = 2,       /* never; the kernel writes back when it likes */
};

/* "always" / "everysec" / "no" -> *out. KVS_INVALID_ARGUMENT for anything else. */
int kvs_fsync_policy_parse(const char *s, enum kvs_fsync_policy *out);
/* "always" / "everysec" / "no"; "?" for a value outside the enum. */
const char *kvs_fsync_policy_name(enum kvs_fsync_policy p);

/* What a log (and a snapshot) is only valid for: the model and the KV layout. */
struct kvs_log_identity {
    char model_sha256[65]; /* 64 lowercase hex characters + NUL */
    uint32_t kv_dtype;     /* enum kvs_dtype of the KV cache */
    uint32_t block_size;   /* cells per block */
};

/* 0 if id is 1..128 bytes of [A-Za-z0-9._-] not starting with '.', else
 * KVS_INVALID_ARGUMENT. id may be NULL (invalid). */
int kvs_sesslog_check_id(const char *id);

/* 0 if ident->model_sha256 is 64 lowercase hex characters, else KVS_INVALID_ARGUMENT. */
int kvs_log_identity_check(const struct kvs_log_identity *ident);

/* CRC-32C (Castagnoli) of buf, continuing from crc (start with 0). */
uint32_t kvs_crc32c(uint32_t crc, const void *buf, size_t len);

typedef struct kvs_sesslog kvs_sesslog;

/* Create `<dir>/<session_id>.log` holding only the header; the file and the directory are
 * fsynced before it returns (whatever the policy). *out is an open log for appending;
 * caller frees with kvs_sesslog_close.
 * Errors: KVS_INVALID_ARGUMENT (bad id, identity, policy or a path over PATH_MAX),
 * KVS_ALREADY_EXISTS (a log for this id exists), KVS_IO (with errno text in err; a
 * missing data directory too), KVS_BUSY (another create of this id in progress),
 * KVS_NO_MEMORY. On error nothing is left behind but possibly `<id>.log.tmp`. */
int kvs_sesslog_create(const char *dir, const char *session_id,
                       const struct kvs_log_identity *ident, enum kvs_fsync_policy policy,
                       kvs_sesslog **out, char *err, size_t errlen);

/* Why a replay stopped where it did. */
enum kvs_replay_tail {
    KVS_REPLAY_CLEAN = 0,  /* the file ended exactly after a good record (or the header) */
    KVS_REPLAY_TORN,       /* tail cut: the last record runs past the end of the file */
    KVS_REPLAY_BAD_CRC,    /* tail cut: a complete record failed its CRC */
    KVS_REPLAY_BAD_RECORD, /* tail cut: length over the cap or type out of range (garbage) */
    KVS_REPLAY_CORRUPT,    /* a bad record followed by good ones: nothing cut, KVS_BAD_FORMAT */
    KVS_REPLAY_STOPPED,    /* the callback returned < 0 (the rest was not read) */
};
const char *kvs_replay_tail_name(enum kvs_replay_tail t);

struct kvs_replay_stats {
    uint64_t n_records;     /* good records passed to the callback */
    uint64_t end_offset;    /* bytes: the end of the last good record (the file size after) */
    uint64_t dropped_bytes; /* bytes cut from a torn or corrupt tail (0 if none) */
    uint64_t bad_offset;    /* bytes: offset of the first bad record (when tail != CLEAN) */
    enum kvs_replay_tail tail;
    char reason[160]; /* one line, "" when CLEAN */
};

/* Called once per good record, in file order. payload is borrowed until the callback
 * returns (not aligned: decode with the helpers below). offset is the record's byte
 * offset in the file (usable as keep_from_offset of kvs_sesslog_rewrite). Return 0 to go
 * on, < 0 to stop the replay with that status. */
typedef int (*kvs_sesslog_record_fn)(uint32_t type, const void *payload, size_t len,
                                     uint64_t offset, void *user);

/* Read every good record of `<dir>/<session_id>.log` in order, calling cb (may be NULL,
 * to validate and repair only). A torn or corrupt tail is cut off (ftruncate + fsync),
 * reported in *st and logged with KVS_WARN; this is success (0). st may be NULL.
 * Errors: KVS_NOT_FOUND (no log), KVS_MODEL_MISMATCH (header of another model, dtype or
 * block size: err names both values), KVS_BAD_FORMAT (bad magic, header CRC, another
 * session's id in the header, or corruption in the middle after the records before it
 * were delivered: st->tail = KVS_REPLAY_CORRUPT, the file is left as it was),
 * KVS_UNSUPPORTED (another format version or flags), KVS_BUSY (the log is open or being
 * replayed elsewhere), KVS_IO, KVS_NO_MEMORY, KVS_INVALID_ARGUMENT, or the callback's
 * negative status (st->tail = KVS_REPLAY_STOPPED; nothing cut). */
int kvs_sesslog_replay(const char *dir, const char *session_id,
                       const struct kvs_log_identity *ident, kvs_sesslog_record_fn cb, void *user,
                       struct kvs_replay_stats *st, char *err, size_t errlen);

/* Open an existing log for appending. It validates the whole file exactly as replay does
 * (cutting a torn tail), so appends always follow the last good record. Same errors as
 * kvs_sesslog_replay. Caller frees *out with kvs_sesslog_close. */
int kvs_sesslog_open(const char *dir, const char *session_id, const struct kvs_log_identity *ident,
                     enum kvs_fsync_policy policy, kvs_sesslog **out, char *err, size_t errlen);

/* Replay and open in one pass under one lock (what a restore wants): cb sees every good
 * record, then *out is open for appending. On error *out is NULL (the callback may have
 * been called for the records before the error). */
int kvs_sesslog_open_replay(const char *dir, const char *session_id,
                            const struct kvs_log_identity *ident, enum kvs_fsync_policy policy,
                            kvs_sesslog_record_fn cb, void *user, struct kvs_replay_stats *st,
                            kvs_sesslog **out, char *err, size_t errlen);

/* Append one record. type must be 1..KVS_SESSLOG_MAX_TYPE, len <= KVS_SESSLOG_MAX_PAYLOAD
 * (else KVS_INVALID_ARGUMENT / KVS_TOO_LARGE, nothing written). payload may be NULL when
 * len is 0. Under ALWAYS it returns 0 only after fdatasync; under EVERYSEC it syncs when
 * the last sync is >= 1 s old; under NO never.
 * KVS_IO: a write or sync failed (ENOSPC, EIO, EFBIG...; kvs_sesslog_last_error has the
 * errno text); the file has been truncated back to the last acknowledged record and the
 * log stays usable: a later append may succeed. KVS_NO_MEMORY. The record is
 * acknowledged if and only if 0 is returned. */
int kvs_sesslog_append(kvs_sesslog *log, uint32_t type, const void *payload, size_t len);

/* EVERYSEC: fdatasync if records are unsynced and the last sync is >= 1 s old (call it
 * from a periodic timer, e.g. every 100 ms). Other policies: nothing. 0 or KVS_IO. */
int kvs_sesslog_tick(kvs_sesslog *log);

/* fdatasync now whatever the policy (e.g. before a graceful shutdown). 0 or KVS_IO. */
int kvs_sesslog_sync(kvs_sesslog *log);

/* Byte offset where the next record will start (= the file's size when no write is in
 * flight). */
uint64_t kvs_sesslog_end(const kvs_sesslog *log);

/* errno text of the last KVS_IO ("" if none). Borrowed until the next call on log. */
const char *kvs_sesslog_last_error(const kvs_sesslog *log);

struct kvs_sesslog_stats {
    uint64_t n_appends;  /* acknowledged records */
    uint64_t n_syncs;    /* fdatasync calls that succeeded */
    uint64_t n_failures; /* appends answered KVS_IO */
    uint64_t bytes;      /* file size in bytes (header + good records) */
    uint64_t unsynced;   /* acknowledged records not yet fdatasync'ed */
};
void kvs_sesslog_get_stats(const kvs_sesslog *log, struct kvs_sesslog_stats *st);

/* One record for kvs_sesslog_rewrite. */
struct kvs_log_record {
    uint32_t type;       /* 1..KVS_SESSLOG_MAX_TYPE */
    const void *payload; /* borrowed for the call */
    size_t len;          /* bytes, <= KVS_SESSLOG_MAX_PAYLOAD */
};

/* Compaction (after a snapshot): replace the log by a fresh one that holds the header,
 * then head[0..n_head), then a copy of this log's records from keep_from_offset to its end
 * (keep_from_offset = kvs_sesslog_end(log) keeps none; it must be a record boundary >=
 * KVS_SESSLOG_HEADER_BYTES, e.g. an offset seen by replay). Written to `<id>.log.tmp`,
 * fsynced, renamed over `<id>.log`, directory fsynced; log then appends to the new file.
 * A crash at any point leaves the whole old or the whole new log.
 * Errors: KVS_INVALID_ARGUMENT (bad record or keep_from_offset, which is checked by
 * re-validating every copied record), KVS_TOO_LARGE, KVS_IO, KVS_NO_MEMORY: the old log
 * is intact and still in use. KVS_IO after the rename (only the directory fsync failed):
 * the new log is in use and the next appends retry the directory fsync first. */
int kvs_sesslog_rewrite(kvs_sesslog *log, const struct kvs_log_record *head, size_t n_head,
                        uint64_t keep_from_offset);

/* Start the session's log afresh whatever is there (nothing, a log corrupt in the middle,
 * or a log superseded by a snapshot restored from elsewhere): header + head[0..n_head) are
 * written to `<id>.log.tmp`, fsynced and renamed over `<id>.log`, and the directory is
 * fsynced, so a crash leaves the old file or the new one. *out is open for appending.
 * This is the recovery path after KVS_BAD_FORMAT / KVS_REPLAY_CORRUPT: rebuild the session
 * from its snapshot and the good records, then replace the log with records that describe
 * that state (e.g. CREATE + SNAPSHOT).
 * Errors: KVS_INVALID_ARGUMENT, KVS_TOO_LARGE, KVS_BUSY (the existing log is open),
 * KVS_IO, KVS_NO_MEMORY: the old file, if any, is untouched. */
int kvs_sesslog_replace(const char *dir, const char *session_id,
                        const struct kvs_log_identity *ident, enum kvs_fsync_policy policy,
                        const struct kvs_log_record *head, size_t n_head, kvs_sesslog **out,
                        char *err, size_t errlen);

/* Close (syncing first under ALWAYS/EVERYSEC if anything is unsynced; an error there is
 * only logged). Accepts NULL and *log == NULL; sets *log to NULL. */
void kvs_sesslog_close(kvs_sesslog **log);

/* Delete `<id>.log` (and a leftover `<id>.log.tmp`) and fsync the directory: the user
 * closed the session. KVS_NOT_FOUND if there was no log, KVS_INVALID_ARGUMENT, KVS_IO.
 * The log must not be open. */
int kvs_sesslog_remove(const char *dir, const char *session_id);

/* ---- payloads (little-endian; encode into caller memory, decode borrows the payload) ---- */

/* APPEND payload: u64 client_id | u64 client_seq | u64 version_after | u32 n_tokens |
 * i32 tokens[n_tokens]; exactly 28 + 4 * n_tokens bytes. */
struct kvs_log_append {
    uint64_t client_id;     /* who sent the append (dedup of retries) */
    uint64_t client_seq;    /* per-client sequence number */
    uint64_t version_after; /* session version once applied */
    uint32_t n_tokens;
    const int32_t *tokens;          /* encode: the tokens (n_tokens) */
    const unsigned char *tokens_le; /* decode: borrowed from the payload, 4 * n_tokens bytes */
};
#define KVS_LOG_APPEND_FIXED 28u /* bytes before the tokens */

/* Bytes an APPEND payload of n tokens takes; 0 if it would exceed the record cap. */
size_t kvs_log_append_size(uint32_t n_tokens);
/* Encode into buf (cap bytes). Returns the length, or KVS_TOO_LARGE (over the cap) /
 * KVS_INVALID_ARGUMENT (cap too small, tokens NULL with n_tokens > 0). */
int64_t kvs_log_append_encode(const struct kvs_log_append *a, void *buf, size_t cap);
/* Decode; out->tokens is NULL and out->tokens_le points into payload.
 * KVS_BAD_FORMAT if len != 28 + 4 * n_tokens. */
int kvs_log_append_decode(const void *payload, size_t len, struct kvs_log_append *out);
/* Copy a decoded append's tokens into dst (n_tokens entries). */
void kvs_log_append_tokens(const struct kvs_log_append *a, int32_t *dst);
/* Encode a and append it as a KVS_LOG_APPEND record (no intermediate copy). Same
 * contract as kvs_sesslog_append. */
int kvs_sesslog_append_tokens(kvs_sesslog *log, const struct kvs_log_append *a);

/* EVICT payload: u64 version_after | u32 first_cell | u32 n_cells; exactly 16 bytes. */
struct kvs_log_evict {
    uint64_t version_after; /* session version once applied */
    uint32_t first_cell;    /* first evicted cell (position) */
    uint32_t n_cells;       /* cells evicted */
};
#define KVS_LOG_EVICT_BYTES 16u
void kvs_log_evict_encode(const struct kvs_log_evict *e, unsigned char buf[KVS_LOG_EVICT_BYTES]);
/* KVS_BAD_FORMAT if len != 16. */
int kvs_log_evict_decode(const void *payload, size_t len, struct kvs_log_evict *out);

#endif

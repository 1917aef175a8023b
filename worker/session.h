/* Sessions: named, persistent contexts that data is appended to and questions are asked of.
 *
 * A session owns a seq in the engine's KV pool holding its pinned prefix and every record
 * appended so far, and records the token ids it holds (nothing is ever re-tokenized).
 *   append: frame the record with the session's data template, tokenize it on its own,
 *           prefill it into the seq, bump the version; flash queries whose trigger fires are
 *           then re-evaluated (with this synchronous executor: right away).
 *   query:  fork the seq, prefill the question (its own template), decode, drop the fork:
 *           the session is unchanged, and the cost is O(|question| + |answer|) plus the
 *           attention over the cached context.
 *   stateless query: the baseline: re-prefill the recorded ids + question in a fresh seq.
 *           With the batch-invariant CPU backend its greedy answer equals the stateful one.
 *
 * Templates (RAW / CHAT):
 *   prefix    RAW: the text, with BOS as the model's metadata says. CHAT: a system turn (the
 *             given text, else the template's default system message, else none), with BOS
 *             as the metadata says.
 *   record    RAW: the text, plus "\n" unless it already ends with one. CHAT: a user turn
 *             without a generation prompt.
 *   question  RAW: the text as given. CHAT: a user turn plus the generation prompt.
 *   Template markers are tokenized with special-token parsing; user text never is (a record
 *   containing "<|im_end|>" stays text).
 *
 * Capacity: a session reserves its budget (cells) at creation; a query reserves
 * |question| + max answer tokens at acceptance from what is left; nothing overcommits, so an
 * admitted session never fails for lack of KV. When an append would exceed the budget the
 * context policy decides: REJECT (CONTEXT_FULL, nothing appended) or SLIDE (evict the oldest
 * data in whole blocks after the prefix, re-rotating the kept keys: see kvs_session_append).
 *
 * Thread-safety: none; one thread (the engine's) drives sessions. Callbacks run on it.
 */
#ifndef KVS_SESSION_H
#define KVS_SESSION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/engine.h"
#include "worker/sesslog.h" /* KVS_SESSION_ID_MAX, enum kvs_fsync_policy */

#define KVS_FLASH_NAME_MAX 64         /* bytes of a flash query name */
#define KVS_FLASH_MAX_PER_SESSION 32  /* registered flash queries per session */
#define KVS_QUERY_RESERVE_DEFAULT 512 /* cells kept free for a query by the default budget */
#define KVS_CLIENTS_MAX 1024          /* client sequence numbers remembered per session */

enum kvs_session_format { KVS_FORMAT_RAW = 0, KVS_FORMAT_CHAT = 1 };
enum kvs_context_policy { KVS_POLICY_REJECT = 0, KVS_POLICY_SLIDE = 1 };

typedef struct kvs_sessions kvs_sessions;
typedef struct kvs_session kvs_session;

struct kvs_session_opts {
    int64_t budget_cells;            /* 0 = the context length minus query_reserve */
    int32_t query_reserve;           /* 0 = KVS_QUERY_RESERVE_DEFAULT */
    const char *prefix;              /* pinned prefix text (may be NULL) */
    size_t prefix_len;               /* bytes */
    enum kvs_session_format format;
    enum kvs_context_policy policy;
};

struct kvs_query_opts {
    struct kvs_sampling sampling;    /* greedy by default */
    int32_t max_tokens;              /* answer tokens at most (0 = 64) */
    const char *const *stops;        /* stop strings (borrowed) */
    int n_stops;
    bool stateless;                  /* baseline: re-prefill recorded ids + question */
};

struct kvs_answer {
    char *text;                      /* NUL-terminated; caller frees with kvs_answer_free */
    size_t len;                      /* bytes of text */
    int32_t *tokens;                 /* generated ids, without the stop token */
    int32_t n_tokens;
    uint64_t version;                /* the session version the answer was computed at */
    int64_t context_tokens;          /* tokens of context it saw (prefix + data) */
    int32_t question_tokens;         /* tokens of the formatted question */
    double ttft_s;                   /* seconds from acceptance to the first answer token */
    double total_s;                  /* seconds from acceptance to the end */
    bool fresh;                      /* flash_get: computed at the current version */
};

struct kvs_append_result {
    uint64_t version;                /* session version after the append */
    int64_t cells;                   /* cells the session uses now */
    int32_t n_tokens;                /* tokens this append added */
    int32_t evicted;                 /* cells evicted by SLIDE to make room */
    bool duplicate;                  /* a retry: the original acknowledgement, nothing applied */
};

struct kvs_session_info {
    uint64_t version;                /* bumps on every append and eviction */
    uint64_t appends;                /* acknowledged appends */
    int64_t prefix_tokens;           /* pinned prefix */
    int64_t data_tokens;             /* appended tokens currently held */
    int64_t cells_used;              /* = prefix_tokens + data_tokens */
    int64_t cells_budget;            /* reserved at creation */
    int64_t evicted_tokens;          /* removed by SLIDE so far */
    int32_t flash_queries;           /* registered */
    enum kvs_session_format format;
    enum kvs_context_policy policy;
};

/* ---- the registry ---- */

struct kvs_sessions_opts {
    const char *data_dir;            /* durable logs and snapshots; NULL = in memory only */
    enum kvs_fsync_policy fsync;     /* KVS_FSYNC_ALWAYS (0) by default */
};

/* Sessions on engine e (borrowed; must outlive the registry). With a data_dir (created if
 * missing) every session keeps an append log there (worker/sesslog.h), identified by the
 * model's SHA-256, KV dtype and block size. 0, KVS_IO (the directory or the model file
 * cannot be read), KVS_NO_MEMORY. Existing logs are not read: see kvs_sessions_restore. */
int kvs_sessions_new(kvs_engine *e, const struct kvs_sessions_opts *o, kvs_sessions **out);

/* Bring back every session found in the data dir: from its snapshot (if valid) plus the log
 * records after it, or by replaying the log alone. A torn or corrupt log tail is dropped
 * with a warning; a corrupt snapshot is refused (warning) and the log replayed instead when
 * it still holds the whole history; a log of another model is refused. Sessions that cannot
 * be restored are reported in err (one line each, up to errlen) and skipped; the others
 * are restored. Returns the number restored (>= 0) or KVS_IO when the directory cannot be
 * listed. Flash answers are not recomputed until asked for or the next append. */
int kvs_sessions_restore(kvs_sessions *S, char *err, size_t errlen);

/* Bring back the one session id from its snapshot and log, as kvs_sessions_restore does
 * for each (the restore order after its worker went down). With from_dir (another worker's
 * directory on storage both reach) its files are first moved into this registry's data dir,
 * the snapshot then the log (one rename each: the directory holding the log owns the
 * session), and moved back when the restore fails; from_dir NULL (or the data dir itself)
 * restores what the data dir holds. Files left here by an earlier attempt are used. 0, or
 * KVS_UNSUPPORTED (no data dir), KVS_INVALID_ARGUMENT (bad id), KVS_ALREADY_EXISTS (open
 * here, or a log in both directories), KVS_NOT_FOUND (no log), KVS_IO (a rename), or the
 * restore's error (KVS_BAD_FORMAT, KVS_CAPACITY, ...); err gets one line. */
int kvs_session_adopt(kvs_sessions *S, const char *from_dir, const char *id, char *err,
                      size_t errlen);

/* Stop holding session id and leave its files for another worker to adopt (a drain): its
 * log is written to disk (fsync, whatever the fsync policy), *info gets its state then, and
 * it is closed like kvs_sessions_destroy closes one (KV and budget freed, files kept). 0, or
 * KVS_NOT_FOUND (not open), KVS_UNSUPPORTED (no data dir), KVS_IO (the log could not be
 * synced: nothing changed, the session stays open). s is freed on success. */
int kvs_session_release(kvs_sessions *S, const char *id, struct kvs_session_info *info, char *err,
                        size_t errlen);

/* Write session s's snapshot (its KV blocks and state, checksummed, temp + rename). With
 * compact, the log is then rewritten to hold only what the snapshot does not (a corrupt
 * snapshot then loses the session: keep compact off where that matters). 0, KVS_IO,
 * KVS_UNSUPPORTED (no data dir, or a backend without block I/O). */
int kvs_session_snapshot(kvs_session *s, bool compact, char *err, size_t errlen);
/* Closes every session (their logs stay on disk) and frees; accepts NULL; nulls *S. */
void kvs_sessions_destroy(kvs_sessions **S);

/* Cells of the pool not reserved by sessions or queries. */
int64_t kvs_sessions_cells_free(const kvs_sessions *S);
int32_t kvs_sessions_count(const kvs_sessions *S);
/* Session i (0 <= i < count), for listing; borrowed. */
kvs_session *kvs_sessions_at(const kvs_sessions *S, int32_t i);

/* ---- sessions ---- */

/* Create session id. Returns 0 and *out (borrowed: owned by S), or KVS_INVALID_ARGUMENT
 * (bad id: 1..128 bytes of [A-Za-z0-9._-], or bad options), KVS_ALREADY_EXISTS,
 * KVS_CAPACITY (the budget does not fit in the unreserved cells), KVS_CONTEXT_FULL (the
 * prefix does not fit the budget), a tokenizer or forward error. err gets one line. */
int kvs_session_create(kvs_sessions *S, const char *id, const struct kvs_session_opts *o,
                       kvs_session **out, char *err, size_t errlen);

/* The session named id, or NULL. */
kvs_session *kvs_session_find(const kvs_sessions *S, const char *id);

/* Close id: free its KV and reservation, remove its log. 0 or KVS_NOT_FOUND. */
int kvs_session_close(kvs_sessions *S, const char *id);

const char *kvs_session_id(const kvs_session *s);
void kvs_session_info(const kvs_session *s, struct kvs_session_info *info);
/* The session's seq (borrowed; for tests and snapshots: do not modify). */
const kvs_seq *kvs_session_seq(const kvs_session *s);
/* Recorded ids (prefix + data), borrowed until the next append. */
const int32_t *kvs_session_tokens(const kvs_session *s, int64_t *n);

/* Append a text record (framed by the data template) or raw token ids. client_id != 0
 * makes the append idempotent per (client_id, client_seq): client_seq must be the client's
 * previous one + 1 (the first may be any value); a repeat of the last one returns its
 * original acknowledgement with duplicate set and applies nothing; anything else is
 * KVS_OUT_OF_ORDER. Errors: KVS_INVALID_ARGUMENT (empty record), KVS_CONTEXT_FULL (REJECT,
 * or SLIDE with nothing evictable), KVS_TOO_LARGE (more than the budget by itself), KVS_IO
 * (the log could not be written: nothing applied). On any error the session is unchanged. */
int kvs_session_append(kvs_session *s, const char *text, size_t len, uint64_t client_id,
                       uint64_t client_seq, struct kvs_append_result *r, char *err,
                       size_t errlen);
int kvs_session_append_tokens(kvs_session *s, const int32_t *ids, int32_t n,
                              uint64_t client_id, uint64_t client_seq,
                              struct kvs_append_result *r, char *err, size_t errlen);

/* Ask question (framed by the question template). The answer streams through cb (may be
 * NULL) and is returned in *a (free with kvs_answer_free). The session is unchanged.
 * Errors: KVS_INVALID_ARGUMENT (empty question, bad options), KVS_BUSY (the reserve for
 * |question| + max_tokens is not available), KVS_CONTEXT_FULL (past the model's context). */
int kvs_session_query(kvs_session *s, const char *question, size_t len,
                      const struct kvs_query_opts *o, kvs_token_fn cb, void *user,
                      struct kvs_answer *a, char *err, size_t errlen);
void kvs_answer_free(struct kvs_answer *a);

/* ---- flash queries ---- */

struct kvs_flash_trigger {
    int32_t every_tokens;            /* re-evaluate once this many new tokens arrived (0 = each append) */
    int32_t min_interval_ms;         /* and at most this often (0 = no limit) */
};

/* Called with every new answer of a flash query (name, answer borrowed for the call). */
typedef void (*kvs_flash_fn)(kvs_session *s, const char *name, const struct kvs_answer *a,
                             void *user);

/* Register name (1..64 bytes of [A-Za-z0-9._-]) with a question, options and trigger; it
 * is evaluated at once. KVS_ALREADY_EXISTS, KVS_TOO_LARGE (more than
 * KVS_FLASH_MAX_PER_SESSION), KVS_INVALID_ARGUMENT, or the query's errors. */
int kvs_flash_register(kvs_session *s, const char *name, const char *question, size_t len,
                       const struct kvs_query_opts *o, const struct kvs_flash_trigger *t,
                       char *err, size_t errlen);
int kvs_flash_unregister(kvs_session *s, const char *name); /* 0 or KVS_NOT_FOUND */
int32_t kvs_flash_count(const kvs_session *s);
const char *kvs_flash_name(const kvs_session *s, int32_t i); /* i < count; borrowed */

enum kvs_flash_mode {
    KVS_FLASH_FRESH = 0,             /* the answer at the current version: cached, or computed now */
    KVS_FLASH_ALLOW_STALE = 1,       /* the cached answer even if older (a->fresh says) */
};

/* The answer of name into *a (a copy; free with kvs_answer_free). a->fresh tells whether it
 * was computed at the current version. KVS_NOT_FOUND for an unknown name. */
int kvs_flash_get(kvs_session *s, const char *name, enum kvs_flash_mode mode,
                  struct kvs_answer *a, char *err, size_t errlen);

/* Watch every new answer of the session's flash queries. One watcher per session (a server
 * fans out to its clients); NULL removes it. */
void kvs_flash_watch(kvs_session *s, kvs_flash_fn fn, void *user);

struct kvs_flash_stats {
    uint64_t evaluations;            /* flash answers computed */
    uint64_t hits;                   /* flash_get served fresh from the cache */
    uint64_t misses;                 /* flash_get that had to compute (or returned stale) */
};
void kvs_flash_stats(const kvs_session *s, struct kvs_flash_stats *st);

const char *kvs_context_policy_name(enum kvs_context_policy p);
const char *kvs_session_format_name(enum kvs_session_format f);

#endif

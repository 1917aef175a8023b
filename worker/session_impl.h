/* Internal to worker/session*.c: the session structs, shared by session.c (semantics) and
 * session_durable.c (logs, snapshots, restore). Not part of any public interface. */
#ifndef KVS_SESSION_IMPL_H
#define KVS_SESSION_IMPL_H

#include <stdbool.h>
#include <stdint.h>

#include "worker/chat.h"
#include "worker/sesslog.h"
#include "worker/session.h"

struct flash {
    char name[KVS_FLASH_NAME_MAX + 1];
    int32_t *question;               /* formatted question ids (owned) */
    int32_t n_question;
    struct kvs_query_opts opts;      /* stops are not kept: flash queries take none */
    struct kvs_flash_trigger trigger;
    struct kvs_answer answer;        /* last answer (owned); answer.version = its version */
    bool has_answer;
    int64_t data_tokens_at_eval;     /* session's total appended tokens at the last eval */
    double last_eval_s;              /* kvs_now() of the last eval */
};

struct client_ack {
    uint64_t client_id;              /* 0 = free slot */
    uint64_t client_seq;             /* last applied */
    struct kvs_append_result ack;    /* its acknowledgement */
    uint64_t last_used;              /* session append counter, for LRU replacement */
};

struct kvs_session {
    kvs_sessions *S;                 /* owner */
    char id[KVS_SESSION_ID_MAX + 1];
    kvs_seq *seq;                    /* prefix + data cells */
    int32_t *tokens;                 /* (cap_tokens) recorded ids: prefix then data */
    int64_t n_tokens, cap_tokens;
    int64_t n_prefix;                /* tokens of the pinned prefix */
    int64_t budget;                  /* cells reserved */
    int32_t reserved_blocks;         /* blocks reserved in S for the budget */
    uint64_t version;
    uint64_t appends;
    int64_t appended_total;          /* tokens ever appended (not reduced by eviction) */
    int64_t evicted;                 /* tokens evicted so far */
    enum kvs_session_format format;
    enum kvs_context_policy policy;
    struct flash *flash;             /* (n_flash) */
    int32_t n_flash;
    kvs_flash_fn watch_fn;
    void *watch_user;
    struct kvs_flash_stats fstats;
    struct client_ack *clients;      /* (KVS_CLIENTS_MAX) */
    kvs_sesslog *log;                /* durable append log, or NULL (in memory only) */
    int64_t visible;                 /* cells of completely appended data (what a query sees) */
    int32_t query_reserve;           /* as created (recorded in the log) */
};

struct kvs_sessions {
    kvs_engine *e;                   /* borrowed */
    char *data_dir;                  /* durable logs and snapshots, or NULL (owned) */
    enum kvs_fsync_policy fsync;     /* for every log */
    struct kvs_log_identity ident;   /* model SHA-256, KV dtype, block size */
    bool restoring;                  /* replaying: apply records, write nothing, no flash evals */
    kvs_session **all;               /* (cap) */
    int32_t n, cap;
    int32_t reserved_blocks;         /* blocks promised to sessions and in-flight queries */
    float overcommit;                /* admission counts against blocks x this (>= 1; 1 = off;
                                      * set by the scheduler: worker/sched.h) */
    uint64_t admission_refused;      /* creations refused with KVS_CAPACITY */
    struct kvs_chat_template chat;   /* the model's template */
};


/* session_durable.c: called by session.c at each state change; no-ops without a data dir.
 * Each returns 0 or KVS_IO (err says why) before the change is acknowledged. */
int kvs_sess_log_create(kvs_session *s, char *err, size_t errlen);
int kvs_sess_log_append(kvs_session *s, const int32_t *ids, int64_t n, uint64_t client_id,
                        uint64_t client_seq, char *err, size_t errlen);
int kvs_sess_log_evict(kvs_session *s, int64_t first_cell, int64_t n_cells, char *err,
                       size_t errlen);
int kvs_sess_log_flash(kvs_session *s, const struct flash *f, bool registered);
void kvs_sess_log_close(kvs_session *s, bool remove_files);

/* session.c internals used by the restore path */
int kvs_sess_append_ids(kvs_session *s, const int32_t *ids, int64_t n, uint64_t client_id,
                        uint64_t client_seq, struct kvs_append_result *r, char *err,
                        size_t errlen);
int kvs_sess_evict(kvs_session *s, int32_t first_block, int32_t n_blocks, char *err,
                   size_t errlen);
int kvs_sess_new(kvs_sessions *S, const char *id, enum kvs_session_format format,
                 enum kvs_context_policy policy, int64_t budget, int32_t query_reserve,
                 const int32_t *prefix, int64_t n_prefix, kvs_session **out, char *err,
                 size_t errlen);
int kvs_sess_flash_add(kvs_session *s, const char *name, const int32_t *q, int32_t nq,
                       const struct kvs_query_opts *o, const struct kvs_flash_trigger *t,
                       bool evaluate, char *err, size_t errlen);
void kvs_sess_free(kvs_session *s);

/* The scheduler's building blocks (worker/sched.c). */
int32_t kvs_sess_blocks_for(const kvs_sessions *S, int64_t cells);
int32_t kvs_sess_blocks_free(const kvs_sessions *S);
/* Data blocks that making room for n more cells would evict or replace (policy slide) while
 * another seq, a query's fork, still references them: nothing reserves the cells those
 * take (evicted ones stay allocated, kept ones are copied), so the scheduler does not slide
 * while this is > 0. 0 when the append does not slide. */
int32_t kvs_sess_slide_shared(const kvs_session *s, int64_t n);
int kvs_sess_check_query_opts(const struct kvs_query_opts *o, char *err, size_t errlen);
struct flash *kvs_sess_flash_find(kvs_session *s, const char *name);
/* Tokenize text with the record (question = false) or question template; *ids malloc'd. */
int kvs_sess_frame(const kvs_session *s, bool question, const char *text, size_t len,
                   int32_t **ids, int64_t *n);
/* Phase 1 of an append: validate, dedup (returns 1 with *r = the original ack), make room
 * (policy), log, record the ids. The caller then prefills the last n recorded ids into
 * s->seq and calls kvs_sess_append_end. */
int kvs_sess_append_begin(kvs_session *s, const int32_t *ids, int64_t n, uint64_t client_id,
                          uint64_t client_seq, struct kvs_append_result *r, char *err,
                          size_t errlen);
void kvs_sess_append_end(kvs_session *s, int64_t n, uint64_t client_id, uint64_t client_seq,
                         struct kvs_append_result *r);

#endif

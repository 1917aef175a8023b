/* Session append log: round trips of every payload kind, the fsync policies (syncs counted),
 * a torn tail cut at every byte of the last record, flipped bits in the last record, garbage
 * after it, corruption in the middle refused without touching the file, another model's
 * header refused, compaction by rewrite (and its leftovers ignored), real ENOSPC on a tiny
 * tmpfs and EFBIG under RLIMIT_FSIZE with the file holding exactly the acknowledged records,
 * and SIGKILL at random moments losing no acknowledged record. */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/status.h"
#include "worker/sesslog.h"

#define SHA_A "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
#define SHA_B "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"

static char dir[256];
static char err[512];
static const struct kvs_log_identity ident_a = {SHA_A, 1, 16};

/* ---- fixtures and helpers ---- */

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    return remove(path);
}

static void setup(void)
{
    snprintf(dir, sizeof dir, "/tmp/kvs_sesslog_XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
    kvs_log_set_level(KVS_LOG_ERROR); /* the expected tail-cut warnings stay quiet */
}

static void teardown(void)
{
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

struct rec {
    uint32_t type;
    size_t len;
    uint64_t offset;
    unsigned char *payload;
};

struct recs {
    struct rec *v;
    size_t n, cap;
    int stop_at; /* return -9 when this many records were seen (-1: never) */
};

static int collect(uint32_t type, const void *payload, size_t len, uint64_t offset, void *user)
{
    struct recs *r = user;
    if (r->stop_at >= 0 && (int)r->n == r->stop_at) {
        return KVS_OUT_OF_RANGE;
    }
    if (r->n == r->cap) {
        r->cap = r->cap ? 2 * r->cap : 16;
        r->v = realloc(r->v, r->cap * sizeof *r->v);
        ck_assert_ptr_nonnull(r->v);
    }
    struct rec *e = &r->v[r->n++];
    e->type = type;
    e->len = len;
    e->offset = offset;
    e->payload = malloc(len + 1);
    memcpy(e->payload, payload, len);
    return 0;
}

static void recs_free(struct recs *r)
{
    for (size_t i = 0; i < r->n; i++) {
        free(r->v[i].payload);
    }
    free(r->v);
    memset(r, 0, sizeof *r);
    r->stop_at = -1;
}

static void path_of(char *out, size_t cap, const char *id, const char *suffix)
{
    snprintf(out, cap, "%s/%s%s", dir, id, suffix);
}

static off_t file_size(const char *id)
{
    char p[512];
    struct stat sb;
    path_of(p, sizeof p, id, ".log");
    ck_assert_int_eq(stat(p, &sb), 0);
    return sb.st_size;
}

static unsigned char *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)n + 1);
    ck_assert_uint_eq(fread(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return b;
}

static void write_all(const char *path, const unsigned char *b, size_t len)
{
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(b, 1, len, f), len);
    fclose(f);
}

/* Payload of record i: i+1 bytes derived from i (record 0 has 1 byte). */
static size_t fill_payload(unsigned char *p, int i)
{
    size_t n = (size_t)(i % 37) + 1;
    for (size_t k = 0; k < n; k++) {
        p[k] = (unsigned char)(i * 31 + k * 7);
    }
    return n;
}

/* A log of n records of varied types and sizes; returns offsets of each record in offs. */
static void make_log(const char *id, int n, uint64_t *offs)
{
    kvs_sesslog *log = NULL;
    ck_assert_int_eq(kvs_sesslog_create(dir, id, &ident_a, KVS_FSYNC_NO, &log, err, sizeof err), 0);
    unsigned char p[64];
    for (int i = 0; i < n; i++) {
        if (offs != NULL) {
            offs[i] = kvs_sesslog_end(log);
        }
        size_t len = fill_payload(p, i);
        ck_assert_int_eq(kvs_sesslog_append(log, (uint32_t)(i % 6) + 1, p, len), 0);
    }
    kvs_sesslog_close(&log);
    ck_assert_ptr_null(log);
}

static void check_records(const struct recs *r, int n)
{
    ck_assert_uint_eq(r->n, (size_t)n);
    unsigned char p[64];
    for (int i = 0; i < n; i++) {
        size_t len = fill_payload(p, i);
        ck_assert_uint_eq(r->v[i].type, (uint32_t)(i % 6) + 1);
        ck_assert_uint_eq(r->v[i].len, len);
        ck_assert_mem_eq(r->v[i].payload, p, len);
    }
}

/* ---- tests ---- */

START_TEST(test_ids_policies_crc)
{
    ck_assert_int_eq(kvs_sesslog_check_id("abc"), 0);
    ck_assert_int_eq(kvs_sesslog_check_id("A-b_c.9"), 0);
    ck_assert_int_eq(kvs_sesslog_check_id(".hidden"), KVS_INVALID_ARGUMENT);
    ck_assert_int_eq(kvs_sesslog_check_id(""), KVS_INVALID_ARGUMENT);
    ck_assert_int_eq(kvs_sesslog_check_id(NULL), KVS_INVALID_ARGUMENT);
    ck_assert_int_eq(kvs_sesslog_check_id("a/b"), KVS_INVALID_ARGUMENT);
    ck_assert_int_eq(kvs_sesslog_check_id("a b"), KVS_INVALID_ARGUMENT);
    ck_assert_int_eq(kvs_sesslog_check_id("\xc3\xa9"), KVS_INVALID_ARGUMENT);
    char id[200];
    memset(id, 'x', sizeof id);
    id[128] = '\0';
    ck_assert_int_eq(kvs_sesslog_check_id(id), 0);
    id[128] = 'x';
    id[129] = '\0';
    ck_assert_int_eq(kvs_sesslog_check_id(id), KVS_INVALID_ARGUMENT);

    kvs_sesslog *log = NULL;
    ck_assert_int_eq(kvs_sesslog_create(dir, "../x", &ident_a, KVS_FSYNC_NO, &log, err, sizeof err),
                     KVS_INVALID_ARGUMENT);
    struct kvs_log_identity bad = ident_a;
    bad.model_sha256[3] = 'G';
    ck_assert_int_eq(kvs_sesslog_create(dir, "x", &bad, KVS_FSYNC_NO, &log, err, sizeof err),
                     KVS_INVALID_ARGUMENT);
    ck_assert_ptr_null(log);

    enum kvs_fsync_policy p;
    ck_assert_int_eq(kvs_fsync_policy_parse("always", &p), 0);
    ck_assert_int_eq(p, KVS_FSYNC_ALWAYS);
    ck_assert_int_eq(kvs_fsync_policy_parse("everysec", &p), 0);
    ck_assert_int_eq(p, KVS_FSYNC_EVERYSEC);
    ck_assert_int_eq(kvs_fsync_policy_parse("no", &p), 0);
    ck_assert_int_eq(p, KVS_FSYNC_NO);
    ck_assert_int_eq(kvs_fsync_policy_parse("sometimes", &p), KVS_INVALID_ARGUMENT);
    ck_assert_str_eq(kvs_fsync_policy_name(KVS_FSYNC_EVERYSEC), "everysec");

    /* the standard CRC-32C check value */
    ck_assert_uint_eq(kvs_crc32c(0, "123456789", 9), 0xe3069283u);
    ck_assert_uint_eq(kvs_crc32c(kvs_crc32c(0, "1234", 4), "56789", 5), 0xe3069283u);
}
END_TEST

START_TEST(test_payload_codecs)
{
    int32_t toks[5] = {1, -2, 70000, 0x7fffffff, -0x7fffffff - 1};
    struct kvs_log_append a = {.client_id = 0x1122334455667788ull,
                               .client_seq = 42,
                               .version_after = 7,
                               .n_tokens = 5,
                               .tokens = toks};
    unsigned char buf[64];
    ck_assert_uint_eq(kvs_log_append_size(5), 48);
    ck_assert_int_eq(kvs_log_append_encode(&a, buf, sizeof buf), 48);
    ck_assert_int_eq(kvs_log_append_encode(&a, buf, 47), KVS_INVALID_ARGUMENT);
    /* little-endian on the wire */
    ck_assert_uint_eq(buf[0], 0x88);
    ck_assert_uint_eq(buf[24], 5);
    struct kvs_log_append d;
    ck_assert_int_eq(kvs_log_append_decode(buf, 48, &d), 0);
    ck_assert_uint_eq(d.client_id, a.client_id);
    ck_assert_uint_eq(d.client_seq, 42);
    ck_assert_uint_eq(d.version_after, 7);
    ck_assert_uint_eq(d.n_tokens, 5);
    int32_t back[5];
    kvs_log_append_tokens(&d, back);
    ck_assert_mem_eq(back, toks, sizeof toks);
    ck_assert_int_eq(kvs_log_append_decode(buf, 47, &d), KVS_BAD_FORMAT);
    ck_assert_int_eq(kvs_log_append_decode(buf, 52, &d), KVS_BAD_FORMAT);
    ck_assert_int_eq(kvs_log_append_decode(buf, 3, &d), KVS_BAD_FORMAT);
    buf[27] = 0x40; /* n_tokens = 2^30 + 5: length no longer matches */
    ck_assert_int_eq(kvs_log_append_decode(buf, 48, &d), KVS_BAD_FORMAT);
    ck_assert_uint_eq(kvs_log_append_size(UINT32_MAX), 0);
    ck_assert_uint_eq(kvs_log_append_size((KVS_SESSLOG_MAX_PAYLOAD - 28) / 4),
                      KVS_SESSLOG_MAX_PAYLOAD);
    ck_assert_uint_eq(kvs_log_append_size((KVS_SESSLOG_MAX_PAYLOAD - 28) / 4 + 1), 0);

    struct kvs_log_evict e = {.version_after = 9, .first_cell = 3, .n_cells = 100}, f;
    unsigned char eb[KVS_LOG_EVICT_BYTES];
    kvs_log_evict_encode(&e, eb);
    ck_assert_int_eq(kvs_log_evict_decode(eb, sizeof eb, &f), 0);
    ck_assert_uint_eq(f.version_after, 9);
    ck_assert_uint_eq(f.first_cell, 3);
    ck_assert_uint_eq(f.n_cells, 100);
    ck_assert_int_eq(kvs_log_evict_decode(eb, 15, &f), KVS_BAD_FORMAT);
}
END_TEST

START_TEST(test_round_trip)
{
    kvs_sesslog *log = NULL;
    ck_assert_int_eq(
        kvs_sesslog_create(dir, "s1", &ident_a, KVS_FSYNC_ALWAYS, &log, err, sizeof err), 0);
    ck_assert_uint_eq(kvs_sesslog_end(log), KVS_SESSLOG_HEADER_BYTES);
    ck_assert_int_eq(kvs_sesslog_append(log, KVS_LOG_CREATE, "{\"budget\":64}", 13), 0);
    int32_t toks[3] = {10, 20, 30};
    struct kvs_log_append a = {
        .client_id = 5, .client_seq = 1, .version_after = 1, .n_tokens = 3, .tokens = toks};
    ck_assert_int_eq(kvs_sesslog_append_tokens(log, &a), 0);
    unsigned char eb[KVS_LOG_EVICT_BYTES];
    kvs_log_evict_encode(&(struct kvs_log_evict){2, 0, 16}, eb);
    ck_assert_int_eq(kvs_sesslog_append(log, KVS_LOG_EVICT, eb, sizeof eb), 0);
    ck_assert_int_eq(kvs_sesslog_append(log, KVS_LOG_FLASH_UNREGISTER, NULL, 0), 0);
    /* refusals write nothing */
    uint64_t end = kvs_sesslog_end(log);
    ck_assert_int_eq(kvs_sesslog_append(log, 0, "x", 1), KVS_INVALID_ARGUMENT);
    ck_assert_int_eq(kvs_sesslog_append(log, 256, "x", 1), KVS_INVALID_ARGUMENT);
    ck_assert_int_eq(kvs_sesslog_append(log, 1, "x", (size_t)KVS_SESSLOG_MAX_PAYLOAD + 1),
                     KVS_TOO_LARGE);
    ck_assert_uint_eq(kvs_sesslog_end(log), end);
    ck_assert_int_eq(file_size("s1"), (off_t)end);
    /* a second handle on an open log: busy */
    kvs_sesslog *two = NULL;
    ck_assert_int_eq(kvs_sesslog_open(dir, "s1", &ident_a, KVS_FSYNC_NO, &two, err, sizeof err),
                     KVS_BUSY);
    ck_assert_int_eq(kvs_sesslog_create(dir, "s1", &ident_a, KVS_FSYNC_NO, &two, err, sizeof err),
                     KVS_ALREADY_EXISTS);
    kvs_sesslog_close(&log);

    struct recs r = {.stop_at = -1};
    struct kvs_replay_stats st;
    ck_assert_int_eq(kvs_sesslog_replay(dir, "s1", &ident_a, collect, &r, &st, err, sizeof err), 0);
    ck_assert_int_eq(st.tail, KVS_REPLAY_CLEAN);
    ck_assert_uint_eq(st.n_records, 4);
    ck_assert_uint_eq(st.end_offset, end);
    ck_assert_uint_eq(st.dropped_bytes, 0);
    ck_assert_uint_eq(r.n, 4);
    ck_assert_uint_eq(r.v[0].type, KVS_LOG_CREATE);
    ck_assert_uint_eq(r.v[0].offset, KVS_SESSLOG_HEADER_BYTES);
    ck_assert_mem_eq(r.v[0].payload, "{\"budget\":64}", 13);
    ck_assert_uint_eq(r.v[1].type, KVS_LOG_APPEND);
    ck_assert_uint_eq(r.v[1].offset, KVS_SESSLOG_HEADER_BYTES + 12 + 13);
    struct kvs_log_append d;
    ck_assert_int_eq(kvs_log_append_decode(r.v[1].payload, r.v[1].len, &d), 0);
    int32_t back[3];
    kvs_log_append_tokens(&d, back);
    ck_assert_mem_eq(back, toks, sizeof toks);
    struct kvs_log_evict e;
    ck_assert_int_eq(kvs_log_evict_decode(r.v[2].payload, r.v[2].len, &e), 0);
    ck_assert_uint_eq(e.n_cells, 16);
    ck_assert_uint_eq(r.v[3].len, 0);
    recs_free(&r);

    /* reopen, append more, replay all */
    ck_assert_int_eq(kvs_sesslog_open(dir, "s1", &ident_a, KVS_FSYNC_NO, &log, err, sizeof err), 0);
    ck_assert_uint_eq(kvs_sesslog_end(log), end);
    ck_assert_int_eq(kvs_sesslog_append(log, KVS_LOG_SNAPSHOT, "z", 1), 0);
    kvs_sesslog_close(&log);
    ck_assert_int_eq(kvs_sesslog_open_replay(dir, "s1", &ident_a, KVS_FSYNC_NO, collect, &r, &st,
                                             &log, err, sizeof err),
                     0);
    ck_assert_uint_eq(r.n, 5);
    ck_assert_uint_eq(r.v[4].type, KVS_LOG_SNAPSHOT);
    kvs_sesslog_close(&log);
    recs_free(&r);

    ck_assert_int_eq(kvs_sesslog_remove(dir, "s1"), 0);
    ck_assert_int_eq(kvs_sesslog_remove(dir, "s1"), KVS_NOT_FOUND);
    ck_assert_int_eq(kvs_sesslog_replay(dir, "s1", &ident_a, collect, &r, &st, err, sizeof err),
                     KVS_NOT_FOUND);
    ck_assert_int_eq(kvs_sesslog_open(dir, "nope", &ident_a, KVS_FSYNC_NO, &log, err, sizeof err),
                     KVS_NOT_FOUND);
    ck_assert_ptr_null(log);
}
END_TEST

START_TEST(test_model_mismatch)
{
    make_log("m", 3, NULL);
    struct kvs_log_identity b = {SHA_B, 1, 16};
    ck_assert_int_eq(kvs_sesslog_replay(dir, "m", &b, NULL, NULL, NULL, err, sizeof err),
                     KVS_MODEL_MISMATCH);
    ck_assert_ptr_nonnull(strstr(err, SHA_A));
    ck_assert_ptr_nonnull(strstr(err, SHA_B));
    struct kvs_log_identity c = {SHA_A, 0, 16}; /* another KV dtype */
    ck_assert_int_eq(kvs_sesslog_replay(dir, "m", &c, NULL, NULL, NULL, err, sizeof err),
                     KVS_MODEL_MISMATCH);
    ck_assert_ptr_nonnull(strstr(err, "kv dtype 0"));
    struct kvs_log_identity d = {SHA_A, 1, 32}; /* another block size */
    kvs_sesslog *log = NULL;
    ck_assert_int_eq(kvs_sesslog_open(dir, "m", &d, KVS_FSYNC_NO, &log, err, sizeof err),
                     KVS_MODEL_MISMATCH);
    ck_assert_ptr_nonnull(strstr(err, "block size 32"));
    ck_assert_ptr_null(log);

    /* the file of another session under this name: refused */
    char from[512], to[512];
    path_of(from, sizeof from, "m", ".log");
    path_of(to, sizeof to, "other", ".log");
    ck_assert_int_eq(link(from, to), 0);
    ck_assert_int_eq(kvs_sesslog_replay(dir, "other", &ident_a, NULL, NULL, NULL, err, sizeof err),
                     KVS_BAD_FORMAT);
    ck_assert_ptr_nonnull(strstr(err, "holds session 'm'"));

    /* a damaged header, a short file, another version */
    size_t len;
    unsigned char *b0 = read_all(from, &len);
    unsigned char *b1 = malloc(len);
    memcpy(b1, b0, len);
    b1[100] ^= 1;
    write_all(from, b1, len);
    ck_assert_int_eq(kvs_sesslog_replay(dir, "m", &ident_a, NULL, NULL, NULL, err, sizeof err),
                     KVS_BAD_FORMAT);
    write_all(from, b0, 100);
    ck_assert_int_eq(kvs_sesslog_replay(dir, "m", &ident_a, NULL, NULL, NULL, err, sizeof err),
                     KVS_BAD_FORMAT);
    memcpy(b1, b0, len);
    b1[8] = 2;
    write_all(from, b1, len);
    ck_assert_int_eq(kvs_sesslog_replay(dir, "m", &ident_a, NULL, NULL, NULL, err, sizeof err),
                     KVS_UNSUPPORTED);
    free(b0);
    free(b1);
}
END_TEST

START_TEST(test_fsync_policies)
{
    struct kvs_sesslog_stats st;
    kvs_sesslog *log = NULL;
    /* ALWAYS: one fdatasync per acknowledged append (plus the creation's) */
    ck_assert_int_eq(
        kvs_sesslog_create(dir, "al", &ident_a, KVS_FSYNC_ALWAYS, &log, err, sizeof err), 0);
    for (int i = 0; i < 50; i++) {
        ck_assert_int_eq(kvs_sesslog_append(log, 2, "abcd", 4), 0);
        kvs_sesslog_get_stats(log, &st);
        ck_assert_uint_eq(st.n_syncs, (uint64_t)i + 2);
        ck_assert_uint_eq(st.unsynced, 0);
    }
    ck_assert_uint_eq(st.n_appends, 50);
    ck_assert_uint_eq(st.bytes, KVS_SESSLOG_HEADER_BYTES + 50 * 16);
    kvs_sesslog_close(&log);

    /* EVERYSEC: at most one sync a second from the append path; tick flushes a pending one */
    ck_assert_int_eq(
        kvs_sesslog_create(dir, "es", &ident_a, KVS_FSYNC_EVERYSEC, &log, err, sizeof err), 0);
    for (int i = 0; i < 200; i++) {
        ck_assert_int_eq(kvs_sesslog_append(log, 2, "abcd", 4), 0);
    }
    ck_assert_int_eq(kvs_sesslog_tick(log), 0);
    kvs_sesslog_get_stats(log, &st);
    ck_assert_uint_le(st.n_syncs, 2); /* the creation's, and at most one more */
    ck_assert_uint_gt(st.unsynced, 0);
    uint64_t before = st.n_syncs;
    struct timespec ts = {1, 50 * 1000 * 1000};
    nanosleep(&ts, NULL);
    ck_assert_int_eq(kvs_sesslog_tick(log), 0);
    kvs_sesslog_get_stats(log, &st);
    ck_assert_uint_eq(st.n_syncs, before + 1);
    ck_assert_uint_eq(st.unsynced, 0);
    ck_assert_int_eq(kvs_sesslog_tick(log), 0); /* nothing pending: no sync */
    kvs_sesslog_get_stats(log, &st);
    ck_assert_uint_eq(st.n_syncs, before + 1);
    nanosleep(&ts, NULL);
    ck_assert_int_eq(kvs_sesslog_append(log, 2, "abcd", 4), 0); /* > 1 s: the append syncs */
    kvs_sesslog_get_stats(log, &st);
    ck_assert_uint_eq(st.n_syncs, before + 2);
    ck_assert_uint_eq(st.unsynced, 0);
    kvs_sesslog_close(&log);

    /* NO: never (only the creation's) */
    ck_assert_int_eq(kvs_sesslog_create(dir, "no", &ident_a, KVS_FSYNC_NO, &log, err, sizeof err),
                     0);
    for (int i = 0; i < 50; i++) {
        ck_assert_int_eq(kvs_sesslog_append(log, 2, "abcd", 4), 0);
    }
    nanosleep(&ts, NULL);
    ck_assert_int_eq(kvs_sesslog_tick(log), 0);
    kvs_sesslog_get_stats(log, &st);
    ck_assert_uint_eq(st.n_syncs, 1);
    ck_assert_uint_eq(st.unsynced, 50);
    ck_assert_int_eq(kvs_sesslog_sync(log), 0); /* explicit sync works under any policy */
    kvs_sesslog_get_stats(log, &st);
    ck_assert_uint_eq(st.n_syncs, 2);
    kvs_sesslog_close(&log);
}
END_TEST

#define N_REC 12

START_TEST(test_torn_tail_every_offset)
{
    uint64_t offs[N_REC];
    make_log("t", N_REC, offs);
    char path[512];
    path_of(path, sizeof path, "t", ".log");
    size_t full;
    unsigned char *b = read_all(path, &full);
    uint64_t last = offs[N_REC - 1];
    for (uint64_t cut = last; cut < full; cut++) {
        write_all(path, b, cut);
        struct recs r = {.stop_at = -1};
        struct kvs_replay_stats st;
        ck_assert_int_eq(kvs_sesslog_replay(dir, "t", &ident_a, collect, &r, &st, err, sizeof err),
                         0);
        check_records(&r, N_REC - 1);
        ck_assert_int_eq(file_size("t"), (off_t)last);
        ck_assert_uint_eq(st.end_offset, last);
        ck_assert_uint_eq(st.dropped_bytes, cut - last);
        ck_assert_int_eq(st.tail, cut == last ? KVS_REPLAY_CLEAN : KVS_REPLAY_TORN);
        recs_free(&r);
    }
    /* after a cut, appends continue right after the last good record */
    kvs_sesslog *log = NULL;
    write_all(path, b, full - 3);
    ck_assert_int_eq(kvs_sesslog_open(dir, "t", &ident_a, KVS_FSYNC_NO, &log, err, sizeof err), 0);
    ck_assert_uint_eq(kvs_sesslog_end(log), last);
    unsigned char p[64];
    size_t len = fill_payload(p, N_REC - 1);
    ck_assert_int_eq(kvs_sesslog_append(log, (uint32_t)((N_REC - 1) % 6) + 1, p, len), 0);
    kvs_sesslog_close(&log);
    struct recs r = {.stop_at = -1};
    ck_assert_int_eq(kvs_sesslog_replay(dir, "t", &ident_a, collect, &r, NULL, err, sizeof err), 0);
    check_records(&r, N_REC);
    recs_free(&r);
    free(b);
}
END_TEST

START_TEST(test_flipped_bits_last_record)
{
    uint64_t offs[N_REC];
    make_log("f", N_REC, offs);
    char path[512];
    path_of(path, sizeof path, "f", ".log");
    size_t full;
    unsigned char *b = read_all(path, &full);
    unsigned char *c = malloc(full);
    uint64_t last = offs[N_REC - 1];
    for (uint64_t at = last; at < full; at++) {
        for (int bit = 0; bit < 8; bit += 3) {
            memcpy(c, b, full);
            c[at] ^= (unsigned char)(1u << bit);
            write_all(path, c, full);
            struct recs r = {.stop_at = -1};
            struct kvs_replay_stats st;
            ck_assert_int_eq(
                kvs_sesslog_replay(dir, "f", &ident_a, collect, &r, &st, err, sizeof err), 0);
            check_records(&r, N_REC - 1);
            ck_assert_int_eq(file_size("f"), (off_t)last);
            ck_assert_uint_eq(st.bad_offset, last);
            ck_assert_int_ne(st.tail, KVS_REPLAY_CLEAN);
            ck_assert_int_ne(st.tail, KVS_REPLAY_CORRUPT);
            recs_free(&r);
        }
    }
    /* the two last records both damaged: both cut */
    memcpy(c, b, full);
    c[offs[N_REC - 2] + 9] ^= 0x10;
    c[full - 1] ^= 0x10;
    write_all(path, c, full);
    struct recs r = {.stop_at = -1};
    ck_assert_int_eq(kvs_sesslog_replay(dir, "f", &ident_a, collect, &r, NULL, err, sizeof err), 0);
    check_records(&r, N_REC - 2);
    ck_assert_int_eq(file_size("f"), (off_t)offs[N_REC - 2]);
    recs_free(&r);
    free(b);
    free(c);
}
END_TEST

START_TEST(test_garbage_after_last)
{
    uint64_t offs[N_REC];
    make_log("g", N_REC, offs);
    char path[512];
    path_of(path, sizeof path, "g", ".log");
    size_t full;
    unsigned char *b = read_all(path, &full);
    unsigned char *c = calloc(1, full + 8192);
    memcpy(c, b, full);
    /* zeros (a file extended but never written, as after a power cut), then random bytes */
    for (int kind = 0; kind < 2; kind++) {
        if (kind == 1) {
            srand(7);
            for (size_t i = full; i < full + 8192; i++) {
                c[i] = (unsigned char)rand();
            }
        }
        write_all(path, c, full + 8192);
        struct recs r = {.stop_at = -1};
        struct kvs_replay_stats st;
        ck_assert_int_eq(kvs_sesslog_replay(dir, "g", &ident_a, collect, &r, &st, err, sizeof err),
                         0);
        check_records(&r, N_REC);
        ck_assert_uint_eq(st.dropped_bytes, 8192);
        ck_assert_int_eq(file_size("g"), (off_t)full);
        recs_free(&r);
    }
    free(b);
    free(c);
}
END_TEST

START_TEST(test_corrupt_middle)
{
    uint64_t offs[N_REC];
    make_log("c", N_REC, offs);
    char path[512];
    path_of(path, sizeof path, "c", ".log");
    size_t full;
    unsigned char *b = read_all(path, &full);
    unsigned char *c = malloc(full);
    /* a payload byte, the CRC, the type, and the length (small and huge) of record 5 */
    const uint64_t where[] = {offs[5] + 9, offs[6] - 1, offs[5] + 4, offs[5], offs[5] + 3};
    for (size_t k = 0; k < sizeof where / sizeof where[0]; k++) {
        memcpy(c, b, full);
        c[where[k]] ^= 0x41;
        write_all(path, c, full);
        struct recs r = {.stop_at = -1};
        struct kvs_replay_stats st;
        ck_assert_int_eq(kvs_sesslog_replay(dir, "c", &ident_a, collect, &r, &st, err, sizeof err),
                         KVS_BAD_FORMAT);
        ck_assert_int_eq(st.tail, KVS_REPLAY_CORRUPT);
        ck_assert_uint_eq(st.bad_offset, offs[5]);
        ck_assert_ptr_nonnull(strstr(err, "corrupt in the middle"));
        check_records(&r, 5); /* the records before it, and nothing after */
        recs_free(&r);
        /* the file is left exactly as it was */
        size_t now;
        unsigned char *d = read_all(path, &now);
        ck_assert_uint_eq(now, full);
        ck_assert_mem_eq(d, c, full);
        free(d);
        kvs_sesslog *log = NULL;
        ck_assert_int_eq(kvs_sesslog_open(dir, "c", &ident_a, KVS_FSYNC_NO, &log, err, sizeof err),
                         KVS_BAD_FORMAT);
        ck_assert_ptr_null(log);
    }
    /* recovery: start the log afresh over the corrupt one */
    struct kvs_log_record head[2] = {{KVS_LOG_CREATE, "opts", 4}, {KVS_LOG_SNAPSHOT, NULL, 0}};
    kvs_sesslog *log = NULL, *two = NULL;
    ck_assert_int_eq(
        kvs_sesslog_replace(dir, "c", &ident_a, KVS_FSYNC_ALWAYS, head, 2, &log, err, sizeof err),
        0);
    ck_assert_int_eq(
        kvs_sesslog_replace(dir, "c", &ident_a, KVS_FSYNC_ALWAYS, head, 2, &two, err, sizeof err),
        KVS_BUSY); /* not while it is open */
    ck_assert_ptr_null(two);
    ck_assert_int_eq(kvs_sesslog_append(log, KVS_LOG_APPEND, "after", 5), 0);
    kvs_sesslog_close(&log);
    struct recs r = {.stop_at = -1};
    struct kvs_replay_stats st;
    ck_assert_int_eq(kvs_sesslog_replay(dir, "c", &ident_a, collect, &r, &st, err, sizeof err), 0);
    ck_assert_int_eq(st.tail, KVS_REPLAY_CLEAN);
    ck_assert_uint_eq(r.n, 3);
    ck_assert_uint_eq(r.v[0].type, KVS_LOG_CREATE);
    ck_assert_uint_eq(r.v[1].type, KVS_LOG_SNAPSHOT);
    ck_assert_mem_eq(r.v[2].payload, "after", 5);
    recs_free(&r);
    /* replace also creates a log that did not exist; no temp file stays behind */
    ck_assert_int_eq(
        kvs_sesslog_replace(dir, "fresh", &ident_a, KVS_FSYNC_NO, NULL, 0, &log, err, sizeof err),
        0);
    kvs_sesslog_close(&log);
    char tmp[512];
    path_of(tmp, sizeof tmp, "fresh", ".log.tmp");
    ck_assert_int_eq(access(tmp, F_OK), -1);
    ck_assert_int_eq(file_size("fresh"), KVS_SESSLOG_HEADER_BYTES);
    free(b);
    free(c);
}
END_TEST

START_TEST(test_callback_stops)
{
    make_log("cb", N_REC, NULL);
    struct recs r = {.stop_at = 3};
    struct kvs_replay_stats st;
    ck_assert_int_eq(kvs_sesslog_replay(dir, "cb", &ident_a, collect, &r, &st, err, sizeof err),
                     KVS_OUT_OF_RANGE);
    ck_assert_int_eq(st.tail, KVS_REPLAY_STOPPED);
    ck_assert_uint_eq(r.n, 3);
    ck_assert_uint_eq(st.n_records, 3);
    recs_free(&r);
}
END_TEST

START_TEST(test_rewrite)
{
    uint64_t offs[N_REC];
    make_log("rw", N_REC, offs);
    char path[512], tmp[512];
    path_of(path, sizeof path, "rw", ".log");
    path_of(tmp, sizeof tmp, "rw", ".log.tmp");
    /* a crashed earlier rewrite left a temp file: ignored, then overwritten */
    write_all(tmp, (const unsigned char *)"garbage", 7);
    kvs_sesslog *log = NULL;
    ck_assert_int_eq(kvs_sesslog_open(dir, "rw", &ident_a, KVS_FSYNC_ALWAYS, &log, err, sizeof err),
                     0);
    /* not a record boundary: refused, the old log intact and in use, no temp left */
    ck_assert_int_eq(kvs_sesslog_rewrite(log, NULL, 0, offs[4] + 1), KVS_INVALID_ARGUMENT);
    ck_assert_int_eq(access(tmp, F_OK), -1);
    ck_assert_int_eq(kvs_sesslog_rewrite(log, NULL, 0, 10), KVS_INVALID_ARGUMENT);
    struct kvs_log_record head[2] = {{KVS_LOG_CREATE, "opts", 4}, {KVS_LOG_SNAPSHOT, NULL, 0}};
    ck_assert_int_eq(kvs_sesslog_rewrite(log, head, 2, offs[8]), 0);
    ck_assert_int_eq(access(tmp, F_OK), -1);
    uint64_t kept = KVS_SESSLOG_HEADER_BYTES + 16 + 12;
    for (int i = 8; i < N_REC; i++) {
        kept += 12 + (uint64_t)(i % 37) + 1;
    }
    ck_assert_uint_eq(kvs_sesslog_end(log), kept);
    ck_assert_int_eq(file_size("rw"), (off_t)kept);
    /* appends go to the new file */
    ck_assert_int_eq(kvs_sesslog_append(log, 2, "new", 3), 0);
    kvs_sesslog_close(&log);
    struct recs r = {.stop_at = -1};
    ck_assert_int_eq(kvs_sesslog_replay(dir, "rw", &ident_a, collect, &r, NULL, err, sizeof err),
                     0);
    ck_assert_uint_eq(r.n, 2 + (N_REC - 8) + 1);
    ck_assert_uint_eq(r.v[0].type, KVS_LOG_CREATE);
    ck_assert_mem_eq(r.v[0].payload, "opts", 4);
    ck_assert_uint_eq(r.v[1].type, KVS_LOG_SNAPSHOT);
    unsigned char p[64];
    for (int i = 8; i < N_REC; i++) {
        size_t len = fill_payload(p, i);
        ck_assert_uint_eq(r.v[2 + i - 8].len, len);
        ck_assert_mem_eq(r.v[2 + i - 8].payload, p, len);
    }
    ck_assert_mem_eq(r.v[r.n - 1].payload, "new", 3);
    recs_free(&r);

    /* keep nothing: the log is the header plus the head records */
    ck_assert_int_eq(kvs_sesslog_open(dir, "rw", &ident_a, KVS_FSYNC_NO, &log, err, sizeof err), 0);
    ck_assert_int_eq(kvs_sesslog_rewrite(log, head + 1, 1, kvs_sesslog_end(log)), 0);
    ck_assert_uint_eq(kvs_sesslog_end(log), KVS_SESSLOG_HEADER_BYTES + 12);
    kvs_sesslog_close(&log);
    ck_assert_int_eq(kvs_sesslog_replay(dir, "rw", &ident_a, collect, &r, NULL, err, sizeof err),
                     0);
    ck_assert_uint_eq(r.n, 1);
    recs_free(&r);
}
END_TEST

/* Fill a log on a file system without space (or beyond a file-size limit) until appends fail,
 * then check that the file holds exactly the acknowledged records, that the log still works
 * once space is back (free_space), and that a replay sees every acknowledged record. */
static void fill_until_failure(const char *d, void (*free_space)(void), const char *errno_text,
                               bool disk_full)
{
    kvs_sesslog *log = NULL;
    ck_assert_int_eq(
        kvs_sesslog_create(d, "full", &ident_a, KVS_FSYNC_ALWAYS, &log, err, sizeof err), 0);
    unsigned char p[3000];
    int acked = 0, failures = 0;
    for (int i = 0; i < 2000 && failures < 3; i++) {
        memset(p, acked & 0xff, sizeof p);
        uint64_t end = kvs_sesslog_end(log);
        int rc = kvs_sesslog_append(log, 2, p, sizeof p - (size_t)(acked % 7) * 100);
        if (rc == 0) {
            acked++;
            continue;
        }
        ck_assert_int_eq(rc, KVS_IO);
        ck_assert_ptr_nonnull(strstr(kvs_sesslog_last_error(log), errno_text));
        ck_assert_uint_eq(kvs_sesslog_end(log), end);
        char path[512];
        struct stat sb;
        snprintf(path, sizeof path, "%s/full.log", d);
        ck_assert_int_eq(stat(path, &sb), 0);
        ck_assert_int_eq(sb.st_size, (off_t)end); /* no partial record left behind */
        failures++;
    }
    ck_assert_int_eq(failures, 3);
    ck_assert_int_gt(acked, 0);
    if (disk_full) {
        /* compaction needs room for a copy: it fails, the old log stays whole and in use */
        uint64_t end = kvs_sesslog_end(log);
        ck_assert_int_eq(kvs_sesslog_rewrite(log, NULL, 0, KVS_SESSLOG_HEADER_BYTES), KVS_IO);
        ck_assert_uint_eq(kvs_sesslog_end(log), end);
        char tmp[512];
        snprintf(tmp, sizeof tmp, "%s/full.log.tmp", d);
        ck_assert_int_eq(access(tmp, F_OK), -1);
    }
    free_space();
    memset(p, acked & 0xff, sizeof p);
    ck_assert_int_eq(kvs_sesslog_append(log, 2, p, sizeof p - (size_t)(acked % 7) * 100), 0);
    acked++;
    kvs_sesslog_close(&log);
    struct recs r = {.stop_at = -1};
    struct kvs_replay_stats st;
    ck_assert_int_eq(kvs_sesslog_replay(d, "full", &ident_a, collect, &r, &st, err, sizeof err), 0);
    ck_assert_int_eq(st.tail, KVS_REPLAY_CLEAN);
    ck_assert_uint_eq(r.n, (size_t)acked);
    for (int i = 0; i < acked; i++) {
        ck_assert_uint_eq(r.v[i].len, sizeof p - (size_t)(i % 7) * 100);
        ck_assert_uint_eq(r.v[i].payload[0], (unsigned)(i & 0xff));
        ck_assert_uint_eq(r.v[i].payload[r.v[i].len - 1], (unsigned)(i & 0xff));
    }
    recs_free(&r);
}

static char mnt[300];
static char filler[400];
static bool tmpfs_ok;

static void free_filler(void)
{
    ck_assert_int_eq(unlink(filler), 0);
}

static void tmpfs_setup(void)
{
    setup();
    snprintf(mnt, sizeof mnt, "%s/mnt", dir);
    ck_assert_int_eq(mkdir(mnt, 0700), 0);
    ck_assert_int_eq(mount("tmpfs", mnt, "tmpfs", 0, "size=256k"), 0);
}

static void tmpfs_teardown(void)
{
    umount2(mnt, MNT_DETACH);
    teardown();
}

START_TEST(test_enospc_tmpfs)
{
    /* a filler file takes 64 KiB; freeing it is "space is back" */
    snprintf(filler, sizeof filler, "%s/filler", mnt);
    unsigned char *z = calloc(1, 65536);
    write_all(filler, z, 65536);
    free(z);
    fill_until_failure(mnt, free_filler, strerror(ENOSPC), true);
}
END_TEST

static void raise_fsize(void)
{
    struct rlimit rl = {RLIM_INFINITY, RLIM_INFINITY};
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &rl), 0);
}

START_TEST(test_efbig_rlimit)
{
    /* this test runs in its own (forked) process: the limit and the ignored signal stay here */
    signal(SIGXFSZ, SIG_IGN);
    struct rlimit rl = {100 * 1000, RLIM_INFINITY};
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &rl), 0);
    fill_until_failure(dir, raise_fsize, strerror(EFBIG), false);
}
END_TEST

/* SIGKILL at random moments: a child appends with ALWAYS and reports each acknowledged
 * client_seq on a pipe; after the kill, a replay holds every acknowledged record in order,
 * plus at most one more (written but not yet acknowledged). The next round continues the
 * same log. */
static void child_append(int wfd, uint64_t first)
{
    char e[256];
    kvs_sesslog *log = NULL;
    /* an earlier round may have been killed after creating the log but before any append */
    int rc = first == 0
                 ? kvs_sesslog_create(dir, "k", &ident_a, KVS_FSYNC_ALWAYS, &log, e, sizeof e)
                 : KVS_ALREADY_EXISTS;
    if (rc == KVS_ALREADY_EXISTS) {
        rc = kvs_sesslog_open(dir, "k", &ident_a, KVS_FSYNC_ALWAYS, &log, e, sizeof e);
    }
    if (rc != 0) {
        _exit(3);
    }
    int32_t toks[64];
    for (uint64_t seq = first;; seq++) {
        uint32_t n = (uint32_t)(seq % 64) + 1;
        for (uint32_t i = 0; i < n; i++) {
            toks[i] = (int32_t)(seq * 100 + i);
        }
        struct kvs_log_append a = {.client_id = 1,
                                   .client_seq = seq,
                                   .version_after = seq + 1,
                                   .n_tokens = n,
                                   .tokens = toks};
        if (kvs_sesslog_append_tokens(log, &a) != 0) {
            _exit(4);
        }
        if (write(wfd, &seq, sizeof seq) != (ssize_t)sizeof seq) {
            _exit(5);
        }
    }
}

struct seqs {
    uint64_t next; /* the client_seq the next record must carry */
};

static int check_seq(uint32_t type, const void *payload, size_t len, uint64_t offset, void *user)
{
    struct seqs *s = user;
    struct kvs_log_append a;
    ck_assert_uint_eq(type, KVS_LOG_APPEND);
    ck_assert_int_eq(kvs_log_append_decode(payload, len, &a), 0);
    ck_assert_uint_eq(a.client_seq, s->next);
    ck_assert_uint_eq(a.n_tokens, (uint32_t)(a.client_seq % 64) + 1);
    int32_t toks[64];
    kvs_log_append_tokens(&a, toks);
    ck_assert_int_eq(toks[a.n_tokens - 1], (int32_t)(a.client_seq * 100 + a.n_tokens - 1));
    s->next++;
    return 0;
}

START_TEST(test_sigkill)
{
    srand((unsigned)time(NULL));
    uint64_t first = 0;
    for (int round = 0; round < 8; round++) {
        int fds[2];
        ck_assert_int_eq(pipe(fds), 0);
        pid_t pid = fork();
        ck_assert_int_ge(pid, 0);
        if (pid == 0) {
            close(fds[0]);
            child_append(fds[1], first);
        }
        close(fds[1]);
        struct timespec ts = {0, (long)(rand() % 40 + 1) * 1000 * 1000};
        if (round == 0) {
            ts.tv_nsec = 200 * 1000; /* early: possibly during the creation */
        }
        nanosleep(&ts, NULL);
        ck_assert_int_eq(kill(pid, SIGKILL), 0);
        int status;
        ck_assert_int_eq(waitpid(pid, &status, 0), pid);
        ck_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
        uint64_t seq, n_acked = 0, last = 0;
        while (read(fds[0], &seq, sizeof seq) == (ssize_t)sizeof seq) {
            ck_assert_uint_eq(seq, first + n_acked);
            last = seq;
            n_acked++;
        }
        close(fds[0]);
        struct seqs s = {0};
        struct kvs_replay_stats st;
        int rc = kvs_sesslog_replay(dir, "k", &ident_a, check_seq, &s, &st, err, sizeof err);
        if (rc == KVS_NOT_FOUND) { /* killed before the log existed */
            ck_assert_uint_eq(first, 0);
            ck_assert_uint_eq(n_acked, 0);
            continue;
        }
        ck_assert_msg(rc == 0, "round %d: %s", round, err);
        uint64_t acked_end = n_acked ? last + 1 : first; /* every acked seq is < acked_end */
        ck_assert_uint_ge(s.next, acked_end);
        ck_assert_uint_le(s.next, acked_end + 1);
        first = s.next;
    }
    ck_assert_uint_gt(first, 0);
}
END_TEST

static Suite *sesslog_suite(void)
{
    Suite *s = suite_create("sesslog");
    TCase *tc = tcase_create("log");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_ids_policies_crc);
    tcase_add_test(tc, test_payload_codecs);
    tcase_add_test(tc, test_round_trip);
    tcase_add_test(tc, test_model_mismatch);
    tcase_add_test(tc, test_fsync_policies);
    tcase_add_test(tc, test_torn_tail_every_offset);
    tcase_add_test(tc, test_flipped_bits_last_record);
    tcase_add_test(tc, test_garbage_after_last);
    tcase_add_test(tc, test_corrupt_middle);
    tcase_add_test(tc, test_callback_stops);
    tcase_add_test(tc, test_rewrite);
    tcase_add_test(tc, test_efbig_rlimit);
    tcase_add_test(tc, test_sigkill);
    suite_add_tcase(s, tc);
    if (tmpfs_ok) {
        TCase *tf = tcase_create("enospc");
        tcase_add_checked_fixture(tf, tmpfs_setup, tmpfs_teardown);
        tcase_add_test(tf, test_enospc_tmpfs);
        suite_add_tcase(s, tf);
    }
    return s;
}

/* Can this process mount a tmpfs (root, or a user namespace that allows it)? */
static bool probe_tmpfs(void)
{
    char d[] = "/tmp/kvs_mntprobe_XXXXXX";
    if (mkdtemp(d) == NULL) {
        return false;
    }
    bool ok = mount("tmpfs", d, "tmpfs", 0, "size=64k") == 0;
    if (ok) {
        umount2(d, MNT_DETACH);
    } else {
        printf("SKIP test_enospc_tmpfs: mounting a tmpfs is not permitted here (%s); "
               "test_efbig_rlimit still covers a failing write\n",
               strerror(errno));
    }
    rmdir(d);
    return ok;
}

int main(void)
{
    tmpfs_ok = probe_tmpfs();
    SRunner *sr = srunner_create(sesslog_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

/* Session append log: header and record encoding, a windowed reader that validates a log
 * and tells a torn tail from corruption in the middle, the append path with its fsync
 * policies and failure truncation, and compaction by rewrite + rename. The byte layout and
 * the crash guarantees are in sesslog.h. */
#include "worker/sesslog.h"

#include "common/endian.h"
#include "common/fileio.h"
#include "common/log.h"
#include "common/status.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define LOG_MAGIC "KVSLOG1\n"
#define HDR_CRC_OFF 220u              /* the header's CRC covers bytes [0, 220) */
#define READ_WINDOW (1u << 20)        /* bytes read ahead by the replay reader */
#define RESYNC_BUDGET (256ull << 20)  /* bytes CRC'd while looking past a bad record */
#define SYNC_INTERVAL_NS 1000000000ll /* EVERYSEC */

struct kvs_sesslog {
    int fd;                  /* the log file, O_RDWR, flock'ed */
    char path[PATH_MAX];     /* <dir>/<id>.log */
    char tmp_path[PATH_MAX]; /* <dir>/<id>.log.tmp */
    char dir[PATH_MAX];      /* the data directory */
    char id[KVS_SESSION_ID_MAX + 1];
    struct kvs_log_identity ident;
    enum kvs_fsync_policy policy;
    uint64_t end;         /* bytes: end of the last acknowledged record */
    int64_t last_sync_ns; /* CLOCK_MONOTONIC of the last fdatasync */
    bool tail_dirty;      /* a failed write may have left bytes after end */
    bool dir_dirty;       /* the directory fsync after a rename is still owed */
    unsigned char *buf;   /* record staging, cap bytes */
    size_t cap;
    struct kvs_sesslog_stats st;
    char last_error[256]; /* the last KVS_IO's reason */
};

/* ---- small helpers ---- */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

/* ---- CRC-32C, slice-by-8 ---- */

static uint32_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) {
            c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1; /* reflected Castagnoli */
        }
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        for (int t = 1; t < 8; t++) {
            uint32_t c = crc_table[t - 1][i];
            crc_table[t][i] = (c >> 8) ^ crc_table[0][c & 0xff];
        }
    }
}

uint32_t kvs_crc32c(uint32_t crc, const void *buf, size_t len)
{
    pthread_once(&crc_once, crc_init);
    const unsigned char *p = buf;
    uint32_t c = ~crc;
    while (len >= 8) {
        uint32_t lo = kvs_get_u32(p) ^ c;
        uint32_t hi = kvs_get_u32(p + 4);
        c = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^
            crc_table[5][(lo >> 16) & 0xff] ^ crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xff] ^
            crc_table[2][(hi >> 8) & 0xff] ^ crc_table[1][(hi >> 16) & 0xff] ^
            crc_table[0][hi >> 24];
        p += 8;
        len -= 8;
    }
    while (len-- > 0) {
        c = (c >> 8) ^ crc_table[0][(c ^ *p++) & 0xff];
    }
    return ~c;
}

/* ---- names, ids, identity ---- */

int kvs_fsync_policy_parse(const char *s, enum kvs_fsync_policy *out)
{
    static const char *const names[] = {"always", "everysec", "no"};
    for (int i = 0; s != NULL && i < 3; i++) {
        if (strcmp(s, names[i]) == 0) {
            *out = (enum kvs_fsync_policy)i;
            return KVS_OK;
        }
    }
    return KVS_INVALID_ARGUMENT;
}

const char *kvs_fsync_policy_name(enum kvs_fsync_policy p)
{
    switch (p) {
    case KVS_FSYNC_ALWAYS:
        return "always";
    case KVS_FSYNC_EVERYSEC:
        return "everysec";
    case KVS_FSYNC_NO:
        return "no";
    }
    return "?";
}

const char *kvs_replay_tail_name(enum kvs_replay_tail t)
{
    switch (t) {
    case KVS_REPLAY_CLEAN:
        return "clean";
    case KVS_REPLAY_TORN:
        return "torn";
    case KVS_REPLAY_BAD_CRC:
        return "bad_crc";
    case KVS_REPLAY_BAD_RECORD:
        return "bad_record";
    case KVS_REPLAY_CORRUPT:
        return "corrupt";
    case KVS_REPLAY_STOPPED:
        return "stopped";
    }
    return "?";
}

int kvs_sesslog_check_id(const char *id)
{
    if (id == NULL || id[0] == '\0' || id[0] == '.') {
        return KVS_INVALID_ARGUMENT;
    }
    size_t n = 0;
    for (; id[n] != '\0'; n++) {
        char c = id[n];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '.' || c == '_' || c == '-';
        if (!ok || n >= KVS_SESSION_ID_MAX) {
            return KVS_INVALID_ARGUMENT;
        }
    }
    return KVS_OK;
}

int kvs_log_identity_check(const struct kvs_log_identity *ident)
{
    if (ident == NULL) {
        return KVS_INVALID_ARGUMENT;
    }
    for (int i = 0; i < 64; i++) {
        char c = ident->model_sha256[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) {
            return KVS_INVALID_ARGUMENT;
        }
    }
    return ident->model_sha256[64] == '\0' ? KVS_OK : KVS_INVALID_ARGUMENT;
}

/* Validate the common arguments and build `<dir>/<id><suffix>` paths. */
static int check_args(const char *dir, const char *id, const struct kvs_log_identity *ident,
                      char *err, size_t errlen)
{
    if (dir == NULL || dir[0] == '\0') {
        kvs_errf(err, errlen, "no data directory");
        return KVS_INVALID_ARGUMENT;
    }
    if (kvs_sesslog_check_id(id) != 0) {
        kvs_errf(err, errlen,
               "invalid session id (need 1..%u bytes of [A-Za-z0-9._-], not starting with '.')",
               KVS_SESSION_ID_MAX);
        return KVS_INVALID_ARGUMENT;
    }
    if (ident != NULL && kvs_log_identity_check(ident) != 0) {
        kvs_errf(err, errlen, "invalid model sha256 (need 64 lowercase hex characters)");
        return KVS_INVALID_ARGUMENT;
    }
    return KVS_OK;
}

static int make_path(char *out, const char *dir, const char *id, const char *suffix, char *err,
                     size_t errlen)
{
    int n = snprintf(out, PATH_MAX, "%s/%s%s", dir, id, suffix);
    if (n < 0 || n >= PATH_MAX) {
        kvs_errf(err, errlen, "path of session '%s' in '%s' is longer than %d bytes", id, dir,
               PATH_MAX - 1);
        return KVS_INVALID_ARGUMENT;
    }
    return KVS_OK;
}

/* ---- header ---- */

static void header_encode(unsigned char h[KVS_SESSLOG_HEADER_BYTES], const char *id,
                          const struct kvs_log_identity *ident)
{
    memset(h, 0, KVS_SESSLOG_HEADER_BYTES);
    memcpy(h, LOG_MAGIC, 8);
    kvs_put_u32(h + 8, KVS_SESSLOG_VERSION);
    kvs_put_u32(h + 12, 0);
    memcpy(h + 16, ident->model_sha256, 64);
    kvs_put_u32(h + 80, ident->kv_dtype);
    kvs_put_u32(h + 84, ident->block_size);
    size_t n = strlen(id);
    kvs_put_u32(h + 88, (uint32_t)n);
    memcpy(h + 92, id, n);
    kvs_put_u32(h + HDR_CRC_OFF, kvs_crc32c(0, h, HDR_CRC_OFF));
}

static int header_check(const unsigned char h[KVS_SESSLOG_HEADER_BYTES], const char *id,
                        const struct kvs_log_identity *ident, char *err, size_t errlen)
{
    if (memcmp(h, LOG_MAGIC, 8) != 0) {
        kvs_errf(err, errlen, "not a session log (bad magic)");
        return KVS_BAD_FORMAT;
    }
    uint32_t version = kvs_get_u32(h + 8);
    if (version != KVS_SESSLOG_VERSION) {
        kvs_errf(err, errlen, "session log format version %u is not supported (need %u)", version,
               KVS_SESSLOG_VERSION);
        return KVS_UNSUPPORTED;
    }
    uint32_t crc = kvs_get_u32(h + HDR_CRC_OFF);
    if (kvs_crc32c(0, h, HDR_CRC_OFF) != crc) {
        kvs_errf(err, errlen, "session log header fails its CRC");
        return KVS_BAD_FORMAT;
    }
    if (kvs_get_u32(h + 12) != 0) {
        kvs_errf(err, errlen, "session log header flags 0x%x are not supported", kvs_get_u32(h + 12));
        return KVS_UNSUPPORTED;
    }
    uint32_t n = kvs_get_u32(h + 88);
    size_t want = strlen(id);
    if (n != want || memcmp(h + 92, id, n) != 0) {
        char other[KVS_SESSION_ID_MAX + 1] = {0};
        memcpy(other, h + 92, n <= KVS_SESSION_ID_MAX ? n : KVS_SESSION_ID_MAX);
        for (char *c = other; *c != '\0'; c++) {
            if (*c < 0x20 || *c > 0x7e) {
                *c = '?';
            }
        }
        kvs_errf(err, errlen, "log file of session '%s' holds session '%s'", id, other);
        return KVS_BAD_FORMAT;
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
               "session '%s' was logged for model sha256 %s (kv dtype %u, block size %u), "
               "this worker runs %s (kv dtype %u, block size %u)",
               id, sha, dtype, bs, ident->model_sha256, ident->kv_dtype, ident->block_size);
        return KVS_MODEL_MISMATCH;
    }
    return KVS_OK;
}

/* ---- the replay reader ---- */

struct reader {
    int fd;
    uint64_t size;      /* bytes in the file */
    unsigned char *buf; /* window: file bytes [base, base + n) */
    size_t cap;         /* bytes allocated for buf */
    uint64_t base;
    size_t n;
};

/* Point *p at file bytes [off, off + len) (off + len <= size). 0, or -1 with errno. */
static int rd_get(struct reader *r, uint64_t off, size_t len, const unsigned char **p)
{
    assert(off + len <= r->size);
    if (off >= r->base && off + len <= r->base + r->n) {
        *p = r->buf + (off - r->base);
        return 0;
    }
    size_t want = len > READ_WINDOW ? len : READ_WINDOW;
    if (want > r->size - off) {
        want = (size_t)(r->size - off);
    }
    if (want > r->cap) {
        unsigned char *nb = realloc(r->buf, want);
        if (nb == NULL) {
            errno = ENOMEM;
            return -1;
        }
        r->buf = nb;
        r->cap = want;
    }
    r->n = 0;
    if (kvs_pread_all(r->fd, r->buf, want, off) != 0) {
        return -1;
    }
    r->base = off;
    r->n = want;
    *p = r->buf + 0;
    return 0;
}

/* Look at the record at off. Returns 1 (good: *type, *payload, *len set), 0 (bad: *why and
 * a message in msg), or -1 (read error, errno). */
static int rd_record(struct reader *r, uint64_t off, uint32_t *type, const unsigned char **payload,
                     uint32_t *len, enum kvs_replay_tail *why, char *msg, size_t msglen)
{
    uint64_t left = r->size - off;
    const unsigned char *p;
    if (left < 8) {
        *why = KVS_REPLAY_TORN;
        snprintf(msg, msglen, "%llu bytes of a record header at offset %llu",
                 (unsigned long long)left, (unsigned long long)off);
        return 0;
    }
    if (rd_get(r, off, 8, &p) != 0) {
        return -1;
    }
    uint32_t l = kvs_get_u32(p), t = kvs_get_u32(p + 4);
    if (l > KVS_SESSLOG_MAX_PAYLOAD || t == 0 || t > KVS_SESSLOG_MAX_TYPE) {
        *why = KVS_REPLAY_BAD_RECORD;
        snprintf(msg, msglen, "record at offset %llu has length %u (max %u) and type %u (1..%u)",
                 (unsigned long long)off, l, KVS_SESSLOG_MAX_PAYLOAD, t, KVS_SESSLOG_MAX_TYPE);
        return 0;
    }
    if (left < (uint64_t)l + KVS_SESSLOG_RECORD_OVERHEAD) {
        *why = KVS_REPLAY_TORN;
        snprintf(msg, msglen, "record at offset %llu needs %llu bytes, the file has %llu after it",
                 (unsigned long long)off, (unsigned long long)l + KVS_SESSLOG_RECORD_OVERHEAD,
                 (unsigned long long)left);
        return 0;
    }
    if (rd_get(r, off, (size_t)l + KVS_SESSLOG_RECORD_OVERHEAD, &p) != 0) {
        return -1;
    }
    uint32_t crc = kvs_get_u32(p + 8 + l);
    if (kvs_crc32c(0, p, 8 + (size_t)l) != crc) {
        *why = KVS_REPLAY_BAD_CRC;
        snprintf(msg, msglen, "record at offset %llu (type %u, %u bytes) fails its CRC",
                 (unsigned long long)off, t, l);
        return 0;
    }
    *type = t;
    *payload = p + 8;
    *len = l;
    return 1;
}

/* After a bad record at bad: is there a good record anywhere in (bad, size)? First where
 * the bad record's own length points (a damaged payload), then at every byte. A candidate
 * is CRC-checked only when its header is plausible and where it ends there is either the
 * end of the file or another plausible header, which keeps a scan over a torn record full
 * of token ids cheap. Returns 1 (found: *at), 0 (none), 2 (gave up: budget spent), -1 (read
 * error). */
static int rd_resync(struct reader *r, uint64_t bad, uint64_t *at)
{
    uint64_t budget = RESYNC_BUDGET;
    char msg[8];
    enum kvs_replay_tail why;
    uint32_t t, l;
    const unsigned char *p;
    if (r->size - bad >= 8) {
        if (rd_get(r, bad, 8, &p) != 0) {
            return -1;
        }
        uint64_t next = bad + KVS_SESSLOG_RECORD_OVERHEAD + (uint64_t)kvs_get_u32(p);
        if (kvs_get_u32(p) <= KVS_SESSLOG_MAX_PAYLOAD && next < r->size) {
            int rc = rd_record(r, next, &t, &p, &l, &why, msg, sizeof msg);
            if (rc != 0) {
                *at = next;
                return rc;
            }
        }
    }
    for (uint64_t off = bad + 1; off + KVS_SESSLOG_RECORD_OVERHEAD <= r->size; off++) {
        if (rd_get(r, off, 8, &p) != 0) {
            return -1;
        }
        uint32_t cl = kvs_get_u32(p), ct = kvs_get_u32(p + 4);
        if (ct == 0 || ct > KVS_SESSLOG_MAX_TYPE || cl > KVS_SESSLOG_MAX_PAYLOAD ||
            (uint64_t)cl + KVS_SESSLOG_RECORD_OVERHEAD > r->size - off) {
            continue;
        }
        uint64_t end = off + KVS_SESSLOG_RECORD_OVERHEAD + cl;
        if (r->size - end >= 8) { /* fewer bytes would be a torn header: plausible */
            if (rd_get(r, end, 8, &p) != 0) {
                return -1;
            }
            uint32_t nl = kvs_get_u32(p), nt = kvs_get_u32(p + 4);
            if (nt == 0 || nt > KVS_SESSLOG_MAX_TYPE || nl > KVS_SESSLOG_MAX_PAYLOAD) {
                continue;
            }
        }
        if (budget < (uint64_t)cl + 8) {
            return 2;
        }
        budget -= (uint64_t)cl + 8;
        int rc = rd_record(r, off, &t, &p, &l, &why, msg, sizeof msg);
        if (rc != 0) {
            *at = off;
            return rc;
        }
    }
    return 0;
}

/* Validate the log open in fd (locked by the caller), calling cb on each good record, and
 * cut a torn tail. *end_out: the end of the last good record. */
static int scan(int fd, const char *path, const char *id, const struct kvs_log_identity *ident,
                kvs_sesslog_record_fn cb, void *user, struct kvs_replay_stats *st,
                uint64_t *end_out, char *err, size_t errlen)
{
    int rc = KVS_OK;
    struct reader r = {.fd = fd};
    memset(st, 0, sizeof *st);
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        kvs_errf(err, errlen, "%s: %s", path, strerror(errno));
        return KVS_IO;
    }
    r.size = (uint64_t)sb.st_size;
    unsigned char h[KVS_SESSLOG_HEADER_BYTES];
    if (r.size < KVS_SESSLOG_HEADER_BYTES) {
        kvs_errf(err, errlen, "%s: %llu bytes, shorter than the %u-byte header", path,
               (unsigned long long)r.size, KVS_SESSLOG_HEADER_BYTES);
        return KVS_BAD_FORMAT;
    }
    if (kvs_pread_all(fd, h, sizeof h, 0) != 0) {
        kvs_errf(err, errlen, "%s: %s", path, strerror(errno));
        return KVS_IO;
    }
    rc = header_check(h, id, ident, err, errlen);
    if (rc != KVS_OK) {
        return rc;
    }

    uint64_t off = KVS_SESSLOG_HEADER_BYTES;
    enum kvs_replay_tail why = KVS_REPLAY_CLEAN;
    while (off < r.size) {
        uint32_t type = 0, len = 0;
        const unsigned char *payload = NULL;
        int g = rd_record(&r, off, &type, &payload, &len, &why, st->reason, sizeof st->reason);
        if (g < 0) {
            int e = errno;
            kvs_errf(err, errlen, "%s: %s", path, strerror(e));
            rc = e == ENOMEM ? KVS_NO_MEMORY : KVS_IO;
            goto fail;
        }
        if (g == 0) {
            break;
        }
        if (cb != NULL) {
            int c = cb(type, payload, len, off, user);
            if (c < 0) {
                st->tail = KVS_REPLAY_STOPPED;
                st->bad_offset = off;
                st->end_offset = off;
                snprintf(st->reason, sizeof st->reason, "stopped by the callback at offset %llu",
                         (unsigned long long)off);
                kvs_errf(err, errlen, "replay of '%s' stopped by the callback (%s)", id,
                       kvs_status_name(c));
                rc = c;
                goto fail;
            }
        }
        st->n_records++;
        off += (uint64_t)len + KVS_SESSLOG_RECORD_OVERHEAD;
    }
    st->end_offset = off;
    if (off == r.size) {
        st->tail = KVS_REPLAY_CLEAN;
        st->reason[0] = '\0';
        *end_out = off;
        goto done;
    }

    st->bad_offset = off;
    uint64_t at = 0;
    int found = rd_resync(&r, off, &at);
    if (found < 0) {
        int e = errno;
        kvs_errf(err, errlen, "%s: %s", path, strerror(e));
        rc = e == ENOMEM ? KVS_NO_MEMORY : KVS_IO;
        goto fail;
    }
    if (found > 0) {
        char first[sizeof st->reason];
        snprintf(first, sizeof first, "%s", st->reason);
        st->tail = KVS_REPLAY_CORRUPT;
        if (found == 1) {
            snprintf(st->reason, sizeof st->reason, "%.100s; a good record follows at %llu", first,
                     (unsigned long long)at);
        } else {
            snprintf(st->reason, sizeof st->reason,
                     "%.100s; could not rule out good records after it", first);
        }
        kvs_errf(err, errlen, "session log %s is corrupt in the middle: %s", path, st->reason);
        rc = KVS_BAD_FORMAT;
        goto fail;
    }
    st->tail = why;
    st->dropped_bytes = r.size - off;
    if (ftruncate(fd, (off_t)off) != 0 || fsync(fd) != 0) {
        kvs_errf(err, errlen, "%s: cutting the torn tail at %llu: %s", path, (unsigned long long)off,
               strerror(errno));
        rc = KVS_IO;
        goto fail;
    }
    KVS_WARN("sesslog: %s: cut %llu bytes of %s tail at offset %llu (%s)", path,
             (unsigned long long)st->dropped_bytes, kvs_replay_tail_name(why),
             (unsigned long long)off, st->reason);
    *end_out = off;
done:
    free(r.buf);
    return KVS_OK;
fail:
    free(r.buf);
    return rc;
}

/* Open and lock an existing log. */
static int open_locked(const char *path, int *fd_out, char *err, size_t errlen)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        kvs_errf(err, errlen, "%s: %s", path, strerror(e));
        return e == ENOENT ? KVS_NOT_FOUND : KVS_IO;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        close(fd);
        kvs_errf(err, errlen, "%s: %s", path,
               e == EWOULDBLOCK ? "in use by another log handle" : strerror(e));
        return e == EWOULDBLOCK ? KVS_BUSY : KVS_IO;
    }
    *fd_out = fd;
    return KVS_OK;
}

static int log_new(const char *dir, const char *id, const struct kvs_log_identity *ident,
                   enum kvs_fsync_policy policy, int fd, uint64_t end, kvs_sesslog **out)
{
    kvs_sesslog *log = calloc(1, sizeof *log);
    if (log == NULL) {
        return KVS_NO_MEMORY;
    }
    log->fd = fd;
    /* lengths were checked by make_path */
    snprintf(log->path, sizeof log->path, "%s/%s.log", dir, id);
    snprintf(log->tmp_path, sizeof log->tmp_path, "%s/%s.log.tmp", dir, id);
    snprintf(log->dir, sizeof log->dir, "%s", dir);
    snprintf(log->id, sizeof log->id, "%s", id);
    log->ident = *ident;
    log->policy = policy;
    log->end = end;
    log->last_sync_ns = now_ns();
    log->st.bytes = end;
    *out = log;
    return KVS_OK;
}

static bool policy_ok(enum kvs_fsync_policy p)
{
    return p == KVS_FSYNC_ALWAYS || p == KVS_FSYNC_EVERYSEC || p == KVS_FSYNC_NO;
}

/* ---- public: create / replay / open ---- */

static void record_frame(unsigned char *rec, uint32_t type, uint32_t len);
static int check_head(const struct kvs_log_record *head, size_t n_head);

/* A new log holding the header and head[0..n_head): written to <id>.log.tmp, fsynced, then
 * hard-linked to <id>.log (create: fails if one exists) or renamed over it (replace: the
 * existing log must not be open anywhere), and the directory fsynced. */
static int fresh_log(const char *dir, const char *session_id, const struct kvs_log_identity *ident,
                     enum kvs_fsync_policy policy, const struct kvs_log_record *head, size_t n_head,
                     bool replace, kvs_sesslog **out, char *err, size_t errlen)
{
    char path[PATH_MAX], tmp[PATH_MAX];
    int fd = -1, old_fd = -1, rc;
    unsigned char *rec = NULL;
    *out = NULL;
    if (ident == NULL || !policy_ok(policy)) {
        kvs_errf(err, errlen, "no identity or unknown fsync policy");
        return KVS_INVALID_ARGUMENT;
    }
    KVS_TRY(check_args(dir, session_id, ident, err, errlen));
    KVS_TRY(make_path(path, dir, session_id, ".log", err, errlen));
    KVS_TRY(make_path(tmp, dir, session_id, ".log.tmp", err, errlen));
    rc = check_head(head, n_head);
    if (rc != KVS_OK) {
        kvs_errf(err, errlen, "invalid initial record (type 1..%u, at most %u bytes)",
               KVS_SESSLOG_MAX_TYPE, KVS_SESSLOG_MAX_PAYLOAD);
        return rc;
    }

    if (replace) {
        rc = open_locked(path, &old_fd, err, errlen);
        if (rc != KVS_OK && rc != KVS_NOT_FOUND) {
            return rc;
        }
    } else {
        struct stat sb;
        if (stat(path, &sb) == 0) {
            kvs_errf(err, errlen, "a log for session '%s' already exists", session_id);
            return KVS_ALREADY_EXISTS;
        }
        if (errno != ENOENT) {
            kvs_errf(err, errlen, "%s: %s", path, strerror(errno));
            return KVS_IO;
        }
    }
    fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        kvs_errf(err, errlen, "%s: %s", tmp, strerror(errno));
        rc = KVS_IO; /* a missing data directory included */
        goto fail;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        kvs_errf(err, errlen, "%s: in use", tmp);
        rc = KVS_BUSY;
        goto fail;
    }
    unsigned char h[KVS_SESSLOG_HEADER_BYTES];
    header_encode(h, session_id, ident);
    uint64_t end = sizeof h;
    if (kvs_pwrite_all(fd, h, sizeof h, 0) != 0) {
        goto io_fail;
    }
    for (size_t i = 0; i < n_head; i++) {
        size_t n = head[i].len + KVS_SESSLOG_RECORD_OVERHEAD;
        unsigned char *nr = realloc(rec, n);
        if (nr == NULL) {
            rc = KVS_NO_MEMORY;
            goto fail;
        }
        rec = nr;
        if (head[i].len > 0) {
            memcpy(rec + 8, head[i].payload, head[i].len);
        }
        record_frame(rec, head[i].type, (uint32_t)head[i].len);
        if (kvs_pwrite_all(fd, rec, n, end) != 0) {
            goto io_fail;
        }
        end += n;
    }
    if (fsync(fd) != 0) {
        goto io_fail;
    }
    if (replace ? rename(tmp, path) != 0 : link(tmp, path) != 0) {
        int e = errno;
        kvs_errf(err, errlen, "%s: %s", path, strerror(e));
        rc = e == EEXIST ? KVS_ALREADY_EXISTS : KVS_IO;
        goto fail;
    }
    if (kvs_fsync_dir(dir) != 0) {
        kvs_errf(err, errlen, "%s: directory fsync: %s", dir, strerror(errno));
        if (!replace) {
            unlink(path);
        } /* replace: the new log is in place or the old one is; neither is half-written */
        rc = KVS_IO;
        goto fail;
    }
    if (!replace) {
        unlink(tmp); /* a leftover is harmless: nothing reads <id>.log.tmp */
    }
    rc = log_new(dir, session_id, ident, policy, fd, end, out);
    if (rc != KVS_OK) {
        goto fail;
    }
    (*out)->st.n_syncs = 1;
    free(rec);
    if (old_fd >= 0) {
        close(old_fd);
    }
    return KVS_OK;
io_fail:
    kvs_errf(err, errlen, "%s: %s", tmp, strerror(errno));
    rc = KVS_IO;
fail:
    free(rec);
    if (fd >= 0) {
        close(fd);
    }
    if (old_fd >= 0) {
        close(old_fd);
    }
    unlink(tmp);
    return rc;
}

int kvs_sesslog_create(const char *dir, const char *session_id,
                       const struct kvs_log_identity *ident, enum kvs_fsync_policy policy,
                       kvs_sesslog **out, char *err, size_t errlen)
{
    return fresh_log(dir, session_id, ident, policy, NULL, 0, false, out, err, errlen);
}

int kvs_sesslog_replace(const char *dir, const char *session_id,
                        const struct kvs_log_identity *ident, enum kvs_fsync_policy policy,
                        const struct kvs_log_record *head, size_t n_head, kvs_sesslog **out,
                        char *err, size_t errlen)
{
    return fresh_log(dir, session_id, ident, policy, head, n_head, true, out, err, errlen);
}

int kvs_sesslog_open_replay(const char *dir, const char *session_id,
                            const struct kvs_log_identity *ident, enum kvs_fsync_policy policy,
                            kvs_sesslog_record_fn cb, void *user, struct kvs_replay_stats *st,
                            kvs_sesslog **out, char *err, size_t errlen)
{
    char path[PATH_MAX];
    struct kvs_replay_stats local;
    uint64_t end = 0;
    int fd = -1;
    if (out != NULL) {
        *out = NULL;
    }
    if (st == NULL) {
        st = &local;
    }
    memset(st, 0, sizeof *st);
    if (ident == NULL || !policy_ok(policy)) {
        kvs_errf(err, errlen, "no identity or unknown fsync policy");
        return KVS_INVALID_ARGUMENT;
    }
    KVS_TRY(check_args(dir, session_id, ident, err, errlen));
    KVS_TRY(make_path(path, dir, session_id, ".log", err, errlen));
    KVS_TRY(open_locked(path, &fd, err, errlen));
    int rc = scan(fd, path, session_id, ident, cb, user, st, &end, err, errlen);
    if (rc != KVS_OK || out == NULL) {
        close(fd);
        return rc;
    }
    rc = log_new(dir, session_id, ident, policy, fd, end, out);
    if (rc != KVS_OK) {
        close(fd);
    }
    return rc;
}

int kvs_sesslog_replay(const char *dir, const char *session_id,
                       const struct kvs_log_identity *ident, kvs_sesslog_record_fn cb, void *user,
                       struct kvs_replay_stats *st, char *err, size_t errlen)
{
    return kvs_sesslog_open_replay(dir, session_id, ident, KVS_FSYNC_NO, cb, user, st, NULL, err,
                                   errlen);
}

int kvs_sesslog_open(const char *dir, const char *session_id, const struct kvs_log_identity *ident,
                     enum kvs_fsync_policy policy, kvs_sesslog **out, char *err, size_t errlen)
{
    return kvs_sesslog_open_replay(dir, session_id, ident, policy, NULL, NULL, NULL, out, err,
                                   errlen);
}

/* ---- append ---- */

static int io_fail(kvs_sesslog *log, const char *what, int e)
{
    snprintf(log->last_error, sizeof log->last_error, "%s log of session '%s': %s", what, log->id,
             strerror(e));
    log->st.n_failures++;
    return KVS_IO;
}

/* Cut whatever a failed write left after end. */
static void cut_tail(kvs_sesslog *log)
{
    if (ftruncate(log->fd, (off_t)log->end) != 0) {
        log->tail_dirty = true;
        return;
    }
    log->tail_dirty = false;
}

static int do_sync(kvs_sesslog *log)
{
    if (fdatasync(log->fd) != 0) {
        return -1;
    }
    log->last_sync_ns = now_ns();
    log->st.n_syncs++;
    log->st.unsynced = 0;
    return 0;
}

static int ensure_buf(kvs_sesslog *log, size_t n)
{
    if (n <= log->cap) {
        return KVS_OK;
    }
    size_t c = log->cap ? log->cap : 256;
    while (c < n) {
        c *= 2;
    }
    unsigned char *nb = realloc(log->buf, c);
    if (nb == NULL) {
        return KVS_NO_MEMORY;
    }
    log->buf = nb;
    log->cap = c;
    return KVS_OK;
}

/* Write the encoded record in log->buf[0, n) at log->end and apply the policy. */
static int write_record(kvs_sesslog *log, size_t n)
{
    if (log->dir_dirty) {
        if (kvs_fsync_dir(log->dir) != 0) {
            return io_fail(log, "directory fsync for", errno);
        }
        log->dir_dirty = false;
    }
    if (log->tail_dirty) {
        cut_tail(log);
        if (log->tail_dirty) {
            return io_fail(log, "truncate", errno);
        }
    }
    if (kvs_pwrite_all(log->fd, log->buf, n, log->end) != 0) {
        int e = errno;
        cut_tail(log);
        return io_fail(log, "write", e);
    }
    bool sync =
        log->policy == KVS_FSYNC_ALWAYS ||
        (log->policy == KVS_FSYNC_EVERYSEC && now_ns() - log->last_sync_ns >= SYNC_INTERVAL_NS);
    if (sync && fdatasync(log->fd) != 0) {
        /* The record may or may not be on disk: take it back (not acknowledged), and make
         * sure the cut itself reaches the disk before anything else is written. */
        int e = errno;
        cut_tail(log);
        if (!log->tail_dirty && fdatasync(log->fd) != 0) {
            log->tail_dirty = true;
        }
        return io_fail(log, "fdatasync", e);
    }
    log->end += n;
    log->st.bytes = log->end;
    log->st.n_appends++;
    log->st.unsynced++;
    if (sync) {
        log->last_sync_ns = now_ns();
        log->st.n_syncs++;
        log->st.unsynced = 0;
    }
    return KVS_OK;
}

static void record_frame(unsigned char *rec, uint32_t type, uint32_t len)
{
    kvs_put_u32(rec, len);
    kvs_put_u32(rec + 4, type);
    kvs_put_u32(rec + 8 + len, kvs_crc32c(0, rec, 8 + (size_t)len));
}

int kvs_sesslog_append(kvs_sesslog *log, uint32_t type, const void *payload, size_t len)
{
    assert(log != NULL);
    if (type == 0 || type > KVS_SESSLOG_MAX_TYPE || (payload == NULL && len > 0)) {
        return KVS_INVALID_ARGUMENT;
    }
    if (len > KVS_SESSLOG_MAX_PAYLOAD) {
        return KVS_TOO_LARGE;
    }
    KVS_TRY(ensure_buf(log, len + KVS_SESSLOG_RECORD_OVERHEAD));
    if (len > 0) {
        memcpy(log->buf + 8, payload, len);
    }
    record_frame(log->buf, type, (uint32_t)len);
    return write_record(log, len + KVS_SESSLOG_RECORD_OVERHEAD);
}

int kvs_sesslog_append_tokens(kvs_sesslog *log, const struct kvs_log_append *a)
{
    assert(log != NULL && a != NULL);
    size_t len = kvs_log_append_size(a->n_tokens);
    if (len == 0) {
        return KVS_TOO_LARGE;
    }
    KVS_TRY(ensure_buf(log, len + KVS_SESSLOG_RECORD_OVERHEAD));
    int64_t n = kvs_log_append_encode(a, log->buf + 8, len);
    if (n < 0) {
        return (int)n;
    }
    record_frame(log->buf, KVS_LOG_APPEND, (uint32_t)len);
    return write_record(log, len + KVS_SESSLOG_RECORD_OVERHEAD);
}

int kvs_sesslog_tick(kvs_sesslog *log)
{
    assert(log != NULL);
    if (log->policy != KVS_FSYNC_EVERYSEC || log->st.unsynced == 0 ||
        now_ns() - log->last_sync_ns < SYNC_INTERVAL_NS) {
        return KVS_OK;
    }
    return do_sync(log) == 0 ? KVS_OK : io_fail(log, "fdatasync", errno);
}

int kvs_sesslog_sync(kvs_sesslog *log)
{
    assert(log != NULL);
    if (log->dir_dirty) {
        if (kvs_fsync_dir(log->dir) != 0) {
            return io_fail(log, "directory fsync for", errno);
        }
        log->dir_dirty = false;
    }
    return do_sync(log) == 0 ? KVS_OK : io_fail(log, "fdatasync", errno);
}

uint64_t kvs_sesslog_end(const kvs_sesslog *log)
{
    return log->end;
}

const char *kvs_sesslog_last_error(const kvs_sesslog *log)
{
    return log->last_error;
}

void kvs_sesslog_get_stats(const kvs_sesslog *log, struct kvs_sesslog_stats *st)
{
    *st = log->st;
}

void kvs_sesslog_close(kvs_sesslog **plog)
{
    if (plog == NULL || *plog == NULL) {
        return;
    }
    kvs_sesslog *log = *plog;
    if (log->policy != KVS_FSYNC_NO && (log->st.unsynced > 0 || log->dir_dirty) &&
        kvs_sesslog_sync(log) != KVS_OK) {
        KVS_ERROR("sesslog: closing %s: %s", log->path, log->last_error);
    }
    close(log->fd);
    free(log->buf);
    free(log);
    *plog = NULL;
}

/* ---- compaction ---- */

static int check_head(const struct kvs_log_record *head, size_t n_head)
{
    if (n_head > 0 && head == NULL) {
        return KVS_INVALID_ARGUMENT;
    }
    for (size_t i = 0; i < n_head; i++) {
        if (head[i].type == 0 || head[i].type > KVS_SESSLOG_MAX_TYPE ||
            (head[i].payload == NULL && head[i].len > 0)) {
            return KVS_INVALID_ARGUMENT;
        }
        if (head[i].len > KVS_SESSLOG_MAX_PAYLOAD) {
            return KVS_TOO_LARGE;
        }
    }
    return KVS_OK;
}

int kvs_sesslog_rewrite(kvs_sesslog *log, const struct kvs_log_record *head, size_t n_head,
                        uint64_t keep_from_offset)
{
    assert(log != NULL);
    int rc = KVS_OK, fd = -1;
    struct reader r = {.fd = log->fd, .size = log->end};
    if (keep_from_offset < KVS_SESSLOG_HEADER_BYTES || keep_from_offset > log->end ||
        (n_head > 0 && head == NULL)) {
        return KVS_INVALID_ARGUMENT;
    }
    KVS_TRY(check_head(head, n_head));
    if (log->tail_dirty) {
        cut_tail(log);
        if (log->tail_dirty) {
            return io_fail(log, "truncate", errno);
        }
    }
    fd = open(log->tmp_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        return io_fail(log, "create", errno);
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        rc = io_fail(log, "lock", errno);
        goto fail;
    }
    unsigned char h[KVS_SESSLOG_HEADER_BYTES];
    header_encode(h, log->id, &log->ident);
    uint64_t off = 0;
    if (kvs_pwrite_all(fd, h, sizeof h, 0) != 0) {
        rc = io_fail(log, "write", errno);
        goto fail;
    }
    off = sizeof h;
    for (size_t i = 0; i < n_head; i++) {
        rc = ensure_buf(log, head[i].len + KVS_SESSLOG_RECORD_OVERHEAD);
        if (rc != KVS_OK) {
            goto fail;
        }
        if (head[i].len > 0) {
            memcpy(log->buf + 8, head[i].payload, head[i].len);
        }
        record_frame(log->buf, head[i].type, (uint32_t)head[i].len);
        size_t n = head[i].len + KVS_SESSLOG_RECORD_OVERHEAD;
        if (kvs_pwrite_all(fd, log->buf, n, off) != 0) {
            rc = io_fail(log, "write", errno);
            goto fail;
        }
        off += n;
    }
    /* Copy the kept records, re-validating each (this also proves keep_from_offset is a
     * record boundary). */
    for (uint64_t at = keep_from_offset; at < log->end;) {
        uint32_t t, l;
        const unsigned char *p;
        enum kvs_replay_tail why;
        char msg[8];
        int g = rd_record(&r, at, &t, &p, &l, &why, msg, sizeof msg);
        if (g < 0) {
            rc = errno == ENOMEM ? KVS_NO_MEMORY : io_fail(log, "read", errno);
            goto fail;
        }
        if (g == 0) {
            snprintf(log->last_error, sizeof log->last_error,
                     "rewrite of session '%s': offset %llu is not a record boundary", log->id,
                     (unsigned long long)at);
            rc = KVS_INVALID_ARGUMENT;
            goto fail;
        }
        size_t n = (size_t)l + KVS_SESSLOG_RECORD_OVERHEAD;
        if (kvs_pwrite_all(fd, p - 8, n, off) != 0) {
            rc = io_fail(log, "write", errno);
            goto fail;
        }
        off += n;
        at += n;
    }
    if (fsync(fd) != 0) {
        rc = io_fail(log, "fsync", errno);
        goto fail;
    }
    if (rename(log->tmp_path, log->path) != 0) {
        rc = io_fail(log, "rename", errno);
        goto fail;
    }
    /* From here the new file is the log, whatever else happens. */
    close(log->fd);
    log->fd = fd;
    log->end = off;
    log->st.bytes = off;
    log->st.unsynced = 0;
    log->last_sync_ns = now_ns();
    log->tail_dirty = false;
    free(r.buf);
    if (kvs_fsync_dir(log->dir) != 0) {
        log->dir_dirty = true;
        return io_fail(log, "directory fsync for", errno);
    }
    return KVS_OK;
fail:
    free(r.buf);
    close(fd);
    unlink(log->tmp_path);
    return rc;
}

int kvs_sesslog_remove(const char *dir, const char *session_id)
{
    char path[PATH_MAX], tmp[PATH_MAX];
    KVS_TRY(check_args(dir, session_id, NULL, NULL, 0));
    KVS_TRY(make_path(path, dir, session_id, ".log", NULL, 0));
    KVS_TRY(make_path(tmp, dir, session_id, ".log.tmp", NULL, 0));
    unlink(tmp);
    if (unlink(path) != 0) {
        return errno == ENOENT ? KVS_NOT_FOUND : KVS_IO;
    }
    return kvs_fsync_dir(dir) == 0 ? KVS_OK : KVS_IO;
}

/* ---- payloads ---- */

size_t kvs_log_append_size(uint32_t n_tokens)
{
    uint64_t n = KVS_LOG_APPEND_FIXED + 4ull * n_tokens;
    return n > KVS_SESSLOG_MAX_PAYLOAD ? 0 : (size_t)n;
}

int64_t kvs_log_append_encode(const struct kvs_log_append *a, void *buf, size_t cap)
{
    size_t n = kvs_log_append_size(a->n_tokens);
    if (n == 0) {
        return KVS_TOO_LARGE;
    }
    if (cap < n || (a->tokens == NULL && a->n_tokens > 0)) {
        return KVS_INVALID_ARGUMENT;
    }
    unsigned char *p = buf;
    kvs_put_u64(p, a->client_id);
    kvs_put_u64(p + 8, a->client_seq);
    kvs_put_u64(p + 16, a->version_after);
    kvs_put_u32(p + 24, a->n_tokens);
    for (uint32_t i = 0; i < a->n_tokens; i++) {
        kvs_put_u32(p + KVS_LOG_APPEND_FIXED + 4 * (size_t)i, (uint32_t)a->tokens[i]);
    }
    return (int64_t)n;
}

int kvs_log_append_decode(const void *payload, size_t len, struct kvs_log_append *out)
{
    const unsigned char *p = payload;
    memset(out, 0, sizeof *out);
    if (len < KVS_LOG_APPEND_FIXED) {
        return KVS_BAD_FORMAT;
    }
    uint32_t n = kvs_get_u32(p + 24);
    if ((uint64_t)len != KVS_LOG_APPEND_FIXED + 4ull * n) {
        return KVS_BAD_FORMAT;
    }
    out->client_id = kvs_get_u64(p);
    out->client_seq = kvs_get_u64(p + 8);
    out->version_after = kvs_get_u64(p + 16);
    out->n_tokens = n;
    out->tokens_le = p + KVS_LOG_APPEND_FIXED;
    return KVS_OK;
}

void kvs_log_append_tokens(const struct kvs_log_append *a, int32_t *dst)
{
    for (uint32_t i = 0; i < a->n_tokens; i++) {
        dst[i] = (int32_t)kvs_get_u32(a->tokens_le + 4 * (size_t)i);
    }
}

void kvs_log_evict_encode(const struct kvs_log_evict *e, unsigned char buf[KVS_LOG_EVICT_BYTES])
{
    kvs_put_u64(buf, e->version_after);
    kvs_put_u32(buf + 8, e->first_cell);
    kvs_put_u32(buf + 12, e->n_cells);
}

int kvs_log_evict_decode(const void *payload, size_t len, struct kvs_log_evict *out)
{
    const unsigned char *p = payload;
    memset(out, 0, sizeof *out);
    if (len != KVS_LOG_EVICT_BYTES) {
        return KVS_BAD_FORMAT;
    }
    out->version_after = kvs_get_u64(p);
    out->first_cell = kvs_get_u32(p + 8);
    out->n_cells = kvs_get_u32(p + 12);
    return KVS_OK;
}

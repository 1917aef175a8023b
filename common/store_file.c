/* The embedded store's durability (common/store_impl.h, kvs_store_file_*): a snapshot and a
 * log of the changes since.
 *
 *   PATH      one JSON object: the whole state, with "log_seq" = the last log record it
 *             includes; replaced atomically (PATH.tmp, fsync, rename, fsync of the directory)
 *   PATH.log  one JSON object per line, each a change with "seq" = 1, 2, ...; appended and
 *             fsync'd before the change is acknowledged
 *
 * A change costs one appended line and one fsync, whatever the size of the state; when the log
 * outgrows the snapshot (and 64 KiB) the state is written as a new snapshot and the log is
 * emptied. Opening reads the snapshot, then replays the log records after its log_seq (records
 * at or before it are left over from a crash between the rename and the truncation). A last
 * line without its newline is a write that never completed (never acknowledged): it is cut
 * off. Any other damage is refused with the line number, never half-loaded. */
#include "common/fileio.h"
#include "common/log.h"
#include "common/status.h"
#include "common/store_impl.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define LOG_MIN_SNAPSHOT (64u << 10) /* bytes of log before a snapshot is worth it */
#define LOG_MAX_READ (1u << 30)      /* a log this big at open is refused */
#define PATH_MAX_LEN 4000

struct kvs_store_file {
    char path[PATH_MAX_LEN + 1];     /* the snapshot */
    char log_path[PATH_MAX_LEN + 8]; /* PATH.log */
    int log_fd;
    uint64_t log_size;      /* bytes of complete records */
    uint64_t snapshot_size; /* bytes of the last snapshot */
    int64_t seq;            /* of the last record written or replayed */
};

/* Read the snapshot, if any, and hand it to fn. *log_seq = its log_seq (0 without one). */
static int read_snapshot(struct kvs_store_file *f, kvs_store_file_load_fn fn, void *ctx,
                         int64_t *log_seq, char *err, size_t errlen)
{
    *log_seq = 0;
    json_error_t jerr;
    json_t *snap = json_load_file(f->path, JSON_REJECT_DUPLICATES, &jerr);
    if (snap == NULL) {
        if (access(f->path, F_OK) != 0 && errno == ENOENT) {
            return KVS_OK; /* a new store (or only a log so far) */
        }
        kvs_errf(err, errlen, "store: %s: %s (line %d)", f->path, jerr.text, jerr.line);
        return KVS_BAD_FORMAT;
    }
    json_t *ls = json_object_get(snap, "log_seq");
    int rc = KVS_OK;
    if (!json_is_integer(ls) || json_integer_value(ls) < 0) {
        kvs_errf(err, errlen, "store: %s is not a kvstream store file (no log_seq)", f->path);
        rc = KVS_BAD_FORMAT;
    } else {
        *log_seq = json_integer_value(ls);
        json_object_del(snap, "log_seq");
        rc = fn(ctx, snap, true, err, errlen);
    }
    struct stat st;
    if (stat(f->path, &st) == 0) {
        f->snapshot_size = (uint64_t)st.st_size;
    }
    json_decref(snap);
    return rc;
}

/* Replay the log records after log_seq; cut off a torn last line. */
static int replay_log(struct kvs_store_file *f, kvs_store_file_load_fn fn, void *ctx,
                      int64_t log_seq, char *err, size_t errlen)
{
    struct stat st;
    if (fstat(f->log_fd, &st) < 0) {
        kvs_errf(err, errlen, "store: %s: %s", f->log_path, strerror(errno));
        return KVS_IO;
    }
    if ((uint64_t)st.st_size > LOG_MAX_READ) {
        kvs_errf(err, errlen, "store: %s is %lld bytes (at most %u)", f->log_path,
                 (long long)st.st_size, LOG_MAX_READ);
        return KVS_TOO_LARGE;
    }
    size_t n = (size_t)st.st_size;
    char *buf = malloc(n + 1);
    if (buf == NULL) {
        kvs_errf(err, errlen, "store: out of memory reading %s", f->log_path);
        return KVS_NO_MEMORY;
    }
    if (n > 0 && kvs_pread_all(f->log_fd, buf, n, 0) < 0) {
        kvs_errf(err, errlen, "store: cannot read %s: %s", f->log_path, strerror(errno));
        free(buf);
        return KVS_IO;
    }
    buf[n] = '\0';
    f->seq = log_seq;
    int64_t prev = 0;
    int rc = KVS_OK;
    size_t off = 0;
    int line = 0;
    while (off < n && rc == KVS_OK) {
        char *nl = memchr(buf + off, '\n', n - off);
        if (nl == NULL) {
            KVS_WARN("store: %s: cutting off an incomplete last record (%zu bytes, never "
                     "acknowledged)",
                     f->log_path, n - off);
            break;
        }
        line++;
        size_t len = (size_t)(nl - (buf + off));
        json_error_t jerr;
        json_t *rec = json_loadb(buf + off, len, JSON_REJECT_DUPLICATES, &jerr);
        json_t *sq = rec ? json_object_get(rec, "seq") : NULL;
        int64_t seq = json_is_integer(sq) ? json_integer_value(sq) : -1;
        if (rec == NULL || seq <= prev) {
            kvs_errf(err, errlen, "store: %s: damaged record at line %d", f->log_path, line);
            rc = KVS_BAD_FORMAT;
        } else if (seq > log_seq) { /* else: already in the snapshot */
            json_object_del(rec, "seq");
            rc = fn(ctx, rec, false, err, errlen);
            f->seq = seq;
        }
        prev = seq;
        json_decref(rec);
        off += len + 1;
    }
    free(buf);
    if (rc == KVS_OK && off < n) {
        if (ftruncate(f->log_fd, (off_t)off) < 0 || fsync(f->log_fd) < 0) {
            kvs_errf(err, errlen, "store: cannot cut %s: %s", f->log_path, strerror(errno));
            return KVS_IO;
        }
    }
    f->log_size = off;
    return rc;
}

int kvs_store_file_open(const char *path, kvs_store_file_load_fn fn, void *ctx,
                        kvs_store_file **out, char *err, size_t errlen)
{
    *out = NULL;
    if (strlen(path) > PATH_MAX_LEN) {
        kvs_errf(err, errlen, "store: path of more than %d bytes", PATH_MAX_LEN);
        return KVS_INVALID_ARGUMENT;
    }
    struct kvs_store_file *f = calloc(1, sizeof *f);
    if (f == NULL) {
        kvs_errf(err, errlen, "store: out of memory");
        return KVS_NO_MEMORY;
    }
    snprintf(f->path, sizeof f->path, "%s", path);
    snprintf(f->log_path, sizeof f->log_path, "%s.log", path);
    int64_t log_seq;
    int rc = read_snapshot(f, fn, ctx, &log_seq, err, errlen);
    if (rc == KVS_OK) {
        f->log_fd = open(f->log_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (f->log_fd < 0) {
            kvs_errf(err, errlen, "store: cannot open %s: %s", f->log_path, strerror(errno));
            rc = KVS_IO;
        } else {
            rc = replay_log(f, fn, ctx, log_seq, err, errlen);
        }
    } else {
        f->log_fd = -1;
    }
    if (rc < 0) {
        kvs_store_file_close(&f);
        return rc;
    }
    *out = f;
    return KVS_OK;
}

int kvs_store_file_append(kvs_store_file *f, json_t *rec, char *err, size_t errlen)
{
    json_object_set_new(rec, "seq", json_integer(f->seq + 1));
    char *text = json_dumps(rec, JSON_COMPACT); /* one line: strings escape newlines */
    if (text == NULL) {
        kvs_errf(err, errlen, "store: out of memory writing %s", f->log_path);
        return KVS_NO_MEMORY;
    }
    size_t n = strlen(text);
    text[n] = '\n'; /* replaces the NUL: written as n + 1 bytes */
    int rc = KVS_OK;
    if (kvs_pwrite_all(f->log_fd, text, n + 1, f->log_size) < 0 || fdatasync(f->log_fd) < 0) {
        kvs_errf(err, errlen, "store: cannot write %s: %s", f->log_path, strerror(errno));
        rc = KVS_IO;
        /* Take back what part of the record made it: the next append starts clean. */
        if (ftruncate(f->log_fd, (off_t)f->log_size) < 0) {
            KVS_ERROR("store: %s: cannot cut a failed record: %s", f->log_path, strerror(errno));
        }
    } else {
        f->log_size += n + 1;
        f->seq++;
    }
    free(text);
    return rc;
}

bool kvs_store_file_should_snapshot(const kvs_store_file *f)
{
    return f->log_size > LOG_MIN_SNAPSHOT && f->log_size > f->snapshot_size;
}

int kvs_store_file_snapshot(kvs_store_file *f, json_t *state, char *err, size_t errlen)
{
    json_object_set_new(state, "log_seq", json_integer(f->seq));
    char *text = json_dumps(state, JSON_COMPACT);
    if (text == NULL) {
        kvs_errf(err, errlen, "store: out of memory writing %s", f->path);
        return KVS_NO_MEMORY;
    }
    size_t n = strlen(text);
    char tmp[PATH_MAX_LEN + 8];
    snprintf(tmp, sizeof tmp, "%s.tmp", f->path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    int rc = KVS_OK;
    if (fd < 0 || kvs_pwrite_all(fd, text, n, 0) < 0 || fsync(fd) < 0) {
        kvs_errf(err, errlen, "store: cannot write %s: %s", tmp, strerror(errno));
        rc = KVS_IO;
    }
    if (fd >= 0) {
        close(fd);
    }
    free(text);
    if (rc == KVS_OK && rename(tmp, f->path) < 0) {
        kvs_errf(err, errlen, "store: cannot rename %s: %s", tmp, strerror(errno));
        rc = KVS_IO;
    }
    if (rc < 0) {
        unlink(tmp);
        return rc;
    }
    char dir[PATH_MAX_LEN + 1];
    snprintf(dir, sizeof dir, "%s", f->path);
    if (kvs_fsync_dir(dirname(dir)) < 0) {
        kvs_errf(err, errlen, "store: cannot sync the directory of %s: %s", f->path,
                 strerror(errno));
        return KVS_IO;
    }
    f->snapshot_size = n;
    /* The snapshot holds every record: empty the log. A failure here is harmless (the
     * records are at or before log_seq and skipped at the next open). */
    if (ftruncate(f->log_fd, 0) < 0 || fsync(f->log_fd) < 0) {
        KVS_WARN("store: cannot empty %s: %s", f->log_path, strerror(errno));
        return KVS_OK;
    }
    f->log_size = 0;
    return KVS_OK;
}

void kvs_store_file_close(kvs_store_file **pf)
{
    if (pf == NULL || *pf == NULL) {
        return;
    }
    if ((*pf)->log_fd >= 0) {
        close((*pf)->log_fd);
    }
    free(*pf);
    *pf = NULL;
}

/* libFuzzer target for the durable session files: the input is written to a temp file as a
 * session log or a snapshot and read back. The first byte picks the mode:
 *
 *   0  the rest is a whole log file (header parsing)
 *   1  a valid header, then the rest as the records area; after a successful replay the
 *      file must end at the last good record, and open + append + replay must see exactly
 *      one more record and a clean end
 *   2  the rest is a whole snapshot file
 *   3  the rest is a snapshot whose header CRC and trailer hash the harness fixes up, so
 *      that the size checks and the callbacks are reached
 *   4  an oracle: the rest describes records ([u8 type][u16 len][bytes]...) and one damage
 *      (none, a cut, or a flipped byte at an offset); the harness writes them as valid
 *      records, applies the damage and checks that replay delivers exactly the records
 *      before the damage, cuts a damaged last record and refuses (file unchanged) a damaged
 *      earlier one
 *
 * Any crash, sanitizer report, leak, allocation over the malloc limit, or abort() (a broken
 * invariant) is a bug. */
#include "common/log.h"
#include "common/status.h"
#include "worker/sesslog.h"
#include "worker/snapshot.h"

#include <sodium.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SHA "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
#define ID "fz"

static const struct kvs_log_identity ident = {SHA, 1, 16};
static char dir[64];
static char log_path[128], snap_path[128];
static volatile uint64_t sink;

static char last_err[256]; /* the library's message of the last call that set one */

/* A broken invariant: say which (the line, and what the library said last) and abort. */
static void check_at(int cond, int line)
{
    if (!cond) {
        fprintf(stderr, "fuzz_sesslog: check at line %d failed (last error: %s)\n", line,
                last_err[0] != '\0' ? last_err : "none");
        abort();
    }
}
#define check(cond) check_at((cond), __LINE__)

static void init_once(void)
{
    if (dir[0] != '\0') {
        return;
    }
    kvs_log_set_level(KVS_LOG_ERROR);
    snprintf(dir, sizeof dir, "%s/kvs_fuzz_sesslog_XXXXXX",
             access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
    check(mkdtemp(dir) != NULL);
    snprintf(log_path, sizeof log_path, "%s/%s.log", dir, ID);
    snprintf(snap_path, sizeof snap_path, "%s/%s.snap", dir, ID);
}

static void put_file(const char *path, const void *a, size_t na, const void *b, size_t nb)
{
    FILE *f = fopen(path, "wb");
    check(f != NULL);
    check(na == 0 || fwrite(a, 1, na, f) == na);
    check(nb == 0 || fwrite(b, 1, nb, f) == nb);
    check(fclose(f) == 0);
}

static uint64_t file_size(const char *path)
{
    struct stat sb;
    check(stat(path, &sb) == 0);
    return (uint64_t)sb.st_size;
}

/* Decode what the session layer would decode. */
static int on_record(uint32_t type, const void *payload, size_t len, uint64_t offset, void *user)
{
    uint64_t *n = user;
    (*n)++;
    if (type == KVS_LOG_APPEND) {
        struct kvs_log_append a;
        if (kvs_log_append_decode(payload, len, &a) == 0 && a.n_tokens <= 4096) {
            int32_t toks[4096];
            kvs_log_append_tokens(&a, toks);
            for (uint32_t i = 0; i < a.n_tokens; i++) {
                sink += (uint64_t)toks[i];
            }
        }
    } else if (type == KVS_LOG_EVICT) {
        struct kvs_log_evict e;
        if (kvs_log_evict_decode(payload, len, &e) == 0) {
            sink += e.n_cells;
        }
    }
    const unsigned char *p = payload;
    for (size_t i = 0; i < len; i++) {
        sink += p[i];
    }
    sink += offset;
    return 0;
}

static void header_bytes(unsigned char h[KVS_SESSLOG_HEADER_BYTES])
{
    /* let the library write one */
    kvs_sesslog *log = NULL;
    char err[256];
    unlink(log_path);
    check(kvs_sesslog_create(dir, ID, &ident, KVS_FSYNC_NO, &log, err, sizeof err) == 0);
    kvs_sesslog_close(&log);
    FILE *f = fopen(log_path, "rb");
    check(f != NULL && fread(h, 1, KVS_SESSLOG_HEADER_BYTES, f) == KVS_SESSLOG_HEADER_BYTES);
    fclose(f);
}

static void replay_file(int extended_checks)
{
    char err[256];
    uint64_t n = 0;
    struct kvs_replay_stats st;
    err[0] = '\0';
    int rc = kvs_sesslog_replay(dir, ID, &ident, on_record, &n, &st, err, sizeof err);
    snprintf(last_err, sizeof last_err, "replay rc %d: %s", rc, err);
    check(rc <= 0);
    if (rc != 0) {
        check(err[0] != '\0');
        return;
    }
    check(n == st.n_records);
    check(file_size(log_path) == st.end_offset);
    if (!extended_checks) {
        return;
    }
    kvs_sesslog *log = NULL;
    err[0] = '\0';
    rc = kvs_sesslog_open(dir, ID, &ident, KVS_FSYNC_NO, &log, err, sizeof err);
    snprintf(last_err, sizeof last_err, "open rc %d: %s", rc, err);
    check(rc == 0);
    check(kvs_sesslog_end(log) == st.end_offset);
    rc = kvs_sesslog_append(log, KVS_LOG_SNAPSHOT, "x", 1);
    snprintf(last_err, sizeof last_err, "append rc %d", rc);
    check(rc == 0);
    kvs_sesslog_close(&log);
    uint64_t m = 0;
    err[0] = '\0';
    rc = kvs_sesslog_replay(dir, ID, &ident, on_record, &m, &st, err, sizeof err);
    snprintf(last_err, sizeof last_err, "second replay rc %d: %s (tail %d)", rc, err, (int)st.tail);
    check(rc == 0);
    check(m == n + 1 && st.tail == KVS_REPLAY_CLEAN);
}

static int on_meta(const void *meta, size_t len, uint32_t n_blocks, size_t block_bytes, void *user)
{
    const unsigned char *p = meta;
    for (size_t i = 0; i < len; i++) {
        sink += p[i];
    }
    sink += n_blocks + block_bytes;
    return 0;
}

static int on_block(uint32_t i, const void *buf, void *user)
{
    sink += i + *(const unsigned char *)buf;
    return 0;
}

static void read_snapshot(void)
{
    char err[256];
    err[0] = '\0';
    int rc = kvs_snapshot_read(dir, ID, &ident, on_meta, on_block, NULL, err, sizeof err);
    check(rc <= 0);
    check(rc == 0 || err[0] != '\0');
}

/* Mode 3: fix the header CRC (bytes 240..243 over 0..239) and the trailer (magic + hash). */
static void fixed_snapshot(const uint8_t *data, size_t size)
{
    const size_t hb = KVS_SNAPSHOT_HEADER_BYTES, tb = KVS_SNAPSHOT_TRAILER_BYTES;
    unsigned char *f = malloc(size + hb + tb);
    check(f != NULL);
    /* a real header first, so that identity and id are right unless the input overrides */
    unsigned char h[KVS_SNAPSHOT_HEADER_BYTES] = {0};
    memcpy(h, "KVSSNAP1", 8);
    h[8] = 1;
    memcpy(h + 16, SHA, 64);
    h[80] = 1;
    h[84] = 16;
    h[88] = 2;
    memcpy(h + 92, ID, 2);
    /* the input's first 20 bytes set n_blocks, block_bytes, meta_len (small values wrap) */
    size_t take = size < 20 ? size : 20;
    memcpy(h + 220, data, take);
    uint32_t crc = kvs_crc32c(0, h, 240);
    for (int i = 0; i < 4; i++) {
        h[240 + i] = (unsigned char)(crc >> (8 * i));
    }
    memcpy(f, h, hb);
    memcpy(f + hb, data + take, size - take);
    size_t n = hb + size - take;
    memcpy(f + n, "KVSSEND1", 8);
    crypto_generichash(f + n + 8, 32, f, n + 8, NULL, 0);
    put_file(snap_path, f, n + tb, NULL, 0);
    free(f);
    read_snapshot();
}

/* Mode 4: records built from the input, one damage, and an exact oracle. */
static void oracle(const uint8_t *data, size_t size)
{
    if (size < 4) {
        return;
    }
    unsigned char h[KVS_SESSLOG_HEADER_BYTES];
    header_bytes(h);
    uint8_t op = data[0];
    uint16_t where = (uint16_t)(data[1] | data[2] << 8);
    uint8_t mask = data[3] ? data[3] : 1;
    data += 4;
    size -= 4;
    unsigned char *body = malloc(size * 4 + 64); /* 3 input bytes become a 12-byte record */
    uint64_t starts[2048];
    size_t nrec = 0, blen = 0;
    while (size >= 3 && nrec < 2048) {
        uint32_t type = 1u + data[0] % 255u;
        size_t len = (size_t)(data[1] | data[2] << 8) % 512;
        data += 3;
        size -= 3;
        if (len > size) {
            len = size;
        }
        starts[nrec++] = KVS_SESSLOG_HEADER_BYTES + blen;
        unsigned char *r = body + blen;
        r[0] = (unsigned char)len;
        r[1] = (unsigned char)(len >> 8);
        r[2] = r[3] = 0;
        r[4] = (unsigned char)type;
        r[5] = r[6] = r[7] = 0;
        memcpy(r + 8, data, len);
        uint32_t crc = kvs_crc32c(0, r, 8 + len);
        for (int i = 0; i < 4; i++) {
            r[8 + len + i] = (unsigned char)(crc >> (8 * i));
        }
        blen += 12 + len;
        data += len;
        size -= len;
    }
    uint64_t total = KVS_SESSLOG_HEADER_BYTES + blen;
    size_t file_len = blen;
    /* the damaged record: k = index of the record holding absolute offset x */
    size_t k = nrec;
    uint64_t x = blen ? KVS_SESSLOG_HEADER_BYTES + where % blen : 0;
    if (blen > 0 && op % 3 != 0) {
        for (k = 0; k + 1 < nrec && starts[k + 1] <= x; k++) {
        }
        if (op % 3 == 1) {
            file_len = (size_t)(x - KVS_SESSLOG_HEADER_BYTES); /* cut at x */
        } else {
            body[x - KVS_SESSLOG_HEADER_BYTES] ^= mask; /* flip at x */
        }
    }
    put_file(log_path, h, sizeof h, body, file_len);
    char err[256];
    uint64_t n = 0;
    struct kvs_replay_stats st;
    int rc = kvs_sesslog_replay(dir, ID, &ident, on_record, &n, &st, err, sizeof err);
    uint64_t now = file_size(log_path);
    bool in_len = x - starts[k] < 4; /* a flipped length can frame a crafted "record" */
    bool cut_ok = rc == 0 && n == k && st.end_offset == starts[k] && now == starts[k];
    /* a good record crafted inside the damaged one's payload makes a tail look like
     * corruption in the middle: refused, nothing lost */
    bool refused = rc == KVS_BAD_FORMAT && st.tail == KVS_REPLAY_CORRUPT && n == k &&
                   now == KVS_SESSLOG_HEADER_BYTES + file_len;
    if (blen == 0 || op % 3 == 0) {
        check(rc == 0 && n == nrec && st.tail == KVS_REPLAY_CLEAN && now == total);
    } else if (op % 3 == 2 && in_len) {
        check(n >= k && now >= starts[k]); /* never a record before the damage lost */
    } else if (op % 3 == 1 || k + 1 == nrec) {
        check(cut_ok || refused);
    } else {
        check(refused); /* damage followed by good records: stop, report, change nothing */
    }
    free(body);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    init_once();
    if (size < 1) {
        return 0;
    }
    uint8_t mode = data[0] % 5;
    data++;
    size--;
    switch (mode) {
    case 0:
        put_file(log_path, data, size, NULL, 0);
        replay_file(0);
        break;
    case 1: {
        unsigned char h[KVS_SESSLOG_HEADER_BYTES];
        header_bytes(h);
        put_file(log_path, h, sizeof h, data, size);
        replay_file(1);
        break;
    }
    case 2:
        put_file(snap_path, data, size, NULL, 0);
        read_snapshot();
        break;
    case 3:
        fixed_snapshot(data, size);
        break;
    case 4:
        oracle(data, size);
        break;
    }
    unlink(log_path);
    unlink(snap_path);
    return 0;
}

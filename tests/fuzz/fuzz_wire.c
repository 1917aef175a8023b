/* libFuzzer target for the wire decoder (common/wire.c): any input is a payload frame.
 *
 * Checked on every input:
 *   - kvs_wire_decode returns 0 or one of the documented statuses, never crashes, leaks or
 *     allocates past the malloc limit (the bounded walk runs before msgpack-c);
 *   - whatever kvs_wire_prevalidate accepts, msgpack-c unpacks completely (the walk and the
 *     library agree on the format);
 *   - a decoded request has an id >= 1, a known op and NUL-terminated strings of the
 *     lengths it reports;
 *   - the error reply for the outcome is itself a valid frame.
 * Any crash, sanitizer report or abort() (a broken invariant) is a bug. */
#include "common/status.h"
#include "common/wire.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void check(int cond)
{
    if (!cond) {
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[256];
    int pv = kvs_wire_prevalidate(data, size, err, sizeof err);
    check(pv == 0 || pv == KVS_BAD_FORMAT || pv == KVS_TOO_LARGE || pv == KVS_INVALID_UTF8);
    if (pv == 0) {
        msgpack_unpacked up;
        msgpack_unpacked_init(&up);
        size_t off = 0;
        check(msgpack_unpack_next(&up, (const char *)data, size, &off) ==
              MSGPACK_UNPACK_SUCCESS);
        check(off == size && up.data.type == MSGPACK_OBJECT_MAP);
        msgpack_unpacked_destroy(&up);
    }

    struct kvs_wire_request rq;
    int rc = kvs_wire_decode(data, size, &rq, err, sizeof err);
    check(rc == 0 || rc == KVS_BAD_FORMAT || rc == KVS_TOO_LARGE || rc == KVS_INVALID_UTF8 ||
          rc == KVS_INVALID_ARGUMENT || rc == KVS_UNSUPPORTED);
    check(pv == 0 || rc == pv);
    if (rc == 0) {
        check(rq.id >= 1 && rq.op > KVS_OP_UNKNOWN && rq.op < KVS_OP_COUNT);
        check(rq.text == NULL || strlen(rq.text) == rq.text_len);
        check(rq.question == NULL || strlen(rq.question) == rq.question_len);
        check(rq.prefix == NULL || strlen(rq.prefix) == rq.prefix_len);
        check(rq.n_tokens >= 0 && rq.n_tokens <= KVS_WIRE_MAX_TOKENS);
        check(rq.n_stops >= 0 && rq.n_stops <= KVS_WIRE_MAX_STOPS);
        check(rq.session == NULL || (strlen(rq.session) >= 1 && strlen(rq.session) <= 128));
    }
    kvs_wire_buf b;
    kvs_wire_buf_init(&b);
    kvs_wire_encode_error(&b, rq.id, rc, err, rc == 0 ? -1 : 1);
    check(kvs_wire_prevalidate((const uint8_t *)b.sb.data, b.sb.size, NULL, 0) == 0);
    kvs_wire_buf_destroy(&b);
    kvs_wire_request_free(&rq);
    return 0;
}

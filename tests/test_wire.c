/* common/wire: the pre-validating decoder refuses every hostile or malformed payload with the
 * documented status before msgpack-c sees it, decodes good requests field by field, and
 * encodes error replies that round-trip. */
#include "common/status.h"
#include "common/wire.h"

#include <check.h>
#include <stdlib.h>
#include <string.h>

static char err[256];

/* Pack a request with msgpack-c: a map of n (key, value) pairs written by the caller. */
static kvs_wire_buf buf;

static void setup(void)
{
    kvs_wire_buf_init(&buf);
}

static void teardown(void)
{
    kvs_wire_buf_destroy(&buf);
}

static void kstr(const char *k)
{
    kvs_wire_pack_cstr(&buf.pk, k);
}

static int decode_buf(struct kvs_wire_request *rq)
{
    return kvs_wire_decode((const uint8_t *)buf.sb.data, buf.sb.size, rq, err, sizeof err);
}

static int decode_bytes(const void *p, size_t n, struct kvs_wire_request *rq)
{
    return kvs_wire_decode(p, n, rq, err, sizeof err);
}

START_TEST(test_good_append)
{
    msgpack_pack_map(&buf.pk, 6);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 42);
    kstr("op"), kstr("session.append");
    kstr("session"), kstr("ticks-1");
    kstr("text"), kstr("AAPL 189.2 \xc3\xa9");
    kstr("client_id"), msgpack_pack_uint64(&buf.pk, UINT64_MAX);
    kstr("unknown_key"), msgpack_pack_array(&buf.pk, 2), msgpack_pack_nil(&buf.pk),
        msgpack_pack_true(&buf.pk);
    struct kvs_wire_request rq;
    ck_assert_int_eq(decode_buf(&rq), 0);
    ck_assert_uint_eq(rq.id, 42);
    ck_assert_int_eq(rq.op, KVS_OP_SESSION_APPEND);
    ck_assert_str_eq(rq.session, "ticks-1");
    ck_assert_str_eq(rq.text, "AAPL 189.2 \xc3\xa9");
    ck_assert_uint_eq(rq.text_len, 13);
    ck_assert_uint_eq(rq.client_id, UINT64_MAX);
    ck_assert(!rq.has_tokens);
    kvs_wire_request_free(&rq);
    kvs_wire_request_free(&rq); /* idempotent */
}
END_TEST

START_TEST(test_good_query_and_tokens)
{
    msgpack_pack_map(&buf.pk, 8);
    kstr("op"), kstr("query");
    kstr("id"), msgpack_pack_uint8(&buf.pk, 7);
    kstr("session"), kstr("s");
    kstr("question"), kstr("What?");
    kstr("max_tokens"), msgpack_pack_uint16(&buf.pk, 100);
    kstr("stream"), msgpack_pack_true(&buf.pk);
    kstr("temperature"), msgpack_pack_float(&buf.pk, 0.5f);
    kstr("stops"), msgpack_pack_array(&buf.pk, 2), kstr("\n"), kstr("END");
    struct kvs_wire_request rq;
    ck_assert_int_eq(decode_buf(&rq), 0);
    ck_assert_int_eq(rq.op, KVS_OP_QUERY);
    ck_assert_int_eq(rq.max_tokens, 100);
    ck_assert(rq.stream);
    ck_assert(rq.temperature == 0.5);
    ck_assert(rq.top_p == 1.0);
    ck_assert_int_eq(rq.n_stops, 2);
    ck_assert_str_eq(rq.stops[1], "END");
    kvs_wire_request_free(&rq);

    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 4);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 1);
    kstr("op"), kstr("session.append");
    kstr("session"), kstr("s");
    kstr("tokens"), msgpack_pack_array(&buf.pk, 3);
    msgpack_pack_int(&buf.pk, 1), msgpack_pack_int(&buf.pk, 2), msgpack_pack_int(&buf.pk, 300);
    ck_assert_int_eq(decode_buf(&rq), 0);
    ck_assert(rq.has_tokens);
    ck_assert_int_eq(rq.n_tokens, 3);
    ck_assert_int_eq(rq.tokens[2], 300);
    kvs_wire_request_free(&rq);
}
END_TEST

/* Protocol 1.1: deadline_ms (bounded), cancel's target (required, >= 1), flash.watch's
 * optional after_version (0 is a value, not "absent"), session.dump. */
START_TEST(test_minor_1_fields)
{
    struct kvs_wire_request rq;
    msgpack_pack_map(&buf.pk, 4);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 5);
    kstr("op"), kstr("session.append");
    kstr("session"), kstr("s");
    kstr("text"), kstr("x");
    ck_assert_int_eq(decode_buf(&rq), 0);
    ck_assert_uint_eq(rq.deadline_ms, 0); /* absent: no deadline */
    kvs_wire_request_free(&rq);

    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 5);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 5);
    kstr("op"), kstr("query");
    kstr("session"), kstr("s");
    kstr("question"), kstr("q");
    kstr("deadline_ms"), msgpack_pack_uint32(&buf.pk, KVS_WIRE_MAX_DEADLINE_MS);
    ck_assert_int_eq(decode_buf(&rq), 0);
    ck_assert_uint_eq(rq.deadline_ms, KVS_WIRE_MAX_DEADLINE_MS);
    kvs_wire_request_free(&rq);

    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 5);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 5);
    kstr("op"), kstr("query");
    kstr("session"), kstr("s");
    kstr("question"), kstr("q");
    kstr("deadline_ms"), msgpack_pack_uint32(&buf.pk, KVS_WIRE_MAX_DEADLINE_MS + 1);
    ck_assert_int_eq(decode_buf(&rq), KVS_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err, "'deadline_ms'"));
    kvs_wire_request_free(&rq);

    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 3);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 6);
    kstr("op"), kstr("cancel");
    kstr("target"), msgpack_pack_uint64(&buf.pk, 5);
    ck_assert_int_eq(decode_buf(&rq), 0);
    ck_assert_int_eq(rq.op, KVS_OP_CANCEL);
    ck_assert_uint_eq(rq.target, 5);
    kvs_wire_request_free(&rq);

    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 2);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 6);
    kstr("op"), kstr("cancel");
    ck_assert_int_eq(decode_buf(&rq), KVS_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err, "'target'"));
    kvs_wire_request_free(&rq);

    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 3);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 6);
    kstr("op"), kstr("cancel");
    kstr("target"), msgpack_pack_uint64(&buf.pk, 0);
    ck_assert_int_eq(decode_buf(&rq), KVS_INVALID_ARGUMENT);
    kvs_wire_request_free(&rq);

    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 3);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 7);
    kstr("op"), kstr("flash.watch");
    kstr("session"), kstr("s");
    ck_assert_int_eq(decode_buf(&rq), 0);
    ck_assert_int_eq(rq.op, KVS_OP_FLASH_WATCH);
    ck_assert(!rq.has_after_version);
    kvs_wire_request_free(&rq);

    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 4);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 7);
    kstr("op"), kstr("flash.watch");
    kstr("session"), kstr("s");
    kstr("after_version"), msgpack_pack_uint64(&buf.pk, 0);
    ck_assert_int_eq(decode_buf(&rq), 0);
    ck_assert(rq.has_after_version);
    ck_assert_uint_eq(rq.after_version, 0);
    kvs_wire_request_free(&rq);

    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 2);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 8);
    kstr("op"), kstr("flash.watch");
    ck_assert_int_eq(decode_buf(&rq), KVS_INVALID_ARGUMENT); /* session required */
    kvs_wire_request_free(&rq);

    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 3);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 9);
    kstr("op"), kstr("session.dump");
    kstr("session"), kstr("s");
    ck_assert_int_eq(decode_buf(&rq), 0);
    ck_assert_int_eq(rq.op, KVS_OP_SESSION_DUMP);
    kvs_wire_request_free(&rq);
}
END_TEST

/* The allocation bomb: 5 bytes declaring a 4-billion-entry array (msgpack-c would try to
 * allocate ~96 GiB for its objects), as the payload and nested inside a map. */
START_TEST(test_allocation_bomb)
{
    struct kvs_wire_request rq;
    const uint8_t bomb[] = {0xdd, 0xff, 0xff, 0xff, 0xff};
    ck_assert_int_eq(decode_bytes(bomb, sizeof bomb, &rq), KVS_BAD_FORMAT);
    kvs_wire_request_free(&rq);
    const uint8_t map_bomb[] = {0xdf, 0xff, 0xff, 0xff, 0xff};
    ck_assert_int_eq(decode_bytes(map_bomb, sizeof map_bomb, &rq), KVS_BAD_FORMAT);
    kvs_wire_request_free(&rq);
    const uint8_t nested[] = {0x81, 0xa1, 'x', 0xdd, 0xff, 0xff, 0xff, 0xff};
    ck_assert_int_eq(decode_bytes(nested, sizeof nested, &rq), KVS_BAD_FORMAT);
    ck_assert_ptr_nonnull(strstr(err, "array"));
    kvs_wire_request_free(&rq);
    const uint8_t strbomb[] = {0x81, 0xa1, 'x', 0xdb, 0x7f, 0xff, 0xff, 0xff, 'a'};
    ck_assert_int_eq(decode_bytes(strbomb, sizeof strbomb, &rq), KVS_BAD_FORMAT);
    kvs_wire_request_free(&rq);
    const uint8_t binbomb[] = {0x81, 0xa1, 'x', 0xc6, 0xff, 0xff, 0xff, 0xff};
    ck_assert_int_eq(decode_bytes(binbomb, sizeof binbomb, &rq), KVS_TOO_LARGE);
    kvs_wire_request_free(&rq);
}
END_TEST

START_TEST(test_malformed)
{
    struct kvs_wire_request rq;
    const uint8_t truncated[] = {0x82, 0xa2, 'i', 'd', 0x01, 0xa2, 'o'};
    ck_assert_int_eq(decode_bytes(truncated, sizeof truncated, &rq), KVS_BAD_FORMAT);
    kvs_wire_request_free(&rq);
    const uint8_t c1[] = {0x81, 0xa1, 'x', 0xc1};
    ck_assert_int_eq(decode_bytes(c1, sizeof c1, &rq), KVS_BAD_FORMAT);
    kvs_wire_request_free(&rq);
    const uint8_t ext[] = {0x81, 0xa1, 'x', 0xd4, 0x01, 0x02};
    ck_assert_int_eq(decode_bytes(ext, sizeof ext, &rq), KVS_BAD_FORMAT);
    kvs_wire_request_free(&rq);
    const uint8_t not_map[] = {0x93, 1, 2, 3};
    ck_assert_int_eq(decode_bytes(not_map, sizeof not_map, &rq), KVS_BAD_FORMAT);
    kvs_wire_request_free(&rq);
    const uint8_t trailing[] = {0x80, 0x00};
    ck_assert_int_eq(decode_bytes(trailing, sizeof trailing, &rq), KVS_BAD_FORMAT);
    kvs_wire_request_free(&rq);
    const uint8_t int_key[] = {0x81, 0x01, 0x02};
    ck_assert_int_eq(decode_bytes(int_key, sizeof int_key, &rq), KVS_BAD_FORMAT);
    kvs_wire_request_free(&rq);
    ck_assert_int_eq(decode_bytes("", 0, &rq), KVS_BAD_FORMAT);
    kvs_wire_request_free(&rq);
    const char *junk = "GET / HTTP/1.1\r\n\r\n";
    ck_assert_int_eq(decode_bytes(junk, strlen(junk), &rq), KVS_BAD_FORMAT);
    kvs_wire_request_free(&rq);
    /* An empty map: well-formed, but no id. */
    const uint8_t empty[] = {0x80};
    ck_assert_int_eq(decode_bytes(empty, sizeof empty, &rq), KVS_INVALID_ARGUMENT);
    ck_assert_uint_eq(rq.id, 0);
    kvs_wire_request_free(&rq);
}
END_TEST

START_TEST(test_deep_nesting)
{
    /* {"x": [[[[...]]]]} 100 deep, then exactly at the cap. */
    uint8_t deep[200];
    size_t n = 0;
    deep[n++] = 0x81, deep[n++] = 0xa1, deep[n++] = 'x';
    for (int i = 0; i < 100; i++) {
        deep[n++] = 0x91;
    }
    deep[n++] = 0xc0;
    struct kvs_wire_request rq;
    ck_assert_int_eq(decode_bytes(deep, n, &rq), KVS_BAD_FORMAT);
    ck_assert_ptr_nonnull(strstr(err, "nesting"));
    kvs_wire_request_free(&rq);
    n = 3;
    for (int i = 0; i < KVS_WIRE_MAX_DEPTH - 1; i++) {
        deep[n++] = 0x91;
    }
    deep[n++] = 0xc0;
    ck_assert_int_eq(kvs_wire_prevalidate(deep, n, err, sizeof err), 0);
    /* one more level is refused */
    memmove(deep + 4, deep + 3, n - 3);
    deep[3] = 0x91;
    ck_assert_int_eq(kvs_wire_prevalidate(deep, n + 1, err, sizeof err), KVS_BAD_FORMAT);
}
END_TEST

START_TEST(test_object_cap)
{
    /* {"x": [nil x 70000]}: 70,002 bytes, every element one byte: over the object cap. */
    size_t n = 70000;
    uint8_t *p = malloc(n + 8);
    size_t k = 0;
    p[k++] = 0x81, p[k++] = 0xa1, p[k++] = 'x', p[k++] = 0xdd;
    p[k++] = 0, p[k++] = (uint8_t)(n >> 16), p[k++] = (uint8_t)(n >> 8), p[k++] = (uint8_t)n;
    memset(p + k, 0xc0, n);
    ck_assert_int_eq(kvs_wire_prevalidate(p, k + n, err, sizeof err), KVS_TOO_LARGE);
    free(p);
}
END_TEST

START_TEST(test_wrong_types_and_missing)
{
    struct kvs_wire_request rq;
    /* id as a string */
    msgpack_pack_map(&buf.pk, 2);
    kstr("id"), kstr("1");
    kstr("op"), kstr("ping");
    ck_assert_int_eq(decode_buf(&rq), KVS_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err, "'id'"));
    kvs_wire_request_free(&rq);
    /* negative id */
    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 2);
    kstr("id"), msgpack_pack_int(&buf.pk, -5);
    kstr("op"), kstr("ping");
    ck_assert_int_eq(decode_buf(&rq), KVS_INVALID_ARGUMENT);
    kvs_wire_request_free(&rq);
    /* max_tokens as a string: the id is still reported */
    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 5);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 9);
    kstr("op"), kstr("query");
    kstr("session"), kstr("s");
    kstr("question"), kstr("q");
    kstr("max_tokens"), kstr("10");
    ck_assert_int_eq(decode_buf(&rq), KVS_INVALID_ARGUMENT);
    ck_assert_uint_eq(rq.id, 9);
    ck_assert_ptr_nonnull(strstr(err, "'max_tokens'"));
    kvs_wire_request_free(&rq);
    /* missing session */
    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 2);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 3);
    kstr("op"), kstr("session.info");
    ck_assert_int_eq(decode_buf(&rq), KVS_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err, "'session'"));
    kvs_wire_request_free(&rq);
    /* both text and tokens */
    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 5);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 3);
    kstr("op"), kstr("session.append");
    kstr("session"), kstr("s");
    kstr("text"), kstr("x");
    kstr("tokens"), msgpack_pack_array(&buf.pk, 0);
    ck_assert_int_eq(decode_buf(&rq), KVS_INVALID_ARGUMENT);
    kvs_wire_request_free(&rq);
    /* negative token id */
    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 4);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 3);
    kstr("op"), kstr("session.append");
    kstr("session"), kstr("s");
    kstr("tokens"), msgpack_pack_array(&buf.pk, 1), msgpack_pack_int(&buf.pk, -1);
    ck_assert_int_eq(decode_buf(&rq), KVS_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err, "'tokens'"));
    kvs_wire_request_free(&rq);
    /* bad session id characters */
    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 3);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 3);
    kstr("op"), kstr("session.info");
    kstr("session"), kstr("../etc/passwd");
    ck_assert_int_eq(decode_buf(&rq), KVS_INVALID_ARGUMENT);
    kvs_wire_request_free(&rq);
    /* unknown op */
    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 2);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 4);
    kstr("op"), kstr("exec");
    ck_assert_int_eq(decode_buf(&rq), KVS_UNSUPPORTED);
    ck_assert_uint_eq(rq.id, 4);
    kvs_wire_request_free(&rq);
    /* duplicate key */
    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 3);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 4);
    kstr("op"), kstr("ping");
    kstr("op"), kstr("status");
    ck_assert_int_eq(decode_buf(&rq), KVS_BAD_FORMAT);
    kvs_wire_request_free(&rq);
    /* NaN temperature */
    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 3);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 4);
    kstr("op"), kstr("ping");
    kstr("temperature"), msgpack_pack_double(&buf.pk, 0.0 / 0.0);
    ck_assert_int_eq(decode_buf(&rq), KVS_INVALID_ARGUMENT);
    kvs_wire_request_free(&rq);
}
END_TEST

START_TEST(test_invalid_utf8)
{
    struct kvs_wire_request rq;
    const char *bad[] = {"\xff", "\xc3", "\xed\xa0\x80" /* surrogate */, "\xc0\xaf" /* overlong */};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        /* write the bad bytes directly, bypassing the sanitising packer */
        kvs_wire_buf_clear(&buf);
        msgpack_pack_map(&buf.pk, 4);
        kstr("id"), msgpack_pack_uint64(&buf.pk, 1);
        kstr("op"), kstr("session.append");
        kstr("session"), kstr("s");
        kstr("text");
        msgpack_pack_str(&buf.pk, strlen(bad[i]));
        msgpack_pack_str_body(&buf.pk, bad[i], strlen(bad[i]));
        ck_assert_int_eq(decode_buf(&rq), KVS_INVALID_UTF8);
        kvs_wire_request_free(&rq);
    }
    /* invalid UTF-8 in a key */
    const uint8_t key[] = {0x81, 0xa1, 0xff, 0xc0};
    ck_assert_int_eq(decode_bytes(key, sizeof key, &rq), KVS_INVALID_UTF8);
    kvs_wire_request_free(&rq);
}
END_TEST

START_TEST(test_oversize)
{
    struct kvs_wire_request rq;
    /* a frame over the limit */
    size_t n = KVS_WIRE_MAX_FRAME + 1;
    uint8_t *p = calloc(1, n);
    p[0] = 0x80;
    ck_assert_int_eq(decode_bytes(p, n, &rq), KVS_TOO_LARGE);
    kvs_wire_request_free(&rq);
    free(p);
    /* a string over the limit */
    size_t len = KVS_WIRE_MAX_STRING + 1;
    char *s = malloc(len);
    memset(s, 'a', len);
    msgpack_pack_map(&buf.pk, 1);
    kstr("text");
    msgpack_pack_str(&buf.pk, len);
    msgpack_pack_str_body(&buf.pk, s, len);
    ck_assert_int_eq(decode_buf(&rq), KVS_TOO_LARGE);
    kvs_wire_request_free(&rq);
    free(s);
    /* too many tokens */
    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 4);
    kstr("id"), msgpack_pack_uint64(&buf.pk, 1);
    kstr("op"), kstr("session.append");
    kstr("session"), kstr("s");
    kstr("tokens"), msgpack_pack_array(&buf.pk, KVS_WIRE_MAX_TOKENS + 1);
    for (int i = 0; i <= KVS_WIRE_MAX_TOKENS; i++) {
        msgpack_pack_uint32(&buf.pk, 5);
    }
    ck_assert_int_eq(decode_buf(&rq), KVS_TOO_LARGE);
    kvs_wire_request_free(&rq);
    /* a long key */
    kvs_wire_buf_clear(&buf);
    msgpack_pack_map(&buf.pk, 1);
    char k[100];
    memset(k, 'k', 99);
    k[99] = '\0';
    kstr(k), msgpack_pack_nil(&buf.pk);
    ck_assert_int_eq(decode_buf(&rq), KVS_BAD_FORMAT);
    kvs_wire_request_free(&rq);
}
END_TEST

START_TEST(test_error_encoding)
{
    kvs_wire_encode_error(&buf, 77, KVS_NOT_FOUND, "session '\xff' not found", 3);
    msgpack_unpacked up;
    msgpack_unpacked_init(&up);
    size_t off = 0;
    ck_assert_int_eq(msgpack_unpack_next(&up, buf.sb.data, buf.sb.size, &off),
                     MSGPACK_UNPACK_SUCCESS);
    ck_assert_int_eq(kvs_wire_prevalidate((const uint8_t *)buf.sb.data, buf.sb.size, err,
                                          sizeof err),
                     0); /* the '\xff' was replaced: the reply is valid UTF-8 */
    ck_assert_int_eq(up.data.type, MSGPACK_OBJECT_MAP);
    ck_assert_uint_eq(up.data.via.map.size, 4);
    const msgpack_object *e = &up.data.via.map.ptr[3].val;
    ck_assert_int_eq(e->type, MSGPACK_OBJECT_MAP);
    const msgpack_object *code = &e->via.map.ptr[0].val;
    ck_assert_int_eq(code->via.str.size, 9);
    ck_assert(memcmp(code->via.str.ptr, "NOT_FOUND", 9) == 0);
    msgpack_unpacked_destroy(&up);
    ck_assert_str_eq(kvs_wire_op_name(KVS_OP_FLASH_GET), "flash.get");
    ck_assert_str_eq(kvs_wire_op_name(KVS_OP_FLASH_WATCH), "flash.watch");
    ck_assert_str_eq(kvs_wire_op_name(KVS_OP_CANCEL), "cancel");
    ck_assert_str_eq(kvs_wire_op_name(KVS_OP_UNKNOWN), "?");
}
END_TEST

int main(void)
{
    Suite *s = suite_create("wire");
    TCase *tc = tcase_create("decode");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_good_append);
    tcase_add_test(tc, test_good_query_and_tokens);
    tcase_add_test(tc, test_minor_1_fields);
    tcase_add_test(tc, test_allocation_bomb);
    tcase_add_test(tc, test_malformed);
    tcase_add_test(tc, test_deep_nesting);
    tcase_add_test(tc, test_object_cap);
    tcase_add_test(tc, test_wrong_types_and_missing);
    tcase_add_test(tc, test_invalid_utf8);
    tcase_add_test(tc, test_oversize);
    tcase_add_test(tc, test_error_encoding);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

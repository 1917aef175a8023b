/* libFuzzer target for the etcd gateway reply parsers (common/store_etcd.c): arbitrary bytes
 * parsed as JSON (as a reply body would be), then handed to every reply parser and to the
 * watch-stream parser. Any crash, sanitizer report, leak or hang is a bug. */
#include "common/store_etcd.h"

#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_t *j = json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES, NULL);
    if (j == NULL) {
        return 0;
    }
    struct kvs_store_range r;
    kvs_etcd_parse_range(j, &r);
    for (size_t i = 0; i < r.n; i++) {
        if (r.kvs[i].key == NULL || r.kvs[i].value == NULL ||
            r.kvs[i].value[r.kvs[i].value_len] != '\0') {
            abort();
        }
    }
    kvs_store_range_free(&r);
    int64_t a, b;
    bool ok;
    kvs_etcd_parse_delete(j, &a, &b);
    kvs_etcd_parse_txn(j, &ok, &a);
    kvs_etcd_parse_lease_grant(j, &a, &b);
    kvs_etcd_parse_keepalive(j, &a);
    char err[128];
    kvs_etcd_parse_error(429, j, err, sizeof err);
    struct kvs_etcd_watch_msg m;
    kvs_etcd_parse_watch(j, &m, err, sizeof err);
    kvs_etcd_watch_msg_free(&m);
    json_decref(j);
    return 0;
}

/* libFuzzer target for the coordinator's request decoder (coordinator/cmsg.c): arbitrary
 * bytes as a payload frame. Any crash, sanitizer report, leak or hang is a bug; a decoded
 * request must satisfy what the decoder promises. */
#include "coordinator/cmsg.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct kvs_cmsg m;
    char err[256];
    int rc = kvs_cmsg_decode(data, size, &m, err, sizeof err);
    if (rc == 0) {
        if (m.id == 0 || m.op == KVS_COP_UNKNOWN || m.op >= KVS_COP_COUNT) {
            abort();
        }
        if (m.session[0] != '\0' && !kvs_cmsg_valid_id(m.session, 128)) {
            abort();
        }
        if (m.worker[0] != '\0' && !kvs_cmsg_valid_id(m.worker, KVS_CMSG_WORKER_MAX)) {
            abort();
        }
        if (m.model[0] != '\0' && strlen(m.model) != 64) {
            abort();
        }
        if (m.n_prefix_hashes > KVS_CMSG_MAX_PREFIXES) {
            abort();
        }
    }
    kvs_cmsg_free(&m);
    return 0;
}

#include "status.h"

#include <stdarg.h>
#include <stdio.h>

const char *kvs_status_name(int status)
{
    switch (status) {
#define KVS_STATUS_NAME(name, value, msg)                                                  \
    case value:                                                                            \
        return #name;
        KVS_STATUS_TABLE(KVS_STATUS_NAME)
#undef KVS_STATUS_NAME
    }
    return "UNKNOWN";
}

const char *kvs_status_message(int status)
{
    switch (status) {
#define KVS_STATUS_MSG(name, value, msg)                                                   \
    case value:                                                                            \
        return msg;
        KVS_STATUS_TABLE(KVS_STATUS_MSG)
#undef KVS_STATUS_MSG
    }
    return "unknown status";
}

void kvs_errf(char *err, size_t errlen, const char *fmt, ...)
{
    if (err == NULL || errlen == 0) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

#include "status.h"

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

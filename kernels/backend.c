/* Backend-independent helpers of kernels/backend.h. */
#include "kernels/backend.h"

void kvs_backend_destroy(kvs_backend **b)
{
    if (b == NULL || *b == NULL) {
        return;
    }
    (*b)->ops->destroy(*b);
    *b = NULL;
}

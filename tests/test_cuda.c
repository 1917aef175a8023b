/* The CUDA build works end to end on a GPU; on a machine without one this test is skipped
 * (exit 77, reported as skipped by ctest) with the runtime's reason. */
#include <stdio.h>

#ifdef KVS_HAVE_CUDA
#include "kernels/cuda/cuda.h"

int main(void)
{
    char why[256] = "";
    int n = kvs_cuda_device_count(why, sizeof why);
    if (n == 0) {
        printf("SKIP: no CUDA device (%s); GPU tests run on the device machine\n", why);
        return 77;
    }
    for (int d = 0; d < n; d++) {
        char name[256];
        if (kvs_cuda_device_name(d, name, sizeof name) != 0 ||
            kvs_cuda_selfcheck(d, why, sizeof why) != 0) {
            printf("FAIL: device %d: %s\n", d, why);
            return 1;
        }
        printf("device %d: %s: self-check ok\n", d, name);
    }
    return 0;
}
#else
int main(void)
{
    printf("SKIP: built without CUDA (KVS_CUDA=OFF or no nvcc)\n");
    return 77;
}
#endif

#include "kernels/cuda/cuda.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <cuda_runtime.h>

extern "C" {
#include "common/status.h"
}

extern "C" int kvs_cuda_device_count(char *why, size_t whylen)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        if (why != NULL && whylen > 0) {
            snprintf(why, whylen, "%s", cudaGetErrorString(e));
        }
        (void)cudaGetLastError(); /* clear the sticky error */
        return 0;
    }
    if (n == 0 && why != NULL && whylen > 0) {
        snprintf(why, whylen, "the CUDA runtime reports no devices");
    }
    return n;
}

extern "C" int kvs_cuda_device_name(int dev, char *buf, size_t len)
{
    cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, dev);
    if (e != cudaSuccess) {
        snprintf(buf, len, "device %d: %s", dev, cudaGetErrorString(e));
        return KVS_NO_DEVICE;
    }
    snprintf(buf, len, "%s (sm_%d%d)", p.name, p.major, p.minor);
    return KVS_OK;
}

static __global__ void axpy_kernel(int n, float a, const float *x, float *y)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        y[i] = a * x[i] + y[i];
    }
}

#define CHECK(call)                                                                        \
    do {                                                                                   \
        cudaError_t e_ = (call);                                                           \
        if (e_ != cudaSuccess) {                                                           \
            snprintf(why, whylen, "%s: %s", #call, cudaGetErrorString(e_));                \
            rc = KVS_DEVICE;                                                               \
            goto out;                                                                      \
        }                                                                                  \
    } while (0)

extern "C" int kvs_cuda_selfcheck(int dev, char *why, size_t whylen)
{
    const int n = 1 << 16;
    int rc = KVS_OK;
    float *hx = (float *)malloc(n * sizeof(float)), *hy = (float *)malloc(n * sizeof(float));
    float *dx = NULL, *dy = NULL;
    if (hx == NULL || hy == NULL) {
        free(hx);
        free(hy);
        return KVS_NO_MEMORY;
    }
    for (int i = 0; i < n; i++) {
        hx[i] = (float)(i % 97) * 0.25f;
        hy[i] = (float)(i % 13);
    }
    CHECK(cudaSetDevice(dev));
    CHECK(cudaMalloc(&dx, n * sizeof(float)));
    CHECK(cudaMalloc(&dy, n * sizeof(float)));
    CHECK(cudaMemcpy(dx, hx, n * sizeof(float), cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dy, hy, n * sizeof(float), cudaMemcpyHostToDevice));
    axpy_kernel<<<(n + 255) / 256, 256>>>(n, 2.0f, dx, dy);
    CHECK(cudaGetLastError());
    CHECK(cudaMemcpy(hy, dy, n * sizeof(float), cudaMemcpyDeviceToHost));
    for (int i = 0; i < n; i++) {
        float want = 2.0f * ((float)(i % 97) * 0.25f) + (float)(i % 13);
        if (fabsf(hy[i] - want) > 1e-6f) {
            snprintf(why, whylen, "axpy mismatch at %d: %g != %g", i, hy[i], want);
            rc = KVS_DEVICE;
            goto out;
        }
    }
out:
    cudaFree(dx);
    cudaFree(dy);
    free(hx);
    free(hy);
    return rc;
}

/* Run-time choice of the CPU kernels' instruction-set level. */
#include "kernels/cpu/cpu_impl.h"

#include "common/log.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>

/* F16C from CPUID leaf 1 (ECX bit 29): clang 14's __builtin_cpu_supports has no "f16c". */
static int has_f16c(void)
{
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29)) != 0;
}
#endif

static int isa_supported(void)
{
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma") &&
        has_f16c()) {
        return KVS_CPU_ISA_AVX512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        has_f16c()) {
        return KVS_CPU_ISA_AVX2;
    }
#endif
    return KVS_CPU_ISA_SCALAR;
}

int kvs_cpu_isa_detect(void)
{
    int isa = isa_supported();
    const char *env = getenv("KVS_CPU_ISA");
    if (env != NULL && env[0] != '\0') {
        int want = -1;
        if (strcmp(env, "scalar") == 0) {
            want = KVS_CPU_ISA_SCALAR;
        } else if (strcmp(env, "avx2") == 0) {
            want = KVS_CPU_ISA_AVX2;
        } else if (strcmp(env, "avx512") == 0) {
            want = KVS_CPU_ISA_AVX512;
        }
        if (want < 0) {
            KVS_WARN("cpu: KVS_CPU_ISA=%s is not one of scalar|avx2|avx512; using %s", env,
                     kvs_cpu_isa_name(isa));
        } else if (want > isa) {
            KVS_WARN("cpu: KVS_CPU_ISA=%s is not supported here; using %s", env,
                     kvs_cpu_isa_name(isa));
        } else {
            isa = want;
        }
    }
    return isa;
}

const char *kvs_cpu_isa_name(int isa)
{
    switch (isa) {
    case KVS_CPU_ISA_SCALAR:
        return "scalar";
    case KVS_CPU_ISA_AVX2:
        return "avx2";
    case KVS_CPU_ISA_AVX512:
        return "avx512";
    default:
        return "unknown";
    }
}

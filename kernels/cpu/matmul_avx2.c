/* AVX2 + FMA + F16C kernels (kernels/cpu/matmul_x86.h with maddubs integer dots). */
#include "kernels/cpu/cpu_impl.h"

#if defined(__x86_64__)

#define KVS_X86_NAME(s) s##_avx2
#define KVS_X86_VNNI 0
#define KVS_X86_TILE_R 4 /* 16 ymm registers: 4 rows x 1 output */
#define KVS_X86_TILE_C 1
#define KVS_X86_SCORES_NQ 1 /* queries per scores tile: 8 accumulators */
#define KVS_X86_PV_NQ 2     /* weight rows per pv tile */
#include "kernels/cpu/matmul_x86.h"

const struct kvs_cpu_kernels kvs_cpu_kernels_avx2 = {
    .isa = KVS_CPU_ISA_AVX2,
    .quantize_q8 = quantize_q8_avx2,
    .gemm_f32 = gemm_f32_avx2,
    .gemm_f16 = gemm_f16_avx2,
    .gemm_bf16 = gemm_bf16_avx2,
    .gemm_q8_0 = gemm_q8_0_avx2,
    .gemm_q4_0 = gemm_q4_0_avx2,
    .gemm_q4_1 = gemm_q4_1_avx2,
    .exp_shift = exp_shift_avx2,
    .scores16 = scores16_avx2,
    .pv16 = pv16_avx2,
    .lanes16 = lanes16_avx2,
    .round_f16 = round_f16_avx2,
    .f16_to_f32 = f16_to_f32_avx2,
    .swiglu = swiglu_avx2,
    .scale = scale_avx2,
    .f32_to_f16 = f32_to_f16_avx2,
};

#endif

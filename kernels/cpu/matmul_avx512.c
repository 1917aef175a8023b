/* AVX-512 level kernels: the x86 template with vpdpbusd (AVX512-VNNI on 256-bit vectors)
 * for the integer dots and 32 vector registers for wider tiles. The integer block sums are
 * the same as the AVX2 level's; only the tile shapes differ. */
#if defined(__x86_64__)
#pragma GCC target("avx512vnni")
#endif

#include "kernels/cpu/cpu_impl.h"

#if defined(__x86_64__)

#define KVS_X86_NAME(s) s##_avx512
#define KVS_X86_VNNI 1
#define KVS_X86_TILE_R 4 /* 32 registers: 4 rows x 2 outputs */
#define KVS_X86_TILE_C 2
#include "kernels/cpu/matmul_x86.h"

const struct kvs_cpu_kernels kvs_cpu_kernels_avx512 = {
    .isa = KVS_CPU_ISA_AVX512,
    .quantize_q8 = quantize_q8_avx512,
    .gemm_f32 = gemm_f32_avx512,
    .gemm_f16 = gemm_f16_avx512,
    .gemm_bf16 = gemm_bf16_avx512,
    .gemm_q8_0 = gemm_q8_0_avx512,
    .gemm_q4_0 = gemm_q4_0_avx512,
    .gemm_q4_1 = gemm_q4_1_avx512,
    .scores_f32 = scores_float_avx512,
    .scores_f16 = scores_kvs_f16_t_avx512,
    .exp_shift = exp_shift_avx512,
    .pv_f32 = pv_float_avx512,
    .pv_f16 = pv_kvs_f16_t_avx512,
    .swiglu = swiglu_avx512,
    .dot_f32 = dot_float_avx512,
    .dot_f16 = dot_kvs_f16_t_avx512,
    .scale = scale_avx512,
    .axpy_f32 = axpy_float_avx512,
    .axpy_f16 = axpy_kvs_f16_t_avx512,
    .f32_to_f16 = f32_to_f16_avx512,
};

#endif

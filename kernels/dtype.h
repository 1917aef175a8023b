/* Tensor element types. Values equal ggml's type ids so that GGUF tensor types map 1:1.
 *
 * Block layouts (little-endian, as in GGUF):
 *   F32  : 1 element, 4 bytes
 *   F16  : 1 element, 2 bytes (IEEE half)
 *   BF16 : 1 element, 2 bytes (upper half of an f32)
 *   Q8_0 : 32 elements, 34 bytes = f16 d; int8 q[32];           x = d * q
 *   Q4_0 : 32 elements, 18 bytes = f16 d; uint8 qs[16];         x = d * (nibble - 8)
 *   Q4_1 : 32 elements, 20 bytes = f16 d; f16 m; uint8 qs[16];  x = d * nibble + m
 * For Q4_*, element j < 16 is the low nibble of qs[j], element j + 16 the high nibble.
 */
#ifndef KVS_DTYPE_H
#define KVS_DTYPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum kvs_dtype {
    KVS_DTYPE_F32 = 0,
    KVS_DTYPE_F16 = 1,
    KVS_DTYPE_Q4_0 = 2,
    KVS_DTYPE_Q4_1 = 3,
    KVS_DTYPE_Q8_0 = 8,
    KVS_DTYPE_BF16 = 30,
};

/* True for the types above; false for any other ggml id (refused by the loader). */
bool kvs_dtype_is_supported(uint32_t type);

/* "F32", "Q4_1", ...; "unknown" for an unsupported id. */
const char *kvs_dtype_name(uint32_t type);

/* Elements per block (1 for float types, 32 for the quantized ones); 0 if unsupported. */
uint32_t kvs_dtype_block_elems(uint32_t type);

/* Bytes per block; 0 if unsupported. */
uint32_t kvs_dtype_block_bytes(uint32_t type);

/* Bytes of a row of n elements. Returns false (and leaves *bytes alone) when n is not a
 * multiple of the block size, the type is unsupported, or the product overflows. */
bool kvs_dtype_row_bytes(uint32_t type, uint64_t n, uint64_t *bytes);

/* Conversions between f32 and the 16-bit float formats (round to nearest even). */
float kvs_fp16_to_fp32(uint16_t h);
uint16_t kvs_fp32_to_fp16(float f);
float kvs_bf16_to_fp32(uint16_t h);
uint16_t kvs_fp32_to_bf16(float f);

/* Dequantize n elements of type `type` starting at a block boundary of src into dst.
 * n must be a multiple of the block size (asserted). */
void kvs_dequantize(uint32_t type, const void *src, float *dst, uint64_t n);

#endif

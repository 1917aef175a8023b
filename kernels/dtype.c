/* Tensor element types: block geometry, 16-bit float conversions and reference
 * dequantization (scalar; the CPU backend may have faster versions, checked against these). */
#include "kernels/dtype.h"

#include <assert.h>
#include <string.h>

struct dtype_info {
    uint32_t type;
    const char *name;
    uint32_t block_elems; /* elements per block */
    uint32_t block_bytes; /* bytes per block */
};

/* The one name table for enum kvs_dtype. */
static const struct dtype_info dtype_table[] = {
    {KVS_DTYPE_F32, "F32", 1, 4},     {KVS_DTYPE_F16, "F16", 1, 2},
    {KVS_DTYPE_Q4_0, "Q4_0", 32, 18}, {KVS_DTYPE_Q4_1, "Q4_1", 32, 20},
    {KVS_DTYPE_Q8_0, "Q8_0", 32, 34}, {KVS_DTYPE_BF16, "BF16", 1, 2},
};

static const struct dtype_info *find_info(uint32_t type)
{
    for (size_t i = 0; i < sizeof dtype_table / sizeof dtype_table[0]; i++) {
        if (dtype_table[i].type == type) {
            return &dtype_table[i];
        }
    }
    return NULL;
}

bool kvs_dtype_is_supported(uint32_t type)
{
    return find_info(type) != NULL;
}

const char *kvs_dtype_name(uint32_t type)
{
    const struct dtype_info *d = find_info(type);
    return d != NULL ? d->name : "unknown";
}

uint32_t kvs_dtype_block_elems(uint32_t type)
{
    const struct dtype_info *d = find_info(type);
    return d != NULL ? d->block_elems : 0;
}

uint32_t kvs_dtype_block_bytes(uint32_t type)
{
    const struct dtype_info *d = find_info(type);
    return d != NULL ? d->block_bytes : 0;
}

bool kvs_dtype_row_bytes(uint32_t type, uint64_t n, uint64_t *bytes)
{
    const struct dtype_info *d = find_info(type);
    if (d == NULL || n % d->block_elems != 0) {
        return false;
    }
    uint64_t n_blocks = n / d->block_elems;
    if (n_blocks > UINT64_MAX / d->block_bytes) {
        return false;
    }
    *bytes = n_blocks * d->block_bytes;
    return true;
}

/* ---- 16-bit floats ---- */

static uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float kvs_fp16_to_fp32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) { /* Inf / NaN: keep the payload */
        return bits_f32(sign | 0x7f800000u | (man << 13));
    }
    if (exp == 0) {
        if (man == 0) {
            return bits_f32(sign);
        }
        /* subnormal: man * 2^-24, exact in f32 */
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

uint16_t kvs_fp32_to_fp16(float f)
{
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t exp = (u >> 23) & 0xffu;
    uint32_t man = u & 0x7fffffu;
    if (exp == 0xff) {
        if (man != 0) { /* NaN: quiet, keep the top payload bits */
            return (uint16_t)(sign | 0x7e00u | (man >> 13));
        }
        return (uint16_t)(sign | 0x7c00u);
    }
    int32_t e = (int32_t)exp - 127 + 15; /* biased half exponent */
    if (e >= 0x1f) {
        return (uint16_t)(sign | 0x7c00u); /* overflow to Inf */
    }
    if (e <= 0) {
        /* subnormal half (or zero): value = m * 2^-24 with m = full mantissa >> shift */
        if (e < -10) {
            return sign; /* below half the smallest subnormal: rounds to zero */
        }
        uint32_t full = man | 0x800000u;     /* 24-bit significand */
        uint32_t shift = (uint32_t)(14 - e); /* 14..24 */
        uint32_t m = full >> shift;
        uint32_t rem = full & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (m & 1u))) {
            m++; /* may carry into the smallest normal: the bit pattern is still right */
        }
        return (uint16_t)(sign | m);
    }
    uint32_t m = man >> 13;
    uint32_t rem = man & 0x1fffu;
    uint32_t out = ((uint32_t)e << 10) | m;
    if (rem > 0x1000u || (rem == 0x1000u && (m & 1u))) {
        out++; /* carry may overflow the exponent into Inf (0x7c00): correct */
    }
    return (uint16_t)(sign | out);
}

float kvs_bf16_to_fp32(uint16_t h)
{
    return bits_f32((uint32_t)h << 16);
}

uint16_t kvs_fp32_to_bf16(float f)
{
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) { /* NaN: quiet it, keep sign */
        return (uint16_t)((u >> 16) | 0x0040u);
    }
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even; Inf stays Inf */
    return (uint16_t)(u >> 16);
}

/* ---- dequantization ---- */

static uint16_t rd16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static void dequant_q8_0(const uint8_t *src, float *dst, uint64_t n_blocks)
{
    for (uint64_t b = 0; b < n_blocks; b++, src += 34, dst += 32) {
        float d = kvs_fp16_to_fp32(rd16(src));
        const int8_t *q = (const int8_t *)(src + 2);
        for (int j = 0; j < 32; j++) {
            dst[j] = d * (float)q[j];
        }
    }
}

static void dequant_q4_0(const uint8_t *src, float *dst, uint64_t n_blocks)
{
    for (uint64_t b = 0; b < n_blocks; b++, src += 18, dst += 32) {
        float d = kvs_fp16_to_fp32(rd16(src));
        const uint8_t *qs = src + 2;
        for (int j = 0; j < 16; j++) {
            dst[j] = d * (float)((int)(qs[j] & 0x0f) - 8);
            dst[j + 16] = d * (float)((int)(qs[j] >> 4) - 8);
        }
    }
}

static void dequant_q4_1(const uint8_t *src, float *dst, uint64_t n_blocks)
{
    for (uint64_t b = 0; b < n_blocks; b++, src += 20, dst += 32) {
        float d = kvs_fp16_to_fp32(rd16(src));
        float m = kvs_fp16_to_fp32(rd16(src + 2));
        const uint8_t *qs = src + 4;
        for (int j = 0; j < 16; j++) {
            dst[j] = d * (float)(qs[j] & 0x0f) + m;
            dst[j + 16] = d * (float)(qs[j] >> 4) + m;
        }
    }
}

void kvs_dequantize(uint32_t type, const void *src, float *dst, uint64_t n)
{
    const uint8_t *s = src;
    uint32_t be = kvs_dtype_block_elems(type);
    assert(be != 0 && n % be == 0);
    (void)be; /* only checked by the assert */
    switch (type) {
    case KVS_DTYPE_F32:
        memcpy(dst, s, (size_t)n * sizeof(float));
        break;
    case KVS_DTYPE_F16:
        for (uint64_t i = 0; i < n; i++) {
            dst[i] = kvs_fp16_to_fp32(rd16(s + 2 * i));
        }
        break;
    case KVS_DTYPE_BF16:
        for (uint64_t i = 0; i < n; i++) {
            dst[i] = kvs_bf16_to_fp32(rd16(s + 2 * i));
        }
        break;
    case KVS_DTYPE_Q8_0:
        dequant_q8_0(s, dst, n / 32);
        break;
    case KVS_DTYPE_Q4_0:
        dequant_q4_0(s, dst, n / 32);
        break;
    case KVS_DTYPE_Q4_1:
        dequant_q4_1(s, dst, n / 32);
        break;
    default:
        assert(!"unsupported dtype");
        break;
    }
}

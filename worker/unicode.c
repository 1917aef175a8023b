/* Code point classes, lowercase, lenient UTF-8 decoding and the GPT-2 byte map. */
#include "worker/unicode.h"

#include <assert.h>

uint16_t kvs_unicode_flags(uint32_t cpt)
{
    if (cpt >= KVS_UNICODE_MAX) {
        return 0;
    }
    /* last range whose first <= cpt; ranges[0].first == 0 */
    size_t lo = 0, hi = kvs_unicode_n_ranges;
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (kvs_unicode_ranges[mid].first <= cpt) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return kvs_unicode_ranges[lo].flags;
}

uint32_t kvs_unicode_tolower(uint32_t cpt)
{
    if (cpt < 0x80) {
        return (cpt >= 'A' && cpt <= 'Z') ? cpt + 32 : cpt;
    }
    size_t lo = 0, hi = kvs_unicode_n_lower;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (kvs_unicode_lower[mid].from < cpt) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if (lo < kvs_unicode_n_lower && kvs_unicode_lower[lo].from == cpt) {
        return kvs_unicode_lower[lo].to;
    }
    return cpt;
}

static bool is_cont(uint8_t b)
{
    return (b & 0xC0) == 0x80;
}

uint32_t kvs_unicode_decode(const char *s, size_t len, size_t *pos)
{
    assert(*pos < len);
    const uint8_t *p = (const uint8_t *)s + *pos;
    size_t left = len - *pos;
    uint8_t b0 = p[0];
    if (b0 < 0x80) {
        *pos += 1;
        return b0;
    }
    if ((b0 & 0x40) == 0) { /* stray continuation byte */
        goto invalid;
    }
    if ((b0 & 0x20) == 0) {
        if (left < 2 || !is_cont(p[1])) {
            goto invalid;
        }
        *pos += 2;
        return ((uint32_t)(b0 & 0x1F) << 6) | (p[1] & 0x3F);
    }
    if ((b0 & 0x10) == 0) {
        if (left < 3 || !is_cont(p[1]) || !is_cont(p[2])) {
            goto invalid;
        }
        *pos += 3;
        return ((uint32_t)(b0 & 0x0F) << 12) | ((uint32_t)(p[1] & 0x3F) << 6) | (p[2] & 0x3F);
    }
    if ((b0 & 0x08) == 0) {
        if (left < 4 || !is_cont(p[1]) || !is_cont(p[2]) || !is_cont(p[3])) {
            goto invalid;
        }
        *pos += 4;
        uint32_t c = ((uint32_t)(b0 & 0x07) << 18) | ((uint32_t)(p[1] & 0x3F) << 12) |
                     ((uint32_t)(p[2] & 0x3F) << 6) | (p[3] & 0x3F);
        return c < KVS_UNICODE_MAX ? c : KVS_UNICODE_REPLACEMENT;
    }
invalid:
    *pos += 1;
    return KVS_UNICODE_REPLACEMENT;
}

size_t kvs_unicode_encode(uint32_t cpt, char *out)
{
    assert(cpt < KVS_UNICODE_MAX);
    if (cpt < 0x80) {
        out[0] = (char)cpt;
        return 1;
    }
    if (cpt < 0x800) {
        out[0] = (char)(0xC0 | (cpt >> 6));
        out[1] = (char)(0x80 | (cpt & 0x3F));
        return 2;
    }
    if (cpt < 0x10000) {
        out[0] = (char)(0xE0 | (cpt >> 12));
        out[1] = (char)(0x80 | ((cpt >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cpt & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cpt >> 18));
    out[1] = (char)(0x80 | ((cpt >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cpt >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cpt & 0x3F));
    return 4;
}

size_t kvs_unicode_len_utf8(uint8_t lead)
{
    static const uint8_t by_nibble[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    return by_nibble[lead >> 4];
}

/* GPT-2 keeps the printable Latin-1 bytes ('!'..'~', 0xA1..0xAC, 0xAE..0xFF) as themselves
 * and maps the other 68 bytes, in order, to U+0100, U+0101, ... */
static bool byte_is_printable(unsigned b)
{
    return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
}

uint32_t kvs_unicode_byte_to_cpt(uint8_t b)
{
    if (byte_is_printable(b)) {
        return b;
    }
    /* rank among the non-printable bytes: 0x00..0x20, then 0x7F..0xA0, then 0xAD */
    if (b <= 0x20) {
        return 0x100 + b;
    }
    if (b >= 0x7F && b <= 0xA0) {
        return 0x100 + 33 + (b - 0x7Fu);
    }
    return 0x100 + 67; /* 0xAD */
}

int kvs_unicode_cpt_to_byte(uint32_t cpt)
{
    if (cpt < 0x100) {
        return byte_is_printable(cpt) ? (int)cpt : -1;
    }
    uint32_t n = cpt - 0x100;
    if (n < 33) {
        return (int)n;
    }
    if (n < 67) {
        return (int)(0x7F + n - 33);
    }
    return n == 67 ? 0xAD : -1;
}

/* Length of the well-formed sequence starting at p (<= left bytes), 0 if none. When the
 * bytes run out before the sequence ends but those present are a valid start, *partial is
 * set and the return value is the full length the sequence would have. */
static size_t wellformed_len(const uint8_t *p, size_t left, bool *partial)
{
    *partial = false;
    uint8_t b0 = p[0];
    size_t n;
    uint8_t lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (b0 < 0x80) {
        return 1;
    } else if (b0 >= 0xC2 && b0 <= 0xDF) {
        n = 2;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
        n = 3;
        if (b0 == 0xE0) {
            lo = 0xA0;
        } else if (b0 == 0xED) {
            hi = 0x9F;
        }
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
        n = 4;
        if (b0 == 0xF0) {
            lo = 0x90;
        } else if (b0 == 0xF4) {
            hi = 0x8F;
        }
    } else {
        return 0;
    }
    for (size_t i = 1; i < n; i++) {
        if (i >= left) {
            *partial = true;
            return n;
        }
        uint8_t b = p[i];
        if (i == 1 ? (b < lo || b > hi) : !is_cont(b)) {
            return 0;
        }
    }
    return n;
}

bool kvs_unicode_valid_utf8(const char *s, size_t len)
{
    const uint8_t *p = (const uint8_t *)s;
    size_t i = 0;
    while (i < len) {
        bool partial;
        size_t n = wellformed_len(p + i, len - i, &partial);
        if (n == 0 || partial) {
            return false;
        }
        i += n;
    }
    return true;
}

size_t kvs_unicode_incomplete_tail(const char *s, size_t len)
{
    const uint8_t *p = (const uint8_t *)s;
    /* a sequence is at most 4 bytes: only the last 3 bytes can start an unfinished one */
    size_t from = len > 3 ? len - 3 : 0;
    for (size_t i = from; i < len; i++) {
        if (is_cont(p[i])) {
            continue;
        }
        bool partial;
        wellformed_len(p + i, len - i, &partial);
        if (partial) {
            return len - i;
        }
    }
    return 0;
}

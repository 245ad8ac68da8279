/* The elementwise operations of longmem's fused CPU kernels, one definition each.
 *
 * Both the generic kernel (longmem_cpu.c, which interprets a traced program block by block) and the
 * kernels generated for one program (cpu.py: specialized_source) compute through these functions,
 * so the two give bit-identical results.
 *
 * Numerics follow torch's CPU kernels for float32 operation by operation: scalars are rounded to
 * float once (as torch does with a Python number), `add` with alpha, `addcmul` and `lerp` use a
 * fused multiply-add where torch's vectorized kernels do, everything else is one IEEE operation.
 * Compile with -ffp-contract=off and without -ffast-math so that the compiler keeps it that way.
 */
#ifndef LONGMEM_OPS_H
#define LONGMEM_OPS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(FP_FAST_FMAF)
#define LM_FMA(a, b, c) fmaf((a), (b), (c))
#else /* no hardware FMA: torch's vectorized kernels do not fuse either */
#define LM_FMA(a, b, c) ((a) * (b) + (c))
#endif

/* Generated kernels walk each tensor in chunks of LM_CHUNK elements and, at the start of each,
 * can prefetch the chunk LM_AHEAD elements further on in every stream (0: no software prefetch).
 * Off by default: interleaved with torch's fused AdamW on a quiet 2-core AMD EPYC (Zen 5) VM, the
 * generated kernels were 3-16% faster without it (the hardware prefetchers keep up; the compute-
 * heavier rules, DiffGrad and DiffMod, gained most). The generic kernel's block prefetch
 * (longmem_cpu.c, PREFETCH_BLOCKS) does help it and stays. Build with -DLM_AHEAD=1024 to compare. */
#ifndef LM_CHUNK
#define LM_CHUNK 256
#endif
#ifndef LM_AHEAD
#define LM_AHEAD 0
#endif

static inline void lm_prefetch(const void *base, int64_t elem_bytes, int64_t from, int64_t to, int64_t hi) {
    const char *b = (const char *)base;
    to = to < hi ? to : hi;
    for (int64_t k = from * elem_bytes; k < to * elem_bytes; k += 64) __builtin_prefetch(b + k, 1, 3);
}

/* dtype codes, as in cpu.py */
enum { LM_F32 = 0, LM_BF16 = 1, LM_F16 = 2 };

static inline float lm_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t lm_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* (cond ? a : b) on bits, without a branch, so that if-conversion never blocks vectorization */
static inline uint32_t lm_select(int cond, uint32_t a, uint32_t b) {
    uint32_t m = (uint32_t)0 - (uint32_t)(cond != 0);
    return b ^ ((a ^ b) & m);
}
/* (cond ? a : b) on floats, the same way: gcc leaves chains of float ternaries as branches on
 * AVX2 and SSE targets ("control flow in loop"), where a bitwise select vectorizes everywhere */
static inline float lm_pick(int cond, float a, float b) { return lm_from_bits(lm_select(cond, lm_bits(a), lm_bits(b))); }

/* bf16 <-> f32. Widening is exact; narrowing rounds to nearest even, NaN -> quiet NaN, as c10. */
static inline float lm_bf16_to_f32(uint16_t h) { return lm_from_bits((uint32_t)h << 16); }
static inline uint16_t lm_f32_to_bf16(float f) {
    uint32_t u = lm_bits(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)lm_select(f != f, 0x7fc0u, rounded);
}

/* IEEE half <-> f32 with integer operations only (branch-free, so loops vectorize, and
 * independent of the FTZ/DAZ flags). Narrowing rounds to nearest even, as torch's .to(). */
static inline float lm_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t em = h & 0x7fffu;
    uint32_t normal = (em << 13) + (112u << 23);
    uint32_t inf_nan = (em << 13) | 0x7f800000u;
    uint32_t sub = lm_bits((float)(int32_t)em * 0x1p-24f); /* exact: em < 2^10 */
    uint32_t mag = lm_select(em >= 0x7c00u, inf_nan, lm_select(em < 0x0400u, sub, normal));
    return lm_from_bits(mag | sign);
}
static inline uint16_t lm_f32_to_f16(float f) {
    uint32_t u = lm_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    u &= 0x7fffffffu;
    uint32_t big = lm_select(u > 0x7f800000u, 0x7e00u, 0x7c00u); /* NaN stays NaN, the rest: inf */
    /* subnormal or zero: float addition rounds the shifted mantissa to nearest even */
    const uint32_t magic = ((127 - 15) + (23 - 10) + 1) << 23;
    uint32_t sub = lm_bits(lm_from_bits(u) + lm_from_bits(magic)) - magic;
    /* normal: rebias the exponent, round the mantissa to nearest even */
    uint32_t normal = (u + ((uint32_t)(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
    uint32_t mag = lm_select(u >= ((127u + 16u) << 23), big, lm_select(u < (113u << 23), sub, normal));
    return (uint16_t)(mag | sign);
}

/* exp(x) in float to about 1 ulp (Cephes' polynomial after a Cody-Waite reduction), written
 * without branches or libm calls so that loops calling it vectorize (libm's expf does not without
 * -ffast-math, which would also loosen every other operation). */
static inline float lm_exp(float x) {
    float xc = lm_pick(x > 88.72283f, 88.72283f, x); /* NaN: handled at the end */
    xc = lm_pick(xc < -103.9721f, -103.9721f, xc);
    float k = rintf(xc * 1.44269504088896341f);
    float r = LM_FMA(k, -0.693359375f, xc);
    r = LM_FMA(k, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = LM_FMA(p, r, 1.3981999507e-3f);
    p = LM_FMA(p, r, 8.3334519073e-3f);
    p = LM_FMA(p, r, 4.1665795894e-2f);
    p = LM_FMA(p, r, 1.6666665459e-1f);
    p = LM_FMA(p, r, 5.0000001201e-1f);
    p = LM_FMA(p, r * r, r);
    p = p + 1.0f;
    /* p * 2^k in two factors, so that results in the subnormal range come out right */
    int32_t ki = (int32_t)k;
    int32_t k1 = ki >> 1;
    int32_t k2 = ki - k1;
    float y = (p * lm_from_bits((uint32_t)(k1 + 127) << 23)) * lm_from_bits((uint32_t)(k2 + 127) << 23);
    y = lm_pick(x > 88.72283f, INFINITY, y);
    y = lm_pick(x < -103.9721f, 0.0f, y);
    return lm_pick(x != x, x, y);
}

/* ---- counter-based rounding noise (longmem/_rounding.py states the same function in torch) ------ */
/* A 64-bit key per (step, parameter position, stream) from splitmix64 chains; per element, a Weyl
 * sequence over the index offset by the key (lm_noise). */

#define LM_NOISE_SEED 0x6C6F6E676D656DULL /* "longmem" */
#define LM_MIX_C1 0x21F0AAADu
#define LM_MIX_C2 0x735A2D97u

static inline uint64_t lm_splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
/* the 64-bit key of (step, parameter position, stream): one per tensor and call, not per element */
static inline uint64_t lm_noise_key(double step, int64_t position, uint32_t stream) {
    uint64_t z = lm_splitmix64(LM_NOISE_SEED ^ (uint64_t)step);
    return lm_splitmix64(lm_splitmix64(z ^ (uint64_t)position) ^ stream);
}
static inline uint32_t lm_mix32(uint32_t x) {
    x ^= x >> 16;
    x *= LM_MIX_C1;
    x ^= x >> 15;
    x *= LM_MIX_C2;
    return x ^ (x >> 15);
}
/* The key (k0, k1) folded with the high half of the element indices: constant over each aligned run
 * of 2^32 elements, so a kernel computes it once per block. */
static inline uint32_t lm_block_key(uint32_t index_hi, uint32_t k0, uint32_t k1) {
    return k0 ^ lm_mix32(index_hi ^ k1);
}
/* The noise of an element: a Weyl sequence over its index (low half), offset by the block key:
 * index * LM_WEYL + key (mod 2^32). The keys of two steps, buffers or parameters are independent
 * (splitmix64), so each element's noise is uniform and independent from step to step and from
 * buffer to buffer; within one step neighbours' noise is spread evenly (the golden-ratio lattice).
 * One multiply-add, or one add where a loop carries it (the generated kernels do). */
#define LM_WEYL 0x61C88647u /* 2^32 (2 - golden ratio), odd */
static inline uint32_t lm_noise(uint32_t index_lo, uint32_t block_key) { return index_lo * LM_WEYL + block_key; }

/* |x| as bits: for non-negative floats the integer order is the float order (NaN above inf), so a
 * block's absmax is an integer max, which vectorizes without -ffast-math */
static inline uint32_t lm_absbits(float x) { return lm_bits(x) & 0x7fffffffu; }

/* ---- stochastic rounding: unbiased, off by less than one unit of the target's grid ------------- */

/* f32 -> bf16: 16 noise bits added below the bits bf16 keeps, then dropped (mod 2^32). Infinities
 * stay infinite, the usual NaNs (quiet, a payload in the top bits) stay NaN; no special case, which
 * in a bf16 step's loop would cost more than the rounding. */
static inline uint16_t lm_f32_to_bf16_sr(float f, uint32_t h) { return (uint16_t)((lm_bits(f) + (h >> 16)) >> 16); }
/* f32 -> f16. Normal results: 13 noise bits below the 10 mantissa bits kept, truncated (a carry past
 * 65504 gives inf). Subnormal results, multiples of 2^-24: |f| * 2^24 (exact) rounded up with the
 * probability of its fraction, to 2^-24. NaN -> 0x7e00 with f's sign, as lm_f32_to_f16. */
static inline uint16_t lm_f32_to_f16_sr(float f, uint32_t h) {
    uint32_t u = lm_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    uint32_t truncated = (a + (h >> 19)) & ~0x1fffu;
    uint32_t normal = lm_select(truncated >= (143u << 23), 0x7c00u, (truncated - (112u << 23)) >> 13);
    int sub_range = a < (113u << 23);
    float scaled = lm_pick(sub_range, __builtin_fabsf(f) * 0x1p24f, 0.0f);
    int32_t whole = (int32_t)scaled;
    int32_t threshold = (int32_t)((scaled - (float)whole) * 0x1p24f);
    uint32_t sub = (uint32_t)whole + (uint32_t)((int32_t)(h >> 8) < threshold);
    uint32_t mag = lm_select(sub_range, sub, normal);
    return (uint16_t)(lm_select(a > 0x7f800000u, 0x7e00u, mag) | sign);
}

/* ---- 8-bit state codes (longmem/_state_precision.py: quantize, dequantize) ------------------------
 * A code c of a block with scale absmax means absmax * g(c): g(c) = (c / 127)^3 for signed (int8)
 * codes, (c / 255)^4 for unsigned (uint8) ones, evaluated exactly as below (c times the float32
 * reciprocal, then products in this order) by every path. Encoding finds the grid cell
 * g(k) <= y < g(k + 1) holding y = |x| / absmax by comparison with g itself (a cheap root proposes
 * k or one below; the torch path proposes with pow, so the proposals may differ, the cell does
 * not), and rounds up when 24 noise bits, as a fraction of the cell, fall below y - g(k): with
 * probability (y - g(k)) / (g(k + 1) - g(k)), to 2^-24. */

#define LM_INV127 0x1.020408p-7f /* float32(1 / 127) */
#define LM_INV255 0x1.010102p-8f /* float32(1 / 255) */

static inline float lm_grid_s8(int32_t k) { float t = (float)k * LM_INV127; return (t * t) * t; }
static inline float lm_grid_u8(int32_t k) { float t = (float)k * LM_INV255; float s = t * t; return s * s; }
static inline float lm_dec_s8(int8_t c, float absmax) { return lm_grid_s8(c) * absmax; }
static inline float lm_dec_u8(uint8_t c, float absmax) { return lm_grid_u8(c) * absmax; }
static inline float lm_inv_absmax(float absmax) { return lm_pick(absmax > 0.0f, 1.0f / absmax, 0.0f); }
static inline int32_t lm_clampi(int32_t k, int32_t lo, int32_t hi) { k = k < lo ? lo : k; return k > hi ? hi : k; }
/* y = |x| / absmax, at most 1 (an unsigned min on the bits: NaN, of either sign, also becomes 1) */
static inline float lm_unit(float x, float inv_absmax) {
    uint32_t b = lm_bits(__builtin_fabsf(x) * inv_absmax);
    return lm_from_bits(b < 0x3f800000u ? b : 0x3f800000u);
}
/* The proposed cell of y in [0, 1]: k or k - 1 (checked over every float in [0, 1]; see the tests).
 * Signed: y^(1/3) = y * r^2 with r ~ y^(-1/3) from the exponent bits and two Newton steps. */
static inline int32_t lm_cell_s8(float y) {
    float r = lm_from_bits(0x548c2b4bu - (uint32_t)(int32_t)((float)(int32_t)lm_bits(y) * (1.0f / 3.0f)));
    r = r * LM_FMA(y * ((r * r) * r), -1.0f / 3.0f, 4.0f / 3.0f);
    r = r * LM_FMA(y * ((r * r) * r), -1.0f / 3.0f, 4.0f / 3.0f);
    return lm_clampi((int32_t)LM_FMA(y * (r * r), 127.0f, -0.5f), 0, 126);
}
/* unsigned: y^(1/4) = y * r^3 with r ~ y^(-1/4), the same way */
static inline int32_t lm_cell_u8(float y) {
    float r = lm_from_bits(0x4f5a0000u - (lm_bits(y) >> 2));
    r = r * LM_FMA(y * ((r * r) * (r * r)), -0.25f, 1.25f);
    r = r * LM_FMA(y * ((r * r) * (r * r)), -0.25f, 1.25f);
    return lm_clampi((int32_t)LM_FMA(y * ((r * r) * r), 255.0f, -0.5f), 0, 254);
}
/* 1 with probability (y - lo) / (hi - lo), to 2^-24 */
static inline int32_t lm_round_up(float y, float lo, float hi, uint32_t h) {
    return ((float)(int32_t)(h >> 8) * 0x1p-24f) * (hi - lo) < y - lo;
}
/* The code of y: the proposal k0 moved up where g(k0 + 1) <= y (at most to L - 1), then rounded
 * up stochastically in the cell; the cell's other end is g(k0) or g(k0 + 2), one evaluation. */
#define LM_ENCODE(y, k0, grid, top, h)                                          \
    float g1 = grid(k0 + 1);                                                    \
    int32_t up = (y >= g1) & (k0 < top);                                        \
    float other = grid(k0 + 2 * up);                                            \
    int32_t k = k0 + up + lm_round_up(y, lm_pick(up, g1, other), lm_pick(up, other, g1), h)
static inline int8_t lm_enc_s8(float x, float inv_absmax, uint32_t h) {
    float y = lm_unit(x, inv_absmax);
    int32_t k0 = lm_cell_s8(y);
    LM_ENCODE(y, k0, lm_grid_s8, 126, h);
    int32_t s = (int32_t)lm_bits(x) >> 31; /* 0, or -1 for a negative x */
    return (int8_t)((k ^ s) - s);
}
static inline uint8_t lm_enc_u8(float x, float inv_absmax, uint32_t h) {
    float y = lm_unit(x, inv_absmax);
    int32_t k0 = lm_cell_u8(y);
    LM_ENCODE(y, k0, lm_grid_u8, 254, h);
    /* a positive second moment is never rounded to zero (no division by eps alone) */
    return (uint8_t)lm_select((k == 0) & (y > 0.0f), 1u, (uint32_t)k);
}

/* ---- the operations (codes as in program.py): d = op(a, b, c, s) ------------------------------ */

static inline float lm_mul_s(float a, float b, float c, float s) { (void)b; (void)c; return a * s; }
static inline float lm_mul(float a, float b, float c, float s) { (void)c; (void)s; return a * b; }
static inline float lm_add_s(float a, float b, float c, float s) { (void)b; (void)c; return a + s; }
/* torch.add(a, b, alpha=s) */
static inline float lm_axpy(float a, float b, float c, float s) { (void)c; return LM_FMA(b, s, a); }
static inline float lm_sub(float a, float b, float c, float s) { (void)c; (void)s; return a - b; }
/* torch.addcmul(a, b, c, value=s) */
static inline float lm_addcmul(float a, float b, float c, float s) { return LM_FMA(s * b, c, a); }
/* torch.addcdiv(a, b, c, value=s) */
static inline float lm_addcdiv(float a, float b, float c, float s) { return a + (s * b) / c; }
static inline float lm_div_s(float a, float b, float c, float s) { (void)b; (void)c; return a / s; }
static inline float lm_div(float a, float b, float c, float s) { (void)c; (void)s; return a / b; }
static inline float lm_sqrt(float a, float b, float c, float s) { (void)b; (void)c; (void)s; return __builtin_sqrtf(a); }
static inline float lm_recip(float a, float b, float c, float s) { (void)b; (void)c; (void)s; return 1.0f / a; }
static inline float lm_abs(float a, float b, float c, float s) { (void)b; (void)c; (void)s; return __builtin_fabsf(a); }
/* torch.sigmoid's CPU kernel: 1 / (1 + exp(-a)) */
static inline float lm_sigmoid(float a, float b, float c, float s) {
    (void)b; (void)c; (void)s;
    return 1.0f / (1.0f + lm_exp(-a));
}
/* torch.minimum: NaN if either is NaN */
static inline float lm_min(float a, float b, float c, float s) {
    (void)c; (void)s;
    float m = lm_pick(b < a, b, a);
    m = lm_pick(b != b, b, m);
    return lm_pick(a != a, a, m);
}
static inline float lm_copy(float a, float b, float c, float s) { (void)b; (void)c; (void)s; return a; }
static inline float lm_neg(float a, float b, float c, float s) { (void)b; (void)c; (void)s; return -a; }
/* torch.lerp(a, b, weight=s), as torch's vectorized kernel computes it (one fused multiply-add):
 * a + s * (b - a) where |s| < 0.5 (lerp_lo), else b - (b - a) * (1 - s) (lerp_hi). Which of the two
 * applies depends on the scalar alone, so the tracer (program.py) picks it: no branch per element. */
static inline float lm_lerp_lo(float a, float b, float c, float s) { (void)c; return LM_FMA(s, b - a, a); }
static inline float lm_lerp_hi(float a, float b, float c, float s) { (void)c; return LM_FMA(s - 1.0f, b - a, b); }

#define LM_OPS(X) \
    X(0, mul_s) X(1, mul) X(2, add_s) X(3, axpy) X(4, sub) X(5, addcmul) X(6, addcdiv) X(7, div_s) \
    X(8, div) X(9, sqrt) X(10, recip) X(11, abs) X(12, sigmoid) X(13, min) X(14, copy) X(15, neg) X(16, lerp_lo) \
    X(17, lerp_hi)

#endif

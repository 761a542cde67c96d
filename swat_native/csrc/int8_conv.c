/* Sparse int8 conv (QDQ: uint8 activations, int8 weights), int32 accumulation, requantisation
   fused into the output loop.

   y[n, o, p] = clamp(rint(min(max((acc + corr[o]) * mult[o], lo - zy), hi - zy)) + zy, lo, hi)
   acc        = sum over the non-zero blocks k of row o of
                sum_{q<4} x4[n][offs[k] + p][q] * w[k][q]        (u8 x s8 -> s32)

   Why this shape: the same "non-zero weight adds a shifted input row" idea as shift_f32.c, with
   the int8 dot product's natural block: 4 consecutive input channels at one kernel tap of one
   output channel (vpdpbusd multiplies 4 u8 by 4 s8 per 32-bit lane). The input is packed so that
   the 4 channels of one pixel are 4 consecutive bytes (one 32-bit word, see swat_qpack_u8) and
   the output grid of a conv is one contiguous row of words per (tap copy, channel group): a
   64-byte load is 16 output pixels' 4-channel inputs, and the weight block is broadcast. A zero
   block is not stored, so it costs nothing; unstructured weights are the same format with the
   zeros of partly filled blocks stored.

   corr[o] = bias_i32[o] - zx * sum(w[o]) (the activation zero point taken out once, precomputed;
   padding is packed as zx so it contributes exactly 0), mult[o] = sx * sw[o] / sy. The float
   clamp before rounding and round-half-even (cvtps / rint) are what onnxruntime's
   MlasRequantizeOutput does, so equal int32 sums give equal bytes.

   Tiles: 16 output pixels of one image ("tile g": image g / tpi, pixels (g % tpi) * 16 ...). A
   group of T tiles (possibly from several images: batched 4x4 maps are one tile each) keeps T
   accumulators in registers across a row's whole non-zero loop; tiles outer, rows inner, so a
   group's input window stays in L1 for every output channel. The output is stored once, as
   bytes, straight into NCHW. One copy per ISA (AVX-512 VNNI, AVX2 by widening to 16 bits -
   vpmaddubsw's int16 saturation would be wrong for u8 x s8 pairs - and portable C), picked by
   the caller's isa argument. */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SWAT_X86 1
#endif

#define EXPORT __attribute__((visibility("default")))

struct qepi {
    const int32_t *corr;
    const float *mult;
    int32_t zy, lo, hi;
    int64_t plane, tpi, img_in, img_out;
    /* fused residual (QLinearAdd after the conv), rd != 0 when on: the residual byte of an output
       byte y[i] is y[i + rd] (same NCHW shape); v = q * ra + res * rb + rc, clamped to
       [rlo, 255], rounded half to even - swat_qadd_u8's arithmetic, in the same order */
    ptrdiff_t rd;
    float ra, rb, rc, rlo;
    int32_t res_on;
};

static inline uint8_t q_addres(uint8_t q, const uint8_t *yp, const struct qepi *e) {
    float v = (float)q * e->ra + (float)yp[e->rd] * e->rb + e->rc;
    v = v < e->rlo ? e->rlo : (v > 255.0f ? 255.0f : v);
    return (uint8_t)(int32_t)__builtin_rintf(v);
}

static inline float q_clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

static inline uint8_t q_requant(int32_t acc, int32_t corr, float mult, const struct qepi *e) {
    float f = (float)(acc + corr) * mult;
    f = q_clampf(f, (float)(e->lo - e->zy), (float)(e->hi - e->zy));
    if (f != f) f = (float)(e->lo - e->zy); /* NaN cannot come from finite inputs; be safe */
    return (uint8_t)((int32_t)__builtin_rintf(f) + e->zy);
}

/* ------------------------------------------------------------------ portable C */
static void qconv_generic(const int32_t *indptr, const int32_t *offs, const int8_t *vals, const uint8_t *x,
                          uint8_t *y, int64_t g0, int64_t g1, int64_t r0, int64_t r1, const struct qepi *e) {
    for (int64_t g = g0; g < g1; g++) {
        const int64_t n = g / e->tpi, t = (g - n * e->tpi) * 16;
        const int64_t valid = e->plane - t < 16 ? e->plane - t : 16;
        const uint8_t *xb = x + 4 * (n * e->img_in + t);
        uint8_t *yb = y + n * e->img_out + t;
        for (int64_t r = r0; r < r1; r++) {
            int32_t acc[16] = {0};
            for (int32_t k = indptr[r]; k < indptr[r + 1]; k++) {
                const int8_t *w = vals + 4 * (int64_t)k;
                const uint8_t *xs = xb + 4 * (int64_t)offs[k];
                for (int64_t p = 0; p < valid; p++)
                    acc[p] += xs[4 * p] * w[0] + xs[4 * p + 1] * w[1] + xs[4 * p + 2] * w[2] + xs[4 * p + 3] * w[3];
            }
            for (int64_t p = 0; p < valid; p++) {
                uint8_t *yp = yb + r * e->plane + p;
                const uint8_t q = q_requant(acc[p], e->corr[r], e->mult[r], e);
                *yp = e->res_on ? q_addres(q, yp, e) : q;
            }
        }
    }
}

#ifdef SWAT_X86
#define T512 "avx512f,avx512bw,avx512vl,avx512vnni"
/* P partial sums over alternating non-zeros keep >= 4 dot-product chains in flight for tiny
   groups (a batch-1 4x4 map is one tile): vpdpbusd has a 5-cycle latency. Measured (2-core
   Xeon, interleaved A/B): 2 partial sums for groups of 3-4 tiles (8x8 maps) 5 % faster than 1;
   8 for one tile no faster than 4 (the loads, not the latency, bound it there). */
#define QPART(T) ((T) == 1 ? 4 : (T) <= 4 ? 2 : 1)
/* acc += dot4(x u8, w s8) in place. gcc (12/13) wraps _mm512_dpbusd_epi32 in two register copies
   per call (accumulator in, result out), which tripled the loop's uops: measured ~2.4 cycles
   per dot product instead of ~1. AT&T order: vpdpbusd src3 (signed), src2 (unsigned), dst. */
#define DPBUSD(acc, x, w) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w))
#define QMICRO512(T)                                                                             \
    static inline __attribute__((always_inline, target(T512))) void q512_##T(                    \
        const int32_t *offs, const int32_t *vals, int32_t ks, int32_t ke, const int32_t *const *xb, \
        uint8_t *const *yb, const __mmask16 *m, int32_t corr, float mult, const struct qepi *e,   \
        const int RES) {                                                                         \
        enum { P = QPART(T) };                                                                   \
        __m512i acc[P][T];                                                                       \
        for (int p = 0; p < P; p++)                                                              \
            for (int i = 0; i < T; i++) acc[p][i] = _mm512_setzero_si512();                      \
        int32_t k = ks;                                                                          \
        for (; k + P <= ke; k += P)                                                              \
            for (int p = 0; p < P; p++) {                                                        \
                const __m512i w = _mm512_set1_epi32(vals[k + p]);                                \
                const int64_t o = offs[k + p];                                                   \
                for (int i = 0; i < T; i++) {                                                    \
                    const __m512i xv = _mm512_loadu_si512(xb[i] + o);                            \
                    DPBUSD(acc[p][i], xv, w);                                                    \
                }                                                                                \
            }                                                                                    \
        for (; k < ke; k++) {                                                                    \
            const __m512i w = _mm512_set1_epi32(vals[k]);                                        \
            const int64_t o = offs[k];                                                           \
            for (int i = 0; i < T; i++) {                                                        \
                const __m512i xv = _mm512_loadu_si512(xb[i] + o);                                \
                DPBUSD(acc[0][i], xv, w);                                                        \
            }                                                                                    \
        }                                                                                        \
        const __m512i vc = _mm512_set1_epi32(corr), vz = _mm512_set1_epi32(e->zy);               \
        const __m512 vm = _mm512_set1_ps(mult), flo = _mm512_set1_ps((float)(e->lo - e->zy));    \
        const __m512 fhi = _mm512_set1_ps((float)(e->hi - e->zy));                               \
        for (int i = 0; i < T; i++) {                                                            \
            __m512i a = acc[0][i];                                                               \
            for (int p = 1; p < P; p++) a = _mm512_add_epi32(a, acc[p][i]);                      \
            __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a, vc)), vm);           \
            f = _mm512_min_ps(_mm512_max_ps(f, flo), fhi);                                       \
            __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(f), vz);                             \
            if (RES) {                                                                           \
                const __m512 r = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(                        \
                    _mm_maskz_loadu_epi8(m[i], yb[i] + e->rd)));                                 \
                __m512 v = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q),      \
                                                                     _mm512_set1_ps(e->ra)),     \
                                                       _mm512_mul_ps(r, _mm512_set1_ps(e->rb))), \
                                         _mm512_set1_ps(e->rc));                                 \
                v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(e->rlo)), _mm512_set1_ps(255.0f)); \
                q = _mm512_cvtps_epi32(v);                                                       \
            }                                                                                    \
            _mm_mask_storeu_epi8(yb[i], m[i], _mm512_cvtepi32_epi8(q));                         \
        }                                                                                        \
    }
QMICRO512(1) QMICRO512(2) QMICRO512(3) QMICRO512(4) QMICRO512(5) QMICRO512(6) QMICRO512(7) QMICRO512(8)

/* Tiles g0..g1 in groups of up to 8, rows r0..r1 inside each group. */
/* RES is a compile-time constant in each caller below: a runtime residual test inside the
   micro-kernels made gcc spill accumulators (measured 1.3-1.5x slower at batch 64). */
static inline __attribute__((always_inline, target(T512))) void qconv_512_body(
    const int32_t *indptr, const int32_t *offs, const int32_t *vals, const uint8_t *x, uint8_t *y, int64_t g0,
    int64_t g1, int64_t r0, int64_t r1, const struct qepi *e, const int RES) {
    for (int64_t g = g0; g < g1; g += 8) {
        const int T = (int)(g1 - g < 8 ? g1 - g : 8);
        const int32_t *xb[8];
        uint8_t *yb[8];
        __mmask16 m[8];
        for (int i = 0; i < T; i++) {
            const int64_t n = (g + i) / e->tpi, t = (g + i - n * e->tpi) * 16;
            const int64_t valid = e->plane - t;
            xb[i] = (const int32_t *)x + n * e->img_in + t;
            yb[i] = y + n * e->img_out + t;
            m[i] = valid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1u);
        }
        for (int64_t r = r0; r < r1; r++) {
            uint8_t *yr[8];
            for (int i = 0; i < T; i++) yr[i] = yb[i] + r * e->plane;
            const int32_t ks = indptr[r], ke = indptr[r + 1];
            const int32_t c = e->corr[r];
            const float mu = e->mult[r];
            switch (T) {
            case 1: q512_1(offs, vals, ks, ke, xb, yr, m, c, mu, e, RES); break;
            case 2: q512_2(offs, vals, ks, ke, xb, yr, m, c, mu, e, RES); break;
            case 3: q512_3(offs, vals, ks, ke, xb, yr, m, c, mu, e, RES); break;
            case 4: q512_4(offs, vals, ks, ke, xb, yr, m, c, mu, e, RES); break;
            case 5: q512_5(offs, vals, ks, ke, xb, yr, m, c, mu, e, RES); break;
            case 6: q512_6(offs, vals, ks, ke, xb, yr, m, c, mu, e, RES); break;
            case 7: q512_7(offs, vals, ks, ke, xb, yr, m, c, mu, e, RES); break;
            default: q512_8(offs, vals, ks, ke, xb, yr, m, c, mu, e, RES); break;
            }
        }
    }
}

static __attribute__((target(T512))) void qconv_512_plain(const int32_t *indptr, const int32_t *offs,
                                                          const int32_t *vals, const uint8_t *x, uint8_t *y,
                                                          int64_t g0, int64_t g1, int64_t r0, int64_t r1,
                                                          const struct qepi *e) {
    qconv_512_body(indptr, offs, vals, x, y, g0, g1, r0, r1, e, 0);
}
static __attribute__((target(T512))) void qconv_512_res(const int32_t *indptr, const int32_t *offs,
                                                        const int32_t *vals, const uint8_t *x, uint8_t *y,
                                                        int64_t g0, int64_t g1, int64_t r0, int64_t r1,
                                                        const struct qepi *e) {
    qconv_512_body(indptr, offs, vals, x, y, g0, g1, r0, r1, e, 1);
}

/* ---- AVX2: no u8 x s8 dot product without saturation (vpmaddubsw saturates pairs to int16,
   and 2 * 255 * 127 does not fit), so bytes are widened to int16 and multiplied with vpmaddwd
   (exact): 4 pixels x 4 channels per 256-bit register give 4 pixels x 2 partial int32 sums. A
   16-pixel tile holds 4 such accumulators; pairs are added in the epilogue. */
#define T256 "avx2,fma"
#define QMICRO256(T)                                                                             \
    static inline __attribute__((always_inline, target(T256))) void q256_##T(                    \
        const int32_t *offs, const int32_t *vals, int32_t ks, int32_t ke, const int32_t *const *xb, \
        uint8_t *const *yb, const int64_t *valid, int32_t corr, float mult, const struct qepi *e) { \
        __m256i acc[T][4];                                                                       \
        for (int i = 0; i < T; i++)                                                              \
            for (int v = 0; v < 4; v++) acc[i][v] = _mm256_setzero_si256();                      \
        for (int32_t k = ks; k < ke; k++) {                                                      \
            const __m256i w = _mm256_cvtepi8_epi16(_mm_set1_epi32(vals[k]));                     \
            const int64_t o = offs[k];                                                           \
            for (int i = 0; i < T; i++)                                                          \
                for (int v = 0; v < 4; v++) {                                                    \
                    const __m256i xv = _mm256_cvtepu8_epi16(                                     \
                        _mm_loadu_si128((const __m128i *)(xb[i] + o + 4 * v)));                  \
                    acc[i][v] = _mm256_add_epi32(acc[i][v], _mm256_madd_epi16(xv, w));           \
                }                                                                                \
        }                                                                                        \
        const __m256i vc = _mm256_set1_epi32(corr), vz = _mm256_set1_epi32(e->zy);               \
        const __m256 vm = _mm256_set1_ps(mult), flo = _mm256_set1_ps((float)(e->lo - e->zy));    \
        const __m256 fhi = _mm256_set1_ps((float)(e->hi - e->zy));                               \
        for (int i = 0; i < T; i++)                                                              \
            for (int h = 0; h < 2; h++) {                                                        \
                /* pixels 8h..8h+7: hadd gives [0 1 4 5 | 2 3 6 7], the permute orders them */   \
                __m256i a = _mm256_hadd_epi32(acc[i][2 * h], acc[i][2 * h + 1]);                 \
                a = _mm256_permute4x64_epi64(a, 0xD8);                                           \
                __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a, vc)), vm);       \
                f = _mm256_min_ps(_mm256_max_ps(f, flo), fhi);                                   \
                __m256i q = _mm256_add_epi32(_mm256_cvtps_epi32(f), vz);                         \
                const int64_t n = valid[i] - 8 * h;                                              \
                if (e->res_on && n > 0) {                                                            \
                    uint8_t rb8[8] = {0};                                                        \
                    memcpy(rb8, yb[i] + 8 * h + e->rd, (size_t)(n < 8 ? n : 8));                \
                    const __m256 r = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(                    \
                        _mm_loadl_epi64((const __m128i *)rb8)));                                 \
                    __m256 v = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q),  \
                                                                         _mm256_set1_ps(e->ra)), \
                                                           _mm256_mul_ps(r, _mm256_set1_ps(e->rb))), \
                                             _mm256_set1_ps(e->rc));                             \
                    v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(e->rlo)), _mm256_set1_ps(255.0f)); \
                    q = _mm256_cvtps_epi32(v);                                                   \
                }                                                                                \
                const __m256i p16 = _mm256_packus_epi32(q, q);                                   \
                const __m256i p8 = _mm256_packus_epi16(p16, p16);                                \
                const __m128i b = _mm_unpacklo_epi32(_mm256_castsi256_si128(p8),                 \
                                                     _mm256_extracti128_si256(p8, 1));           \
                if (n >= 8) _mm_storel_epi64((__m128i *)(yb[i] + 8 * h), b);                     \
                else if (n > 0) {                                                                \
                    uint8_t tmp[16];                                                             \
                    _mm_storeu_si128((__m128i *)tmp, b);                                         \
                    memcpy(yb[i] + 8 * h, tmp, (size_t)n);                                       \
                }                                                                                \
            }                                                                                    \
    }
QMICRO256(1) QMICRO256(2)

static __attribute__((target(T256))) void qconv_256(const int32_t *indptr, const int32_t *offs,
                                                    const int32_t *vals, const uint8_t *x, uint8_t *y,
                                                    int64_t g0, int64_t g1, int64_t r0, int64_t r1,
                                                    const struct qepi *e) {
    for (int64_t g = g0; g < g1; g += 2) {
        const int T = g1 - g < 2 ? 1 : 2;
        const int32_t *xb[2];
        uint8_t *yb[2];
        int64_t valid[2];
        for (int i = 0; i < T; i++) {
            const int64_t n = (g + i) / e->tpi, t = (g + i - n * e->tpi) * 16;
            valid[i] = e->plane - t;
            xb[i] = (const int32_t *)x + n * e->img_in + t;
            yb[i] = y + n * e->img_out + t;
        }
        for (int64_t r = r0; r < r1; r++) {
            uint8_t *yr[2];
            for (int i = 0; i < T; i++) yr[i] = yb[i] + r * e->plane;
            if (T == 2) q256_2(offs, vals, indptr[r], indptr[r + 1], xb, yr, valid, e->corr[r], e->mult[r], e);
            else q256_1(offs, vals, indptr[r], indptr[r + 1], xb, yr, valid, e->corr[r], e->mult[r], e);
        }
    }
}
#endif

/* isa: 0 portable, 1 AVX2, 2 AVX-512 VNNI. Tiles g0..g1 (see above), block rows r0..r1.
   x: the packed input (swat_qpack_u8), img_in words per image, readable 16 words past every
   offs[k] + last tile; y: NCHW uint8 output, img_out = O * plane bytes per image.
   Returns 0, or -1 for an ISA this build lacks. */
static int qconv_run(int64_t isa, const int32_t *indptr, const int32_t *offs, const int32_t *vals,
                     const uint8_t *x, uint8_t *y, int64_t g0, int64_t g1, int64_t r0, int64_t r1,
                     const struct qepi *ep);
EXPORT int swat_qconv_u8_res(int64_t isa, const int32_t *indptr, const int32_t *offs, const int32_t *vals,
                             const int32_t *corr, const float *mult, int64_t zy, int64_t lo, int64_t hi,
                             const uint8_t *x, int64_t img_in, uint8_t *y, int64_t img_out, int64_t plane,
                             int64_t g0, int64_t g1, int64_t r0, int64_t r1, const uint8_t *res, float ra,
                             float rb, float rc, int64_t rlo);

EXPORT int swat_qconv_u8(int64_t isa, const int32_t *indptr, const int32_t *offs, const int32_t *vals,
                         const int32_t *corr, const float *mult, int64_t zy, int64_t lo, int64_t hi,
                         const uint8_t *x, int64_t img_in, uint8_t *y, int64_t img_out, int64_t plane,
                         int64_t g0, int64_t g1, int64_t r0, int64_t r1) {
    return swat_qconv_u8_res(isa, indptr, offs, vals, corr, mult, zy, lo, hi, x, img_in, y, img_out, plane, g0, g1,
                             r0, r1, NULL, 0.0f, 0.0f, 0.0f, 0);
}

/* swat_qconv_u8 with the residual QLinearAdd fused into the output loop (res: uint8 NCHW of y's
   shape, NULL for none; ra, rb, rc, rlo as swat_qadd_u8's ra, rb, c, lo, ra applying to the conv
   output). Equal bytes to swat_qconv_u8 followed by swat_qadd_u8, one pass over y fewer. */
EXPORT int swat_qconv_u8_res(int64_t isa, const int32_t *indptr, const int32_t *offs, const int32_t *vals,
                             const int32_t *corr, const float *mult, int64_t zy, int64_t lo, int64_t hi,
                             const uint8_t *x, int64_t img_in, uint8_t *y, int64_t img_out, int64_t plane,
                             int64_t g0, int64_t g1, int64_t r0, int64_t r1, const uint8_t *res, float ra,
                             float rb, float rc, int64_t rlo) {
    const int64_t tpi = (plane + 15) / 16;
    const struct qepi e = {corr, mult, (int32_t)zy, (int32_t)lo, (int32_t)hi, plane, tpi, img_in, img_out,
                           res ? res - y : 0, ra, rb, rc, (float)rlo, res != NULL};
    return qconv_run(isa, indptr, offs, vals, x, y, g0, g1, r0, r1, &e);
}

static int qconv_run(int64_t isa, const int32_t *indptr, const int32_t *offs, const int32_t *vals,
                     const uint8_t *x, uint8_t *y, int64_t g0, int64_t g1, int64_t r0, int64_t r1,
                     const struct qepi *ep) {
    const struct qepi e = *ep;
#ifdef SWAT_X86
    if (isa == 2) {
        (e.res_on ? qconv_512_res : qconv_512_plain)(indptr, offs, vals, x, y, g0, g1, r0, r1, &e);
        return 0;
    }
    if (isa == 1) { qconv_256(indptr, offs, vals, x, y, g0, g1, r0, r1, &e); return 0; }
#endif
    if (isa != 0) return -1;
    qconv_generic(indptr, offs, (const int8_t *)vals, x, y, g0, g1, r0, r1, &e);
    return 0;
}

/* dst word ow = bytes (s0[off + ow], s1[..], s2[..], s3[..]) for ow in [lo, hi): four channel rows
   interleaved, 16 pixels per step with SSE2 unpacks (baseline x86-64; a byte at a time it was
   most of a batch-64 layer's time). */
static void interleave4(uint8_t *dst, const uint8_t *const *src, int64_t off, int64_t lo, int64_t hi) {
    const uint8_t *s0 = src[0] + off, *s1 = src[1] + off, *s2 = src[2] + off, *s3 = src[3] + off;
    int64_t ow = lo;
#ifdef SWAT_X86
    for (; ow + 16 <= hi; ow += 16) {
        const __m128i a = _mm_loadu_si128((const __m128i *)(s0 + ow)), b = _mm_loadu_si128((const __m128i *)(s1 + ow));
        const __m128i c = _mm_loadu_si128((const __m128i *)(s2 + ow)), d = _mm_loadu_si128((const __m128i *)(s3 + ow));
        const __m128i ab0 = _mm_unpacklo_epi8(a, b), ab1 = _mm_unpackhi_epi8(a, b);
        const __m128i cd0 = _mm_unpacklo_epi8(c, d), cd1 = _mm_unpackhi_epi8(c, d);
        __m128i *o = (__m128i *)(dst + 4 * ow);
        _mm_storeu_si128(o, _mm_unpacklo_epi16(ab0, cd0));
        _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(ab0, cd0));
        _mm_storeu_si128(o + 2, _mm_unpacklo_epi16(ab1, cd1));
        _mm_storeu_si128(o + 3, _mm_unpackhi_epi16(ab1, cd1));
    }
#endif
    for (; ow < hi; ow++) {
        dst[4 * ow] = s0[ow];
        dst[4 * ow + 1] = s1[ow];
        dst[4 * ow + 2] = s2[ow];
        dst[4 * ow + 3] = s3[ow];
    }
}

/* This thread's scratch number `slot` (< SWAT_Q_SLOTS), 64-byte aligned, of at least `bytes`
   (grown, never shrunk, never freed: one per pool / numba worker and slot, at most a few hundred
   KB at CIFAR sizes). NULL on OOM. Slots because one caller's buffer may be live while a callee
   uses its own (int8_layer.c's fused items hold a packed chunk while the conv uses slot 0). */
#define SWAT_Q_SLOTS 2
static __thread uint8_t *q_tmp[SWAT_Q_SLOTS];
static __thread int64_t q_tmp_cap[SWAT_Q_SLOTS];
uint8_t *swat_q_scratch(int slot, int64_t bytes) {
    if (bytes > q_tmp_cap[slot]) {
        free(q_tmp[slot]);
        const int64_t cap = (bytes + 4095) / 4096 * 4096;
        q_tmp[slot] = aligned_alloc(64, (size_t)cap);
        q_tmp_cap[slot] = q_tmp[slot] ? cap : 0;
    }
    return q_tmp[slot];
}

static inline void fill_words(uint32_t *d, uint32_t v, int64_t n) {
    for (int64_t i = 0; i < n; i++) d[i] = v;
}

/* The packed input: per image, kw * nph copies (tap column j, row phase ph), each (CG, R, w_out)
   words, word (cg, r, ow) = bytes x[n, 4cg + q, r*s + ph - pt, ow*s + j - pl] for q < 4
   (zx outside the image or past the last channel). Tap (i, j) of channel group cg then reads
   copy (j, i % s) at row offset i / s: ((j*nph + i%s)*CG + cg)*R*w_out + (i/s)*w_out + grid.
   Items (image n, channel group cg) in [i0, i1), so callers can split them over threads.

   Two passes per item: the group's 4 channel planes are interleaved into one plane of words
   (16 pixels per SSE step over the whole plane, not per row), then each copy is cut from it.
   When a copy's rows are the plane's rows shifted by whole words (stride 1, w_out == W: the
   3x3 pad-1 and 1x1 convs), the copy is one memcpy plus its edge columns; else row by row.
   Why: packing row by row cost ~8 ns a row, 20 us a layer at batch 1 on the 4x4-16x16 maps
   (2300 rows of 4 words for a 512-channel 4x4 map), as much as that layer's multiply. */
EXPORT void swat_qpack_u8(const uint8_t *x, uint8_t *out, int64_t C, int64_t H, int64_t W, int64_t kw,
                          int64_t s, int64_t nph, int64_t pt, int64_t pl, int64_t R, int64_t w_out,
                          int64_t zx, int64_t img_out, int64_t i0, int64_t i1) {
    const int64_t CG = (C + 3) / 4, HW = H * W;
    uint8_t *tmp = swat_q_scratch(0, 5 * HW + 64);
    if (tmp == NULL) return;
    uint32_t *t = (uint32_t *)tmp;   /* the interleaved plane, HW words */
    uint8_t *zplane = tmp + 4 * HW;  /* zx bytes, for channels past the last */
    const uint32_t zw = 0x01010101u * (uint32_t)(zx & 255);
    int zfilled = 0;
    for (int64_t it = i0; it < i1; it++) {
        const int64_t n = it / CG, cg = it - n * CG;
        const uint8_t *src[4];
        for (int q = 0; q < 4; q++) {
            if (4 * cg + q < C) src[q] = x + (n * C + 4 * cg + q) * HW;
            else {
                if (!zfilled) memset(zplane, (int)zx, (size_t)HW), zfilled = 1;
                src[q] = zplane;
            }
        }
        interleave4((uint8_t *)t, src, 0, 0, HW);
        for (int64_t j = 0; j < kw; j++) {
            /* columns ow whose input column ow*s + j - pl lies in [0, W) */
            int64_t lo = pl - j > 0 ? (pl - j + s - 1) / s : 0;
            int64_t hi = W + pl - j > 0 ? (W + pl - j + s - 1) / s : 0;
            if (lo > w_out) lo = w_out;
            if (hi > w_out) hi = w_out;
            if (hi < lo) hi = lo;
            for (int64_t ph = 0; ph < nph; ph++) {
                uint32_t *dst = (uint32_t *)out + n * img_out + ((j * nph + ph) * CG + cg) * R * w_out;
                /* rows r with r*s + ph - pt in [0, H) */
                int64_t r0 = pt - ph > 0 ? (pt - ph + s - 1) / s : 0;
                int64_t r1 = H + pt - ph > 0 ? (H + pt - ph + s - 1) / s : 0;
                if (r0 > R) r0 = R;
                if (r1 > R) r1 = R;
                if (r1 < r0) r1 = r0;
                fill_words(dst, zw, r0 * w_out);
                fill_words(dst + r1 * w_out, zw, (R - r1) * w_out);
                if (s == 1 && w_out == W) {
                    /* dst[r*W + ow] = t[(r - pt + ph)*W + ow + j - pl]: one shifted copy of the
                       rows r0..r1, then the columns outside [lo, hi) set to zx */
                    const int64_t d0 = r0 * W, d1 = r1 * W, shift = (ph - pt) * W + j - pl;
                    int64_t a = d0, b = d1;
                    if (a + shift < 0) a = -shift;
                    if (b + shift > HW) b = HW - shift;
                    if (a < b) {
                        memcpy(dst + a, t + a + shift, (size_t)(4 * (b - a)));
                        fill_words(dst + d0, zw, a - d0);  /* only edge columns: no source word */
                        fill_words(dst + b, zw, d1 - b);
                    } else {
                        fill_words(dst + d0, zw, d1 - d0);
                    }
                    if (lo > 0 || hi < w_out)
                        for (int64_t r = r0; r < r1; r++) {
                            fill_words(dst + r * W, zw, lo);
                            fill_words(dst + r * W + hi, zw, w_out - hi);
                        }
                    continue;
                }
                for (int64_t r = r0; r < r1; r++) {
                    uint32_t *d = dst + r * w_out;
                    const uint32_t *sr = t + (r * s + ph - pt) * W + j - pl;
                    fill_words(d, zw, lo);
                    if (s == 1) memcpy(d + lo, sr + lo, (size_t)(4 * (hi - lo)));
                    else
                        for (int64_t ow = lo; ow < hi; ow++) d[ow] = sr[ow * s];
                    fill_words(d + hi, zw, w_out - hi);
                }
            }
        }
    }
}

/* Which int8 paths this CPU runs: bit 0 AVX2, bit 1 AVX-512 with VNNI (F, BW, VL, VNNI). */
EXPORT int swat_int8_isas(void) {
    int m = 0;
#ifdef SWAT_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) m |= 1;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        m |= 2;
#endif
    return m;
}

/* onnxruntime's QLinearAdd (per-tensor uint8): y = clamp(rint(a * ra + b * rb + c), lo, 255), with
   ra = sa / sy, rb = sb / sy, c = zy - za * ra - zb * rb computed by the caller in float32.
   Elements [i0, i1). Rounding half to even by the 1.5 * 2^23 trick (exact for |v| < 2^22, and v is
   clamped first), so the loop vectorises at each ISA's width without a rint call. */
static inline void qadd_body(const uint8_t *a, const uint8_t *b, uint8_t *y, float ra, float rb, float c,
                             float lo, int64_t i0, int64_t i1) {
    const float magic = 12582912.0f;
    for (int64_t i = i0; i < i1; i++) {
        float v = (float)a[i] * ra + (float)b[i] * rb + c;
        v = v < lo ? lo : (v > 255.0f ? 255.0f : v);
        y[i] = (uint8_t)(int32_t)((v + magic) - magic);
    }
}
#ifdef SWAT_X86
static __attribute__((target("avx512f,avx512bw"))) void qadd_512(const uint8_t *a, const uint8_t *b, uint8_t *y,
                                                                  float ra, float rb, float c, float lo,
                                                                  int64_t i0, int64_t i1) {
    qadd_body(a, b, y, ra, rb, c, lo, i0, i1);
}
static __attribute__((target("avx2,fma"))) void qadd_256(const uint8_t *a, const uint8_t *b, uint8_t *y, float ra,
                                                         float rb, float c, float lo, int64_t i0, int64_t i1) {
    qadd_body(a, b, y, ra, rb, c, lo, i0, i1);
}
#endif

EXPORT void swat_qadd_u8(int64_t isa, const uint8_t *a, const uint8_t *b, uint8_t *y, float ra, float rb, float c,
                         int64_t lo, int64_t i0, int64_t i1) {
#ifdef SWAT_X86
    if (isa == 2) { qadd_512(a, b, y, ra, rb, c, (float)lo, i0, i1); return; }
    if (isa == 1) { qadd_256(a, b, y, ra, rb, c, (float)lo, i0, i1); return; }
#endif
    qadd_body(a, b, y, ra, rb, c, (float)lo, i0, i1);
}

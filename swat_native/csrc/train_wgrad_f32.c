/* SWAT's weight gradient from the compact sparse activation: dW = grad x TopK(a)^T, float32.

   dwt[c][i][j][o] = sum over images b and kept activations a[b, c, y, x] (set bits of plane
   (b, c) of the packed bitmask, values in flat order) of a * g[b, oh, ow, o], where
   oh * sh = y + pt - i * dh and ow * sw = x + pl - j * dw (only taps that land on the output
   grid). g is the output gradient in NHWC layout (o fastest).

   Why this shape: the activation is the sparse operand, so the loop walks its set bits (no
   decode to a dense tensor) and every kept value updates the kh * kw taps of one input
   channel for a block of output channels. The dW tile of one channel, kh * kw x (T vectors of
   output channels), stays in registers across the whole batch; each update is one broadcast
   and T loads of the gradient row with T FMAs per tap. Work items are (input channel, block of
   output channels) pairs, so threads never write the same tile.

   One copy per ISA (AVX-512, AVX2+FMA, portable C) as in shift_f32.c; 3x3 and 1x1 kernels
   have register-tiled micro-kernels, the portable path takes any kernel size. */
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SWAT_X86 1
#endif

#define EXPORT __attribute__((visibility("default")))

/* `cnt` (<= 64) bits starting at bit `pos` (bit i of byte k is element 8k + i). */
static inline uint64_t load_bits(const uint8_t *bits, int64_t pos, int64_t cnt) {
    const int64_t byte = pos >> 3, sh = pos & 7;
    const int64_t nbytes = (sh + cnt + 7) >> 3; /* <= 9 */
    uint8_t buf[16] = {0};
    memcpy(buf, bits + byte, (size_t)nbytes);
    uint64_t lo;
    memcpy(&lo, buf, 8);
    uint64_t m = lo >> sh;
    if (sh) m |= ((uint64_t)buf[8]) << (64 - sh);
    if (cnt < 64) m &= (((uint64_t)1) << cnt) - 1;
    return m;
}

/* starts[p] = index in the compact values of plane p's first kept entry; starts[nplanes] = total. */
EXPORT void swat_wgrad_plane_starts(const uint8_t *bits, int64_t nplanes, int64_t plane, int64_t *starts) {
    int64_t total = 0;
    for (int64_t p = 0; p < nplanes; p++) {
        starts[p] = total;
        for (int64_t q = 0; q < plane; q += 64) {
            const int64_t cnt = plane - q < 64 ? plane - q : 64;
            total += __builtin_popcountll(load_bits(bits, p * plane + q, cnt));
        }
    }
    starts[nplanes] = total;
}

struct wg_args {
    const uint8_t *bits;
    const float *vals;
    const int64_t *starts;
    const float *g;
    float *dwt;
    int64_t n, c_in, h, w, o, kh, kw, sh, sw, pt, pl, dh, dw, h_out, w_out;
};

/* Walk the kept entries of plane (b, c): calls BODY with y, x and the value v. Rows are tracked
   incrementally (positions only grow), so there is no division per entry. */
#define FOR_KEPT(A, b, c, ...)                                                                   \
    do {                                                                                         \
        const int64_t plane_ = (A)->h * (A)->w, p_ = (b) * (A)->c_in + (c);                    \
        int64_t vi_ = (A)->starts[p_], y = 0, row0_ = 0;                                        \
        for (int64_t q0_ = 0; q0_ < plane_; q0_ += 64) {                                        \
            const int64_t cnt_ = plane_ - q0_ < 64 ? plane_ - q0_ : 64;                         \
            uint64_t m_ = load_bits((A)->bits, p_ * plane_ + q0_, cnt_);                        \
            while (m_) {                                                                         \
                const int64_t pos_ = q0_ + __builtin_ctzll(m_);                                 \
                m_ &= m_ - 1;                                                                    \
                while (pos_ >= row0_ + (A)->w) { row0_ += (A)->w; y++; }                        \
                const int64_t x = pos_ - row0_;                                                  \
                const float v = (A)->vals[vi_++];                                                \
                __VA_ARGS__                                                                      \
            }                                                                                    \
        }                                                                                        \
    } while (0)

/* output row / column of tap offset `d` (= y + pt - i * dh), or -1 if it is not on the grid */
static inline int64_t on_grid(int64_t d, int64_t s, int64_t lim) {
    if (d < 0) return -1;
    if (s == 2) { /* ResNet's downsampling convs: a shift, not a 20-40 cycle division per tap */
        if (d & 1) return -1;
        d >>= 1;
    } else if (s != 1) {
        if (d % s) return -1;
        d /= s;
    }
    return d < lim ? d : -1;
}

/* ------------------------------------------------------------------ portable C */
static void wgrad_generic(const struct wg_args *A, int64_t c, int64_t b) {
    const int64_t kk = A->kh * A->kw;
    float *dst = A->dwt + c * kk * A->o;
    {
        const float *gb = A->g + b * A->h_out * A->w_out * A->o;
        FOR_KEPT(A, b, c, {
            for (int64_t i = 0; i < A->kh; i++) {
                const int64_t oh = on_grid(y + A->pt - i * A->dh, A->sh, A->h_out);
                if (oh < 0) continue;
                for (int64_t j = 0; j < A->kw; j++) {
                    const int64_t ow = on_grid(x + A->pl - j * A->dw, A->sw, A->w_out);
                    if (ow < 0) continue;
                    const float *gp = gb + (oh * A->w_out + ow) * A->o;
                    float *dp = dst + (i * A->kw + j) * A->o;
                    for (int64_t t = 0; t < A->o; t++) dp[t] += v * gp[t];
                }
            }
        });
    }
}

#ifdef SWAT_X86
static const float wg_zero[64] __attribute__((aligned(64))) = {0}; /* >= T * LANES floats */

/* One micro-kernel per (ISA, KH, KW, T): acc[KH*KW][T] has compile-time bounds and stays in
   registers; item = (channel c, output-channel block starting at ob). Every loop that touches
   acc is fully unrolled (WG_UNROLL) and the border path only computes the taps' gradient rows
   (a zero row for taps off the grid) before the same FMA block as the interior: with the
   on_grid tests inside the FMA loop gcc kept acc on the stack (a load + FMA + store per tap). */
#define WG_UNROLL _Pragma("GCC unroll 16")
#define WG_MICRO(ISA, VEC, LANES, SET1, LOADU, STOREU, FMADD, KH, KW, T)                          \
    static __attribute__((target(ISA))) void wg_##LANES##_##KH##_##KW##_##T(                      \
        const struct wg_args *A, int64_t c, int64_t ob, int64_t b) {                             \
        VEC acc[KH * KW][T];                                                                      \
        const int unit = A->sh == 1 && A->sw == 1;                                                \
        const int64_t o = A->o, wo = A->w_out, ho = A->h_out, dh = A->dh, dw = A->dw;             \
        const int64_t ymin = (KH - 1) * dh, xmin = (KW - 1) * dw;                                 \
        float *dst = A->dwt + c * KH * KW * o + ob;                                               \
        WG_UNROLL for (int q = 0; q < KH * KW; q++)                                               \
            WG_UNROLL for (int t = 0; t < T; t++) acc[q][t] = LOADU(dst + q * o + t * LANES);     \
        {                                                                                         \
            const float *gb = A->g + b * ho * wo * o + ob;                                        \
            FOR_KEPT(A, b, c, {                                                                   \
                const VEC a = SET1(v);                                                            \
                const int64_t y0 = y + A->pt, x0 = x + A->pl;                                     \
                const float *gp[KH * KW];                                                         \
                if (unit && y0 >= ymin && y0 < ho && x0 >= xmin && x0 < wo) { /* all on the grid */ \
                    const float *g0 = gb + (y0 * wo + x0) * o;                                    \
                    WG_UNROLL for (int i = 0; i < KH; i++)                                        \
                        WG_UNROLL for (int j = 0; j < KW; j++)                                    \
                            gp[i * KW + j] = g0 - (i * dh * wo + j * dw) * o;                     \
                } else { /* near the border: taps off the grid read a zero row */                 \
                    for (int i = 0; i < KH; i++) {                                                \
                        const int64_t oh = on_grid(y0 - i * dh, A->sh, ho);                       \
                        for (int j = 0; j < KW; j++) {                                            \
                            const int64_t ow = on_grid(x0 - j * dw, A->sw, wo);                   \
                            gp[i * KW + j] = (oh >= 0 && ow >= 0) ? gb + (oh * wo + ow) * o : wg_zero; \
                        }                                                                         \
                    }                                                                             \
                }                                                                                 \
                WG_UNROLL for (int q = 0; q < KH * KW; q++)                                       \
                    WG_UNROLL for (int t = 0; t < T; t++)                                         \
                        acc[q][t] = FMADD(a, LOADU(gp[q] + t * LANES), acc[q][t]);                \
            });                                                                                   \
        }                                                                                         \
        WG_UNROLL for (int q = 0; q < KH * KW; q++)                                               \
            WG_UNROLL for (int t = 0; t < T; t++) STOREU(dst + q * o + t * LANES, acc[q][t]);     \
    }

#define W512(KH, KW, T) WG_MICRO("avx512f", __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, \
                                 _mm512_fmadd_ps, KH, KW, T)
#define W256(KH, KW, T) WG_MICRO("avx2,fma", __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, \
                                 _mm256_fmadd_ps, KH, KW, T)
W512(3, 3, 1) W512(3, 3, 2) W512(1, 1, 1) W512(1, 1, 2) W512(1, 1, 4)
W256(3, 3, 1) W256(1, 1, 1) W256(1, 1, 2) W256(1, 1, 4)
#endif

/* Floats of output channels per work item for (isa, kernel, O), or -1: no micro-kernel
   (the caller then uses dense torch). The portable path takes a whole channel, any kernel. */
EXPORT int64_t swat_wgrad_block(int64_t isa, int64_t kh, int64_t kw, int64_t o) {
    if (isa == 0) return o;
#ifdef SWAT_X86
    const int64_t lanes = isa == 2 ? 16 : isa == 1 ? 8 : 0;
    if (!lanes || o % lanes) return -1;
    if (kh == 3 && kw == 3) return (isa == 2 && o % 32 == 0) ? 32 : lanes;
    if (kh == 1 && kw == 1) return o % (4 * lanes) == 0 ? 4 * lanes : o % (2 * lanes) == 0 ? 2 * lanes : lanes;
#endif
    return -1;
}

/* Work items i0..i1, item i = (channel i / nob, block i % nob) with nob = O / block; dwt
   (C, kh, kw, O) must be zero on entry (the loop accumulates image by image).
   Returns 0, or -1 for an unsupported (isa, kernel, O). */
EXPORT int swat_wgrad_f32(int64_t isa, const uint8_t *bits, const float *vals, const int64_t *starts,
                          const float *g, float *dwt, int64_t n, int64_t c_in, int64_t h, int64_t w,
                          int64_t o, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                          int64_t dh, int64_t dw, int64_t h_out, int64_t w_out, int64_t i0, int64_t i1) {
    const struct wg_args A = {bits, vals, starts, g, dwt, n, c_in, h, w, o, kh, kw, sh, sw, pt, pl, dh, dw,
                              h_out, w_out};
    const int64_t blk = swat_wgrad_block(isa, kh, kw, o);
    if (blk <= 0) return -1;
    const int64_t nob = o / blk;
    /* images outermost: one image's output gradient stays in L2 while every channel of the
       item range reads it (channel-outermost re-streamed the whole gradient per channel and
       was memory-bound); the dW tiles go through memory once per (image, item) instead */
    for (int64_t b = 0; b < n; b++)
    for (int64_t it = i0; it < i1; it++) {
        const int64_t c = it / nob, ob = (it % nob) * blk;
        if (isa == 0) {
            wgrad_generic(&A, c, b);
            continue;
        }
#ifdef SWAT_X86
        const int64_t t = blk / (isa == 2 ? 16 : 8);
        if (isa == 2) {
            if (kh == 3 && t == 1) wg_16_3_3_1(&A, c, ob, b);
            else if (kh == 3) wg_16_3_3_2(&A, c, ob, b);
            else if (t == 1) wg_16_1_1_1(&A, c, ob, b);
            else if (t == 2) wg_16_1_1_2(&A, c, ob, b);
            else wg_16_1_1_4(&A, c, ob, b);
        } else {
            if (kh == 3) wg_8_3_3_1(&A, c, ob, b);
            else if (t == 1) wg_8_1_1_1(&A, c, ob, b);
            else if (t == 2) wg_8_1_1_2(&A, c, ob, b);
            else wg_8_1_1_4(&A, c, ob, b);
        }
#else
        return -1;
#endif
    }
    return 0;
}

/* NCHW -> NHWC of one (C, HW) image block at a time, in 16 x 16 tiles (the weight-gradient loop
   reads the output gradient with output channels innermost; torch's permute + contiguous took
   longer than the loop itself). Images b0..b1. */
EXPORT void swat_nchw_to_nhwc_f32(const float *src, float *dst, int64_t c, int64_t hw, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        const float *s = src + b * c * hw;
        float *d = dst + b * c * hw;
        for (int64_t p0 = 0; p0 < hw; p0 += 16)
            for (int64_t c0 = 0; c0 < c; c0 += 16) {
                const int64_t p1 = p0 + 16 < hw ? p0 + 16 : hw, c1 = c0 + 16 < c ? c0 + 16 : c;
                for (int64_t p = p0; p < p1; p++)
                    for (int64_t ch = c0; ch < c1; ch++) d[p * c + ch] = s[ch * hw + p];
            }
    }
}

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

/* load_bits for the common case first: a whole, byte-aligned word is one 8-byte load (the
   variable-length copy of load_bits had cost a libc call per 64 positions). */
static inline uint64_t load_word(const uint8_t *bits, int64_t pos, int64_t cnt) {
    if (cnt == 64 && (pos & 7) == 0) {
        uint64_t m;
        memcpy(&m, bits + (pos >> 3), 8);
        return m;
    }
    return load_bits(bits, pos, cnt);
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

/* ------------------------------------------------------------- stride 1, padded gradient
   The same product for stride-1 convs, without a branch per kept entry: the output gradient
   comes zero-padded (NHWC, hp x wp, `top` rows and `left` columns of zeros before output (0, 0)),
   so every tap of every kept entry reads a real row (zeros off the grid) at a constant offset
   from the entry's own: pointer = base(pos) - (i * dh * wp + j * dw) * O. base(pos) comes from a
   per-position table (no division, no row-tracking loop). The walk over the set bits and the
   border test of the generic loop above had cost ~50 cycles per kept entry, five times its
   9 FMAs. */
#ifdef SWAT_X86
#define WS_MICRO(ISA, VEC, LANES, SET1, LOADU, STOREU, FMADD, KH, KW, T)                                                                        \
    static __attribute__((target(ISA))) void ws##LANES##_##KH##_##KW##_##T(                          \
        const uint8_t *bits, const float *vals, int64_t *vip, const float *gb, float *dst,        \
        int64_t p, int64_t plane, int64_t q_lo, int64_t q_hi, const int32_t *posoff,              \
        const int64_t *toff, int64_t o) {                                                         \
        VEC acc[KH * KW][T];                                                                   \
        int64_t to[KH * KW];                                                                      \
        WG_UNROLL for (int q = 0; q < KH * KW; q++) {                                             \
            to[q] = toff[q];                                                                      \
            WG_UNROLL for (int t = 0; t < T; t++) acc[q][t] = LOADU(dst + q * o + t * LANES); \
        }                                                                                         \
        int64_t vi = *vip;                                                                        \
        for (int64_t q0 = q_lo; q0 < q_hi; q0 += 64) {                                            \
            const int64_t cnt = plane - q0 < 64 ? plane - q0 : 64;                                \
            uint64_t m = load_word(bits, p * plane + q0, cnt);                                    \
            while (m) {                                                                           \
                const int64_t pos = q0 + __builtin_ctzll(m);                                      \
                m &= m - 1;                                                                       \
                const VEC a = SET1(vals[vi++]);                                      \
                const float *base = gb + (int64_t)posoff[pos] * o;                                \
                WG_UNROLL for (int q = 0; q < KH * KW; q++)                                       \
                    WG_UNROLL for (int t = 0; t < T; t++)                                         \
                        acc[q][t] = FMADD(a, LOADU(base - to[q] + t * LANES), acc[q][t]); \
            }                                                                                     \
        }                                                                                         \
        *vip = vi;                                                                                \
        WG_UNROLL for (int q = 0; q < KH * KW; q++)                                               \
            WG_UNROLL for (int t = 0; t < T; t++) STOREU(dst + q * o + t * LANES, acc[q][t]); \
    }
#define WS512(KH, KW, T) WS_MICRO("avx512f", __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, \
                                  _mm512_fmadd_ps, KH, KW, T)
#define WS256(KH, KW, T) WS_MICRO("avx2,fma", __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, \
                                  _mm256_fmadd_ps, KH, KW, T)
/* AVX2 (16 registers): 3x3 takes one vector of output channels (9 accumulators) */
WS512(3, 3, 1) WS512(3, 3, 2) WS512(1, 1, 1) WS512(1, 1, 2) WS512(1, 1, 4)
WS256(3, 3, 1) WS256(1, 1, 1) WS256(1, 1, 2) WS256(1, 1, 4)
#endif

/* Whether swat_wgrad_s1_f32 has a loop for (isa, kernel, O): AVX-512 (O % 16 == 0) or AVX2
   (O % 8 == 0), 3x3 or 1x1. */
EXPORT int swat_wgrad_s1_supported(int64_t isa, int64_t kh, int64_t kw, int64_t o) {
#ifdef SWAT_X86
    return ((isa == 2 && o % 16 == 0) || (isa == 1 && o % 8 == 0)) && ((kh == 3 && kw == 3) || (kh == 1 && kw == 1));
#else
    (void)isa; (void)kh; (void)kw; (void)o;
    return 0;
#endif
}

/* dwt (C, kh, kw, O), zero on entry, += the stride-1 weight gradient for work items i0..i1
   (item = (channel, block of output channels), as swat_wgrad_f32). gpad: (N, hp, wp, O) output
   gradient, output (oh, ow) at row oh + top, column ow + left, zeros elsewhere. Returns 0, or -1
   when there is no loop for (isa, kernel, O). */
EXPORT int swat_wgrad_s1_f32(int64_t isa, const uint8_t *bits, const float *vals, const int64_t *starts,
                             const float *gpad, float *dwt, int64_t n, int64_t c_in, int64_t h, int64_t w,
                             int64_t o, int64_t kh, int64_t kw, int64_t pt, int64_t pl, int64_t dh, int64_t dw,
                             int64_t hp, int64_t wp, int64_t top, int64_t left, int64_t i0, int64_t i1) {
    if (!swat_wgrad_s1_supported(isa, kh, kw, o)) return -1;
#ifdef SWAT_X86
    const int64_t blk = swat_wgrad_block(isa, kh, kw, o);
    if (blk <= 0) return -1;
    const int64_t lanes = isa == 2 ? 16 : 8, nob = o / blk, plane = h * w, t = blk / lanes;
    int32_t posoff_stack[4096];
    int32_t *posoff = plane <= 4096 ? posoff_stack : NULL;
    if (!posoff) return -1;
    /* kept entry (y, x) meets tap (0, 0) at output (y + pt, x + pl): padded row y + pt + top */
    for (int64_t y = 0; y < h; y++)
        for (int64_t x = 0; x < w; x++) posoff[y * w + x] = (int32_t)((y + pt + top) * wp + x + pl + left);
    int64_t toff[9];
    for (int64_t i = 0; i < kh; i++)
        for (int64_t j = 0; j < kw; j++) toff[i * kw + j] = (i * dh * wp + j * dw) * o;
    (void)hp;
    /* positions in bands of WS_BAND: every item (channel) of an image walks one band before the
       next, so the gradient rows a band reads stay in L1 across the channels (walking whole
       planes per channel re-read a 32 x 32 image's gradient from L2 for every channel; banding
       took 12 % off the loop there) */
    const int64_t WS_BAND = plane > 256 ? 128 : plane; /* small maps: measured slower in bands */
    int64_t vis[512]; /* each item's next value index; items in groups of at most 512 */
    for (int64_t j0 = i0; j0 < i1; j0 += 512)
    for (int64_t b = 0; b < n; b++) {
        const int64_t j1 = j0 + 512 < i1 ? j0 + 512 : i1;
        for (int64_t it = j0; it < j1; it++) vis[it - j0] = starts[b * c_in + it / nob];
        for (int64_t q_lo = 0; q_lo < plane; q_lo += WS_BAND) {
            const int64_t q_hi = q_lo + WS_BAND < plane ? q_lo + WS_BAND : plane;
            for (int64_t it = j0; it < j1; it++) {
                const int64_t c = it / nob, ob = (it % nob) * blk;
                const float *gb = gpad + b * hp * wp * o + ob;
                float *dst = dwt + c * kh * kw * o + ob;
                const int64_t p = b * c_in + c;
                int64_t *vip = vis + (it - j0);
#define WS_ARGS bits, vals, vip, gb, dst, p, plane, q_lo, q_hi, posoff, toff, o
                if (isa == 1) {
                    if (kh == 3) ws8_3_3_1(WS_ARGS);
                    else if (t == 1) ws8_1_1_1(WS_ARGS);
                    else if (t == 2) ws8_1_1_2(WS_ARGS);
                    else ws8_1_1_4(WS_ARGS);
                } else if (kh == 3) {
                    if (t == 1) ws16_3_3_1(WS_ARGS);
                    else ws16_3_3_2(WS_ARGS);
                } else {
                    if (t == 1) ws16_1_1_1(WS_ARGS);
                    else if (t == 2) ws16_1_1_2(WS_ARGS);
                    else ws16_1_1_4(WS_ARGS);
                }
#undef WS_ARGS
            }
        }
    }
    return 0;
#else
    return -1;
#endif
}

/* NCHW (N, C, H, W) -> zero-padded NHWC (N, hp, wp, C): pixel (y, x) at (y + top, x + left),
   images b0..b1; register-transposed tiles where C % 16 == 0 (AVX-512) or C % 8 == 0 (AVX2), else scalar. */
EXPORT void swat_nchw_to_nhwc_pad_f32(int64_t isa, const float *src, float *dst, int64_t c, int64_t h,
                                      int64_t w, int64_t hp, int64_t wp, int64_t top, int64_t left,
                                      int64_t b0, int64_t b1);
#ifdef SWAT_X86
/* 16 vectors (rows) -> their 16x16 transpose, in registers: out[4L + k] gathers lane L (a
   128-bit quarter) of u[k], u[4 + k], u[8 + k], u[12 + k], where u[4q + k] holds column 4L + k
   of rows 4q..4q+3 after the in-lane unpack / shuffle stages. */
static inline __attribute__((always_inline, target("avx512f"))) void transpose16_512(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int q = 0; q < 4; q++) {
        u[4 * q + 0] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[4 * q + 1] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[4 * q + 2] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[4 * q + 3] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int k = 0; k < 4; k++) {
        const __m512 x0 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x44), x1 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xEE);
        const __m512 y0 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x44);
        const __m512 y1 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xEE);
        r[k] = _mm512_shuffle_f32x4(x0, y0, 0x88);
        r[4 + k] = _mm512_shuffle_f32x4(x0, y0, 0xDD);
        r[8 + k] = _mm512_shuffle_f32x4(x1, y1, 0x88);
        r[12 + k] = _mm512_shuffle_f32x4(x1, y1, 0xDD);
    }
}

/* Tiles of 16 channels x 16 consecutive positions of the plane: 16 contiguous (masked at the
   plane's end) loads, a register transpose, 16 pixel stores. The former loop gathered each
   pixel's 16 channels from 16 planes (one vgatherdps per store) and ran at ~2.6 GB/s on a
   16x32x32 batch-64 gradient (AMD EPYC, one thread), a third of the weight gradient's time. */
static __attribute__((target("avx512f"))) void nhwc_pad_512(const float *s, float *d, int64_t c, int64_t hw,
                                                            int64_t w, int64_t wp, int64_t top, int64_t left,
                                                            int64_t h) {
    (void)h;
    for (int64_t p0 = 0, y0 = 0, x0 = 0; p0 < hw; p0 += 16) {
        const int64_t n = hw - p0 < 16 ? hw - p0 : 16;
        const __mmask16 m = (__mmask16)(n == 16 ? 0xFFFFu : (1u << n) - 1u);
        for (int64_t c0 = 0; c0 < c; c0 += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_maskz_loadu_ps(m, s + (c0 + i) * hw + p0);
            transpose16_512(r);
            int64_t y = y0, x = x0;
            for (int j = 0; j < n; j++) {
                _mm512_storeu_ps(d + ((y + top) * wp + x + left) * c + c0, r[j]);
                if (++x == w) { x = 0; y++; }
            }
        }
        x0 += 16;
        while (x0 >= w) { x0 -= w; y0++; }
    }
}

/* The AVX2 counterpart: tiles of 8 channels x 8 positions, an 8x8 register transpose. */
static inline __attribute__((always_inline, target("avx2,fma"))) void transpose8_256(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int q = 0; q < 2; q++) {
        u[4 * q + 0] = _mm256_shuffle_ps(t[4 * q], t[4 * q + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[4 * q + 1] = _mm256_shuffle_ps(t[4 * q], t[4 * q + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[4 * q + 2] = _mm256_shuffle_ps(t[4 * q + 1], t[4 * q + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[4 * q + 3] = _mm256_shuffle_ps(t[4 * q + 1], t[4 * q + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int k = 0; k < 4; k++) {
        r[k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x20);
        r[4 + k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x31);
    }
}

static __attribute__((target("avx2,fma"))) void nhwc_pad_256(const float *s, float *d, int64_t c, int64_t hw,
                                                            int64_t w, int64_t wp, int64_t top, int64_t left) {
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t p0 = 0, y0 = 0, x0 = 0; p0 < hw; p0 += 8) {
        const int64_t n = hw - p0 < 8 ? hw - p0 : 8;
        const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), iota);
        for (int64_t c0 = 0; c0 < c; c0 += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; i++)
                r[i] = n == 8 ? _mm256_loadu_ps(s + (c0 + i) * hw + p0) : _mm256_maskload_ps(s + (c0 + i) * hw + p0, m);
            transpose8_256(r);
            int64_t y = y0, x = x0;
            for (int j = 0; j < n; j++) {
                _mm256_storeu_ps(d + ((y + top) * wp + x + left) * c + c0, r[j]);
                if (++x == w) { x = 0; y++; }
            }
        }
        x0 += 8;
        while (x0 >= w) { x0 -= w; y0++; }
    }
}
#endif
EXPORT void swat_nchw_to_nhwc_pad_f32(int64_t isa, const float *src, float *dst, int64_t c, int64_t h,
                                      int64_t w, int64_t hp, int64_t wp, int64_t top, int64_t left,
                                      int64_t b0, int64_t b1) {
    const int64_t hw = h * w;
    for (int64_t b = b0; b < b1; b++) {
        const float *s = src + b * c * hw;
        float *d = dst + b * hp * wp * c;
        /* the zero border: rows above / below, columns left / right of the image */
        for (int64_t r = 0; r < hp; r++) {
            if (r < top || r >= top + h) {
                memset(d + r * wp * c, 0, sizeof(float) * wp * c);
                continue;
            }
            memset(d + r * wp * c, 0, sizeof(float) * left * c);
            memset(d + (r * wp + left + w) * c, 0, sizeof(float) * (wp - left - w) * c);
        }
#ifdef SWAT_X86
        if (isa == 2 && c % 16 == 0 && c * hw < (1LL << 31) / 16) {
            nhwc_pad_512(s, d, c, hw, w, wp, top, left, h);
            continue;
        }
        if (isa == 1 && c % 8 == 0 && c * hw < (1LL << 31) / 8) {
            nhwc_pad_256(s, d, c, hw, w, wp, top, left);
            continue;
        }
#endif
        (void)isa;
        for (int64_t y = 0; y < h; y++)
            for (int64_t x = 0; x < w; x++)
                for (int64_t ch = 0; ch < c; ch++) d[((y + top) * wp + x + left) * c + ch] = s[ch * hw + y * w + x];
    }
}

/* ------------------------------------------------------------- stride 2, padded gradient
   ResNet's downsampling convs: with stride 2 a kept entry (y, x) meets only the taps (i, j)
   with y + pt - i and x + pl - j even: one tap of 9 for a quarter of the entries, four for
   another quarter. The set bits of each 64-position word are split by that parity class with
   per-word class masks (so each class runs its own fixed tap set, no branch per tap), and the
   value index comes from a popcount of the bits before the entry. The generic loop had tested
   every tap of every entry and ran at ~3x the dense product's time. */
#ifdef SWAT_X86
#define W2_CLASS(VEC, LANES, SET1, LOADU, FMADD, KH, KW, T, PY, PX)                                                                \
    {                                                                                             \
        uint64_t mk = m & cls[wi * 4 + (PY) * 2 + (PX)];                                          \
        while (mk) {                                                                              \
            const int64_t bit = __builtin_ctzll(mk);                                              \
            mk &= mk - 1;                                                                         \
            const uint64_t below = bit ? (m << (64 - bit)) : 0;                                   \
            const VEC a = SET1(vals[vi + __builtin_popcountll(below)]);              \
            const float *base = gb + (int64_t)posoff[q0 + bit] * o;                               \
            WG_UNROLL for (int i = (PY); i < KH; i += 2)                                          \
                WG_UNROLL for (int j = (PX); j < KW; j += 2) {                                    \
                    const float *gp = base - (((i - (PY)) / 2) * wp + (j - (PX)) / 2) * o;        \
                    WG_UNROLL for (int t = 0; t < T; t++)                                         \
                        acc[i * KW + j][t] = FMADD(a, LOADU(gp + t * LANES), acc[i * KW + j][t]); \
                }                                                                                 \
        }                                                                                         \
    }
#define W2_MICRO(ISA, VEC, LANES, SET1, LOADU, STOREU, FMADD, KH, KW, T)                                                                        \
    static __attribute__((target(ISA))) void w2_##LANES##_##KH##_##KW##_##T(                          \
        const uint8_t *bits, const float *vals, const int64_t *starts, const float *gb,           \
        float *dst, int64_t p, int64_t plane, const int32_t *posoff, const uint64_t *cls,         \
        int64_t wp, int64_t o) {                                                                  \
        VEC acc[KH * KW][T];                                                                   \
        WG_UNROLL for (int q = 0; q < KH * KW; q++)                                               \
            WG_UNROLL for (int t = 0; t < T; t++) acc[q][t] = LOADU(dst + q * o + t * LANES); \
        int64_t vi = starts[p];                                                                   \
        for (int64_t wi = 0, q0 = 0; q0 < plane; wi++, q0 += 64) {                                \
            const uint64_t m = load_word(bits, p * plane + q0, plane - q0 < 64 ? plane - q0 : 64); \
            if (!m) continue;                                                                     \
            W2_CLASS(VEC, LANES, SET1, LOADU, FMADD, KH, KW, T, 0, 0) W2_CLASS(VEC, LANES, SET1, LOADU, FMADD, KH, KW, T, 0, 1)                                   \
            W2_CLASS(VEC, LANES, SET1, LOADU, FMADD, KH, KW, T, 1, 0) W2_CLASS(VEC, LANES, SET1, LOADU, FMADD, KH, KW, T, 1, 1)                                   \
            vi += __builtin_popcountll(m);                                                        \
        }                                                                                         \
        WG_UNROLL for (int q = 0; q < KH * KW; q++)                                               \
            WG_UNROLL for (int t = 0; t < T; t++) STOREU(dst + q * o + t * LANES, acc[q][t]); \
    }
#define W2512(KH, KW, T) W2_MICRO("avx512f", __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, \
                                  _mm512_fmadd_ps, KH, KW, T)
#define W2256(KH, KW, T) W2_MICRO("avx2,fma", __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, \
                                  _mm256_fmadd_ps, KH, KW, T)
W2512(3, 3, 1) W2512(3, 3, 2) W2512(1, 1, 1) W2512(1, 1, 2) W2512(1, 1, 4)
W2256(3, 3, 1) W2256(1, 1, 1) W2256(1, 1, 2) W2256(1, 1, 4)
#endif

/* Whether swat_wgrad_s2_f32 has a loop: as swat_wgrad_s1_supported, and plane <= 4096. */
EXPORT int swat_wgrad_s2_supported(int64_t isa, int64_t kh, int64_t kw, int64_t o, int64_t plane) {
    return swat_wgrad_s1_supported(isa, kh, kw, o) && plane <= 4096;
}

/* As swat_wgrad_s1_f32 for stride 2, dilation 1: gpad (N, hp, wp, O) holds output (oh, ow) at
   (oh + top, ow + left), zeros elsewhere; top, left >= (kh - 1) / 2, (kw - 1) / 2 and hp, wp
   large enough for output row (h - 1 + pt) / 2 and column (w - 1 + pl) / 2. */
EXPORT int swat_wgrad_s2_f32(int64_t isa, const uint8_t *bits, const float *vals, const int64_t *starts,
                             const float *gpad, float *dwt, int64_t n, int64_t c_in, int64_t h, int64_t w,
                             int64_t o, int64_t kh, int64_t kw, int64_t pt, int64_t pl, int64_t hp, int64_t wp,
                             int64_t top, int64_t left, int64_t i0, int64_t i1) {
    const int64_t plane = h * w;
    if (!swat_wgrad_s2_supported(isa, kh, kw, o, plane)) return -1;
#ifdef SWAT_X86
    const int64_t blk = swat_wgrad_block(isa, kh, kw, o);
    if (blk <= 0) return -1;
    const int64_t nob = o / blk, t = blk / (isa == 2 ? 16 : 8);
    int32_t posoff[4096];
    uint64_t cls[4096 / 64 * 4];
    memset(cls, 0, sizeof(uint64_t) * (size_t)((plane + 63) / 64 * 4));
    for (int64_t y = 0; y < h; y++)
        for (int64_t x = 0; x < w; x++) {
            const int64_t pos = y * w + x;
            posoff[pos] = (int32_t)((((y + pt) >> 1) + top) * wp + ((x + pl) >> 1) + left);
            cls[(pos >> 6) * 4 + ((y + pt) & 1) * 2 + ((x + pl) & 1)] |= 1ull << (pos & 63);
        }
    for (int64_t b = 0; b < n; b++)
        for (int64_t it = i0; it < i1; it++) {
            const int64_t c = it / nob, ob = (it % nob) * blk;
            const float *gb = gpad + b * hp * wp * o + ob;
            float *dst = dwt + c * kh * kw * o + ob;
            const int64_t p = b * c_in + c;
#define W2_ARGS bits, vals, starts, gb, dst, p, plane, posoff, cls, wp, o
            if (isa == 1) {
                if (kh == 3) w2_8_3_3_1(W2_ARGS);
                else if (t == 1) w2_8_1_1_1(W2_ARGS);
                else if (t == 2) w2_8_1_1_2(W2_ARGS);
                else w2_8_1_1_4(W2_ARGS);
            } else if (kh == 3) {
                if (t == 1) w2_16_3_3_1(W2_ARGS);
                else w2_16_3_3_2(W2_ARGS);
            } else {
                if (t == 1) w2_16_1_1_1(W2_ARGS);
                else if (t == 2) w2_16_1_1_2(W2_ARGS);
                else w2_16_1_1_4(W2_ARGS);
            }
#undef W2_ARGS
        }
    return 0;
#else
    (void)bits; (void)vals; (void)starts; (void)gpad; (void)dwt; (void)n; (void)c_in; (void)o; (void)kh; (void)kw;
    (void)pt; (void)pl; (void)hp; (void)wp; (void)top; (void)left; (void)i0; (void)i1;
    return -1;
#endif
}

/* SWAT training's sparse-weight conv for "same"-size stride-1 convs (ResNet's 3x3, pad 1),
   float32, AVX-512: y = conv(x, W) with the zeros of W skipped, read straight from the NCHW
   input and written straight into the NCHW output.

   Why a training-only kernel: the inference shift kernel reads a packed input (kw zero-padded,
   column-shifted copies of every image, or stride phases with the images innermost). Its
   weights are fixed, so in inference the multiply dominates; in training at 90 % sparsity the
   multiply is ~0.2 ms per ResNet-20 layer while packing (3x the input written and read again)
   and the epilogue took 1-1.5 ms, most of the sparse product's time, and the forward and the
   stride-1 input gradient run it ~30 times a step. Here nothing is packed: the zero padding
   is a lane mask. For a flat plane of P = H * W floats, output vector v (lanes q = 16v..16v+15)
   and tap (i, j) read x[c, q + d] with d = (i*dh - pt) * W + (j*dw - pl), the same shift for
   every vector; the lanes whose source pixel lies outside the image (row or column) are masked
   off, masks[v * kk + tap] (16 bits, computed once per shape by the caller). Masked lanes may
   point outside the buffer: AVX-512 masked loads do not fault there.

   A strided conv reads its input's stride phases instead (swat_tconv_phases_f32: one copy,
   (C, sh, sw, H_out, W_out) per image), where every tap is again a constant shift inside one
   phase plane; the input gradient of a strided conv is one such conv of the output gradient per
   input phase (the caller's _direct_strided_input_grad), interleaved by swat_tconv_unphase_f32.

   Weights: tap-major block CSR per block of B output channels (SWAT's --block; B = 1
   unstructured): segment (row, tap) of indptr, offs[k] = c * cstride + d(tap), vals[k * B + j];
   the T lane masks of a tap are loaded once per segment. A tile is T output vectors of I images
   (small planes: an 8 x 8 map is 4 vectors, so two images share each weight broadcast and mask)
   x B output channels, all in registers across the row's non-zeros; the output channels are the
   inner loop, so the input rows a tile reads stay in L1. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SWAT_X86 1
#endif

#define EXPORT __attribute__((visibility("default")))

/* Block CSR of the (rows * B, K) row-major weight w (K = C * kk), tap-major: segment
   (r, tap) = indptr[r * kk + tap] .. indptr[r * kk + tap + 1] holds the kept block columns
   (c, tap) of block row r, offs = c * cstride + dtab[tap] (cstride: floats per input channel).
   A block column is kept if any of its B values is non-zero. Grouped convs (groups > 1, block
   rows never straddling a group): row r belongs to group g = r / (rows / groups), whose K / kk
   input channels start at channel g * K / kk, so a depthwise conv is a block-diagonal sparse
   conv run by the same kernels. Returns nnz. */
EXPORT int64_t swat_tconv_csr(const float *w, int64_t rows, int64_t B, int64_t K, int64_t kk, int64_t cstride,
                              const int32_t *dtab, int32_t *indptr, int32_t *offs, float *vals, int64_t groups) {
    int64_t n = 0;
    const int64_t C = K / kk, per_group = rows / (groups > 0 ? groups : 1);
    indptr[0] = 0;
    for (int64_t r = 0; r < rows; r++) {
        const float *wr = w + r * B * K;
        const int64_t cbase = (r / per_group) * C;
        for (int64_t tap = 0; tap < kk; tap++) {
            for (int64_t c = 0; c < C; c++) {
                const int64_t col = c * kk + tap;
                int keep = 0;
                for (int64_t j = 0; j < B; j++) keep |= wr[j * K + col] != 0.0f;
                if (!keep) continue;
                for (int64_t j = 0; j < B; j++) vals[n * B + j] = wr[j * K + col];
                offs[n] = (int32_t)((cbase + c) * cstride + dtab[tap]);
                n++;
            }
            indptr[r * kk + tap + 1] = (int32_t)n;
        }
    }
    return n;
}

#ifdef SWAT_X86
#define TC_UNROLL _Pragma("GCC unroll 16")
/* One tile: I images x output vectors v0 .. v0 + T - 1 x block row r. The plane's last vector
   (index vlast - v0 inside the tile, if it is) may be partial: its store is masked by `tail`. */
#define TC_MICRO(B, T, I)                                                                          \
    static inline __attribute__((always_inline, target("avx512f"))) void tc_##B##_##T##_##I(      \
        const int32_t *seg, const int32_t *offs, const float *vals, const uint16_t *masks,         \
        int64_t kk, const float *x, int64_t xs, float *y, int64_t ys, int64_t yr,                 \
        const float *bias, int64_t vlast, __mmask16 tail, const float *res, int64_t relu) {       \
        __m512 acc[B][I][T];                                                                      \
        TC_UNROLL for (int j = 0; j < B; j++) {                                                   \
            const __m512 b0 = _mm512_set1_ps(bias ? bias[j] : 0.0f);                              \
            TC_UNROLL for (int m = 0; m < I; m++)                                                 \
                TC_UNROLL for (int t = 0; t < T; t++) acc[j][m][t] = b0;                          \
        }                                                                                         \
        for (int64_t tap = 0; tap < kk; tap++) {                                                  \
            const int32_t ks = seg[tap], ke = seg[tap + 1];                                       \
            if (ks == ke) continue;                                                               \
            __mmask16 mt[T];                                                                      \
            TC_UNROLL for (int t = 0; t < T; t++) mt[t] = (__mmask16)masks[t * kk + tap];         \
            for (int32_t k = ks; k < ke; k++) {                                                   \
                const float *xk = x + offs[k];                                                    \
                __m512 wv[B];                                                                     \
                TC_UNROLL for (int j = 0; j < B; j++) wv[j] = _mm512_set1_ps(vals[(int64_t)k * B + j]); \
                TC_UNROLL for (int t = 0; t < T; t++)                                             \
                    TC_UNROLL for (int m = 0; m < I; m++) {                                       \
                        const __m512 xv = _mm512_maskz_loadu_ps(mt[t], xk + m * xs + t * 16);    \
                        TC_UNROLL for (int j = 0; j < B; j++)                                     \
                            acc[j][m][t] = _mm512_fmadd_ps(wv[j], xv, acc[j][m][t]);             \
                    }                                                                             \
            }                                                                                     \
        }                                                                                         \
        TC_UNROLL for (int j = 0; j < B; j++)                                                     \
            TC_UNROLL for (int m = 0; m < I; m++)                                                 \
                TC_UNROLL for (int t = 0; t < T; t++) {                                           \
                    float *yp = y + j * yr + m * ys + t * 16;                                     \
                    const __mmask16 st = t == vlast ? tail : (__mmask16)0xFFFF;                   \
                    __m512 a = acc[j][m][t];                                                      \
                    if (res) a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(st, res + (yp - y)));     \
                    if (relu) a = _mm512_max_ps(_mm512_setzero_ps(), a); /* NaN kept */         \
                    _mm512_mask_storeu_ps(yp, st, a);                                             \
                }                                                                                 \
    }

/* Images [b, b + I) of every block row: the plane's V vectors in tiles of up to TM vectors (the
   rest in tiles of 4, 2, 1); output channels innermost, so the input rows a tile reads (all
   channels) stay in L1. */
#define TC_CALLT(B, T, I) TC_CALL_(tc, B, T, I) /* expands T (TC_T8(TM) ...) before pasting */
/* one tile of micro-kernel PFX (tc: AVX-512, tc2: AVX2) at vector v0 of block row r */
#define TC_CALL_(PFX, B, T, I)                                                                     \
    PFX##_##B##_##T##_##I(indptr + r * kk, offs, vals, masks + v0 * kk, kk, xb + v0 * 16, xs,       \
                          yb + r * (B) * yr + v0 * 16, ys, yr, bias ? bias + r * (B) : NULL,       \
                          V - 1 - v0, tail, resb ? resb + r * (B) * yr + v0 * 16 : NULL, relu)
/* the drivers' parameters (AVX-512 tci_, AVX2 tci2_): images from b, block rows r0 .. r1 */
#define TC_DRIVER_PARAMS                                                                           \
    const int32_t *indptr, const int32_t *offs, const float *vals, const float *bias,             \
        const uint16_t *masks, int64_t kk, const float *x, float *y, int64_t xs, int64_t o,       \
        int64_t P, int64_t yr, int64_t b, int64_t r0, int64_t r1, const float *res, int64_t relu
#define TC_IMAGES(B, I, TM)                                                                        \
    static __attribute__((target("avx512f"))) void tci_##B##_##I(                                 \
        TC_DRIVER_PARAMS) {                                                                       \
        const int64_t ys = o * yr, V = (P + 15) / 16;                                             \
        const __mmask16 tail = (__mmask16)(P % 16 ? (1u << (P % 16)) - 1 : 0xFFFFu);              \
        const float *xb = x + b * xs;                                                             \
        float *yb = y + b * ys;                                                                   \
        const float *resb = res ? res + b * ys : NULL;                                            \
        for (int64_t v0 = 0; v0 < V;) {                                                           \
            const int64_t left = V - v0;                                                          \
            if ((TM) >= 8 && left >= 8) {                                                         \
                for (int64_t r = r0; r < r1; r++) TC_CALLT(B, TC_T8(TM), I);                     \
                v0 += TC_T8(TM);                                                                  \
            } else if ((TM) >= 4 && left >= 4) {                                                  \
                for (int64_t r = r0; r < r1; r++) TC_CALLT(B, TC_T4(TM), I);                     \
                v0 += TC_T4(TM);                                                                  \
            } else if ((TM) >= 2 && left >= 2) {                                                  \
                for (int64_t r = r0; r < r1; r++) TC_CALLT(B, TC_T2(TM), I);                     \
                v0 += TC_T2(TM);                                                                  \
            } else {                                                                              \
                for (int64_t r = r0; r < r1; r++) TC_CALLT(B, 1, I);                             \
                v0 += 1;                                                                          \
            }                                                                                     \
        }                                                                                         \
    }
/* tile widths a driver with at most TM vectors may use (a narrower stand-in keeps unused
   branches compiling without register-spilling micro-kernels) */
#define TC_T8(TM) TC_T8_##TM
#define TC_T4(TM) TC_T4_##TM
#define TC_T2(TM) TC_T2_##TM
#define TC_T8_8 8
#define TC_T4_8 4
#define TC_T2_8 2
#define TC_T8_4 4
#define TC_T4_4 4
#define TC_T2_4 2
#define TC_T8_2 2
#define TC_T4_2 2
#define TC_T2_2 2
#define TC_T8_1 1
#define TC_T4_1 1
#define TC_T2_1 1
TC_MICRO(1, 8, 1) TC_MICRO(1, 4, 1) TC_MICRO(1, 2, 1) TC_MICRO(1, 1, 1)
TC_MICRO(1, 4, 2) TC_MICRO(1, 2, 2) TC_MICRO(1, 1, 2)
TC_MICRO(1, 2, 4) TC_MICRO(1, 1, 4) TC_MICRO(1, 1, 8)
TC_MICRO(2, 8, 1) TC_MICRO(2, 4, 1) TC_MICRO(2, 2, 1) TC_MICRO(2, 1, 1)
TC_MICRO(2, 4, 2) TC_MICRO(2, 2, 2) TC_MICRO(2, 1, 2)
TC_MICRO(2, 2, 4) TC_MICRO(2, 1, 4)
TC_MICRO(4, 4, 1) TC_MICRO(4, 2, 1) TC_MICRO(4, 1, 1)
TC_MICRO(4, 2, 2) TC_MICRO(4, 1, 2) TC_MICRO(4, 1, 4)
TC_IMAGES(1, 1, 8) TC_IMAGES(1, 2, 4) TC_IMAGES(1, 4, 2) TC_IMAGES(1, 8, 1)
TC_IMAGES(2, 1, 8) TC_IMAGES(2, 2, 4) TC_IMAGES(2, 4, 2)
TC_IMAGES(4, 1, 4) TC_IMAGES(4, 2, 2) TC_IMAGES(4, 4, 1)

/* ---- AVX2 + FMA: the same tiles of 16-lane vectors (the mask table is shared), each held as
   two 8-lane halves. AVX2 has 16 registers, so a tile holds at most 8 accumulators (B x I x 2T)
   next to its 2T lane masks, B broadcasts and one input. A masked lane's address may lie
   outside the buffer: vmaskmovps does not fault there either. */
static inline __attribute__((always_inline, target("avx2,fma"))) __m256i tc_mask8(uint32_t bits, int half) {
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i m = _mm256_set1_epi32((int)(half ? bits >> 8 : bits) & 0xFF);
    return _mm256_cmpeq_epi32(_mm256_and_si256(m, sel), sel);
}
/* Partial sums over alternating non-zeros for small tiles: a one-vector tile of one channel
   and image is 2 accumulators, and its FMA chains (4 cycles each on Zen 3) were what the loop
   waited on - the 8x8 and 4x4 maps of a batch-1 ResNet-18 run mostly such tiles. */
#define TC2_NPART(B, T, I) ((B) * (T) * (I) == 1 ? 4 : (B) * (T) * (I) == 2 ? 2 : 1)
/* one non-zero k into partial sum p; LOAD(ptr, t) reads 8 lanes of half-vector t */
#define TC2_NZ(B, T, I, LOAD, p, k)                                                                \
    {                                                                                             \
        const float *xk = x + offs[k];                                                            \
        __m256 wv[B];                                                                             \
        TC_UNROLL for (int j = 0; j < B; j++) wv[j] = _mm256_broadcast_ss(vals + (int64_t)(k) * B + j); \
        TC_UNROLL for (int t = 0; t < 2 * (T); t++)                                               \
            TC_UNROLL for (int m = 0; m < I; m++) {                                               \
                const __m256 xv = LOAD(xk + m * xs + t * 8, t);                                   \
                TC_UNROLL for (int j = 0; j < B; j++)                                             \
                    acc[p][j][m][t] = _mm256_fmadd_ps(wv[j], xv, acc[p][j][m][t]);               \
            }                                                                                     \
    }
#define TC2_PLAIN(ptr, t) _mm256_loadu_ps(ptr)
#define TC2_MASKED(ptr, t) _mm256_maskload_ps(ptr, mt[t])
#define TC2_LOOP(B, T, I, LOAD)                                                                    \
    {                                                                                             \
        int32_t k = ks;                                                                           \
        for (; k + P <= ke; k += P)                                                               \
            TC_UNROLL for (int p = 0; p < P; p++) TC2_NZ(B, T, I, LOAD, p, k + p)                 \
        for (; k < ke; k++) TC2_NZ(B, T, I, LOAD, 0, k)                                           \
    }
#define TC2_MICRO(B, T, I)                                                                         \
    static inline __attribute__((always_inline, target("avx2,fma"))) void tc2_##B##_##T##_##I(   \
        const int32_t *seg, const int32_t *offs, const float *vals, const uint16_t *masks,         \
        int64_t kk, const float *x, int64_t xs, float *y, int64_t ys, int64_t yr,                 \
        const float *bias, int64_t vlast, uint32_t tail, const float *res, int64_t relu) {        \
        enum { P = TC2_NPART(B, T, I) };                                                          \
        __m256 acc[P][B][I][2 * (T)];                                                             \
        TC_UNROLL for (int j = 0; j < B; j++) {                                                   \
            const __m256 b0 = _mm256_set1_ps(bias ? bias[j] : 0.0f);                              \
            TC_UNROLL for (int m = 0; m < I; m++)                                                 \
                TC_UNROLL for (int t = 0; t < 2 * (T); t++) {                                     \
                    acc[0][j][m][t] = b0;                                                         \
                    TC_UNROLL for (int p = 1; p < P; p++) acc[p][j][m][t] = _mm256_setzero_ps();  \
                }                                                                                 \
        }                                                                                         \
        for (int64_t tap = 0; tap < kk; tap++) {                                                  \
            const int32_t ks = seg[tap], ke = seg[tap + 1];                                       \
            if (ks == ke) continue;                                                               \
            __m256i mt[2 * (T)];                                                                  \
            uint32_t all = 0xFFFFu;                                                               \
            TC_UNROLL for (int t = 0; t < T; t++) {                                               \
                const uint32_t mb = masks[t * kk + tap];                                          \
                all &= mb;                                                                        \
                mt[2 * t] = tc_mask8(mb, 0);                                                      \
                mt[2 * t + 1] = tc_mask8(mb, 1);                                                  \
            }                                                                                     \
            if (all == 0xFFFFu) /* no lane masked (interior taps): plain loads */                 \
                TC2_LOOP(B, T, I, TC2_PLAIN)                                                      \
            else                                                                                  \
                TC2_LOOP(B, T, I, TC2_MASKED)                                                     \
        }                                                                                         \
        TC_UNROLL for (int t = 0; t < 2 * (T); t++) {                                             \
            const uint32_t sb = (t / 2 == vlast ? tail : 0xFFFFu);                                \
            const int full = ((t & 1 ? sb >> 8 : sb) & 0xFF) == 0xFF;                              \
            const __m256i st = tc_mask8(sb, t & 1);                                               \
            TC_UNROLL for (int j = 0; j < B; j++)                                                 \
                TC_UNROLL for (int m = 0; m < I; m++) {                                           \
                    float *yp = y + j * yr + m * ys + t * 8;                                      \
                    __m256 a = acc[0][j][m][t];                                                   \
                    TC_UNROLL for (int p = 1; p < P; p++) a = _mm256_add_ps(a, acc[p][j][m][t]);  \
                    if (res) a = _mm256_add_ps(a, full ? _mm256_loadu_ps(res + (yp - y))          \
                                                        : _mm256_maskload_ps(res + (yp - y), st)); \
                    if (relu) a = _mm256_max_ps(_mm256_setzero_ps(), a); /* NaN kept */         \
                    if (full) _mm256_storeu_ps(yp, a);                                            \
                    else _mm256_maskstore_ps(yp, st, a);                                          \
                }                                                                                 \
        }                                                                                         \
    }

/* Images [b, b + I) of every block row: tiles of TM vectors, then the rest one vector at a time;
   output channels innermost, as TC_IMAGES. */
/* Tiles per chunk of the AVX2 driver: a block row runs a chunk of consecutive tiles before the
   next row starts, so each output plane is written in runs of chunk x 64 bytes and the input
   columns the chunk reads (every channel) stay within ~16 KB of L1. Measured (Zen 3, batch 1,
   in-process A/B of two builds): MobileNet-V2's 96x16 1x1 conv at 112x112, blocks of 4 at 80 %,
   0.34x the time on 2 threads and 0.83x on 1 (one tile per row visit wrote 96 planes 64 bytes
   at a time); ResNet 3x3 layers within +-5 %. */
static inline int64_t tc_chunk(int64_t xs, int64_t P, int64_t I) {
    const int64_t bytes = (xs / (P > 0 ? P : 1)) * 64 * I;
    const int64_t ch = bytes > 0 ? 16384 / bytes : 1;
    return ch < 1 ? 1 : ch > 64 ? 64 : ch;
}
#define TC2_CALL(B, T, I) TC_CALL_(tc2, B, T, I)
#define TC2_IMAGES(B, I, TM)                                                                       \
    static __attribute__((target("avx2,fma"))) void tci2_##B##_##I(                               \
        TC_DRIVER_PARAMS) {                                                                       \
        const int64_t ys = o * yr, V = (P + 15) / 16;                                             \
        const uint32_t tail = P % 16 ? (1u << (P % 16)) - 1 : 0xFFFFu;                            \
        const float *xb = x + b * xs;                                                             \
        float *yb = y + b * ys;                                                                   \
        const float *resb = res ? res + b * ys : NULL;                                            \
        const int64_t vfull = V / (TM) * (TM), chunk = tc_chunk(xs, P, I) * (TM);                \
        for (int64_t c0 = 0; c0 < vfull; c0 += chunk) {                                           \
            const int64_t c1 = c0 + chunk < vfull ? c0 + chunk : vfull;                           \
            for (int64_t r = r0; r < r1; r++)                                                     \
                for (int64_t v0 = c0; v0 < c1; v0 += (TM)) TC2_CALL(B, TM, I);                    \
        }                                                                                         \
        for (int64_t v0 = vfull; v0 < V; v0++)                                                    \
            for (int64_t r = r0; r < r1; r++) TC2_CALL(B, 1, I);                                  \
    }
/* one image, one channel: 4 vectors (8 accumulators; 8 lane masks, which gcc keeps partly on the
   stack) measured 0.86-0.98x the time of 3-vector tiles at batch 1 (Zen 3, 90-95 %, 8x8-32x32) */
TC2_MICRO(1, 4, 1) TC2_MICRO(1, 2, 2) TC2_MICRO(1, 1, 1) TC2_MICRO(1, 1, 2) TC2_MICRO(1, 1, 4)
TC2_MICRO(2, 2, 1) TC2_MICRO(2, 1, 1) TC2_MICRO(2, 1, 2)
TC2_MICRO(4, 1, 1)
TC2_IMAGES(1, 1, 4) TC2_IMAGES(1, 2, 2) TC2_IMAGES(1, 4, 1)
TC2_IMAGES(2, 1, 2) TC2_IMAGES(2, 2, 1)
TC2_IMAGES(4, 1, 1)
#endif

/* Images per tile for block height B and V vectors per plane (several images share each weight
   broadcast and mask when the plane is only a few vectors). */
static int tc_images(int64_t B, int64_t V) {
    if (B == 1) return V >= 8 ? 1 : V >= 4 ? 2 : V >= 2 ? 4 : 8;
    if (B == 2) return V >= 8 ? 1 : V >= 4 ? 2 : 4;
    return V >= 4 ? 1 : V >= 2 ? 2 : 4;
}

/* The same for AVX2's tiles (at most 8 accumulators: B x I x 2 halves per 16-lane vector). */
static int tc2_images(int64_t B, int64_t V) {
    if (B == 1) return V >= 2 ? 2 : 4;
    if (B == 2) return V >= 2 ? 1 : 2;
    return 1;
}

/* Whether (isa, B, P) has a kernel: isa 2 (AVX-512F) or 1 (AVX2 + FMA), B in {1, 2, 4}, any
   plane size. */
EXPORT int swat_tconv_supported(int64_t isa, int64_t B, int64_t P) {
#ifdef SWAT_X86
    return (isa == 2 || isa == 1) && (B == 1 || B == 2 || B == 4) && P >= 1;
#else
    (void)isa; (void)B; (void)P;
    return 0;
#endif
}

/* y[b] = conv(x[b], W) (+ bias) for images b0 .. b1: x holds xs floats per image (the C input
   planes, or their stride phases); output channel r's plane of P floats at y + (b * O + r) * yr
   (yr = P: NCHW; larger: one stride phase of an input gradient), float32. masks: (ceil(P / 16),
   kk), lanes past P clear. Returns 0, or -1 when (isa, B, P) has no kernel. bias may be NULL. */
/* Images [b0, b1) x block rows [r0, r1) (see swat_tconv_f32); res: a residual laid out as y
   (added before ReLU) or NULL; relu: clamp at 0 (NaN kept). */
static int tconv_range(int64_t isa, const int32_t *indptr, const int32_t *offs, const float *vals,
                       const float *bias, const uint16_t *masks, int64_t kk, const float *x, float *y,
                       int64_t xs, int64_t o, int64_t P, int64_t yr, int64_t B, int64_t b0, int64_t b1,
                       int64_t r0, int64_t r1, const float *res, int64_t relu) {
    if (!swat_tconv_supported(isa, B, P)) return -1;
#ifdef SWAT_X86
    int64_t b = b0;
    if (isa == 1) {
        const int I = tc2_images(B, (P + 15) / 16);
#define TC2_RUN(BB, II) tci2_##BB##_##II(indptr, offs, vals, bias, masks, kk, x, y, xs, o, P, yr, b, r0, r1, res, relu)
        if (B == 1) {
            if (I == 4) for (; b + 4 <= b1; b += 4) TC2_RUN(1, 4);
            if (I == 2) for (; b + 2 <= b1; b += 2) TC2_RUN(1, 2);
            for (; b < b1; b++) TC2_RUN(1, 1);
        } else if (B == 2) {
            if (I == 2) for (; b + 2 <= b1; b += 2) TC2_RUN(2, 2);
            for (; b < b1; b++) TC2_RUN(2, 1);
        } else {
            for (; b < b1; b++) TC2_RUN(4, 1);
        }
#undef TC2_RUN
        return 0;
    }
    const int I = tc_images(B, (P + 15) / 16);
#define TC_RUN(BB, II) tci_##BB##_##II(indptr, offs, vals, bias, masks, kk, x, y, xs, o, P, yr, b, r0, r1, res, relu)
    if (B == 1) {
        if (I == 8) for (; b + 8 <= b1; b += 8) TC_RUN(1, 8);
        if (I == 4) for (; b + 4 <= b1; b += 4) TC_RUN(1, 4);
        if (I == 2) for (; b + 2 <= b1; b += 2) TC_RUN(1, 2);
        for (; b < b1; b++) TC_RUN(1, 1);
    } else if (B == 2) {
        if (I == 4) for (; b + 4 <= b1; b += 4) TC_RUN(2, 4);
        if (I == 2) for (; b + 2 <= b1; b += 2) TC_RUN(2, 2);
        for (; b < b1; b++) TC_RUN(2, 1);
    } else {
        if (I == 4) for (; b + 4 <= b1; b += 4) TC_RUN(4, 4);
        if (I == 2) for (; b + 2 <= b1; b += 2) TC_RUN(4, 2);
        for (; b < b1; b++) TC_RUN(4, 1);
    }
#undef TC_RUN
    return 0;
#else
    (void)indptr; (void)offs; (void)vals; (void)bias; (void)masks; (void)kk; (void)x; (void)y; (void)xs;
    (void)o; (void)yr; (void)b0; (void)b1; (void)r0; (void)r1; (void)res; (void)relu;
    return -1;
#endif
}

/* y[b] = conv(x[b], W) (+ bias) for images b0 .. b1: x holds xs floats per image (the C input
   planes, or their stride phases); output channel r's plane of P floats at y + (b * O + r) * yr
   (yr = P: NCHW; larger: one stride phase of an input gradient), float32. masks: (ceil(P / 16),
   kk), lanes past P clear. Returns 0, or -1 when (isa, B, P) has no kernel. bias may be NULL. */
EXPORT int swat_tconv_f32(int64_t isa, const int32_t *indptr, const int32_t *offs, const float *vals,
                          const float *bias, const uint16_t *masks, int64_t kk, const float *x, float *y,
                          int64_t xs, int64_t o, int64_t P, int64_t yr, int64_t B, int64_t b0, int64_t b1) {
    return tconv_range(isa, indptr, offs, vals, bias, masks, kk, x, y, xs, o, P, yr, B, b0, b1, 0, o / (B > 0 ? B : 1),
                       NULL, 0);
}

/* ------------------------------------------------------------------ one inference layer
   The same kernel as one call for the inference Session (swat_deploy/kernels/masked_direct.py):
   stride phases (strided convs), multiply, residual Add and ReLU, on the extension's thread
   pool (swat_pool_for, layer_f32.c). Items: groups of images when there are at least as many
   images as threads, else (image, block-row group) with the rows cut at equal non-zero counts,
   so batch 1 uses every thread. Why in inference: nothing is packed (the padding is a lane
   mask), where the shift kernel writes kw column-shifted copies of the input per call; at batch
   1 that copy is a large share of a layer at 90 % (measured per layer, one thread, AMD EPYC:
   1.0-1.25x at 32x32 to 16x16 maps, 1.5-2.2x at 8x8 and 4x4). */
EXPORT void swat_tconv_phases_f32(const float *x, float *out, int64_t c_in, int64_t h, int64_t w, int64_t sh,
                                  int64_t sw, int64_t ho, int64_t wo, int64_t cs, int64_t b0, int64_t b1);
EXPORT void swat_tconv_restride_f32(const float *x, float *out, int64_t c_in, int64_t P, int64_t cs, int64_t b0,
                                    int64_t b1);
void swat_pool_for(int threads, void (*fn)(const void *, int64_t), const void *ctx, int64_t items);

struct swat_tconv_layer {
    const int32_t *indptr, *offs;
    const float *vals, *bias;
    const uint16_t *masks;
    int64_t kk, o, B, P, c, h, w, sh, sw, ho, wo, n, isa, threads;
    const float *x;
    float *phases; /* (n, c, cs) scratch: stride phases, or the input at a padded channel stride */
    float *y;
    const float *res;
    int64_t relu;
    int64_t nrg, per_item; /* row groups per image; images per item (nrg == 1) */
    int64_t dw;            /* 1: strided depthwise (B = 1, one input channel per row), phases per row;
                              2: a strided conv whose every tap reads phase (0, 0) (a 1x1 conv without
                              padding: ResNet's downsampling shortcuts), which alone is copied */
    int64_t cs;            /* floats per input channel the offsets assume (swat_tconv_cstride); 0: plain */
    int rc;
};

/* the plain channel stride: one plane, or its stride phases */
static int64_t tl_plain(const struct swat_tconv_layer *L) {
    if (L->dw == 2) return L->P;
    return (L->sh != 1 || L->sw != 1) ? L->sh * L->sw * L->P : L->h * L->w;
}
static int64_t tl_cs(const struct swat_tconv_layer *L) { return L->cs > 0 ? L->cs : tl_plain(L); }
/* whether the kernel reads the scratch (stride phases or a re-strided copy), not x */
static int tl_copies(const struct swat_tconv_layer *L) {
    return L->dw != 1 && ((L->sh != 1 || L->sw != 1) || tl_cs(L) != L->h * L->w);
}

static int64_t tl_row_at(const struct swat_tconv_layer *L, int64_t q) {
    const int64_t rows = L->o / L->B;
    if (q <= 0) return 0;
    if (q >= L->nrg) return rows;
    const int64_t want = (int64_t)L->indptr[rows * L->kk] * q / L->nrg;
    int64_t lo = 0, hi = rows;
    while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (L->indptr[mid * L->kk] < want) lo = mid + 1; else hi = mid;
    }
    return lo;
}

#ifdef SWAT_X86
int64_t swat_split2_avx2(const float *s, float *ev, float *od, int64_t n); /* below */
#endif

/* phase (0, 0) of channels [0, c) of one image: out[c, u, v] = x[c, u * sh, v * sw] */
static void phase0_copy(const float *x, float *out, int64_t c, int64_t h, int64_t w, int64_t sh, int64_t sw,
                        int64_t ho, int64_t wo, int64_t cs) {
    int vec = 0;
#ifdef SWAT_X86
    vec = sw == 2 && __builtin_cpu_supports("avx2");
#endif
    for (int64_t ch = 0; ch < c; ch++)
        for (int64_t u = 0; u < ho; u++) {
            const float *s = x + ch * h * w + u * sh * w;
            float *d = out + ch * cs + u * wo;
            int64_t v = 0;
#ifdef SWAT_X86
            if (vec) v = swat_split2_avx2(s, d, NULL, w / 2 < wo ? w / 2 : wo); /* loads stay in the row */
#endif
            for (; v < wo; v++) d[v] = s[v * sw];
        }
}

/* copy parts per image: one image per item when there are enough images for the threads,
   else each image's channels split over the threads (batch 1 copied on one thread before) */
static int64_t tl_copy_parts(const struct swat_tconv_layer *L) {
    const int64_t t = L->threads < 1 ? 1 : L->threads;
    return L->n >= t ? 1 : (t < L->c ? t : L->c);
}

static void tl_phase_item(const void *vl, int64_t i) {
    const struct swat_tconv_layer *L = vl;
    const int64_t parts = tl_copy_parts(L), b = i / parts, q = i % parts;
    const int64_t c0 = L->c * q / parts, c1 = L->c * (q + 1) / parts, cs = tl_cs(L);
    const float *x = L->x + (b * L->c + c0) * L->h * L->w;
    float *out = L->phases + (b * L->c + c0) * cs;
    if (L->dw == 2)
        phase0_copy(x, out, c1 - c0, L->h, L->w, L->sh, L->sw, L->ho, L->wo, cs);
    else if (L->sh != 1 || L->sw != 1)
        swat_tconv_phases_f32(x, out, c1 - c0, L->h, L->w, L->sh, L->sw, L->ho, L->wo, cs, 0, 1);
    else
        swat_tconv_restride_f32(x, out, c1 - c0, L->h * L->w, cs, 0, 1);
}

/* A strided depthwise conv: row r reads only input channel r, so each (image, row) splits that
   one plane into its stride phases in a small buffer that stays in cache and runs the row on it,
   instead of a pass writing every channel's phases to a scratch as large as the input. Measured
   (in-process A/B of two builds, Zen 3, batch 1, 80 %): MobileNet-V2's four stride-2 depthwise
   convs 0.93-0.99x the time on 2 threads (0.95x at 112x112 on 1); the multiply, not the copy,
   is most of these layers. */
static void tl_depthwise_rows(struct swat_tconv_layer *L, int64_t b0, int64_t b1, int64_t r0, int64_t r1) {
    const int64_t cs = L->sh * L->sw * L->P;
    float *buf = malloc(sizeof(float) * (size_t)cs);
    if (!buf) {
        L->rc = -1;
        return;
    }
    for (int64_t b = b0; b < b1; b++)
        for (int64_t r = r0; r < r1; r++) {
            swat_tconv_phases_f32(L->x + (b * L->c + r) * L->h * L->w, buf, 1, L->h, L->w, L->sh, L->sw, L->ho, L->wo,
                                  cs, 0, 1);
            /* row r's offsets are r * cs + shift: move the base so that they land in buf */
            const float *xr = (const float *)((uintptr_t)buf - (uintptr_t)(r * cs) * sizeof(float));
            const int64_t ys = L->o * L->P;
            if (tconv_range(L->isa, L->indptr, L->offs, L->vals, L->bias, L->masks, L->kk, xr, L->y + b * ys, cs,
                            L->o, L->P, L->P, 1, 0, 1, r, r + 1, L->res ? L->res + b * ys : NULL, L->relu))
                L->rc = -1;
        }
    free(buf);
}

static void tl_item(const void *vl, int64_t i) {
    struct swat_tconv_layer *L = (struct swat_tconv_layer *)vl;
    const int strided = L->sh != 1 || L->sw != 1;
    const float *x = tl_copies(L) ? L->phases : L->x;
    const int64_t xs = L->c * tl_cs(L);
    int64_t b0, b1, r0, r1;
    if (L->nrg > 1) {
        b0 = i / L->nrg;
        b1 = b0 + 1;
        r0 = tl_row_at(L, i % L->nrg);
        r1 = tl_row_at(L, i % L->nrg + 1);
    } else {
        b0 = i * L->per_item;
        b1 = b0 + L->per_item < L->n ? b0 + L->per_item : L->n;
        r0 = 0;
        r1 = L->o / L->B;
    }
    if (strided && L->dw == 1) {
        tl_depthwise_rows(L, b0, b1, r0, r1);
        return;
    }
    if (tconv_range(L->isa, L->indptr, L->offs, L->vals, L->bias, L->masks, L->kk, x, L->y, xs, L->o, L->P, L->P,
                    L->B, b0, b1, r0, r1, L->res, L->relu))
        L->rc = -1;
}

EXPORT int swat_tconv_layer_f32(struct swat_tconv_layer *L) {
    if (!swat_tconv_supported(L->isa, L->B, L->P) || L->n < 1) return -1;
    const int threads = L->threads < 1 ? 1 : (int)L->threads;
    L->rc = 0;
    if (L->dw == 1 && (L->B != 1 || L->c != L->o || tl_cs(L) != tl_plain(L))) return -1;
    if (L->dw < 0 || L->dw > 2 || (L->dw == 2 && L->kk != 1)) return -1;
    if (tl_cs(L) < tl_plain(L)) return -1;
    if (tl_copies(L)) {
        if (!L->phases) return -1;
        swat_pool_for(threads, tl_phase_item, L, L->n * tl_copy_parts(L));
    }
    if (L->n >= threads || threads == 1) {
        /* image groups of the kernel's own tile height (tc_images), about even per thread */
        const int64_t I = (L->isa == 1 ? tc2_images : tc_images)(L->B, (L->P + 15) / 16);
        int64_t per = (L->n + threads - 1) / threads;
        per = (per + I - 1) / I * I;
        L->nrg = 1;
        L->per_item = per;
        swat_pool_for(threads, tl_item, L, (L->n + per - 1) / per);
    } else {
        L->nrg = threads;
        L->per_item = 1;
        swat_pool_for(threads, tl_item, L, L->n * threads);
    }
    return L->rc;
}

#ifdef SWAT_X86
/* Even and odd floats of s[0 .. 2 n) into ev[0 .. n) and od[0 .. n) (od NULL: evens only), 8 of
   each per pair of loads; returns how many it split (a multiple of 8: the rest is the caller's).
   Also used by the max pool (pool_f32.c) and the phase-(0, 0) copy. */
__attribute__((target("avx2"))) int64_t swat_split2_avx2(const float *s, float *ev, float *od, int64_t n) {
    int64_t v = 0;
    for (; v + 8 <= n; v += 8) {
        const __m256 lo = _mm256_loadu_ps(s + 2 * v), hi = _mm256_loadu_ps(s + 2 * v + 8);
        const __m256 e = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
        const __m256 o = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
        /* 128-bit lanes hold (lo's, hi's) quarters: reorder 0 2 1 3 */
        _mm256_storeu_ps(ev + v, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xD8)));
        if (od) _mm256_storeu_ps(od + v, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), 0xD8)));
    }
    return v;
}

/* Stride 2 x 2 on a map of even width w = 2 * wo (ResNet's downsampling convs): each input row
   splits into its even and odd columns (the scalar loop below read with stride 2 and was half
   the time of a downsampling layer's sparse product at batch 1). */
static void phases_s2_avx2(const float *x, float *out, int64_t c_in, int64_t h, int64_t w, int64_t ho, int64_t wo,
                           int64_t cs, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++)
        for (int64_t c = 0; c < c_in; c++) {
            const float *src = x + (b * c_in + c) * h * w;
            float *dst = out + (b * c_in + c) * cs;
            for (int64_t ri = 0; ri < 2; ri++)
                for (int64_t u = 0; u < ho; u++) {
                    float *de = dst + (ri * 2 * ho + u) * wo, *dd = de + ho * wo; /* rj = 0, 1 */
                    const int64_t row = 2 * u + ri;
                    if (row >= h) {
                        memset(de, 0, sizeof(float) * wo);
                        memset(dd, 0, sizeof(float) * wo);
                        continue;
                    }
                    const float *s = src + row * w;
                    for (int64_t v = swat_split2_avx2(s, de, dd, wo); v < wo; v++) {
                        de[v] = s[2 * v];
                        dd[v] = s[2 * v + 1];
                    }
                }
        }
}
#endif

/* Floats per input channel for the direct kernel's input: `floats` (one channel's plane, or its
   stride phases) plus one cache line when the channel stride is a multiple of 1 KB from 1 KB up.
   A tile reads the same pixels of every channel; with 4 KB between channels (32 x 32 maps) all
   of them fall in one L1 set and evict each other (8 ways on Zen 3). Measured (Zen 3, 1 thread,
   batch 64, 70 %, 3 x 3): 16 channels at 32 x 32 0.48-0.53x the time with the line added,
   32 at 16 x 16 0.82-0.88x; at 8 x 8 (256 B) it cost 6-8 %, so smaller strides stay. */
EXPORT int64_t swat_tconv_cstride(int64_t floats) {
    return floats >= 256 && floats % 256 == 0 ? floats + 16 : floats;
}

/* x (N, C, P) into out with cs floats per channel (images b0 .. b1); the lanes past P are not
   written: the kernel only reads them through cleared lane masks. */
EXPORT void swat_tconv_restride_f32(const float *x, float *out, int64_t c_in, int64_t P, int64_t cs, int64_t b0,
                                    int64_t b1) {
    for (int64_t q = b0 * c_in; q < b1 * c_in; q++) memcpy(out + q * cs, x + q * P, sizeof(float) * (size_t)P);
}

/* Stride phases of images b0 .. b1 for a strided direct conv: out[b, c, ri, rj, u, v] (channel
   c's sh * sw phase planes at out + (b * C + c) * cs, cs >= sh * sw * ho * wo; see
   swat_tconv_cstride) = x[b, c, u * sh + ri, v * sw + rj], 0 where that is outside x. */
EXPORT void swat_tconv_phases_f32(const float *x, float *out, int64_t c_in, int64_t h, int64_t w, int64_t sh,
                                  int64_t sw, int64_t ho, int64_t wo, int64_t cs, int64_t b0, int64_t b1) {
#ifdef SWAT_X86
    if (sh == 2 && sw == 2 && w == 2 * wo && __builtin_cpu_supports("avx2")) {
        phases_s2_avx2(x, out, c_in, h, w, ho, wo, cs, b0, b1);
        return;
    }
#endif
    for (int64_t b = b0; b < b1; b++)
        for (int64_t c = 0; c < c_in; c++) {
            const float *src = x + (b * c_in + c) * h * w;
            float *dst = out + (b * c_in + c) * cs;
            for (int64_t ri = 0; ri < sh; ri++)
                for (int64_t rj = 0; rj < sw; rj++)
                    for (int64_t u = 0; u < ho; u++) {
                        float *d = dst + ((ri * sw + rj) * ho + u) * wo;
                        const int64_t row = u * sh + ri;
                        if (row >= h) {
                            for (int64_t v = 0; v < wo; v++) d[v] = 0.0f;
                            continue;
                        }
                        const float *s = src + row * w + rj;
                        int64_t v = 0;
                        for (; v < wo && v * sw + rj < w; v++) d[v] = s[v * sw];
                        for (; v < wo; v++) d[v] = 0.0f;
                    }
        }
}

/* The inverse of swat_tconv_phases_f32: out[b, c, u * sh + ri, v * sw + rj] = ph[b, c, ri, rj, u, v]
   for every (u, v) inside out (N, C, H, W); images b0 .. b1. */
EXPORT void swat_tconv_unphase_f32(const float *ph, float *out, int64_t c_in, int64_t h, int64_t w, int64_t sh,
                                   int64_t sw, int64_t ho, int64_t wo, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++)
        for (int64_t c = 0; c < c_in; c++) {
            const float *src = ph + (b * c_in + c) * sh * sw * ho * wo;
            float *dst = out + (b * c_in + c) * h * w;
            for (int64_t row = 0; row < h; row++) {
                const int64_t ri = row % sh, u = row / sh;
                float *d = dst + row * w;
                for (int64_t rj = 0; rj < sw; rj++) {
                    const float *s = src + ((ri * sw + rj) * ho + u) * wo;
                    for (int64_t v = 0; v * sw + rj < w; v++) d[v * sw + rj] = s[v];
                }
            }
        }
}

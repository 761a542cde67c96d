/* Sparse (block-)row x shifted input rows, float32, with the output tile in vector registers.

   out[(r*B + j)*run + t] = bias[r*B + j] + sum_k vals[k*B + j] * x[offs[k] + t]
   for block rows r in [r0, r1), j in [0, B), t in [t0, t1), k over row r's non-zeros
   (indptr[r] .. indptr[r+1]).

   Why this shape: a direct conv over a zero-padded input, a 1x1 conv and a batched Linear all
   reduce to it (see swat_deploy/kernels/csr_direct.py): every non-zero weight adds a scaled,
   shifted copy of one input row to an output row. The kernel keeps a tile of T vectors of
   that output row (times B rows for blocks, which share their non-zero pattern) in
   registers across the whole non-zero loop, so a non-zero costs T loads (reused B times)
   and T*B FMAs, and the output is stored once. Tiles are the outer loop and rows the inner
   one, so one tile's input window (all channels, a few image rows) stays in L1 while every
   output channel reads it.

   One copy of the loops per ISA (AVX-512, AVX2+FMA, portable C), chosen at run time by the
   caller (swat_deploy/kernels/native.py), compiled with gcc's per-function target attribute
   so the extension builds on any x86-64 compiler setting and runs on any x86-64 CPU. */
#include <stdint.h>
#include <stddef.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SWAT_X86 1
#endif

#define EXPORT __attribute__((visibility("default")))

/* The fused epilogue: instead of rows of `run` floats in a scratch buffer, the result goes
   straight into the NCHW output y (row stride `plane` = h_out * w_out), plus the residual
   (same layout as y, or NULL) and ReLU (NaN kept, as torch.relu). The output grid has row
   pitch `pitch`: a multiple of the vector width (the aligned direct layout; the lanes
   past w_out in a grid row are junk and not stored), w_out itself (im2col: the grid is the
   plane). Saves writing, re-reading and re-writing the whole output once more. */
struct swat_epi {
    int64_t pitch, w_out, plane, relu;
    const float *y;   /* the output base the caller's rows are offsets of */
    const float *res; /* residual at the same offsets from res as y's from y, or NULL */
};

/* Where lanes [lane, lane + *n) of a grid vector go in y, the vector's first lane being at
   grid row oh, column col (no division: the callers step (oh, col) along). Returns the y offset
   of `lane` (the vector's first lane sits `lane` floats before it, so a masked store at
   y + offset - lane puts each lane in place), sets *n to how many lanes of this grid row are
   real outputs (<= 0: none) and *seg to the lanes the grid row covers. A vector spans several
   grid rows when the pitch is not a multiple of its width. */
static inline int64_t epi_segment(const struct swat_epi *e, int64_t oh, int64_t col, int64_t lane,
                                  int64_t width, int64_t *n, int64_t *seg) {
    if (e->pitch == e->w_out) { /* the grid is the plane itself */
        const int64_t q = oh * e->pitch + col + lane;
        *seg = width - lane;
        *n = e->plane - q < *seg ? e->plane - q : *seg;
        return q;
    }
    col += lane; /* lane starts a grid row here, or lane == 0 */
    while (col >= e->pitch) { col -= e->pitch; oh++; }
    *seg = e->pitch - col < width - lane ? e->pitch - col : width - lane;
    *n = (oh * e->w_out >= e->plane) ? 0 : (e->w_out - col < *seg ? e->w_out - col : *seg);
    return oh * e->w_out + col;
}

/* ------------------------------------------------------------------ portable C */
static void shift_generic(const int32_t *indptr, const int32_t *offs, const float *vals,
                          const float *bias, const float *x, float *out, int64_t B,
                          int64_t run, int64_t r0, int64_t r1, int64_t t0, int64_t t1,
                          const struct swat_epi *e, float *tmp) {
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t j = 0; j < B; j++) {
            float *o = e ? tmp - t0 : out + (r * B + j) * run;
            float b = bias[r * B + j];
            for (int64_t t = t0; t < t1; t++) o[t] = b;
            for (int32_t k = indptr[r]; k < indptr[r + 1]; k++) {
                const float w = vals[(int64_t)k * B + j];
                const float *xs = x + offs[k];
                for (int64_t t = t0; t < t1; t++) o[t] += w * xs[t];
            }
            if (!e) continue;
            float *yrow = out + (r * B + j) * e->plane;
            const float *rrow = e->res ? e->res + (yrow - e->y) : NULL;
            for (int64_t t = t0; t < t1; t++) {
                int64_t valid, seg;
                const int64_t d = epi_segment(e, t / e->pitch, t % e->pitch, 0, 1, &valid, &seg);
                if (valid <= 0) continue;
                float v = o[t] + (rrow ? rrow[d] : 0.0f);
                yrow[d] = (e->relu && v < 0.0f) ? 0.0f : v; /* NaN < 0 is false: NaN kept */
            }
        }
    }
}

#ifdef SWAT_X86
/* Software prefetch of the input rows SWAT_PF_DIST non-zeros ahead. A non-zero's rows sit at
   an offset only the index array knows, so the hardware prefetchers cannot run ahead; where
   a non-zero's work is short (small tiles) or shared by B outputs, the loads' L2 latency is
   what the loop waits on. Measured at batch 1, one thread, Xeon AVX-512, 90 %, interleaved:
   512->512 at 4x4 (one vector per row) 475 -> 392 us, blocks of 4 1.05-1.12x; with tiles of
   4-8 vectors and B = 1 it cost 7-8 % at batch 64 (enough loads in flight already), so
   those skip it. */
#ifndef SWAT_PF_DIST
#define SWAT_PF_DIST 8
#endif
#define PF_DIST(B, T) (((B) > 1 || (T) <= 2) ? SWAT_PF_DIST : 0)
/* One micro-kernel per (ISA, B, T): the accumulator array has compile-time bounds, the
   loops over it are unrolled, and gcc keeps it in registers. BS is the stride between the
   B values of one non-zero (B itself, or 16 when AVX2 does a 16-block as two 8-blocks).
   P partial sums over alternating non-zeros keep at least ~8 FMA chains in flight when the
   tile is small (a 4x4 feature map is one or two vectors), so the loop is not bound by the
   FMA latency. */
#define NPART(B, T) ((B) * (T) <= 2 ? 4 : (B) * (T) <= 4 ? 2 : 1)
#define MICRO(ISA, VEC, LANES, SET1, LOADU, STOREU, FMADD, ADD, EPI, B, T, BS)                  \
    static inline __attribute__((always_inline, target(ISA))) void                               \
    micro_##LANES##_##B##_##T##_##BS(const int32_t *offs, const float *vals, const float *bias, \
                                     const float *x, float *out, int64_t run, int32_t ks,      \
                                     int32_t ke, int64_t t, const struct swat_epi *e) {        \
        enum { P = NPART(B, T), PF = PF_DIST(B, T) };                                           \
        VEC acc[P][B][T];                                                                       \
        for (int j = 0; j < B; j++) {                                                           \
            VEC bj = SET1(bias[j]);                                                             \
            for (int i = 0; i < T; i++) acc[0][j][i] = bj;                                      \
            for (int p = 1; p < P; p++)                                                         \
                for (int i = 0; i < T; i++) acc[p][j][i] = SET1(0.0f);                          \
        }                                                                                       \
        int32_t k = ks;                                                                         \
        for (; k + P <= ke; k += P)                                                             \
            for (int p = 0; p < P; p++) {                                                       \
                const float *xs = x + offs[k + p] + t;                                          \
                if (PF && k + p + PF < ke) {                                                    \
                    const char *pf = (const char *)(x + offs[k + p + PF] + t);                  \
                    for (int i = 0; i < (T * LANES * 4 + 63) / 64; i++)                         \
                        _mm_prefetch(pf + 64 * i, _MM_HINT_T0);                                 \
                }                                                                               \
                const float *wk = vals + (int64_t)(k + p) * BS;                                 \
                VEC xv[T];                                                                      \
                for (int i = 0; i < T; i++) xv[i] = LOADU(xs + i * LANES);                      \
                for (int j = 0; j < B; j++) {                                                   \
                    VEC w = SET1(wk[j]);                                                        \
                    for (int i = 0; i < T; i++) acc[p][j][i] = FMADD(w, xv[i], acc[p][j][i]);   \
                }                                                                               \
            }                                                                                   \
        for (; k < ke; k++) {                                                                   \
            const float *xs = x + offs[k] + t;                                                  \
            const float *wk = vals + (int64_t)k * BS;                                           \
            for (int j = 0; j < B; j++) {                                                       \
                VEC w = SET1(wk[j]);                                                            \
                for (int i = 0; i < T; i++)                                                     \
                    acc[0][j][i] = FMADD(w, LOADU(xs + i * LANES), acc[0][j][i]);               \
            }                                                                                   \
        }                                                                                       \
        int64_t oh[T], col[T]; /* grid row / column of each vector (fused epilogue only) */    \
        if (e) {                                                                                \
            oh[0] = t / e->pitch;                                                               \
            col[0] = t - oh[0] * e->pitch;                                                      \
            for (int i = 1; i < T; i++) {                                                       \
                oh[i] = oh[i - 1];                                                              \
                col[i] = col[i - 1] + LANES;                                                    \
                while (col[i] >= e->pitch) { col[i] -= e->pitch; oh[i]++; }                     \
            }                                                                                   \
        }                                                                                       \
        for (int j = 0; j < B; j++)                                                             \
            for (int i = 0; i < T; i++) {                                                       \
                VEC a = acc[0][j][i];                                                           \
                for (int p = 1; p < P; p++) a = ADD(a, acc[p][j][i]);                           \
                if (e)                                                                          \
                    EPI(e, out + j * run, a, oh[i], col[i]);                                    \
                else                                                                            \
                    STOREU(out + j * run + t + i * LANES, a);                                   \
            }                                                                                   \
    }

/* Rows r0..r1 over tiles of TM vectors; what is left of [t0, t1) (fewer than TM vectors) is
   one narrower tile, so a short row never falls back to one vector at a time. */
#define ROWS(LANES, B, T, BS)                                                                   \
    for (int64_t r = r0; r < r1; r++)                                                           \
        micro_##LANES##_##B##_##T##_##BS(offs, vals, bias + r * (BS), x, out + r * (BS) * run,  \
                                         run, indptr[r], indptr[r + 1], t, e);
#define DRIVER_HEAD(ISA, LANES, B, TM, BS)                                                      \
    static __attribute__((target(ISA))) void drive_##LANES##_##B##_##BS(                        \
        const int32_t *indptr, const int32_t *offs, const float *vals, const float *bias,       \
        const float *x, float *out, int64_t run, int64_t r0, int64_t r1, int64_t t0,            \
        int64_t t1, const struct swat_epi *e) {                                                 \
        int64_t t = t0;                                                                         \
        for (; t + (TM) * (LANES) <= t1; t += (TM) * (LANES)) { ROWS(LANES, B, TM, BS) }        \
        switch ((t1 - t) / (LANES)) {
#define REM(LANES, B, T, BS) case T: { ROWS(LANES, B, T, BS) } break;
#define DRIVER_TAIL default: break; } }

static inline __attribute__((always_inline, target("avx512f"))) void
epi_512(const struct swat_epi *e, float *yrow, __m512 a, int64_t oh, int64_t col) {
    const float *rrow = e->res ? e->res + (yrow - e->y) : NULL;
    for (int64_t lane = 0, n, seg; lane < 16; lane += seg) {
        const int64_t d = epi_segment(e, oh, col, lane, 16, &n, &seg) - lane;
        if (n <= 0) continue;
        const __mmask16 m = (__mmask16)((n >= 16 ? 0xFFFFu : ((1u << n) - 1u)) << lane);
        __m512 v = a;
        if (rrow) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, rrow + d));
        if (e->relu) v = _mm512_max_ps(_mm512_setzero_ps(), v); /* max returns its 2nd operand for NaN */
        _mm512_mask_storeu_ps(yrow + d, m, v);
    }
}

static inline __attribute__((always_inline, target("avx2,fma"))) void
epi_256(const struct swat_epi *e, float *yrow, __m256 a, int64_t oh, int64_t col) {
    const float *rrow = e->res ? e->res + (yrow - e->y) : NULL;
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t lane = 0, n, seg; lane < 8; lane += seg) {
        const int64_t d = epi_segment(e, oh, col, lane, 8, &n, &seg) - lane;
        if (n <= 0) continue;
        const __m256i m = _mm256_and_si256(_mm256_cmpgt_epi32(iota, _mm256_set1_epi32((int)lane - 1)),
                                           _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(lane + n)), iota));
        __m256 v = a;
        if (rrow) v = _mm256_add_ps(v, _mm256_maskload_ps(rrow + d, m));
        if (e->relu) v = _mm256_max_ps(_mm256_setzero_ps(), v);
        _mm256_maskstore_ps(yrow + d, m, v);
    }
}

/* ---- AVX-512: 32 registers, 16 floats each */
#define M512(B, T) MICRO("avx512f", __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, \
                         _mm512_fmadd_ps, _mm512_add_ps, epi_512, B, T, B)
M512(1, 1) M512(1, 2) M512(1, 3) M512(1, 4) M512(1, 5) M512(1, 6) M512(1, 7) M512(1, 8)
DRIVER_HEAD("avx512f", 16, 1, 8, 1) REM(16, 1, 1, 1) REM(16, 1, 2, 1) REM(16, 1, 3, 1) REM(16, 1, 4, 1)
    REM(16, 1, 5, 1) REM(16, 1, 6, 1) REM(16, 1, 7, 1) DRIVER_TAIL
M512(2, 1) M512(2, 2) M512(2, 3) M512(2, 4) M512(2, 5) M512(2, 6) M512(2, 7) M512(2, 8)
DRIVER_HEAD("avx512f", 16, 2, 8, 2) REM(16, 2, 1, 2) REM(16, 2, 2, 2) REM(16, 2, 3, 2) REM(16, 2, 4, 2)
    REM(16, 2, 5, 2) REM(16, 2, 6, 2) REM(16, 2, 7, 2) DRIVER_TAIL
M512(4, 1) M512(4, 2) M512(4, 3) M512(4, 4) M512(4, 5) M512(4, 6)
DRIVER_HEAD("avx512f", 16, 4, 6, 4) REM(16, 4, 1, 4) REM(16, 4, 2, 4) REM(16, 4, 3, 4) REM(16, 4, 4, 4)
    REM(16, 4, 5, 4) DRIVER_TAIL
M512(8, 1) M512(8, 2) M512(8, 3)
DRIVER_HEAD("avx512f", 16, 8, 3, 8) REM(16, 8, 1, 8) REM(16, 8, 2, 8) DRIVER_TAIL
M512(16, 1)
DRIVER_HEAD("avx512f", 16, 16, 1, 16) DRIVER_TAIL

/* ---- AVX2 + FMA: 16 registers, 8 floats each */
#define M256(B, T, BS) MICRO("avx2,fma", __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, \
                             _mm256_fmadd_ps, _mm256_add_ps, epi_256, B, T, BS)
M256(1, 1, 1) M256(1, 2, 1) M256(1, 3, 1) M256(1, 4, 1) M256(1, 5, 1) M256(1, 6, 1) M256(1, 7, 1)
M256(1, 8, 1)
DRIVER_HEAD("avx2,fma", 8, 1, 8, 1) REM(8, 1, 1, 1) REM(8, 1, 2, 1) REM(8, 1, 3, 1) REM(8, 1, 4, 1)
    REM(8, 1, 5, 1) REM(8, 1, 6, 1) REM(8, 1, 7, 1) DRIVER_TAIL
M256(2, 1, 2) M256(2, 2, 2) M256(2, 3, 2) M256(2, 4, 2)
DRIVER_HEAD("avx2,fma", 8, 2, 4, 2) REM(8, 2, 1, 2) REM(8, 2, 2, 2) REM(8, 2, 3, 2) DRIVER_TAIL
/* B = 4 stops at 2 vectors: a 3-vector tile needs 12 accumulators + 3 inputs + 1 broadcast, all
   16 registers, and gcc spilled two accumulators to the stack, a store-reload chain in the
   non-zero loop (Zen 3, ResNet-18's 512 -> 512 at 4x4, blocks of 4, batch 1: see the README). */
M256(4, 1, 4) M256(4, 2, 4)
DRIVER_HEAD("avx2,fma", 8, 4, 2, 4) REM(8, 4, 1, 4) DRIVER_TAIL
M256(8, 1, 8)
DRIVER_HEAD("avx2,fma", 8, 8, 1, 8) DRIVER_TAIL
M256(8, 1, 16)
DRIVER_HEAD("avx2,fma", 8, 8, 1, 16) DRIVER_TAIL
#endif

static int shift_dispatch(int64_t isa, const int32_t *indptr, const int32_t *offs, const float *vals,
                          const float *bias, const float *x, float *out, int64_t B, int64_t run,
                          int64_t r0, int64_t r1, int64_t t0, int64_t t1, const struct swat_epi *e) {
#ifdef SWAT_X86
#define ARGS indptr, offs, vals, bias, x, out, run, r0, r1, t0, t1, e
    if (isa == 2) {
        switch (B) {
        case 1: drive_16_1_1(ARGS); return 0;
        case 2: drive_16_2_2(ARGS); return 0;
        case 4: drive_16_4_4(ARGS); return 0;
        case 8: drive_16_8_8(ARGS); return 0;
        case 16: drive_16_16_16(ARGS); return 0;
        default: return -1;
        }
    }
    if (isa == 1) {
        switch (B) {
        case 1: drive_8_1_1(ARGS); return 0;
        case 2: drive_8_2_2(ARGS); return 0;
        case 4: drive_8_4_4(ARGS); return 0;
        case 8: drive_8_8_8(ARGS); return 0;
        case 16: /* as two 8-row halves of each 16-block: half h's values start at vals + 8h */
            for (int h = 0; h < 2; h++)
                drive_8_8_16(indptr, offs, vals + 8 * h, bias + 8 * h, x, out + 8 * h * run, run, r0, r1,
                             t0, t1, e);
            return 0;
        default: return -1;
        }
    }
#undef ARGS
#endif
    if (isa != 0 || B < 1) return -1;
    float tmp[e ? (t1 - t0 > 0 ? t1 - t0 : 1) : 1];
    shift_generic(indptr, offs, vals, bias, x, out, B, run, r0, r1, t0, t1, e, tmp);
    return 0;
}

/* isa: 0 portable, 1 AVX2+FMA, 2 AVX-512F. Returns 0, or -1 for an unsupported (isa, B).
   t0, t1 must be multiples of 16 and x readable up to offs[k] + t1 for every k. */
EXPORT int swat_shift_f32(int64_t isa, const int32_t *indptr, const int32_t *offs,
                          const float *vals, const float *bias, const float *x, float *out,
                          int64_t B, int64_t run, int64_t r0, int64_t r1, int64_t t0,
                          int64_t t1) {
    return shift_dispatch(isa, indptr, offs, vals, bias, x, out, B, run, r0, r1, t0, t1, NULL);
}

/* The same, written straight into the NCHW output y (+ residual, ReLU): see struct swat_epi.
   y and res point at the first output channel of this image; grid positions t0..t1 with
   row pitch `pitch` (a multiple of 16, or w_out). */
EXPORT int swat_shift_f32_epi(int64_t isa, const int32_t *indptr, const int32_t *offs,
                              const float *vals, const float *bias, const float *x, float *y,
                              const float *res, int64_t B, int64_t pitch, int64_t w_out,
                              int64_t plane, int64_t relu, int64_t r0, int64_t r1, int64_t t0,
                              int64_t t1) {
    const struct swat_epi e = {pitch, w_out, plane, relu, y, res};
    return shift_dispatch(isa, indptr, offs, vals, bias, x, y, B, plane, r0, r1, t0, t1, &e);
}

/* Which ISAs this CPU runs: bit 0 AVX2+FMA, bit 1 AVX-512F. */
EXPORT int swat_cpu_isas(void) {
    int m = 0;
#ifdef SWAT_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) m |= 1;
    if (__builtin_cpu_supports("avx512f")) m |= 2;
#endif
    return m;
}

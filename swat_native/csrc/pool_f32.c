/* 2-D max pooling, float32 NCHW, on the extension's thread pool (the Session's MaxPool).

   Why here: torch's NCHW max_pool2d runs its window loop per output element, unvectorised
   (ResNet-50's stem pool, 64 x 112 x 112, 3x3 stride 2: 4.7 ms at batch 1 on 2 threads, AMD
   EPYC Zen 3), and the replacement built from strided torch.maximum views plus a -inf pad is
   eight torch ops (1.7-2.9 ms there). Here one pass per output row, every loop over contiguous
   floats (see maxpool_row).

   Padding is implicit: taps outside the input are skipped (as a -inf pad). NaN propagates as
   in torch (a window with a NaN gives NaN). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SWAT_X86 1
#endif

#define EXPORT __attribute__((visibility("default")))

void swat_pool_for(int threads, void (*fn)(const void *, int64_t), const void *ctx, int64_t items);
#ifdef SWAT_X86
int64_t swat_split2_avx2(const float *s, float *ev, float *od, int64_t n); /* train_conv_f32.c */
#endif

/* max(a, b), NaN if either is NaN, in a form gcc vectorises (compare + blend, no branches) */
static inline float nanmax(float a, float b) {
    const int nan = (a != a) | (b != b);
    return nan ? a + b : (b > a ? b : a);
}

#ifdef SWAT_X86
static __attribute__((target("avx2"))) void row_max_avx2(float *dst, const float *src, int64_t n) {
    for (int64_t i = 0; i + 8 <= n; i += 8) {
        const __m256 a = _mm256_loadu_ps(dst + i), b = _mm256_loadu_ps(src + i);
        const __m256 nan = _mm256_cmp_ps(a, b, _CMP_UNORD_Q);
        _mm256_storeu_ps(dst + i, _mm256_blendv_ps(_mm256_max_ps(a, b), _mm256_add_ps(a, b), nan));
    }
}

#endif

/* dst[i] = nanmax(dst[i], src[i]) for i < n; first: dst = src */
static void row_max(float *dst, const float *src, int64_t n, int first, int avx2) {
    if (first) {
        memcpy(dst, src, sizeof(float) * (size_t)n);
        return;
    }
    int64_t i = 0;
#ifdef SWAT_X86
    if (avx2) {
        row_max_avx2(dst, src, n);
        i = n / 8 * 8;
    }
#else
    (void)avx2;
#endif
    for (; i < n; i++) dst[i] = nanmax(dst[i], src[i]);
}

struct swat_maxpool {
    const float *x;
    float *y;
    int64_t planes, h, w, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow, per_item;
    int rc, avx2;
};

/* One output row: the kh input rows of its windows maxed elementwise into vrow (contiguous,
   vectorised), vrow split into its sw column phases (phase r holds columns k * sw + r), so
   that tap j of every output column reads one phase at a constant shift: out[ox] = max_j
   phase[(j * dw - pl) mod sw][ox + floor((j * dw - pl) / sw)], again contiguous. Columns whose
   window leaves the input (borders) are done one by one. scratch: w + sw * (w / sw + 1) floats. */
static void maxpool_row(const struct swat_maxpool *P, const float *x, float *yr, int64_t oy, float *scratch) {
    const int64_t w = P->w, sw = P->sw, ow = P->ow, pl = P->pl, dw = P->dw, kw = P->kw;
    const int64_t plen = w / sw + 1;
    float *vrow = scratch, *ph = scratch + w;
    const int64_t iy0 = oy * P->sh - P->pt;
    int rows = 0;
    for (int64_t i = 0; i < P->kh; i++) {
        const int64_t iy = iy0 + i * P->dh;
        if (iy < 0 || iy >= P->h) continue;
        row_max(vrow, x + iy * w, w, !rows++, P->avx2);
    }
    if (!rows) { /* a window of padding only: -inf, as over a -inf pad */
        for (int64_t ox = 0; ox < ow; ox++) yr[ox] = -INFINITY;
        return;
    }
    if (sw == 2) {
        int64_t k0 = 0;
#ifdef SWAT_X86
        if (P->avx2) k0 = swat_split2_avx2(vrow, ph, ph + plen, w / 2);
#endif
        for (int64_t k = k0; k < w / 2; k++) {
            ph[k] = vrow[2 * k];
            ph[plen + k] = vrow[2 * k + 1];
        }
        if (w & 1) ph[w / 2] = vrow[w - 1];
    } else {
        for (int64_t ix = 0; ix < w; ix++) ph[(ix % sw) * plen + ix / sw] = vrow[ix];
    }
    /* interior: ox with every tap inside [0, w) */
    const int64_t lo_num = pl, hi_num = w - 1 + pl - (kw - 1) * dw; /* ox * sw >= pl, ox * sw <= hi_num */
    int64_t lo = (lo_num + sw - 1) / sw, hi = hi_num >= 0 ? hi_num / sw + 1 : 0;
    if (hi > ow) hi = ow;
    if (lo > hi) lo = hi;
    for (int64_t ox = 0; ox < ow; ox++) {
        if (ox == lo && lo < hi) { /* vectorised interior, tap by tap */
            for (int64_t j = 0; j < kw; j++) {
                const int64_t t = j * dw - pl;
                const int64_t r = ((t % sw) + sw) % sw, q = (t - r) / sw;
                row_max(yr + lo, ph + r * plen + q + lo, hi - lo, j == 0, P->avx2);
            }
            ox = hi - 1;
            continue;
        }
        const int64_t ix0 = ox * sw - pl;
        float m = -INFINITY;
        for (int64_t j = 0; j < kw; j++) {
            const int64_t ix = ix0 + j * dw;
            if (ix >= 0 && ix < w) m = nanmax(m, vrow[ix]);
        }
        yr[ox] = m;
    }
}

static void maxpool_planes(const struct swat_maxpool *P, int64_t c0, int64_t c1, float *scratch) {
    for (int64_t c = c0; c < c1; c++)
        for (int64_t oy = 0; oy < P->oh; oy++)
            maxpool_row(P, P->x + c * P->h * P->w, P->y + (c * P->oh + oy) * P->ow, oy, scratch);
}

static void maxpool_item(const void *vp, int64_t item) {
    struct swat_maxpool *P = (struct swat_maxpool *)vp;
    const int64_t c0 = item * P->per_item, c1 = c0 + P->per_item < P->planes ? c0 + P->per_item : P->planes;
    float *rows = malloc(sizeof(float) * (size_t)(P->w + P->sw * (P->w / P->sw + 1)));
    if (!rows) {
        P->rc = -1;
        return;
    }
    maxpool_planes(P, c0, c1, rows);
    free(rows);
}

/* y (planes, oh, ow) = max pool of x (planes, h, w); returns 0, or -1 (bad sizes, no memory). */
EXPORT int swat_maxpool2d_f32(const float *x, float *y, int64_t planes, int64_t h, int64_t w, int64_t kh,
                              int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pl,
                              int64_t oh, int64_t ow, int64_t threads) {
    if (planes < 1 || h < 1 || w < 1 || kh < 1 || kw < 1 || sh < 1 || sw < 1 || dh < 1 || dw < 1 || oh < 1 ||
        ow < 1 || pt < 0 || pl < 0)
        return -1;
    if (threads < 1) threads = 1;
    const int64_t items = planes < 4 * threads ? planes : 4 * threads;
    struct swat_maxpool P = {x, y, planes, h, w, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow,
                             (planes + items - 1) / items, 0, 0};
#ifdef SWAT_X86
    P.avx2 = __builtin_cpu_supports("avx2");
#endif
    swat_pool_for((int)threads, maxpool_item, &P, (planes + P.per_item - 1) / P.per_item);
    return P.rc;
}

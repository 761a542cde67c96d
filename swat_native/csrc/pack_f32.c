/* Input layouts the shift kernel reads (see swat_deploy/kernels/csr_direct.py, csr_im2col.py).

   Why in C: these are pure data movement, and the numba loops (per-element bounds checks,
   a strided gather per float) took 175-220 us to pack a 64x32x32 image for a stride-2 conv,
   longer than the sparse multiply itself. Written as plain row copies, gcc vectorises them.

   Both work on items t = (chunk b, input channel c) in [t0, t1) so a caller can split them
   over threads. */
#include <stdint.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

/* Zero-padded, stride-phase-split layout: per chunk b, (C, sh, sw, hq, wq, nchunk) floats;
   phase (ri, rj), row u, column v holds x[img, c, u*sh + ri - pt, v*sw + rj - pl] (0 outside),
   with the nchunk images of the chunk innermost. Every float of the item is written. */
EXPORT void swat_pack_phases_f32(const float *x, float *packed, int64_t n, int64_t c_in, int64_t h,
                                 int64_t w, int64_t nchunk, int64_t sh, int64_t sw, int64_t pt,
                                 int64_t pl, int64_t hq, int64_t wq, int64_t chunk_in, int64_t t0,
                                 int64_t t1) {
    const int64_t phase_sz = hq * wq * nchunk, row_len = wq * nchunk;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t b = t / c_in, c = t - b * c_in;
        for (int64_t ri = 0; ri < sh; ri++)
            for (int64_t rj = 0; rj < sw; rj++) {
                /* phase columns v whose input column v*sw + rj - pl lies in [0, w) */
                int64_t v_lo = (pl - rj + sw - 1) / sw;
                if (pl - rj + sw - 1 < 0) v_lo = 0;
                if (v_lo > wq) v_lo = wq;
                int64_t v_hi = (w + pl - rj + sw - 1) / sw;
                if (v_hi > wq) v_hi = wq;
                if (v_hi < v_lo) v_hi = v_lo;
                const int64_t col0 = v_lo * sw + rj - pl;
                for (int64_t u = 0; u < hq; u++) {
                    float *drow = packed + b * chunk_in + ((c * sh + ri) * sw + rj) * phase_sz + u * row_len;
                    const int64_t hrow = u * sh + ri - pt;
                    if (hrow < 0 || hrow >= h) {
                        memset(drow, 0, sizeof(float) * row_len);
                        continue;
                    }
                    memset(drow, 0, sizeof(float) * v_lo * nchunk);
                    memset(drow + v_hi * nchunk, 0, sizeof(float) * (wq - v_hi) * nchunk);
                    if (nchunk == 1) {
                        const float *src = x + ((b * c_in + c) * h + hrow) * w + col0;
                        float *dst = drow + v_lo;
                        const int64_t m_n = v_hi - v_lo;
                        if (sw == 1)
                            memcpy(dst, src, sizeof(float) * m_n);
                        else
                            for (int64_t m = 0; m < m_n; m++) dst[m] = src[m * sw];
                    } else {
                        for (int64_t m = 0; m < v_hi - v_lo; m++) {
                            const int64_t col = col0 + m * sw;
                            float *dst = drow + (v_lo + m) * nchunk;
                            for (int64_t i = 0; i < nchunk; i++) {
                                const int64_t img = b * nchunk + i;
                                dst[i] = img < n ? x[((img * c_in + c) * h + hrow) * w + col] : 0.0f;
                            }
                        }
                    }
                }
            }
    }
}

/* im2col rows: per chunk b, row (c, i, j) of `run` floats holds, at (oh*w_out + ow)*nchunk + img,
   the input sample tap (i, j) of channel c meets for output (oh, ow) of that image; 0 outside
   the image and in the run's tail. */
EXPORT void swat_im2col_f32(const float *x, float *packed, int64_t n, int64_t c_in, int64_t h, int64_t w,
                            int64_t nchunk, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh,
                            int64_t dw, int64_t pt, int64_t pl, int64_t h_out, int64_t w_out,
                            int64_t run, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
        const int64_t b = t / c_in, c = t - b * c_in;
        for (int64_t i = 0; i < kh; i++)
            for (int64_t j = 0; j < kw; j++) {
                float *row = packed + (b * c_in * kh * kw + (c * kh + i) * kw + j) * run;
                memset(row, 0, sizeof(float) * run);
                for (int64_t oh = 0; oh < h_out; oh++) {
                    const int64_t hh = oh * sh + i * dh - pt;
                    if (hh < 0 || hh >= h) continue;
                    /* output columns whose input column ow*sw + j*dw - pl lies in [0, w) */
                    const int64_t off = j * dw - pl;
                    int64_t lo = off >= 0 ? 0 : (-off + sw - 1) / sw;
                    int64_t hi = (w - 1 - off) >= 0 ? (w - 1 - off) / sw + 1 : 0;
                    if (hi > w_out) hi = w_out;
                    for (int64_t img_i = 0; img_i < nchunk; img_i++) {
                        const int64_t img = b * nchunk + img_i;
                        if (img >= n) break;
                        const float *src = x + ((img * c_in + c) * h + hh) * w + off;
                        float *dst = row + oh * w_out * nchunk + img_i;
                        if (nchunk == 1 && sw == 1)
                            memcpy(dst + lo, src + lo, sizeof(float) * (hi > lo ? hi - lo : 0));
                        else
                            for (int64_t ow = lo; ow < hi; ow++) dst[ow * nchunk] = src[ow * sw];
                    }
                }
            }
    }
}

/* Aligned shifted copies, one image per chunk: per image b, kw copies of (C, sh, hq, P) floats;
   copy j, phase row ri, row u, column q holds x[b, c, u*sh + ri - pt, q*sw + j*dw - pl] (0 outside).
   P is a multiple of 16 and equals the output grid's row pitch, so the shift kernel's loads for
   tap (i, j) start at copy j, row (i*dh) of the phase - all on 64-byte boundaries: misaligned
   loads cross two cache lines and halved the multiply's speed. */
EXPORT void swat_pack_shifted_f32(const float *x, float *packed, int64_t c_in, int64_t h, int64_t w,
                                  int64_t kw, int64_t sh, int64_t sw, int64_t dw, int64_t pt,
                                  int64_t pl, int64_t hq, int64_t pitch, int64_t copy_size,
                                  int64_t chunk_in, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
        const int64_t b = t / c_in, c = t - b * c_in;
        for (int64_t j = 0; j < kw; j++) {
            const int64_t off = j * dw - pl; /* input column of q = 0 */
            int64_t lo = off >= 0 ? 0 : (-off + sw - 1) / sw;
            int64_t hi = (w - 1 - off) >= 0 ? (w - 1 - off) / sw + 1 : 0;
            if (lo > pitch) lo = pitch;
            if (hi > pitch) hi = pitch;
            if (hi < lo) hi = lo;
            for (int64_t ri = 0; ri < sh; ri++)
                for (int64_t u = 0; u < hq; u++) {
                    float *dst = packed + b * chunk_in + j * copy_size + ((c * sh + ri) * hq + u) * pitch;
                    const int64_t r = u * sh + ri - pt;
                    if (r < 0 || r >= h) {
                        for (int64_t q = 0; q < pitch; q++) dst[q] = 0.0f;
                        continue;
                    }
                    /* plain loops, not memset / memcpy: rows are a few vectors long and a
                       libc call per piece cost more than the copy (measured 3x slower) */
                    const float *src = x + ((b * c_in + c) * h + r) * w + off;
                    for (int64_t q = 0; q < lo; q++) dst[q] = 0.0f;
                    if (sw == 1)
                        for (int64_t q = lo; q < hi; q++) dst[q] = src[q];
                    else
                        for (int64_t q = lo; q < hi; q++) dst[q] = src[q * sw];
                    for (int64_t q = hi; q < pitch; q++) dst[q] = 0.0f;
                }
        }
    }
}

/* A whole sparse conv layer in one call: pack the input, run the shift kernel, write NCHW.

   Why: at batch 1 a ResNet layer's multiply takes 40-150 us, and driving it from Python as
   three numba calls (pack, multiply, unpack) added 20-30 us of dispatch and glue per layer
   and kept the pack and unpack passes serial-ish; numba's static prange split also left one
   of two threads idle for a third of the multiply. Here the three phases run back to back
   on a small thread pool of our own (workers take items from a shared counter, so uneven
   items balance), and Python makes one ctypes call with the GIL released.

   Layouts (the `layout` field), the same as swat_deploy/kernels/csr_direct.py builds:
     0  view:    1x1 stride-1 unpadded conv; the input itself is the packed operand.
     1  padded:  stride 1, one image per chunk; `packed` holds zero-padded planes (hq x wq) whose
                 border the caller zeroed once; each call copies only the interior.
     2  shifted: kw column-shifted copies with a row pitch of whole vectors (aligned loads),
                 written by swat_pack_shifted_f32.
   `epi` = 1: the multiply writes y itself (swat_shift_f32_epi, residual and ReLU in registers);
   else it writes grid rows into `scratch` and an unpack pass copies them out, adding the
   residual and applying ReLU. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#define EXPORT __attribute__((visibility("default")))

int swat_shift_f32(int64_t isa, const int32_t *indptr, const int32_t *offs, const float *vals,
                   const float *bias, const float *x, float *out, int64_t B, int64_t run, int64_t r0,
                   int64_t r1, int64_t t0, int64_t t1);
int swat_shift_f32_epi(int64_t isa, const int32_t *indptr, const int32_t *offs, const float *vals,
                       const float *bias, const float *x, float *y, const float *res, int64_t B,
                       int64_t pitch, int64_t w_out, int64_t plane, int64_t relu, int64_t r0, int64_t r1,
                       int64_t t0, int64_t t1);
void swat_pack_shifted_f32(const float *x, float *packed, int64_t c_in, int64_t h, int64_t w, int64_t kw,
                           int64_t sh, int64_t sw, int64_t dw, int64_t pt, int64_t pl, int64_t hq,
                           int64_t pitch, int64_t copy_size, int64_t chunk_in, int64_t t0, int64_t t1);

/* ------------------------------------------------------------------------------ thread pool */

#define POOL_MAX 64
/* How long an idle worker spins before it sleeps: longer than the gap between two layers
   (Python glue, 5-20 us) so the next layer finds it awake, short enough that it does not
   compete for long with torch's own threads when a torch op runs next. */
#define SPIN_NS 200000

typedef void (*item_fn)(const void *ctx, int64_t item);

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_ulong gen;      /* job generation; workers wait for it to change */
    atomic_long next;      /* next item to hand out */
    atomic_int active;     /* workers of the current job still running */
    atomic_int sleepers;   /* workers blocked on cv */
    item_fn fn;
    const void *ctx;
    int64_t items;
    int want;              /* workers (not counting the caller) that join the current job */
    int started;           /* workers running */
    pthread_mutex_t start_mu;
    pthread_mutex_t job_mu; /* one job at a time (several Python threads may call in) */
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, 0, 0, 0,
       PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void run_items(void) {
    for (;;) {
        const int64_t i = atomic_fetch_add(&P.next, 1);
        if (i >= P.items) return;
        P.fn(P.ctx, i);
    }
}

/* the generation current when each worker was created: a worker that starts running only
   after its first job was posted must still take that job */
static unsigned long start_gen[POOL_MAX];

/* Which per-thread buffer slot this thread uses in per-image mode: 0 for the calling thread,
   worker id + 1 for the pool's workers (one job at a time, so the caller's slot is free). */
static __thread int64_t tls_slot;

static void *worker(void *arg) {
    const int id = (int)(intptr_t)arg;
    tls_slot = id + 1;
    unsigned long seen = start_gen[id];
    for (;;) {
        unsigned long g = atomic_load(&P.gen);
        if (g == seen) {
            const int64_t until = now_ns() + SPIN_NS;
            int spins = 0;
            while ((g = atomic_load(&P.gen)) == seen) {
                CPU_RELAX();
                if (++spins == 64) {
                    spins = 0;
                    if (now_ns() > until) break;
                }
            }
        }
        if (g == seen) {
            pthread_mutex_lock(&P.mu);
            atomic_fetch_add(&P.sleepers, 1);
            while ((g = atomic_load(&P.gen)) == seen) pthread_cond_wait(&P.cv, &P.mu);
            atomic_fetch_sub(&P.sleepers, 1);
            pthread_mutex_unlock(&P.mu);
        }
        seen = g;
        if (id < P.want) {
            run_items();
            atomic_fetch_sub(&P.active, 1);
        }
    }
    return NULL;
}

static void after_fork_child(void) {
    /* the workers did not survive the fork; start afresh (locks re-initialised) */
    pthread_mutex_init(&P.mu, NULL);
    pthread_cond_init(&P.cv, NULL);
    pthread_mutex_init(&P.start_mu, NULL);
    pthread_mutex_init(&P.job_mu, NULL);
    P.started = 0;
    atomic_store(&P.sleepers, 0);
    atomic_store(&P.active, 0);
}

static int ensure_workers(int n) {
    if (n > POOL_MAX) n = POOL_MAX;
    if (P.started >= n) return n;
    pthread_mutex_lock(&P.start_mu);
    static int atfork_done = 0;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, after_fork_child);
        atfork_done = 1;
    }
    while (P.started < n) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        start_gen[P.started] = atomic_load(&P.gen);
        const int rc = pthread_create(&t, &attr, worker, (void *)(intptr_t)P.started);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        P.started++;
    }
    const int got = P.started;
    pthread_mutex_unlock(&P.start_mu);
    return got < n ? got : n;
}

/* fn(ctx, i) for i in [0, items) on `threads` threads (the caller is one of them); returns when
   all are done. */
static void pool_for(int threads, item_fn fn, const void *ctx, int64_t items);
/* The pool for the other compiled layers of the extension (train_conv_f32.c). */
void swat_pool_for(int threads, item_fn fn, const void *ctx, int64_t items) { pool_for(threads, fn, ctx, items); }

static void pool_for(int threads, item_fn fn, const void *ctx, int64_t items) {
    if (threads > items) threads = (int)items;
    if (threads <= 1) {
        for (int64_t i = 0; i < items; i++) fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&P.job_mu);
    const int helpers = ensure_workers(threads - 1);
    P.fn = fn;
    P.ctx = ctx;
    P.items = items;
    P.want = helpers;
    atomic_store(&P.next, 0);
    atomic_store(&P.active, helpers);
    atomic_fetch_add(&P.gen, 1);
    if (atomic_load(&P.sleepers) > 0) {
        pthread_mutex_lock(&P.mu);
        pthread_cond_broadcast(&P.cv);
        pthread_mutex_unlock(&P.mu);
    }
    run_items();
    while (atomic_load(&P.active) > 0) CPU_RELAX();
    pthread_mutex_unlock(&P.job_mu);
}

/* ------------------------------------------------------------------------------ the layer */

struct swat_conv {
    /* weights: block-row CSR, B rows per block, `rows` block rows */
    const int32_t *indptr, *offs;
    const float *vals, *bias;
    int64_t B, rows;
    /* geometry */
    int64_t layout, n, c_in, h, w, o, h_out, w_out;
    int64_t pt, pl, hq, wq;             /* padded plane (layout 1) / phase rows (layout 2) */
    int64_t kw, sh, sw, dw, copy_size;  /* layout 2 */
    int64_t chunk_in, run, pitch;       /* per image: packed floats, grid floats, grid row pitch */
    int64_t ntg, tg, nrg, epi, isa, threads;
    /* per_image = 1: each image is one item that packs into its thread's own slot of `packed`
       (slot_packed floats apart) and multiplies all rows (scratch slots rows * B * run apart) */
    int64_t per_image, slot_packed;
    /* per call */
    const float *x;
    float *y;
    const float *res;
    int64_t relu;
    float *packed, *scratch;
};

static void pack_item(const void *vc, int64_t t) {
    const struct swat_conv *c = vc;
    if (c->layout == 2) {
        swat_pack_shifted_f32(c->x, c->packed, c->c_in, c->h, c->w, c->kw, c->sh, c->sw, c->dw, c->pt,
                              c->pl, c->hq, c->wq, c->copy_size, c->chunk_in, t, t + 1);
        return;
    }
    const float *src = c->x + t * c->h * c->w;
    float *dst = c->packed + (t * c->hq + c->pt) * c->wq + c->pl;
    for (int64_t i = 0; i < c->h; i++, src += c->w, dst += c->wq)
        for (int64_t j = 0; j < c->w; j++) dst[j] = src[j];
}

/* first block row whose non-zeros start at or past share/parts of the total */
static int64_t row_at(const struct swat_conv *c, int64_t share, int64_t parts) {
    if (share <= 0) return 0;
    if (share >= parts) return c->rows;
    const int64_t want = (int64_t)c->indptr[c->rows] * share / parts;
    int64_t lo = 0, hi = c->rows;
    while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (c->indptr[mid] < want) lo = mid + 1; else hi = mid;
    }
    return lo;
}

static void unpack_channels(const struct swat_conv *c, int64_t b, int64_t ch0, int64_t ch1) {
    const int64_t plane = c->h_out * c->w_out;
    for (int64_t ch = ch0; ch < ch1; ch++) {
        const float *src = c->scratch + (b * c->rows * c->B + ch) * c->run;
        float *dst = c->y + (b * c->o + ch) * plane;
        const float *res = c->res ? c->res + (b * c->o + ch) * plane : 0;
        for (int64_t oh = 0; oh < c->h_out; oh++, src += c->pitch, dst += c->w_out) {
            if (res) {
                for (int64_t j = 0; j < c->w_out; j++) dst[j] = src[j] + res[j];
                res += c->w_out;
            } else {
                for (int64_t j = 0; j < c->w_out; j++) dst[j] = src[j];
            }
            if (c->relu)
                for (int64_t j = 0; j < c->w_out; j++) dst[j] = dst[j] <= 0.0f ? 0.0f : dst[j];
        }
    }
}

static void multiply_item(const void *vc, int64_t i) {
    const struct swat_conv *c = vc;
    const int64_t per_b = c->ntg * c->nrg, b = i / per_b, rest = i - b * per_b;
    const int64_t g = rest / c->nrg, q = rest - g * c->nrg;
    const int64_t r0 = row_at(c, q, c->nrg), r1 = row_at(c, q + 1, c->nrg);
    const int64_t t0 = g * c->tg, t1 = t0 + c->tg < c->run ? t0 + c->tg : c->run;
    const float *xb = (c->layout == 0 ? c->x : c->packed) + b * c->chunk_in;
    if (c->epi) {
        const int64_t img = b * c->o * c->h_out * c->w_out;
        swat_shift_f32_epi(c->isa, c->indptr, c->offs, c->vals, c->bias, xb, c->y + img,
                           c->res ? c->res + img : 0, c->B, c->pitch, c->w_out, c->h_out * c->w_out, c->relu,
                           r0, r1, t0, t1);
        return;
    }
    swat_shift_f32(c->isa, c->indptr, c->offs, c->vals, c->bias, xb, c->scratch + b * c->rows * c->B * c->run,
                   c->B, c->run, r0, r1, t0, t1);
    if (c->ntg == 1) unpack_channels(c, b, r0 * c->B, r1 * c->B); /* this item wrote whole rows */
}

static void unpack_item(const void *vc, int64_t t) {
    const struct swat_conv *c = vc;
    const int64_t chans = c->rows * c->B;
    unpack_channels(c, t / chans, t % chans, t % chans + 1);
}

/* One whole image on the calling thread: at batch > 1 the packed image stays in this core's
   L2 between pack and multiply (packing all images first wrote them out to memory and read
   them back), and threads never wait for one another inside a layer. */
static void image_item(const void *vc, int64_t b) {
    const struct swat_conv *c = vc;
    struct swat_conv one = *c;
    const int64_t plane = c->h_out * c->w_out;
    one.n = 1;
    one.x = c->x + b * c->c_in * c->h * c->w;
    one.y = c->y + b * c->o * plane;
    one.res = c->res ? c->res + b * c->o * plane : 0;
    one.packed = c->packed ? c->packed + tls_slot * c->slot_packed : 0;
    one.scratch = c->scratch ? c->scratch + tls_slot * c->rows * c->B * c->run : 0;
    one.ntg = 1;
    one.tg = c->run;
    one.nrg = 1;
    if (one.layout != 0)
        for (int64_t t = 0; t < one.c_in; t++) pack_item(&one, t);
    multiply_item(&one, 0); /* all rows and tiles; with ntg == 1 it also unpacks when !epi */
}

/* Returns 0, or -1 for arguments the loops do not take (unknown layout, isa or B). */
EXPORT int swat_conv_f32(const struct swat_conv *c) {
    if (c->layout < 0 || c->layout > 2 || c->isa < 0 || c->isa > 2) return -1;
    if (c->B != 1 && c->B != 2 && c->B != 4 && c->B != 8 && c->B != 16) return -1;
    if (c->layout == 0 && !c->epi) return -1;
    const int threads = c->threads < 1 ? 1 : (int)c->threads;
    if (c->per_image) {
        if (c->layout != 0 && c->slot_packed < c->chunk_in) return -1;
        pool_for(threads, image_item, c, c->n);
        return 0;
    }
    if (c->layout != 0) pool_for(threads, pack_item, c, c->n * c->c_in);
    pool_for(threads, multiply_item, c, c->n * c->ntg * c->nrg);
    if (!c->epi && c->ntg != 1) pool_for(threads, unpack_item, c, c->n * c->rows * c->B);
    return 0;
}

/* Workers the pool has started (tests check it grows only as asked). */
EXPORT int swat_pool_started(void) { return P.started; }

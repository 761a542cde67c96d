/* A whole sparse int8 conv layer (pack + multiply + requantise) in one call, and the residual
   QLinearAdd in one call, on a small thread pool of this file's own.

   Why: at batch 1 a ResNet-18 int8 layer's multiply takes 5-40 us, but driving it from Python
   as two numba prange calls (pack, multiply) cost 25-35 us of parallel-region start-up each
   (measured on the 2-core Xeon: an empty prange call is ~30 us there), so glue, not
   arithmetic, was 2/3 of a batch-1 run and onnxruntime's int8 won. Here the phases run back
   to back on spinning workers (items from a shared counter, so uneven items balance), and
   Python makes one ctypes call with the GIL released. The arithmetic is int8_conv.c's
   (swat_qpack_u8, swat_qconv_u8), so results are bit-identical to the two-call path.

   The pool is a copy of layer_f32.c's (that one is static there); both are idle at different
   times in practice (a QDQ graph runs the int8 layers, a float32 graph the float32 ones), and
   an idle worker spins SPIN_NS and then sleeps. */
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

int swat_qconv_u8_res(int64_t isa, const int32_t *indptr, const int32_t *offs, const int32_t *vals,
                      const int32_t *corr, const float *mult, int64_t zy, int64_t lo, int64_t hi,
                      const uint8_t *x, int64_t img_in, uint8_t *y, int64_t img_out, int64_t plane,
                      int64_t g0, int64_t g1, int64_t r0, int64_t r1, const uint8_t *res, float ra,
                      float rb, float rc, int64_t rlo);
int swat_qconv_u8(int64_t isa, const int32_t *indptr, const int32_t *offs, const int32_t *vals,
                  const int32_t *corr, const float *mult, int64_t zy, int64_t lo, int64_t hi,
                  const uint8_t *x, int64_t img_in, uint8_t *y, int64_t img_out, int64_t plane,
                  int64_t g0, int64_t g1, int64_t r0, int64_t r1);
void swat_qpack_u8(const uint8_t *x, uint8_t *out, int64_t C, int64_t H, int64_t W, int64_t kw,
                   int64_t s, int64_t nph, int64_t pt, int64_t pl, int64_t R, int64_t w_out,
                   int64_t zx, int64_t img_out, int64_t i0, int64_t i1);
uint8_t *swat_q_scratch(int slot, int64_t bytes); /* int8_conv.c; slot 1: a fused item's packed chunk */
void swat_qadd_u8(int64_t isa, const uint8_t *a, const uint8_t *b, uint8_t *y, float ra, float rb, float c,
                  int64_t lo, int64_t i0, int64_t i1);

/* ------------------------------------------------------------------------------ thread pool */
#define POOL_MAX 64
#define SPIN_NS 40000

typedef void (*item_fn)(const void *ctx, int64_t item);

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_ulong gen;
    atomic_long next;
    atomic_int active;
    atomic_int sleepers;
    item_fn fn;
    const void *ctx;
    int64_t items;
    int want;
    int started;
    pthread_mutex_t start_mu;
    pthread_mutex_t job_mu;
} Q = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, 0, 0, 0,
       PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER};

static int64_t q_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void q_run_items(void) {
    for (;;) {
        const int64_t i = atomic_fetch_add(&Q.next, 1);
        if (i >= Q.items) return;
        Q.fn(Q.ctx, i);
    }
}

static unsigned long q_start_gen[POOL_MAX];

static void *q_worker(void *arg) {
    const int id = (int)(intptr_t)arg;
    unsigned long seen = q_start_gen[id];
    for (;;) {
        unsigned long g = atomic_load(&Q.gen);
        if (g == seen) {
            const int64_t until = q_now_ns() + SPIN_NS;
            int spins = 0;
            while ((g = atomic_load(&Q.gen)) == seen) {
                CPU_RELAX();
                if (++spins == 64) {
                    spins = 0;
                    if (q_now_ns() > until) break;
                }
            }
        }
        if (g == seen) {
            pthread_mutex_lock(&Q.mu);
            atomic_fetch_add(&Q.sleepers, 1);
            while ((g = atomic_load(&Q.gen)) == seen) pthread_cond_wait(&Q.cv, &Q.mu);
            atomic_fetch_sub(&Q.sleepers, 1);
            pthread_mutex_unlock(&Q.mu);
        }
        seen = g;
        if (id < Q.want) {
            q_run_items();
            atomic_fetch_sub(&Q.active, 1);
        }
    }
    return NULL;
}

static void q_after_fork_child(void) {
    pthread_mutex_init(&Q.mu, NULL);
    pthread_cond_init(&Q.cv, NULL);
    pthread_mutex_init(&Q.start_mu, NULL);
    pthread_mutex_init(&Q.job_mu, NULL);
    Q.started = 0;
    atomic_store(&Q.sleepers, 0);
    atomic_store(&Q.active, 0);
}

static int q_ensure_workers(int n) {
    if (n > POOL_MAX) n = POOL_MAX;
    if (Q.started >= n) return n;
    pthread_mutex_lock(&Q.start_mu);
    static int atfork_done = 0;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, q_after_fork_child);
        atfork_done = 1;
    }
    while (Q.started < n) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        q_start_gen[Q.started] = atomic_load(&Q.gen);
        const int rc = pthread_create(&t, &attr, q_worker, (void *)(intptr_t)Q.started);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        Q.started++;
    }
    const int got = Q.started;
    pthread_mutex_unlock(&Q.start_mu);
    return got < n ? got : n;
}

/* fn(ctx, i) for i in [0, items) on `threads` threads (the caller is one of them). */
static void q_pool_for(int threads, item_fn fn, const void *ctx, int64_t items) {
    if (threads > items) threads = (int)items;
    if (threads <= 1) {
        for (int64_t i = 0; i < items; i++) fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&Q.job_mu);
    const int helpers = q_ensure_workers(threads - 1);
    Q.fn = fn;
    Q.ctx = ctx;
    Q.items = items;
    Q.want = helpers;
    atomic_store(&Q.next, 0);
    atomic_store(&Q.active, helpers);
    atomic_fetch_add(&Q.gen, 1);
    if (atomic_load(&Q.sleepers) > 0) {
        pthread_mutex_lock(&Q.mu);
        pthread_cond_broadcast(&Q.cv);
        pthread_mutex_unlock(&Q.mu);
    }
    q_run_items();
    while (atomic_load(&Q.active) > 0) CPU_RELAX();
    pthread_mutex_unlock(&Q.job_mu);
}

/* ------------------------------------------------------------------------------ the layer */

/* Field order and types are swat_native/int8.py's _QLayerArgs. */
struct swat_qlayer {
    const int32_t *indptr, *offs, *vals, *corr;
    const float *mult;
    int64_t rows, zy, lo, hi;
    /* geometry of one input shape (see swat_qpack_u8 / swat_qconv_u8) */
    int64_t n, c, h, w, kw, s, nph, pt, pl, R, w_out, zx, img_in, plane;
    /* work split: `pack_items` ranges of (image, channel group); conv items are groups of 8
       tiles, or (by_rows) `row_parts` ranges of rows holding equal shares of the blocks */
    int64_t pack_items, by_rows, row_parts, isa, threads;
    /* the fused residual add (swat_qconv_u8_res), used when res is not NULL */
    float ra, rb, rc;
    int64_t rlo;
    /* per call */
    const uint8_t *x;
    uint8_t *xp, *y;
    const uint8_t *res;
    /* > 0: images per fused item (pack those images into a per-thread scratch, then their
       whole conv; xp unused); 0: the two phases over the whole batch (see swat_qconv_layer) */
    int64_t chunk;
};

static void q_pack_item(const void *vc, int64_t i) {
    const struct swat_qlayer *c = vc;
    const int64_t all = c->n * ((c->c + 3) / 4);
    swat_qpack_u8(c->x, c->xp, c->c, c->h, c->w, c->kw, c->s, c->nph, c->pt, c->pl, c->R, c->w_out, c->zx,
                  c->img_in, all * i / c->pack_items, all * (i + 1) / c->pack_items);
}

/* first row whose start reaches share/parts of the blocks */
static int64_t q_row_at(const struct swat_qlayer *c, int64_t share, int64_t parts) {
    if (share <= 0) return 0;
    if (share >= parts) return c->rows;
    const int64_t want = (int64_t)c->indptr[c->rows] * share / parts;
    int64_t lo = 0, hi = c->rows;
    while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (c->indptr[mid] < want) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static void q_conv_item(const void *vc, int64_t i) {
    const struct swat_qlayer *c = vc;
    const int64_t ntiles = c->n * ((c->plane + 15) / 16);
    int64_t g0 = 0, g1 = ntiles, r0 = 0, r1 = c->rows;
    if (c->by_rows) {
        r0 = q_row_at(c, i, c->row_parts);
        r1 = q_row_at(c, i + 1, c->row_parts);
    } else {
        g0 = 8 * i;
        g1 = g0 + 8 < ntiles ? g0 + 8 : ntiles;
    }
    if (g0 < g1 && r0 < r1)
        swat_qconv_u8_res(c->isa, c->indptr, c->offs, c->vals, c->corr, c->mult, c->zy, c->lo, c->hi, c->xp,
                          c->img_in, c->y, c->rows * c->plane, c->plane, g0, g1, r0, r1, c->res, c->ra, c->rb,
                          c->rc, c->rlo);
}

/* Images [n0, n1) = item i * chunk ...: packed into this thread's scratch, then multiplied while
   the packed bytes are still in this core's L2. Why: at batch 64 the two-phase layer wrote the
   whole batch's packed input (3 column copies: 13 MB for a 64-channel 32x32 map) to memory and
   read it back, and two threads shared that bandwidth (measured 1.18x from the 2nd thread). */
static void q_fused_item(const void *vc, int64_t i) {
    const struct swat_qlayer *c = vc;
    const int64_t n0 = i * c->chunk, n1 = n0 + c->chunk < c->n ? n0 + c->chunk : c->n;
    if (n0 >= n1) return;
    const int64_t cg = (c->c + 3) / 4, tpi = (c->plane + 15) / 16, img_out = c->rows * c->plane;
    uint8_t *xp = swat_q_scratch(1, 4 * ((n1 - n0) * c->img_in + 32));
    if (xp == NULL) return;
    swat_qpack_u8(c->x + n0 * c->c * c->h * c->w, xp, c->c, c->h, c->w, c->kw, c->s, c->nph, c->pt, c->pl, c->R,
                  c->w_out, c->zx, c->img_in, 0, (n1 - n0) * cg);
    swat_qconv_u8_res(c->isa, c->indptr, c->offs, c->vals, c->corr, c->mult, c->zy, c->lo, c->hi, xp, c->img_in,
                      c->y + n0 * img_out, img_out, c->plane, 0, (n1 - n0) * tpi, 0, c->rows,
                      c->res ? c->res + n0 * img_out : NULL, c->ra, c->rb, c->rc, c->rlo);
}

/* Pack c->x into c->xp, then the conv into c->y (NCHW uint8); or, with c->chunk, both per chunk
   of images (q_fused_item). Returns 0, or -1 for an ISA this build lacks (checked before any
   work). */
EXPORT int swat_qconv_layer(const struct swat_qlayer *c) {
    if (swat_qconv_u8(c->isa, c->indptr, c->offs, c->vals, c->corr, c->mult, c->zy, c->lo, c->hi, c->xp,
                      c->img_in, c->y, c->rows * c->plane, c->plane, 0, 0, 0, 0) != 0)
        return -1;
    const int threads = (int)(c->threads < 1 ? 1 : c->threads);
    if (c->chunk > 0) {
        q_pool_for(threads, q_fused_item, c, (c->n + c->chunk - 1) / c->chunk);
        return 0;
    }
    q_pool_for(threads, q_pack_item, c, c->pack_items);
    const int64_t ntiles = c->n * ((c->plane + 15) / 16);
    q_pool_for(threads, q_conv_item, c, c->by_rows ? c->row_parts : (ntiles + 7) / 8);
    return 0;
}

struct qadd_job {
    const uint8_t *a, *b;
    uint8_t *y;
    float ra, rb, cc;
    int64_t isa, lo, n, parts;
};

static void q_add_item(const void *vc, int64_t i) {
    const struct qadd_job *j = vc;
    /* ranges on 64-byte boundaries, so two threads never write one cache line */
    const int64_t lines = (j->n + 63) / 64;
    int64_t i0 = 64 * (lines * i / j->parts), i1 = 64 * (lines * (i + 1) / j->parts);
    if (i1 > j->n) i1 = j->n;
    if (i0 < i1) swat_qadd_u8(j->isa, j->a, j->b, j->y, j->ra, j->rb, j->cc, j->lo, i0, i1);
}

/* swat_qadd_u8 over [0, n) on `threads` threads of the pool (one call from Python). */
EXPORT void swat_qadd_u8_mt(int64_t isa, const uint8_t *a, const uint8_t *b, uint8_t *y, float ra, float rb,
                            float c, int64_t lo, int64_t n, int64_t threads) {
    const int64_t parts = threads > 1 && n >= 4096 ? threads : 1;
    const struct qadd_job j = {a, b, y, ra, rb, c, isa, lo, n, parts};
    q_pool_for((int)parts, q_add_item, &j, parts);
}

EXPORT int swat_qpool_started(void) { return Q.started; }

/* Layers [0, n) one after another (each fully set up by the caller: pointers into its own
   buffers), stopping at the first refusal. Why: a ResNet backbone of fused QDQ convs is one
   chain, and at batch 1 the Python between two layer calls (~10 us a layer) was a fifth of the
   run; the chain is one ctypes call. */
EXPORT int swat_qchain(struct swat_qlayer *const *layers, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (swat_qconv_layer(layers[i]) != 0) return -1;
    return 0;
}

/*
 * qed-mq: several iothreads submit to one QED image at once
 *
 * QEMU 9.0's virtio-blk iothread-vq-mapping (and 10.0's virtio-scsi) runs
 * the requests of one BlockBackend in several iothreads at the same time:
 * the driver's coroutines then run in parallel on different CPUs.  This
 * program does that with nothing else in the way, on a real image file:
 * --threads workers, each an AioContext in a thread of its own, each
 * running one coroutine that issues --depth requests at a time straight
 * into the BlockBackend (blk_co_*), while the main thread runs the node's
 * own context (timers, bottom halves), as QEMU's main loop does.
 *
 * The image is cut into 4 KiB units dealt round-robin to the workers, so
 * that every cluster (of 64 KiB and of 4 KiB clusters) and every L2 table
 * is allocated, written and zeroed by several threads at once, but each
 * unit has one writer, which knows what it must read back.  A unit's bytes
 * name its owner, its index and its generation: a read of any unit (also
 * one of another worker's, in the long reads) must find zeros or a
 * pattern of that unit, never another unit's data (a write landed at the
 * wrong place, a cluster handed out twice, an entry aliasing another).
 * Whole clusters of a second region belong to one worker each, which
 * discards and zeroes them too.
 *
 * At the end the image is flushed, closed, opened again and every unit
 * read back against the owners' record.  The image must be created by the
 * caller (the iotest qed-mq uses qemu-img create); --opts adds runtime
 * options (e.g. file.aio=native,file.cache.direct=on,l2-cache-size=16k).
 *
 *   qed-mq IMAGE [--threads N] [--depth D] [--ops N] [--seed S]
 *          [--opts K=V,...] [--units N]
 *
 * Output: one line per failure, then a summary; exit status 1 on failure.
 *
 * --bench MODE times requests instead (nothing is verified, any format:
 * --format, default qed; the image is the caller's, any size): --ops
 * requests in all (the workers' shares differ by one at most), --depth at
 * a time in each of the --threads workers, each of --bs bytes (4 KiB) at a
 * random 4 KiB-aligned offset in [0, --span) (default: the whole image):
 *
 *   randwrite  writes (on a fresh image: mostly allocating)
 *   read       reads (of an image filled before: --fill, or the caller's)
 *   mixed      either, at random
 *   rewrite-vs-alloc, read-vs-alloc
 *              do reads and rewrites of allocated clusters queue behind
 *              allocations in other tables?  [0, --span) (default 256
 *              MiB) is filled first (1 MiB writes, flushed, untimed); then
 *              --ops rewrites (reads) of it run twice: alone, then with
 *              allocating 4 KiB writes beside them at random offsets in
 *              [--alloc-start, the image's end) (default: --span rounded
 *              up to 2 GiB, the next table of a QED image of 64 KiB
 *              clusters; a qcow2 table maps 512 MiB), until the rewrites
 *              are done.  Half the workers (the first, rounded up) rewrite,
 *              the others allocate; with one thread, half its slots.
 *
 * It prints one line per phase (one for randwrite, read, mixed):
 *
 *   qed-mq bench: MODE [phase=alone|busy] format=F threads=T depth=D bs=B
 *       span=S ops=N seconds=X iops=Y lat_us_mean=.. lat_us_p50=..
 *       lat_us_p99=.. lat_us_max=.. [alloc_start=.. alloc_ops=..
 *       alloc_iops=.. [alloc_capped=1] vs_alone=busy seconds/alone seconds]
 *
 * (seconds: from the first request to the completion of the last timed
 * one; the latencies are of the timed requests, in microseconds).
 *
 *   qed-mq IMAGE --bench MODE [--format F] [--bs SIZE] [--span SIZE]
 *          [--fill] [--alloc-start SIZE] [--threads N] [--depth D]
 *          [--ops N] [--seed S] [--opts K=V,...]
 *
 * This work is licensed under the terms of the GNU LGPL, version 2 or later.
 * See the COPYING.LIB file in the top-level directory.
 */

#include "qemu/osdep.h"
#include "qemu/main-loop.h"
#include "qemu/coroutine.h"
#include "qemu/rcu.h"
#include "qemu/thread.h"
#include "qemu/memalign.h"
#include "qemu/cutils.h"
#include "qemu/error-report.h"
#include "qapi/error.h"
#include "qobject/qdict.h"
#include "block/aio.h"
#include "block/aio-wait.h"
#include "block/block.h"
#include "system/block-backend.h"

#define UNIT 4096
#define CLUSTER_REGION_UNIT (64 * 1024)
#define MAX_THREADS 16
#define MAX_DEPTH 64
#define GEN_ZERO 0          /* the unit reads as zeros */

typedef struct Worker Worker;

typedef struct Slot {
    Worker *w;
    int index;
    uint8_t *buf;
    uint8_t *big;           /* for the long reads */
} Slot;

struct Worker {
    int id;
    QemuThread thread;
    AioContext *ctx;
    QemuSemaphore started;
    bool stopping;

    uint64_t rng;
    uint64_t ops_left;
    int running;            /* slots still issuing (this thread only) */
    uint32_t *gen;          /* per owned unit: its last acknowledged gen */
    bool *busy;             /* a request on this unit is in flight */
    uint32_t next_gen;
    uint64_t writes, reads, zeroes, discards, flushes, long_reads;
    char *failure;
    Slot slots[MAX_DEPTH];

    /* --bench (see there): this thread's requests and their latencies */
    uint64_t fg_left;       /* timed requests still to issue */
    uint64_t bg_left;       /* cap of the allocating requests */
    uint64_t fg_done, bg_done;
    uint32_t *lat_us;       /* one per timed request completed */
    uint64_t nlat;
};

static struct {
    BlockBackend *blk;
    const char *format;     /* the driver opened (--format; qed) */
    int nthreads;
    int depth;
    uint64_t nunits;        /* units of the shared region */
    uint64_t nclusters;     /* 64 KiB pieces of the whole-cluster region */
    uint64_t ops;
    uint64_t seed;
    int done;               /* workers finished (atomic) */
    Worker workers[MAX_THREADS];
} mq;

static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t rng_below(uint64_t *s, uint64_t n)
{
    return rng_next(s) % n;
}

/* ---- unit patterns ------------------------------------------------------ */

/* Units of the whole-cluster region come after the shared region's */
static uint64_t region2_unit(uint64_t cluster, int i)
{
    return mq.nunits + cluster * (CLUSTER_REGION_UNIT / UNIT) + i;
}

static int owner_of(uint64_t unit)
{
    if (unit < mq.nunits) {
        return unit % mq.nthreads;
    }
    return ((unit - mq.nunits) / (CLUSTER_REGION_UNIT / UNIT)) % mq.nthreads;
}

/* Index of @unit among its owner's units */
static uint64_t slot_of(uint64_t unit)
{
    if (unit < mq.nunits) {
        return unit / mq.nthreads;
    }
    return (mq.nunits + mq.nthreads - 1) / mq.nthreads +
           (unit - mq.nunits) / (CLUSTER_REGION_UNIT / UNIT) / mq.nthreads *
           (CLUSTER_REGION_UNIT / UNIT) +
           (unit - mq.nunits) % (CLUSTER_REGION_UNIT / UNIT);
}

static uint64_t owned_units(void)
{
    return (mq.nunits + mq.nthreads - 1) / mq.nthreads +
           (mq.nclusters + mq.nthreads - 1) / mq.nthreads *
           (CLUSTER_REGION_UNIT / UNIT);
}

static void fill_unit(uint8_t *p, uint64_t unit, uint32_t gen)
{
    uint64_t *w = (uint64_t *)p;
    uint64_t x = unit * 0xc2b2ae3d27d4eb4fULL ^ gen * 0x9e3779b97f4a7c15ULL ^
                 mq.seed;

    w[0] = cpu_to_le64(0x71ed0000000000ULL | owner_of(unit));
    w[1] = cpu_to_le64(unit);
    w[2] = cpu_to_le64(gen);
    for (int i = 3; i < UNIT / 8; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w[i] = x;
    }
}

static bool is_zero_unit(const uint8_t *p)
{
    return buffer_is_zero(p, UNIT);
}

/*
 * Check what @p holds for @unit: zeros, or the pattern of @unit at some
 * generation (*@gen_out; GEN_ZERO for zeros).  Returns an error message
 * (to be freed) or NULL.
 */
static char *check_unit(const uint8_t *p, uint64_t unit, uint32_t *gen_out)
{
    const uint64_t *w = (const uint64_t *)p;
    g_autofree uint8_t *want = NULL;
    uint32_t gen;

    if (is_zero_unit(p)) {
        *gen_out = GEN_ZERO;
        return NULL;
    }
    if (le64_to_cpu(w[0]) >> 16 != 0x71ed0000000000ULL >> 16 ||
        le64_to_cpu(w[1]) != unit) {
        return g_strdup_printf("unit %" PRIu64 " holds the data of unit %"
                               PRIu64 " (tag 0x%" PRIx64 ")", unit,
                               le64_to_cpu(w[1]), le64_to_cpu(w[0]));
    }
    gen = le64_to_cpu(w[2]);
    want = qemu_memalign(UNIT, UNIT);
    fill_unit(want, unit, gen);
    if (memcmp(want, p, UNIT)) {
        return g_strdup_printf("unit %" PRIu64 " generation %u is torn",
                               unit, gen);
    }
    *gen_out = gen;
    return NULL;
}

/* ---- the workers -------------------------------------------------------- */

static void worker_fail(Worker *w, char *msg)
{
    if (!w->failure) {
        w->failure = msg;
    } else {
        g_free(msg);
    }
    w->ops_left = 0;
}

/* A random unit of @w's, free of requests in flight; UINT64_MAX if none */
static uint64_t pick_unit(Worker *w, bool region2)
{
    for (int tries = 0; tries < 8; tries++) {
        uint64_t u;

        if (region2 && mq.nclusters > (uint64_t)w->id) {
            uint64_t c = w->id + mq.nthreads *
                rng_below(&w->rng, (mq.nclusters - w->id + mq.nthreads - 1) /
                                   mq.nthreads);
            u = region2_unit(c, 0);
        } else {
            u = w->id + mq.nthreads *
                rng_below(&w->rng, (mq.nunits - w->id + mq.nthreads - 1) /
                                   mq.nthreads);
        }
        if (!w->busy[slot_of(u)]) {
            return u;
        }
    }
    return UINT64_MAX;
}

static void coroutine_fn do_write(Slot *sl, uint64_t u)
{
    Worker *w = sl->w;
    uint32_t gen = ++w->next_gen;
    int ret;

    fill_unit(sl->buf, u, gen);
    ret = blk_co_pwrite(mq.blk, u * UNIT, UNIT, sl->buf, 0);
    if (ret < 0) {
        worker_fail(w, g_strdup_printf("write of unit %" PRIu64 ": %s", u,
                                       strerror(-ret)));
        return;
    }
    w->gen[slot_of(u)] = gen;
    w->writes++;
}

static void coroutine_fn do_read(Slot *sl, uint64_t u)
{
    Worker *w = sl->w;
    uint32_t gen;
    char *err;
    int ret;

    ret = blk_co_pread(mq.blk, u * UNIT, UNIT, sl->buf, 0);
    if (ret < 0) {
        worker_fail(w, g_strdup_printf("read of unit %" PRIu64 ": %s", u,
                                       strerror(-ret)));
        return;
    }
    err = check_unit(sl->buf, u, &gen);
    if (!err && gen != w->gen[slot_of(u)]) {
        err = g_strdup_printf("unit %" PRIu64 " reads generation %u, its "
                              "last write was %u", u, gen,
                              w->gen[slot_of(u)]);
    }
    if (err) {
        worker_fail(w, err);
        return;
    }
    w->reads++;
}

/* Zero (or discard) the whole cluster of region 2 that starts at unit @u */
static void coroutine_fn do_zero_cluster(Slot *sl, uint64_t u, bool discard)
{
    Worker *w = sl->w;
    int ret;

    if (discard) {
        ret = blk_co_pdiscard(mq.blk, u * UNIT, CLUSTER_REGION_UNIT, 0);
    } else {
        ret = blk_co_pwrite_zeroes(mq.blk, u * UNIT, CLUSTER_REGION_UNIT,
                                   rng_below(&w->rng, 2) ? BDRV_REQ_MAY_UNMAP
                                                         : 0);
    }
    if (ret < 0) {
        worker_fail(w, g_strdup_printf("%s of units %" PRIu64 "+16: %s",
                                       discard ? "discard" : "write_zeroes",
                                       u, strerror(-ret)));
        return;
    }
    if (discard) {
        /*
         * A discard may leave the data (a hint): read the units back to
         * learn which, so that later reads know what to expect
         */
        for (int i = 0; i < CLUSTER_REGION_UNIT / UNIT; i++) {
            uint32_t gen;
            char *err;

            ret = blk_co_pread(mq.blk, (u + i) * UNIT, UNIT, sl->buf, 0);
            if (ret < 0) {
                worker_fail(w, g_strdup_printf("read after discard: %s",
                                               strerror(-ret)));
                return;
            }
            err = check_unit(sl->buf, u + i, &gen);
            if (!err && gen != GEN_ZERO && gen != w->gen[slot_of(u + i)]) {
                err = g_strdup_printf("unit %" PRIu64 " reads generation %u "
                                      "after a discard, its last write was "
                                      "%u", u + i, gen,
                                      w->gen[slot_of(u + i)]);
            }
            if (err) {
                worker_fail(w, err);
                return;
            }
            w->gen[slot_of(u + i)] = gen;
        }
        w->discards++;
    } else {
        for (int i = 0; i < CLUSTER_REGION_UNIT / UNIT; i++) {
            w->gen[slot_of(u + i)] = GEN_ZERO;
        }
        w->zeroes++;
    }
}

/* Read 64 KiB to 1 MiB across every worker's units: no unit may alias */
static void coroutine_fn do_long_read(Slot *sl)
{
    Worker *w = sl->w;
    uint64_t n = MIN(16 << rng_below(&w->rng, 5), mq.nunits);
    uint64_t first = rng_below(&w->rng, mq.nunits - n + 1);
    int ret;

    ret = blk_co_pread(mq.blk, first * UNIT, n * UNIT, sl->big, 0);
    if (ret < 0) {
        worker_fail(w, g_strdup_printf("long read at unit %" PRIu64 ": %s",
                                       first, strerror(-ret)));
        return;
    }
    for (uint64_t i = 0; i < n; i++) {
        uint32_t gen;
        char *err = check_unit(sl->big + i * UNIT, first + i, &gen);

        if (err) {
            worker_fail(w, err);
            return;
        }
    }
    w->long_reads++;
}

static void coroutine_fn slot_entry(void *opaque)
{
    Slot *sl = opaque;
    Worker *w = sl->w;

    while (w->ops_left > 0) {
        uint64_t r = rng_below(&w->rng, 100), u;
        bool region2 = mq.nclusters && r >= 80;

        w->ops_left--;
        if (r < 5) {
            int ret = blk_co_flush(mq.blk);

            if (ret < 0) {
                worker_fail(w, g_strdup_printf("flush: %s", strerror(-ret)));
            }
            w->flushes++;
            continue;
        }
        if (r < 10) {
            do_long_read(sl);
            continue;
        }
        u = pick_unit(w, region2);
        if (u == UINT64_MAX) {
            continue;
        }
        if (region2 && r >= 95) {
            /* The whole cluster: no unit of it may be in flight */
            bool free = true;

            for (int i = 0; i < CLUSTER_REGION_UNIT / UNIT; i++) {
                free = free && !w->busy[slot_of(u + i)];
            }
            if (!free) {
                continue;
            }
            for (int i = 0; i < CLUSTER_REGION_UNIT / UNIT; i++) {
                w->busy[slot_of(u + i)] = true;
            }
            do_zero_cluster(sl, u, r >= 98);
            for (int i = 0; i < CLUSTER_REGION_UNIT / UNIT; i++) {
                w->busy[slot_of(u + i)] = false;
            }
            continue;
        }
        if (region2) {
            u += rng_below(&w->rng, CLUSTER_REGION_UNIT / UNIT);
            if (w->busy[slot_of(u)]) {
                continue;
            }
        }
        w->busy[slot_of(u)] = true;
        if (r < 60 || (region2 && r < 90)) {
            do_write(sl, u);
        } else {
            do_read(sl, u);
        }
        w->busy[slot_of(u)] = false;
    }
    if (--w->running == 0) {
        qatomic_inc(&mq.done);
        aio_wait_kick();
    }
}

static void *worker_thread(void *opaque)
{
    Worker *w = opaque;

    rcu_register_thread();
    w->ctx = aio_context_new(&error_abort);
    qemu_set_current_aio_context(w->ctx);
    qemu_sem_post(&w->started);
    while (!qatomic_read(&w->stopping)) {
        aio_poll(w->ctx, true);
    }
    /* Nothing of this context's is pending: every request completed */
    aio_context_unref(w->ctx);
    rcu_unregister_thread();
    return NULL;
}

static void stop_bh(void *opaque)
{
    Worker *w = opaque;

    qatomic_set(&w->stopping, true);
}

/* ---- open, verify ------------------------------------------------------- */

static BlockBackend *open_image(const char *path, const char *optstr)
{
    QDict *opts = qdict_new();
    g_auto(GStrv) pairs = NULL;
    Error *err = NULL;
    BlockBackend *blk;

    qdict_put_str(opts, "driver", mq.format);
    qdict_put_str(opts, "file.filename", path);
    if (optstr && *optstr) {
        pairs = g_strsplit(optstr, ",", -1);
        for (int i = 0; pairs[i]; i++) {
            char *eq = strchr(pairs[i], '=');

            if (!eq) {
                error_report("--opts: '%s' is not KEY=VALUE", pairs[i]);
                exit(2);
            }
            *eq = '\0';
            qdict_put_str(opts, pairs[i], eq + 1);
        }
    }
    blk = blk_new_open(NULL, NULL, opts, BDRV_O_RDWR, &err);
    if (!blk) {
        error_reportf_err(err, "cannot open %s: ", path);
        exit(1);
    }
    return blk;
}

/* Every unit against its owner's record, one read per MiB */
static int verify_all(void)
{
    const uint64_t per = 256;
    uint64_t total = mq.nunits + mq.nclusters * (CLUSTER_REGION_UNIT / UNIT);
    g_autofree uint8_t *buf = qemu_memalign(UNIT, per * UNIT);
    int bad = 0;

    for (uint64_t first = 0; first < total; first += per) {
        uint64_t n = MIN(per, total - first);
        int ret = blk_pread(mq.blk, first * UNIT, n * UNIT, buf, 0);

        if (ret < 0) {
            printf("FAIL verify: read at unit %" PRIu64 ": %s\n", first,
                   strerror(-ret));
            return 1;
        }
        for (uint64_t i = 0; i < n; i++) {
            uint64_t u = first + i;
            Worker *w = &mq.workers[owner_of(u)];
            uint32_t gen;
            char *err = check_unit(buf + i * UNIT, u, &gen);

            if (!err && gen != w->gen[slot_of(u)]) {
                err = g_strdup_printf("unit %" PRIu64 " reads generation %u "
                                      "after reopen, its last write was %u",
                                      u, gen, w->gen[slot_of(u)]);
            }
            if (err) {
                if (bad++ < 10) {
                    printf("FAIL verify: %s\n", err);
                }
                g_free(err);
            }
        }
    }
    return bad ? 1 : 0;
}

/* ---- --bench: timed requests, nothing verified ---------------------------- */

typedef enum {
    BENCH_NONE,
    BENCH_RANDWRITE,
    BENCH_READ,
    BENCH_MIXED,
    BENCH_REWRITE_VS_ALLOC,
    BENCH_READ_VS_ALLOC,
} BenchMode;

static const char *const bench_names[] = {
    [BENCH_RANDWRITE] = "randwrite",
    [BENCH_READ] = "read",
    [BENCH_MIXED] = "mixed",
    [BENCH_REWRITE_VS_ALLOC] = "rewrite-vs-alloc",
    [BENCH_READ_VS_ALLOC] = "read-vs-alloc",
};

#define BENCH_TABLE_GAP (2ULL << 30)    /* a QED L2 table of 64 KiB clusters */
#define BENCH_FILL_CHUNK (1 << 20)
#define BENCH_BG_CAP 16                 /* allocating requests per timed one */

static struct {
    BenchMode mode;
    uint64_t bs;            /* bytes per request (--bs) */
    uint64_t span;          /* the timed requests' offsets: [0, span) */
    uint64_t alloc_start;   /* the allocating ones': [alloc_start, length) */
    uint64_t length;        /* of the image */
    bool fill;
    int slots_left;         /* coroutines of the phase still running (atomic) */
    int fg_slots_left;      /* of them, those of the timed requests (atomic) */
    bool stop;              /* timed requests done: allocators stop (atomic) */
    int64_t fg_end;         /* ns, when the last timed request completed */
} bench = { .bs = UNIT };

typedef struct BenchResult {
    uint64_t ops, bg_ops;
    double seconds, bg_seconds;
    double lat_mean;
    uint32_t lat_p50, lat_p99, lat_max;
    bool bg_capped;
} BenchResult;

static bool bench_vs_alloc(void)
{
    return bench.mode == BENCH_REWRITE_VS_ALLOC ||
           bench.mode == BENCH_READ_VS_ALLOC;
}

static int64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/*
 * Whether slot @slot of worker @worker issues the timed requests: all of
 * them, but in the *-vs-alloc modes the first half of the workers (with
 * one thread: the first half of its slots); the others allocate.
 */
static bool bench_slot_is_fg(int worker, int slot)
{
    if (!bench_vs_alloc()) {
        return true;
    }
    if (mq.nthreads == 1) {
        return slot < (mq.depth + 1) / 2;
    }
    return worker < mq.nthreads - mq.nthreads / 2;
}

/* A random 4 KiB-aligned offset in [start, end) at which bs bytes fit */
static uint64_t bench_offset(Worker *w, uint64_t start, uint64_t end)
{
    return start + rng_below(&w->rng, (end - start - bench.bs) / UNIT + 1) *
                   UNIT;
}

static void coroutine_fn bench_slot_entry(void *opaque)
{
    Slot *sl = opaque;
    Worker *w = sl->w;
    bool fg = bench_slot_is_fg(w->id, sl->index);

    while (!w->failure) {
        uint64_t off;
        bool write;
        int64_t t;
        int ret;

        if (fg) {
            if (!w->fg_left) {
                break;
            }
            w->fg_left--;
            off = bench_offset(w, 0, bench.span);
            write = bench.mode == BENCH_RANDWRITE ||
                    bench.mode == BENCH_REWRITE_VS_ALLOC ||
                    (bench.mode == BENCH_MIXED && rng_below(&w->rng, 2));
        } else {
            if (!w->bg_left || qatomic_read(&bench.stop)) {
                break;
            }
            w->bg_left--;
            off = bench_offset(w, bench.alloc_start, bench.length);
            write = true;
        }
        t = now_ns();
        ret = write ? blk_co_pwrite(mq.blk, off, bench.bs, sl->buf, 0)
                    : blk_co_pread(mq.blk, off, bench.bs, sl->buf, 0);
        if (ret < 0) {
            worker_fail(w, g_strdup_printf("%s of %" PRIu64 " bytes at %"
                                           PRIu64 ": %s",
                                           write ? "write" : "read",
                                           bench.bs, off, strerror(-ret)));
            break;
        }
        if (fg) {
            uint64_t us = (now_ns() - t) / 1000;

            w->lat_us[w->nlat++] = MIN(us, UINT32_MAX);
            w->fg_done++;
        } else {
            w->bg_done++;
        }
    }
    if (fg && qatomic_fetch_dec(&bench.fg_slots_left) == 1) {
        qatomic_set(&bench.fg_end, now_ns());
        qatomic_set(&bench.stop, true);
    }
    if (qatomic_fetch_dec(&bench.slots_left) == 1) {
        aio_wait_kick();
    }
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

    return x < y ? -1 : x > y;
}

/*
 * One phase: @ops timed requests dealt to the workers that issue them,
 * with the allocating slots running beside them until they are done if
 * @with_bg.  The workers are idle before and after.
 */
static void bench_phase(uint64_t ops, bool with_bg, BenchResult *r)
{
    int fg_workers = 0, slots = 0, fg_slots = 0, k = 0;
    uint64_t nlat = 0;
    g_autofree uint32_t *lat = NULL;
    double sum = 0;
    int64_t t0, t_end;

    for (int i = 0; i < mq.nthreads; i++) {
        fg_workers += bench_slot_is_fg(i, 0);
    }
    for (int i = 0; i < mq.nthreads; i++) {
        Worker *w = &mq.workers[i];

        w->fg_left = 0;
        if (bench_slot_is_fg(i, 0)) {
            w->fg_left = ops / fg_workers + (k < (int)(ops % fg_workers));
            k++;
        }
        w->bg_left = with_bg ? BENCH_BG_CAP * ops : 0;
        w->fg_done = w->bg_done = 0;
        w->nlat = 0;
        g_free(w->lat_us);
        w->lat_us = g_new(uint32_t, w->fg_left + 1);
        for (int j = 0; j < mq.depth; j++) {
            bool fg = bench_slot_is_fg(i, j);

            slots += fg || with_bg;
            fg_slots += fg;
        }
    }
    qatomic_set(&bench.stop, false);
    qatomic_set(&bench.fg_slots_left, fg_slots);
    qatomic_set(&bench.slots_left, slots);

    t0 = now_ns();
    /* The allocators first, so that the timed requests start among them */
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < mq.nthreads; i++) {
            Worker *w = &mq.workers[i];

            for (int j = 0; j < mq.depth; j++) {
                bool fg = bench_slot_is_fg(i, j);

                if (fg == (pass == 1) && (fg || with_bg)) {
                    aio_co_enter(w->ctx, qemu_coroutine_create(
                                     bench_slot_entry, &w->slots[j]));
                }
            }
        }
    }
    AIO_WAIT_WHILE_UNLOCKED(NULL,
                            qatomic_load_acquire(&bench.slots_left) > 0);
    t_end = now_ns();

    memset(r, 0, sizeof(*r));
    for (int i = 0; i < mq.nthreads; i++) {
        r->ops += mq.workers[i].fg_done;
        r->bg_ops += mq.workers[i].bg_done;
        r->bg_capped |= with_bg && !mq.workers[i].bg_left &&
                        !bench_slot_is_fg(i, mq.depth - 1);
        nlat += mq.workers[i].nlat;
    }
    r->seconds = (qatomic_read(&bench.fg_end) - t0) / 1e9;
    r->bg_seconds = (t_end - t0) / 1e9;
    lat = g_new(uint32_t, nlat + 1);
    nlat = 0;
    for (int i = 0; i < mq.nthreads; i++) {
        Worker *w = &mq.workers[i];

        for (uint64_t j = 0; j < w->nlat; j++) {
            sum += w->lat_us[j];
            lat[nlat++] = w->lat_us[j];
        }
    }
    if (nlat) {
        qsort(lat, nlat, sizeof(uint32_t), cmp_u32);
        r->lat_mean = sum / nlat;
        r->lat_p50 = lat[nlat / 2];
        r->lat_p99 = lat[MIN(nlat - 1, nlat * 99 / 100)];
        r->lat_max = lat[nlat - 1];
    }
}

static void bench_print(const char *phase, const BenchResult *r,
                        const BenchResult *alone)
{
    printf("qed-mq bench: %s%s%s format=%s threads=%d depth=%d bs=%" PRIu64
           " span=%" PRIu64 " ops=%" PRIu64 " seconds=%.3f iops=%.0f"
           " lat_us_mean=%.0f lat_us_p50=%u lat_us_p99=%u lat_us_max=%u",
           bench_names[bench.mode], phase ? " phase=" : "", phase ? phase : "",
           mq.format, mq.nthreads, mq.depth, bench.bs, bench.span, r->ops,
           r->seconds, r->seconds > 0 ? r->ops / r->seconds : 0.0,
           r->lat_mean, r->lat_p50, r->lat_p99, r->lat_max);
    if (alone) {
        printf(" alloc_start=%" PRIu64 " alloc_ops=%" PRIu64
               " alloc_iops=%.0f%s vs_alone=%.2f",
               bench.alloc_start, r->bg_ops,
               r->bg_seconds > 0 ? r->bg_ops / r->bg_seconds : 0.0,
               r->bg_capped ? " alloc_capped=1" : "",
               alone->seconds > 0 ? r->seconds / alone->seconds : 0.0);
    }
    printf("\n");
}

/* Write [0, end) with 1 MiB requests, then flush: untimed */
static int bench_fill(uint64_t end)
{
    g_autofree uint8_t *buf = NULL;
    int ret;

    buf = qemu_memalign(UNIT, BENCH_FILL_CHUNK);
    memset(buf, 0xa5, BENCH_FILL_CHUNK);
    for (uint64_t off = 0; off < end; off += BENCH_FILL_CHUNK) {
        ret = blk_pwrite(mq.blk, off, MIN(BENCH_FILL_CHUNK, end - off), buf, 0);
        if (ret < 0) {
            printf("FAIL fill at %" PRIu64 ": %s\n", off, strerror(-ret));
            return ret;
        }
    }
    ret = blk_flush(mq.blk);
    if (ret < 0) {
        printf("FAIL flush after the fill: %s\n", strerror(-ret));
    }
    return ret;
}

static int bench_main(const char *path, const char *optstr)
{
    BenchResult alone, busy;
    int64_t len;
    int failed = 0;

    qemu_init_main_loop(&error_fatal);
    bdrv_init();
    mq.blk = open_image(path, optstr);
    len = blk_getlength(mq.blk);
    if (len < 0) {
        error_report("%s: cannot get its length: %s", path, strerror(-len));
        return 1;
    }
    bench.length = len;
    if (!bench.span) {
        bench.span = bench_vs_alloc() ? MIN(256ULL << 20, bench.length)
                                      : bench.length;
    }
    if (bench.span < bench.bs || bench.span > bench.length) {
        error_report("--span %" PRIu64 " must lie between --bs and the "
                     "image's length (%" PRIu64 ")", bench.span,
                     bench.length);
        return 2;
    }
    if (bench_vs_alloc()) {
        if (!bench.alloc_start) {
            bench.alloc_start = MAX(ROUND_UP(bench.span, BENCH_TABLE_GAP),
                                    BENCH_TABLE_GAP);
        }
        if (bench.alloc_start % UNIT || bench.alloc_start < bench.span ||
            bench.alloc_start + 16 * bench.bs > bench.length) {
            error_report("the allocations start at %" PRIu64 " (--alloc-start:"
                         " 4 KiB-aligned, past --span); the image (%" PRIu64
                         " bytes) must reach well past it", bench.alloc_start,
                         bench.length);
            return 2;
        }
    }
    if ((bench.fill || bench_vs_alloc()) && bench_fill(bench.span) < 0) {
        blk_unref(mq.blk);
        return 1;
    }

    for (int i = 0; i < mq.nthreads; i++) {
        Worker *w = &mq.workers[i];

        w->id = i;
        w->rng = mq.seed * 1000003 + i;
        qemu_sem_init(&w->started, 0);
        qemu_thread_create(&w->thread, "qed-mq", worker_thread, w,
                           QEMU_THREAD_JOINABLE);
        qemu_sem_wait(&w->started);
        for (int j = 0; j < mq.depth; j++) {
            Slot *sl = &w->slots[j];

            sl->w = w;
            sl->index = j;
            sl->buf = qemu_memalign(UNIT, bench.bs);
            memset(sl->buf, 0x5a ^ i ^ j, bench.bs);
        }
    }

    bench_phase(mq.ops, false, &alone);
    if (bench_vs_alloc()) {
        bench_print("alone", &alone, NULL);
        bench_phase(mq.ops, true, &busy);
        bench_print("busy", &busy, &alone);
    } else {
        bench_print(NULL, &alone, NULL);
    }

    for (int i = 0; i < mq.nthreads; i++) {
        Worker *w = &mq.workers[i];

        aio_bh_schedule_oneshot(w->ctx, stop_bh, w);
        qemu_thread_join(&w->thread);
        for (int j = 0; j < mq.depth; j++) {
            qemu_vfree(w->slots[j].buf);
        }
        if (w->failure) {
            printf("FAIL thread %d: %s\n", i, w->failure);
            failed = 1;
        }
        g_free(w->failure);
        g_free(w->lat_us);
    }
    if (blk_flush(mq.blk) < 0) {
        printf("FAIL flush at the end\n");
        failed = 1;
    }
    blk_unref(mq.blk);
    return failed;
}

static void usage(void)
{
    printf("usage: qed-mq IMAGE [--threads N] [--depth D] [--ops N] "
           "[--seed S] [--opts K=V,...] [--units N] [--clusters N]\n");
    printf("       qed-mq IMAGE --bench randwrite|read|mixed|rewrite-vs-alloc|"
           "read-vs-alloc [--format qed|qcow2|raw|...] [--bs SIZE] "
           "[--span SIZE] [--fill] [--alloc-start SIZE] [--threads N] "
           "[--depth D] [--ops N] [--seed S] [--opts K=V,...]\n");
}

/* A size option (4k, 1G, ...); exits on a bad one */
static uint64_t parse_size(const char *opt, const char *v)
{
    uint64_t n;

    if (qemu_strtosz(v, NULL, &n) < 0) {
        error_report("%s: '%s' is not a size", opt, v);
        exit(2);
    }
    return n;
}

int main(int argc, char **argv)
{
    const char *path = NULL, *optstr = NULL;
    uint64_t writes = 0, reads = 0, zeroes = 0, discards = 0, flushes = 0;
    uint64_t long_reads = 0;
    int64_t t0;
    int failed = 0;

    mq.nthreads = 4;
    mq.depth = 8;
    mq.ops = 20000;
    mq.seed = 1;
    mq.nunits = 16384;          /* 64 MiB shared */
    mq.nclusters = 256;         /* 16 MiB of whole clusters */
    mq.format = "qed";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

        if (!strcmp(a, "--threads") && v) {
            mq.nthreads = atoi(v);
            i++;
        } else if (!strcmp(a, "--depth") && v) {
            mq.depth = atoi(v);
            i++;
        } else if (!strcmp(a, "--ops") && v) {
            mq.ops = g_ascii_strtoull(v, NULL, 10);
            i++;
        } else if (!strcmp(a, "--seed") && v) {
            mq.seed = g_ascii_strtoull(v, NULL, 10);
            i++;
        } else if (!strcmp(a, "--units") && v) {
            mq.nunits = g_ascii_strtoull(v, NULL, 10);
            i++;
        } else if (!strcmp(a, "--clusters") && v) {
            mq.nclusters = g_ascii_strtoull(v, NULL, 10);
            i++;
        } else if (!strcmp(a, "--opts") && v) {
            optstr = v;
            i++;
        } else if (!strcmp(a, "--bench") && v) {
            for (int m = BENCH_RANDWRITE; m < (int)ARRAY_SIZE(bench_names); m++) {
                if (!strcmp(v, bench_names[m])) {
                    bench.mode = m;
                }
            }
            if (!bench.mode) {
                usage();
                return 2;
            }
            i++;
        } else if (!strcmp(a, "--format") && v) {
            mq.format = v;
            i++;
        } else if (!strcmp(a, "--bs") && v) {
            bench.bs = parse_size(a, v);
            i++;
        } else if (!strcmp(a, "--span") && v) {
            bench.span = parse_size(a, v);
            i++;
        } else if (!strcmp(a, "--alloc-start") && v) {
            bench.alloc_start = parse_size(a, v);
            i++;
        } else if (!strcmp(a, "--fill")) {
            bench.fill = true;
        } else if (a[0] != '-' && !path) {
            path = a;
        } else {
            usage();
            return 2;
        }
    }
    if (bench.mode) {
        if (!path || mq.nthreads < 1 || mq.nthreads > MAX_THREADS ||
            mq.depth < 1 || mq.depth > MAX_DEPTH || !mq.ops ||
            !bench.bs || bench.bs % 512 || bench.bs > (16 << 20) ||
            (bench_vs_alloc() && mq.nthreads == 1 && mq.depth < 2)) {
            usage();
            return 2;
        }
        return bench_main(path, optstr);
    }
    if (!path || mq.nthreads < 1 || mq.nthreads > MAX_THREADS ||
        mq.depth < 1 || mq.depth > MAX_DEPTH || mq.nunits < 256) {
        usage();
        return 2;
    }

    qemu_init_main_loop(&error_fatal);
    bdrv_init();
    mq.blk = open_image(path, optstr);
    if (blk_getlength(mq.blk) < (int64_t)((mq.nunits + mq.nclusters *
                                 (CLUSTER_REGION_UNIT / UNIT)) * UNIT)) {
        error_report("%s is smaller than %" PRIu64 " MiB", path,
                     (mq.nunits * UNIT + mq.nclusters * CLUSTER_REGION_UNIT)
                     >> 20);
        return 1;
    }

    /* Start the threads, then one coroutine per slot in each */
    for (int i = 0; i < mq.nthreads; i++) {
        Worker *w = &mq.workers[i];

        w->id = i;
        w->rng = mq.seed * 1000003 + i;
        w->ops_left = mq.ops;
        w->gen = g_new0(uint32_t, owned_units());
        w->busy = g_new0(bool, owned_units());
        w->next_gen = GEN_ZERO;
        qemu_sem_init(&w->started, 0);
        qemu_thread_create(&w->thread, "qed-mq", worker_thread, w,
                           QEMU_THREAD_JOINABLE);
        qemu_sem_wait(&w->started);
    }
    t0 = g_get_monotonic_time();
    for (int i = 0; i < mq.nthreads; i++) {
        Worker *w = &mq.workers[i];

        w->running = mq.depth;
        for (int j = 0; j < mq.depth; j++) {
            Slot *sl = &w->slots[j];

            sl->w = w;
            sl->index = j;
            sl->buf = qemu_memalign(UNIT, UNIT);
            sl->big = qemu_memalign(UNIT, 256 * UNIT);
            aio_co_enter(w->ctx, qemu_coroutine_create(slot_entry, sl));
        }
    }
    AIO_WAIT_WHILE_UNLOCKED(NULL, qatomic_read(&mq.done) < mq.nthreads);

    for (int i = 0; i < mq.nthreads; i++) {
        Worker *w = &mq.workers[i];

        aio_bh_schedule_oneshot(w->ctx, stop_bh, w);
        qemu_thread_join(&w->thread);
        for (int j = 0; j < mq.depth; j++) {
            qemu_vfree(w->slots[j].buf);
            qemu_vfree(w->slots[j].big);
        }
        if (w->failure) {
            printf("FAIL thread %d: %s\n", i, w->failure);
            failed = 1;
        }
        writes += w->writes;
        reads += w->reads;
        zeroes += w->zeroes;
        discards += w->discards;
        flushes += w->flushes;
        long_reads += w->long_reads;
    }
    printf("qed-mq: %d threads x depth %d: %" PRIu64 " writes, %" PRIu64
           " reads, %" PRIu64 " long reads, %" PRIu64 " zeroed clusters, %"
           PRIu64 " discards, %" PRIu64 " flushes in %.1f s\n", mq.nthreads,
           mq.depth, writes, reads, long_reads, zeroes, discards, flushes,
           (g_get_monotonic_time() - t0) / 1e6);

    /* Closed and opened again: everything reads back */
    if (blk_flush(mq.blk) < 0) {
        printf("FAIL flush at the end\n");
        failed = 1;
    }
    blk_unref(mq.blk);
    mq.blk = open_image(path, optstr);
    failed |= verify_all();
    blk_unref(mq.blk);
    for (int i = 0; i < mq.nthreads; i++) {
        g_free(mq.workers[i].gen);
        g_free(mq.workers[i].busy);
        g_free(mq.workers[i].failure);
    }
    printf("qed-mq: %s\n", failed ? "FAILED" : "every unit reads back");
    return failed;
}

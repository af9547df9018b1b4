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
};

static struct {
    BlockBackend *blk;
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
                               PRIu64 " (tag %#" PRIx64 ")", unit,
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

    qdict_put_str(opts, "driver", "qed");
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

static void usage(void)
{
    printf("usage: qed-mq IMAGE [--threads N] [--depth D] [--ops N] "
           "[--seed S] [--opts K=V,...] [--units N] [--clusters N]\n");
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
        } else if (a[0] != '-' && !path) {
            path = a;
        } else {
            usage();
            return 2;
        }
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

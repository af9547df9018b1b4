/*
 * qed-sim: deterministic interleaving and power-cut harness for our QED
 * driver
 *
 * One seed is one exact schedule.  The image file below QED is held in
 * memory by a protocol driver of our own ("qed-sim") whose requests do not
 * complete by themselves: each parks its coroutine in a pending list, and
 * the harness picks, with a seeded generator, which pending request
 * completes next, often letting many pile up first.  A request takes
 * effect on the file when it completes (a write, a truncate, a discard),
 * so a truncate may land after writes issued after it.  Nothing reads the
 * wall clock: the NEED_CHECK timer is held off and fired by the harness.
 *
 * The file keeps a durable image and the requests completed since, in
 * completion order; a flush, when it completes, makes durable what had
 * completed when it was issued.  A power cut builds the crash image from
 * the durable image and a random subset of the rest (writes torn at 512
 * bytes), drops the old BlockBackend onto a dead copy of the file, and
 * opens the crash image again through our driver.
 *
 * On top, a guest: a seeded mix of concurrent writes (new and existing L2
 * tables, allocated clusters, two into one cluster), write-zeroes,
 * discards, reads, flushes, online resizes, backing file name changes,
 * read-only reopens, drained sections and timer firings.  Every sector a
 * write fills names the write and the sector, so each read tells what it
 * sees; the model says per sector what a read may return, what a crash
 * may leave (the value at the last completed flush or anything written
 * since), and what a clean close must leave exactly.
 *
 * Two AioContexts (10.0's multiqueue: virtio-blk iothread-vq-mapping
 * submits one node's requests from several iothreads while the node's own
 * context, timers and BHs, is the main loop's).  One seed in four (those
 * of 3 mod 4: the others keep the schedules they had before) also runs a
 * second AioContext, ctx2, in a thread of its own, in lock-step with the
 * harness: the harness grants it one step at a time (a step runs ctx2's
 * aio_poll(false) until nothing is left to run) and waits until it is
 * done, so the two threads never run at once, and the seed decides when
 * ctx2 steps.  A seeded share of the guest's requests is submitted in
 * ctx2, half of them through blk_aio_*() from a BH (virtio-blk's way),
 * half as a coroutine that calls blk_co_*() (and every resize of ctx2's):
 * their coroutines run in ctx2, take the driver's s->lock there, park
 * their file requests, and are woken back into ctx2 (aio_co_wake()) when
 * the scheduler completes those, so the two contexts' steps interleave as
 * the seed says.  A request handed to ctx2 holds an in-flight count of the
 * BlockBackend until ctx2 starts it, as one in a device's queue: a drain
 * waits for it.  Inside blocking calls (drains, open, close, reopen,
 * graph changes) the main loop polls by itself; the harness's kick BH
 * then grants ctx2 steps too.  Before a read-only reopen, a power cut's
 * teardown and a clean close, both contexts run until idle.  Now and then
 * the node itself moves into ctx2 and back (blk_set_aio_context(), as a
 * dataplane iothread takes its disk): its timers, BHs and the driver's own
 * coroutines then run in ctx2, requests still come from both.
 *
 *   qed-sim --seed S [--ops N] [-v]     one seed (-v: the whole schedule)
 *   qed-sim --seeds A-B [--ops N]       a range of seeds, each in a child
 *   qed-sim --ops-total N [--start A]   seeds from A until N operations
 *
 * --ops: guest operations per seed; --timing: a last line with the rate;
 * --no-fork: one seed in this process (for valgrind and gdb); --contexts
 * 1|2: one or two AioContexts for every seed, whatever the seed says.  A
 * child's stderr (the driver's repair messages) is shown only when it
 * fails.
 *
 * Operations are guest operations issued plus file requests completed by
 * the scheduler.  Output: one "FAIL seed=S op=K: what" line per failing
 * seed with the command that replays it, then
 * "qed-sim: N seeds, M operations, F failures"; exit status 1 on failure.
 *
 * This work is licensed under the terms of the GNU LGPL, version 2 or later.
 * See the COPYING.LIB file in the top-level directory.
 */

#include "qemu/osdep.h"
#include <sys/wait.h>
#include "qemu/main-loop.h"
#include "qemu/coroutine.h"
#include "qemu/cutils.h"
#include "qemu/iov.h"
#include "qemu/timer.h"
#include "qemu/units.h"
#include "qemu/memalign.h"
#include "qemu/rcu.h"
#include "qemu/thread.h"
#include "qapi/error.h"
#include "qobject/qdict.h"
#include "block/aio.h"
#include "block/block.h"
#include "block/block_int.h"
#include "block/qed.h"
#include "system/block-backend.h"

#define SIM_PROG ".base/qemu/build/tests/qed-sim/qed-sim"
#define DEFAULT_OPS 1500

#define SECTOR 512
#define MEM_PAGE 4096
/* Sectors of model state per chunk; only touched chunks exist */
#define CHUNK_SECTORS 128
#define CHUNK_BYTES (CHUNK_SECTORS * SECTOR)
/* Largest guest write, in sectors */
#define MAX_IO_SECTORS 8192
/* Model values: 0 reads as zeros, 1 the backing file, others a write id */
#define VAL_ZERO 0
#define VAL_BACKING 1
#define VAL_NONE UINT32_MAX
#define PAT_MAGIC 0x4d49534445514fULL

/* ---- generator ----------------------------------------------------------- */

typedef struct Rng {
    uint64_t s;
} Rng;

static uint64_t rng_next(Rng *r)
{
    /* xorshift64* */
    r->s ^= r->s >> 12;
    r->s ^= r->s << 25;
    r->s ^= r->s >> 27;
    return r->s * 0x2545f4914f6cdd1dULL;
}

static uint64_t rng_below(Rng *r, uint64_t n)
{
    return n ? rng_next(r) % n : 0;
}

/* ---- the file's contents: sparse pages ----------------------------------- */

typedef struct Store {
    GHashTable *pages;      /* page index -> MEM_PAGE bytes */
    uint64_t length;
} Store;

static Store *store_new(void)
{
    Store *st = g_new0(Store, 1);

    st->pages = g_hash_table_new_full(g_int64_hash, g_int64_equal,
                                      g_free, g_free);
    return st;
}

static void store_free(Store *st)
{
    if (st) {
        g_hash_table_destroy(st->pages);
        g_free(st);
    }
}

static uint8_t *store_page(Store *st, uint64_t index, bool create)
{
    uint8_t *page = g_hash_table_lookup(st->pages, &index);

    if (!page && create) {
        uint64_t *key = g_new(uint64_t, 1);

        *key = index;
        page = g_malloc0(MEM_PAGE);
        g_hash_table_insert(st->pages, key, page);
    }
    return page;
}

static Store *store_clone(Store *src)
{
    Store *st = store_new();
    GHashTableIter it;
    gpointer key, value;

    g_hash_table_iter_init(&it, src->pages);
    while (g_hash_table_iter_next(&it, &key, &value)) {
        memcpy(store_page(st, *(uint64_t *)key, true), value, MEM_PAGE);
    }
    st->length = src->length;
    return st;
}

/* Zero [offset, offset + bytes): whole pages are dropped */
static void store_zero(Store *st, uint64_t offset, uint64_t bytes)
{
    while (bytes) {
        uint64_t index = offset / MEM_PAGE, in = offset % MEM_PAGE;
        uint64_t n = MIN(bytes, MEM_PAGE - in);
        uint8_t *page = store_page(st, index, false);

        if (page && n == MEM_PAGE) {
            g_hash_table_remove(st->pages, &index);
        } else if (page) {
            memset(page + in, 0, n);
        }
        offset += n;
        bytes -= n;
    }
}

static void store_write(Store *st, uint64_t offset, const uint8_t *buf,
                        uint64_t bytes)
{
    uint64_t done = 0;

    while (done < bytes) {
        uint64_t pos = offset + done;
        uint64_t in = pos % MEM_PAGE, n = MIN(bytes - done, MEM_PAGE - in);

        if (n == MEM_PAGE && buffer_is_zero(buf + done, n)) {
            /* Zeros take no memory (copy-on-write pads with them) */
            store_zero(st, pos, n);
        } else {
            memcpy(store_page(st, pos / MEM_PAGE, true) + in, buf + done, n);
        }
        done += n;
    }
    st->length = MAX(st->length, offset + bytes);
}

static void store_read(Store *st, uint64_t offset, uint8_t *buf,
                       uint64_t bytes)
{
    uint64_t done = 0;

    while (done < bytes) {
        uint64_t pos = offset + done;
        uint64_t in = pos % MEM_PAGE, n = MIN(bytes - done, MEM_PAGE - in);
        uint8_t *page = pos < st->length ?
                        store_page(st, pos / MEM_PAGE, false) : NULL;

        if (page) {
            memcpy(buf + done, page + in, n);
        } else {
            memset(buf + done, 0, n);
        }
        done += n;
    }
}

static void store_truncate(Store *st, uint64_t length)
{
    if (length < st->length) {
        store_zero(st, length, st->length - length);
    }
    st->length = length;
}

/* ---- the simulated file -------------------------------------------------- */

typedef enum FileKind {
    F_READ, F_WRITE, F_ZERO, F_DISCARD, F_FLUSH, F_TRUNCATE,
} FileKind;

static const char *const file_kind_name[] = {
    "read", "write", "zero", "discard", "flush", "truncate",
};

/* A request on its way (parked until the scheduler completes it) */
typedef struct FileReq {
    FileKind kind;
    uint64_t num;           /* issue number, for -v */
    uint64_t offset;
    uint64_t bytes;
    QEMUIOVector *qiov;
    uint64_t flush_mark;    /* flush: completions before its issue */
    bool slow;              /* completes after the others, mostly */
    bool ctx2;              /* issued by a coroutine in ctx2 */
    Coroutine *co;
} FileReq;

/* A completed request that may not be durable yet */
typedef struct Done {
    FileKind kind;
    uint64_t seq;           /* completion order */
    uint64_t offset;
    uint64_t bytes;
    uint8_t *data;          /* write */
} Done;

typedef struct SimFile {
    Store *live;            /* what reads see: durable + every Done */
    Store *durable;         /* what a power cut keeps for sure */
    GPtrArray *undurable;   /* Done *, in completion order */
    GPtrArray *pending;     /* FileReq *, parked */
    uint64_t completed;     /* Done records so far */
    bool scheduled;         /* requests wait for the scheduler */
    bool dead;              /* cut off: requests complete at once, unseen */
} SimFile;

static SimFile *simfile_new(Store *contents, bool scheduled)
{
    SimFile *f = g_new0(SimFile, 1);

    f->live = contents;
    f->durable = store_clone(contents);
    f->undurable = g_ptr_array_new();
    f->pending = g_ptr_array_new();
    f->scheduled = scheduled;
    return f;
}

static void done_free(Done *d)
{
    g_free(d->data);
    g_free(d);
}

static void simfile_free(SimFile *f)
{
    guint i;

    if (!f) {
        return;
    }
    assert(f->pending->len == 0);
    for (i = 0; i < f->undurable->len; i++) {
        done_free(g_ptr_array_index(f->undurable, i));
    }
    g_ptr_array_free(f->undurable, true);
    g_ptr_array_free(f->pending, true);
    store_free(f->live);
    store_free(f->durable);
    g_free(f);
}

static void apply_done(Store *st, const Done *d)
{
    switch (d->kind) {
    case F_WRITE:
        store_write(st, d->offset, d->data, d->bytes);
        break;
    case F_ZERO:
        store_zero(st, d->offset, d->bytes);
        st->length = MAX(st->length, d->offset + d->bytes);
        break;
    case F_DISCARD:
        if (d->offset < st->length) {
            store_zero(st, d->offset, MIN(d->bytes, st->length - d->offset));
        }
        break;
    case F_TRUNCATE:
        store_truncate(st, d->offset);
        break;
    default:
        abort();
    }
}

/* ---- the run's state ----------------------------------------------------- */

typedef enum GuestKind {
    G_READ, G_WRITE, G_ZERO, G_DISCARD, G_FLUSH, G_RESIZE, G_RENAME,
} GuestKind;

static const char *const guest_kind_name[] = {
    "read", "write", "write-zeroes", "discard", "flush", "resize",
    "backing name change",
};

typedef struct GuestOp {
    uint32_t id;
    GuestKind kind;
    uint32_t epoch;         /* power cuts before its issue */
    uint64_t sector;
    uint64_t nsectors;
    bool unmap;             /* write-zeroes with MAY_UNMAP */
    bool acked;
    bool lost;              /* in flight at a power cut */
    uint64_t issue_ack;     /* acks before its issue */
    uint64_t ack;           /* its ack number */
    uint64_t log_idx;       /* modifying ops: its place in the log */
    uint64_t new_size;      /* resize */
    char *name;             /* backing name change */
    uint64_t floor_mark;    /* flush: log length at its issue */
    uint32_t scan_from;     /* read: oldest modifying op in flight at issue */
    uint8_t *buf;
    QEMUIOVector qiov;
    uint32_t *snap;         /* read: cur, alt and wild at its issue */
    BlockBackend *blk;
    bool co_path;           /* ctx2: blk_co_*() from a coroutine */
} GuestOp;

/* Per sector: what a read may return and what a crash may leave */
typedef struct Sec {
    uint32_t cur;           /* value of the last acknowledged change */
    uint32_t alt;           /* or this one (a discard may leave data) */
    uint32_t floor;         /* value at the last completed flush */
    uint32_t floor_alt;
    uint16_t busy;          /* modifying ops in flight */
    uint8_t wild;           /* past a lost resize: any data of its own */
    uint8_t floor_wild;
} Sec;

typedef struct Geometry {
    uint32_t cluster_size;
    uint32_t table_size;
    uint64_t size;
    uint64_t backing_size;  /* 0: no backing file */
    bool small_cache;
} Geometry;

static struct {
    /* options */
    bool verbose;
    uint64_t ops_limit;
    bool ops_given;
    unsigned contexts_opt;      /* --contexts: 1 or 2; 0: the seed says */

    /* the run */
    uint64_t seed;
    Rng rng;
    AioContext *ctx;
    QEMUBH *kick_bh;
    int blocking;
    uint64_t idle_kicks;
    SimFile *image;
    SimFile *backing;
    Geometry geo;
    BlockBackend *blk;
    BlockDriverState *qed_bs;   /* while open: its timer is ours to drive */
    uint64_t file_issued;
    uint64_t completions;       /* file requests completed by the scheduler */
    uint64_t guest_issued;
    uint32_t epoch;

    /* guest workload */
    GPtrArray *ops;             /* GuestOp * by id */
    GPtrArray *inflight_mod;    /* modifying ops in flight */
    unsigned guest_inflight;
    unsigned max_inflight;
    unsigned p_complete;        /* percent: complete rather than issue */
    unsigned p_slow;            /* percent of file requests that lag */
    bool large_writes;          /* this seed writes mostly large */
    bool do_resize;             /* this seed resizes online */
    bool do_rename;             /* this seed changes the backing name */
    bool falloc;                /* the file takes allocating grows */
    unsigned burst;             /* issue this many before completing */
    unsigned cut_rate;          /* per 10000 ops */
    uint64_t ack_count;
    GArray *log;                /* uint32 ids of acked changes, in order */
    uint64_t floor_idx;         /* log entries up to here are flushed */
    uint64_t size;              /* guest size: last acked resize */
    uint64_t floor_size;
    bool resizing;
    bool drained;
    bool drained_all;
    bool read_only;
    unsigned ro_steps;
    uint64_t ro_perm, ro_shared;
    char *backing_name;         /* the name the header must hold */
    char *floor_name;           /* the name at the last completed flush */
    GArray *used_clusters;      /* uint64 cluster indexes written */
    GHashTable *chunks;         /* chunk index -> Sec[CHUNK_SECTORS] */

    /* the second AioContext (two_ctx): see the top of this file */
    bool two_ctx;
    Rng rng2;                   /* its draws (sim.rng's stay as they were) */
    unsigned p_ctx2;            /* percent of requests submitted in ctx2 */
    unsigned p_step2;           /* percent: ctx2 steps, when it has work */
    AioContext *ctx2;
    QemuThread thread2;
    QemuSemaphore go2, done2;   /* the baton: one step, then back */
    bool stop2;
    bool progress2;             /* the last step ran something */
    bool fed2;                  /* a request or completion for ctx2 since */
    bool node2;                 /* the node is in ctx2 */
    uint64_t steps2, ops2;
    uint64_t woken2;            /* steps that ran what the main loop woke */

    bool failed;
} sim;

/* Set in ctx2's thread: its lines of -v say so */
static __thread bool in_ctx2_thread;

static void vlog(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
static void vlog(const char *fmt, ...)
{
    va_list ap;

    if (!sim.verbose) {
        return;
    }
    printf("[%" PRIu64 "] %s", sim.guest_issued,
           in_ctx2_thread ? "ctx2: " : "");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
}

/* The first failure of a seed ends it: report it and how to replay it */
static G_NORETURN void sim_fail(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
static G_NORETURN void sim_fail(const char *fmt, ...)
{
    va_list ap;

    printf("FAIL seed=%" PRIu64 " op=%" PRIu64 ": ", sim.seed,
           sim.guest_issued);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n  replay: %s --seed %" PRIu64, SIM_PROG, sim.seed);
    if (sim.ops_given) {
        printf(" --ops %" PRIu64, sim.ops_limit);
    }
    if (sim.contexts_opt) {
        printf(" --contexts %u", sim.contexts_opt);
    }
    printf(" -v\n");
    fflush(stdout);
    /* The block layer may be mid-request: leave without tearing it down */
    _exit(1);
}

/* ---- the NEED_CHECK timer ------------------------------------------------ */

/*
 * The one place that looks into the driver's state: its NEED_CHECK timer
 * (QEMU_CLOCK_REALTIME, 5 s) must not fire by the wall clock, only when
 * the schedule says so.  @fire: run it at the next aio_poll; otherwise
 * push an armed timer an hour away (an expiry of 0 is a firing of ours).
 */
static void sim_need_check_timer(bool fire)
{
    BDRVQEDState *s;
    int64_t now, exp;

    if (!sim.qed_bs || !sim.qed_bs->opaque) {
        return;
    }
    s = sim.qed_bs->opaque;
    if (!s->need_check_timer || !timer_pending(s->need_check_timer)) {
        return;
    }
    if (fire) {
        vlog("fire the NEED_CHECK timer");
        timer_mod(s->need_check_timer, 0);
        return;
    }
    now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    exp = timer_expire_time_ns(s->need_check_timer);
    if (exp > 0 && exp < now + 1800 * NANOSECONDS_PER_SECOND) {
        timer_mod(s->need_check_timer, now + 3600 * NANOSECONDS_PER_SECOND);
    }
}

/* ---- the protocol driver ------------------------------------------------- */

static SimFile *sim_file(BlockDriverState *bs)
{
    return *(SimFile **)bs->opaque;
}

static int sim_file_open(BlockDriverState *bs, QDict *options, int flags,
                         Error **errp)
{
    const char *name = qdict_get_try_str(options, "filename");

    if (name) {
        strstart(name, "qed-sim:", &name);
    }
    if (name && g_str_has_prefix(name, "backing") && sim.backing) {
        *(SimFile **)bs->opaque = sim.backing;
    } else if (name && !strcmp(name, "image") && sim.image) {
        *(SimFile **)bs->opaque = sim.image;
    } else {
        error_setg(errp, "qed-sim: no file '%s'", name ?: "");
        return -ENOENT;
    }
    qdict_del(options, "filename");
    bs->supported_zero_flags = BDRV_REQ_MAY_UNMAP;
    return 0;
}

/* Give a request its effect on the file (at its completion) */
static int sim_apply(SimFile *f, FileReq *r)
{
    Done *d;
    guint i;

    switch (r->kind) {
    case F_READ: {
        g_autofree uint8_t *buf = g_malloc(r->bytes);

        store_read(f->live, r->offset, buf, r->bytes);
        qemu_iovec_from_buf(r->qiov, 0, buf, r->bytes);
        return 0;
    }
    case F_FLUSH:
        /* Durable: what had completed when the flush was issued */
        for (i = 0; i < f->undurable->len; i++) {
            d = g_ptr_array_index(f->undurable, i);
            if (d->seq >= r->flush_mark) {
                break;
            }
            apply_done(f->durable, d);
            done_free(d);
        }
        g_ptr_array_remove_range(f->undurable, 0, i);
        return 0;
    default:
        break;
    }

    d = g_new0(Done, 1);
    d->kind = r->kind;
    d->seq = f->completed++;
    d->offset = r->offset;
    d->bytes = r->bytes;
    if (r->kind == F_WRITE) {
        d->data = g_malloc(r->bytes);
        qemu_iovec_to_buf(r->qiov, 0, d->data, r->bytes);
    }
    apply_done(f->live, d);
    if (f->dead || !f->scheduled) {
        /* Nobody cuts the power of this one (backing, dead copy) */
        done_free(d);
    } else {
        g_ptr_array_add(f->undurable, d);
    }
    return 0;
}

static void sim_complete(SimFile *f, guint index)
{
    FileReq *r = g_ptr_array_remove_index_fast(f->pending, index);

    sim.completions++;
    vlog("  file done #%" PRIu64 " %s %" PRIu64 "+%" PRIu64 "%s", r->num,
         file_kind_name[r->kind], r->offset, r->bytes,
         r->ctx2 ? " (ctx2's)" : "");
    sim_apply(f, r);
    /* A coroutine of ctx2's runs when ctx2 steps next */
    sim.fed2 |= r->ctx2;
    aio_co_wake(r->co);
}

static int coroutine_fn sim_submit(BlockDriverState *bs, FileReq *r)
{
    SimFile *f = sim_file(bs);

    if (!f->scheduled || f->dead) {
        return sim_apply(f, r);
    }
    r->num = ++sim.file_issued;
    r->co = qemu_coroutine_self();
    r->ctx2 = in_ctx2_thread;
    r->slow = rng_below(&sim.rng, 100) < sim.p_slow;
    if (r->kind == F_FLUSH) {
        r->flush_mark = f->completed;
    }
    vlog("  file issue #%" PRIu64 " %s %" PRIu64 "+%" PRIu64 "%s", r->num,
         file_kind_name[r->kind], r->offset, r->bytes,
         r->slow ? " (slow)" : "");
    g_ptr_array_add(f->pending, r);
    qemu_coroutine_yield();
    return 0;
}

static int coroutine_fn sim_co_preadv(BlockDriverState *bs, int64_t offset,
                                      int64_t bytes, QEMUIOVector *qiov,
                                      BdrvRequestFlags flags)
{
    FileReq r = { .kind = F_READ, .offset = offset, .bytes = bytes,
                  .qiov = qiov };

    return sim_submit(bs, &r);
}

static int coroutine_fn sim_co_pwritev(BlockDriverState *bs, int64_t offset,
                                       int64_t bytes, QEMUIOVector *qiov,
                                       BdrvRequestFlags flags)
{
    FileReq r = { .kind = F_WRITE, .offset = offset, .bytes = bytes,
                  .qiov = qiov };

    return sim_submit(bs, &r);
}

static int coroutine_fn sim_co_pwrite_zeroes(BlockDriverState *bs,
                                             int64_t offset, int64_t bytes,
                                             BdrvRequestFlags flags)
{
    FileReq r = { .kind = F_ZERO, .offset = offset, .bytes = bytes };

    return sim_submit(bs, &r);
}

static int coroutine_fn sim_co_pdiscard(BlockDriverState *bs, int64_t offset,
                                        int64_t bytes)
{
    FileReq r = { .kind = F_DISCARD, .offset = offset, .bytes = bytes };

    return sim_submit(bs, &r);
}

static int coroutine_fn sim_co_truncate(BlockDriverState *bs, int64_t offset,
                                        bool exact, PreallocMode prealloc,
                                        BdrvRequestFlags flags, Error **errp)
{
    FileReq r = { .kind = F_TRUNCATE, .offset = offset };

    if (prealloc != PREALLOC_MODE_OFF &&
        !(prealloc == PREALLOC_MODE_FALLOC && sim.falloc)) {
        error_setg(errp, "preallocation is not supported");
        return -ENOTSUP;
    }
    return sim_submit(bs, &r);
}

static int coroutine_fn sim_co_flush(BlockDriverState *bs)
{
    FileReq r = { .kind = F_FLUSH };

    return sim_submit(bs, &r);
}

/* Synchronous: held pages are data, the rest reads as zeros */
static int coroutine_fn sim_co_block_status(BlockDriverState *bs,
                                            bool want_zero, int64_t offset,
                                            int64_t bytes, int64_t *pnum,
                                            int64_t *map,
                                            BlockDriverState **file)
{
    Store *st = sim_file(bs)->live;
    bool held = store_page(st, offset / MEM_PAGE, false);
    int64_t n = MEM_PAGE - offset % MEM_PAGE;

    while (n < bytes &&
           !!store_page(st, (offset + n) / MEM_PAGE, false) == held) {
        n += MEM_PAGE;
    }
    *pnum = MIN(n, bytes);
    *map = offset;
    *file = bs;
    return (held ? BDRV_BLOCK_DATA : BDRV_BLOCK_ZERO) |
           BDRV_BLOCK_OFFSET_VALID;
}

static int64_t coroutine_fn sim_co_getlength(BlockDriverState *bs)
{
    return sim_file(bs)->live->length;
}

/* Read-only and back: nothing to change in memory */
static int sim_reopen_prepare(BDRVReopenState *state, BlockReopenQueue *queue,
                              Error **errp)
{
    return 0;
}

/* The length changes under the block layer: ask every time (10.0: a limit) */
static void sim_refresh_limits(BlockDriverState *bs, Error **errp)
{
    bs->bl.has_variable_length = true;
}

static BlockDriver bdrv_qed_sim = {
    .format_name            = "qed-sim",
    .protocol_name          = "qed-sim",
    .instance_size          = sizeof(SimFile *),

    .bdrv_open              = sim_file_open,
    .bdrv_reopen_prepare    = sim_reopen_prepare,
    .bdrv_co_getlength      = sim_co_getlength,
    .bdrv_co_preadv         = sim_co_preadv,
    .bdrv_co_pwritev        = sim_co_pwritev,
    .bdrv_co_pwrite_zeroes  = sim_co_pwrite_zeroes,
    .bdrv_co_pdiscard       = sim_co_pdiscard,
    .bdrv_co_truncate       = sim_co_truncate,
    .bdrv_co_flush_to_disk  = sim_co_flush,
    .bdrv_co_block_status   = sim_co_block_status,
    .bdrv_refresh_limits    = sim_refresh_limits,
};

/* ---- the second AioContext ---------------------------------------------- */

/*
 * ctx2's thread runs only while the harness waits for it (the baton: go2,
 * then done2), so everything happens in the order the seed says, the
 * model needs no lock, and aio_poll(ctx2) runs in ctx2's home thread.
 */
static void *ctx2_thread(void *opaque)
{
    rcu_register_thread();
    in_ctx2_thread = true;
    qemu_set_current_aio_context(sim.ctx2);
    for (;;) {
        qemu_sem_wait(&sim.go2);
        if (sim.stop2) {
            break;
        }
        sim.progress2 = false;
        while (aio_poll(sim.ctx2, false)) {
            sim.progress2 = true;
        }
        qemu_sem_post(&sim.done2);
    }
    rcu_unregister_thread();
    return NULL;
}

static void ctx2_start(void)
{
    sim.ctx2 = aio_context_new(&error_abort);
    qemu_sem_init(&sim.go2, 0);
    qemu_sem_init(&sim.done2, 0);
    sim.stop2 = false;
    qemu_thread_create(&sim.thread2, "qed-sim-ctx2", ctx2_thread, NULL,
                       QEMU_THREAD_JOINABLE);
}

static void ctx2_stop(void)
{
    if (!sim.ctx2) {
        return;
    }
    sim.stop2 = true;
    qemu_sem_post(&sim.go2);
    qemu_thread_join(&sim.thread2);
    aio_context_unref(sim.ctx2);
    sim.ctx2 = NULL;
    qemu_sem_destroy(&sim.go2);
    qemu_sem_destroy(&sim.done2);
}

/*
 * Has ctx2 anything to run?  A BH (a coroutine woken or entered there is
 * one of its co_schedule_bh), or, while the node is there, its NEED_CHECK
 * timer fired by the harness (held off an hour otherwise, as in the main
 * loop).  Read while its thread waits for the baton.
 */
static bool ctx2_has_work(void)
{
    return sim.two_ctx &&
           (qatomic_read(&QSLIST_FIRST(&sim.ctx2->bh_list)) != NULL ||
            timerlistgroup_deadline_ns(&sim.ctx2->tlg) == 0);
}

/* One step of ctx2 (aio_poll until it runs nothing); the harness waits */
static bool ctx2_step(void)
{
    sim.steps2++;
    vlog("ctx2 step");
    qemu_sem_post(&sim.go2);
    if (qemu_sem_timedwait(&sim.done2, 600 * 1000) < 0) {
        sim_fail("a step of ctx2 does not return (10 minutes)");
    }
    /* Neither new requests nor completions: woken by the main loop's */
    sim.woken2 += sim.progress2 && !sim.fed2;
    sim.fed2 = false;
    return sim.progress2;
}

/* ---- scheduling ---------------------------------------------------------- */

/* Run everything that can run without a completion */
static void settle(void)
{
    while (aio_poll(sim.ctx, false)) {
        /* nothing */
    }
    sim_need_check_timer(false);
}

/*
 * Both contexts until neither has anything to run: every request handed
 * to ctx2 has started (in the block layer now, or queued by a drain), and
 * what it woke in either context has run.  Only with two contexts.
 */
static void settle_both(void)
{
    for (;;) {
        settle();
        if (!ctx2_has_work()) {
            break;
        }
        ctx2_step();
    }
}

/*
 * Complete a pending request chosen by the seed.  Slow requests wait
 * while others are pending (mostly): so some complete after many issued
 * after them, as a request stuck in a device queue would.
 */
static void complete_random(void)
{
    GPtrArray *p = sim.image->pending;
    guint i, fast = 0, k;

    for (i = 0; i < p->len; i++) {
        fast += !((FileReq *)g_ptr_array_index(p, i))->slow;
    }
    if (fast == 0 || fast == p->len || rng_below(&sim.rng, 32) == 0) {
        sim_complete(sim.image, rng_below(&sim.rng, p->len));
        return;
    }
    k = rng_below(&sim.rng, fast);
    for (i = 0; i < p->len; i++) {
        if (!((FileReq *)g_ptr_array_index(p, i))->slow && k-- == 0) {
            sim_complete(sim.image, i);
            return;
        }
    }
}

/*
 * Inside a blocking call (open, close, drain, reopen, check...) the block
 * layer polls by itself: this bottom half, scheduled again on every
 * round, completes the pending requests in a seeded order meanwhile.
 */
static void kick_bh(void *opaque)
{
    if (!sim.blocking) {
        return;
    }
    sim_need_check_timer(false);
    if (ctx2_has_work() && rng_below(&sim.rng2, 2)) {
        /* The main loop polls: ctx2 may run meanwhile, as an iothread */
        ctx2_step();
        sim.idle_kicks = 0;
    } else if (sim.image->pending->len && rng_below(&sim.rng, 4)) {
        complete_random();
        sim.idle_kicks = 0;
    } else if (++sim.idle_kicks > 10 * 1000 * 1000) {
        sim_fail("a blocking call makes no progress (no file request "
                 "pending)");
    }
    qemu_bh_schedule(sim.kick_bh);
}

static void blocking_begin(void)
{
    if (sim.blocking++ == 0) {
        sim.idle_kicks = 0;
        qemu_bh_schedule(sim.kick_bh);
    }
}

static void blocking_end(void)
{
    sim.blocking--;
}

#define BLOCKING(stmt) do { blocking_begin(); stmt; blocking_end(); } while (0)

/* ---- sector patterns ----------------------------------------------------- */

static void fill_sector(uint8_t *p, uint32_t id, uint64_t sector)
{
    uint64_t w[SECTOR / 8];
    uint64_t x = id * 0x9e3779b97f4a7c15ULL ^ sector * 0xc2b2ae3d27d4eb4fULL ^
                 sim.seed;
    int i;

    w[0] = PAT_MAGIC ^ (sim.seed << 8);
    w[1] = id;
    w[2] = sector;
    for (i = 3; i < SECTOR / 8; i++) {
        w[i] = x + i * 0x100000001b3ULL;
    }
    memcpy(p, w, SECTOR);
}

/*
 * What a sector read shows: 0 (zeros), 1 (backing), a write id; or -1 for
 * data that is no sector of ours (torn, or metadata), -2 for a sector of
 * ours from elsewhere (*@from says where from)
 */
static int64_t decode_sector(const uint8_t *p, uint64_t sector,
                             uint64_t *from)
{
    uint64_t w[3];
    uint8_t expect[SECTOR];

    if (buffer_is_zero(p, SECTOR)) {
        return VAL_ZERO;
    }
    memcpy(w, p, sizeof(w));
    if (w[0] != (PAT_MAGIC ^ (sim.seed << 8)) || w[1] >= VAL_NONE) {
        return -1;
    }
    fill_sector(expect, w[1], w[2]);
    if (memcmp(expect, p, SECTOR)) {
        return -1;
    }
    if (w[2] != sector) {
        *from = w[2];
        return -2;
    }
    return w[1];
}

/* ---- the model ----------------------------------------------------------- */

static uint32_t initial_value(uint64_t sector)
{
    return sector < sim.geo.backing_size / SECTOR ? VAL_BACKING : VAL_ZERO;
}

static Sec *sec_get(uint64_t sector, bool create)
{
    uint64_t c = sector / CHUNK_SECTORS;
    Sec *chunk = g_hash_table_lookup(sim.chunks, &c);

    if (!chunk) {
        uint64_t *key, i;

        if (!create) {
            return NULL;
        }
        chunk = g_new0(Sec, CHUNK_SECTORS);
        for (i = 0; i < CHUNK_SECTORS; i++) {
            chunk[i].cur = chunk[i].floor =
                initial_value(c * CHUNK_SECTORS + i);
            chunk[i].alt = chunk[i].floor_alt = VAL_NONE;
        }
        key = g_new(uint64_t, 1);
        *key = c;
        g_hash_table_insert(sim.chunks, key, chunk);
    }
    return &chunk[sector % CHUNK_SECTORS];
}

static GuestOp *op_get(uint64_t id)
{
    return id < sim.ops->len ? g_ptr_array_index(sim.ops, id) : NULL;
}

static bool op_covers(GuestOp *op, uint64_t sector)
{
    return sector >= op->sector && sector < op->sector + op->nsectors;
}

static bool is_change(GuestKind k)
{
    return k == G_WRITE || k == G_ZERO || k == G_DISCARD;
}

/* Bring the floor (what a flush kept) up to log entry @mark */
static void floor_advance(uint64_t mark)
{
    uint64_t i, s;

    for (i = sim.floor_idx; i < mark; i++) {
        GuestOp *op = op_get(g_array_index(sim.log, uint32_t, i));

        if (op->kind == G_RESIZE) {
            sim.floor_size = op->new_size;
            continue;
        }
        if (op->kind == G_RENAME) {
            g_free(sim.floor_name);
            sim.floor_name = g_strdup(op->name);
            continue;
        }
        for (s = op->sector; s < op->sector + op->nsectors; s++) {
            Sec *x = sec_get(s, true);

            if (op->kind == G_DISCARD) {
                if (x->floor != VAL_ZERO) {
                    x->floor_alt = VAL_ZERO;
                }
            } else {
                x->floor = op->kind == G_WRITE ? op->id : VAL_ZERO;
                x->floor_alt = VAL_NONE;
                x->floor_wild = 0;
            }
        }
    }
    sim.floor_idx = MAX(sim.floor_idx, mark);
}

/* May read @rd see @v at @sector through a change racing with it? */
static bool raced(GuestOp *rd, uint64_t sector, int64_t v)
{
    uint32_t i;

    for (i = rd->scan_from; i < sim.ops->len; i++) {
        GuestOp *o = op_get(i);

        if (!o || !is_change(o->kind) || o->epoch != rd->epoch ||
            !op_covers(o, sector)) {
            continue;
        }
        /* In flight at the read's issue, or issued during the read */
        if (o->id < rd->id && o->acked && o->ack <= rd->issue_ack) {
            continue;
        }
        if (o->kind == G_WRITE ? v == o->id : v == VAL_ZERO) {
            return true;
        }
    }
    return false;
}

static const char *value_str(int64_t v, char *buf, size_t len)
{
    if (v == VAL_ZERO) {
        return "zeros";
    } else if (v == VAL_BACKING) {
        return "backing data";
    } else if (v == VAL_NONE) {
        return "-";
    }
    snprintf(buf, len, "write #%" PRId64, v);
    return buf;
}

static void check_read(GuestOp *rd)
{
    uint64_t i;

    for (i = 0; i < rd->nsectors; i++) {
        uint64_t s = rd->sector + i, from = 0;
        int64_t v = decode_sector(rd->buf + i * SECTOR, s, &from);
        uint32_t cur = rd->snap[3 * i], alt = rd->snap[3 * i + 1];
        bool wild = rd->snap[3 * i + 2];
        char b1[32], b2[32], b3[32];

        if (v == -1) {
            sim_fail("read #%u: sector %" PRIu64 " holds no data of ours "
                     "(torn or metadata); expected %s", rd->id, s,
                     value_str(cur, b1, sizeof(b1)));
        }
        if (v == -2) {
            sim_fail("read #%u: sector %" PRIu64 " holds the data of sector %"
                     PRIu64 "; expected %s", rd->id, s, from,
                     value_str(cur, b1, sizeof(b1)));
        }
        if (v == cur || v == alt || (wild && v != VAL_BACKING) ||
            raced(rd, s, v)) {
            continue;
        }
        sim_fail("read #%u: sector %" PRIu64 " reads %s, expected %s "
                 "(or %s)", rd->id, s, value_str(v, b1, sizeof(b1)),
                 value_str(cur, b2, sizeof(b2)),
                 value_str(alt, b3, sizeof(b3)));
    }
}

/* ---- guest operations ---------------------------------------------------- */

static GuestOp *op_new(GuestKind kind, uint64_t sector, uint64_t nsectors)
{
    GuestOp *op = g_new0(GuestOp, 1);

    op->id = sim.ops->len;
    op->kind = kind;
    op->epoch = sim.epoch;
    op->sector = sector;
    op->nsectors = nsectors;
    op->issue_ack = sim.ack_count;
    op->blk = sim.blk;
    g_ptr_array_add(sim.ops, op);
    sim.guest_issued++;
    sim.guest_inflight++;
    if (is_change(kind)) {
        uint64_t s;

        for (s = sector; s < sector + nsectors; s++) {
            sec_get(s, true)->busy++;
        }
        g_ptr_array_add(sim.inflight_mod, op);
    }
    return op;
}

static void op_release_buffers(GuestOp *op)
{
    if (op->buf) {
        qemu_iovec_destroy(&op->qiov);
        qemu_vfree(op->buf);
        op->buf = NULL;
    }
    g_free(op->snap);
    op->snap = NULL;
}

static void op_free(GuestOp *op)
{
    op_release_buffers(op);
    g_free(op->name);
    g_free(op);
}

static void log_append(GuestOp *op)
{
    op->log_idx = sim.log->len;
    g_array_append_val(sim.log, op->id);
}

static void guest_done(GuestOp *op, int ret, const char *err)
{
    uint64_t s;

    if (op->epoch != sim.epoch) {
        /* In flight at a power cut: whatever it did is gone */
        op_release_buffers(op);
        return;
    }
    sim.guest_inflight--;
    op->acked = true;
    op->ack = ++sim.ack_count;
    vlog("op #%u %s done: %d", op->id, guest_kind_name[op->kind], ret);
    if (is_change(op->kind)) {
        g_ptr_array_remove_fast(sim.inflight_mod, op);
        for (s = op->sector; s < op->sector + op->nsectors; s++) {
            sec_get(s, true)->busy--;
        }
    }
    if (ret < 0) {
        sim_fail("%s #%u (sectors %" PRIu64 "+%" PRIu64 ") failed: %s%s%s",
                 guest_kind_name[op->kind], op->id, op->sector, op->nsectors,
                 strerror(-ret), err ? ": " : "", err ?: "");
    }

    switch (op->kind) {
    case G_READ:
        check_read(op);
        break;
    case G_WRITE:
    case G_ZERO:
    case G_DISCARD:
        for (s = op->sector; s < op->sector + op->nsectors; s++) {
            Sec *x = sec_get(s, true);

            if (op->kind == G_DISCARD) {
                if (x->cur != VAL_ZERO) {
                    x->alt = VAL_ZERO;
                }
            } else {
                x->cur = op->kind == G_WRITE ? op->id : VAL_ZERO;
                x->alt = VAL_NONE;
                x->wild = 0;
            }
        }
        log_append(op);
        break;
    case G_FLUSH:
        floor_advance(op->floor_mark);
        break;
    case G_RESIZE:
        sim.size = op->new_size;
        sim.resizing = false;
        log_append(op);
        break;
    case G_RENAME:
        g_free(sim.backing_name);
        sim.backing_name = g_strdup(op->name);
        log_append(op);
        break;
    }
    op_release_buffers(op);
}

static void guest_cb(void *opaque, int ret)
{
    guest_done(opaque, ret, NULL);
}

static void coroutine_fn resize_co(void *opaque)
{
    GuestOp *op = opaque;
    Error *err = NULL;
    int ret = blk_co_truncate(op->blk, op->new_size, false,
                              PREALLOC_MODE_OFF, 0, &err);

    guest_done(op, ret, err ? error_get_pretty(err) : NULL);
    error_free(err);
}

/* Submit @op from the current context, as a device does (blk_aio_*()) */
static void submit_aio(GuestOp *op)
{
    int64_t offset = op->sector * SECTOR, bytes = op->nsectors * SECTOR;

    switch (op->kind) {
    case G_READ:
        blk_aio_preadv(op->blk, offset, &op->qiov, 0, guest_cb, op);
        break;
    case G_WRITE:
        blk_aio_pwritev(op->blk, offset, &op->qiov, 0, guest_cb, op);
        break;
    case G_ZERO:
        blk_aio_pwrite_zeroes(op->blk, offset, bytes,
                              op->unmap ? BDRV_REQ_MAY_UNMAP : 0,
                              guest_cb, op);
        break;
    case G_DISCARD:
        blk_aio_pdiscard(op->blk, offset, bytes, guest_cb, op);
        break;
    case G_FLUSH:
        blk_aio_flush(op->blk, guest_cb, op);
        break;
    case G_RESIZE:
        aio_co_enter(sim.ctx, qemu_coroutine_create(resize_co, op));
        break;
    default:
        abort();
    }
}

/* ctx2: its device takes the request from its queue (virtio-blk's way) */
static void ctx2_bh(void *opaque)
{
    GuestOp *op = opaque;
    BlockBackend *blk = op->blk;

    vlog("op #%u starts (blk_aio_*)", op->id);
    submit_aio(op);
    /* blk_aio_*() took a count of their own: ours (of the queue) goes */
    blk_dec_in_flight(blk);
}

/* ctx2: a coroutine entered there calls blk_co_*() */
static void coroutine_fn ctx2_co(void *opaque)
{
    GuestOp *op = opaque;
    BlockBackend *blk = op->blk;
    int64_t offset = op->sector * SECTOR, bytes = op->nsectors * SECTOR;
    Error *err = NULL;
    int ret;

    vlog("op #%u starts (blk_co_*)", op->id);
    if (op->kind == G_RESIZE) {
        /* blk_co_truncate() takes no count of the BlockBackend: keep ours */
        ret = blk_co_truncate(blk, op->new_size, false, PREALLOC_MODE_OFF, 0,
                              &err);
        blk_dec_in_flight(blk);
        guest_done(op, ret, err ? error_get_pretty(err) : NULL);
        error_free(err);
        return;
    }
    /*
     * blk_co_*() take a count of their own right away (and give it back
     * while a drain holds them in its queue, which ours would not): ours
     * goes first, nothing runs in between
     */
    blk_dec_in_flight(blk);
    switch (op->kind) {
    case G_READ:
        ret = blk_co_preadv(blk, offset, bytes, &op->qiov, 0);
        break;
    case G_WRITE:
        ret = blk_co_pwritev(blk, offset, bytes, &op->qiov, 0);
        break;
    case G_ZERO:
        ret = blk_co_pwrite_zeroes(blk, offset, bytes,
                                   op->unmap ? BDRV_REQ_MAY_UNMAP : 0);
        break;
    case G_DISCARD:
        ret = blk_co_pdiscard(blk, offset, bytes, 0);
        break;
    case G_FLUSH:
        ret = blk_co_flush(blk);
        break;
    default:
        abort();
    }
    guest_done(op, ret, NULL);
}

/*
 * Submit @op: in the main loop's context, or (two contexts, a seeded
 * share) in ctx2, where it starts when ctx2 next steps.  Until then it
 * holds an in-flight count of the BlockBackend, as a request in a
 * device's queue: a drain waits for ctx2 to take it.
 */
static void guest_submit(GuestOp *op)
{
    if (!sim.two_ctx || rng_below(&sim.rng2, 100) >= sim.p_ctx2) {
        submit_aio(op);
        return;
    }
    op->co_path = op->kind == G_RESIZE || rng_below(&sim.rng2, 2);
    sim.ops2++;
    sim.fed2 = true;
    vlog("op #%u goes to ctx2 (%s)", op->id,
         op->co_path ? "blk_co_*" : "blk_aio_*");
    blk_inc_in_flight(op->blk);
    if (op->co_path) {
        aio_co_enter(sim.ctx2, qemu_coroutine_create(ctx2_co, op));
    } else {
        aio_bh_schedule_oneshot(sim.ctx2, ctx2_bh, op);
    }
}

static bool range_free(uint64_t sector, uint64_t n)
{
    uint64_t s;

    if (n == 0 || sector + n > sim.size / SECTOR) {
        return false;
    }
    for (s = sector; s < sector + n; s++) {
        Sec *x = sec_get(s, false);

        if (x && x->busy) {
            return false;
        }
    }
    return true;
}

static void issue_write(uint64_t sector, uint64_t n)
{
    GuestOp *op;
    uint64_t i;

    if (!range_free(sector, n)) {
        return;
    }
    op = op_new(G_WRITE, sector, n);
    op->buf = qemu_blockalign(blk_bs(sim.blk), n * SECTOR);
    for (i = 0; i < n; i++) {
        fill_sector(op->buf + i * SECTOR, op->id, sector + i);
    }
    qemu_iovec_init_buf(&op->qiov, op->buf, n * SECTOR);
    vlog("op #%u write sectors %" PRIu64 "+%" PRIu64, op->id, sector, n);
    g_array_append_val(sim.used_clusters,
                       (uint64_t){ sector * SECTOR / sim.geo.cluster_size });
    guest_submit(op);
}

static void issue_read(uint64_t sector, uint64_t n)
{
    GuestOp *op;
    uint64_t i;
    guint j;

    n = MIN(n, sim.size / SECTOR - MIN(sector, sim.size / SECTOR));
    if (!n) {
        return;
    }
    op = op_new(G_READ, sector, n);
    op->scan_from = op->id;
    for (j = 0; j < sim.inflight_mod->len; j++) {
        GuestOp *o = g_ptr_array_index(sim.inflight_mod, j);

        op->scan_from = MIN(op->scan_from, o->id);
    }
    op->snap = g_new(uint32_t, 3 * n);
    for (i = 0; i < n; i++) {
        Sec *x = sec_get(sector + i, false);

        op->snap[3 * i] = x ? x->cur : initial_value(sector + i);
        op->snap[3 * i + 1] = x ? x->alt : VAL_NONE;
        op->snap[3 * i + 2] = x ? x->wild : 0;
    }
    op->buf = qemu_blockalign(blk_bs(sim.blk), n * SECTOR);
    qemu_iovec_init_buf(&op->qiov, op->buf, n * SECTOR);
    vlog("op #%u read sectors %" PRIu64 "+%" PRIu64, op->id, sector, n);
    guest_submit(op);
}

static void issue_zero_or_discard(bool discard, uint64_t sector, uint64_t n)
{
    GuestOp *op;

    if (!range_free(sector, n)) {
        return;
    }
    op = op_new(discard ? G_DISCARD : G_ZERO, sector, n);
    if (discard) {
        vlog("op #%u discard sectors %" PRIu64 "+%" PRIu64, op->id, sector,
             n);
    } else {
        op->unmap = rng_below(&sim.rng, 2);
        vlog("op #%u write-zeroes%s sectors %" PRIu64 "+%" PRIu64, op->id,
             op->unmap ? " (may unmap)" : "", sector, n);
    }
    guest_submit(op);
}

static void issue_flush(void)
{
    GuestOp *op = op_new(G_FLUSH, 0, 0);

    op->floor_mark = sim.log->len;
    vlog("op #%u flush", op->id);
    guest_submit(op);
}

static void issue_resize(void)
{
    uint64_t max = qed_max_image_size(sim.geo.cluster_size,
                                      sim.geo.table_size);
    uint64_t grow = (1 + rng_below(&sim.rng, 64 * 1024)) * SECTOR;
    GuestOp *op;

    if (sim.resizing || sim.size + grow > max) {
        return;
    }
    op = op_new(G_RESIZE, 0, 0);
    op->new_size = sim.size + grow;
    sim.resizing = true;
    vlog("op #%u resize to %" PRIu64, op->id, op->new_size);
    guest_submit(op);
}

/* ---- where the guest writes ---------------------------------------------- */

static uint64_t clusters_per_table(void)
{
    return (uint64_t)sim.geo.table_size * sim.geo.cluster_size /
           sizeof(uint64_t);
}

static uint64_t pick_cluster(unsigned how)
{
    uint64_t nclusters = sim.size / sim.geo.cluster_size;
    uint64_t per_table = clusters_per_table();

    if (nclusters == 0) {
        return 0;
    }
    if (how == 1 && sim.used_clusters->len) {
        /* A cluster written before */
        return g_array_index(sim.used_clusters, uint64_t,
                             rng_below(&sim.rng, sim.used_clusters->len)) %
               nclusters;
    }
    if (how == 2 && sim.used_clusters->len) {
        /* Another cluster of a table written before */
        uint64_t c = g_array_index(sim.used_clusters, uint64_t,
                                   rng_below(&sim.rng,
                                             sim.used_clusters->len));

        return (c / per_table * per_table + rng_below(&sim.rng, per_table)) %
               nclusters;
    }
    /* Anywhere: mostly into a new table */
    return rng_below(&sim.rng, nclusters);
}

/* A range inside or across cluster @c */
static void pick_range(uint64_t c, uint64_t *sector, uint64_t *n)
{
    uint64_t spc = sim.geo.cluster_size / SECTOR;
    uint64_t len;

    switch (sim.large_writes && rng_below(&sim.rng, 2) ? 5 :
            rng_below(&sim.rng, 6)) {
    case 0:
    case 1:
        len = 1 + rng_below(&sim.rng, 8);
        break;
    case 5:
        /* Large: many of these in flight reserve more than a grow step */
        len = rng_below(&sim.rng, 3) ? 1 + rng_below(&sim.rng, 2 * spc) :
              1 + rng_below(&sim.rng, MAX_IO_SECTORS);
        break;
    case 2:
        len = spc;              /* one whole cluster */
        break;
    case 3:
        len = 1 + rng_below(&sim.rng, spc);
        break;
    default:
        len = 1 + rng_below(&sim.rng, 2 * spc);
        break;
    }
    len = MIN(len, MAX_IO_SECTORS);
    *sector = c * spc + (len >= spc ? 0 : rng_below(&sim.rng, spc - len + 1));
    if (rng_below(&sim.rng, 4) == 0) {
        *sector = c * spc + rng_below(&sim.rng, spc);
    }
    *n = MIN(len, sim.size / SECTOR - MIN(*sector, sim.size / SECTOR));
}

/* ---- open, close, check -------------------------------------------------- */

static BlockBackend *sim_open(void)
{
    QDict *opts = qdict_new();
    Error *err = NULL;
    BlockBackend *blk;

    qdict_put_str(opts, "driver", "qed");
    qdict_put_str(opts, "file.driver", "qed-sim");
    qdict_put_str(opts, "file.filename", "image");
    if (sim.geo.small_cache) {
        qdict_put_int(opts, "l2-cache-size", (uint64_t)sim.geo.cluster_size *
                      sim.geo.table_size);
        /*
         * Memory pressure: writeback passes in batches of 8 KiB of table
         * sectors, so that a pass spans many batches (and, over a backing
         * file, flushes between them when entries were set meanwhile)
         */
        qdict_put_int(opts, "x-writeback-batch", 8 * KiB);
    }
    vlog("open");
    BLOCKING(blk = blk_new_open(NULL, NULL, opts,
                                BDRV_O_RDWR | BDRV_O_RESIZE, &err));
    if (!blk) {
        sim_fail("open fails: %s", error_get_pretty(err));
    }
    sim.blk = blk;
    sim.qed_bs = blk_bs(blk);
    sim.node2 = false;
    return blk;
}

static void sim_close(void)
{
    vlog("close");
    sim.qed_bs = NULL;
    BLOCKING(blk_unref(sim.blk));
    sim.blk = NULL;
}

static void sim_check(bool fix_first, const char *when)
{
    BdrvCheckResult res = {0};
    int ret;

    if (fix_first) {
        BLOCKING(ret = bdrv_check(blk_bs(sim.blk), &res,
                                  BDRV_FIX_ERRORS | BDRV_FIX_LEAKS));
        if (ret < 0) {
            sim_fail("%s: check -r all fails: %s", when, strerror(-ret));
        }
        memset(&res, 0, sizeof(res));
    }
    /*
     * Leaks are allowed: every unreferenced cluster counts, hole or not
     * (discarded clusters, and those of writes that a power cut caught
     * before their entries landed), and the check cannot remove those that
     * clusters in use follow
     */
    BLOCKING(ret = bdrv_check(blk_bs(sim.blk), &res, 0));
    if (ret < 0 || res.corruptions || res.check_errors) {
        sim_fail("%s: check finds %d corruptions, %d leaks, %d errors "
                 "(ret %d)", when, res.corruptions, res.leaks,
                 res.check_errors, ret);
    }
}

/*
 * Read every sector the guest ever touched; @allowed says whether a value
 * is fine for a sector.  The model then takes what was read as the value.
 */
typedef bool AllowedFn(uint64_t sector, Sec *x, int64_t v);

static gint cmp_u64(gconstpointer a, gconstpointer b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

/* The touched chunks, in order */
static GArray *chunk_list(void)
{
    GArray *list = g_array_new(false, false, sizeof(uint64_t));
    GHashTableIter it;
    gpointer key;

    g_hash_table_iter_init(&it, sim.chunks);
    while (g_hash_table_iter_next(&it, &key, NULL)) {
        g_array_append_val(list, *(uint64_t *)key);
    }
    g_array_sort(list, cmp_u64);
    return list;
}

static void verify_all(AllowedFn *allowed, const char *when)
{
    uint64_t limit = sim.size / SECTOR;
    g_autoptr(GArray) list = chunk_list();
    g_autofree uint8_t *buf = g_malloc(16 * CHUNK_BYTES);
    guint k = 0;

    while (k < list->len) {
        uint64_t first = g_array_index(list, uint64_t, k), c = first, n, i;
        int ret;

        if (first * CHUNK_SECTORS >= limit) {
            break;
        }
        while (k < list->len && g_array_index(list, uint64_t, k) == c &&
               c - first < 16 && c * CHUNK_SECTORS < limit) {
            c++;
            k++;
        }
        n = MIN(c * CHUNK_SECTORS, limit) - first * CHUNK_SECTORS;
        BLOCKING(ret = blk_pread(sim.blk, first * CHUNK_BYTES, n * SECTOR,
                                 buf, 0));
        if (ret < 0) {
            sim_fail("%s: read of sectors %" PRIu64 "+%" PRIu64 " fails: %s",
                     when, first * CHUNK_SECTORS, n, strerror(-ret));
        }
        for (i = 0; i < n; i++) {
            uint64_t s = first * CHUNK_SECTORS + i, from = 0;
            int64_t v = decode_sector(buf + i * SECTOR, s, &from);
            Sec *x = sec_get(s, true);
            char b1[32], b2[32], b3[32];

            if (v == -1) {
                sim_fail("%s: sector %" PRIu64 " holds no data of ours (torn "
                         "or metadata); it was %s", when, s,
                         value_str(x->cur, b1, sizeof(b1)));
            }
            if (v == -2) {
                sim_fail("%s: sector %" PRIu64 " holds the data of sector %"
                         PRIu64, when, s, from);
            }
            if (!allowed(s, x, v)) {
                sim_fail("%s: sector %" PRIu64 " reads %s; flushed: %s, "
                         "last: %s", when, s, value_str(v, b1, sizeof(b1)),
                         value_str(x->floor, b2, sizeof(b2)),
                         value_str(x->cur, b3, sizeof(b3)));
            }
            x->cur = x->floor = v;
            x->alt = x->floor_alt = VAL_NONE;
            x->wild = x->floor_wild = 0;
        }
    }
}

static bool allowed_exact(uint64_t sector, Sec *x, int64_t v)
{
    return v == x->cur || v == x->alt || (x->wild && v != VAL_BACKING);
}

/* After a power cut: the flushed value, or anything written since */
static bool allowed_after_cut(uint64_t sector, Sec *x, int64_t v)
{
    uint64_t i;

    if (v == x->floor || v == x->floor_alt ||
        (x->floor_wild && v != VAL_BACKING)) {
        return true;
    }
    if (v >= 2) {
        GuestOp *o = op_get(v);

        return o && o->kind == G_WRITE && op_covers(o, sector) &&
               (o->lost || (o->acked && o->log_idx >= sim.floor_idx));
    }
    if (v != VAL_ZERO) {
        return false;
    }
    for (i = sim.floor_idx; i < sim.log->len; i++) {
        GuestOp *o = op_get(g_array_index(sim.log, uint32_t, i));

        if ((o->kind == G_ZERO || o->kind == G_DISCARD) &&
            op_covers(o, sector)) {
            return true;
        }
    }
    for (i = 0; i < sim.ops->len; i++) {
        GuestOp *o = op_get(i);

        if (o && o->lost && (o->kind == G_ZERO || o->kind == G_DISCARD) &&
            op_covers(o, sector)) {
            return true;
        }
    }
    return false;
}

/* The backing file name the header on the file names, or NULL */
static char *header_backing_name(void)
{
    uint8_t h[SECTOR];
    uint32_t name_off, name_len;
    char *name;

    store_read(sim.image->live, 0, h, SECTOR);
    if (!(ldq_le_p(h + 16) & QED_F_BACKING_FILE)) {
        return NULL;
    }
    name_off = ldl_le_p(h + 56);
    name_len = MIN(ldl_le_p(h + 60), 4096);
    name = g_malloc0(name_len + 1);
    store_read(sim.image->live, name_off, (uint8_t *)name, name_len);
    return name;
}

/* The header on the file, as the last close left it */
static void check_header(const char *when)
{
    uint8_t h[SECTOR];
    uint64_t features, size;
    uint32_t name_off, name_len;

    store_read(sim.image->live, 0, h, SECTOR);
    features = ldq_le_p(h + 16);
    size = ldq_le_p(h + 48);
    name_off = ldl_le_p(h + 56);
    name_len = ldl_le_p(h + 60);
    if (features & QED_F_NEED_CHECK) {
        sim_fail("%s: NEED_CHECK is set in the header", when);
    }
    if (size != sim.size) {
        sim_fail("%s: the header says %" PRIu64 " bytes, the last resize %"
                 PRIu64, when, size, sim.size);
    }
    if (sim.backing_name) {
        g_autofree char *name = NULL;

        if (!(features & QED_F_BACKING_FILE) || name_off + name_len > 4096) {
            sim_fail("%s: the header lost its backing file", when);
        }
        name = g_malloc0(name_len + 1);
        store_read(sim.image->live, name_off, (uint8_t *)name, name_len);
        if (strcmp(name, sim.backing_name)) {
            sim_fail("%s: the header names backing file '%s', not '%s'",
                     when, name, sim.backing_name);
        }
    }
}

/* Nothing in flight: flush, close, reopen; everything reads back exactly */
static void clean_cycle(const char *when)
{
    int ret;

    vlog("clean close and reopen (%s)", when);
    if (sim.two_ctx) {
        settle_both();
    }
    BLOCKING(ret = blk_flush(sim.blk));
    if (ret < 0) {
        sim_fail("%s: flush fails: %s", when, strerror(-ret));
    }
    sim_close();
    if (sim.image->pending->len || sim.image->undurable->len) {
        sim_fail("%s: a clean close left %u file requests unflushed", when,
                 sim.image->pending->len + sim.image->undurable->len);
    }
    check_header(when);
    sim_open();
    if (blk_getlength(sim.blk) != sim.size) {
        sim_fail("%s: size %" PRId64 " after reopening, not %" PRIu64, when,
                 blk_getlength(sim.blk), sim.size);
    }
    sim_check(false, when);
    floor_advance(sim.log->len);
    verify_all(allowed_exact, when);
    sim.floor_size = sim.size;
}

/* ---- power cut ----------------------------------------------------------- */

static Store *crash_image(SimFile *f, unsigned *applied, unsigned *torn)
{
    Store *st = store_clone(f->durable);
    unsigned p = rng_below(&sim.rng, 4) * 33;  /* 0, 33, 66, 99 percent */
    guint i;

    *applied = *torn = 0;
    for (i = 0; i < f->undurable->len; i++) {
        Done *d = g_ptr_array_index(f->undurable, i);

        if (rng_below(&sim.rng, 100) >= p) {
            continue;
        }
        (*applied)++;
        if (d->kind == F_WRITE && d->bytes > SECTOR &&
            rng_below(&sim.rng, 4) == 0) {
            /* Torn: a random subset of its 512-byte pieces */
            uint64_t off = d->offset, end = d->offset + d->bytes;

            (*torn)++;
            while (off < end) {
                uint64_t next = MIN(ROUND_UP(off + 1, SECTOR), end);

                if (rng_below(&sim.rng, 2)) {
                    store_write(st, off, d->data + (off - d->offset),
                                next - off);
                }
                off = next;
            }
        } else {
            apply_done(st, d);
        }
    }
    return st;
}

static void power_cut(void)
{
    SimFile *old = sim.image;
    unsigned applied, torn, undurable = old->undurable->len;
    Store *st = crash_image(old, &applied, &torn);
    uint64_t max_size = sim.size;
    int64_t len;
    uint64_t i, c;
    guint j;
    bool size_ok;
    GHashTableIter it;
    gpointer key, value;

    sim.guest_issued++;
    vlog("POWER CUT: %u of %u undurable requests kept (%u torn), %u in "
         "flight lost", applied, undurable, torn, old->pending->len);

    /* The old instance goes on, unseen, on a dead copy of the file */
    old->dead = true;
    for (j = 0; j < sim.inflight_mod->len; j++) {
        ((GuestOp *)g_ptr_array_index(sim.inflight_mod, j))->lost = true;
    }
    for (i = 0; i < sim.ops->len; i++) {
        GuestOp *o = op_get(i);

        if (o && o->kind == G_RESIZE && !o->acked && o->epoch == sim.epoch) {
            o->lost = true;
            max_size = MAX(max_size, o->new_size);
        }
    }
    sim.qed_bs = NULL;
    /* From here on, no completion reaches the model */
    sim.epoch++;
    while (old->pending->len) {
        sim_complete(old, 0);
    }
    if (sim.drained) {
        if (sim.drained_all) {
            bdrv_drain_all_end();
        } else {
            bdrv_drained_end(blk_bs(sim.blk));
        }
        sim.drained = false;
    }
    if (sim.two_ctx) {
        /*
         * ctx2's requests, also those it has not started yet and those a
         * drain had queued, run to their end on the dead file (both
         * contexts step: the kick BH of a blocking call)
         */
        settle_both();
        BLOCKING(blk_drain(sim.blk));
        settle_both();
        /* The node may be ctx2's: its close runs coroutines there */
        BLOCKING(blk_unref(sim.blk));
    } else {
        blk_drain(sim.blk);
        blk_unref(sim.blk);
    }
    sim.blk = NULL;
    simfile_free(old);
    g_ptr_array_set_size(sim.inflight_mod, 0);
    g_hash_table_iter_init(&it, sim.chunks);
    while (g_hash_table_iter_next(&it, NULL, &value)) {
        for (i = 0; i < CHUNK_SECTORS; i++) {
            ((Sec *)value)[i].busy = 0;
        }
    }
    sim.guest_inflight = 0;
    sim.resizing = false;
    sim.read_only = false;

    /* The crash image, opened by our driver: it repairs what it must */
    sim.image = simfile_new(st, true);
    sim_open();
    len = blk_getlength(sim.blk);
    size_ok = len == sim.floor_size;
    for (i = sim.floor_idx; i < sim.log->len; i++) {
        GuestOp *o = op_get(g_array_index(sim.log, uint32_t, i));

        size_ok |= o->kind == G_RESIZE && len == o->new_size;
    }
    for (i = 0; i < sim.ops->len; i++) {
        GuestOp *o = op_get(i);

        size_ok |= o && o->lost && o->kind == G_RESIZE && len == o->new_size;
    }
    if (!size_ok) {
        sim_fail("after a power cut: size %" PRId64 "; flushed %" PRIu64
                 ", last %" PRIu64, len, sim.floor_size, max_size);
    }
    sim_check(true, "after a power cut");
    if (sim.backing_name) {
        /* A name change is durable with the next flush, like a write */
        g_autofree char *name = header_backing_name();
        bool name_ok = name && !strcmp(name, sim.floor_name);

        for (i = sim.floor_idx; i < sim.log->len && name && !name_ok; i++) {
            GuestOp *o = op_get(g_array_index(sim.log, uint32_t, i));

            name_ok = o->kind == G_RENAME && !strcmp(o->name, name);
        }
        if (!name_ok) {
            sim_fail("after a power cut: the header names backing file "
                     "'%s'; flushed: '%s', last: '%s'", name ?: "",
                     sim.floor_name, sim.backing_name);
        }
        g_free(sim.backing_name);
        g_free(sim.floor_name);
        sim.backing_name = g_strdup(name);
        sim.floor_name = g_strdup(name);
    }
    sim.size = len;
    verify_all(allowed_after_cut, "after a power cut");

    /* Past a lost resize, a regrown area may show data written there */
    g_hash_table_iter_init(&it, sim.chunks);
    while (g_hash_table_iter_next(&it, &key, &value)) {
        c = *(uint64_t *)key;
        for (i = 0; i < CHUNK_SECTORS; i++) {
            if ((c * CHUNK_SECTORS + i) * SECTOR >= sim.size) {
                Sec *x = &((Sec *)value)[i];

                x->cur = x->floor = VAL_ZERO;
                x->alt = x->floor_alt = VAL_NONE;
                x->wild = x->floor_wild = 1;
            }
        }
    }
    for (i = 0; i < sim.ops->len; i++) {
        GuestOp *o = op_get(i);

        if (o) {
            o->lost = false;
        }
    }
    sim.floor_idx = sim.log->len;
    sim.floor_size = sim.size;
}

/* ---- the workload -------------------------------------------------------- */

static void special_drain(void)
{
    sim.guest_issued++;
    if (sim.drained) {
        vlog("drained end");
        BLOCKING(sim.drained_all ? bdrv_drain_all_end() :
                                   bdrv_drained_end(blk_bs(sim.blk)));
        sim.drained = false;
        return;
    }
    sim.drained_all = rng_below(&sim.rng, 2);
    vlog("drained begin%s", sim.drained_all ? " (all)" : "");
    BLOCKING(sim.drained_all ? bdrv_drain_all_begin() :
                               bdrv_drained_begin(blk_bs(sim.blk)));
    sim.drained = true;
    if (rng_below(&sim.rng, 2)) {
        sim_need_check_timer(true);
    }
}

static void reopen(bool ro)
{
    Error *err = NULL;
    int ret;

    sim.guest_issued++;
    vlog("reopen %s", ro ? "read-only" : "read-write");
    if (ro) {
        if (sim.two_ctx) {
            /*
             * Requests handed to ctx2 start first: a drain would queue
             * them and its end let them go, a write after the write
             * permission is dropped
             */
            settle_both();
        }
        BLOCKING(blk_drain(sim.blk));
        blk_get_perm(sim.blk, &sim.ro_perm, &sim.ro_shared);
        if (blk_set_perm(sim.blk, BLK_PERM_CONSISTENT_READ, sim.ro_shared,
                         &err) < 0) {
            sim_fail("dropping write permission fails: %s",
                     error_get_pretty(err));
        }
    }
    BLOCKING(ret = bdrv_reopen_set_read_only(blk_bs(sim.blk), ro, &err));
    if (ret < 0) {
        sim_fail("reopen %s fails: %s", ro ? "read-only" : "read-write",
                 error_get_pretty(err));
    }
    if (!ro && blk_set_perm(sim.blk, sim.ro_perm, sim.ro_shared, &err) < 0) {
        sim_fail("taking write permission back fails: %s",
                 error_get_pretty(err));
    }
    sim.read_only = ro;
    sim.ro_steps = rng_below(&sim.rng, 30);
}

static void change_backing(void)
{
    g_autofree char *name = NULL;
    GuestOp *op;
    int ret;

    /* Names of varying length that all open the same backing file */
    name = g_strdup_printf("qed-sim:backing%s%.*s",
                           rng_below(&sim.rng, 3) ? "/" : "",
                           (int)rng_below(&sim.rng, 48),
                           "0123456789abcdefghijklmnopqrstuvwxyz0123456789ab");
    op = op_new(G_RENAME, 0, 0);
    op->name = g_strdup(name);
    vlog("op #%u change the backing file name to '%s'", op->id, name);
    BLOCKING(ret = bdrv_change_backing_file(blk_bs(sim.blk), name, "raw",
                                            false));
    /* Done when it returns; durable with the next flush */
    guest_done(op, ret, NULL);
}

/*
 * Two contexts: move the node (with its file and backing nodes) into ctx2,
 * as a dataplane iothread takes its disk, or back into the main loop's
 * context.  Its timers and BHs, and the coroutines the driver starts
 * itself (NEED_CHECK's clear, the drain's, open and close's), then run in
 * ctx2, while requests still come from both contexts.
 */
static void move_node(void)
{
    AioContext *to = sim.node2 ? sim.ctx : sim.ctx2;
    const char *name = sim.node2 ? "the main loop's context" : "ctx2";
    Error *err = NULL;
    int ret;

    sim.guest_issued++;
    vlog("move the node into %s", name);
    BLOCKING(ret = blk_set_aio_context(sim.blk, to, &err));
    if (ret < 0) {
        sim_fail("moving the node into %s fails: %s", name,
                 error_get_pretty(err));
    }
    sim.node2 = !sim.node2;
}

/* One guest action, chosen by the seed */
static void guest_action(void)
{
    unsigned r;
    uint64_t c, sector, n;

    if (sim.two_ctx && !sim.drained && rng_below(&sim.rng2, 1000) < 4) {
        move_node();
        return;
    }
    r = rng_below(&sim.rng, 1000);

    if (sim.read_only) {
        if (sim.ro_steps-- == 0) {
            reopen(false);
            return;
        }
        if (r < 800) {
            c = pick_cluster(rng_below(&sim.rng, 3));
            pick_range(c, &sector, &n);
            issue_read(sector, n);
        } else {
            issue_flush();
        }
        return;
    }

    if (r < 160) {                          /* into a new table, mostly */
        c = pick_cluster(0);
        pick_range(c, &sector, &n);
        issue_write(sector, n);
    } else if (r < 300) {                   /* into a table in use */
        c = pick_cluster(2);
        pick_range(c, &sector, &n);
        issue_write(sector, n);
    } else if (r < 440) {                   /* over data written before */
        c = pick_cluster(1);
        pick_range(c, &sector, &n);
        issue_write(sector, n);
    } else if (r < 460) {
        /* A burst of writes into as many tables, new ones mostly */
        uint64_t per_table = clusters_per_table();
        uint64_t ntables = DIV_ROUND_UP(sim.size / sim.geo.cluster_size,
                                        per_table);
        unsigned k = 2 + rng_below(&sim.rng, 7);

        vlog("burst of %u writes into L2 tables", k);
        while (k--) {
            c = rng_below(&sim.rng, ntables) * per_table +
                rng_below(&sim.rng, MIN(per_table, 64));
            pick_range(c, &sector, &n);
            issue_write(sector, n);
        }
        sim.burst = rng_below(&sim.rng, 2 * sim.max_inflight + 4);
    } else if (r < 500) {                   /* two writes into one cluster */
        uint64_t spc = sim.geo.cluster_size / SECTOR, m;

        c = pick_cluster(rng_below(&sim.rng, 2) ? 0 : 1);
        m = 1 + rng_below(&sim.rng, spc - 1);
        issue_write(c * spc, m);
        issue_write(c * spc + m, MIN(spc - m, MAX_IO_SECTORS));
    } else if (r < 550) {
        c = pick_cluster(rng_below(&sim.rng, 3));
        pick_range(c, &sector, &n);
        issue_zero_or_discard(false, sector, n);
    } else if (r < 600) {
        c = pick_cluster(rng_below(&sim.rng, 2) ? 1 : 2);
        pick_range(c, &sector, &n);
        issue_zero_or_discard(true, sector, n);
    } else if (r < 850) {
        c = pick_cluster(rng_below(&sim.rng, 3));
        pick_range(c, &sector, &n);
        issue_read(sector, n);
    } else if (r < 930) {
        issue_flush();
    } else if (r < 945) {
        if (sim.do_resize) {
            issue_resize();
        }
    } else if (r < 975) {
        sim.guest_issued++;
        sim_need_check_timer(true);
    } else if (r < 983) {
        special_drain();
    } else if (r < 988) {
        if (!sim.drained) {
            reopen(true);
        }
    } else if (r < 993) {
        if (sim.backing && sim.do_rename && !sim.drained) {
            change_backing();
        }
    } else if (r < 996) {
        /* A clean close in the middle: only with nothing in flight */
        if (!sim.guest_inflight && !sim.drained && !sim.image->pending->len) {
            sim.guest_issued++;
            clean_cycle("clean close in the middle");
        }
    } else {
        issue_read(rng_below(&sim.rng, sim.size / SECTOR),
                   1 + rng_below(&sim.rng, MAX_IO_SECTORS));
    }
}

/* ---- one seed ------------------------------------------------------------ */

static void make_image(Store *st)
{
    uint8_t h[SECTOR] = {0};
    uint64_t features = 0;

    stl_le_p(h, QED_MAGIC);
    stl_le_p(h + 4, sim.geo.cluster_size);
    stl_le_p(h + 8, sim.geo.table_size);
    stl_le_p(h + 12, 1);                        /* header_size */
    if (sim.backing_name) {
        features = QED_F_BACKING_FILE | QED_F_BACKING_FORMAT_NO_PROBE;
        stl_le_p(h + 56, sizeof(QEDHeader));
        stl_le_p(h + 60, strlen(sim.backing_name));
        memcpy(h + sizeof(QEDHeader), sim.backing_name,
               strlen(sim.backing_name));
    }
    stq_le_p(h + 16, features);
    stq_le_p(h + 40, sim.geo.cluster_size);     /* l1_table_offset */
    stq_le_p(h + 48, sim.geo.size);
    store_write(st, 0, h, SECTOR);
    st->length = (uint64_t)sim.geo.cluster_size * (1 + sim.geo.table_size);
}

static void choose_geometry(void)
{
    /*
     * Small clusters and tables: many L2 tables in a few hundred MiB.
     * Large ones (tables of 1 to 16 MiB, two of them a grow-ahead step):
     * the guest spans 1 to 49 tables, a virtual size of GiB to TiB of which
     * little is written.
     */
    static const struct {
        uint32_t cluster_size, table_size;
        bool big;
    } geos[] = {
        { 4096, 1 }, { 4096, 2 }, { 8192, 1 }, { 16384, 1 }, { 16384, 4 },
        { 65536, 1 }, { 65536, 4 },
        { 65536, 16, true }, { 1 << 20, 1, true }, { 1 << 20, 16, true },
        { 1 << 20, 16, true },
    };
    unsigned g = rng_below(&sim.rng, ARRAY_SIZE(geos));
    uint64_t max, span;

    sim.geo.cluster_size = geos[g].cluster_size;
    sim.geo.table_size = geos[g].table_size;
    max = qed_max_image_size(sim.geo.cluster_size, sim.geo.table_size);
    span = (uint64_t)sim.geo.cluster_size * sim.geo.table_size / 8 *
           sim.geo.cluster_size;
    if (geos[g].big) {
        sim.geo.size = span + rng_below(&sim.rng, 48 * span / MiB) * MiB;
    } else {
        sim.geo.size = (64 + rng_below(&sim.rng, 448)) * MiB;
    }
    sim.geo.size = MIN(sim.geo.size, max / 2);
    sim.geo.size -= rng_below(&sim.rng, 8) * SECTOR;
    sim.geo.small_cache = rng_below(&sim.rng, 4) == 0;
    sim.geo.backing_size = 0;
    if (rng_below(&sim.rng, 3) == 0) {
        sim.geo.backing_size = MIN((1 + rng_below(&sim.rng, 16)) * MiB,
                                   sim.geo.size);
    }
}

static void run_seed(uint64_t seed)
{
    static const unsigned slow_percent[] = { 0, 3, 10, 25 };
    static const unsigned ctx2_percent[] = { 25, 50, 75, 100 };
    static const unsigned step2_percent[] = { 5, 25, 50, 90 };
    g_autofree char *contexts = NULL;
    uint64_t i;
    Store *bst;

    memset(&sim.geo, 0, sizeof(sim.geo));
    sim.seed = seed;
    sim.rng.s = seed * 0x9e3779b97f4a7c15ULL + 0x1234567;
    rng_next(&sim.rng);
    sim.ops = g_ptr_array_new();
    g_ptr_array_add(sim.ops, NULL);             /* ids 0 and 1 are values */
    g_ptr_array_add(sim.ops, NULL);
    sim.inflight_mod = g_ptr_array_new();
    sim.log = g_array_new(false, false, sizeof(uint32_t));
    sim.used_clusters = g_array_new(false, false, sizeof(uint64_t));
    sim.chunks = g_hash_table_new_full(g_int64_hash, g_int64_equal, g_free,
                                       g_free);

    choose_geometry();
    sim.size = sim.floor_size = sim.geo.size;
    sim.max_inflight = 1 << rng_below(&sim.rng, 7);
    sim.p_slow = slow_percent[rng_below(&sim.rng, 4)];
    sim.p_complete = 20 + rng_below(&sim.rng, 70);
    sim.cut_rate = rng_below(&sim.rng, 4) * 10;
    sim.do_resize = rng_below(&sim.rng, 2);
    sim.large_writes = rng_below(&sim.rng, 4) == 0;
    sim.do_rename = rng_below(&sim.rng, 2);
    /*
     * Two seeds in three take allocating grows (the driver's way on a
     * POSIX file: a grow is still one truncate landing when it completes);
     * the rest refuse them, so the driver's fallback to sparse grows runs
     * too.  From the seed, not the generator: old seeds keep their
     * schedules.
     */
    sim.falloc = sim.seed % 3 != 0;
    if (sim.geo.backing_size) {
        sim.backing_name = g_strdup("qed-sim:backing");
        sim.floor_name = g_strdup(sim.backing_name);
        bst = store_new();
        for (i = 0; i < sim.geo.backing_size / SECTOR; i++) {
            uint8_t sec[SECTOR];

            fill_sector(sec, VAL_BACKING, i);
            store_write(bst, i * SECTOR, sec, SECTOR);
        }
        sim.backing = simfile_new(bst, false);
    }
    /*
     * A second AioContext for one seed in four, from the seed (the others
     * keep their schedules), its draws from a generator of its own
     */
    sim.two_ctx = sim.contexts_opt ? sim.contexts_opt == 2 :
                  sim.seed % 4 == 3;
    sim.rng2.s = seed * 0xbf58476d1ce4e5b9ULL + 0x7654321;
    rng_next(&sim.rng2);
    if (sim.two_ctx) {
        sim.p_ctx2 = ctx2_percent[rng_below(&sim.rng2, 4)];
        sim.p_step2 = step2_percent[rng_below(&sim.rng2, 4)];
        contexts = g_strdup_printf("two AioContexts (ctx2: %u%% of the "
                                   "requests, steps %u%%)", sim.p_ctx2,
                                   sim.p_step2);
        ctx2_start();
    } else {
        contexts = g_strdup("one AioContext");
    }
    vlog("seed %" PRIu64 ": cluster_size %u, table_size %u, size %" PRIu64
         ", backing %" PRIu64 ", %s cache, in flight <= %u, complete %u%%, "
         "slow %u%%, cuts %u/10000%s%s%s, %s", seed, sim.geo.cluster_size,
         sim.geo.table_size, sim.geo.size, sim.geo.backing_size,
         sim.geo.small_cache ? "one-table" : "default", sim.max_inflight,
         sim.p_complete, sim.p_slow, sim.cut_rate,
         sim.large_writes ? ", large writes" : "",
         sim.do_resize ? ", resizes" : "",
         sim.do_rename ? ", backing renames" : "", contexts);

    bst = store_new();
    make_image(bst);
    sim.image = simfile_new(bst, true);
    sim_open();

    for (;;) {
        unsigned pending;
        bool can_issue;

        settle();
        if (ctx2_has_work() && rng_below(&sim.rng2, 100) < sim.p_step2) {
            ctx2_step();
            continue;
        }
        pending = sim.image->pending->len;
        can_issue = sim.guest_issued < sim.ops_limit &&
                    sim.guest_inflight < sim.max_inflight;
        if (!pending && !can_issue) {
            if (ctx2_has_work()) {
                /* What can run is ctx2's */
                ctx2_step();
                continue;
            }
            if (sim.drained) {
                special_drain();
                continue;
            }
            if (sim.guest_inflight) {
                sim_fail("stuck: %u guest requests in flight, no file "
                         "request pending", sim.guest_inflight);
            }
            break;
        }
        if (sim.burst) {
            sim.burst--;
        } else if (can_issue && rng_below(&sim.rng, 200) == 0) {
            /* Let many pile up before anything completes */
            sim.burst = rng_below(&sim.rng, 4 * sim.max_inflight + 8);
        }
        if (pending && (!can_issue ||
                        (!sim.burst &&
                         rng_below(&sim.rng, 100) < sim.p_complete))) {
            complete_random();
            continue;
        }
        if (rng_below(&sim.rng, 10000) < sim.cut_rate) {
            power_cut();
            continue;
        }
        guest_action();
    }

    if (sim.read_only) {
        reopen(false);
    }
    clean_cycle("clean close at the end");
    sim_close();
    vlog("seed %" PRIu64 " done: %" PRIu64 " guest operations, %" PRIu64
         " completions", seed, sim.guest_issued, sim.completions);
    if (sim.two_ctx) {
        vlog("ctx2: %" PRIu64 " requests, %" PRIu64 " steps, %" PRIu64
             " of them for what the main loop woke", sim.ops2,
             sim.steps2, sim.woken2);
    }
}

/* ---- driver -------------------------------------------------------------- */

static void sim_init(void)
{
    qemu_init_main_loop(&error_fatal);
    bdrv_init();
    bdrv_register(&bdrv_qed_sim);
    sim.ctx = qemu_get_aio_context();
    sim.kick_bh = aio_bh_new(sim.ctx, kick_bh, NULL);
}

/* Free what a finished seed holds (for leak checkers) */
static void sim_free_run(void)
{
    uint64_t i;

    for (i = 0; i < sim.ops->len; i++) {
        GuestOp *o = op_get(i);

        if (o) {
            op_free(o);
        }
    }
    g_ptr_array_free(sim.ops, true);
    g_ptr_array_free(sim.inflight_mod, true);
    g_array_free(sim.log, true);
    g_array_free(sim.used_clusters, true);
    g_hash_table_destroy(sim.chunks);
    sim.chunks = NULL;
    simfile_free(sim.image);
    simfile_free(sim.backing);
    sim.image = sim.backing = NULL;
    g_free(sim.backing_name);
    g_free(sim.floor_name);
    sim.backing_name = sim.floor_name = NULL;
    qemu_bh_delete(sim.kick_bh);
    ctx2_stop();
}

/* The last lines the driver printed, under a failure */
static void print_tail(FILE *f)
{
    char line[512];
    char *lines[6] = {0};
    unsigned n = 0, i;

    rewind(f);
    while (fgets(line, sizeof(line), f)) {
        g_free(lines[n % 6]);
        lines[n++ % 6] = g_strdup(line);
    }
    for (i = n > 6 ? n - 6 : 0; i < n; i++) {
        printf("  stderr: %s", lines[i % 6]);
        if (!strchr(lines[i % 6], '\n')) {
            putchar('\n');
        }
    }
    for (i = 0; i < 6; i++) {
        g_free(lines[i]);
    }
}

/*
 * Run one seed in a child: a crash or a failure ends only that seed.  Its
 * stderr (the driver's repair messages) is shown only when it fails.
 *
 * The child execs this program afresh (--seed S --no-fork --report-fd N)
 * rather than running the seed in the forked copy: this process has
 * threads (QEMU's RCU thread starts in a constructor), and clang 14's
 * ASan does not take its allocator locks around fork(), so a forked copy
 * whose parent had a thread in malloc deadlocked at its first allocation
 * under make check-asan.  Between fork and exec nothing allocates.
 */
static bool run_child(const char *self, uint64_t seed, uint64_t *ops)
{
    int fds[2], status;
    uint64_t counts[2] = {0, 0};
    FILE *err = sim.verbose ? NULL : tmpfile();
    char seed_s[32], fd_s[16], ops_s[32], ctx_s[16];
    char *argv[16];
    int argc = 0;
    bool ok;
    pid_t pid;
    ssize_t n;

    fflush(stdout);
    if (pipe(fds) < 0) {
        perror("pipe");
        exit(2);
    }
    snprintf(seed_s, sizeof(seed_s), "%" PRIu64, seed);
    snprintf(fd_s, sizeof(fd_s), "%d", fds[1]);
    snprintf(ops_s, sizeof(ops_s), "%" PRIu64, sim.ops_limit);
    argv[argc++] = (char *)self;
    argv[argc++] = (char *)"--seed";
    argv[argc++] = seed_s;
    argv[argc++] = (char *)"--no-fork";
    argv[argc++] = (char *)"--report-fd";
    argv[argc++] = fd_s;
    if (sim.ops_given) {
        argv[argc++] = (char *)"--ops";
        argv[argc++] = ops_s;
    }
    if (sim.contexts_opt) {
        snprintf(ctx_s, sizeof(ctx_s), "%u", sim.contexts_opt);
        argv[argc++] = (char *)"--contexts";
        argv[argc++] = ctx_s;
    }
    if (sim.verbose) {
        argv[argc++] = (char *)"-v";
    }
    argv[argc] = NULL;

    pid = fork();
    if (pid < 0) {
        perror("fork");
        exit(2);
    }
    if (pid == 0) {
        close(fds[0]);
        if (err) {
            dup2(fileno(err), STDERR_FILENO);
        }
        execv("/proc/self/exe", argv);
        _exit(127);
    }
    close(fds[1]);
    n = read(fds[0], counts, sizeof(counts));
    close(fds[0]);
    waitpid(pid, &status, 0);
    *ops += n == sizeof(counts) ? counts[0] : 0;
    ok = WIFEXITED(status) && WEXITSTATUS(status) == 0 &&
         n == sizeof(counts);
    if (!ok && !WIFEXITED(status)) {
        printf("FAIL seed=%" PRIu64 ": killed by signal %d (%s)\n"
               "  replay: %s --seed %" PRIu64, seed, WTERMSIG(status),
               strsignal(WTERMSIG(status)), SIM_PROG, seed);
        if (sim.ops_given) {
            printf(" --ops %" PRIu64, sim.ops_limit);
        }
        if (sim.contexts_opt) {
            printf(" --contexts %u", sim.contexts_opt);
        }
        printf(" -v\n");
    } else if (!ok && WEXITSTATUS(status) == 127) {
        printf("FAIL seed=%" PRIu64 ": could not exec /proc/self/exe\n",
               seed);
    }
    if (!ok && err) {
        print_tail(err);
    }
    if (err) {
        fclose(err);
    }
    return ok;
}

static void usage(void)
{
    printf("usage: qed-sim --seed S [--ops N] [-v] [--no-fork]\n"
           "       qed-sim --seeds A-B [--ops N] [--timing]\n"
           "       qed-sim --ops-total N [--start A] [--ops N] [--timing]\n"
           "       (each also takes --contexts 1|2)\n"
           "One seed is one schedule of guest operations, file request\n"
           "completions and power cuts over our QED driver.  --ops: guest\n"
           "operations per seed (default %d).  Operations counted: guest\n"
           "operations issued plus file requests completed.  --contexts:\n"
           "requests from one AioContext or from two (the main loop's and\n"
           "a lock-stepped iothread's) for every seed; by default seeds of\n"
           "3 mod 4 take two.\n", DEFAULT_OPS);
}

int main(int argc, char **argv)
{
    uint64_t first = 1, last = 0, total = 0, seeds = 0, ops = 0, failures = 0;
    bool single = false, no_fork = false, timing = false;
    int report_fd = -1;
    int64_t t0 = g_get_monotonic_time();
    int i;

    sim.ops_limit = DEFAULT_OPS;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

        if (!strcmp(a, "-v")) {
            sim.verbose = true;
        } else if (!strcmp(a, "--no-fork")) {
            no_fork = true;
        } else if (!strcmp(a, "--report-fd") && v) {
            /* run_child's exec: where the operation counts go */
            report_fd = atoi(v);
            i++;
        } else if (!strcmp(a, "--timing")) {
            timing = true;
        } else if (!strcmp(a, "--contexts") && v &&
                   (!strcmp(v, "1") || !strcmp(v, "2"))) {
            sim.contexts_opt = atoi(v);
            i++;
        } else if (!strcmp(a, "--seed") && v) {
            first = last = g_ascii_strtoull(v, NULL, 10);
            single = true;
            i++;
        } else if (!strcmp(a, "--seeds") && v) {
            char *end;

            first = g_ascii_strtoull(v, &end, 10);
            last = *end == '-' ? g_ascii_strtoull(end + 1, NULL, 10) : first;
            i++;
        } else if (!strcmp(a, "--ops") && v) {
            sim.ops_limit = g_ascii_strtoull(v, NULL, 10);
            sim.ops_given = true;
            i++;
        } else if (!strcmp(a, "--ops-total") && v) {
            total = g_ascii_strtoull(v, NULL, 10);
            i++;
        } else if (!strcmp(a, "--start") && v) {
            first = g_ascii_strtoull(v, NULL, 10);
            i++;
        } else {
            usage();
            return a[1] == 'h' || !strcmp(a, "--help") ? 0 : 2;
        }
    }
    if (!total && last < first) {
        usage();
        return 2;
    }

    if (single && no_fork) {
        sim_init();
        run_seed(first);
        seeds = 1;
        ops = sim.guest_issued + sim.completions;
        sim_free_run();
        if (report_fd >= 0) {
            uint64_t counts[2] = { ops, 0 };

            fflush(stdout);
            if (write(report_fd, counts, sizeof(counts)) != sizeof(counts)) {
                return 3;
            }
            return 0;
        }
    } else {
        uint64_t seed;

        for (seed = first; total ? ops < total : seed <= last; seed++) {
            seeds++;
            if (!run_child(argv[0], seed, &ops)) {
                failures++;
            }
        }
    }
    printf("qed-sim: %" PRIu64 " seeds, %" PRIu64 " operations, %" PRIu64
           " failures\n", seeds, ops, failures);
    if (timing) {
        double secs = (g_get_monotonic_time() - t0) / 1e6;

        printf("qed-sim: %.1f s, %.0f operations/s\n", secs, ops / secs);
    }
    return failures ? 1 : 0;
}

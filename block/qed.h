/*
 * QED ("QEMU Enhanced Disk") image format: shared types
 *
 * The on-disk layout, the in-memory state of an open image and the
 * prototypes that the driver's files share.  See docs/interop/qed_spec.txt
 * for the format and its crash orderings (cited as "crash ordering N"),
 * docs/qed-design.md for the driver's design: its files, request flow,
 * locking, writeback and file growth.
 *
 * The driver's files and their jobs: docs/qed-design.md, section 1.
 *
 * Locks and waits (PORT-10: see docs/qed-design.md, section 5).  Since
 * QEMU 10.0 the request coroutines of one node run in several threads at
 * once (virtio-blk iothread-vq-mapping), so "state changes only between
 * yields" is made true by a lock: s->lock, the metadata lock (a CoMutex).
 * Every coroutine that reads or writes driver state (BDRVQEDState, the L2
 * cache, dirty tables, the allocations, free runs, counters, the header
 * copy) holds it, and releases it exactly where it yields: around every
 * I/O on a child (qed_unlock_io()/qed_relock_io(), QED_UNLOCKED()), in
 * every wait on a CoQueue (qemu_co_queue_wait(q, &s->lock)), around
 * aio_task_pool waits and blkdebug events (qed_event(): a breakpoint
 * there yields).  So a yield is a lock release point and every
 * argument below, written for the one-thread model, holds as it was.
 * Code outside coroutines touches state only in the main loop's open,
 * close and reopen paths, with the node drained (qed_assert_locked()
 * accepts that); timer callbacks and BHs use atomics only, and spawn a
 * coroutine that takes s->lock for anything else.
 *
 * What must stay consistent across a yield is guarded by one of these
 * (all taken under s->lock, waited for on a CoQueue with s->lock given,
 * never held as a CoMutex across I/O; what it guards, then who waits):
 *   wb_busy          one writeback pass at a time (QEDBusy: wb_waiters)
 *   header_busy      the header on disk and s->header; NEED_CHECK's state
 *                    (QEDBusy)
 *   a claim          an allocation on s->allocs: the entries of a range of
 *                    guest clusters (waiters: alloc_waiters)
 *   e->loading       loading chunks of one cached L2 table (a flag and a
 *                    CoQueue of the cache entry)
 *   resizing         one change of the file's length at a time, and writes
 *                    past its target wait (resize_waiters)
 *   tables_making,   a new L2 table's space, a table's holes being
 *   space_busy       allocated (making_waiters)
 *   allocating_writes == 0   idle, for the timer (idle_waiters)
 *   screen_busy      the reading of every table for bad entries, before
 *                    the first allocation, and their drop (QEDBusy; taken
 *                    by lookups, which hold no claim, and by the
 *                    writeback only when free: qed_screen_settle())
 * Order in which they may be taken, one inside the other (s->lock is
 * innermost of all and never held while waiting for one of them: a wait
 * releases it):
 *   wb_busy -> header_busy -> resizing
 *   a claim -> header_busy -> resizing
 *   a claim -> e->loading, tables_making, space_busy
 *   wb_busy -> resizing, space_busy (a pass's table writes wait for them)
 * Never: wb_busy inside a claim (writers release their claim before they
 * throttle, qed_wb_throttle), a claim inside wb_busy, wb_busy inside
 * header_busy (NEED_CHECK's clear and a backing change run the writeback
 * first, then take header_busy).
 *
 * The graph lock (QEMU 8.0+): every function that reads bs->file or
 * bs->backing or does I/O on them is GRAPH_RDLOCK.  Requests hold the
 * reader lock from the block layer; the coroutines the driver starts
 * itself (the NEED_CHECK timer's, the background writeback's,
 * qed_call_in_coroutine()'s) take it with GRAPH_RDLOCK_GUARD(); the
 * writeback's aio tasks run under their spawner's.  The graph lock is
 * taken before s->lock, never inside it.
 *
 * This work is licensed under the terms of the GNU LGPL, version 2 or later.
 * See the COPYING.LIB file in the top-level directory.
 */

#ifndef BLOCK_QED_H
#define BLOCK_QED_H

#include "block/block-io.h"
#include "block/block_int.h"
#include "qemu/cutils.h"
#include "qemu/coroutine.h"
#include "qemu/queue.h"
#include "qemu/units.h"

/*
 * On-disk layout
 *
 * +--------+----------+----------+----------+-----+
 * | header | L1 table | cluster0 | cluster1 | ... |
 * +--------+----------+----------+----------+-----+
 *
 * The header occupies header_size clusters and holds the backing file name.
 * The L1 table points to L2 tables, L2 tables point to data clusters.  Both
 * kinds of table are table_size clusters of little-endian 64-bit offsets.
 * An L2 entry is 0 (unallocated: read the backing file), 1 (zero cluster:
 * reads as zeros) or the file offset of a data cluster.
 */

#define QED_MAGIC ('Q' | ('E' << 8) | ('D' << 16))

enum {
    /* The image has a backing file */
    QED_F_BACKING_FILE = 0x01,

    /* The image needs a consistency check before use */
    QED_F_NEED_CHECK = 0x02,

    /* The backing file is raw: never probe its format */
    QED_F_BACKING_FORMAT_NO_PROBE = 0x04,

    /* Every feature bit this driver knows */
    QED_FEATURE_MASK = QED_F_BACKING_FILE |
                       QED_F_NEED_CHECK |
                       QED_F_BACKING_FORMAT_NO_PROBE,
    QED_COMPAT_FEATURE_MASK = 0,
    QED_AUTOCLEAR_FEATURE_MASK = 0,

    /* Limits and defaults, in bytes or clusters as named */
    QED_MIN_CLUSTER_SIZE = 4 * 1024,
    QED_MAX_CLUSTER_SIZE = 64 * 1024 * 1024,
    QED_DEFAULT_CLUSTER_SIZE = 64 * 1024,
    QED_MIN_TABLE_SIZE = 1,
    QED_MAX_TABLE_SIZE = 16,
    QED_DEFAULT_TABLE_SIZE = 4,

    /* Seconds after the last allocating write before NEED_CHECK is cleared */
    QED_NEED_CHECK_TIMEOUT = 5,
};

/* Special L2 entry values */
#define QED_L2_UNALLOCATED 0
#define QED_L2_ZERO        1

/* The header as it is on disk (little-endian) and in memory (CPU order) */
typedef struct QEMU_PACKED QEDHeader {
    uint32_t magic;
    uint32_t cluster_size;          /* in bytes */
    uint32_t table_size;            /* for L1 and L2 tables, in clusters */
    uint32_t header_size;           /* in clusters */
    uint64_t features;              /* must be understood to open */
    uint64_t compat_features;       /* may be ignored */
    uint64_t autoclear_features;    /* cleared by writers that ignore them */
    uint64_t l1_table_offset;       /* in bytes */
    uint64_t image_size;            /* virtual disk size, in bytes */
    uint32_t backing_filename_offset;   /* in bytes from start of header */
    uint32_t backing_filename_size;     /* in bytes */
} QEDHeader;

QEMU_BUILD_BUG_ON(sizeof(QEDHeader) != 64);

/* A table in memory: entries in CPU byte order */
typedef struct QEDTable {
    uint64_t offsets[0];
} QEDTable;

/*
 * A cached L2 table is read from disk in chunks of this size, as lookups
 * need them: a miss costs one small read, not a whole table.
 */
#define QED_L2_CHUNK_BYTES 4096

/* Table entries in one 512-byte sector, the unit of table writes */
#define QED_ENTRIES_PER_SECTOR (BDRV_SECTOR_SIZE / sizeof(uint64_t))

/*
 * Snapshots of one batch of a writeback pass: a pass over many dirty
 * tables copies at most this much at once (the memory bound of
 * l2-cache-size); x-writeback-batch makes it smaller, for tests
 */
#define QED_WB_MAX_BATCH_BYTES (2 * MiB)

/*
 * A table whose changes are written back sector by sector: the L1 table,
 * or an L2 table in the cache (QEDCachedTable).  Entries change in memory
 * and their sectors are marked dirty; qed-writeback.c writes dirty
 * sectors back in passes.
 */
typedef struct QEDDirtyTable {
    QEDTable *table;
    uint64_t offset;        /* file offset of the table */
    unsigned long *dirty;   /* sectors that differ from the disk */
    unsigned int ndirty;    /* bits set in dirty */
    /* chunks that hold the disk's entries; NULL: all (the L1 table) */
    unsigned long *loaded;
    /* the file holds the whole table, no hole (qed_secure_space) */
    bool space_ok;
    bool space_busy;        /* being secured: wait on making_waiters */
    unsigned int wb_inflight;   /* writes of its sectors in flight */
} QEDDirtyTable;

/*
 * The L2 table cache and one table held by it, with a reference
 * (qed_l2_cache_table() gives its entries); private to qed-l2-cache.c
 */
typedef struct QEDL2Cache QEDL2Cache;
typedef struct QEDCachedTable QEDCachedTable;

/* One table as the cache sees it (qed_l2_cache_table_info(): tests) */
typedef struct QEDCachedTableInfo {
    int ref;                    /* users, the pin of dirty sectors too */
    bool dropped;               /* out of the cache, freed at last unref */
    bool fresh;                 /* new, not written to disk yet */
    bool pinned;                /* on the dirty list */
    unsigned int nresident;     /* chunks that take memory */
    const unsigned long *resident;  /* which ones */
} QEDCachedTableInfo;

/* What the cache holds, for the writeback's throttle and the tests */
typedef struct QEDL2CacheStats {
    unsigned int dirty_tables;
    uint64_t dirty_sectors;     /* in all tables */
    uint64_t resident;          /* bytes of memory its tables take */
    uint64_t max;               /* l2-cache-size */
} QEDL2CacheStats;

/* What a range of the virtual disk maps to */
typedef enum QEDExtentType {
    QED_EXTENT_UNALLOCATED,     /* backing file, or zeros without one */
    QED_EXTENT_ZERO,            /* zero cluster */
    QED_EXTENT_DATA,            /* data cluster(s) at a file offset */
} QEDExtentType;

typedef struct QEDExtent {
    QEDExtentType type;
    uint64_t file_offset;       /* QED_EXTENT_DATA: where pos lives */
    uint64_t bytes;             /* contiguous bytes from pos in this state */
} QEDExtent;

/*
 * A range of whole clusters (guest offsets) whose table entries are
 * changing: new data is being written for them, or markers set.  While it
 * is on s->allocs no other request may change the same entries.
 */
typedef struct QEDAllocation {
    uint64_t start;
    uint64_t end;
    uint64_t file_offset;
    QLIST_ENTRY(QEDAllocation) next;
} QEDAllocation;

/* A change of the backing file (qed_co_change_backing) */
typedef struct QEDBackingChange {
    const char *file;
    const char *fmt;
} QEDBackingChange;

typedef struct QEDTableMaking {
    unsigned int l1_index;
    QLIST_ENTRY(QEDTableMaking) next;
} QEDTableMaking;

/*
 * A flag of s->lock's that is held across yields (wb_busy, header_busy,
 * screen_busy): taken and waited for under s->lock (qed_busy_enter()),
 * so that nobody ever waits for another lock while holding s->lock
 */
typedef struct QEDBusy {
    Coroutine *owner;           /* NULL: free */
    CoQueue waiters;
} QEDBusy;

/*
 * Which lock guards each field.  "lock": s->lock, the metadata lock (read
 * and written by coroutines that hold it; outside coroutines only by the
 * main loop's open/close/reopen code, node drained).  "open": set at open
 * (or invalidate_cache's open afresh), then read under s->lock or by the
 * main loop with the node drained.  "atomic": qatomic_*, from any thread.
 */
typedef struct BDRVQEDState {
    /*
     * The metadata lock (see the top of this file).  First, so that
     * invalidate_cache can clear all that follows while holding it.
     */
    CoMutex lock;

    BlockDriverState *bs;       /* open */
    QEDHeader header;           /* lock (header_busy to write); CPU order */

    QEDDirtyTable l1;           /* lock; the L1 table, CPU order */
    /*
     * lock: the L2 tables the L1 names, by offset: no data cluster may be
     * in one
     */
    uint64_t *l2_starts;
    size_t n_l2_starts;
    size_t l2_starts_size;
    QEDL2Cache *l2_cache;       /* lock (the cache and its tables) */
    /*
     * Idle release of the cache (cache-clean-interval, seconds; 0: off):
     * open/close/reopen only (main loop, node drained); the timer's
     * callback reads neither
     */
    uint64_t cache_clean_interval;
    QEMUTimer *cache_clean_timer;
    /* open: geometry */
    uint32_t table_nelems;
    uint32_t table_nsectors;    /* 512-byte sectors in one table */
    uint32_t chunk_entries;     /* entries in one chunk of an L2 table */
    uint32_t table_nchunks;
    uint32_t l1_shift;
    uint32_t l2_shift;
    uint32_t l2_mask;

    /*
     * All of what follows, up to wb_batch_bytes, under lock.
     *
     * First byte past the last allocated cluster; only ever grows, but for
     * a repair by the check and qed_co_make_empty(), which first remove
     * from the disk every entry past the new end.  Every write to the
     * file lies below it.
     */
    uint64_t file_end;
    /* The file's length: it grows ahead of file_end, in steps */
    uint64_t file_size;
    bool can_grow;
    /*
     * Growth allocates the new blocks (fallocate) until the protocol
     * refuses that mode (grow_falloc); grow_tight: an allocating grow ran
     * out of room, so the file grows to fit, not ahead, until it is cut
     */
    bool grow_falloc;
    bool grow_tight;
    /* Space reserved and then not used (qed-alloc.c), sorted by offset */
    GArray *free_runs;
    /* A write failed: the file may be longer than file_size says */
    bool length_unsure;
    /* Failed writes may have left bytes below this (qed_reserve) */
    uint64_t garbage_end;
    /*
     * l2_gen of the last entries set over such space, and of the start
     * of the last writeback flush that succeeded (qed_wb_write_l2)
     */
    uint64_t reuse_gen;
    uint64_t wb_flushed_gen;
    /*
     * A change of the file's length in flight (one at a time), and the
     * length it sets: a write that reaches past that length waits for it,
     * else the size change could land after the write and cut it off.
     */
    bool resizing;
    uint64_t resize_target;
    CoQueue resize_waiters;

    /*
     * New L2 tables whose file space is being allocated, by L1 index: a
     * request that needs one of them waits (the table is not in memory
     * until its space is secured, so no write can be acknowledged through
     * it before that)
     */
    QLIST_HEAD(, QEDTableMaking) tables_making;
    CoQueue making_waiters;
    /*
     * Zeros for qed_write_zero_data(): made under lock at first use, then
     * unchanged until close (I/O reads it with the lock released)
     */
    void *zero_buf;

    /* Allocations in flight, to keep two writes off one cluster */
    QLIST_HEAD(, QEDAllocation) allocs;
    CoQueue alloc_waiters;
    unsigned int allocating_writes;     /* until their entries are set */
    CoQueue idle_waiters;               /* for allocating_writes == 0 */
    uint64_t l2_gen;            /* bumped whenever table entries change */

    /* Writeback of dirty table sectors: one pass at a time */
    QEDBusy wb_busy;
    /*
     * Snapshots of a pass: L2 batches, and the L1 table's; owned by the
     * pass that holds wb_busy (its I/O reads them with the lock released)
     */
    void *wb_l2_buf;
    void *wb_l1_buf;
    /* x-writeback-batch: 0, or a smaller cap on a batch's snapshots */
    size_t wb_batch_bytes;
    bool wb_background;         /* lock; a background pass is running */
    /* lock; L2 sectors were written and no flush has succeeded since */
    bool wb_tables_unflushed;

    /* NEED_CHECK handling: all under lock, but where said */
    QEDBusy header_busy;
    /*
     * NEED_CHECK is on disk and may be relied on: for the tables of an
     * image without backing file (crash ordering 4), and for a grow-ahead
     * tail, with or without backing file (ordering 8)
     */
    bool need_check_ready;
    /*
     * open/close only; its callback (any thread) reads only atomics:
     * timer_mod/timer_del/timer_pending are thread-safe
     */
    QEMUTimer *need_check_timer;
    /* atomic: the clearing coroutine has been started */
    bool timer_running;
    /*
     * NEED_CHECK was set at a read-only open, which only looks: the bit
     * stays until a repair (a reopen read-write runs it), whatever this
     * open writes
     */
    bool unrepaired;
    /*
     * atomic (read by drain begin in the main loop): the state is
     * complete: set at the end of a successful open (and of
     * invalidate_cache's), cleared when close or invalidate_cache
     * start.  PORT-10: 10.0 runs .bdrv_drain_begin for every node at
     * every graph change (bdrv_graph_wrlock() drains all), also for this
     * node while it is being opened (bdrv_open_file_child()): the
     * drain's coroutine does nothing unless this is set.
     */
    bool opened;

    /* lock: rate limit for corrupt-metadata messages */
    unsigned int error_reports;

    /*
     * All under lock.  Entries (L1 or L2) that name space past the end
     * of the file as it was opened (corrupt) stay invalid for the whole
     * open, also once allocations pass the offset they name: else they
     * would alias a new cluster.  A writable open reads every table
     * before it allocates (qed_screen_tables() in qed-cluster.c, which
     * says why).
     */
    uint64_t open_end;          /* file_end when every entry was last valid */
    bool entries_checked;       /* the check has vouched for every entry */
    bool tables_screened;       /* every L2 table was read for bad entries */
    bool bad_dropped;           /* and they were dropped in memory */
    QEDBusy screen_busy;        /* one screening at a time */
    GHashTable *bad_entries;    /* L2 offset -> bitmap of its bad entries */
    unsigned long *bad_l1;      /* bitmap of the bad L1 entries, or NULL */
    GArray *bad_ranges;         /* sorted file ranges that bad entries name */
} BDRVQEDState;

/* ---- the metadata lock --------------------------------------------------- */

/*
 * s->lock is held by this coroutine; outside coroutines: this is the main
 * loop's open, close or reopen code (the node is drained, no coroutine of
 * ours runs: drain waits for every one, they hold in-flight counts)
 */
static inline void qed_assert_locked(BDRVQEDState *s)
{
    if (qemu_in_coroutine()) {
        assert(s->lock.holder == qemu_coroutine_self());
    } else {
        assert(qemu_get_current_aio_context() == qemu_get_aio_context());
    }
}

static inline void coroutine_fn qed_lock(BDRVQEDState *s)
{
    qemu_co_mutex_lock(&s->lock);
}

static inline void coroutine_fn qed_unlock(BDRVQEDState *s)
{
    qemu_co_mutex_unlock(&s->lock);
}

/*
 * Around every I/O on a child (and every other yield that is not a
 * CoQueue wait given s->lock): the lock is released while it runs
 */
static inline void coroutine_fn qed_unlock_io(BDRVQEDState *s)
{
    qed_assert_locked(s);
    qemu_co_mutex_unlock(&s->lock);
}

static inline void coroutine_fn qed_relock_io(BDRVQEDState *s)
{
    qemu_co_mutex_lock(&s->lock);
}

/* @call (an I/O on a child, a yield) with s->lock released; its value */
#define QED_UNLOCKED(s, call) ({            \
    typeof(call) qed_unlocked_ret_;         \
    qed_unlock_io(s);                       \
    qed_unlocked_ret_ = (call);             \
    qed_relock_io(s);                       \
    qed_unlocked_ret_;                      \
})

/* The same for a call with no value */
#define QED_UNLOCKED_VOID(s, call) do {     \
    qed_unlock_io(s);                       \
    call;                                   \
    qed_relock_io(s);                       \
} while (0)

/*
 * A blkdebug event (BLKDBG_CO_EVENT on bs->file): blkdebug's breakpoints
 * (the iotests') suspend the coroutine there, a yield, so s->lock is
 * released around it when the file handles events at all (only blkdebug
 * does): as at any yield.  Without such a handler nothing is released,
 * and no release point is added to the driver's normal runs.
 */
static inline void coroutine_fn GRAPH_RDLOCK
qed_event(BDRVQEDState *s, BlkdebugEvent evt)
{
    BlockDriverState *file = s->bs->file ? s->bs->file->bs : NULL;

    if (file && file->drv && file->drv->bdrv_co_debug_event) {
        qed_unlock_io(s);
        bdrv_co_debug_event(file, evt);
        qed_relock_io(s);
    }
}

static inline void qed_busy_init(QEDBusy *b)
{
    b->owner = NULL;
    qemu_co_queue_init(&b->waiters);
}

/* Take @b, waiting (with s->lock released) while another coroutine has it */
static inline void coroutine_fn qed_busy_enter(BDRVQEDState *s, QEDBusy *b)
{
    qed_assert_locked(s);
    assert(b->owner != qemu_coroutine_self());
    while (b->owner) {
        qemu_co_queue_wait(&b->waiters, &s->lock);
    }
    b->owner = qemu_coroutine_self();
}

static inline void coroutine_fn qed_busy_leave(BDRVQEDState *s, QEDBusy *b)
{
    qed_assert_locked(s);
    assert(b->owner == qemu_coroutine_self());
    b->owner = NULL;
    qemu_co_queue_restart_all(&b->waiters);
}

static inline bool qed_busy_held(QEDBusy *b)
{
    return b->owner == qemu_coroutine_self();
}

/* Geometry helpers */
static inline uint64_t qed_table_bytes(BDRVQEDState *s)
{
    return (uint64_t)s->header.table_size * s->header.cluster_size;
}

/* What the tables can address; saturates where that passes 2^64 - 1 */
static inline uint64_t qed_max_image_size(uint32_t cluster_size,
                                          uint32_t table_size)
{
    uint64_t nelems = (uint64_t)table_size * cluster_size / sizeof(uint64_t);
    uint64_t max;

    if (__builtin_mul_overflow(nelems, nelems, &max) ||
        __builtin_mul_overflow(max, (uint64_t)cluster_size, &max)) {
        return UINT64_MAX;
    }
    return max;
}

static inline uint64_t qed_offset_into_cluster(BDRVQEDState *s, uint64_t off)
{
    return off & (s->header.cluster_size - 1);
}

static inline uint64_t qed_start_of_cluster(BDRVQEDState *s, uint64_t off)
{
    return off & ~(uint64_t)(s->header.cluster_size - 1);
}

static inline unsigned int qed_l1_index(BDRVQEDState *s, uint64_t pos)
{
    return pos >> s->l1_shift;
}

static inline unsigned int qed_l2_index(BDRVQEDState *s, uint64_t pos)
{
    return (pos >> s->l2_shift) & s->l2_mask;
}

/*
 * Is @offset a plausible cluster offset: aligned, after the header, clear
 * of the L1 table and inside the allocated part of the file?  Tables also
 * need @bytes to fit.  (A corrupt entry into the L1 table would have guest
 * writes land on the table on disk, under its copy in memory.)
 */
static inline bool qed_offset_valid(BDRVQEDState *s, uint64_t offset,
                                    uint64_t bytes)
{
    uint64_t header_end = (uint64_t)s->header.header_size *
                          s->header.cluster_size;
    uint64_t l1_start = s->header.l1_table_offset;

    return qed_offset_into_cluster(s, offset) == 0 &&
           offset >= header_end &&
           offset <= s->file_end && bytes <= s->file_end - offset &&
           (offset + bytes <= l1_start ||
            offset >= l1_start + qed_table_bytes(s));
}

bool qed_in_table_list(const void *list, size_t n, size_t stride,
                       uint64_t table_bytes, uint64_t offset);
bool qed_in_l2_table(BDRVQEDState *s, uint64_t offset);

/*
 * A plausible data cluster is also clear of every L2 table: a guest write
 * there would land on the table on disk, under its copy in the cache.
 */
static inline bool qed_data_offset_valid(BDRVQEDState *s, uint64_t offset)
{
    return qed_offset_valid(s, offset, s->header.cluster_size) &&
           !qed_in_l2_table(s, offset);
}

static inline bool qed_is_data_offset(uint64_t entry)
{
    return entry > QED_L2_ZERO;
}

/* Allocations whose data is still on its way (s->lock) */
static inline bool qed_allocs_in_flight(BDRVQEDState *s)
{
    return !QLIST_EMPTY(&s->allocs);
}

/* qed.c: the driver */
void qed_report_corruption(BDRVQEDState *s, const char *fmt, ...)
    G_GNUC_PRINTF(2, 3);
int coroutine_fn GRAPH_RDLOCK
qed_read_backing(BDRVQEDState *s, uint64_t pos, uint64_t bytes,
                 QEMUIOVector *qiov, size_t qiov_offset);

/* qed-timer.c: NEED_CHECK's clearing, the timers, the drain */
int coroutine_fn GRAPH_RDLOCK
qed_clear_need_check(BDRVQEDState *s);
void qed_arm_timer(BDRVQEDState *s);
void qed_cancel_timer(BDRVQEDState *s);
bool qed_may_write_header(BDRVQEDState *s);
void qed_need_check_timer_cb(void *opaque);
void qed_cache_clean_timer_init(BDRVQEDState *s, AioContext *ctx);
void qed_cache_clean_timer_del(BDRVQEDState *s);
void qed_attach_aio_context(BlockDriverState *bs, AioContext *new_context);
void qed_detach_aio_context(BlockDriverState *bs);
void qed_drain_begin(BlockDriverState *bs);

/* qed-header.c: the header, its validation and its one writer */
void qed_header_le_to_cpu(const QEDHeader *le, QEDHeader *cpu);
void qed_header_cpu_to_le(const QEDHeader *cpu, QEDHeader *le);
int qed_validate_geometry(uint64_t cluster_size, int64_t table_size,
                       Error **errp);
int qed_validate_image_size(uint64_t size, uint64_t cluster_size,
                         uint64_t table_size, Error **errp);
int qed_validate_header(QEDHeader *h, int64_t file_size, Error **errp);
bool qed_backing_name_fits(uint64_t header_bytes, uint64_t len, Error **errp);
int coroutine_fn GRAPH_RDLOCK
qed_update_header(BDRVQEDState *s, const QEDHeader *h);
bool qed_has_backing_file(BDRVQEDState *s);
int coroutine_fn GRAPH_RDLOCK
qed_raise_need_check(BDRVQEDState *s);
int coroutine_fn GRAPH_RDLOCK
qed_set_need_check(BDRVQEDState *s);
int coroutine_fn GRAPH_RDLOCK
qed_co_change_backing(BDRVQEDState *s, void *opaque);

/* qed-alloc.c: claims, file space and the file's size */
bool coroutine_fn qed_claim(BDRVQEDState *s, QEDAllocation *a,
                            uint64_t start, uint64_t end);
void qed_release(BDRVQEDState *s, QEDAllocation *a);
void coroutine_fn qed_wait_resize(BDRVQEDState *s, uint64_t end);
int coroutine_fn GRAPH_RDLOCK
qed_resize_file(BDRVQEDState *s, uint64_t size);
int coroutine_fn GRAPH_RDLOCK
qed_secure_space(BDRVQEDState *s, QEDDirtyTable *t);
void qed_free_space_init(BDRVQEDState *s);
void qed_free_space_destroy(BDRVQEDState *s);
uint64_t qed_free_space_bytes(BDRVQEDState *s);
void qed_free_space_forget(BDRVQEDState *s);
int coroutine_fn GRAPH_RDLOCK
qed_mark_clusters(BDRVQEDState *s, uint64_t start, unsigned int n,
                  uint64_t value);
int64_t coroutine_fn GRAPH_RDLOCK
qed_allocating_write(BDRVQEDState *s, uint64_t pos, uint64_t bytes,
                     QEDExtentType type, QEMUIOVector *qiov,
                     size_t qiov_offset);

/* qed-writeback.c: the writeback passes of dirty table sectors */
bool qed_tables_dirty(BDRVQEDState *s);
int coroutine_fn GRAPH_RDLOCK
qed_writeback(BDRVQEDState *s);
void qed_wb_free_buffers(BDRVQEDState *s);
void coroutine_fn GRAPH_RDLOCK
qed_wb_throttle(BDRVQEDState *s);

/* qed-create.c: create, measure, amend */
extern QemuOptsList qed_create_opts;
extern QemuOptsList qed_amend_opts;
int coroutine_fn GRAPH_UNLOCKED
qed_co_create(BlockdevCreateOptions *opts, Error **errp);
int coroutine_fn GRAPH_UNLOCKED
qed_co_create_opts(BlockDriver *drv, const char *filename, QemuOpts *opts,
                   Error **errp);
int GRAPH_RDLOCK
qed_amend_options(BlockDriverState *bs, QemuOpts *opts,
                  BlockDriverAmendStatusCB *status_cb, void *cb_opaque,
                  bool force, Error **errp);
BlockMeasureInfo *qed_measure(QemuOpts *opts, BlockDriverState *in_bs,
                              Error **errp);

/*
 * qed-table.c: table memory, dirty sectors and table I/O; table entries
 * change byte order only here
 */
QEDTable *qed_table_buf_new(BDRVQEDState *s);
void qed_table_buf_free(QEDTable *buf);
QEDTable *qed_table_new(size_t bytes);
void qed_table_free(QEDTable *table, size_t bytes);
int qed_dirty_table_init(QEDDirtyTable *t, uint64_t offset, size_t bytes);
void qed_dirty_table_destroy(QEDDirtyTable *t, size_t bytes);
unsigned int qed_dirty_set(QEDDirtyTable *t, unsigned int first,
                           unsigned int n);
unsigned int qed_dirty_clear(QEDDirtyTable *t, unsigned int first,
                             unsigned int n);
void qed_table_snapshot(const uint64_t *entries, unsigned int n,
                        uint64_t *dest);
int coroutine_fn GRAPH_RDLOCK
qed_write_table_snapshot(BDRVQEDState *s, uint64_t table_offset,
                         unsigned int first, unsigned int n,
                         const uint64_t *snapshot);
int coroutine_fn GRAPH_RDLOCK
qed_read_table(BDRVQEDState *s, uint64_t offset, QEDTable *table);
int coroutine_fn GRAPH_RDLOCK
qed_write_table(BDRVQEDState *s, uint64_t offset, QEDTable *table,
                unsigned int index, unsigned int n);
int coroutine_fn GRAPH_RDLOCK
qed_read_table_entries(BDRVQEDState *s, uint64_t table_offset,
                       unsigned int first, unsigned int n, uint64_t *entries);
int coroutine_fn GRAPH_RDLOCK
qed_read_l1_table(BDRVQEDState *s);
void qed_l2_starts_rebuild(BDRVQEDState *s);
void qed_l2_starts_add(BDRVQEDState *s, uint64_t offset);
int coroutine_fn GRAPH_RDLOCK
qed_write_l1_table(BDRVQEDState *s, QEDTable *l1, unsigned int index,
                   unsigned int n);
int coroutine_fn GRAPH_RDLOCK
qed_read_tables(BDRVQEDState *s, uint64_t offset, unsigned int n,
                QEDTable **tables);

/* qed-l2-cache.c: pure memory */
QEDL2Cache *qed_l2_cache_new(uint64_t max_bytes, size_t table_bytes);
void qed_l2_cache_free(QEDL2Cache *c);
QEDCachedTable *qed_l2_cache_find(QEDL2Cache *c, uint64_t offset);
QEDCachedTable *qed_l2_cache_insert(QEDL2Cache *c, uint64_t offset,
                                    bool fresh);
QEDDirtyTable *qed_l2_cache_table(QEDCachedTable *e);
void qed_l2_cache_set_lock(QEDL2Cache *c, CoMutex *lock);
void coroutine_fn qed_l2_cache_lock_chunks(QEDCachedTable *e,
                                          CoMutex *lock);
void coroutine_fn qed_l2_cache_unlock_chunks(QEDCachedTable *e);
void qed_l2_cache_loaded(QEDL2Cache *c, QEDCachedTable *e,
                         unsigned long first, unsigned long n);
void qed_l2_cache_unref(QEDL2Cache *c, QEDCachedTable *e);
void qed_l2_cache_drop(QEDL2Cache *c, uint64_t offset);
void qed_l2_cache_clear(QEDL2Cache *c);
void qed_l2_cache_set_max(QEDL2Cache *c, uint64_t max_bytes);
void qed_l2_cache_mark_dirty(QEDL2Cache *c, QEDCachedTable *e,
                             unsigned int first_sector, unsigned int n);
bool qed_l2_cache_take_dirty(QEDL2Cache *c, QEDCachedTable *e,
                             unsigned int first_sector, unsigned int n);
void qed_l2_cache_write_failed(QEDL2Cache *c, QEDCachedTable *e,
                               unsigned int first_sector, unsigned int n,
                               bool fresh);
void qed_l2_cache_settle(QEDL2Cache *c, QEDCachedTable *e);
GPtrArray *qed_l2_cache_dirty_tables(QEDL2Cache *c);
unsigned int qed_l2_cache_forget_dirty(QEDL2Cache *c);
void qed_l2_cache_stats(QEDL2Cache *c, QEDL2CacheStats *st);
void qed_l2_cache_table_info(QEDCachedTable *e, QEDCachedTableInfo *info);
uint64_t qed_l2_cache_clean_unused(QEDL2Cache *c);

/* qed-cluster.c */
void qed_screen_init(BDRVQEDState *s);
void qed_screen_reset(BDRVQEDState *s);
void qed_screen_destroy(BDRVQEDState *s);
void qed_screen_new_table(BDRVQEDState *s, uint64_t l2_offset);
void qed_screen_forget(BDRVQEDState *s, uint64_t l2_offset,
                       unsigned int first, unsigned int n);
uint64_t qed_screen_skip(BDRVQEDState *s, uint64_t offset, uint64_t bytes);
void coroutine_fn GRAPH_RDLOCK
qed_screen_settle(BDRVQEDState *s);
int coroutine_fn GRAPH_RDLOCK
qed_get_l2_table(BDRVQEDState *s, uint64_t l2_offset, QEDCachedTable **entry);
int coroutine_fn GRAPH_RDLOCK
qed_l2_ensure(BDRVQEDState *s, QEDCachedTable *e, unsigned int first,
              unsigned int end);
int coroutine_fn GRAPH_RDLOCK
qed_find_extent(BDRVQEDState *s, uint64_t pos, uint64_t bytes, QEDExtent *ext);

/* qed-check.c */
int coroutine_fn GRAPH_RDLOCK
qed_check(BDRVQEDState *s, BdrvCheckResult *result, BdrvCheckMode fix,
          bool quiet);

/* qed-compact.c: inner leaks reclaimed by moving clusters in use */
#define QED_COMPACT_STUCK 1
int coroutine_fn GRAPH_RDLOCK
qed_compact(BDRVQEDState *s, unsigned long *used, uint64_t nbits,
            uint64_t *moved);

#endif /* BLOCK_QED_H */

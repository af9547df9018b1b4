/*
 * QED: table entries and their writeback
 *
 * Entries change in memory (cached L2 tables, the L1 table); their dirty
 * sectors are written back in passes, in the order the crash rules ask
 * for (data, L2 sectors, flush, L1 sectors), throttled so that the dirty
 * part stays bounded.
 *
 * This work is licensed under the terms of the GNU LGPL, version 2 or later.
 * See the COPYING.LIB file in the top-level directory.
 */

#include "qemu/osdep.h"
#include "block/aio_task.h"
#include "qemu/bitmap.h"
#include "qapi/error.h"
#include "qemu/error-report.h"
#include "qemu/memalign.h"
#include "qemu/units.h"
#include "trace.h"
#include "qed.h"

/*
 * Dirty table sectors (32 MiB) that start a writeback pass in the
 * background, and the count beyond which an allocating write waits for a
 * pass.  They bound the work a flush finds left to do.  The memory that
 * dirty tables hold is bounded by l2-cache-size (qed_wb_throttle).
 */
#define QED_WB_SOFT_SECTORS 65536
#define QED_WB_HARD_SECTORS (4 * QED_WB_SOFT_SECTORS)

/* Table sector writes of one writeback pass in flight at once */
#define QED_WB_PARALLEL 16

/*
 * Dirty runs of one table with at most this many clean sectors between
 * them go in one write: rewriting 64 KiB of clean entries costs less
 * than another request.
 */
#define QED_WB_MAX_GAP 128

/*
 * How far past l2-cache-size dirty chunks may take the cache before an
 * allocating write waits for a writeback pass, whatever the limit (within
 * the memory bound, l2-cache-size + 16 MiB for the whole process).  An
 * eighth of the limit, as it once was, made every write to a one-table
 * cache (4 KiB) wait for a pass of its own: 1.9 to 3.0 times the time of
 * a cache that holds the working set; with 2 MiB, 1.0 to 1.3 (issue 18).
 */
#define QED_WB_MEMORY_SLACK (2 * MiB)

/* ---- table entries and their writeback ---------------------------------- */

/*
 * Table entries change in memory: in the cached L2 tables and the L1
 * table, whose changed sectors are marked dirty.  Writeback passes write
 * the dirty sectors: on a flush, when many are dirty, when the image goes
 * idle, on drain and close.  So a write is acknowledged once its data is
 * on disk, many allocations share one sector write, and with a backing
 * file one flush serves a whole pass.
 */

bool qed_tables_dirty(BDRVQEDState *s)
{
    QEDL2CacheStats st;

    qed_l2_cache_stats(s->l2_cache, &st);
    return st.dirty_tables > 0 || s->l1.ndirty > 0;
}

/* One run of adjacent dirty sectors of a table, copied for writing */
typedef struct QEDWbJob {
    QEDDirtyTable *t;
    QEDCachedTable *e;          /* the L2 table's cache entry; NULL: L1 */
    unsigned int first;         /* in sectors */
    unsigned int n;
    bool fresh;                 /* the first write of a new L2 table */
    uint64_t *snapshot;
    int ret;                    /* -EINPROGRESS until written */
} QEDWbJob;

typedef struct QEDWbTask {
    AioTask task;
    BDRVQEDState *s;
    QEDWbJob *job;
} QEDWbTask;

/*
 * Where the snapshots of one batch go: one buffer, carved at the file's
 * memory alignment, so that the memory a batch takes is what it counts
 * (a separate aligned allocation per run would cost a page for a sector)
 */
typedef struct QEDWbArena {
    uint8_t *buf;
    size_t size;
    size_t used;
    size_t align;
} QEDWbArena;

/*
 * @a over *@buf, a buffer of @size bytes made at the first pass and kept
 * for the open (passes run one at a time): a pass allocates nothing
 */
static void GRAPH_RDLOCK
qed_wb_arena_init(BDRVQEDState *s, QEDWbArena *a, void **buf, size_t size)
{
    if (!*buf) {
        *buf = qemu_blockalign(s->bs->file->bs, size);
    }
    a->buf = *buf;
    a->size = size;
    a->used = 0;
    a->align = MAX(bdrv_min_mem_align(s->bs->file->bs), BDRV_SECTOR_SIZE);
}

/* At close: the buffers of qed_wb_arena_init() */
void qed_wb_free_buffers(BDRVQEDState *s)
{
    qemu_vfree(s->wb_l2_buf);
    s->wb_l2_buf = NULL;
    qemu_vfree(s->wb_l1_buf);
    s->wb_l1_buf = NULL;
}

/* Whole sectors left in @a */
static size_t qed_wb_arena_room(QEDWbArena *a)
{
    size_t start = ROUND_UP(a->used, a->align);

    return start < a->size ? (a->size - start) / BDRV_SECTOR_SIZE : 0;
}

static uint64_t *qed_wb_arena_take(QEDWbArena *a, size_t bytes)
{
    size_t start = ROUND_UP(a->used, a->align);

    assert(start + bytes <= a->size);
    a->used = start + bytes;
    return (uint64_t *)(a->buf + start);
}

/*
 * Do sectors [first, end) of @t hold the disk's entries, so that writing
 * them back is safe even where they are clean?
 */
static bool qed_wb_loaded(BDRVQEDState *s, QEDDirtyTable *t,
                          unsigned long first, unsigned long end)
{
    unsigned long spc = s->chunk_entries / QED_ENTRIES_PER_SECTOR;
    unsigned long last = (end - 1) / spc;

    return !t->loaded ||
           find_next_zero_bit(t->loaded, last + 1, first / spc) > last;
}

/*
 * Snapshot dirty sectors of @t (@e: its cache entry, NULL for the L1
 * table) into @jobs, one job per run, runs joined across short clean
 * gaps, as long as @arena has room.  Returns true when no dirty sector of
 * @t is left to collect.
 */
static bool qed_wb_collect(BDRVQEDState *s, QEDDirtyTable *t,
                           QEDCachedTable *e, GArray *jobs, QEDWbArena *arena)
{
    unsigned int nsectors = s->table_nsectors;
    unsigned long i = find_first_bit(t->dirty, nsectors);
    size_t room;

    qed_assert_locked(s);
    while (i < nsectors && (room = qed_wb_arena_room(arena)) > 0) {
        unsigned long max_end = i + room;
        unsigned long end = find_next_zero_bit(t->dirty, nsectors, i);
        unsigned long next;

        while ((next = find_next_bit(t->dirty, nsectors, end)) < nsectors &&
               next - end <= QED_WB_MAX_GAP && next < max_end &&
               qed_wb_loaded(s, t, end, next)) {
            end = find_next_zero_bit(t->dirty, nsectors, next);
        }
        end = MIN(end, max_end);

        QEDWbJob job = {
            .t = t,
            .e = e,
            .first = i,
            .n = end - i,
            .snapshot = qed_wb_arena_take(arena,
                                          (end - i) * BDRV_SECTOR_SIZE),
            .ret = -EINPROGRESS,
        };

        qed_table_snapshot(&t->table->offsets[i * QED_ENTRIES_PER_SECTOR],
                           (end - i) * QED_ENTRIES_PER_SECTOR, job.snapshot);
        if (e) {
            job.fresh = qed_l2_cache_take_dirty(s->l2_cache, e, i, end - i);
        } else {
            qed_dirty_clear(t, i, end - i);
        }
        g_array_append_val(jobs, job);
        i = find_next_bit(t->dirty, nsectors, end);
    }
    return i >= nsectors;
}

/*
 * This function can count as GRAPH_RDLOCK because qed_wb_write() holds
 * the graph lock and keeps it until this coroutine has terminated
 * (aio_task_pool_wait_all()), as qcow2's task entries do.  A coroutine of
 * its own: it takes s->lock (its spawner released it, and holds wb_busy
 * for the pass).
 */
static int coroutine_fn GRAPH_RDLOCK
qed_wb_task_run(AioTask *task)
{
    QEDWbTask *t = container_of(task, QEDWbTask, task);
    BDRVQEDState *s = t->s;
    QEDWbJob *job = t->job;
    QEDDirtyTable *table = job->t;
    int ret;

    qed_lock(s);
    if (job->e) {
        qed_event(s, job->fresh ? BLKDBG_L2_ALLOC_WRITE : BLKDBG_L2_UPDATE);
        trace_qed_l2_update(s, table->offset,
                            job->first * QED_ENTRIES_PER_SECTOR,
                            job->n * QED_ENTRIES_PER_SECTOR);
    } else {
        qed_event(s, BLKDBG_L1_UPDATE);
    }
    /* Not while the table's holes are being allocated (qed_secure_space) */
    for (;;) {
        /* A new table may lie past a size change in flight (ordering 7) */
        qed_wait_resize(s, table->offset +
                           (uint64_t)(job->first + job->n) * BDRV_SECTOR_SIZE);
        if (!table->space_busy) {
            break;
        }
        qemu_co_queue_wait(&s->making_waiters, &s->lock);
    }
    table->wb_inflight++;
    ret = qed_write_table_snapshot(s, table->offset,
                                   job->first * QED_ENTRIES_PER_SECTOR,
                                   job->n * QED_ENTRIES_PER_SECTOR,
                                   job->snapshot);
    job->ret = ret;
    table->wb_inflight--;
    qemu_co_queue_restart_all(&s->making_waiters);
    qed_unlock(s);
    return ret;
}

/* Write @jobs, several at once; the first error is returned */
static int coroutine_fn GRAPH_RDLOCK
qed_wb_write(BDRVQEDState *s, GArray *jobs)
{
    AioTaskPool *pool = aio_task_pool_new(QED_WB_PARALLEL);
    int ret;

    /*
     * The tasks take s->lock themselves, and starting one may wait for a
     * slot (a plain yield): the lock is released for the whole of it.
     * @jobs is the pass's own (wb_busy), so is every snapshot.
     */
    qed_unlock_io(s);
    for (unsigned int i = 0; i < jobs->len; i++) {
        QEDWbTask *t = g_new(QEDWbTask, 1);

        *t = (QEDWbTask) {
            .task.func = qed_wb_task_run,
            .s = s,
            .job = &g_array_index(jobs, QEDWbJob, i),
        };
        aio_task_pool_start_task(pool, &t->task);
    }
    aio_task_pool_wait_all(pool);
    ret = aio_task_pool_status(pool);
    aio_task_pool_free(pool);
    qed_relock_io(s);
    return ret;
}

/*
 * After @jobs were written (or not): what did not reach the disk is dirty
 * again, for the next pass; the snapshots and the jobs' references go.
 */
static void qed_wb_finish(BDRVQEDState *s, GArray *jobs)
{
    QEDL2Cache *c = s->l2_cache;

    qed_assert_locked(s);
    for (unsigned int i = 0; i < jobs->len; i++) {
        QEDWbJob *job = &g_array_index(jobs, QEDWbJob, i);

        if (job->ret != 0) {
            if (job->e) {
                qed_l2_cache_write_failed(c, job->e, job->first, job->n,
                                          job->fresh);
            } else {
                qed_dirty_set(job->t, job->first, job->n);
            }
        }
    }
    /* Jobs hold references, so no table goes before all are settled */
    for (unsigned int i = 0; i < jobs->len; i++) {
        QEDWbJob *job = &g_array_index(jobs, QEDWbJob, i);

        if (job->e) {
            qed_l2_cache_settle(c, job->e);
        }
    }
    for (unsigned int i = 0; i < jobs->len; i++) {
        QEDWbJob *job = &g_array_index(jobs, QEDWbJob, i);

        if (job->e) {
            qed_l2_cache_unref(c, job->e);
        }
    }
    g_array_set_size(jobs, 0);
}

/*
 * A flush of the file, for the crash ordering of a writeback pass.  Table
 * sectors written before it are durable once it succeeds (passes run one
 * at a time, so every earlier table write has completed), and so is the
 * data of every entry set before it started (@gen: s->l2_gen then).
 */
static int coroutine_fn GRAPH_RDLOCK
qed_wb_flush(BDRVQEDState *s, uint64_t *gen)
{
    uint64_t start_gen = s->l2_gen;
    int ret;

    qed_event(s, BLKDBG_FLUSH_TO_DISK);
    ret = QED_UNLOCKED(s, bdrv_co_flush(s->bs->file->bs));
    trace_qed_wb_flush(s, s->wb_tables_unflushed, ret);
    if (ret == 0) {
        s->wb_tables_unflushed = false;
        s->wb_flushed_gen = MAX(s->wb_flushed_gen, start_gen);
        *gen = start_gen;
    }
    return ret;
}

/*
 * Write the dirty sectors of @tables (cache entries, each with a
 * reference), in batches of at most QED_WB_MAX_BATCH_BYTES of snapshots
 * (one buffer, reused by every batch and pass), so that a pass over many
 * tables never copies them all at once.
 *
 * Crash orderings 1 and 3: with a backing file, the data of every entry
 * in a batch must be on disk before the batch is written.  The data was
 * written before the entry was set in memory (qed_set_entries), so a
 * flush that started after the entry was set covers it: one flush before
 * the first batch, and one before a later batch only if entries were set
 * since the last flush started (s->l2_gen moved).  The flush also puts the
 * file's new size on disk.
 */
static int coroutine_fn GRAPH_RDLOCK
qed_wb_write_l2(BDRVQEDState *s, GPtrArray *tables)
{
    GArray *jobs = g_array_new(false, false, sizeof(QEDWbJob));
    bool flushed = false;
    uint64_t flushed_gen = 0;
    QEDWbArena arena;
    unsigned int i = 0;
    int ret = 0;

    qed_wb_arena_init(s, &arena, &s->wb_l2_buf, QED_WB_MAX_BATCH_BYTES);
    if (s->wb_batch_bytes) {
        /* x-writeback-batch: the schedule harness's memory-pressure seeds */
        arena.size = s->wb_batch_bytes;
    }
    while (ret == 0 && i < tables->len) {
        arena.used = 0;
        while (i < tables->len && qed_wb_arena_room(&arena) > 0) {
            QEDCachedTable *e = g_ptr_array_index(tables, i);

            if (qed_wb_collect(s, qed_l2_cache_table(e), e, jobs, &arena)) {
                i++;
            }
        }
        if (jobs->len == 0) {
            continue;
        }
        /*
         * Without a backing file too when entries point at space that a
         * failed write had taken (qed_reserve): its bytes must not show
         * through them after a crash
         */
        if ((qed_has_backing_file(s) || s->reuse_gen > s->wb_flushed_gen) &&
            (!flushed || flushed_gen != s->l2_gen)) {
            ret = qed_wb_flush(s, &flushed_gen);
            flushed = true;
        }
        if (ret == 0) {
            /* Until a flush succeeds, even if some of the writes failed */
            s->wb_tables_unflushed = true;
            ret = qed_wb_write(s, jobs);
        }
        trace_qed_writeback(s, jobs->len, 0, ret);
        qed_wb_finish(s, jobs);
    }
    g_array_free(jobs, true);
    return ret;
}

/*
 * One writeback pass: every sector dirty when it starts reaches the disk,
 * or stays dirty (and the pass fails) if its write failed.  Passes run one
 * at a time, so two writes of one sector are never in flight together and
 * a flush that waits for wb_busy also waits for a pass that started
 * before it.
 *
 * Crash ordering, in this order:
 * - 4: without a backing file NEED_CHECK is on disk before any entry is
 *   written: the check repairs entries over data that never landed, and
 *   L1 entries over tables that did not.
 * - 1 and 3: see qed_wb_write_l2(): with a backing file, data and the
 *   file's size are flushed before the L2 sectors that point at them.
 * - 2: a new L2 table is written before the L1 entry that points at it:
 *   the L1 snapshot is taken when the pass starts, together with the list
 *   of dirty L2 tables (a new table is dirty from the moment its L1 entry
 *   is set, qed_make_table), so it names only tables that this pass or an
 *   earlier one writes first; with a backing file a flush separates the
 *   two.  A table whose flush failed stays unflushed (wb_tables_unflushed)
 *   until a later flush succeeds: the next pass flushes before its L1
 *   writes even if it writes no L2 sector.
 * Sectors of a new table that were never written hold zeros on disk
 * (qed_make_table wrote them), so only dirty sectors are written.
 */
int coroutine_fn qed_writeback(BDRVQEDState *s)
{
    GArray *l1_jobs;
    GPtrArray *tables;
    QEDWbArena l1_arena;
    uint64_t gen;
    bool all;
    int ret;

    qed_assert_locked(s);
    /* Bad entries that allocations have passed go with this pass */
    qed_screen_settle(s);

    qed_busy_enter(s, &s->wb_busy);
    if (!qed_tables_dirty(s)) {
        qed_busy_leave(s, &s->wb_busy);
        return 0;
    }

    ret = qed_set_need_check(s);
    if (ret < 0) {
        qed_busy_leave(s, &s->wb_busy);
        return ret;
    }

    tables = qed_l2_cache_dirty_tables(s->l2_cache);
    l1_jobs = g_array_new(false, false, sizeof(QEDWbJob));
    /*
     * Room for the whole table and the alignment of every run: runs are
     * more than QED_WB_MAX_GAP sectors apart, so the pass takes every
     * dirty L1 sector (a flush relies on it)
     */
    qed_wb_arena_init(s, &l1_arena, &s->wb_l1_buf, qed_table_bytes(s) +
                      (s->table_nsectors / QED_WB_MAX_GAP + 2) *
                      MAX(bdrv_min_mem_align(s->bs->file->bs),
                          BDRV_SECTOR_SIZE));
    all = qed_wb_collect(s, &s->l1, NULL, l1_jobs, &l1_arena);
    assert(all);

    ret = qed_wb_write_l2(s, tables);
    if (ret == 0 && l1_jobs->len > 0) {
        /*
         * Also when this pass wrote no L2 sector: the flush after a new
         * table's write in an earlier pass may have failed, and the L1
         * entry that points at it must not reach the disk before the table
         */
        if (qed_has_backing_file(s) && s->wb_tables_unflushed) {
            ret = qed_wb_flush(s, &gen);
        }
        if (ret == 0) {
            ret = qed_wb_write(s, l1_jobs);
        }
        trace_qed_writeback(s, 0, l1_jobs->len, ret);
    }
    qed_wb_finish(s, l1_jobs);
    g_array_free(l1_jobs, true);

    for (unsigned int i = 0; i < tables->len; i++) {
        qed_l2_cache_settle(s->l2_cache, g_ptr_array_index(tables, i));
    }
    for (unsigned int i = 0; i < tables->len; i++) {
        qed_l2_cache_unref(s->l2_cache, g_ptr_array_index(tables, i));
    }
    g_ptr_array_free(tables, true);
    qed_busy_leave(s, &s->wb_busy);
    return ret;
}

static void coroutine_fn qed_wb_background_entry(void *opaque)
{
    BDRVQEDState *s = opaque;

    /* A coroutine of our own: it takes the graph reader lock itself */
    GRAPH_RDLOCK_GUARD();

    /*
     * A failure leaves the sectors dirty: the next pass writes them again,
     * and a flush fails if that fails too
     */
    qed_lock(s);
    qed_writeback(s);
    s->wb_background = false;
    qed_unlock(s);
    bdrv_dec_in_flight(s->bs);
}

/*
 * After a change of entries: start a background pass when many sectors
 * are dirty or when the cache holds more than its limit (what it cannot
 * give back is dirty, or in use), and make the writer wait for a pass
 * when far too many are, or when the cache is well past its limit.
 */
void coroutine_fn qed_wb_throttle(BDRVQEDState *s)
{
    QEDL2CacheStats st;
    uint64_t over;

    qed_assert_locked(s);
    qed_l2_cache_stats(s->l2_cache, &st);
    over = st.resident > st.max ? st.resident - st.max : 0;
    if (st.dirty_sectors > QED_WB_HARD_SECTORS || over > QED_WB_MEMORY_SLACK) {
        trace_qed_writeback_wait(s, st.dirty_sectors, over);
        qed_writeback(s);
    } else if ((st.dirty_sectors > QED_WB_SOFT_SECTORS || over > 0) &&
               !s->wb_background) {
        trace_qed_writeback_kick(s, st.dirty_sectors, st.dirty_tables);
        s->wb_background = true;
        bdrv_inc_in_flight(s->bs);
        aio_co_enter(bdrv_get_aio_context(s->bs),
                     qemu_coroutine_create(qed_wb_background_entry, s));
    }
}

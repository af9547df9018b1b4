/*
 * QED: allocation and the file's size
 *
 * Claims on guest clusters whose entries are changing, new file space
 * (file_end), the grow-ahead of the file's length and every other change
 * of that length, new L2 tables and the zeros that secure their space,
 * and the allocating write that ties data, space and entries together.
 *
 * This work is licensed under the terms of the GNU LGPL, version 2 or later.
 * See the COPYING.LIB file in the top-level directory.
 */

#include "qemu/osdep.h"
#include "qemu/bitmap.h"
#include "qapi/error.h"
#include "qemu/error-report.h"
#include "qemu/memalign.h"
#include "qemu/units.h"
#include "trace.h"
#include "qed.h"

/* The file grows ahead of allocation by this much at least */
#define QED_FILE_GROW_STEP (32 * MiB)

/*
 * Zeros written as data (qed_write_zero_data) come from one buffer of
 * this size, repeated in the request's I/O vector: however many new
 * tables are being made at once, they share it.  A request covers at most
 * QED_ZERO_WRITE_MAX bytes.
 */
#define QED_ZERO_BUF_BYTES (64 * KiB)
#define QED_ZERO_WRITE_MAX (16 * MiB)

/* ---- allocation bookkeeping --------------------------------------------- */

static QEDAllocation *qed_find_alloc(BDRVQEDState *s, uint64_t start,
                                     uint64_t end)
{
    QEDAllocation *a;

    QLIST_FOREACH(a, &s->allocs, next) {
        if (a->start < end && start < a->end) {
            return a;
        }
    }
    return NULL;
}

/*
 * Claim the clusters [start, end) for a change of their table entries.
 * Returns false, after waiting for the one in the way to finish, if
 * another request holds any of them: the caller must look up again.
 *
 * A claim does not vouch that the entries are still what the caller's
 * lookup found (a request that claimed them since may have set them):
 * the claimer checks them once their table is loaded
 * (qed_claimed_entries_are()).  Why not refuse the claim when any entry
 * anywhere changed since the lookup (s->l2_gen moved): under load some
 * entry always has.  With a small L2 cache every lookup waits for a table
 * read, other writers set entries meanwhile, and about half of the claims
 * failed and looked up (and read their table) again, for entries that
 * nobody else had touched.
 */
bool coroutine_fn qed_claim(BDRVQEDState *s, QEDAllocation *a,
                            uint64_t start, uint64_t end)
{
    qed_assert_locked(s);
    if (qed_find_alloc(s, start, end)) {
        qemu_co_queue_wait(&s->alloc_waiters, &s->lock);
        return false;
    }
    a->start = start;
    a->end = end;
    QLIST_INSERT_HEAD(&s->allocs, a, next);
    if (s->allocating_writes++ == 0) {
        qed_cancel_timer(s);
    }
    return true;
}

/*
 * Under a claim, with the table that maps the claimed clusters loaded:
 * are entries [@first, @first + @n) of @e (NULL: there is no table, all
 * are unallocated) all @value, what the claimer's lookup found?  Entries
 * of guest clusters change only under a claim (bad entries dropped by
 * qed_screen_drop() are never handed out by a lookup), and this claim
 * holds them now, so the answer stays true until the release.  If false,
 * another request set them after the lookup looked at them (a lookup that
 * spans two tables scans the first one before it waits for the second
 * one's read): the caller releases its claim and looks up again.
 */
static bool qed_claimed_entries_are(QEDCachedTable *e, unsigned int first,
                                    unsigned int n, uint64_t value)
{
    const uint64_t *entries;

    if (!e) {
        return value == QED_L2_UNALLOCATED;
    }
    entries = qed_l2_cache_table(e)->table->offsets;
    for (unsigned int i = first; i < first + n; i++) {
        if (entries[i] != value) {
            return false;
        }
    }
    return true;
}

void qed_release(BDRVQEDState *s, QEDAllocation *a)
{
    qed_assert_locked(s);
    QLIST_REMOVE(a, next);
    qemu_co_queue_restart_all(&s->alloc_waiters);
    qemu_co_queue_restart_all(&s->idle_waiters);
    assert(s->allocating_writes > 0);
    if (--s->allocating_writes == 0) {
        qed_arm_timer(s);
    }
}

/*
 * Space that this open reserved and then could not use (a failed data
 * write or table making: ENOSPC, EIO), by file offset.  Nothing points at
 * it, so it is reused before new space is taken at file_end, and a run
 * that reaches file_end is given back at once, so that a full disk leaves
 * no tail; a clean close moves clusters in use into what is left
 * (qed_reclaim_free_space in qed.c).  Its bytes are what part of the
 * failed write landed, not zeros: see qed_reserve() for how it is reused.
 * It is not zeroed or punched: on a full disk the blocks that the failed
 * write took are what the close's moves need to start with.
 */
typedef struct QEDFreeRun {
    uint64_t offset;
    uint64_t bytes;
} QEDFreeRun;

void qed_free_space_init(BDRVQEDState *s)
{
    s->free_runs = g_array_new(false, false, sizeof(QEDFreeRun));
}

void qed_free_space_destroy(BDRVQEDState *s)
{
    if (s->free_runs) {
        g_array_free(s->free_runs, true);
        s->free_runs = NULL;
    }
}

/* Clusters reserved by this open that nothing points at, inside the file */
uint64_t qed_free_space_bytes(BDRVQEDState *s)
{
    uint64_t bytes = 0;

    for (guint i = 0; s->free_runs && i < s->free_runs->len; i++) {
        bytes += g_array_index(s->free_runs, QEDFreeRun, i).bytes;
    }
    return bytes;
}

/*
 * Forget every free run: a repair or make_empty recounted the file and cut
 * it at file_end, so nothing past file_end holds a failed write's bytes
 */
void qed_free_space_forget(BDRVQEDState *s)
{
    if (s->free_runs) {
        g_array_set_size(s->free_runs, 0);
    }
    s->garbage_end = 0;
}

/*
 * Entries were just set over space that may hold a failed write's bytes:
 * the next writeback pass flushes before it writes them, even without a
 * backing file (qed_wb_write_l2)
 */
static void qed_note_reuse(BDRVQEDState *s)
{
    s->reuse_gen = ++s->l2_gen;
}

/*
 * Take @bytes of file space: the first free run that is large enough,
 * else new space at file_end, past everything the file held at open and
 * past every earlier allocation, which reads as zeros until written but
 * where a failed write left bytes (below garbage_end).  Never handed out
 * twice while the image is open (but after a check's repair or
 * make_empty, which recount the file from what the disk references).
 *
 * *@reused says that the space may hold a failed write's bytes: the
 * caller writes whole clusters, and the entries that will point there
 * must not reach the disk before that write (qed_note_reuse()): without a
 * backing file an entry is written with no flush after its data (crash
 * ordering 4), and a crash would otherwise leave it over those bytes,
 * which no check can tell from data.
 */
static uint64_t qed_reserve(BDRVQEDState *s, uint64_t bytes, bool *reused)
{
    uint64_t offset;

    qed_assert_locked(s);
    for (guint i = 0; i < s->free_runs->len; i++) {
        QEDFreeRun *r = &g_array_index(s->free_runs, QEDFreeRun, i);

        if (r->bytes >= bytes) {
            offset = r->offset;
            r->offset += bytes;
            r->bytes -= bytes;
            if (r->bytes == 0) {
                g_array_remove_index(s->free_runs, i);
            }
            *reused = true;
            trace_qed_alloc_reuse(s, offset, bytes / s->header.cluster_size);
            return offset;
        }
    }

    offset = qed_screen_skip(s, s->file_end, bytes);
    s->file_end = offset + bytes;
    *reused = offset < s->garbage_end;
    trace_qed_alloc_clusters(s, offset, bytes / s->header.cluster_size);
    return offset;
}

/*
 * Give back space that qed_reserve() handed out and that nothing points
 * at: the write that was to fill it failed, and left in it whatever part
 * of it landed (@written; else it was never written, and reads as it
 * did).  Runs are kept sorted and merged; one that reaches
 * file_end lowers file_end, so that the tail cut at close removes it.
 */
static void qed_unreserve(BDRVQEDState *s, uint64_t offset, uint64_t bytes,
                          bool written)
{
    GArray *runs = s->free_runs;
    QEDFreeRun run = { .offset = offset, .bytes = bytes };
    guint i = 0;

    qed_assert_locked(s);
    if (written) {
        s->length_unsure = true;
        s->garbage_end = MAX(s->garbage_end, offset + bytes);
    }
    trace_qed_alloc_unreserve(s, offset, bytes / s->header.cluster_size);
    while (i < runs->len &&
           g_array_index(runs, QEDFreeRun, i).offset < offset) {
        i++;
    }
    g_array_insert_val(runs, i, run);
    /* Merge with the next run, then with the previous one */
    if (i + 1 < runs->len) {
        QEDFreeRun *r = &g_array_index(runs, QEDFreeRun, i);
        QEDFreeRun *next = &g_array_index(runs, QEDFreeRun, i + 1);

        if (r->offset + r->bytes == next->offset) {
            r->bytes += next->bytes;
            g_array_remove_index(runs, i + 1);
        }
    }
    if (i > 0) {
        QEDFreeRun *prev = &g_array_index(runs, QEDFreeRun, i - 1);
        QEDFreeRun *r = &g_array_index(runs, QEDFreeRun, i);

        if (prev->offset + prev->bytes == r->offset) {
            prev->bytes += r->bytes;
            g_array_remove_index(runs, i);
        }
    }
    /* The last run may now end at file_end: the file's end comes back */
    if (runs->len > 0) {
        QEDFreeRun *last = &g_array_index(runs, QEDFreeRun, runs->len - 1);

        if (last->offset + last->bytes == s->file_end) {
            s->file_end = last->offset;
            g_array_remove_index(runs, runs->len - 1);
        }
    }
}

/*
 * Wait until a write that ends at @end may be issued: no change of the
 * file's length in flight would cut it off.
 *
 * Crash and race ordering 7 (file size): every write lies below file_end.
 * A grow sets a length past file_end, and a cut (close, hand-over, the
 * check's repair) happens with no allocation in flight and cuts to
 * file_end or below what is referenced, so no size change removes a write
 * issued before it.  Space reserved after a size change was issued may lie
 * past its length: writes there (data, and the tables that the writeback
 * writes) wait here until it has landed.  Otherwise the size change could
 * complete after them and cut them off, data or tables that the cache then
 * takes for written.
 */
void coroutine_fn qed_wait_resize(BDRVQEDState *s, uint64_t end)
{
    while (s->resizing && end > s->resize_target) {
        trace_qed_wait_resize(s, end, s->resize_target);
        qemu_co_queue_wait(&s->resize_waiters, &s->lock);
    }
}

/*
 * Every change of the file's length goes through here, one at a time; see
 * qed_wait_resize() for how they are ordered with writes.  A grow
 * allocates the new blocks (fallocate) while the protocol can: see
 * qed_grow_file() for why.
 */
int coroutine_fn qed_resize_file(BDRVQEDState *s, uint64_t size)
{
    PreallocMode mode;
    int ret;

    qed_assert_locked(s);
    while (s->resizing) {
        qemu_co_queue_wait(&s->resize_waiters, &s->lock);
    }
    s->resizing = true;
    s->resize_target = size;
    mode = size > s->file_size && s->grow_falloc ? PREALLOC_MODE_FALLOC :
                                                   PREALLOC_MODE_OFF;
    ret = QED_UNLOCKED(s, bdrv_co_truncate(s->bs->file, size, false, mode, 0,
                                           NULL));
    trace_qed_resize_file(s, s->file_size, size, mode == PREALLOC_MODE_FALLOC,
                          ret);
    if (ret == 0) {
        if (size < s->file_size) {
            /* Cut to what is used: the next grow may go ahead again */
            s->grow_tight = false;
        }
        s->file_size = size;
    } else if (mode == PREALLOC_MODE_FALLOC && ret != -ENOSPC &&
               ret != -EDQUOT && ret != -EFBIG) {
        /*
         * Not an allocating grow on this protocol (EOPNOTSUPP, EINVAL for
         * glibc's emulation on O_DIRECT, ENOTSUP for network protocols):
         * sparse growth from now on, and this size change again so
         */
        s->grow_falloc = false;
        ret = QED_UNLOCKED(s, bdrv_co_truncate(s->bs->file, size, false,
                                               PREALLOC_MODE_OFF, 0, NULL));
        trace_qed_resize_file(s, s->file_size, size, false, ret);
        if (ret == 0) {
            s->file_size = size;
        }
    }
    s->resizing = false;
    qemu_co_queue_restart_all(&s->resize_waiters);
    return ret;
}

static bool qed_no_room(int ret)
{
    return ret == -ENOSPC || ret == -EDQUOT || ret == -EFBIG;
}

/*
 * Give the file a length of at least @end, the end of space that the
 * caller reserved: returns 0 once the file holds it (or when the file
 * cannot be grown at all, and the caller's write extends it), or
 * -ENOSPC (-EDQUOT, -EFBIG) when there is no room for it.
 *
 * The file grows ahead of allocation, in large steps: writes that extend
 * a file are slow (with O_DIRECT and native AIO they even block
 * submission), writes into space it already has are not.  The new size
 * reaches the disk with the flush that precedes table writes (images with
 * a backing file), or the check repairs what a crash leaves (NEED_CHECK):
 * a crash never leaves an entry past the end of the file unrepaired.
 *
 * Growth allocates its blocks (fallocate), in the order that space is
 * reserved, and a write into space reserved for it waits until its grow
 * has landed: so on a disk about to fill up, it is the grow that fails,
 * for the last reservations, not the writes, and they fail before
 * writing anything.  Their space, at the end, goes back with file_end;
 * every byte below the file's length has its blocks, so the compaction
 * at close can move clusters into any gap without one free block.  (A
 * sparse grow let a write low in the new space fail while one above it
 * took the last blocks: a hole below data that no repair can fill on a
 * full disk.)  When the step ahead finds no room, the file grows to what
 * has been reserved, then to what this request needs, and stays tight
 * (grows to fit) until it is next cut.  Protocols that cannot allocate
 * grow sparse, as before (qed_resize_file()).
 *
 * Crash ordering 8: the tail is on disk only while NEED_CHECK is: the bit
 * is set and flushed before the file grows, and qed_clear_need_check()
 * cuts the tail before it clears the bit (when the image goes idle, on a
 * read-only reopen, hand-over and close).  So the tail never outlives the
 * moment it serves: a crash leaves it with the bit, and the next opener's
 * check cuts it.
 *
 * An image with a backing file never grows ahead: it is never marked
 * dirty (the original design's promise; it flushes before table updates
 * instead, crash ordering 3), so a tail that a crash left would stay, a
 * leak that every check reports.  Its file grows to fit: to file_end,
 * what has been handed out, no further, and a crash leaves at most the
 * clusters of the writes in flight unreferenced, as the original driver
 * does.  Reservations made while such a size change is in flight are
 * covered by the next one, so under load one grow serves many writes.
 */
static int coroutine_fn GRAPH_RDLOCK
qed_grow_file(BDRVQEDState *s, uint64_t end)
{
    while (s->can_grow && end > s->file_size) {
        uint64_t target;
        int ret;

        if (s->resizing) {
            /*
             * Even one that covers @end: it may fail, and a write past
             * the length must not race a failed grow's restored length
             */
            qemu_co_queue_wait(&s->resize_waiters, &s->lock);
            continue;
        }
        if (qed_has_backing_file(s) || s->grow_tight) {
            /* To fit, not ahead: no tail (and no NEED_CHECK over backing) */
            target = s->file_end;
        } else if (!s->need_check_ready) {
            if (qed_raise_need_check(s) < 0) {
                /* No tail then: the writes themselves extend the file */
                return 0;
            }
            continue;
        } else {
            uint64_t step = MAX(QED_FILE_GROW_STEP, s->file_size / 8);

            target = ROUND_UP(s->file_end + step, s->header.cluster_size);
        }
        ret = qed_resize_file(s, target);
        if (ret == 0 || s->file_size >= end) {
            continue;
        }
        if (!qed_no_room(ret)) {
            /* Fine: the writes themselves extend the file */
            s->can_grow = false;
            return 0;
        }
        if (target > s->file_end) {
            /* No room ahead: what is reserved, then */
            s->grow_tight = true;
            continue;
        }
        if (target > end) {
            /* Not room for all that is reserved: for this request's, then */
            ret = qed_resize_file(s, end);
            if (ret == 0 || s->file_size >= end) {
                continue;
            }
        }
        trace_qed_grow_no_room(s, s->file_size, end);
        return ret;
    }
    return 0;
}

/* Add @bytes of zeros to @qiov, from the one shared zero buffer */
static int GRAPH_RDLOCK
qed_iovec_add_zeros(BDRVQEDState *s, QEMUIOVector *qiov, uint64_t bytes)
{
    qed_assert_locked(s);
    if (!s->zero_buf) {
        /* One buffer for every such write, for the whole open */
        s->zero_buf = qemu_try_blockalign0(s->bs->file->bs, QED_ZERO_BUF_BYTES);
        if (!s->zero_buf) {
            return -ENOMEM;
        }
    }
    for (uint64_t done = 0; done < bytes; done += QED_ZERO_BUF_BYTES) {
        qemu_iovec_add(qiov, s->zero_buf, MIN(QED_ZERO_BUF_BYTES,
                                              bytes - done));
    }
    return 0;
}

/*
 * Write zeros over [@offset, @offset + @bytes) as data, so that the file
 * really allocates the space (ENOSPC shows now) and keeps it as data: a
 * zeroing fallocate (what write-zeroes becomes on most file systems) waits
 * for every direct I/O in flight on the file, a stall per table under
 * load, and leaves unwritten extents that seek-hole reports as holes again
 * on the next open.
 */
static int coroutine_fn GRAPH_RDLOCK
qed_write_zero_data(BDRVQEDState *s, uint64_t offset, uint64_t bytes)
{
    QEMUIOVector qiov;
    int ret = 0;

    while (bytes > 0) {
        uint64_t n = MIN(bytes, QED_ZERO_WRITE_MAX);

        qemu_iovec_init(&qiov, DIV_ROUND_UP(n, QED_ZERO_BUF_BYTES));
        ret = qed_iovec_add_zeros(s, &qiov, n);
        if (ret == 0) {
            ret = QED_UNLOCKED(s, bdrv_co_pwritev(s->bs->file, offset, n,
                                                  &qiov, 0));
        }
        qemu_iovec_destroy(&qiov);
        if (ret < 0) {
            break;
        }
        offset += n;
        bytes -= n;
    }
    return ret;
}

/*
 * Before this open first changes an entry of a table on disk (an L2 table
 * or the L1 table), the file must hold the whole table, no hole: a table
 * copied sparse (cp --sparse, rsync -S), created sparse, or never written
 * in full has holes, and on a full disk the writeback of a sector there
 * would fail after the writes through it were acknowledged.  A hole reads
 * as zeros, so allocating it as zeros changes nothing, as long as no write
 * of the table's sectors runs meanwhile: one that is in flight is waited
 * for, and new ones wait (qed_wb_task_run()).  A table only has dirty
 * sectors before this when a bad entry was cleared (qed_screen_drop()).
 * @t's space_ok, space_busy and wb_inflight say: done, being done
 * (others wait on making_waiters), and its sector writes in flight.
 */
int coroutine_fn qed_secure_space(BDRVQEDState *s, QEDDirtyTable *t)
{
    uint64_t pos = t->offset;
    uint64_t end = pos + qed_table_bytes(s);
    int ret = 0;

    while (t->space_busy) {
        qemu_co_queue_wait(&s->making_waiters, &s->lock);
    }
    if (t->space_ok) {
        return 0;
    }
    t->space_busy = true;
    while (t->wb_inflight) {
        qemu_co_queue_wait(&s->making_waiters, &s->lock);
    }
    while (pos < end) {
        int64_t pnum;

        ret = QED_UNLOCKED(s, bdrv_co_block_status(s->bs->file->bs, pos,
                                                   end - pos, &pnum, NULL,
                                                   NULL));
        if (ret < 0) {
            break;
        }
        if (pnum == 0) {
            /* Past the end of the file: the check would have refused it */
            ret = -EIO;
            break;
        }
        if (!(ret & BDRV_BLOCK_DATA)) {
            ret = qed_write_zero_data(s, pos, pnum);
            if (ret < 0) {
                break;
            }
        }
        ret = 0;
        pos += pnum;
    }
    t->space_busy = false;
    t->space_ok = ret == 0;
    qemu_co_queue_restart_all(&s->making_waiters);
    return ret;
}

/*
 * Make the L2 table of L1 entry @l1i: reserve its space, allocate it in
 * the file, and only then put the table in memory.
 *
 * The space is really allocated (zeros written in the file, not a hole of
 * the grow-ahead) before any entry goes into the table, so before any
 * write through it is acknowledged: on a full disk the write that needs
 * the table fails with ENOSPC, instead of the table's first writeback
 * failing later and taking with it the writes acknowledged through it.
 * Requests that need the same table meanwhile wait in
 * qed_table_for_entries().
 */
static int coroutine_fn GRAPH_RDLOCK
qed_make_table(BDRVQEDState *s, unsigned int l1i, QEDCachedTable **e)
{
    uint64_t bytes = qed_table_bytes(s);
    QEDTableMaking m = { .l1_index = l1i };
    uint64_t l2_offset = 0;
    bool reused;
    int ret;

    QLIST_INSERT_HEAD(&s->tables_making, &m, next);
    /* The L1 entry that will point at the table must be writable too */
    ret = qed_secure_space(s, &s->l1);
    if (ret == 0) {
        l2_offset = qed_reserve(s, bytes, &reused);
        trace_qed_alloc_l2(s, l1i, l2_offset);
        if (reused) {
            /* The zeros below must be durable before the L1 entry is */
            qed_note_reuse(s);
        }
        ret = qed_grow_file(s, l2_offset + bytes);
        if (ret < 0) {
            /* No room: never written, it reads as it did */
            qed_unreserve(s, l2_offset, bytes, false);
        } else {
            qed_wait_resize(s, l2_offset + bytes);
            ret = qed_write_zero_data(s, l2_offset, bytes);
            if (ret < 0) {
                /* Nothing points at it: the next reservation may take it */
                qed_unreserve(s, l2_offset, bytes, true);
            }
        }
    }
    QLIST_REMOVE(&m, next);
    qemu_co_queue_restart_all(&s->making_waiters);
    if (ret < 0) {
        return ret;
    }

    /*
     * The space holds zeros: the whole table is known.  Its first sector
     * is dirty at once, before any yield, though its entries are set only
     * once the caller's data is written: a writeback pass that snapshots
     * the new L1 entry then also finds the table dirty and writes it, with
     * a flush over a backing file, before the L1 entry (crash ordering 2),
     * so the zeros written above are durable before anything names them.
     */
    *e = qed_l2_cache_insert(s->l2_cache, l2_offset, true);
    if (!*e) {
        /* Written but named by nothing: a leak the check reclaims */
        return -ENOMEM;
    }
    qed_l2_cache_table(*e)->space_ok = true;
    qed_l2_cache_mark_dirty(s->l2_cache, *e, 0, 1);
    qed_screen_new_table(s, l2_offset);
    s->l1.table->offsets[l1i] = l2_offset;
    qed_l2_starts_add(s, l2_offset);
    qed_dirty_set(&s->l1, l1i / QED_ENTRIES_PER_SECTOR, 1);
    return 0;
}

static bool qed_table_making(BDRVQEDState *s, unsigned int l1i)
{
    QEDTableMaking *m;

    QLIST_FOREACH(m, &s->tables_making, next) {
        if (m->l1_index == l1i) {
            return true;
        }
    }
    return false;
}

/*
 * The L2 table that holds entries [@first, @first + @n) of L1 entry @l1i,
 * ready for them to change: in the cache with those chunks loaded and its
 * file space secured, or made if there is none and @make is set.  Returns
 * it with a reference in *@e, or *@e NULL if there is none and !@make.
 * The caller holds the clusters (qed_claim).
 */
static int coroutine_fn GRAPH_RDLOCK
qed_table_for_entries(BDRVQEDState *s, unsigned int l1i, unsigned int first,
                      unsigned int n, bool make, QEDCachedTable **e)
{
    uint64_t l2_offset;
    int ret;

    assert(n > 0 && first + n <= s->table_nelems);
    *e = NULL;
    while (qed_table_making(s, l1i)) {
        qemu_co_queue_wait(&s->making_waiters, &s->lock);
    }
    l2_offset = s->l1.table->offsets[l1i];
    if (l2_offset == 0) {
        return make ? qed_make_table(s, l1i, e) : 0;
    }
    ret = qed_get_l2_table(s, l2_offset, e);
    if (ret < 0) {
        return ret;
    }
    ret = qed_l2_ensure(s, *e, first, first + n);
    if (ret == 0) {
        ret = qed_secure_space(s, qed_l2_cache_table(*e));
    }
    if (ret < 0) {
        qed_l2_cache_unref(s->l2_cache, *e);
        *e = NULL;
    }
    return ret;
}

/*
 * Set entries [@first, @first + @n) of table @e to @value, @value + @step,
 * ... in memory and mark their sectors dirty; drops the caller's
 * reference.  Writeback passes take them to disk.
 */
static void qed_fill_entries(BDRVQEDState *s, QEDCachedTable *e,
                             unsigned int first, unsigned int n,
                             uint64_t value, uint64_t step)
{
    QEDDirtyTable *t = qed_l2_cache_table(e);

    qed_assert_locked(s);
    qed_screen_forget(s, t->offset, first, n);
    for (unsigned int i = 0; i < n; i++) {
        t->table->offsets[first + i] = value + i * step;
    }
    qed_l2_cache_mark_dirty(s->l2_cache, e, first / QED_ENTRIES_PER_SECTOR,
                            DIV_ROUND_UP(first + n, QED_ENTRIES_PER_SECTOR) -
                            first / QED_ENTRIES_PER_SECTOR);
    qed_l2_cache_unref(s->l2_cache, e);
    s->l2_gen++;
}

/*
 * Give the clusters [@start, @start + @n clusters), which lie in one L2
 * table and which the caller's lookup found unallocated, the marker
 * @value (QED_L2_ZERO or QED_L2_UNALLOCATED) in memory, making the table
 * if there is none (but for unallocated, which a missing table says
 * already).  The caller holds the clusters (qed_claim).  Returns -EAGAIN
 * if some of them are not unallocated any more: the caller looks up again.
 */
int coroutine_fn qed_mark_clusters(BDRVQEDState *s, uint64_t start,
                                   unsigned int n, uint64_t value)
{
    unsigned int first = qed_l2_index(s, start);
    QEDCachedTable *e;
    int ret;

    assert(value == QED_L2_ZERO || value == QED_L2_UNALLOCATED);
    ret = qed_table_for_entries(s, qed_l1_index(s, start), first, n,
                                value != QED_L2_UNALLOCATED, &e);
    if (ret < 0) {
        return ret;
    }
    if (!qed_claimed_entries_are(e, first, n, QED_L2_UNALLOCATED)) {
        qed_l2_cache_unref(s->l2_cache, e);
        return -EAGAIN;
    }
    if (e) {
        qed_fill_entries(s, e, first, n, value, 0);
    }
    return 0;
}

/*
 * Copy-on-write: read [@pos, @pos + @bytes) of the backing file into a
 * new buffer (*@buf, freed by the caller) and add it to @qiov
 */
static int coroutine_fn GRAPH_RDLOCK
qed_cow_read(BDRVQEDState *s, uint64_t pos, uint64_t bytes, QEMUIOVector *qiov,
             uint8_t **buf)
{
    QEMUIOVector q;

    *buf = qemu_blockalign(s->bs, bytes);
    qemu_iovec_init_buf(&q, *buf, bytes);
    qed_event(s, BLKDBG_COW_READ);
    qemu_iovec_add(qiov, *buf, bytes);
    return qed_read_backing(s, pos, bytes, &q, 0);
}

/*
 * Reserve the clusters of @alloc (claimed: [alloc->start, @end)) and
 * secure the L2 table for its entries [@first, @first + @n), which must
 * still be of @type; grow the file to cover the reservation.  Returns 0
 * with *@e referenced, or -EAGAIN (look up again) or a negative errno with
 * the reservation given back and nothing held.
 *
 * The data's space first, then the table's (the original driver's
 * layout, which tools and tests that inject errors at file offsets know),
 * but the table is made, its zeros written, before the data is: see
 * qed_allocating_write().
 */
static int coroutine_fn GRAPH_RDLOCK
qed_alloc_space(BDRVQEDState *s, QEDAllocation *alloc, uint64_t end,
                QEDExtentType type, unsigned int first, unsigned int n,
                bool *reused, QEDCachedTable **e)
{
    uint64_t start = alloc->start;
    int ret;

    while (qed_table_making(s, qed_l1_index(s, start))) {
        /*
         * Reserve after the table another request is making, so that the
         * file holds data, table, data...: the space of writes that fail
         * on a full disk is then last, and goes back with file_end
         */
        qemu_co_queue_wait(&s->making_waiters, &s->lock);
    }
    alloc->file_offset = qed_reserve(s, end - start, reused);
    ret = qed_table_for_entries(s, qed_l1_index(s, start), first, n, true,
                                e);
    if (ret == 0 &&
        !qed_claimed_entries_are(*e, first, n, type == QED_EXTENT_ZERO ?
                                               QED_L2_ZERO :
                                               QED_L2_UNALLOCATED)) {
        qed_l2_cache_unref(s->l2_cache, *e);
        ret = -EAGAIN;
    }
    if (ret == 0) {
        ret = qed_grow_file(s, alloc->file_offset + (end - start));
        if (ret < 0) {
            qed_l2_cache_unref(s->l2_cache, *e);
        }
    }
    if (ret < 0) {
        /* Never written: it reads as it did */
        qed_unreserve(s, alloc->file_offset, end - start, false);
        *e = NULL;
    }
    return ret;
}

/*
 * The vector that writes [@pos, @pos + @bytes) of @qiov into its new
 * clusters: with @pad, whole clusters, the guest's data padded with the
 * backing file's (@cow; buffers in *@head_buf and *@tail_buf, freed by
 * the caller) or with zeros, and zeros past the image's end.
 */
static int coroutine_fn GRAPH_RDLOCK
qed_alloc_iov(BDRVQEDState *s, uint64_t pos, uint64_t bytes, bool pad,
              bool cow, QEMUIOVector *qiov, size_t qiov_offset,
              QEMUIOVector *wqiov, uint8_t **head_buf, uint8_t **tail_buf)
{
    uint64_t cs = s->header.cluster_size;
    uint64_t start = qed_start_of_cluster(s, pos);
    uint64_t end = ROUND_UP(pos + bytes, cs);
    uint64_t head = pos - start;
    uint64_t tail_end = MIN(end, s->header.image_size);
    uint64_t tail = tail_end > pos + bytes ? tail_end - (pos + bytes) : 0;
    int ret;

    if (head && pad) {
        ret = cow ? qed_cow_read(s, start, head, wqiov, head_buf) :
                    qed_iovec_add_zeros(s, wqiov, head);
        if (ret < 0) {
            return ret;
        }
    }
    qemu_iovec_concat(wqiov, qiov, qiov_offset, bytes);
    if (pad && tail) {
        ret = cow ? qed_cow_read(s, pos + bytes, tail, wqiov, tail_buf) :
                    qed_iovec_add_zeros(s, wqiov, tail);
        if (ret < 0) {
            return ret;
        }
    }
    if (pad && end > MAX(tail_end, pos + bytes)) {
        ret = qed_iovec_add_zeros(s, wqiov, end - MAX(tail_end, pos + bytes));
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

/*
 * Write [pos, pos + bytes) of the virtual disk, which all lies in
 * clusters mapped by one L2 table that the caller's lookup found @type
 * (unallocated or zero), into new clusters.  Returns the bytes written,
 * -EAGAIN if the caller must look up again (the claim failed, or the
 * entries changed since the lookup: qed_claim()), or a negative errno.
 *
 * The L2 table is made (or its space secured) before the data is written:
 * on a disk about to fill up, the table takes its space first, so that
 * the data writes that do fit are acknowledged, rather than all of them
 * failing at the table made after them.
 *
 * Crash ordering 1: the data (with its padding) is written before the
 * entry is set in the cached table.  The request completes once its data
 * is on disk; the entry reaches the disk with a writeback pass, at the
 * latest with the next flush (qed_writeback).
 */
int64_t coroutine_fn qed_allocating_write(BDRVQEDState *s,
                                          uint64_t pos, uint64_t bytes,
                                          QEDExtentType type,
                                          QEMUIOVector *qiov,
                                          size_t qiov_offset)
{
    uint64_t cs = s->header.cluster_size;
    uint64_t start = qed_start_of_cluster(s, pos);
    uint64_t end = ROUND_UP(pos + bytes, cs);
    bool cow = type == QED_EXTENT_UNALLOCATED && s->bs->backing;
    unsigned int first = qed_l2_index(s, start);
    unsigned int n = (end - start) / cs;
    QEDAllocation *alloc = g_new0(QEDAllocation, 1);
    QEDCachedTable *e = NULL;
    QEMUIOVector wqiov;
    uint8_t *head_buf = NULL, *tail_buf = NULL;
    uint64_t wstart;
    bool reused, pad;
    int64_t ret;

    if (!qed_claim(s, alloc, start, end)) {
        g_free(alloc);
        return -EAGAIN;
    }

    /*
     * The table update that follows must find NEED_CHECK on disk (crash
     * ordering 4).  Setting it here, before the write is acknowledged,
     * also keeps the header honest for whoever looks at it once the write
     * has returned; it costs one header write and flush per dirty period.
     */
    ret = qed_set_need_check(s);
    if (ret < 0) {
        qed_release(s, alloc);
        g_free(alloc);
        return ret;
    }

    ret = qed_alloc_space(s, alloc, end, type, first, n, &reused, &e);
    if (ret < 0) {
        qed_release(s, alloc);
        g_free(alloc);
        return ret;
    }
    qed_event(s, BLKDBG_CLUSTER_ALLOC);

    /*
     * New space at the end reads as zeros: without a backing file only the
     * data is written, into the space that qed_grow_file() gave the file.
     * Whole clusters are written when the space is reused, or when the
     * file could not be grown (the write extends the file, which must not
     * end inside a cluster); over a backing file the rest of each new
     * unallocated cluster is copied from it (copy-on-write), and what lies
     * past the image's end is zeros.
     */
    pad = cow || reused || !s->can_grow;
    qemu_iovec_init(&wqiov, qiov->niov + 4);
    wstart = alloc->file_offset + (pad ? 0 : pos - start);
    ret = qed_alloc_iov(s, pos, bytes, pad, cow, qiov, qiov_offset, &wqiov,
                        &head_buf, &tail_buf);
    if (ret < 0) {
        goto fail;
    }

    /* Copy-on-write only when backing data pads the guest's */
    qed_wait_resize(s, wstart + wqiov.size);
    qed_event(s, head_buf || tail_buf ? BLKDBG_COW_WRITE : BLKDBG_WRITE_AIO);
    ret = QED_UNLOCKED(s, bdrv_co_pwritev(s->bs->file, wstart, wqiov.size,
                                          &wqiov, 0));
    if (ret < 0) {
        goto fail;
    }
    qemu_iovec_destroy(&wqiov);
    qemu_vfree(head_buf);
    qemu_vfree(tail_buf);

    /* The data is on disk: the entries may point at it now */
    qed_fill_entries(s, e, first, n, alloc->file_offset, cs);
    if (reused) {
        qed_note_reuse(s);
    }
    qed_release(s, alloc);
    g_free(alloc);
    qed_wb_throttle(s);
    return bytes;

fail:
    /* Nothing points at the new clusters: they may be reused */
    qed_unreserve(s, alloc->file_offset, end - start, true);
    qemu_iovec_destroy(&wqiov);
    qemu_vfree(head_buf);
    qemu_vfree(tail_buf);
    qed_l2_cache_unref(s->l2_cache, e);
    qed_release(s, alloc);
    g_free(alloc);
    return ret;
}

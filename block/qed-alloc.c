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
 * another request holds any of them, or if entries changed since the
 * caller's lookup (s->l2_gen moved past @gen): the caller must look up
 * again.
 */
bool coroutine_fn qed_claim(BDRVQEDState *s, QEDAllocation *a,
                            uint64_t start, uint64_t end, uint64_t gen)
{
    if (qed_find_alloc(s, start, end)) {
        qemu_co_queue_wait(&s->alloc_waiters, NULL);
        return false;
    }
    if (gen != s->l2_gen) {
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

void qed_release(BDRVQEDState *s, QEDAllocation *a)
{
    QLIST_REMOVE(a, next);
    qemu_co_queue_restart_all(&s->alloc_waiters);
    qemu_co_queue_restart_all(&s->idle_waiters);
    assert(s->allocating_writes > 0);
    if (--s->allocating_writes == 0) {
        qed_arm_timer(s);
    }
}

/*
 * Take @bytes of new file space; never reused while the image is open
 * (but after a check's repair or make_empty, which cut the file back to
 * what the disk references).
 * It lies past everything the file held at open and past every earlier
 * allocation, so it reads as zeros until written.
 */
static uint64_t qed_reserve(BDRVQEDState *s, uint64_t bytes)
{
    uint64_t offset = qed_screen_skip(s, s->file_end, bytes);

    s->file_end = offset + bytes;
    trace_qed_alloc_clusters(s, offset, bytes / s->header.cluster_size);
    return offset;
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
        qemu_co_queue_wait(&s->resize_waiters, NULL);
    }
}

/*
 * Every change of the file's length goes through here, one at a time; see
 * qed_wait_resize() for how they are ordered with writes.
 */
int coroutine_fn qed_resize_file(BDRVQEDState *s, uint64_t size)
{
    int ret;

    while (s->resizing) {
        qemu_co_queue_wait(&s->resize_waiters, NULL);
    }
    s->resizing = true;
    s->resize_target = size;
    ret = bdrv_co_truncate(s->bs->file, size, false, PREALLOC_MODE_OFF, 0,
                           NULL);
    trace_qed_resize_file(s, s->file_size, size, ret);
    if (ret == 0) {
        s->file_size = size;
    }
    s->resizing = false;
    qemu_co_queue_restart_all(&s->resize_waiters);
    return ret;
}

/*
 * Grow the file ahead of allocation, in large steps: writes that extend a
 * file are slow (with O_DIRECT and native AIO they even block submission),
 * writes into its sparse tail are not.  The new size reaches the disk with
 * the flush that precedes table writes (images with a backing file), or
 * the check repairs what a crash leaves (NEED_CHECK): a crash never leaves
 * an entry past the end of the file unrepaired.
 *
 * Crash ordering 8: the tail is on disk only while NEED_CHECK is, with or
 * without backing file: the bit is set and flushed before the file grows,
 * and qed_clear_need_check() cuts the tail before it clears the bit (when
 * the image goes idle, on a read-only reopen, hand-over and close).  So the
 * tail never outlives the moment it serves: a crash leaves it with the
 * bit, and the next opener's check cuts it.
 *
 * Returns once the length that the size change in flight (if any) sets
 * covers everything allocated, so that writes there need not wait.
 */
void coroutine_fn qed_grow_file(BDRVQEDState *s)
{
    while (s->can_grow &&
           s->file_end > (s->resizing ? s->resize_target : s->file_size)) {
        uint64_t step, new_size;

        if (!s->need_check_ready) {
            if (qed_raise_need_check(s) < 0) {
                /* No tail then: the writes themselves extend the file */
                return;
            }
            continue;
        }
        if (s->resizing) {
            qemu_co_queue_wait(&s->resize_waiters, NULL);
            continue;
        }
        step = MAX(QED_FILE_GROW_STEP, s->file_size / 8);
        new_size = ROUND_UP(s->file_end + step, s->header.cluster_size);
        if (qed_resize_file(s, new_size) < 0) {
            /* Fine: the writes themselves extend the file */
            s->can_grow = false;
        }
    }
}

static int64_t coroutine_fn qed_alloc_file_space(BDRVQEDState *s,
                                                 uint64_t bytes)
{
    uint64_t offset = qed_reserve(s, bytes);

    qed_grow_file(s);
    return offset;
}

/*
 * Write zeros over [@offset, @offset + @bytes) as data, so that the file
 * really allocates the space (ENOSPC shows now) and keeps it as data: a
 * zeroing fallocate (what write-zeroes becomes on most file systems) waits
 * for every direct I/O in flight on the file, a stall per table under
 * load, and leaves unwritten extents that seek-hole reports as holes again
 * on the next open.
 */
static int coroutine_fn qed_write_zero_data(BDRVQEDState *s, uint64_t offset,
                                            uint64_t bytes)
{
    QEMUIOVector qiov;
    int ret = 0;

    if (!s->zero_buf) {
        /* One buffer for every such write, for the whole open */
        s->zero_buf = qemu_try_blockalign0(s->bs->file->bs, QED_ZERO_BUF_BYTES);
        if (!s->zero_buf) {
            return -ENOMEM;
        }
    }
    while (bytes > 0) {
        uint64_t n = MIN(bytes, QED_ZERO_WRITE_MAX);

        qemu_iovec_init(&qiov, DIV_ROUND_UP(n, QED_ZERO_BUF_BYTES));
        for (uint64_t done = 0; done < n; done += QED_ZERO_BUF_BYTES) {
            qemu_iovec_add(&qiov, s->zero_buf,
                           MIN(QED_ZERO_BUF_BYTES, n - done));
        }
        ret = bdrv_co_pwritev(s->bs->file, offset, n, &qiov, 0);
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
 * sectors before this when a bad entry was cleared (see qed_l2_screen()).
 * @t's space_ok, space_busy and wb_inflight say: done, being done
 * (others wait on making_waiters), and its sector writes in flight.
 */
int coroutine_fn qed_secure_space(BDRVQEDState *s, QEDDirtyTable *t)
{
    uint64_t pos = t->offset;
    uint64_t end = pos + qed_table_bytes(s);
    int ret = 0;

    while (t->space_busy) {
        qemu_co_queue_wait(&s->making_waiters, NULL);
    }
    if (t->space_ok) {
        return 0;
    }
    t->space_busy = true;
    while (t->wb_inflight) {
        qemu_co_queue_wait(&s->making_waiters, NULL);
    }
    while (pos < end) {
        int64_t pnum;

        ret = bdrv_block_status(s->bs->file->bs, pos, end - pos, &pnum, NULL,
                                NULL);
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
 * the file, and only then put the table in memory, for qed_set_entries().
 *
 * The space is really allocated (zeros written in the file, not a hole of
 * the grow-ahead) before any entry goes into the table, so before any
 * write through it is acknowledged: on a full disk the write that needs
 * the table fails with ENOSPC, instead of the table's first writeback
 * failing later and taking with it the writes acknowledged through it.
 * Requests that need the same table meanwhile wait in qed_set_entries().
 */
int coroutine_fn qed_make_table(BDRVQEDState *s, unsigned int l1i,
                                QEDCachedTable **e)
{
    uint64_t bytes = qed_table_bytes(s);
    QEDTableMaking m = { .l1_index = l1i };
    uint64_t l2_offset = 0;
    int ret;

    QLIST_INSERT_HEAD(&s->tables_making, &m, next);
    /* The L1 entry that will point at the table must be writable too */
    ret = qed_secure_space(s, &s->l1);
    if (ret == 0) {
        l2_offset = qed_reserve(s, bytes);
        trace_qed_alloc_l2(s, l1i, l2_offset);
        qed_grow_file(s);
        qed_wait_resize(s, l2_offset + bytes);
        ret = qed_write_zero_data(s, l2_offset, bytes);
    }
    QLIST_REMOVE(&m, next);
    qemu_co_queue_restart_all(&s->making_waiters);
    if (ret < 0) {
        /* Reserved space leaks (the check reclaims it); nothing points at it */
        return ret;
    }

    /*
     * The space holds zeros: the whole table is known.  The caller sets
     * entries in it, so marks it dirty, before it yields: a writeback pass
     * that snapshots the new L1 entry also finds the table dirty and
     * writes it first (crash ordering 2).
     */
    *e = qed_l2_cache_insert(s->l2_cache, l2_offset, true);
    (*e)->t.space_ok = true;
    qed_screen_new_table(s, l2_offset);
    s->l1.table->offsets[l1i] = l2_offset;
    qed_l2_starts_add(s, l2_offset);
    qed_dirty_set(&s->l1, l1i / QED_ENTRIES_PER_SECTOR, 1);
    return 0;
}

bool qed_table_making(BDRVQEDState *s, unsigned int l1i)
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
 * Copy-on-write: read [@pos, @pos + @bytes) of the backing file into a
 * new buffer (*@buf, freed by the caller) and add it to @qiov
 */
static int coroutine_fn qed_cow_read(BDRVQEDState *s, uint64_t pos,
                                     uint64_t bytes, QEMUIOVector *qiov,
                                     uint8_t **buf)
{
    QEMUIOVector q;

    *buf = qemu_blockalign(s->bs, bytes);
    qemu_iovec_init_buf(&q, *buf, bytes);
    BLKDBG_EVENT(s->bs->file, BLKDBG_COW_READ);
    qemu_iovec_add(qiov, *buf, bytes);
    return qed_read_backing(s, pos, bytes, &q, 0);
}

/*
 * Write [pos, pos + bytes) of the virtual disk, which all lies in
 * unallocated or zero clusters mapped by one L2 table, into new clusters.
 * @gen is s->l2_gen from before the lookup that found them.  Returns the
 * bytes written, -EAGAIN if the caller must look up again (as for every
 * claim that fails: qed_claim()), or a negative errno.
 *
 * Crash ordering 1: the data (with its copy-on-write padding) is written
 * before the entry is set in the cached table.  The request completes
 * once its data is on disk; the entry reaches the disk with a writeback
 * pass, at the latest with the next flush (qed_writeback).
 */
int64_t coroutine_fn qed_allocating_write(BDRVQEDState *s,
                                          uint64_t pos, uint64_t bytes,
                                          QEDExtentType type,
                                          QEMUIOVector *qiov,
                                          size_t qiov_offset,
                                          uint64_t gen)
{
    uint64_t cs = s->header.cluster_size;
    uint64_t start = qed_start_of_cluster(s, pos);
    uint64_t end = ROUND_UP(pos + bytes, cs);
    uint64_t head = pos - start;
    uint64_t tail_end = MIN(end, s->header.image_size);
    uint64_t tail = tail_end > pos + bytes ? tail_end - (pos + bytes) : 0;
    bool cow = type == QED_EXTENT_UNALLOCATED && s->bs->backing;
    QEDAllocation *alloc = g_new0(QEDAllocation, 1);
    QEMUIOVector wqiov;
    uint8_t *head_buf = NULL, *tail_buf = NULL;
    uint64_t wstart;
    int64_t ret;

    if (!qed_claim(s, alloc, start, end, gen)) {
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

    ret = qed_alloc_file_space(s, end - start);
    alloc->file_offset = ret;
    BLKDBG_EVENT(s->bs->file, BLKDBG_CLUSTER_ALLOC);

    /*
     * New clusters read as zeros (fresh space past everything the file
     * held).  Over a backing file the rest of each new cluster is copied
     * from it (copy-on-write); otherwise only the data is written.
     */
    qemu_iovec_init(&wqiov, qiov->niov + 2);
    wstart = alloc->file_offset + head;
    if (cow && head) {
        ret = qed_cow_read(s, start, head, &wqiov, &head_buf);
        if (ret < 0) {
            goto fail;
        }
        wstart = alloc->file_offset;
    }
    qemu_iovec_concat(&wqiov, qiov, qiov_offset, bytes);
    if (cow && tail) {
        ret = qed_cow_read(s, pos + bytes, tail, &wqiov, &tail_buf);
        if (ret < 0) {
            goto fail;
        }
    }

    /* Copy-on-write only when backing data pads the guest's */
    qed_wait_resize(s, wstart + wqiov.size);
    BLKDBG_EVENT(s->bs->file, head_buf || tail_buf ? BLKDBG_COW_WRITE :
                                                     BLKDBG_WRITE_AIO);
    ret = bdrv_co_pwritev(s->bs->file, wstart, wqiov.size, &wqiov, 0);
    if (ret < 0) {
        /* The new clusters leak; nothing points at them */
        goto fail;
    }
    qemu_iovec_destroy(&wqiov);
    qemu_vfree(head_buf);
    qemu_vfree(tail_buf);

    /* The data is on disk: the entries may point at it now */
    ret = qed_set_entries(s, start, (end - start) / cs, alloc->file_offset,
                          cs);
    qed_release(s, alloc);
    g_free(alloc);
    if (ret < 0) {
        /* The new clusters leak; nothing points at them */
        return ret;
    }
    qed_wb_throttle(s);
    return bytes;

fail:
    qemu_iovec_destroy(&wqiov);
    qemu_vfree(head_buf);
    qemu_vfree(tail_buf);
    qed_release(s, alloc);
    g_free(alloc);
    return ret;
}

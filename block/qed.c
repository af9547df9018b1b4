/*
 * QED ("QEMU Enhanced Disk") image format driver
 *
 * The BlockDriver: probe, open/close/create, reopen, read/write/zero/
 * discard requests, allocation, the NEED_CHECK bit and its timer, block
 * status, info, truncate and the migration hooks.  Lookups go through
 * qed-cluster.c, table I/O through qed-table.c, the check through
 * qed-check.c.
 *
 * Requests run in coroutines in the node's AioContext, so shared state
 * changes only between yields; what must stay consistent across a yield
 * is guarded by the allocation list, wb_lock (one writeback pass at a
 * time) and header_lock, each described where it is defined.
 *
 * This work is licensed under the terms of the GNU LGPL, version 2 or later.
 * See the COPYING.LIB file in the top-level directory.
 */

#include "qemu/osdep.h"
#include "block/qdict.h"
#include "qapi/error.h"
#include "qapi/qapi-visit-block-core.h"
#include "qapi/qobject-input-visitor.h"
#include "qapi/qmp/qdict.h"
#include "qemu/bitmap.h"
#include "qemu/bswap.h"
#include "block/aio_task.h"
#include "qemu/error-report.h"
#include "qemu/main-loop.h"
#include "qemu/memalign.h"
#include "qemu/module.h"
#include "qemu/option.h"
#include "qemu/timer.h"
#include "qemu/units.h"
#include "sysemu/block-backend.h"
#include "trace.h"
#include "qed.h"

#define QED_OPT_L2_CACHE_SIZE "l2-cache-size"

/*
 * Default L2 cache: enough tables to map this much of the virtual disk,
 * within a memory bound.  Tables are read in chunks as they are used, so a
 * miss costs a small read whatever the table size.
 */
#define QED_DEFAULT_L2_CACHE_COVERAGE (1 * TiB)
#define QED_DEFAULT_L2_CACHE_MAX (128 * MiB)
#define QED_MIN_L2_CACHE_TABLES 64

/* The file grows ahead of allocation by this much at least */
#define QED_FILE_GROW_STEP (32 * MiB)

/*
 * Dirty table sectors (32 MiB) that start a writeback pass in the
 * background, and the count beyond which an allocating write waits for a
 * pass.  They bound the work a flush finds left to do.  Dirty tables are
 * bounded likewise by the cache size (they are pinned in the cache).
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

static void qed_header_le_to_cpu(const QEDHeader *le, QEDHeader *cpu)
{
    cpu->magic = le32_to_cpu(le->magic);
    cpu->cluster_size = le32_to_cpu(le->cluster_size);
    cpu->table_size = le32_to_cpu(le->table_size);
    cpu->header_size = le32_to_cpu(le->header_size);
    cpu->features = le64_to_cpu(le->features);
    cpu->compat_features = le64_to_cpu(le->compat_features);
    cpu->autoclear_features = le64_to_cpu(le->autoclear_features);
    cpu->l1_table_offset = le64_to_cpu(le->l1_table_offset);
    cpu->image_size = le64_to_cpu(le->image_size);
    cpu->backing_filename_offset = le32_to_cpu(le->backing_filename_offset);
    cpu->backing_filename_size = le32_to_cpu(le->backing_filename_size);
}

static void qed_header_cpu_to_le(const QEDHeader *cpu, QEDHeader *le)
{
    le->magic = cpu_to_le32(cpu->magic);
    le->cluster_size = cpu_to_le32(cpu->cluster_size);
    le->table_size = cpu_to_le32(cpu->table_size);
    le->header_size = cpu_to_le32(cpu->header_size);
    le->features = cpu_to_le64(cpu->features);
    le->compat_features = cpu_to_le64(cpu->compat_features);
    le->autoclear_features = cpu_to_le64(cpu->autoclear_features);
    le->l1_table_offset = cpu_to_le64(cpu->l1_table_offset);
    le->image_size = cpu_to_le64(cpu->image_size);
    le->backing_filename_offset = cpu_to_le32(cpu->backing_filename_offset);
    le->backing_filename_size = cpu_to_le32(cpu->backing_filename_size);
}

void qed_report_corruption(BDRVQEDState *s, const char *fmt, ...)
{
    va_list ap;
    char *msg;

    /* A guest may hit the same bad entry forever: say it a few times */
    if (s->error_reports >= 10) {
        return;
    }
    s->error_reports++;
    va_start(ap, fmt);
    msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    error_report("qed: %s: %s; the image is corrupt, run "
                 "'qemu-img check -r all' on it", s->bs->filename, msg);
    g_free(msg);
}

static int qed_probe(const uint8_t *buf, int buf_size, const char *filename)
{
    if (buf_size < sizeof(uint32_t) || ldl_le_p(buf) != QED_MAGIC) {
        return 0;
    }
    return 100;
}

static bool qed_is_pow2_in(uint64_t v, uint64_t min, uint64_t max)
{
    return v >= min && v <= max && is_power_of_2(v);
}

/* Check the geometry options of create and measure */
static int qed_check_geometry(uint64_t cluster_size, int64_t table_size,
                              Error **errp)
{
    if (!qed_is_pow2_in(cluster_size, QED_MIN_CLUSTER_SIZE,
                        QED_MAX_CLUSTER_SIZE)) {
        error_setg(errp, "Invalid cluster_size %" PRIu64 ": must be a power "
                   "of two between %d and %d bytes", cluster_size,
                   QED_MIN_CLUSTER_SIZE, QED_MAX_CLUSTER_SIZE);
        return -EINVAL;
    }
    if (table_size < 0 || !qed_is_pow2_in(table_size, QED_MIN_TABLE_SIZE,
                                          QED_MAX_TABLE_SIZE)) {
        error_setg(errp, "Invalid table_size %" PRId64 ": must be a power of "
                   "two between %d and %d clusters", table_size,
                   QED_MIN_TABLE_SIZE, QED_MAX_TABLE_SIZE);
        return -EINVAL;
    }
    return 0;
}

/* Check a virtual disk size against what the tables can address */
static int qed_check_image_size(uint64_t size, uint64_t cluster_size,
                                uint64_t table_size, Error **errp)
{
    uint64_t max = qed_max_image_size(cluster_size, table_size);

    if (size > max) {
        error_setg(errp, "Invalid size %" PRIu64 ": with cluster_size %"
                   PRIu64 " and table_size %" PRIu64 " a QED image holds at "
                   "most %" PRIu64 " bytes", size, cluster_size, table_size,
                   max);
        return -EINVAL;
    }
    if (size % BDRV_SECTOR_SIZE) {
        error_setg(errp, "Invalid size %" PRIu64 ": must be a multiple of "
                   "512 bytes", size);
        return -EINVAL;
    }
    return 0;
}

/*
 * The one writer of the header: sector 0 from @h, then s->header = *h.
 * The caller holds header_lock, so that every header write starts from the
 * header the last one left (a size change and a NEED_CHECK change built
 * from the same old copy would undo each other), and says why the moment
 * of the write is safe.  One sector is written, so a crash leaves the old
 * header or the new one.
 */
static int coroutine_fn qed_update_header(BDRVQEDState *s, const QEDHeader *h)
{
    QEDHeader le;
    uint8_t *buf;
    int ret;

    assert(s->header_lock.holder == qemu_coroutine_self());

    /* The backing file name may share the sector: read, modify, write */
    buf = qemu_blockalign(s->bs, BDRV_SECTOR_SIZE);
    ret = bdrv_co_pread(s->bs->file, 0, BDRV_SECTOR_SIZE, buf, 0);
    if (ret == 0) {
        qed_header_cpu_to_le(h, &le);
        memcpy(buf, &le, sizeof(le));
        ret = bdrv_co_pwrite(s->bs->file, 0, BDRV_SECTOR_SIZE, buf, 0);
    }
    qemu_vfree(buf);
    if (ret == 0) {
        s->header = *h;
    }
    trace_qed_header_write(s, h->features, h->image_size, ret);
    return ret;
}

/* ---- NEED_CHECK and its timer ------------------------------------------- */

static bool qed_has_backing_file(BDRVQEDState *s)
{
    return s->header.features & QED_F_BACKING_FILE;
}

/*
 * Set NEED_CHECK and flush it, unless it is on disk already.  Callers:
 *
 * - Crash ordering 4: an image without a backing file updates its tables
 *   without flushing the data first, so a crash can leave an entry over
 *   data that never reached the disk or past the end of the file.  The bit
 *   is on disk before the first such table update (qed_set_need_check);
 *   images with a backing file flush instead (crash ordering 3).
 * - Crash ordering 8: the grow-ahead tail, with or without backing file,
 *   is on disk only while the bit is (qed_grow_file), so a crash that
 *   leaves one makes the next opener's check cut it off.
 *
 * The check on the next open repairs what a crash left.
 */
static int coroutine_fn qed_raise_need_check(BDRVQEDState *s)
{
    QEDHeader h;
    int ret = 0;

    if (s->need_check_ready) {
        return 0;
    }

    qemu_co_mutex_lock(&s->header_lock);
    if (!s->need_check_ready) {
        if (!(s->header.features & QED_F_NEED_CHECK)) {
            h = s->header;
            h.features |= QED_F_NEED_CHECK;
            ret = qed_update_header(s, &h);
        }
        /* Also when the bit was set: an earlier flush may have failed */
        if (ret == 0) {
            ret = bdrv_co_flush(s->bs->file->bs);
        }
        if (ret == 0) {
            s->need_check_ready = true;
            trace_qed_need_check_set(s);
        }
    }
    qemu_co_mutex_unlock(&s->header_lock);
    return ret;
}

/* Before table updates: crash ordering 4 */
static int coroutine_fn qed_set_need_check(BDRVQEDState *s)
{
    if (qed_has_backing_file(s)) {
        return 0;
    }
    return qed_raise_need_check(s);
}

/*
 * Write back every dirty table sector, cut the file back to the clusters
 * in use, then clear NEED_CHECK if it is set.
 *
 * Crash ordering 5: clear NEED_CHECK only when no allocation is in flight,
 * no table sector is dirty, and after a flush, so every table write before
 * it is on disk.  An allocation that starts meanwhile, or a writeback
 * pass, finds need_check_ready false and waits for header_lock before it
 * writes anything, then sets the bit again (over a backing file: only an
 * allocation that grows the file, ordering 8).
 *
 * Crash ordering 8: the grow-ahead tail goes first, and that flush also
 * puts the new length on disk before the bit is cleared, so that no tail
 * outlives the bit (the original driver's check counts one as leaked
 * clusters).  The cut happens with no allocation in flight (ordering 7),
 * and a new allocation grows the file again only after setting the bit,
 * which waits for header_lock.
 */
static void qed_cancel_timer(BDRVQEDState *s);
static int coroutine_fn qed_writeback(BDRVQEDState *s);
static bool qed_tables_dirty(BDRVQEDState *s);

static int coroutine_fn qed_clear_need_check(BDRVQEDState *s)
{
    QEDHeader h;
    int ret;

    ret = qed_writeback(s);
    if (ret < 0) {
        return ret;
    }

    qemu_co_mutex_lock(&s->header_lock);
    s->need_check_ready = false;
    if (s->allocating_writes == 0 && !qed_tables_dirty(s) &&
        !bdrv_is_read_only(s->bs)) {
        if (s->file_size > s->file_end) {
            ret = qed_resize_file(s, s->file_end);
        }
        if (ret == 0 && (s->header.features & QED_F_NEED_CHECK)) {
            ret = bdrv_co_flush(s->bs->file->bs);
            if (ret == 0) {
                h = s->header;
                h.features &= ~QED_F_NEED_CHECK;
                ret = qed_update_header(s, &h);
            }
            if (ret == 0) {
                /* Leave the clean header on disk before anyone goes away */
                ret = bdrv_co_flush(s->bs->file->bs);
            }
            if (ret == 0) {
                trace_qed_need_check_clear(s);
                /* Armed meanwhile by an allocation that has landed */
                qed_cancel_timer(s);
            }
        }
    }
    qemu_co_mutex_unlock(&s->header_lock);
    return ret;
}

static int coroutine_fn qed_co_clear_need_check(BDRVQEDState *s,
                                                void *opaque)
{
    return qed_clear_need_check(s);
}

/* Allocations whose data is still on its way */
static bool qed_allocs_in_flight(BDRVQEDState *s)
{
    return !QLIST_EMPTY(&s->allocs);
}

static void coroutine_fn qed_need_check_timer_entry(void *opaque)
{
    BDRVQEDState *s = opaque;

    while (qed_allocs_in_flight(s)) {
        qemu_co_queue_wait(&s->idle_waiters, NULL);
    }
    qed_clear_need_check(s);
    s->timer_running = false;
    bdrv_dec_in_flight(s->bs);
}

/* Start clearing NEED_CHECK in a coroutine that drain waits for */
static void qed_start_clear(BDRVQEDState *s)
{
    Coroutine *co;

    if (s->timer_running) {
        return;
    }
    s->timer_running = true;
    bdrv_inc_in_flight(s->bs);
    co = qemu_coroutine_create(qed_need_check_timer_entry, s);
    aio_co_enter(bdrv_get_aio_context(s->bs), co);
}

static void qed_need_check_timer_cb(void *opaque)
{
    BDRVQEDState *s = opaque;

    if (qatomic_read(&s->bs->quiesce_counter) > 0) {
        /* No I/O of ours inside a drained section: look again later */
        timer_mod(s->need_check_timer,
                  qemu_clock_get_ns(QEMU_CLOCK_REALTIME) +
                  NANOSECONDS_PER_SECOND);
        return;
    }
    trace_qed_timer_fire(s);
    qed_start_clear(s);
}

static bool qed_may_write_header(BDRVQEDState *s)
{
    return !bdrv_is_read_only(s->bs) &&
           !(s->bs->open_flags & BDRV_O_INACTIVE);
}

/*
 * After the last allocating write: write the tables back and clear the
 * bit in a few seconds
 */
static void qed_arm_timer(BDRVQEDState *s)
{
    if (s->need_check_timer &&
        ((s->header.features & QED_F_NEED_CHECK) || qed_tables_dirty(s) ||
         s->file_size > s->file_end) &&
        qed_may_write_header(s)) {
        trace_qed_timer_arm(s);
        timer_mod(s->need_check_timer,
                  qemu_clock_get_ns(QEMU_CLOCK_REALTIME) +
                  QED_NEED_CHECK_TIMEOUT * NANOSECONDS_PER_SECOND);
    }
}

static void qed_cancel_timer(BDRVQEDState *s)
{
    if (s->need_check_timer && timer_pending(s->need_check_timer)) {
        trace_qed_timer_cancel(s);
        timer_del(s->need_check_timer);
    }
}

static void qed_attach_aio_context(BlockDriverState *bs,
                                   AioContext *new_context)
{
    BDRVQEDState *s = bs->opaque;

    s->need_check_timer = aio_timer_new(new_context, QEMU_CLOCK_REALTIME,
                                        SCALE_NS, qed_need_check_timer_cb, s);
    if (s->allocating_writes == 0) {
        qed_arm_timer(s);
    }
}

static void qed_detach_aio_context(BlockDriverState *bs)
{
    BDRVQEDState *s = bs->opaque;

    if (s->need_check_timer) {
        timer_free(s->need_check_timer);
        s->need_check_timer = NULL;
    }
}

/*
 * A drain (stop, snapshot, hand-over...) writes the tables back and
 * clears the bit as soon as the allocations in flight are done, rather
 * than leave a timer behind that would write in the middle of whatever
 * the drain is for.
 */
static void coroutine_fn qed_co_drain_begin(BlockDriverState *bs)
{
    BDRVQEDState *s = bs->opaque;

    /* Allocations in flight will dirty tables yet: wait for them too */
    if (qed_may_write_header(s) &&
        ((s->header.features & QED_F_NEED_CHECK) ||
         qed_allocs_in_flight(s) || qed_tables_dirty(s))) {
        qed_cancel_timer(s);
        qed_start_clear(s);
    }
}

/* Run a coroutine_fn from outside coroutine context and wait for it */
typedef int coroutine_fn QEDCoFunc(BDRVQEDState *s, void *opaque);

typedef struct QEDCoCall {
    BDRVQEDState *s;
    QEDCoFunc *fn;
    void *opaque;
    int ret;
} QEDCoCall;

static void coroutine_fn qed_co_call_entry(void *opaque)
{
    QEDCoCall *call = opaque;

    call->ret = call->fn(call->s, call->opaque);
    /* BDRV_POLL_WHILE in another thread (an iothread's node) needs this */
    aio_wait_kick();
}

static int qed_call_in_coroutine(BDRVQEDState *s, QEDCoFunc *fn,
                                 void *opaque)
{
    QEDCoCall call = {
        .s = s, .fn = fn, .opaque = opaque, .ret = -EINPROGRESS,
    };

    if (qemu_in_coroutine()) {
        return fn(s, opaque);
    }
    bdrv_coroutine_enter(s->bs, qemu_coroutine_create(qed_co_call_entry,
                                                      &call));
    BDRV_POLL_WHILE(s->bs, call.ret == -EINPROGRESS);
    return call.ret;
}

/*
 * Cut the file back to the clusters in use (on close and hand-over), or
 * extend it to whole clusters: after a crash that lost the grow-ahead's
 * size change, the file may end inside its last cluster, which readers
 * that round the file size down (the original driver) take for corrupt.
 */
static int coroutine_fn qed_trim_file_tail(BDRVQEDState *s, void *opaque)
{
    if (s->file_size == s->file_end && !s->resizing) {
        return 0;
    }
    return qed_resize_file(s, s->file_end);
}
/* ---- open and close ----------------------------------------------------- */

static QemuOptsList qed_runtime_opts = {
    .name = "qed",
    .head = QTAILQ_HEAD_INITIALIZER(qed_runtime_opts.head),
    .desc = {
        {
            .name = QED_OPT_L2_CACHE_SIZE,
            .type = QEMU_OPT_SIZE,
            .help = "Maximum L2 table cache size in bytes",
        },
        { /* end of list */ }
    },
};

/* Parse l2-cache-size into a number of tables; 0 on error */
static unsigned int qed_parse_cache_tables(BDRVQEDState *s, QDict *options,
                                           Error **errp)
{
    QemuOpts *opts = qemu_opts_create(&qed_runtime_opts, NULL, 0,
                                      &error_abort);
    uint64_t table_bytes = qed_table_bytes(s);
    uint64_t bytes, tables;

    if (!qemu_opts_absorb_qdict(opts, options, errp)) {
        qemu_opts_del(opts);
        return 0;
    }
    tables = MIN(QED_DEFAULT_L2_CACHE_COVERAGE >> s->l1_shift,
                 QED_DEFAULT_L2_CACHE_MAX / table_bytes);
    tables = MAX(tables, QED_MIN_L2_CACHE_TABLES);
    bytes = qemu_opt_get_size(opts, QED_OPT_L2_CACHE_SIZE,
                              tables * table_bytes);
    qemu_opts_del(opts);

    if (bytes < table_bytes) {
        error_setg(errp, "Invalid %s %" PRIu64 ": must hold at least one "
                   "L2 table (%" PRIu64 " bytes)", QED_OPT_L2_CACHE_SIZE,
                   bytes, table_bytes);
        return 0;
    }
    tables = bytes / table_bytes;
    return MIN(tables, INT_MAX);
}

/* Validate a header read from disk; @file_size is the file's length */
static int qed_validate_header(QEDHeader *h, int64_t file_size, Error **errp)
{
    uint64_t header_bytes, table_bytes;

    if (h->magic != QED_MAGIC) {
        error_setg(errp, "Image not in QED format");
        return -EINVAL;
    }
    if (h->features & ~QED_FEATURE_MASK) {
        error_setg(errp, "Unsupported QED features: 0x%" PRIx64,
                   h->features & ~QED_FEATURE_MASK);
        return -ENOTSUP;
    }
    if (!qed_is_pow2_in(h->cluster_size, QED_MIN_CLUSTER_SIZE,
                        QED_MAX_CLUSTER_SIZE)) {
        error_setg(errp, "QED cluster size is invalid");
        return -EINVAL;
    }
    if (!qed_is_pow2_in(h->table_size, QED_MIN_TABLE_SIZE,
                        QED_MAX_TABLE_SIZE)) {
        error_setg(errp, "QED table size is invalid");
        return -EINVAL;
    }
    if (h->header_size == 0) {
        error_setg(errp, "QED header size is invalid");
        return -EINVAL;
    }

    /* The L1 table lies after the header, aligned, inside the file */
    header_bytes = (uint64_t)h->header_size * h->cluster_size;
    table_bytes = (uint64_t)h->table_size * h->cluster_size;
    if ((h->l1_table_offset & (h->cluster_size - 1)) ||
        h->l1_table_offset < header_bytes ||
        h->l1_table_offset > file_size ||
        table_bytes > file_size - h->l1_table_offset) {
        error_setg(errp, "QED table offset is invalid");
        return -EINVAL;
    }

    if (h->image_size % BDRV_SECTOR_SIZE ||
        h->image_size > qed_max_image_size(h->cluster_size, h->table_size)) {
        error_setg(errp, "QED image size is invalid");
        return -EINVAL;
    }

    if (h->features & QED_F_BACKING_FILE) {
        uint64_t end = (uint64_t)h->backing_filename_offset +
                       h->backing_filename_size;

        if (h->backing_filename_size == 0 ||
            h->backing_filename_offset < sizeof(QEDHeader) ||
            end > header_bytes || end > file_size ||
            h->backing_filename_size >= PATH_MAX) {
            error_setg(errp, "QED backing file name is invalid");
            return -EINVAL;
        }
    }
    return 0;
}

static void qed_free_state(BDRVQEDState *s)
{
    assert(QLIST_EMPTY(&s->allocs));
    s->allocating_writes = 0;

    if (s->l2_cache.by_offset) {
        /* Only a close whose writeback failed leaves dirty tables */
        unsigned int lost = qed_l2_cache_forget_dirty(&s->l2_cache);

        if (lost || s->l1_ndirty) {
            error_report("qed: %s: table entries of %u L2 tables (and %u "
                         "L1 sectors) could not be written; writes since "
                         "the last successful flush are lost",
                         s->bs->filename, lost, s->l1_ndirty);
        }
        qed_l2_cache_destroy(&s->l2_cache);
    }
    qed_table_free(s->l1_table, qed_table_bytes(s));
    s->l1_table = NULL;
    g_free(s->l1_dirty);
    s->l1_dirty = NULL;
    s->l1_ndirty = 0;
    g_free(s->l2_starts);
    s->l2_starts = NULL;
    s->n_l2_starts = s->l2_starts_size = 0;
    qed_screen_destroy(s);
}

static int coroutine_fn qed_do_open(BlockDriverState *bs, QDict *options,
                                    int flags, Error **errp)
{
    BDRVQEDState *s = bs->opaque;
    QEDHeader le;
    int64_t file_size;
    unsigned int cache_tables;
    int ret;

    s->bs = bs;
    QLIST_INIT(&s->allocs);
    qemu_co_queue_init(&s->alloc_waiters);
    qemu_co_queue_init(&s->idle_waiters);
    qemu_co_mutex_init(&s->header_lock);
    qemu_co_queue_init(&s->resize_waiters);
    QLIST_INIT(&s->tables_making);
    qemu_co_queue_init(&s->making_waiters);
    qemu_co_mutex_init(&s->wb_lock);

    ret = bdrv_co_pread(bs->file, 0, sizeof(le), &le, 0);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not read the QED header");
        return ret;
    }
    qed_header_le_to_cpu(&le, &s->header);

    file_size = bdrv_getlength(bs->file->bs);
    if (file_size < 0) {
        error_setg_errno(errp, -file_size, "Could not get the file size");
        return file_size;
    }
    ret = qed_validate_header(&s->header, file_size, errp);
    if (ret < 0) {
        return ret;
    }

    s->table_nelems = qed_table_bytes(s) / sizeof(uint64_t);
    s->l2_shift = ctz32(s->header.cluster_size);
    s->l2_mask = s->table_nelems - 1;
    s->l1_shift = s->l2_shift + ctz32(s->table_nelems);
    /* New clusters go after everything the file holds, never over it */
    s->file_end = ROUND_UP(file_size, s->header.cluster_size);
    s->file_size = file_size;
    s->can_grow = true;
    qed_screen_init(s);

    if (s->header.features & QED_F_BACKING_FILE) {
        char name[PATH_MAX];

        ret = bdrv_co_pread(bs->file, s->header.backing_filename_offset,
                            s->header.backing_filename_size, name, 0);
        if (ret < 0) {
            error_setg_errno(errp, -ret,
                             "Could not read the backing file name");
            return ret;
        }
        name[s->header.backing_filename_size] = '\0';
        /*
         * On a reopen (migration) the block layer has already resolved
         * auto_backing_file to the backing node's name: keep it unless the
         * image now names another file.
         */
        if (strcmp(name, bs->backing_file)) {
            pstrcpy(bs->backing_file, sizeof(bs->backing_file), name);
            pstrcpy(bs->auto_backing_file, sizeof(bs->auto_backing_file),
                    name);
        }
        if (s->header.features & QED_F_BACKING_FORMAT_NO_PROBE) {
            pstrcpy(bs->backing_format, sizeof(bs->backing_format), "raw");
        }
    }

    cache_tables = qed_parse_cache_tables(s, options, errp);
    if (cache_tables == 0) {
        return -EINVAL;
    }
    qed_l2_cache_init(&s->l2_cache, cache_tables, qed_table_bytes(s));

    s->l1_table = qed_table_new(qed_table_bytes(s));
    s->l1_dirty = bitmap_new(s->l2_cache.nsectors);
    ret = qed_read_l1_table(s);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not read the L1 table");
        goto fail;
    }
    qed_l2_starts_rebuild(s);

    bs->supported_zero_flags = BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK;
    bs->supported_truncate_flags = BDRV_REQ_ZERO_WRITE;

    if ((flags & BDRV_O_RDWR) && !(flags & BDRV_O_INACTIVE)) {
        /* A writer that does not know autoclear features clears them */
        if (s->header.autoclear_features & ~QED_AUTOCLEAR_FEATURE_MASK) {
            QEDHeader h = s->header;

            h.autoclear_features &= QED_AUTOCLEAR_FEATURE_MASK;
            qemu_co_mutex_lock(&s->header_lock);
            ret = qed_update_header(s, &h);
            qemu_co_mutex_unlock(&s->header_lock);
            if (ret < 0) {
                error_setg_errno(errp, -ret, "Could not update the header");
                goto fail;
            }
        }
    }

    if ((s->header.features & QED_F_NEED_CHECK) &&
        !(flags & (BDRV_O_CHECK | BDRV_O_INACTIVE))) {
        BdrvCheckResult result = {0};

        if (flags & BDRV_O_RDWR) {
            /* Repair what a crash left, then mark the image clean */
            ret = qed_check(s, &result, BDRV_FIX_ERRORS | BDRV_FIX_LEAKS);
            if (ret < 0 || result.corruptions || result.check_errors) {
                error_setg(errp, "Image is corrupt and could not be repaired "
                           "(%d corruptions, %d errors left); run "
                           "'qemu-img check -r all' on it by hand",
                           result.corruptions, result.check_errors);
                ret = ret < 0 ? ret : -EIO;
                goto fail;
            }
            ret = qed_clear_need_check(s);
            if (ret < 0) {
                error_setg_errno(errp, -ret, "Could not clear NEED_CHECK");
                goto fail;
            }
        } else {
            /* Read-only: look, but write nothing */
            ret = qed_check(s, &result, 0);
            if (ret == 0 && result.corruptions) {
                warn_report("%s: QED image needs repair (%d corruptions); "
                            "reads of the damaged parts fail; run "
                            "'qemu-img check -r all' on it", bs->filename,
                            result.corruptions);
            }
            ret = 0;
        }
    }

    trace_qed_open(s, s->header.image_size, s->header.cluster_size,
                   s->header.table_size, s->header.features);
    return 0;

fail:
    qed_free_state(s);
    return ret;
}

typedef struct QEDOpenCo {
    BlockDriverState *bs;
    QDict *options;
    int flags;
    Error **errp;
    int ret;
} QEDOpenCo;

static void coroutine_fn qed_open_entry(void *opaque)
{
    QEDOpenCo *qoc = opaque;

    qoc->ret = qed_do_open(qoc->bs, qoc->options, qoc->flags, qoc->errp);
}

static int qed_open(BlockDriverState *bs, QDict *options, int flags,
                    Error **errp)
{
    BDRVQEDState *s = bs->opaque;
    QEDOpenCo qoc = {
        .bs = bs, .options = options, .flags = flags, .errp = errp,
        .ret = -EINPROGRESS,
    };
    int ret;

    ret = bdrv_open_file_child(NULL, options, "file", bs, errp);
    if (ret < 0) {
        return ret;
    }

    if (qemu_in_coroutine()) {
        qed_open_entry(&qoc);
    } else {
        assert(qemu_get_current_aio_context() == qemu_get_aio_context());
        qemu_coroutine_enter(qemu_coroutine_create(qed_open_entry, &qoc));
        BDRV_POLL_WHILE(bs, qoc.ret == -EINPROGRESS);
    }
    if (qoc.ret == 0) {
        s->need_check_timer = aio_timer_new(bdrv_get_aio_context(bs),
                                            QEMU_CLOCK_REALTIME, SCALE_NS,
                                            qed_need_check_timer_cb, s);
    }
    return qoc.ret;
}

static void qed_refresh_limits(BlockDriverState *bs, Error **errp)
{
    BDRVQEDState *s = bs->opaque;

    bs->bl.pwrite_zeroes_alignment = s->header.cluster_size;
    bs->bl.pdiscard_alignment = s->header.cluster_size;
}

static void qed_close(BlockDriverState *bs)
{
    BDRVQEDState *s = bs->opaque;

    qed_cancel_timer(s);
    qed_detach_aio_context(bs);

    if (qed_may_write_header(s)) {
        /* A clean close leaves a clean image (crash ordering 5) */
        qed_call_in_coroutine(s, qed_co_clear_need_check, NULL);
        qed_call_in_coroutine(s, qed_trim_file_tail, NULL);
    }
    qed_free_state(s);
}

static int qed_inactivate(BlockDriverState *bs)
{
    BDRVQEDState *s = bs->opaque;
    int ret = 0;

    /* Hand the image over clean; nothing is written after this */
    qed_cancel_timer(s);
    if (!bdrv_is_read_only(bs)) {
        ret = qed_call_in_coroutine(s, qed_co_clear_need_check, NULL);
    }
    if (ret == 0 && !bdrv_is_read_only(bs)) {
        ret = qed_call_in_coroutine(s, qed_trim_file_tail, NULL);
    }
    return ret;
}

static void coroutine_fn qed_co_invalidate_cache(BlockDriverState *bs,
                                                 Error **errp)
{
    BDRVQEDState *s = bs->opaque;
    QEMUTimer *timer = s->need_check_timer;
    QDict *options;
    int ret;

    /* Another process may have changed the image: read it afresh */
    qed_cancel_timer(s);
    qed_free_state(s);
    memset(s, 0, sizeof(*s));
    s->need_check_timer = timer;

    options = qdict_clone_shallow(bs->options);
    ret = qed_do_open(bs, options, bs->open_flags, errp);
    qobject_unref(options);
    if (ret < 0) {
        error_prepend(errp, "Could not reopen qed layer: ");
    }
}

typedef struct QEDReopenState {
    unsigned int cache_tables;
} QEDReopenState;

static int qed_reopen_prepare(BDRVReopenState *state, BlockReopenQueue *queue,
                              Error **errp)
{
    BDRVQEDState *s = state->bs->opaque;
    QEDReopenState *r = g_new0(QEDReopenState, 1);
    int ret;

    r->cache_tables = qed_parse_cache_tables(s, state->options, errp);
    if (r->cache_tables == 0) {
        g_free(r);
        return -EINVAL;
    }
    state->opaque = r;

    /* Going read-only: the bit must be clear before we lose the right */
    if (!(state->flags & BDRV_O_RDWR) && !bdrv_is_read_only(state->bs)) {
        qed_cancel_timer(s);
        ret = qed_call_in_coroutine(s, qed_co_clear_need_check, NULL);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "Could not clear NEED_CHECK");
            g_free(r);
            state->opaque = NULL;
            return ret;
        }
    }
    return 0;
}

static void qed_reopen_commit(BDRVReopenState *state)
{
    BDRVQEDState *s = state->bs->opaque;
    QEDReopenState *r = state->opaque;

    qed_l2_cache_set_max(&s->l2_cache, r->cache_tables);
    g_free(r);
    state->opaque = NULL;
}

static void qed_reopen_abort(BDRVReopenState *state)
{
    g_free(state->opaque);
    state->opaque = NULL;
}

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
static bool coroutine_fn qed_claim(BDRVQEDState *s, QEDAllocation *a,
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

static void qed_release(BDRVQEDState *s, QEDAllocation *a)
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
static void coroutine_fn qed_wait_resize(BDRVQEDState *s, uint64_t end)
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
static void coroutine_fn qed_grow_file(BDRVQEDState *s)
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

/* ---- table entries and their writeback ---------------------------------- */

/*
 * Table entries change in memory: in the cached L2 tables and the L1
 * table, whose changed sectors are marked dirty.  Writeback passes write
 * the dirty sectors: on a flush, when many are dirty, when the image goes
 * idle, on drain and close.  So a write is acknowledged once its data is
 * on disk, many allocations share one sector write, and with a backing
 * file one flush serves a whole pass.
 */

static bool qed_tables_dirty(BDRVQEDState *s)
{
    return s->l2_cache.dirty_tables > 0 || s->l1_ndirty > 0;
}

static void qed_l1_mark_dirty(BDRVQEDState *s, unsigned int first,
                              unsigned int n)
{
    for (unsigned int i = first; i < first + n; i++) {
        if (!test_and_set_bit(i, s->l1_dirty)) {
            s->l1_ndirty++;
        }
    }
}

/* One run of adjacent dirty sectors of a table, copied for writing */
typedef struct QEDWbJob {
    CachedL2Table *e;           /* NULL for the L1 table */
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
 * Do sectors [first, end) of @e (NULL: the L1 table) hold the disk's
 * entries, so that writing them back is safe even where they are clean?
 */
static bool qed_wb_loaded(BDRVQEDState *s, CachedL2Table *e,
                          unsigned long first, unsigned long end)
{
    unsigned long spc = s->l2_cache.chunk_entries / QED_ENTRIES_PER_SECTOR;
    unsigned long last = (end - 1) / spc;

    return !e || find_next_zero_bit(e->loaded, last + 1, first / spc) > last;
}

/*
 * Snapshot the dirty sectors of @e (NULL: the L1 table) into @jobs, one
 * job per run, runs joined across short clean gaps.
 */
static void qed_wb_collect(BDRVQEDState *s, CachedL2Table *e, GArray *jobs)
{
    unsigned int nsectors = s->l2_cache.nsectors;
    unsigned long *dirty = e ? e->dirty : s->l1_dirty;
    uint64_t *entries = e ? e->table->offsets : s->l1_table->offsets;
    unsigned long i = find_first_bit(dirty, nsectors);

    while (i < nsectors) {
        unsigned long end = find_next_zero_bit(dirty, nsectors, i);
        unsigned long next;

        while ((next = find_next_bit(dirty, nsectors, end)) < nsectors &&
               next - end <= QED_WB_MAX_GAP &&
               qed_wb_loaded(s, e, end, next)) {
            end = find_next_zero_bit(dirty, nsectors, next);
        }

        QEDWbJob job = {
            .e = e,
            .first = i,
            .n = end - i,
            .fresh = e && e->fresh,
            .snapshot = qed_table_snapshot(s,
                                           &entries[i * QED_ENTRIES_PER_SECTOR],
                                           (end - i) * QED_ENTRIES_PER_SECTOR),
            .ret = -EINPROGRESS,
        };

        if (e) {
            qed_l2_cache_clear_dirty(&s->l2_cache, e, i, end - i);
            e->ref++;
        } else {
            for (unsigned long j = i; j < end; j++) {
                if (test_and_clear_bit(j, s->l1_dirty)) {
                    s->l1_ndirty--;
                }
            }
        }
        g_array_append_val(jobs, job);
        i = find_next_bit(dirty, nsectors, end);
    }
    if (e) {
        e->fresh = false;
    }
}

static int coroutine_fn qed_wb_task_run(AioTask *task)
{
    QEDWbTask *t = container_of(task, QEDWbTask, task);
    BDRVQEDState *s = t->s;
    QEDWbJob *job = t->job;
    unsigned int *inflight;
    uint64_t offset;
    bool *busy;

    if (job->e) {
        offset = job->e->offset;
        BLKDBG_EVENT(s->bs->file, job->fresh ? BLKDBG_L2_ALLOC_WRITE :
                                               BLKDBG_L2_UPDATE);
        trace_qed_l2_update(s, offset, job->first * QED_ENTRIES_PER_SECTOR,
                            job->n * QED_ENTRIES_PER_SECTOR);
    } else {
        offset = s->header.l1_table_offset;
        BLKDBG_EVENT(s->bs->file, BLKDBG_L1_UPDATE);
    }
    /* Not while the table's holes are being allocated (qed_secure_space) */
    busy = job->e ? &job->e->space_busy : &s->l1_space_busy;
    inflight = job->e ? &job->e->wb_inflight : &s->l1_wb_inflight;
    for (;;) {
        /* A new table may lie past a size change in flight (ordering 7) */
        qed_wait_resize(s, offset + (uint64_t)(job->first + job->n) *
                           BDRV_SECTOR_SIZE);
        if (!*busy) {
            break;
        }
        qemu_co_queue_wait(&s->making_waiters, NULL);
    }
    (*inflight)++;
    job->ret = qed_write_table_snapshot(s, offset,
                                        job->first * QED_ENTRIES_PER_SECTOR,
                                        job->n * QED_ENTRIES_PER_SECTOR,
                                        job->snapshot);
    (*inflight)--;
    qemu_co_queue_restart_all(&s->making_waiters);
    return job->ret;
}

/* Write jobs [from, to), several at once; the first error is returned */
static int coroutine_fn qed_wb_write(BDRVQEDState *s, GArray *jobs,
                                     unsigned int from, unsigned int to)
{
    AioTaskPool *pool = aio_task_pool_new(QED_WB_PARALLEL);
    int ret;

    for (unsigned int i = from; i < to; i++) {
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
    return ret;
}

/*
 * A flush of the file, for the crash ordering of a writeback pass.  Table
 * sectors written before it are durable once it succeeds (passes run one
 * at a time, so every earlier table write has completed).
 */
static int coroutine_fn qed_wb_flush(BDRVQEDState *s)
{
    int ret;

    BLKDBG_EVENT(s->bs->file, BLKDBG_FLUSH_TO_DISK);
    ret = bdrv_co_flush(s->bs->file->bs);
    trace_qed_wb_flush(s, s->wb_tables_unflushed, ret);
    if (ret == 0) {
        s->wb_tables_unflushed = false;
    }
    return ret;
}

/*
 * One writeback pass: every sector dirty when it starts reaches the disk,
 * or stays dirty (and the pass fails) if its write failed.  Passes run one
 * at a time, so two writes of one sector are never in flight together and
 * a flush that waits for wb_lock also waits for a pass that started
 * before it.
 *
 * Crash ordering, in this order:
 * - 4: without a backing file NEED_CHECK is on disk before any entry is
 *   written: the check repairs entries over data that never landed, and
 *   L1 entries over tables that did not.
 * - 1 and 3: the data of every entry was written before the entry was set
 *   in memory (and so before it was snapshot here); with a backing file a
 *   flush then puts it, and the file's new size, on disk before any L2
 *   sector is written, so a crash never leaves an entry over data that is
 *   not there while the backing file would have shown through.
 * - 2: a new L2 table is written before the L1 entry that points at it:
 *   the L1 snapshot is taken with the L2 ones, so it names only tables
 *   whose sectors are written first, and with a backing file a flush
 *   separates the two.  A table whose flush failed stays unflushed
 *   (wb_tables_unflushed) until a later flush succeeds: the next pass
 *   flushes before its L1 writes even if it writes no L2 sector.
 *   Sectors of a new table that were never written read as zeros (fresh
 *   file space), so only dirty sectors are written, and the table's last
 *   sector, so that the file holds the whole table even if the size
 *   change of the grow-ahead was lost.
 */
static int coroutine_fn qed_writeback(BDRVQEDState *s)
{
    L2TableCache *c = &s->l2_cache;
    GArray *jobs;
    CachedL2Table *e;
    unsigned int n_l2;
    int ret;

    qemu_co_mutex_lock(&s->wb_lock);
    if (!qed_tables_dirty(s)) {
        qemu_co_mutex_unlock(&s->wb_lock);
        return 0;
    }

    ret = qed_set_need_check(s);
    if (ret < 0) {
        qemu_co_mutex_unlock(&s->wb_lock);
        return ret;
    }

    jobs = g_array_new(false, false, sizeof(QEDWbJob));
    QTAILQ_FOREACH(e, &c->dirty_list, dirty_next) {
        qed_wb_collect(s, e, jobs);
    }
    n_l2 = jobs->len;
    qed_wb_collect(s, NULL, jobs);

    if (n_l2 > 0) {
        if (qed_has_backing_file(s)) {
            ret = qed_wb_flush(s);
        }
        if (ret == 0) {
            /* Until a flush succeeds, even if some of the writes failed */
            s->wb_tables_unflushed = true;
            ret = qed_wb_write(s, jobs, 0, n_l2);
        }
    }
    if (ret == 0 && jobs->len > n_l2) {
        /*
         * Also when this pass wrote no L2 sector: the flush after a new
         * table's write in an earlier pass may have failed, and the L1
         * entry that points at it must not reach the disk before the table
         */
        if (qed_has_backing_file(s) && s->wb_tables_unflushed) {
            ret = qed_wb_flush(s);
        }
        if (ret == 0) {
            ret = qed_wb_write(s, jobs, n_l2, jobs->len);
        }
    }
    trace_qed_writeback(s, n_l2, jobs->len - n_l2, ret);

    /* What did not reach the disk stays dirty for the next pass */
    for (unsigned int i = 0; i < jobs->len; i++) {
        QEDWbJob *job = &g_array_index(jobs, QEDWbJob, i);

        if (job->ret != 0) {
            if (job->e) {
                qed_l2_cache_mark_dirty(c, job->e, job->first, job->n);
                job->e->fresh |= job->fresh;
            } else {
                qed_l1_mark_dirty(s, job->first, job->n);
            }
        }
        qemu_vfree(job->snapshot);
    }
    /* Jobs hold references, so no table goes before all are settled */
    for (unsigned int i = 0; i < n_l2; i++) {
        qed_l2_cache_settle(c, g_array_index(jobs, QEDWbJob, i).e);
    }
    for (unsigned int i = 0; i < n_l2; i++) {
        qed_l2_cache_unref(c, g_array_index(jobs, QEDWbJob, i).e);
    }
    g_array_free(jobs, true);
    qemu_co_mutex_unlock(&s->wb_lock);
    return ret;
}

static void coroutine_fn qed_wb_background_entry(void *opaque)
{
    BDRVQEDState *s = opaque;

    /*
     * A failure leaves the sectors dirty: the next pass writes them again,
     * and a flush fails if that fails too
     */
    qed_writeback(s);
    s->wb_background = false;
    bdrv_dec_in_flight(s->bs);
}

/*
 * After a change of entries: start a background pass when many sectors
 * are dirty, and make the writer wait for one when far too many are (or
 * when the pinned dirty tables outgrow the cache).
 */
static void coroutine_fn qed_wb_throttle(BDRVQEDState *s)
{
    L2TableCache *c = &s->l2_cache;

    if (c->dirty_sectors > QED_WB_HARD_SECTORS ||
        c->dirty_tables > 2 * c->max_entries) {
        qed_writeback(s);
    } else if ((c->dirty_sectors > QED_WB_SOFT_SECTORS ||
                c->dirty_tables > c->max_entries) &&
               !s->wb_background) {
        trace_qed_writeback_kick(s, c->dirty_sectors, c->dirty_tables);
        s->wb_background = true;
        bdrv_inc_in_flight(s->bs);
        aio_co_enter(bdrv_get_aio_context(s->bs),
                     qemu_coroutine_create(qed_wb_background_entry, s));
    }
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
    size_t chunk = MIN(bytes, 1 * MiB);
    QEMUIOVector qiov;
    void *zeros;
    int ret = 0;

    zeros = qemu_try_blockalign0(s->bs->file->bs, chunk);
    if (!zeros) {
        return -ENOMEM;
    }
    while (bytes > 0) {
        uint64_t n = MIN(bytes, 16 * MiB);

        qemu_iovec_init(&qiov, DIV_ROUND_UP(n, chunk));
        for (uint64_t done = 0; done < n; done += chunk) {
            qemu_iovec_add(&qiov, zeros, MIN(chunk, n - done));
        }
        ret = bdrv_co_pwritev(s->bs->file, offset, n, &qiov, 0);
        qemu_iovec_destroy(&qiov);
        if (ret < 0) {
            break;
        }
        offset += n;
        bytes -= n;
    }
    qemu_vfree(zeros);
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
 * *@ok, *@busy and *@inflight are the table's: done, being done (others
 * wait on making_waiters), and its sector writes in flight.
 */
static int coroutine_fn qed_secure_space(BDRVQEDState *s, uint64_t pos,
                                         uint64_t bytes, bool *ok, bool *busy,
                                         unsigned int *inflight)
{
    uint64_t end = pos + bytes;
    int ret = 0;

    while (*busy) {
        qemu_co_queue_wait(&s->making_waiters, NULL);
    }
    if (*ok) {
        return 0;
    }
    *busy = true;
    while (*inflight) {
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
    *busy = false;
    *ok = ret == 0;
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
static int coroutine_fn qed_make_table(BDRVQEDState *s, unsigned int l1i,
                                       CachedL2Table **e)
{
    L2TableCache *c = &s->l2_cache;
    uint64_t bytes = qed_table_bytes(s);
    QEDTableMaking m = { .l1_index = l1i };
    uint64_t l2_offset = 0;
    int ret;

    QLIST_INSERT_HEAD(&s->tables_making, &m, next);
    /* The L1 entry that will point at the table must be writable too */
    ret = qed_secure_space(s, s->header.l1_table_offset, bytes,
                           &s->l1_space_ok, &s->l1_space_busy,
                           &s->l1_wb_inflight);
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

    /* Fresh file space reads as zeros: the whole table is known */
    *e = qed_l2_cache_insert(c, l2_offset, qed_table_new(bytes), true);
    (*e)->fresh = true;
    (*e)->space_ok = true;
    /*
     * Sectors of a new table that were never written read as zeros, so
     * only dirty ones are written back; the last one is written too (it
     * costs one sector per table), so that the file holds the whole table
     * wherever the zeroing left its end.
     */
    qed_l2_cache_mark_dirty(c, *e, c->nsectors - 1, 1);
    qed_screen_new_table(s, l2_offset);
    s->l1_table->offsets[l1i] = l2_offset;
    qed_l2_starts_add(s, l2_offset);
    qed_l1_mark_dirty(s, l1i / QED_ENTRIES_PER_SECTOR, 1);
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
 * Set the entries of clusters [start, start + n clusters), which lie in
 * one L2 table, to value, value + step, ... in memory, making the table
 * if there is none (unsetting entries of a table that does not exist is a
 * no-op).  The caller holds the clusters (qed_claim) and has written the
 * data the entries point at (crash ordering 1); writeback passes take
 * them to disk.
 */
static int coroutine_fn qed_set_entries(BDRVQEDState *s, uint64_t start,
                                        unsigned int n, uint64_t value,
                                        uint64_t step)
{
    L2TableCache *c = &s->l2_cache;
    unsigned int l1i = qed_l1_index(s, start);
    unsigned int first = qed_l2_index(s, start);
    uint64_t l2_offset;
    CachedL2Table *e;
    int ret;

    assert(n > 0 && first + n <= s->table_nelems);
    while (qed_table_making(s, l1i)) {
        qemu_co_queue_wait(&s->making_waiters, NULL);
    }
    l2_offset = s->l1_table->offsets[l1i];
    if (l2_offset == 0) {
        if (value == QED_L2_UNALLOCATED) {
            return 0;
        }
        ret = qed_make_table(s, l1i, &e);
        if (ret < 0) {
            return ret;
        }
        l2_offset = e->offset;
    } else {
        ret = qed_get_l2_table(s, l2_offset, &e);
        if (ret < 0) {
            return ret;
        }
        ret = qed_l2_ensure(s, e, first, first + n);
        if (ret == 0) {
            ret = qed_secure_space(s, e->offset, qed_table_bytes(s),
                                   &e->space_ok, &e->space_busy,
                                   &e->wb_inflight);
        }
        if (ret < 0) {
            qed_l2_cache_unref(c, e);
            return ret;
        }
    }

    qed_screen_forget(s, l2_offset, first, n);
    for (unsigned int i = 0; i < n; i++) {
        e->table->offsets[first + i] = value + i * step;
    }
    qed_l2_cache_mark_dirty(c, e, first / QED_ENTRIES_PER_SECTOR,
                            DIV_ROUND_UP(first + n, QED_ENTRIES_PER_SECTOR) -
                            first / QED_ENTRIES_PER_SECTOR);
    qed_l2_cache_unref(c, e);
    s->l2_gen++;
    return 0;
}

/*
 * A flush makes every completed write durable: their entries are set in
 * memory, so one writeback pass (which also waits for a pass under way)
 * puts them on disk, and the block layer flushes the file after it.
 */
static int coroutine_fn qed_co_flush_to_os(BlockDriverState *bs)
{
    return qed_writeback(bs->opaque);
}

/* ---- reads -------------------------------------------------------------- */

/* Unallocated: the backing file shows through, zeros past it or without */
static int coroutine_fn qed_read_backing(BDRVQEDState *s, uint64_t pos,
                                         uint64_t bytes, QEMUIOVector *qiov,
                                         size_t qiov_offset)
{
    if (s->bs->backing) {
        BLKDBG_EVENT(s->bs->file, BLKDBG_READ_BACKING_AIO);
        return bdrv_co_preadv_part(s->bs->backing, pos, bytes, qiov,
                                   qiov_offset, 0);
    }
    qemu_iovec_memset(qiov, qiov_offset, 0, bytes);
    return 0;
}

static int coroutine_fn qed_co_preadv_part(BlockDriverState *bs,
                                           int64_t offset, int64_t bytes,
                                           QEMUIOVector *qiov,
                                           size_t qiov_offset,
                                           BdrvRequestFlags flags)
{
    BDRVQEDState *s = bs->opaque;

    trace_qed_co_preadv(s, offset, bytes);
    while (bytes > 0) {
        QEDExtent ext;
        int ret;

        ret = qed_find_extent(s, offset, bytes, &ext);
        if (ret < 0) {
            return ret;
        }

        switch (ext.type) {
        case QED_EXTENT_DATA:
            BLKDBG_EVENT(bs->file, BLKDBG_READ_AIO);
            ret = bdrv_co_preadv_part(bs->file, ext.file_offset, ext.bytes,
                                      qiov, qiov_offset, 0);
            break;
        case QED_EXTENT_ZERO:
            qemu_iovec_memset(qiov, qiov_offset, 0, ext.bytes);
            break;
        case QED_EXTENT_UNALLOCATED:
            ret = qed_read_backing(s, offset, ext.bytes, qiov, qiov_offset);
            break;
        }
        if (ret < 0) {
            return ret;
        }
        offset += ext.bytes;
        qiov_offset += ext.bytes;
        bytes -= ext.bytes;
    }
    return 0;
}

/* ---- writes ------------------------------------------------------------- */

/*
 * Write [pos, pos + bytes) of the virtual disk, which all lies in
 * unallocated or zero clusters mapped by one L2 table, into new clusters.
 * @gen is s->l2_gen from before the lookup that found them.  Returns the
 * bytes written, 0 if the caller must look up again, or a negative errno.
 *
 * Crash ordering 1: the data (with its copy-on-write padding) is written
 * before the entry is set in the cached table.  The request completes
 * once its data is on disk; the entry reaches the disk with a writeback
 * pass, at the latest with the next flush (qed_writeback).
 */
static int64_t coroutine_fn qed_allocating_write(BDRVQEDState *s,
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
        return 0;
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
        QEMUIOVector hq;

        head_buf = qemu_blockalign(s->bs, head);
        qemu_iovec_init_buf(&hq, head_buf, head);
        BLKDBG_EVENT(s->bs->file, BLKDBG_COW_READ);
        ret = qed_read_backing(s, start, head, &hq, 0);
        if (ret < 0) {
            goto fail;
        }
        qemu_iovec_add(&wqiov, head_buf, head);
        wstart = alloc->file_offset;
    }
    qemu_iovec_concat(&wqiov, qiov, qiov_offset, bytes);
    if (cow && tail) {
        QEMUIOVector tq;

        tail_buf = qemu_blockalign(s->bs, tail);
        qemu_iovec_init_buf(&tq, tail_buf, tail);
        BLKDBG_EVENT(s->bs->file, BLKDBG_COW_READ);
        ret = qed_read_backing(s, pos + bytes, tail, &tq, 0);
        if (ret < 0) {
            goto fail;
        }
        qemu_iovec_add(&wqiov, tail_buf, tail);
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

/* Bytes from @pos to the end of the L2 table that maps it */
static uint64_t qed_bytes_to_table_end(BDRVQEDState *s, uint64_t pos)
{
    uint64_t table_span = 1ULL << s->l1_shift;

    return ROUND_UP(pos + 1, table_span) - pos;
}

static int coroutine_fn qed_co_pwritev_part(BlockDriverState *bs,
                                            int64_t offset, int64_t bytes,
                                            QEMUIOVector *qiov,
                                            size_t qiov_offset,
                                            BdrvRequestFlags flags)
{
    BDRVQEDState *s = bs->opaque;

    trace_qed_co_pwritev(s, offset, bytes, flags);
    while (bytes > 0) {
        uint64_t gen = s->l2_gen;
        QEDExtent ext;
        int64_t ret;

        ret = qed_find_extent(s, offset, bytes, &ext);
        if (ret < 0) {
            return ret;
        }

        if (ext.type == QED_EXTENT_DATA) {
            /* In place: the cluster is ours and stays where it is */
            qed_wait_resize(s, ext.file_offset + ext.bytes);
            BLKDBG_EVENT(bs->file, BLKDBG_WRITE_AIO);
            ret = bdrv_co_pwritev_part(bs->file, ext.file_offset, ext.bytes,
                                       qiov, qiov_offset, 0);
            if (ret < 0) {
                return ret;
            }
            ret = ext.bytes;
        } else {
            uint64_t len = MIN(ext.bytes, qed_bytes_to_table_end(s, offset));

            ret = qed_allocating_write(s, offset, len, ext.type, qiov,
                                       qiov_offset, gen);
            if (ret < 0) {
                return ret;
            }
        }
        offset += ret;
        qiov_offset += ret;
        bytes -= ret;
    }
    return 0;
}

/*
 * Give clusters [start, end), which lie in one L2 table, the marker @value
 * (QED_L2_ZERO or QED_L2_UNALLOCATED).  @gen is s->l2_gen from before the
 * lookup that found them.  Returns 0 when done, -EAGAIN when the caller
 * must look up again.
 */
static int coroutine_fn qed_set_markers(BDRVQEDState *s, uint64_t start,
                                        uint64_t end, uint64_t value,
                                        uint64_t gen)
{
    QEDAllocation alloc;
    int ret;

    if (!qed_claim(s, &alloc, start, end, gen)) {
        return -EAGAIN;
    }
    ret = qed_set_entries(s, start, (end - start) >> s->l2_shift, value, 0);
    qed_release(s, &alloc);
    if (ret == 0) {
        qed_wb_throttle(s);
    }
    return ret;
}

/* Does [offset, offset + bytes) cover whole clusters (or reach the end)? */
static bool qed_whole_clusters(BDRVQEDState *s, uint64_t offset,
                               uint64_t bytes)
{
    uint64_t end = offset + bytes;

    return qed_offset_into_cluster(s, offset) == 0 &&
           (qed_offset_into_cluster(s, end) == 0 ||
            end == s->header.image_size);
}

static int coroutine_fn qed_co_pwrite_zeroes(BlockDriverState *bs,
                                             int64_t offset, int64_t bytes,
                                             BdrvRequestFlags flags)
{
    BDRVQEDState *s = bs->opaque;

    while (bytes > 0) {
        uint64_t gen = s->l2_gen;
        QEDExtent ext;
        int ret;

        ret = qed_find_extent(s, offset, bytes, &ext);
        if (ret < 0) {
            return ret;
        }

        switch (ext.type) {
        case QED_EXTENT_DATA:
            /* Allocated clusters stay; the file zeroes (and may unmap) */
            ret = bdrv_co_pwrite_zeroes(bs->file, ext.file_offset, ext.bytes,
                                        flags);
            break;
        case QED_EXTENT_ZERO:
            break;
        case QED_EXTENT_UNALLOCATED:
            if (!bs->backing) {
                /* Reads as zeros already */
                break;
            }
            ext.bytes = MIN(ext.bytes, qed_bytes_to_table_end(s, offset));
            if (!qed_whole_clusters(s, offset, ext.bytes)) {
                /* Part of a cluster: the block layer writes zeros as data */
                return -ENOTSUP;
            }
            ret = qed_set_markers(s, offset,
                                  ROUND_UP(offset + ext.bytes,
                                           s->header.cluster_size),
                                  QED_L2_ZERO, gen);
            if (ret == -EAGAIN) {
                continue;
            }
            break;
        }
        if (ret < 0) {
            return ret;
        }
        offset += ext.bytes;
        bytes -= ext.bytes;
    }
    return 0;
}

/*
 * Guest TRIM: data clusters become unallocated (zero clusters over a
 * backing file, so that discarded data never shows the backing file) and
 * their space goes back to the host.  The entry changes in memory first,
 * then the file is punched; the entry reaches the disk with the next
 * writeback.  A crash before that leaves the old entry over the punched
 * cluster, which reads as zeros, as the new entry would: the discard took
 * effect either way.  The cluster is never reused while the image is open,
 * so the old entry can't come to point at someone else's data.
 */
static int coroutine_fn qed_co_pdiscard(BlockDriverState *bs, int64_t offset,
                                        int64_t bytes)
{
    BDRVQEDState *s = bs->opaque;
    uint64_t marker = bs->backing ? QED_L2_ZERO : QED_L2_UNALLOCATED;

    trace_qed_discard(s, offset, bytes);
    if (!qed_whole_clusters(s, offset, bytes)) {
        return -ENOTSUP;
    }
    while (bytes > 0) {
        uint64_t gen = s->l2_gen;
        QEDExtent ext;
        int ret;

        ret = qed_find_extent(s, offset, bytes, &ext);
        if (ret < 0) {
            return ret;
        }
        ext.bytes = MIN(ext.bytes, qed_bytes_to_table_end(s, offset));

        if (ext.type == QED_EXTENT_DATA) {
            uint64_t end = ROUND_UP(offset + ext.bytes,
                                    s->header.cluster_size);

            ret = qed_set_markers(s, offset, end, marker, gen);
            if (ret == -EAGAIN) {
                continue;
            }
            if (ret < 0) {
                return ret;
            }
            /* Errors here only keep the space: the data is gone already */
            bdrv_co_pdiscard(bs->file, ext.file_offset, end - offset);
        }
        offset += ext.bytes;
        bytes -= ext.bytes;
    }
    return 0;
}

static int coroutine_fn qed_co_block_status(BlockDriverState *bs,
                                            bool want_zero, int64_t offset,
                                            int64_t bytes, int64_t *pnum,
                                            int64_t *map,
                                            BlockDriverState **file)
{
    BDRVQEDState *s = bs->opaque;
    QEDExtent ext;
    int ret;

    ret = qed_find_extent(s, offset, bytes, &ext);
    if (ret < 0) {
        return ret;
    }
    *pnum = ext.bytes;
    switch (ext.type) {
    case QED_EXTENT_DATA:
        *map = ext.file_offset;
        *file = bs->file->bs;
        /*
         * Clusters allocated but never written (preallocation=metadata, or
         * the grow-ahead's space) read as zeros: the file below says where
         * (map, measure and convert ask with want_zero)
         */
        return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID |
               (want_zero ? BDRV_BLOCK_RECURSE : 0);
    case QED_EXTENT_ZERO:
        return BDRV_BLOCK_ZERO;
    default:
        return 0;
    }
}

/* ---- size, info, backing file ------------------------------------------- */

static int coroutine_fn qed_co_truncate(BlockDriverState *bs, int64_t offset,
                                        bool exact, PreallocMode prealloc,
                                        BdrvRequestFlags flags, Error **errp)
{
    BDRVQEDState *s = bs->opaque;
    uint64_t old_size = s->header.image_size;
    QEDHeader h;
    int ret;

    if (prealloc != PREALLOC_MODE_OFF) {
        error_setg(errp, "Unsupported preallocation mode '%s'",
                   PreallocMode_str(prealloc));
        return -ENOTSUP;
    }
    if (offset < old_size) {
        error_setg(errp, "QED images cannot be shrunk (from %" PRIu64
                   " to %" PRId64 " bytes)", old_size, offset);
        return -ENOTSUP;
    }
    ret = qed_check_image_size(offset, s->header.cluster_size,
                               s->header.table_size, errp);
    if (ret < 0) {
        return ret;
    }
    if (offset == old_size) {
        return 0;
    }

    /*
     * Entries past the old end are unallocated, so growing is one header
     * write (a single sector, so a crash leaves the old or the new size).
     */
    qemu_co_mutex_lock(&s->header_lock);
    h = s->header;
    h.image_size = offset;
    ret = qed_update_header(s, &h);
    qemu_co_mutex_unlock(&s->header_lock);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Failed to update the image size");
        return ret;
    }

    if (flags & BDRV_REQ_ZERO_WRITE) {
        /* The backing file must not show through the new area */
        ret = qed_co_pwrite_zeroes(bs, old_size, offset - old_size, 0);
        if (ret == -ENOTSUP) {
            uint64_t head_end = MIN(ROUND_UP(old_size,
                                             s->header.cluster_size), offset);
            QEMUIOVector qiov;
            uint8_t *zeros = qemu_blockalign0(bs, head_end - old_size);

            qemu_iovec_init_buf(&qiov, zeros, head_end - old_size);
            ret = qed_co_pwritev_part(bs, old_size, head_end - old_size,
                                      &qiov, 0, 0);
            qemu_vfree(zeros);
            if (ret == 0 && head_end < offset) {
                ret = qed_co_pwrite_zeroes(bs, head_end, offset - head_end,
                                           0);
            }
        }
        if (ret < 0) {
            error_setg_errno(errp, -ret, "Failed to zero the new area");
            return ret;
        }
    }
    return 0;
}

static int64_t qed_getlength(BlockDriverState *bs)
{
    BDRVQEDState *s = bs->opaque;

    return s->header.image_size;
}

static int qed_get_info(BlockDriverState *bs, BlockDriverInfo *bdi)
{
    BDRVQEDState *s = bs->opaque;

    memset(bdi, 0, sizeof(*bdi));
    bdi->cluster_size = s->header.cluster_size;
    bdi->is_dirty = s->header.features & QED_F_NEED_CHECK;
    return 0;
}

typedef struct QEDBackingChange {
    const char *file;
    const char *fmt;
} QEDBackingChange;

/*
 * Where in the header clusters a backing file name of @len bytes can go
 * without touching the bytes of the name the header names now: after the
 * header, after the current name, or at the end.  0 if nowhere.
 */
static uint32_t qed_backing_name_slot(BDRVQEDState *s, size_t len)
{
    uint64_t header_bytes = (uint64_t)s->header.header_size *
                            s->header.cluster_size;
    uint64_t old_start = 0, old_end = 0;
    uint64_t slots[3];

    if (s->header.features & QED_F_BACKING_FILE) {
        old_start = s->header.backing_filename_offset;
        old_end = old_start + s->header.backing_filename_size;
    }
    slots[0] = sizeof(QEDHeader);
    slots[1] = MAX(old_end, sizeof(QEDHeader));
    slots[2] = header_bytes >= len ? header_bytes - len : 0;
    for (int i = 0; i < ARRAY_SIZE(slots); i++) {
        uint64_t start = slots[i], end = start + len;

        if (start >= sizeof(QEDHeader) && end <= header_bytes &&
            (end <= old_start || start >= old_end)) {
            return start;
        }
    }
    return 0;
}

/*
 * Point the header at a new backing file (or at none).
 *
 * Crash ordering 6: the new name is written where the current header does
 * not look, and flushed, before the header's one sector points at it: a
 * crash leaves either the old header with its intact name or the new one
 * with the new name.  When the two names do not fit side by side in the
 * header clusters no such order exists, and the change is refused.
 */
static int coroutine_fn qed_co_change_backing(BDRVQEDState *s, void *opaque)
{
    QEDBackingChange *change = opaque;
    const char *file = change->file;
    const char *fmt = change->fmt;
    uint64_t header_bytes = (uint64_t)s->header.header_size *
                            s->header.cluster_size;
    size_t len = file ? strlen(file) : 0;
    QEDHeader h;
    int ret;

    /* Dirty entries were set under the old backing file's crash rules */
    ret = qed_writeback(s);
    if (ret < 0) {
        return ret;
    }

    qemu_co_mutex_lock(&s->header_lock);
    h = s->header;
    h.features &= ~(QED_F_BACKING_FILE | QED_F_BACKING_FORMAT_NO_PROBE);
    h.backing_filename_offset = 0;
    h.backing_filename_size = 0;
    if (len) {
        uint32_t off;

        if (len > header_bytes - sizeof(QEDHeader)) {
            error_report("Backing file name too long: %zu bytes, a %" PRIu64
                         "-byte header holds at most %" PRIu64, len,
                         header_bytes, header_bytes - sizeof(QEDHeader));
            ret = -ENOSPC;
            goto out;
        }
        off = qed_backing_name_slot(s, len);
        if (!off) {
            error_report("Backing file name too long for a crash-safe "
                         "change: the %" PRIu64 "-byte header must hold the "
                         "old name (%" PRIu32 " bytes) and the new one (%zu "
                         "bytes) side by side", header_bytes,
                         s->header.backing_filename_size, len);
            ret = -ENOSPC;
            goto out;
        }
        ret = bdrv_co_pwrite(s->bs->file, off, len, file, 0);
        if (ret == 0) {
            ret = bdrv_co_flush(s->bs->file->bs);
        }
        if (ret < 0) {
            goto out;
        }
        h.features |= QED_F_BACKING_FILE;
        if (fmt && !strcmp(fmt, "raw")) {
            h.features |= QED_F_BACKING_FORMAT_NO_PROBE;
        }
        h.backing_filename_offset = off;
        h.backing_filename_size = len;
    }
    ret = qed_update_header(s, &h);
    if (ret == 0) {
        pstrcpy(s->bs->auto_backing_file, sizeof(s->bs->auto_backing_file),
                file ?: "");
    }
out:
    qemu_co_mutex_unlock(&s->header_lock);
    return ret;
}

/*
 * Empty the image, after a commit into its backing file: every cluster
 * becomes unallocated and the file shrinks to the header and the L1 table.
 *
 * Crash ordering 9: the backing file is flushed first, so the data that
 * this image held is durable there.  Then NEED_CHECK is set and flushed,
 * a zeroed L1 table is written and flushed, the file is cut to header and
 * L1 table, and the bit is cleared (ordering 5).  A crash at any point
 * leaves, per L1 sector, the old entries or none: where none, the backing
 * file shows the same data through; the tables and clusters that nothing
 * references any more are leaks, which the check that NEED_CHECK asks for
 * cuts off.
 */
static int coroutine_fn qed_co_make_empty(BDRVQEDState *s, void *opaque)
{
    uint64_t bytes = qed_table_bytes(s);
    QEDTable *zero;
    int ret;

    /* Nothing may be in flight (the caller drained): settle the tables */
    while (qed_allocs_in_flight(s)) {
        qemu_co_queue_wait(&s->idle_waiters, NULL);
    }
    ret = qed_writeback(s);
    if (ret < 0) {
        return ret;
    }
    if (s->bs->backing) {
        ret = bdrv_co_flush(s->bs->backing->bs);
        if (ret < 0) {
            return ret;
        }
    }

    qemu_co_mutex_lock(&s->wb_lock);
    ret = qed_raise_need_check(s);
    if (ret == 0) {
        zero = qed_table_new(bytes);
        ret = qed_write_l1_table(s, zero, 0, s->table_nelems);
        qed_table_free(zero, bytes);
    }
    if (ret == 0) {
        ret = bdrv_co_flush(s->bs->file->bs);
    }
    if (ret == 0) {
        /* The disk names no table now: neither may memory */
        memset(s->l1_table->offsets, 0, bytes);
        bitmap_zero(s->l1_dirty, s->l2_cache.nsectors);
        s->l1_ndirty = 0;
        qed_l2_cache_clear(&s->l2_cache);
        qed_l2_starts_rebuild(s);
        s->l2_gen++;
        s->file_end = MAX((uint64_t)s->header.header_size *
                          s->header.cluster_size,
                          s->header.l1_table_offset + bytes);
        qed_screen_reset(s);
    }
    qemu_co_mutex_unlock(&s->wb_lock);
    if (ret < 0) {
        return ret;
    }

    /* Cuts the file to file_end, then clears the bit */
    return qed_clear_need_check(s);
}

static int qed_make_empty(BlockDriverState *bs)
{
    BDRVQEDState *s = bs->opaque;
    int ret;

    bdrv_drained_begin(bs);
    ret = qed_call_in_coroutine(s, qed_co_make_empty, NULL);
    bdrv_drained_end(bs);
    return ret;
}

static int qed_change_backing_file(BlockDriverState *bs,
                                   const char *backing_file,
                                   const char *backing_fmt)
{
    BDRVQEDState *s = bs->opaque;

    QEDBackingChange change = { .file = backing_file, .fmt = backing_fmt };

    return qed_call_in_coroutine(s, qed_co_change_backing, &change);
}

static int coroutine_fn qed_co_check(BlockDriverState *bs,
                                     BdrvCheckResult *result,
                                     BdrvCheckMode fix)
{
    BDRVQEDState *s = bs->opaque;
    int ret;

    if (s->header.features & QED_F_NEED_CHECK) {
        /* What a crash leaves (leaks, a tail) is no surprise then */
        fprintf(stderr, "The image was not closed cleanly (NEED_CHECK is "
                "set)\n");
    }

    /*
     * The check reads the tables from disk: the entries of every
     * acknowledged write must be there, or a repair would reclaim their
     * clusters as leaked
     */
    while (qed_allocs_in_flight(s)) {
        qemu_co_queue_wait(&s->idle_waiters, NULL);
    }
    ret = qed_writeback(s);
    if (ret < 0) {
        return ret;
    }
    ret = qed_check(s, result, fix);
    if (ret == 0 && (fix & BDRV_FIX_ERRORS) && !result->corruptions &&
        !result->check_errors) {
        ret = qed_clear_need_check(s);
    }
    return ret;
}

/* ---- create ------------------------------------------------------------- */

/*
 * The original QEMU driver refuses to open some valid QED images (found by
 * trying every geometry on it; it even creates the first kind itself):
 * - table_size 1 ("QED table offset is invalid");
 * - a non-empty image whose largest size, cluster_size * (table_size *
 *   cluster_size / 8)^2, does not fit in 64 bits, i.e. 3 * log2(cluster_size)
 *   + 2 * log2(table_size) >= 70 ("QED image size is invalid").
 */
static bool qed_original_can_open(uint64_t cluster_size, uint32_t table_size,
                                  uint64_t image_size)
{
    if (table_size == 1) {
        return false;
    }
    return image_size == 0 ||
           3 * ctz64(cluster_size) + 2 * ctz32(table_size) < 70;
}

/* Check every create option before anything is written anywhere */
static int qed_validate_create(BlockdevCreateOptionsQed *o, Error **errp)
{
    uint64_t cluster_size = o->has_cluster_size ? o->cluster_size :
                            QED_DEFAULT_CLUSTER_SIZE;
    int64_t table_size = o->has_table_size ? o->table_size :
                         QED_DEFAULT_TABLE_SIZE;
    int ret;

    ret = qed_check_geometry(cluster_size, table_size, errp);
    if (ret == 0) {
        ret = qed_check_image_size(o->size, cluster_size, table_size, errp);
    }
    if (ret < 0) {
        return ret;
    }
    if (o->has_backing_file &&
        strlen(o->backing_file) > cluster_size - sizeof(QEDHeader)) {
        error_setg(errp, "Backing file name too long: %zu bytes, a %" PRIu64
                   "-byte header holds at most %" PRIu64,
                   strlen(o->backing_file), cluster_size,
                   cluster_size - sizeof(QEDHeader));
        return -EINVAL;
    }
    if (o->has_preallocation && o->preallocation != PREALLOC_MODE_OFF) {
        if (o->has_backing_file) {
            error_setg(errp, "Backing file and preallocation cannot be used "
                       "at the same time: preallocated clusters would hide "
                       "the backing file");
            return -EINVAL;
        }
    }
    return 0;
}

/*
 * preallocation=metadata|falloc|full: every L2 table and every data
 * cluster is allocated at creation, tables first, then the data clusters
 * in guest order, so the image never allocates again.  Nothing points at
 * the new space until the L1 table is written last, and the new image is
 * not in use by anyone yet, so no ordering beyond that is needed.
 */
static int coroutine_fn qed_preallocate(BlockBackend *blk, QEDHeader *h,
                                        PreallocMode mode, Error **errp)
{
    uint64_t cs = h->cluster_size;
    uint64_t table_bytes = (uint64_t)h->table_size * cs;
    uint64_t nelems = table_bytes / sizeof(uint64_t);
    uint64_t nclusters = DIV_ROUND_UP(h->image_size, cs);
    uint64_t ntables = DIV_ROUND_UP(nclusters, nelems);
    uint64_t tables_start = h->l1_table_offset + table_bytes;
    uint64_t data_start = tables_start + ntables * table_bytes;
    uint64_t *l1, *l2;
    int ret = 0;

    if (nclusters == 0) {
        return 0;
    }
    l1 = g_malloc0(table_bytes);
    l2 = qemu_try_blockalign(blk_bs(blk), table_bytes);
    if (!l2) {
        g_free(l1);
        error_setg(errp, "Could not allocate memory for an L2 table");
        return -ENOMEM;
    }

    for (uint64_t t = 0; t < ntables; t++) {
        uint64_t first = t * nelems;

        for (uint64_t i = 0; i < nelems; i++) {
            l2[i] = first + i < nclusters ?
                    cpu_to_le64(data_start + (first + i) * cs) : 0;
        }
        ret = blk_co_pwrite(blk, tables_start + t * table_bytes, table_bytes,
                            l2, 0);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "Could not write an L2 table");
            goto out;
        }
        l1[t] = cpu_to_le64(tables_start + t * table_bytes);
    }

    /* The data area: sparse, allocated or written with zeros */
    ret = blk_co_truncate(blk, data_start + nclusters * cs, false,
                          mode == PREALLOC_MODE_METADATA ? PREALLOC_MODE_OFF :
                          mode, 0, errp);
    if (ret < 0) {
        goto out;
    }
    ret = blk_co_flush(blk);
    if (ret == 0) {
        ret = blk_co_pwrite(blk, h->l1_table_offset, table_bytes, l1, 0);
    }
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not write the L1 table");
    }

out:
    g_free(l1);
    qemu_vfree(l2);
    return ret;
}

/*
 * QED grows its file as it allocates, which a block device cannot do:
 * refuse one before writing a byte to it.
 */
static int qed_check_growable(BlockDriverState *file, Error **errp)
{
    const char *name = file->drv ? file->drv->format_name : "";
    struct stat st;

    if (!strcmp(name, "host_device") || !strcmp(name, "host_cdrom") ||
        (!strcmp(name, "file") && stat(file->filename, &st) == 0 &&
         (S_ISBLK(st.st_mode) || S_ISCHR(st.st_mode)))) {
        error_setg(errp, "QED needs a regular file that can grow: '%s' is a "
                   "block device", file->filename);
        return -ENOTSUP;
    }
    return 0;
}

/* The same, by name, before the protocol layer creates (or zeroes) it */
static int qed_check_growable_name(const char *filename, Error **errp)
{
    BlockDriver *proto = bdrv_find_protocol(filename, true, NULL);
    const char *path = filename;
    struct stat st;

    if (!strstart(filename, "file:", &path) &&
        !strstart(filename, "host_device:", &path)) {
        strstart(filename, "host_cdrom:", &path);
    }
    if ((proto && (!strcmp(proto->format_name, "host_device") ||
                   !strcmp(proto->format_name, "host_cdrom"))) ||
        (stat(path, &st) == 0 && (S_ISBLK(st.st_mode) ||
                                  S_ISCHR(st.st_mode)))) {
        error_setg(errp, "QED needs a regular file that can grow: '%s' is a "
                   "block device", path);
        return -ENOTSUP;
    }
    return 0;
}

static int coroutine_fn qed_co_create(BlockdevCreateOptions *opts,
                                      Error **errp)
{
    BlockdevCreateOptionsQed *o = &opts->u.qed;
    uint32_t cluster_size = o->has_cluster_size ? o->cluster_size :
                            QED_DEFAULT_CLUSTER_SIZE;
    uint32_t table_size = o->has_table_size ? o->table_size :
                          QED_DEFAULT_TABLE_SIZE;
    BlockDriverState *bs;
    BlockBackend *blk = NULL;
    QEDHeader header, le;
    uint8_t *buf = NULL;
    size_t name_len = 0, buf_len;
    int ret;

    assert(opts->driver == BLOCKDEV_DRIVER_QED);
    ret = qed_validate_create(o, errp);
    if (ret < 0) {
        return ret;
    }

    bs = bdrv_open_blockdev_ref(o->file, errp);
    if (!bs) {
        return -EIO;
    }
    ret = qed_check_growable(bs, errp);
    if (ret < 0) {
        goto out;
    }

    blk = blk_new_with_bs(bs, BLK_PERM_WRITE | BLK_PERM_RESIZE, BLK_PERM_ALL,
                          errp);
    if (!blk) {
        ret = -EPERM;
        goto out;
    }
    blk_set_allow_write_beyond_eof(blk, true);

    header = (QEDHeader) {
        .magic = QED_MAGIC,
        .cluster_size = cluster_size,
        .table_size = table_size,
        .header_size = 1,
        .l1_table_offset = cluster_size,
        .image_size = o->size,
    };
    if (o->has_backing_file) {
        name_len = strlen(o->backing_file);
        header.features |= QED_F_BACKING_FILE;
        header.backing_filename_offset = sizeof(QEDHeader);
        header.backing_filename_size = name_len;
        if (o->has_backing_fmt && o->backing_fmt == BLOCKDEV_DRIVER_RAW) {
            header.features |= QED_F_BACKING_FORMAT_NO_PROBE;
        }
    }

    /* Start from an empty file: old contents must not look like tables */
    ret = blk_co_truncate(blk, 0, true, PREALLOC_MODE_OFF, 0, errp);
    if (ret < 0) {
        goto out;
    }

    /*
     * Header and backing file name, then the file grows over an all-zero
     * L1 table without writing it (the new space reads as zeros).
     */
    buf_len = ROUND_UP(sizeof(QEDHeader) + name_len, BDRV_SECTOR_SIZE);
    buf = g_malloc0(buf_len);
    qed_header_cpu_to_le(&header, &le);
    memcpy(buf, &le, sizeof(le));
    if (name_len) {
        memcpy(buf + sizeof(QEDHeader), o->backing_file, name_len);
    }
    ret = blk_co_pwrite(blk, 0, buf_len, buf, 0);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not write the QED header");
        goto out;
    }
    ret = blk_co_truncate(blk, header.l1_table_offset +
                          (uint64_t)table_size * cluster_size, true,
                          PREALLOC_MODE_OFF, 0, errp);
    if (ret < 0) {
        goto out;
    }
    if (o->has_preallocation && o->preallocation != PREALLOC_MODE_OFF) {
        ret = qed_preallocate(blk, &header, o->preallocation, errp);
        if (ret < 0) {
            goto out;
        }
    }
    ret = 0;
    if (!qed_original_can_open(cluster_size, table_size, o->size)) {
        warn_report("the original QEMU QED driver cannot open an image with "
                    "cluster_size=%" PRIu32 " and table_size=%" PRIu32,
                    cluster_size, table_size);
    }

out:
    g_free(buf);
    blk_unref(blk);
    bdrv_unref(bs);
    return ret;
}

static QemuOptsList qed_create_opts = {
    .name = "qed-create-opts",
    .head = QTAILQ_HEAD_INITIALIZER(qed_create_opts.head),
    .desc = {
        {
            .name = BLOCK_OPT_SIZE,
            .type = QEMU_OPT_SIZE,
            .help = "Virtual disk size"
        },
        {
            .name = BLOCK_OPT_BACKING_FILE,
            .type = QEMU_OPT_STRING,
            .help = "File name of a base image"
        },
        {
            .name = BLOCK_OPT_BACKING_FMT,
            .type = QEMU_OPT_STRING,
            .help = "Image format of the base image"
        },
        {
            .name = BLOCK_OPT_CLUSTER_SIZE,
            .type = QEMU_OPT_SIZE,
            .help = "Cluster size (in bytes, power of two, 4 KiB to 64 MiB)",
            .def_value_str = "65536"
        },
        {
            .name = BLOCK_OPT_TABLE_SIZE,
            .type = QEMU_OPT_SIZE,
            .help = "L1/L2 table size (in clusters, power of two, 1 to 16)"
        },
        {
            .name = BLOCK_OPT_PREALLOC,
            .type = QEMU_OPT_STRING,
            .help = "Preallocation mode (allowed values: off, metadata, "
                    "falloc, full)"
        },
        { /* end of list */ }
    }
};

static QemuOptsList qed_amend_opts = {
    .name = "qed-amend-opts",
    .head = QTAILQ_HEAD_INITIALIZER(qed_amend_opts.head),
    .desc = {
        {
            .name = BLOCK_OPT_BACKING_FILE,
            .type = QEMU_OPT_STRING,
            .help = "File name of the base image (only the current one: "
                    "use rebase to change it)"
        },
        {
            .name = BLOCK_OPT_BACKING_FMT,
            .type = QEMU_OPT_STRING,
            .help = "Image format of the base image (only the current one)"
        },
        { /* end of list */ }
    }
};

static int coroutine_fn qed_co_create_opts(BlockDriver *drv,
                                           const char *filename,
                                           QemuOpts *opts, Error **errp)
{
    BlockdevCreateOptions *create_options = NULL;
    BlockDriverState *bs = NULL;
    QDict *qdict;
    Visitor *v;
    int ret;

    static const QDictRenames opt_renames[] = {
        { BLOCK_OPT_BACKING_FILE,       "backing-file" },
        { BLOCK_OPT_BACKING_FMT,        "backing-fmt" },
        { BLOCK_OPT_CLUSTER_SIZE,       "cluster-size" },
        { BLOCK_OPT_TABLE_SIZE,         "table-size" },
        { NULL, NULL },
    };

    qdict = qemu_opts_to_qdict_filtered(opts, NULL, &qed_create_opts, true);
    if (!qdict_rename_keys(qdict, opt_renames, errp)) {
        ret = -EINVAL;
        goto fail;
    }

    /* Parse and validate before the file is created */
    qdict_put_str(qdict, "driver", "qed");
    qdict_put_str(qdict, "file", "");
    v = qobject_input_visitor_new_flat_confused(qdict, errp);
    if (!v) {
        ret = -EINVAL;
        goto fail;
    }
    visit_type_BlockdevCreateOptions(v, NULL, &create_options, errp);
    visit_free(v);
    if (!create_options) {
        ret = -EINVAL;
        goto fail;
    }
    /* Silently round up the size, as qemu-img does for every format */
    create_options->u.qed.size = ROUND_UP(create_options->u.qed.size,
                                          BDRV_SECTOR_SIZE);
    ret = qed_validate_create(&create_options->u.qed, errp);
    if (ret < 0) {
        goto fail;
    }

    ret = qed_check_growable_name(filename, errp);
    if (ret < 0) {
        goto fail;
    }
    ret = bdrv_create_file(filename, opts, errp);
    if (ret < 0) {
        goto fail;
    }
    bs = bdrv_open(filename, NULL, NULL,
                   BDRV_O_RDWR | BDRV_O_RESIZE | BDRV_O_PROTOCOL, errp);
    if (!bs) {
        ret = -EIO;
        goto fail;
    }

    qapi_free_BlockdevRef(create_options->u.qed.file);
    create_options->u.qed.file = g_new0(BlockdevRef, 1);
    create_options->u.qed.file->type = QTYPE_QSTRING;
    create_options->u.qed.file->u.reference = g_strdup(bs->node_name);

    ret = qed_co_create(create_options, errp);

fail:
    if (ret < 0) {
        /*
         * As qcow2 does, a failed create (e.g. preallocation on a full file
         * system) leaves no half-made image behind.  @bs is set only once
         * bdrv_create_file() has made or emptied the file; every option is
         * checked before that, so a bad one never deletes a file it did
         * not touch.
         */
        bdrv_co_delete_file_noerr(bs);
    }
    qobject_unref(qdict);
    bdrv_unref(bs);
    qapi_free_BlockdevCreateOptions(create_options);
    return ret;
}

/*
 * Whether amend's backing_file and backing_fmt (NULL when not given) say
 * what the image has now.  The header records the format only as "raw"
 * (QED_F_BACKING_FORMAT_NO_PROBE) or "probe": for a probed one, the format
 * the backing file was opened with is the current one.
 */
static bool qed_amend_backing_is_current(BlockDriverState *bs,
                                         const char *file, const char *fmt)
{
    BDRVQEDState *s = bs->opaque;
    bool has_backing = s->header.features & QED_F_BACKING_FILE;

    if (file && strcmp(file, has_backing ? bs->backing_file : "")) {
        return false;
    }
    if (!fmt) {
        return true;
    }
    if (!has_backing) {
        return false;
    }
    if (s->header.features & QED_F_BACKING_FORMAT_NO_PROBE) {
        return !strcmp(fmt, "raw");
    }
    return bs->backing && bs->backing->bs->drv &&
           !strcmp(fmt, bs->backing->bs->drv->format_name);
}

/*
 * qemu-img amend: nothing of a QED image changes in place.  Geometry and
 * size are create's and resize's; a new backing file is rebase's job,
 * which checks the data it shows through (amend never did), as for qcow2.
 * Restating the current backing file and format is accepted, and writes
 * nothing.
 */
static int qed_amend_options(BlockDriverState *bs, QemuOpts *opts,
                             BlockDriverAmendStatusCB *status_cb,
                             void *cb_opaque, bool force, Error **errp)
{
    const char *file = qemu_opt_get(opts, BLOCK_OPT_BACKING_FILE);
    const char *fmt = qemu_opt_get(opts, BLOCK_OPT_BACKING_FMT);

    if (!qed_amend_backing_is_current(bs, file, fmt)) {
        error_setg(errp, "Cannot amend the backing file");
        error_append_hint(errp, "You can use 'qemu-img rebase' instead.\n");
        return -EINVAL;
    }
    return 0;
}

/* qemu-img measure -O qed: the file size a conversion or creation needs */
static BlockMeasureInfo *qed_measure(QemuOpts *opts, BlockDriverState *in_bs,
                                     Error **errp)
{
    uint64_t cs = qemu_opt_get_size_del(opts, BLOCK_OPT_CLUSTER_SIZE,
                                        QED_DEFAULT_CLUSTER_SIZE);
    uint64_t ts = qemu_opt_get_size_del(opts, BLOCK_OPT_TABLE_SIZE,
                                        QED_DEFAULT_TABLE_SIZE);
    uint64_t size = qemu_opt_get_size_del(opts, BLOCK_OPT_SIZE, 0);
    char *backing = qemu_opt_get_del(opts, BLOCK_OPT_BACKING_FILE);
    char *prealloc_str = qemu_opt_get_del(opts, BLOCK_OPT_PREALLOC);
    uint64_t table_bytes, nelems, nclusters, ntables, meta;
    uint64_t data = 0, data_tables = 0;
    BlockMeasureInfo *info = NULL;
    PreallocMode prealloc;
    Error *local_err = NULL;

    prealloc = qapi_enum_parse(&PreallocMode_lookup, prealloc_str,
                               PREALLOC_MODE_OFF, &local_err);
    if (local_err) {
        error_propagate(errp, local_err);
        goto out;
    }
    if (qed_check_geometry(cs, MIN(ts, INT64_MAX), errp) < 0) {
        goto out;
    }
    if (in_bs) {
        int64_t ssize = bdrv_getlength(in_bs);

        if (ssize < 0) {
            error_setg_errno(errp, -ssize, "Unable to get image virtual_size");
            goto out;
        }
        size = ssize;
    }
    size = ROUND_UP(size, BDRV_SECTOR_SIZE);
    if (qed_check_image_size(size, cs, ts, errp) < 0) {
        goto out;
    }

    table_bytes = ts * cs;
    nelems = table_bytes / sizeof(uint64_t);
    nclusters = DIV_ROUND_UP(size, cs);
    ntables = DIV_ROUND_UP(nclusters, nelems);
    meta = cs + table_bytes;        /* header and L1 table */

    if (in_bs && !backing) {
        /* Count the data clusters, and the tables that map them */
        uint64_t counted_end = 0;   /* clusters below this are counted */
        int64_t pnum;

        for (int64_t offset = 0; offset < size; offset += pnum) {
            int ret = bdrv_block_status_above(in_bs, NULL, offset,
                                              size - offset, &pnum, NULL,
                                              NULL);
            if (ret < 0) {
                error_setg_errno(errp, -ret, "Unable to get block status");
                goto out;
            }
            if (!(ret & BDRV_BLOCK_ZERO) && (ret & BDRV_BLOCK_DATA)) {
                uint64_t first = MAX(offset / cs, counted_end);
                uint64_t end = DIV_ROUND_UP(offset + pnum, cs);

                for (uint64_t c = first; c < end; c++) {
                    /* A table counts with the first cluster it maps */
                    if (c == first ? (c / nelems != (counted_end - 1) / nelems
                                      || counted_end == 0)
                                   : c % nelems == 0) {
                        data_tables++;
                    }
                }
                if (end > first) {
                    data += (end - first) * cs;
                    counted_end = end;
                }
            }
        }
    } else if (backing) {
        /* Everything may end up allocated */
        data = nclusters * cs;
        data_tables = ntables;
    }

    info = g_new0(BlockMeasureInfo, 1);
    info->fully_allocated = meta + ntables * table_bytes + nclusters * cs;
    switch (prealloc) {
    case PREALLOC_MODE_METADATA:
        info->required = meta + ntables * table_bytes + data;
        break;
    case PREALLOC_MODE_FALLOC:
    case PREALLOC_MODE_FULL:
        info->required = info->fully_allocated;
        break;
    default:
        info->required = meta + data_tables * table_bytes + data;
        break;
    }

out:
    g_free(backing);
    g_free(prealloc_str);
    return info;
}

static const char *const qed_strong_runtime_opts[] = {
    "backing",
    "backing.",

    NULL
};

static const char *const qed_mutable_opts[] = {
    QED_OPT_L2_CACHE_SIZE,
    NULL
};

static BlockDriver bdrv_qed = {
    .format_name                = "qed",
    .instance_size              = sizeof(BDRVQEDState),
    .create_opts                = &qed_create_opts,
    .amend_opts                 = &qed_amend_opts,
    .is_format                  = true,
    .supports_backing           = true,
    .strong_runtime_opts        = qed_strong_runtime_opts,
    .mutable_opts               = qed_mutable_opts,

    .bdrv_probe                 = qed_probe,
    .bdrv_open                  = qed_open,
    .bdrv_close                 = qed_close,
    .bdrv_reopen_prepare        = qed_reopen_prepare,
    .bdrv_reopen_commit         = qed_reopen_commit,
    .bdrv_reopen_abort          = qed_reopen_abort,
    .bdrv_child_perm            = bdrv_default_perms,
    .bdrv_co_create             = qed_co_create,
    .bdrv_co_create_opts        = qed_co_create_opts,
    .bdrv_has_zero_init         = bdrv_has_zero_init_1,
    .bdrv_co_block_status       = qed_co_block_status,
    .bdrv_co_preadv_part        = qed_co_preadv_part,
    .bdrv_co_pwritev_part       = qed_co_pwritev_part,
    .bdrv_co_pwrite_zeroes      = qed_co_pwrite_zeroes,
    .bdrv_co_pdiscard           = qed_co_pdiscard,
    .bdrv_co_truncate           = qed_co_truncate,
    .bdrv_co_flush_to_os        = qed_co_flush_to_os,
    .bdrv_getlength             = qed_getlength,
    .bdrv_get_info              = qed_get_info,
    .bdrv_refresh_limits        = qed_refresh_limits,
    .bdrv_change_backing_file   = qed_change_backing_file,
    .bdrv_make_empty            = qed_make_empty,
    .bdrv_co_invalidate_cache   = qed_co_invalidate_cache,
    .bdrv_inactivate            = qed_inactivate,
    .bdrv_co_check              = qed_co_check,
    .bdrv_amend_options         = qed_amend_options,
    .bdrv_measure               = qed_measure,
    .bdrv_detach_aio_context    = qed_detach_aio_context,
    .bdrv_attach_aio_context    = qed_attach_aio_context,
    .bdrv_co_drain_begin        = qed_co_drain_begin,
};

static void bdrv_qed_init(void)
{
    bdrv_register(&bdrv_qed);
}

block_init(bdrv_qed_init);

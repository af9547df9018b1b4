/*
 * QED ("QEMU Enhanced Disk") image format driver
 *
 * The BlockDriver: probe, open/close, reopen, the request entry points
 * (read, write, write-zeroes, discard, flush, block status, truncate),
 * make_empty, inactivation and the check entry point (NEED_CHECK's
 * clearing, the timers and the drain are in qed-timer.c).  The other
 * files and their jobs are listed in docs/qed-design.md, section 1; the
 * locks, what each guards and the order they nest in, at the top of qed.h.
 *
 * This work is licensed under the terms of the GNU LGPL, version 2 or later.
 * See the COPYING.LIB file in the top-level directory.
 */

#include "qemu/osdep.h"
#include "block/qdict.h"
#include "qapi/error.h"
#include "qapi/qapi-visit-block-core.h"
#include "qapi/qobject-input-visitor.h"
#include "qobject/qdict.h"
#include "qemu/bswap.h"
#include "block/aio_task.h"
#include "qemu/error-report.h"
#include "qemu/main-loop.h"
#include "qemu/memalign.h"
#include "qemu/module.h"
#include "qemu/option.h"
#include "qemu/timer.h"
#include "qemu/units.h"
#include "system/block-backend.h"
#include "trace.h"
#include "qed.h"

#define QED_OPT_L2_CACHE_SIZE "l2-cache-size"
#define QED_OPT_CACHE_CLEAN_INTERVAL "cache-clean-interval"
#define QED_OPT_WRITEBACK_BATCH "x-writeback-batch"

/*
 * Default l2-cache-size: the memory that L2 table chunks may take.  As
 * qcow2's cap: every guest of a host gets the default (libvirt cannot set
 * it), and 32 MiB maps 256 GiB at 64 KiB clusters, the whole of most
 * images (README.md, "The L2 table cache", has the measurements).
 * Tables are read in chunks as they are used, so a miss costs a small
 * read whatever the table size.
 */
#define QED_DEFAULT_L2_CACHE_SIZE (32 * MiB)

/*
 * Default cache-clean-interval, in seconds, as qcow2's: tables nobody
 * looked up for that long give their memory back
 */
#define QED_DEFAULT_CACHE_CLEAN_INTERVAL 600



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



/* ---- running coroutine_fns from the main loop --------------------------- */

static int coroutine_fn GRAPH_RDLOCK
qed_co_clear_need_check(BDRVQEDState *s, void *opaque)
{
    return qed_clear_need_check(s);
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

    /* Every QEDCoFunc is GRAPH_RDLOCK: as qcow2_open_entry() */
    GRAPH_RDLOCK_GUARD();

    /* Uncontended (the node is drained), but the assertions hold */
    qed_lock(call->s);
    call->ret = call->fn(call->s, call->opaque);
    qed_unlock(call->s);
    /* AIO_WAIT_WHILE in the main loop (an iothread's node) needs this */
    aio_wait_kick();
}

/*
 * Only from the main loop, outside coroutines: .bdrv_open, .bdrv_close,
 * .bdrv_reopen_*, .bdrv_inactivate and .bdrv_make_empty all run there in
 * 10.0.  As qcow2_open(): the coroutine runs in the node's AioContext,
 * and the main loop polls until it is done.
 */
static int no_coroutine_fn qed_call_in_coroutine(BDRVQEDState *s,
                                                 QEDCoFunc *fn, void *opaque)
{
    QEDCoCall call = {
        .s = s, .fn = fn, .opaque = opaque, .ret = -EINPROGRESS,
    };

    assert(!qemu_in_coroutine());
    assert(qemu_get_current_aio_context() == qemu_get_aio_context());

    aio_co_enter(bdrv_get_aio_context(s->bs),
                 qemu_coroutine_create(qed_co_call_entry, &call));
    AIO_WAIT_WHILE_UNLOCKED(NULL, call.ret == -EINPROGRESS);
    return call.ret;
}

/*
 * Cut the file back to the clusters in use (on close and hand-over), or
 * extend it to whole clusters: after a crash that lost the grow-ahead's
 * size change, the file may end inside its last cluster, which readers
 * that round the file size down (the original driver) take for corrupt.
 * After a failed write (a full disk) the file may hold part of it past
 * file_end, whatever file_size says: cut then too.
 */
static int coroutine_fn GRAPH_RDLOCK
qed_trim_file_tail(BDRVQEDState *s, void *opaque)
{
    int ret;

    if (s->file_size == s->file_end && !s->resizing && !s->length_unsure) {
        return 0;
    }
    ret = qed_resize_file(s, s->file_end);
    if (ret == 0) {
        s->length_unsure = false;
    }
    return ret;
}

/*
 * Space that failed writes reserved and nothing reused is unreferenced:
 * inside the file it is a leak that every check reports.  A clean close
 * moves the last clusters in use into it and cuts the file (the check's
 * leak repair, crash-safe move by move), so that a full disk leaves
 * nothing behind.  Only ever after a failed write.
 *
 * A move needs room for its copy: on a file system with no free block
 * left (the writes in flight when the disk filled took it all, and those
 * that failed left holes below the ones that landed) the leaks stay.
 * Then, without a backing file, the image is closed with NEED_CHECK set:
 * the next writable open repairs it (its leak repair included) once
 * there is room, instead of every check reporting the leak until someone
 * runs `qemu-img check -r leaks`.  An image with a backing file is never
 * marked dirty (qed_set_need_check() does nothing): its leak stays for
 * `check -r leaks`, as the original driver's do.
 */
static int coroutine_fn GRAPH_RDLOCK
qed_reclaim_free_space(BDRVQEDState *s, void *opaque)
{
    BdrvCheckResult result = {0};
    int ret;

    if (qed_free_space_bytes(s) == 0) {
        return 0;
    }
    trace_qed_reclaim_free_space(s, qed_free_space_bytes(s));
    ret = qed_check(s, &result, BDRV_FIX_LEAKS, true);
    if (ret < 0 || result.leaks > 0) {
        qed_set_need_check(s);
    }
    return ret;
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
        {
            .name = QED_OPT_CACHE_CLEAN_INTERVAL,
            .type = QEMU_OPT_NUMBER,
            .help = "Give back the memory of L2 tables unused for this "
                    "many seconds (0: never)",
        },
        {
            .name = QED_OPT_WRITEBACK_BATCH,
            .type = QEMU_OPT_SIZE,
            .help = "For testing: the most bytes of table sectors one "
                    "batch of a writeback pass copies (0: 2 MiB)",
        },
        { /* end of list */ }
    },
};

/* The runtime options, parsed */
typedef struct QEDRuntimeOpts {
    uint64_t cache_size;        /* l2-cache-size, bytes */
    uint64_t clean_interval;    /* cache-clean-interval, seconds */
    uint64_t wb_batch;          /* x-writeback-batch, bytes; 0: default */
} QEDRuntimeOpts;

static bool qed_parse_runtime_opts(BDRVQEDState *s, QDict *options,
                                   QEDRuntimeOpts *r, Error **errp)
{
    QemuOpts *opts = qemu_opts_create(&qed_runtime_opts, NULL, 0,
                                      &error_abort);
    uint64_t table_bytes = qed_table_bytes(s);

    if (!qemu_opts_absorb_qdict(opts, options, errp)) {
        qemu_opts_del(opts);
        return false;
    }
    /* The default holds one table at least, whatever its size */
    r->cache_size = qemu_opt_get_size(opts, QED_OPT_L2_CACHE_SIZE,
                                      MAX(QED_DEFAULT_L2_CACHE_SIZE,
                                          table_bytes));
    r->clean_interval = qemu_opt_get_number(opts,
                                            QED_OPT_CACHE_CLEAN_INTERVAL,
                                            QED_DEFAULT_CACHE_CLEAN_INTERVAL);
    r->wb_batch = qemu_opt_get_size(opts, QED_OPT_WRITEBACK_BATCH, 0);
    qemu_opts_del(opts);

    if (r->cache_size < table_bytes) {
        error_setg(errp, "Invalid %s %" PRIu64 ": must hold at least one "
                   "L2 table (%" PRIu64 " bytes)", QED_OPT_L2_CACHE_SIZE,
                   r->cache_size, table_bytes);
        return false;
    }
    if (r->clean_interval > UINT_MAX) {
        error_setg(errp, "%s must be between 0 and %u",
                   QED_OPT_CACHE_CLEAN_INTERVAL, UINT_MAX);
        return false;
    }
    if (r->wb_batch > QED_WB_MAX_BATCH_BYTES ||
        r->wb_batch % BDRV_SECTOR_SIZE) {
        error_setg(errp, "%s must be a multiple of %d up to %d",
                   QED_OPT_WRITEBACK_BATCH, (int)BDRV_SECTOR_SIZE,
                   (int)QED_WB_MAX_BATCH_BYTES);
        return false;
    }
    return true;
}

/* What does not need the cache itself: to @s */
static void qed_apply_runtime_opts(BDRVQEDState *s, const QEDRuntimeOpts *r)
{
    s->cache_clean_interval = r->clean_interval;
    s->wb_batch_bytes = r->wb_batch;
}

static void qed_free_state(BDRVQEDState *s)
{
    assert(QLIST_EMPTY(&s->allocs));
    s->allocating_writes = 0;

    if (s->l2_cache) {
        /* Only a close whose writeback failed leaves dirty tables */
        unsigned int lost = qed_l2_cache_forget_dirty(s->l2_cache);

        if (lost || s->l1.ndirty) {
            error_report("qed: %s: table entries of %u L2 tables (and %u "
                         "L1 sectors) could not be written; writes since "
                         "the last successful flush are lost",
                         s->bs->filename, lost, s->l1.ndirty);
        }
        qed_l2_cache_free(s->l2_cache);
        s->l2_cache = NULL;
    }
    qed_dirty_table_destroy(&s->l1, qed_table_bytes(s));
    qemu_vfree(s->zero_buf);
    s->zero_buf = NULL;
    qed_wb_free_buffers(s);
    g_free(s->l2_starts);
    s->l2_starts = NULL;
    s->n_l2_starts = s->l2_starts_size = 0;
    qed_screen_destroy(s);
    qed_free_space_destroy(s);
}

/* Sizes and shifts that follow from a validated header */
static void qed_init_geometry(BDRVQEDState *s, int64_t file_size)
{
    s->table_nelems = qed_table_bytes(s) / sizeof(uint64_t);
    s->table_nsectors = qed_table_bytes(s) / BDRV_SECTOR_SIZE;
    s->chunk_entries = MIN(qed_table_bytes(s), QED_L2_CHUNK_BYTES) /
                       sizeof(uint64_t);
    s->table_nchunks = s->table_nelems / s->chunk_entries;
    s->l2_shift = ctz32(s->header.cluster_size);
    s->l2_mask = s->table_nelems - 1;
    s->l1_shift = s->l2_shift + ctz32(s->table_nelems);
    /* New clusters go after everything the file holds, never over it */
    s->file_end = ROUND_UP(file_size, s->header.cluster_size);
    s->file_size = file_size;
    s->can_grow = true;
    s->grow_falloc = true;
    s->grow_tight = false;
}

static int coroutine_fn GRAPH_RDLOCK
qed_read_backing_name(BlockDriverState *bs, Error **errp)
{
    BDRVQEDState *s = bs->opaque;
    char name[PATH_MAX];
    int ret;

    ret = QED_UNLOCKED(s, bdrv_co_pread(bs->file,
                                        s->header.backing_filename_offset,
                                        s->header.backing_filename_size,
                                        name, 0));
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not read the backing file name");
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
        pstrcpy(bs->auto_backing_file, sizeof(bs->auto_backing_file), name);
    }
    if (s->header.features & QED_F_BACKING_FORMAT_NO_PROBE) {
        pstrcpy(bs->backing_format, sizeof(bs->backing_format), "raw");
    }
    return 0;
}

/* A writer that does not know autoclear features clears them */
static int coroutine_fn GRAPH_RDLOCK
qed_clear_autoclear(BDRVQEDState *s, Error **errp)
{
    QEDHeader h = s->header;
    int ret;

    if (!(h.autoclear_features & ~QED_AUTOCLEAR_FEATURE_MASK)) {
        return 0;
    }
    h.autoclear_features &= QED_AUTOCLEAR_FEATURE_MASK;
    qed_busy_enter(s, &s->header_busy);
    ret = qed_update_header(s, &h);
    qed_busy_leave(s, &s->header_busy);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not update the header");
    }
    return ret;
}

/* NEED_CHECK is set: repair what a crash left (read-only: only look) */
static int coroutine_fn GRAPH_RDLOCK
qed_repair_on_open(BlockDriverState *bs, int flags, Error **errp)
{
    BDRVQEDState *s = bs->opaque;
    BdrvCheckResult result = {0};
    int ret;

    if (!(flags & BDRV_O_RDWR)) {
        s->unrepaired = true;
        ret = qed_check(s, &result, 0, false);
        if (ret == 0 && result.corruptions) {
            warn_report("%s: QED image needs repair (%d corruptions); "
                        "reads of the damaged parts fail; run "
                        "'qemu-img check -r all' on it", bs->filename,
                        result.corruptions);
        }
        return 0;
    }

    /* Repair, then mark the image clean */
    s->unrepaired = false;
    ret = qed_check(s, &result, BDRV_FIX_ERRORS | BDRV_FIX_LEAKS, false);
    if (ret < 0 || result.corruptions || result.check_errors) {
        s->unrepaired = true;
        error_setg(errp, "Image is corrupt and could not be repaired "
                   "(%d corruptions, %d errors left); run "
                   "'qemu-img check -r all' on it by hand",
                   result.corruptions, result.check_errors);
        return ret < 0 ? ret : -EIO;
    }
    ret = qed_clear_need_check(s);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not clear NEED_CHECK");
    }
    return ret;
}

static int coroutine_fn GRAPH_RDLOCK
qed_do_open(BlockDriverState *bs, QDict *options, int flags, Error **errp)
{
    BDRVQEDState *s = bs->opaque;
    QEDHeader le;
    int64_t file_size;
    QEDRuntimeOpts ropts;
    int ret;

    /* s->lock is held: qed_open() made it, invalidate_cache kept it */
    qed_assert_locked(s);
    s->bs = bs;
    QLIST_INIT(&s->allocs);
    qemu_co_queue_init(&s->alloc_waiters);
    qemu_co_queue_init(&s->idle_waiters);
    qed_busy_init(&s->header_busy);
    qemu_co_queue_init(&s->resize_waiters);
    QLIST_INIT(&s->tables_making);
    qemu_co_queue_init(&s->making_waiters);
    qed_busy_init(&s->wb_busy);

    ret = QED_UNLOCKED(s, bdrv_co_pread(bs->file, 0, sizeof(le), &le, 0));
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not read the QED header");
        return ret;
    }
    qed_header_le_to_cpu(&le, &s->header);

    file_size = QED_UNLOCKED(s, bdrv_co_getlength(bs->file->bs));
    if (file_size < 0) {
        error_setg_errno(errp, -file_size, "Could not get the file size");
        return file_size;
    }
    ret = qed_validate_header(&s->header, file_size, errp);
    if (ret < 0) {
        return ret;
    }
    qed_init_geometry(s, file_size);
    qed_screen_init(s);
    qed_free_space_init(s);

    if (s->header.features & QED_F_BACKING_FILE) {
        ret = qed_read_backing_name(bs, errp);
        if (ret < 0) {
            return ret;
        }
    }

    if (!qed_parse_runtime_opts(s, options, &ropts, errp)) {
        return -EINVAL;
    }
    qed_apply_runtime_opts(s, &ropts);
    s->l2_cache = qed_l2_cache_new(ropts.cache_size, qed_table_bytes(s));
    qed_l2_cache_set_lock(s->l2_cache, &s->lock);

    ret = qed_dirty_table_init(&s->l1, s->header.l1_table_offset,
                               qed_table_bytes(s));
    if (ret < 0) {
        error_setg(errp, "Could not allocate the L1 table");
        goto fail;
    }
    ret = qed_read_l1_table(s);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not read the L1 table");
        goto fail;
    }
    qed_l2_starts_rebuild(s);

    bs->supported_zero_flags = BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK;
    bs->supported_truncate_flags = BDRV_REQ_ZERO_WRITE;

    if ((flags & BDRV_O_RDWR) && !(flags & BDRV_O_INACTIVE)) {
        ret = qed_clear_autoclear(s, errp);
        if (ret < 0) {
            goto fail;
        }
    }
    if ((s->header.features & QED_F_NEED_CHECK) &&
        !(flags & (BDRV_O_CHECK | BDRV_O_INACTIVE))) {
        ret = qed_repair_on_open(bs, flags, errp);
        if (ret < 0) {
            goto fail;
        }
    }

    trace_qed_open(s, s->header.image_size, s->header.cluster_size,
                   s->header.table_size, s->header.features);
    return 0;

fail:
    qed_free_state(s);
    return ret;
}

typedef struct QEDOpenArgs {
    QDict *options;
    int flags;
    Error **errp;
} QEDOpenArgs;

static int coroutine_fn GRAPH_RDLOCK
qed_co_open(BDRVQEDState *s, void *opaque)
{
    QEDOpenArgs *args = opaque;

    return qed_do_open(s->bs, args->options, args->flags, args->errp);
}

static int qed_open(BlockDriverState *bs, QDict *options, int flags,
                    Error **errp)
{
    BDRVQEDState *s = bs->opaque;
    QEDOpenArgs args = { .options = options, .flags = flags, .errp = errp };
    int ret;

    ret = bdrv_open_file_child(NULL, options, "file", bs, errp);
    if (ret < 0) {
        return ret;
    }

    s->bs = bs;
    qemu_co_mutex_init(&s->lock);
    ret = qed_call_in_coroutine(s, qed_co_open, &args);
    if (ret == 0) {
        s->need_check_timer = aio_timer_new(bdrv_get_aio_context(bs),
                                            QEMU_CLOCK_REALTIME, SCALE_NS,
                                            qed_need_check_timer_cb, s);
        qed_cache_clean_timer_init(s, bdrv_get_aio_context(bs));
        qatomic_set(&s->opened, true);
    }
    return ret;
}

static void GRAPH_RDLOCK
qed_refresh_limits(BlockDriverState *bs, Error **errp)
{
    BDRVQEDState *s = bs->opaque;

    bs->bl.pwrite_zeroes_alignment = s->header.cluster_size;
    bs->bl.pdiscard_alignment = s->header.cluster_size;
}

static void GRAPH_RDLOCK qed_do_close(BlockDriverState *bs)
{
    BDRVQEDState *s = bs->opaque;

    qatomic_set(&s->opened, false);
    qed_cancel_timer(s);
    qed_detach_aio_context(bs);

    if (qed_may_write_header(s)) {
        /* A clean close leaves a clean image (crash ordering 5) */
        if (qed_call_in_coroutine(s, qed_co_clear_need_check, NULL) == 0) {
            qed_call_in_coroutine(s, qed_reclaim_free_space, NULL);
        }
        qed_call_in_coroutine(s, qed_trim_file_tail, NULL);
    }
    qed_free_state(s);
}

/* Main loop, inside bdrv_close()'s drained section; as qcow2_close() */
static void GRAPH_UNLOCKED qed_close(BlockDriverState *bs)
{
    GLOBAL_STATE_CODE();
    GRAPH_RDLOCK_GUARD_MAINLOOP();

    qed_do_close(bs);
}

/*
 * PORT-10: in 10.0 the block layer follows a successful inactivate with
 * bdrv_drained_begin(); open_flags |= BDRV_O_INACTIVE; bdrv_drained_end()
 * (and may still fail with -EPERM after this returned 0, leaving the node
 * active).  That drain runs qed_drain_begin() while BDRV_O_INACTIVE is
 * not set yet: it finds nothing to do after the clear below (NEED_CHECK
 * clear, no allocation, no dirty table), except when s->unrepaired keeps
 * NEED_CHECK set, where its clear writes nothing either (a writeback of
 * no sector, no resize after the trim below).  Unlike migration,
 * blockdev-set-active does not drain or stop the guest before this.
 */
static int GRAPH_RDLOCK
qed_inactivate(BlockDriverState *bs)
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

static void coroutine_fn GRAPH_RDLOCK
qed_co_invalidate_cache(BlockDriverState *bs, Error **errp)
{
    BDRVQEDState *s = bs->opaque;
    QEMUTimer *timer = s->need_check_timer;
    QDict *options;
    int ret;

    qed_lock(s);
    /* Another process may have changed the image: read it afresh */
    qatomic_set(&s->opened, false);
    qed_cancel_timer(s);
    qed_cache_clean_timer_del(s);
    qed_free_state(s);
    /* All but s->lock, which this coroutine holds (it comes first) */
    QEMU_BUILD_BUG_ON(offsetof(BDRVQEDState, lock) != 0);
    memset((char *)s + sizeof(s->lock), 0, sizeof(*s) - sizeof(s->lock));
    s->need_check_timer = timer;

    options = qdict_clone_shallow(bs->options);
    ret = qed_do_open(bs, options, bs->open_flags, errp);
    qobject_unref(options);
    if (ret < 0) {
        error_prepend(errp, "Could not reopen qed layer: ");
    } else {
        qed_cache_clean_timer_init(s, bdrv_get_aio_context(bs));
        qatomic_set(&s->opened, true);
    }
    qed_unlock(s);
}

static int GRAPH_UNLOCKED
qed_reopen_prepare(BDRVReopenState *state, BlockReopenQueue *queue,
                   Error **errp)
{
    BDRVQEDState *s = state->bs->opaque;
    QEDRuntimeOpts *r;
    int ret;

    GLOBAL_STATE_CODE();
    GRAPH_RDLOCK_GUARD_MAINLOOP();

    r = g_new0(QEDRuntimeOpts, 1);

    if (!qed_parse_runtime_opts(s, state->options, r, errp)) {
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
    QEDRuntimeOpts *r = state->opaque;
    bool new_interval = r->clean_interval != s->cache_clean_interval;

    qed_l2_cache_set_max(s->l2_cache, r->cache_size);
    if (new_interval) {
        qed_cache_clean_timer_del(s);
    }
    qed_apply_runtime_opts(s, r);
    if (new_interval) {
        qed_cache_clean_timer_init(s, bdrv_get_aio_context(state->bs));
    }
    g_free(r);
    state->opaque = NULL;
}

typedef struct QEDRepairArgs {
    int flags;
    Error **errp;
} QEDRepairArgs;

static int coroutine_fn GRAPH_RDLOCK
qed_co_repair(BDRVQEDState *s, void *opaque)
{
    QEDRepairArgs *args = opaque;

    return qed_repair_on_open(s->bs, args->flags, args->errp);
}

/*
 * Read-write now, with NEED_CHECK set at a read-only open (a backing file
 * that `qemu-img commit` or block-commit writes into): the repair that
 * open skipped, before anything clears the bit.  (Here, not in prepare:
 * the file is writable only once every node has committed.)  If it
 * fails, the bit stays and the next open repairs.
 */
static void GRAPH_UNLOCKED qed_reopen_commit_post(BDRVReopenState *state)
{
    BDRVQEDState *s = state->bs->opaque;
    Error *local_err = NULL;
    QEDRepairArgs args = { .flags = state->flags, .errp = &local_err };

    GLOBAL_STATE_CODE();
    GRAPH_RDLOCK_GUARD_MAINLOOP();

    if (s->unrepaired && (state->flags & BDRV_O_RDWR) &&
        !(state->flags & BDRV_O_INACTIVE)) {
        if (qed_call_in_coroutine(s, qed_co_repair, &args) < 0) {
            error_report_err(local_err);
        }
    }
}

static void qed_reopen_abort(BDRVReopenState *state)
{
    g_free(state->opaque);
    state->opaque = NULL;
}


/*
 * A flush makes every completed write durable: their entries are set in
 * memory, so one writeback pass (which also waits for a pass under way)
 * puts them on disk, and the block layer flushes the file after it.
 */
static int coroutine_fn GRAPH_RDLOCK
qed_co_flush_to_os(BlockDriverState *bs)
{
    BDRVQEDState *s = bs->opaque;
    int ret;

    qed_lock(s);
    ret = qed_writeback(s);
    qed_unlock(s);
    return ret;
}

/* ---- reads -------------------------------------------------------------- */

/* Unallocated: the backing file shows through, zeros past it or without */
int coroutine_fn qed_read_backing(BDRVQEDState *s, uint64_t pos,
                                  uint64_t bytes, QEMUIOVector *qiov,
                                  size_t qiov_offset)
{
    if (s->bs->backing) {
        qed_event(s, BLKDBG_READ_BACKING_AIO);
        return QED_UNLOCKED(s, bdrv_co_preadv_part(s->bs->backing, pos, bytes,
                                                   qiov, qiov_offset, 0));
    }
    qemu_iovec_memset(qiov, qiov_offset, 0, bytes);
    return 0;
}

static int coroutine_fn GRAPH_RDLOCK
qed_co_preadv_part(BlockDriverState *bs, int64_t offset, int64_t bytes,
                   QEMUIOVector *qiov, size_t qiov_offset,
                   BdrvRequestFlags flags)
{
    BDRVQEDState *s = bs->opaque;
    int ret = 0;

    trace_qed_co_preadv(s, offset, bytes);
    qed_lock(s);
    while (bytes > 0) {
        QEDExtent ext;

        ret = qed_find_extent(s, offset, bytes, &ext);
        if (ret < 0) {
            break;
        }

        switch (ext.type) {
        case QED_EXTENT_DATA:
            qed_event(s, BLKDBG_READ_AIO);
            ret = QED_UNLOCKED(s, bdrv_co_preadv_part(bs->file,
                                                      ext.file_offset,
                                                      ext.bytes, qiov,
                                                      qiov_offset, 0));
            break;
        case QED_EXTENT_ZERO:
            qemu_iovec_memset(qiov, qiov_offset, 0, ext.bytes);
            break;
        case QED_EXTENT_UNALLOCATED:
            ret = qed_read_backing(s, offset, ext.bytes, qiov, qiov_offset);
            break;
        }
        if (ret < 0) {
            break;
        }
        offset += ext.bytes;
        qiov_offset += ext.bytes;
        bytes -= ext.bytes;
    }
    qed_unlock(s);
    return ret < 0 ? ret : 0;
}

/* ---- writes ------------------------------------------------------------- */


/* Bytes from @pos to the end of the L2 table that maps it */
static uint64_t qed_bytes_to_table_end(BDRVQEDState *s, uint64_t pos)
{
    uint64_t table_span = 1ULL << s->l1_shift;

    return ROUND_UP(pos + 1, table_span) - pos;
}

/* qed_co_pwritev_part()'s work, under s->lock (also for truncate) */
static int coroutine_fn GRAPH_RDLOCK
qed_do_pwritev(BlockDriverState *bs, int64_t offset, int64_t bytes,
               QEMUIOVector *qiov, size_t qiov_offset, BdrvRequestFlags flags)
{
    BDRVQEDState *s = bs->opaque;

    qed_assert_locked(s);
    trace_qed_co_pwritev(s, offset, bytes, flags);
    while (bytes > 0) {
        QEDExtent ext;
        int64_t ret;

        ret = qed_find_extent(s, offset, bytes, &ext);
        if (ret < 0) {
            return ret;
        }

        if (ext.type == QED_EXTENT_DATA) {
            /* In place: the cluster is ours and stays where it is */
            qed_wait_resize(s, ext.file_offset + ext.bytes);
            qed_event(s, BLKDBG_WRITE_AIO);
            ret = QED_UNLOCKED(s, bdrv_co_pwritev_part(bs->file,
                                                       ext.file_offset,
                                                       ext.bytes, qiov,
                                                       qiov_offset, 0));
            if (ret < 0) {
                return ret;
            }
            ret = ext.bytes;
        } else {
            uint64_t len = MIN(ext.bytes, qed_bytes_to_table_end(s, offset));

            ret = qed_allocating_write(s, offset, len, ext.type, qiov,
                                       qiov_offset);
            if (ret == -EAGAIN) {
                continue;       /* the clusters changed: look up again */
            }
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

static int coroutine_fn GRAPH_RDLOCK
qed_co_pwritev_part(BlockDriverState *bs, int64_t offset, int64_t bytes,
                    QEMUIOVector *qiov, size_t qiov_offset,
                    BdrvRequestFlags flags)
{
    BDRVQEDState *s = bs->opaque;
    int ret;

    qed_lock(s);
    ret = qed_do_pwritev(bs, offset, bytes, qiov, qiov_offset, flags);
    qed_unlock(s);
    return ret;
}

/*
 * Give clusters [start, end), which lie in one L2 table, the marker @value
 * (QED_L2_ZERO or QED_L2_UNALLOCATED), if they are still unallocated, as
 * the caller's lookup found them.  Returns 0 when done, -EAGAIN when the
 * caller must look up again.
 */
static int coroutine_fn GRAPH_RDLOCK
qed_set_markers(BDRVQEDState *s, uint64_t start, uint64_t end, uint64_t value)
{
    QEDAllocation alloc;
    int ret;

    if (!qed_claim(s, &alloc, start, end)) {
        return -EAGAIN;
    }
    ret = qed_mark_clusters(s, start, (end - start) >> s->l2_shift, value);
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

/* qed_co_pwrite_zeroes()'s work, under s->lock (also for truncate) */
static int coroutine_fn GRAPH_RDLOCK
qed_do_pwrite_zeroes(BlockDriverState *bs, int64_t offset, int64_t bytes,
                     BdrvRequestFlags flags)
{
    BDRVQEDState *s = bs->opaque;

    qed_assert_locked(s);
    while (bytes > 0) {
        QEDExtent ext;
        int ret;

        ret = qed_find_extent(s, offset, bytes, &ext);
        if (ret < 0) {
            return ret;
        }

        switch (ext.type) {
        case QED_EXTENT_DATA:
            /* Allocated clusters stay; the file zeroes (and may unmap) */
            ret = QED_UNLOCKED(s, bdrv_co_pwrite_zeroes(bs->file,
                                                        ext.file_offset,
                                                        ext.bytes, flags));
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
                                  QED_L2_ZERO);
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

static int coroutine_fn GRAPH_RDLOCK
qed_co_pwrite_zeroes(BlockDriverState *bs, int64_t offset, int64_t bytes,
                     BdrvRequestFlags flags)
{
    BDRVQEDState *s = bs->opaque;
    int ret;

    qed_lock(s);
    ret = qed_do_pwrite_zeroes(bs, offset, bytes, flags);
    qed_unlock(s);
    return ret;
}

/*
 * Guest TRIM: the space of the data clusters that the request covers goes
 * back to the host, and their entries stay.  A punched cluster reads as
 * zeros, with or without a backing file (which never shows through
 * discarded data), a later write into it is an in-place write with no
 * allocation, and nothing becomes unreferenced: no entry changes, so no
 * crash ordering is involved and every check stays clean (an entry set to
 * unallocated would leave its cluster a leak inside the file, which no
 * check could reclaim online).  Block status asks the file, so map and
 * convert see the punched clusters as zeros.  If the file cannot punch,
 * the data stays, as discard allows.
 */
static int coroutine_fn GRAPH_RDLOCK
qed_co_pdiscard(BlockDriverState *bs, int64_t offset, int64_t bytes)
{
    BDRVQEDState *s = bs->opaque;
    int ret = 0;

    trace_qed_discard(s, offset, bytes);
    qed_lock(s);
    if (!qed_whole_clusters(s, offset, bytes)) {
        qed_unlock(s);
        return -ENOTSUP;
    }
    while (bytes > 0) {
        QEDExtent ext;

        ret = qed_find_extent(s, offset, bytes, &ext);
        if (ret < 0) {
            break;
        }
        if (ext.type == QED_EXTENT_DATA) {
            uint64_t end = ROUND_UP(offset + ext.bytes,
                                    s->header.cluster_size);

            /* Errors here only keep the space: the entries are unchanged */
            QED_UNLOCKED_VOID(s, bdrv_co_pdiscard(bs->file, ext.file_offset,
                                                  end - offset));
        }
        offset += ext.bytes;
        bytes -= ext.bytes;
    }
    qed_unlock(s);
    return ret;
}

static int coroutine_fn GRAPH_RDLOCK
qed_co_block_status(BlockDriverState *bs, bool want_zero, int64_t offset,
                    int64_t bytes, int64_t *pnum, int64_t *map,
                    BlockDriverState **file)
{
    BDRVQEDState *s = bs->opaque;
    QEDExtent ext;
    int ret;

    qed_lock(s);
    ret = qed_find_extent(s, offset, bytes, &ext);
    qed_unlock(s);
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

static int coroutine_fn GRAPH_RDLOCK
qed_do_truncate(BlockDriverState *bs, int64_t offset, PreallocMode prealloc,
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
    ret = qed_validate_image_size(offset, s->header.cluster_size,
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
    qed_busy_enter(s, &s->header_busy);
    h = s->header;
    h.image_size = offset;
    ret = qed_update_header(s, &h);
    qed_busy_leave(s, &s->header_busy);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Failed to update the image size");
        return ret;
    }

    if (flags & BDRV_REQ_ZERO_WRITE) {
        /* The backing file must not show through the new area */
        ret = qed_do_pwrite_zeroes(bs, old_size, offset - old_size, 0);
        if (ret == -ENOTSUP) {
            uint64_t head_end = MIN(ROUND_UP(old_size,
                                             s->header.cluster_size), offset);
            QEMUIOVector qiov;
            uint8_t *zeros = qemu_blockalign0(bs, head_end - old_size);

            qemu_iovec_init_buf(&qiov, zeros, head_end - old_size);
            ret = qed_do_pwritev(bs, old_size, head_end - old_size, &qiov,
                                 0, 0);
            qemu_vfree(zeros);
            if (ret == 0 && head_end < offset) {
                ret = qed_do_pwrite_zeroes(bs, head_end, offset - head_end,
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

static int coroutine_fn GRAPH_RDLOCK
qed_co_truncate(BlockDriverState *bs, int64_t offset, bool exact,
                PreallocMode prealloc, BdrvRequestFlags flags, Error **errp)
{
    BDRVQEDState *s = bs->opaque;
    int ret;

    qed_lock(s);
    ret = qed_do_truncate(bs, offset, prealloc, flags, errp);
    qed_unlock(s);
    return ret;
}

static int64_t coroutine_fn GRAPH_RDLOCK qed_co_getlength(BlockDriverState *bs)
{
    BDRVQEDState *s = bs->opaque;
    int64_t len;

    qed_lock(s);
    len = s->header.image_size;
    qed_unlock(s);
    return len;
}

static int coroutine_fn GRAPH_RDLOCK
qed_co_get_info(BlockDriverState *bs, BlockDriverInfo *bdi)
{
    BDRVQEDState *s = bs->opaque;

    memset(bdi, 0, sizeof(*bdi));
    qed_lock(s);
    bdi->cluster_size = s->header.cluster_size;
    bdi->is_dirty = s->header.features & QED_F_NEED_CHECK;
    qed_unlock(s);
    return 0;
}


/*
 * Empty the image, after a commit into its backing file: every cluster
 * becomes unallocated and the file shrinks to the header and the L1 table.
 *
 * Crash ordering 9: the backing file is flushed first, so the data that
 * this image held is durable there.  Then a zeroed L1 table is written and
 * flushed, and the file is cut to header and L1 table.  A crash at any
 * point leaves, per L1 sector, the old entries or none: where none, the
 * backing file shows the same data through.  The file is cut only after
 * the zeroed L1 is durable, so no entry ever names space past the end.
 * An image with a backing file is never marked dirty, so NEED_CHECK is
 * not set for this: a crash between the L1 write and the cut leaves the
 * old tables and clusters unreferenced, leaks that `qemu-img check -r
 * leaks` reclaims, never a corruption.  (Without a backing file, which
 * commit never empties, the bit is set first as for any table change.)
 */
static int coroutine_fn GRAPH_RDLOCK
qed_co_make_empty(BDRVQEDState *s, void *opaque)
{
    uint64_t bytes = qed_table_bytes(s);
    QEDTable *zero;
    int ret;

    /* Nothing may be in flight (the caller drained): settle the tables */
    while (qed_allocs_in_flight(s)) {
        qemu_co_queue_wait(&s->idle_waiters, &s->lock);
    }
    ret = qed_writeback(s);
    if (ret < 0) {
        return ret;
    }
    if (s->bs->backing) {
        ret = QED_UNLOCKED(s, bdrv_co_flush(s->bs->backing->bs));
        if (ret < 0) {
            return ret;
        }
    }

    qed_busy_enter(s, &s->wb_busy);
    ret = qed_set_need_check(s);
    if (ret == 0) {
        zero = qed_table_new(bytes);
        ret = zero ? qed_write_l1_table(s, zero, 0, s->table_nelems) :
                     -ENOMEM;
        qed_table_free(zero, bytes);
    }
    if (ret == 0) {
        ret = QED_UNLOCKED(s, bdrv_co_flush(s->bs->file->bs));
    }
    if (ret == 0) {
        /* The disk names no table now: neither may memory */
        memset(s->l1.table->offsets, 0, bytes);
        qed_dirty_clear(&s->l1, 0, s->table_nsectors);
        qed_l2_cache_clear(s->l2_cache);
        qed_l2_starts_rebuild(s);
        s->l2_gen++;
        s->file_end = MAX((uint64_t)s->header.header_size *
                          s->header.cluster_size,
                          s->header.l1_table_offset + bytes);
        qed_free_space_forget(s);
        qed_screen_reset(s);
    }
    qed_busy_leave(s, &s->wb_busy);
    if (ret < 0) {
        return ret;
    }

    /* Cuts the file to file_end (and clears the bit, if it was set) */
    ret = qed_trim_file_tail(s, NULL);
    if (ret == 0) {
        ret = QED_UNLOCKED(s, bdrv_co_flush(s->bs->file->bs));
    }
    if (ret == 0) {
        ret = qed_clear_need_check(s);
    }
    return ret;
}

static int GRAPH_RDLOCK
qed_make_empty(BlockDriverState *bs)
{
    BDRVQEDState *s = bs->opaque;
    int ret;

    bdrv_drained_begin(bs);
    ret = qed_call_in_coroutine(s, qed_co_make_empty, NULL);
    bdrv_drained_end(bs);
    return ret;
}

static int coroutine_fn GRAPH_RDLOCK
qed_co_change_backing_file(BlockDriverState *bs, const char *backing_file,
                           const char *backing_fmt)
{
    BDRVQEDState *s = bs->opaque;
    QEDBackingChange change = { .file = backing_file, .fmt = backing_fmt };
    int ret;

    qed_lock(s);
    ret = qed_co_change_backing(s, &change);
    qed_unlock(s);
    return ret;
}

static int coroutine_fn GRAPH_RDLOCK
qed_co_check(BlockDriverState *bs, BdrvCheckResult *result, BdrvCheckMode fix)
{
    BDRVQEDState *s = bs->opaque;
    int ret;

    qed_lock(s);
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
        qemu_co_queue_wait(&s->idle_waiters, &s->lock);
    }
    ret = qed_writeback(s);
    if (ret == 0) {
        ret = qed_check(s, result, fix, false);
        if (ret == 0 && (fix & BDRV_FIX_ERRORS) && !result->corruptions &&
            !result->check_errors) {
            ret = qed_clear_need_check(s);
        }
    }
    qed_unlock(s);
    return ret;
}


static const char *const qed_strong_runtime_opts[] = {
    "backing",
    "backing.",

    NULL
};

static const char *const qed_mutable_opts[] = {
    QED_OPT_L2_CACHE_SIZE,
    QED_OPT_CACHE_CLEAN_INTERVAL,
    QED_OPT_WRITEBACK_BATCH,
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
    .bdrv_reopen_commit_post    = qed_reopen_commit_post,
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
    .bdrv_co_getlength          = qed_co_getlength,
    .bdrv_co_get_info           = qed_co_get_info,
    .bdrv_refresh_limits        = qed_refresh_limits,
    .bdrv_co_change_backing_file = qed_co_change_backing_file,
    .bdrv_make_empty            = qed_make_empty,
    .bdrv_co_invalidate_cache   = qed_co_invalidate_cache,
    .bdrv_inactivate            = qed_inactivate,
    .bdrv_co_check              = qed_co_check,
    .bdrv_amend_options         = qed_amend_options,
    .bdrv_measure               = qed_measure,
    .bdrv_detach_aio_context    = qed_detach_aio_context,
    .bdrv_attach_aio_context    = qed_attach_aio_context,
    .bdrv_drain_begin           = qed_drain_begin,
};

static void bdrv_qed_init(void)
{
    bdrv_register(&bdrv_qed);
}

block_init(bdrv_qed_init);

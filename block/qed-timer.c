/*
 * QED ("QEMU Enhanced Disk") image format driver: the background
 *
 * NEED_CHECK's clearing and the timer that starts it after the last
 * allocating write, the idle release of L2 tables (cache-clean-interval),
 * the timers' move between AioContexts, and what a drain starts.  Timer
 * callbacks run in any thread of the node's AioContext and touch atomics
 * only; the work happens in coroutines that take s->lock (qed.h's lock
 * map).
 *
 * This work is licensed under the terms of the GNU LGPL, version 2 or later.
 * See the COPYING.LIB file in the top-level directory.
 */

#include "qemu/osdep.h"
#include "qemu/timer.h"
#include "block/block_int.h"
#include "trace.h"
#include "qed.h"

/*
 * Write back every dirty table sector, cut the file back to the clusters
 * in use, then clear NEED_CHECK if it is set.
 *
 * Crash ordering 5: clear NEED_CHECK only when no allocation is in flight,
 * no table sector is dirty, and after a flush, so every table write before
 * it is on disk.  An allocation that starts meanwhile, or a writeback
 * pass, finds need_check_ready false and waits for header_busy before it
 * writes anything, then sets the bit again (over a backing file: only an
 * allocation that grows the file, ordering 8).
 *
 * Crash ordering 8: the grow-ahead tail goes first, and that flush also
 * puts the new length on disk before the bit is cleared, so that no tail
 * outlives the bit (the original driver's check counts one as leaked
 * clusters).  The cut happens with no allocation in flight (ordering 7),
 * and a new allocation grows the file again only after setting the bit,
 * which waits for header_busy.
 */

int coroutine_fn qed_clear_need_check(BDRVQEDState *s)
{
    QEDHeader h;
    int ret;

    qed_assert_locked(s);
    ret = qed_writeback(s);
    if (ret < 0) {
        return ret;
    }

    qed_busy_enter(s, &s->header_busy);
    s->need_check_ready = false;
    if (s->allocating_writes == 0 && !qed_tables_dirty(s) &&
        !bdrv_is_read_only(s->bs)) {
        if (s->file_size > s->file_end) {
            ret = qed_resize_file(s, s->file_end);
        }
        if (ret == 0 && (s->header.features & QED_F_NEED_CHECK) &&
            !s->unrepaired) {
            ret = QED_UNLOCKED(s, bdrv_co_flush(s->bs->file->bs));
            if (ret == 0) {
                h = s->header;
                h.features &= ~QED_F_NEED_CHECK;
                ret = qed_update_header(s, &h);
            }
            if (ret == 0) {
                /* Leave the clean header on disk before anyone goes away */
                ret = QED_UNLOCKED(s, bdrv_co_flush(s->bs->file->bs));
            }
            if (ret == 0) {
                trace_qed_need_check_clear(s);
                /* Armed meanwhile by an allocation that has landed */
                qed_cancel_timer(s);
            }
        }
    }
    qed_busy_leave(s, &s->header_busy);
    return ret;
}

static void coroutine_fn qed_need_check_timer_entry(void *opaque)
{
    BDRVQEDState *s = opaque;

    /*
     * A coroutine of our own, not a request: it takes the graph reader
     * lock itself.  It waits only for allocations in flight, which hold
     * it too, never for new requests (a held reader lock delays every
     * graph change).
     */
    GRAPH_RDLOCK_GUARD();

    qed_lock(s);
    while (qed_allocs_in_flight(s)) {
        qemu_co_queue_wait(&s->idle_waiters, &s->lock);
    }
    qed_clear_need_check(s);
    /* Still under the lock: a start that comes after this clear runs */
    qatomic_set(&s->timer_running, false);
    qed_unlock(s);
    bdrv_dec_in_flight(s->bs);
}

/*
 * Start clearing NEED_CHECK in a coroutine that drain waits for.  From a
 * coroutine that holds s->lock, or from the timer's callback (any thread,
 * atomics only: see qed_need_check_timer_cb())
 */
static void qed_start_clear(BDRVQEDState *s)
{
    Coroutine *co;

    if (qatomic_xchg(&s->timer_running, true)) {
        return;
    }
    bdrv_inc_in_flight(s->bs);
    co = qemu_coroutine_create(qed_need_check_timer_entry, s);
    aio_co_enter(bdrv_get_aio_context(s->bs), co);
}

/*
 * A timer callback may start a coroutine of ours only outside drained
 * sections, and drain begins in the main loop while the callback may run
 * in an iothread: take an in-flight count first, then look at the
 * quiesce counter (drain increments that first, then polls for in-flight
 * counts: one of the two sees the other).  Returns false, the count
 * given back, inside a drained section.
 */
static bool qed_timer_may_start(BlockDriverState *bs)
{
    bdrv_inc_in_flight(bs);
    /* Pairs with drain's increment of quiesce_counter before its poll */
    smp_mb();
    if (qatomic_read(&bs->quiesce_counter) > 0) {
        bdrv_dec_in_flight(bs);
        return false;
    }
    return true;
}

/* Any thread (the node's AioContext's): atomics only */
void qed_need_check_timer_cb(void *opaque)
{
    BDRVQEDState *s = opaque;

    if (!qed_timer_may_start(s->bs)) {
        /* No I/O of ours inside a drained section: look again later */
        timer_mod(s->need_check_timer,
                  qemu_clock_get_ns(QEMU_CLOCK_REALTIME) +
                  NANOSECONDS_PER_SECOND);
        return;
    }
    trace_qed_timer_fire(s);
    qed_start_clear(s);
    bdrv_dec_in_flight(s->bs);
}

bool qed_may_write_header(BDRVQEDState *s)
{
    return !bdrv_is_read_only(s->bs) &&
           !(s->bs->open_flags & BDRV_O_INACTIVE);
}

/*
 * After the last allocating write: write the tables back and clear the
 * bit in a few seconds
 */
void qed_arm_timer(BDRVQEDState *s)
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

void qed_cancel_timer(BDRVQEDState *s)
{
    if (s->need_check_timer && timer_pending(s->need_check_timer)) {
        trace_qed_timer_cancel(s);
        timer_del(s->need_check_timer);
    }
}

/*
 * The idle release: every cache-clean-interval seconds the L2 tables
 * that nobody looked up since the last time give their memory back
 * (qed_l2_cache_clean_unused()).  Memory only, no I/O, but the cache is
 * s->lock's: a coroutine of ours does it, outside drained sections (the
 * main loop's close and reopen change the cache and the interval without
 * the lock, drained), and the timer is set again when it is done.
 */
static void coroutine_fn qed_cache_clean_entry(void *opaque)
{
    BDRVQEDState *s = opaque;
    uint64_t released;
    QEDL2CacheStats st;

    qed_lock(s);
    /* (invalidate_cache may have made the cache and timer again, or none) */
    if (s->l2_cache && s->cache_clean_timer) {
        released = qed_l2_cache_clean_unused(s->l2_cache);
        qed_l2_cache_stats(s->l2_cache, &st);
        trace_qed_cache_clean(s, released, st.resident);
        timer_mod(s->cache_clean_timer,
                  qemu_clock_get_ms(QEMU_CLOCK_REALTIME) +
                  (int64_t)s->cache_clean_interval * 1000);
    }
    qed_unlock(s);
    bdrv_dec_in_flight(s->bs);
}

/* Any thread (the node's AioContext's): atomics only */
static void qed_cache_clean_timer_cb(void *opaque)
{
    BDRVQEDState *s = opaque;

    if (!qed_timer_may_start(s->bs)) {
        /* Drained: try again in a second */
        timer_mod(s->cache_clean_timer,
                  qemu_clock_get_ms(QEMU_CLOCK_REALTIME) + 1000);
        return;
    }
    /* The coroutine gives back the in-flight count */
    aio_co_enter(bdrv_get_aio_context(s->bs),
                 qemu_coroutine_create(qed_cache_clean_entry, s));
}

void qed_cache_clean_timer_init(BDRVQEDState *s, AioContext *ctx)
{
    if (s->cache_clean_interval > 0 && s->l2_cache) {
        s->cache_clean_timer = aio_timer_new(ctx, QEMU_CLOCK_REALTIME,
                                             SCALE_MS,
                                             qed_cache_clean_timer_cb, s);
        timer_mod(s->cache_clean_timer,
                  qemu_clock_get_ms(QEMU_CLOCK_REALTIME) +
                  (int64_t)s->cache_clean_interval * 1000);
    }
}

void qed_cache_clean_timer_del(BDRVQEDState *s)
{
    if (s->cache_clean_timer) {
        timer_free(s->cache_clean_timer);
        s->cache_clean_timer = NULL;
    }
}

void qed_attach_aio_context(BlockDriverState *bs, AioContext *new_context)
{
    BDRVQEDState *s = bs->opaque;

    s->need_check_timer = aio_timer_new(new_context, QEMU_CLOCK_REALTIME,
                                        SCALE_NS, qed_need_check_timer_cb, s);
    if (s->allocating_writes == 0) {
        qed_arm_timer(s);
    }
    qed_cache_clean_timer_init(s, new_context);
}

void qed_detach_aio_context(BlockDriverState *bs)
{
    BDRVQEDState *s = bs->opaque;

    if (s->need_check_timer) {
        timer_free(s->need_check_timer);
        s->need_check_timer = NULL;
    }
    qed_cache_clean_timer_del(s);
}

/*
 * A drain (stop, snapshot, hand-over...) writes the tables back and
 * clears the bit as soon as the allocations in flight are done, rather
 * than leave a timer behind that would write in the middle of whatever
 * the drain is for.
 */
static void coroutine_fn qed_drain_entry(void *opaque)
{
    BlockDriverState *bs = opaque;
    BDRVQEDState *s = bs->opaque;

    qed_lock(s);
    /*
     * Only for a drain that is still on: a polling one waits for this
     * coroutine (it holds an in-flight count), so it always is; the graph
     * writer's drain (bdrv_graph_wrlock(): no poll, ended at once) has
     * usually ended by now, and a graph change is no reason to write the
     * header: the timer does it in its time, as for any other request.
     * Allocations in flight will dirty tables yet: wait for them too.
     */
    if (qatomic_read(&bs->quiesce_counter) > 0 &&
        qatomic_read(&s->opened) && qed_may_write_header(s) &&
        ((s->header.features & QED_F_NEED_CHECK) ||
         qed_allocs_in_flight(s) || qed_tables_dirty(s))) {
        qed_cancel_timer(s);
        qed_start_clear(s);
    }
    qed_unlock(s);
    bdrv_dec_in_flight(bs);
}

static void qed_drain_bh(void *opaque)
{
    BlockDriverState *bs = opaque;

    /* The in-flight count of qed_drain_begin() goes with the coroutine */
    aio_co_enter(bdrv_get_aio_context(bs),
                 qemu_coroutine_create(qed_drain_entry, bs));
}

/*
 * PORT-10: 7.2 ran .bdrv_co_drain_begin as a coroutine in the node's
 * AioContext; 10.0 calls .bdrv_drain_begin in the main loop (also from
 * every bdrv_graph_wrlock(), via bdrv_drain_all_begin_nopoll()), where it
 * must not poll or yield, while an iothread may be running our requests.
 * So the tests of the old callback (which read s->header, s->allocs,
 * the dirty tables) move to a coroutine that takes s->lock (started by a
 * BH in the node's AioContext), and only its in-flight count is taken
 * here, with atomics: the drain's poll waits for it, and for the
 * clearing coroutine it starts (qed_start_clear() holds its own
 * in-flight count), as it waited for the 7.2 coroutine.  A drain that
 * does not poll (the graph writer's) does not wait for the clear: it
 * runs meanwhile and takes the graph reader lock, so it happens before
 * or after the graph change.
 */
void qed_drain_begin(BlockDriverState *bs)
{
    BDRVQEDState *s = bs->opaque;

    if (!qatomic_read(&s->opened)) {
        return;         /* being opened or closed: nothing to clear */
    }
    bdrv_inc_in_flight(bs);
    aio_bh_schedule_oneshot(bdrv_get_aio_context(bs), qed_drain_bh, bs);
}

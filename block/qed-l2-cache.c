/*
 * QED: the L2 table cache
 *
 * Every request looks up its offsets in L2 tables, so the tables are kept
 * in memory.  The cache is writeback: the driver changes entries in the
 * cached copy and marks their sectors dirty here; qed-writeback.c writes
 * dirty sectors back in passes, in the order the crash rules ask for.  A
 * dirty table is pinned by a reference of its own until it is clean.
 * Entries are reference counted so that a table in use is never freed.
 *
 * Memory: a table's buffer is allocated whole (qed_table_new, a mapping
 * of its own unless it is one chunk) but only the chunks that may be
 * touched take memory ("resident"): those whose
 * entries are known (loaded: read from disk, or all of a new table, which
 * is zeros) and those that changed.  Lookups read only loaded chunks, so
 * nothing else of a table is ever touched.  A known chunk counts even
 * before anyone reads it: reading an untouched anonymous page may take a
 * page of its own (kernels that do not map the shared zero page there, as
 * found on the test host), so a new table counts whole.  The cache counts
 * resident chunks against its limit, l2-cache-size, including tables that
 * left the cache while still in use, until their last user lets go: past
 * it, the least recently used tables give their memory back, a whole
 * table when nobody uses it, or only its clean chunks when its one user is
 * the pin of its dirty sectors.  What is dirty stays until a writeback
 * pass has written it (qed_l2_cache_stats() tells the driver when to run
 * one).  This file knows nothing of I/O.
 *
 * This work is licensed under the terms of the GNU LGPL, version 2 or later.
 * See the COPYING.LIB file in the top-level directory.
 */

#include "qemu/osdep.h"
#include "qemu/bitmap.h"
#include "qemu/madvise.h"
#include "trace.h"
#include "qed.h"

/* At most this many tables, whatever the limit: each costs address space */
#define QED_L2_CACHE_MAX_TABLES 65536

/*
 * One L2 table held by the cache.  Its users hold references; a dirty
 * table is pinned (holds a reference of its own) until it is clean again.
 */
struct QEDCachedTable {
    QEDDirtyTable t;
    int ref;                /* users; never freed while > 0 */
    bool dropped;           /* no longer in the cache, freed at last unref */
    bool fresh;             /* new table, not written to disk yet */
    bool on_dirty_list;
    bool used;              /* looked up since the last idle release */
    unsigned long *resident;    /* chunks that take memory */
    unsigned int nresident;
    /*
     * Chunks are being loaded (qed_l2_cache_lock_chunks()); others wait
     * on load_waiters, with the driver's lock released
     */
    bool loading;
    CoQueue load_waiters;
    QTAILQ_ENTRY(QEDCachedTable) lru;
    QTAILQ_ENTRY(QEDCachedTable) dirty_next;
};

struct QEDL2Cache {
    GHashTable *by_offset;              /* uint64_t offset -> table */
    QTAILQ_HEAD(, QEDCachedTable) lru;  /* least recently used at the tail */
    QTAILQ_HEAD(, QEDCachedTable) dirty_list;  /* pinned, to write back */
    unsigned int n_tables;
    unsigned int max_tables;
    uint64_t max_bytes;                 /* l2-cache-size */
    uint64_t resident_bytes;            /* resident chunks, all tables */
    size_t table_bytes;
    size_t chunk_bytes;
    unsigned int chunk_entries;         /* entries in one chunk */
    unsigned int nchunks;               /* chunks in one table */
    unsigned int nsectors;              /* sectors in one table */
    unsigned int sectors_per_chunk;
    bool can_release_chunks;            /* a chunk is whole host pages */
    unsigned int dirty_tables;
    uint64_t dirty_sectors;             /* in all tables */
    /*
     * The last shrink found nothing more to give back: no need to walk
     * the tables again until a table is unused or clean again
     */
    bool shrink_futile;
    /*
     * The driver's metadata lock, which guards all of the cache (NULL in
     * the unit tests, which run no coroutines)
     */
    CoMutex *lock;
};

static void qed_l2_cache_shrink(QEDL2Cache *c);

void qed_l2_cache_set_lock(QEDL2Cache *c, CoMutex *lock)
{
    c->lock = lock;
}

/*
 * The driver holds its lock (qed_assert_locked(): or this is its open or
 * close, in the main loop, outside coroutines)
 */
static void qed_l2_cache_assert_locked(QEDL2Cache *c)
{
    if (!c->lock) {
        return;
    }
    if (qemu_in_coroutine()) {
        assert(c->lock->holder == qemu_coroutine_self());
    } else {
        assert(qemu_get_current_aio_context() == qemu_get_aio_context());
    }
}

QEDL2Cache *qed_l2_cache_new(uint64_t max_bytes, size_t table_bytes)
{
    QEDL2Cache *c = g_new0(QEDL2Cache, 1);

    c->by_offset = g_hash_table_new(g_int64_hash, g_int64_equal);
    QTAILQ_INIT(&c->lru);
    QTAILQ_INIT(&c->dirty_list);
    c->table_bytes = table_bytes;
    c->chunk_bytes = MIN(table_bytes, QED_L2_CHUNK_BYTES);
    c->chunk_entries = c->chunk_bytes / sizeof(uint64_t);
    c->nchunks = table_bytes / c->chunk_bytes;
    c->nsectors = table_bytes / BDRV_SECTOR_SIZE;
    c->sectors_per_chunk = c->chunk_bytes / BDRV_SECTOR_SIZE;
    c->can_release_chunks = c->chunk_bytes % qemu_real_host_page_size() == 0;
    qed_l2_cache_set_max(c, max_bytes);
    return c;
}

static void qed_l2_cache_free_table(QEDL2Cache *c, QEDCachedTable *e)
{
    assert(!e->on_dirty_list);
    c->resident_bytes -= (uint64_t)e->nresident * c->chunk_bytes;
    qed_table_free(e->t.table, c->table_bytes);
    g_free(e->t.loaded);
    g_free(e->t.dirty);
    g_free(e->resident);
    g_free(e);
}

static void qed_l2_cache_set_resident(QEDL2Cache *c, QEDCachedTable *e,
                                      unsigned long first, unsigned long n)
{
    for (unsigned long i = first; i < first + n; i++) {
        if (!test_and_set_bit(i, e->resident)) {
            e->nresident++;
            c->resident_bytes += c->chunk_bytes;
        }
    }
}

/*
 * Take @e out of the cache; its memory goes now or with its last user,
 * and counts until then
 */
static void qed_l2_cache_remove(QEDL2Cache *c, QEDCachedTable *e)
{
    qed_l2_cache_assert_locked(c);
    assert(!e->dropped);
    g_hash_table_remove(c->by_offset, &e->t.offset);
    QTAILQ_REMOVE(&c->lru, e, lru);
    c->n_tables--;
    e->dropped = true;
    if (e->ref == 0) {
        qed_l2_cache_free_table(c, e);
    }
}

/* Does chunk @i of @e hold a dirty sector? */
static bool qed_l2_chunk_dirty(QEDL2Cache *c, QEDCachedTable *e,
                               unsigned long i)
{
    unsigned long first = i * c->sectors_per_chunk;

    return e->t.ndirty &&
           find_next_bit(e->t.dirty, first + c->sectors_per_chunk, first) <
           first + c->sectors_per_chunk;
}

/*
 * Give back the memory of the clean chunks of @e, a table whose only user
 * is the pin of its dirty sectors: they are read again if used (their
 * entries are on disk, since they are clean).
 */
static void qed_l2_cache_release_clean(QEDL2Cache *c, QEDCachedTable *e)
{
    unsigned int released = 0;
    unsigned long i = find_first_bit(e->resident, c->nchunks);

    while (i < c->nchunks) {
        unsigned long end = i;

        /* A run of resident clean chunks: one madvise for all of it */
        while (end < c->nchunks && test_bit(end, e->resident) &&
               !qed_l2_chunk_dirty(c, e, end)) {
            clear_bit(end, e->resident);
            clear_bit(end, e->t.loaded);
            end++;
        }
        if (end > i) {
            qemu_madvise((uint8_t *)e->t.table + i * c->chunk_bytes,
                         (end - i) * c->chunk_bytes, QEMU_MADV_DONTNEED);
            released += end - i;
        }
        i = find_next_bit(e->resident, c->nchunks, end + 1);
    }
    if (released) {
        e->nresident -= released;
        c->resident_bytes -= (uint64_t)released * c->chunk_bytes;
        trace_qed_l2_cache_release(c, e->t.offset, released);
    }
}

/*
 * Give memory back, oldest tables first, until the resident chunks fit
 * the limit: unused tables go whole, pinned ones that nobody else uses
 * keep only their dirty chunks.
 */
static void qed_l2_cache_shrink(QEDL2Cache *c)
{
    QEDCachedTable *e, *prev;

    if (c->shrink_futile) {
        return;
    }
    QTAILQ_FOREACH_REVERSE_SAFE(e, &c->lru, lru, prev) {
        if (c->resident_bytes <= c->max_bytes &&
            c->n_tables <= c->max_tables) {
            return;
        }
        if (e->ref == 0) {
            trace_qed_l2_cache_evict(c, e->t.offset);
            qed_l2_cache_remove(c, e);
        } else if (e->ref == 1 && e->on_dirty_list &&
                   c->can_release_chunks &&
                   e->nresident * c->sectors_per_chunk > e->t.ndirty) {
            qed_l2_cache_release_clean(c, e);
        }
    }
    c->shrink_futile = c->resident_bytes > c->max_bytes ||
                       c->n_tables > c->max_tables;
}

void qed_l2_cache_clear(QEDL2Cache *c)
{
    QEDCachedTable *e, *next;

    QTAILQ_FOREACH_SAFE(e, &c->lru, lru, next) {
        qed_l2_cache_remove(c, e);
    }
}

void qed_l2_cache_free(QEDL2Cache *c)
{
    QEDCachedTable *e;

    if (!c) {
        return;
    }
    /* Nobody may hold a table now */
    QTAILQ_FOREACH(e, &c->lru, lru) {
        assert(e->ref == 0);
    }
    qed_l2_cache_clear(c);
    g_hash_table_destroy(c->by_offset);
    g_free(c);
}

/* Return the table at @offset with a reference taken, or NULL */
QEDCachedTable *qed_l2_cache_find(QEDL2Cache *c, uint64_t offset)
{
    QEDCachedTable *e;

    qed_l2_cache_assert_locked(c);
    e = g_hash_table_lookup(c->by_offset, &offset);
    if (!e) {
        trace_qed_l2_cache_miss(c, offset);
        return NULL;
    }
    trace_qed_l2_cache_hit(c, offset);
    e->ref++;
    e->used = true;
    if (e != QTAILQ_FIRST(&c->lru)) {
        QTAILQ_REMOVE(&c->lru, e, lru);
        QTAILQ_INSERT_HEAD(&c->lru, e, lru);
    }
    return e;
}

/*
 * Add the table at @offset and return it with a reference taken.  A
 * @fresh table is new: its entries are all zero (so all of them are
 * known, and count as resident: lookups may read any of them); otherwise
 * its chunks are read as they are used (qed_l2_cache_loaded).  If the
 * cache has the table already, that entry is returned.  NULL: out of
 * memory.
 */
QEDCachedTable *qed_l2_cache_insert(QEDL2Cache *c, uint64_t offset,
                                    bool fresh)
{
    QEDCachedTable *e = qed_l2_cache_find(c, offset);

    if (e) {
        return e;
    }

    e = g_new0(QEDCachedTable, 1);
    e->t.table = qed_table_new(c->table_bytes);
    if (!e->t.table) {
        g_free(e);
        return NULL;
    }
    e->t.offset = offset;
    e->t.loaded = bitmap_new(c->nchunks);
    e->t.dirty = bitmap_new(c->nsectors);
    e->resident = bitmap_new(c->nchunks);
    e->ref = 1;
    e->used = true;
    e->fresh = fresh;
    if (fresh) {
        bitmap_set(e->t.loaded, 0, c->nchunks);
        qed_l2_cache_set_resident(c, e, 0, c->nchunks);
    }
    qemu_co_queue_init(&e->load_waiters);
    g_hash_table_insert(c->by_offset, &e->t.offset, e);
    QTAILQ_INSERT_HEAD(&c->lru, e, lru);
    c->n_tables++;
    qed_l2_cache_shrink(c);
    return e;
}

/* The entries of @e, and their dirty sectors */
QEDDirtyTable *qed_l2_cache_table(QEDCachedTable *e)
{
    return &e->t;
}

/*
 * Held while chunks of @e are read (qed_l2_ensure()), so that two
 * lookups never read the same chunk at once.  The caller holds @lock,
 * the driver's metadata lock, which a wait releases; the chunks are read
 * with it released too.
 */
void coroutine_fn qed_l2_cache_lock_chunks(QEDCachedTable *e,
                                          CoMutex *lock)
{
    while (e->loading) {
        qemu_co_queue_wait(&e->load_waiters, lock);
    }
    e->loading = true;
}

void coroutine_fn qed_l2_cache_unlock_chunks(QEDCachedTable *e)
{
    assert(e->loading);
    e->loading = false;
    qemu_co_queue_restart_all(&e->load_waiters);
}

/* Chunks [first, first + n) of @e were read from disk */
void qed_l2_cache_loaded(QEDL2Cache *c, QEDCachedTable *e,
                         unsigned long first, unsigned long n)
{
    assert(first + n <= c->nchunks);
    bitmap_set(e->t.loaded, first, n);
    qed_l2_cache_set_resident(c, e, first, n);
    qed_l2_cache_shrink(c);
}

void qed_l2_cache_unref(QEDL2Cache *c, QEDCachedTable *e)
{
    qed_l2_cache_assert_locked(c);
    assert(e->ref > 0);
    if (--e->ref > 1) {
        return;
    }
    /* Unused, or used only by its pin: it may give memory back now */
    c->shrink_futile = false;
    if (e->ref == 0 && e->dropped) {
        qed_l2_cache_free_table(c, e);
    } else if (c->resident_bytes > c->max_bytes ||
               c->n_tables > c->max_tables) {
        qed_l2_cache_shrink(c);
    }
}

/* Take @e off the dirty list, dropping the pin, whatever it holds */
static void qed_l2_cache_unpin(QEDL2Cache *c, QEDCachedTable *e)
{
    c->dirty_sectors -= e->t.ndirty;
    if (e->t.ndirty) {
        bitmap_zero(e->t.dirty, c->nsectors);
        e->t.ndirty = 0;
    }
    QTAILQ_REMOVE(&c->dirty_list, e, dirty_next);
    c->dirty_tables--;
    e->on_dirty_list = false;
    qed_l2_cache_unref(c, e);
}

/*
 * Forget the table at @offset: the disk changed under it (the check
 * repaired it).  Its unwritten changes, if any, go too.
 */
void qed_l2_cache_drop(QEDL2Cache *c, uint64_t offset)
{
    QEDCachedTable *e = g_hash_table_lookup(c->by_offset, &offset);

    if (e) {
        e->ref++;
        if (e->on_dirty_list) {
            qed_l2_cache_unpin(c, e);
        }
        qed_l2_cache_remove(c, e);
        qed_l2_cache_unref(c, e);
    }
}

/* Sectors [first, first + n) of @e changed in memory */
void qed_l2_cache_mark_dirty(QEDL2Cache *c, QEDCachedTable *e,
                             unsigned int first, unsigned int n)
{
    unsigned int added;

    qed_l2_cache_assert_locked(c);
    assert(!e->dropped && first + n <= c->nsectors);
    added = qed_dirty_set(&e->t, first, n);
    c->dirty_sectors += added;
    qed_l2_cache_set_resident(c, e, first / c->sectors_per_chunk,
                              (first + n - 1) / c->sectors_per_chunk -
                              first / c->sectors_per_chunk + 1);
    if (!e->on_dirty_list) {
        /* Pinned: a dirty table is never evicted */
        e->ref++;
        e->on_dirty_list = true;
        QTAILQ_INSERT_TAIL(&c->dirty_list, e, dirty_next);
        c->dirty_tables++;
    }
}

/*
 * Sectors [first, first + n) of @e are being written back: they are clean
 * from now on, and the writer holds a reference to @e until it calls
 * qed_l2_cache_settle() and qed_l2_cache_unref().  Returns whether this is
 * the first write of a new table (all of whose dirty sectors the writer
 * takes before it writes any).
 */
bool qed_l2_cache_take_dirty(QEDL2Cache *c, QEDCachedTable *e,
                             unsigned int first, unsigned int n)
{
    bool fresh = e->fresh;

    qed_l2_cache_assert_locked(c);
    c->dirty_sectors -= qed_dirty_clear(&e->t, first, n);
    c->shrink_futile = false;
    e->ref++;
    if (e->t.ndirty == 0) {
        e->fresh = false;
    }
    return fresh;
}

/*
 * The write of sectors [first, first + n) of @e, taken by
 * qed_l2_cache_take_dirty() (which said @fresh), failed: dirty again
 */
void qed_l2_cache_write_failed(QEDL2Cache *c, QEDCachedTable *e,
                               unsigned int first, unsigned int n,
                               bool fresh)
{
    qed_l2_cache_mark_dirty(c, e, first, n);
    e->fresh |= fresh;
}

/* After a writeback: a table that is clean now leaves the dirty list */
void qed_l2_cache_settle(QEDL2Cache *c, QEDCachedTable *e)
{
    if (e->on_dirty_list && e->t.ndirty == 0) {
        qed_l2_cache_unpin(c, e);
    }
}

/*
 * The tables that are dirty now, each with a reference taken, in the
 * order they became dirty: the writeback's list of work.
 */
GPtrArray *qed_l2_cache_dirty_tables(QEDL2Cache *c)
{
    GPtrArray *a = g_ptr_array_sized_new(c->dirty_tables);
    QEDCachedTable *e;

    QTAILQ_FOREACH(e, &c->dirty_list, dirty_next) {
        e->ref++;
        g_ptr_array_add(a, e);
    }
    return a;
}

/*
 * Drop every pin, for a close whose writeback failed: returns how many
 * tables had changes that never reached the disk.
 */
unsigned int qed_l2_cache_forget_dirty(QEDL2Cache *c)
{
    unsigned int n = 0;

    while (!QTAILQ_EMPTY(&c->dirty_list)) {
        QEDCachedTable *e = QTAILQ_FIRST(&c->dirty_list);

        n += e->t.ndirty > 0;
        qed_l2_cache_unpin(c, e);
    }
    return n;
}

/* Change the limit; memory beyond it that is not in use goes now */
void qed_l2_cache_set_max(QEDL2Cache *c, uint64_t max_bytes)
{
    c->max_bytes = MAX(max_bytes, c->chunk_bytes);
    c->max_tables = MIN(MAX(max_bytes / c->chunk_bytes, 1),
                        QED_L2_CACHE_MAX_TABLES);
    c->shrink_futile = false;
    qed_l2_cache_shrink(c);
}

/*
 * The idle release (cache-clean-interval, qed.c's timer): give back the
 * memory of every table that nobody looked up since the last call, as
 * qcow2 does with its caches: whole when unused, its clean chunks when
 * only the pin of its dirty sectors holds it.  A guest that once touched
 * many tables (a scan, a backup) does not keep their memory for the rest
 * of its life.  Returns the bytes given back.
 */
uint64_t qed_l2_cache_clean_unused(QEDL2Cache *c)
{
    uint64_t before = c->resident_bytes;
    QEDCachedTable *e, *prev;

    qed_l2_cache_assert_locked(c);
    QTAILQ_FOREACH_REVERSE_SAFE(e, &c->lru, lru, prev) {
        if (e->used) {
            e->used = false;
        } else if (e->ref == 0) {
            trace_qed_l2_cache_evict(c, e->t.offset);
            qed_l2_cache_remove(c, e);
        } else if (e->ref == 1 && e->on_dirty_list && c->can_release_chunks) {
            qed_l2_cache_release_clean(c, e);
        }
    }
    return before - c->resident_bytes;
}

/*
 * How much the cache holds.  Past the limit (resident > max) once
 * everything that can go has gone, the rest is what only a writeback pass
 * can free (dirty chunks), and what tables in use hold.
 */
void qed_l2_cache_stats(QEDL2Cache *c, QEDL2CacheStats *st)
{
    *st = (QEDL2CacheStats) {
        .dirty_tables = c->dirty_tables,
        .dirty_sectors = c->dirty_sectors,
        .resident = c->resident_bytes,
        .max = c->max_bytes,
    };
}

/* What the cache knows of @e (for the unit tests) */
void qed_l2_cache_table_info(QEDCachedTable *e, QEDCachedTableInfo *info)
{
    *info = (QEDCachedTableInfo) {
        .ref = e->ref,
        .dropped = e->dropped,
        .fresh = e->fresh,
        .pinned = e->on_dirty_list,
        .nresident = e->nresident,
        .resident = e->resident,
    };
}

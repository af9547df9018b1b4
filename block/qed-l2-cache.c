/*
 * QED: the L2 table cache
 *
 * Every request looks up its offsets in L2 tables, so the tables are kept
 * in memory.  The cache is writeback: the driver changes entries in the
 * cached copy and marks their sectors dirty here; qed.c writes dirty
 * sectors back in batches (qed_writeback) in the order the crash rules
 * ask for.  A dirty table is pinned by a reference of its own until it is
 * clean.  Entries are reference counted so that a table in use is never
 * freed; unused ones are evicted least recently used first.  This file
 * knows nothing of I/O.
 *
 * This work is licensed under the terms of the GNU LGPL, version 2 or later.
 * See the COPYING.LIB file in the top-level directory.
 */

#include "qemu/osdep.h"
#include "qemu/bitmap.h"
#include "qemu/memalign.h"
#include "trace.h"
#include "qed.h"

void qed_l2_cache_init(L2TableCache *c, unsigned int max_entries,
                       size_t table_bytes)
{
    c->by_offset = g_hash_table_new(g_int64_hash, g_int64_equal);
    QTAILQ_INIT(&c->lru);
    c->n_entries = 0;
    c->max_entries = MAX(max_entries, 1);
    c->table_bytes = table_bytes;
    c->chunk_entries = MIN(table_bytes, QED_L2_CHUNK_BYTES) /
                       sizeof(uint64_t);
    c->nchunks = table_bytes / sizeof(uint64_t) / c->chunk_entries;
    c->nsectors = table_bytes / BDRV_SECTOR_SIZE;
    QTAILQ_INIT(&c->dirty_list);
    c->dirty_tables = 0;
    c->dirty_sectors = 0;
}

static void qed_l2_cache_free_entry(L2TableCache *c, CachedL2Table *e)
{
    assert(!e->on_dirty_list);
    qed_table_free(e->table, c->table_bytes);
    g_free(e->loaded);
    g_free(e->dirty);
    g_free(e);
}

/* Take @e out of the cache; it is freed now or by its last user */
static void qed_l2_cache_remove(L2TableCache *c, CachedL2Table *e)
{
    assert(!e->dropped);
    g_hash_table_remove(c->by_offset, &e->offset);
    QTAILQ_REMOVE(&c->lru, e, lru);
    c->n_entries--;
    e->dropped = true;
    if (e->ref == 0) {
        qed_l2_cache_free_entry(c, e);
    }
}

/* Evict unused tables, oldest first, until the cache fits its limit */
static void qed_l2_cache_shrink(L2TableCache *c)
{
    CachedL2Table *e, *prev;

    QTAILQ_FOREACH_REVERSE_SAFE(e, &c->lru, lru, prev) {
        if (c->n_entries <= c->max_entries) {
            break;
        }
        if (e->ref == 0) {
            trace_qed_l2_cache_evict(c, e->offset);
            qed_l2_cache_remove(c, e);
        }
    }
}

void qed_l2_cache_clear(L2TableCache *c)
{
    CachedL2Table *e, *next;

    QTAILQ_FOREACH_SAFE(e, &c->lru, lru, next) {
        qed_l2_cache_remove(c, e);
    }
}

void qed_l2_cache_destroy(L2TableCache *c)
{
    CachedL2Table *e;

    /* Nobody may hold a table now */
    QTAILQ_FOREACH(e, &c->lru, lru) {
        assert(e->ref == 0);
    }
    qed_l2_cache_clear(c);
    g_hash_table_destroy(c->by_offset);
    c->by_offset = NULL;
}

/* Return the table at @offset with a reference taken, or NULL */
CachedL2Table *qed_l2_cache_find(L2TableCache *c, uint64_t offset)
{
    CachedL2Table *e = g_hash_table_lookup(c->by_offset, &offset);

    if (!e) {
        trace_qed_l2_cache_miss(c, offset);
        return NULL;
    }
    trace_qed_l2_cache_hit(c, offset);
    e->ref++;
    if (e != QTAILQ_FIRST(&c->lru)) {
        QTAILQ_REMOVE(&c->lru, e, lru);
        QTAILQ_INSERT_HEAD(&c->lru, e, lru);
    }
    return e;
}

/*
 * Add @table, the table at @offset, taking ownership of it, and return the
 * entry with a reference taken.  @loaded says whether @table holds all of
 * the disk's entries already; if not, its chunks are read as needed.  If
 * the cache has the table already, @table is freed and that entry returned.
 */
CachedL2Table *qed_l2_cache_insert(L2TableCache *c, uint64_t offset,
                                   QEDTable *table, bool loaded)
{
    CachedL2Table *e = qed_l2_cache_find(c, offset);

    if (e) {
        qed_table_free(table, c->table_bytes);
        return e;
    }

    e = g_new0(CachedL2Table, 1);
    e->table = table;
    e->offset = offset;
    e->ref = 1;
    e->loaded = bitmap_new(c->nchunks);
    if (loaded) {
        bitmap_set(e->loaded, 0, c->nchunks);
    }
    qemu_co_mutex_init(&e->lock);
    g_hash_table_insert(c->by_offset, &e->offset, e);
    QTAILQ_INSERT_HEAD(&c->lru, e, lru);
    c->n_entries++;
    qed_l2_cache_shrink(c);
    return e;
}

void qed_l2_cache_unref(L2TableCache *c, CachedL2Table *e)
{
    assert(e->ref > 0);
    if (--e->ref > 0) {
        return;
    }
    if (e->dropped) {
        qed_l2_cache_free_entry(c, e);
    } else if (c->n_entries > c->max_entries) {
        qed_l2_cache_shrink(c);
    }
}

/* Take @e off the dirty list, dropping the pin, whatever it holds */
static void qed_l2_cache_unpin(L2TableCache *c, CachedL2Table *e)
{
    c->dirty_sectors -= e->ndirty;
    if (e->ndirty) {
        bitmap_zero(e->dirty, c->nsectors);
        e->ndirty = 0;
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
void qed_l2_cache_drop(L2TableCache *c, uint64_t offset)
{
    CachedL2Table *e = g_hash_table_lookup(c->by_offset, &offset);

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
void qed_l2_cache_mark_dirty(L2TableCache *c, CachedL2Table *e,
                             unsigned int first, unsigned int n)
{
    assert(!e->dropped && first + n <= c->nsectors);
    if (!e->dirty) {
        e->dirty = bitmap_new(c->nsectors);
    }
    for (unsigned int i = first; i < first + n; i++) {
        if (!test_and_set_bit(i, e->dirty)) {
            e->ndirty++;
            c->dirty_sectors++;
        }
    }
    if (!e->on_dirty_list) {
        /* Pinned: a dirty table is never evicted */
        e->ref++;
        e->on_dirty_list = true;
        QTAILQ_INSERT_TAIL(&c->dirty_list, e, dirty_next);
        c->dirty_tables++;
    }
}

/* Sectors [first, first + n) of @e are being written back */
void qed_l2_cache_clear_dirty(L2TableCache *c, CachedL2Table *e,
                              unsigned int first, unsigned int n)
{
    for (unsigned int i = first; i < first + n; i++) {
        if (test_and_clear_bit(i, e->dirty)) {
            e->ndirty--;
            c->dirty_sectors--;
        }
    }
}

/* After a writeback: a table that is clean now leaves the dirty list */
void qed_l2_cache_settle(L2TableCache *c, CachedL2Table *e)
{
    if (e->on_dirty_list && e->ndirty == 0) {
        qed_l2_cache_unpin(c, e);
    }
}

/*
 * Drop every pin, for a close whose writeback failed: returns how many
 * tables had changes that never reached the disk.
 */
unsigned int qed_l2_cache_forget_dirty(L2TableCache *c)
{
    unsigned int n = 0;

    while (!QTAILQ_EMPTY(&c->dirty_list)) {
        CachedL2Table *e = QTAILQ_FIRST(&c->dirty_list);

        n += e->ndirty > 0;
        qed_l2_cache_unpin(c, e);
    }
    return n;
}

/* Change the limit; tables beyond it that are not in use go now */
void qed_l2_cache_set_max(L2TableCache *c, unsigned int max_entries)
{
    c->max_entries = MAX(max_entries, 1);
    qed_l2_cache_shrink(c);
}

/*
 * QED: where the bytes of the virtual disk live
 *
 * One lookup turns a position in the virtual disk into an extent: data at
 * a file offset, a zero cluster, or unallocated, and how many bytes after
 * it are contiguous in that state.  Extents merge across L2 tables as long
 * as the state (and for data the file offset) continues.
 *
 * This work is licensed under the terms of the GNU LGPL, version 2 or later.
 * See the COPYING.LIB file in the top-level directory.
 */

#include "qemu/osdep.h"
#include "qemu/bitmap.h"
#include "qemu/memalign.h"
#include "trace.h"
#include "qed.h"

/*
 * Return the L2 table at @l2_offset with a reference; on a miss it enters
 * the cache empty and qed_l2_ensure() reads the chunks that are used.
 */
int coroutine_fn qed_get_l2_table(BDRVQEDState *s, uint64_t l2_offset,
                                  QEDCachedTable **entry)
{
    QEDCachedTable *e;

    if (!qed_offset_valid(s, l2_offset, qed_table_bytes(s))) {
        qed_report_corruption(s, "L2 table offset 0x%" PRIx64 " is invalid",
                              l2_offset);
        return -EIO;
    }

    e = qed_l2_cache_find(s->l2_cache, l2_offset);
    if (e) {
        *entry = e;
        return 0;
    }

    *entry = qed_l2_cache_insert(s->l2_cache, l2_offset, false);
    return 0;
}

/* ---- entries past the end of the file --------------------------------- */

void qed_screen_init(BDRVQEDState *s)
{
    s->open_end = s->file_end;
    s->chunks_read = g_hash_table_new_full(g_int64_hash, g_int64_equal,
                                           g_free, g_free);
    s->bad_entries = g_hash_table_new_full(g_int64_hash, g_int64_equal,
                                           g_free, g_free);
}

/*
 * After a check found (or made) every entry valid: from now on every entry
 * past the file's end is this open's own, wherever it is read
 */
void qed_screen_reset(BDRVQEDState *s)
{
    s->open_end = s->file_end;
    s->entries_checked = true;
    g_hash_table_remove_all(s->chunks_read);
    g_hash_table_remove_all(s->bad_entries);
}

void qed_screen_destroy(BDRVQEDState *s)
{
    g_clear_pointer(&s->chunks_read, g_hash_table_destroy);
    g_clear_pointer(&s->bad_entries, g_hash_table_destroy);
}

static unsigned long *qed_screen_chunks(BDRVQEDState *s, uint64_t l2_offset)
{
    unsigned long *read = g_hash_table_lookup(s->chunks_read, &l2_offset);

    if (!read) {
        read = bitmap_new(s->table_nchunks);
        g_hash_table_insert(s->chunks_read, g_memdup2(&l2_offset,
                                                      sizeof(l2_offset)),
                            read);
    }
    return read;
}

/* A table made by this open holds only its own entries */
void qed_screen_new_table(BDRVQEDState *s, uint64_t l2_offset)
{
    if (s->entries_checked) {
        return;
    }
    bitmap_set(qed_screen_chunks(s, l2_offset), 0, s->table_nchunks);
}

/*
 * Chunks [c, end) of @e were just read from disk: remember, the first
 * time, the data entries in them that point past @open_end.  Reading
 * changes nothing on disk (the image stays as it came, for the check to
 * report), except where allocations of this open have already passed the
 * offset an entry names: the disk would then keep two entries over one
 * cluster, and a later repair could keep the wrong one.  Such an entry is
 * cleared in memory, as the check's repair would, and written back with
 * the next pass.
 */
static void qed_l2_screen(BDRVQEDState *s, QEDCachedTable *e, unsigned long c,
                          unsigned long end)
{
    unsigned long *read = qed_screen_chunks(s, e->t.offset);
    unsigned int ce = s->chunk_entries;
    bool writable = !bdrv_is_read_only(s->bs) &&
                    !(s->bs->open_flags & BDRV_O_INACTIVE);

    if (s->entries_checked) {
        return;
    }

    for (; c < end; c++) {
        if (test_and_set_bit(c, read)) {
            continue;
        }
        for (unsigned int i = c * ce; i < (c + 1) * ce; i++) {
            uint64_t entry = e->t.table->offsets[i];
            uint64_t where = e->t.offset + i * sizeof(uint64_t);

            if (qed_is_data_offset(entry) && entry >= s->open_end) {
                trace_qed_bad_entry(s, where, entry);
                g_hash_table_insert(s->bad_entries,
                                    g_memdup2(&where, sizeof(where)),
                                    g_memdup2(&entry, sizeof(entry)));
                if (writable && entry < s->file_end) {
                    e->t.table->offsets[i] = QED_L2_UNALLOCATED;
                    qed_l2_cache_mark_dirty(s->l2_cache, e,
                                            i / QED_ENTRIES_PER_SECTOR, 1);
                    s->l2_gen++;
                }
            }
        }
    }
}

/*
 * Entry @i of @e if it is one of the bad ones (whatever it says now: it
 * may have been cleared in memory): the offset it named, else NULL
 */
static const uint64_t *qed_entry_is_bad(BDRVQEDState *s, QEDCachedTable *e,
                                        unsigned int i)
{
    uint64_t where = e->t.offset + i * sizeof(uint64_t);

    if (!g_hash_table_size(s->bad_entries)) {
        return NULL;
    }
    return g_hash_table_lookup(s->bad_entries, &where);
}

/* Entries [first, first + n) of the table at @l2_offset are being set */
void qed_screen_forget(BDRVQEDState *s, uint64_t l2_offset,
                       unsigned int first, unsigned int n)
{
    if (!g_hash_table_size(s->bad_entries)) {
        return;
    }
    for (unsigned int i = first; i < first + n; i++) {
        uint64_t where = l2_offset + i * sizeof(uint64_t);

        g_hash_table_remove(s->bad_entries, &where);
    }
}

/*
 * New file space at @offset for @bytes: moved past every cluster that a
 * bad entry names, so that the entry never comes to alias new data.  The
 * clusters skipped leak (the check reclaims them).
 */
uint64_t qed_screen_skip(BDRVQEDState *s, uint64_t offset, uint64_t bytes)
{
    GHashTableIter iter;
    gpointer value;
    bool moved = true;

    while (moved && g_hash_table_size(s->bad_entries)) {
        moved = false;
        g_hash_table_iter_init(&iter, s->bad_entries);
        while (g_hash_table_iter_next(&iter, NULL, &value)) {
            uint64_t bad = qed_start_of_cluster(s, *(uint64_t *)value);

            if (bad >= offset && bad - offset < bytes) {
                offset = bad + s->header.cluster_size;
                moved = true;
            }
        }
    }
    return offset;
}

/*
 * Make entries [first, end) of @e hold what the disk holds, reading the
 * chunks that are not in memory yet (adjacent ones in one request).  The
 * caller holds e->lock.  Entries change (and become dirty) only in loaded
 * chunks, so a chunk read from disk never overwrites a change, and a
 * writeback never writes a sector of a chunk that is being read.
 */
static int coroutine_fn qed_l2_load_locked(BDRVQEDState *s,
                                           QEDCachedTable *e,
                                           unsigned int first,
                                           unsigned int end)
{
    unsigned int ce = s->chunk_entries;
    unsigned long c = first / ce;
    unsigned long last = (end - 1) / ce;

    while (c <= last) {
        unsigned long run_end;
        int ret;

        c = find_next_zero_bit(e->t.loaded, last + 1, c);
        if (c > last) {
            break;
        }
        run_end = find_next_bit(e->t.loaded, last + 1, c);
        BLKDBG_EVENT(s->bs->file, BLKDBG_L2_LOAD);
        ret = qed_read_table_entries(s, e->t.offset, c * ce, (run_end - c) * ce,
                                     &e->t.table->offsets[c * ce]);
        if (ret < 0) {
            return ret;
        }
        qed_l2_cache_loaded(s->l2_cache, e, c, run_end - c);
        qed_l2_screen(s, e, c, run_end);
        c = run_end;
    }
    return 0;
}

/* The same, taking the lock only when something must be read */
int coroutine_fn qed_l2_ensure(BDRVQEDState *s, QEDCachedTable *e,
                               unsigned int first, unsigned int end)
{
    unsigned int ce = s->chunk_entries;
    unsigned long c = first / ce;
    unsigned long last = (end - 1) / ce;
    int ret;

    if (find_next_zero_bit(e->t.loaded, last + 1, c) > last) {
        return 0;
    }
    qemu_co_mutex_lock(&e->lock);
    ret = qed_l2_load_locked(s, e, first, end);
    qemu_co_mutex_unlock(&e->lock);
    return ret;
}

static QEDExtentType qed_entry_type(uint64_t entry)
{
    switch (entry) {
    case QED_L2_UNALLOCATED:
        return QED_EXTENT_UNALLOCATED;
    case QED_L2_ZERO:
        return QED_EXTENT_ZERO;
    default:
        return QED_EXTENT_DATA;
    }
}

/*
 * Find the extent that starts at @pos and covers at most @bytes.  Fails
 * with -EIO when the metadata for @pos itself is corrupt; corruption
 * further on only ends the extent, and is reported when it is reached.
 */
int coroutine_fn qed_find_extent(BDRVQEDState *s, uint64_t pos,
                                 uint64_t bytes, QEDExtent *ext)
{
    uint64_t cluster_size = s->header.cluster_size;
    uint64_t in_cluster = qed_offset_into_cluster(s, pos);
    uint64_t cur = qed_start_of_cluster(s, pos);
    uint64_t end = pos + bytes;
    uint64_t next_data = 0;     /* file offset expected for the next cluster */
    bool first = true;

    assert(bytes > 0);
    ext->type = QED_EXTENT_UNALLOCATED;
    ext->file_offset = 0;

    while (cur < end) {
        unsigned int l1i = qed_l1_index(s, cur);
        uint64_t l2_offset = s->l1.table->offsets[l1i];
        uint64_t table_end = (uint64_t)(l1i + 1) << s->l1_shift;
        QEDCachedTable *e;
        int ret;

        if (l2_offset == 0) {
            /* No L2 table: everything it would map is unallocated */
            if (!first && ext->type != QED_EXTENT_UNALLOCATED) {
                break;
            }
            first = false;
            cur = table_end;
            continue;
        }

        if (!first && !qed_offset_valid(s, l2_offset, qed_table_bytes(s))) {
            /* Reported when a lookup starts there */
            break;
        }
        ret = qed_get_l2_table(s, l2_offset, &e);
        if (ret == 0) {
            /* The entries this lookup may need, up to its end */
            unsigned int i0 = qed_l2_index(s, cur);
            uint64_t span = MIN(end, table_end) - cur;
            unsigned int iend = i0 + DIV_ROUND_UP(span, cluster_size);

            ret = qed_l2_ensure(s, e, i0, MIN(iend, s->table_nelems));
            if (ret < 0) {
                qed_l2_cache_unref(s->l2_cache, e);
            }
        }
        if (ret < 0) {
            if (first) {
                return ret;
            }
            break;
        }

        for (unsigned int i = qed_l2_index(s, cur);
             i < s->table_nelems && cur < end; i++, cur += cluster_size) {
            uint64_t entry = e->t.table->offsets[i];
            QEDExtentType type = qed_entry_type(entry);
            const uint64_t *bad = qed_entry_is_bad(s, e, i);

            if (bad || (type == QED_EXTENT_DATA &&
                        !qed_data_offset_valid(s, entry))) {
                if (first) {
                    entry = bad ? *bad : entry;
                    qed_l2_cache_unref(s->l2_cache, e);
                    qed_report_corruption(s, "data cluster offset 0x%" PRIx64
                                          " for guest offset 0x%" PRIx64
                                          " is invalid", entry, cur);
                    return -EIO;
                }
                goto done_unref;
            }
            if (first) {
                ext->type = type;
                ext->file_offset = type == QED_EXTENT_DATA ?
                                   entry + in_cluster : 0;
                first = false;
            } else if (type != ext->type ||
                       (type == QED_EXTENT_DATA && entry != next_data)) {
                goto done_unref;
            }
            next_data = entry + cluster_size;
        }
        qed_l2_cache_unref(s->l2_cache, e);
        continue;

done_unref:
        qed_l2_cache_unref(s->l2_cache, e);
        break;
    }

    ext->bytes = MIN(cur, end) - pos;
    assert(ext->bytes > 0);
    return 0;
}

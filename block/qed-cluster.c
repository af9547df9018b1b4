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
#include "qemu/memalign.h"
#include "qed.h"

/* Return the L2 table at @l2_offset with a reference, reading it on a miss */
int coroutine_fn qed_get_l2_table(BDRVQEDState *s, uint64_t l2_offset,
                                  CachedL2Table **entry)
{
    CachedL2Table *e;
    QEDTable *table;
    int ret;

    if (!qed_check_offset(s, l2_offset, qed_table_bytes(s))) {
        qed_report_corruption(s, "L2 table offset 0x%" PRIx64 " is invalid",
                              l2_offset);
        return -EIO;
    }

    e = qed_l2_cache_find(&s->l2_cache, l2_offset);
    if (e) {
        *entry = e;
        return 0;
    }

    table = qed_alloc_table(s);
    BLKDBG_EVENT(s->bs->file, BLKDBG_L2_LOAD);
    ret = qed_read_table(s, l2_offset, table);
    if (ret < 0) {
        qemu_vfree(table);
        return ret;
    }
    *entry = qed_l2_cache_insert(&s->l2_cache, l2_offset, table);
    return 0;
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
        uint64_t l2_offset = s->l1_table->offsets[l1i];
        uint64_t table_end = (uint64_t)(l1i + 1) << s->l1_shift;
        CachedL2Table *e;
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

        if (!first && !qed_check_offset(s, l2_offset, qed_table_bytes(s))) {
            /* Reported when a lookup starts there */
            break;
        }
        ret = qed_get_l2_table(s, l2_offset, &e);
        if (ret < 0) {
            if (first) {
                return ret;
            }
            break;
        }

        for (unsigned int i = qed_l2_index(s, cur);
             i < s->table_nelems && cur < end; i++, cur += cluster_size) {
            uint64_t entry = e->table->offsets[i];
            QEDExtentType type = qed_entry_type(entry);

            if (type == QED_EXTENT_DATA &&
                !qed_check_offset(s, entry, cluster_size)) {
                if (first) {
                    qed_l2_cache_unref(&s->l2_cache, e);
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
        qed_l2_cache_unref(&s->l2_cache, e);
        continue;

done_unref:
        qed_l2_cache_unref(&s->l2_cache, e);
        break;
    }

    ext->bytes = MIN(cur, end) - pos;
    assert(ext->bytes > 0);
    return 0;
}

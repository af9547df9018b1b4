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
#include "qemu/units.h"
#include "trace.h"
#include "qed.h"

/*
 * A table that reaches past the end of the file as it was opened is not
 * this open's own unless this open made it (then it is in l2_starts): it
 * was named by a bad L1 entry, which lookups refuse (qed_find_extent()).
 * This catches the callers that come without a lookup.
 */
static bool qed_screen_bad_table(BDRVQEDState *s, uint64_t l2_offset)
{
    uint64_t table_bytes = qed_table_bytes(s);

    return !s->entries_checked &&
           (l2_offset >= s->open_end ||
            table_bytes > s->open_end - l2_offset) &&
           !qed_in_l2_table(s, l2_offset);
}

/*
 * Return the L2 table at @l2_offset with a reference; on a miss it enters
 * the cache empty and qed_l2_ensure() reads the chunks that are used.
 */
int coroutine_fn qed_get_l2_table(BDRVQEDState *s, uint64_t l2_offset,
                                  QEDCachedTable **entry)
{
    QEDCachedTable *e;

    if (!qed_offset_valid(s, l2_offset, qed_table_bytes(s)) ||
        qed_screen_bad_table(s, l2_offset)) {
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
    return *entry ? 0 : -ENOMEM;
}

/* ---- entries past the end of the file --------------------------------- */

/*
 * An entry (L1 or L2) that names file space at or past the end of the file
 * as it was opened (open_end) is corrupt: nothing this open wrote is there
 * yet.  Once allocations move file_end past that space the entry would
 * look valid, and a table or a guest cluster would come to alias new data
 * of another guest cluster.  So such an entry stays invalid for the whole
 * open (lookups fail it with EIO), and new space is never handed out over
 * what it names (qed_screen_skip()).
 *
 * For that, a writable open must know every such entry before it hands
 * out any space: a lazy screening of the chunks that lookups happen to
 * read would miss the entries of chunks never read, and the allocator
 * would walk over their targets.  The L1 table is in memory; the L2 tables
 * are read once, whole and in file order (qed_screen_tables()), by the
 * first lookup of a writable open (or of a node reopened read-write): every
 * allocation follows a lookup of the same request, so none can come first.
 * Read-only opens, inactive ones (they read the image afresh when
 * activated) and the open of `qemu-img check` (its own repair vouches for
 * the entries) never pay it; neither does an open whose check on open
 * repaired the image.  Reading the tables costs about what the check's own
 * reading of them costs (docs/qed-design.md section 10 has the figure); a
 * read-only open needs none of it, as file_end never moves there and the
 * offset checks of the lookup refuse every such entry.
 *
 * What is kept: a bitmap of the bad entries of each L2 table that has one,
 * a bitmap of the bad L1 entries, and the sorted file ranges that they
 * name (at most QED_SCREEN_MAX_RANGES: beyond that the closest ranges
 * merge, and the space between them is skipped too, which is safe: it only
 * leaks).  That is at most one bit per table entry, whatever the image
 * holds.
 */

typedef struct QEDScreenRange {
    uint64_t start;
    uint64_t end;
} QEDScreenRange;

#define QED_SCREEN_MAX_RANGES 4096

/* The tables are read in requests of at most this many bytes */
#define QED_SCREEN_READ_BYTES (1 * MiB)

void qed_screen_init(BDRVQEDState *s)
{
    s->open_end = s->file_end;
    qed_busy_init(&s->screen_busy);
    s->bad_entries = g_hash_table_new_full(g_int64_hash, g_int64_equal,
                                           g_free, g_free);
    s->bad_ranges = g_array_new(FALSE, FALSE, sizeof(QEDScreenRange));
}

static void qed_screen_clear(BDRVQEDState *s)
{
    g_hash_table_remove_all(s->bad_entries);
    g_clear_pointer(&s->bad_l1, g_free);
    g_array_set_size(s->bad_ranges, 0);
    s->tables_screened = false;
    s->bad_dropped = false;
}

/*
 * After a check found (or made) every entry valid: from now on every entry
 * past the file's end is this open's own, wherever it is read
 */
void qed_screen_reset(BDRVQEDState *s)
{
    s->open_end = s->file_end;
    s->entries_checked = true;
    qed_screen_clear(s);
}

void qed_screen_destroy(BDRVQEDState *s)
{
    g_clear_pointer(&s->bad_entries, g_hash_table_destroy);
    g_clear_pointer(&s->bad_l1, g_free);
    if (s->bad_ranges) {
        g_array_free(s->bad_ranges, TRUE);
        s->bad_ranges = NULL;
    }
}

/* A table made by this open holds only its own entries */
void qed_screen_new_table(BDRVQEDState *s, uint64_t l2_offset)
{
    /* (It never lies on a bad entry's target: the allocator skips them) */
    g_hash_table_remove(s->bad_entries, &l2_offset);
}

static bool qed_screen_writable(BDRVQEDState *s)
{
    return !bdrv_is_read_only(s->bs) &&
           !(s->bs->open_flags & BDRV_O_INACTIVE);
}

static int qed_screen_range_cmp(gconstpointer a, gconstpointer b)
{
    const QEDScreenRange *x = a, *y = b;

    return x->start < y->start ? -1 : x->start > y->start;
}

static int qed_screen_u64_cmp(gconstpointer a, gconstpointer b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

/*
 * Sort and merge @ranges; if more than QED_SCREEN_MAX_RANGES remain, fill
 * the smallest gaps between them until that many are left
 */
static void qed_screen_compact(GArray *ranges)
{
    QEDScreenRange *r = (QEDScreenRange *)ranges->data;
    uint64_t fill = 0;
    guint n = 0;

    g_array_sort(ranges, qed_screen_range_cmp);
    if (ranges->len > QED_SCREEN_MAX_RANGES) {
        guint ngaps = ranges->len - 1;
        uint64_t *gaps = g_new(uint64_t, ngaps);

        for (guint i = 0; i < ngaps; i++) {
            gaps[i] = r[i + 1].start > r[i].end ?
                      r[i + 1].start - r[i].end : 0;
        }
        qsort(gaps, ngaps, sizeof(uint64_t), qed_screen_u64_cmp);
        /* Filling every gap up to this one leaves at most the maximum */
        fill = gaps[ranges->len - QED_SCREEN_MAX_RANGES - 1];
        g_free(gaps);
    }
    for (guint i = 0; i < ranges->len; i++) {
        if (n > 0 && r[i].start <= r[n - 1].end + fill) {
            r[n - 1].end = MAX(r[n - 1].end, r[i].end);
        } else {
            r[n++] = r[i];
        }
    }
    g_array_set_size(ranges, n);
}

/*
 * Remember that [@start, @start + @bytes) is named by a bad entry.  Only
 * the space past the end of the file at open matters (allocations never
 * hand out space below it), and only below BDRV_MAX_LENGTH (no write can
 * go past it, so nothing there can be aliased).
 */
static void qed_screen_add_range(BDRVQEDState *s, GArray *ranges,
                                 uint64_t start, uint64_t bytes)
{
    QEDScreenRange r = {
        .start = MAX(start, s->open_end),
        .end = start < BDRV_MAX_LENGTH - MIN(bytes, BDRV_MAX_LENGTH) ?
               start + bytes : BDRV_MAX_LENGTH,
    };

    if (r.start < r.end) {
        g_array_append_val(ranges, r);
        if (ranges->len >= 2 * QED_SCREEN_MAX_RANGES) {
            qed_screen_compact(ranges);
        }
    }
}

/* The bad entries of the L2 table at @l2_offset in @bad, if any */
static unsigned long *qed_screen_table_bad(BDRVQEDState *s, GHashTable *bad,
                                           uint64_t l2_offset, bool create)
{
    unsigned long *map = g_hash_table_lookup(bad, &l2_offset);

    if (!map && create) {
        map = bitmap_new(s->table_nelems);
        g_hash_table_insert(bad, g_memdup2(&l2_offset, sizeof(l2_offset)),
                            map);
    }
    return map;
}

/*
 * Read every L2 table that the L1 names and that lies inside the file as
 * opened, and record the entries of those tables and of the L1 that name
 * space past it.  The caller holds screen_busy; nothing has been
 * allocated yet (file_end == open_end).  The result goes into effect
 * only as a whole, and only if no check vouched for the entries meanwhile.
 */
static int coroutine_fn GRAPH_RDLOCK
qed_screen_tables(BDRVQEDState *s)
{
    uint64_t table_bytes = qed_table_bytes(s);
    uint64_t cluster_size = s->header.cluster_size;
    unsigned int step = MIN(table_bytes, QED_SCREEN_READ_BYTES) /
                        sizeof(uint64_t);
    GHashTable *bad = g_hash_table_new_full(g_int64_hash, g_int64_equal,
                                            g_free, g_free);
    GArray *ranges = g_array_new(FALSE, FALSE, sizeof(QEDScreenRange));
    unsigned long *bad_l1 = NULL;
    uint64_t *starts, *buf;
    size_t n_starts;
    int ret = 0;

    /* The L1 first: it is in memory */
    for (unsigned int i = 0; i < s->table_nelems; i++) {
        uint64_t l2_offset = s->l1.table->offsets[i];

        if (l2_offset == 0 || (l2_offset < s->open_end &&
                               table_bytes <= s->open_end - l2_offset)) {
            continue;
        }
        trace_qed_bad_entry(s, s->header.l1_table_offset +
                            i * sizeof(uint64_t), l2_offset);
        if (!bad_l1) {
            bad_l1 = bitmap_new(s->table_nelems);
        }
        set_bit(i, bad_l1);
        if (qed_offset_into_cluster(s, l2_offset) == 0) {
            qed_screen_add_range(s, ranges, l2_offset, table_bytes);
        }
    }

    /*
     * Then the tables that lookups accept, in file order: l2_starts lists
     * them sorted (the tables of bad L1 entries are not in it)
     */
    n_starts = s->n_l2_starts;
    starts = g_memdup2(s->l2_starts, n_starts * sizeof(uint64_t));
    buf = qemu_try_blockalign(s->bs->file->bs, step * sizeof(uint64_t));
    if (!buf) {
        ret = -ENOMEM;
    }
    for (size_t t = 0; ret == 0 && t < n_starts; t++) {
        if (t > 0 && starts[t] == starts[t - 1]) {
            continue;       /* two L1 entries name it: read it once */
        }
        for (unsigned int first = 0; first < s->table_nelems; first += step) {
            ret = qed_read_table_entries(s, starts[t], first, step, buf);
            if (ret < 0) {
                break;
            }
            for (unsigned int j = 0; j < step; j++) {
                uint64_t entry = buf[j];

                if (!qed_is_data_offset(entry) || entry < s->open_end) {
                    continue;
                }
                trace_qed_bad_entry(s, starts[t] + (first + j) *
                                    sizeof(uint64_t), entry);
                set_bit(first + j, qed_screen_table_bad(s, bad, starts[t],
                                                        true));
                /* A misaligned entry is refused forever: nothing to skip */
                if (qed_offset_into_cluster(s, entry) == 0) {
                    qed_screen_add_range(s, ranges, entry, cluster_size);
                }
            }
        }
    }
    qemu_vfree(buf);
    g_free(starts);

    if (ret == 0 && !s->entries_checked) {
        qed_screen_compact(ranges);
        g_hash_table_destroy(s->bad_entries);
        s->bad_entries = bad;
        g_free(s->bad_l1);
        s->bad_l1 = bad_l1;
        g_array_free(s->bad_ranges, TRUE);
        s->bad_ranges = ranges;
        s->tables_screened = true;
    } else {
        g_hash_table_destroy(bad);
        g_free(bad_l1);
        g_array_free(ranges, TRUE);
    }
    return ret;
}

/*
 * Allocations have handed out space past the first target of a bad entry:
 * from now on the file covers what some of them name, and after the close
 * nothing would tell them from good entries over leaked clusters (or, for
 * an L1 entry, over a table of zeros).  Drop every bad entry in memory, as
 * `qemu-img check -r all` would, so that the writeback takes that to the
 * disk; they stay invalid (EIO) for the rest of the open all the same.
 * Best effort: if it fails, the entries keep naming space nothing else
 * uses (the allocator skipped it), which is harmless.  The caller holds
 * screen_busy.
 */
static void coroutine_fn GRAPH_RDLOCK
qed_screen_drop(BDRVQEDState *s)
{
    unsigned int ce = s->chunk_entries;
    unsigned int dropped = 0;
    gpointer *keys;
    uint64_t *tables;
    guint n;

    /* (bad_l1 looked at again after the yield: a repair may reset it) */
    if (s->bad_l1 && qed_secure_space(s, &s->l1) == 0 && s->bad_l1) {
        for (unsigned long i = find_first_bit(s->bad_l1, s->table_nelems);
             i < s->table_nelems;
             i = find_next_bit(s->bad_l1, s->table_nelems, i + 1)) {
            if (s->l1.table->offsets[i] != 0) {
                s->l1.table->offsets[i] = 0;
                qed_dirty_set(&s->l1, i / QED_ENTRIES_PER_SECTOR, 1);
                dropped++;
            }
        }
    }

    /* (Keys copied: a check's repair may reset the screening meanwhile) */
    keys = g_hash_table_get_keys_as_array(s->bad_entries, &n);
    tables = g_new(uint64_t, n);
    for (guint k = 0; k < n; k++) {
        tables[k] = *(uint64_t *)keys[k];
    }
    g_free(keys);
    for (guint k = 0; k < n && !s->entries_checked; k++) {
        QEDCachedTable *e;
        uint64_t *entries;
        unsigned long *bad;
        bool ok = true;

        if (qed_get_l2_table(s, tables[k], &e) < 0) {
            continue;
        }
        entries = qed_l2_cache_table(e)->table->offsets;
        /* Load the chunks that hold bad entries; then secure the space */
        for (unsigned int c = 0; ok && c < s->table_nchunks; c++) {
            bad = qed_screen_table_bad(s, s->bad_entries, tables[k], false);
            if (bad && find_next_bit(bad, (c + 1) * ce, c * ce) <
                       (c + 1) * ce) {
                ok = qed_l2_ensure(s, e, c * ce, (c + 1) * ce) == 0;
            }
        }
        ok = ok && qed_secure_space(s, qed_l2_cache_table(e)) == 0;
        bad = qed_screen_table_bad(s, s->bad_entries, tables[k], false);
        for (unsigned long i = bad && ok ?
                               find_first_bit(bad, s->table_nelems) :
                               s->table_nelems;
             i < s->table_nelems;
             i = find_next_bit(bad, s->table_nelems, i + 1)) {
            uint64_t entry = entries[i];

            if (qed_is_data_offset(entry) && entry >= s->open_end) {
                entries[i] = QED_L2_UNALLOCATED;
                qed_l2_cache_mark_dirty(s->l2_cache, e,
                                        i / QED_ENTRIES_PER_SECTOR, 1);
                dropped++;
            }
        }
        qed_l2_cache_unref(s->l2_cache, e);
    }
    g_free(tables);

    if (dropped) {
        s->l2_gen++;
        qed_report_corruption(s, "%u table entries that pointed past the "
                              "end of the file were dropped (file space "
                              "now reaches what they named)", dropped);
    }
}

/* Have allocations handed out space past a bad entry's target? */
static bool qed_screen_passed(BDRVQEDState *s)
{
    return s->bad_ranges->len > 0 &&
           s->file_end > g_array_index(s->bad_ranges, QEDScreenRange, 0).start;
}

/*
 * Before a lookup of a writable image: the tables are screened once
 * (qed_screen_tables()), and the bad entries dropped once allocations
 * have passed one (qed_screen_drop()).  Waits for a screening under way.
 */
static int coroutine_fn GRAPH_RDLOCK
qed_screen_prepare(BDRVQEDState *s)
{
    int ret = 0;

    if (s->entries_checked || !qed_screen_writable(s) ||
        (s->tables_screened && (s->bad_dropped || !qed_screen_passed(s)))) {
        return 0;
    }
    qed_busy_enter(s, &s->screen_busy);
    if (!s->entries_checked && !s->tables_screened) {
        ret = qed_screen_tables(s);
    }
    if (ret == 0 && s->tables_screened && !s->bad_dropped &&
        qed_screen_passed(s)) {
        s->bad_dropped = true;
        qed_screen_drop(s);
    }
    qed_busy_leave(s, &s->screen_busy);
    return ret;
}

/*
 * For the writeback, before a pass: drop the bad entries whose targets
 * allocations have passed since the last lookup, so that a close leaves
 * none of them on disk.  Never waits for a screening under way (it may be
 * waiting for this pass's table writes).
 */
void coroutine_fn qed_screen_settle(BDRVQEDState *s)
{
    qed_assert_locked(s);
    if (s->screen_busy.owner || !s->tables_screened || s->bad_dropped ||
        s->entries_checked || !qed_screen_passed(s)) {
        return;
    }
    /* Free (tested above, under s->lock): taken without a wait */
    qed_busy_enter(s, &s->screen_busy);
    s->bad_dropped = true;
    qed_screen_drop(s);
    qed_busy_leave(s, &s->screen_busy);
}

/* Entries [first, first + n) of the table at @l2_offset are being set */
void qed_screen_forget(BDRVQEDState *s, uint64_t l2_offset,
                       unsigned int first, unsigned int n)
{
    unsigned long *bad;

    if (!g_hash_table_size(s->bad_entries)) {
        return;
    }
    bad = qed_screen_table_bad(s, s->bad_entries, l2_offset, false);
    if (bad) {
        bitmap_clear(bad, first, n);
    }
}

/*
 * New file space at @offset for @bytes: moved past every range that a bad
 * entry names, so that the entry never comes to alias new data.  The
 * space skipped leaks (the check reclaims it).
 */
uint64_t qed_screen_skip(BDRVQEDState *s, uint64_t offset, uint64_t bytes)
{
    const QEDScreenRange *r = (const QEDScreenRange *)s->bad_ranges->data;
    guint lo = 0, hi = s->bad_ranges->len;

    /*
     * Every reservation follows a lookup of a writable image, which
     * screened the tables (or a check vouched for them)
     */
    assert(s->tables_screened || s->entries_checked ||
           !qed_screen_writable(s));

    /* The first range that ends past @offset; the ranges do not touch */
    while (lo < hi) {
        guint mid = lo + (hi - lo) / 2;

        if (r[mid].end <= offset) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    for (guint i = lo; i < s->bad_ranges->len && r[i].start < offset + bytes;
         i++) {
        offset = MAX(offset, r[i].end);
    }
    return offset;
}

/*
 * Make entries [first, end) of @e hold what the disk holds, reading the
 * chunks that are not in memory yet (adjacent ones in one request).  The
 * caller holds the table's chunk lock.  Entries change (and become dirty)
 * only in loaded chunks, so a chunk read from disk never overwrites a
 * change, and a writeback never writes a sector of a chunk that is being
 * read.
 */
static int coroutine_fn GRAPH_RDLOCK
qed_l2_load_locked(BDRVQEDState *s, QEDCachedTable *e, unsigned int first,
                   unsigned int end)
{
    QEDDirtyTable *t = qed_l2_cache_table(e);
    unsigned int ce = s->chunk_entries;
    unsigned long c = first / ce;
    unsigned long last = (end - 1) / ce;

    while (c <= last) {
        unsigned long run_end;
        int ret;

        c = find_next_zero_bit(t->loaded, last + 1, c);
        if (c > last) {
            break;
        }
        run_end = find_next_bit(t->loaded, last + 1, c);
        qed_event(s, BLKDBG_L2_LOAD);
        ret = qed_read_table_entries(s, t->offset, c * ce, (run_end - c) * ce,
                                     &t->table->offsets[c * ce]);
        if (ret < 0) {
            return ret;
        }
        qed_l2_cache_loaded(s->l2_cache, e, c, run_end - c);
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

    if (find_next_zero_bit(qed_l2_cache_table(e)->loaded, last + 1, c) > last) {
        return 0;
    }
    qed_l2_cache_lock_chunks(e, &s->lock);
    ret = qed_l2_load_locked(s, e, first, end);
    qed_l2_cache_unlock_chunks(e);
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

/* Report the bad L1 entry (@l2_offset) that maps guest offset @cur */
static void qed_report_bad_l1(BDRVQEDState *s, uint64_t l2_offset,
                              uint64_t cur)
{
    if (l2_offset) {
        qed_report_corruption(s, "L2 table offset 0x%" PRIx64
                              " is invalid", l2_offset);
    } else {
        /* Dropped already (qed_screen_drop()) */
        qed_report_corruption(s, "the L2 table offset for guest offset 0x%"
                              PRIx64 " pointed past the end of the file",
                              cur);
    }
}

/* Report the bad L2 entry @entry (of @type) that maps guest offset @cur */
static void qed_report_bad_entry(BDRVQEDState *s, QEDExtentType type,
                                 uint64_t entry, uint64_t cur)
{
    if (type == QED_EXTENT_DATA) {
        qed_report_corruption(s, "data cluster offset 0x%" PRIx64
                              " for guest offset 0x%" PRIx64 " is invalid",
                              entry, cur);
    } else {
        /* A bad entry, dropped (qed_screen_drop()) */
        qed_report_corruption(s, "the data cluster offset for guest offset "
                              "0x%" PRIx64 " pointed past the end of the "
                              "file", cur);
    }
}

/*
 * The L2 table at @l2_offset, referenced in *@e, with the entries that map
 * guest offsets [@cur, @end) loaded (@end within the table's span)
 */
static int coroutine_fn GRAPH_RDLOCK
qed_extent_table(BDRVQEDState *s, uint64_t l2_offset, uint64_t cur,
                 uint64_t end, QEDCachedTable **e)
{
    unsigned int i0 = qed_l2_index(s, cur);
    unsigned int iend = i0 + DIV_ROUND_UP(end - cur, s->header.cluster_size);
    int ret;

    ret = qed_get_l2_table(s, l2_offset, e);
    if (ret < 0) {
        return ret;
    }
    ret = qed_l2_ensure(s, *e, i0, MIN(iend, s->table_nelems));
    if (ret < 0) {
        qed_l2_cache_unref(s->l2_cache, *e);
    }
    return ret;
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
    int ret;

    assert(bytes > 0);
    ext->type = QED_EXTENT_UNALLOCATED;
    ext->file_offset = 0;

    ret = qed_screen_prepare(s);
    if (ret < 0) {
        return ret;
    }

    while (cur < end) {
        unsigned int l1i = qed_l1_index(s, cur);
        uint64_t l2_offset = s->l1.table->offsets[l1i];
        uint64_t table_end = (uint64_t)(l1i + 1) << s->l1_shift;
        unsigned long *bad;
        const uint64_t *entries;
        QEDCachedTable *e;

        if (s->bad_l1 && test_bit(l1i, s->bad_l1)) {
            if (first) {
                qed_report_bad_l1(s, l2_offset, cur);
                return -EIO;
            }
            break;
        }
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
        ret = qed_extent_table(s, l2_offset, cur, MIN(end, table_end), &e);
        if (ret < 0) {
            if (first) {
                return ret;
            }
            break;
        }

        bad = g_hash_table_size(s->bad_entries) ?
              qed_screen_table_bad(s, s->bad_entries, l2_offset, false) :
              NULL;
        entries = qed_l2_cache_table(e)->table->offsets;
        for (unsigned int i = qed_l2_index(s, cur);
             i < s->table_nelems && cur < end; i++, cur += cluster_size) {
            uint64_t entry = entries[i];
            QEDExtentType type = qed_entry_type(entry);
            bool is_bad = bad && test_bit(i, bad);

            if (is_bad || (type == QED_EXTENT_DATA &&
                           !qed_data_offset_valid(s, entry))) {
                if (first) {
                    qed_l2_cache_unref(s->l2_cache, e);
                    qed_report_bad_entry(s, type, entry, cur);
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

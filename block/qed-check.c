/*
 * QED: consistency check and repair
 *
 * The check walks the L1 table and every L2 table and marks each cluster
 * of the file that something references in a bitmap with one bit per
 * cluster of the file (so its size follows the file, not the virtual
 * disk).  An entry that cannot be right (misaligned, inside the header or
 * the L1 table, past the end of the file, or naming a cluster that is
 * already referenced) is a corruption; a cluster of the file that nothing
 * references is a leak, whether the file holds data for it or a hole.
 *
 * Repair zeroes bad entries, which is what a crash during an allocating
 * write needs: the entry that landed before its data did becomes
 * unallocated again.  Trailing leaked clusters are cut off; inner ones
 * cannot go without moving clusters in use: they are discarded (their
 * space goes back to the host) and stay counted.
 *
 * This work is licensed under the terms of the GNU LGPL, version 2 or later.
 * See the COPYING.LIB file in the top-level directory.
 */

#include "qemu/osdep.h"
#include "qemu/bitmap.h"
#include "qemu/memalign.h"
#include "trace.h"
#include "qed.h"

/* Upper bound for one read of adjacent L2 tables */
#define QED_CHECK_MAX_READ (16 * 1024 * 1024)

/* An L2 table that a valid L1 entry points to */
typedef struct QEDCheckL2 {
    uint64_t offset;
    unsigned int l1_index;
    bool read_ok;

    /*
     * First and last valid data cluster in guest order (0: none), so that
     * fragmentation can be followed from one table to the next after the
     * tables have been checked in file order.
     */
    uint64_t first_data;
    uint64_t last_data;
} QEDCheckL2;

typedef struct QEDCheck {
    BDRVQEDState *s;
    BdrvCheckResult *result;
    BdrvCheckMode fix;
    bool quiet;                 /* no report: a repair the user did not ask */

    uint64_t file_size;         /* bytes, as the file reports it */
    uint64_t file_end;          /* file_size rounded up to whole clusters */
    uint64_t header_end;
    uint64_t l1_start;
    uint64_t l1_end;

    unsigned long *used;        /* one bit per cluster that is referenced */
    uint64_t nclusters;         /* clusters of the file (and metadata) */
    uint64_t nbits;             /* bits in @used: room for moves past it */

    QEDCheckL2 *tables;
    size_t n_tables;
    bool tables_by_offset;      /* @tables is sorted by offset */
    unsigned int unread_tables; /* tables that could not be read */
} QEDCheck;

/* The check's report, on stderr as qemu-img check prints it */
static void G_GNUC_PRINTF(2, 3) qed_check_say(QEDCheck *check,
                                              const char *fmt, ...)
{
    va_list ap;

    if (check->quiet) {
        return;
    }
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
}

static const char *qed_check_fix_prefix(QEDCheck *check)
{
    return check->fix & BDRV_FIX_ERRORS ? "Repairing" : "ERROR";
}

/*
 * Why the clusters [@offset, @offset + @bytes) cannot be what an entry
 * points to, or NULL if they can.  Tables need all of @bytes inside the
 * file; a data cluster only needs to start inside it, because the file may
 * end in the middle of the last data cluster (the rest reads as zeros),
 * which file_end, the file size rounded up to whole clusters, allows.
 */
static const char *qed_check_range(QEDCheck *check, uint64_t offset,
                                   uint64_t bytes)
{
    BDRVQEDState *s = check->s;

    if (qed_offset_into_cluster(s, offset)) {
        return "is not cluster aligned";
    }
    if (offset < check->header_end) {
        return "points into the image header";
    }
    if (offset >= check->file_end) {
        return "is past the end of the file";
    }
    if (bytes > check->file_end - offset) {
        return "runs past the end of the file";
    }
    if (offset < check->l1_end && offset + bytes > check->l1_start) {
        return "points into the L1 table";
    }
    return NULL;
}

/*
 * Mark the clusters of a valid range as referenced.  A range that shares a
 * cluster with one marked before is a second reference: nothing is marked
 * then, so the first reference keeps the cluster.
 */
static bool qed_check_mark(QEDCheck *check, uint64_t offset, uint64_t bytes)
{
    uint32_t cluster_size = check->s->header.cluster_size;
    uint64_t first = offset / cluster_size;
    uint64_t n = DIV_ROUND_UP(bytes, cluster_size);

    assert(first + n <= check->nclusters);
    if (find_next_bit(check->used, first + n, first) < first + n) {
        return false;
    }
    bitmap_set(check->used, first, n);
    return true;
}

static int qed_check_l2_by_offset(const void *a, const void *b)
{
    const QEDCheckL2 *ta = a, *tb = b;

    return ta->offset < tb->offset ? -1 : ta->offset > tb->offset;
}

static int qed_check_l2_by_index(const void *a, const void *b)
{
    const QEDCheckL2 *ta = a, *tb = b;

    return ta->l1_index < tb->l1_index ? -1 : ta->l1_index > tb->l1_index;
}

/* Does the cluster at @offset belong to one of the (sorted) L2 tables? */
static bool qed_check_in_table(QEDCheck *check, uint64_t offset)
{
    /* The table list's search wants each element to start with the offset */
    QEMU_BUILD_BUG_ON(offsetof(QEDCheckL2, offset) != 0);
    assert(check->tables_by_offset);
    return qed_in_table_list(check->tables, check->n_tables,
                             sizeof(QEDCheckL2), qed_table_bytes(check->s),
                             offset);
}

/* Classify and mark one L1 entry; NULL if it is good */
static const char *qed_check_l1_entry(QEDCheck *check, uint64_t offset)
{
    uint64_t table_bytes = qed_table_bytes(check->s);
    const char *problem = qed_check_range(check, offset, table_bytes);

    /* Only tables are marked yet: header and L1 have been ruled out */
    if (!problem && !qed_check_mark(check, offset, table_bytes)) {
        problem = "overlaps an earlier L2 table";
    }
    return problem;
}

/* Classify and mark one L2 entry; NULL if it is good */
static const char *qed_check_l2_entry(QEDCheck *check, uint64_t offset)
{
    uint64_t cluster_size = check->s->header.cluster_size;
    const char *problem = qed_check_range(check, offset, cluster_size);

    if (!problem && !qed_check_mark(check, offset, cluster_size)) {
        problem = qed_check_in_table(check, offset) ?
                  "points into an L2 table" : "is already referenced";
    }
    return problem;
}

/* Check the L1 table, repair it if asked, and list the L2 tables to read */
static void coroutine_fn GRAPH_RDLOCK
qed_check_l1(QEDCheck *check)
{
    BDRVQEDState *s = check->s;
    BdrvCheckResult *result = check->result;
    uint64_t table_bytes = qed_table_bytes(s);
    QEDTable *fixed = NULL;
    unsigned int first_fixed = 0, last_fixed = 0, n_fixed = 0;
    size_t tables_size = 0;
    int ret;

    for (unsigned int i = 0; i < s->table_nelems; i++) {
        uint64_t offset = s->l1.table->offsets[i];
        const char *problem;

        if (offset == 0) {
            continue;
        }

        problem = qed_check_l1_entry(check, offset);
        if (problem) {
            qed_check_say(check, "%s L1 entry %u: L2 table offset 0x%" PRIx64
                    " %s\n", qed_check_fix_prefix(check), i, offset, problem);
            result->corruptions++;
            if (check->fix & BDRV_FIX_ERRORS) {
                if (!fixed) {
                    fixed = qed_table_buf_new(s);
                    memcpy(fixed, s->l1.table, table_bytes);
                    first_fixed = i;
                }
                fixed->offsets[i] = 0;
                last_fixed = i;
                n_fixed++;
            }
            continue;
        }

        if (check->n_tables == tables_size) {
            tables_size = MAX(16, tables_size * 2);
            check->tables = g_renew(QEDCheckL2, check->tables, tables_size);
        }
        check->tables[check->n_tables++] = (QEDCheckL2) {
            .offset = offset,
            .l1_index = i,
        };
    }

    if (!fixed) {
        return;
    }

    /* The disk first, then the copy in memory that must equal it */
    ret = qed_write_l1_table(s, fixed, first_fixed,
                             last_fixed - first_fixed + 1);
    if (ret < 0) {
        qed_check_say(check, "ERROR: could not write the L1 table: %s\n",
                strerror(-ret));
        result->check_errors++;
    } else {
        for (unsigned int i = first_fixed; i <= last_fixed; i++) {
            s->l1.table->offsets[i] = fixed->offsets[i];
        }
        /* The space of dropped tables may become data once reclaimed */
        qed_l2_starts_rebuild(s);
        result->corruptions -= n_fixed;
        result->corruptions_fixed += n_fixed;
    }
    qed_table_buf_free(fixed);
}

/* Check the entries of one L2 table, repairing them in @table if asked */
static void coroutine_fn GRAPH_RDLOCK
qed_check_l2(QEDCheck *check, QEDCheckL2 *t, QEDTable *table)
{
    BDRVQEDState *s = check->s;
    BdrvCheckResult *result = check->result;
    uint64_t cluster_size = s->header.cluster_size;
    unsigned int first_fixed = 0, last_fixed = 0, n_fixed = 0;
    int ret;

    for (unsigned int i = 0; i < s->table_nelems; i++) {
        uint64_t offset = table->offsets[i];
        const char *problem;

        if (!qed_is_data_offset(offset)) {
            continue;
        }

        problem = qed_check_l2_entry(check, offset);
        if (problem) {
            uint64_t guest = ((uint64_t)t->l1_index << s->l1_shift) +
                             ((uint64_t)i << s->l2_shift);

            qed_check_say(check, "%s L2 table 0x%" PRIx64 " entry %u "
                    "(guest offset 0x%" PRIx64 "): data cluster offset 0x%"
                    PRIx64 " %s\n", qed_check_fix_prefix(check), t->offset,
                    i, guest, offset, problem);
            result->corruptions++;
            if (check->fix & BDRV_FIX_ERRORS) {
                table->offsets[i] = QED_L2_UNALLOCATED;
                if (n_fixed == 0) {
                    first_fixed = i;
                }
                last_fixed = i;
                n_fixed++;
            }
            continue;
        }

        result->bfi.allocated_clusters++;
        if (t->last_data == 0) {
            /* Its predecessor is in an earlier table: see qed_check_frag() */
            t->first_data = offset;
        } else if (offset != t->last_data + cluster_size) {
            result->bfi.fragmented_clusters++;
        }
        t->last_data = offset;
    }

    if (n_fixed == 0) {
        return;
    }

    ret = qed_write_table(s, t->offset, table, first_fixed,
                          last_fixed - first_fixed + 1);

    /*
     * Even a failed write may have changed the disk, so the cached copy
     * may no longer equal it either way.
     */
    qed_l2_cache_drop(s->l2_cache, t->offset);

    if (ret < 0) {
        qed_check_say(check, "ERROR: could not write L2 table 0x%" PRIx64
                      ": %s\n", t->offset, strerror(-ret));
        result->check_errors++;
        return;
    }
    result->corruptions -= n_fixed;
    result->corruptions_fixed += n_fixed;
}

/*
 * Read and check every listed L2 table.  They are read in file order, and
 * tables that lie next to each other in the file come in one request, so
 * that a large image is checked at the speed of sequential reads.  The
 * cache is bypassed: it may hold only part of the tables and the check
 * must see the disk.  Duplicate references are resolved in this order too:
 * the entry in the table that comes first in the file keeps the cluster.
 */
static void coroutine_fn GRAPH_RDLOCK
qed_check_l2_tables(QEDCheck *check)
{
    BDRVQEDState *s = check->s;
    uint64_t table_bytes = qed_table_bytes(s);
    unsigned int max_run = MAX(1, QED_CHECK_MAX_READ / table_bytes);
    g_autofree QEDTable **bufs = g_new0(QEDTable *, max_run);
    unsigned int n_bufs = 0;
    size_t i = 0;

    if (check->n_tables > 1) {    /* qsort(NULL, 0, ...) is undefined */
        qsort(check->tables, check->n_tables, sizeof(check->tables[0]),
              qed_check_l2_by_offset);
    }
    check->tables_by_offset = true;

    while (i < check->n_tables) {
        unsigned int n = 1;
        int ret;

        while (i + n < check->n_tables && n < max_run &&
               check->tables[i + n].offset ==
               check->tables[i + n - 1].offset + table_bytes) {
            n++;
        }
        for (; n_bufs < n; n_bufs++) {
            bufs[n_bufs] = qed_table_buf_new(s);
        }

        qed_event(s, BLKDBG_L2_LOAD);
        ret = qed_read_tables(s, check->tables[i].offset, n, bufs);
        if (ret < 0 && n > 1) {
            /* Read the run table by table so one bad sector costs one */
            for (unsigned int j = 0; j < n; j++) {
                QEDCheckL2 *t = &check->tables[i + j];

                qed_event(s, BLKDBG_L2_LOAD);
                ret = qed_read_table(s, t->offset, bufs[0]);
                if (ret < 0) {
                    qed_check_say(check, "ERROR: could not read L2 table 0x%"
                            PRIx64 ": %s\n", t->offset, strerror(-ret));
                    check->result->check_errors++;
                    check->unread_tables++;
                    continue;
                }
                t->read_ok = true;
                qed_check_l2(check, t, bufs[0]);
            }
        } else if (ret < 0) {
            qed_check_say(check, "ERROR: could not read L2 table 0x%" PRIx64
                    ": %s\n", check->tables[i].offset, strerror(-ret));
            check->result->check_errors++;
            check->unread_tables++;
        } else {
            for (unsigned int j = 0; j < n; j++) {
                check->tables[i + j].read_ok = true;
                qed_check_l2(check, &check->tables[i + j], bufs[j]);
            }
        }
        i += n;
    }

    for (unsigned int j = 0; j < n_bufs; j++) {
        qed_table_buf_free(bufs[j]);
    }
}

/* One past the last cluster in use (the header is, at least) */
static uint64_t qed_check_used_end(QEDCheck *check)
{
    uint64_t last = find_last_bit(check->used, check->nbits);

    assert(last < check->nbits);
    return last + 1;
}

/*
 * Fragmentation follows the guest: the first data cluster of a table
 * continues the last one of the table before it in guest order.
 */
static void qed_check_frag(QEDCheck *check)
{
    uint64_t cluster_size = check->s->header.cluster_size;
    uint64_t prev = 0;

    if (check->n_tables > 1) {    /* qsort(NULL, 0, ...) is undefined */
        qsort(check->tables, check->n_tables, sizeof(check->tables[0]),
              qed_check_l2_by_index);
    }
    check->tables_by_offset = false;

    for (size_t i = 0; i < check->n_tables; i++) {
        QEDCheckL2 *t = &check->tables[i];

        if (!t->read_ok || t->first_data == 0) {
            continue;
        }
        if (prev != 0 && t->first_data != prev + cluster_size) {
            check->result->bfi.fragmented_clusters++;
        }
        prev = t->last_data;
    }
}

/* Free clusters below @end, by the bitmap */
static uint64_t qed_check_count_free(QEDCheck *check, uint64_t end)
{
    uint64_t n = 0, a = 0;

    while ((a = find_next_zero_bit(check->used, end, a)) < end) {
        uint64_t b = find_next_bit(check->used, end, a);

        n += b - a;
        a = b;
    }
    return n;
}

/*
 * Inner runs of unreferenced clusters, below @used_end: every one is a
 * leak, held or a hole, as the original driver counts them.  Listed one
 * line per run; returns how many clusters they hold.
 */
static uint64_t qed_check_inner_leaks(QEDCheck *check, uint64_t used_end)
{
    uint64_t cluster_size = check->s->header.cluster_size;
    uint64_t a = 0, n = 0;

    while ((a = find_next_zero_bit(check->used, used_end, a)) < used_end) {
        uint64_t b = find_next_bit(check->used, used_end, a);

        qed_check_say(check, "Leaked clusters at 0x%" PRIx64 "..0x%" PRIx64
                " (%" PRIu64 " clusters)\n", a * cluster_size,
                b * cluster_size - 1, b - a);
        n += b - a;
        a = b;
    }
    return n;
}

/*
 * Find leaked clusters: clusters of the file that nothing references.
 * Reclaim them if asked and if the metadata could be trusted: while
 * corruptions remain or a table could not be read, a cluster that looks
 * unreferenced may still be what some bad entry points to.  Inner leaks
 * are reclaimed by moving the last clusters in use into them
 * (qed_compact, crash-safe move by move), trailing ones by cutting the
 * file, which comes last.
 */
static void coroutine_fn GRAPH_RDLOCK
qed_check_leaks(QEDCheck *check)
{
    BDRVQEDState *s = check->s;
    BdrvCheckResult *result = check->result;
    uint64_t cluster_size = s->header.cluster_size;
    uint64_t file_clusters = check->file_end / cluster_size;
    uint64_t used_end = qed_check_used_end(check);
    bool reclaim = (check->fix & BDRV_FIX_LEAKS) &&
                   result->corruptions == 0 && result->check_errors == 0;
    uint64_t inner, trailing, found, left;
    int ret;

    if (check->unread_tables) {
        /* What the unread tables reference is unknown, and so are leaks */
        qed_check_say(check, "Leaked clusters not counted: %u L2 tables could "
                "not be read\n", check->unread_tables);
        result->image_end_offset = check->file_size;
        return;
    }

    inner = qed_check_inner_leaks(check, used_end);
    trailing = file_clusters > used_end ? file_clusters - used_end : 0;
    if (trailing) {
        /*
         * A leak whether they hold data or are a hole (the grow-ahead's
         * tail, which a crash leaves behind), as the original driver
         * counts them
         */
        qed_check_say(check, "%s clusters at the end of the file, after 0x%"
                PRIx64 " (%" PRIu64 " clusters)\n",
                reclaim ? "Repairing leaked" : "Leaked",
                used_end * cluster_size, trailing);
    }
    found = inner + trailing;
    result->leaks += found;

    if (!reclaim || found == 0) {
        if (found > 0 && (check->fix & BDRV_FIX_LEAKS)) {
            qed_check_say(check, "Not reclaiming leaked clusters: %s\n",
                    result->corruptions ? "the image has corruptions left" :
                    "errors occurred during the check");
        }
        result->image_end_offset = used_end * cluster_size;
        return;
    }

    if (inner) {
        uint64_t moved = 0;

        ret = qed_compact(s, check->used, check->nbits, &moved);
        used_end = qed_check_used_end(check);
        if (ret == 0) {
            qed_check_say(check, "Repairing leaked clusters inside the file: "
                    "moved %" PRIu64 " clusters in use into them\n", moved);
        } else if (ret == QED_COMPACT_STUCK) {
            qed_check_say(check, "Could not reclaim all leaked clusters inside "
                    "the file: a table found no room to move into "
                    "(moved %" PRIu64 " clusters)\n", moved);
        } else {
            qed_check_say(check, "ERROR: could not move clusters in use into "
                    "leaked ones: %s (moved %" PRIu64 " clusters; the "
                    "image is consistent)\n", strerror(-ret), moved);
            result->check_errors++;
        }
    }

    /*
     * Cut what follows the last cluster in use (header and L1 table are
     * marked, so this keeps them).  Data moves may have made the file
     * longer than it was (a window emptied past its end): cut that too.
     */
    left = qed_check_count_free(check, used_end);
    ret = 0;
    if ((uint64_t)QED_UNLOCKED(s, bdrv_co_getlength(s->bs->file->bs)) >
        used_end * cluster_size ||
        file_clusters > used_end) {
        uint64_t new_len = used_end * cluster_size;

        assert(new_len >= check->l1_end && new_len >= check->header_end);
        ret = qed_resize_file(s, new_len);
        if (ret < 0) {
            qed_check_say(check, "ERROR: could not truncate the file to 0x%"
                    PRIx64 ": %s\n", new_len, strerror(-ret));
            result->check_errors++;
            left += file_clusters > used_end ? file_clusters - used_end : 0;
        } else {
            s->file_end = new_len;
        }
    }
    if (ret == 0) {
        /* Every reservation of this open is recounted by the disk now */
        qed_free_space_forget(s);
    }
    left = MIN(left, found);
    result->leaks -= found - left;
    result->leaks_fixed += found - left;
    result->image_end_offset = used_end * cluster_size;
}

int coroutine_fn qed_check(BDRVQEDState *s, BdrvCheckResult *result,
                           BdrvCheckMode fix, bool quiet)
{
    uint64_t cluster_size = s->header.cluster_size;
    QEDCheck check = {
        .s = s,
        .result = result,
        .fix = fix,
        .quiet = quiet,
        .header_end = (uint64_t)s->header.header_size * cluster_size,
        .l1_start = s->header.l1_table_offset,
        .l1_end = s->header.l1_table_offset + qed_table_bytes(s),
    };
    int64_t file_size;
    int ret;

    qed_assert_locked(s);
    file_size = QED_UNLOCKED(s, bdrv_co_getlength(s->bs->file->bs));
    if (file_size < 0) {
        qed_check_say(&check, "ERROR: could not get the size of the file: %s\n",
                strerror(-file_size));
        result->check_errors++;
        return file_size;
    }
    /*
     * Past s->file_end the file holds only this open's grow-ahead, which
     * nothing was allocated in (and close cuts off): an entry that points
     * there is as bad as one past the end of the file.
     */
    check.file_size = MIN((uint64_t)file_size, s->file_end);
    check.file_end = ROUND_UP(check.file_size, cluster_size);

    /*
     * Open made sure that header and L1 table lie in the file; size the
     * bitmap to hold them anyway so that marking them needs no care.
     */
    check.nclusters = MAX(check.file_end, MAX(check.l1_end, check.header_end)) /
                      cluster_size;
    /* Leak repair may empty a window past the end (qed_compact) */
    check.nbits = check.nclusters + s->header.table_size;
    check.used = bitmap_try_new(check.nbits);
    if (!check.used) {
        result->check_errors++;
        return -ENOMEM;
    }
    bitmap_set(check.used, 0, check.header_end / cluster_size);
    bitmap_set(check.used, check.l1_start / cluster_size,
               qed_table_bytes(s) / cluster_size);

    result->bfi.total_clusters = DIV_ROUND_UP(s->header.image_size,
                                              cluster_size);

    /* Tables first, so that a cluster used as both keeps its table */
    qed_check_l1(&check);
    qed_check_l2_tables(&check);
    qed_check_frag(&check);
    qed_check_leaks(&check);

    /*
     * A table cached under an offset that nothing references any more, or
     * that truncation gave back for reuse, must not be found by a later
     * lookup.  Repairs are rare: start the cache afresh.
     */
    if (result->corruptions_fixed || result->leaks_fixed) {
        qed_l2_cache_clear(s->l2_cache);
    }

    /*
     * Make the repaired (or found good) metadata durable before the caller
     * clears NEED_CHECK, which says that it no longer needs this check.
     */
    ret = 0;
    if (fix) {
        ret = QED_UNLOCKED(s, bdrv_co_flush(s->bs->file->bs));
        if (ret < 0) {
            qed_check_say(&check, "ERROR: could not flush the file: %s\n",
                    strerror(-ret));
            result->check_errors++;
        }
    }

    /* Every entry on disk is valid now, up to the file's (new) end */
    if (ret == 0 && (fix & BDRV_FIX_ERRORS) && !result->corruptions &&
        !result->check_errors) {
        qed_screen_reset(s);
    }

    trace_qed_check_result(s, result->corruptions, result->leaks,
                           result->corruptions_fixed + result->leaks_fixed);

    g_free(check.tables);
    g_free(check.used);
    return ret;
}

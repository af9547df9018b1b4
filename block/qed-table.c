/*
 * QED: L1 and L2 tables: their memory, their dirty sectors, their I/O
 *
 * Tables are little-endian on disk and CPU order in memory; this file is
 * the only place that converts their entries (create's preallocation too
 * goes through qed_table_snapshot(); the header's fields are converted in
 * qed-header.c).  A table update writes only the sectors that hold the
 * changed entries.
 *
 * This work is licensed under the terms of the GNU LGPL, version 2 or later.
 * See the COPYING.LIB file in the top-level directory.
 */

#include "qemu/osdep.h"
#include "qemu/bitmap.h"
#include "qemu/bswap.h"
#include "qemu/error-report.h"
#include "qemu/madvise.h"
#include "qemu/memalign.h"
#include "trace.h"
#include "qed.h"

/*
 * A table-sized I/O buffer, for tables read or written once (the check):
 * aligned so that O_DIRECT reads and writes need no bounce buffer.  Free
 * it with qed_table_buf_free().
 */
QEDTable *qed_table_buf_new(BDRVQEDState *s)
{
    return qemu_blockalign(s->bs, qed_table_bytes(s));
}

void qed_table_buf_free(QEDTable *buf)
{
    qemu_vfree(buf);
}

/*
 * Tables that live long (the L1 table, cached L2 tables): zeroed, page
 * aligned for O_DIRECT.  Free them with qed_table_free().  NULL when out
 * of memory: the caller fails with -ENOMEM.
 *
 * A table of one chunk or less (4 KiB clusters, table_size 1) comes from
 * the heap: the cache counts it whole anyway, and a small cache replaces
 * such tables at every lookup, where a mapping each (mmap, and munmap's
 * TLB shootdowns) took about a quarter of the time.
 *
 * Bigger ones come straight from mmap, so that only the pages touched
 * (the chunks a lookup loaded or a change dirtied) take memory, and a new
 * table needs no memset.  Never transparent huge pages: the kernel merges
 * adjacent table mappings into one area, and with THP "always" the first
 * touch of a chunk there could take a whole 2 MiB page, which the cache
 * (counting 4 KiB chunks, qed-l2-cache.c) would not see and
 * madvise(MADV_DONTNEED) of a chunk would not give back.
 */
QEDTable *qed_table_new(size_t bytes)
{
    void *p;

    if (bytes <= QED_L2_CHUNK_BYTES) {
        p = qemu_try_memalign(QED_L2_CHUNK_BYTES, bytes);
        if (p) {
            memset(p, 0, bytes);
        }
        return p;
    }
    p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        return NULL;
    }
    qemu_madvise(p, bytes, QEMU_MADV_NOHUGEPAGE);
    return p;
}

void qed_table_free(QEDTable *table, size_t bytes)
{
    if (!table) {
        return;
    }
    if (bytes <= QED_L2_CHUNK_BYTES) {
        qemu_vfree(table);
    } else {
        munmap(table, bytes);
    }
}

/* ---- dirty sectors ------------------------------------------------------- */

/*
 * A table of @bytes at file offset @offset that is in memory whole (the L1
 * table): its entries (zero) and its dirty bitmap
 */
int qed_dirty_table_init(QEDDirtyTable *t, uint64_t offset, size_t bytes)
{
    *t = (QEDDirtyTable) {
        .table = qed_table_new(bytes),
        .offset = offset,
        .dirty = bitmap_new(bytes / BDRV_SECTOR_SIZE),
    };
    return t->table ? 0 : -ENOMEM;
}

void qed_dirty_table_destroy(QEDDirtyTable *t, size_t bytes)
{
    qed_table_free(t->table, bytes);
    g_free(t->dirty);
    *t = (QEDDirtyTable) {};
}

/* Mark sectors [first, first + n) of @t dirty; returns how many were not */
unsigned int qed_dirty_set(QEDDirtyTable *t, unsigned int first,
                           unsigned int n)
{
    unsigned int added = 0;

    for (unsigned int i = first; i < first + n; i++) {
        added += !test_and_set_bit(i, t->dirty);
    }
    t->ndirty += added;
    return added;
}

/* Mark sectors [first, first + n) of @t clean; returns how many were dirty */
unsigned int qed_dirty_clear(QEDDirtyTable *t, unsigned int first,
                             unsigned int n)
{
    unsigned int cleared = 0;

    for (unsigned int i = first; i < first + n; i++) {
        cleared += test_and_clear_bit(i, t->dirty);
    }
    t->ndirty -= cleared;
    return cleared;
}

/* ---- table I/O ----------------------------------------------------------- */

static void qed_table_to_cpu(uint64_t *entries, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        entries[i] = le64_to_cpu(entries[i]);
    }
}

int coroutine_fn qed_read_tables(BDRVQEDState *s, uint64_t offset,
                                 unsigned int n, QEDTable **tables)
{
    uint64_t bytes = qed_table_bytes(s);
    size_t nelems = s->table_nelems;
    uint8_t *buf;
    int ret;

    trace_qed_read_table(s, offset, n * nelems);

    /* Into buffers of the caller's, none that others look at meanwhile */
    if (n == 1) {
        ret = QED_UNLOCKED(s, bdrv_co_pread(s->bs->file, offset, bytes,
                                            tables[0], 0));
        if (ret < 0) {
            return ret;
        }
        qed_table_to_cpu(tables[0]->offsets, nelems);
        return 0;
    }

    /* Adjacent tables come in one request, then are split */
    buf = qemu_try_blockalign(s->bs->file->bs, n * bytes);
    if (!buf) {
        return -ENOMEM;
    }
    ret = QED_UNLOCKED(s, bdrv_co_pread(s->bs->file, offset, n * bytes, buf,
                                        0));
    if (ret == 0) {
        for (unsigned int i = 0; i < n; i++) {
            memcpy(tables[i], buf + i * bytes, bytes);
            qed_table_to_cpu(tables[i]->offsets, nelems);
        }
    }
    qemu_vfree(buf);
    return ret;
}

/* Read entries [first, first + n) of the table at @table_offset */
int coroutine_fn qed_read_table_entries(BDRVQEDState *s,
                                        uint64_t table_offset,
                                        unsigned int first, unsigned int n,
                                        uint64_t *entries)
{
    int ret;

    assert(n > 0 && first + n <= s->table_nelems);
    trace_qed_read_table(s, table_offset + first * sizeof(uint64_t), n);
    /*
     * With s->lock released: @entries may be chunks of a cached table
     * being loaded, which nobody else reads or changes until they are
     * marked loaded (qed_l2_load_locked())
     */
    ret = QED_UNLOCKED(s, bdrv_co_pread(s->bs->file,
                                        table_offset +
                                        first * sizeof(uint64_t),
                                        n * sizeof(uint64_t), entries, 0));
    if (ret == 0) {
        qed_table_to_cpu(entries, n);
    }
    return ret;
}

int coroutine_fn qed_read_table(BDRVQEDState *s, uint64_t offset,
                                QEDTable *table)
{
    return qed_read_tables(s, offset, 1, &table);
}

/*
 * A copy of @n entries in disk byte order in @dest (which may be
 * @entries), to be written later by qed_write_table_snapshot(): later
 * changes in memory do not touch it.
 */
void qed_table_snapshot(const uint64_t *entries, unsigned int n,
                        uint64_t *dest)
{
    for (unsigned int i = 0; i < n; i++) {
        dest[i] = cpu_to_le64(entries[i]);
    }
}

/*
 * Write the sectors of the table at @table_offset that hold entries
 * [first, first + n) from @snapshot.  @first and @n must cover whole
 * sectors.  The caller argues the crash ordering of the write it asks for.
 */
int coroutine_fn qed_write_table_snapshot(BDRVQEDState *s,
                                          uint64_t table_offset,
                                          unsigned int first, unsigned int n,
                                          const uint64_t *snapshot)
{
    assert(first % QED_ENTRIES_PER_SECTOR == 0 &&
           n % QED_ENTRIES_PER_SECTOR == 0);
    assert(n > 0 && first + n <= s->table_nelems);
    trace_qed_write_table(s, table_offset, first, n);
    return QED_UNLOCKED(s, bdrv_co_pwrite(s->bs->file,
                                          table_offset +
                                          first * sizeof(uint64_t),
                                          n * sizeof(uint64_t), snapshot, 0));
}

/* The same from entries in CPU order */
static int coroutine_fn GRAPH_RDLOCK
qed_write_table_sectors(BDRVQEDState *s, uint64_t table_offset,
                        unsigned int first, unsigned int n,
                        const uint64_t *entries)
{
    uint64_t *buf = qemu_blockalign(s->bs->file->bs, n * sizeof(uint64_t));
    int ret;

    qed_table_snapshot(entries, n, buf);
    ret = qed_write_table_snapshot(s, table_offset, first, n, buf);
    qemu_vfree(buf);
    return ret;
}

/* Write entries [index, index + n) of @table, by the sectors that hold them */
int coroutine_fn qed_write_table(BDRVQEDState *s, uint64_t offset,
                                 QEDTable *table, unsigned int index,
                                 unsigned int n)
{
    const unsigned int per_sector = BDRV_SECTOR_SIZE / sizeof(uint64_t);
    unsigned int first = QEMU_ALIGN_DOWN(index, per_sector);
    unsigned int end = QEMU_ALIGN_UP(index + n, per_sector);

    assert(n > 0 && index + n <= s->table_nelems);
    return qed_write_table_sectors(s, offset, first, end - first,
                                   &table->offsets[first]);
}

int coroutine_fn qed_read_l1_table(BDRVQEDState *s)
{
    return qed_read_table(s, s->header.l1_table_offset, s->l1.table);
}

static int qed_u64_cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

/* Room for one more start in s->l2_starts */
static void qed_l2_starts_reserve(BDRVQEDState *s)
{
    qed_assert_locked(s);
    if (s->n_l2_starts == s->l2_starts_size) {
        s->l2_starts_size = MAX(16, s->l2_starts_size * 2);
        s->l2_starts = g_renew(uint64_t, s->l2_starts, s->l2_starts_size);
    }
}

/*
 * The index of where L2 tables start (s->l2_starts) follows the L1 table:
 * rebuilt when the L1 is read or repaired, added to when a table is made.
 * L1 entries that lookups refuse anyway (into the L1 table, past the end
 * of the file...) stay out, so that they cannot make good data unreadable.
 */
void qed_l2_starts_rebuild(BDRVQEDState *s)
{
    s->n_l2_starts = 0;
    for (unsigned int i = 0; i < s->table_nelems; i++) {
        uint64_t offset = s->l1.table->offsets[i];

        if (offset == 0 || !qed_offset_valid(s, offset, qed_table_bytes(s))) {
            continue;
        }
        qed_l2_starts_reserve(s);
        s->l2_starts[s->n_l2_starts++] = offset;
    }
    if (s->n_l2_starts > 1) {
        qsort(s->l2_starts, s->n_l2_starts, sizeof(uint64_t), qed_u64_cmp);
    }
}

/* Index of the first start greater than @offset */
/*
 * Lists of tables sorted by file offset: @n elements of @stride bytes,
 * each starting with its table's offset (uint64_t).  The first element
 * whose table starts after @offset.
 */
static size_t qed_table_list_upper(const void *list, size_t n, size_t stride,
                                   uint64_t offset)
{
    size_t lo = 0, hi = n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const uint64_t *start = (const uint64_t *)((const char *)list +
                                                   mid * stride);

        if (*start <= offset) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

/* Does @offset lie inside one of the tables of such a list? */
bool qed_in_table_list(const void *list, size_t n, size_t stride,
                       uint64_t table_bytes, uint64_t offset)
{
    size_t i = qed_table_list_upper(list, n, stride, offset);
    const uint64_t *start;

    if (i == 0) {
        return false;
    }
    start = (const uint64_t *)((const char *)list + (i - 1) * stride);
    return offset - *start < table_bytes;
}

void qed_l2_starts_add(BDRVQEDState *s, uint64_t offset)
{
    size_t i;

    qed_l2_starts_reserve(s);
    /* New tables come from the end of the file: usually the last */
    i = qed_table_list_upper(s->l2_starts, s->n_l2_starts, sizeof(uint64_t),
                             offset);
    memmove(&s->l2_starts[i + 1], &s->l2_starts[i],
            (s->n_l2_starts - i) * sizeof(uint64_t));
    s->l2_starts[i] = offset;
    s->n_l2_starts++;
}

bool qed_in_l2_table(BDRVQEDState *s, uint64_t offset)
{
    return qed_in_table_list(s->l2_starts, s->n_l2_starts, sizeof(uint64_t),
                             qed_table_bytes(s), offset);
}

int coroutine_fn qed_write_l1_table(BDRVQEDState *s, QEDTable *l1,
                                    unsigned int index, unsigned int n)
{
    qed_event(s, BLKDBG_L1_UPDATE);
    return qed_write_table(s, s->header.l1_table_offset, l1, index, n);
}

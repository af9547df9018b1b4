/*
 * QED ("QEMU Enhanced Disk") image format: shared types
 *
 * The on-disk layout, the in-memory state of an open image and the
 * prototypes that the driver's files share.  See docs/interop/qed_spec.txt
 * for the format and its crash orderings, README.md for how the driver
 * works.
 *
 * This work is licensed under the terms of the GNU LGPL, version 2 or later.
 * See the COPYING.LIB file in the top-level directory.
 */

#ifndef BLOCK_QED_H
#define BLOCK_QED_H

#include "block/block_int.h"
#include "qemu/cutils.h"
#include "qemu/coroutine.h"
#include "qemu/queue.h"

/*
 * On-disk layout
 *
 * +--------+----------+----------+----------+-----+
 * | header | L1 table | cluster0 | cluster1 | ... |
 * +--------+----------+----------+----------+-----+
 *
 * The header occupies header_size clusters and holds the backing file name.
 * The L1 table points to L2 tables, L2 tables point to data clusters.  Both
 * kinds of table are table_size clusters of little-endian 64-bit offsets.
 * An L2 entry is 0 (unallocated: read the backing file), 1 (zero cluster:
 * reads as zeros) or the file offset of a data cluster.
 */

#define QED_MAGIC ('Q' | ('E' << 8) | ('D' << 16))

enum {
    /* The image has a backing file */
    QED_F_BACKING_FILE = 0x01,

    /* The image needs a consistency check before use */
    QED_F_NEED_CHECK = 0x02,

    /* The backing file is raw: never probe its format */
    QED_F_BACKING_FORMAT_NO_PROBE = 0x04,

    /* Every feature bit this driver knows */
    QED_FEATURE_MASK = QED_F_BACKING_FILE |
                       QED_F_NEED_CHECK |
                       QED_F_BACKING_FORMAT_NO_PROBE,
    QED_COMPAT_FEATURE_MASK = 0,
    QED_AUTOCLEAR_FEATURE_MASK = 0,

    /* Limits and defaults, in bytes or clusters as named */
    QED_MIN_CLUSTER_SIZE = 4 * 1024,
    QED_MAX_CLUSTER_SIZE = 64 * 1024 * 1024,
    QED_DEFAULT_CLUSTER_SIZE = 64 * 1024,
    QED_MIN_TABLE_SIZE = 1,
    QED_MAX_TABLE_SIZE = 16,
    QED_DEFAULT_TABLE_SIZE = 4,

    /* Seconds after the last allocating write before NEED_CHECK is cleared */
    QED_NEED_CHECK_TIMEOUT = 5,
};

/* Special L2 entry values */
#define QED_L2_UNALLOCATED 0
#define QED_L2_ZERO        1

/* The header as it is on disk (little-endian) and in memory (CPU order) */
typedef struct QEMU_PACKED QEDHeader {
    uint32_t magic;
    uint32_t cluster_size;          /* in bytes */
    uint32_t table_size;            /* for L1 and L2 tables, in clusters */
    uint32_t header_size;           /* in clusters */
    uint64_t features;              /* must be understood to open */
    uint64_t compat_features;       /* may be ignored */
    uint64_t autoclear_features;    /* cleared by writers that ignore them */
    uint64_t l1_table_offset;       /* in bytes */
    uint64_t image_size;            /* virtual disk size, in bytes */
    uint32_t backing_filename_offset;   /* in bytes from start of header */
    uint32_t backing_filename_size;     /* in bytes */
} QEDHeader;

QEMU_BUILD_BUG_ON(sizeof(QEDHeader) != 64);

/* A table in memory: entries in CPU byte order */
typedef struct QEDTable {
    uint64_t offsets[0];
} QEDTable;

/*
 * A cached L2 table is read from disk in chunks of this size, as lookups
 * need them: a miss costs one small read, not a whole table.
 */
#define QED_L2_CHUNK_BYTES 4096

/* Table entries in one 512-byte sector, the unit of table writes */
#define QED_ENTRIES_PER_SECTOR (BDRV_SECTOR_SIZE / sizeof(uint64_t))

/*
 * One L2 table held by the cache.  The cache is writeback: entries change
 * in memory and their sectors are marked dirty; qed.c writes dirty
 * sectors back in batches.  A dirty table is pinned (holds a reference)
 * until it is clean again.
 */
typedef struct CachedL2Table {
    QEDTable *table;
    uint64_t offset;        /* file offset of the table */
    int ref;                /* users; never freed while > 0 */
    bool dropped;           /* no longer in the cache, freed at last unref */
    bool fresh;             /* new table, not written to disk yet */
    /* the file holds the whole table, no hole (qed_secure_space) */
    bool space_ok;
    bool space_busy;        /* being secured: wait on making_waiters */
    unsigned int wb_inflight;   /* writes of its sectors in flight */
    unsigned long *loaded;  /* chunks of table that hold the disk's entries */
    unsigned long *dirty;   /* sectors that differ from the disk */
    unsigned int ndirty;    /* bits set in dirty */
    bool on_dirty_list;
    CoMutex lock;           /* held to load chunks */
    QTAILQ_ENTRY(CachedL2Table) lru;    /* least recently used at the tail */
    QTAILQ_ENTRY(CachedL2Table) dirty_next;
} CachedL2Table;

typedef struct L2TableCache {
    GHashTable *by_offset;              /* uint64_t offset -> CachedL2Table */
    QTAILQ_HEAD(, CachedL2Table) lru;
    QTAILQ_HEAD(, CachedL2Table) dirty_list;    /* pinned, to write back */
    unsigned int n_entries;
    unsigned int max_entries;
    size_t table_bytes;
    unsigned int chunk_entries;         /* entries in one chunk */
    unsigned int nchunks;               /* chunks in one table */
    unsigned int nsectors;              /* sectors in one table */
    unsigned int dirty_tables;
    uint64_t dirty_sectors;             /* in all tables */
} L2TableCache;

/* What a range of the virtual disk maps to */
typedef enum QEDExtentType {
    QED_EXTENT_UNALLOCATED,     /* backing file, or zeros without one */
    QED_EXTENT_ZERO,            /* zero cluster */
    QED_EXTENT_DATA,            /* data cluster(s) at a file offset */
} QEDExtentType;

typedef struct QEDExtent {
    QEDExtentType type;
    uint64_t file_offset;       /* QED_EXTENT_DATA: where pos lives */
    uint64_t bytes;             /* contiguous bytes from pos in this state */
} QEDExtent;

typedef struct QEDTableMaking {
    unsigned int l1_index;
    QLIST_ENTRY(QEDTableMaking) next;
} QEDTableMaking;

typedef struct BDRVQEDState {
    BlockDriverState *bs;
    QEDHeader header;           /* CPU order, equal to the disk */

    QEDTable *l1_table;         /* CPU order; dirty sectors in l1_dirty */
    unsigned long *l1_dirty;
    unsigned int l1_ndirty;
    /* The L2 tables the L1 names, by offset: no data cluster may be in one */
    uint64_t *l2_starts;
    size_t n_l2_starts;
    size_t l2_starts_size;
    L2TableCache l2_cache;      /* writeback */
    uint32_t table_nelems;
    uint32_t l1_shift;
    uint32_t l2_shift;
    uint32_t l2_mask;

    /*
     * First byte past the last allocated cluster; only ever grows, but for
     * a repair by the check and qed_co_make_empty(), which first remove
     * from the disk every entry past the new end.  Every write to the
     * file lies below it.
     */
    uint64_t file_end;
    /* The file's length: it grows ahead of file_end, in steps */
    uint64_t file_size;
    bool can_grow;
    /*
     * A change of the file's length in flight (one at a time), and the
     * length it sets: a write that reaches past that length waits for it,
     * else the size change could land after the write and cut it off.
     */
    bool resizing;
    uint64_t resize_target;
    CoQueue resize_waiters;

    /*
     * New L2 tables whose file space is being allocated, by L1 index: a
     * request that needs one of them waits (the table is not in memory
     * until its space is secured, so no write can be acknowledged through
     * it before that)
     */
    QLIST_HEAD(, QEDTableMaking) tables_making;
    CoQueue making_waiters;
    /* The file holds the whole L1 table, no hole (qed_secure_space) */
    bool l1_space_ok;
    bool l1_space_busy;
    unsigned int l1_wb_inflight;        /* writes of L1 sectors in flight */

    /* Allocations in flight, to keep two writes off one cluster */
    QLIST_HEAD(, QEDAllocation) allocs;
    CoQueue alloc_waiters;
    unsigned int allocating_writes;     /* until their entries are set */
    CoQueue idle_waiters;               /* for allocating_writes == 0 */
    uint64_t l2_gen;            /* bumped whenever table entries change */

    /* Writeback of dirty table sectors: one pass at a time */
    CoMutex wb_lock;
    bool wb_background;         /* a background pass is running */
    /* L2 sectors were written and no flush has succeeded since */
    bool wb_tables_unflushed;

    /* NEED_CHECK handling */
    CoMutex header_lock;
    /*
     * NEED_CHECK is on disk and may be relied on: for the tables of an
     * image without backing file (crash ordering 4), and for a grow-ahead
     * tail, with or without backing file (ordering 8)
     */
    bool need_check_ready;
    QEMUTimer *need_check_timer;
    bool timer_running;         /* the clearing coroutine has been started */

    unsigned int error_reports; /* rate limit for corrupt-metadata messages */

    /*
     * Data entries that pointed past the end of the file when their chunk
     * was first read (corrupt) stay invalid for the whole open, also once
     * allocations pass the offset they name: else they would alias a new
     * cluster.  Entries past @open_end in a chunk read for the first time
     * can't be this open's own (it writes entries only into loaded
     * chunks), so they are the bad ones; see qed_l2_screen().
     */
    uint64_t open_end;          /* file_end when every entry was last valid */
    bool entries_checked;       /* the check has vouched for every entry */
    GHashTable *chunks_read;    /* L2 offset -> bitmap of chunks read */
    GHashTable *bad_entries;    /* entry's file offset -> its value */
} BDRVQEDState;

/* Geometry helpers */
static inline uint64_t qed_table_bytes(BDRVQEDState *s)
{
    return (uint64_t)s->header.table_size * s->header.cluster_size;
}

/* What the tables can address; saturates where that passes 2^64 - 1 */
static inline uint64_t qed_max_image_size(uint32_t cluster_size,
                                          uint32_t table_size)
{
    uint64_t nelems = (uint64_t)table_size * cluster_size / sizeof(uint64_t);
    uint64_t max;

    if (__builtin_mul_overflow(nelems, nelems, &max) ||
        __builtin_mul_overflow(max, (uint64_t)cluster_size, &max)) {
        return UINT64_MAX;
    }
    return max;
}

static inline uint64_t qed_offset_into_cluster(BDRVQEDState *s, uint64_t off)
{
    return off & (s->header.cluster_size - 1);
}

static inline uint64_t qed_start_of_cluster(BDRVQEDState *s, uint64_t off)
{
    return off & ~(uint64_t)(s->header.cluster_size - 1);
}

static inline unsigned int qed_l1_index(BDRVQEDState *s, uint64_t pos)
{
    return pos >> s->l1_shift;
}

static inline unsigned int qed_l2_index(BDRVQEDState *s, uint64_t pos)
{
    return (pos >> s->l2_shift) & s->l2_mask;
}

/*
 * Is @offset a plausible cluster offset: aligned, after the header, clear
 * of the L1 table and inside the allocated part of the file?  Tables also
 * need @bytes to fit.  (A corrupt entry into the L1 table would have guest
 * writes land on the table on disk, under its copy in memory.)
 */
static inline bool qed_check_offset(BDRVQEDState *s, uint64_t offset,
                                    uint64_t bytes)
{
    uint64_t header_end = (uint64_t)s->header.header_size *
                          s->header.cluster_size;
    uint64_t l1_start = s->header.l1_table_offset;

    return qed_offset_into_cluster(s, offset) == 0 &&
           offset >= header_end &&
           offset <= s->file_end && bytes <= s->file_end - offset &&
           (offset + bytes <= l1_start ||
            offset >= l1_start + qed_table_bytes(s));
}

bool qed_in_l2_table(BDRVQEDState *s, uint64_t offset);

/*
 * A plausible data cluster is also clear of every L2 table: a guest write
 * there would land on the table on disk, under its copy in the cache.
 */
static inline bool qed_check_data_offset(BDRVQEDState *s, uint64_t offset)
{
    return qed_check_offset(s, offset, s->header.cluster_size) &&
           !qed_in_l2_table(s, offset);
}

static inline bool qed_is_data_offset(uint64_t entry)
{
    return entry > QED_L2_ZERO;
}

/* qed.c */
void qed_report_corruption(BDRVQEDState *s, const char *fmt, ...)
    G_GNUC_PRINTF(2, 3);
int coroutine_fn qed_resize_file(BDRVQEDState *s, uint64_t size);

/* qed-table.c: byte order is converted here and nowhere else */
QEDTable *qed_alloc_table(BDRVQEDState *s);
QEDTable *qed_table_new(size_t bytes);
void qed_table_free(QEDTable *table, size_t bytes);
uint64_t *qed_table_snapshot(BDRVQEDState *s, const uint64_t *entries,
                             unsigned int n);
int coroutine_fn qed_write_table_snapshot(BDRVQEDState *s,
                                          uint64_t table_offset,
                                          unsigned int first, unsigned int n,
                                          const uint64_t *snapshot);
int coroutine_fn qed_read_table(BDRVQEDState *s, uint64_t offset,
                                QEDTable *table);
int coroutine_fn qed_write_table(BDRVQEDState *s, uint64_t offset,
                                 QEDTable *table, unsigned int index,
                                 unsigned int n);
int coroutine_fn qed_read_table_entries(BDRVQEDState *s,
                                        uint64_t table_offset,
                                        unsigned int first, unsigned int n,
                                        uint64_t *entries);
int coroutine_fn qed_read_l1_table(BDRVQEDState *s);
void qed_l2_starts_rebuild(BDRVQEDState *s);
void qed_l2_starts_add(BDRVQEDState *s, uint64_t offset);
int coroutine_fn qed_write_l1_table(BDRVQEDState *s, QEDTable *l1,
                                    unsigned int index, unsigned int n);
int coroutine_fn qed_read_tables(BDRVQEDState *s, uint64_t offset,
                                 unsigned int n, QEDTable **tables);

/* qed-l2-cache.c: pure memory */
void qed_l2_cache_init(L2TableCache *c, unsigned int max_entries,
                       size_t table_bytes);
void qed_l2_cache_destroy(L2TableCache *c);
CachedL2Table *qed_l2_cache_find(L2TableCache *c, uint64_t offset);
CachedL2Table *qed_l2_cache_insert(L2TableCache *c, uint64_t offset,
                                   QEDTable *table, bool loaded);
void qed_l2_cache_unref(L2TableCache *c, CachedL2Table *entry);
void qed_l2_cache_drop(L2TableCache *c, uint64_t offset);
void qed_l2_cache_clear(L2TableCache *c);
void qed_l2_cache_set_max(L2TableCache *c, unsigned int max_entries);
void qed_l2_cache_mark_dirty(L2TableCache *c, CachedL2Table *e,
                             unsigned int first_sector, unsigned int n);
void qed_l2_cache_clear_dirty(L2TableCache *c, CachedL2Table *e,
                              unsigned int first_sector, unsigned int n);
void qed_l2_cache_settle(L2TableCache *c, CachedL2Table *e);
unsigned int qed_l2_cache_forget_dirty(L2TableCache *c);

/* qed-cluster.c */
void qed_screen_init(BDRVQEDState *s);
void qed_screen_reset(BDRVQEDState *s);
void qed_screen_destroy(BDRVQEDState *s);
void qed_screen_new_table(BDRVQEDState *s, uint64_t l2_offset);
void qed_screen_forget(BDRVQEDState *s, uint64_t l2_offset,
                       unsigned int first, unsigned int n);
uint64_t qed_screen_skip(BDRVQEDState *s, uint64_t offset, uint64_t bytes);
int coroutine_fn qed_get_l2_table(BDRVQEDState *s, uint64_t l2_offset,
                                  CachedL2Table **entry);
int coroutine_fn qed_l2_ensure(BDRVQEDState *s, CachedL2Table *e,
                               unsigned int first, unsigned int end);
int coroutine_fn qed_find_extent(BDRVQEDState *s, uint64_t pos,
                                 uint64_t bytes, QEDExtent *ext);

/* qed-check.c */
int coroutine_fn qed_check(BDRVQEDState *s, BdrvCheckResult *result,
                           BdrvCheckMode fix);

#endif /* BLOCK_QED_H */

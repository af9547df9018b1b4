/*
 * Unit tests of our QED driver's L2 table cache (block/qed-l2-cache.c) and
 * of the dirty-sector bookkeeping of tables (qed_dirty_set and
 * qed_dirty_clear in block/qed-table.c).
 *
 * The cache is pure memory: these tests drive it as the driver does
 * (insert, load chunks, mark sectors dirty, write back, settle) without an
 * image, and check its counts, its eviction order and what it does to the
 * tables' memory.  Every table is 64 KiB (16 chunks of 4 KiB, 128
 * sectors); table i sits at file offset (i + 1) * 64 KiB.  Linked into the
 * base's tests/unit/ by scripts/link-ours.sh, built through
 * patches/0006-qed-unit-tests.sh, run by `make check`.
 *
 * This work is licensed under the terms of the GNU LGPL, version 2 or later.
 * See the COPYING.LIB file in the top-level directory.
 */

#include "qemu/osdep.h"
#include <sys/mman.h>
#include "qemu/bitmap.h"
#include "qemu/units.h"
#include "block/qed.h"

#define CHUNK               QED_L2_CHUNK_BYTES
#define TABLE_BYTES         (64 * KiB)
#define NCHUNKS             (TABLE_BYTES / CHUNK)
#define NSECTORS            (TABLE_BYTES / BDRV_SECTOR_SIZE)
#define SECTORS_PER_CHUNK   (CHUNK / BDRV_SECTOR_SIZE)
#define ENTRIES_PER_CHUNK   (CHUNK / sizeof(uint64_t))

static QEDDirtyTable *tbl(QEDCachedTable *e)
{
    return qed_l2_cache_table(e);
}

static QEDCachedTableInfo info(QEDCachedTable *e)
{
    QEDCachedTableInfo i;

    qed_l2_cache_table_info(e, &i);
    return i;
}

static QEDL2CacheStats stats(QEDL2Cache *c)
{
    QEDL2CacheStats st;

    qed_l2_cache_stats(c, &st);
    return st;
}

/* Past the limit: what only a writeback or a user's unref can free */
static uint64_t over_limit(QEDL2Cache *c)
{
    QEDL2CacheStats st = stats(c);

    return st.resident > st.max ? st.resident - st.max : 0;
}

/*
 * Sectors [first, first + n) of @e are written back, as a writeback pass
 * does it: taken, with a reference held until done()
 */
static void written(QEDL2Cache *c, QEDCachedTable *e, unsigned int first,
                    unsigned int n)
{
    qed_l2_cache_take_dirty(c, e, first, n);
}

/* The pass is over: settled, and its reference dropped */
static void done(QEDL2Cache *c, QEDCachedTable *e)
{
    qed_l2_cache_settle(c, e);
    qed_l2_cache_unref(c, e);
}

static uint64_t off(unsigned int i)
{
    return (uint64_t)(i + 1) * TABLE_BYTES;
}

/* Table @i with chunks [first, first + n) read, returned with a reference */
static QEDCachedTable *load(QEDL2Cache *c, unsigned int i,
                            unsigned long first, unsigned long n)
{
    QEDCachedTable *e = qed_l2_cache_insert(c, off(i), false);

    qed_l2_cache_loaded(c, e, first, n);
    return e;
}

/* The same, used and let go at once; returns where its table is mapped */
static QEDTable *load_unref(QEDL2Cache *c, unsigned int i,
                            unsigned long first, unsigned long n)
{
    QEDCachedTable *e = load(c, i, first, n);
    QEDTable *t = tbl(e)->table;

    qed_l2_cache_unref(c, e);
    return t;
}

/* Is table @i in the cache?  (A lookup: it becomes the most recent.) */
static bool cached(QEDL2Cache *c, unsigned int i)
{
    QEDCachedTable *e = qed_l2_cache_find(c, off(i));

    if (e) {
        qed_l2_cache_unref(c, e);
    }
    return e != NULL;
}

/*
 * Is @p mapped?  Freeing a table unmaps it.  (Checked right after the
 * free, before anything maps memory again, which could reuse the address.
 * Read from /proc: probing the address with a system call would be an
 * error under valgrind.)
 */
static bool mapped(void *p)
{
    uintptr_t a = (uintptr_t)p;
    g_autofree char *maps = NULL;
    g_auto(GStrv) lines = NULL;
    bool found = false;

    g_assert_true(g_file_get_contents("/proc/self/maps", &maps, NULL, NULL));
    lines = g_strsplit(maps, "\n", -1);
    for (char **l = lines; *l && !found; l++) {
        unsigned long start, end;

        found = sscanf(*l, "%lx-%lx", &start, &end) == 2 &&
                a >= start && a < end;
    }
    return found;
}

/* Does the host page at @p take memory? */
static bool in_core(void *p)
{
    unsigned char v;

    g_assert_cmpint(mincore(p, qemu_real_host_page_size(), &v), ==, 0);
    return v & 1;
}

/*
 * A lookup makes a table the most recent; eviction takes the least
 * recently used table first, skipping tables in use.
 */
static void test_lru_order(void)
{
    QEDL2Cache *c = qed_l2_cache_new(4 * CHUNK, TABLE_BYTES);
    QEDCachedTable *busy;
    QEDTable *t2, *t3;

    /* Room for 4 chunks (and so 4 tables); table 0 stays in use */
    busy = load(c, 0, 0, 1);
    load_unref(c, 1, 0, 1);
    t2 = load_unref(c, 2, 0, 1);
    t3 = load_unref(c, 3, 0, 1);
    g_assert_cmpuint(stats(c).resident, ==, 4 * CHUNK);

    /* Most recent first: 3 2 1 0; a lookup of 1 makes it 1 3 2 0 */
    g_assert_true(cached(c, 1));

    /* A fifth table: 0 is the oldest but in use, so 2 goes */
    load_unref(c, 4, 0, 1);
    g_assert_false(mapped(t2));
    g_assert_cmpuint(stats(c).resident, ==, 4 * CHUNK);
    /* 4 1 3 0: the next one to go is 3, not 1 */
    load_unref(c, 5, 0, 1);
    g_assert_false(mapped(t3));
    g_assert_cmpuint(stats(c).resident, ==, 4 * CHUNK);

    g_assert_false(cached(c, 2));
    g_assert_false(cached(c, 3));
    g_assert_true(cached(c, 1));
    g_assert_true(cached(c, 4));
    g_assert_true(cached(c, 5));
    g_assert_false(info(busy).dropped);
    g_assert_true(qed_l2_cache_find(c, off(0)) == busy);
    g_assert_cmpint(info(busy).ref, ==, 2);
    qed_l2_cache_unref(c, busy);
    qed_l2_cache_unref(c, busy);
    g_assert_cmpint(info(busy).ref, ==, 0);
    qed_l2_cache_free(c);
}

/*
 * A dirty table is pinned: it survives any pressure and stays findable.
 * Once written back (clear_dirty) and settled, it is a table like any
 * other and goes when it is the oldest.
 */
static void test_pin(void)
{
    QEDL2Cache *c = qed_l2_cache_new(2 * CHUNK, TABLE_BYTES);
    QEDCachedTable *e;

    e = load(c, 0, 0, 2);
    qed_l2_cache_mark_dirty(c, e, 3, 1);
    g_assert_cmpint(info(e).ref, ==, 2);
    qed_l2_cache_unref(c, e);
    g_assert_cmpint(info(e).ref, ==, 1);         /* the pin */
    g_assert_true(info(e).pinned);
    g_assert_cmpuint(stats(c).dirty_tables, ==, 1);

    /* Room for 2 chunks and 2 tables: each new table pushes one out */
    for (unsigned int i = 1; i <= 8; i++) {
        load_unref(c, i, 0, 1);
        g_assert_cmpuint(stats(c).resident, <=, 2 * CHUNK);
    }
    g_assert_false(cached(c, 7));
    g_assert_false(info(e).dropped);
    g_assert_true(qed_l2_cache_find(c, off(0)) == e);
    g_assert_cmpuint(tbl(e)->ndirty, ==, 1);
    g_assert_true(test_bit(3, tbl(e)->dirty));
    qed_l2_cache_unref(c, e);

    /* Written back, but not settled yet: still pinned */
    written(c, e, 3, 1);
    g_assert_cmpuint(stats(c).dirty_sectors, ==, 0);
    g_assert_cmpuint(stats(c).dirty_tables, ==, 1);
    g_assert_cmpint(info(e).ref, ==, 2);     /* the pin and the writer */
    g_assert_true(info(e).pinned);

    done(c, e);
    g_assert_cmpuint(stats(c).dirty_tables, ==, 0);
    g_assert_false(info(e).pinned);
    g_assert_cmpint(info(e).ref, ==, 0);

    /* 0 (looked up last) and 8 are cached; two new tables push both out */
    load_unref(c, 9, 0, 1);
    load_unref(c, 10, 0, 1);
    g_assert_false(cached(c, 0));
    g_assert_false(cached(c, 8));
    qed_l2_cache_free(c);
}

/*
 * Many tables' chunks through a small cache: once nothing is in use the
 * memory fits the limit.  What is in use or dirty cannot go, and
 * over_limit says how much that is.
 */
static void test_pressure(void)
{
    QEDL2Cache *c = qed_l2_cache_new(8 * CHUNK, TABLE_BYTES);
    QEDCachedTable *big, *d;

    for (unsigned int i = 0; i < 40; i++) {
        QEDCachedTable *e = load(c, i, i % (NCHUNKS - 2), 3);

        g_assert_cmpuint(info(e).nresident, ==, 3);
        qed_l2_cache_unref(c, e);
        g_assert_cmpuint(stats(c).resident, <=, 8 * CHUNK);
        g_assert_cmpuint(over_limit(c), ==, 0);
        /* The most recent table is the last to go */
        g_assert_true(cached(c, i));
    }

    /* A table in use with all its 16 chunks: everything else goes */
    big = load(c, 100, 0, NCHUNKS);
    g_assert_cmpuint(stats(c).resident, ==, NCHUNKS * CHUNK);
    g_assert_cmpuint(over_limit(c), ==, (NCHUNKS - 8) * CHUNK);
    g_assert_false(cached(c, 39));

    /* A new table dirty in every sector, pinned once its user is done */
    d = qed_l2_cache_insert(c, off(101), true);
    qed_l2_cache_mark_dirty(c, d, 0, NSECTORS);
    qed_l2_cache_unref(c, d);
    g_assert_cmpuint(stats(c).resident, ==, 2 * NCHUNKS * CHUNK);
    g_assert_cmpuint(over_limit(c), ==,
                     (2 * NCHUNKS - 8) * CHUNK);

    /* The big table unused: it goes; the dirty chunks stay */
    qed_l2_cache_unref(c, big);
    g_assert_false(cached(c, 100));
    g_assert_cmpuint(stats(c).resident, ==, NCHUNKS * CHUNK);
    g_assert_cmpuint(over_limit(c), ==, (NCHUNKS - 8) * CHUNK);

    /* Written back and settled: nothing holds it, it goes whole */
    written(c, d, 0, NSECTORS);
    done(c, d);
    g_assert_cmpuint(stats(c).resident, ==, 0);
    g_assert_cmpuint(over_limit(c), ==, 0);
    g_assert_false(cached(c, 101));
    qed_l2_cache_free(c);
}

/*
 * A read table is loaded chunk by chunk and counts only what was loaded,
 * each chunk once; a fresh table is known whole (all zero), and since
 * lookups may read any of its entries it counts whole.  Dirty sectors
 * count the chunks that hold them.
 */
static void test_chunks(void)
{
    QEDL2Cache *c = qed_l2_cache_new(64 * CHUNK, TABLE_BYTES);
    QEDCachedTable *e, *f;

    e = qed_l2_cache_insert(c, off(0), false);
    g_assert_false(info(e).fresh);
    g_assert_cmpuint(find_first_bit(tbl(e)->loaded, NCHUNKS), ==, NCHUNKS);
    g_assert_cmpuint(stats(c).resident, ==, 0);

    qed_l2_cache_loaded(c, e, 2, 3);
    g_assert_cmpuint(find_first_bit(tbl(e)->loaded, NCHUNKS), ==, 2);
    g_assert_cmpuint(find_next_zero_bit(tbl(e)->loaded, NCHUNKS, 2), ==, 5);
    g_assert_cmpuint(stats(c).resident, ==, 3 * CHUNK);

    /* Again: counted once */
    qed_l2_cache_loaded(c, e, 3, 1);
    g_assert_cmpuint(stats(c).resident, ==, 3 * CHUNK);
    /* Overlapping: only chunk 5 is new */
    qed_l2_cache_loaded(c, e, 4, 2);
    g_assert_cmpuint(stats(c).resident, ==, 4 * CHUNK);
    qed_l2_cache_loaded(c, e, NCHUNKS - 1, 1);
    g_assert_cmpuint(stats(c).resident, ==, 5 * CHUNK);
    g_assert_cmpuint(info(e).nresident, ==, 5);
    g_assert_true(test_bit(NCHUNKS - 1, tbl(e)->loaded));
    g_assert_false(test_bit(NCHUNKS - 2, tbl(e)->loaded));

    /* Sector 9 lies in chunk 1 of the read table; sector 10 too */
    qed_l2_cache_mark_dirty(c, e, 9, 1);
    g_assert_cmpuint(stats(c).resident, ==, 6 * CHUNK);
    g_assert_true(test_bit(1, info(e).resident));
    qed_l2_cache_mark_dirty(c, e, 10, 1);
    g_assert_cmpuint(stats(c).resident, ==, 6 * CHUNK);
    /* Sectors 7 and 8 straddle chunks 0 and 1 */
    qed_l2_cache_mark_dirty(c, e, SECTORS_PER_CHUNK - 1, 2);
    g_assert_cmpuint(stats(c).resident, ==, 7 * CHUNK);
    /* Sectors 40..56: chunks 5, 6 and 7 (5 was loaded already) */
    qed_l2_cache_mark_dirty(c, e, 5 * SECTORS_PER_CHUNK,
                            2 * SECTORS_PER_CHUNK + 1);
    g_assert_cmpuint(stats(c).resident, ==, 9 * CHUNK);
    g_assert_cmpuint(info(e).nresident, ==, 9);
    g_assert_false(test_bit(8, info(e).resident));

    f = qed_l2_cache_insert(c, off(1), true);
    g_assert_true(info(f).fresh);
    g_assert_cmpuint(find_first_zero_bit(tbl(f)->loaded, NCHUNKS), ==, NCHUNKS);
    g_assert_cmpuint(info(f).nresident, ==, NCHUNKS);
    g_assert_cmpuint(stats(c).resident, ==, (9 + NCHUNKS) * CHUNK);
    /* Dirty sectors of a fresh table add nothing */
    qed_l2_cache_mark_dirty(c, f, 0, NSECTORS);
    g_assert_cmpuint(stats(c).resident, ==, (9 + NCHUNKS) * CHUNK);

    /* Inserting a table the cache has returns that entry */
    g_assert_true(qed_l2_cache_insert(c, off(1), false) == f);
    g_assert_true(info(f).fresh);
    g_assert_cmpint(info(f).ref, ==, 3);     /* two users and the pin */
    qed_l2_cache_unref(c, f);

    qed_l2_cache_unref(c, f);
    qed_l2_cache_unref(c, e);
    g_assert_cmpuint(qed_l2_cache_forget_dirty(c), ==, 2);
    qed_l2_cache_free(c);
}

/*
 * Under pressure a table whose only user is its pin gives back its clean
 * chunks (they are on disk) and keeps its dirty ones; a table in use
 * keeps all.
 */
static void test_release_clean(void)
{
    QEDL2Cache *c;
    QEDCachedTable *p;
    uint64_t *ent;
    const unsigned int changed = (SECTORS_PER_CHUNK + 2) *
                                 QED_ENTRIES_PER_SECTOR;

    if (qemu_real_host_page_size() > CHUNK) {
        g_test_skip("host pages are larger than a chunk");
        return;
    }
    c = qed_l2_cache_new(16 * CHUNK, TABLE_BYTES);
    p = qed_l2_cache_insert(c, off(0), false);
    ent = tbl(p)->table->offsets;
    /* As if chunks 0-3 were read from disk */
    for (unsigned int i = 0; i < 4 * ENTRIES_PER_CHUNK; i++) {
        ent[i] = (i + 1) * 0x10000ULL;
    }
    qed_l2_cache_loaded(c, p, 0, 4);
    /* An entry of chunk 1 changes */
    ent[changed] = 0xabc0000ULL;
    qed_l2_cache_mark_dirty(c, p, SECTORS_PER_CHUNK + 2, 1);

    /* In use: nothing is given back */
    qed_l2_cache_set_max(c, 2 * CHUNK);
    g_assert_cmpuint(stats(c).resident, ==, 4 * CHUNK);
    g_assert_cmpuint(over_limit(c), ==, 2 * CHUNK);
    g_assert_cmpuint(find_first_zero_bit(tbl(p)->loaded, NCHUNKS), ==, 4);

    /* Only the pin left: the clean chunks 0, 2 and 3 go */
    qed_l2_cache_unref(c, p);
    g_assert_cmpint(info(p).ref, ==, 1);
    g_assert_false(info(p).dropped);
    g_assert_cmpuint(stats(c).resident, ==, CHUNK);
    g_assert_cmpuint(over_limit(c), ==, 0);
    g_assert_cmpuint(info(p).nresident, ==, 1);
    g_assert_true(test_bit(1, tbl(p)->loaded));
    g_assert_true(test_bit(1, info(p).resident));
    for (unsigned int i = 0; i < 4; i++) {
        if (i != 1) {
            g_assert_false(test_bit(i, tbl(p)->loaded));
            g_assert_false(test_bit(i, info(p).resident));
        }
    }
    /* The host has the memory back (asked before reading it again) */
    g_assert_false(in_core(&ent[0]));
    g_assert_false(in_core(&ent[2 * ENTRIES_PER_CHUNK]));
    g_assert_true(in_core(&ent[ENTRIES_PER_CHUNK]));

    /* Released chunks read as zero; the dirty chunk is intact */
    for (unsigned int i = 0; i < 4 * ENTRIES_PER_CHUNK; i++) {
        if (i / ENTRIES_PER_CHUNK != 1) {
            g_assert_cmphex(ent[i], ==, 0);
        } else if (i == changed) {
            g_assert_cmphex(ent[i], ==, 0xabc0000ULL);
        } else {
            g_assert_cmphex(ent[i], ==, (i + 1) * 0x10000ULL);
        }
    }
    g_assert_true(qed_l2_cache_find(c, off(0)) == p);
    qed_l2_cache_unref(c, p);

    written(c, p, 0, NSECTORS);
    done(c, p);
    g_assert_cmpint(info(p).ref, ==, 0);
    qed_l2_cache_free(c);
}

/*
 * Overlapping dirty ranges count each sector once; clearing a range
 * subtracts only its dirty sectors.  The cache's total follows the
 * tables' own counts.
 */
static void test_dirty_merge_clear(void)
{
    QEDL2Cache *c = qed_l2_cache_new(1 * MiB, TABLE_BYTES);
    QEDCachedTable *e = qed_l2_cache_insert(c, off(0), true);
    QEDCachedTable *f = qed_l2_cache_insert(c, off(1), true);

    qed_l2_cache_mark_dirty(c, e, 0, 10);
    g_assert_cmpuint(stats(c).dirty_sectors, ==, 10);
    qed_l2_cache_mark_dirty(c, e, 5, 10);
    g_assert_cmpuint(stats(c).dirty_sectors, ==, 15);
    qed_l2_cache_mark_dirty(c, e, 0, 15);
    g_assert_cmpuint(stats(c).dirty_sectors, ==, 15);
    qed_l2_cache_mark_dirty(c, e, 100, 4);
    g_assert_cmpuint(stats(c).dirty_sectors, ==, 19);
    g_assert_cmpuint(tbl(e)->ndirty, ==, 19);
    qed_l2_cache_mark_dirty(c, f, 0, 3);
    g_assert_cmpuint(stats(c).dirty_sectors, ==, 22);
    g_assert_cmpuint(stats(c).dirty_tables, ==, 2);

    /* 8..27: of those, 8..14 are dirty */
    written(c, e, 8, 20);
    done(c, e);
    g_assert_cmpuint(stats(c).dirty_sectors, ==, 15);
    g_assert_cmpuint(tbl(e)->ndirty, ==, 12);
    written(c, e, 8, 20);
    done(c, e);
    g_assert_cmpuint(stats(c).dirty_sectors, ==, 15);
    /* 102..127: 102 and 103 */
    written(c, e, 102, NSECTORS - 102);
    done(c, e);
    g_assert_cmpuint(stats(c).dirty_sectors, ==, 13);
    g_assert_cmpuint(tbl(e)->ndirty, ==, 10);
    g_assert_true(test_bit(7, tbl(e)->dirty));
    g_assert_false(test_bit(8, tbl(e)->dirty));
    g_assert_true(test_bit(101, tbl(e)->dirty));
    g_assert_false(test_bit(102, tbl(e)->dirty));
    g_assert_cmpuint(tbl(f)->ndirty, ==, 3);

    qed_l2_cache_unref(c, e);
    qed_l2_cache_unref(c, f);
    g_assert_cmpuint(qed_l2_cache_forget_dirty(c), ==, 2);
    g_assert_cmpuint(stats(c).dirty_sectors, ==, 0);
    qed_l2_cache_free(c);
}

/* qed_dirty_set/qed_dirty_clear return how many bits changed */
static void test_dirty_set_clear(void)
{
    QEDDirtyTable t = { .dirty = bitmap_new(256) };

    g_assert_cmpuint(qed_dirty_set(&t, 0, 64), ==, 64);
    g_assert_cmpuint(t.ndirty, ==, 64);
    g_assert_cmpuint(qed_dirty_set(&t, 32, 64), ==, 32);
    g_assert_cmpuint(t.ndirty, ==, 96);
    g_assert_cmpuint(qed_dirty_set(&t, 10, 0), ==, 0);
    g_assert_cmpuint(qed_dirty_set(&t, 10, 1), ==, 0);
    g_assert_cmpuint(t.ndirty, ==, 96);

    g_assert_cmpuint(qed_dirty_clear(&t, 90, 20), ==, 6);
    g_assert_cmpuint(t.ndirty, ==, 90);
    g_assert_true(test_bit(89, t.dirty));
    g_assert_false(test_bit(90, t.dirty));
    g_assert_cmpuint(qed_dirty_clear(&t, 200, 10), ==, 0);
    g_assert_cmpuint(qed_dirty_clear(&t, 90, 20), ==, 0);
    g_assert_cmpuint(t.ndirty, ==, 90);

    g_assert_cmpuint(qed_dirty_set(&t, 255, 1), ==, 1);
    g_assert_cmpuint(t.ndirty, ==, 91);
    g_assert_cmpuint(bitmap_count_one(t.dirty, 256), ==, 91);
    g_assert_cmpuint(qed_dirty_clear(&t, 0, 256), ==, 91);
    g_assert_cmpuint(t.ndirty, ==, 0);
    g_assert_cmpuint(find_first_bit(t.dirty, 256), ==, 256);
    g_free(t.dirty);
}

/*
 * dirty_tables lists the dirty tables in the order they first became
 * dirty, each with a reference: a table settled meanwhile stays alive
 * until the list lets go.
 */
static void test_dirty_tables(void)
{
    QEDL2Cache *c = qed_l2_cache_new(1 * MiB, TABLE_BYTES);
    QEDCachedTable *a = qed_l2_cache_insert(c, off(0), true);
    QEDCachedTable *b = qed_l2_cache_insert(c, off(1), true);
    QEDCachedTable *d = qed_l2_cache_insert(c, off(2), true);
    QEDCachedTable *clean = qed_l2_cache_insert(c, off(3), true);
    GPtrArray *arr;

    qed_l2_cache_mark_dirty(c, b, 0, 1);
    qed_l2_cache_mark_dirty(c, a, 5, 1);
    qed_l2_cache_mark_dirty(c, d, 9, 2);
    qed_l2_cache_mark_dirty(c, b, 3, 1);    /* b stays first */
    qed_l2_cache_unref(c, a);
    qed_l2_cache_unref(c, b);
    qed_l2_cache_unref(c, d);
    qed_l2_cache_unref(c, clean);

    arr = qed_l2_cache_dirty_tables(c);
    g_assert_cmpuint(arr->len, ==, 3);
    g_assert_true(g_ptr_array_index(arr, 0) == b);
    g_assert_true(g_ptr_array_index(arr, 1) == a);
    g_assert_true(g_ptr_array_index(arr, 2) == d);
    g_assert_cmpint(info(a).ref, ==, 2);
    g_assert_cmpint(info(b).ref, ==, 2);
    g_assert_cmpint(info(d).ref, ==, 2);
    g_assert_cmpint(info(clean).ref, ==, 0);

    /* a written back and settled: unpinned, alive through the list */
    written(c, a, 5, 1);
    done(c, a);
    g_assert_cmpint(info(a).ref, ==, 1);
    g_assert_cmpuint(stats(c).dirty_tables, ==, 2);
    for (unsigned int i = 0; i < arr->len; i++) {
        qed_l2_cache_unref(c, g_ptr_array_index(arr, i));
    }
    g_ptr_array_free(arr, true);
    g_assert_cmpint(info(a).ref, ==, 0);
    g_assert_cmpint(info(b).ref, ==, 1);
    g_assert_cmpint(info(d).ref, ==, 1);

    arr = qed_l2_cache_dirty_tables(c);
    g_assert_cmpuint(arr->len, ==, 2);
    g_assert_true(g_ptr_array_index(arr, 0) == b);
    g_assert_true(g_ptr_array_index(arr, 1) == d);
    for (unsigned int i = 0; i < arr->len; i++) {
        qed_l2_cache_unref(c, g_ptr_array_index(arr, i));
    }
    g_ptr_array_free(arr, true);

    g_assert_cmpuint(qed_l2_cache_forget_dirty(c), ==, 2);
    arr = qed_l2_cache_dirty_tables(c);
    g_assert_cmpuint(arr->len, ==, 0);
    g_ptr_array_free(arr, true);
    qed_l2_cache_free(c);
}

/*
 * forget_dirty unpins every table and counts those that still had
 * changes; the tables stay cached, clean.
 */
static void test_forget_dirty(void)
{
    QEDL2Cache *c = qed_l2_cache_new(1 * MiB, TABLE_BYTES);
    QEDCachedTable *e[3];

    for (unsigned int i = 0; i < 3; i++) {
        e[i] = load(c, i, 0, 1);
    }
    qed_l2_cache_mark_dirty(c, e[0], 0, 4);
    qed_l2_cache_mark_dirty(c, e[1], 8, 1);
    qed_l2_cache_mark_dirty(c, e[2], 16, 1);
    /* e[2] written back but not settled: pinned, with nothing to lose */
    written(c, e[2], 16, 1);
    for (unsigned int i = 0; i < 3; i++) {
        qed_l2_cache_unref(c, e[i]);
    }
    g_assert_cmpuint(stats(c).dirty_tables, ==, 3);
    g_assert_cmpuint(stats(c).dirty_sectors, ==, 5);

    g_assert_cmpuint(qed_l2_cache_forget_dirty(c), ==, 2);
    g_assert_cmpuint(stats(c).dirty_tables, ==, 0);
    g_assert_cmpuint(stats(c).dirty_sectors, ==, 0);
    /* The writer of e[2] lets go */
    g_assert_cmpint(info(e[2]).ref, ==, 1);
    qed_l2_cache_unref(c, e[2]);
    for (unsigned int i = 0; i < 3; i++) {
        g_assert_cmpint(info(e[i]).ref, ==, 0);
        g_assert_false(info(e[i]).pinned);
        g_assert_cmpuint(tbl(e[i])->ndirty, ==, 0);
        g_assert_cmpuint(find_first_bit(tbl(e[i])->dirty, NSECTORS), ==,
                         NSECTORS);
        g_assert_true(cached(c, i));
    }
    g_assert_cmpuint(qed_l2_cache_forget_dirty(c), ==, 0);
    qed_l2_cache_free(c);
}

/*
 * drop forgets a table, dirty or not: its pin, its dirty sectors and its
 * memory go; a user still holding it keeps it until the last unref.
 */
static void test_drop(void)
{
    QEDL2Cache *c = qed_l2_cache_new(1 * MiB, TABLE_BYTES);
    QEDCachedTable *a, *b, *n;
    QEDTable *ta, *tb;

    a = load(c, 0, 0, 2);
    qed_l2_cache_mark_dirty(c, a, 0, SECTORS_PER_CHUNK);
    qed_l2_cache_mark_dirty(c, a, 3 * SECTORS_PER_CHUNK, 1);
    g_assert_cmpuint(stats(c).resident, ==, 3 * CHUNK);
    qed_l2_cache_unref(c, a);
    ta = tbl(a)->table;

    qed_l2_cache_drop(c, off(0));
    g_assert_false(mapped(ta));
    g_assert_cmpuint(stats(c).dirty_tables, ==, 0);
    g_assert_cmpuint(stats(c).dirty_sectors, ==, 0);
    g_assert_cmpuint(stats(c).resident, ==, 0);
    g_assert_false(cached(c, 0));
    /* Dropping what is not cached changes nothing */
    qed_l2_cache_drop(c, off(0));
    g_assert_cmpuint(stats(c).resident, ==, 0);

    /* Dirty and in use */
    b = load(c, 1, 0, 1);
    tbl(b)->table->offsets[0] = 42;
    qed_l2_cache_mark_dirty(c, b, 0, 1);
    g_assert_cmpint(info(b).ref, ==, 2);
    qed_l2_cache_drop(c, off(1));
    g_assert_true(info(b).dropped);
    g_assert_false(info(b).pinned);
    g_assert_cmpint(info(b).ref, ==, 1);
    g_assert_cmpuint(stats(c).dirty_tables, ==, 0);
    g_assert_cmpuint(stats(c).dirty_sectors, ==, 0);
    /* Its memory is still there, and counts, until its user lets go */
    g_assert_cmpuint(stats(c).resident, ==, CHUNK);
    g_assert_null(qed_l2_cache_find(c, off(1)));
    /* Its user still reads it */
    g_assert_cmphex(tbl(b)->table->offsets[0], ==, 42);

    /* The offset may be cached anew meanwhile: another entry */
    n = qed_l2_cache_insert(c, off(1), false);
    g_assert_true(n != b);
    g_assert_cmpuint(find_first_bit(tbl(n)->loaded, NCHUNKS), ==, NCHUNKS);
    qed_l2_cache_unref(c, n);

    tb = tbl(b)->table;
    g_assert_true(mapped(tb));
    qed_l2_cache_unref(c, b);
    g_assert_false(mapped(tb));
    g_assert_cmpuint(stats(c).resident, ==, 0);
    qed_l2_cache_free(c);
}

/* set_max takes effect at once: the oldest unused tables go */
static void test_set_max(void)
{
    QEDL2Cache *c = qed_l2_cache_new(16 * CHUNK, TABLE_BYTES);
    QEDTable *t[8];

    for (unsigned int i = 0; i < 8; i++) {
        t[i] = load_unref(c, i, 2 * i % NCHUNKS, 2);
    }
    g_assert_cmpuint(stats(c).resident, ==, 16 * CHUNK);
    g_assert_cmpuint(stats(c).max, ==, 16 * CHUNK);

    qed_l2_cache_set_max(c, 4 * CHUNK);
    g_assert_cmpuint(stats(c).max, ==, 4 * CHUNK);
    g_assert_cmpuint(stats(c).resident, ==, 4 * CHUNK);
    for (unsigned int i = 0; i < 8; i++) {
        g_assert_true(mapped(t[i]) == (i >= 6));
    }
    g_assert_true(cached(c, 6));
    g_assert_true(cached(c, 7));

    /* Never below one chunk */
    qed_l2_cache_set_max(c, 0);
    g_assert_cmpuint(stats(c).max, ==, CHUNK);
    g_assert_cmpuint(stats(c).resident, ==, 0);
    g_assert_false(mapped(t[6]));
    g_assert_false(mapped(t[7]));

    qed_l2_cache_set_max(c, 1 * GiB);
    g_assert_cmpuint(stats(c).max, ==, 1 * GiB);
    qed_l2_cache_free(c);
}

/* free with nothing in use releases every table, whatever its state */
static void test_free(void)
{
    QEDL2Cache *c = qed_l2_cache_new(64 * CHUNK, TABLE_BYTES);
    QEDCachedTable *e;
    QEDTable *t[5];

    t[0] = load_unref(c, 0, 0, 2);
    t[1] = load_unref(c, 1, 5, 2);
    /* fresh, never touched */
    e = qed_l2_cache_insert(c, off(2), true);
    t[2] = tbl(e)->table;
    qed_l2_cache_unref(c, e);
    /* dirty, then written back and settled */
    e = qed_l2_cache_insert(c, off(3), true);
    t[3] = tbl(e)->table;
    qed_l2_cache_mark_dirty(c, e, 0, 1);
    written(c, e, 0, 1);
    done(c, e);
    qed_l2_cache_unref(c, e);
    /* dirty, forgotten */
    e = load(c, 4, 0, 1);
    t[4] = tbl(e)->table;
    qed_l2_cache_mark_dirty(c, e, 0, 1);
    qed_l2_cache_unref(c, e);
    g_assert_cmpuint(qed_l2_cache_forget_dirty(c), ==, 1);
    /* 2 + 2 read, two fresh tables whole, 1 read */
    g_assert_cmpuint(stats(c).resident, ==, (5 + 2 * NCHUNKS) * CHUNK);

    for (unsigned int i = 0; i < 5; i++) {
        g_assert_true(mapped(t[i]));
    }
    qed_l2_cache_free(c);
    for (unsigned int i = 0; i < 5; i++) {
        g_assert_false(mapped(t[i]));
    }
    qed_l2_cache_free(NULL);
}

/* Bytes of the table mapped at @t that are in core (touched pages) */
static uint64_t core_bytes(QEDTable *t)
{
    size_t ps = qemu_real_host_page_size();
    unsigned char v[TABLE_BYTES / 4096 + 1];
    uint64_t n = 0;

    if (mincore(t, TABLE_BYTES, v) < 0) {
        g_assert_cmpint(errno, ==, ENOMEM);     /* unmapped: freed */
        return 0;
    }
    for (size_t i = 0; i < TABLE_BYTES / ps; i++) {
        n += (v[i] & 1) * ps;
    }
    return n;
}

/*
 * What lookups do: read every entry of the loaded chunks of @e (the
 * driver reads only loaded chunks).  Reading an untouched page may take
 * memory (it does on kernels that do not map the shared zero page there;
 * where they do, mincore() still counts the page).
 */
static uint64_t read_loaded(QEDCachedTable *e)
{
    /* volatile: touching the pages is the point; no read may be dropped */
    volatile uint64_t *ent = tbl(e)->table->offsets;
    uint64_t sum = 0;

    for (unsigned long c = find_first_bit(tbl(e)->loaded, NCHUNKS); c < NCHUNKS;
         c = find_next_bit(tbl(e)->loaded, NCHUNKS, c + 1)) {
        for (unsigned int i = 0; i < ENTRIES_PER_CHUNK; i++) {
            sum += ent[c * ENTRIES_PER_CHUNK + i];
        }
    }
    return sum;
}

/*
 * The accounting matches the memory: a fresh table whose entries are all
 * read (lookups over a new table) counts every page it touched.  The
 * driver once counted only its dirty chunks, and 512 fresh tables took
 * 100 MiB at l2-cache-size=8M.
 */
static void test_resident_fresh(void)
{
    QEDL2Cache *c;
    QEDCachedTable *f;

    if (qemu_real_host_page_size() > CHUNK) {
        g_test_skip("host pages are larger than a chunk");
        return;
    }
    c = qed_l2_cache_new(64 * CHUNK, TABLE_BYTES);
    f = qed_l2_cache_insert(c, off(0), true);
    qed_l2_cache_mark_dirty(c, f, 0, 1);
    read_loaded(f);
    g_assert_cmpuint(core_bytes(tbl(f)->table), ==, TABLE_BYTES);
    g_assert_cmpuint(core_bytes(tbl(f)->table), <=, stats(c).resident);
    qed_l2_cache_unref(c, f);
    qed_l2_cache_forget_dirty(c);
    qed_l2_cache_free(c);
}

/* Every table mapping the model has seen, by address, and the total */
static uint64_t core_total(GHashTable *seen)
{
    GHashTableIter it;
    gpointer key;
    uint64_t n = 0;

    g_hash_table_iter_init(&it, seen);
    while (g_hash_table_iter_next(&it, &key, NULL)) {
        uint64_t b = core_bytes(key);

        if (b == 0 && !mapped(key)) {
            g_hash_table_iter_remove(&it);
        }
        n += b;
    }
    return n;
}

/*
 * The cache driven as the driver drives it, at random (GTest prints the
 * seed; --seed repeats a run), with the memory checked against the
 * accounting after every step: the pages of every table mapping in core
 * (mincore) never exceed qed_l2_cache_resident(), and once nothing is in
 * use or dirty the resident memory fits the limit.  Steps: lookups (a
 * table found or entered empty, chunks "read from disk" then recorded,
 * loaded entries read), new tables (fresh, a sector dirty, an entry
 * set), entry changes in loaded chunks, writeback passes (dirty sectors
 * and loaded gaps read, cleared, settled), references held across steps
 * and let go, idle releases, limit changes.
 */
static void test_resident_model(void)
{
    const unsigned int ntables = 48, steps = 6000;
    const uint64_t limits[] = { 4 * CHUNK, 16 * CHUNK, 40 * CHUNK };
    g_autoptr(GHashTable) seen = g_hash_table_new(NULL, NULL);
    g_autoptr(GPtrArray) held = g_ptr_array_new();
    g_autoptr(GRand) r = g_rand_new_with_seed(g_test_rand_int());
    QEDL2Cache *c;
    bool made[48] = { false };
    uint64_t max = limits[1];

    if (qemu_real_host_page_size() > CHUNK) {
        g_test_skip("host pages are larger than a chunk");
        return;
    }
    c = qed_l2_cache_new(max, TABLE_BYTES);
    for (unsigned int step = 0; step < steps; step++) {
        unsigned int op = g_rand_int_range(r, 0, 100);
        unsigned int i = g_rand_int_range(r, 0, ntables);
        QEDCachedTable *e;

        if (op < 40) {
            /* A lookup */
            unsigned long first = g_rand_int_range(r, 0, NCHUNKS);
            unsigned long n = g_rand_int_range(r, 1, NCHUNKS - first + 1);
            unsigned long ch;

            e = qed_l2_cache_find(c, off(i));
            if (!e) {
                e = qed_l2_cache_insert(c, off(i), false);
            }
            g_hash_table_add(seen, tbl(e)->table);
            for (ch = first; ch < first + n; ch++) {
                if (!test_bit(ch, tbl(e)->loaded)) {
                    /* As a read from disk would */
                    for (unsigned int k = 0; k < ENTRIES_PER_CHUNK; k++) {
                        tbl(e)->table->offsets[ch * ENTRIES_PER_CHUNK + k] =
                            (i + 1) * 0x100000ULL + ch;
                    }
                    qed_l2_cache_loaded(c, e, ch, 1);
                }
            }
            read_loaded(e);
            if (g_rand_boolean(r)) {
                g_ptr_array_add(held, e);
            } else {
                qed_l2_cache_unref(c, e);
            }
        } else if (op < 50 && !made[i] && !cached(c, i)) {
            /* A new table (one that never was read) */
            unsigned int k = g_rand_int_range(r, 0, TABLE_BYTES / 8);

            made[i] = true;
            e = qed_l2_cache_insert(c, off(i), true);
            g_hash_table_add(seen, tbl(e)->table);
            qed_l2_cache_mark_dirty(c, e, 0, 1);
            tbl(e)->table->offsets[k] = 0x10000ULL * (k + 1);
            qed_l2_cache_mark_dirty(c, e, k / QED_ENTRIES_PER_SECTOR, 1);
            qed_l2_cache_unref(c, e);
        } else if (op < 70 && held->len > 0) {
            /* An entry of a loaded chunk of a table in use changes */
            unsigned int h = g_rand_int_range(r, 0, held->len);
            unsigned long ch;

            e = g_ptr_array_index(held, h);
            ch = find_first_bit(tbl(e)->loaded, NCHUNKS);
            if (ch < NCHUNKS && !info(e).dropped) {
                unsigned int k = ch * ENTRIES_PER_CHUNK +
                                 g_rand_int_range(r, 0, ENTRIES_PER_CHUNK);

                tbl(e)->table->offsets[k]++;
                qed_l2_cache_mark_dirty(c, e, k / QED_ENTRIES_PER_SECTOR, 1);
            }
        } else if (op < 80) {
            /* A writeback pass: it reads what it writes, then settles */
            GPtrArray *arr = qed_l2_cache_dirty_tables(c);

            for (unsigned int j = 0; j < arr->len; j++) {
                unsigned long *dirty;

                e = g_ptr_array_index(arr, j);
                dirty = tbl(e)->dirty;
                for (unsigned long sec = find_first_bit(dirty, NSECTORS);
                     sec < NSECTORS;
                     sec = find_next_bit(dirty, NSECTORS, sec + 1)) {
                    /* volatile: the read must touch the page */
                    volatile uint64_t *p =
                        &tbl(e)->table->offsets[sec * QED_ENTRIES_PER_SECTOR];

                    (void)*p;
                }
                read_loaded(e);     /* runs joined across loaded gaps */
                written(c, e, 0, NSECTORS);
            }
            for (unsigned int j = 0; j < arr->len; j++) {
                done(c, g_ptr_array_index(arr, j));
            }
            for (unsigned int j = 0; j < arr->len; j++) {
                qed_l2_cache_unref(c, g_ptr_array_index(arr, j));
            }
            g_ptr_array_free(arr, true);
        } else if (op < 92 && held->len > 0) {
            unsigned int h = g_rand_int_range(r, 0, held->len);

            qed_l2_cache_unref(c, g_ptr_array_index(held, h));
            g_ptr_array_remove_index_fast(held, h);
        } else if (op < 95) {
            qed_l2_cache_clean_unused(c);
        } else if (op < 97) {
            max = limits[g_rand_int_range(r, 0, G_N_ELEMENTS(limits))];
            qed_l2_cache_set_max(c, max);
        } else if (op < 98) {
            /* The check repaired a table (dropped, even in use) */
            qed_l2_cache_drop(c, off(i));
        }

        g_assert_cmpuint(core_total(seen), <=, stats(c).resident);
        if (held->len == 0 && stats(c).dirty_tables == 0) {
            g_assert_cmpuint(stats(c).resident, <=, max);
        }
    }
    for (unsigned int h = 0; h < held->len; h++) {
        qed_l2_cache_unref(c, g_ptr_array_index(held, h));
    }
    qed_l2_cache_forget_dirty(c);
    g_assert_cmpuint(stats(c).resident, <=, max);
    g_assert_cmpuint(core_total(seen), <=, stats(c).resident);
    qed_l2_cache_free(c);
    g_assert_cmpuint(core_total(seen), ==, 0);
}

/*
 * The idle release gives back the memory of the tables nobody looked up
 * since the last one: whole tables when unused, the clean chunks of a
 * table held only by its pin; a table in use, or used since, stays.
 */
static void test_clean_unused(void)
{
    QEDL2Cache *c = qed_l2_cache_new(1 * MiB, TABLE_BYTES);
    QEDCachedTable *busy, *pinned;
    QEDTable *t0, *t1, *t2;

    t0 = load_unref(c, 0, 0, 2);
    t1 = load_unref(c, 1, 0, 2);
    busy = load(c, 2, 0, 2);
    t2 = tbl(busy)->table;
    pinned = load(c, 3, 0, 4);
    qed_l2_cache_mark_dirty(c, pinned, SECTORS_PER_CHUNK, 1);
    qed_l2_cache_unref(c, pinned);
    g_assert_cmpuint(stats(c).resident, ==, 10 * CHUNK);

    /* Everything was used since the start: nothing goes */
    g_assert_cmpuint(qed_l2_cache_clean_unused(c), ==, 0);
    g_assert_cmpuint(stats(c).resident, ==, 10 * CHUNK);

    /* Table 1 is looked up again; the others are not */
    g_assert_true(cached(c, 1));
    g_assert_cmpuint(qed_l2_cache_clean_unused(c),
                     ==, (2 + 3) * CHUNK);
    g_assert_false(mapped(t0));
    g_assert_true(mapped(t1));
    g_assert_true(mapped(t2));
    g_assert_false(info(busy).dropped);
    g_assert_cmpuint(info(pinned).nresident, ==, 1);
    g_assert_true(test_bit(1, info(pinned).resident));
    g_assert_cmpuint(stats(c).resident, ==, (2 + 2 + 1) * CHUNK);

    /* Next time table 1 goes too */
    g_assert_cmpuint(qed_l2_cache_clean_unused(c), ==, 2 * CHUNK);
    g_assert_false(mapped(t1));
    qed_l2_cache_unref(c, busy);
    g_assert_cmpuint(qed_l2_cache_forget_dirty(c), ==, 1);
    qed_l2_cache_free(c);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/qed-l2-cache/lru/order", test_lru_order);
    g_test_add_func("/qed-l2-cache/pin", test_pin);
    g_test_add_func("/qed-l2-cache/pressure", test_pressure);
    g_test_add_func("/qed-l2-cache/chunks/loaded", test_chunks);
    g_test_add_func("/qed-l2-cache/chunks/release-clean", test_release_clean);
    g_test_add_func("/qed-l2-cache/dirty/merge-clear", test_dirty_merge_clear);
    g_test_add_func("/qed-l2-cache/dirty/tables", test_dirty_tables);
    g_test_add_func("/qed-l2-cache/dirty/forget", test_forget_dirty);
    g_test_add_func("/qed-l2-cache/drop", test_drop);
    g_test_add_func("/qed-l2-cache/set-max", test_set_max);
    g_test_add_func("/qed-l2-cache/free", test_free);
    g_test_add_func("/qed-l2-cache/resident/fresh", test_resident_fresh);
    g_test_add_func("/qed-l2-cache/resident/model", test_resident_model);
    g_test_add_func("/qed-l2-cache/clean-unused", test_clean_unused);
    g_test_add_func("/qed-writeback/dirty-set-clear", test_dirty_set_clear);
    return g_test_run();
}

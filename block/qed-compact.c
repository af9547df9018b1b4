/*
 * QED: reclaiming leaked clusters inside the file
 *
 * QED has no free-space map: every cluster of the file that no entry
 * references is a leak, and every check reports it.  Trailing leaks are
 * cut off; inner ones can only go if clusters in use move into them.  This
 * file does that for the check's leak repair (`qemu-img check -r leaks`,
 * the check on open, and a close after failed writes), offline: nothing
 * else uses the image meanwhile.
 *
 * The last cluster in use moves into the lowest leak, again and again,
 * until no leak is left below the end; then the caller cuts the file.  A
 * data cluster fits any leak; an L2 table (table_size clusters) needs a
 * run of leaks as long as itself.  When none is, what follows the highest
 * leak slides down by one cluster (qed_compact_slide).  Each step lowers
 * the end of what is in use, so this ends.
 *
 * Crash safety, per batch of moves (no NEED_CHECK needed, so images with
 * a backing file stay never-dirty):
 *   1. copy each cluster to its new place, which nothing references (a
 *      leak, or past the end of the file);
 *   2. flush: the copies (and a longer file) are durable;
 *   3. write the entries that name the new places (one sector each: the
 *      old or the new value survives a crash);
 *   4. flush: the new entries are durable before any old place is reused
 *      as the new place of a later move.
 * A crash before 4 leaves each entry naming its old cluster, intact, or
 * its copy; the other is a leak, as before.  The caller cuts the file only
 * after the last flush, so no entry ever names space past the end.
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

/* Data clusters moved per batch (two flushes each) and bytes copied */
#define QED_COMPACT_BATCH 256
#define QED_COMPACT_COPY_BYTES (16 * MiB)

/* Which entry references a data cluster: L1 index, L2 index */
typedef struct QEDOwner {
    uint32_t l1i;
    uint32_t l2i;
} QEDOwner;

/* One move of a data cluster, by cluster index */
typedef struct QEDMove {
    uint64_t from;
    uint64_t to;
    QEDOwner owner;
} QEDMove;

typedef struct QEDCompact {
    BDRVQEDState *s;
    unsigned long *used;        /* the check's bitmap, updated as we move */
    uint64_t nbits;             /* its size, room past the end included */
    uint64_t cs;                /* cluster size */
    uint64_t table_clusters;
    uint64_t meta_end;          /* clusters of header and L1 lie below */

    /* Owners of the data clusters at or past @owners_lo (cluster index) */
    GHashTable *owners;         /* uint64_t cluster -> QEDOwner */
    uint64_t owners_lo;
    bool owners_valid;

    QEDTable *table_buf;
    void *copy_buf;
    uint64_t moved;             /* clusters moved */
    bool punched_free;          /* qed_compact_punch_free() ran */
} QEDCompact;

static uint64_t qed_compact_used_end(QEDCompact *c)
{
    uint64_t last = find_last_bit(c->used, c->nbits);

    return last < c->nbits ? last + 1 : 0;
}

/* The L1 index of the table that holds cluster @cl, or -1 */
static int64_t qed_compact_table_at(QEDCompact *c, uint64_t cl)
{
    BDRVQEDState *s = c->s;

    for (uint32_t i = 0; i < s->table_nelems; i++) {
        uint64_t t = s->l1.table->offsets[i] / c->cs;

        if (s->l1.table->offsets[i] && cl >= t && cl < t + c->table_clusters) {
            return i;
        }
    }
    return -1;
}

/* Header, L1 table or an L2 table: not a data cluster */
static bool qed_compact_is_meta(QEDCompact *c, uint64_t cl)
{
    uint64_t l1 = c->s->header.l1_table_offset / c->cs;

    return cl < c->s->header.header_size ||
           (cl >= l1 && cl < l1 + c->table_clusters) ||
           qed_in_l2_table(c->s, cl * c->cs);
}

/*
 * Read every L2 table and note who references each data cluster at or
 * past @lo.  Moves go from the end of the file down, so only the top of
 * the file is needed; a lookup below @lo reads again from lower down.
 */
static int coroutine_fn GRAPH_RDLOCK
qed_compact_scan(QEDCompact *c, uint64_t lo)
{
    BDRVQEDState *s = c->s;

    g_hash_table_remove_all(c->owners);
    for (uint32_t i = 0; i < s->table_nelems; i++) {
        uint64_t t = s->l1.table->offsets[i];
        int ret;

        if (!t) {
            continue;
        }
        ret = qed_read_table(s, t, c->table_buf);
        if (ret < 0) {
            return ret;
        }
        for (uint32_t j = 0; j < s->table_nelems; j++) {
            uint64_t e = c->table_buf->offsets[j];
            uint64_t *key;
            QEDOwner *o;

            if (!qed_is_data_offset(e) || e / c->cs < lo) {
                continue;
            }
            key = g_new(uint64_t, 1);
            *key = e / c->cs;
            o = g_new(QEDOwner, 1);
            *o = (QEDOwner) { .l1i = i, .l2i = j };
            g_hash_table_replace(c->owners, key, o);
        }
    }
    c->owners_lo = lo;
    c->owners_valid = true;
    return 0;
}

static int coroutine_fn GRAPH_RDLOCK
qed_compact_owner(QEDCompact *c, uint64_t cl, QEDOwner *owner)
{
    QEDOwner *o;
    int ret;

    if (!c->owners_valid || cl < c->owners_lo) {
        uint64_t end = qed_compact_used_end(c);
        uint64_t span = c->owners_valid ? 2 * (end - c->owners_lo) :
                        4 * c->table_clusters + QED_COMPACT_BATCH;
        uint64_t lo = MIN(cl, end > span ? end - span : 0);

        ret = qed_compact_scan(c, lo);
        if (ret < 0) {
            return ret;
        }
    }
    o = g_hash_table_lookup(c->owners, &cl);
    if (!o) {
        /* The check marked it used; something else than data owns it */
        return -EIO;
    }
    *owner = *o;
    return 0;
}

static void qed_compact_owner_moved(QEDCompact *c, uint64_t from,
                                    uint64_t to, QEDOwner owner)
{
    uint64_t *key = g_new(uint64_t, 1);
    QEDOwner *o = g_new(QEDOwner, 1);

    g_hash_table_remove(c->owners, &from);
    if (to < c->owners_lo) {
        g_free(key);
        g_free(o);
        return;
    }
    *key = to;
    *o = owner;
    g_hash_table_replace(c->owners, key, o);
}

/*
 * Copy @n clusters from cluster @from to cluster @to.  Parts that the
 * file holds no data for (punched by a discard, never written) are
 * zeroed at the new place with unmap allowed, so that they stay holes.
 */
static int coroutine_fn GRAPH_RDLOCK
qed_compact_copy(QEDCompact *c, uint64_t from, uint64_t to, uint64_t n)
{
    BdrvChild *file = c->s->bs->file;
    uint64_t pos = from * c->cs, end = (from + n) * c->cs;
    uint64_t delta = (to - from) * c->cs;   /* wraps: fine for unsigned */

    while (pos < end) {
        uint64_t len = MIN(end - pos, QED_COMPACT_COPY_BYTES);
        int64_t pnum;
        int ret = QED_UNLOCKED(c->s, bdrv_co_block_status(file->bs, pos, len,
                                                          &pnum, NULL, NULL));

        if (ret < 0) {
            return ret;
        }
        if (pnum == 0) {
            /* Past the end of the file: reads as zeros */
            ret = BDRV_BLOCK_ZERO;
            pnum = MIN(end - pos, QED_COMPACT_COPY_BYTES);
        }
        if (ret & BDRV_BLOCK_DATA) {
            ret = QED_UNLOCKED(c->s, bdrv_co_pread(file, pos, pnum,
                                                   c->copy_buf, 0));
            if (ret == 0) {
                ret = QED_UNLOCKED(c->s, bdrv_co_pwrite(file, pos + delta,
                                                        pnum, c->copy_buf,
                                                        0));
            }
        } else {
            ret = QED_UNLOCKED(c->s, bdrv_co_pwrite_zeroes(file, pos + delta,
                                                           pnum,
                                                           BDRV_REQ_MAY_UNMAP));
        }
        if (ret < 0) {
            return ret;
        }
        pos += pnum;
    }
    return 0;
}

/* Give the space of clusters nothing references back to the host */
static void coroutine_fn GRAPH_RDLOCK
qed_compact_punch(QEDCompact *c, uint64_t cl, uint64_t n)
{
    /* Errors only keep the space */
    QED_UNLOCKED_VOID(c->s, bdrv_co_pdiscard(c->s->bs->file, cl * c->cs,
                                             n * c->cs));
}

/*
 * On a disk with no room even for the first copy: give back the blocks
 * that free clusters below the end still hold (failed writes leave some),
 * all of them, so that the copies find room.  Nothing references them.
 */
static void coroutine_fn GRAPH_RDLOCK
qed_compact_punch_free(QEDCompact *c)
{
    uint64_t end = qed_compact_used_end(c);
    uint64_t i = find_first_zero_bit(c->used, end);

    c->punched_free = true;
    while (i < end) {
        uint64_t run_end = find_next_bit(c->used, end, i);

        qed_compact_punch(c, i, run_end - i);
        i = find_next_zero_bit(c->used, end, run_end);
    }
}

/*
 * Move data clusters as @moves says: copies, flush, entries, flush (see
 * the top of the file), then punch the old places, so that on a full
 * disk the next batch finds the space this one freed.  The entries of one
 * table are written in one go.  A copy that fails for lack of space ends
 * the batch there (*@n becomes the moves done, at least one, else the
 * error is returned).
 */
static int coroutine_fn GRAPH_RDLOCK
qed_compact_move_data(QEDCompact *c, QEDMove *moves, unsigned int *pn)
{
    BDRVQEDState *s = c->s;
    unsigned int n = *pn;
    bool *done = g_new0(bool, n);
    int ret = 0;

    for (unsigned int i = 0; i < n && ret == 0; i++) {
        trace_qed_compact_move(s, moves[i].from * c->cs, moves[i].to * c->cs,
                               1, false);
        ret = qed_compact_copy(c, moves[i].from, moves[i].to, 1);
        if (ret == -ENOSPC && i > 0) {
            /* Move what was copied; its old places free space */
            n = *pn = i;
            ret = 0;
        }
    }
    if (ret == 0) {
        ret = QED_UNLOCKED(s, bdrv_co_flush(s->bs->file->bs));
    }

    /* The entries, table by table */
    for (unsigned int i = 0; i < n && ret == 0; i++) {
        uint32_t l1i = moves[i].owner.l1i;
        uint64_t table = s->l1.table->offsets[l1i];
        unsigned int lo = UINT_MAX, hi = 0;

        if (done[i]) {
            continue;
        }
        ret = qed_read_table(s, table, c->table_buf);
        for (unsigned int j = i; j < n && ret == 0; j++) {
            if (moves[j].owner.l1i == l1i) {
                uint32_t l2i = moves[j].owner.l2i;

                c->table_buf->offsets[l2i] = moves[j].to * c->cs;
                lo = MIN(lo, l2i);
                hi = MAX(hi, l2i);
                done[j] = true;
            }
        }
        if (ret == 0) {
            ret = qed_write_table(s, table, c->table_buf, lo, hi - lo + 1);
        }
    }
    if (ret == 0) {
        ret = QED_UNLOCKED(s, bdrv_co_flush(s->bs->file->bs));
    }
    g_free(done);
    if (ret < 0) {
        return ret;
    }

    for (unsigned int i = 0; i < n; i++) {
        clear_bit(moves[i].from, c->used);
        set_bit(moves[i].to, c->used);
        qed_compact_owner_moved(c, moves[i].from, moves[i].to,
                                moves[i].owner);
        qed_compact_punch(c, moves[i].from, 1);
    }
    c->moved += n;
    return 0;
}

/* Move the L2 table of L1 entry @l1i to cluster @to */
static int coroutine_fn GRAPH_RDLOCK
qed_compact_move_table(QEDCompact *c, uint32_t l1i, uint64_t to)
{
    BDRVQEDState *s = c->s;
    uint64_t old = s->l1.table->offsets[l1i];
    uint64_t from = old / c->cs;
    int ret;

    trace_qed_compact_move(s, old, to * c->cs, c->table_clusters, true);
    ret = qed_compact_copy(c, from, to, c->table_clusters);
    if (ret == 0) {
        ret = QED_UNLOCKED(s, bdrv_co_flush(s->bs->file->bs));
    }
    if (ret < 0) {
        return ret;
    }
    s->l1.table->offsets[l1i] = to * c->cs;
    ret = qed_write_l1_table(s, s->l1.table, l1i, 1);
    if (ret == 0) {
        ret = QED_UNLOCKED(s, bdrv_co_flush(s->bs->file->bs));
    }
    if (ret < 0) {
        /* Memory says what the disk may say; the caller stops here */
        return ret;
    }
    qed_l2_starts_rebuild(s);
    qed_l2_cache_drop(s->l2_cache, old);
    bitmap_clear(c->used, from, c->table_clusters);
    bitmap_set(c->used, to, c->table_clusters);
    qed_compact_punch(c, from, c->table_clusters);
    c->moved += c->table_clusters;
    return 0;
}

/* The first run of @n free clusters below @limit, or @limit if none */
static uint64_t qed_compact_find_run(QEDCompact *c, uint64_t n,
                                     uint64_t limit)
{
    uint64_t a = 0;

    while ((a = find_next_zero_bit(c->used, limit, a)) < limit) {
        uint64_t b = find_next_bit(c->used, limit, a);

        if (b - a >= n) {
            return a;
        }
        a = b;
    }
    return limit;
}

/* Move the one data cluster @from into the free cluster @to */
static int coroutine_fn GRAPH_RDLOCK
qed_compact_move_one(QEDCompact *c, uint64_t from, uint64_t to)
{
    QEDMove m = { .from = from, .to = to };
    unsigned int n = 1;
    int ret = qed_compact_owner(c, from, &m.owner);

    return ret < 0 ? ret : qed_compact_move_data(c, &m, &n);
}

/*
 * The last table cannot move down: no run of free clusters is as long as
 * it.  Slide what follows the highest free cluster @hole down by one
 * cluster instead: a run of data clusters by moving its last cluster into
 * the free one before the run (data clusters need no order), a table by
 * moving it past the end of what is in use and then into the free cluster
 * before it and its own first clusters (a table never moves onto itself).
 * Afterwards the last cluster is free: the end of what is in use is one
 * cluster lower.
 */
static int coroutine_fn GRAPH_RDLOCK
qed_compact_slide(QEDCompact *c, uint64_t hole)
{
    BDRVQEDState *s = c->s;
    uint64_t end = qed_compact_used_end(c);
    uint64_t x = hole + 1;
    int ret = 0;

    while (ret == 0 && x < end) {
        int64_t l1i = qed_compact_table_at(c, x);

        if (l1i >= 0) {
            assert(s->l1.table->offsets[l1i] / c->cs == x);
            if (end + c->table_clusters > c->nbits) {
                return QED_COMPACT_STUCK;
            }
            ret = qed_compact_move_table(c, l1i, end);
            if (ret == 0) {
                ret = qed_compact_move_table(c, l1i, hole);
            }
            hole = x + c->table_clusters - 1;
            x += c->table_clusters;
        } else if (qed_compact_is_meta(c, x)) {
            return QED_COMPACT_STUCK;
        } else {
            uint64_t y = x + 1;

            while (y < end && !qed_compact_is_meta(c, y)) {
                y++;
            }
            ret = qed_compact_move_one(c, y - 1, hole);
            hole = y - 1;
            x = y;
        }
    }
    return ret;
}

/* The highest free cluster below @limit (there is one) */
static uint64_t qed_compact_last_free(QEDCompact *c, uint64_t limit)
{
    uint64_t cl = limit;

    while (cl-- > 0) {
        if (!test_bit(cl, c->used)) {
            return cl;
        }
    }
    g_assert_not_reached();
}

/*
 * Move clusters in use into the free clusters below the end of what is in
 * use, updating @used (one bit per cluster, @nbits of them, with room for
 * table_size clusters past the end of what is in use).  Returns 0 when no
 * free cluster is left below the end (the caller cuts the file there),
 * QED_COMPACT_STUCK when a table (or the L1 table) has no room to move
 * into (free clusters remain), or a negative errno of I/O (-ENOSPC: the
 * file system had no room for a copy); *@moved counts the clusters moved
 * either way.  The free clusters are not punched first: on a full disk
 * the blocks that failed writes left in them are what the first copies
 * need; each batch punches the places it vacated, which makes room for
 * the next.  When even the first copy finds no room (the lowest free
 * cluster holds no block, the disk none to spare), every free cluster is
 * punched once, which gives back whatever failed writes left anywhere,
 * and the move is tried again.
 */
int coroutine_fn qed_compact(BDRVQEDState *s, unsigned long *used,
                             uint64_t nbits, uint64_t *moved)
{
    QEDCompact c = {
        .s = s,
        .used = used,
        .nbits = nbits,
        .cs = s->header.cluster_size,
        .table_clusters = s->header.table_size,
        .meta_end = MAX(s->header.header_size,
                        (s->header.l1_table_offset + qed_table_bytes(s)) /
                        s->header.cluster_size),
        .owners = g_hash_table_new_full(g_int64_hash, g_int64_equal, g_free,
                                        g_free),
    };
    QEDMove *moves = g_new(QEDMove, QED_COMPACT_BATCH);
    int ret = 0;

    c.table_buf = qed_table_buf_new(s);
    c.copy_buf = qemu_try_blockalign(s->bs->file->bs,
                                     MIN(QED_COMPACT_COPY_BYTES,
                                         MAX(c.cs, qed_table_bytes(s))));
    if (!c.copy_buf) {
        ret = -ENOMEM;
    }

    while (ret == 0) {
        uint64_t end = qed_compact_used_end(&c);
        uint64_t hole = find_first_zero_bit(used, end);
        uint64_t last = end - 1;
        int64_t l1i;
        unsigned int n = 0;

        if (hole >= end) {
            break;
        }
        l1i = qed_compact_table_at(&c, last);
        if (l1i < 0 && qed_compact_is_meta(&c, last)) {
            /* The header or the L1 table is last: it cannot move */
            ret = QED_COMPACT_STUCK;
            break;
        }
        if (l1i < 0) {
            /* Data clusters from the end into the lowest free ones */
            while (n < QED_COMPACT_BATCH && hole < last &&
                   !qed_compact_is_meta(&c, last)) {
                ret = qed_compact_owner(&c, last, &moves[n].owner);
                if (ret < 0) {
                    break;
                }
                moves[n].from = last;
                moves[n].to = hole;
                n++;
                hole = find_next_zero_bit(used, end, hole + 1);
                last = find_last_bit(used, last);
                if (last >= end) {
                    break;
                }
            }
            if (ret == 0 && n > 0) {
                ret = qed_compact_move_data(&c, moves, &n);
            }
        } else {
            uint64_t from = s->l1.table->offsets[l1i] / c.cs;
            uint64_t run = qed_compact_find_run(&c, c.table_clusters, from);

            if (run < from) {
                ret = qed_compact_move_table(&c, l1i, run);
            } else {
                /* There is a free cluster below it: the highest one */
                ret = qed_compact_slide(&c, qed_compact_last_free(&c, from));
            }
        }
        if (ret == -ENOSPC && !c.punched_free) {
            qed_compact_punch_free(&c);
            ret = 0;
        }
    }

    trace_qed_compact_done(s, c.moved, qed_compact_used_end(&c) * c.cs, ret);
    *moved = c.moved;
    g_free(moves);
    qemu_vfree(c.copy_buf);
    qed_table_buf_free(c.table_buf);
    g_hash_table_destroy(c.owners);
    return ret;
}

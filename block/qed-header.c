/*
 * QED: the image header
 *
 * Byte order, validation of a header read from disk, the geometry rules
 * that create and open share, the one function that writes the header
 * (qed_update_header) and the crash-safe change of the backing file name.
 *
 * This work is licensed under the terms of the GNU LGPL, version 2 or later.
 * See the COPYING.LIB file in the top-level directory.
 */

#include "qemu/osdep.h"
#include "qemu/bswap.h"
#include "qapi/error.h"
#include "qemu/error-report.h"
#include "qemu/memalign.h"
#include "qemu/units.h"
#include "trace.h"
#include "qed.h"

void qed_header_le_to_cpu(const QEDHeader *le, QEDHeader *cpu)
{
    cpu->magic = le32_to_cpu(le->magic);
    cpu->cluster_size = le32_to_cpu(le->cluster_size);
    cpu->table_size = le32_to_cpu(le->table_size);
    cpu->header_size = le32_to_cpu(le->header_size);
    cpu->features = le64_to_cpu(le->features);
    cpu->compat_features = le64_to_cpu(le->compat_features);
    cpu->autoclear_features = le64_to_cpu(le->autoclear_features);
    cpu->l1_table_offset = le64_to_cpu(le->l1_table_offset);
    cpu->image_size = le64_to_cpu(le->image_size);
    cpu->backing_filename_offset = le32_to_cpu(le->backing_filename_offset);
    cpu->backing_filename_size = le32_to_cpu(le->backing_filename_size);
}

void qed_header_cpu_to_le(const QEDHeader *cpu, QEDHeader *le)
{
    le->magic = cpu_to_le32(cpu->magic);
    le->cluster_size = cpu_to_le32(cpu->cluster_size);
    le->table_size = cpu_to_le32(cpu->table_size);
    le->header_size = cpu_to_le32(cpu->header_size);
    le->features = cpu_to_le64(cpu->features);
    le->compat_features = cpu_to_le64(cpu->compat_features);
    le->autoclear_features = cpu_to_le64(cpu->autoclear_features);
    le->l1_table_offset = cpu_to_le64(cpu->l1_table_offset);
    le->image_size = cpu_to_le64(cpu->image_size);
    le->backing_filename_offset = cpu_to_le32(cpu->backing_filename_offset);
    le->backing_filename_size = cpu_to_le32(cpu->backing_filename_size);
}

static bool qed_is_pow2_in(uint64_t v, uint64_t min, uint64_t max)
{
    return v >= min && v <= max && is_power_of_2(v);
}

/* Check the geometry options of create and measure */
int qed_validate_geometry(uint64_t cluster_size, int64_t table_size,
                       Error **errp)
{
    if (!qed_is_pow2_in(cluster_size, QED_MIN_CLUSTER_SIZE,
                        QED_MAX_CLUSTER_SIZE)) {
        error_setg(errp, "Invalid cluster_size %" PRIu64 ": must be a power "
                   "of two between %d and %d bytes", cluster_size,
                   QED_MIN_CLUSTER_SIZE, QED_MAX_CLUSTER_SIZE);
        return -EINVAL;
    }
    if (table_size < 0 || !qed_is_pow2_in(table_size, QED_MIN_TABLE_SIZE,
                                          QED_MAX_TABLE_SIZE)) {
        error_setg(errp, "Invalid table_size %" PRId64 ": must be a power of "
                   "two between %d and %d clusters", table_size,
                   QED_MIN_TABLE_SIZE, QED_MAX_TABLE_SIZE);
        return -EINVAL;
    }
    return 0;
}

/* Check a virtual disk size against what the tables can address */
int qed_validate_image_size(uint64_t size, uint64_t cluster_size,
                         uint64_t table_size, Error **errp)
{
    uint64_t max = qed_max_image_size(cluster_size, table_size);

    if (size > max) {
        error_setg(errp, "Invalid size %" PRIu64 ": with cluster_size %"
                   PRIu64 " and table_size %" PRIu64 " a QED image holds at "
                   "most %" PRIu64 " bytes", size, cluster_size, table_size,
                   max);
        return -EINVAL;
    }
    if (size % BDRV_SECTOR_SIZE) {
        error_setg(errp, "Invalid size %" PRIu64 ": must be a multiple of "
                   "512 bytes", size);
        return -EINVAL;
    }
    return 0;
}

/*
 * The one writer of the header: sector 0 from @h, then s->header = *h.
 * The caller holds header_busy, so that every header write starts from the
 * header the last one left (a size change and a NEED_CHECK change built
 * from the same old copy would undo each other), and says why the moment
 * of the write is safe.  One sector is written, so a crash leaves the old
 * header or the new one.
 */
int coroutine_fn qed_update_header(BDRVQEDState *s, const QEDHeader *h)
{
    QEDHeader le;
    uint8_t *buf;
    int ret;

    qed_assert_locked(s);
    assert(qed_busy_held(&s->header_busy));

    /* The backing file name may share the sector: read, modify, write */
    buf = qemu_blockalign(s->bs, BDRV_SECTOR_SIZE);
    ret = QED_UNLOCKED(s, bdrv_co_pread(s->bs->file, 0, BDRV_SECTOR_SIZE, buf,
                                        0));
    if (ret == 0) {
        qed_header_cpu_to_le(h, &le);
        memcpy(buf, &le, sizeof(le));
        ret = QED_UNLOCKED(s, bdrv_co_pwrite(s->bs->file, 0, BDRV_SECTOR_SIZE,
                                             buf, 0));
    }
    qemu_vfree(buf);
    if (ret == 0) {
        s->header = *h;
    }
    trace_qed_header_write(s, h->features, h->image_size, ret);
    return ret;
}

/*
 * Does a backing file name of @len bytes fit in a header of @header_bytes
 * (and in a path)?  The one rule for create, open and a change of name.
 */
bool qed_backing_name_fits(uint64_t header_bytes, uint64_t len, Error **errp)
{
    uint64_t max = MIN(header_bytes - sizeof(QEDHeader), PATH_MAX - 1);

    if (len > max) {
        error_setg(errp, "Backing file name too long: %" PRIu64 " bytes, at "
                   "most %" PRIu64 " fit in a %" PRIu64 "-byte header", len,
                   max, header_bytes);
        return false;
    }
    return true;
}

/* Validate a header read from disk; @file_size is the file's length */
int qed_validate_header(QEDHeader *h, int64_t file_size, Error **errp)
{
    uint64_t header_bytes, table_bytes;

    if (h->magic != QED_MAGIC) {
        error_setg(errp, "Image not in QED format");
        return -EINVAL;
    }
    if (h->features & ~QED_FEATURE_MASK) {
        error_setg(errp, "Unsupported QED features: 0x%" PRIx64,
                   h->features & ~QED_FEATURE_MASK);
        return -ENOTSUP;
    }
    if (!qed_is_pow2_in(h->cluster_size, QED_MIN_CLUSTER_SIZE,
                        QED_MAX_CLUSTER_SIZE)) {
        error_setg(errp, "QED cluster size is invalid");
        return -EINVAL;
    }
    if (!qed_is_pow2_in(h->table_size, QED_MIN_TABLE_SIZE,
                        QED_MAX_TABLE_SIZE)) {
        error_setg(errp, "QED table size is invalid");
        return -EINVAL;
    }
    if (h->header_size == 0) {
        error_setg(errp, "QED header size is invalid");
        return -EINVAL;
    }

    /* The L1 table lies after the header, aligned, inside the file */
    header_bytes = (uint64_t)h->header_size * h->cluster_size;
    table_bytes = (uint64_t)h->table_size * h->cluster_size;
    if ((h->l1_table_offset & (h->cluster_size - 1)) ||
        h->l1_table_offset < header_bytes ||
        h->l1_table_offset > file_size ||
        table_bytes > file_size - h->l1_table_offset) {
        error_setg(errp, "QED table offset is invalid");
        return -EINVAL;
    }

    if (h->image_size % BDRV_SECTOR_SIZE ||
        h->image_size > qed_max_image_size(h->cluster_size, h->table_size)) {
        error_setg(errp, "QED image size is invalid");
        return -EINVAL;
    }

    if (h->features & QED_F_BACKING_FILE) {
        uint64_t end = (uint64_t)h->backing_filename_offset +
                       h->backing_filename_size;

        if (h->backing_filename_size == 0 ||
            h->backing_filename_offset < sizeof(QEDHeader) ||
            end > header_bytes || end > file_size) {
            error_setg(errp, "QED backing file name is invalid");
            return -EINVAL;
        }
        if (!qed_backing_name_fits(header_bytes, h->backing_filename_size,
                                   errp)) {
            return -EINVAL;
        }
    }
    return 0;
}

/*
 * Where in the header clusters a backing file name of @len bytes can go
 * without touching the bytes of the name the header names now: after the
 * header, after the current name, or at the end.  0 if nowhere.
 */
static uint32_t qed_backing_name_slot(BDRVQEDState *s, size_t len)
{
    uint64_t header_bytes = (uint64_t)s->header.header_size *
                            s->header.cluster_size;
    uint64_t old_start = 0, old_end = 0;
    uint64_t slots[3];

    if (s->header.features & QED_F_BACKING_FILE) {
        old_start = s->header.backing_filename_offset;
        old_end = old_start + s->header.backing_filename_size;
    }
    slots[0] = sizeof(QEDHeader);
    slots[1] = MAX(old_end, sizeof(QEDHeader));
    slots[2] = header_bytes >= len ? header_bytes - len : 0;
    for (int i = 0; i < ARRAY_SIZE(slots); i++) {
        uint64_t start = slots[i], end = start + len;

        if (start >= sizeof(QEDHeader) && end <= header_bytes &&
            (end <= old_start || start >= old_end)) {
            return start;
        }
    }
    return 0;
}

/*
 * Point the header at a new backing file (or at none).
 *
 * Crash ordering 6: the new name is written where the current header does
 * not look, and flushed, before the header's one sector points at it: a
 * crash leaves either the old header with its intact name or the new one
 * with the new name.  When the two names do not fit side by side in the
 * header clusters no such order exists, and the change is refused.
 */
int coroutine_fn qed_co_change_backing(BDRVQEDState *s, void *opaque)
{
    QEDBackingChange *change = opaque;
    const char *file = change->file;
    const char *fmt = change->fmt;
    uint64_t header_bytes = (uint64_t)s->header.header_size *
                            s->header.cluster_size;
    size_t len = file ? strlen(file) : 0;
    Error *err = NULL;
    QEDHeader h;
    int ret;

    /* Dirty entries were set under the old backing file's crash rules */
    ret = qed_writeback(s);
    if (ret < 0) {
        return ret;
    }

    qed_busy_enter(s, &s->header_busy);
    h = s->header;
    h.features &= ~(QED_F_BACKING_FILE | QED_F_BACKING_FORMAT_NO_PROBE);
    h.backing_filename_offset = 0;
    h.backing_filename_size = 0;
    if (len) {
        uint32_t off;

        if (!qed_backing_name_fits(header_bytes, len, &err)) {
            error_report_err(err);
            ret = -ENOSPC;
            goto out;
        }
        off = qed_backing_name_slot(s, len);
        if (!off) {
            error_report("Backing file name too long for a crash-safe "
                         "change: the %" PRIu64 "-byte header must hold the "
                         "old name (%" PRIu32 " bytes) and the new one (%zu "
                         "bytes) side by side", header_bytes,
                         s->header.backing_filename_size, len);
            ret = -ENOSPC;
            goto out;
        }
        ret = QED_UNLOCKED(s, bdrv_co_pwrite(s->bs->file, off, len, file, 0));
        if (ret == 0) {
            ret = QED_UNLOCKED(s, bdrv_co_flush(s->bs->file->bs));
        }
        if (ret < 0) {
            goto out;
        }
        h.features |= QED_F_BACKING_FILE;
        if (fmt && !strcmp(fmt, "raw")) {
            h.features |= QED_F_BACKING_FORMAT_NO_PROBE;
        }
        h.backing_filename_offset = off;
        h.backing_filename_size = len;
    }
    ret = qed_update_header(s, &h);
    if (ret == 0) {
        pstrcpy(s->bs->auto_backing_file, sizeof(s->bs->auto_backing_file),
                file ?: "");
    }
out:
    qed_busy_leave(s, &s->header_busy);
    return ret;
}

/* ---- NEED_CHECK: set next to the one header writer --------------------- */

bool qed_has_backing_file(BDRVQEDState *s)
{
    return s->header.features & QED_F_BACKING_FILE;
}

/*
 * Set NEED_CHECK and flush it, unless it is on disk already.  Callers:
 *
 * - Crash ordering 4: an image without a backing file updates its tables
 *   without flushing the data first, so a crash can leave an entry over
 *   data that never reached the disk or past the end of the file.  The bit
 *   is on disk before the first such table update (qed_set_need_check);
 *   images with a backing file flush instead (crash ordering 3).
 * - Crash ordering 8: the grow-ahead tail (images without a backing file
 *   only) is on disk only while the bit is (qed_grow_file), so a crash
 *   that leaves one makes the next opener's check cut it off.
 * - Crash ordering 9: make_empty, without a backing file.
 * Never for an image with a backing file (the original design's promise).
 *
 * The check on the next open repairs what a crash left.
 */
int coroutine_fn qed_raise_need_check(BDRVQEDState *s)
{
    QEDHeader h;
    int ret = 0;

    qed_assert_locked(s);
    if (s->need_check_ready) {
        return 0;
    }

    qed_busy_enter(s, &s->header_busy);
    if (!s->need_check_ready) {
        if (!(s->header.features & QED_F_NEED_CHECK)) {
            h = s->header;
            h.features |= QED_F_NEED_CHECK;
            ret = qed_update_header(s, &h);
        }
        /* Also when the bit was set: an earlier flush may have failed */
        if (ret == 0) {
            ret = QED_UNLOCKED(s, bdrv_co_flush(s->bs->file->bs));
        }
        if (ret == 0) {
            s->need_check_ready = true;
            trace_qed_need_check_set(s);
        }
    }
    qed_busy_leave(s, &s->header_busy);
    return ret;
}

/* Before table updates: crash ordering 4 */
int coroutine_fn qed_set_need_check(BDRVQEDState *s)
{
    qed_assert_locked(s);
    if (qed_has_backing_file(s)) {
        return 0;
    }
    return qed_raise_need_check(s);
}

/*
 * QED: create, preallocate, measure, amend
 *
 * Image creation (blockdev-create and qemu-img create), its options, the
 * preallocation of a new image, measure, and amend.
 *
 * This work is licensed under the terms of the GNU LGPL, version 2 or later.
 * See the COPYING.LIB file in the top-level directory.
 */

#include "qemu/osdep.h"
#include "block/qdict.h"
#include "qapi/qapi-visit-block-core.h"
#include "qapi/qobject-input-visitor.h"
#include "qobject/qdict.h"
#include "qemu/bswap.h"
#include "qemu/option.h"
#include "system/block-backend.h"
#include "qapi/error.h"
#include "qemu/error-report.h"
#include "qemu/memalign.h"
#include "qemu/units.h"
#include "trace.h"
#include "qed.h"

/* ---- create ------------------------------------------------------------- */

/*
 * The original QEMU driver refuses to open some valid QED images (found by
 * trying every geometry on it; it even creates the first kind itself):
 * - table_size 1 ("QED table offset is invalid");
 * - a non-empty image whose largest size, cluster_size * (table_size *
 *   cluster_size / 8)^2, does not fit in 64 bits, i.e. 3 * log2(cluster_size)
 *   + 2 * log2(table_size) >= 70 ("QED image size is invalid").
 */
static bool qed_original_can_open(uint64_t cluster_size, uint32_t table_size,
                                  uint64_t image_size)
{
    if (table_size == 1) {
        return false;
    }
    return image_size == 0 ||
           3 * ctz64(cluster_size) + 2 * ctz32(table_size) < 70;
}

/* Check every create option before anything is written anywhere */
static int qed_validate_create(BlockdevCreateOptionsQed *o, Error **errp)
{
    uint64_t cluster_size = o->has_cluster_size ? o->cluster_size :
                            QED_DEFAULT_CLUSTER_SIZE;
    int64_t table_size = o->has_table_size ? o->table_size :
                         QED_DEFAULT_TABLE_SIZE;
    int ret;

    ret = qed_validate_geometry(cluster_size, table_size, errp);
    if (ret == 0) {
        ret = qed_validate_image_size(o->size, cluster_size, table_size, errp);
    }
    if (ret < 0) {
        return ret;
    }
    if (o->backing_file &&
        !qed_backing_name_fits(cluster_size, strlen(o->backing_file), errp)) {
        return -EINVAL;
    }
    if (o->has_preallocation && o->preallocation != PREALLOC_MODE_OFF) {
        if (o->backing_file) {
            error_setg(errp, "Backing file and preallocation cannot be used "
                       "at the same time: preallocated clusters would hide "
                       "the backing file");
            return -EINVAL;
        }
    }
    return 0;
}

/*
 * preallocation=metadata|falloc|full: every L2 table and every data
 * cluster is allocated at creation, tables first, then the data clusters
 * in guest order, so the image never allocates again.  Nothing points at
 * the new space until the L1 table is written last, and the new image is
 * not in use by anyone yet, so no ordering beyond that is needed.
 */
static int coroutine_fn qed_preallocate(BlockBackend *blk, QEDHeader *h,
                                        PreallocMode mode, Error **errp)
{
    uint64_t cs = h->cluster_size;
    uint64_t table_bytes = (uint64_t)h->table_size * cs;
    uint64_t nelems = table_bytes / sizeof(uint64_t);
    uint64_t nclusters = DIV_ROUND_UP(h->image_size, cs);
    uint64_t ntables = DIV_ROUND_UP(nclusters, nelems);
    uint64_t tables_start = h->l1_table_offset + table_bytes;
    uint64_t data_start = tables_start + ntables * table_bytes;
    uint64_t *l1, *l2;
    int ret = 0;

    if (nclusters == 0) {
        return 0;
    }
    l1 = g_malloc0(table_bytes);
    l2 = qemu_try_blockalign(blk_bs(blk), table_bytes);
    if (!l2) {
        g_free(l1);
        error_setg(errp, "Could not allocate memory for an L2 table");
        return -ENOMEM;
    }

    for (uint64_t t = 0; t < ntables; t++) {
        uint64_t first = t * nelems;

        for (uint64_t i = 0; i < nelems; i++) {
            l2[i] = first + i < nclusters ? data_start + (first + i) * cs : 0;
        }
        qed_table_snapshot(l2, nelems, l2);
        ret = blk_co_pwrite(blk, tables_start + t * table_bytes, table_bytes,
                            l2, 0);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "Could not write an L2 table");
            goto out;
        }
        l1[t] = tables_start + t * table_bytes;
    }
    qed_table_snapshot(l1, nelems, l1);

    /* The data area: sparse, allocated or written with zeros */
    ret = blk_co_truncate(blk, data_start + nclusters * cs, false,
                          mode == PREALLOC_MODE_METADATA ? PREALLOC_MODE_OFF :
                          mode, 0, errp);
    if (ret < 0) {
        goto out;
    }
    ret = blk_co_flush(blk);
    if (ret == 0) {
        ret = blk_co_pwrite(blk, h->l1_table_offset, table_bytes, l1, 0);
    }
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not write the L1 table");
    }

out:
    g_free(l1);
    qemu_vfree(l2);
    return ret;
}

/*
 * QED grows its file as it allocates, which a block device cannot do:
 * refuse one before writing a byte to it.
 */
static int qed_validate_growable(BlockDriverState *file, Error **errp)
{
    const char *name = file->drv ? file->drv->format_name : "";
    struct stat st;

    if (!strcmp(name, "host_device") || !strcmp(name, "host_cdrom") ||
        (!strcmp(name, "file") && stat(file->filename, &st) == 0 &&
         (S_ISBLK(st.st_mode) || S_ISCHR(st.st_mode)))) {
        error_setg(errp, "QED needs a regular file that can grow: '%s' is a "
                   "block device", file->filename);
        return -ENOTSUP;
    }
    return 0;
}

/* The same, by name, before the protocol layer creates (or zeroes) it */
static int qed_validate_growable_name(const char *filename, Error **errp)
{
    BlockDriver *proto = bdrv_find_protocol(filename, true, NULL);
    const char *path = filename;
    struct stat st;

    if (!strstart(filename, "file:", &path) &&
        !strstart(filename, "host_device:", &path)) {
        strstart(filename, "host_cdrom:", &path);
    }
    if ((proto && (!strcmp(proto->format_name, "host_device") ||
                   !strcmp(proto->format_name, "host_cdrom"))) ||
        (stat(path, &st) == 0 && (S_ISBLK(st.st_mode) ||
                                  S_ISCHR(st.st_mode)))) {
        error_setg(errp, "QED needs a regular file that can grow: '%s' is a "
                   "block device", path);
        return -ENOTSUP;
    }
    return 0;
}

/* The header of a new image */
static QEDHeader qed_new_header(BlockdevCreateOptionsQed *o,
                                uint32_t cluster_size, uint32_t table_size)
{
    QEDHeader header = {
        .magic = QED_MAGIC,
        .cluster_size = cluster_size,
        .table_size = table_size,
        .header_size = 1,
        .l1_table_offset = cluster_size,
        .image_size = o->size,
    };

    if (o->backing_file) {
        header.features |= QED_F_BACKING_FILE;
        header.backing_filename_offset = sizeof(QEDHeader);
        header.backing_filename_size = strlen(o->backing_file);
        if (o->has_backing_fmt && o->backing_fmt == BLOCKDEV_DRIVER_RAW) {
            header.features |= QED_F_BACKING_FORMAT_NO_PROBE;
        }
    }
    return header;
}

/* As qcow2_co_create(): GRAPH_UNLOCKED, the blk_co_* calls lock inside */
int coroutine_fn qed_co_create(BlockdevCreateOptions *opts, Error **errp)
{
    BlockdevCreateOptionsQed *o = &opts->u.qed;
    uint32_t cluster_size = o->has_cluster_size ? o->cluster_size :
                            QED_DEFAULT_CLUSTER_SIZE;
    uint32_t table_size = o->has_table_size ? o->table_size :
                          QED_DEFAULT_TABLE_SIZE;
    BlockDriverState *bs;
    BlockBackend *blk = NULL;
    QEDHeader header, le;
    uint8_t *buf = NULL;
    size_t name_len = 0, buf_len;
    int ret;

    assert(opts->driver == BLOCKDEV_DRIVER_QED);
    ret = qed_validate_create(o, errp);
    if (ret < 0) {
        return ret;
    }

    bs = bdrv_co_open_blockdev_ref(o->file, errp);
    if (!bs) {
        return -EIO;
    }
    ret = qed_validate_growable(bs, errp);
    if (ret < 0) {
        goto out;
    }

    blk = blk_co_new_with_bs(bs, BLK_PERM_WRITE | BLK_PERM_RESIZE,
                             BLK_PERM_ALL, errp);
    if (!blk) {
        ret = -EPERM;
        goto out;
    }
    blk_set_allow_write_beyond_eof(blk, true);

    header = qed_new_header(o, cluster_size, table_size);
    name_len = header.backing_filename_size;
    /* Start from an empty file: old contents must not look like tables */
    ret = blk_co_truncate(blk, 0, true, PREALLOC_MODE_OFF, 0, errp);
    if (ret < 0) {
        goto out;
    }

    /*
     * Header and backing file name, then the file grows over an all-zero
     * L1 table without writing it (the new space reads as zeros).
     */
    buf_len = ROUND_UP(sizeof(QEDHeader) + name_len, BDRV_SECTOR_SIZE);
    buf = g_malloc0(buf_len);
    qed_header_cpu_to_le(&header, &le);
    memcpy(buf, &le, sizeof(le));
    if (name_len) {
        memcpy(buf + sizeof(QEDHeader), o->backing_file, name_len);
    }
    ret = blk_co_pwrite(blk, 0, buf_len, buf, 0);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Could not write the QED header");
        goto out;
    }
    ret = blk_co_truncate(blk, header.l1_table_offset +
                          (uint64_t)table_size * cluster_size, true,
                          PREALLOC_MODE_OFF, 0, errp);
    if (ret < 0) {
        goto out;
    }
    if (o->has_preallocation && o->preallocation != PREALLOC_MODE_OFF) {
        ret = qed_preallocate(blk, &header, o->preallocation, errp);
        if (ret < 0) {
            goto out;
        }
    }
    ret = 0;
    if (!qed_original_can_open(cluster_size, table_size, o->size)) {
        warn_report("the original QEMU QED driver cannot open an image with "
                    "cluster_size=%" PRIu32 " and table_size=%" PRIu32,
                    cluster_size, table_size);
    }

out:
    g_free(buf);
    blk_co_unref(blk);
    bdrv_co_unref(bs);
    return ret;
}

/*
 * The options that create and amend share (amend accepts only the current
 * values of these: a change of backing file is rebase's)
 */
#define QED_OPT_DESC_BACKING_FILE {                                  \
        .name = BLOCK_OPT_BACKING_FILE,                             \
        .type = QEMU_OPT_STRING,                                    \
        .help = "File name of a base image"                         \
    }
#define QED_OPT_DESC_BACKING_FMT {                                   \
        .name = BLOCK_OPT_BACKING_FMT,                              \
        .type = QEMU_OPT_STRING,                                    \
        .help = "Image format of the base image"                    \
    }

QemuOptsList qed_create_opts = {
    .name = "qed-create-opts",
    .head = QTAILQ_HEAD_INITIALIZER(qed_create_opts.head),
    .desc = {
        {
            .name = BLOCK_OPT_SIZE,
            .type = QEMU_OPT_SIZE,
            .help = "Virtual disk size"
        },
        QED_OPT_DESC_BACKING_FILE,
        QED_OPT_DESC_BACKING_FMT,
        {
            .name = BLOCK_OPT_CLUSTER_SIZE,
            .type = QEMU_OPT_SIZE,
            .help = "Cluster size (in bytes, power of two, 4 KiB to 64 MiB)",
            .def_value_str = "65536"
        },
        {
            .name = BLOCK_OPT_TABLE_SIZE,
            .type = QEMU_OPT_SIZE,
            .help = "L1/L2 table size (in clusters, power of two, 1 to 16)"
        },
        {
            .name = BLOCK_OPT_PREALLOC,
            .type = QEMU_OPT_STRING,
            .help = "Preallocation mode (allowed values: off, metadata, "
                    "falloc, full)"
        },
        { /* end of list */ }
    }
};

QemuOptsList qed_amend_opts = {
    .name = "qed-amend-opts",
    .head = QTAILQ_HEAD_INITIALIZER(qed_amend_opts.head),
    .desc = {
        QED_OPT_DESC_BACKING_FILE,
        QED_OPT_DESC_BACKING_FMT,
        { /* end of list */ }
    }
};

int coroutine_fn qed_co_create_opts(BlockDriver *drv,
                                    const char *filename,
                                    QemuOpts *opts, Error **errp)
{
    BlockdevCreateOptions *create_options = NULL;
    BlockDriverState *bs = NULL;
    QDict *qdict;
    Visitor *v;
    int ret;

    static const QDictRenames opt_renames[] = {
        { BLOCK_OPT_BACKING_FILE,       "backing-file" },
        { BLOCK_OPT_BACKING_FMT,        "backing-fmt" },
        { BLOCK_OPT_CLUSTER_SIZE,       "cluster-size" },
        { BLOCK_OPT_TABLE_SIZE,         "table-size" },
        { NULL, NULL },
    };

    qdict = qemu_opts_to_qdict_filtered(opts, NULL, &qed_create_opts, true);
    if (!qdict_rename_keys(qdict, opt_renames, errp)) {
        ret = -EINVAL;
        goto fail;
    }

    /* Parse and validate before the file is created */
    qdict_put_str(qdict, "driver", "qed");
    qdict_put_str(qdict, "file", "");
    v = qobject_input_visitor_new_flat_confused(qdict, errp);
    if (!v) {
        ret = -EINVAL;
        goto fail;
    }
    visit_type_BlockdevCreateOptions(v, NULL, &create_options, errp);
    visit_free(v);
    if (!create_options) {
        ret = -EINVAL;
        goto fail;
    }
    /* Silently round up the size, as qemu-img does for every format */
    create_options->u.qed.size = ROUND_UP(create_options->u.qed.size,
                                          BDRV_SECTOR_SIZE);
    ret = qed_validate_create(&create_options->u.qed, errp);
    if (ret < 0) {
        goto fail;
    }

    ret = qed_validate_growable_name(filename, errp);
    if (ret < 0) {
        goto fail;
    }
    ret = bdrv_co_create_file(filename, opts, errp);
    if (ret < 0) {
        goto fail;
    }
    bs = bdrv_co_open(filename, NULL, NULL,
                      BDRV_O_RDWR | BDRV_O_RESIZE | BDRV_O_PROTOCOL, errp);
    if (!bs) {
        ret = -EIO;
        goto fail;
    }

    qapi_free_BlockdevRef(create_options->u.qed.file);
    create_options->u.qed.file = g_new0(BlockdevRef, 1);
    create_options->u.qed.file->type = QTYPE_QSTRING;
    create_options->u.qed.file->u.reference = g_strdup(bs->node_name);

    ret = qed_co_create(create_options, errp);

fail:
    if (ret < 0) {
        /*
         * As qcow2 does, a failed create (e.g. preallocation on a full file
         * system) leaves no half-made image behind.  @bs is set only once
         * bdrv_co_create_file() has made or emptied the file; every option
         * is checked before that, so a bad one never deletes a file it did
         * not touch.
         */
        bdrv_graph_co_rdlock();
        bdrv_co_delete_file_noerr(bs);
        bdrv_graph_co_rdunlock();
    }
    qobject_unref(qdict);
    bdrv_co_unref(bs);
    qapi_free_BlockdevCreateOptions(create_options);
    return ret;
}

/*
 * Whether amend's backing_file and backing_fmt (NULL when not given) say
 * what the image has now.  The header records the format only as "raw"
 * (QED_F_BACKING_FORMAT_NO_PROBE) or "probe": for a probed one, the format
 * the backing file was opened with is the current one.
 */
static bool GRAPH_RDLOCK
qed_amend_backing_is_current(BlockDriverState *bs, const char *file,
                             const char *fmt)
{
    BDRVQEDState *s = bs->opaque;
    bool has_backing = s->header.features & QED_F_BACKING_FILE;

    if (file && strcmp(file, has_backing ? bs->backing_file : "")) {
        return false;
    }
    if (!fmt) {
        return true;
    }
    if (!has_backing) {
        return false;
    }
    if (s->header.features & QED_F_BACKING_FORMAT_NO_PROBE) {
        return !strcmp(fmt, "raw");
    }
    return bs->backing && bs->backing->bs->drv &&
           !strcmp(fmt, bs->backing->bs->drv->format_name);
}

/*
 * qemu-img amend: nothing of a QED image changes in place.  Geometry and
 * size are create's and resize's; a new backing file is rebase's job,
 * which checks the data it shows through (amend never did), as for qcow2.
 * Restating the current backing file and format is accepted, and writes
 * nothing.
 */
int qed_amend_options(BlockDriverState *bs, QemuOpts *opts,
                      BlockDriverAmendStatusCB *status_cb,
                      void *cb_opaque, bool force, Error **errp)
{
    const char *file = qemu_opt_get(opts, BLOCK_OPT_BACKING_FILE);
    const char *fmt = qemu_opt_get(opts, BLOCK_OPT_BACKING_FMT);

    if (!qed_amend_backing_is_current(bs, file, fmt)) {
        error_setg(errp, "Cannot amend the backing file");
        error_append_hint(errp, "You can use 'qemu-img rebase' instead.\n");
        return -EINVAL;
    }
    return 0;
}

/* qemu-img measure -O qed: the file size a conversion or creation needs */
/*
 * Count the data clusters of @in_bs (@size bytes) in a QED image of
 * clusters of @cs bytes and tables of @nelems entries, and the tables
 * that map them
 */
static int qed_measure_data(BlockDriverState *in_bs, uint64_t size,
                            uint64_t cs, uint64_t nelems, uint64_t *data,
                            uint64_t *data_tables, Error **errp)
{
    uint64_t counted_end = 0;   /* clusters below this are counted */
    int64_t pnum;

    for (int64_t offset = 0; offset < size; offset += pnum) {
        int ret = bdrv_block_status_above(in_bs, NULL, offset, size - offset,
                                          &pnum, NULL, NULL);
        uint64_t first, end;

        if (ret < 0) {
            error_setg_errno(errp, -ret, "Unable to get block status");
            return ret;
        }
        if ((ret & BDRV_BLOCK_ZERO) || !(ret & BDRV_BLOCK_DATA)) {
            continue;
        }
        first = MAX(offset / cs, counted_end);
        end = DIV_ROUND_UP(offset + pnum, cs);
        for (uint64_t c = first; c < end; c++) {
            /* A table counts with the first cluster it maps */
            if (c == first ? (c / nelems != (counted_end - 1) / nelems ||
                              counted_end == 0)
                           : c % nelems == 0) {
                (*data_tables)++;
            }
        }
        if (end > first) {
            *data += (end - first) * cs;
            counted_end = end;
        }
    }
    return 0;
}

BlockMeasureInfo *qed_measure(QemuOpts *opts, BlockDriverState *in_bs,
                              Error **errp)
{
    uint64_t cs = qemu_opt_get_size_del(opts, BLOCK_OPT_CLUSTER_SIZE,
                                        QED_DEFAULT_CLUSTER_SIZE);
    uint64_t ts = qemu_opt_get_size_del(opts, BLOCK_OPT_TABLE_SIZE,
                                        QED_DEFAULT_TABLE_SIZE);
    uint64_t size = qemu_opt_get_size_del(opts, BLOCK_OPT_SIZE, 0);
    char *backing = qemu_opt_get_del(opts, BLOCK_OPT_BACKING_FILE);
    char *prealloc_str = qemu_opt_get_del(opts, BLOCK_OPT_PREALLOC);
    uint64_t table_bytes, nelems, nclusters, ntables, meta;
    uint64_t data = 0, data_tables = 0;
    BlockMeasureInfo *info = NULL;
    PreallocMode prealloc;
    Error *local_err = NULL;

    prealloc = qapi_enum_parse(&PreallocMode_lookup, prealloc_str,
                               PREALLOC_MODE_OFF, &local_err);
    if (local_err) {
        error_propagate(errp, local_err);
        goto out;
    }
    if (qed_validate_geometry(cs, MIN(ts, INT64_MAX), errp) < 0) {
        goto out;
    }
    if (in_bs) {
        int64_t ssize = bdrv_getlength(in_bs);

        if (ssize < 0) {
            error_setg_errno(errp, -ssize, "Unable to get image virtual_size");
            goto out;
        }
        size = ssize;
    }
    size = ROUND_UP(size, BDRV_SECTOR_SIZE);
    if (qed_validate_image_size(size, cs, ts, errp) < 0) {
        goto out;
    }

    table_bytes = ts * cs;
    nelems = table_bytes / sizeof(uint64_t);
    nclusters = DIV_ROUND_UP(size, cs);
    ntables = DIV_ROUND_UP(nclusters, nelems);
    meta = cs + table_bytes;        /* header and L1 table */

    if (in_bs && !backing) {
        if (qed_measure_data(in_bs, size, cs, nelems, &data, &data_tables,
                             errp) < 0) {
            goto out;
        }
    } else if (backing) {
        /* Everything may end up allocated */
        data = nclusters * cs;
        data_tables = ntables;
    }

    info = g_new0(BlockMeasureInfo, 1);
    info->fully_allocated = meta + ntables * table_bytes + nclusters * cs;
    switch (prealloc) {
    case PREALLOC_MODE_METADATA:
        info->required = meta + ntables * table_bytes + data;
        break;
    case PREALLOC_MODE_FALLOC:
    case PREALLOC_MODE_FULL:
        info->required = info->fully_allocated;
        break;
    default:
        info->required = meta + data_tables * table_bytes + data;
        break;
    }

out:
    g_free(backing);
    g_free(prealloc_str);
    return info;
}

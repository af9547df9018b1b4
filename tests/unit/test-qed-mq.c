/*
 * Multiqueue stress of our QED driver: request coroutines of one node in
 * several iothreads at once, as virtio-blk's iothread-vq-mapping runs
 * them in QEMU 10.0, with drained sections begun in the main loop
 * meanwhile.  Every thread owns every NTHREADS-th cluster (so all of them
 * share the L2 tables, the cache, the allocations and the writeback) and
 * keeps a model of its sectors; reads check it as they go, and at the end
 * the image is checked and read back whole.  A small cluster, a one-
 * cluster table and a two-table cache make for many tables, misses,
 * evictions and writeback passes.
 *
 * This work is licensed under the terms of the GNU LGPL, version 2 or later.
 * See the COPYING.LIB file in the top-level directory.
 */

#include "qemu/osdep.h"
#include "qapi/error.h"
#include "qobject/qdict.h"
#include "qemu/main-loop.h"
#include "qemu/coroutine.h"
#include "qemu/memalign.h"
#include "block/block.h"
#include "block/block_int.h"
#include "system/block-backend.h"
#include "iothread.h"

#define NTHREADS 4
#define CLUSTER 4096
#define SECTOR 512
#define SECTORS_PER_CLUSTER (CLUSTER / SECTOR)
#define IMAGE_SIZE (64 * 1024 * 1024)
#define NCLUSTERS (IMAGE_SIZE / CLUSTER)
#define OPS_PER_THREAD 20000

typedef struct Worker {
    BlockBackend *blk;
    unsigned int id;
    uint64_t rng;
    uint32_t *model;            /* per sector of the image; 0: zeros */
    uint32_t counter;
    int failures;
    char *why;
} Worker;

static int ndone;

static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545f4914f6cdd1dULL;
}

static void fill(uint8_t *buf, unsigned int nsectors, const uint32_t *vals)
{
    for (unsigned int i = 0; i < nsectors; i++) {
        for (unsigned int j = 0; j < SECTOR / 4; j++) {
            memcpy(buf + i * SECTOR + j * 4, &vals[i], 4);
        }
    }
}

static bool matches(const uint8_t *buf, unsigned int nsectors,
                    const uint32_t *vals, unsigned int *bad)
{
    for (unsigned int i = 0; i < nsectors; i++) {
        for (unsigned int j = 0; j < SECTOR / 4; j++) {
            uint32_t v;

            memcpy(&v, buf + i * SECTOR + j * 4, 4);
            if (v != vals[i]) {
                *bad = i;
                return false;
            }
        }
    }
    return true;
}

static void coroutine_fn worker_entry(void *opaque)
{
    Worker *w = opaque;
    uint8_t *buf = qemu_blockalign(blk_bs(w->blk), CLUSTER);
    uint32_t vals[SECTORS_PER_CLUSTER];

    for (unsigned int op = 0; op < OPS_PER_THREAD && !w->failures; op++) {
        uint64_t r = rng_next(&w->rng);
        uint64_t cl = (r % (NCLUSTERS / NTHREADS)) * NTHREADS + w->id;
        unsigned int first = (r >> 20) % SECTORS_PER_CLUSTER;
        unsigned int n = 1 + (r >> 30) % (SECTORS_PER_CLUSTER - first);
        uint64_t off = cl * CLUSTER + first * SECTOR;
        uint32_t *m = &w->model[cl * SECTORS_PER_CLUSTER + first];
        unsigned int kind = (r >> 40) % 16;
        unsigned int bad;
        int ret;

        if (kind < 7) {
            for (unsigned int i = 0; i < n; i++) {
                vals[i] = (w->id + 1) << 24 | (++w->counter & 0xffffff);
            }
            fill(buf, n, vals);
            ret = blk_co_pwrite(w->blk, off, n * SECTOR, buf, 0);
            if (ret == 0) {
                memcpy(m, vals, n * sizeof(uint32_t));
            }
        } else if (kind < 14) {
            ret = blk_co_pread(w->blk, off, n * SECTOR, buf, 0);
            if (ret == 0 && !matches(buf, n, m, &bad)) {
                w->why = g_strdup_printf("thread %u op %u: sector %" PRIu64
                                         " reads wrong",
                                         w->id, op, off / SECTOR + bad);
                w->failures++;
            }
        } else if (kind == 14) {
            /* A whole cluster of zeros (zero marker or zeroed in place) */
            ret = blk_co_pwrite_zeroes(w->blk, cl * CLUSTER, CLUSTER, 0);
            if (ret == 0) {
                memset(&w->model[cl * SECTORS_PER_CLUSTER], 0,
                       SECTORS_PER_CLUSTER * sizeof(uint32_t));
            }
        } else {
            ret = blk_co_flush(w->blk);
        }
        if (ret < 0) {
            w->why = g_strdup_printf("thread %u op %u: kind %u failed: %s",
                                     w->id, op, kind, strerror(-ret));
            w->failures++;
        }
    }
    qemu_vfree(buf);
    qatomic_inc(&ndone);
    aio_wait_kick();
}

static void test_mq_stress(void)
{
    g_autofree char *path = NULL;
    char create_opts[] = "cluster_size=4096,table_size=1";
    IOThread *threads[NTHREADS];
    Worker workers[NTHREADS];
    uint32_t *model = g_new0(uint32_t, IMAGE_SIZE / SECTOR);
    BlockBackend *blk;
    BdrvCheckResult res = {};
    QDict *opts;
    Error *err = NULL;
    uint8_t *buf;
    unsigned int iter = 0, bad;
    int fd;

    fd = g_file_open_tmp("qed-mq-XXXXXX", &path, NULL);
    g_assert(fd >= 0);
    close(fd);
    bdrv_img_create(path, "qed", NULL, NULL, create_opts, IMAGE_SIZE, 0, true,
                    &err);
    g_assert(!err);

    opts = qdict_new();
    qdict_put_str(opts, "driver", "qed");
    qdict_put_str(opts, "l2-cache-size", "8k");
    blk = blk_new_open(path, NULL, opts, BDRV_O_RDWR, &error_abort);

    qatomic_set(&ndone, 0);
    for (unsigned int t = 0; t < NTHREADS; t++) {
        threads[t] = iothread_new();
        workers[t] = (Worker) {
            .blk = blk, .id = t, .rng = 0x9e3779b97f4a7c15ULL * (t + 1),
            .model = model,
        };
        aio_co_enter(iothread_get_aio_context(threads[t]),
                     qemu_coroutine_create(worker_entry, &workers[t]));
    }
    /* Drained sections from the main loop while the threads run */
    while (qatomic_read(&ndone) < NTHREADS) {
        if (++iter % 8 == 0) {
            bdrv_drained_begin(blk_bs(blk));
            bdrv_drained_end(blk_bs(blk));
        }
        aio_poll(qemu_get_aio_context(), false);
        g_usleep(500);
    }
    for (unsigned int t = 0; t < NTHREADS; t++) {
        if (workers[t].why) {
            g_printerr("%s\n", workers[t].why);
        }
        g_assert_cmpint(workers[t].failures, ==, 0);
        iothread_join(threads[t]);
    }
    blk_unref(blk);

    /* Closed clean: no NEED_CHECK, nothing to repair, data as modelled */
    blk = blk_new_open(path, NULL, NULL, BDRV_O_RDWR, &error_abort);
    bdrv_graph_rdlock_main_loop();
    g_assert_false(bdrv_check(blk_bs(blk), &res, 0) < 0);
    bdrv_graph_rdunlock_main_loop();
    g_assert_cmpint(res.corruptions, ==, 0);
    g_assert_cmpint(res.leaks, ==, 0);
    g_assert_cmpint(res.check_errors, ==, 0);
    buf = qemu_blockalign(blk_bs(blk), CLUSTER);
    for (uint64_t cl = 0; cl < NCLUSTERS; cl++) {
        g_assert_cmpint(blk_pread(blk, cl * CLUSTER, CLUSTER, buf, 0), ==, 0);
        if (!matches(buf, SECTORS_PER_CLUSTER,
                     &model[cl * SECTORS_PER_CLUSTER], &bad)) {
            g_printerr("after close: sector %" PRIu64 " reads wrong\n",
                       cl * SECTORS_PER_CLUSTER + bad);
            g_assert_not_reached();
        }
    }
    qemu_vfree(buf);
    blk_unref(blk);
    unlink(path);
    g_free(model);
}

int main(int argc, char **argv)
{
    bdrv_init();
    qemu_init_main_loop(&error_abort);
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/qed-mq/stress", test_mq_stress);
    return g_test_run();
}

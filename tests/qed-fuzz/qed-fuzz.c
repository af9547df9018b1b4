/*
 * libFuzzer harness for our QED driver
 *
 * Each input is a whole QED image file.  The harness puts it in an image
 * file held in memory (its own protocol driver, below: no system calls, no
 * threads; QED_FUZZ_FILE=1 uses a real file in the scratch folder instead)
 * and drives it through the fork's block layer, as qemu-img and a guest
 * would:
 *
 *  1. read-only open: block status over the first extents, reads at the
 *     start, the end and inside allocated extents, a check without repair;
 *  2. read-write open (with a one-table L2 cache for some inputs): a batch
 *     of concurrent writes, reads, write-zeroes, discards and flushes, and
 *     sometimes a resize, on the image as it came (only crashes, sanitizer
 *     reports and hangs count here: the image may be corrupt);
 *     then `check -r all`, which must leave no corruption, then
 *     non-overlapping writes whose content is remembered and read back;
 *  3. a second read-only open: the check must find nothing to repair and
 *     every remembered write must read back.
 *
 * A failed open is fine (most mutated headers are invalid); a crash, a
 * sanitizer report, an assertion, a leak, a hang or a broken expectation of
 * steps 2 and 3 is a finding.  The operations' offsets and sizes come from
 * a hash of the input, so that every input replays the same way.
 *
 * Backing files: an image may only name "backing.raw" or "backing.qed",
 * two small fixed files in the scratch folder; any other name (a host path,
 * "../", a json: or protocol name) is opened without its backing file
 * (BDRV_O_NO_BACKING), so that the fuzzer never reaches outside the scratch
 * folder.
 *
 * Run through `make fuzz` (see the Makefile); a single input replays with
 * `.base/qemu/build-san/tests/qed-fuzz/qed-fuzz FILE...`.
 *
 * This work is licensed under the terms of the GNU LGPL, version 2 or later.
 * See the COPYING.LIB file in the top-level directory.
 */

#include "qemu/osdep.h"
#include "qemu/main-loop.h"
#include "qemu/cutils.h"
#include "qemu/iov.h"
#include "qapi/error.h"
#include "qobject/qdict.h"
#include "block/block.h"
#include "block/block_int.h"
#include "system/block-backend.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Inputs larger than this are skipped: images stay small and fast */
#define FUZZ_MAX_INPUT (4 * 1024 * 1024)
/* Largest single request */
#define FUZZ_MAX_IO (64 * 1024)
/* Requests in flight at once in a batch */
#define FUZZ_BATCH 8
/* Writes are only tried on images with clusters up to this size */
#define FUZZ_MAX_WRITE_CLUSTER (2 * 1024 * 1024)
/* Guest range the operations aim at */
#define FUZZ_SPAN (1ULL << 30)
/* Remembered writes in step 2 (one per slot of the span) */
#define FUZZ_SLOTS 8
#define BACKING_SIZE (1024 * 1024)

static char *scratch_dir;
static char *image_path;
/* QED_FUZZ_FILE set: the image is a real file (image_path), not memory */
static bool use_file;

/* Debug output when QED_FUZZ_VERBOSE is set */
static bool verbose;
#define DPRINTF(fmt, ...) do { \
        if (verbose) { \
            fprintf(stderr, "qed-fuzz: " fmt "\n", ## __VA_ARGS__); \
        } \
    } while (0)

/* ---- small deterministic generator, seeded by the input ---------------- */

typedef struct Rng {
    uint64_t s;
} Rng;

static uint64_t rng_next(Rng *r)
{
    /* xorshift64* */
    r->s ^= r->s >> 12;
    r->s ^= r->s << 25;
    r->s ^= r->s >> 27;
    return r->s * 0x2545f4914f6cdd1dULL;
}

static uint64_t rng_below(Rng *r, uint64_t n)
{
    return n ? rng_next(r) % n : 0;
}

static uint64_t hash_input(const uint8_t *data, size_t size)
{
    uint64_t h = 0xcbf29ce484222325ULL ^ size;
    size_t i;

    for (i = 0; i < size; i++) {
        h = (h ^ data[i]) * 0x100000001b3ULL;
    }
    return h ? h : 1;
}

/* ---- the header, as far as the harness needs it ------------------------ */

typedef struct FuzzHeader {
    bool valid;             /* magic and sizes look like QED */
    uint32_t cluster_size;
    uint32_t table_size;
    uint64_t features;
    bool backing_ok;        /* the image may open its backing file */
    const char *backing;    /* which one, if it names one */
} FuzzHeader;

static const char *const allowed_backing[] = { "backing.raw", "backing.qed" };

static void parse_header(const uint8_t *data, size_t size, FuzzHeader *h)
{
    uint32_t name_off, name_len;
    size_t i;

    memset(h, 0, sizeof(*h));
    h->backing_ok = true;
    if (size < 64 || ldl_le_p(data) != ('Q' | 'E' << 8 | 'D' << 16)) {
        return;
    }
    h->cluster_size = ldl_le_p(data + 4);
    h->table_size = ldl_le_p(data + 8);
    h->features = ldq_le_p(data + 16);
    h->valid = true;

    if (!(h->features & 1)) {
        return;             /* no backing file */
    }
    h->backing_ok = false;
    name_off = ldl_le_p(data + 56);
    name_len = ldl_le_p(data + 60);
    if (name_off > size || name_len > size - name_off) {
        return;
    }
    for (i = 0; i < ARRAY_SIZE(allowed_backing); i++) {
        if (name_len == strlen(allowed_backing[i]) &&
            !memcmp(data + name_off, allowed_backing[i], name_len)) {
            h->backing_ok = true;
            h->backing = allowed_backing[i];
        }
    }
}

/* ---- the image file, in memory ------------------------------------------ */

/*
 * A protocol driver over memory: no system calls and no thread pool, so
 * that an input costs little.  The file is held in 4 KiB pages, only those
 * that were written (the driver grows its file ahead, and writes may land
 * far out): the rest reads as zeros.  Every request yields once before it
 * completes (rescheduled through the AioContext, as a real completion
 * would be), so that the driver's coroutines interleave at their I/O as
 * they do over a file.
 */
#define MEM_PAGE 4096

static struct {
    GHashTable *pages;      /* page index -> MEM_PAGE bytes */
    uint64_t length;        /* the file's length */
} mem;

static uint8_t *mem_page(uint64_t index, bool create)
{
    uint8_t *page = g_hash_table_lookup(mem.pages, &index);

    if (!page && create) {
        uint64_t *key = g_new(uint64_t, 1);

        *key = index;
        page = g_malloc0(MEM_PAGE);
        g_hash_table_insert(mem.pages, key, page);
    }
    return page;
}

/* Zero [offset, offset + bytes): whole pages are dropped */
static void mem_zero(uint64_t offset, uint64_t bytes)
{
    while (bytes) {
        uint64_t index = offset / MEM_PAGE, in = offset % MEM_PAGE;
        uint64_t n = MIN(bytes, MEM_PAGE - in);
        uint8_t *page = mem_page(index, false);

        if (page && n == MEM_PAGE) {
            g_hash_table_remove(mem.pages, &index);
        } else if (page) {
            memset(page + in, 0, n);
        }
        offset += n;
        bytes -= n;
    }
}

static void mem_write(uint64_t offset, const uint8_t *buf, uint64_t bytes,
                      QEMUIOVector *qiov)
{
    uint64_t done = 0;

    while (done < bytes) {
        uint64_t pos = offset + done;
        uint64_t in = pos % MEM_PAGE, n = MIN(bytes - done, MEM_PAGE - in);
        uint8_t *page = mem_page(pos / MEM_PAGE, true);

        if (qiov) {
            qemu_iovec_to_buf(qiov, done, page + in, n);
        } else {
            memcpy(page + in, buf + done, n);
        }
        done += n;
    }
}

static void mem_set(const uint8_t *data, size_t size)
{
    size_t off;

    if (!mem.pages) {
        mem.pages = g_hash_table_new_full(g_int64_hash, g_int64_equal,
                                          g_free, g_free);
    }
    g_hash_table_remove_all(mem.pages);
    for (off = 0; off < size; off += MEM_PAGE) {
        size_t n = MIN(MEM_PAGE, size - off);

        if (!buffer_is_zero(data + off, n)) {
            mem_write(off, data + off, n, NULL);
        }
    }
    mem.length = size;
}

static void coroutine_fn mem_yield(BlockDriverState *bs)
{
    aio_co_schedule(bdrv_get_aio_context(bs), qemu_coroutine_self());
    qemu_coroutine_yield();
}

static int mem_file_open(BlockDriverState *bs, QDict *options, int flags,
                         Error **errp)
{
    qdict_del(options, "filename");
    bs->supported_zero_flags = BDRV_REQ_MAY_UNMAP;
    return 0;
}

static int coroutine_fn mem_co_preadv(BlockDriverState *bs, int64_t offset,
                                      int64_t bytes, QEMUIOVector *qiov,
                                      BdrvRequestFlags flags)
{
    uint64_t done = 0;

    mem_yield(bs);
    while (done < bytes) {
        uint64_t pos = offset + done;
        uint64_t in = pos % MEM_PAGE, n = MIN(bytes - done, MEM_PAGE - in);
        uint8_t *page = mem_page(pos / MEM_PAGE, false);

        if (page) {
            qemu_iovec_from_buf(qiov, done, page + in, n);
        } else {
            qemu_iovec_memset(qiov, done, 0, n);
        }
        done += n;
    }
    return 0;
}

static int coroutine_fn mem_co_pwritev(BlockDriverState *bs, int64_t offset,
                                       int64_t bytes, QEMUIOVector *qiov,
                                       BdrvRequestFlags flags)
{
    mem_yield(bs);
    mem_write(offset, NULL, bytes, qiov);
    mem.length = MAX(mem.length, offset + bytes);
    return 0;
}

static int coroutine_fn mem_co_pwrite_zeroes(BlockDriverState *bs,
                                             int64_t offset, int64_t bytes,
                                             BdrvRequestFlags flags)
{
    mem_yield(bs);
    mem_zero(offset, bytes);
    mem.length = MAX(mem.length, offset + bytes);
    return 0;
}

static int coroutine_fn mem_co_pdiscard(BlockDriverState *bs, int64_t offset,
                                        int64_t bytes)
{
    mem_yield(bs);
    mem_zero(offset, MIN(bytes, mem.length - MIN(offset, mem.length)));
    return 0;
}

static int coroutine_fn mem_co_truncate(BlockDriverState *bs, int64_t offset,
                                        bool exact, PreallocMode prealloc,
                                        BdrvRequestFlags flags, Error **errp)
{
    if (prealloc != PREALLOC_MODE_OFF) {
        error_setg(errp, "preallocation is not supported");
        return -ENOTSUP;
    }
    mem_yield(bs);
    if ((uint64_t)offset < mem.length) {
        mem_zero(offset, mem.length - offset);
    }
    mem.length = offset;
    return 0;
}

/* Held pages are data, the rest reads as zeros (a hole, as in a file) */
static int coroutine_fn mem_co_block_status(BlockDriverState *bs,
                                            bool want_zero, int64_t offset,
                                            int64_t bytes, int64_t *pnum,
                                            int64_t *map,
                                            BlockDriverState **file)
{
    bool held = mem_page(offset / MEM_PAGE, false);
    int64_t n = MEM_PAGE - offset % MEM_PAGE;

    while (n < bytes && !!mem_page((offset + n) / MEM_PAGE, false) == held) {
        n += MEM_PAGE;
    }
    *pnum = MIN(n, bytes);
    *map = offset;
    *file = bs;
    return (held ? BDRV_BLOCK_DATA : BDRV_BLOCK_ZERO) |
           BDRV_BLOCK_OFFSET_VALID;
}

static int64_t coroutine_fn mem_co_getlength(BlockDriverState *bs)
{
    return mem.length;
}

static int coroutine_fn mem_co_flush(BlockDriverState *bs)
{
    mem_yield(bs);
    return 0;
}

/* The length changes under the block layer: ask every time (10.0: a limit) */
static void mem_refresh_limits(BlockDriverState *bs, Error **errp)
{
    bs->bl.has_variable_length = true;
}

static BlockDriver bdrv_qed_fuzz_mem = {
    .format_name            = "qed-fuzz-mem",
    .protocol_name          = "qed-fuzz-mem",
    .instance_size          = 1,

    .bdrv_open              = mem_file_open,
    .bdrv_co_getlength      = mem_co_getlength,
    .bdrv_co_preadv         = mem_co_preadv,
    .bdrv_co_pwritev        = mem_co_pwritev,
    .bdrv_co_pwrite_zeroes  = mem_co_pwrite_zeroes,
    .bdrv_co_pdiscard       = mem_co_pdiscard,
    .bdrv_co_truncate       = mem_co_truncate,
    .bdrv_co_flush_to_disk  = mem_co_flush,
    .bdrv_co_block_status   = mem_co_block_status,
    .bdrv_refresh_limits    = mem_refresh_limits,
};

/* ---- set-up -------------------------------------------------------------- */

static void write_file(const char *path, const void *buf, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);

    if (fd < 0 || (len && write(fd, buf, len) != (ssize_t)len)) {
        fprintf(stderr, "qed-fuzz: cannot write %s: %s\n", path,
                strerror(errno));
        abort();
    }
    close(fd);
}

static void remove_scratch(void)
{
    const char *names[] = { "image.qed", "backing.raw", "backing.qed" };
    size_t i;

    for (i = 0; i < ARRAY_SIZE(names); i++) {
        g_autofree char *p = g_build_filename(scratch_dir, names[i], NULL);
        unlink(p);
    }
    rmdir(scratch_dir);
}

/* The two backing files an image may name */
static void make_backing_files(void)
{
    g_autofree uint8_t *raw = g_malloc(BACKING_SIZE);
    g_autofree uint8_t *qed = g_malloc0(8192);
    g_autofree char *raw_path = g_build_filename(scratch_dir, "backing.raw",
                                                 NULL);
    g_autofree char *qed_path = g_build_filename(scratch_dir, "backing.qed",
                                                 NULL);
    size_t i;

    for (i = 0; i < BACKING_SIZE; i++) {
        raw[i] = (i * 7 + (i >> 12)) | 1;
    }
    write_file(raw_path, raw, BACKING_SIZE);

    /* An empty QED image of 1 MiB: 4 KiB clusters, one-cluster tables */
    stl_le_p(qed, 'Q' | 'E' << 8 | 'D' << 16);
    stl_le_p(qed + 4, 4096);            /* cluster_size */
    stl_le_p(qed + 8, 1);               /* table_size */
    stl_le_p(qed + 12, 1);              /* header_size */
    stq_le_p(qed + 40, 4096);           /* l1_table_offset */
    stq_le_p(qed + 48, BACKING_SIZE);   /* image_size */
    write_file(qed_path, qed, 8192);
}

/*
 * A process that crashed (a finding, in fork mode) left its scratch folder
 * behind: remove those whose process is gone.  Folders are named
 * qed-fuzz-PID-XXXXXX.
 */
static void remove_stale_scratch(const char *base)
{
    GDir *dir = g_dir_open(base, 0, NULL);
    const char *name;

    if (!dir) {
        return;
    }
    while ((name = g_dir_read_name(dir))) {
        const char *names[] = { "image.qed", "backing.raw", "backing.qed" };
        const char *end;
        char *path;
        long pid;
        size_t i;

        if (!g_str_has_prefix(name, "qed-fuzz-")) {
            continue;
        }
        if (qemu_strtol(name + strlen("qed-fuzz-"), &end, 10, &pid) < 0 ||
            pid <= 0 || *end != '-' || kill(pid, 0) == 0 || errno != ESRCH) {
            continue;
        }
        for (i = 0; i < ARRAY_SIZE(names); i++) {
            path = g_build_filename(base, name, names[i], NULL);
            unlink(path);
            g_free(path);
        }
        path = g_build_filename(base, name, NULL);
        rmdir(path);
        g_free(path);
    }
    g_dir_close(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *base = getenv("QED_FUZZ_TMPDIR");
    g_autofree char *tmpl = NULL;
    g_autofree char *prefix = NULL;

    verbose = getenv("QED_FUZZ_VERBOSE") != NULL;
    if (!base) {
        base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : g_get_tmp_dir();
    }
    remove_stale_scratch(base);
    prefix = g_strdup_printf("qed-fuzz-%ld-XXXXXX", (long)getpid());
    tmpl = g_build_filename(base, prefix, NULL);
    scratch_dir = g_mkdtemp(tmpl) ? g_strdup(tmpl) : NULL;
    if (!scratch_dir) {
        fprintf(stderr, "qed-fuzz: cannot make a scratch folder in %s\n",
                base);
        abort();
    }
    atexit(remove_scratch);
    image_path = g_build_filename(scratch_dir, "image.qed", NULL);
    make_backing_files();

    use_file = getenv("QED_FUZZ_FILE") != NULL;
    qemu_init_main_loop(&error_fatal);
    bdrv_init();
    bdrv_register(&bdrv_qed_fuzz_mem);
    return 0;
}

/* ---- requests ------------------------------------------------------------ */

typedef struct Batch {
    int pending;
} Batch;

typedef struct Req {
    Batch *batch;
    QEMUIOVector qiov;
    void *buf;
} Req;

static void req_done(void *opaque, int ret)
{
    Req *req = opaque;

    req->batch->pending--;
    if (req->buf) {
        qemu_iovec_destroy(&req->qiov);
        g_free(req->buf);
    }
    g_free(req);
}

static void batch_wait(Batch *b)
{
    while (b->pending > 0) {
        aio_poll(qemu_get_aio_context(), true);
    }
}

static Req *req_new(Batch *b, size_t bytes, int fill)
{
    Req *req = g_new0(Req, 1);

    req->batch = b;
    if (bytes) {
        req->buf = g_malloc(bytes);
        memset(req->buf, fill, bytes);
        qemu_iovec_init_buf(&req->qiov, req->buf, bytes);
    }
    b->pending++;
    return req;
}

static BlockBackend *open_image(bool rw, const FuzzHeader *h, bool small_cache)
{
    QDict *opts = qdict_new();
    Error *err = NULL;
    BlockBackend *blk;
    int flags = rw ? BDRV_O_RDWR | BDRV_O_RESIZE : 0;

    qdict_put_str(opts, "driver", "qed");
    if (use_file) {
        qdict_put_str(opts, "file.driver", "file");
        qdict_put_str(opts, "file.filename", image_path);
        qdict_put_str(opts, "file.locking", "off");
    } else {
        qdict_put_str(opts, "file.driver", "qed-fuzz-mem");
        if (h->backing) {
            /*
             * A memory node has no folder to resolve the name in: name
             * the allowed file for the block layer (the driver still
             * parses the header's name).
             */
            g_autofree char *path = g_build_filename(scratch_dir, h->backing,
                                                     NULL);
            qdict_put_str(opts, "backing.driver",
                          g_str_has_suffix(h->backing, ".qed") ? "qed" : "raw");
            qdict_put_str(opts, "backing.file.driver", "file");
            qdict_put_str(opts, "backing.file.filename", path);
            qdict_put_str(opts, "backing.file.locking", "off");
        }
    }
    if (small_cache && h->valid && h->cluster_size &&
        (uint64_t)h->cluster_size * h->table_size <= 64 * 1024 * 1024) {
        qdict_put_int(opts, "l2-cache-size",
                      (uint64_t)h->cluster_size * h->table_size);
    }
    if (!h->backing_ok) {
        flags |= BDRV_O_NO_BACKING;
    }
    blk = blk_new_open(NULL, NULL, opts, flags, &err);
    if (!blk) {
        DPRINTF("open (%s) failed: %s", rw ? "rw" : "ro",
                error_get_pretty(err));
        error_free(err);
    }
    return blk;
}

/* A random range inside [0, limit), at most FUZZ_MAX_IO long */
static void pick_range(Rng *r, uint64_t limit, uint64_t *off, uint64_t *len)
{
    uint64_t o, l;

    if (limit == 0) {
        *off = *len = 0;
        return;
    }
    switch (rng_below(r, 4)) {
    case 0:                         /* near the start */
        o = rng_below(r, MIN(limit, 256 * 1024));
        break;
    case 1:                         /* near the end */
        o = limit - 1 - rng_below(r, MIN(limit, 256 * 1024));
        break;
    default:
        o = rng_below(r, limit);
        break;
    }
    if (rng_below(r, 2)) {
        o &= ~4095ULL;              /* aligned, often */
    }
    l = 1 + rng_below(r, FUZZ_MAX_IO);
    if (rng_below(r, 2)) {
        l = ROUND_UP(l, 4096);
    }
    *off = o;
    *len = MIN(l, limit - o);
}

/* ---- step 1: read-only ------------------------------------------------- */

static void step_read_only(const FuzzHeader *h, Rng *r)
{
    BlockBackend *blk = open_image(false, h, rng_below(r, 2));
    BlockDriverState *bs;
    BdrvCheckResult res = {0};
    int64_t len, off = 0, pnum, map;
    g_autofree uint8_t *buf = g_malloc(FUZZ_MAX_IO);
    Batch b = {0};
    int i;

    if (!blk) {
        return;
    }
    bs = blk_bs(blk);
    len = blk_getlength(blk);
    if (len < 0) {
        goto out;
    }

    /* The first extents, and a read inside each of the first few */
    for (i = 0; i < 32 && off < len; i++) {
        BlockDriverState *file;
        int ret = bdrv_block_status(bs, off, len - off, &pnum, &map, &file);

        if (ret < 0 || pnum <= 0) {
            break;
        }
        if (i < 8) {
            uint64_t n = MIN(pnum, FUZZ_MAX_IO);
            blk_pread(blk, off, n, buf, 0);
        }
        off += pnum;
    }

    /* Scattered concurrent reads */
    for (i = 0; i < FUZZ_BATCH; i++) {
        uint64_t o, l;
        Req *req;

        pick_range(r, len, &o, &l);
        if (!l) {
            break;
        }
        req = req_new(&b, l, 0);
        blk_aio_preadv(blk, o, &req->qiov, 0, req_done, req);
    }
    batch_wait(&b);

    bdrv_check(bs, &res, 0);
    DPRINTF("ro check: %d corruptions, %d leaks, %d errors",
            res.corruptions, res.leaks, res.check_errors);
out:
    blk_unref(blk);
}

/* ---- step 2: read-write ------------------------------------------------ */

typedef struct Written {
    uint64_t off;
    uint64_t len;
    uint8_t fill;
} Written;

static void mixed_batch(BlockBackend *blk, Rng *r, uint64_t limit)
{
    Batch b = {0};
    int i, n = 1 + rng_below(r, FUZZ_BATCH);

    for (i = 0; i < n; i++) {
        uint64_t o, l;
        Req *req;

        pick_range(r, limit, &o, &l);
        switch (rng_below(r, 8)) {
        case 0:
        case 1:
        case 2:
            if (!l) {
                break;
            }
            req = req_new(&b, l, 0x40 + i);
            blk_aio_pwritev(blk, o, &req->qiov, 0, req_done, req);
            break;
        case 3:
            if (!l) {
                break;
            }
            req = req_new(&b, l, 0);
            blk_aio_preadv(blk, o, &req->qiov, 0, req_done, req);
            break;
        case 4:
            req = req_new(&b, 0, 0);
            blk_aio_pwrite_zeroes(blk, o, l,
                                  rng_below(r, 2) ? BDRV_REQ_MAY_UNMAP : 0,
                                  req_done, req);
            break;
        case 5:
            req = req_new(&b, 0, 0);
            blk_aio_pdiscard(blk, o, l, req_done, req);
            break;
        case 6:
            req = req_new(&b, 0, 0);
            blk_aio_flush(blk, req_done, req);
            break;
        default:
            /* Two writes into one cluster, or next to each other */
            if (!l) {
                break;
            }
            req = req_new(&b, MIN(l, 2048), 0x60 + i);
            blk_aio_pwritev(blk, o, &req->qiov, 0, req_done, req);
            if (o + 4096 < limit) {
                req = req_new(&b, 2048, 0x70 + i);
                blk_aio_pwritev(blk, o + 2048, &req->qiov, 0, req_done, req);
            }
            break;
        }
    }
    batch_wait(&b);
}

/* Non-overlapping writes, one per slot of the span, remembered in @w */
static int remembered_writes(BlockBackend *blk, Rng *r, uint64_t limit,
                             Written *w)
{
    uint64_t span = MIN(limit, FUZZ_SPAN);
    uint64_t slot = span / FUZZ_SLOTS;
    Batch b = {0};
    int i, n = 0;

    if (slot < 512) {
        return 0;
    }
    for (i = 0; i < FUZZ_SLOTS; i++) {
        uint64_t len = 1 + rng_below(r, MIN(slot, 16384));
        uint64_t off = i * slot + rng_below(r, slot - len + 1);
        Req *req;

        if (rng_below(r, 3) == 0) {
            continue;
        }
        w[n] = (Written) { off, len, rng_below(r, 4) ? 0x80 + i : 0 };
        if (w[n].fill == 0 && rng_below(r, 2)) {
            req = req_new(&b, 0, 0);
            blk_aio_pwrite_zeroes(blk, off, len, 0, req_done, req);
        } else {
            req = req_new(&b, len, w[n].fill);
            blk_aio_pwritev(blk, off, &req->qiov, 0, req_done, req);
        }
        n++;
    }
    batch_wait(&b);
    return n;
}

static void verify_writes(BlockBackend *blk, const Written *w, int n,
                          const char *when)
{
    int i;

    for (i = 0; i < n; i++) {
        g_autofree uint8_t *buf = g_malloc(w[i].len);
        uint64_t j;
        int ret = blk_pread(blk, w[i].off, w[i].len, buf, 0);

        if (ret < 0) {
            fprintf(stderr, "qed-fuzz: %s: read of a remembered write "
                    "(%" PRIu64 "+%" PRIu64 ") failed: %s\n", when,
                    w[i].off, w[i].len, strerror(-ret));
            abort();
        }
        for (j = 0; j < w[i].len; j++) {
            if (buf[j] != w[i].fill) {
                fprintf(stderr, "qed-fuzz: %s: byte %" PRIu64 " of the write "
                        "%" PRIu64 "+%" PRIu64 " reads 0x%02x, not 0x%02x\n",
                        when, w[i].off + j, w[i].off, w[i].len, buf[j],
                        w[i].fill);
                abort();
            }
        }
    }
}

static void step_read_write(const FuzzHeader *h, Rng *r)
{
    BlockBackend *blk;
    BdrvCheckResult res = {0};
    Written w[FUZZ_SLOTS];
    int64_t len;
    int nw = 0, ret;

    if (h->valid && h->cluster_size > FUZZ_MAX_WRITE_CLUSTER) {
        return;
    }
    blk = open_image(true, h, rng_below(r, 2));
    if (!blk) {
        return;
    }
    len = blk_getlength(blk);
    if (len < 0) {
        blk_unref(blk);
        return;
    }

    /* On the image as it came: anything but a crash or a hang is fine */
    mixed_batch(blk, r, len);
    if (rng_below(r, 4) == 0) {
        int64_t new_len = len / 2 + rng_below(r, len + 1) + 512;
        Error *err = NULL;

        new_len = QEMU_ALIGN_DOWN(new_len, 512);
        if (blk_truncate(blk, new_len, false, PREALLOC_MODE_OFF, 0,
                         &err) < 0) {
            error_free(err);
        }
        len = blk_getlength(blk);
        mixed_batch(blk, r, MAX(len, 0));
    }
    if (len < 0) {
        blk_unref(blk);
        return;
    }

    /* Repair: nothing may be left to repair afterwards */
    ret = bdrv_check(blk_bs(blk), &res, BDRV_FIX_ERRORS | BDRV_FIX_LEAKS);
    DPRINTF("repair: ret %d, %d corruptions, %d leaks, %d errors, "
            "%d/%d fixed", ret, res.corruptions, res.leaks, res.check_errors,
            res.corruptions_fixed, res.leaks_fixed);
    if (ret == 0 && (res.corruptions || res.check_errors)) {
        fprintf(stderr, "qed-fuzz: check -r all left %d corruptions and "
                "%d errors\n", res.corruptions, res.check_errors);
        abort();
    }
    if (ret < 0) {
        blk_unref(blk);
        return;
    }

    /* On the repaired image, what is written must read back */
    nw = remembered_writes(blk, r, len, w);
    verify_writes(blk, w, nw, "after the writes");
    blk_unref(blk);

    /* ---- step 3: a fresh look at what step 2 left -------------------- */
    blk = open_image(false, h, false);
    if (!blk) {
        fprintf(stderr, "qed-fuzz: the repaired image does not open\n");
        abort();
    }
    memset(&res, 0, sizeof(res));
    ret = bdrv_check(blk_bs(blk), &res, 0);
    if (ret < 0 || res.corruptions || res.check_errors) {
        fprintf(stderr, "qed-fuzz: after repair and writes, check finds "
                "%d corruptions and %d errors (ret %d)\n", res.corruptions,
                res.check_errors, ret);
        abort();
    }
    verify_writes(blk, w, nw, "after reopening");
    blk_unref(blk);
}

static void set_image(const uint8_t *data, size_t size)
{
    if (use_file) {
        write_file(image_path, data, size);
    } else {
        mem_set(data, size);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    FuzzHeader h;
    Rng r;

    if (size > FUZZ_MAX_INPUT) {
        return -1;
    }
    parse_header(data, size, &h);
    r.s = hash_input(data, size);
    set_image(data, size);
    step_read_only(&h, &r);

    /* (whatever step 1 did, step 2 starts from the input again) */
    set_image(data, size);
    step_read_write(&h, &r);
    return 0;
}

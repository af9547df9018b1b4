/*
 * LD_PRELOAD shim for crash tests: kill the process (SIGKILL) on entry to
 * its N-th call, counted across all threads, that changes one file.
 *
 * strace's inject=...:when=N counts each thread apart, and QEMU's I/O runs
 * in thread-pool workers that come and go, so "the N-th write" would be a
 * different write from run to run.  This shim counts every call that
 * writes, discards, zeroes, truncates or flushes the file named by
 * QED_KILLAT_FILE (its real path; other files are not counted): pwrite,
 * pwritev, pwritev2, fallocate, ftruncate, fdatasync, fsync, and libaio's
 * io_submit (one count per call with an iocb for the file:
 * file.aio=native).
 *
 *   QED_KILLAT_FILE   the file (as /proc/self/fd/ shows it)
 *   QED_KILLAT_N      kill on entry to call N (1 = the first); 0 or unset:
 *                     never
 *   QED_KILLAT_LOG    append one line per counted call: "N CALL OFFSET LEN"
 *                     (offset/len -1 where the call has none)
 *
 * Build: cc -shared -fPIC -o qed_killat.so qed_killat.c -ldl
 *
 * This work is licensed under the terms of the GNU GPL, version 2 or later.
 * See the COPYING file in the top-level directory.
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <libaio.h>
#include <limits.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static const char *killat_file;
static long killat_n;
static int killat_log = -1;
static atomic_long killat_count;

__attribute__((constructor))
static void killat_init(void)
{
    const char *n = getenv("QED_KILLAT_N");
    const char *log = getenv("QED_KILLAT_LOG");

    killat_file = getenv("QED_KILLAT_FILE");
    killat_n = n ? atol(n) : 0;
    if (log && *log) {
        killat_log = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC,
                          0644);
    }
}

static int is_target(int fd)
{
    char link[64], path[PATH_MAX];
    ssize_t len;

    if (!killat_file || fd < 0) {
        return 0;
    }
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    len = readlink(link, path, sizeof(path) - 1);
    if (len < 0) {
        return 0;
    }
    path[len] = '\0';
    return strcmp(path, killat_file) == 0;
}

static void counted(const char *call, long long offset, long long len)
{
    long n = atomic_fetch_add(&killat_count, 1) + 1;

    if (killat_log >= 0) {
        dprintf(killat_log, "%ld %s %lld %lld\n", n, call, offset, len);
    }
    if (n == killat_n) {
        kill(getpid(), SIGKILL);
        pause();
    }
}

static void hit(const char *call, int fd, long long offset, long long len)
{
    if (is_target(fd)) {
        counted(call, offset, len);
    }
}

static long long iov_len(const struct iovec *iov, int cnt)
{
    long long len = 0;

    for (int i = 0; i < cnt; i++) {
        len += iov[i].iov_len;
    }
    return len;
}

typedef ssize_t PwriteFn(int, const void *, size_t, off_t);
typedef ssize_t PwritevFn(int, const struct iovec *, int, off_t);
typedef ssize_t Pwritev2Fn(int, const struct iovec *, int, off_t, int);
typedef int FallocateFn(int, int, off_t, off_t);
typedef int FtruncateFn(int, off_t);
typedef int SyncFn(int);
typedef int IoSubmitFn(io_context_t, long, struct iocb **);

/* the next definition of the function NAME (looked up once) */
static void *next_fn(void **cache, const char *name)
{
    if (!*cache) {
        *cache = dlsym(RTLD_NEXT, name);
    }
    return *cache;
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
    static void *cache;
    PwriteFn *real = next_fn(&cache, "pwrite");

    hit("pwrite", fd, off, n);
    return real(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off)
{
    static void *cache;
    PwriteFn *real = next_fn(&cache, "pwrite64");

    hit("pwrite", fd, off, n);
    return real(fd, buf, n, off);
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off)
{
    static void *cache;
    PwritevFn *real = next_fn(&cache, "pwritev");

    hit("pwritev", fd, off, iov_len(iov, cnt));
    return real(fd, iov, cnt, off);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t off)
{
    static void *cache;
    PwritevFn *real = next_fn(&cache, "pwritev64");

    hit("pwritev", fd, off, iov_len(iov, cnt));
    return real(fd, iov, cnt, off);
}

ssize_t pwritev2(int fd, const struct iovec *iov, int cnt, off_t off,
                 int flags)
{
    static void *cache;
    Pwritev2Fn *real = next_fn(&cache, "pwritev2");

    hit("pwritev", fd, off, iov_len(iov, cnt));
    return real(fd, iov, cnt, off, flags);
}

ssize_t pwritev64v2(int fd, const struct iovec *iov, int cnt, off_t off,
                    int flags)
{
    static void *cache;
    Pwritev2Fn *real = next_fn(&cache, "pwritev64v2");

    hit("pwritev", fd, off, iov_len(iov, cnt));
    return real(fd, iov, cnt, off, flags);
}

int fallocate(int fd, int mode, off_t off, off_t len)
{
    static void *cache;
    FallocateFn *real = next_fn(&cache, "fallocate");

    hit("fallocate", fd, off, len);
    return real(fd, mode, off, len);
}

int fallocate64(int fd, int mode, off_t off, off_t len)
{
    static void *cache;
    FallocateFn *real = next_fn(&cache, "fallocate64");

    hit("fallocate", fd, off, len);
    return real(fd, mode, off, len);
}

int ftruncate(int fd, off_t len)
{
    static void *cache;
    FtruncateFn *real = next_fn(&cache, "ftruncate");

    hit("ftruncate", fd, len, -1);
    return real(fd, len);
}

int ftruncate64(int fd, off_t len)
{
    static void *cache;
    FtruncateFn *real = next_fn(&cache, "ftruncate64");

    hit("ftruncate", fd, len, -1);
    return real(fd, len);
}

int fdatasync(int fd)
{
    static void *cache;
    SyncFn *real = next_fn(&cache, "fdatasync");

    hit("fdatasync", fd, -1, -1);
    return real(fd);
}

int fsync(int fd)
{
    static void *cache;
    SyncFn *real = next_fn(&cache, "fsync");

    hit("fsync", fd, -1, -1);
    return real(fd);
}

int io_submit(io_context_t ctx, long nr, struct iocb *iocbs[])
{
    static void *cache;
    IoSubmitFn *real = next_fn(&cache, "io_submit");

    for (long i = 0; i < nr; i++) {
        if (is_target(iocbs[i]->aio_fildes) &&
            iocbs[i]->aio_lio_opcode != IO_CMD_PREAD &&
            iocbs[i]->aio_lio_opcode != IO_CMD_PREADV) {
            counted("io_submit", iocbs[i]->u.c.offset, -1);
            break;
        }
    }
    return real(ctx, nr, iocbs);
}

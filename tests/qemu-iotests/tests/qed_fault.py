#!/usr/bin/env python3
#
# QED fault injection driver: inject I/O errors at the driver's metadata
# steps (its blkdebug events) under a concurrent workload and check that
# the failed requests fail cleanly, the rest complete, and the image stays
# repairable with every completed and flushed write intact.
#
# Used by the iotests qed-fault-inject and qed-fault-writethrough; also
# runs on its own:
#
#   qed_fault.py --workdir DIR [--event EV] [--errno 5|28]
#                [--mode once|sticky|each] [--backing yes|no]
#                [--cache writeback|writethrough] [--keep] [-v]
#
# (environment: QEMU_IO_PROG, QEMU_IMG_PROG = our binaries, PEER_QEMU_IMG =
# the reference peer's qemu-img).  The filters select cases; without them
# every case runs: each of the 8 metadata events (l1_update, l2_load,
# l2_update, l2_alloc_write, cluster_alloc, cow_read, cow_write,
# flush_to_disk) with errno 5 (EIO) and 28 (ENOSPC) in the three modes,
# over a backing file; the 5 events that the driver also reaches without a
# backing file once more without one.
#
# The modes (a blkdebug rule with once = "off" stays active after its
# event, for every I/O that follows, until another event with rules comes):
#   once    once = "on": the one I/O that follows the first hit fails;
#   sticky  once = "off": every I/O from the first hit on fails;
#   each    once = "off", and the driver's other events (and flush_to_os)
#           come with an errno = 0 rule that ends the injection: the I/O
#           of every hit fails, most others pass.
#
# Each case starts from a fresh image (cluster_size 4 KiB, table_size 2 -
# the reference peer refuses table_size 1 -: an L2 table maps 4 MiB, so a
# small workload touches many tables) whose first 4 L2 tables exist and map
# 2 written clusters each.  One qemu-io (writeback cache unless --cache
# says otherwise; with writethrough every write is followed by a flush)
# opens it over blkdebug with an L2 cache of one table, so that lookups
# keep loading tables, and issues all at once, each with its own offset
# and pattern:
#  - in-place rewrites of written clusters in the 4 tables,
#  - allocating writes into those tables: a whole cluster, 2 KiB in the
#    middle of a cluster (copy-on-write of head and tail over a backing
#    file) and a cluster in the table's second 4 KiB chunk,
#  - allocating writes into 3 tables that do not exist yet, two per table
#    (a new L2 table, then its L1 entry, shared by both writes),
#  - 2 writes that cross from one new table into the next (one of them
#    copies on write past the end of the backing file),
#  - 4 reads of written clusters that no write touches,
# then aio_flush (a drain) and flush.  The only synchronous command is the
# flush, so qemu-io's exit status says whether the flush succeeded.
#
# Checks of every case:
#  - qemu-io ends by itself (timeout), without a crash (signal), assertion
#    or abort; every request reports either success or failure; failures
#    carry the injected error's message; reads that succeed return the
#    right data; nothing else is printed but the driver's messages about
#    table updates that failed for good (with the injected error);
#  - once: at most one request fails; sticky and each: the injection is
#    seen (a request or the flush fails);
#  - nothing was written outside the image's clusters: every cluster of
#    the file holding non-zero bytes was in the file before the run or is
#    one the driver allocated in it (its qed_alloc_clusters trace); the
#    file ends where the last allocated cluster still in use ends (space
#    of failed writes goes back: qed_alloc_unreserve, qed_alloc_reuse, and
#    a close moves clusters into what is left: qed_compact_done);
#  - with a backing file NEED_CHECK is never set; an image whose NEED_CHECK
#    is clear has no corruption even before any repair (leaks may be);
#  - our `qemu-img check -r all` repairs it; then our check finds nothing
#    at all and the peer's no corruption (leaked clusters that our repair
#    punched out of the file still count as leaks there), NEED_CHECK is
#    clear, and the file ends at the check's image end offset;
#  - our driver and the peer's read the same bytes; outside the written
#    ranges they are the content from before the run; a write that
#    succeeded reads its pattern if the flush succeeded (with writethrough:
#    always); any other write reads, cluster by cluster, its pattern or the
#    old content.
#
# Output: one deterministic line per case (-v adds what happened), details
# of failures; a log of every case in DIR/qed-fault.log.
#
# This work is licensed under the terms of the GNU GPL, version 2 or later.
# See the COPYING file in the top-level directory.

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from typing import List, Set, Tuple

KiB = 1024
MiB = 1024 * 1024
CS = 4 * KiB                # cluster size
TABLE = 4 * MiB             # what one L2 table maps (1024 4 KiB clusters)
SIZE = 40 * MiB             # virtual disk: 10 L2 tables
BACK_SIZE = 34 * MiB        # the backing file is shorter: zeros after it
NEED_CHECK = 0x2
TIMEOUT = 60

EVENTS = ['l1_update', 'l2_load', 'l2_update', 'l2_alloc_write',
          'cluster_alloc', 'cow_read', 'cow_write', 'flush_to_disk']
# Events that only a backing file reaches in the driver (copy-on-write,
# the flush that separates data from table updates)
BACKING_ONLY = {'cow_read', 'cow_write', 'flush_to_disk'}
ERRNOS = {5: 'Input/output error', 28: 'No space left on device'}
# Every event the driver emits, and the block layer's flush_to_os (a flush
# of the image); the 'each' mode ends an injection at the next of them
DRIVER_EVENTS = EVENTS + ['read_aio', 'write_aio', 'read_backing_aio',
                          'flush_to_os']
# once:   once = "on": the first I/O after the first hit fails
# sticky: once = "off": from the first hit on, every I/O fails
# each:   once = "off", and every other event of the driver comes with an
#         errno = 0 rule that takes its place: the I/O that follows each
#         hit fails, up to the next event
MODES = ['once', 'sticky', 'each']
# The I/O of a hit may announce itself with an event of its own: these do
# not end an injection in the 'each' mode.  (A copy-on-write read announces
# itself as read_backing_aio too, and goes to the backing file: the hit is
# the copy-on-write.  A flush of the file that has nothing to flush does
# no I/O: the hit is then the table update that the flush was for.)
FOLLOW = {'cluster_alloc': ['cow_read', 'read_backing_aio', 'cow_write',
                            'write_aio'],
          'cow_read': ['read_backing_aio', 'cow_write'],
          'flush_to_disk': ['l2_load', 'l2_update', 'l1_update']}


class Failure(Exception):
    pass


def run(args: List[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True,
                          **kw)


def backing_content() -> bytes:
    """The first 256 KiB of every L2 table's range (where the copy-on-write
    happens) hold data, every 512-byte sector its own value in 0x80..0xfe
    (never a write pattern, never zero); the rest is zeros (sparse, so
    that reading the whole disk is cheap)"""
    one = bytes(v for s in range(127) for v in [0x80 + s] * 512)
    head = (one * 5)[:256 * KiB]
    out = bytearray(BACK_SIZE)
    for t in range(0, BACK_SIZE, TABLE):
        n = min(len(head), BACK_SIZE - t)
        out[t:t + n] = head[:n]
    return bytes(out)


class Write:
    def __init__(self, off: int, length: int, pat: int):
        self.off = off
        self.len = length
        self.pat = pat
        self.ok = False

    def cmd(self) -> str:
        return f'aio_write -P {self.pat:#x} {self.off} {self.len}'


class Faults:
    def __init__(self, args, log):
        self.args = args
        self.log = log
        w = args.workdir
        self.qemu_io = self.snapshot(os.environ.get('QEMU_IO_PROG',
                                                    'qemu-io'))
        self.qemu_img = self.snapshot(os.environ.get('QEMU_IMG_PROG',
                                                     'qemu-img'))
        self.peer_img = os.environ.get('PEER_QEMU_IMG', '/usr/bin/qemu-img')
        self.img = os.path.join(w, 'fault.qed')
        self.back = os.path.join(w, 'fault-back.raw')
        self.conf = os.path.join(w, 'fault-blkdebug.conf')
        self.trace = os.path.join(w, 'fault-trace.log')
        self.events = os.path.join(w, 'fault-trace.events')
        with open(self.events, 'w') as f:
            f.write('qed_alloc_clusters\nqed_alloc_reuse\n'
                    'qed_alloc_unreserve\nqed_compact_done\n')
        self.raw = os.path.join(w, 'fault-ours.raw')
        self.peer_raw = os.path.join(w, 'fault-peer.raw')
        self.cache = args.cache
        self.old = {}
        self.back_data = backing_content()
        with open(self.back, 'wb') as f:
            for t in range(0, BACK_SIZE, TABLE):
                f.seek(t)
                f.write(self.back_data[t:t + 256 * KiB])
            f.truncate(BACK_SIZE)

        # Written before the run: clusters 0 and 1 of tables 0..3
        self.prepop = [(t * TABLE, 2 * CS, 0x40 + t) for t in range(4)]
        # The run's writes
        ws: List[Tuple[int, int]] = []
        for t in range(4):
            ws.append((t * TABLE, CS))                  # in place
            ws.append((t * TABLE + 16 * CS, CS))        # new, whole cluster
            ws.append((t * TABLE + 32 * CS + KiB, 2 * KiB))    # new, COW
            ws.append((t * TABLE + 600 * CS, CS))       # 2nd chunk of table
        for t in range(4, 7):
            ws.append((t * TABLE + KiB, KiB))           # new table
            ws.append((t * TABLE + 700 * CS, 2 * CS))   # same new table
        ws.append((8 * TABLE - CS, 2 * CS))             # across tables 7/8
        # across tables 8/9, COW past the end of the backing file
        ws.append((9 * TABLE - 2 * KiB, 4 * KiB))
        self.writes = [Write(o, n, i + 1) for i, (o, n) in enumerate(ws)]
        # Reads of written clusters that no write touches: cluster 1
        self.reads = [(t * TABLE + CS, CS, 0x40 + t) for t in range(4)]

    def snapshot(self, prog: str) -> str:
        """A private copy of a binary under test (a rebuild meanwhile does
        not change what is tested)"""
        path = shutil.which(prog)
        if path is None:
            raise Failure(f'{prog} not found')
        copy = os.path.join(self.args.workdir, 'bin', os.path.basename(path))
        os.makedirs(os.path.dirname(copy), exist_ok=True)
        shutil.copy2(path, copy)
        return copy

    # ---- images ------------------------------------------------------------

    def old_content(self, backing: bool) -> bytes:
        """The guest-visible content before the run"""
        if backing in self.old:
            return self.old[backing]
        data = bytearray(SIZE)
        if backing:
            data[:BACK_SIZE] = self.back_data
        for off, n, pat in self.prepop:
            data[off:off + n] = bytes([pat]) * n
        self.old[backing] = bytes(data)
        return self.old[backing]

    def fresh(self, backing: bool) -> None:
        """The image before the run (made once, then copied)"""
        template = self.img + ('.back' if backing else '.noback')
        if not os.path.exists(template):
            args = [self.qemu_img, 'create', '-f', 'qed', '-o',
                    f'cluster_size={CS},table_size=2']
            if backing:
                args += ['-b', self.back, '-F', 'raw']
            r = run(args + [template, str(SIZE)])
            if r.returncode != 0:
                raise Failure(f'qemu-img create failed: {r.stdout.strip()}')
            cmds = []
            for off, n, pat in self.prepop:
                cmds += ['-c', f'write -q -P {pat:#x} {off} {n}']
            r = run([self.qemu_io, '-f', 'qed'] + cmds + [template])
            if r.returncode != 0 or r.stdout.strip():
                raise Failure(f'writing the image before the run failed: '
                              f'{r.stdout.strip()}')
        shutil.copyfile(template, self.img)

    def features(self) -> int:
        with open(self.img, 'rb') as f:
            f.seek(16)
            return int(struct.unpack('<Q', f.read(8))[0])

    def nonzero_clusters(self) -> Set[int]:
        out = set()
        zero = bytes(CS)
        with open(self.img, 'rb') as f:
            i = 0
            while True:
                b = f.read(CS)
                if not b:
                    break
                if b != zero[:len(b)]:
                    out.add(i)
                i += 1
        return out

    # ---- the run -----------------------------------------------------------

    def run_faulty(self, event: str, err: int, mode: str
                   ) -> Tuple[int, List[str]]:
        with open(self.conf, 'w') as f:
            f.write('[inject-error]\n'
                    f'event = "{event}"\n'
                    f'errno = "{err}"\n'
                    f'once = "{"on" if mode == "once" else "off"}"\n')
            if mode == 'each':
                for other in DRIVER_EVENTS:
                    if other != event and other not in FOLLOW.get(event, []):
                        f.write(f'\n[inject-error]\nevent = "{other}"\n'
                                'errno = "0"\n')
        if os.path.exists(self.trace):
            os.remove(self.trace)
        cmds = []
        for w in self.writes:
            cmds += ['-c', w.cmd()]
        for off, n, pat in self.reads:
            cmds += ['-c', f'aio_read -P {pat:#x} {off} {n}']
        cmds += ['-c', 'aio_flush', '-c', 'flush']
        opts = (f'driver=qed,file.driver=blkdebug,file.config={self.conf},'
                f'file.image.filename={self.img},l2-cache-size={2 * CS}')
        try:
            r = run([self.qemu_io, '--trace',
                     f'events={self.events},file={self.trace}',
                     '-t', self.cache, '--image-opts'] + cmds + [opts],
                    timeout=TIMEOUT)
        except subprocess.TimeoutExpired as e:
            out = e.stdout or ''
            if isinstance(out, bytes):
                out = out.decode(errors='replace')
            self.log.write(out)
            raise Failure(f'qemu-io did not finish within {TIMEOUT} s')
        self.log.write(r.stdout)
        if r.returncode < 0:
            raise Failure(f'qemu-io was killed by signal {-r.returncode}')
        if r.returncode not in (0, 1):
            raise Failure(f'qemu-io exited with status {r.returncode}')
        return r.returncode, r.stdout.splitlines()

    def allocations(self) -> Tuple[List[Tuple[int, int]], int]:
        """File ranges the driver allocated in the run (its trace), and
        where the clusters in use end once the run is over: space whose
        write failed goes back (qed_alloc_unreserve) and may be handed out
        again (qed_alloc_reuse); a close after failed writes moves clusters
        in use into what is left of it (qed_compact_done, the new end)"""
        out = []
        live: Set[int] = set()
        compact_end = None
        pat = re.compile(r'(qed_alloc_clusters|qed_alloc_reuse|'
                         r'qed_alloc_unreserve) .*file offset '
                         r'(0x[0-9a-f]+) clusters (\d+)')
        done = re.compile(r'qed_compact_done .*file end (0x[0-9a-f]+) ret 0')
        if not os.path.exists(self.trace):
            return out, 0
        with open(self.trace) as f:
            for line in f:
                m = pat.search(line)
                if m:
                    off, n = int(m.group(2), 16), int(m.group(3)) * CS
                    clusters = set(range(off // CS, (off + n) // CS))
                    if m.group(1) == 'qed_alloc_unreserve':
                        live -= clusters
                    else:
                        out.append((off, n))
                        live |= clusters
                    continue
                m = done.search(line)
                if m:
                    compact_end = int(m.group(1), 16)
        end = max(live, default=-1) * CS + CS if live else 0
        if compact_end is not None:
            end = compact_end
        return out, end

    def parse(self, lines: List[str], err: int) -> Tuple[int, int, int]:
        """Mark the writes that succeeded; return (failed writes, failed
        reads, driver messages)"""
        msg = ERRNOS[err]
        by_off = {w.off: w for w in self.writes}
        read_offs = {off for off, _, _ in self.reads}
        failed_w = failed_r = driver_msgs = 0
        bad = []
        timing = re.compile(r'^[\d.]+ [KMGT]?i?B, \d+ ops; ')
        for line in lines:
            m = re.match(r'^wrote (\d+)/(\d+) bytes at offset (\d+)$', line)
            if m and int(m.group(3)) in by_off:
                w = by_off[int(m.group(3))]
                if w.ok or int(m.group(1)) != w.len:
                    bad.append(line)
                w.ok = True
                continue
            m = re.match(r'^read (\d+)/(\d+) bytes at offset (\d+)$', line)
            if m and int(m.group(3)) in read_offs:
                continue
            if timing.match(line):
                continue
            if line == f'aio_write failed: {msg}':
                failed_w += 1
                continue
            if line == f'readv failed: {msg}':
                failed_r += 1
                continue
            # The driver says when a close could not write table entries
            # back (they stay dirty while the image is open)
            if re.match(r'^qemu-io: qed: .*: table entries of \d+ L2 tables '
                        r'\(and \d+ L1 sectors\) could not be written; '
                        r'writes since the last successful flush are lost$',
                        line):
                driver_msgs += 1
                continue
            bad.append(line)
        if bad:
            raise Failure('unexpected output of qemu-io: ' +
                          ' | '.join(bad[:5]))
        ok = sum(w.ok for w in self.writes)
        if ok + failed_w != len(self.writes):
            raise Failure(f'{len(self.writes)} writes, but {ok} succeeded '
                          f'and {failed_w} failed')
        return failed_w, failed_r, driver_msgs

    # ---- checks ------------------------------------------------------------

    def check(self, prog: str, who: str, repair: bool = False
              ) -> Tuple[int, int, dict]:
        """run `qemu-img check` (-r all if @repair); return (exit status,
        corruptions + check errors, the JSON)"""
        args = [prog, 'check', '-f', 'qed', '--output=json']
        if repair:
            args += ['-r', 'all']
        r = run(args + [self.img], timeout=TIMEOUT)
        try:
            j = json.loads(r.stdout[r.stdout.index('{'):])
        except ValueError:
            raise Failure(f'{who} check (exit {r.returncode}) printed no '
                          f'JSON: {r.stdout.strip()}')
        self.log.write(f'{who} check{" -r all" if repair else ""}: exit '
                       f'{r.returncode} {json.dumps(j)}\n')
        return r.returncode, j.get('corruptions', 0) + \
            j.get('check-errors', 0), j

    def read_all(self, prog: str, dest: str) -> bytes:
        if os.path.exists(dest):
            os.remove(dest)
        r = run([prog, 'convert', '-f', 'qed', '-O', 'raw', self.img, dest],
                timeout=TIMEOUT)
        if r.returncode != 0:
            raise Failure(f'{prog} convert failed: {r.stdout.strip()}')
        with open(dest, 'rb') as f:
            data = f.read()
        os.remove(dest)
        if len(data) != SIZE:
            raise Failure(f'{prog} convert: {len(data)} bytes, expected '
                          f'{SIZE}')
        return data

    def verify_data(self, old: bytes, flushed: bool) -> None:
        data = self.read_all(self.qemu_img, self.raw)
        peer = self.read_all(self.peer_img, self.peer_raw)
        if peer != data:
            i = next(i for i in range(0, SIZE, 512)
                     if peer[i:i + 512] != data[i:i + 512])
            raise Failure(f'the peer reads other data than we do, first at '
                          f'guest offset {i:#x}')
        expect = bytearray(old)
        for w in self.writes:
            new = bytes([w.pat]) * w.len
            got = data[w.off:w.off + w.len]
            # With writethrough, a write completes only after a flush
            if w.ok and (flushed or self.cache == 'writethrough'):
                if got != new:
                    raise Failure(f'write {w.cmd()} succeeded and was '
                                  f'flushed, but does not read back')
            else:
                # cluster by cluster: the new pattern or the old content
                pos = w.off
                while pos < w.off + w.len:
                    end = min((pos // CS + 1) * CS, w.off + w.len)
                    part = data[pos:end]
                    if part != new[:end - pos] and part != old[pos:end]:
                        raise Failure(f'write {w.cmd()} (succeeded: {w.ok}, '
                                      f'flush succeeded: {flushed}) reads '
                                      f'neither its pattern nor the old '
                                      f'content at {pos:#x}')
                    pos = end
            expect[w.off:w.off + w.len] = got
        if expect != data:
            i = next(i for i in range(0, SIZE, 512)
                     if expect[i:i + 512] != data[i:i + 512])
            raise Failure(f'guest offset {i:#x}, which no write of the run '
                          f'touched, changed')

    # ---- one case ----------------------------------------------------------

    def one(self, event: str, err: int, mode: str, backing: bool) -> str:
        for w in self.writes:
            w.ok = False
        self.fresh(backing)
        old = self.old_content(backing)
        len_before = os.path.getsize(self.img)

        rc, lines = self.run_faulty(event, err, mode)
        flushed = rc == 0
        failed_w, failed_r, msgs = self.parse(lines, err)
        self.log.write('failed writes: ' + ', '.join(
            f'{w.off:#x}+{w.len:#x}' for w in self.writes if not w.ok) + '\n')
        self.log.write(f'writes failed {failed_w}, reads failed {failed_r}, '
                       f'flush {"ok" if flushed else "failed"}, driver '
                       f'messages {msgs}\n')
        if mode == 'once' and failed_w + failed_r > 1:
            raise Failure(f'one injected error, but {failed_w} writes and '
                          f'{failed_r} reads failed')
        if mode != 'once' and flushed and failed_w + failed_r == 0:
            raise Failure('the injection was never seen: no request and no '
                          'flush failed')

        # Where the driver wrote
        allocs, alloc_end = self.allocations()
        # the clusters of the file before the run (header, L1 table, L2
        # tables, data), and what the driver allocated
        allowed = set(range(-(-len_before // CS)))
        for o, n in allocs:
            allowed.update(range(o // CS, (o + n) // CS))
        stray = sorted(self.nonzero_clusters() - allowed)
        if stray:
            raise Failure(f'data outside the image\'s clusters: file '
                          f'offset {stray[0] * CS:#x} '
                          f'({len(stray)} clusters)')
        length = os.path.getsize(self.img)
        # (the image is clean before the run: a close that moves clusters
        # into the space of failed writes never ends below its old length)
        want = max(-(-len_before // CS) * CS, alloc_end)
        if length != want:
            raise Failure(f'the file is {length:#x} bytes after the run, '
                          f'expected {want:#x} (end of the last cluster)')

        # Consistency before repair
        # (with a backing file too: a failed writeback keeps the bit, and
        # the grow-ahead tail lives only under it)
        dirty = bool(self.features() & NEED_CHECK)
        status, corrupt, _ = self.check(self.qemu_img, 'our (before repair)')
        if status not in (0, 2, 3) or (corrupt and not dirty):
            raise Failure(f'before repair, NEED_CHECK '
                          f'{"set" if dirty else "clear"}: our check exits '
                          f'{status} with {corrupt} corruptions')
        # Repair, then everything clean (after a repair qemu-img checks
        # again and reports what that second check found)
        # Leaks that clusters in use follow cannot go (nothing is moved):
        # they stay counted, exit 3
        status, corrupt, j = self.check(self.qemu_img, 'our', repair=True)
        if status != (3 if j.get('leaks', 0) else 0) or corrupt:
            raise Failure(f'our check -r all exits {status}, leaving '
                          f'{corrupt} corruptions or errors, '
                          f'{j.get("leaks", 0)} leaks')
        # The peer counts the same leaks: every unreferenced cluster
        status, corrupt, pj = self.check(self.peer_img,
                                         'the peer\'s (after repair)')
        if status not in (0, 3) or corrupt or \
                pj.get('leaks', 0) != j.get('leaks', 0):
            raise Failure(f'after repair the peer\'s check exits {status} '
                          f'({pj.get("leaks", 0)} leaks, ours '
                          f'{j.get("leaks", 0)}): {pj}')
        if self.features() & NEED_CHECK:
            raise Failure('NEED_CHECK still set after repair')
        if os.path.getsize(self.img) != j.get('image-end-offset'):
            raise Failure(f'after repair the file is '
                          f'{os.path.getsize(self.img):#x} bytes, the check '
                          f'says the image ends at '
                          f'{j.get("image-end-offset", 0):#x}')

        self.verify_data(old, flushed)
        return (f'{sum(w.ok for w in self.writes)} writes ok, {failed_w} '
                f'failed, {failed_r} reads failed, flush '
                f'{"ok" if flushed else "failed"}, dirty {dirty}')

    def cases(self):
        """The cases to run: all of them with --all; else (writeback) both
        errnos in the once and sticky modes over a backing file, and one
        errno (by turns) in the other cases; (writethrough) one errno, over
        a backing file in the once and each modes, without one in the each
        mode"""
        a = self.args
        for event in EVENTS:
            for backing in (True, False):
                if not backing and event in BACKING_ONLY:
                    continue
                for mode in MODES:
                    turn = EVENTS.index(event) + MODES.index(mode) + backing
                    one_errno = [(5, 28)[turn % 2]]
                    if a.all:
                        errnos = [5, 28]
                    elif a.cache == 'writethrough':
                        if mode == 'sticky' or (not backing and
                                                mode == 'once'):
                            continue
                        errnos = one_errno
                    elif backing and mode != 'each':
                        errnos = [5, 28]
                    else:
                        errnos = one_errno
                    for err in errnos:
                        if ((a.event and event != a.event) or
                                (a.backing and backing != (a.backing == 'yes'))
                                or (a.mode and mode != a.mode) or
                                (a.errno and err != a.errno)):
                            continue
                        yield event, err, mode, backing

    def main(self) -> int:
        failures = 0
        n = 0
        for event, err, mode, backing in self.cases():
            n += 1
            name = (f'{event} errno={err} {mode}, '
                    f'{"backing file" if backing else "no backing file"}')
            self.log.write(f'=== {name}\n')
            try:
                detail = self.one(event, err, mode, backing)
                self.log.write(f'ok: {detail}\n')
                if self.args.verbose:
                    print(f'{name}: {detail}')
                print(f'{name}: ok')
            except Failure as e:
                failures += 1
                self.log.write(f'FAILED: {e}\n')
                print(f'{name}: FAILED: {e}')
                if self.args.keep:
                    keep = os.path.join(self.args.workdir,
                                        f'fault-failed-{n}.qed')
                    if os.path.exists(self.img):
                        shutil.copy2(self.img, keep)
                    print(f'  (image kept as {keep}, log in '
                          f'{self.log.name})')
            self.log.flush()
        print(f'{n} cases, {failures} failed')
        return 1 if failures else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--workdir', required=True)
    p.add_argument('--event', choices=EVENTS)
    p.add_argument('--errno', type=int, choices=sorted(ERRNOS))
    p.add_argument('--mode', choices=MODES)
    p.add_argument('--backing', choices=['yes', 'no'])
    p.add_argument('--cache', default='writeback',
                   choices=['writeback', 'writethrough'])
    p.add_argument('--all', action='store_true',
                   help='every event, both errnos, all modes')
    p.add_argument('--keep', action='store_true',
                   help='keep the image of a failed case')
    p.add_argument('-v', '--verbose', action='store_true')
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, 'qed-fault.log'), 'w') as log:
        try:
            return Faults(args, log).main()
        except Failure as e:
            print(f'error: {e}')
            return 1


if __name__ == '__main__':
    sys.exit(main())

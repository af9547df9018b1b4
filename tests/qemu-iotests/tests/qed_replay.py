#!/usr/bin/env python3
#
# QED crash states by write-log replay.
#
# Killing a writer (qed_crash.py) only shows the crash states that the host
# page cache happens to allow.  This tool checks the states a power cut can
# leave, the way file systems are tested with dm-log-writes:
#
#  1. Record.  A workload runs through our qemu-io with the image file under
#     the base's blklogwrites filter, which logs every write, discard and
#     flush that reaches the file, in order (dm-log-writes format; a write
#     is logged once it completed, so the log order is a completion order).
#     Truncates pass through unlogged.  qemu-io runs with the guest's write
#     cache on (-t writeback: its default, writethrough, would flush after
#     every write).  With --aio MODE the image file is opened as production
#     opens it, file.aio=MODE,file.cache.direct=on (libvirt's cache=none,
#     io=MODE).  The image file is copied before the workload: the
#     replay's starting point.  qemu-io is driven through a
#     pipe, so the tool knows which of its writes were acknowledged before
#     each guest flush started (the "wrote" lines before a marker command
#     sent ahead of the flush) and how far the log was when the flush
#     returned (the log superblock, which blklogwrites updates at every
#     flush).  Each workload is rounds of requests issued at once, each
#     round ending with a guest flush: after a drain (aio_flush), once half
#     of the round's writes are acknowledged, or right after they are
#     issued (the last two with writes in flight).
#
#  2. Replay.  The log's flushes split it into intervals.  A power cut in
#     interval i leaves every entry before it and any subset of its own
#     writes and discards.  For each interval: the state right after its
#     flush, the in-order prefixes, then every subset when there are few,
#     else random ones.  Identical images are counted once (a state whose
#     image equals the next flush's state is that state).  The file size is
#     the larger of the starting size and the end of the landed writes (a
#     lost size change); one state in four has a grown, sparse tail instead
#     (a size change that landed).
#
#  3. Check each state (NEED_CHECK may be set with a backing file too: the
#     grow-ahead tail exists only under it, crash ordering 8): open
#     it read-write through our driver (which repairs a dirty image) and
#     read back in the same qemu-io: every sector holds what the writes
#     acknowledged before the last guest flush the state includes say, or a
#     value a later write (or discard) could have left; NEED_CHECK is clear
#     after the close; then our `qemu-img check` and the reference peer's
#     find no corruption (exit 0, or 3 for leaks).
#
#   qed_replay.py [--workdir DIR] [--states N] [--seed S] [--jobs J]
#                 [--workloads NAME,...] [--aio native|io_uring]
#                 [--faildir DIR] [--keep] [-v]
#   qed_replay.py --repair [--torn] [--drop-flushes] [the options above
#                 but --aio]
#
# --repair records our `qemu-img check -r leaks` instead of guest
# workloads, on images with leaks inside the file made by hand, and checks
# that every power-cut state of it still holds the guest data, checks
# clean and repairs clean (see "repair mode" below).  --torn lets writes
# to the tables land sector by sector.  --drop-flushes replays the logs as
# if they held no flush, a repair with a broken order: its states are
# expected to fail (qed-crash-replay-repair shows that they do).
#
# Environment: QEMU_IMG_PROG, QEMU_IO_PROG (default: the repository's build,
# .base/qemu/build/), PEER_QEMU_IMG (default /usr/bin/qemu-img).  The
# binaries are copied into DIR first, so that a rebuild meanwhile does not
# change what is tested.  The seed chooses the workloads' requests and the
# sampled subsets; the recorded logs vary from run to run (completion
# order), so a failing state is kept (image before and after the repair, a
# description and the commands to replay it) in the failure folder.
#
# Ends with "crash states: N checked, M failed (seed S)"; exit status 1 if
# any state failed, 2 if the harness itself could not run.
#
# Limits.  blklogwrites logs a flush when it completes, so a write that
# completes while a flush is in progress is logged before it and replayed
# as covered by it; a driver that counted on a flush for a write it had not
# seen complete is caught only when that write is slower than the flush
# (recording on tmpfs makes flushes cheap, to give such races a chance;
# with --aio the image is recorded in the scratch folder instead, which must
# support O_DIRECT, and only the log stays on tmpfs).
# A logged write lands whole or not at all (no torn sectors; with --repair
# --torn, writes to the tables land sector by sector).  One crash
# per run: states are not opened, written and crashed again.
#
# This work is licensed under the terms of the GNU GPL, version 2 or later.
# See the COPYING file in the top-level directory.

import argparse
import bisect
import ctypes
import ctypes.util
import hashlib
import multiprocessing
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Tuple

import qed_poke

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
SECTOR = 512

# dm-log-writes, as block/blklogwrites.c writes it
LOG_FLUSH = 1 << 0
LOG_FUA = 1 << 1
LOG_DISCARD = 1 << 2
LOG_MARK = 1 << 3
LOG_MAGIC = 0x6a736677736872

QED_NEED_CHECK = 0x2
BACK_VALUES = (251, 252, 253, 254, 255)   # backing file pattern
BACK_BLOCK = 64 * KiB                     # ... one value per block
PATTERNS = 250                            # write values 1..250; 0 = zeros
GROW_TAIL = 32 * MiB                      # the driver grows files this much

TOP = os.path.realpath(os.path.join(os.path.dirname(
    os.path.realpath(__file__)), '..', '..', '..'))
BUILD = os.path.join(TOP, '.base', 'qemu', 'build')


class HarnessError(Exception):
    pass


def run(args: List[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True,
                          **kw)


def fmt_size(n: int) -> str:
    for unit, v in (('G', GiB), ('M', MiB), ('K', KiB)):
        if n % v == 0 and n >= v:
            return f'{n // v}{unit}'
    return str(n)


# ---- workloads ---------------------------------------------------------------

class Op:
    """One request of the workload.  kind: 'w' data (value), 'z' zeroes,
    'd' discard, 't' truncate (to off).  ack: index of the output event
    that acknowledged it; after_p: log position of the last guest flush
    that had returned when it was issued (its entries come later)."""

    def __init__(self, kind: str, off: int, length: int, value: int = 0,
                 sync: bool = False, unmap: bool = False):
        self.kind = kind
        self.off = off
        self.len = length
        self.value = value
        self.sync = sync
        self.unmap = unmap
        self.ack = -1
        self.after_p = 0

    def end(self) -> int:
        return self.off + self.len

    def command(self) -> str:
        if self.kind == 'w':
            return f'aio_write -P {self.value} {self.off} {self.len}'
        if self.kind == 'z':
            if self.sync:
                u = ' -u' if self.unmap else ''
                return f'write -z{u} {self.off} {self.len}'
            return f'aio_write -z {self.off} {self.len}'
        if self.kind == 'd':
            return f'discard {self.off} {self.len}'
        return f'truncate {self.off}'

    def __repr__(self) -> str:
        return self.command()


class Workload:
    """A workload: geometry, backing file, generated rounds of requests"""

    def __init__(self, name: str, cluster: int, backing: str, variant: str,
                 rounds: int):
        self.name = name
        self.cluster = cluster
        self.backing = backing          # 'none', 'raw', 'qed'
        self.variant = variant          # 'A' allocation burst, 'B' mixed
        self.rounds_n = rounds
        self.table_size = 2             # the peer refuses table_size=1
        self.l2_span = self.table_size * cluster // 8 * cluster
        if cluster == 4 * KiB:
            self.size = 16 * MiB
            self.grow_to = 20 * MiB
            self.windows = [(0, self.grow_to)]
            self.back_size = 16 * MiB
        else:
            self.size = 3 * GiB
            self.grow_to = 3 * GiB + 64 * MiB
            self.windows = [(0, 2 * MiB), (1 * GiB - 1 * MiB, 1 * GiB + 1 * MiB),
                            (2 * GiB - 512 * KiB, 2 * GiB + 512 * KiB),
                            (3 * GiB, 3 * GiB + 1 * MiB)]
            self.back_size = 3 * GiB
        # filled by generate() and record()
        self.rounds: List[Tuple[str, List[Op], List[int]]] = []
        self.ops: List[Op] = []
        self.flushes: List[Tuple[int, int]] = []   # (pre-marker event, P)
        self.entries: List[tuple] = []
        self.log_data = b''
        self.snapshot = ''
        self.snap_size = 0
        self.back_path = ''

    def init_value(self, off: int) -> int:
        """Content before the workload at guest offset @off"""
        if self.backing != 'none' and off < self.back_size and \
                self.in_pattern(off):
            return BACK_VALUES[(off // BACK_BLOCK) % len(BACK_VALUES)]
        return 0

    def in_pattern(self, off: int) -> bool:
        return any(a <= off < b for a, b in self.pattern_regions())

    def pattern_regions(self) -> List[Tuple[int, int]]:
        return [(a, min(b, self.back_size)) for a, b in self.windows
                if a < self.back_size]

    # -- generation --

    def generate(self, rng: random.Random) -> None:
        value = rng.randrange(PATTERNS)
        written: List[Tuple[int, int]] = []
        size = self.size
        cs = self.cluster

        def next_value() -> int:
            nonlocal value
            value = value % PATTERNS + 1
            return value

        def windows_now() -> List[Tuple[int, int]]:
            return [(a, min(b, size)) for a, b in self.windows if a < size]

        def free(busy: List[Tuple[int, int]], off: int, n: int) -> bool:
            return all(off + n <= a or b <= off for a, b in busy)

        def pick(busy, kind: str) -> Optional[Tuple[int, int]]:
            for _ in range(50):
                wins = windows_now()
                a, b = rng.choice(wins)
                r = rng.random()
                if kind == 'rewrite' and written:
                    wa, wn = rng.choice(written)
                    n = rng.randrange(1, wn // SECTOR + 1) * SECTOR
                    off = wa + rng.randrange(0, (wn - n) // SECTOR + 1) * \
                        SECTOR
                elif kind == 'written_clusters' and written:
                    # whole clusters around data written before
                    wa, wn = rng.choice(written)
                    off = wa // cs * cs
                    n = -(-(wa + wn) // cs) * cs - off
                elif kind == 'clusters':
                    n = rng.randint(1, 4) * cs
                    off = a + rng.randrange(0, max(1, (b - a - n) // cs)) * cs
                elif kind == 'cross':
                    bounds = [k * self.l2_span for k in
                              range(1, size // self.l2_span + 1)
                              if a < k * self.l2_span < b]
                    if not bounds:
                        continue
                    x = rng.choice(bounds)
                    before = rng.randint(1, 3 * cs // SECTOR) * SECTOR
                    after = rng.randint(1, 3 * cs // SECTOR) * SECTOR
                    off, n = x - before, before + after
                elif r < 0.35:
                    # part of a cluster (copy-on-write of the rest)
                    n = rng.randint(1, max(1, cs // SECTOR // 2)) * SECTOR
                    n = min(n, 16 * KiB)
                    off = a + rng.randrange(0, (b - a - n) // SECTOR) * SECTOR
                elif r < 0.7:
                    n = rng.randint(1, 2) * cs
                    off = a + rng.randrange(0, (b - a - n) // cs) * cs
                else:
                    n = rng.randint(cs // SECTOR, 4 * cs // SECTOR) * SECTOR
                    n = min(n, 256 * KiB)
                    off = a + rng.randrange(0, (b - a - n) // SECTOR) * SECTOR
                if off < a or off + n > b or n <= 0:
                    continue
                if free(busy, off, n):
                    return off, n
            return None

        for r in range(self.rounds_n):
            busy: List[Tuple[int, int]] = []
            ops: List[Op] = []
            if self.variant == 'A':
                mode = rng.choice(['drain', 'drain', 'inflight'])
                nwrites = rng.randint(12, 24) if cs == 4 * KiB else \
                    rng.randint(8, 14)
                kinds = ['fresh'] * nwrites
                if r > 0:
                    kinds += ['rewrite'] * rng.randint(0, 4)
                kinds += ['cross'] * rng.randint(1, 2)
            else:
                mode = rng.choice(['drain', 'inflight', 'submit'])
                kinds = ['fresh'] * rng.randint(4, 10)
                kinds += ['rewrite'] * (rng.randint(1, 5) if r else 0)
                kinds += ['cross'] * rng.randint(0, 1)
                kinds += ['zero'] * rng.randint(0, 2)
                kinds += ['szero'] * rng.randint(0, 1)
                kinds += ['discard'] * (rng.randint(1, 3) if r else 0)
                if r == self.rounds_n // 2 - 1:
                    t = Op('t', self.grow_to, 0)
                    ops.append(t)
                    size = self.grow_to
            rng.shuffle(kinds)
            for kind in kinds:
                if kind in ('fresh', 'rewrite', 'cross'):
                    got = pick(busy, kind)
                    if got:
                        ops.append(Op('w', got[0], got[1], next_value()))
                elif kind in ('zero', 'szero'):
                    got = pick(busy, 'clusters' if rng.random() < 0.6
                               else 'fresh')
                    if got:
                        ops.append(Op('z', got[0], got[1],
                                      sync=(kind == 'szero'),
                                      unmap=rng.random() < 0.5))
                elif kind == 'discard':
                    got = pick(busy, rng.choice(('written_clusters',
                                                 'written_clusters',
                                                 'clusters', 'rewrite')))
                    if got:
                        ops.append(Op('d', got[0], got[1], sync=True))
                else:
                    continue
                if got:
                    busy.append((got[0], got[0] + got[1]))
                    if kind in ('fresh', 'rewrite', 'cross'):
                        written.append(got)
            # inflight: guest flushes once this many writes are acknowledged
            nbody = sum(1 for op in ops if op.kind != 't')
            marks = sorted(rng.sample(range(1, nbody + 1),
                                      min(nbody, rng.randint(1, 2))))
            self.rounds.append((mode, ops, marks if nbody else [0]))

    # -- description --

    def describe(self) -> str:
        return (f'{self.name}: cluster_size {fmt_size(self.cluster)}, '
                f'table_size {self.table_size}, size {fmt_size(self.size)}, '
                f'backing {self.backing}, variant {self.variant}')


def all_workloads(rounds: int) -> List[Workload]:
    wls = []
    for cs in (4 * KiB, 64 * KiB):
        for backing in ('none', 'raw', 'qed'):
            for variant in ('A', 'B'):
                name = f'{cs // KiB}k-{backing}-{variant}'
                wls.append(Workload(name, cs, backing, variant, rounds))
    return wls


# ---- recording -----------------------------------------------------------------

MARKER_RE = re.compile(r'^\d+(\.\d+)? (bytes|KiB|MiB|GiB|TiB|PiB|EiB)$')
WROTE_RE = re.compile(r'^wrote (\d+)/(\d+) bytes at offset (\d+)$')
DISCARD_RE = re.compile(r'^discard (\d+)/(\d+) bytes at offset (\d+)$')


class Session:
    """Our qemu-io driven through a pipe; its output becomes numbered
    events: acknowledgements ('wrote'/'discard') and markers ('length')"""

    def __init__(self, args: List[str], transcript):
        self.proc = subprocess.Popen(
            ['stdbuf', '-i0', '-oL', '-eL'] + args, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            universal_newlines=True, bufsize=1)
        self.cond = threading.Condition()
        self.events: List[Tuple[str, int]] = []
        self.markers: List[int] = []
        self.errors: List[str] = []
        self.eof = False
        self.transcript = transcript
        self.thread = threading.Thread(target=self.reader, daemon=True)
        self.thread.start()

    def reader(self) -> None:
        for line in self.proc.stdout:
            line = line.replace('qemu-io> ', '').strip()
            if not line:
                continue
            self.transcript.write(f'< {line}\n')
            if ' ops; ' in line:
                continue
            with self.cond:
                m = WROTE_RE.match(line) or DISCARD_RE.match(line)
                if m:
                    kind = 'w' if line.startswith('wrote') else 'd'
                    self.events.append((kind, int(m.group(3))))
                elif MARKER_RE.match(line):
                    self.markers.append(len(self.events))
                    self.events.append(('m', 0))
                else:
                    self.errors.append(line)
                self.cond.notify_all()
        self.proc.stdout.close()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def send(self, text: str) -> None:
        self.transcript.write(''.join(f'> {x}\n' for x in text.splitlines()))
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def wait(self, done, what: str) -> None:
        """Wait (with the lock held) until done() is true"""
        deadline = time.monotonic() + 120
        while not done():
            if self.errors:
                raise HarnessError('qemu-io: ' + '; '.join(self.errors))
            if self.eof:
                raise HarnessError('qemu-io exited early')
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f'qemu-io: no {what} for 120 s')
            self.cond.wait(left)
        if self.errors:
            raise HarnessError('qemu-io: ' + '; '.join(self.errors))

    def markers_after(self, text: str) -> List[int]:
        """Send @text, whose 'length' commands are markers; return the
        markers' event indices once they have all appeared"""
        n = text.split('\n').count('length')
        with self.cond:
            want = len(self.markers) + n
        self.send(text)
        with self.cond:
            self.wait(lambda: len(self.markers) >= want, 'reply')
            return self.markers[want - n:want]

    def marker(self) -> int:
        """Send a marker; return its event index once it has appeared"""
        return self.markers_after('length\n')[0]

    def acks_since(self, first: int, n: int) -> None:
        """Wait until @n acknowledgements follow event @first"""
        with self.cond:
            self.wait(lambda: sum(1 for k, _ in self.events[first:]
                                  if k != 'm') >= n, 'acknowledgement')

    def close(self) -> None:
        self.send('quit\n')
        self.proc.stdin.close()
        self.proc.wait(120)
        self.thread.join(10)
        if self.errors:
            raise HarnessError('qemu-io: ' + '; '.join(self.errors))
        if self.proc.returncode != 0:
            raise HarnessError(f'qemu-io exited with {self.proc.returncode}')


def log_superblock_entries(path: str) -> int:
    with open(path, 'rb') as f:
        sb = f.read(28)
    if len(sb) < 28 or sb == bytes(28):
        # No flush has reached the log yet: entries start at sector 1, so
        # sector 0 may still be a hole.  (A flush with no completed write
        # since the last one never reaches blklogwrites.)
        return 0
    magic, version, nr, _ = struct.unpack('<QQQI', sb)
    if magic != LOG_MAGIC or version != 1:
        raise HarnessError(f'{path}: not a dm-log-writes log')
    return nr


def parse_log(path: str) -> Tuple[List[tuple], bytes]:
    """Entries ('w', off, len, data_off) / ('d', off, len) / ('f',)"""
    with open(path, 'rb') as f:
        data = f.read()
    magic, version, nr, ss = struct.unpack_from('<QQQI', data, 0)
    if magic != LOG_MAGIC or version != 1:
        raise HarnessError(f'{path}: not a dm-log-writes log')
    entries: List[tuple] = []
    pos = ss
    while pos + 32 <= len(data):
        sector, n, flags, _ = struct.unpack_from('<QQQQ', data, pos)
        if flags & ~(LOG_FLUSH | LOG_FUA | LOG_DISCARD | LOG_MARK):
            raise HarnessError(f'{path}: bad flags at {pos}')
        pos += ss
        if flags & LOG_FLUSH:
            entries.append(('f',))
        elif flags & LOG_DISCARD:
            entries.append(('d', sector * ss, n * ss))
        elif flags & LOG_MARK:
            continue
        else:
            if n == 0:
                break           # never written (cannot happen)
            entries.append(('w', sector * ss, n * ss, pos))
            pos += n * ss
    if len(entries) < nr:
        raise HarnessError(f'{path}: {len(entries)} entries, superblock '
                           f'says {nr}')
    return entries, data


class RecorderBase:
    """What both recorders share: the binaries, the folders, and a backing
    file only where the workload has one"""

    def __init__(self, bins: Dict[str, str], workdir: str, fastdir: str):
        self.bins = bins
        self.workdir = workdir
        # The image and the log live in memory (tmpfs) while recording:
        # flushes cost little there, so they race with the writes around
        # them (see "Limits" above).  O_DIRECT (--aio) needs a disk file
        # system for the image.
        self.fastdir = fastdir

    def make_backing(self, wl: Workload) -> str:
        """The backing file of WL ('' for none)"""
        return '' if wl.backing == 'none' else self.write_backing(wl)

    def write_backing(self, wl: Workload) -> str:
        raise NotImplementedError


class Recorder(RecorderBase):
    def __init__(self, bins: Dict[str, str], workdir: str, fastdir: str,
                 aio: Optional[str] = None):
        super().__init__(bins, workdir, fastdir)
        self.aio = aio

    def write_backing(self, wl: Workload) -> str:
        raw = os.path.join(self.workdir, f'back-{wl.cluster // KiB}k.raw')
        if not os.path.exists(raw):
            with open(raw + '.tmp', 'wb') as f:
                for a, b in wl.pattern_regions():
                    for off in range(a, b, BACK_BLOCK):
                        f.seek(off)
                        f.write(bytes([wl.init_value(off)]) *
                                min(BACK_BLOCK, b - off))
                f.truncate(wl.back_size)
            os.rename(raw + '.tmp', raw)
        if wl.backing == 'raw':
            return raw
        q = os.path.join(self.workdir, f'back-{wl.cluster // KiB}k.qed')
        if not os.path.exists(q):
            r = run([self.bins['img'], 'convert', '-f', 'raw', '-O', 'qed',
                     raw, q + '.tmp'])
            if r.returncode != 0:
                raise HarnessError(f'qed backing file: {r.stdout}')
            os.rename(q + '.tmp', q)
        return q

    def record(self, wl: Workload) -> None:
        base = os.path.join(self.workdir, wl.name)
        fast = os.path.join(self.fastdir, wl.name)
        img, log = fast + '.qed', fast + '.log'
        if self.aio:
            img = base + '.rec.qed'
        for f in (img, log):
            if os.path.exists(f):
                os.remove(f)
        back = self.make_backing(wl)
        wl.back_path = back
        cmd = [self.bins['img'], 'create', '-f', 'qed', '-o',
               f'cluster_size={wl.cluster},table_size={wl.table_size}']
        if back:
            cmd += ['-b', back, '-F', wl.backing]
        r = run(cmd + [img, str(wl.size)])
        if r.returncode != 0:
            raise HarnessError(f'qemu-img create: {r.stdout}')
        wl.snapshot = base + '.snap'
        shutil.copyfile(img, wl.snapshot)
        wl.snap_size = os.path.getsize(wl.snapshot)
        open(log, 'wb').close()

        opts = ('driver=qed,file.driver=blklogwrites,'
                f'file.file.driver=file,file.file.filename={img},'
                f'file.log.driver=file,file.log.filename={log},'
                'file.log-sector-size=512')
        if self.aio:
            opts += (f',file.file.aio={self.aio},'
                     'file.file.cache.direct=on')
        with open(base + '.transcript', 'w') as tr:
            s = Session([self.bins['io'], '-t', 'writeback', '--image-opts',
                         opts], tr)
            try:
                self.drive(wl, s, log)
            finally:
                if s.proc.poll() is None:
                    try:
                        s.close()
                    except Exception:
                        s.proc.kill()
                # 10.0's check shows ResourceWarnings (PYTHONWARNINGS)
                if not s.proc.stdin.closed:
                    try:
                        s.proc.stdin.close()
                    except OSError:
                        pass
        wl.entries, wl.log_data = parse_log(log)
        os.remove(img)
        os.remove(log)

    def drive(self, wl: Workload, s: Session, log: str) -> None:
        last_p = 0
        s.marker()
        for mode, ops, marks in wl.rounds:
            pending: Dict[Tuple[str, int], Op] = {}
            body = []
            for op in ops:
                op.after_p = last_p
                wl.ops.append(op)
                if op.kind == 't':
                    s.send(op.command() + '\n')
                    op.ack = s.marker()
                    continue
                pending[('d' if op.kind == 'd' else 'w', op.off)] = op
                body.append(op.command())
            seen = len(s.events)
            s.send(''.join(c + '\n' for c in body))
            if mode == 'drain':
                # every write acknowledged, table updates landed (drain)
                s.send('aio_flush\n')
            if mode != 'inflight':
                marks = [0]
            for n in marks:
                # inflight: flushes while writes are in flight, and the
                # table updates of those just acknowledged may be too
                s.acks_since(seen, n)
                # (a flush starts after the marker before it has printed:
                # a write acknowledged before that marker must be durable)
                pre, _ = s.markers_after('length\nflush\nlength\n')
                p = log_superblock_entries(log)
                wl.flushes.append((pre, p))
                last_p = p
            if mode != 'drain':
                s.send('aio_flush\n')
                s.marker()
            with s.cond:
                events = s.events[seen:]
                base = seen
            for i, (kind, off) in enumerate(events):
                if kind == 'm':
                    continue
                op = pending.pop((kind, off), None)
                if op is None:
                    raise HarnessError(f'unexpected acknowledgement {kind} '
                                       f'{off}')
                op.ack = base + i
            if pending:
                raise HarnessError(f'requests never acknowledged: '
                                   f'{list(pending.values())}')
        s.close()


# ---- repair mode: `qemu-img check -r leaks` moving clusters ----------------
#
# With --repair the workloads are not guest requests but images with leaks
# inside the file, made by hand (entries set to 0 with qed_poke.py's
# helpers), and the recorded program is our `qemu-img check -r leaks`,
# which moves the last clusters in use (data clusters and L2 tables) into
# the holes: copy, flush, rewrite the entry, flush, punch the old place,
# and at the end cut the file (crash ordering 10 of docs/interop/
# qed_spec.txt).  The log is replayed as for the other workloads; the cut
# (a truncate, unlogged) comes after the last write's flush, so a state
# after that flush may have it or not (both are checked right after a flush
# and with everything landed, one or the other for the subsets between).
# Each state must hold exactly the guest data the image held before the
# repair (our `qemu-img compare` against a raw copy our qemu-img converted
# before), have NEED_CHECK clear (moving clusters never sets it), and check
# with no corruption by ours and by the peer (exit 0 or 3); after each
# flush, with the cut, and in one state in four else, our `check -r leaks`
# run again (the repair resumed after the crash) must end clean (exit 0)
# with the same data.

class RepairWorkload(Workload):
    """An image with leaks inside the file and the log of its repair.
    case: 'l2' (L2 entries set to 0, a guest discard, a partial write, a
    sparse tail), 'l1' (an L1 entry set to 0: a table's run of clusters;
    with 4 KiB clusters more moves than one batch), 'slide' (a one-cluster
    hole while the last thing in use is an L2 table: no hole fits it, so
    the tables after the hole move past the end and back, twice each)"""

    def __init__(self, name: str, cluster: int, backing: str, case: str):
        super().__init__(name, cluster, backing, 'R', 0)
        self.case = case
        self.table_size = 4 if cluster == 64 * KiB else 2
        self.l2_span = self.table_size * cluster // 8 * cluster
        self.size = 4 * self.l2_span
        self.back_size = self.size
        self.windows = [(0, self.size)]
        self.reference = ''         # raw copy of the guest data before
        self.final_size = 0         # the file's length after the repair
        self.last_write = -1        # log index of the last write entry
        self.start_leaks = 0        # inner leaks before (clusters)
        self.moves: List[Tuple[int, int, int, bool]] = []   # trace
        self.twice = 0              # tables moved twice
        self.summary = ''
        self.drop_flushes = False

    def requests(self) -> List[Tuple[str, int, int]]:
        """What our qemu-io writes before the leaks are made, in order
        (tables are made before their data, so the file holds, in order:
        each table then its clusters)"""
        cs, t = self.cluster, self.l2_span
        if self.case == 'l2':
            return [('w', 0, 4 * cs), ('w', t, 3 * cs), ('w', 2 * t, 4 * cs),
                    # two entries of table 3 in different sectors: one
                    # write of both sectors moves them
                    ('w', 3 * t + 5 * cs, cs), ('w', 3 * t + 100 * cs, cs),
                    # one cluster: the rest copied from the backing file
                    ('w', t + 3 * cs + SECTOR, 2 * SECTOR),
                    # a guest discard: the cluster is a hole in the file
                    ('d', 2 * t + cs, cs)]
        if self.case == 'l1':
            n = 300 if cs == 4 * KiB else 3
            return [('w', 0, 3 * cs), ('w', t, n * cs), ('w', 2 * t, n * cs),
                    ('w', 3 * t, 2 * cs), ('w', 10 * cs, cs)]
        return [('w', 0, 4 * cs), ('w', t, 2 * cs), ('w', 2 * t, 3 * cs),
                ('w', 3 * t, cs)]

    def pokes(self) -> List[tuple]:
        """The leaks: ('l1', i, value) / ('l2', i, j, value), where a value
        ('l2', i, j) is that entry's value at the time"""
        if self.case == 'l2':
            return [('l2', 0, 1, 0), ('l2', 1, 0, 0), ('l2', 2, 3, 0)]
        if self.case == 'l1':
            return [('l1', 1, 0), ('l2', 0, 1, 0)]
        # Table 3 maps the second cluster of table 0 instead of its own
        # cluster (which becomes a trailing leak): the last thing in use
        # is table 3; a one-cluster hole inside table 1's clusters
        return [('l2', 3, 0, ('l2', 0, 1)), ('l2', 0, 1, 0),
                ('l2', 1, 1, 0)]

    def tail(self) -> int:
        """Clusters of sparse tail added after the leaks"""
        return 3 if self.case == 'l2' else 0

    def cut_allowed(self, iv: 'Interval', mask: int) -> bool:
        """May the file's final cut have landed in this state?  It is
        issued after the last write's flush; with flushes dropped, once
        every write landed"""
        if self.drop_flushes:
            landed, _, _ = guarantee(self, iv, mask)
            return landed > self.last_write
        return iv.start > self.last_write


def repair_workloads() -> List[RepairWorkload]:
    wls = []
    for cs in (64 * KiB, 4 * KiB):
        for case in ('l2', 'l1', 'slide'):
            for backing in ('none', 'raw'):
                name = f'rep-{cs // KiB}k-{case}-{backing}'
                wls.append(RepairWorkload(name, cs, backing, case))
    return wls


class Layout:
    """What the clusters of a QED file hold: 'header', 'L1',
    ('table', l1i) or ('data', l1i, l2i)"""

    def __init__(self, path: str):
        with open(path, 'rb') as f:
            h = qed_poke.read_header(f)
            self.cs, self.ts = h['cluster_size'], h['table_size']
            self.features = h['features']
            n = qed_poke.table_nelems(h)
            self.used: Dict[int, object] = {}
            for c in range(h['header_size']):
                self.used[c] = 'header'
            self.l1_offset = h['l1_table_offset']
            for c in range(self.ts):
                self.used[self.l1_offset // self.cs + c] = 'L1'
            f.seek(self.l1_offset)
            self.l1 = struct.unpack(f'<{n}Q', f.read(8 * n))
            for i, t in enumerate(self.l1):
                if not t:
                    continue
                for c in range(self.ts):
                    self.used[t // self.cs + c] = ('table', i)
                f.seek(t)
                for j, e in enumerate(struct.unpack(f'<{n}Q',
                                                    f.read(8 * n))):
                    if e > 1:
                        self.used[e // self.cs] = ('data', i, j)
        self.clusters = -(-os.path.getsize(path) // self.cs)
        self.end = max(self.used) + 1

    def inner_leaks(self) -> List[int]:
        return [c for c in range(self.end) if c not in self.used]

    def table_last(self) -> bool:
        """Is the last cluster in use part of an L2 table, with no run of
        free clusters below it long enough to hold it?"""
        last = self.used[self.end - 1]
        if not (isinstance(last, tuple) and last[0] == 'table'):
            return False
        run = 0
        for c in range(self.end - self.ts):
            run = 0 if c in self.used else run + 1
            if run >= self.ts:
                return False
        return True


def poke(path: str, pokes: List[tuple]) -> None:
    with open(path, 'r+b') as f:
        header = qed_poke.read_header(f)

        def where(p) -> int:
            return qed_poke.entry_location(f, header,
                                           [str(x) for x in p[1:-1]])

        for p in pokes:
            v = p[-1]
            if isinstance(v, tuple):
                v = qed_poke.get_entry(f, qed_poke.entry_location(
                    f, header, [str(x) for x in v[1:]]))
            qed_poke.set_entry(f, where(p), v)


TRACE_MOVE_RE = re.compile(r'qed_compact_move .* (0x[0-9a-f]+) -> '
                           r'(0x[0-9a-f]+) clusters (\d+) table (\d)')


class RepairRecorder(RecorderBase):
    def __init__(self, bins: Dict[str, str], workdir: str, fastdir: str,
                 seed: int, torn: bool, drop_flushes: bool):
        super().__init__(bins, workdir, fastdir)
        self.seed = seed
        self.torn = torn
        self.drop_flushes = drop_flushes

    def write_backing(self, wl: Workload) -> str:
        """Random data in the first 8 clusters of each table's range"""
        assert isinstance(wl, RepairWorkload)
        raw = os.path.join(self.workdir, f'{wl.name}-back.raw')
        rng = random.Random(f'{self.seed}-{wl.name}-back')
        with open(raw, 'wb') as f:
            for t in range(4):
                f.seek(t * wl.l2_span)
                f.write(rng.randbytes(8 * wl.cluster))
            f.truncate(wl.size)
        return raw

    def make_image(self, wl: RepairWorkload, img: str) -> None:
        back = self.make_backing(wl)
        wl.back_path = back
        cmd = [self.bins['img'], 'create', '-f', 'qed', '-o',
               f'cluster_size={wl.cluster},table_size={wl.table_size}']
        if back:
            cmd += ['-b', back, '-F', 'raw']
        r = run(cmd + [img, str(wl.size)])
        if r.returncode != 0:
            raise HarnessError(f'qemu-img create: {r.stdout}')
        # every write its own random data (a misplaced cluster or sector
        # reads differently)
        rng = random.Random(f'{self.seed}-{wl.name}')
        args = [self.bins['io'], '-f', 'qed']
        for n, (kind, off, length) in enumerate(wl.requests()):
            if kind == 'd':
                args += ['-c', f'discard -q {off} {length}']
                continue
            pat = os.path.join(self.workdir, f'{wl.name}-data{n}')
            with open(pat, 'wb') as f:
                f.write(rng.randbytes(length))
            args += ['-c', f'write -q -s {pat} {off} {length}']
        r = run(args + [img])
        if r.returncode != 0 or r.stdout.strip():
            raise HarnessError(f'qemu-io: {r.stdout}')
        poke(img, wl.pokes())
        if wl.tail():
            os.truncate(img, os.path.getsize(img) + wl.tail() * wl.cluster)

    def record(self, wl: RepairWorkload) -> None:
        base = os.path.join(self.workdir, wl.name)
        fast = os.path.join(self.fastdir, wl.name)
        img, log = fast + '.qed', fast + '.log'
        for f in (img, log):
            if os.path.exists(f):
                os.remove(f)
        self.make_image(wl, img)

        lay = Layout(img)
        wl.start_leaks = len(lay.inner_leaks())
        if lay.features & QED_NEED_CHECK:
            raise HarnessError(f'{wl.name}: NEED_CHECK set before the repair')
        if not wl.start_leaks:
            raise HarnessError(f'{wl.name}: no leak inside the file')
        if wl.case == 'slide' and not lay.table_last():
            raise HarnessError(f'{wl.name}: the last thing in use is not an '
                               'L2 table that no hole can hold')
        wl.reference = base + '.raw'
        r = run([self.bins['img'], 'convert', '-f', 'qed', '-O', 'raw', img,
                 wl.reference])
        if r.returncode != 0:
            raise HarnessError(f'qemu-img convert: {r.stdout}')
        # the peer reads the hand-made image as ours does, and both checks
        # see leaks only
        r = run([self.bins['peer'], 'compare', '-f', 'raw', '-F', 'qed',
                 wl.reference, img])
        if r.returncode != 0:
            raise HarnessError(f'{wl.name}: the peer\'s compare before the '
                               f'repair: {r.stdout}')
        for who in ('img', 'peer'):
            r = run([self.bins[who], 'check', '-f', 'qed', img])
            if r.returncode != 3:
                raise HarnessError(f'{wl.name}: {who} check before the '
                                   f'repair exits {r.returncode}, not 3')

        wl.snapshot = base + '.snap'
        shutil.copyfile(img, wl.snapshot)
        wl.snap_size = os.path.getsize(wl.snapshot)
        open(log, 'wb').close()
        opts = ('driver=qed,file.driver=blklogwrites,'
                f'file.file.driver=file,file.file.filename={img},'
                f'file.log.driver=file,file.log.filename={log},'
                'file.log-sector-size=512')
        r = run([self.bins['img'], '--trace', 'qed_compact_move', 'check',
                 '-r', 'leaks', '--image-opts', opts])
        with open(base + '.transcript', 'w') as tr:
            tr.write(r.stdout)
        if r.returncode != 0:
            raise HarnessError(f'{wl.name}: the recorded check -r leaks '
                               f'exits {r.returncode}: {r.stdout}')
        wl.final_size = os.path.getsize(img)
        for m in TRACE_MOVE_RE.finditer(r.stdout):
            wl.moves.append((int(m.group(1), 16), int(m.group(2), 16),
                             int(m.group(3)), m.group(4) == '1'))
        if not wl.moves:
            raise HarnessError(f'{wl.name}: the repair moved nothing')
        # a table moved twice: its second move starts where the first ended
        landed_at = set()
        for frm, to, _, table in wl.moves:
            if table:
                wl.twice += frm in landed_at
                landed_at.add(to)
        if wl.case == 'slide' and not wl.twice:
            raise HarnessError(f'{wl.name}: no table moved twice')
        if wl.case == 'l1' and not any(m[3] for m in wl.moves):
            raise HarnessError(f'{wl.name}: no table moved')

        entries, wl.log_data = parse_log(log)
        if self.torn:
            entries = self.tear(wl, lay, entries)
        wl.last_write = max(i for i, e in enumerate(entries) if e[0] == 'w')
        if self.drop_flushes:
            entries = [e for e in entries if e[0] != 'f']
            wl.last_write = max(i for i, e in enumerate(entries)
                                if e[0] == 'w')
        wl.entries = entries
        wl.drop_flushes = self.drop_flushes
        data = sum(m[2] for m in wl.moves if not m[3])
        tables = sum(1 for m in wl.moves if m[3])
        wl.summary = (f'{wl.name}: {wl.start_leaks} leaked clusters inside '
                      f'the file; the repair moved {data} data clusters and '
                      f'{tables} L2 tables ({wl.twice} moved twice)')
        os.remove(img)
        os.remove(log)

    def tear(self, wl: RepairWorkload, lay: Layout,
             entries: List[tuple]) -> List[tuple]:
        """Torn writes: a write to metadata (the L1 table, or where an L2
        table is or was moved to) shorter than a table lands sector by
        sector, each sector on its own (table updates rewrite the sectors
        of their entries; a one-sector write is atomic)"""
        tb = wl.cluster * wl.table_size
        meta = [(lay.l1_offset, lay.l1_offset + tb)]
        meta += [(t, t + tb) for t in lay.l1 if t]
        meta += [(to, to + tb) for _, to, _, table in wl.moves if table]
        # (a data cluster copied where a table was is not metadata)
        data_to = set(to for _, to, _, table in wl.moves if not table)
        out = []
        for e in entries:
            if e[0] == 'w' and e[2] < tb and e[2] > SECTOR and \
                    any(a < e[1] + e[2] and e[1] < b for a, b in meta) and \
                    not (e[2] == wl.cluster and e[1] in data_to):
                for s in range(0, e[2], SECTOR):
                    out.append(('w', e[1] + s, SECTOR, e[3] + s))
            else:
                out.append(e)
        return out


# ---- replay: intervals, subsets, keys --------------------------------------------

class Interval:
    """Entries [start, end) of a log between two flushes (end is the
    flush's index, or the log's end)"""

    def __init__(self, wl_index: int, index: int, start: int, end: int,
                 has_next: bool):
        self.wl = wl_index
        self.index = index
        self.start = start
        self.end = end
        self.has_next = has_next
        self.k = end - start
        self.prefix_size = 0
        self.seg_ids: List[Dict[int, bytes]] = []  # per entry: segment ids
        self.seg_cover: List[List[int]] = []  # per segment: covering entries
        self.prefix_ids: List[bytes] = []
        self.ends: List[int] = []             # per entry: end if write
        self.key_full = b''
        self.random_only = False    # flushes dropped: no in-order prefixes


def md5(b) -> bytes:
    return hashlib.md5(b).digest()


def prepare_intervals(wl: Workload, wl_index: int) -> List[Interval]:
    """Walk the log once, with the image in memory, and describe every
    interval well enough to tell identical states apart"""
    entries = wl.entries
    flushes = [i for i, e in enumerate(entries) if e[0] == 'f']
    bounds = []
    start = 0
    for f in flushes:
        bounds.append((start, f))
        start = f + 1
    bounds.append((start, len(entries)))
    img, _mask, size = load_snapshot(wl)
    zero_ids: Dict[int, bytes] = {}
    out = []
    for n, (a, b) in enumerate(bounds):
        iv = Interval(wl_index, n, a, b, n + 1 < len(bounds))
        iv.prefix_size = size
        points = set()
        for e in entries[a:b]:
            points.add(e[1])
            points.add(e[1] + e[2])
        pts = sorted(points)
        segs = list(zip(pts, pts[1:]))
        iv.seg_cover = [[] for _ in segs]
        for s, (x, y) in enumerate(segs):
            if x >= len(img):
                piece = b''
            else:
                piece = img[x:min(y, len(img))]
            iv.prefix_ids.append(md5(bytes(piece) + bytes(y - x - len(piece))))
        for j, e in enumerate(entries[a:b]):
            ids = {}
            for s, (x, y) in enumerate(segs):
                if x >= e[1] and y <= e[1] + e[2]:
                    iv.seg_cover[s].append(j)
                    if e[0] == 'w':
                        d = e[3] + (x - e[1])
                        ids[s] = md5(wl.log_data[d:d + (y - x)])
                    else:
                        if y - x not in zero_ids:
                            zero_ids[y - x] = md5(bytes(y - x))
                        ids[s] = zero_ids[y - x]
            iv.seg_ids.append(ids)
            iv.ends.append(e[1] + e[2] if e[0] == 'w' else 0)
        # then the prefix moves past this interval and its flush
        for e in entries[a:b]:
            size = apply_entry(wl, img, None, size, e)
        iv.key_full = state_key(iv, (1 << iv.k) - 1)
        out.append(iv)
    return out


def state_key(iv: Interval, mask: int) -> bytes:
    h = hashlib.md5()
    size = iv.prefix_size
    for j in range(iv.k):
        if mask >> j & 1:
            size = max(size, iv.ends[j])
    h.update(size.to_bytes(8, 'little'))
    for s, cover in enumerate(iv.seg_cover):
        win = None
        for j in cover:
            if mask >> j & 1:
                win = j
        h.update(iv.prefix_ids[s] if win is None else iv.seg_ids[win][s])
    return h.digest()


def subsets(iv: Interval, rng: random.Random):
    """Masks of interval @iv in the order they are taken: the state after
    the flush, in-order prefixes, then all subsets (few) or random ones.
    Only images not seen before in this interval, and not equal to the
    next flush's state (that one is checked with the stronger guarantee)"""
    seen = set()

    def fresh(mask: int) -> bool:
        key = state_key(iv, mask)
        if key in seen:
            return False
        seen.add(key)
        return not (iv.has_next and key == iv.key_full)

    k = iv.k
    tried = set()
    order = [0] + [(1 << j) - 1 for j in range(1, k + 1)]
    if iv.random_only:
        # the in-order prefixes keep the order the flushes were to enforce
        order = [0, (1 << k) - 1]
    for mask in order:
        if mask in tried:
            continue
        tried.add(mask)
        if fresh(mask):
            yield mask
    if k <= 12:
        rest = [m for m in range(1 << k) if m not in tried]
        rng.shuffle(rest)
        for mask in rest:
            if fresh(mask):
                yield mask
        return
    misses = 0
    while misses < 200:
        p = rng.choice((0.2, 0.5, 0.5, 0.8))
        mask = 0
        for j in range(k):
            if rng.random() < p:
                mask |= 1 << j
        if mask in tried:
            misses += 1
            continue
        tried.add(mask)
        if fresh(mask):
            misses = 0
            yield mask
        else:
            misses += 1


# ---- images in memory --------------------------------------------------------

def load_snapshot(wl: Workload) -> Tuple[bytearray, bytearray, int]:
    """The starting image: contents and a per-sector written mask (holes
    stay holes in the state files)"""
    with open(wl.snapshot, 'rb') as f:
        img = bytearray(f.read())
    mask = bytearray(len(img) // SECTOR + 1)
    fd = os.open(wl.snapshot, os.O_RDONLY)
    try:
        pos = 0
        while pos < len(img):
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            mask[d // SECTOR:(h + SECTOR - 1) // SECTOR] = \
                b'\x01' * ((h + SECTOR - 1) // SECTOR - d // SECTOR)
            pos = h
    finally:
        os.close(fd)
    return img, mask, len(img)


def apply_entry(wl: Workload, img: bytearray, mask: Optional[bytearray],
                size: int, e: tuple) -> int:
    if e[0] == 'f':
        return size
    off, n = e[1], e[2]
    if e[0] == 'w':
        if off + n > len(img):
            img.extend(bytes(off + n - len(img)))
            if mask is not None:
                mask.extend(bytes(len(img) // SECTOR + 1 - len(mask)))
        img[off:off + n] = wl.log_data[e[3]:e[3] + n]
        if mask is not None:
            mask[off // SECTOR:(off + n) // SECTOR] = b'\x01' * (n // SECTOR)
        return max(size, off + n)
    # discard: a hole (never past the end of the file)
    end = min(off + n, len(img))
    if end > off:
        img[off:end] = bytes(end - off)
        if mask is not None:
            mask[off // SECTOR:end // SECTOR] = bytes(end // SECTOR -
                                                      off // SECTOR)
    return size


_libc = None


def punch_hole(fd: int, off: int, n: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int,
                                    ctypes.c_int64, ctypes.c_int64]
    # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, 3, off, n) != 0:
        size = os.fstat(fd).st_size
        if off < size:
            os.pwrite(fd, bytes(min(n, size - off)), off)


# ---- checking a state (in the worker processes) -----------------------------------

G: Dict[str, object] = {}       # the run's shared data, inherited by fork


class Prefix:
    """A worker's image after all entries before some interval"""

    def __init__(self):
        self.wl = -1
        self.pos = 0
        self.img = bytearray()
        self.mask = bytearray()
        self.size = 0
        self.runs: List[Tuple[int, int]] = []

    def goto(self, wl_index: int, pos: int) -> None:
        wl = G['workloads'][wl_index]
        if wl_index != self.wl or pos < self.pos:
            self.img, self.mask, self.size = load_snapshot(wl)
            self.wl, self.pos = wl_index, 0
            self.runs = []      # (those of the image left behind)
        if pos == self.pos and self.runs:
            return
        for e in wl.entries[self.pos:pos]:
            self.size = apply_entry(wl, self.img, self.mask, self.size, e)
        self.pos = pos
        self.runs = [(m.start() * SECTOR, m.end() * SECTOR)
                     for m in re.finditer(b'\x01+', bytes(self.mask))]

    def write_state(self, path: str, iv: Interval, mask: int,
                    ext: bool) -> int:
        wl = G['workloads'][iv.wl]
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            mv = memoryview(self.img)
            for a, b in self.runs:
                b = min(b, len(self.img))
                os.pwrite(fd, mv[a:b], a)
            size = self.size
            ld = memoryview(wl.log_data)
            for j in range(iv.k):
                if not mask >> j & 1:
                    continue
                e = wl.entries[iv.start + j]
                if e[0] == 'w':
                    os.pwrite(fd, ld[e[3]:e[3] + e[2]], e[1])
                    size = max(size, e[1] + e[2])
                else:
                    os.ftruncate(fd, size)
                    punch_hole(fd, e[1], e[2])
            if ext:
                size = -(-size // wl.cluster) * wl.cluster + GROW_TAIL
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return size


def guarantee(wl: Workload, iv: Interval, mask: int) -> Tuple[int, int, int]:
    """(landed, top, g): every entry before `landed` is in the state, none
    from `top` on; g is the last guest flush the state includes (-1)"""
    landed = iv.start
    while landed < iv.end and mask >> (landed - iv.start) & 1:
        landed += 1
    top = iv.start + mask.bit_length()
    g = -1
    for i, (_, p) in enumerate(wl.flushes):
        if p <= landed:
            g = i
    return landed, top, g


def expected_runs(wl: Workload, g: int, top: int):
    """[(start, end, values)] within the verified windows: the values a
    sector may hold in a state that includes guest flush g and no log
    entry from `top` on"""
    cache = G.setdefault('exp_cache', {})
    live = sum(1 for op in wl.ops if op.after_p < top)
    ck = (wl.name, g, live)
    if ck in cache:
        return cache[ck]
    pre = wl.flushes[g][0] if g >= 0 else -1
    size = wl.size
    for op in wl.ops:
        if op.kind == 't' and op.ack < pre:
            size = max(size, op.off)
    pts = set()
    for a, b in wl.windows:
        if a < size:
            pts.add(a)
            pts.add(min(b, size))
    for op in wl.ops:
        if op.kind != 't':
            pts.add(op.off)
            pts.add(op.end())
    for a, b in wl.pattern_regions():
        for x in range(a, b + 1, BACK_BLOCK):
            pts.add(x)
    pts = sorted(x for x in pts if x <= size)
    segs = list(zip(pts, pts[1:]))
    starts = [a for a, _ in segs]
    vals = [frozenset([wl.init_value(a)]) for a, _ in segs]
    for op in wl.ops:
        if op.kind == 't' or op.after_p >= top or op.off >= size:
            continue
        durable = op.ack < pre
        v = op.value if op.kind == 'w' else 0
        i = bisect.bisect_left(starts, op.off)
        while i < len(segs) and segs[i][0] < op.end():
            if op.kind == 'd':
                vals[i] = vals[i] | {0}
            elif durable:
                vals[i] = frozenset([v])
            else:
                vals[i] = vals[i] | {v}
            i += 1
    runs = []
    for (a, b), v in zip(segs, vals):
        if not any(wa <= a and b <= wb for wa, wb in wl.windows):
            continue
        if runs and runs[-1][1] == a and runs[-1][2] == v:
            runs[-1] = (runs[-1][0], b, v)
        else:
            runs.append((a, b, v))
    cache[ck] = (runs, size)
    return runs, size


READ_RE = re.compile(r'^read (\d+)/(\d+) bytes at offset (\d+)$')


def parse_reads(out: str, cmds: List[Tuple[int, int, int]]) -> List[bool]:
    """Which read -P commands passed, in order"""
    res: List[bool] = []
    bad = False
    for line in out.splitlines():
        if line.startswith('Pattern verification failed'):
            bad = True
        elif line.startswith('read failed'):
            res.append(False)
            bad = False
        elif READ_RE.match(line):
            res.append(not bad)
            bad = False
    return res


def dump(qemu_io: str, path: str, a: int, b: int) -> Optional[bytes]:
    r = run([qemu_io, '-r', '-f', 'qed', '-c', f'read -v {a} {b - a}', path])
    data = bytearray()
    for line in r.stdout.splitlines():
        m = re.match(r'^[0-9a-f]{8}:  ((?:[0-9a-f]{2} )*[0-9a-f]{2})', line)
        if m:
            data += bytes.fromhex(m.group(1).replace(' ', ''))
    return bytes(data) if len(data) == b - a else None


def first_bad_sector(qemu_io: str, path: str, a: int, b: int,
                     vals) -> Optional[str]:
    """A run whose sectors do not all hold one allowed value: look at each
    sector (a run of several allowed values may mix them legitimately)"""
    for c in range(a, b, 256 * KiB):
        e = min(b, c + 256 * KiB)
        data = dump(qemu_io, path, c, e)
        if data is None:
            return f'could not read back guest offset {c:#x}+{e - c:#x}'
        for s in range(0, e - c, SECTOR):
            sec = data[s:s + SECTOR]
            if sec != bytes([sec[0]]) * SECTOR or sec[0] not in vals:
                return (f'guest offset {c + s:#x}: reads {describe(sec)}, '
                        f'expected {"one of " if len(vals) > 1 else ""}'
                        f'{",".join(str(v) for v in sorted(vals))}')
    return None


def check_state(task_iv: Interval, mask: int, key: bytes,
                prefix: Prefix, tmp: str) -> Optional[str]:
    """Build and check one crash state; a failure description or None"""
    wl: Workload = G['workloads'][task_iv.wl]
    bins = G['bins']
    ext = key[0] % 4 == 0
    path = os.path.join(tmp, 'state.qed')
    clock = G['clock']
    t = time.monotonic()
    prefix.write_state(path, task_iv, mask, ext)
    clock['build'] += time.monotonic() - t
    landed, top, g = guarantee(wl, task_iv, mask)
    problems = []

    with open(path, 'rb') as f:
        hdr = f.read(64)
    if len(hdr) < 64 or hdr[:4] != b'QED\0':
        return 'not a QED header at all (the starting image was lost?)'

    t = time.monotonic()
    runs, size = expected_runs(wl, g, top)
    cmds = []       # (run index, value, start, end)
    for i, (a, b, vals) in enumerate(runs):
        for v in sorted(vals):
            cmds.append((i, v, a, b))
    args = [bins['io'], '-f', 'qed']
    for _, v, a, b in cmds:
        args += ['-c', f'read -P {v} {a} {b - a}']
    r = subprocess.run(args + [path], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True)
    res = parse_reads(r.stdout, cmds)
    clock['open'] += time.monotonic() - t
    if len(res) != len(cmds):
        problems.append(f'read-write open or reads failed (exit '
                        f'{r.returncode}): {r.stderr.strip()[:2000]} '
                        f'{r.stdout.strip()[-2000:]}')
    else:
        ok_runs = set(i for (i, _, _, _), ok in zip(cmds, res) if ok)
        for i, (a, b, vals) in enumerate(runs):
            if i not in ok_runs:
                bad = first_bad_sector(bins['io'], path, a, b, vals)
                if bad:
                    problems.append(bad)
    with open(path, 'rb') as f:
        hdr = f.read(64)
    features = struct.unpack_from('<Q', hdr, 16)[0] if len(hdr) >= 64 else 0
    if features & QED_NEED_CHECK and not problems:
        problems.append('NEED_CHECK still set after a clean close')

    for who, name in (('img', 'our'), ('peer', "the peer's")):
        t = time.monotonic()
        c = run([bins[who], 'check', '-f', 'qed', path])
        clock[who] += time.monotonic() - t
        if c.returncode not in (0, 3):
            problems.append(f'{name} qemu-img check exits {c.returncode}: '
                            f'{c.stdout.strip()[:2000]}')
    if not problems:
        return None
    return '\n'.join(problems)


def describe(sec: bytes) -> str:
    vals = sorted(set(sec))
    if len(vals) == 1:
        return f'value {vals[0]}'
    return 'mixed values ' + ','.join(str(v) for v in vals[:8])


def keep_failure(iv: Interval, mask: int, key: bytes, what: str,
                 prefix: Prefix, tmp: str) -> str:
    wl: Workload = G['workloads'][iv.wl]
    d = os.path.join(G['faildir'],
                     f'{wl.name}-interval{iv.index}-mask{mask:x}')
    os.makedirs(d, exist_ok=True)
    after = os.path.join(tmp, 'state.qed')
    if os.path.exists(after):
        shutil.copyfile(after, os.path.join(d, 'after-open.qed'))
    ext = key[0] % 4 == 0
    state = os.path.join(d, 'state.qed')
    prefix.write_state(state, iv, mask, ext)
    landed, top, g = guarantee(wl, iv, mask)
    lines = [f'workload {wl.describe()}',
             f'backing file: {wl.back_path or "none"}',
             f'interval {iv.index}: log entries {iv.start}..{iv.end - 1} '
             f'(after the flush at entry {iv.start - 1}; next flush at '
             f'entry {iv.end if iv.has_next else "none"})',
             f'landed from the interval (mask {mask:#x}):']
    for j in range(iv.k):
        e = wl.entries[iv.start + j]
        tag = 'landed' if mask >> j & 1 else 'lost  '
        lines.append(f'  {tag} entry {iv.start + j}: '
                     f'{"write" if e[0] == "w" else "discard"} file offset '
                     f'{e[1]:#x} length {e[2]:#x}')
    lines.append(f'every entry before {landed} landed; none from {top} on; '
                 f'file size {os.path.getsize(state)}'
                 f'{" (grown tail)" if ext else ""}')
    if g >= 0:
        lines.append(f'includes guest flush {g} (log position '
                     f'{wl.flushes[g][1]}): requests acknowledged before it '
                     f'must read back')
    else:
        lines.append('includes no guest flush')
    lines.append('requests of the workload (ack event, issued after log '
                 'position):')
    for op in wl.ops:
        lines.append(f'  {op.command():40} ack {op.ack} after {op.after_p}')
    lines.append(f'guest flushes (pre-marker event, log position): '
                 f'{wl.flushes}')
    lines.append('')
    lines.append('FAILED:')
    lines.append(what)
    lines.append('')
    lines.append('replay by hand: cp state.qed x.qed; qemu-io -f qed -c '
                 '"read -P V OFF LEN" x.qed; qemu-img check x.qed')
    with open(os.path.join(d, 'description.txt'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return d


def check_repair_state(iv: Interval, mask: int, cut: bool, again: bool,
                       prefix: Prefix, tmp: str) -> Optional[str]:
    """Build and check one crash state of a repair; a failure or None"""
    wl: RepairWorkload = G['workloads'][iv.wl]
    bins = G['bins']
    path = os.path.join(tmp, 'state.qed')
    clock = G['clock']
    t = time.monotonic()
    size = prefix.write_state(path, iv, mask, False)
    if cut and size > wl.final_size:
        os.truncate(path, wl.final_size)
    clock['build'] += time.monotonic() - t

    with open(path, 'rb') as f:
        hdr = f.read(64)
    if len(hdr) < 64 or hdr[:4] != b'QED\0':
        return 'not a QED header at all'
    if struct.unpack_from('<Q', hdr, 16)[0] & QED_NEED_CHECK:
        return 'NEED_CHECK set (moving clusters needs none)'

    def compare(when: str) -> Optional[str]:
        t = time.monotonic()
        r = run([bins['img'], 'compare', '-f', 'raw', '-F', 'qed',
                 wl.reference, path])
        clock['compare'] += time.monotonic() - t
        if r.returncode != 0:
            return (f'{when}: our qemu-img compare with the data before the '
                    f'repair exits {r.returncode}: {r.stdout.strip()[:2000]}')
        return None

    bad = compare('as the crash left it')
    if bad:
        return bad
    problems = []
    for who, name in (('img', 'our'), ('peer', "the peer's")):
        t = time.monotonic()
        c = run([bins[who], 'check', '-f', 'qed', path])
        clock[who] += time.monotonic() - t
        if c.returncode not in (0, 3):
            problems.append(f'{name} qemu-img check exits {c.returncode}: '
                            f'{c.stdout.strip()[:2000]}')
    if problems or not again:
        return '\n'.join(problems) or None

    # the repair again, after the crash: it must end clean
    t = time.monotonic()
    c = run([bins['img'], 'check', '-f', 'qed', '-r', 'leaks', path])
    clock['again'] += time.monotonic() - t
    if c.returncode != 0:
        return (f'check -r leaks again after the crash exits {c.returncode}: '
                f'{c.stdout.strip()[:2000]}')
    return compare('after check -r leaks again')


def keep_repair_failure(iv: Interval, mask: int, cut: bool, what: str,
                        prefix: Prefix, tmp: str) -> str:
    wl: RepairWorkload = G['workloads'][iv.wl]
    d = os.path.join(G['faildir'], f'{wl.name}-interval{iv.index}-'
                     f'mask{mask:x}{"-cut" if cut else ""}')
    os.makedirs(d, exist_ok=True)
    after = os.path.join(tmp, 'state.qed')
    if os.path.exists(after):
        shutil.copyfile(after, os.path.join(d, 'after.qed'))
    state = os.path.join(d, 'state.qed')
    size = prefix.write_state(state, iv, mask, False)
    if cut and size > wl.final_size:
        os.truncate(state, wl.final_size)
    shutil.copyfile(wl.snapshot, os.path.join(d, 'before-repair.qed'))
    lines = [f'repair of {wl.name}: cluster_size {fmt_size(wl.cluster)}, '
             f'table_size {wl.table_size}, backing file: '
             f'{wl.back_path or "none"}',
             wl.summary,
             f'moves (from, to, clusters, table): '
             + ', '.join(f'({a:#x}, {b:#x}, {n}, {int(t)})'
                         for a, b, n, t in wl.moves),
             f'flushes dropped: {"yes" if wl.drop_flushes else "no"}',
             f'interval {iv.index}: log entries {iv.start}..{iv.end - 1}',
             f'landed from the interval (mask {mask:#x}):']
    for j in range(iv.k):
        e = wl.entries[iv.start + j]
        tag = 'landed' if mask >> j & 1 else 'lost  '
        lines.append(f'  {tag} entry {iv.start + j}: '
                     f'{"write" if e[0] == "w" else "discard"} file offset '
                     f'{e[1]:#x} length {e[2]:#x}')
    lines.append(f'file cut to {wl.final_size:#x}: {"yes" if cut else "no"}')
    lines += ['', 'FAILED:', what, '',
              f'data before the repair: {wl.reference}',
              'replay by hand: qemu-img compare -f raw -F qed '
              f'{wl.reference} state.qed; qemu-img check state.qed']
    with open(os.path.join(d, 'description.txt'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return d


def worker_init() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    G['prefix'] = Prefix()
    G['tmp'] = os.path.join(G['tmpbase'], f'w{os.getpid()}')
    os.makedirs(G['tmp'], exist_ok=True)


def worker_task(task) -> Tuple[int, List[Tuple[str, str]], Dict[str, float]]:
    wl_index, iv_index, states = task
    iv = G['intervals'][wl_index][iv_index]
    wl = G['workloads'][wl_index]
    repair = isinstance(wl, RepairWorkload)
    prefix: Prefix = G['prefix']
    prefix.goto(wl_index, iv.start)
    fails = []
    G['clock'] = clock = dict.fromkeys(
        ('build', 'compare', 'img', 'peer', 'again') if repair else
        ('build', 'open', 'img', 'peer'), 0.0)
    checked = 0
    for mask, key in states:
        cuts: Tuple[bool, ...] = (False,)
        if repair and wl.cut_allowed(iv, mask):
            # the repair's cut may have landed or not: both states after
            # the flush and with everything landed, one of the two else
            full = mask == (1 << iv.k) - 1
            cuts = (False, True) if mask == 0 or full else (key[1] % 2 == 0,)
        for cut in cuts:
            checked += 1
            try:
                if repair:
                    # the repair again after every flush state and cut
                    # state, and one in four others
                    again = mask == 0 or cut or key[2] % 4 == 0
                    what = check_repair_state(iv, mask, cut, again, prefix,
                                              G['tmp'])
                else:
                    what = check_state(iv, mask, key, prefix, G['tmp'])
            except Exception as e:      # keep going, report it as a failure
                what = f'harness exception: {e!r}'
            if not what:
                continue
            kept = ''
            # keep a few of each kind of failure
            kind = re.sub(r'(0x)?[0-9a-f]*[0-9][0-9a-f]*', 'N',
                          what.splitlines()[0])
            with G['lock']:
                n = G['kept'].get(kind, 0)
                G['kept'][kind] = n + 1
            if n < G['max_kept']:
                try:
                    if repair:
                        kept = keep_repair_failure(iv, mask, cut, what,
                                                   prefix, G['tmp'])
                    else:
                        kept = keep_failure(iv, mask, key, what, prefix,
                                            G['tmp'])
                except Exception as e:
                    kept = f'(could not keep it: {e!r})'
            fails.append((f'{wl.name} interval {iv.index} mask {mask:#x}'
                          f'{" cut" if cut else ""}',
                          what.splitlines()[0] +
                          (f' (kept in {kept})' if kept else '')))
    return checked, fails, clock


# ---- main --------------------------------------------------------------------

def private_copy(prog: str, where: str) -> str:
    path = shutil.which(prog)
    if path is None:
        raise HarnessError(f'{prog} not found (run make first?)')
    copy = os.path.join(where, os.path.basename(path))
    os.makedirs(where, exist_ok=True)
    for _ in range(60):
        try:
            shutil.copy2(path, copy)
            if run([copy, '--version']).returncode == 0:
                return copy
        except OSError:
            pass
        time.sleep(1)           # being rebuilt right now?
    raise HarnessError(f'cannot run a copy of {path}')


def plan(intervals: List[List[Interval]], target: int, seed: int):
    """Round-robin over all intervals of all workloads, one new state each
    per pass, until the target is reached: every flush state first, then
    prefixes, then subsets"""
    gens = []
    for ivs in intervals:
        for iv in ivs:
            rng = random.Random(f'{seed}-{iv.wl}-{iv.index}')
            gens.append((iv, subsets(iv, rng)))
    chosen: Dict[Tuple[int, int], List[Tuple[int, bytes]]] = {}
    total = 0
    active = gens
    while active and total < target:
        nxt = []
        for iv, gen in active:
            if total >= target:
                break
            mask = next(gen, None)
            if mask is None:
                continue
            chosen.setdefault((iv.wl, iv.index), []).append(
                (mask, state_key(iv, mask)))
            total += 1
            nxt.append((iv, gen))
        active = nxt
    return chosen, total, not active


def main() -> int:
    ap = argparse.ArgumentParser(description='QED crash states by write-log '
                                 'replay')
    ap.add_argument('--workdir', help='scratch folder (default: a new one '
                    'under /tmp)')
    ap.add_argument('--states', type=int, default=int(
        os.environ.get('QED_REPLAY_STATES', '10000')),
        help='crash states to check (default 10000)')
    ap.add_argument('--seed', type=int, default=int(
        os.environ.get('QED_REPLAY_SEED', '0')) or
        random.SystemRandom().randrange(1, 2 ** 31))
    ap.add_argument('--jobs', type=int, default=2)
    ap.add_argument('--rounds', type=int, default=8,
                    help='guest flushes per workload')
    ap.add_argument('--workloads', help='comma-separated names (default all)')
    ap.add_argument('--aio', choices=('native', 'io_uring'),
                    help='record with the image file opened with '
                    'file.aio=AIO,file.cache.direct=on (in the scratch '
                    'folder, which must support O_DIRECT)')
    ap.add_argument('--faildir', help='where failing states are kept '
                    '(default WORKDIR/failed)')
    ap.add_argument('--max-kept', type=int, default=5,
                    help='failing states kept of each kind')
    ap.add_argument('--keep', action='store_true',
                    help='keep the scratch files')
    ap.add_argument('-v', '--verbose', action='store_true')
    ap.add_argument('--list', action='store_true', help='list the workloads')
    ap.add_argument('--repair', action='store_true',
                    help='record `qemu-img check -r leaks` on images with '
                    'leaks inside the file instead of guest workloads')
    ap.add_argument('--torn', action='store_true',
                    help='with --repair: writes to metadata shorter than a '
                    'table land sector by sector')
    ap.add_argument('--drop-flushes', action='store_true',
                    help='with --repair: replay the logs as if they held no '
                    'flush (a broken order; states are expected to fail)')
    args = ap.parse_args()

    if (args.torn or args.drop_flushes) and not args.repair:
        print('--torn and --drop-flushes need --repair', file=sys.stderr)
        return 2
    if args.repair and args.aio:
        print('--aio does not apply to --repair', file=sys.stderr)
        return 2
    wls = repair_workloads() if args.repair else all_workloads(args.rounds)
    if args.list:
        for wl in wls:
            print(wl.describe())
        return 0
    if args.workloads:
        names = args.workloads.split(',')
        unknown = [n for n in names if n not in [w.name for w in wls]]
        if unknown:
            print(f'unknown workloads: {unknown}', file=sys.stderr)
            return 2
        wls = [w for w in wls if w.name in names]

    own_workdir = not args.workdir
    workdir = args.workdir or tempfile.mkdtemp(
        prefix='qed-replay-')
    sub = f'replay-{args.aio}' if args.aio else 'replay'
    if args.repair:
        sub = 'replay-repair-noflush' if args.drop_flushes else \
            'replay-repair'
    workdir = os.path.join(workdir, sub) if args.workdir else workdir
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    faildir = args.faildir or os.path.join(workdir, 'failed')
    logf = open(os.path.join(workdir, 'replay.log'), 'w')

    def say(msg: str, always: bool = False) -> None:
        logf.write(msg + '\n')
        logf.flush()
        if always or args.verbose:
            print(msg, flush=True)

    t0 = time.monotonic()
    tmpbase = ''
    # a terminated run still removes its scratch files in memory
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        bindir = os.path.join(workdir, 'bin')
        bins = {
            'img': private_copy(os.environ.get(
                'QEMU_IMG_PROG', os.path.join(BUILD, 'qemu-img')), bindir),
            'io': private_copy(os.environ.get(
                'QEMU_IO_PROG', os.path.join(BUILD, 'qemu-io')), bindir),
            'peer': os.environ.get('PEER_QEMU_IMG', '/usr/bin/qemu-img'),
        }
        if not os.access(bins['peer'], os.X_OK):
            raise HarnessError(f'reference peer {bins["peer"]} not found')
        if shutil.which('stdbuf') is None:
            raise HarnessError('stdbuf (coreutils) not found')
        say(f'qed crash replay: seed {args.seed}, {len(wls)} workloads, '
            f'{args.states} states, {args.jobs} jobs; scratch {workdir}'
            f'{"; recording with file.aio=" + args.aio if args.aio else ""}')

        tmpbase = '/dev/shm' if os.access('/dev/shm', os.W_OK) else workdir
        tmpbase = tempfile.mkdtemp(prefix='qed-replay-', dir=tmpbase)
        if args.repair:
            rec = RepairRecorder(bins, workdir, tmpbase, args.seed,
                                 args.torn, args.drop_flushes)
        else:
            rec = Recorder(bins, workdir, tmpbase, args.aio)
        intervals = []
        for n, wl in enumerate(wls):
            t = time.monotonic()
            if args.repair:
                rec.record(wl)
                say(wl.summary, True)
            else:
                wl.generate(random.Random(f'{args.seed}-{wl.name}'))
                rec.record(wl)
            ivs = prepare_intervals(wl, n)
            for iv in ivs:
                iv.random_only = args.drop_flushes
            intervals.append(ivs)
            kinds = [e[0] for e in wl.entries]
            ok = [op.kind for op in wl.ops]
            say(f'recorded {wl.describe()}: {len(wl.ops)} requests '
                f'({ok.count("w")} data, {ok.count("z")} zero, '
                f'{ok.count("d")} discard, {ok.count("t")} resize), '
                f'{len(wl.flushes)} guest flushes; log: '
                f'{kinds.count("w")} writes, {kinds.count("d")} discards, '
                f'{kinds.count("f")} flushes; {len(ivs)} intervals, largest '
                f'{max(iv.k for iv in ivs)} entries '
                f'({time.monotonic() - t:.1f} s)')

        chosen, total, exhausted = plan(intervals, args.states, args.seed)
        n_flush = sum(1 for v in chosen.values() for m, _ in v if m == 0)
        say(f'plan: {total} distinct crash states ({n_flush} right after a '
            f'flush, {total - n_flush} with unflushed writes landed or '
            f'lost){"; every distinct state of these logs" if exhausted else ""}'
            f' ({time.monotonic() - t0:.0f} s so far)')

        per = [0] * len(wls)
        for (w, _), states in chosen.items():
            per[w] += len(states)
        say('states per workload: ' + ', '.join(
            f'{wl.name} {n}' for wl, n in zip(wls, per)))
        tasks = []
        for (w, i), states in sorted(chosen.items()):
            for c in range(0, len(states), 16):
                tasks.append((w, i, states[c:c + 16]))
        ctx = multiprocessing.get_context('fork')
        manager = ctx.Manager()
        G.update(workloads=wls, intervals=intervals, bins=bins,
                 faildir=faildir, tmpbase=tmpbase,
                 kept=manager.dict(), lock=manager.Lock(),
                 max_kept=args.max_kept)
        done = 0
        failures: List[Tuple[str, str]] = []
        next_report = 1000
        clocks: Dict[str, float] = {}
        with ctx.Pool(args.jobs, initializer=worker_init) as pool:
            for n, fails, clock in pool.imap_unordered(worker_task,
                                                       tasks):
                done += n
                for k, v in clock.items():
                    clocks[k] = clocks.get(k, 0.0) + v
                for where, what in fails:
                    failures.append((where, what))
                    say(f'FAILED: {where}: {what}', True)
                if done >= next_report:
                    say(f'  {done}/{total} states checked, '
                        f'{len(failures)} failed '
                        f'({time.monotonic() - t0:.0f} s)')
                    next_report += 1000

        elapsed = time.monotonic() - t0
        if done:
            say('time per state (ms): ' + ', '.join(
                f'{k} {1000 * v / done:.1f}' for k, v in clocks.items()) +
                (' (build the image; our compares with the data before; '
                 'our check; the peer\'s check; our check -r leaks again)'
                 if args.repair else
                 ' (build the image; open, repair and read back; our check; '
                 'the peer\'s check)'))
        say(f'crash states: {done} checked, {len(failures)} failed '
            f'(seed {args.seed}) in {elapsed:.0f} s', True)
        if failures:
            say(f'failing states kept in {faildir}; log: '
                f'{os.path.join(workdir, "replay.log")}', True)
            return 1
        if not args.keep:
            logf.close()
            if own_workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                for f in os.listdir(workdir):
                    if f != 'replay.log':
                        p = os.path.join(workdir, f)
                        if os.path.isdir(p):
                            shutil.rmtree(p, ignore_errors=True)
                        else:
                            os.remove(p)
        return 0
    except HarnessError as e:
        say(f'crash replay could not run: {e} (scratch files in {workdir})',
            True)
        return 2
    finally:
        if tmpbase:
            shutil.rmtree(tmpbase, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())

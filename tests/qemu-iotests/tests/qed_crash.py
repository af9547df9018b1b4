#!/usr/bin/env python3
#
# QED crash test driver: kill a writer with SIGKILL at random moments and
# check that every crash state is repaired and keeps all flushed data.
#
# Used by the iotest qed-crash-kill; also runs on its own:
#
#   qed_crash.py --workdir DIR [--loops N] [--seed S] [--aio MODE]
#
# (environment: QEMU_IO_PROG, QEMU_IMG_PROG = our binaries, PEER_QEMU_IMG =
# the reference peer's qemu-img; QED_CRASH_LOOPS and QED_CRASH_SEED are the
# defaults of --loops and --seed).
#
# Four cases take turns: cluster_size 4 KiB and 64 KiB, each without and
# with a (raw) backing file.  Each case keeps one image and a model of its
# contents (one byte value per 512-byte sector: every sector the writer
# writes is filled with one value) from one crash to the next, and starts
# over from a fresh image every few crashes.
#
# The writer is our qemu-io reading commands from a file on stdin, its
# stdout line-buffered (stdbuf -oL) into a log.  It works in rounds; round
# k issues several aio_write -P v (and a few aio_write -z) to fresh ranges
# and to ranges written before, non-overlapping within the round, then
# aio_flush, flush, and a marker `read -P v OFF 512` of a sector the round
# wrote.  Commands run one after the other, so the marker's output line
# appears only after the round's flush returned, and round k+1 starts only
# after it: with C marker lines in the log, rounds 1..C are flushed and
# only round C+1 may be partly done.
#
# After the kill (a random moment, from the open of the image to the end
# of the command list):
#  - an image whose NEED_CHECK is clear is consistent: both our check and
#    the peer's find no corruption before any repair.  Without a backing
#    file it also ends at its last cluster in use, no leak (the grow-ahead
#    tail only exists under NEED_CHECK, crash ordering 8).  With a backing
#    file, which is never marked dirty, the clusters of the round cut
#    short (its data clusters, and the L2 tables made for it) may be left
#    with no entry naming them, and no more: leaks, which our
#    `qemu-img check -r leaks` then reclaims, after which both checks
#    are clean;
#  - sometimes a repairing open is itself killed a few ms in;
#  - opening read-write with our qemu-io repairs the image: it opens,
#    NEED_CHECK is clear afterwards;
#  - our `qemu-img check` and the peer's report no corruption (exit 0, or
#    3 for leaked clusters, which a crash may leave);
#  - every sector reads (through our driver) as the model says: the value
#    of the last flushed round that wrote it, or, if round C+1 wrote it,
#    either that or round C+1's value; the peer reads exactly the same
#    bytes.  The model then takes the contents read.
#
# --aio MODE opens the image as production does, libvirt's cache=none with
# io=MODE (native or io_uring): file.aio=MODE,file.cache.direct=on, the
# write cache on; the writer and the repairing opens alike (DIR must
# support O_DIRECT).  Without it the writer takes the cache mode writeback
# (twice as often) or none (O_DIRECT) at random, with the thread pool.
#
# The binaries are copied into DIR first, so that a long run tests one build
# even if the tree is rebuilt meanwhile.
#
# Output: a deterministic summary on stdout (failures say what, where, the
# seed and how to replay); details of every crash go to DIR/qed-crash.log.
#
# This work is licensed under the terms of the GNU GPL, version 2 or later.
# See the COPYING file in the top-level directory.

import argparse
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from typing import Dict, List, Tuple

SECTOR = 512
NEED_CHECK = 0x2
PATTERNS = 250              # data values 1..250; 0 is zero writes
BACK_VALUES = (251, 252, 253, 254, 255)
PAT = [bytes([v]) * SECTOR for v in range(256)]


class Failure(Exception):
    pass


def run(args: List[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True,
                          **kw)


class Case:
    def __init__(self, name: str, cluster_size: int, backing: bool,
                 size: int, max_write: int, workdir: str):
        self.name = name
        self.cluster_size = cluster_size
        self.backing = backing
        self.size = size
        self.sectors = size // SECTOR
        self.max_write = max_write
        self.img = os.path.join(workdir, f'crash-{name}.qed')
        self.back = os.path.join(workdir, f'crash-{name}-back.raw')
        # the backing file is a little shorter than the image: beyond it the
        # image reads zeros
        self.back_sectors = self.sectors - 2048 if backing else 0
        self.model: List[int] = []
        self.written: List[Tuple[int, int]] = []    # (sector, count)
        self.pattern = 0
        self.crashes = 0
        self.rounds_per_run = 400

    def orig(self, s: int) -> int:
        if s < self.back_sectors:
            return BACK_VALUES[s % len(BACK_VALUES)]
        return 0


class Crash:
    def __init__(self, args, log):
        self.args = args
        self.log = log
        self.rng = random.Random(args.seed)
        self.qemu_io = self.snapshot(os.environ.get('QEMU_IO_PROG',
                                                    'qemu-io'))
        self.qemu_img = self.snapshot(os.environ.get('QEMU_IMG_PROG',
                                                     'qemu-img'))
        self.peer_img = os.environ.get('PEER_QEMU_IMG', '/usr/bin/qemu-img')
        w = args.workdir
        self.cmds = os.path.join(w, 'crash-cmds.txt')
        self.out = os.path.join(w, 'crash-writer.log')
        self.raw = os.path.join(w, 'crash-ours.raw')
        self.peer_raw = os.path.join(w, 'crash-peer.raw')
        self.pre = os.path.join(w, 'crash-pre-repair.qed')
        MiB = 1024 * 1024
        self.cases = [
            Case('4k', 4096, False, 32 * MiB, 64 * 1024, w),
            Case('4k-backing', 4096, True, 32 * MiB, 64 * 1024, w),
            Case('64k', 65536, False, 64 * MiB, 192 * 1024, w),
            Case('64k-backing', 65536, True, 64 * MiB, 192 * 1024, w),
        ]
        self.stats: Dict[str, int] = {}
        self.caches = ['writeback', 'writeback']
        if self.o_direct_works():
            self.caches.append('none')
        elif args.aio:
            raise Failure(f'O_DIRECT does not work in {args.workdir}, '
                          f'needed by --aio')

    def o_direct_works(self) -> bool:
        probe = os.path.join(self.args.workdir, 'crash-o-direct-probe')
        try:
            fd = os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT)
            os.close(fd)
            return True
        except OSError:
            return False
        finally:
            if os.path.exists(probe):
                os.remove(probe)

    def snapshot(self, prog: str) -> str:
        """A private copy of a binary under test, so that a long run keeps
        testing one build even if the tree is rebuilt meanwhile"""
        path = shutil.which(prog)
        if path is None:
            raise Failure(f'{prog} not found')
        copy = os.path.join(self.args.workdir, 'bin', os.path.basename(path))
        os.makedirs(os.path.dirname(copy), exist_ok=True)
        for _ in range(60):
            try:
                shutil.copy2(path, copy)
                if run([copy, '--version']).returncode == 0:
                    return copy
            except OSError:
                pass
            time.sleep(1)       # being rebuilt right now?
        raise Failure(f'cannot run a copy of {path}')

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    # ---- images ------------------------------------------------------------

    def fresh(self, c: Case) -> None:
        for f in (c.img, c.back):
            if os.path.exists(f):
                os.remove(f)
        opts = f'cluster_size={c.cluster_size}'
        if c.backing:
            with open(c.back, 'wb') as f:
                for s in range(c.back_sectors):
                    f.write(PAT[c.orig(s)])
            r = run([self.qemu_img, 'create', '-f', 'qed', '-o', opts,
                     '-b', c.back, '-F', 'raw', c.img, str(c.size)])
        else:
            r = run([self.qemu_img, 'create', '-f', 'qed', '-o', opts,
                     c.img, str(c.size)])
        if r.returncode != 0:
            raise Failure(f'qemu-img create failed: {r.stdout}')
        c.model = [c.orig(s) for s in range(c.sectors)]
        c.written = []
        self.log.write(f'--- {c.name}: fresh image\n')

    def open_args(self, c: Case, cache: str = 'writeback') -> List[str]:
        """qemu-io arguments that open the image of @c"""
        if self.args.aio:
            return ['-t', 'none', '-i', self.args.aio, '--image-opts',
                    f'driver=qed,file.filename={c.img},'
                    f'file.aio={self.args.aio},file.cache.direct=on']
        return ['-f', 'qed', '-t', cache, c.img]

    def wait_unlocked(self, c: Case) -> None:
        """Wait until no lock is held on the files of @c.  A qemu-io killed
        with requests in flight through io_uring keeps them open (and
        locked) for some ms after it was reaped: the kernel tears the ring
        down in a worker after the exit, and only then drops the files of
        its requests."""
        keys = []
        for path in (c.img, c.back) if c.backing else (c.img,):
            st = os.stat(path)
            keys.append(f' {os.major(st.st_dev):02x}:'
                        f'{os.minor(st.st_dev):02x}:{st.st_ino} ')
        t0 = time.monotonic()
        while True:
            with open('/proc/locks') as f:
                locks = f.read()
            if not any(k in locks for k in keys):
                break
            if time.monotonic() - t0 > 10:
                raise Failure('the image is still locked 10 s after the '
                              'process that had it open was killed')
            time.sleep(0.001)
        waited = time.monotonic() - t0
        if waited > 0.0005:
            self.log.write(f'the files stayed locked {waited:.3f} s after '
                           f'the kill\n')
            self.count('kills after which the files stayed locked')

    # ---- the writer --------------------------------------------------------

    def gen_round(self, c: Case) -> Tuple[List[Tuple[int, int, int]], str]:
        """[(sector, count, value)], commands"""
        rng = self.rng
        c.pattern = c.pattern % PATTERNS + 1
        writes: List[Tuple[int, int, int]] = []
        want = rng.randint(2, 8)
        tries = 0
        max_sectors = c.max_write // SECTOR
        while len(writes) < want and tries < 100:
            tries += 1
            # 1 sector .. max_write, biased to the small end
            n = min(max_sectors, int(2 ** rng.uniform(0, 9.6)))
            n = max(1, n)
            if c.written and rng.random() < 0.5:
                # over (part of) something written before
                ws, wn = rng.choice(c.written)
                s = ws + rng.randint(-n + 1, wn - 1)
            else:
                s = rng.randrange(c.sectors)
            s = max(0, min(s, c.sectors - n))
            if any(s < ws + wn and ws < s + n for ws, wn, _ in writes):
                continue
            value = 0 if rng.random() < 0.1 else c.pattern
            writes.append((s, n, value))
        lines = []
        for s, n, v in writes:
            if v == 0:
                lines.append(f'aio_write -q -z {s * SECTOR} {n * SECTOR}')
            else:
                lines.append(f'aio_write -q -P {v} {s * SECTOR} {n * SECTOR}')
        lines.append('aio_flush')
        lines.append('flush')
        s, _, v = writes[0]
        lines.append(f'read -P {v} {s * SECTOR} {SECTOR}')
        return writes, '\n'.join(lines) + '\n'

    def run_writer(self, c: Case) -> Tuple[List[List[Tuple[int, int, int]]],
                                            int, bool, float]:
        rounds = []
        with open(self.cmds, 'w') as f:
            for _ in range(c.rounds_per_run):
                writes, text = self.gen_round(c)
                rounds.append(writes)
                f.write(text)
        cache = self.rng.choice(self.caches)
        if self.args.aio:
            cache = f'none, aio={self.args.aio}'
        delay = self.rng.uniform(0, self.args.max_delay)
        with open(self.cmds) as stdin, open(self.out, 'w') as stdout:
            p = subprocess.Popen(['stdbuf', '-oL', self.qemu_io] +
                                 self.open_args(c, cache),
                                 stdin=stdin, stdout=stdout,
                                 stderr=subprocess.STDOUT)
            t0 = time.monotonic()
            try:
                p.wait(delay)
                finished = True
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
                finished = False
            elapsed = time.monotonic() - t0
        if not finished:
            self.wait_unlocked(c)
        with open(self.out) as f:
            text = f.read()
        lines = text.split('\n')[:-1]       # complete lines only
        done = sum(1 for line in lines
                   if re.search(r'\bread 512/512 bytes', line))
        bad = [line for line in lines
               if re.search(r'fail|error|Error|verification', line)]
        if bad:
            raise Failure('writer reported: ' + ' | '.join(bad[:5]))
        if finished and (p.returncode != 0 or done != len(rounds)):
            raise Failure(f'writer exited with {p.returncode} after {done} '
                          f'of {len(rounds)} rounds')
        self.log.write(f'writer: cache={cache}, '
                       f'{"finished" if finished else "killed"} after '
                       f'{elapsed:.3f} s (delay {delay:.3f}), {done} of '
                       f'{len(rounds)} rounds flushed\n')
        # the kill should come before the end: adapt the length of the list
        if finished:
            c.rounds_per_run = min(c.rounds_per_run * 2, 4000)
        elif done < len(rounds) // 4 and c.rounds_per_run > 60 and \
                elapsed > self.args.max_delay * 0.9:
            c.rounds_per_run = max(60, c.rounds_per_run // 2)
        return rounds, done, finished, elapsed

    # ---- after the crash ---------------------------------------------------

    def features(self, c: Case) -> int:
        with open(c.img, 'rb') as f:
            f.seek(16)
            return int(struct.unpack('<Q', f.read(8))[0])

    def check(self, prog: str, c: Case, who: str,
              allow_corrupt: bool = False) -> Tuple[int, int]:
        """run `qemu-img check`; return (corruptions, leaks)"""
        r = run([prog, 'check', '-f', 'qed', '--output=json', c.img])
        try:
            j = json.loads(r.stdout[r.stdout.index('{'):])
        except ValueError:
            raise Failure(f'{who} check (exit {r.returncode}) printed no '
                          f'JSON: {r.stdout.strip()}')
        corrupt = j.get('corruptions', 0) + j.get('check-errors', 0)
        leaks = j.get('leaks', 0)
        expected = 2 if corrupt else 3 if leaks else 0
        if j.get('check-errors', 0):
            expected = 1
        if not allow_corrupt and (corrupt or r.returncode not in (0, 3)):
            raise Failure(f'{who} check: exit {r.returncode}, '
                          f'{j.get("corruptions", 0)} corruptions, '
                          f'{j.get("check-errors", 0)} check errors, '
                          f'{leaks} leaks')
        if r.returncode != expected:
            raise Failure(f'{who} check: exit {r.returncode} but the JSON '
                          f'says {corrupt} corruptions, {leaks} leaks')
        return corrupt, leaks

    def open_rw(self, c: Case) -> None:
        r = run([self.qemu_io, '-c', 'read -q 0 512'] + self.open_args(c))
        if r.returncode != 0:
            raise Failure(f'opening read-write (exit {r.returncode}): '
                          f'{r.stdout.strip()}')
        if r.stdout.strip():
            # what the repair did (informational)
            self.log.write(f'read-write open says: {r.stdout.strip()}\n')

    def kill_repair(self, c: Case) -> None:
        delay = self.rng.uniform(0, 0.03)
        p = subprocess.Popen([self.qemu_io, '-c', 'read -q 0 512'] +
                             self.open_args(c), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            p.wait(delay)
            self.log.write(f'repairing open finished before the kill at '
                           f'{delay:.3f} s\n')
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            self.wait_unlocked(c)
            self.log.write(f'repairing open killed after {delay:.3f} s; '
                           f'features now {self.features(c):#x}\n')
            self.count('repairing opens killed')

    def read_all(self, prog: str, c: Case, dest: str) -> bytes:
        if os.path.exists(dest):
            os.remove(dest)
        r = run([prog, 'convert', '-f', 'qed', '-O', 'raw', c.img, dest])
        if r.returncode != 0:
            raise Failure(f'{prog} convert failed: {r.stdout.strip()}')
        with open(dest, 'rb') as f:
            data = f.read()
        os.remove(dest)
        if len(data) != c.size:
            raise Failure(f'{prog} convert: {len(data)} bytes, expected '
                          f'{c.size}')
        return data

    def verify(self, c: Case, rounds, done: int) -> None:
        model = c.model
        for writes in rounds[:done]:
            for s, n, v in writes:
                model[s:s + n] = [v] * n
        maybe: Dict[int, int] = {}
        if done < len(rounds):
            for s, n, v in rounds[done]:
                for i in range(s, s + n):
                    maybe[i] = v
        data = self.read_all(self.qemu_img, c, self.raw)
        peer = self.read_all(self.peer_img, c, self.peer_raw)
        if peer != data:
            first = next(i for i in range(0, c.size, SECTOR)
                         if peer[i:i + SECTOR] != data[i:i + SECTOR])
            raise Failure(f'the peer reads different data than we do, first '
                          f'at offset {first}')
        errors = []
        new_model = []
        took_new = 0
        for s in range(c.sectors):
            chunk = data[s * SECTOR:(s + 1) * SECTOR]
            v = chunk[0]
            ok = chunk == PAT[v]
            if ok and v != model[s]:
                ok = maybe.get(s, -1) == v
                took_new += ok
            if not ok:
                if len(errors) < 5:
                    want = [model[s]] + ([maybe[s]] if s in maybe else [])
                    got = (f'{v}' if chunk == PAT[v] else
                           f'mixed bytes {sorted(set(chunk))[:8]}')
                    errors.append(f'offset {s * SECTOR}: read {got}, '
                                  f'expected one of {want}')
                else:
                    errors.append('')
            new_model.append(v)
        if errors:
            raise Failure(f'{len(errors)} sectors read wrong: ' +
                          '; '.join(e for e in errors if e))
        c.model = new_model
        for writes in rounds[:done + 1]:
            c.written.extend((s, n) for s, n, _ in writes)
        c.written = c.written[-400:]
        self.log.write(f'data: all {c.sectors} sectors as expected '
                       f'({len(maybe)} sectors of the unfinished round, '
                       f'{took_new} of them read new)\n')

    def round_clusters(self, c: Case, rounds) -> int:
        """Clusters that the writes of @rounds could allocate: their data
        clusters, and an L2 table (4 clusters, the default table_size)
        for each L1 entry they reach"""
        cs = c.cluster_size
        per_table = 4 * cs // 8 * cs
        clusters, tables = set(), set()
        for writes in rounds:
            for sector, count, _ in writes:
                first = sector * SECTOR // cs
                last = ((sector + count) * SECTOR - 1) // cs
                clusters.update(range(first, last + 1))
                tables.update(range(first * cs // per_table,
                                    last * cs // per_table + 1))
        return len(clusters) + 4 * len(tables)

    def repair_leaks(self, c: Case) -> None:
        """Our `check -r leaks` reclaims every leak, inner ones too"""
        r = run([self.qemu_img, 'check', '-r', 'leaks', '-f', 'qed', c.img])
        self.log.write(f'check -r leaks: exit {r.returncode}\n{r.stdout}')
        if r.returncode != 0:
            raise Failure(f'check -r leaks exited {r.returncode}: '
                          f'{r.stdout.strip().splitlines()[-1:]}')

    # ---- one loop ----------------------------------------------------------

    def one(self, i: int, c: Case) -> None:
        self.log.write(f'\n=== crash {i}: case {c.name}, crash {c.crashes} '
                       f'on this image ===\n')
        if c.crashes % self.args.fresh_every == 0 or not c.model:
            self.fresh(c)
        c.crashes += 1

        rounds, done, finished, _ = self.run_writer(c)
        self.count('writer finished' if finished else 'writer killed')
        cp = run(['cp', '--sparse=always', c.img, self.pre])
        if cp.returncode != 0:
            raise Failure(f'cp: {cp.stdout}')

        feat = self.features(c)
        dirty = bool(feat & NEED_CHECK)
        ours = self.check(self.qemu_img, c, 'our (before repair)',
                          allow_corrupt=True)
        peer = self.check(self.peer_img, c, 'the peer\'s (before repair)',
                          allow_corrupt=True)
        self.log.write(f'after the kill: features {feat:#x}; before repair '
                       f'our check {ours[0]} corruptions {ours[1]} leaks, '
                       f'peer {peer[0]} corruptions {peer[1]} leaks\n')
        if not dirty and (ours[0] or peer[0]):
            raise Failure('NEED_CHECK clear but the image is corrupt '
                          f'(ours {ours[0]}, peer {peer[0]} corruptions)')
        if not dirty and ours[1] and not c.backing:
            # crash ordering 8: a grow-ahead tail, or the clusters of
            # allocations in flight, only ever exist under NEED_CHECK (ours
            # counts every unreferenced cluster; the peer's check also
            # reports one spurious leak per 16 MiB of 4 KiB clusters)
            raise Failure('NEED_CHECK clear but the file has leaked '
                          f'clusters (ours {ours[1]}, peer {peer[1]})')
        if ours[1] and c.backing:
            # never dirty: the round cut short may leave its clusters
            # unreferenced, nothing more
            bound = self.round_clusters(c, rounds[done:done + 1])
            if ours[1] > bound:
                raise Failure(f'{ours[1]} leaked clusters after the kill, '
                              f'more than the {bound} clusters that the '
                              f'round cut short could have taken')
            self.count('crash states with leaks (backing file)')
            self.repair_leaks(c)
        if dirty:
            self.count('crash states with NEED_CHECK set')
        if ours[0]:
            self.count('crash states that needed repair')
        if dirty and self.rng.random() < 0.3:
            self.kill_repair(c)

        self.open_rw(c)
        feat = self.features(c)
        if feat & NEED_CHECK:
            raise Failure(f'NEED_CHECK still set after a read-write open '
                          f'(features {feat:#x})')
        ours = self.check(self.qemu_img, c, 'our')
        peer = self.check(self.peer_img, c, 'the peer\'s')
        self.log.write(f'after repair: our check {ours[1]} leaks, peer '
                       f'{peer[1]} leaks\n')
        if ours[1] or peer[1]:
            self.count('crash states with leaks after repair')
        self.verify(c, rounds, done)

    def main(self) -> int:
        self.log.write(f'seed {self.args.seed}, {self.args.loops} loops'
                       f'{", aio=" + self.args.aio if self.args.aio else ""}'
                       f'\n')
        for i in range(self.args.loops):
            c = self.cases[i % len(self.cases)]
            try:
                self.one(i, c)
            except Failure as e:
                aio = f'{self.args.aio}-' if self.args.aio else ''
                keep = os.path.join(self.args.workdir,
                                    f'crash-failed-{aio}{i}')
                os.makedirs(keep, exist_ok=True)
                for f in (self.pre, c.img, self.cmds, self.out):
                    if os.path.exists(f):
                        shutil.copy(f, keep)
                if c.backing:
                    shutil.copy(c.back, keep)
                self.log.write(f'FAILED: {e}\n')
                print(f'FAILED at crash {i} (case {c.name}, seed '
                      f'{self.args.seed}): {e}')
                print(f'  image before repair, commands and writer log kept '
                      f'in {keep}; details in {self.log.name}')
                if self.args.aio:
                    print(f'  replay: qed_crash.py --workdir DIR --aio '
                          f'{self.args.aio} --loops {self.args.loops} '
                          f'--seed {self.args.seed}')
                else:
                    print(f'  replay: QED_CRASH_SEED={self.args.seed} '
                          f'QED_CRASH_LOOPS={self.args.loops}')
                return 1
            self.log.flush()
        for c in self.cases:
            for f in (c.img, c.back, self.pre, self.cmds, self.out):
                if os.path.exists(f):
                    os.remove(f)
        shutil.rmtree(os.path.join(self.args.workdir, 'bin'),
                      ignore_errors=True)
        self.log.write('\n' + ''.join(f'{k}: {v}\n'
                                      for k, v in sorted(self.stats.items())))
        print(f'{len(self.cases)} cases: cluster_size 4 KiB and 64 KiB, '
              f'without and with a backing file')
        print(f'{self.args.loops} crash states: all repaired, all checks '
              f'clean, all flushed data intact')
        return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument('--workdir', required=True)
    ap.add_argument('--loops', type=int,
                    default=int(os.environ.get('QED_CRASH_LOOPS', '20')))
    ap.add_argument('--seed', type=int,
                    default=int(os.environ.get('QED_CRASH_SEED', '0')) or
                    random.SystemRandom().randrange(1, 2 ** 31))
    ap.add_argument('--max-delay', type=float, default=0.6,
                    help='latest kill, seconds after the writer starts')
    ap.add_argument('--fresh-every', type=int, default=6,
                    help='start a case over from a fresh image after this '
                    'many crashes')
    ap.add_argument('--aio', choices=('native', 'io_uring'),
                    help='open the image with file.aio=AIO,'
                    'file.cache.direct=on (default: the thread pool, cache '
                    'mode writeback or none at random)')
    args = ap.parse_args()
    name = f'qed-crash-{args.aio}.log' if args.aio else 'qed-crash.log'
    with open(os.path.join(args.workdir, name), 'w') as log:
        try:
            return Crash(args, log).main()
        except Failure as e:
            print(f'FAILED: {e}')
            return 1


if __name__ == '__main__':
    sys.exit(main())

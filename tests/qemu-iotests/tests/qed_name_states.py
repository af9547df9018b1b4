#!/usr/bin/env python3
#
# The backing file name in a QED header, and in every state a power cut
# could leave while it changes (iotest qed-crash-backing-name)
#
# Usage:
#   qed_name_states.py name IMAGE OLD NEW
#       prints old, new, none (no backing file) or what else the header
#       names
#   qed_name_states.py replay START LOG STATE OLD NEW QEMU_IO
#       rebuilds from the image START and the blklogwrites LOG of a change
#       every state a power cut could leave: all the writes before each
#       flush, plus any subset of the writes since the last flush (at most
#       12 of them; a change writes two or three).  Each must name the old
#       or the new file, complete, and open through QEMU_IO (a read of the
#       named file's pattern: 0x0e for OLD, 0x0f for NEW, as the test
#       writes them), written to STATE (next to the image, so that the
#       relative names resolve).  Prints one summary line, then the states
#       that fail; exit status 1 if any does.
#
# This work is licensed under the terms of the GNU GPL, version 2 or later.
# See the COPYING file in the top-level directory.

import itertools
import os
import struct
import subprocess
import sys
import tempfile
from typing import List, Optional, Set, Tuple

import qed_replay

QED_F_BACKING_FILE = 0x01
MAX_SUBSET_WRITES = 12
PATTERN = {'old': '0x0e', 'new': '0x0f'}


def header_name(img: bytes, old: bytes, new: bytes) -> Tuple[Optional[str],
                                                            str]:
    """('old' | 'new' | None, description)"""
    features, = struct.unpack_from('<Q', img, 16)
    if not features & QED_F_BACKING_FILE:
        return None, 'none'
    off, n = struct.unpack_from('<II', img, 56)
    name = img[off:off + n]
    if name == old:
        return 'old', 'old'
    if name == new:
        return 'new', 'new'
    return None, f'NEITHER ({n} bytes at {off}, ending {name[-16:]!r})'


def cmd_name(args: List[str]) -> int:
    path, old, new = args
    with open(path, 'rb') as f:
        img = f.read(65536)
    print(header_name(img, old.encode(), new.encode())[1])
    return 0


def crash_states(entries: List[tuple]) -> Set[Tuple[int, ...]]:
    """Sets of log entries (indices of writes) that a power cut may leave
    landed"""
    states: Set[Tuple[int, ...]] = set()
    landed: List[int] = []
    interval: List[int] = []
    for i, e in enumerate(entries + [('f',)]):
        if e[0] == 'w':
            interval.append(i)
            continue
        if e[0] != 'f':
            continue
        if len(interval) > MAX_SUBSET_WRITES:
            subsets = [interval[:k] for k in range(len(interval) + 1)]
        else:
            subsets = [list(c) for k in range(len(interval) + 1)
                       for c in itertools.combinations(interval, k)]
        for sub in subsets:
            states.add(tuple(landed + sub))
        landed += interval
        interval = []
    return states


def parse_log(log: str) -> Tuple[List[tuple], bytes]:
    """qed_replay.parse_log, also for a log that no flush reached (whose
    superblock is still zeros): empty, or entries from sector 1 on"""
    with open(log, 'rb') as f:
        head = f.read(qed_replay.SECTOR)
    if head.strip(b'\0'):
        return qed_replay.parse_log(log)
    if os.path.getsize(log) <= qed_replay.SECTOR:
        return [], b''
    # A superblock that says: no entry known to be there, 512-byte sectors
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(log)) as tmp:
        with open(log, 'rb') as f:
            tmp.write(struct.pack('<QQQI', qed_replay.LOG_MAGIC, 1, 0,
                                  qed_replay.SECTOR).ljust(
                                      qed_replay.SECTOR, b'\0'))
            f.seek(qed_replay.SECTOR)
            tmp.write(f.read())
        tmp.flush()
        return qed_replay.parse_log(tmp.name)


def cmd_replay(args: List[str]) -> int:
    start, log, state, old, new, qemu_io = args
    entries, data = parse_log(log)
    with open(start, 'rb') as f:
        image = f.read()

    seen = set()
    bad = []
    for st in sorted(crash_states(entries)):
        img = bytearray(image)
        for i in st:
            _, off, n, pos = entries[i]
            if off + n > len(img):
                img.extend(bytes(off + n - len(img)))
            img[off:off + n] = data[pos:pos + n]
        what, desc = header_name(bytes(img), old.encode(), new.encode())
        if what is None:
            bad.append(f'writes {list(st)} landed: the header names {desc}')
            continue
        seen.add(what)
        with open(state, 'wb') as f:
            f.write(img)
        r = subprocess.run([qemu_io, '-f', 'qed', '-c',
                            f'read -q -P {PATTERN[what]} 0 64k', state],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True, check=False)
        if r.returncode != 0 or r.stdout.strip():
            bad.append(f'writes {list(st)} landed: the header names the '
                       f'{what} file, but the image does not show it: '
                       f'{r.stdout.strip()}')
    print(f'power-cut states: {"every one" if not bad else "NOT every one"} '
          f'names the old or the new file, complete, and opens; names '
          f'seen: {", ".join(sorted(seen)) or "none"}')
    for b in bad:
        print('  ' + b)
    return 1 if bad else 0


def main(argv: List[str]) -> int:
    if len(argv) >= 2 and argv[1] == 'name' and len(argv) == 5:
        return cmd_name(argv[2:])
    if len(argv) >= 2 and argv[1] == 'replay' and len(argv) == 8:
        return cmd_replay(argv[2:])
    print('usage: qed_name_states.py name IMAGE OLD NEW | '
          'replay START LOG STATE OLD NEW QEMU_IO', file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv))

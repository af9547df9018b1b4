#!/usr/bin/env python3
#
# Where a QED image file ends, against what its tables use
#
# Usage:
#   qed_tail.py IMAGE end        the end of the last cluster in use (the
#                                header, the L1 table, every L2 table and
#                                data cluster they name), in bytes
#   qed_tail.py IMAGE tail       clusters past that end (the file's length
#                                rounded up to a cluster, less the end)
#   qed_tail.py IMAGE dirty      "set" or "clear": NEED_CHECK in the header
#   qed_tail.py IMAGE state      one line: "NEED_CHECK set|clear, tail N"
#   qed_tail.py IMAGE set-dirty  set NEED_CHECK in the header
#   qed_tail.py IMAGE fill START LEN BYTE
#                                write LEN bytes of BYTE at file offset
#                                START, past the tables' knowledge (makes
#                                leaked space that really takes disk blocks)
#   qed_tail.py IMAGE zero START LEN
#                                "zeros" if those bytes of the file read as
#                                zeros, else "data"
#   qed_tail.py IMAGE kib        KiB the file takes on disk (st_blocks)
#
# Only the format as the spec has it: no check of what the image says is
# done beyond what is needed to find the tables.
#
# This work is licensed under the terms of the GNU GPL, version 2 or later.
# See the COPYING file in the top-level directory.

import os
import struct
import sys
from typing import BinaryIO, Tuple

NEED_CHECK = 0x2
HEADER = '<IIIIQQQQQII'


def header(f: BinaryIO) -> Tuple[int, int, int, int, int]:
    f.seek(0)
    (magic, cluster_size, table_size, header_size, features, _compat,
     _autoclear, l1_offset, _image_size, _bf_off,
     _bf_size) = struct.unpack(HEADER, f.read(struct.calcsize(HEADER)))
    assert magic == 0x00444551, 'not a QED image'
    return cluster_size, table_size, header_size, features, l1_offset


def used_end(f: BinaryIO) -> Tuple[int, int]:
    cluster_size, table_size, header_size, _, l1_offset = header(f)
    size = os.fstat(f.fileno()).st_size
    table_bytes = cluster_size * table_size
    end = max(header_size * cluster_size, l1_offset + table_bytes)

    def table(offset: int) -> Tuple[int, ...]:
        f.seek(offset)
        data = f.read(table_bytes)
        data += b'\0' * (table_bytes - len(data))
        return struct.unpack(f'<{table_bytes // 8}Q', data)

    for l2 in table(l1_offset):
        if l2 == 0:
            continue
        end = max(end, l2 + table_bytes)
        if l2 >= size:
            continue
        for data in table(l2):
            # 1 is the zero-cluster marker, not an offset
            if data > 1:
                end = max(end, data + cluster_size)
    return end, cluster_size


def main() -> None:
    path, cmd = sys.argv[1], sys.argv[2]
    args = sys.argv[3:]
    with open(path, 'r+b' if cmd in ('set-dirty', 'fill') else 'rb') as f:
        if cmd == 'end':
            print(used_end(f)[0])
        elif cmd in ('tail', 'state'):
            end, cluster_size = used_end(f)
            size = os.fstat(f.fileno()).st_size
            size = (size + cluster_size - 1) // cluster_size * cluster_size
            tail = max(0, size - end) // cluster_size
            if cmd == 'tail':
                print(tail)
            else:
                dirty = header(f)[3] & NEED_CHECK
                print(f'NEED_CHECK {"set" if dirty else "clear"}, '
                      f'tail {tail}')
        elif cmd == 'dirty':
            print('set' if header(f)[3] & NEED_CHECK else 'clear')
        elif cmd == 'set-dirty':
            features = header(f)[3] | NEED_CHECK
            f.seek(16)
            f.write(struct.pack('<Q', features))
        elif cmd == 'fill':
            start, length, byte = (int(a, 0) for a in args)
            f.seek(start)
            f.write(bytes([byte]) * length)
        elif cmd == 'zero':
            start, length = (int(a, 0) for a in args)
            f.seek(start)
            data = f.read(length)
            print('zeros' if data.count(0) == length else 'data')
        elif cmd == 'kib':
            print(os.fstat(f.fileno()).st_blocks // 2)
        else:
            sys.exit(f'unknown command {cmd!r}')


if __name__ == '__main__':
    main()

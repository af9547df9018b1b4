#!/usr/bin/env python3
#
# Read and change QED metadata in place, to make corrupt images for tests
#
# Usage:
#   qed_poke.py IMAGE dump                       header and non-zero entries
#   qed_poke.py IMAGE header [FIELD [VALUE]]     all fields, one, or set it
#   qed_poke.py IMAGE l1 INDEX [VALUE]           get or set an L1 entry
#   qed_poke.py IMAGE l2 L1_INDEX INDEX [VALUE]  get or set an entry of the
#                                                L2 table that L1_INDEX names
#
# VALUE is an integer in Python syntax (42, 0x10000).  Values are printed
# in hex so that shell arithmetic can use them.  Nothing checks that what
# is written makes sense: making images that do not is the point.
#
# This work is licensed under the terms of the GNU GPL, version 2 or later.
# See the COPYING file in the top-level directory.

import struct
import sys
from typing import BinaryIO, Dict, List, Tuple

HEADER_FIELDS: List[Tuple[str, str]] = [
    ('magic', 'I'),
    ('cluster_size', 'I'),
    ('table_size', 'I'),
    ('header_size', 'I'),
    ('features', 'Q'),
    ('compat_features', 'Q'),
    ('autoclear_features', 'Q'),
    ('l1_table_offset', 'Q'),
    ('image_size', 'Q'),
    ('backing_filename_offset', 'I'),
    ('backing_filename_size', 'I'),
]
HEADER_FORMAT = '<' + ''.join(f for _, f in HEADER_FIELDS)


def field_offset(name: str) -> Tuple[int, str]:
    offset = 0
    for field, fmt in HEADER_FIELDS:
        if field == name:
            return offset, fmt
        offset += struct.calcsize('<' + fmt)
    raise ValueError(f'unknown header field {name!r}')


def read_header(f: BinaryIO) -> Dict[str, int]:
    f.seek(0)
    values = struct.unpack(HEADER_FORMAT,
                           f.read(struct.calcsize(HEADER_FORMAT)))
    return {name: v for (name, _), v in zip(HEADER_FIELDS, values)}


def table_nelems(header: Dict[str, int]) -> int:
    return header['cluster_size'] * header['table_size'] // 8


def entry_location(f: BinaryIO, header: Dict[str, int],
                   args: List[str]) -> int:
    """File offset of the L1 entry (one index) or L2 entry (two)."""
    nelems = table_nelems(header)
    indices = [int(a, 0) for a in args]
    for index in indices:
        if not 0 <= index < nelems:
            raise ValueError(f'index {index} not in 0..{nelems - 1}')
    l1_entry = header['l1_table_offset'] + 8 * indices[0]
    if len(indices) == 1:
        return l1_entry
    f.seek(l1_entry)
    l2_offset = struct.unpack('<Q', f.read(8))[0]
    if l2_offset == 0:
        raise ValueError(f'L1 entry {indices[0]} has no L2 table')
    return int(l2_offset) + 8 * indices[1]


def get_entry(f: BinaryIO, location: int) -> int:
    f.seek(location)
    data = f.read(8)
    if len(data) != 8:
        raise ValueError(f'entry at 0x{location:x} is past the end of file')
    return int(struct.unpack('<Q', data)[0])


def set_entry(f: BinaryIO, location: int, value: int) -> None:
    f.seek(location)
    f.write(struct.pack('<Q', value))


def dump(f: BinaryIO, header: Dict[str, int]) -> None:
    for name, _ in HEADER_FIELDS:
        print(f'{name:24} 0x{header[name]:x}')
    nelems = table_nelems(header)
    f.seek(header['l1_table_offset'])
    l1 = struct.unpack(f'<{nelems}Q', f.read(8 * nelems))
    for i, l2_offset in enumerate(l1):
        if l2_offset == 0:
            continue
        print(f'L1[{i}] 0x{l2_offset:x}')
        f.seek(l2_offset)
        data = f.read(8 * nelems)
        if len(data) != 8 * nelems:
            print('  (table runs past the end of the file)')
            continue
        for j, entry in enumerate(struct.unpack(f'<{nelems}Q', data)):
            if entry != 0:
                print(f'  L2[{j}] 0x{entry:x}')


def main(argv: List[str]) -> int:
    if len(argv) < 3:
        print('usage: qed_poke.py IMAGE dump | header [FIELD [VALUE]] | '
              'l1 INDEX [VALUE] | l2 L1_INDEX INDEX [VALUE]',
              file=sys.stderr)
        return 1
    image, command, args = argv[1], argv[2], argv[3:]

    with open(image, 'r+b') as f:
        header = read_header(f)
        if command == 'dump' and not args:
            dump(f, header)
        elif command == 'header' and not args:
            for name, _ in HEADER_FIELDS:
                print(f'{name:24} 0x{header[name]:x}')
        elif command == 'header' and len(args) in (1, 2):
            offset, fmt = field_offset(args[0])
            if len(args) == 1:
                print(f'0x{header[args[0]]:x}')
            else:
                f.seek(offset)
                f.write(struct.pack('<' + fmt, int(args[1], 0)))
        elif command in ('l1', 'l2'):
            n = 1 if command == 'l1' else 2
            if len(args) not in (n, n + 1):
                raise ValueError(f'{command} takes {n} index(es) '
                                 'and an optional value')
            location = entry_location(f, header, args[:n])
            if len(args) == n:
                print(f'0x{get_entry(f, location):x}')
            else:
                set_entry(f, location, int(args[n], 0))
        else:
            raise ValueError(f'bad command {" ".join(argv[2:])!r}')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main(sys.argv))
    except (ValueError, OSError, struct.error) as e:
        print(f'qed_poke.py: {e}', file=sys.stderr)
        sys.exit(1)

#!/usr/bin/env python3
#
# Expected guest-visible content of an image after some qemu-io writes
#
# Usage:
#   qed_expect.py SIZE BACKING [--raw FILE] [--window START END] -- CMD...
#
# SIZE      image size in bytes
# BACKING   "none", or "stripes:STRIPE:BACKSIZE:BASE": a backing file of
#           BACKSIZE bytes whose byte at offset o is
#           1 + (BASE + o // STRIPE) % 255 (so every STRIPE bytes carry
#           their own pattern, never zero);
#           `qed_expect.py ... backing-cmds` prints the qemu-io commands
#           that make such a file
# CMD       "write -P PAT OFF LEN", "write -z [-u] OFF LEN" or
#           "discard OFF LEN" (reads zeros afterwards), in order; offsets
#           and lengths multiples of 512, in any form qemu-io takes that
#           Python's int(x, 0) also takes, or with a k/M suffix
#
# Prints "read -q -P PAT OFF LEN" commands (hex) covering [START, END)
# (default: the whole image), one per run of equal bytes, for qemu-io to
# check; --raw also writes the whole expected content to FILE.
#
# This work is licensed under the terms of the GNU GPL, version 2 or later.
# See the COPYING file in the top-level directory.

import sys

SECTOR = 512


def num(s):
    mult = {'k': 1 << 10, 'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}
    if s[-1] in mult:
        return int(s[:-1], 0) * mult[s[-1]]
    return int(s, 0)


def backing_byte(spec, off):
    if spec is None:
        return 0
    stripe, backsize, base = spec
    if off >= backsize:
        return 0
    return 1 + (base + off // stripe) % 255


def main():
    args = sys.argv[1:]
    size = num(args.pop(0))
    backing = args.pop(0)
    spec = None
    if backing != 'none':
        kind, stripe, backsize, base = backing.split(':')
        assert kind == 'stripes'
        spec = (num(stripe), num(backsize), num(base))

    if args and args[0] == 'backing-cmds':
        stripe, backsize, base = spec
        for off in range(0, backsize, stripe):
            n = min(stripe, backsize - off)
            print('write -q -P %#x %#x %#x' % (backing_byte(spec, off),
                                               off, n))
        return

    raw = None
    window = (0, size)
    while args and args[0] != '--':
        opt = args.pop(0)
        if opt == '--raw':
            raw = args.pop(0)
        elif opt == '--window':
            window = (num(args.pop(0)), num(args.pop(0)))
        else:
            sys.exit('unknown option ' + opt)
    if args:
        args.pop(0)

    # One value per sector: every pattern here is uniform per sector
    sectors = [backing_byte(spec, s * SECTOR) for s in range(size // SECTOR)]
    for cmd in args:
        f = cmd.split()
        if f[0] == 'write' and '-P' in f:
            pat = num(f[f.index('-P') + 1])
        elif f[0] == 'write' and '-z' in f:
            pat = 0
        elif f[0] == 'discard':
            pat = 0
        else:
            sys.exit('cannot model ' + cmd)
        off, length = num(f[-2]), num(f[-1])
        assert off % SECTOR == 0 and length % SECTOR == 0, cmd
        for s in range(off // SECTOR, (off + length) // SECTOR):
            sectors[s] = pat & 0xff

    if raw:
        with open(raw, 'wb') as fh:
            for v in sectors:
                fh.write(bytes([v]) * SECTOR)

    start, end = window[0] // SECTOR, window[1] // SECTOR
    s = start
    while s < end:
        e = s
        while e < end and sectors[e] == sectors[s]:
            e += 1
        print('read -q -P %#x %#x %#x' % (sectors[s], s * SECTOR,
                                          (e - s) * SECTOR))
        s = e


main()

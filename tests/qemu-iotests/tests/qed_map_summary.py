#!/usr/bin/env python3
#
# Summarise `qemu-img map --output=json` (read from stdin) without the file
# offsets, so that the output does not depend on where the driver chose to
# put its clusters: neighbouring extents of the same kind are merged,
# whether or not their data is contiguous in the file.
#
# One line per extent:  START..END  KIND
# where KIND is "data" (allocated in the image, depth 0), "zero" (a zero
# cluster or zeroed area in the image, depth 0), "backing data" (depth 1),
# "backing zero" ... and "unallocated" (reads as zeros, nothing anywhere).
#
# With --mapping: the extents with their file offsets, one JSON object per
# line, without the "zero" flag of data extents (our driver asks the file
# below whether an allocated cluster was ever written; the original driver
# does not) nor a false "compressed" flag (added in QEMU 8.2), neighbours that map contiguously merged: two drivers' maps
# that say the same about where the data lives compare equal.
#
# This work is licensed under the terms of the GNU GPL, version 2 or later.
# See the COPYING file in the top-level directory.

import json
import sys


def kind(e):
    if not e['present']:
        return 'unallocated'
    prefix = 'backing ' * e['depth']
    if e['data']:
        return prefix + 'data'
    return prefix + 'zero'


def mapping(extents):
    out = []
    for e in extents:
        if e['data']:
            e.pop('zero')
        # QEMU 8.2 added "compressed" (always false for QED); a peer of
        # 7.2 leaves it out
        if not e.get('compressed', True):
            e.pop('compressed')
        p = out[-1] if out else None
        if p and p['start'] + p['length'] == e['start'] and \
                all(p.get(k) == e.get(k) for k in set(p) | set(e)
                    if k not in ('start', 'length', 'offset')) and \
                ('offset' in p) == ('offset' in e) and \
                ('offset' not in e or
                 p['offset'] + p['length'] == e['offset']):
            p['length'] += e['length']
        else:
            out.append(e)
    for e in out:
        print(json.dumps(e, sort_keys=True))


if sys.argv[1:] == ['--mapping']:
    mapping(json.load(sys.stdin))
    sys.exit(0)

out = []
for e in json.load(sys.stdin):
    k = kind(e)
    if out and out[-1][0] == k and out[-1][2] == e['start']:
        out[-1][2] += e['length']
    else:
        out.append([k, e['start'], e['start'] + e['length']])
for k, start, end in out:
    print('%#x..%#x  %s' % (start, end, k))

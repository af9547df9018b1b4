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


out = []
for e in json.load(sys.stdin):
    k = kind(e)
    if out and out[-1][0] == k and out[-1][2] == e['start']:
        out[-1][2] += e['length']
    else:
        out.append([k, e['start'], e['start'] + e['length']])
for k, start, end in out:
    print('%#x..%#x  %s' % (start, end, k))

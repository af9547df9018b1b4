#!/bin/bash
# iotest 194 (a base test, any format): the source issues
# migrate-start-postcopy after `migrate`, but a guest that never runs has
# no RAM left to send within a few milliseconds, and once only the dirty
# bitmap (a few bytes) is pending, the migration completes in precopy
# before the command lands: the expected "postcopy-active" event is
# missing.  Measured here on QEMU 7.2: 4 failures in 6 runs with qcow2, 3
# in 6 with qed.  A downtime limit of 0 gives a threshold of 0 bytes, so
# the migration keeps iterating while the bitmap is pending and completes
# only after postcopy has started and sent it: the test's expected output
# is unchanged and no longer depends on timing.  Idempotent: the file is
# written only when it changes.
set -euo pipefail
python3 - tests/qemu-iotests/194 <<'PY'
import sys
path = sys.argv[1]
src = open(path).read()
old = """    dest_vm.qmp('migrate-set-capabilities', capabilities=capabilities)
"""
new = old + """    source_vm.qmp('migrate-set-parameters', downtime_limit=0)
"""
if new in src:
    sys.exit(0)
if src.count(old) != 1:
    sys.exit("0008: tests/qemu-iotests/194: the migration set-up is not as expected")
open(path, 'w').write(src.replace(old, new, 1))
PY

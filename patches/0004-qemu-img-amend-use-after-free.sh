#!/bin/bash
# qemu-img amend: when the options do not parse as amend options, the base
# appends the create options to the option list (qemu_opts_append
# reallocates it) and only then deletes the QemuOpts made from the old list,
# so qemu_opts_del() writes into freed memory (ASan heap-use-after-free,
# seen by iotest qed-tools under make check-asan; not QED code).  Delete the
# QemuOpts first.  Idempotent: the file is written only when it changes.
set -euo pipefail
python3 - qemu-img.c <<'PY'
import sys
path = sys.argv[1]
src = open(path).read()
old = """        amend_opts = qemu_opts_append(amend_opts, bs->drv->create_opts);
        qemu_opts_del(opts);
"""
new = """        qemu_opts_del(opts);
        amend_opts = qemu_opts_append(amend_opts, bs->drv->create_opts);
"""
if old in src:
    open(path, 'w').write(src.replace(old, new, 1))
elif new not in src:
    sys.exit("0004: qemu-img.c: the amend code is not as expected")
PY

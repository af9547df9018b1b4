#!/bin/bash
# Build glue for our QED schedule and power-cut harness (tests/qed-sim,
# linked into the base by scripts/link-ours.sh): one `subdir('qed-sim')`
# line in the base's tests/meson.build.  The target is never built by
# default; `make` names it.  Idempotent: the file is touched only when the
# line is missing.
set -euo pipefail
f=tests/meson.build
if ! grep -qx "subdir('qed-sim')" "$f"; then
    printf "%s\n" "subdir('qed-sim')" >> "$f"
fi

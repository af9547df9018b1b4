#!/bin/bash
# Build glue for our QED fuzzer (tests/qed-fuzz, linked into the base by
# scripts/link-ours.sh): one `subdir('qed-fuzz')` line in the base's
# tests/meson.build.  The target is never built by default, so the normal
# build only sees one more (unbuilt) executable.  Idempotent: the file is
# touched only when the line is missing.
set -euo pipefail
f=tests/meson.build
if ! grep -qx "subdir('qed-fuzz')" "$f"; then
    printf "%s\n" "subdir('qed-fuzz')" >> "$f"
fi

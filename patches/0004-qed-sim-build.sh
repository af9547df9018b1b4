#!/bin/bash
# Build glue for our QED schedule and power-cut harness (tests/qed-sim) and
# our multiqueue stress test (tests/qed-mq), linked into the base by
# scripts/link-ours.sh: a `subdir()` line each in the base's
# tests/meson.build.  The target is never built by
# default; `make` names it.  Idempotent: the file is touched only when the
# line is missing.
set -euo pipefail
f=tests/meson.build
for d in qed-sim qed-mq; do
    if ! grep -qx "subdir('$d')" "$f"; then
        printf "%s\n" "subdir('$d')" >> "$f"
    fi
done

#!/bin/bash
# Build glue for our unit tests (tests/unit/test-qed-*.c, linked into the
# base's tests/unit/ by scripts/link-ours.sh): one entry per test in the
# base's tests/unit/meson.build, among the block layer's tests, so that it
# links against the block library (our driver's files) as they do.  `make`
# builds each by name; `make check` runs them.  Idempotent: the file is
# touched only when an entry is missing.
set -euo pipefail
TOP=$1
f=tests/unit/meson.build
anchor="    'test-write-threshold': [testblock],"
grep -qxF "$anchor" "$f" || {
    echo "0006-qed-unit-tests.sh: no line \"$anchor\" in $f" >&2
    exit 1
}
for c in "$TOP"/tests/unit/test-*.c; do
    [ -e "$c" ] || continue
    entry="    '$(basename "$c" .c)': [testblock],"
    grep -qxF "$entry" "$f" && continue
    new=$(mktemp)
    awk -v anchor="$anchor" -v entry="$entry" \
        '{ print } $0 == anchor { print entry }' "$f" > "$new"
    cat "$new" > "$f"
    rm -f "$new"
done

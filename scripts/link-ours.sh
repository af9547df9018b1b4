#!/bin/bash
# Replace the base's QED files with links to ours.  Safe to run again: it
# also links any of our files added since the base was prepared.  (The
# base's own QED sources are deleted already when the base is fetched,
# scripts/fetch-base-10.sh; the loop below still removes any left.)
#
# It runs outside the build lock (make build takes it for ninja only), so
# while another make compiles: a link that is already right is left alone,
# never removed and made again, lest that compile miss the file.
set -euo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
SRC=$TOP/.base/qemu

# link FILE DEST: DEST becomes a link to FILE, unless it is one already.
link() {
    if [ ! -L "$2" ] || [ "$(readlink "$2")" != "$1" ]; then
        ln -sfn "$1" "$2"
    fi
}

# The base's own QED files, and links to files of ours since removed, go.
for f in "$SRC"/block/qed*.c "$SRC"/block/qed*.h; do
    [ -e "$f" ] || [ -L "$f" ] || continue
    if [ ! -L "$f" ] || [ ! -e "$f" ] ||
       [ "$(readlink "$f")" != "$TOP/block/${f##*/}" ]; then
        rm -f "$f"
    fi
done
for f in "$TOP"/block/qed*.[ch]; do
    link "$f" "$SRC/block/$(basename "$f")"
done
link "$TOP/docs/interop/qed_spec.txt" "$SRC/docs/interop/qed_spec.txt"
mkdir -p "$SRC/tests/qemu-iotests/tests"
for t in "$TOP"/tests/qemu-iotests/tests/*; do
    [ -e "$t" ] || continue
    link "$t" "$SRC/tests/qemu-iotests/tests/$(basename "$t")"
done

# The sources and meson.build of our fuzzer, our schedule harness and our
# multiqueue stress test (patches/0003-qed-fuzz-build.sh and
# 0004-qed-sim-build.sh add the subdirs to the base's tests/meson.build)
for d in qed-fuzz qed-sim qed-mq; do
    mkdir -p "$SRC/tests/$d"
    for f in "$TOP/tests/$d/meson.build" "$TOP/tests/$d"/*.c; do
        [ -e "$f" ] || continue
        link "$f" "$SRC/tests/$d/$(basename "$f")"
    done
done

# Our unit tests, beside the base's (patches/0006-qed-unit-tests.sh adds
# them to the base's tests/unit/meson.build)
for f in "$TOP"/tests/unit/*.c; do
    [ -e "$f" ] || continue
    link "$f" "$SRC/tests/unit/$(basename "$f")"
done

# Scripted changes to the base (idempotent; they touch files only on change)
for p in "$TOP"/patches/*.sh; do
    [ -e "$p" ] || continue
    (cd "$SRC" && bash "$p" "$TOP")
done

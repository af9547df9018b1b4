#!/bin/bash
# Configure the ThreadSanitizer build of the fork, once: .base/qemu/build-tsan,
# clang 19 with QEMU 10.0's --enable-tsan (TSan with the fiber annotations
# that QEMU's coroutines use) and --enable-debug-graph-lock (the block
# graph lock checked at run time).  It serves `make check-tsan`.
#
# Why clang 19: gcc ignores the graph-lock annotations (GRAPH_RDLOCK,
# TSA_*), and QEMU adds -Wthread-safety only when the compiler passes its
# probe (meson.build: a lock released by a cleanup attribute), which needs
# clang >= 17 (the analysis of cleanup functions): bookworm's clang 14 and
# clang-16 fail it, so with them the build checks nothing at compile time.
# Bookworm's clang-19 passes it, and then every file, ours too, is compiled
# with -Wthread-safety: this build is also the one whose warnings in our
# files must stay at 0 (scripts/check-tsan.sh counts them).
#
# Tools only (no system emulator, no user mode): qemu-img, qemu-io,
# qemu-storage-daemon, and what `make check-tsan` builds by name
# (tests/qed-mq/qed-mq, our unit tests).
# The base must be prepared (scripts/prepare-base.sh) first; a re-prepared
# base starts this build afresh (its stamp lives in the build folder).
# Meson as for the main build (scripts/fetch-meson.sh).
set -euo pipefail

TOP=$(cd "$(dirname "$0")/.." && pwd)
SRC=$TOP/.base/qemu
BUILD=$SRC/build-tsan
STAMP=$BUILD/.configured
LOG=$TOP/.base/configure-tsan.log
CC=${TSAN_CC:-clang-19}
CXX=${TSAN_CXX:-clang++-19}

if [ -f "$STAMP" ]; then
    exit 0
fi

mkdir -p "$BUILD"
meson_py=$("$TOP/scripts/fetch-meson.sh" "$TOP/.base/meson")

echo "Configuring the TSan build in $BUILD (log: .base/configure-tsan.log)"
cd "$BUILD"
PYTHONPATH=$meson_py ../configure --python=/usr/bin/python3 \
    --disable-download \
    --cc="$CC" --cxx="$CXX" \
    --disable-system --disable-user --enable-tools \
    --disable-guest-agent --disable-install-blobs \
    --disable-docs --disable-werror \
    --enable-linux-aio --enable-linux-io-uring \
    --enable-tsan --enable-debug-graph-lock --enable-debug-info \
    --extra-cflags="-fno-omit-frame-pointer" \
    --extra-cxxflags="-fno-omit-frame-pointer" \
    > "$LOG" 2>&1 ||
    { tail -30 "$LOG"; exit 1; }
"$TOP/scripts/fetch-meson.sh" --pth "$meson_py" "$BUILD"

# What this build is for: refuse it if any of it is missing.
fail() { echo "prepare-tsan.sh: $*" >&2; exit 1; }
grep -q '^#define CONFIG_TSAN\b' config-host.h ||
    fail "TSan is not enabled in $BUILD/config-host.h"
grep -q '^#define CONFIG_DEBUG_GRAPH_LOCK\b' config-host.h ||
    fail "graph-lock debugging is not enabled in $BUILD/config-host.h"
grep -q -- '-Wthread-safety' build.ninja ||
    fail "$CC failed QEMU's -Wthread-safety probe: the graph-lock annotations would not be checked"
echo "TSan build: $($CC --version | head -n 1); -Wthread-safety on; graph-lock debugging on"

touch "$STAMP"

#!/bin/bash
# Configure the sanitizer build of the fork, once: .base/qemu/build-san,
# clang with ASan and UBSan (QEMU 10.0's --enable-asan --enable-ubsan) and
# libFuzzer's coverage instrumentation (-fsanitize=fuzzer-no-link, limited
# to our QED files by tests/qed-fuzz/coverage-allowlist).  The one build
# serves both `make check-asan` (the five binaries) and `make fuzz`
# (tests/qed-fuzz).
# The base must be prepared (scripts/prepare-base.sh) first; a re-prepared
# base starts this build afresh (its stamp lives in the build folder).
# Meson as for the main build (scripts/fetch-meson.sh): the one that
# prepare-base.sh unpacked, on PYTHONPATH for configure, then in a .pth file
# of this build's pyvenv.
set -euo pipefail

TOP=$(cd "$(dirname "$0")/.." && pwd)
SRC=$TOP/.base/qemu
BUILD=$SRC/build-san
STAMP=$BUILD/.configured

if [ -f "$STAMP" ]; then
    exit 0
fi

mkdir -p "$BUILD/qemu-bundle/usr/share" "$BUILD/qemu-bundle/usr/lib/ipxe"
ln -sfn /usr/share/qemu "$BUILD/qemu-bundle/usr/share/qemu"
ln -sfn /usr/share/seabios "$BUILD/qemu-bundle/usr/share/seabios"
ln -sfn /usr/lib/ipxe/qemu "$BUILD/qemu-bundle/usr/lib/ipxe/qemu"

meson_py=$("$TOP/scripts/fetch-meson.sh" "$TOP/.base/meson")

echo "Configuring the sanitizer build in $BUILD (log: .base/configure-san.log)"
cd "$BUILD"
fuzz_cflags="-fsanitize=fuzzer-no-link -fsanitize-coverage-allowlist=$TOP/tests/qed-fuzz/coverage-allowlist"
PYTHONPATH=$meson_py ../configure --python=/usr/bin/python3 \
    --disable-download \
    --cc=clang --cxx=clang++ \
    --target-list=x86_64-softmmu --enable-tools \
    --disable-install-blobs \
    --firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu \
    --disable-docs --disable-werror \
    --enable-linux-aio --enable-linux-io-uring \
    --enable-asan --enable-ubsan --enable-debug-info \
    --extra-cflags="-fno-omit-frame-pointer $fuzz_cflags" \
    --extra-cxxflags="-fno-omit-frame-pointer" \
    --extra-ldflags="-fsanitize=fuzzer-no-link" \
    > "$TOP/.base/configure-san.log" 2>&1 ||
    { tail -30 "$TOP/.base/configure-san.log"; exit 1; }
"$TOP/scripts/fetch-meson.sh" --pth "$meson_py" "$BUILD"

touch "$STAMP"

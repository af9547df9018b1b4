#!/bin/bash
# Install what building the fork and running its tests needs, with apt-get,
# plus any packages named as arguments (scripts/install-bench-deps.sh).
# Idempotent: does nothing when every package is already there.
set -euo pipefail

# The base is QEMU 10.0 (scripts/prepare-base.sh): its meson (>= 1.5) is
# not bookworm's but bookworm-backports', unpacked privately by
# scripts/fetch-meson.sh (dpkg-dev; python3-setuptools is that meson's
# dependency); configure's venv tool takes distlib from python3-pip.  The
# qemu source and that meson come through apt configurations of their own
# (scripts/fetch-base-10.sh, fetch-meson.sh): no deb-src or backports line
# is added to the system's apt sources.
# qemu-utils (bookworm's QEMU 7.2) is the original QED driver, the peer in
# the tests; seabios, ipxe-qemu, qemu-system-data: firmware for the built
# qemu-system-x86_64.
# busybox-static, cpio, xz-utils, zstd: the guest that `make demo` boots;
# strace: delay and kill injection in the race and crash iotests
PKGS="build-essential dpkg-dev ninja-build pkg-config
      python3 python3-venv python3-pip python3-setuptools
      libglib2.0-dev zlib1g-dev libpixman-1-dev libfdt-dev libaio-dev liburing-dev
      libslirp-dev seabios ipxe-qemu qemu-system-data qemu-utils
      bc util-linux e2fsprogs file socat strace
      busybox-static cpio xz-utils zstd"
PKGS="$PKGS $*"

SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO=sudo
fi

missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
        missing="$missing $p"
    fi
done

if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -q
    echo "Installing:$missing"
    $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends $missing
fi

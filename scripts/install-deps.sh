#!/bin/bash
# Install what building the fork and running its tests needs, with apt-get,
# plus any packages named as arguments (scripts/install-bench-deps.sh).
# Idempotent: does nothing when every package is already there.
set -euo pipefail

# busybox-static, cpio, xz-utils, zstd: the guest that `make demo` boots;
# strace: delay and kill injection in the race and crash iotests
PKGS="build-essential dpkg-dev meson ninja-build pkg-config python3 python3-venv
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

# apt-get source needs a deb-src line mirroring the deb one.
SRC=/etc/apt/sources.list.d/qed-fork-deb-src.sources
need_update=0
if [ ! -f "$SRC" ]; then
    sed -n '/^Types:/,$p' /etc/apt/sources.list.d/debian.sources |
        sed 's/^Types: deb$/Types: deb-src/' | $SUDO tee "$SRC" >/dev/null
    need_update=1
fi

if [ -n "$missing" ] || [ "$need_update" = 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -q
fi
if [ -n "$missing" ]; then
    echo "Installing:$missing"
    $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends $missing
fi

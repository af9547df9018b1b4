#!/bin/bash
# Install what `make bench` needs on top of scripts/install-deps.sh:
# gnuplot (the chart), GNU time (/usr/bin/time), python3 (the report) and
# qemu-utils (the reference peer: Debian's qemu-img/qemu-io with the original
# QED driver). Idempotent: does nothing when every package is already there.
set -euo pipefail

PKGS="gnuplot-nox time python3 qemu-utils"

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
    echo "Installing:$missing"
    # Another apt-get may hold the lock for a while: wait for it.
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -q
    $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -q \
        --no-install-recommends $missing
fi

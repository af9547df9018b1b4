#!/bin/bash
# The original QED driver of QEMU 10.0, as a peer to measure ours against,
# without installing anything system-wide:
#
#   scripts/fetch-peer-10.sh DEST    (prints the folder of its binaries)
#
# Debian's bookworm-backports carries qemu-utils 1:10.0.x~bpo12 (built from
# trixie's QEMU 10.0, with the original QED): qemu-img, qemu-io, qemu-nbd and
# qemu-storage-daemon.  As scripts/fetch-meson.sh does for meson, its .deb
# is downloaded with an apt configuration of our own (DEST/apt: own
# sources.list with the bookworm-backports line, own state, lists, cache;
# the system's apt.conf.d and trusted keys still apply) and unpacked under
# DEST/<version>/ with dpkg-deb -x: never installed, the system's qemu-utils
# (7.2, the bench's default peer) stays as it is.  The binaries need only
# libraries bookworm has (those of its own qemu-utils, plus liburing2 and
# libfuse3-3 from qemu-utils' dependencies); any missing one is named, and
# the script fails, after the unpack (`ldd`).  They look for their modules
# (curl, iscsi, ...: not needed for qed, qcow2, raw) under /usr/lib, where
# 7.2's would not load: nothing the bench uses.
#
# Use: BENCH_PEER_DIR=$(scripts/fetch-peer-10.sh .base/peer10) make bench
# runs the original 10.0 as the bench's "peer QED" (qcow2 and raw too, with
# BENCH_REF=peer).
#
# What it cannot do: submit to one image from two iothreads.  In 10.0,
# qemu-img, qemu-io and qemu-nbd run every request in the main loop, and
# qemu-storage-daemon's exports run in their node's one AioContext (the
# export's `iothread` is one name in 10.0's QAPI, block-export.json, and
# blk_exp_add moves the node there; a second export with another iothread
# moves the node, and the first export with it, or fails with
# fixed-iothread).  Only qemu-system's virtio-blk/virtio-scsi
# iothread-vq-mapping spreads one node's requests over iothreads, and a
# guest must issue them.  So the multiqueue rows of make bench (issue 19,
# tests/qed-mq) have no 10.0 peer.
#
# PEER10_VERSION=1:10.0.2+ds-2+deb13u1~bpo12+1 (say) fetches that exact
# version; the default is the newest bookworm-backports has.  Runs apt-get
# update (a few hundred kB of Packages index) only when the unpacked
# binaries are missing.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 DEST" >&2
    exit 2
fi
mkdir -p "$1"
DEST=$(cd "$1" && pwd)
APTDIR=$DEST/apt
BINS="qemu-img qemu-io qemu-nbd qemu-storage-daemon"

# The folder of the binaries unpacked for version $1 (an epoch's colon
# made safe for a path)
bindir() { echo "$DEST/${1//:/_}/usr/bin"; }

# ldd of every binary: "not found" libraries make it fail
check_libs() {
    local missing
    missing=$(for b in $BINS; do ldd "$1/$b"; done |
              awk '/not found/ {print $1}' | sort -u)
    if [ -n "$missing" ]; then
        echo "the qemu-utils of 10.0 in $1 need libraries this machine lacks:" \
             $missing >&2
        exit 1
    fi
}

# The version last unpacked serves again unless another one is asked for.
if [ -z "${PEER10_VERSION:-}" ] && [ -s "$DEST/current" ]; then
    VER=$(cat "$DEST/current")
    if [ -f "$DEST/${VER//:/_}/.unpacked" ]; then
        check_libs "$(bindir "$VER")"
        bindir "$VER"
        exit 0
    fi
fi

# A private apt configuration for bookworm-backports (scripts/backports-apt.sh)
. "$(dirname "$0")/backports-apt.sh"

if [ -n "${PEER10_VERSION:-}" ]; then
    VER=$PEER10_VERSION
else
    VER=$(apt-cache "${APT_OPTS[@]}" show qemu-utils |
          sed -n 's/^Version: //p' | sort -V | tail -n 1)
fi
[ -n "$VER" ] || { echo "no qemu-utils in bookworm-backports" >&2; exit 1; }
UP=${VER#*:}
if [ "${UP%%.*}" != 10 ] || [ "$(echo "$UP" | cut -d. -f2)" != 0 ]; then
    echo "qemu-utils $VER from bookworm-backports is not QEMU 10.0" >&2
    exit 1
fi

DIR=$DEST/${VER//:/_}
if [ ! -f "$DIR/.unpacked" ]; then
    rm -rf "$DIR" "$DEST/dl"
    mkdir -p "$DEST/dl"
    (cd "$DEST/dl" && apt-get "${APT_OPTS[@]}" -q download "qemu-utils=$VER" >&2)
    # apt checked the .deb against the signed Packages index.
    dpkg-deb -x "$DEST"/dl/qemu-utils_*.deb "$DIR"
    rm -rf "$DEST/dl"
    touch "$DIR/.unpacked"
fi
echo "$VER" > "$DEST/current"
check_libs "$(bindir "$VER")"
echo "qemu-utils $VER (bookworm-backports, the original QED of 10.0) in $DIR" >&2
"$(bindir "$VER")/qemu-img" --version | head -n 1 >&2
bindir "$VER"

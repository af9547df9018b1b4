#!/bin/bash
# Provide the meson that the base (QEMU 10.0) needs, without touching the
# system's meson or its apt sources:
#
#   scripts/fetch-meson.sh DEST    (prints the folder to put on sys.path)
#   scripts/fetch-meson.sh --pth FOLDER BUILD
#                                  (after configure: FOLDER into BUILD's pyvenv)
#
# Why: QEMU 10.0's configure has no --meson= any more; it makes a Python
# venv (build/pyvenv, with the system's site-packages) and requires
# meson >= 1.5 importable there.  Bookworm's meson is 1.0.1; Debian's +ds
# source tarball has no python/wheels/*.whl to fall back on, and PyPI is not
# reachable.  Bookworm-backports has meson 1.7.  Installing it into the
# system (apt-get install -t bookworm-backports meson) would change
# /usr/bin/meson under every other meson build on the machine (and it would
# add a backports source to the system's apt config), so instead its .deb is
# downloaded with an apt configuration of our own (DEST/apt: own
# sources.list with the bookworm-backports line, own state, lists, cache;
# the system's apt.conf.d and trusted keys still apply) and unpacked under
# DEST/<version>/ with dpkg-deb -x.  The folder printed (its
# usr/lib/python3/dist-packages, which holds mesonbuild and meson's
# metadata) is put on PYTHONPATH for configure, and prepare-base.sh /
# prepare-san.sh then write it into a .pth file in the build's pyvenv
# (--pth), so that pyvenv/bin/meson also finds it when ninja re-runs meson
# later, without PYTHONPATH.  (Should configure itself run again, through
# the build's config.status or QEMU's own Makefile, it makes pyvenv afresh
# and needs the PYTHONPATH again: re-prepare instead, or set it.)
#
# MESON_VERSION=1.7.0-1~bpo12+1 (say) fetches that exact version; the
# default is the newest bookworm-backports has.  Runs apt-get update (a few
# MB of Packages index) only when the unpacked meson is missing.
set -euo pipefail

if [ "${1:-}" = --pth ] && [ $# -eq 3 ]; then
    # venv's site-packages processes .pth files before the system's
    # dist-packages, so this meson also comes before a system one.
    purelib=$(env -u PYTHONPATH "$3/pyvenv/bin/python3" -c \
              'import sysconfig; print(sysconfig.get_path("purelib"))')
    echo "$2" > "$purelib/qed-fork-meson.pth"
    if ! v=$(cd "$3" && env -u PYTHONPATH pyvenv/bin/meson --version); then
        echo "$3/pyvenv/bin/meson does not run with $2" >&2
        exit 1
    fi
    echo "pyvenv/bin/meson: meson $v" >&2
    exit 0
fi

if [ $# -ne 1 ]; then
    echo "usage: $0 DEST" >&2
    exit 2
fi
mkdir -p "$1"
DEST=$(cd "$1" && pwd)
APTDIR=$DEST/apt

# The version last unpacked serves again unless another one is asked for.
if [ -z "${MESON_VERSION:-}" ] && [ -s "$DEST/current" ]; then
    VER=$(cat "$DEST/current")
    PYDIR=$DEST/$VER/usr/lib/python3/dist-packages
    if [ -f "$DEST/$VER/.unpacked" ]; then
        echo "$PYDIR"
        exit 0
    fi
fi

# A private apt configuration for bookworm-backports (scripts/backports-apt.sh)
. "$(dirname "$0")/backports-apt.sh"

if [ -n "${MESON_VERSION:-}" ]; then
    VER=$MESON_VERSION
else
    VER=$(apt-cache "${APT_OPTS[@]}" show meson |
          sed -n 's/^Version: //p' | sort -V | tail -n 1)
fi
[ -n "$VER" ] || { echo "no meson in bookworm-backports" >&2; exit 1; }
if dpkg --compare-versions "$VER" lt 1.5.0; then
    echo "meson $VER from bookworm-backports is older than QEMU 10.0's 1.5.0" >&2
    exit 1
fi

DIR=$DEST/$VER
if [ ! -f "$DIR/.unpacked" ]; then
    rm -rf "$DIR" "$DEST/dl"
    mkdir -p "$DEST/dl"
    (cd "$DEST/dl" && apt-get "${APT_OPTS[@]}" -q download "meson=$VER" >&2)
    # apt checked the .deb against the signed Packages index.
    dpkg-deb -x "$DEST"/dl/meson_*.deb "$DIR"
    rm -rf "$DEST/dl"
    touch "$DIR/.unpacked"
fi
echo "$VER" > "$DEST/current"
echo "Meson $VER (bookworm-backports) in $DIR" >&2
echo "$DIR/usr/lib/python3/dist-packages"

#!/bin/bash
# Fetch and unpack Debian trixie's qemu source package (QEMU 10.0), the base
# our QED driver is to be ported to, into DEST:
#
#   scripts/fetch-base-10.sh DEST        (prints the unpacked source folder)
#
# apt runs with a configuration of its own under DEST/apt (its own
# sources.list with trixie's deb-src lines, its own state, lists and cache),
# so the system's apt sources and lists are never touched.  The system's
# apt.conf.d (proxy settings and the like) and trusted keys still apply.
# dpkg-source -x unpacks the 3.0 (quilt) package with Debian's patches
# applied.
#
# The base's own QED driver and QED spec are deleted from the unpacked tree
# (ours replaces them, see link-ours.sh): not one line of them is to be read.
# KEEP_BASE_QED=1 keeps them.
#
# QEMU_VERSION=1:10.0.2+ds-1 (say) fetches that exact version; the default
# is the newest trixie (or trixie-security) has.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 DEST" >&2
    exit 2
fi
mkdir -p "$1"
DEST=$(cd "$1" && pwd)
APTDIR=$DEST/apt
DL=$DEST/dl

# dpkg-source comes with dpkg-dev (installed with the system's apt config).
if ! command -v dpkg-source >/dev/null 2>&1; then
    apt-get install -y dpkg-dev >&2
fi

mkdir -p "$APTDIR/etc" "$APTDIR/state/lists/partial" \
         "$APTDIR/cache/archives/partial" "$DL"
cat > "$APTDIR/etc/sources.list" <<'EOF'
deb-src http://deb.debian.org/debian trixie main
deb-src http://deb.debian.org/debian-security trixie-security main
EOF
: > "$APTDIR/state/status"

APT_OPTS=(
    -o "Dir::Etc::sourcelist=$APTDIR/etc/sources.list"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::Etc::preferences=$APTDIR/etc/preferences"
    -o "Dir::Etc::preferencesparts=-"
    -o "Dir::State=$APTDIR/state"
    -o "Dir::State::lists=$APTDIR/state/lists"
    -o "Dir::State::status=$APTDIR/state/status"
    -o "Dir::Cache=$APTDIR/cache"
    -o "Dir::Cache::archives=$APTDIR/cache/archives"
    -o "Dir::Cache::pkgcache=$APTDIR/cache/pkgcache.bin"
    -o "Dir::Cache::srcpkgcache=$APTDIR/cache/srcpkgcache.bin"
    # Only source indices: no Packages/Contents/Translation downloads.
    -o "Acquire::Languages=none"
    -o "APT::Get::Only-Source=true"
    # Downloads land in folders of ours that _apt may not be able to enter.
    -o "APT::Sandbox::User=root"
)

echo "apt-get update (private config in $APTDIR)" >&2
apt-get "${APT_OPTS[@]}" -q update >&2

if [ -n "${QEMU_VERSION:-}" ]; then
    VER=$QEMU_VERSION
else
    VER=$(apt-cache "${APT_OPTS[@]}" showsrc qemu |
          sed -n 's/^Version: //p' | sort -V | tail -n 1)
fi
[ -n "$VER" ] || { echo "no qemu source package found" >&2; exit 1; }
case "$VER" in
    1:10.0.*) ;;
    *) echo "warning: trixie's qemu is $VER, not 1:10.0.x" >&2 ;;
esac
UPVER=${VER#*:}                 # dsc file names have no epoch
DSC=$DL/qemu_$UPVER.dsc

cd "$DL"
if [ ! -f "$DSC" ]; then
    echo "apt-get source --download-only qemu=$VER" >&2
    apt-get "${APT_OPTS[@]}" -q source --download-only "qemu=$VER" >&2
fi

SRC=$DEST/qemu-${UPVER%-*}
if [ ! -f "$SRC/.unpacked" ]; then
    rm -rf "$SRC"
    # apt checked the files against the signed Sources index; dpkg-source
    # checks them against the .dsc again (it may warn that it cannot check
    # the uploader's signature: debian-keyring is not installed).
    dpkg-source -x "$DSC" "$SRC" >&2
    if [ "${KEEP_BASE_QED:-0}" != 1 ]; then
        rm -f "$SRC"/block/qed*.c "$SRC"/block/qed*.h \
              "$SRC"/docs/interop/qed_spec.txt
    fi
    echo "$VER" > "$SRC/.debian-version"
    touch "$SRC/.unpacked"
fi
echo "Fetched Debian source package qemu $VER" >&2
echo "$SRC"

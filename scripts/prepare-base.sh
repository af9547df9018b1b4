#!/bin/bash
# Fetch and unpack the base (Debian trixie's qemu source package, QEMU 10.0)
# into .base/qemu, remove the base's own QED driver, link ours in, apply our
# patches and configure.  Runs once: a stamp file makes later calls a no-op,
# so a rebuild after editing one of our files only runs ninja.
#
# QEMU_VERSION=1:10.0.13+ds-0+deb13u1 (say) pins the base to that Debian
# version (see scripts/fetch-base-10.sh); the default is the newest trixie
# and trixie-security have.  MESON_VERSION pins the meson (see
# scripts/fetch-meson.sh).  QED_CONFIGURE_EXTRA adds configure options.
set -euo pipefail

TOP=$(cd "$(dirname "$0")/.." && pwd)
BASE=$TOP/.base
SRC=$BASE/qemu
STAMP=$BASE/.prepared

if [ -f "$STAMP" ]; then
    exit 0
fi
mkdir -p "$BASE"

# The source, with Debian's patches applied and the base's QED driver and
# spec already deleted (fetch-base-10.sh: its own apt configuration in
# .base/fetch/apt; the system's apt sources are never touched).  The
# unpacked tree is moved into place, so a later prepare unpacks afresh
# from the downloaded files.
fetched=$("$TOP/scripts/fetch-base-10.sh" "$BASE/fetch")
rm -rf "$SRC"
mv "$fetched" "$SRC"
rm -f "$SRC/.unpacked"
version=$(cat "$SRC/.debian-version")
echo "Base: Debian source package qemu $version"
echo "qemu $version" > "$BASE/version"

# The meson that configure needs (>= 1.5; bookworm has 1.0.1): the .deb of
# bookworm-backports, unpacked privately, see scripts/fetch-meson.sh.
meson_py=$("$TOP/scripts/fetch-meson.sh" "$BASE/meson")

# Our QED driver replaces the base's: delete theirs (if any is left) so
# that not one line of it can be compiled, then link ours in at the same
# paths; this also runs patches/*.sh (they run on every build from
# link-ours.sh).
"$TOP/scripts/link-ours.sh"

# Our patches to the base, in order.
for p in "$TOP"/patches/*.patch; do
    [ -e "$p" ] || continue
    echo "Applying $(basename "$p")"
    patch -d "$SRC" -p1 --forward --quiet < "$p"
done

# Binaries run from the build folder look for firmware in qemu-bundle.
mkdir -p "$SRC/build/qemu-bundle/usr/share" "$SRC/build/qemu-bundle/usr/lib/ipxe"
ln -sfn /usr/share/qemu "$SRC/build/qemu-bundle/usr/share/qemu"
ln -sfn /usr/share/seabios "$SRC/build/qemu-bundle/usr/share/seabios"
ln -sfn /usr/lib/ipxe/qemu "$SRC/build/qemu-bundle/usr/lib/ipxe/qemu"

# configure makes build/pyvenv from --python (Debian's python3: the first
# python3 on PATH may be one that does not see Debian's python packages)
# and takes meson from it; PYTHONPATH makes our meson importable there.
# --disable-download: nothing from PyPI or from meson's wraps (the +ds
# tarball has the subprojects QEMU needs for this configuration).
echo "Configuring (log: .base/configure.log)"
cd "$SRC/build"
PYTHONPATH=$meson_py ../configure --python=/usr/bin/python3 \
    --disable-download \
    --target-list=x86_64-softmmu --enable-tools \
    --disable-install-blobs \
    --firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu \
    --disable-docs --disable-werror \
    --enable-linux-aio --enable-linux-io-uring \
    ${QED_CONFIGURE_EXTRA:-} > "$BASE/configure.log" 2>&1 ||
    { tail -30 "$BASE/configure.log"; exit 1; }
"$TOP/scripts/fetch-meson.sh" --pth "$meson_py" "$SRC/build"

touch "$STAMP"

#!/bin/bash
# Fetch and unpack the base (Debian bookworm's qemu source package) into
# .base/, remove the base's own QED driver, link ours in, apply our patches
# and configure.  Runs once: a stamp file makes later calls a no-op, so a
# rebuild after editing one of our files only runs ninja.
set -euo pipefail

TOP=$(cd "$(dirname "$0")/.." && pwd)
BASE=$TOP/.base
SRC=$BASE/qemu
STAMP=$BASE/.prepared

if [ -f "$STAMP" ]; then
    exit 0
fi

mkdir -p "$BASE/dl"
cd "$BASE/dl"
if ! ls qemu_7.2*.dsc >/dev/null 2>&1; then
    apt-get source --download-only qemu
fi
DSC=$(ls qemu_7.2*.dsc | sort -V | tail -n 1)
echo "Base: Debian source package $(basename "$DSC" .dsc)"

rm -rf "$SRC"
dpkg-source --no-check -x "$DSC" "$SRC" >/dev/null
basename "$DSC" .dsc > "$BASE/version"

# Our QED driver replaces the base's: delete theirs so that not one line of
# it can be compiled, then link ours in at the same paths.
"$TOP/scripts/link-ours.sh"

# Our patches to the base, in order (patches/*.sh run on every build, from
# link-ours.sh).
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

cd "$SRC/build"
../configure --target-list=x86_64-softmmu --enable-tools \
    --meson=/usr/bin/meson \
    --disable-install-blobs \
    --firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu \
    --disable-docs --disable-werror \
    --enable-linux-aio --enable-linux-io-uring \
    ${QED_CONFIGURE_EXTRA:-} > "$BASE/configure.log" 2>&1 ||
    { tail -30 "$BASE/configure.log"; exit 1; }

touch "$STAMP"

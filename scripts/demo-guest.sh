#!/bin/bash
# Boot a small Linux guest from a QED root disk on the fork's own
# qemu-system-x86_64, then check the image from the host.
#
#   scripts/demo-guest.sh            (called by scripts/demo.sh)
#   ACCEL=kvm scripts/demo-guest.sh  use KVM instead of TCG (make demo ACCEL=kvm)
#
# What it does:
#  1. kernel: Debian's linux-image-cloud-amd64 (apt-get download, dpkg-deb -x,
#     never installed): vmlinuz and the virtio modules;
#  2. initramfs (busybox-static, cpio): loads the modules, waits for /dev/vda,
#     mounts it (ext4 is built in) and switch_root's to it;
#  3. root disk: `mkfs.ext4 -d` of a tree holding busybox and an /init, made
#     into QED by the fork's qemu-img convert;
#  4. the guest's /init writes files with known content, runs a mixed write
#     load with fsync (create, rewrite in place, append, O_DIRECT, delete and
#     fstrim), lists its disk, writes a manifest of sha256 sums (also printed
#     on the console), remounts read-only and powers off;
#  5. the host: our qemu-img check and the original driver's (Debian's
#     qemu-utils), the NEED_CHECK bit, a raw conversion by both compared
#     byte for byte, e2fsck, and every file read back with debugfs and
#     compared with what the guest wrote.
#
# Downloads and builds are cached under .base/demo/ (kernel, initramfs); the
# disk of the last run stays in .base/demo/run/ to look at.
set -euo pipefail

TOP=$(cd "$(dirname "$0")/.." && pwd)
B=$TOP/.base/qemu/build
PEER_IMG=/usr/bin/qemu-img
CACHE=$TOP/.base/demo
RUN=$CACHE/run
ACCEL=${ACCEL:-tcg}
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk"

step() { printf '\n== %s\n' "$*"; }
fail() { echo "DEMO FAILED: $*"; exit 1; }
need() { command -v "$1" >/dev/null || fail "$1 is missing (scripts/install-deps.sh installs it)"; }

for t in busybox cpio gzip mkfs.ext4 debugfs e2fsck dpkg-deb apt-get sha256sum timeout; do
    need "$t"
done
BUSYBOX=$(command -v busybox)
file -L "$BUSYBOX" | grep -q 'statically linked' ||
    fail "$BUSYBOX is not static: install busybox-static"
[ -x "$B/qemu-system-x86_64" ] || fail "no $B/qemu-system-x86_64: run 'make' first"

case "$ACCEL" in
    tcg) TIMEOUT=${DEMO_TIMEOUT:-150} ;;
    kvm) TIMEOUT=${DEMO_TIMEOUT:-45}
         [ -w /dev/kvm ] || fail "ACCEL=kvm but /dev/kvm is not usable" ;;
    *) fail "ACCEL must be tcg or kvm, not '$ACCEL'" ;;
esac

mkdir -p "$CACHE"

# ---------------------------------------------------------------- kernel
# Cached in $CACHE/kernel: vmlinuz, modules/*.ko, version.
KDIR=$CACHE/kernel
get_kernel()
{
    local tmp meta dep
    tmp=$(mktemp -d "$CACHE/kernel-dl.XXXXXX")
    # apt's download sandbox user must be able to write there.
    chmod 0777 "$tmp"
    (cd "$tmp" && apt-get download -q linux-image-cloud-amd64 2>&1 |
        grep -v 'Download is performed unsandboxed' || true)
    meta=$(ls "$tmp"/linux-image-cloud-amd64_*.deb 2>/dev/null | head -1)
    if [ -z "$meta" ]; then
        # the package lists may be missing or stale: update once, try again
        echo "apt-get update, then again"
        if [ "$(id -u)" = 0 ]; then apt-get update -q >/dev/null; else sudo apt-get update -q >/dev/null; fi
        (cd "$tmp" && apt-get download -q linux-image-cloud-amd64 2>&1 |
            grep -v 'Download is performed unsandboxed' || true)
        meta=$(ls "$tmp"/linux-image-cloud-amd64_*.deb 2>/dev/null | head -1)
    fi
    [ -n "$meta" ] || { rm -rf "$tmp"; fail "apt-get download linux-image-cloud-amd64 failed"; }
    # The meta package depends on the real image package.
    dep=$(dpkg-deb -f "$meta" Depends | tr ',' '\n' | sed 's/[ (].*//;s/^ *//' |
          grep '^linux-image-' | head -1)
    [ -n "$dep" ] || { rm -rf "$tmp"; fail "cannot tell which kernel $meta depends on"; }
    echo "downloading $dep"
    (cd "$tmp" && apt-get download -q "$dep" 2>&1 |
        grep -v 'Download is performed unsandboxed' || true)
    ls "$tmp"/"$dep"_*.deb >/dev/null 2>&1 || { rm -rf "$tmp"; fail "apt-get download $dep failed"; }
    dpkg-deb -x "$tmp"/"$dep"_*.deb "$tmp/x"

    rm -rf "$KDIR"
    mkdir -p "$KDIR/modules"
    cp "$tmp"/x/boot/vmlinuz-* "$KDIR/vmlinuz"
    cp "$tmp"/x/boot/config-* "$KDIR/config"
    local m f
    for m in $MODULES; do
        f=$(find "$tmp/x/lib/modules" -name "$m.ko" -o -name "$m.ko.xz" \
                -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -1)
        case "$f" in
            "") echo "  $m: no module (built into the kernel)" ;;
            *.ko) cp "$f" "$KDIR/modules/$m.ko" ;;
            *.xz) xz -dc "$f" > "$KDIR/modules/$m.ko" ;;
            *.zst) zstd -qdc "$f" > "$KDIR/modules/$m.ko" ;;
            *.gz) gzip -dc "$f" > "$KDIR/modules/$m.ko" ;;
        esac
    done
    echo "${dep#linux-image-}" > "$KDIR/version"
    rm -rf "$tmp"
}

step "Guest kernel: Debian's linux-image-cloud-amd64 (cached in .base/demo/kernel)"
if [ ! -s "$KDIR/version" ] || [ ! -s "$KDIR/vmlinuz" ]; then
    get_kernel
fi
KVER=$(cat "$KDIR/version")
grep -q '^CONFIG_EXT4_FS=y' "$KDIR/config" || fail "kernel $KVER has no built-in ext4"
echo "kernel $KVER; modules: $(cd "$KDIR/modules" && ls | tr '\n' ' ')"

# ------------------------------------------------------------- initramfs
# Rebuilt only when this script, busybox or the kernel change.
INITRD=$CACHE/initramfs.cpio.gz
key=$( (sha256sum "$0" "$BUSYBOX"; cat "$KDIR/version") | sha256sum | cut -c1-16)
if [ "$(cat "$INITRD.key" 2>/dev/null)" != "$key" ] || [ ! -s "$INITRD" ]; then
    tmp=$(mktemp -d "$CACHE/initramfs.XXXXXX")
    mkdir -p "$tmp"/{bin,dev,proc,sys,newroot,lib/modules}
    cp "$BUSYBOX" "$tmp/bin/busybox"
    ln -s busybox "$tmp/bin/sh"
    cp "$KDIR"/modules/*.ko "$tmp/lib/modules/" 2>/dev/null || true
    cat > "$tmp/init" <<EOF
#!/bin/busybox sh
# initramfs /init: load the virtio modules, wait for /dev/vda, switch root.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "[initramfs] loading virtio modules"
for m in $MODULES; do
    if [ -f /lib/modules/\$m.ko ]; then
        insmod /lib/modules/\$m.ko || echo "[initramfs] insmod \$m failed"
    else
        echo "[initramfs] \$m: built in"
    fi
done
n=0
while [ ! -b /dev/vda ] && [ \$n -lt 100 ]; do sleep 0.1; n=\$((n + 1)); done
if [ ! -b /dev/vda ]; then
    echo "[initramfs] no /dev/vda"; echo o > /proc/sysrq-trigger
fi
echo "[initramfs] /dev/vda is there: mounting it (ext4) and switching root"
if ! mount -t ext4 -o rw /dev/vda /newroot; then
    echo "[initramfs] mounting /dev/vda failed"; echo o > /proc/sysrq-trigger
fi
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /init
EOF
    chmod +x "$tmp/init"
    (cd "$tmp" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) |
        gzip -1 > "$INITRD"
    echo "$key" > "$INITRD.key"
    rm -rf "$tmp"
    echo "built the initramfs ($(du -k "$INITRD" | cut -f1) KiB: busybox-static and the modules)"
else
    echo "initramfs cached ($(du -k "$INITRD" | cut -f1) KiB)"
fi

# ------------------------------------------------------------- root disk
step "Root disk: mkfs.ext4 -d (busybox + /init), converted to QED by our qemu-img"
rm -rf "$RUN"
mkdir -p "$RUN/tree"/{bin,dev,proc,sys,tmp,demo}
cp "$BUSYBOX" "$RUN/tree/bin/busybox"
for a in $("$BUSYBOX" --list); do
    [ "$a" = busybox ] || ln -s busybox "$RUN/tree/bin/$a"
done

# The guest's init: PID 1 on the QED disk.  Every step prints on the
# serial console; the manifest goes there too, so that the host has the
# guest's own word for what it wrote.
cat > "$RUN/tree/init" <<'EOF'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
say() { echo "[guest $(cut -d' ' -f1 /proc/uptime)s] $*"; }
status=0
try() { "$@" || { say "FAILED: $*"; status=1; }; }
quiet_dd() { dd "$@" 2>/dev/null || { say "FAILED: dd $*"; status=1; }; }

say "Linux $(uname -r) running from $(awk '$2 == "/" { print $1 " (" $3 ")" }' /proc/mounts)"

say "writing files with known content"
echo "Hello from a Linux guest booted from a QED disk." > /demo/hello.txt
seq 1 100000 > /demo/numbers.txt
quiet_dd if=/dev/urandom of=/demo/random.bin bs=1M count=4 conv=fsync
try sync

say "mixed write load with fsync: 30 rounds of new files, in-place rewrites, appends, O_DIRECT"
mkdir -p /demo/load
quiet_dd if=/dev/urandom of=/demo/load/big.bin bs=1M count=8 conv=fsync
i=1
while [ $i -le 30 ]; do
    # a new small file (allocating writes), synced
    quiet_dd if=/dev/urandom of=/demo/load/small-$i.bin bs=4k count=$((i % 7 + 1)) conv=fsync
    # 64 KiB rewritten in place inside big.bin
    quiet_dd if=/dev/urandom of=/demo/load/big.bin bs=64k count=1 \
        seek=$(( (i * 37) % 128 )) conv=notrunc,fsync
    # appends to a growing file
    quiet_dd if=/dev/urandom of=/demo/load/grow.bin bs=16k count=1 \
        oflag=append conv=notrunc,fsync
    # O_DIRECT: straight to the disk, past the page cache
    quiet_dd if=/dev/urandom of=/demo/load/direct.bin bs=64k count=1 \
        seek=$(( (i * 5) % 32 )) oflag=direct conv=notrunc
    echo "round $i" >> /demo/load/log.txt
    if [ $((i % 10)) -eq 0 ]; then
        try sync
        say "  round $i done"
    fi
    i=$((i + 1))
done

say "deleting every third small file, then fstrim (discard reaches the QED image)"
i=3
while [ $i -le 30 ]; do rm -f /demo/load/small-$i.bin; i=$((i + 3)); done
try sync
fstrim -v / | sed 's/^/[guest]   fstrim /' || say "fstrim not supported here"

say "the disk now:"
ls -l /demo | sed "s/^/[guest]   /"
ls /demo/load | wc -l | sed 's/^/[guest]   files in \/demo\/load: /'
df -k / | sed 's/^/[guest]   /'

say "manifest of sha256 sums (/demo/MANIFEST.sha256)"
(cd /demo && find . -type f | sort | xargs sha256sum) > /tmp/manifest
try cp /tmp/manifest /demo/MANIFEST.sha256
echo "=== MANIFEST BEGIN"
cat /tmp/manifest
echo "=== MANIFEST END"
try sync
try mount -o remount,ro /
say "GUEST DONE status=$status"
poweroff -f
sleep 2
echo o > /proc/sysrq-trigger
EOF
chmod +x "$RUN/tree/init"

truncate -s 256M "$RUN/root.raw"
mkfs.ext4 -q -F -L qedroot -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 \
    -d "$RUN/tree" "$RUN/root.raw"
rm -rf "$RUN/tree"
$B/qemu-img convert -f raw -O qed "$RUN/root.raw" "$RUN/root.qed"
rm -f "$RUN/root.raw"
$B/qemu-img info "$RUN/root.qed" | sed -n '1,5p'
$B/qemu-img check -q "$RUN/root.qed" || fail "the fresh root image does not check clean"

# ------------------------------------------------------------------ boot
step "Booting the guest: our qemu-system-x86_64, -accel $ACCEL, root on virtio-blk from root.qed"
echo "(serial console below; the boot is given ${TIMEOUT} s)"
LOG=$RUN/console.log
t0=$(date +%s.%N)
set +e
timeout --foreground -k 5 "$TIMEOUT" "$B/qemu-system-x86_64" \
    -accel "$ACCEL" -m 512 -smp 1 -nographic -no-reboot -net none \
    -kernel "$KDIR/vmlinuz" -initrd "$INITRD" \
    -append "console=ttyS0 quiet panic=-1" \
    -drive file="$RUN/root.qed",format=qed,if=virtio,discard=unmap,cache=writeback \
    </dev/null 2>&1 | sed -u 's/\r//g; s/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g' | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
t1=$(date +%s.%N)
boot_s=$(echo "$t1 - $t0" | bc)
printf '\n(qemu exited with status %s after %.1f s)\n' "$rc" "$boot_s"
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    [ "$ACCEL" = kvm ] && echo "(KVM on this machine may not run guests: the default, TCG, does)"
    fail "the guest did not power off within ${TIMEOUT} s (killed)"
fi
[ "$rc" = 0 ] || fail "qemu-system-x86_64 exited with status $rc"
grep -q '^\[guest [0-9.]*s\] GUEST DONE status=0$' "$LOG" ||
    fail "the guest did not finish its work cleanly (see $LOG)"

# ------------------------------------------------------------ host side
step "Consistency of the image after the guest: our check and the original driver's"
$B/qemu-img check "$RUN/root.qed" || fail "our check found problems"
if [ -x "$PEER_IMG" ]; then
    $PEER_IMG check "$RUN/root.qed" || fail "the original driver's check found problems"
fi
flags=$(od -An -tu1 -j16 -N1 "$RUN/root.qed" | tr -d ' ')
[ $((flags & 2)) = 0 ] || fail "NEED_CHECK is still set after a clean shutdown"
echo "header feature byte: $flags (NEED_CHECK clear)"
$B/qemu-img info "$RUN/root.qed" | grep -E '^(virtual|disk) size'

step "Raw conversions by ours and by the original driver, compared byte for byte"
$B/qemu-img convert -f qed -O raw "$RUN/root.qed" "$RUN/root.raw"
if [ -x "$PEER_IMG" ]; then
    $PEER_IMG convert -f qed -O raw "$RUN/root.qed" "$RUN/peer.raw"
    cmp "$RUN/root.raw" "$RUN/peer.raw" || fail "the two conversions differ"
    rm -f "$RUN/peer.raw"
    echo "identical"
fi
e2fsck -fn "$RUN/root.raw" >"$RUN/e2fsck.log" 2>&1 ||
    { cat "$RUN/e2fsck.log"; fail "e2fsck finds the guest's filesystem damaged"; }
echo "e2fsck -fn: the filesystem is clean"

step "Reading the guest's files back with debugfs and comparing"
dbg_cat() { debugfs -R "cat $1" "$RUN/root.raw" 2>/dev/null; }
# The manifest the guest printed on its console ...
sed -n '/^=== MANIFEST BEGIN$/,/^=== MANIFEST END$/p' "$LOG" | sed '1d;$d' > "$RUN/console.manifest"
[ -s "$RUN/console.manifest" ] || fail "no manifest on the console"
# ... equals the one it wrote to its disk
dbg_cat /demo/MANIFEST.sha256 > "$RUN/disk.manifest"
cmp -s "$RUN/console.manifest" "$RUN/disk.manifest" ||
    fail "the manifest on the disk differs from the one the guest printed"
# Files whose content the host knows too
[ "$(dbg_cat /demo/hello.txt)" = "Hello from a Linux guest booted from a QED disk." ] ||
    fail "/demo/hello.txt differs"
[ "$(dbg_cat /demo/numbers.txt | sha256sum)" = "$(seq 1 100000 | sha256sum)" ] ||
    fail "/demo/numbers.txt differs"
# Every file against the guest's sums
nfiles=0
nbytes=0
while read -r sum path; do
    path=/demo/${path#./}
    dbg_cat "$path" > "$RUN/file"
    got=$(sha256sum < "$RUN/file" | cut -d' ' -f1)
    [ "$got" = "$sum" ] || fail "$path: sha256 $got, the guest wrote $sum"
    nfiles=$((nfiles + 1))
    nbytes=$((nbytes + $(stat -c %s "$RUN/file")))
done < "$RUN/console.manifest"
rm -f "$RUN/file"
# ... and the deleted files are gone
for i in 3 6 9; do
    debugfs -R "stat /demo/load/small-$i.bin" "$RUN/root.raw" 2>&1 | grep -q 'File not found' ||
        fail "/demo/load/small-$i.bin was deleted by the guest but is still there"
done
echo "$nfiles files ($((nbytes / 1024)) KiB) read back from the image: every sha256 matches the guest's"
echo "hello.txt and numbers.txt hold exactly what the host expects; deleted files are gone"
rm -f "$RUN/root.raw"

printf '\nGUEST OK: booted from QED under %s in %.1f s, %d files verified, image checks clean (ours and the original driver).\n' \
    "$ACCEL" "$boot_s" "$nfiles"

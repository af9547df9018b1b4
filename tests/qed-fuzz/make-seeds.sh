#!/bin/bash
# Make the fuzzer's seed corpus: small valid QED images, written by the
# fork's own qemu-img and qemu-io (various cluster and table sizes, data
# across L2 tables, zero clusters, discards, a backing file of each kind the
# harness allows, a dirty image, an empty one).
#
#   tests/qed-fuzz/make-seeds.sh OUTDIR QEMU_IMG QEMU_IO
#
# The harness accepts only "backing.raw" and "backing.qed" as backing file
# names (its scratch folder has both); the seeds name them the same way.
set -euo pipefail
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
QEMU_IMG=$2
QEMU_IO=$3

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# The harness's backing files, same sizes (their content does not matter)
"$QEMU_IMG" create -q -f raw backing.raw 1M
"$QEMU_IMG" create -q -f qed -o cluster_size=4k,table_size=1 backing.qed 1M

img() { "$QEMU_IMG" create -q -f qed "$@"; }
io() { f=$1; shift; "$QEMU_IO" -f qed "$@" "$f" >/dev/null; }

# Empty, smallest geometry
img -o cluster_size=4k,table_size=1 empty-4k.qed 1M
# Zero-sized
img -o cluster_size=4k,table_size=1 zero-size.qed 0
# Data in several L2 tables (4k clusters, 1-cluster tables: 2 MiB each)
img -o cluster_size=4k,table_size=1 data-4k.qed 16M
io data-4k.qed -c 'write -P 0x11 0 4k' -c 'write -P 0x22 2M 6k' \
    -c 'write -P 0x33 8190k 4k' -c 'write -z 12M 8k' -c 'write -P 0x44 16380k 4k'
# Zero clusters and a discard
img -o cluster_size=4k,table_size=1 zero-discard.qed 8M
io zero-discard.qed -c 'write -P 0x55 0 32k' -c 'discard 8k 8k' \
    -c 'write -z 16k 4k' -c 'write -z -u 4M 4k'
# Two-cluster tables, 8k clusters
img -o cluster_size=8k,table_size=2 data-8k.qed 64M
io data-8k.qed -c 'write -P 0x66 4k 4k' -c 'write -P 0x77 40M 12k'
# 16k clusters, one-cluster tables, two L2 tables
img -o cluster_size=16k,table_size=1 data-16k.qed 128M
io data-16k.qed -c 'write -P 0x88 0 20k' -c 'write -P 0x99 33M 1k'
# Over a raw backing file: partial-cluster writes (copy-on-write)
img -o cluster_size=4k,table_size=1 -b backing.raw -F raw backing-raw.qed 1M
io backing-raw.qed -c 'write -P 0xaa 512 1k' -c 'write -z 64k 4k'
# Over a QED backing file (probed)
img -o cluster_size=4k,table_size=1 -b backing.qed -F qed backing-qed.qed 2M
io backing-qed.qed -c 'write -P 0xbb 4k 2k'
# Dirty: NEED_CHECK set (feature bit 0x02 at byte 16), with a leaked cluster
img -o cluster_size=4k,table_size=1 dirty.qed 4M
io dirty.qed -c 'write -P 0xcc 0 8k'
printf '\x02' | dd of=dirty.qed bs=1 seek=16 conv=notrunc status=none
head -c 4096 /dev/zero | tr '\0' '\335' >> dirty.qed
# Metadata preallocation
img -o cluster_size=4k,table_size=1,preallocation=metadata prealloc.qed 64k

for f in *.qed; do
    case "$f" in backing.qed) continue ;; esac
    cp "$f" "$OUT/$f"
done

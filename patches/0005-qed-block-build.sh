#!/bin/bash
# Build glue for our QED driver's files: the base's block/meson.build lists
# the original driver's five files; ours are every block/qed*.c of the
# project (linked in by scripts/link-ours.sh), so the list is rewritten
# from them.  Idempotent: the file is touched only when the list changed.
set -euo pipefail
TOP=$1
f=block/meson.build
list=""
for c in "$TOP"/block/qed*.c; do
    list="$list    '$(basename "$c")',\n"
done
new=$(mktemp)
awk -v list="$list" '
    /^if get_option\(.qed.\)\.allowed\(\)/ { print; inqed = 1; next }
    inqed && /block_ss.add\(files\(/ { print; printf "%s", list; skip = 1; next }
    skip && /^  \)\)/ { skip = 0; inqed = 0 }
    skip { next }
    { print }
' "$f" | sed 's/\\n/\n/g' > "$new"
if cmp -s "$new" "$f"; then
    rm -f "$new"
else
    mv "$new" "$f"
fi

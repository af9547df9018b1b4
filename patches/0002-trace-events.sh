#!/bin/bash
# Replace the original QED driver's trace events in block/trace-events with
# ours (patches/qed-trace-events): the base's events name functions of a
# driver we never compile, ours name the decisions our driver makes.
# Run from the base's top folder on every build; it rewrites the file only
# when our events changed, so that an unchanged tree rebuilds nothing.
set -euo pipefail
TOP=$1
f=block/trace-events
new=$(mktemp)
# (our section headers may name several files: "# qed-check.c, qed-compact.c";
# the original section may stand amid the file, as in 10.0: cat -s squeezes
# the blank lines it leaves behind into one)
sed -E -e '/^# qed[-a-z0-9]*\.c(, qed[-a-z0-9]*\.c)*$/d' -e '/^qed_/d' "$f" |
    cat -s | sed -e :a -e '/^\n*$/{$d;N;ba' -e '}' > "$new"
cat "$TOP/patches/qed-trace-events" >> "$new"
if cmp -s "$new" "$f"; then
    rm -f "$new"
else
    mv "$new" "$f"
fi

#!/bin/bash
# Replace the original QED driver's trace events in block/trace-events with
# ours (patches/qed-trace-events): the base's events name functions of a
# driver we never compile, ours name the decisions our driver makes.
set -euo pipefail
TOP=$1
f=block/trace-events
sed -i -e '/^# qed[-a-z0-9]*\.c$/d' -e '/^qed_/d' "$f"
cat "$TOP/patches/qed-trace-events" >> "$f"

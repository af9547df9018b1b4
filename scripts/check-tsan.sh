#!/bin/bash
# make check-tsan: our QED driver under ThreadSanitizer and clang's
# thread-safety analysis, with the build of scripts/prepare-tsan.sh
# (.base/qemu/build-tsan: clang 19, --enable-tsan, --enable-debug-graph-lock).
#
#   1. Warnings: each of our C files (block/qed*.c, tests/qed-mq,
#      tests/unit/test-qed*) compiled again (-fsyntax-only, the build's own
#      command line, so -Wthread-safety and the graph-lock annotations) and
#      every warning counted; any in our files (those, block/qed.h) fails.
#   2. The multiqueue stress (tests/qed-mq: --threads iothreads submitting to
#      one image, aio=native + O_DIRECT) for every configuration below and
#      every seed, and our unit test test-qed-mq (iothreads and drained
#      sections), all under TSan with tests/sanitizers/tsan-suppressions.txt
#      (races of the base only, each with its reason).  Any report left, or
#      a failure of the stress itself, fails.
#
# TSAN_SEEDS ("1 2 3"), TSAN_OPS (20000 requests per thread), TSAN_THREADS
# (4), TSAN_DEPTH (8) change the stress; TSAN_DIR (TMPDIR or /tmp) holds the
# images (1 GiB sparse each; a file system with O_DIRECT, not tmpfs).
# Reports are kept in a log folder named at the end.
set -uo pipefail

TOP=$(cd "$(dirname "$0")/.." && pwd)
BUILD=$TOP/.base/qemu/build-tsan
SUPP=$TOP/tests/sanitizers/tsan-suppressions.txt
SEEDS=${TSAN_SEEDS:-1 2 3}
OPS=${TSAN_OPS:-20000}
THREADS=${TSAN_THREADS:-4}
DEPTH=${TSAN_DEPTH:-8}
DIR=$(mktemp -d "${TSAN_DIR:-${TMPDIR:-/tmp}}/qed-tsan-XXXXXX")
LOGS=$DIR/logs
mkdir -p "$LOGS"
rc=0
start=$(date +%s)

# ---- 1. compiler warnings in our files -------------------------------------
# The compile commands of the build (meson's compile_commands.json), run
# with -fsyntax-only: the thread-safety analysis is part of it, and nothing
# in the build folder changes.
warn_log=$LOGS/warnings.log
expected=$(ls "$TOP"/block/qed*.c "$TOP"/tests/qed-mq/*.c \
              "$TOP"/tests/unit/test-qed*.c | wc -l)
nfiles=$(python3 - "$BUILD/compile_commands.json" "$warn_log" "$expected" <<'EOF'
import json, re, shlex, subprocess, sys
db, out = sys.argv[1], sys.argv[2]
ours = re.compile(r'(^|/)(block/qed[^/]*\.[ch]|tests/qed-mq/[^/]*\.c|'
                  r'tests/unit/test-qed[^/]*\.c)$')
seen, bad = set(), 0
with open(out, 'w') as log:
    for e in json.load(open(db)):
        f = e['file']
        if not ours.search(f) or f in seen:
            continue
        seen.add(f)
        args = shlex.split(e['command'])
        keep, skip = [], False
        for a in args:
            if skip:
                skip = False
                continue
            if a in ('-o', '-MQ', '-MF', '-MT'):
                skip = True
                continue
            if a in ('-MD', '-MMD', '-c'):
                continue
            keep.append(a)
        r = subprocess.run(keep + ['-fsyntax-only', '-fno-color-diagnostics'],
                           cwd=e['directory'], capture_output=True, text=True)
        log.write('== %s (exit %d)\n%s' % (f, r.returncode, r.stderr))
        if r.returncode != 0:
            print('check-tsan: compiling %s failed' % f, file=sys.stderr)
            bad += 1
print(len(seen))
sys.exit(0 if len(seen) == int(sys.argv[3]) and not bad else 1)
EOF
) || { echo "check-tsan: of our $expected files, ${nfiles:-0} compiled, not all cleanly (see the log)"; rc=1; }
ours_re='(block/qed[^/:]*\.[ch]|tests/qed-mq/[^/:]*\.c|tests/unit/test-qed[^/:]*\.c):[0-9]+:[0-9]+: warning:'
w_ours=$(grep -Ec "$ours_re" "$warn_log")
w_all=$(grep -Ec ':[0-9]+:[0-9]+: warning:' "$warn_log")
echo "check-tsan: warnings compiling our $nfiles files: $w_ours in our files," \
     "$((w_all - w_ours)) in base headers"
if [ "$w_ours" != 0 ]; then
    grep -E -A3 "$ours_re" "$warn_log" | head -n 60
    rc=1
fi

# ---- 2. the stress and the unit test under TSan ----------------------------
symbolizer=/usr/lib/llvm-19/bin/llvm-symbolizer
[ -x "$symbolizer" ] || symbolizer=$(command -v llvm-symbolizer || true)
tsan_opts() {
    local o="halt_on_error=0:second_deadlock_stack=1:history_size=7"
    o="$o:suppressions=$SUPP:print_suppressions=0"
    o="$o:external_symbolizer_path=$symbolizer:log_path=$LOGS/$1"
    echo "$o"
}
reports() {
    cat "$LOGS/$1".* 2>/dev/null | grep -c '^WARNING: ThreadSanitizer'
}

# name, qemu-img create options, qed-mq --opts
configs=(
    "4k-l2c8k|cluster_size=4k,table_size=1|file.aio=native,file.cache.direct=on,l2-cache-size=8k"
    "4k|cluster_size=4k,table_size=1|file.aio=native,file.cache.direct=on"
    "64k|cluster_size=64k|file.aio=native,file.cache.direct=on"
)
total=0
for c in "${configs[@]}"; do
    IFS='|' read -r name create opts <<< "$c"
    for seed in $SEEDS; do
        tag=$name-s$seed
        img=$DIR/$tag.qed
        TSAN_OPTIONS=$(tsan_opts "$tag") nice -n 19 "$BUILD/qemu-img" create \
            -q -f qed -o "$create" "$img" 1G 2>/dev/null || {
            echo "check-tsan: $tag: qemu-img create failed"; rc=1; }
        out=$(TSAN_OPTIONS=$(tsan_opts "$tag") nice -n 19 \
              "$BUILD/tests/qed-mq/qed-mq" "$img" --threads "$THREADS" \
              --depth "$DEPTH" --ops "$OPS" --seed "$seed" --opts "$opts")
        st=$?
        n=$(reports "$tag")
        total=$((total + n))
        echo "check-tsan: qed-mq $tag (ops $OPS x $THREADS): $n reports;" \
             "$(echo "$out" | tail -n 2 | tr '\n' ' ')"
        # 66: TSan's exit status when it reported (counted above); it
        # replaces the program's own, so its verdict is read as well
        if { [ "$st" != 0 ] && [ "$st" != 66 ]; } ||
           echo "$out" | grep -q '^FAIL\|^qed-mq: FAILED'; then
            echo "$out" | grep '^FAIL' | head -n 20
            echo "check-tsan: $tag: qed-mq failed (exit status $st)"
            rc=1
        fi
        rm -f "$img"
    done
done
out=$(cd "$DIR" && TSAN_OPTIONS=$(tsan_opts unit) nice -n 19 \
      "$BUILD/tests/unit/test-qed-mq" 2>&1)
st=$?
n=$(reports unit)
total=$((total + n))
echo "check-tsan: test-qed-mq: $n reports;" \
     "$(echo "$out" | grep -E '^(not )?ok ' | tr '\n' ' ')"
if { [ "$st" != 0 ] && [ "$st" != 66 ]; } ||
   ! echo "$out" | grep -q '^ok ' || echo "$out" | grep -q '^not ok '; then
    echo "$out" | tail -n 20
    echo "check-tsan: test-qed-mq failed (exit status $st)"
    rc=1
fi

if [ "$total" != 0 ]; then
    echo "check-tsan: TSan reports (not suppressed by $SUPP):"
    for f in "$LOGS"/*.[0-9]*; do
        grep -q '^WARNING: ThreadSanitizer' "$f" || continue
        echo "== $f"
        head -n 60 "$f"
    done
    rc=1
fi
echo "check-tsan: $w_ours warnings in our files; $total TSan reports;" \
     "$(( $(date +%s) - start ))s"
if [ "$rc" = 0 ]; then
    rm -rf "$DIR"
else
    echo "check-tsan: logs in $LOGS"
fi
exit "$rc"

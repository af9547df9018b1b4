#!/bin/bash
# `make bench`: the workloads of issue 8, timed for four contenders, alternating
# within each repetition (ours peer qcow2 raw ours peer qcow2 raw ...), each
# workload on a fresh image:
#
#   ours   the fork's QED        .base/qemu/build/qemu-img (and qemu-io)
#   peer   the original QED      /usr/bin/qemu-img (Debian's qemu-utils)
#   qcow2  qcow2 and             /usr/bin/qemu-img by default;
#   raw    raw                   BENCH_REF=ours uses our build instead (same
#                                base code, only the QED driver differs)
#
# qemu-img bench workloads are timed by the bench's own "Run completed in X
# seconds" line; check, dirty open and convert by /usr/bin/time (wall clock).
# Every timed command runs under /usr/bin/time, which also gives its peak RSS
# (%M: the maximum resident set of the whole process, in KiB).
# The results go to $BENCH_DIR/results.tsv (workload, contender, rep, seconds,
# wall, rss_kib, mode); scripts/bench.py turns them into the tables of times
# and of peak RSS (median MiB), docs/benchmarks.md and docs/benchmarks.png.
#
# Workload ids (for BENCH_ONLY): seqalloc-d1 seqalloc-d32 scatter-d1
# scatter-d32 bigscatter bigscatter-128m rewrite read cow check dirty-open
# convert, and the multiqueue rows (issue 19) mq-randwrite-t1
# mq-randwrite-t2 mq-read-t1 mq-read-t2 mq-rewrite-vs-alloc (rows
# mq-rewrite-alone, mq-rewrite-busy) mq-read-vs-alloc (mq-read-alone,
# mq-read-busy); mq-randwrite and mq-read select both thread counts, mq all
# of them.  The mq rows run our tests/qed-mq/qed-mq --bench (1 or 2
# iothreads submitting into one BlockBackend, 32 requests in flight in all)
# for ours, qcow2 and raw (the base's drivers in our build, whatever
# BENCH_REF): no peer (7.2 has no multiqueue; the original 10.0 binaries,
# scripts/fetch-peer-10.sh, no multi-iothread path without a guest).
# bigscatter-128m is big scatter again with ours opened as production
# opens it plus a 128 MiB L2 cache (every table), `--image-opts driver=qed,
# file.filename=IMG,file.aio=native,file.cache.direct=on,l2-cache-size=128M`
# (no -t/-i: the cache and AIO are in the options); peer, qcow2 (its default
# cache, capped at 32 MiB) and raw run it as in big scatter. check and
# dirty-open run on the bigscatter images, so they run bigscatter too.
#
# The page is evidence: it is written only from a committed tree.  Before
# any workload runs, `git status --porcelain` of the repository must show no
# change (tracked files modified, added or deleted; untracked files git does
# not ignore), less the page's own two files, which a run rewrites: on a
# dirty tree the bench refuses to write docs/, says what is dirty and exits
# 1.  BENCH_NO_DOCS=1 runs anyway (a trial that leaves docs/ alone);
# BENCH_ALLOW_DIRTY=1 writes the page, it and every figure table labelled
# "from an uncommitted tree (<commit>-dirty)", the changes listed.  The page
# names the commit measured (its "tree:" line), as of the run's start.  Also
# refused when writing docs/: binaries not built from the tree (ninja would
# rebuild them: run `make bench`, which builds first) and binaries that
# changed during the run (a `make` elsewhere: the figures would mix two
# builds).
#
#   scripts/bench.sh               the benchmark (what `make bench` runs)
#   scripts/bench.sh --check-tree  only the checks above, with the same
#                                  environment: exit 0 if the bench would run
#                                  (and says whether it would write docs/),
#                                  1 if it would refuse
#
# Environment:
#   BENCH_REPS       repetitions (default 3)
#   BENCH_SLOW_REPS  repetitions of big scatter (both rows) and its
#                    check/dirty open (default 2, at most BENCH_REPS): they are
#                    the slowest
#   BENCH_DIR        work folder (default bench-out/ in the repo, git-ignored);
#                    must be on a real disk, not tmpfs
#   BENCH_REF        peer (default) | ours: whose qemu-img runs qcow2 and raw
#   BENCH_PEER_DIR   where the peer's qemu-img and qemu-io are (default
#                    /usr/bin, Debian's 7.2); e.g. the original QED of 10.0:
#                    BENCH_PEER_DIR=$(scripts/fetch-peer-10.sh .base/peer10)
#   BENCH_BUDGET     seconds (default 780): no further repetition is started
#                    when, judged by the ones done, it would end past this;
#                    the report says how many ran (a loaded machine gets fewer)
#   BENCH_CHECK_RUNS runs of check and of dirty open per repetition (default
#                    3: they take about a second each)
#   BENCH_ONLY       run only these workloads (space separated ids, see above)
#   BENCH_SKIP       do not run these mq rows (ids or groups as in BENCH_ONLY;
#                    BENCH_SKIP=mq: none of them)
#   BENCH_NO_DOCS=1  print the table but do not write docs/benchmarks.*
#                    (runs on a dirty tree)
#   BENCH_ALLOW_DIRTY=1  write docs/benchmarks.* from a dirty tree, every
#                    figure table labelled as from an uncommitted tree
#   BENCH_DOCS       where benchmarks.md and .png go (default docs/)
#   BENCH_KEEP=1     keep the images of the last repetition
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

CHECK_ONLY=0
case "${1:-}" in
    "") ;;
    --check-tree) CHECK_ONLY=1 ;;
    *) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac

T_START=$(date +%s)
REPS=${BENCH_REPS:-3}
SLOW_REPS=${BENCH_SLOW_REPS:-2}
[ "$SLOW_REPS" -le "$REPS" ] || SLOW_REPS=$REPS
BENCH_DIR=${BENCH_DIR:-$ROOT/bench-out}
BENCH_REF=${BENCH_REF:-peer}
ONLY=${BENCH_ONLY:-}
SKIP=${BENCH_SKIP:-}
BUDGET=${BENCH_BUDGET:-780}
CHECK_RUNS=${BENCH_CHECK_RUNS:-3}
PY=python3
[ -x /usr/bin/python3 ] && PY=/usr/bin/python3

OURS_IMG=$ROOT/.base/qemu/build/qemu-img
OURS_IO=$ROOT/.base/qemu/build/qemu-io
OURS_MQ=$ROOT/.base/qemu/build/tests/qed-mq/qed-mq
PEER_DIR=${BENCH_PEER_DIR:-/usr/bin}
PEER_IMG=$PEER_DIR/qemu-img
PEER_IO=$PEER_DIR/qemu-io
if [ "$BENCH_REF" = ours ]; then
    REF_IMG=$OURS_IMG REF_IO=$OURS_IO
else
    REF_IMG=$PEER_IMG REF_IO=$PEER_IO
fi

wants() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }
skips() { [[ " $SKIP " == *" $1 "* ]]; }
# The mq rows: selected by their id, their group (mq-randwrite-t1 by
# mq-randwrite, mq-rewrite-alone by mq-rewrite-vs-alloc) or mq; skipped
# the same way (BENCH_SKIP).
wants_mq() {
    ! skips "$1" && ! skips "${1%-t[12]}" && ! skips mq &&
        { wants "$1" || wants "${1%-t[12]}" || wants mq; }
}
# The pair of rows of mq-rewrite-vs-alloc (rewrite) or mq-read-vs-alloc (read)
wants_vs() {
    local id
    for id in "mq-$1-vs-alloc" "mq-$1-alone" "mq-$1-busy" mq; do
        ! skips "$id" || return 1
    done
    for id in "mq-$1-vs-alloc" "mq-$1-alone" "mq-$1-busy" mq; do
        ! wants "$id" || return 0
    done
    return 1
}
WANTS_MQ=0
for id in mq-randwrite-t1 mq-randwrite-t2 mq-read-t1 mq-read-t2; do
    ! wants_mq "$id" || WANTS_MQ=1
done
! wants_vs rewrite || WANTS_MQ=1
! wants_vs read || WANTS_MQ=1
NEEDED=("$OURS_IMG" "$OURS_IO" "$PEER_IMG" "$PEER_IO" /usr/bin/time)
[ "$WANTS_MQ" = 0 ] || NEEDED+=("$OURS_MQ")
for b in "${NEEDED[@]}"; do
    [ -x "$b" ] || { echo "bench: $b missing (run make bench)" >&2; exit 1; }
done

# --- the tree measured (see the header): checked before any workload runs ---
DOCS_DIR=${BENCH_DOCS:-$ROOT/docs}
WRITE_DOCS=1
[ -z "${BENCH_NO_DOCS:-}" ] || WRITE_DOCS=0
# Line 1: the commit, with -dirty if the tree has changes; then the changes.
TREE_OUT=$("$PY" scripts/bench.py tree "$DOCS_DIR") ||
    { echo "bench: could not read the tree's state (git)" >&2; exit 1; }
TREE=$(head -n 1 <<<"$TREE_OUT")
TREE_CHANGES=$(tail -n +2 <<<"$TREE_OUT")
if [[ $TREE != *-dirty ]]; then
    echo "bench: tree $TREE (committed, no changes)"
elif [ "$WRITE_DOCS" = 0 ]; then
    echo "bench: tree $TREE (uncommitted changes): a trial run (BENCH_NO_DOCS), docs/ left alone"
elif [ -n "${BENCH_ALLOW_DIRTY:-}" ]; then
    echo "bench: tree $TREE (uncommitted changes): BENCH_ALLOW_DIRTY=1, the page will be labelled \"from an uncommitted tree ($TREE)\""
else
    n=$(wc -l <<<"$TREE_CHANGES")
    {
        echo "bench: refusing to write $DOCS_DIR/benchmarks.md from a tree with uncommitted changes ($TREE):"
        echo "$TREE_CHANGES" | head -n 20 | sed 's/^/    /'
        [ "$n" -le 20 ] || echo "    ... and $((n - 20)) more (git status --porcelain)"
        echo "  The page must say which commit it measured. Either:"
        echo "  - commit (or remove) these changes, then run make bench again;"
        echo "  - BENCH_NO_DOCS=1 make bench: a trial run that prints the figures and leaves docs/ alone;"
        echo "  - BENCH_ALLOW_DIRTY=1 make bench: write the page anyway, it and every figure"
        echo "    table labelled \"from an uncommitted tree ($TREE)\"."
    } >&2
    exit 1
fi
# The binaries must be those of this tree: ninja must have nothing to
# rebuild in them for a reason of its own (an input newer than its output, a
# missing output, a changed command), the base's qemu-version.h left out:
# its phony input makes it, and what includes it, stale on every build.
if [ "$WRITE_DOCS" = 1 ]; then
    targets=(qemu-img qemu-io)
    [ "$WANTS_MQ" = 0 ] || targets+=(tests/qed-mq/qed-mq)
    stale=$(ninja -C "$ROOT/.base/qemu/build" -n -d explain "${targets[@]}" 2>&1 |
        grep -E "^ninja explain: .*(older than most recent input|doesn't exist|command line changed)" |
        grep -v "output PHONY " | sed 's/^ninja explain: /    /' | head -n 3)
    if [ -n "$stale" ]; then
        {
            echo "bench: $OURS_IMG, $OURS_IO or $OURS_MQ is not built from this tree (ninja would rebuild it):"
            echo "$stale"
            echo "  run make bench (it builds first), or BENCH_NO_DOCS=1 for a trial run"
        } >&2
        exit 1
    fi
fi
if [ "$CHECK_ONLY" = 1 ]; then
    echo "bench: --check-tree: the bench would run and $([ "$WRITE_DOCS" = 1 ] &&
        echo "write $DOCS_DIR/benchmarks.md" || echo "leave docs/ alone")"
    exit 0
fi
# A make elsewhere during the run would swap the binaries under it.
bin_sum() {
    if [ "$WANTS_MQ" = 1 ]; then
        cat "$OURS_IMG" "$OURS_IO" "$OURS_MQ" | cksum
    else
        cat "$OURS_IMG" "$OURS_IO" | cksum
    fi
}
BIN_SUM=$(bin_sum)

CONTENDERS="ours peer qcow2 raw"
MQ_CONTENDERS="ours qcow2 raw"
img_of()  { case $1 in ours) echo "$OURS_IMG";; peer) echo "$PEER_IMG";; *) echo "$REF_IMG";; esac; }
io_of()   { case $1 in ours) echo "$OURS_IO";;  peer) echo "$PEER_IO";;  *) echo "$REF_IO";;  esac; }
fmt_of()  { case $1 in ours|peer) echo qed;; *) echo "$1";; esac; }

mkdir -p "$BENCH_DIR/static" "$BENCH_DIR/run"
RUN=$BENCH_DIR/run
STATIC=$BENCH_DIR/static
RESULTS=$BENCH_DIR/results.tsv
LOG=$BENCH_DIR/bench.log
rm -f "$RUN"/* "$RESULTS"
: > "$LOG"
printf 'workload\tcontender\trep\tseconds\twall\trss_kib\tmode\n' > "$RESULTS"

FSTYPE=$(df -T "$BENCH_DIR" | awk 'NR==2 {print $2}')
if [ "$FSTYPE" = tmpfs ]; then
    echo "bench: $BENCH_DIR is on tmpfs; set BENCH_DIR to a folder on a real disk" >&2
    exit 1
fi

log() { echo "[$(( $(date +%s) - T_START ))s] $*" >> "$LOG"; }
wants bigscatter || wants bigscatter-128m || wants check || wants dirty-open ||
    SLOW_REPS=0

# --- cache mode: O_DIRECT with native AIO, or writeback where it is refused ---
DIRECT=1
"$PEER_IMG" create -q -f raw "$RUN/probe" 1M >>"$LOG" 2>&1
if ! "$PEER_IMG" bench -q -c 1 -t none -i native -f raw "$RUN/probe" >>"$LOG" 2>&1 ||
   ! "$OURS_IMG" bench -q -c 1 -t none -i native -f raw "$RUN/probe" >>"$LOG" 2>&1; then
    DIRECT=0
fi
rm -f "$RUN/probe"
# Per contender+workload override after a failure under O_DIRECT (see run_bench).
declare -A FORCE_WB=()
# Workloads that share another's override: bigscatter-128m runs the same writes
# as bigscatter (a contender that failed one would fail the other).
declare -A WB_AS=([bigscatter-128m]=bigscatter)

bench_mode()   { if [ "$DIRECT" = 1 ] && [ -z "${FORCE_WB[$1]:-}" ]; then echo "-t none -i native"; else echo "-t writeback"; fi; }
mode_name()    { if [ "$DIRECT" = 1 ] && [ -z "${FORCE_WB[$1]:-}" ]; then echo "none/native"; else echo "writeback"; fi; }
io_mode()      { if [ "$DIRECT" = 1 ]; then echo "-t none -i native"; else echo "-t writeback"; fi; }
check_mode()   { if [ "$DIRECT" = 1 ]; then echo "-T none"; else echo "-T writeback"; fi; }
convert_mode() { if [ "$DIRECT" = 1 ]; then echo "-t none -T none"; else echo "-t writeback -T writeback"; fi; }
# With --image-opts the cache and AIO go in the options string (production's
# cache=none, io=native), not in -t/-i.
opts_mode()    { if [ "$DIRECT" = 1 ] && [ -z "${FORCE_WB[$1]:-}" ]; then echo ""; else echo "-t writeback"; fi; }
opts_cache()   { if [ "$DIRECT" = 1 ] && [ -z "${FORCE_WB[$1]:-}" ]; then echo ",file.aio=native,file.cache.direct=on"; fi; }
# qed-mq's --opts: O_DIRECT with native AIO, or nothing (writeback)
mq_opts()      { if [ "$DIRECT" = 1 ] && [ -z "${FORCE_WB[$1]:-}" ]; then echo "file.aio=native,file.cache.direct=on"; fi; }
GLOBAL_MODE=$([ "$DIRECT" = 1 ] && echo "none/native" || echo "writeback")

echo "bench: dir $BENCH_DIR ($FSTYPE), $REPS repetitions ($SLOW_REPS for big scatter (both rows), check, dirty open)"
echo "bench: qcow2 and raw run with $([ "$BENCH_REF" = ours ] && echo "our build" || echo "the peer ($PEER_IMG)")"
if [ "$DIRECT" = 1 ]; then
    echo "bench: cache mode -t none -i native (O_DIRECT)"
else
    echo "bench: O_DIRECT refused here: falling back to -t writeback for every workload"
fi

record() { # workload contender rep seconds wall rss_kib mode
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$RESULTS"
}

# show WL CONTENDER REP SECONDS: the progress line, with the peak RSS in MiB.
show() {
    printf '  %-16s %-6s rep %-5s %8.3f s %8s MiB\n' "$1" "$2" "$3:" "$4" \
        "$(awk -v k="$RSS" 'BEGIN { if (k ~ /^[0-9]+$/) printf "%.1f", k / 1024; else print "?" }')"
}

# timed CMD...: runs CMD under /usr/bin/time; sets OUT (its output), WALL,
# RSS (peak resident set of the process, KiB; /usr/bin/time's %M) and RC.
timed() {
    local tf; tf=$(mktemp)
    log "sync"
    sync
    log "start"
    OUT=$(/usr/bin/time -f '%e %M' -o "$tf" "$@" 2>&1)
    RC=$?
    # The last line: time puts "Command exited with ..." before it.
    read -r WALL RSS < <(tail -n 1 "$tf")
    WALL=${WALL:-?} RSS=${RSS:-?}
    rm -f "$tf"
    log "\$ $*"; log "$OUT"; log "rc=$RC wall=$WALL rss=${RSS}KiB"
}

# Deleting images is not free (a file system mounted with `discard` may take
# seconds per GiB): logged, for the budget.
cleanup() {
    log "rm"
    rm -f "$RUN"/*
    log "rm done"
}

# fresh_image contender path size [create args...]
fresh_image() {
    local c=$1 path=$2 size=$3; shift 3
    rm -f "$path"
    "$(img_of "$c")" create -q -f "$(fmt_of "$c")" "$@" "$path" $size >>"$LOG" 2>&1
}

# run_bench WL CONTENDER REP SIZE "CREATE ARGS" "PREP ARGS" "OPEN OPTS" BENCH ARGS...
# A fresh image; PREP ARGS (if any) is an untimed qemu-img bench run first; then
# the timed bench. With OPEN OPTS (e.g. l2-cache-size=128M) the image is opened
# with --image-opts driver=FMT,file.filename=IMG,<cache and AIO>,OPEN OPTS
# instead of -f FMT -t ... -i .... If the contender fails under O_DIRECT, the
# failure is logged and the workload runs again (and in later repetitions)
# with -t writeback.
run_bench() {
    local wl=$1 c=$2 rep=$3 size=$4 cargs=$5 prep=$6 oopts=$7; shift 7
    local img; img=$(img_of "$c")
    local fmt; fmt=$(fmt_of "$c")
    local path=$RUN/$wl.$c.$fmt
    local key=$c:${WB_AS[$wl]:-$wl} attempt
    local mode open
    for attempt in 1 2; do
        if [ -n "$oopts" ]; then
            mode=$(opts_mode "$key")
            open=(--image-opts "driver=$fmt,file.filename=$path$(opts_cache "$key"),$oopts")
        else
            mode=$(bench_mode "$key")
            open=(-f "$fmt" "$path")
        fi
        log "create $path"
        # shellcheck disable=SC2086
        fresh_image "$c" "$path" "$size" $cargs
        if [ -n "$prep" ]; then
            log "fill $path"
            # shellcheck disable=SC2086
            "$img" bench -q -w $mode $prep "${open[@]}" >>"$LOG" 2>&1
        fi
        # shellcheck disable=SC2086
        timed "$img" bench $mode "$@" "${open[@]}"
        local secs
        secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' <<<"$OUT")
        if [ "$RC" = 0 ] && [ -n "$secs" ]; then
            record "$wl" "$c" "$rep" "$secs" "$WALL" "$RSS" "$(mode_name "$key")"
            show "$wl" "$c" "$rep" "$secs"
            return 0
        fi
        local why; why=$(grep -v '^Sending' <<<"$OUT" | tail -n 1)
        echo "  $wl $c rep $rep: FAILED ($(mode_name "$key")): $why"
        echo "    command: $img bench $mode $* ${open[*]}"
        record "$wl" "$c" "$rep" "FAIL" "$WALL" "$RSS" "$(mode_name "$key"): ${why//$'\t'/ }"
        if [ "$DIRECT" = 1 ] && [ -z "${FORCE_WB[$key]:-}" ]; then
            FORCE_WB[$key]=1
            echo "    retrying with -t writeback (and in later repetitions)"
        else
            return 1
        fi
    done
}

# run_mq ROW CONTENDER REP SIZE "PREP ARGS" QED-MQ ARGS...
# The multiqueue rows: a fresh image of SIZE made by our qemu-img; PREP ARGS
# (if any) an untimed `qemu-img bench -w` of ours first; then the timed
# `qed-mq IMAGE --format FMT ARGS...`.  Its line "qed-mq bench: ..."
# gives the seconds= of ROW; with --bench *-vs-alloc its two lines give
# those of ROW-alone and ROW-busy (one process: the same wall and RSS).
# The contenders run our build (qed-mq links the base's block layer): ours
# is QED, qcow2 and raw the base's drivers.  A failure under O_DIRECT is
# retried with writeback, as in run_bench.
run_mq() {
    local row=$1 c=$2 rep=$3 size=$4 prep=$5; shift 5
    local fmt; fmt=$(fmt_of "$c")
    local path=$RUN/$row.$c.$fmt
    local key=$c:$row attempt opts
    for attempt in 1 2; do
        opts=$(mq_opts "$key")
        log "create $path"
        rm -f "$path"
        "$OURS_IMG" create -q -f "$fmt" "$path" "$size" >>"$LOG" 2>&1
        if [ -n "$prep" ]; then
            log "fill $path"
            # shellcheck disable=SC2046,SC2086
            "$OURS_IMG" bench -q -w $(bench_mode "$key") $prep -f "$fmt" "$path" >>"$LOG" 2>&1
        fi
        timed "$OURS_MQ" "$path" --format "$fmt" "$@" ${opts:+--opts "$opts"}
        local lines r
        lines=$(awk '/^qed-mq bench: / {
                         ph = ""; s = ""
                         for (i = 1; i <= NF; i++) {
                             if ($i ~ /^phase=/) ph = substr($i, 7)
                             if ($i ~ /^seconds=/) s = substr($i, 9)
                         }
                         if (s != "") print (ph == "" ? "-" : ph), s
                     }' <<<"$OUT")
        if [ "$RC" = 0 ] && [ -n "$lines" ]; then
            local ph secs
            while read -r ph secs; do
                r=$row
                [ "$ph" = - ] || r=$row-$ph
                record "$r" "$c" "$rep" "$secs" "$WALL" "$RSS" "$(mode_name "$key")"
                show "$r" "$c" "$rep" "$secs"
            done <<<"$lines"
            return 0
        fi
        local why; why=$(grep -v '^qed-mq bench: ' <<<"$OUT" | tail -n 1)
        echo "  $row $c rep $rep: FAILED ($(mode_name "$key")): $why"
        echo "    command: $OURS_MQ $path --format $fmt $* ${opts:+--opts $opts}"
        local rows=("$row")
        [[ " $* " != *-vs-alloc\ * ]] || rows=("$row-alone" "$row-busy")
        for r in "${rows[@]}"; do
            record "$r" "$c" "$rep" "FAIL" "$WALL" "$RSS" "$(mode_name "$key"): ${why//$'\t'/ }"
        done
        if [ "$DIRECT" = 1 ] && [ -z "${FORCE_WB[$key]:-}" ]; then
            FORCE_WB[$key]=1
            echo "    retrying with writeback (and in later repetitions)"
        else
            return 1
        fi
    done
}

# --- data that never changes: created once, reused by later runs ---
BACKING=$STATIC/backing-1g.raw      # 1 GiB, all data
HALF=$STATIC/half-2g.raw            # 2 GiB, 64 MiB data / 64 MiB hole
# (only when a workload that reads them runs: cow, convert)
if { wants cow || wants convert; } &&
   { ! "$PY" scripts/bench.py mkdata-ok "$BACKING" full ||
     ! "$PY" scripts/bench.py mkdata-ok "$HALF" half; }; then
    echo "bench: creating the backing file and the convert source in $STATIC"
    "$PY" scripts/bench.py mkdata "$BACKING" full
    "$PY" scripts/bench.py mkdata "$HALF" half
    sync
fi

G=$((1024 * 1024 * 1024))

# Seconds the last repetition spent outside / inside the slow block (both big
# scatter rows, check, dirty open): the estimate of the next one, for the
# budget.
FAST_SECS=0 SLOW_SECS=0 DONE_REPS=0 DONE_SLOW=0
for rep in $(seq 1 "$REPS"); do
    do_slow=0
    if [ "$rep" -le "$SLOW_REPS" ]; then
        do_slow=1
    fi
    if [ "$rep" -gt 1 ]; then
        elapsed=$(( $(date +%s) - T_START ))
        if [ "$do_slow" = 1 ] && [ $((elapsed + FAST_SECS + SLOW_SECS)) -gt "$BUDGET" ]; then
            echo "== time budget (${BUDGET} s, BENCH_BUDGET): no more big scatter (both rows), check, dirty open"
            do_slow=0
        fi
        if [ $((elapsed + FAST_SECS)) -gt "$BUDGET" ]; then
            echo "== time budget (${BUDGET} s, BENCH_BUDGET): stopping after $DONE_REPS repetitions"
            break
        fi
    fi
    echo "== repetition $rep of $REPS"
    t_rep=$(date +%s)
    t_slow=0

    # 1. seqalloc: 1 GiB of 64 KiB writes on a fresh 4 GiB image, depth 1 and 32
    for d in 1 32; do
        wants seqalloc-d$d || continue
        for c in $CONTENDERS; do
            run_bench seqalloc-d$d "$c" "$rep" 4G "" "" "" -w -c 16384 -s 65536 -d $d
            cleanup
        done
    done

    # 2. scatter: 8,192 4 KiB writes on a fresh 64 GiB image, step 2 GiB - 64 KiB
    for d in 1 32; do
        wants scatter-d$d || continue
        for c in $CONTENDERS; do
            run_bench scatter-d$d "$c" "$rep" 64G "" "" "" -w -c 8192 -s 4096 -S $((2 * G - 65536)) -d $d
            cleanup
        done
    done

    # 3. big scatter: 65,536 4 KiB writes on a fresh 1 TiB image,
    #    step 2 GiB - 448 KiB, depth 32; then 7. check and dirty open of it;
    #    then big scatter again with ours opened with --image-opts and
    #    l2-cache-size=128M (the others as before).
    BIG="-w -c 65536 -s 4096 -S $((2 * G - 458752)) -d 32"
    if [ "$do_slow" = 1 ]; then
        t0=$(date +%s)
        if wants bigscatter || wants check || wants dirty-open; then
        for c in $CONTENDERS; do
            # shellcheck disable=SC2086
            run_bench bigscatter "$c" "$rep" 1T "" "" "" $BIG
        done
        fi
        # These take about a second: CHECK_RUNS runs each per repetition,
        # alternating (ours peer qcow2 ours ...), recorded as rep.run.
        if wants check; then
            for run in $(seq 1 "$CHECK_RUNS"); do
            for c in ours peer qcow2; do
                f=$(fmt_of "$c"); p=$RUN/bigscatter.$c.$f
                [ -f "$p" ] || continue
                # shellcheck disable=SC2046
                timed "$(img_of "$c")" check $(check_mode) -f "$f" "$p"
                note=$GLOBAL_MODE
                [ "$RC" = 0 ] || { note="$note; exit $RC"; echo "  check $c: exit $RC (see $LOG)"; }
                record check "$c" "$rep.$run" "$WALL" "$WALL" "$RSS" "$note"
                show check "$c" "$rep.$run" "$WALL"
            done
            done
        fi
        if wants dirty-open; then
            for run in $(seq 1 "$CHECK_RUNS"); do
            for c in ours peer qcow2; do
                f=$(fmt_of "$c"); p=$RUN/bigscatter.$c.$f
                [ -f "$p" ] || continue
                "$PY" scripts/bench.py mark-dirty "$f" "$p"
                # qemu-io opens read-write: a dirty image is checked and
                # repaired on open.
                # shellcheck disable=SC2046
                timed "$(io_of "$c")" $(io_mode) -f "$f" -c 'read 0 512' "$p"
                note=$GLOBAL_MODE
                [ "$RC" = 0 ] || { note="$note; exit $RC"; echo "  dirty-open $c: exit $RC (see $LOG)"; }
                if "$PY" scripts/bench.py is-dirty "$f" "$p"; then
                    note="$note; still marked dirty after close"
                    echo "  dirty-open $c: image still marked dirty after close"
                fi
                record dirty-open "$c" "$rep.$run" "$WALL" "$WALL" "$RSS" "$note"
                show dirty-open "$c" "$rep.$run" "$WALL"
            done
            done
        fi
        cleanup
        if wants bigscatter-128m; then
            for c in $CONTENDERS; do
                oo=""
                [ "$c" = ours ] && oo="l2-cache-size=128M"
                # shellcheck disable=SC2086
                run_bench bigscatter-128m "$c" "$rep" 1T "" "" "$oo" $BIG
                cleanup
            done
        fi
        t_slow=$(( $(date +%s) - t0 ))
        SLOW_SECS=$t_slow
        DONE_SLOW=$((DONE_SLOW + 1))
    fi

    # 4. rewrite: 1 GiB of 64 KiB writes over allocated clusters, depth 32
    #    (the first GiB of a fresh 4 GiB image, filled first, untimed, with
    #    1 MiB writes: the same layout as 64 KiB ones, in less time)
    FILL="-c 1024 -s 1048576 -d 32"
    if wants rewrite; then
        for c in $CONTENDERS; do
            run_bench rewrite "$c" "$rep" 4G "" "$FILL" "" -w -c 16384 -s 65536 -d 32
            cleanup
        done
    fi

    # 5. read: 1 GiB of 4 KiB reads over allocated clusters, depth 32
    if wants read; then
        for c in $CONTENDERS; do
            run_bench read "$c" "$rep" 4G "" "$FILL" "" -c 262144 -s 4096 -d 32
            cleanup
        done
    fi

    # 6. backing COW: 16,384 4 KiB writes, step 64 KiB, over a 1 GiB raw
    #    backing file full of data, depth 32 (raw has no overlay)
    if wants cow; then
        for c in ours peer qcow2; do
            run_bench cow "$c" "$rep" "" "-b $BACKING -F raw" "" "" -w -c 16384 -s 4096 -S 65536 -d 32
            cleanup
        done
    fi

    # 8. convert of a 2 GiB raw image half full of data (to each format)
    if wants convert; then
        for c in $CONTENDERS; do
            f=$(fmt_of "$c"); p=$RUN/convert.$c.$f
            rm -f "$p"
            # shellcheck disable=SC2046
            timed "$(img_of "$c")" convert $(convert_mode) -f raw -O "$f" "$HALF" "$p"
            note=$GLOBAL_MODE
            if [ "$RC" != 0 ]; then
                echo "  convert $c: FAILED: $(tail -n 1 <<<"$OUT")"
                record convert "$c" "$rep" FAIL "$WALL" "$RSS" "$note: $(tail -n 1 <<<"$OUT" | tr '\t' ' ')"
            else
                record convert "$c" "$rep" "$WALL" "$WALL" "$RSS" "$note"
                show convert "$c" "$rep" "$WALL"
            fi
            cleanup
        done
    fi
    # 9. multiqueue (issue 19): tests/qed-mq --bench, 32 requests in flight
    #    in all: 1 iothread of depth 32 or 2 of depth 16, into one image.
    #    random writes: 8,192 4 KiB writes at random 4 KiB-aligned offsets
    #    of a fresh 1 GiB image; read: 32,768 4 KiB reads at random offsets
    #    of a 1 GiB image filled first (untimed, 1 MiB writes as for 5.);
    #    rewrites (reads) of allocated clusters alone, then beside
    #    allocations in other tables: 4,096 over the first 256 MiB of a
    #    64 GiB image (filled by qed-mq, untimed) from one iothread, alone
    #    and then with a second iothread allocating at random offsets of
    #    [2 GiB, 64 GiB).  Ours, qcow2, raw (no peer: see the header).
    #    The counts are small because every scattered 4 KiB write leaves an
    #    extent that deleting the image discards (seconds per thousands on
    #    a file system mounted with discard: outside the figures, inside
    #    the budget).
    for t in 1 2; do
        d=$((32 / t))
        if wants_mq mq-randwrite-t$t; then
            for c in $MQ_CONTENDERS; do
                run_mq mq-randwrite-t$t "$c" "$rep" 1G "" --bench randwrite \
                    --threads $t --depth $d --ops 8192
                cleanup
            done
        fi
        if wants_mq mq-read-t$t; then
            for c in $MQ_CONTENDERS; do
                run_mq mq-read-t$t "$c" "$rep" 1G "$FILL" --bench read \
                    --threads $t --depth $d --ops 32768
                cleanup
            done
        fi
    done
    for m in rewrite read; do
        wants_vs $m || continue
        for c in $MQ_CONTENDERS; do
            run_mq mq-$m "$c" "$rep" 64G "" --bench $m-vs-alloc \
                --span 256M --threads 2 --depth 16 --ops 4096
            cleanup
        done
    done

    FAST_SECS=$(( $(date +%s) - t_rep - t_slow ))
    DONE_REPS=$rep
done

[ -n "${BENCH_KEEP:-}" ] || rm -f "$RUN"/*

T_END=$(date +%s)
DOCS_ARGS=()
[ "$WRITE_DOCS" = 0 ] || DOCS_ARGS=(--docs "$DOCS_DIR")
BIN_CHANGED=0
if [ "$(bin_sum)" != "$BIN_SUM" ]; then
    BIN_CHANGED=1
    DOCS_ARGS=()
fi
"$PY" scripts/bench.py report "$RESULTS" \
    --bench-dir "$BENCH_DIR" --reps "$DONE_REPS" --slow-reps "$DONE_SLOW" \
    --planned-reps "$REPS" --planned-slow-reps "$SLOW_REPS" --budget "$BUDGET" \
    --ref "$BENCH_REF" --mode "$GLOBAL_MODE" --runtime $((T_END - T_START)) \
    --ours "$OURS_IMG" --peer "$PEER_IMG" --tree "$TREE" \
    --tree-changes "$TREE_CHANGES" "${DOCS_ARGS[@]}" || exit 1
if [ "$BIN_CHANGED" = 1 ]; then
    echo "bench: $OURS_IMG or $OURS_IO changed during the run (a make elsewhere):" \
        "the figures mix two builds; $([ "$WRITE_DOCS" = 1 ] && echo "docs/ not written; ")run make bench again" >&2
    exit 1
fi

#!/bin/bash
# make check-asan: the QED iotests (the base's list and ours, as make check
# runs them) with the binaries of the sanitizer build (.base/qemu/build-san:
# clang, ASan + UBSan), with every sanitizer report fatal.
#
#   scripts/check-asan.sh [run-iotests.sh arguments]
#
# Reports go to files (log_path) as well as killing the process that made
# them, so that a report from a daemon whose output no test compares
# (qemu-nbd, qemu-storage-daemon, a VM) still fails the run.  Leaks are
# checked (LeakSanitizer) at every exit; tests/sanitizers/lsan.supp lists the
# base's own leaks, each with why it is not ours.
set -uo pipefail

TOP=$(cd "$(dirname "$0")/.." && pwd)
BUILD=$TOP/.base/qemu/build-san
LOGS=$(mktemp -d /tmp/san-logs-XXXXXX)

# Tests left out under the sanitizers, with the reason:
#  qed-install: it checks that `make install` copies the main build's
#               binaries; under check-asan the binaries are build-san's.
#  qed-write-flush: it measures timing (how many of 7 flushes reach the
#               file while 32 writes go on), which the sanitizers change:
#               with build-san's qemu-img, qcow2 gets 1 through, raw 6-7,
#               ours 2-5 (7 of 7 in the main build, as the test asks); the
#               flush paths run under ASan in qed-fault-flush-order,
#               qed-write-stress and qed-write-parallel.
# (qed-export-nbd and qed-export-qsd start their servers without --fork or
# --daemonize: clang 14's ASan does not take its allocator locks around
# fork(), so a child forked while the RCU thread was in malloc deadlocked.)
EXCLUDE=" qed-install qed-write-flush "

args=()
names=0
for a in "$@"; do
    args+=("$a")
    case "$a" in -*) ;; *) names=1 ;; esac
done
if [ "$names" = 0 ]; then
    # The same tests as make check (the list, then ours), less EXCLUDE
    while read -r line; do
        line=${line%%#*}
        for t in $line; do
            [[ $EXCLUDE == *" $t "* ]] || args+=("$t")
        done
    done < "$TOP/tests/qemu-iotests/qed-tests.list"
    for f in "$TOP"/tests/qemu-iotests/tests/qed-*; do
        [ -f "$f" ] || continue
        case "$f" in *.out|*.out.*|*~|*.orig|*.rej|*.swp) continue ;; esac
        t=$(basename "$f")
        [[ $EXCLUDE == *" $t "* ]] || args+=("$t")
    done
    echo "check-asan: left out: $EXCLUDE"
fi

common="halt_on_error=1:abort_on_error=1:print_stacktrace=1:disable_coredump=1"
# (One log_path for both: the last one parsed wins.  Full unwinding at
# malloc, or leak stacks stop at glib's g_malloc and no suppression by
# function can match.)
export ASAN_OPTIONS="$common:detect_leaks=1:allocator_may_return_null=1:fast_unwind_on_malloc=0:log_path=$LOGS/san"
export UBSAN_OPTIONS="$common:log_path=$LOGS/san"
export LSAN_OPTIONS="suppressions=$TOP/tests/sanitizers/lsan.supp:print_suppressions=0"

start=$(date +%s)
QED_BUILD_DIR=$BUILD "$TOP/scripts/run-iotests.sh" "${args[@]}" | tee "$LOGS/run.log"
rc=${PIPESTATUS[0]}
secs=$(( $(date +%s) - start ))

# A report names an error (ASan, LSan, UBSan's "runtime error").  Logs
# that hold only warnings are no reports: ASan's start-up warning about
# swapcontext (QEMU's coroutines, whose stack switches QEMU tells ASan
# about) and its "ignoring __asan_handle_no_return" on a coroutine stack.
reports=$(find "$LOGS" -name 'san.*' | sort |
          while read -r f; do
              if grep -Eq "ERROR: |runtime error|^SUMMARY: " "$f"; then
                  echo "$f"
              fi
          done)
if [ -n "$reports" ]; then
    echo "check-asan: sanitizer reports (kept in $LOGS):"
    for f in $reports; do
        echo "== $f"
        head -n 40 "$f"
    done
    rc=1
fi
summary=$(grep '^iotests:' "$LOGS/run.log" | tail -n 1)
echo "check-asan: ${summary:-no summary}; $(echo "$reports" | grep -c . ) sanitizer reports; ${secs}s"
if [ "$rc" = 0 ] && [ -z "$reports" ]; then
    rm -rf "$LOGS"
else
    echo "check-asan: sanitizer logs in $LOGS"
fi
exit "$rc"

#!/bin/bash
# Run the base's qemu-iotests over QED: the base tests listed in
# tests/qemu-iotests/qed-tests.list plus every one of our own iotests
# (tests/qemu-iotests/tests/qed-*), with the binaries `make` built.
#
#   scripts/run-iotests.sh              the list and ours
#   scripts/run-iotests.sh --ours       only ours
#   scripts/run-iotests.sh [--ours] [check options] [TEST...]
#                                       only the named tests (e.g. 116,
#                                       qed-header); options starting with
#                                       '-' go to the base's ./check (-d, -j 4)
#
# Ends with one line "iotests: N passed, M failed[, K skipped]" and exits
# non-zero if any test failed (or the list names a test the base lacks).
set -uo pipefail

TOP=$(cd "$(dirname "$0")/.." && pwd)
BASE=$TOP/.base/qemu
# QED_BUILD_DIR: another build of the base (make check-asan: build-san)
BUILD=${QED_BUILD_DIR:-$BASE/build}
BUILD_IOTESTS=$BUILD/tests/qemu-iotests
SRC_IOTESTS=$BASE/tests/qemu-iotests
LIST=$TOP/tests/qemu-iotests/qed-tests.list
OURS_DIR=$TOP/tests/qemu-iotests/tests

ours_only=0
check_opts=()
only=()
while [ $# -gt 0 ]; do
    case "$1" in
        --ours) ours_only=1 ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -j|-o|-c|-i) check_opts+=("$1" "$2"); shift ;;
        -*) check_opts+=("$1") ;;
        *) only+=("$1") ;;
    esac
    shift
done

die() { echo "run-iotests: $*" >&2; echo "iotests: 0 passed, 1 failed"; exit 2; }

[ -x "$BUILD_IOTESTS/check" ] || die "no $BUILD_IOTESTS/check: run 'make' first"
# (./check takes the binaries from the environment if set there)
for b in "${QEMU_IMG_PROG:-$BUILD/qemu-img}" \
         "${QEMU_IO_PROG:-$BUILD/qemu-io}" \
         "${QEMU_NBD_PROG:-$BUILD/qemu-nbd}" \
         "${QSD_PROG:-$BUILD/storage-daemon/qemu-storage-daemon}" \
         "${QEMU_PROG:-$BUILD/qemu-system-x86_64}"; do
    [ -x "$b" ] || die "missing $b: run 'make' first"
done

# Our tests are linked into the base by `make`; link again so that a test
# added since the last build is found too.
"$TOP/scripts/link-ours.sh" || die "linking our files into the base failed"

# The test names: the base's list, then ours.
tests=()
if [ "$ours_only" = 0 ] && [ -f "$LIST" ]; then
    while read -r line; do
        line=${line%%#*}
        for t in $line; do
            tests+=("$t")
        done
    done < "$LIST"
fi
for f in "$OURS_DIR"/qed-*; do
    [ -f "$f" ] || continue
    case "$f" in
        *.out|*.out.*|*~|*.orig|*.rej|*.swp) continue ;;
    esac
    tests+=("$(basename "$f")")
done

if [ ${#only[@]} -gt 0 ]; then
    sel=()
    for t in "${only[@]}"; do
        [[ $t =~ ^[0-9]+$ ]] && t=$(printf %03d "$((10#$t))")
        sel+=("$t")
    done
    tests=("${sel[@]}")
fi

# Refuse names the base does not have one by one (./check would abort the
# whole run), counting each as a failure.
runnable=()
missing=()
declare -A seen=()
for t in "${tests[@]}"; do
    [[ $t =~ ^[0-9]+$ ]] && t=$(printf %03d "$((10#$t))")
    [ -n "${seen[$t]:-}" ] && continue
    seen[$t]=1
    if [[ $t =~ ^[0-9]+$ ]]; then
        p=$SRC_IOTESTS/$t
    else
        p=$SRC_IOTESTS/tests/$t
    fi
    if [ -f "$p" ] && [ -f "$p.out" ]; then
        runnable+=("$t")
    else
        echo "run-iotests: no test '$t' (or no $t.out) in $SRC_IOTESTS" >&2
        missing+=("$t")
    fi
done

passed=0
failed=${#missing[@]}
skipped=0
failed_names=("${missing[@]}")
skipped_names=()

# A private scratch folder: the default one lies under .base/, whose dot
# makes some base tests refuse to run, and another run may be using it.
# (No "qed" in its name: the tests' filters replace the format's name.)
if [ -z "${TEST_DIR:-}" ]; then
    TEST_DIR=$(mktemp -d /tmp/iotests-XXXXXXXX)
    export TEST_DIR
    own_test_dir=1
fi

if [ ${#runnable[@]} -gt 0 ]; then
    out=$(mktemp)
    trap 'rm -f "$out"' EXIT
    # TAP output is easy to count.  The diffs of failing tests go to
    # stderr: keep them in the same stream, next to their test.
    (cd "$BUILD_IOTESTS" &&
        ./check -qed -tap "${check_opts[@]}" "${runnable[@]}" 2>&1) |
        tee "$out"
    rc=${PIPESTATUS[0]}

    # A result line may follow the unterminated last line of a diff, so
    # the match is not anchored at the start of the line.
    declare -A done_=()
    while read -r line; do
        if [[ $line =~ (^|[^a-zA-Z])not\ ok\ qed\ ([^ ]+)$ ]]; then
            failed=$((failed + 1))
            failed_names+=("${BASH_REMATCH[2]}")
            done_[${BASH_REMATCH[2]}]=1
        elif [[ $line =~ (^|[^a-zA-Z])ok\ qed\ ([^ ]+)\ \#\ SKIP$ ]]; then
            skipped=$((skipped + 1))
            skipped_names+=("${BASH_REMATCH[2]}")
            done_[${BASH_REMATCH[2]}]=1
        elif [[ $line =~ (^|[^a-zA-Z])ok\ qed\ ([^ ]+)$ ]]; then
            passed=$((passed + 1))
            done_[${BASH_REMATCH[2]}]=1
        fi
    done < "$out"

    # A test that never reported (check crashed or was interrupted) failed.
    for t in "${runnable[@]}"; do
        if [ -z "${done_[$t]:-}" ]; then
            failed=$((failed + 1))
            failed_names+=("$t")
        fi
    done
    if [ "$rc" != 0 ] && [ "$failed" = 0 ]; then
        echo "run-iotests: ./check exited with status $rc" >&2
        failed=1
        failed_names+=("(check)")
    fi

    # Say why tests were skipped: check's TAP output does not.
    scratch=${TEST_DIR:-$BUILD_IOTESTS/scratch}
    for t in "${skipped_names[@]}"; do
        f=$scratch/$t.notrun
        [ -f "$f" ] || f=$scratch/$t/$t.notrun
        if [ -f "$f" ]; then
            echo "skipped $t: $(head -n 1 "$f")"
        else
            echo "skipped $t"
        fi
    done
fi

if [ -n "${own_test_dir:-}" ]; then
    if [ ${#failed_names[@]} -gt 0 ]; then
        echo "scratch files of the failed tests: $TEST_DIR"
    else
        rm -rf "$TEST_DIR"
    fi
fi
[ ${#failed_names[@]} -gt 0 ] && echo "failed: ${failed_names[*]}"
summary="iotests: $passed passed, $failed failed"
[ "$skipped" -gt 0 ] && summary="$summary, $skipped skipped"
echo "$summary"
[ "$failed" = 0 ]

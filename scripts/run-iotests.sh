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
# Without test names, our unit tests (scripts/run-unit-tests.sh) run first.
# A base test that fails is run once more; one that passes then counts as
# passed and is named on a line "flaky (failed, then passed on retry): ..."
# (our own qed-* tests are never retried).  Ends with one line
# "iotests: N passed, M failed[, K skipped]", after the unit tests' line
# "unit tests: ..." when they ran, and exits non-zero if any test failed
# (or the list names a test the base lacks).
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
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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

# Our tests reach the base as links that `make` makes (scripts/link-ours.sh,
# run by `make build`, which `make check` runs first); linking and patching
# the base is make's job, not this script's.  A test of ours (or its
# expected output, or a helper the tests share) that the base lacks was
# added since the last make: say so, rather than report "no test".
declare -A want_ours=()
for t in "${tests[@]}"; do
    [[ $t == qed-* ]] && want_ours[$t]=1
done
unlinked=()
for f in "$OURS_DIR"/*; do
    [ -e "$f" ] || continue
    n=$(basename "$f")
    case "$n" in
        *~|*.orig|*.rej|*.swp) continue ;;
        qed-*) [ -n "${want_ours[${n%%.out*}]:-}" ] || continue ;;
    esac
    [ "$SRC_IOTESTS/tests/$n" -ef "$f" ] || unlinked+=("$n")
done
[ ${#unlinked[@]} = 0 ] ||
    die "not linked into the base (added since the last make?): ${unlinked[*]}; run 'make' first"

# Our unit tests first, when all the tests run (make check, check-quick):
# their summary line is repeated above the iotests' at the end.
unit_summary=""
unit_failed=0
if [ ${#only[@]} = 0 ]; then
    unit_out=$(mktemp)
    "$TOP/scripts/run-unit-tests.sh" | tee "$unit_out"
    [ "${PIPESTATUS[0]}" = 0 ] || unit_failed=1
    unit_summary=$(grep '^unit tests:' "$unit_out" | tail -n 1)
    [ -n "$unit_summary" ] || unit_summary="unit tests: did not finish"
    rm -f "$unit_out"
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
# On a disk file system with O_DIRECT: our crash, stress and export tests
# also open images as production does, with cache.direct=on and the
# kernel's AIO (tmpfs, where /tmp may be, takes O_DIRECT since Linux 6.6
# but serves it from memory, synchronously).
if [ -z "${TEST_DIR:-}" ]; then
    for d in /tmp /var/tmp; do
        [ "$(stat -f -c %T "$d" 2>/dev/null)" = tmpfs ] && continue
        TEST_DIR=$(mktemp -d $d/iotests-XXXXXXXX) || continue
        dd if=/dev/zero of="$TEST_DIR/o_direct" bs=4096 count=1 \
            oflag=direct 2>/dev/null && break
        rm -rf "$TEST_DIR"
    done
    [ -d "${TEST_DIR:-}" ] || TEST_DIR=$(mktemp -d /tmp/iotests-XXXXXXXX)
    rm -f "$TEST_DIR/o_direct"
    export TEST_DIR
    own_test_dir=1
fi

# run_check OUT TEST...: ./check on the tests, its output shown and kept
# in OUT; returns check's exit status.  TAP output is easy to count.  The
# diffs of failing tests go to stderr: keep them in the same stream, next
# to their test.
run_check()
{
    local out=$1
    shift
    (cd "$BUILD_IOTESTS" && ./check -qed -tap "${check_opts[@]}" "$@" 2>&1) |
        tee "$out"
    return "${PIPESTATUS[0]}"
}

# parse_results OUT ARRAY: ARRAY[test]=ok|fail|skip for each result in OUT.
# A result may follow the unterminated last line of a diff, and with -j the
# workers' results may share a line ("not ok qed 194not ok qed 195"): each
# result starts a line of its own first.  Only names of tests that ran
# count.
parse_results()
{
    local line
    local -n res_=$2
    while read -r line; do
        if [[ $line =~ ^not\ ok\ qed\ ([^ ]+)$ ]]; then
            [ -n "${seen[${BASH_REMATCH[1]}]:-}" ] &&
                res_[${BASH_REMATCH[1]}]=fail
        elif [[ $line =~ ^ok\ qed\ ([^ ]+)\ \#\ SKIP$ ]]; then
            [ -n "${seen[${BASH_REMATCH[1]}]:-}" ] &&
                res_[${BASH_REMATCH[1]}]=skip
        elif [[ $line =~ ^ok\ qed\ ([^ ]+)$ ]]; then
            [ -n "${seen[${BASH_REMATCH[1]}]:-}" ] &&
                res_[${BASH_REMATCH[1]}]=ok
        fi
    done < <(sed -E 's/(not )?ok qed /\n&/g' "$1")
}

# out_bad TEST: where ./check left the test's output (-j: in a subfolder)
out_bad()
{
    local f=$TEST_DIR/$1.out.bad
    [ -f "$f" ] || f=$TEST_DIR/$1/$1.out.bad
    echo "$f"
}

flaky=()
if [ ${#runnable[@]} -gt 0 ]; then
    out=$(mktemp)
    out2=$(mktemp)
    trap 'rm -f "$out" "$out2"' EXIT
    declare -A res=()
    run_check "$out" "${runnable[@]}"
    rc=$?
    parse_results "$out" res
    # A test that never reported (check crashed or was interrupted) failed.
    for t in "${runnable[@]}"; do
        [ -n "${res[$t]:-}" ] || res[$t]=unreported
    done
    # check failing with no test failed: count that as a failure too
    any_failed=0
    for t in "${runnable[@]}"; do
        [ "${res[$t]}" = fail ] || [ "${res[$t]}" = unreported ] &&
            any_failed=1
    done
    check_failed=0
    if [ "$rc" != 0 ] && [ "$any_failed" = 0 ]; then
        echo "run-iotests: ./check exited with status $rc" >&2
        check_failed=1
    fi

    # A base test that failed gets one more run: some are timing-sensitive
    # on a loaded machine (194: the migration may complete before postcopy
    # starts).  Ours are not retried: a flaky test of ours is a bug.  The
    # first run's diff stays above, its output next to the retry's.
    retry=()
    for t in "${runnable[@]}"; do
        [ "${res[$t]}" = fail ] && [[ $t != qed-* ]] && retry+=("$t")
    done
    if [ ${#retry[@]} -gt 0 ]; then
        echo "run-iotests: the failed base tests once more: ${retry[*]}"
        for t in "${retry[@]}"; do
            f=$(out_bad "$t")
            [ -f "$f" ] && mv -f "$f" "$f.first"
        done
        declare -A res2=()
        run_check "$out2" "${retry[@]}"
        rc2=$?
        parse_results "$out2" res2
        for t in "${retry[@]}"; do
            if [ "${res2[$t]:-}" = ok ]; then
                res[$t]=ok
                flaky+=("$t")
            fi
        done
        if [ "$rc2" != 0 ] && [ ${#flaky[@]} = ${#retry[@]} ]; then
            echo "run-iotests: ./check (the retry) exited with status $rc2" >&2
            check_failed=1
        fi
    fi

    for t in "${runnable[@]}"; do
        case ${res[$t]} in
        ok) passed=$((passed + 1)) ;;
        skip) skipped=$((skipped + 1)); skipped_names+=("$t") ;;
        *) failed=$((failed + 1)); failed_names+=("$t") ;;
        esac
    done
    if [ "$check_failed" = 1 ]; then
        failed=$((failed + 1))
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
    if [ ${#failed_names[@]} -gt 0 ] || [ ${#flaky[@]} -gt 0 ]; then
        echo "scratch files of the failed (and flaky) tests: $TEST_DIR"
    else
        rm -rf "$TEST_DIR"
    fi
fi
[ ${#failed_names[@]} -gt 0 ] && echo "failed: ${failed_names[*]}"
[ ${#flaky[@]} -gt 0 ] &&
    echo "flaky (failed, then passed on retry): ${flaky[*]}"
summary="iotests: $passed passed, $failed failed"
[ "$skipped" -gt 0 ] && summary="$summary, $skipped skipped"
[ -n "$unit_summary" ] && echo "$unit_summary"
echo "$summary"
[ "$failed" = 0 ] && [ "$unit_failed" = 0 ]

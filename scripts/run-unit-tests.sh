#!/bin/bash
# Run our unit tests (tests/unit/test-*.c, built by `make` into the base's
# build/tests/unit/), each test case in a process of its own: a failed
# assertion aborts the program, and would hide the cases after it.
#
#   scripts/run-unit-tests.sh
#
# One line per case ("ok", "FAIL" with the case's output, or "skip"), then
# "unit tests: N passed, M failed[, K skipped]"; exits non-zero if a case
# failed or a test program is missing.  run-iotests.sh runs it first when
# it runs all the iotests (make check, make check-quick).
set -uo pipefail

TOP=$(cd "$(dirname "$0")/.." && pwd)
# QED_BUILD_DIR: another build of the base, as for run-iotests.sh
BUILD=${QED_BUILD_DIR:-$TOP/.base/qemu/build}

passed=0
failed=0
skipped=0

fail()
{
    echo "FAIL $*"
    failed=$((failed + 1))
}

for src in "$TOP"/tests/unit/test-*.c; do
    [ -e "$src" ] || continue
    t=$(basename "$src" .c)
    exe=$BUILD/tests/unit/$t
    if [ ! -x "$exe" ]; then
        fail "$t: no $exe (run 'make' first)"
        continue
    fi
    paths=$("$exe" -l | grep '^/')
    if [ -z "$paths" ]; then
        fail "$t: lists no test cases"
        continue
    fi
    for p in $paths; do
        out=$(timeout 300 "$exe" --tap -p "$p" 2>&1)
        rc=$?
        result=$(awk -v p="$p" '
            $1 == "ok" && $3 == p { r = ($4 == "#" && $5 == "SKIP") ? "skip" : "ok" }
            $1 == "not" && $2 == "ok" && $4 == p { r = "fail" }
            END { print r }' <<< "$out")
        if [ "$rc" = 0 ] && [ "$result" = ok ]; then
            echo "ok   $t $p"
            passed=$((passed + 1))
        elif [ "$rc" = 0 ] && [ "$result" = skip ]; then
            echo "skip $t $p:${out##*# SKIP}"
            skipped=$((skipped + 1))
        else
            fail "$t $p (exit status $rc)"
            sed 's/^/    /' <<< "$out"
        fi
    done
done

summary="unit tests: $passed passed, $failed failed"
[ "$skipped" -gt 0 ] && summary="$summary, $skipped skipped"
echo "$summary"
[ "$failed" = 0 ]

#!/bin/bash
# Replay every input of tests/qed-fuzz/regress/ (each one a finding of
# `make fuzz`, fixed since) through the fuzzer of the sanitizer build, with
# every sanitizer report fatal.  Run by `make check-asan` and
# `make fuzz-regress`.
set -uo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
FUZZER=$TOP/.base/qemu/build-san/tests/qed-fuzz/qed-fuzz
DIR=$TOP/tests/qed-fuzz/regress

export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:print_stacktrace=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"

passed=0
failed=0
for f in "$DIR"/*; do
    [ -f "$f" ] || continue
    case "$f" in *.txt|*.md) continue ;; esac
    if timeout 300 "$FUZZER" -runs=1 "$f" > /tmp/fuzz-regress.$$.log 2>&1; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        echo "fuzz-regress: $(basename "$f") FAILED:"
        grep -E '^SUMMARY|qed-fuzz: |ERROR' /tmp/fuzz-regress.$$.log | head -n 5
    fi
done
rm -f /tmp/fuzz-regress.$$.log
echo "fuzz-regress: $passed passed, $failed failed"
[ "$failed" = 0 ]

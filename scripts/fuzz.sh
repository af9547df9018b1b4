#!/bin/bash
# make fuzz: run our QED fuzzer (tests/qed-fuzz/qed-fuzz.c, libFuzzer with
# ASan and UBSan, from the sanitizer build) for FUZZ_SECONDS (default 60).
#
#   fuzz-out/corpus/     the corpus, kept and grown from run to run
#   fuzz-out/seeds/      valid images made afresh by tests/qed-fuzz/make-seeds.sh
#   fuzz-out/crash-*, leak-*, timeout-*, oom-*    findings (inputs to replay)
#   fuzz-out/fuzz.log    libFuzzer's output
#
# libFuzzer runs in fork mode (-fork=1) so that the run goes on after a
# finding.  At the end, every new finding is replayed once to print its
# sanitizer summary.  Exits non-zero if there was a finding.
#
# Replay one input by hand (QED_FUZZ_VERBOSE=1 prints what the harness does):
#   .base/qemu/build-san/tests/qed-fuzz/qed-fuzz fuzz-out/crash-...
set -uo pipefail

TOP=$(cd "$(dirname "$0")/.." && pwd)
BUILD=$TOP/.base/qemu/build-san
FUZZER=$BUILD/tests/qed-fuzz/qed-fuzz
SECS=${FUZZ_SECONDS:-60}
OUT=$TOP/fuzz-out

mkdir -p "$OUT/corpus"
rm -rf "$OUT/seeds"
ASAN_OPTIONS=detect_leaks=0 "$TOP/tests/qed-fuzz/make-seeds.sh" "$OUT/seeds" \
    "$BUILD/qemu-img" "$BUILD/qemu-io" > "$OUT/seeds.log" 2>&1 ||
    { cat "$OUT/seeds.log"; echo "fuzz: making the seeds failed"; exit 1; }

export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:print_stacktrace=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"

findings() { ls "$OUT" | grep -E '^(crash|leak|timeout|oom|slow-unit)-' | sort; }
before=$(findings)

echo "fuzz: $SECS s of libFuzzer on our QED driver (log: fuzz-out/fuzz.log)"
"$FUZZER" -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
    -max_total_time="$SECS" -timeout=30 -rss_limit_mb=4096 \
    -dict="$TOP/tests/qed-fuzz/qed.dict" -artifact_prefix="$OUT/" \
    -max_len=262144 -use_value_profile=1 \
    "$OUT/corpus" "$OUT/seeds" > "$OUT/fuzz.log" 2>&1
rc=$?

last=$(grep -E '^#[0-9]+: cov:' "$OUT/fuzz.log" | tail -n 1)
execs=$(echo "$last" | sed -n 's/^#\([0-9]*\):.*/\1/p')
events=$(echo "$last" | sed -n 's/.*oom\/timeout\/crash: \([0-9/]*\).*/\1/p')
new=$(comm -13 <(echo "$before") <(findings) | grep .)
echo "fuzz: libFuzzer exit status $rc"
echo "fuzz: last status: ${last:-none}"
for f in $new; do
    summary=$(timeout 120 "$FUZZER" -runs=1 "$OUT/$f" 2>&1 |
              grep -E '^SUMMARY|qed-fuzz: |ERROR: libFuzzer' | head -n 2 | tr '\n' ' ')
    echo "fuzz: finding fuzz-out/$f: $summary"
done
nnew=$(echo "$new" | grep -c .)
echo "fuzz: ${execs:-0} executions in ${SECS} s, corpus $(ls "$OUT/corpus" | wc -l) inputs;" \
     "oom/timeout/crash events ${events:-0/0/0}; $nnew new findings"
[ "$nnew" = 0 ]

# The QEMU 10.0 fork with our own QED driver.
#
#   make            install build deps, prepare the base once, build
#   make demo       build, then show QED working
#   make check      build, then run our unit tests and the iotests over QED
#                   (see README.md)
#   make check-long the crash test's long run (240 kills)
#   make check-crash 10000 power-cut states rebuilt from write logs
#   make check-sim  1000000 operations of seeded schedules and power cuts
#   make bench      build, then time our QED against the original, qcow2, raw
#   make check-asan the iotests with an ASan + UBSan build (.base/qemu/build-san)
#   make check-tsan the multiqueue stress under ThreadSanitizer, and our files'
#                   thread-safety warnings, with clang 19 (.base/qemu/build-tsan)
#   make fuzz       FUZZ_SECONDS (60) of libFuzzer on our QED driver
#
# The base (Debian trixie's qemu source package, QEMU 10.0, built on
# bookworm) lives in .base/, never in git.  QEMU_VERSION=1:10.0.13+ds-0+deb13u1
# (say) pins its Debian version; the default is the newest trixie has.  The
# meson it needs comes from bookworm-backports, unpacked in .base/meson (see
# scripts/fetch-meson.sh; MESON_VERSION pins it).

BASE      := .base/qemu
BUILD     := $(BASE)/build
BINARIES  := qemu-img qemu-io qemu-nbd storage-daemon/qemu-storage-daemon \
             qemu-system-x86_64
PATCHES   := $(wildcard patches/*.patch)
# Our unit tests (tests/unit/test-*.c), built in the base's tests/unit/
UNIT_TESTS := $(patsubst %.c,%,$(wildcard tests/unit/test-*.c))

.PHONY: all deps base build demo check check-quick check-crash check-sim \
        bench clean distclean FORCE

all: build

deps:
	@./scripts/install-deps.sh

# Re-prepared from scratch when our patches to the base, the scripts that
# fetch and prepare it, or the pinned version (QEMU_VERSION, MESON_VERSION:
# .base/pinned is rewritten only when they change) change (prepare-base.sh
# keeps the same stamp).
STAMP     := .base/.prepared
PINNED    := .base/pinned
export QEMU_VERSION MESON_VERSION
$(PINNED): FORCE
	@mkdir -p .base
	@echo 'QEMU_VERSION=$(QEMU_VERSION) MESON_VERSION=$(MESON_VERSION)' | \
	    cmp -s - $@ || \
	    echo 'QEMU_VERSION=$(QEMU_VERSION) MESON_VERSION=$(MESON_VERSION)' > $@
$(STAMP): $(PATCHES) $(PINNED) scripts/prepare-base.sh \
          scripts/fetch-base-10.sh scripts/fetch-meson.sh | deps
	@rm -f $(STAMP)
	@./scripts/prepare-base.sh

base: deps $(STAMP)

# Concurrent builds in one tree would trip over each other: take a lock.
build: base
	@./scripts/link-ours.sh
	@flock .base/build.lock ninja -C $(BUILD) $(BINARIES) tests/qed-sim/qed-sim tests/qed-mq/qed-mq \
	    $(UNIT_TESTS)

demo: build
	@./scripts/demo.sh

check: build
	@./scripts/run-iotests.sh

# The crash test's full run: 240 SIGKILLs instead of the 20 of make check.
check-long: build
	@QED_CRASH_LOOPS=240 ./scripts/run-iotests.sh --ours qed-crash-kill

# Crash states by write-log replay: 10000 power-cut states of recorded
# workloads (make check runs 1000, in the iotest qed-crash-replay).
# QED_REPLAY_STATES, QED_REPLAY_SEED: see tests/qemu-iotests/tests/qed_replay.py.
check-crash: build
	@./tests/qemu-iotests/tests/qed_replay.py -v \
	    --states $${QED_REPLAY_STATES:-10000}

# The schedule and power-cut harness (tests/qed-sim/qed-sim.c): seeds from
# SIM_START on until SIM_OPS operations (guest operations issued plus file
# requests completed) are done; one line per failing seed with the command
# that replays it, then the summary and the rate.  The iotest qed-sim runs
# the regression seeds and a fixed slice (seeds 1-N) in make check.
SIM_OPS   ?= 1000000
SIM_START ?= 1000
check-sim: build
	@$(BUILD)/tests/qed-sim/qed-sim --ops-total $(SIM_OPS) \
	    --start $(SIM_START) --timing

# Only our unit tests and our own iotests, for a fast edit-test loop.
check-quick: build
	@./scripts/run-iotests.sh --ours

# The benchmark of issue 8 (never part of `make check`): writes
# docs/benchmarks.md and docs/benchmarks.png, only from a committed tree
# (BENCH_NO_DOCS=1, BENCH_ALLOW_DIRTY=1). BENCH_REPS, BENCH_DIR, ... : see
# scripts/bench.sh.
bench: build
	@./scripts/install-bench-deps.sh
	@./scripts/bench.sh

# The sanitizer build (issue 7): clang, ASan + UBSan, libFuzzer coverage of
# our QED files; one build folder for check-asan and fuzz.  Its own folder,
# so the main build is never touched; the same base source tree (and so our
# linked-in files).
BUILD_SAN   := $(BASE)/build-san
SAN_PKGS    := clang llvm libclang-rt-14-dev
.PHONY: build-san check-asan fuzz fuzz-regress
build-san: base
	@./scripts/install-deps.sh $(SAN_PKGS)
	@./scripts/link-ours.sh
	@./scripts/prepare-san.sh
	@flock .base/build-san.lock nice -n 5 ninja -C $(BUILD_SAN) $(BINARIES) \
	    tests/qed-fuzz/qed-fuzz tests/qed-sim/qed-sim tests/qed-mq/qed-mq

# The QED iotests (the list and ours) on the sanitizer build, every report
# fatal, then the fuzzer's regression inputs.  Arguments as for
# run-iotests.sh through CHECK_ARGS (e.g. CHECK_ARGS=--ours).
check-asan: build-san
	@./scripts/check-asan.sh $(CHECK_ARGS) && ./scripts/fuzz-regress.sh

# libFuzzer on our QED driver for FUZZ_SECONDS; findings land in fuzz-out/.
FUZZ_SECONDS ?= 60
fuzz: build-san
	@FUZZ_SECONDS=$(FUZZ_SECONDS) ./scripts/fuzz.sh

# Replay tests/qed-fuzz/regress/ (inputs that once failed) through the fuzzer.
fuzz-regress: build-san
	@./scripts/fuzz-regress.sh

# The ThreadSanitizer build (issue 19): clang 19 (bookworm's clang 14 and
# clang-16 fail QEMU's -Wthread-safety probe, gcc ignores the annotations),
# --enable-tsan --enable-debug-graph-lock, tools only; its own folder, the
# same base source tree.  check-tsan: our files' warnings under
# -Wthread-safety (0 allowed), then tests/qed-mq's stress for 3 image
# configurations and TSAN_SEEDS (1 2 3), TSAN_OPS (20000) requests per
# thread, and the unit test test-qed-mq, every TSan report fatal but the
# base's in tests/sanitizers/tsan-suppressions.txt (scripts/check-tsan.sh).
# Never part of make check.
BUILD_TSAN  := $(BASE)/build-tsan
TSAN_PKGS   := clang-19 llvm-19 libclang-rt-19-dev
.PHONY: build-tsan check-tsan
build-tsan: base
	@./scripts/install-deps.sh $(TSAN_PKGS)
	@./scripts/link-ours.sh
	@./scripts/prepare-tsan.sh
	@flock .base/build-tsan.lock nice -n 5 ninja -C $(BUILD_TSAN) \
	    qemu-img qemu-io storage-daemon/qemu-storage-daemon \
	    tests/qed-mq/qed-mq $(UNIT_TESTS)

check-tsan: build-tsan
	@./scripts/check-tsan.sh

# Install the fork's binaries under $(PREFIX)/bin (default /usr/local/bin).
# Never over the distribution's QEMU: PREFIX=/usr (or /) is refused.  The
# installed qemu-system-x86_64 finds its firmware where Debian's packages put
# it (the build is configured with that firmware path).
PREFIX ?= /usr/local
.PHONY: install
install: build
	@case "$(abspath $(DESTDIR)$(PREFIX))" in \
	    /usr|/) echo "make install: PREFIX=$(PREFIX) would overwrite the distribution's QEMU in /usr/bin; choose another PREFIX" >&2; exit 1 ;; \
	esac
	@install -d "$(DESTDIR)$(PREFIX)/bin"
	@for b in $(BINARIES); do \
	    install -m 0755 "$(BUILD)/$$b" "$(DESTDIR)$(PREFIX)/bin/" || exit 1; \
	    echo "installed $(DESTDIR)$(PREFIX)/bin/$$(basename $$b)"; \
	done

clean:
	@[ ! -d $(BUILD) ] || ninja -C $(BUILD) clean

distclean:
	rm -rf .base

# The QEMU 7.2 fork with our own QED driver.
#
#   make            install build deps, prepare the base once, build
#   make demo       build, then show QED working
#   make check      build, then run the iotests over QED (see README.md)
#
# The base (Debian bookworm's qemu source) lives in .base/, never in git.

BASE      := .base/qemu
BUILD     := $(BASE)/build
BINARIES  := qemu-img qemu-io qemu-nbd storage-daemon/qemu-storage-daemon \
             qemu-system-x86_64
PATCHES   := $(wildcard patches/*.patch)

.PHONY: all deps base build demo check check-quick clean distclean

all: build

deps:
	@./scripts/install-deps.sh

# Re-prepared from scratch when our patches to the base change.
$(BASE)/.prepared: $(PATCHES) scripts/prepare-base.sh | deps
	@rm -f $(BASE)/.prepared
	@./scripts/prepare-base.sh

base: deps $(BASE)/.prepared

# Concurrent builds in one tree would trip over each other: take a lock.
build: base
	@./scripts/link-ours.sh
	@flock .base/build.lock ninja -C $(BUILD) $(BINARIES)

demo: build
	@./scripts/demo.sh

check: build
	@./scripts/run-iotests.sh

# Only our own iotests, for a fast edit-test loop.
check-quick: build
	@./scripts/run-iotests.sh --ours

clean:
	@[ ! -d $(BUILD) ] || ninja -C $(BUILD) clean

distclean:
	rm -rf .base

# qmigrate: set-up and test commands. `make test` and `make demo` work on a
# fresh Debian 12 machine: scripts/setup.sh installs what they need (QEMU 7.2
# from Debian, QEMU 10.0 unpacked from bookworm-backports, the guest kernel, Go
# modules) into a cache it reuses ($(CACHE)).

SHELL := /bin/bash
CACHE ?= $(or $(QMIGRATE_CACHE),$(HOME)/.cache/qmigrate)
export QMIGRATE_CACHE := $(CACHE)
GO ?= go
# Integration tests start real QEMUs; they run serially and need a generous timeout.
ITEST_TIMEOUT ?= 30m

.PHONY: all build setup test unit integration integration-7.2 integration-10.0 demo vet fuzz bench bench-strategy clean

all: build

build:
	$(GO) build ./...
	$(GO) build -o bin/qmigrate ./cmd/qmigrate

setup:
	scripts/setup.sh

# The test command: installs what the tests need, then runs every test, with the
# integration suite on both QEMU versions (the second runs even when the first
# failed, so one run shows both; it fails if either did).
test: setup vet unit
	@rc=0; $(MAKE) --no-print-directory integration-7.2 || rc=1; \
	  $(MAKE) --no-print-directory integration-10.0 || rc=1; exit $$rc

vet:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt wants to rewrite: $$out"; exit 1; fi
	$(GO) vet ./...
	cd fleet/etcdlimit && $(GO) vet ./...

# Unit tests (fakes, no QEMU) with the race detector; fleet/etcdlimit is a
# module of its own, tested against a real etcd it starts (setup installs it).
unit:
	scripts/failures.sh $(GO) test -race -count=1 $$($(GO) list ./... | grep -v /integration)
	cd fleet/etcdlimit && $(GO) test -race -count=1 ./...

integration: integration-7.2 integration-10.0

integration-7.2: setup
	@echo "== integration suite on $$(grep '^QMIGRATE_QEMU=' $(CACHE)/qemu-7.2.env)"
	set -a; source $(CACHE)/qemu-7.2.env; set +a; \
	  scripts/failures.sh $(GO) test -v -race -count=1 -p 1 -timeout $(ITEST_TIMEOUT) ./integration/...

integration-10.0: setup
	@echo "== integration suite on $$(grep '^QMIGRATE_QEMU=' $(CACHE)/qemu-10.0.env)"
	set -a; source $(CACHE)/qemu-10.0.env; set +a; \
	  scripts/failures.sh $(GO) test -v -race -count=1 -p 1 -timeout $(ITEST_TIMEOUT) ./integration/...

# The demo: two local QEMUs, a small embedded guest, a live migration, a verified guest.
demo:
	@command -v qemu-system-x86_64 >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 qemu-utils; }
	$(GO) run ./cmd/qmigrate demo

# go test fuzzes one target per run: each for FUZZTIME.
FUZZTIME ?= 2m
fuzz:
	$(GO) test -run='^$$' -fuzz='^FuzzReader$$' -fuzztime=$(FUZZTIME) ./qmp/
	$(GO) test -run='^$$' -fuzz='^FuzzDecode$$' -fuzztime=$(FUZZTIME) ./qmp/
	$(GO) test -run='^$$' -fuzz='^FuzzInvariants$$' -fuzztime=$(FUZZTIME) ./strategy/

bench:
	set -a; source $(CACHE)/qemu-7.2.env; set +a; \
	  $(GO) test -run='^$$' -bench=. -benchtime=20x ./qmp/ ./integration/...

# Every switchover policy on the same scenarios over a tbf-shaped two-host
# link; rewrites docs/benchmarks.md (this QEMU version's section) and docs/plots.
bench-strategy: setup
	set -a; source $(CACHE)/qemu-$(or $(QEMU_VERSION),10.0).env; set +a; \
	  $(GO) run ./cmd/qmbench

clean:
	rm -rf bin

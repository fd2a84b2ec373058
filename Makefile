# ferry: the Makefile is the manual. `make help` lists the targets.
SHELL       := /bin/bash
GO          ?= go
BIN         := bin
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS     := -X main.version=$(VERSION)
# seccomp: libcontainer's seccomp support (cgo, libseccomp), for the containers' default profile.
TAGS        := seccomp
TOOLS       := /opt/ferry/bin
export PATH := $(TOOLS):$(PATH)
# Integration tests share the host's cgroups and mounts: one package at a time.
TESTFLAGS   ?=

.PHONY: help deps build generate test test-unit test-integration test-vm demo test-faults bench bench-vm fuzz fuzz-short lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

deps: ## install everything the build, demo and tests need (Debian + Go module proxy; idempotent)
	@bash scripts/deps.sh

build: ## build bin/ferryd and bin/ferryctl (and for the tests: bin/failpoints/ferryd, the benchmarks' static bin/hog)
	@mkdir -p $(BIN)/failpoints
	$(GO) build -tags "$(TAGS)" -ldflags "$(LDFLAGS)" -o $(BIN)/ferryd ./cmd/ferryd
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/ferryctl ./cmd/ferryctl
	$(GO) build -tags "$(TAGS) failpoints" -ldflags "$(LDFLAGS)" -o $(BIN)/failpoints/ferryd ./cmd/ferryd
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w" -o $(BIN)/hog ./integration/hog

generate: deps ## regenerate agent/api from ferry.proto with the pinned protoc plugins
	protoc -I agent/api --go_out=agent/api --go_opt=paths=source_relative \
		--go-grpc_out=agent/api --go-grpc_opt=paths=source_relative agent/api/ferry.proto

test: deps build test-unit fuzz-short test-integration test-vm ## everything CI runs: deps, unit tests, a short fuzz run, root integration tests, the VM tier

test-unit: ## unit tests (race detector on)
	$(GO) test -race -count=1 -tags "$(TAGS)" $(TESTFLAGS) $$($(GO) list ./... | grep -v /integration)

test-integration: build ## integration tests with real containers (root)
	FERRY_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 -p 1 -timeout 20m -v -skip '^TestVM' $(TESTFLAGS) ./integration/ 2>&1 | tee /tmp/ferry-integration.log | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic|\s+\S+_test.go)' ; test $${PIPESTATUS[0]} -eq 0

VM_FLAGS ?=
test-vm: deps build ## tests inside a Debian 6.1 VM under qemu (TCG): soft-dirty, cgroup v2; VM_FLAGS passes options to scripts/vm/run.sh
	@# One retry, and only when the guest never reported (a boot or emulation hang), never for a failed test.
	@bash scripts/vm/run.sh --bin $(CURDIR)/$(BIN) $(VM_FLAGS) 2>&1 | tee /tmp/ferry-vm.log; rc=$${PIPESTATUS[0]}; \
	if [ $$rc -ne 0 ] && grep -q "the VM did not report\|the VM did not finish\|timed out" /tmp/ferry-vm.log && ! grep -q -- "--- FAIL" /tmp/ferry-vm.log; then \
		echo "test-vm: the guest did not report; retrying once"; bash scripts/vm/run.sh --bin $(CURDIR)/$(BIN) $(VM_FLAGS); \
	else exit $$rc; fi

demo: deps build ## the main job: two hosts, a counting container with a TCP client, ferryd kill -9 and reattach, live migration A->B, clean up
	@bash scripts/demo.sh $(CURDIR)/$(BIN)

bench: deps build ## benchmarks: start/remove and migration downtime per mode against the runc CLI, total time on a shaped wire, RSS, harden latency, sysctl guard overhead, the page tunnel's throughput
	FERRY_BIN=$(CURDIR)/$(BIN) $(GO) test -run '^$$' -bench . -skip '^BenchmarkVM' -benchtime 1x -timeout 30m -v ./integration/
	$(GO) test -run '^$$' -bench HardenLatency -benchtime 1x -timeout 10m -v ./cgroup/
	$(GO) test -run '^$$' -bench GuardOverhead -benchtime 3x -timeout 10m -v ./sysctlguard/
	$(GO) test -run '^$$' -bench PageTunnel -benchtime 5x -timeout 10m -v ./agent/

test-faults: build ## the migration fault matrix alone (it also runs in make test): peers and sources killed, wires cut, CRIU failing, cancels, bad peer messages
	FERRY_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 -p 1 -timeout 20m -v -run '^TestMigrate(FailuresRollBack|FaultsMidTransfer|SourceKilled|SourceCleanupFails|SourceKilledDuringRestore|RestoreAnswerLost|FaultsAtTheFreeze|FaultsInTheHandshake|IntoScarceMemory|Cancel|PeerMessages|PostCopyNeedsPipes|BadInput)$$' ./integration/

bench-vm: deps build ## pre-copy against stop-and-copy downtime inside the VM (256 MiB, W = 0 and 16 MiB/s; slow: software emulation)
	bash scripts/vm/run.sh --bin $(CURDIR)/$(BIN) --timeout 5400 --test-pkg ./integration --run '^$$' --bench '^BenchmarkVMPreCopy$$' $(VM_FLAGS)

GOLANGCI    := github.com/golangci/golangci-lint/v2/cmd/golangci-lint@v2.15.0

FUZZTIME    ?= 2m
FUZZ_TARGETS := "FuzzParseSize ./cgroup" "FuzzParseCPU ./cgroup" "FuzzNormalize ./cgroup" \
	"FuzzValidate ./sysctlguard" "FuzzNormalizeSpec ./agent" "FuzzPeerSpec ./agent" "FuzzPageDirs ./agent" \
	"FuzzPartStream ./agent" "FuzzExtractTree ./migrate"
# fuzz-short counts executions instead of timing them: Go 1.26's fuzz
# coordinator can fail a target with a bare "context deadline exceeded" when
# a duration -fuzztime ends (golang/go#75804, fixed in Go 1.27); a count has
# no deadline to race.
fuzz-short: ## every fuzz target for 50000 executions, a few seconds each (part of make test; the seed corpora run with the unit tests)
	@$(MAKE) --no-print-directory fuzz FUZZTIME=50000x

fuzz: ## run every fuzz target for FUZZTIME each
	@set -e; for t in $(FUZZ_TARGETS); do \
		set -- $$t; echo "== $$1 ($$2, $(FUZZTIME))"; \
		TMPDIR=/dev/shm $(GO) test -run '^$$' -fuzz "^$$1$$" -fuzztime $(FUZZTIME) $$2; done

lint: ## gofmt, go vet and golangci-lint (errcheck, errorlint, gosec; installs the pinned version once)
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }
	$(GO) vet ./...
	@test -x $(TOOLS)/golangci-lint || { echo "lint: installing $(GOLANGCI) (about 2 minutes, once)"; GOBIN=$(TOOLS) $(GO) install $(GOLANGCI); }
	$(TOOLS)/golangci-lint run ./...

clean: ## remove build output
	rm -rf $(BIN)

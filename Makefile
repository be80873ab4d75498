# connectable: build, test and run. See README.md.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
GO      ?= go
BIN     := bin/connectable
LDFLAGS := -s -w -X main.version=$(VERSION)
# Arguments for `make run`, e.g. make run ARGS='--log-level debug'.
ARGS    ?=

.PHONY: build test setup lint generate run image local-image consul bench chaos multihost clean

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) .

# Every test. As root, scripts/setup.sh first installs what the machine lacks
# and builds the cached Consul (about 6 minutes cold), and a test whose
# prerequisite is still missing fails rather than skips
# (CONNECTABLE_TEST_STRICT=1, unless the caller set it). Without root, setup
# says in one line which tests skip, and the rest run.
# Packages run one at a time (-p 1): several of them act on the one Docker
# Engine and on iptables binaries, and the machine has two cores.
# The first run is in the daemon's default data path (auto: the eBPF socket
# path where it can serve, the relay beneath); the end-to-end suite then
# runs a second time with its daemons on the relay alone
# (CONNECTABLE_E2E_DATAPATH=relay), so that every case is proved in both.
TEST_STRICT = $${CONNECTABLE_TEST_STRICT-$$([ "$$(id -u)" = 0 ] && echo 1 || echo 0)}
test: build
	GO='$(GO)' scripts/setup.sh test
	$(GO) vet ./...
	CONNECTABLE_TEST_STRICT=$(TEST_STRICT) $(GO) test -race -p 1 -count=1 -timeout 30m ./...
	CONNECTABLE_TEST_STRICT=$(TEST_STRICT) CONNECTABLE_E2E_DATAPATH=relay $(GO) test -race -p 1 -count=1 -timeout 30m ./e2e/

# Only the installation and the Consul build that make test starts with.
setup:
	GO='$(GO)' scripts/setup.sh test

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change: $$out"; exit 1; fi
	$(GO) vet ./...
	cd tools && $(GO) build -o ../bin/staticcheck honnef.co/go/tools/cmd/staticcheck
	./bin/staticcheck ./...
	@# The socket path's compiled programs are committed: they must be what
	@# the C source builds to (clang and libbpf-dev: scripts/setup.sh test).
	$(MAKE) generate
	@git diff --quiet -- sockpath/kern_bpfel.o sockpath/kern_bpfel.go || { echo "sockpath: the committed eBPF objects differ from what go generate builds; commit them"; exit 1; }

# Rebuilds the socket path's eBPF objects from sockpath/bpf/sockpath.c.
generate:
	$(GO) generate ./sockpath

# Runs the daemon on this host against the local Docker Engine (needs root),
# after installing iptables where it is missing. With no ARGS it resolves
# through the system's resolvers (/etc/resolv.conf).
run: build
	scripts/setup.sh run
	./$(BIN) $(ARGS)

# The image, from the Dockerfile (needs a registry for its base images).
image:
	docker build --build-arg VERSION=$(VERSION) -t connectable:$(VERSION) -t connectable:latest .

# The same image without a registry: the static binary plus this host's iptables.
local-image: build
	scripts/local-image.sh connectable:local $(BIN)

# A real Consul agent for the end-to-end tests, built from the Go module proxy
# at a pinned version and kept outside the repository between runs: about 6
# minutes cold on a 2-core machine, 13 when it is busy. Two builds at once
# (two checkouts' make test) take turns on a lock, and the binary appears
# under its name only when complete, so a half-written one is never run.
CONSUL_BIN ?= /var/cache/connectable/consul-1.22.7
consul: $(CONSUL_BIN)
$(CONSUL_BIN):
	mkdir -p $(dir $(CONSUL_BIN))
	flock $(CONSUL_BIN).lock sh -c '[ -x $(CONSUL_BIN) ] || { \
		echo "building Consul into $(CONSUL_BIN): about 6 minutes cold, 13 on a busy machine"; \
		cd tools/consul && $(GO) build -o $(CONSUL_BIN).tmp github.com/hashicorp/consul && \
		mv $(CONSUL_BIN).tmp $(CONSUL_BIN); }'

# Fault injection against the real daemon and engine (1000 container
# start/stop cycles), then bounded fuzzing of labels, flags and DNS replies.
# Fuzz budgets are execution counts, not durations: with a duration, Go 1.26's
# fuzz coordinator can report "context deadline exceeded" as a failure when a
# loaded machine's worker is mid-call at the deadline (go.dev/issue/75804,
# fixed in Go 1.27). A count has no deadline to race; each budget takes 10-25 s
# on an idle 2-core machine.
FUZZ = $(GO) test -run '^$$' -fuzzminimizetime 200x -fuzz
chaos: build
	$(GO) test -race -count=1 -timeout 30m -run Chaos ./e2e/ -args -chaos.cycles=1000
	$(FUZZ) '^FuzzParseConfig$$' -fuzztime 250000x .
	$(FUZZ) '^FuzzParseRoutes$$' -fuzztime 350000x ./docker/
	$(FUZZ) '^FuzzSRVReply$$' -fuzztime 100000x ./resolver/

# The full fault table of the multi-host bed (e2e/multihost: three hosts in
# namespaces, each with its own engine, Consul server, registrar and
# connectable): each fault of issue 21 under load, in both data paths,
# printed as the table the README carries. About 10 minutes; needs root,
# dockerd and the cached Consul (make consul). make test runs only the
# core cases (TestMultihost).
multihost: build $(CONSUL_BIN)
	$(GO) test -v -count=1 -timeout 30m -run '^TestMultihostFaults$$' ./e2e/multihost/ -args -multihost.faults

# Benchmark against direct, HAProxy and nginx (needs root and Docker; see
# bench/README.md). make bench ARGS=--quick runs in under 2 minutes;
# ARGS=--install apt-gets the load tools and proxies first.
# Then the start-up cost of the OCI hook (issue 20): create → start of a
# container on a private engine with connectable's runtime registered,
# with and without the hook, labelled and not, median and p99.
HOOK_BENCHTIME ?= 40x
bench: build
	CGO_ENABLED=0 $(GO) build -o bin/bench ./bench
	./bin/bench --connectable $(BIN) $(ARGS)
	$(GO) test -count=1 -run '^$$' -bench BenchmarkHookStart -benchtime=$(HOOK_BENCHTIME) ./e2e/

clean:
	rm -rf bin

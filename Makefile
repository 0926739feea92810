# keyless: see README.md. Every target checks what it needs and says what is
# missing.

GO ?= go
export PATH := $(CURDIR)/bin:$(PATH)

.PHONY: all build test demo proto lint fuzz bench soak clean

all: build

## build: compile keyserver, edge and the demo origin into ./bin
build:
	$(GO) build -o bin/ ./cmd/...

## test: install or check dependencies, then run every check CI runs
test:
	scripts/test.sh

## demo: a keyserver on a fresh SoftHSM token, an edge and a demo origin
demo:
	scripts/demo.sh

## proto: regenerate the Go code in proto/ with the pinned tools
proto:
	scripts/tools.sh
	buf lint
	buf generate

## fuzz: run each fuzz target for FUZZTIME (default 10m); not part of CI
FUZZTIME ?= 10m
fuzz:
	scripts/fuzz.sh $(FUZZTIME)

## bench: every scenario in one run of ~7 minutes: key operations and
## handshakes against in-process keys, resumption, the link through a delay
## relay at RTT 0, 20, 80 and 300 ms (W1-W3), edge memory, 1,000 links on one
## keyserver (W4); table on stdout, JSON in BENCH_OUT (default
## bench-results.json); see
## BENCHMARKS.md. BENCH_FLAGS adds flags of "keyless-bench run", e.g.
## BENCH_FLAGS='-scenarios link -link-duration 1s' for the link only.
BENCH_OUT ?= bench-results.json
BENCH_FLAGS ?=
bench:
	scripts/deps.sh demo
	$(GO) build -o bin/ ./cmd/keyserver ./cmd/edge ./cmd/keyless-bench
	bin/keyless-bench run -bin bin -out $(BENCH_OUT) $(BENCH_FLAGS)

## soak: SOAKTIME (default 10m) of mixed handshakes through an edge and two
## keyservers, with a keyserver killed and an HSM fault in the middle; reports
## failures and memory growth to soak-report.txt. Not part of CI; see
## docs/RESILIENCE.md.
SOAKTIME ?= 10m
soak:
	scripts/deps.sh demo
	KEYLESS_SOAK=$(SOAKTIME) KEYLESS_SOAK_REPORT=$(CURDIR)/soak-report.txt \
		$(GO) test -count=1 -run '^TestSoak$$' -timeout 2h -v ./e2e/

clean:
	rm -rf bin .demo bench-results.json soak-report.txt

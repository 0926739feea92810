# keyless: see README.md. Every target checks what it needs and says what is
# missing.

GO ?= go
export PATH := $(CURDIR)/bin:$(PATH)

.PHONY: all build test demo proto lint fuzz clean

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

clean:
	rm -rf bin .demo bench-results.json

#!/usr/bin/env bash
# test.sh is `make test`: it checks (or, as root, installs) what the tests
# need, then runs every check CI runs: buf lint, generated code up to date,
# go vet, and the whole test suite under the race detector, including the
# SoftHSM integration, end-to-end and interoperability tests.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh tests

# Building buf takes minutes; do it while the tests run.
mkdir -p bin
scripts/tools.sh > bin/tools.log 2>&1 &
tools_pid=$!

echo "== go vet"
go vet ./...

echo "== go test -race"
go test -race -count=1 -timeout 15m ./...

echo "== proto: buf lint, regenerate, no diff"
if ! wait "$tools_pid"; then
  cat bin/tools.log >&2
  echo "test: installing the protobuf tools failed" >&2
  exit 1
fi
PATH="$PWD/bin:$PATH" buf lint
PATH="$PWD/bin:$PATH" buf generate
if ! git diff --exit-code -- proto/; then
  echo "test: generated code in proto/ is stale: run make proto and commit" >&2
  exit 1
fi
echo "== all checks passed"

#!/usr/bin/env bash
# test.sh is `make test`: it checks (or, as root, installs) what the tests
# need, then runs every check CI runs: go vet, the whole test suite under the
# race detector (including the SoftHSM integration, end-to-end and
# interoperability tests), the alerting rules with promtool, staticcheck,
# buf lint, and generated code up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh tests

# Building buf and staticcheck takes minutes; do it while the tests run.
mkdir -p bin
scripts/tools.sh > bin/tools.log 2>&1 &
tools_pid=$!

echo "== promtool: alerting rules (deploy/prometheus)"
promtool check rules deploy/prometheus/keyless-rules.yml
promtool test rules deploy/prometheus/keyless-rules.test.yml

echo "== go vet"
go vet ./...

echo "== go test -race"
go test -race -count=1 -timeout 15m ./...

if ! wait "$tools_pid"; then
  cat bin/tools.log >&2
  echo "test: installing the pinned tools (scripts/tools.sh) failed" >&2
  exit 1
fi

echo "== staticcheck"
bin/staticcheck ./...

echo "== proto: buf lint, regenerate, no diff"
PATH="$PWD/bin:$PATH" buf lint
PATH="$PWD/bin:$PATH" buf generate
if ! git diff --exit-code -- proto/; then
  echo "test: generated code in proto/ is stale: run make proto and commit" >&2
  exit 1
fi
echo "== all checks passed"

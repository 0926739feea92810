#!/usr/bin/env bash
# fuzz.sh runs every fuzz target for the given time each (default 10m). Not
# part of CI. -timeout=0, so that go test's default 10-minute test timeout
# cannot cut a 10-minute fuzz run short. Inputs that make a target
# fail are written by `go test` under <package>/testdata/fuzz/<Target>/;
# commit them as regression seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
t=${1:-10m}
for pkg in $(go list ./...); do
  dir=$(go list -f '{{.Dir}}' "$pkg")
  for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //'); do
    echo "== $pkg $target ($t)"
    go test -run='^$' -fuzz="^$target\$" -fuzztime="$t" -timeout=0 "$pkg"
  done
done

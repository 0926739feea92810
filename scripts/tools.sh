#!/usr/bin/env bash
# tools.sh installs the pinned tools into ./bin (GOBIN): the code generators,
# so that `make proto` produces the same output everywhere, and staticcheck
# for `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
export GOBIN="$PWD/bin"
BUF_VERSION=v1.75.0
PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_GEN_GO_GRPC_VERSION=v1.6.0
STATICCHECK_VERSION=v0.8.2

have() { [ -x "bin/$1" ] && grep -qx "$2" "bin/.$1.version" 2>/dev/null; }
install() { # name, package, version
  if ! have "$1" "$3"; then
    echo "tools: installing $1 $3 (buf takes a few minutes to build)" >&2
    go install "$2@$3"
    echo "$3" > "bin/.$1.version"
  fi
}
mkdir -p bin
install protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go "$PROTOC_GEN_GO_VERSION"
install protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc "$PROTOC_GEN_GO_GRPC_VERSION"
install buf github.com/bufbuild/buf/cmd/buf "$BUF_VERSION"
install staticcheck honnef.co/go/tools/cmd/staticcheck "$STATICCHECK_VERSION"

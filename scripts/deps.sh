#!/usr/bin/env bash
# deps.sh checks for the programs that the tests and the demo need and, when
# run as root on a Debian-like system, installs the missing ones with apt-get.
# Otherwise it names what is missing and how to install it, and fails.
#
# Usage: scripts/deps.sh [tests|demo]
set -euo pipefail

want=${1:-tests}

# program -> Debian package
declare -A pkg=(
  [softhsm2-util]=softhsm2
  [pkcs11-tool]=opensc
  [p11-kit]=p11-kit
  [openssl]=openssl
  [curl]=curl
  [gcc]=gcc
  [make]=make
)
if [ "$want" = tests ]; then
  pkg[nghttp]=nghttp2-client
  pkg[haproxy]=haproxy # a real PROXY protocol sender in front of the edge
  # promtool checks and unit-tests deploy/prometheus/keyless-rules.yml.
  pkg[promtool]=prometheus
fi

missing=()
for prog in "${!pkg[@]}"; do
  command -v "$prog" >/dev/null 2>&1 || missing+=("${pkg[$prog]}")
done
module_ok() {
  for m in "${KEYLESS_SOFTHSM_MODULE:-}" /usr/lib/softhsm/libsofthsm2.so \
    /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so; do
    [ -n "$m" ] && [ -f "$m" ] && return 0
  done
  return 1
}
module_ok || missing+=(softhsm2)
# p11-kit's client module: the keyserver reaches a token through p11-kit
# remoting in the tests, as through a network HSM's client library.
p11kit_client_ok() {
  for m in "${KEYLESS_P11KIT_CLIENT:-}" /usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so \
    /usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so /usr/lib64/pkcs11/p11-kit-client.so /usr/lib/pkcs11/p11-kit-client.so; do
    [ -n "$m" ] && [ -f "$m" ] && return 0
  done
  return 1
}
if [ "$want" = tests ]; then
  p11kit_client_ok || missing+=(p11-kit-modules)
fi
# openCryptoki's software token, a second PKCS #11 implementation for the
# tests (they need root to use it, and skip without).
if [ "$want" = tests ] && [ "$(id -u)" = 0 ] && ! [ -x /usr/sbin/pkcsslotd ]; then
  missing+=(opencryptoki)
fi

if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "deps: missing Debian packages: ${missing[*]}" >&2
    echo "deps: install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

if ! command -v go >/dev/null 2>&1; then
  echo "deps: the Go toolchain (1.26 or newer) is missing; put it on PATH (e.g. /usr/local/go/bin)" >&2
  exit 1
fi

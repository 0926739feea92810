#!/usr/bin/env bash
# demo.sh is `make demo`: the whole keyless chain on one machine.
#
# It makes a fresh SoftHSM token with an RSA-2048 and an ECDSA P-256 key in
# it, a demo web CA with certificates for rsa.localhost and ecdsa.localhost
# (signed over CSRs that the token's keys signed, valid for a year) and an
# OCSP response for each, which the edge staples, the mutual-TLS PKI of the
# edge-keyserver link, a keyserver policy that lets the demo edge use the two
# keys (and nothing else), and then runs a keyserver, an edge and a small origin
# in the foreground until interrupted, when it stops all three.
#
# Environment:
#   KEYLESS_DEMO_ADDR            the edge's address (default 127.0.0.1:8443)
#   KEYLESS_DEMO_DIR             token, PKI, PIN files and logs (default ./.demo)
#   KEYLESS_DEMO_KEYSERVER_ADDR  the keyserver's address (default 127.0.0.1:7443)
#   KEYLESS_DEMO_ORIGIN_ADDR     the origin's address (default 127.0.0.1:8080)
set -euo pipefail
cd "$(dirname "$0")/.."

addr=${KEYLESS_DEMO_ADDR:-127.0.0.1:8443}
ks_addr=${KEYLESS_DEMO_KEYSERVER_ADDR:-127.0.0.1:7443}
origin_addr=${KEYLESS_DEMO_ORIGIN_ADDR:-127.0.0.1:8080}
dir=${KEYLESS_DEMO_DIR:-$PWD/.demo}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
port=${addr##*:}

say() { printf 'demo: %s\n' "$*" >&2; }

scripts/deps.sh demo

say "building into $dir/bin"
go build -o "$dir/bin/" ./cmd/keyserver ./cmd/edge ./cmd/demo-origin
bin=$dir/bin

# A fresh token every run. SoftHSM reads its configuration from SOFTHSM2_CONF.
rm -rf "$dir/tokens" "$dir/pki" "$dir/logs"
mkdir -p "$dir/tokens" "$dir/pki" "$dir/logs"
cat > "$dir/softhsm2.conf" <<CONF
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
CONF
export SOFTHSM2_CONF=$dir/softhsm2.conf

# PINs live in files readable by their owner only; they never appear in argv.
(
  umask 077
  openssl rand -hex 16 > "$dir/pin"
  openssl rand -hex 16 > "$dir/so-pin"
)
token=(-token-label keyless-demo -pin-file "$dir/pin")

say "creating SoftHSM token keyless-demo and its keys"
"$bin/keyserver" token init -label keyless-demo -pin-file "$dir/pin" -so-pin-file "$dir/so-pin"
"$bin/keyserver" keys generate "${token[@]}" -type rsa -bits 2048 -label rsa.localhost > /dev/null
"$bin/keyserver" keys generate "${token[@]}" -type ecdsa -curve P-256 -label ecdsa.localhost > /dev/null
"$bin/keyserver" keys list "${token[@]}" > "$dir/keys.txt"

pki=$dir/pki
ossl() { openssl "$@" 2> "$dir/logs/openssl.log" || { cat "$dir/logs/openssl.log" >&2; exit 1; }; }
ca() { # name, subject: a CA key and self-signed certificate
  ossl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=$2" -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$pki/$1.key" -out "$pki/$1.pem"
  chmod 600 "$pki/$1.key"
}
issue() { # ca, csr, out, extensions: sign a CSR (a year: testssl.sh flags under 90 days)
  printf '%s\n' "$4" > "$pki/ext.cnf"
  ossl x509 -req -in "$2" -CA "$pki/$1.pem" -CAkey "$pki/$1.key" -CAcreateserial -days 365 \
    -extfile "$pki/ext.cnf" -out "$3"
}

say "issuing the demo web certificates over CSRs signed inside the token"
ca web-ca "keyless demo web CA"
mkdir -p "$dir/certs"
for name in rsa.localhost ecdsa.localhost; do
  "$bin/keyserver" keys csr "${token[@]}" -key "$name" -dns "$name" -out "$pki/$name.csr"
  issue web-ca "$pki/$name.csr" "$pki/$name.leaf.pem" \
    "subjectAltName=DNS:$name
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth"
  # The issuer after the leaf: the edge verifies OCSP responses with it.
  cat "$pki/$name.leaf.pem" "$pki/web-ca.pem" > "$dir/certs/$name.pem"
done
cp "$pki/web-ca.pem" "$dir/ca.pem"

# The web CA's OCSP responder is openssl ocsp over its index: run once per
# certificate, it writes NAME.ocsp beside NAME.pem, which the edge verifies
# and staples (a response file, as a cron job fetching them would leave).
say "writing the OCSP responses of the demo web certificates"
: > "$pki/index.txt"
for name in rsa.localhost ecdsa.localhost; do
  leaf=$pki/$name.leaf.pem
  serial=$(openssl x509 -noout -serial -in "$leaf"); serial=${serial#serial=}
  end=$(openssl x509 -noout -enddate -in "$leaf"); end=$(date -u -d "${end#notAfter=}" +%y%m%d%H%M%SZ)
  printf 'V\t%s\t\t%s\tunknown\t/CN=%s\n' "$end" "$serial" "$name" >> "$pki/index.txt"
done
for name in rsa.localhost ecdsa.localhost; do
  ossl ocsp -issuer "$pki/web-ca.pem" -cert "$pki/$name.leaf.pem" -no_nonce -reqout "$pki/$name.ocsp-req"
  ossl ocsp -index "$pki/index.txt" -CA "$pki/web-ca.pem" -rsigner "$pki/web-ca.pem" -rkey "$pki/web-ca.key" \
    -ndays 7 -reqin "$pki/$name.ocsp-req" -respout "$dir/certs/$name.ocsp"
done

say "issuing the mutual-TLS certificates of the edge-keyserver link"
ca link-ca "keyless demo link CA"
for who in keyserver edge; do
  ossl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$who.keyless.internal" \
    -keyout "$pki/$who.key" -out "$pki/$who.csr"
  chmod 600 "$pki/$who.key"
done
issue link-ca "$pki/keyserver.csr" "$pki/keyserver.pem" \
  "subjectAltName=DNS:keyserver.keyless.internal,DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
issue link-ca "$pki/edge.csr" "$pki/edge.pem" \
  "subjectAltName=DNS:edge.keyless.internal,URI:spiffe://keyless.internal/edge/demo
extendedKeyUsage=clientAuth"

say "writing the keyserver's policy: the demo edge may use the demo keys, nothing else"
cat > "$dir/policy.yaml" <<'POLICY'
# Who may use which keys for what. Anything not allowed here is denied.
# The demo edge is identified by the URI name (SPIFFE id) of its mTLS
# certificate.
rules:
  - name: demo-sign
    identities: [spiffe://keyless.internal/edge/demo]
    keys: [label:rsa.localhost, label:ecdsa.localhost]
    operations: [sign]
    schemes: [default]          # every TLS 1.2/1.3 scheme but SHA-1
  - name: demo-rsa-key-exchange
    identities: [spiffe://keyless.internal/edge/demo]
    keys: [cert:rsa.localhost]  # the key of the certificate for rsa.localhost (see -certs)
    operations: [decrypt]       # TLS 1.2 RSA key exchange
  - name: demo-tickets          # session ticket keys shared by this group's edges
    identities: [spiffe://keyless.internal/edge/demo]
    operations: [tickets]
quotas:
  - name: demo-edge
    identities: [spiffe://keyless.internal/edge/demo]
    max_inflight: 64
POLICY

# The secret every keyserver derives the edges' session ticket keys from.
(umask 077; openssl rand -hex 32 > "$dir/ticket-secret")

pids=()
stop() {
  trap - INT TERM EXIT
  say "stopping"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  say "stopped; logs are in $dir/logs"
}
# Ctrl-C (SIGINT to the terminal's process group) or SIGTERM: stop everything
# and end with success. The programs run in sessions of their own, so that
# they do not get the terminal's SIGINT and exit before the script notices:
# the script stops them itself.
interrupted=
trap stop EXIT
trap 'interrupted=1; exit 0' INT TERM

wait_for() { # name, log file, pattern
  for _ in $(seq 1 100); do
    grep -q "$3" "$2" 2>/dev/null && return 0
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null || { say "$1 exited:"; tail -20 "$2" >&2; exit 1; }
    done
    sleep 0.1
  done
  say "$1 did not start in 10 s:"; tail -20 "$2" >&2; exit 1
}

setsid "$bin/keyserver" serve "${token[@]}" -listen "$ks_addr" \
  -tls-cert "$pki/keyserver.pem" -tls-key "$pki/keyserver.key" -client-ca "$pki/link-ca.pem" \
  -policy "$dir/policy.yaml" -certs "$dir/certs" -audit-log "$dir/logs/audit.log" \
  -ticket-secret-file "$dir/ticket-secret" \
  > "$dir/logs/keyserver.log" 2>&1 &
pids+=($!)
wait_for keyserver "$dir/logs/keyserver.log" "keyserver ready"

setsid "$bin/demo-origin" -listen "$origin_addr" > "$dir/logs/origin.log" 2>&1 &
pids+=($!)
wait_for origin "$dir/logs/origin.log" "listening"

setsid "$bin/edge" -listen "$addr" -origin "http://$origin_addr" -certs "$dir/certs" \
  -default-cert ecdsa.localhost -rsa-key-exchange rsa.localhost \
  -keyserver "$ks_addr" -keyserver-name keyserver.keyless.internal -keyserver-ca "$pki/link-ca.pem" \
  -tls-cert "$pki/edge.pem" -tls-key "$pki/edge.key" -access-log "$dir/logs/access.log" \
  > "$dir/logs/edge.log" 2>&1 &
pids+=($!)
wait_for edge "$dir/logs/edge.log" "edge ready"

cat >&2 <<TXT

keyless demo is running: edge on $addr, keyserver on $ks_addr (SoftHSM token
keyless-demo), origin on $origin_addr. Keys in the token:
$(cat "$dir/keys.txt")

Try:
  curl --cacert $dir/ca.pem --resolve rsa.localhost:$port:${addr%:*} https://rsa.localhost:$port/
  curl --cacert $dir/ca.pem --resolve ecdsa.localhost:$port:${addr%:*} https://ecdsa.localhost:$port/
  curl --cacert $dir/ca.pem --resolve rsa.localhost:$port:${addr%:*} --tlsv1.2 --tls-max 1.2 \\
       --ciphers AES128-GCM-SHA256 https://rsa.localhost:$port/     # TLS 1.2 RSA key exchange
  openssl s_client -connect $addr -servername ecdsa.localhost -CAfile $dir/ca.pem -status   # OCSP stapled

Policy: $dir/policy.yaml (kill -HUP the keyserver to reload it).
Audit trail: $dir/logs/audit.log. Access log: $dir/logs/access.log.
Logs: $dir/logs. Press Ctrl-C to stop.
TXT

# Run until interrupted or until one of the processes exits.
wait -n "${pids[@]}" || true
[ -n "$interrupted" ] && exit 0
say "a demo process exited unexpectedly; see $dir/logs"
exit 1

#!/usr/bin/env bash
# bench-link.sh measures key operations on one link through a delaying
# relay: RTT 0 and RTT (default 80ms), with the 64 KiB windows the link
# used to fix and with the default window, ECDSA P-256 and RSA-2048 PSS
# sign, at concurrency 1, 64 and 1024. Same binaries, windows chosen by
# -link-window; every run goes through the relay (-link-relay), so RTT 0
# and RTT differ only in the delay. Prints, per window, operation and
# concurrency, the rates and p50s and the ratio rate(RTT)/rate(0).
# Usage: scripts/bench-link.sh [RTT] [DURATION]   (about 4 minutes)
# REPEAT=N runs each figure N times and keeps the median (keyless-bench -repeat).
set -euo pipefail
cd "$(dirname "$0")/.."
rtt=${1:-80ms}
dur=${2:-2s}
repeat=${REPEAT:-1}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
go build -o "$out/bin/" ./cmd/keyserver ./cmd/edge ./cmd/keyless-bench
for window in 65536 0; do
  for r in 0 "$rtt"; do
    echo "== window ${window/#0/default} RTT $r" >&2
    "$out/bin/keyless-bench" run -bin "$out/bin" -out "$out/w$window-r$r.json" -scenarios keyops/ecdsa,keyops/rsa2048-pss \
      -keyops-concurrency 1,64,1024 -warmup 500ms -duration "$dur" -repeat "$repeat" -link-relay -link-rtt "$r" -link-window "$window" >/dev/null
  done
done
printf '%-8s %-16s %5s %10s %10s %7s %12s %12s\n' window op c "RTT0/s" "RTT$rtt/s" ratio "p50 RTT0 ms" "p50 RTT$rtt ms"
for window in 65536 0; do
  jq -r --arg w "$window" --slurpfile far "$out/w$window-r$rtt.json" '
    .[] | select(.kind == "keyops" and (.name | endswith("/best") | not)) as $z
    | ($far[0][] | select(.name == $z.name)) as $f
    | [(if $w == "0" then "default" else "64KiB" end), ($z.name | split("/")[1]), $z.concurrency,
       $z.ops_per_sec, $f.ops_per_sec, (if $z.ops_per_sec > 0 then ($f.ops_per_sec / $z.ops_per_sec * 100 | round / 100) else "-" end),
       ($z.p50_us / 1000 * 10 | round / 10), ($f.p50_us / 1000 * 10 | round / 10)] | @tsv' "$out/w$window-r0.json" |
    awk -F'\t' '{printf "%-8s %-16s %5s %10s %10s %7s %12s %12s\n", $1, $2, $3, $4, $5, $6, $7, $8}'
done

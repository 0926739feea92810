#!/usr/bin/env bash
# bench-link.sh measures key operations on one link through a delaying
# relay: RTT 0 and RTT (default 80ms), with the 64 KiB windows the link
# used to fix and with the default window, ECDSA P-256 and RSA-2048 PSS
# sign, at concurrency 1, 64 and 1024. Same binaries, windows chosen by
# -link-window; each window is one keyless-bench run of the link key
# operation scenarios, whose relay changes its RTT between runs, so RTT 0
# and RTT differ only in the delay. Prints, per window, operation and
# concurrency, the rates, the p50s, the ratio rate(RTT)/rate(0) and the
# HTTP/2 frames per operation each way at RTT.
# Usage: scripts/bench-link.sh [RTT] [DURATION]   (about 2 minutes)
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
  echo "== window ${window/#0/default}, RTT 0 and $rtt" >&2
  "$out/bin/keyless-bench" run -bin "$out/bin" -out "$out/w$window.json" -scenarios link/keyops \
    -link-rtts "0,$rtt" -link-far-rtts "" -link-concurrency 1,64,1024 -link-warmup 500ms -link-duration "$dur" \
    -repeat "$repeat" -link-window "$window" >/dev/null
done
far=$(jq -r '[.[] | select(.kind == "link-keyops") | .rtt_ms] | max' "$out/w0.json")
printf '%-8s %-16s %5s %10s %10s %7s %12s %12s  %s\n' window op c "RTT0/s" "RTT$rtt/s" ratio "p50 RTT0 ms" "p50 RTT$rtt ms" "frames/op at RTT$rtt out in (DATA HDR PING WU)"
for window in 65536 0; do
  jq -r --arg w "$window" --argjson far "$far" '
    def f(d): [("DATA", "HEADERS", "PING", "WINDOW_UPDATE") as $t | (.frames_per_op[d + " " + $t] // 0)] | map(tostring) | join(" ");
    [.[] | select(.kind == "link-keyops")] as $rows
    | $rows[] | select(.rtt_ms == 0) as $z
    | ($rows[] | select(.rtt_ms == $far and .concurrency == $z.concurrency and (.name | split("/")[2]) == ($z.name | split("/")[2]))) as $f
    | [(if $w == "0" then "default" else "64KiB" end), ($z.name | split("/")[2]), $z.concurrency,
       $z.ops_per_sec, $f.ops_per_sec, (if $z.ops_per_sec > 0 then ($f.ops_per_sec / $z.ops_per_sec * 100 | round / 100) else "-" end),
       ($z.p50_us / 1000 * 10 | round / 10), ($f.p50_us / 1000 * 10 | round / 10), ($f | f("out")) + " | " + ($f | f("in"))] | @tsv' "$out/w$window.json" |
    awk -F'\t' '{printf "%-8s %-16s %5s %10s %10s %7s %12s %12s  %s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9}'
done

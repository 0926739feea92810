// Package bench is keyless's benchmark harness: it measures key operations
// and TLS handshakes through the keyserver and the edge against the same
// SoftHSM key used in-process, and checks the performance targets listed
// in BENCHMARKS.md. The command cmd/keyless-bench is a thin main over
// [Main]; BENCHMARKS.md describes the method and the latest results.
//
// # Processes
//
// Every role runs in its own process, so that client and server costs are
// not mixed in one Go runtime: the orchestrator ("run") builds and starts
// the real keyserver and edge binaries, and starts this same binary in
// other modes for the load generators ("keyops", "loadgen", "hold"), the
// baselines ("inproc", "tls-server") and the edge memory probe
// ("edgemem"). Children report a [Result] (or a [MemSnapshot]) as one JSON
// line on standard output. Everything listens on 127.0.0.1, every load runs
// for a fixed time, and every child is killed if the orchestrator dies.
//
// # Measurement
//
// Loads are closed loops ([Load]): a fixed number of workers each start
// their next operation when the previous one ends. Only operations that
// end inside the measurement window, after a warm-up, are counted; the
// rate is their number divided by the window, and the latencies are
// nearest-rank percentiles ([Percentile]) of the successful ones.
//
// The package is internal: only cmd/keyless-bench imports it. It imports
// hsm for the in-process baselines; `go test ./...` runs only its unit
// tests, which need no SoftHSM.
package bench

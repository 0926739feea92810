// Package bench is keyless's benchmark harness: it measures key operations
// and TLS handshakes through the keyserver and the edge against the same
// SoftHSM key used in-process, and the link to a distant keyserver through
// a delaying relay ([Relay]) at several round-trip times, and checks the
// performance targets listed in BENCHMARKS.md (rows of kind "target"). The
// command cmd/keyless-bench is a thin main over [Main]; BENCHMARKS.md
// describes the method and the latest results.
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
// # The link
//
// The link scenarios put one relay between the keyserver and an edge of
// their own (and, for key operations, a client), and change its RTT
// between runs ([Relay.SetRTT]), so every distance is measured through the
// same processes and the same keyserver connection. Around each run the
// orchestrator reads the edge's and the keyserver's metrics (refusals,
// failed calls, call and operation times, the HSM queue), which say where
// a handshake's time went; the key-operation client counts its HTTP/2
// frames per operation.
//
// The package is internal: only cmd/keyless-bench imports it. It imports
// hsm for the in-process baselines; `go test ./...` runs only its unit
// tests, which need no SoftHSM.
package bench

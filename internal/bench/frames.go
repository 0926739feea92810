package bench

import (
	"github.com/keyless-tls/keyless/internal/h2frames"
	"golang.org/x/net/http2"
)

// frameSnapshot is a connection's frame counts at one moment, keyed "out
// DATA", "in PING" and so on.
type frameSnapshot map[string]int64

// framesNow returns c's counts now, "out" for frames written.
func framesNow(c *h2frames.Counts) frameSnapshot {
	read, written := c.Snapshot()
	s := frameSnapshot{}
	for ft, n := range written {
		s["out "+ft.String()] = n
	}
	for ft, n := range read {
		s["in "+ft.String()] = n
	}
	return s
}

// perOp returns the frames of each key between snapshots a and b divided
// by ops, rounded to 0.01; the types the scenarios look at (DATA, HEADERS,
// PING, WINDOW_UPDATE, each way) are present even when none was sent. It
// returns nil when ops is not positive.
func perOp(a, b frameSnapshot, ops int64) map[string]float64 {
	if ops <= 0 {
		return nil
	}
	out := map[string]float64{}
	for _, dir := range []string{"out ", "in "} {
		for _, ft := range []http2.FrameType{http2.FrameData, http2.FrameHeaders, http2.FramePing, http2.FrameWindowUpdate} {
			out[dir+ft.String()] = 0
		}
	}
	for k, n := range b {
		if d := n - a[k]; d > 0 {
			out[k] = float64(int64(float64(d)/float64(ops)*100+0.5)) / 100
		}
	}
	return out
}

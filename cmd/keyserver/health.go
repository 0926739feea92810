package main

import (
	"context"
	"time"

	"github.com/keyless-tls/keyless/signer"
)

// watchHealth checks keys every interval, and at once whenever changed's
// channel closes (hsm.Module.Changed: the module became faulty or has
// reconnected), and reports each result, until ctx ends. Following the
// module rather than only polling it is what puts the keyserver back in
// service within a fraction of a second of the token's return (and out of
// it as soon as an operation meets a fault), whatever the interval. A
// store that is not a signer.Checker is reported healthy once.
func watchHealth(ctx context.Context, keys signer.KeyStore, changed func() <-chan struct{}, interval time.Duration, report func(error)) {
	if interval <= 0 {
		interval = signer.DefaultHealthInterval
	}
	c, ok := keys.(signer.Checker)
	if !ok {
		report(nil)
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		// Taken before the check, so that a change during the check is
		// not missed.
		ch := changed()
		cctx, cancel := context.WithTimeout(ctx, interval)
		err := c.Check(cctx)
		cancel()
		report(err)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-ch:
		}
	}
}

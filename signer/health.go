package signer

import (
	"context"
	"time"

	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// DefaultHealthInterval is how often [WatchHealth] checks the key store
// when it is given no interval.
const DefaultHealthInterval = 2 * time.Second

// WatchHealth sets the serving status of the KeylessService (and of the
// server as a whole, the "" service) in hs from the key store's [Checker],
// every interval until ctx is done. A store that is not a Checker is always
// SERVING. An interval of zero or less means DefaultHealthInterval.
func WatchHealth(ctx context.Context, keys KeyStore, hs *health.Server, interval time.Duration) {
	WatchHealthFunc(ctx, keys, interval, func(err error) { SetHealth(hs, err) })
}

// WatchHealthFunc checks the key store's [Checker] every interval until
// ctx is done and calls report with each result (nil for a store that is
// not a Checker, once). An interval of zero or less means
// DefaultHealthInterval. [WatchHealth] is WatchHealthFunc setting a gRPC
// health server.
func WatchHealthFunc(ctx context.Context, keys KeyStore, interval time.Duration, report func(error)) {
	WatchHealthChanges(ctx, keys, nil, interval, report)
}

// WatchHealthChanges is [WatchHealthFunc] that also checks at once
// whenever the channel changed returns closes (taken anew before each
// check, so that a change during a check is not missed), as
// hsm.Module.Changed's does when the module becomes faulty or has
// reconnected. Following the store rather than only polling it puts a
// keyserver back in service within a fraction of a second of its token's
// return, and out of it as soon as an operation meets a fault, whatever the
// interval. A nil changed polls only.
func WatchHealthChanges(ctx context.Context, keys KeyStore, changed func() <-chan struct{}, interval time.Duration, report func(error)) {
	if interval <= 0 {
		interval = DefaultHealthInterval
	}
	c, ok := keys.(Checker)
	if !ok {
		report(nil)
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		var ch <-chan struct{} // nil: never ready
		if changed != nil {
			ch = changed()
		}
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

// SetHealth sets the serving status of the KeylessService (and of the
// server as a whole, the "" service) in hs: SERVING for a nil err (a
// successful health check), NOT_SERVING otherwise.
func SetHealth(hs *health.Server, err error) {
	st := healthpb.HealthCheckResponse_SERVING
	if err != nil {
		st = healthpb.HealthCheckResponse_NOT_SERVING
	}
	hs.SetServingStatus("", st)
	hs.SetServingStatus(keylessv1.KeylessService_ServiceDesc.ServiceName, st)
}

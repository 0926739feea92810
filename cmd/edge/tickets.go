package main

import (
	"context"
	"crypto/tls"

	"github.com/hashicorp/go-hclog"

	"github.com/keyless-tls/keyless/tlscore"
)

// ticketKeySource says where the edge's session ticket keys come from,
// for the startup line, and stops their fetcher.
type ticketKeySource struct {
	source string // "file", "keyserver" or "own"
	stop   func()
}

// startTicketFetcher starts fetching the session ticket keys from the
// keyservers, unless -ticket-keys names a file or
// -ticket-keys-from-keyserver is false. It asks once before the edge
// listens, so that its first tickets already open on every edge of its
// group; if that fails (no tickets rule for this edge, no ticket secret
// on the keyserver), the edge starts with its own keys and the fetcher
// keeps asking.
func startTicketFetcher(ctx context.Context, f *flags, client *tlscore.Client, tlsConfig *tls.Config, logger hclog.Logger) (*ticketKeySource, error) {
	switch {
	case f.ticketKeys != "":
		return &ticketKeySource{source: "file", stop: func() {}}, nil
	case !f.ticketKeysFromKeyserver:
		return &ticketKeySource{source: "own", stop: func() {}}, nil
	}
	logger = logger.Named("tickets")
	fetcher, err := tlscore.NewTicketFetcher(tlscore.TicketFetcherConfig{Source: client, Target: tlsConfig, Logger: logger})
	if err != nil {
		return nil, err
	}
	if err := fetcher.Fetch(ctx); err != nil {
		logger.Info("session ticket keys not from the keyserver for now: the edge's own keys are used until it grants them", "error", err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		fetcher.Run(runCtx)
	}()
	return &ticketKeySource{source: "keyserver", stop: func() { cancel(); <-done }}, nil
}

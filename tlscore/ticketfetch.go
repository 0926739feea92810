package tlscore

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// TicketKeys asks a keyserver for the session ticket keys of this edge's
// ticket group (KeylessService.GetTicketKeys). Errors wrap the gRPC
// status: PermissionDenied when the keyserver's policy gives this edge no
// tickets rule, Unavailable when no keyserver answered or the keyserver
// has no ticket secret. Neither the answer nor an error is logged here.
func (c *Client) TicketKeys(ctx context.Context) (*keylessv1.GetTicketKeysResponse, error) {
	ctx, cancel := c.callContext(ctx)
	defer cancel()
	resp, err := c.api.GetTicketKeys(ctx, &keylessv1.GetTicketKeysRequest{})
	if err != nil {
		return nil, fmt.Errorf("tlscore: get session ticket keys: %w", c.handshakes.explain(err))
	}
	return resp, nil
}

// TicketKeySource answers GetTicketKeys; [*Client] is one.
type TicketKeySource interface {
	TicketKeys(ctx context.Context) (*keylessv1.GetTicketKeysResponse, error)
}

// TicketKeyTarget takes session ticket keys, the first sealing new
// tickets; [*tls.Config] is one.
type TicketKeyTarget interface {
	SetSessionTicketKeys(keys [][32]byte)
}

// TicketFetcherConfig configures a [TicketFetcher]. It must not be
// modified after it is passed to [NewTicketFetcher].
type TicketFetcherConfig struct {
	// Source is asked for the keys: the edge's keyserver [*Client].
	// Required.
	Source TicketKeySource
	// Target receives them: the edge's *tls.Config, as
	// [NewServerTLSConfig] returns it. Required.
	Target TicketKeyTarget
	// Logger receives a line per change of keys and per failed fetch,
	// never a key. Nil means no logging.
	Logger hclog.Logger

	// now replaces time.Now in tests.
	now func() time.Time
}

// Bounds of the retries of a failed fetch: 1 s, doubling up to 5 min.
const (
	ticketRetryMin = time.Second
	ticketRetryMax = 5 * time.Minute
)

// ticketKey is a fetched key with its validity.
type ticketKey struct {
	key                             [32]byte
	notBefore, sealUntil, acceptEnd time.Time
}

// TicketFetcher keeps an edge's session ticket keys those of its ticket
// group on the keyserver, so that a client resumes its session on any
// edge of the group without a key operation or a keyserver call.
//
// Keys live in memory only. The fetcher installs them in the target at
// every change: the key whose period covers now first (it seals new
// tickets), then every other key not past its acceptance window, newest
// first (the next period's key is among them, so the edge opens tickets
// of an edge whose clock is a little ahead, and rotates at the period's
// start by itself). It asks the keyserver at start and again once in
// every period, at a random point of its first quarter (at most 5 min
// in), which brings the next period's key well before its rotation.
//
// While the keyserver cannot be reached, the edge keeps the keys it holds
// and rotates through them on schedule; it drops each at the end of its
// acceptance window, except the newest one in force, which keeps sealing
// and opening tickets until the keyserver answers again, so that the
// group's edges still resume each other's sessions through a long outage.
// It is safe for concurrent use.
type TicketFetcher struct {
	source TicketKeySource
	target TicketKeyTarget
	logger hclog.Logger
	now    func() time.Time

	mu        sync.Mutex
	held      []ticketKey // newest first
	refresh   time.Time   // start of the period after the latest answer's
	group     string
	installed [][32]byte
	stale     bool // the sealing key is past its period
}

// NewTicketFetcher returns a TicketFetcher for cfg. It fetches nothing
// until [TicketFetcher.Fetch] or [TicketFetcher.Run].
func NewTicketFetcher(cfg TicketFetcherConfig) (*TicketFetcher, error) {
	switch {
	case cfg.Source == nil:
		return nil, errors.New("tlscore: TicketFetcherConfig.Source is nil")
	case cfg.Target == nil:
		return nil, errors.New("tlscore: TicketFetcherConfig.Target is nil")
	}
	f := &TicketFetcher{source: cfg.Source, target: cfg.Target, logger: cfg.Logger, now: cfg.now}
	if f.logger == nil {
		f.logger = hclog.NewNullLogger()
	}
	if f.now == nil {
		f.now = time.Now
	}
	return f, nil
}

// Fetch asks the keyserver once and installs what it answers. On error
// the keys held stay in force. Errors are those of the source, or a
// description of an answer that cannot be used (no key, a key not 32
// bytes long, validity times out of order).
func (f *TicketFetcher) Fetch(ctx context.Context) error {
	resp, err := f.source.TicketKeys(ctx)
	if err != nil {
		return err
	}
	keys, err := parseTicketKeys(resp)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.group != resp.GetGroup() || len(f.held) == 0 {
		f.logger.Info("session ticket keys from the keyserver", "group", resp.GetGroup(), "keys", len(keys))
	}
	f.held, f.group = keys, resp.GetGroup()
	f.refresh = time.UnixMilli(resp.GetRefreshUnixMs())
	f.installLocked()
	return nil
}

// parseTicketKeys checks an answer and returns its keys, newest first.
func parseTicketKeys(resp *keylessv1.GetTicketKeysResponse) ([]ticketKey, error) {
	if len(resp.GetKeys()) == 0 {
		return nil, errors.New("tlscore: the keyserver sent no session ticket key")
	}
	keys := make([]ticketKey, 0, len(resp.GetKeys()))
	for i, k := range resp.GetKeys() {
		tk := ticketKey{
			notBefore: time.UnixMilli(k.GetNotBeforeUnixMs()),
			sealUntil: time.UnixMilli(k.GetSealUntilUnixMs()),
			acceptEnd: time.UnixMilli(k.GetAcceptUntilUnixMs()),
		}
		if len(k.GetKey()) != len(tk.key) {
			return nil, fmt.Errorf("tlscore: session ticket key %d from the keyserver is %d bytes; want %d", i, len(k.GetKey()), len(tk.key))
		}
		if !tk.notBefore.Before(tk.sealUntil) || tk.acceptEnd.Before(tk.sealUntil) {
			return nil, fmt.Errorf("tlscore: session ticket key %d from the keyserver: validity times out of order", i)
		}
		copy(tk.key[:], k.GetKey())
		keys = append(keys, tk)
	}
	slices.SortStableFunc(keys, func(a, b ticketKey) int { return b.notBefore.Compare(a.notBefore) })
	return keys, nil
}

// installLocked installs the keys in force now, if they changed.
func (f *TicketFetcher) installLocked() {
	now := f.now()
	keys, stale := selectTicketKeys(f.held, now)
	if len(keys) == 0 {
		return
	}
	if stale && !f.stale {
		f.logger.Warn("session ticket keys not renewed in time: the newest one keeps sealing tickets until the keyserver answers", "group", f.group)
	}
	f.stale = stale
	if slices.Equal(keys, f.installed) {
		return
	}
	f.target.SetSessionTicketKeys(keys)
	f.installed = keys
	f.logger.Debug("session ticket keys installed", "group", f.group, "keys", len(keys))
}

// selectTicketKeys returns the keys of held (newest first) in force at
// now, the sealing key first, and whether that key is past its period
// (the keyserver has not been reached for longer than the keys cover).
func selectTicketKeys(held []ticketKey, now time.Time) (keys [][32]byte, stale bool) {
	seal := -1
	for i, k := range held {
		if !now.Before(k.notBefore) {
			seal = i // the newest key already started
			break
		}
	}
	if seal < 0 {
		return nil, false // every key is for later: a clock far behind
	}
	keys = append(keys, held[seal].key)
	stale = !now.Before(held[seal].sealUntil)
	for i, k := range held {
		if i != seal && now.Before(k.acceptEnd) {
			keys = append(keys, k.key)
		}
	}
	return keys, stale
}

// nextEventLocked returns the next time the keys in force change.
func (f *TicketFetcher) nextEventLocked(now time.Time) time.Time {
	var next time.Time
	for _, k := range f.held {
		for _, t := range []time.Time{k.notBefore, k.sealUntil, k.acceptEnd} {
			if t.After(now) && (next.IsZero() || t.Before(next)) {
				next = t
			}
		}
	}
	return next
}

// Run keeps the keys current until ctx ends: it fetches them (now if
// none is held), installs them at each change, and fetches again once a
// period, or after a failure with a backoff of 1 s doubling up to 5 min.
// A failure is logged as a warning, once until the next success.
func (f *TicketFetcher) Run(ctx context.Context) {
	f.mu.Lock()
	nextFetch := f.refresh
	if len(f.held) > 0 {
		nextFetch = f.fetchTime(f.refresh)
	}
	f.mu.Unlock()
	retry := ticketRetryMin
	failing := false
	for {
		now := f.now()
		if !now.Before(nextFetch) {
			if err := f.Fetch(ctx); err != nil {
				if ctx.Err() != nil {
					return
				}
				if !failing {
					f.logger.Warn("session ticket keys could not be fetched; the keys held stay in force", "error", err,
						"next_attempt_in", retry)
				}
				failing = true
				nextFetch = now.Add(retry)
				retry = min(2*retry, ticketRetryMax)
				if status.Code(err) == codes.PermissionDenied {
					retry = ticketRetryMax
				}
			} else {
				if failing {
					f.logger.Info("session ticket keys fetched again", "group", f.group)
				}
				failing, retry = false, ticketRetryMin
				f.mu.Lock()
				nextFetch = f.fetchTime(f.refresh)
				f.mu.Unlock()
			}
		}
		f.mu.Lock()
		f.installLocked()
		wake := nextFetch
		if e := f.nextEventLocked(now); !e.IsZero() && e.Before(wake) {
			wake = e
		}
		f.mu.Unlock()
		t := time.NewTimer(max(wake.Sub(f.now()), time.Millisecond))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// fetchTime returns when to ask again after an answer whose period ends
// at refresh: at a random point in the first quarter of the next period
// (at most 5 min in), so that a fleet's edges do not ask all at once.
// The period is that of the held keys.
func (f *TicketFetcher) fetchTime(refresh time.Time) time.Time {
	period := time.Hour
	if len(f.held) > 0 {
		period = f.held[0].sealUntil.Sub(f.held[0].notBefore)
	}
	spread := min(period/4, 5*time.Minute)
	return refresh.Add(rand.N(spread + 1))
}
